//! Secrets at rest (DESIGN decision 3): AES-256-GCM with a random 96-bit nonce per value,
//! stored as Base64 of nonce ‖ ciphertext. The key lives outside the database.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rand::RngCore as _;

const NONCE_LEN: usize = 12;

/// Seals and opens secrets with the instance's 32-byte key.
#[derive(Clone)]
pub struct Sealer {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("a sealed secret could not be opened: the secret key does not match the one it was sealed with, or the value is damaged")]
pub struct OpenError;

impl Sealer {
    pub fn new(key: &[u8; 32]) -> Self {
        Self {
            cipher: Aes256Gcm::new(key.into()),
        }
    }

    pub fn seal(&self, plaintext: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        // Encryption with a valid key and nonce cannot fail for inputs this size.
        let ciphertext = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plaintext.as_bytes())
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ciphertext);
        BASE64.encode(out)
    }

    pub fn open(&self, sealed: &str) -> Result<String, OpenError> {
        let bytes = BASE64.decode(sealed).map_err(|_| OpenError)?;
        if bytes.len() < NONCE_LEN {
            return Err(OpenError);
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let plaintext = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), ciphertext)
            .map_err(|_| OpenError)?;
        String::from_utf8(plaintext).map_err(|_| OpenError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_the_wrong_key() {
        let sealer = Sealer::new(&[7u8; 32]);
        let secret = sealer.seal("HostName=h;SharedAccessKey=abc");
        assert!(!secret.contains("SharedAccessKey"));
        assert_eq!(
            sealer.open(&secret).unwrap(),
            "HostName=h;SharedAccessKey=abc"
        );
        assert!(Sealer::new(&[8u8; 32]).open(&secret).is_err());
        assert_ne!(sealer.seal("x"), sealer.seal("x"), "nonces differ");
    }
}
