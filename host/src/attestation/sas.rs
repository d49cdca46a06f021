//! Shared access signature tokens, for devices (`sr={idScope}/registrations/{id}`) and for the
//! service API (`sr={serviceHost}`); wire-protocol.md §2.
//!
//! The signature is checked over `sr` exactly as the client sent it, before URL-decoding: the C
//! SDK percent-encodes in lower case and the others in upper case (§2.1).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Longest token accepted; real tokens are under 300 bytes.
const MAX_TOKEN_LEN: usize = 4096;
const PREFIX: &str = "SharedAccessSignature ";

/// Why a token was refused. Display is safe to show to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    #[error("the authorization header is not a SharedAccessSignature token")]
    NotSas,
    #[error("the SAS token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    #[error("the SAS token field '{0}' is missing")]
    MissingField(&'static str),
    #[error("the SAS token field '{0}' appears more than once")]
    DuplicateField(&'static str),
    #[error("the SAS token field '{0}' is malformed")]
    MalformedField(&'static str),
    #[error("the SAS token expired at {0} (Unix time)")]
    Expired(i64),
    #[error("the SAS token signature does not match")]
    BadSignature,
}

/// A parsed token. `resource_as_sent` is kept encoded because it is what was signed.
#[derive(Debug, Clone)]
pub struct SasToken {
    pub resource_as_sent: String,
    /// `sr` percent-decoded, for comparing against the expected resource.
    pub resource: String,
    pub signature: Vec<u8>,
    pub expiry: i64,
    pub key_name: Option<String>,
}

impl SasToken {
    /// Parses `SharedAccessSignature sr=…&sig=…&se=…[&skn=…]`, fields in any order, field
    /// names case-insensitive.
    pub fn parse(header: &str) -> Result<Self, SasError> {
        if header.len() > MAX_TOKEN_LEN {
            return Err(SasError::TooLong);
        }
        let header = header.trim();
        let rest = header
            .get(..PREFIX.len())
            .filter(|p| p.eq_ignore_ascii_case(PREFIX))
            .and_then(|_| header.get(PREFIX.len()..))
            .ok_or(SasError::NotSas)?;
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for field in rest.trim().split('&').filter(|f| !f.is_empty()) {
            let (name, value) = field.split_once('=').ok_or(SasError::NotSas)?;
            let (slot, label) = match name.to_ascii_lowercase().as_str() {
                "sr" => (&mut sr, "sr"),
                "sig" => (&mut sig, "sig"),
                "se" => (&mut se, "se"),
                "skn" => (&mut skn, "skn"),
                // Unknown fields are ignored, as the service-side parsers of the SDKs do.
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(SasError::DuplicateField(label));
            }
        }
        let sr = sr.ok_or(SasError::MissingField("sr"))?;
        let sig = sig.ok_or(SasError::MissingField("sig"))?;
        let se = se.ok_or(SasError::MissingField("se"))?;
        let resource = percent_decode_str(sr)
            .decode_utf8()
            .map_err(|_| SasError::MalformedField("sr"))?
            .into_owned();
        let sig_text = percent_decode_str(sig)
            .decode_utf8()
            .map_err(|_| SasError::MalformedField("sig"))?;
        let signature = BASE64
            .decode(sig_text.as_bytes())
            .map_err(|_| SasError::MalformedField("sig"))?;
        let expiry = percent_decode_str(se)
            .decode_utf8()
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or(SasError::MalformedField("se"))?;
        let key_name = skn
            .map(|k| {
                percent_decode_str(k)
                    .decode_utf8()
                    .map(std::borrow::Cow::into_owned)
                    .map_err(|_| SasError::MalformedField("skn"))
            })
            .transpose()?;
        Ok(Self {
            resource_as_sent: sr.to_owned(),
            resource,
            signature,
            expiry,
            key_name,
        })
    }

    /// Refuses a token whose expiry lies before `now` (Unix seconds).
    pub fn check_expiry(&self, now: i64) -> Result<(), SasError> {
        if self.expiry < now {
            Err(SasError::Expired(self.expiry))
        } else {
            Ok(())
        }
    }

    /// True when the signature is HMAC-SHA256(key, sr-as-sent + "\n" + se); constant time.
    pub fn signed_with(&self, key: &[u8]) -> bool {
        let expected = hmac_sha256(key, &string_to_sign(&self.resource_as_sent, self.expiry));
        expected.ct_eq(self.signature.as_slice()).into()
    }
}

fn string_to_sign(resource_encoded: &str, expiry: i64) -> String {
    format!("{resource_encoded}\n{expiry}")
}

fn hmac_sha256(key: &[u8], message: &str) -> Vec<u8> {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
        return Vec::new();
    };
    mac.update(message.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// Builds a token the way the Azure SDKs do: `sr` upper-case percent-encoded.
pub fn build_token(resource: &str, key: &[u8], key_name: Option<&str>, expiry: i64) -> String {
    let sr = utf8_percent_encode(resource, NON_ALPHANUMERIC).to_string();
    let signature = BASE64.encode(hmac_sha256(key, &string_to_sign(&sr, expiry)));
    let sig = utf8_percent_encode(&signature, NON_ALPHANUMERIC);
    let mut token = format!("{PREFIX}sr={sr}&sig={sig}&se={expiry}");
    if let Some(name) = key_name {
        token.push_str("&skn=");
        token.push_str(&utf8_percent_encode(name, NON_ALPHANUMERIC).to_string());
    }
    token
}

/// The device key of a group member: base64(HMAC-SHA256(base64decode(groupKey), registrationId)),
/// wire-protocol.md §2.2.
pub fn derive_device_key(
    group_key_base64: &str,
    registration_id: &str,
) -> Result<String, SasError> {
    let key = BASE64
        .decode(group_key_base64.trim())
        .map_err(|_| SasError::MalformedField("key"))?;
    Ok(BASE64.encode(hmac_sha256(&key, registration_id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derives_the_documented_group_device_key() {
        let key = derive_device_key(
            "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
            "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6",
        )
        .unwrap();
        assert_eq!(key, "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=");
    }

    #[test]
    fn verifies_a_token_it_built() {
        let token = build_token("host.example:8443", b"secret", Some("owner"), 2_000_000_000);
        let parsed = SasToken::parse(&token).unwrap();
        assert_eq!(parsed.resource, "host.example:8443");
        assert_eq!(parsed.key_name.as_deref(), Some("owner"));
        assert!(parsed.signed_with(b"secret"));
        assert!(!parsed.signed_with(b"other"));
    }

    #[test]
    fn signature_is_checked_over_sr_as_sent_in_lower_case_hex() {
        // The C SDK encodes '/' as %2f; the signature covers that spelling.
        let sr = "0ne00000001%2fregistrations%2fdev-1";
        let sig = BASE64.encode(hmac_sha256(b"k", &format!("{sr}\n100")));
        let sig = utf8_percent_encode(&sig, NON_ALPHANUMERIC);
        let token = format!("SharedAccessSignature sr={sr}&sig={sig}&se=100&skn=registration");
        let parsed = SasToken::parse(&token).unwrap();
        assert!(parsed.signed_with(b"k"));
        assert_eq!(parsed.resource, "0ne00000001/registrations/dev-1");
    }

    #[test]
    fn refuses_malformed_tokens() {
        assert_eq!(SasToken::parse("Bearer x").unwrap_err(), SasError::NotSas);
        assert_eq!(
            SasToken::parse("SharedAccessSignature sig=AA%3D%3D&se=1").unwrap_err(),
            SasError::MissingField("sr")
        );
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&sig=AA%3D%3D&se=soon").unwrap_err(),
            SasError::MalformedField("se")
        );
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&sr=b&sig=AA%3D%3D&se=1").unwrap_err(),
            SasError::DuplicateField("sr")
        );
        assert_eq!(
            SasToken::parse(&"x".repeat(5000)).unwrap_err(),
            SasError::TooLong
        );
    }

    #[test]
    fn expired_token_is_refused() {
        let token = SasToken::parse(&build_token("h", b"k", None, 10)).unwrap();
        assert_eq!(token.check_expiry(11).unwrap_err(), SasError::Expired(10));
        assert!(token.check_expiry(10).is_ok());
    }
}
