//! One-time join tokens: 256 random bits, shown once, stored only as a hash.

use base64::Engine;
use sha2::{Digest, Sha256};

/// Longest token text accepted from a client; a real one is 43 bytes.
pub const MAX_TOKEN_LEN: usize = 128;

/// A fresh token and the hash the store keeps.
pub fn generate() -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let hash = hash(&token);
    (token, hash)
}

/// The stored form of a token: SHA-256, hex. A leaked database therefore
/// holds no usable token, and 256 random bits need no slow hash.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_unique_and_hash_stably() {
        let (a, ha) = super::generate();
        let (b, hb) = super::generate();
        assert_ne!(a, b);
        assert_ne!(ha, hb);
        assert_eq!(a.len(), 43);
        assert_eq!(super::hash(&a), ha);
        assert_eq!(
            super::hash(&format!(" {a}\n")),
            ha,
            "surrounding whitespace is ignored"
        );
    }
}
