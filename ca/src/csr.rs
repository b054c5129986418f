//! Checking a certificate signing request before anything is signed.
//!
//! The CSR contributes exactly one thing to the certificate: its public key.
//! Everything it asks for is checked against what the caller proved (a token
//! or a current SVID) and then ignored; the leaf's fields come from
//! `profile::svid`. Each way a CSR can be wrong is its own error, so the
//! answer, the metric and the audit line all say which.

use rcgen::CertificateSigningRequestParams;
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

use warden_config::SpiffeId;

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Not a PEM `CERTIFICATE REQUEST`, or not a parsable one.
    #[error("csr is not a PEM certificate request: {0}")]
    Malformed(String),
    /// The CSR's signature does not verify with its own key.
    #[error("csr signature does not verify")]
    BadSignature,
    /// The key is not ECDSA P-256.
    #[error("csr key must be ECDSA P-256")]
    WrongKeyType,
    /// No SAN, or more than one.
    #[error("csr must ask for exactly one URI SAN, found {0} subject alternative names")]
    SanCount(usize),
    /// The one SAN is not the identity the caller proved.
    #[error("csr asks for {asked}, but the caller may only have {allowed}")]
    SanMismatch {
        /// What the CSR asked for.
        asked: String,
        /// What the token or SVID allows.
        allowed: String,
    },
}

impl CsrError {
    /// A short, fixed label for metrics and problem types.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "csr_malformed",
            Self::BadSignature => "csr_bad_signature",
            Self::WrongKeyType => "csr_key_type",
            Self::SanCount(_) => "csr_san_count",
            Self::SanMismatch { .. } => "csr_san_mismatch",
        }
    }
}

/// Checks `pem` against the identity the caller proved and returns the
/// verified request (whose public key is then signed) with the DNS names it
/// asked for. `dns_allowed` is `None` where no CSR may ask for a DNS name
/// (join tokens, renewals: exactly one URI SAN), and for a pod the names
/// `kubernetes.dns_names` grants its identity: one URI SAN and any of them.
pub fn check(
    pem: &str,
    allowed: &SpiffeId,
    dns_allowed: Option<&[String]>,
) -> Result<(CertificateSigningRequestParams, Vec<String>), CsrError> {
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    check_key_type(&der)?;
    let req = CertificateSigningRequestParams::from_der(&der).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => CsrError::BadSignature,
        other => CsrError::Malformed(other.to_string()),
    })?;
    let sans = &req.params.subject_alt_names;
    let uris = sans
        .iter()
        .filter(|s| matches!(s, rcgen::SanType::URI(_)))
        .count();
    let one_name = dns_allowed.is_none() && sans.len() == 1;
    if !(one_name || dns_allowed.is_some() && uris == 1) {
        return Err(CsrError::SanCount(sans.len()));
    }
    let granted = dns_allowed.unwrap_or_default();
    let mut dns_names: Vec<String> = Vec::new();
    for san in sans {
        match san {
            rcgen::SanType::URI(uri) if uri.as_str() == allowed.as_str() => {}
            rcgen::SanType::DnsName(d)
                if granted.iter().any(|a| a == d.as_str())
                    && !dns_names.iter().any(|n| n == d.as_str()) =>
            {
                dns_names.push(d.as_str().to_owned());
            }
            other => {
                return Err(CsrError::SanMismatch {
                    asked: san_text(other),
                    allowed: match granted {
                        [] => allowed.to_string(),
                        names => format!("{allowed} and DNS:{}", names.join(", DNS:")),
                    },
                });
            }
        }
    }
    Ok((req, dns_names))
}

fn check_key_type(der: &CertificateSigningRequestDer<'_>) -> Result<(), CsrError> {
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    let alg = &csr.certification_request_info.subject_pki.algorithm;
    let curve = alg.parameters.as_ref().and_then(|p| p.as_oid().ok());
    if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY && curve.as_ref() == Some(&OID_EC_P256) {
        Ok(())
    } else {
        Err(CsrError::WrongKeyType)
    }
}

/// A SAN as text for an error message, truncated so a hostile CSR cannot
/// blow up a log line.
fn san_text(san: &rcgen::SanType) -> String {
    let text = match san {
        rcgen::SanType::URI(u) => u.as_str().to_owned(),
        rcgen::SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
        rcgen::SanType::Rfc822Name(e) => format!("email:{}", e.as_str()),
        rcgen::SanType::IpAddress(ip) => format!("IP:{ip}"),
        _ => "an unsupported name".to_owned(),
    };
    text.chars().take(256).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519, SanType};

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://td/web").unwrap()
    }

    fn csr(key: &KeyPair, sans: Vec<SanType>) -> String {
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.serialize_request(key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn accepts_a_p256_csr_for_the_allowed_id() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        assert!(check(&csr(&key, vec![uri("spiffe://td/web")]), &id(), None).is_ok());
    }

    #[test]
    fn refuses_each_class_of_bad_csr() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let good = csr(&key, vec![uri("spiffe://td/web")]);
        assert_eq!(
            check("hello", &id(), None).unwrap_err().reason(),
            "csr_malformed"
        );

        let ed = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let e = check(&csr(&ed, vec![uri("spiffe://td/web")]), &id(), None).unwrap_err();
        assert_eq!(e, CsrError::WrongKeyType);

        let e = check(&csr(&key, vec![uri("spiffe://td/db")]), &id(), None).unwrap_err();
        assert_eq!(e.reason(), "csr_san_mismatch");
        let e = check(
            &csr(&key, vec![SanType::DnsName("web".try_into().unwrap())]),
            &id(),
            None,
        )
        .unwrap_err();
        assert_eq!(e.reason(), "csr_san_mismatch");
        let two = vec![uri("spiffe://td/web"), uri("spiffe://td/db")];
        assert_eq!(
            check(&csr(&key, two), &id(), None).unwrap_err(),
            CsrError::SanCount(2)
        );
        assert_eq!(
            check(&csr(&key, vec![]), &id(), None).unwrap_err(),
            CsrError::SanCount(0)
        );

        // Flip one bit in the signature (the DER's last byte) and re-encode.
        let der = CertificateSigningRequestDer::from_pem_slice(good.as_bytes()).unwrap();
        let mut bytes = der.as_ref().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", bytes));
        assert_eq!(
            check(&tampered, &id(), None).unwrap_err(),
            CsrError::BadSignature
        );
    }
}
