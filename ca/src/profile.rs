//! The three certificate shapes this CA makes, side by side: the root, the
//! intermediate that signs workloads, and the X.509-SVID leaf.
//!
//! Every field of a leaf comes from here, never from the CSR: the CSR only
//! contributes its public key (SPIFFE X.509-SVID spec, sections 4 and 5).

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType, SerialNumber,
};

use warden_config::{SpiffeId, TrustDomain};

use crate::lifetime::Validity;

/// A fresh random 128-bit positive serial number (CA/B Forum asks for >= 64 bits of entropy).
pub fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // DER INTEGER: keep it positive
    bytes[0] |= 0x01; // and exactly 16 bytes long (no leading zero byte is stripped)
    SerialNumber::from_slice(&bytes)
}

fn ca_name(td: &TrustDomain, common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, td.as_str());
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Signing certificates carry the trust domain's own SPIFFE ID, as SPIRE's do.
fn trust_domain_san(td: &TrustDomain) -> Result<SanType, rcgen::Error> {
    Ok(SanType::URI(td.id_string().try_into()?))
}

/// The self-signed root: CA with no path length limit below the intermediate.
pub fn root(td: &TrustDomain, validity: Validity) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::default();
    p.distinguished_name = ca_name(td, "warden root CA");
    p.subject_alt_names = vec![trust_domain_san(td)?];
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = validity.not_before;
    p.not_after = validity.not_after;
    p.serial_number = Some(random_serial());
    Ok(p)
}

/// The intermediate that signs leaves: path length 0, so it cannot mint CAs.
pub fn intermediate(
    td: &TrustDomain,
    validity: Validity,
) -> Result<CertificateParams, rcgen::Error> {
    let mut p = root(td, validity)?;
    p.distinguished_name = ca_name(td, "warden intermediate CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// An X.509-SVID: exactly one URI SAN (the SPIFFE ID), CA:FALSE,
/// digitalSignature only, EKU serverAuth + clientAuth.
pub fn svid(
    id: &SpiffeId,
    validity: Validity,
    dns_names: &[String],
) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, id.trust_domain_str());
    p.distinguished_name = dn;
    p.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    // An X.509-SVID may carry DNS names beside its one URI SAN: a service
    // that clients reach by name (the admission webhook, for the API server).
    for d in dns_names {
        p.subject_alt_names
            .push(SanType::DnsName(d.as_str().try_into()?));
    }
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = validity.not_before;
    p.not_after = validity.not_after;
    p.serial_number = Some(random_serial());
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

pub use warden_config::dns::{valid_dns_label, valid_dns_name};

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use super::*;
    use rcgen::{Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};
    use warden_identity::tls::{KeyUsageBits, PeerIdError, peer_id};

    fn validity() -> Validity {
        let now = time::OffsetDateTime::now_utc();
        Validity {
            not_before: now - time::Duration::seconds(30),
            not_after: now + time::Duration::hours(1),
        }
    }

    fn key() -> KeyPair {
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap()
    }

    #[test]
    fn every_leaf_the_ca_signs_passes_the_leaf_profile_the_verifiers_enforce() {
        let td = TrustDomain::parse("example.org").unwrap();
        let root_key = key();
        let root_params = root(&td, validity()).unwrap();
        root_params.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root_params, root_key);
        let int_key = key();
        let int_params = intermediate(&td, validity()).unwrap();
        int_params.signed_by(&int_key, &root_issuer).unwrap();
        let int_issuer = Issuer::new(int_params, int_key);
        for path in ["/web", "/ns/shop/sa/web", "/a.b/c-d/e_f"] {
            let id = SpiffeId::new(&td, path).unwrap();
            let leaf = svid(&id, validity(), &[])
                .unwrap()
                .signed_by(&key(), &int_issuer)
                .unwrap();
            assert_eq!(peer_id(leaf.der()).unwrap(), id);
            // Tighter than the profile allows: digitalSignature alone, both EKUs.
            let (_, cert) = x509_parser::parse_x509_certificate(leaf.der()).unwrap();
            let ku = cert.key_usage().unwrap().unwrap();
            assert_eq!(ku.value.flags, KeyUsageBits::DIGITAL_SIGNATURE);
            let eku = cert.extended_key_usage().unwrap().unwrap();
            assert!(eku.value.server_auth && eku.value.client_auth);
            assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
        }
    }

    #[test]
    fn dns_names_go_beside_the_one_uri_san() {
        let td = TrustDomain::parse("example.org").unwrap();
        let id = SpiffeId::new(&td, "/ns/warden/sa/webhook").unwrap();
        let names = ["warden-webhook.warden.svc".to_owned()];
        let leaf = svid(&id, validity(), &names)
            .unwrap()
            .self_signed(&key())
            .unwrap();
        assert_eq!(peer_id(leaf.der()).unwrap(), id, "still one URI SAN");
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.der()).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(san.value.general_names.iter().any(|n| matches!(
            n,
            x509_parser::extensions::GeneralName::DNSName("warden-webhook.warden.svc")
        )));
        assert!(valid_dns_name("warden-webhook.warden.svc"));
        for bad in ["*.warden.svc", "Warden.svc", "a..b", "-a.b", ""] {
            assert!(!valid_dns_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_signing_certificates_are_never_identities() {
        let td = TrustDomain::parse("example.org").unwrap();
        for params in [root(&td, validity()), intermediate(&td, validity())] {
            let cert = params.unwrap().self_signed(&key()).unwrap();
            assert_eq!(
                peer_id(cert.der()),
                Err(PeerIdError::IdWithoutPath(td.clone()))
            );
        }
    }
}
