//! The trust bundle in the SPIFFE JSON form (SPIFFE Trust Domain and Bundle
//! spec, section 4): a JWK set whose keys have `use: x509-svid` and carry the
//! root certificate in `x5c`.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use serde_json::{Value, json};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};

/// How often (seconds) a consumer should re-fetch the bundle.
pub const REFRESH_HINT_SECS: u64 = 300;

/// The bundle's roots as a SPIFFE JSON bundle. Roots whose key is not
/// ECDSA P-256 are listed with `x5c` only (no JWK coordinates).
pub fn spiffe_json(roots: &[CertificateDer<'_>], sequence: u64) -> Value {
    let keys: Vec<Value> = roots.iter().map(|c| jwk(c)).collect();
    json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": REFRESH_HINT_SECS,
    })
}

fn jwk(cert: &CertificateDer<'_>) -> Value {
    let mut key = json!({ "use": "x509-svid", "x5c": [STANDARD.encode(cert)] });
    if let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) {
        let spki = parsed.public_key();
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        let point = spki.subject_public_key.data.as_ref();
        // An uncompressed P-256 point: 0x04 || X (32 bytes) || Y (32 bytes).
        if spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
            && curve.as_ref() == Some(&OID_EC_P256)
            && point.len() == 65
            && point[0] == 4
        {
            key["kty"] = "EC".into();
            key["crv"] = "P-256".into();
            key["x"] = URL_SAFE_NO_PAD.encode(&point[1..33]).into();
            key["y"] = URL_SAFE_NO_PAD.encode(&point[33..]).into();
        }
    }
    key
}
