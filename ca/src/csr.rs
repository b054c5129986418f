//! Checking a certificate signing request before anything is signed.
//!
//! The CSR contributes its public key to the certificate, and for a pod the
//! DNS names `kubernetes.dns_names` grants its identity that it asks for.
//! Everything else it asks for is checked against what the caller proved (a
//! token or a current SVID) and then ignored; the leaf's fields come from
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
    if sans.is_empty() || uris > 1 || (dns_allowed.is_none() && sans.len() > 1) {
        return Err(CsrError::SanCount(sans.len()));
    }
    let granted = dns_allowed.unwrap_or_default();
    let mismatch = |asked: String| CsrError::SanMismatch {
        asked,
        allowed: match granted {
            [] => allowed.to_string(),
            names => format!("{allowed} and DNS:{}", names.join(", DNS:")),
        },
    };
    // No URI: the one name, or the first, is not the identity.
    if uris == 0 {
        return Err(mismatch(san_text(&sans[0])));
    }
    let mut dns_names: Vec<String> = Vec::new();
    for san in sans {
        match san {
            rcgen::SanType::URI(uri) if uri.as_str() == allowed.as_str() => {}
            rcgen::SanType::DnsName(d) if granted.iter().any(|a| a == d.as_str()) => {
                if dns_names.iter().any(|n| n == d.as_str()) {
                    return Err(mismatch(format!("{} twice", san_text(san))));
                }
                dns_names.push(d.as_str().to_owned());
            }
            other => return Err(mismatch(san_text(other))),
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

    #[test]
    fn a_pod_gets_the_dns_names_granted_to_it_and_nothing_else() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let dns = |s: &str| SanType::DnsName(s.try_into().unwrap());
        let granted = [
            "hook.ns.svc".to_owned(),
            "hook.ns.svc.cluster.local".to_owned(),
        ];
        let one = vec![uri("spiffe://td/web"), dns("hook.ns.svc")];
        let (_, names) = check(&csr(&key, one.clone()), &id(), Some(&granted)).unwrap();
        assert_eq!(names, ["hook.ns.svc"]);
        let both = vec![
            uri("spiffe://td/web"),
            dns("hook.ns.svc.cluster.local"),
            dns("hook.ns.svc"),
        ];
        let (_, names) = check(&csr(&key, both), &id(), Some(&granted)).unwrap();
        assert_eq!(names, ["hook.ns.svc.cluster.local", "hook.ns.svc"]);
        // A pod granted nothing; a join token or a renewal (as before).
        let e = check(&csr(&key, one.clone()), &id(), Some(&[])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "csr asks for DNS:hook.ns.svc, but the caller may only have spiffe://td/web"
        );
        assert_eq!(
            check(&csr(&key, one), &id(), None).unwrap_err(),
            CsrError::SanCount(2)
        );
        let ip = SanType::IpAddress("10.0.0.1".parse().unwrap());
        let mismatch = |asked: &str| CsrError::SanMismatch {
            asked: asked.to_owned(),
            allowed: "spiffe://td/web and DNS:hook.ns.svc, DNS:hook.ns.svc.cluster.local"
                .to_owned(),
        };
        let web = || uri("spiffe://td/web");
        for (bad, want) in [
            (
                vec![web(), dns("hook.ns.svc"), dns("other.ns.svc")],
                mismatch("DNS:other.ns.svc"),
            ),
            (
                vec![web(), dns("hook.ns.svc"), dns("hook.ns.svc")],
                mismatch("DNS:hook.ns.svc twice"),
            ),
            (vec![web(), dns("Hook.ns.svc")], mismatch("DNS:Hook.ns.svc")),
            (vec![web(), ip], mismatch("IP:10.0.0.1")),
            (
                vec![uri("spiffe://td/db"), dns("hook.ns.svc")],
                mismatch("spiffe://td/db"),
            ),
            (vec![dns("hook.ns.svc")], mismatch("DNS:hook.ns.svc")),
            (
                vec![dns("hook.ns.svc"), dns("hook.ns.svc.cluster.local")],
                mismatch("DNS:hook.ns.svc"),
            ),
            (
                vec![web(), web(), dns("hook.ns.svc")],
                CsrError::SanCount(3),
            ),
            (vec![], CsrError::SanCount(0)),
        ] {
            let e = check(&csr(&key, bad.clone()), &id(), Some(&granted)).unwrap_err();
            assert_eq!(e, want, "{bad:?}");
        }
    }
}
