//! Keys that replicas share. A root or intermediate made by rotation has
//! its key written to the state directory's `keys/` of the replica that
//! made it; replicas on PostgreSQL each have their own state directory, so
//! the key also goes into the shared store, sealed (AES-256-GCM, the
//! certificate's id as associated data) under the CA directory's
//! `store.key`, which every replica has (it lives with the other keys, in
//! the Secret on Kubernetes) and the database never sees. A replica that
//! needs a key it does not hold unseals it into its own `keys/`.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::authority::CaError;

/// Length of `store.key`'s secret, in bytes (before base64).
pub const STORE_KEY_LEN: usize = 32;

/// The sealing key from `store.key`'s text, and the key that vouches for
/// the store's records of roots and intermediates (derived from it).
pub struct StoreKey(LessSafeKey, aws_lc_rs::hmac::Key);

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(..)")
    }
}

fn bad(what: &str) -> CaError {
    CaError::Corrupt(format!("sealed key: {what}"))
}

impl StoreKey {
    /// A new random secret, as `store.key` holds it.
    pub fn generate() -> String {
        let bytes: [u8; STORE_KEY_LEN] = rand::random();
        STANDARD.encode(bytes) + "\n"
    }

    /// Parses `store.key`'s text.
    pub fn parse(text: &str) -> Result<Self, CaError> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| CaError::Setup("store.key is not base64".into()))?;
        if bytes.len() != STORE_KEY_LEN {
            return Err(CaError::Setup(format!(
                "store.key holds {} bytes, not {STORE_KEY_LEN}",
                bytes.len()
            )));
        }
        let key = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| CaError::Setup("store.key: not an AES-256 key".into()))?;
        use aws_lc_rs::hmac;
        let derived = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &bytes),
            b"warden authority records",
        );
        let mac_key = hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref());
        Ok(Self(LessSafeKey::new(key), mac_key))
    }

    /// Seals `key_pem` (of the CA certificate `id`) for the store.
    pub fn seal(&self, id: &str, key_pem: &str) -> Result<String, CaError> {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut data = key_pem.as_bytes().to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(id.as_bytes()),
                &mut data,
            )
            .map_err(|_| bad("sealing failed"))?;
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&data);
        Ok(STANDARD.encode(out))
    }

    /// A tag over `fields` (joined unambiguously): the store cannot make
    /// one, so it cannot add a trust anchor of its own.
    pub fn tag(&self, fields: &[&str]) -> String {
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&self.1);
        for f in fields {
            ctx.update(&(f.len() as u64).to_be_bytes());
            ctx.update(f.as_bytes());
        }
        STANDARD.encode(ctx.sign().as_ref())
    }

    /// Whether `tag` is [`StoreKey::tag`] of `fields` (in constant time).
    pub fn verify(&self, fields: &[&str], tag: &str) -> bool {
        let Ok(tag) = STANDARD.decode(tag) else {
            return false;
        };
        let mut msg = Vec::new();
        for f in fields {
            msg.extend_from_slice(&(f.len() as u64).to_be_bytes());
            msg.extend_from_slice(f.as_bytes());
        }
        aws_lc_rs::hmac::verify(&self.1, &msg, &tag).is_ok()
    }

    /// Opens what [`StoreKey::seal`] made for `id`; fails on any change to
    /// it, or if it was sealed for another id or under another key.
    pub fn open(&self, id: &str, sealed: &str) -> Result<String, CaError> {
        let bytes = STANDARD.decode(sealed).map_err(|_| bad("not base64"))?;
        if bytes.len() < NONCE_LEN {
            return Err(bad("too short"));
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad("bad nonce"))?;
        let mut data = rest.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(id.as_bytes()), &mut data)
            .map_err(|_| bad("does not open under store.key (another key, or tampered)"))?;
        String::from_utf8(plain.to_vec()).map_err(|_| bad("not text"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use super::*;

    #[test]
    fn a_sealed_key_opens_only_for_its_id_under_its_key_and_untouched() {
        let key = StoreKey::parse(&StoreKey::generate()).unwrap();
        let sealed = key.seal("abc", "-----BEGIN PRIVATE KEY-----").unwrap();
        assert_eq!(
            key.open("abc", &sealed).unwrap(),
            "-----BEGIN PRIVATE KEY-----"
        );
        assert!(key.open("abd", &sealed).is_err(), "another id");
        let other = StoreKey::parse(&StoreKey::generate()).unwrap();
        assert!(other.open("abc", &sealed).is_err(), "another key");
        let mut bytes = STANDARD.decode(&sealed).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(
            key.open("abc", &STANDARD.encode(bytes)).is_err(),
            "tampered"
        );
        assert!(StoreKey::parse("c2hvcnQ=").is_err());
    }
}
