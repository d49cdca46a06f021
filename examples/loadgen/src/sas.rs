//! Shared access signatures: group-derived device keys and device tokens (wire-protocol.md
//! §2.1, §2.2), service tokens from the connection string (§2.3).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

/// Lifetime of the tokens this program signs.
const TOKEN_SECONDS: u64 = 3600;

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&key, message).as_ref().to_vec()
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A group member's key: HMAC-SHA256(group key, registration ID), the raw bytes (§2.2).
pub fn derive_device_key(group_key: &[u8], registration_id: &str) -> Vec<u8> {
    hmac_sha256(group_key, registration_id.as_bytes())
}

/// `SharedAccessSignature sr={url-encoded resource}&sig={url-encoded b64 HMAC(key, sr + "\n" +
/// se)}&se={se}&skn={key_name}`, signed over `sr` as sent, valid for an hour.
pub fn token(resource: &str, key: &[u8], key_name: &str) -> String {
    let expiry = unix_now() + TOKEN_SECONDS;
    let sr = utf8_percent_encode(resource, NON_ALPHANUMERIC).to_string();
    let signature = BASE64.encode(hmac_sha256(key, format!("{sr}\n{expiry}").as_bytes()));
    let sig = utf8_percent_encode(&signature, NON_ALPHANUMERIC);
    let skn = utf8_percent_encode(key_name, NON_ALPHANUMERIC);
    format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}&skn={skn}")
}

/// A device's registration token (`skn=registration`).
pub fn device_token(id_scope: &str, registration_id: &str, device_key: &[u8]) -> String {
    token(
        &format!("{id_scope}/registrations/{registration_id}"),
        device_key,
        "registration",
    )
}

/// `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`.
#[derive(Clone)]
pub struct ConnectionString {
    pub host_name: String,
    pub key_name: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionString")
            .field("host_name", &self.host_name)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

impl ConnectionString {
    pub fn parse(text: &str) -> Result<Self, String> {
        let field = |name: &str| {
            text.split(';')
                .filter_map(|part| part.trim().split_once('='))
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.trim().to_owned())
                .filter(|value| !value.is_empty())
                .ok_or_else(|| format!("the connection string has no {name}"))
        };
        let key = BASE64
            .decode(field("SharedAccessKey")?)
            .map_err(|_| "the connection string's SharedAccessKey is not Base64".to_owned())?;
        Ok(Self {
            host_name: field("HostName")?,
            key_name: field("SharedAccessKeyName")?,
            key,
        })
    }

    /// A service token for the connection string's host and policy.
    pub fn token(&self) -> String {
        token(&self.host_name, &self.key, &self.key_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derives_the_documented_group_device_key() {
        // wire-protocol.md §2.2, verified test vector.
        let group = BASE64
            .decode("8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==")
            .unwrap();
        let key = derive_device_key(&group, "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6");
        assert_eq!(
            BASE64.encode(key),
            "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc="
        );
    }

    #[test]
    fn a_device_token_signs_the_encoded_resource() {
        let token = device_token("0ne00000001", "dev-1", b"k");
        let fields: Vec<&str> = token
            .strip_prefix("SharedAccessSignature ")
            .unwrap()
            .split('&')
            .collect();
        assert_eq!(fields[0], "sr=0ne00000001%2Fregistrations%2Fdev%2D1");
        let se = fields[2].strip_prefix("se=").unwrap();
        let expected = BASE64.encode(hmac_sha256(
            b"k",
            format!("0ne00000001%2Fregistrations%2Fdev%2D1\n{se}").as_bytes(),
        ));
        let sig = percent_encoding::percent_decode_str(fields[1].strip_prefix("sig=").unwrap())
            .decode_utf8()
            .unwrap();
        assert_eq!(sig, expected);
        assert_eq!(fields[3], "skn=registration");
    }

    #[test]
    fn parses_a_connection_string() {
        let parsed = ConnectionString::parse(
            "HostName=localhost:8443;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=AAEC",
        )
        .unwrap();
        assert_eq!(parsed.host_name, "localhost:8443");
        assert_eq!(parsed.key_name, "provisioningserviceowner");
        assert_eq!(parsed.key, vec![0, 1, 2]);
        assert!(parsed.token().contains("&skn=provisioningserviceowner"));
        assert!(ConnectionString::parse("HostName=x").is_err());
    }
}
