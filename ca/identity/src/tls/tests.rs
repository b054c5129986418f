//! Socket-free handshakes over `tokio::io::duplex` with in-process rcgen
//! certificates: each way a leaf can break the X.509-SVID profile fails the
//! handshake on the server's client verifier *and* on the client's server
//! verifier, with the same reason label; a good SVID passes both.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use warden_config::{IdentityPattern, TrustDomain};

use super::{
    KeyUsageBits, PeerIdError, SpiffeClientVerifier, SpiffeServerVerifier,
    handshake_failure_reason, peer_id, provider, verify_client_chain,
};

const WEB: &str = "spiffe://example.org/ns/shop/sa/web";
const APP: &str = "spiffe://example.org/ns/shop/sa/app";

/// A root CA that signs every leaf of a test.
struct Pki {
    issuer: Issuer<'static, KeyPair>,
    roots: Arc<RootCertStore>,
}

impl Pki {
    fn new() -> Self {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, "test root");
        p.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = p.self_signed(&key).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        Self {
            issuer: Issuer::new(p, key),
            roots: Arc::new(roots),
        }
    }

    fn sign(&self, params: CertificateParams) -> Creds {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Creds {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        }
    }
}

struct Creds {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// A leaf the way warden's CA makes one.
fn svid(uri: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - Duration::from_secs(60);
    p.not_after = now + Duration::from_secs(3600);
    p
}

/// DER of a short (< 128 bytes) TLV.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    assert!(content.len() < 128);
    let mut v = vec![tag, content.len() as u8];
    v.extend_from_slice(content);
    v
}

/// One violation: a name, the label it must be counted under, and the leaf.
fn violations() -> Vec<(&'static str, &'static str, CertificateParams)> {
    let with = |edit: fn(&mut CertificateParams)| {
        let mut p = svid(WEB);
        edit(&mut p);
        p
    };
    vec![
        (
            "no URI SAN",
            "uri_san_count",
            with(|p| p.subject_alt_names = vec![SanType::DnsName("web.test".try_into().unwrap())]),
        ),
        (
            "two URI SANs",
            "uri_san_count",
            with(|p| {
                p.subject_alt_names
                    .push(SanType::URI(APP.try_into().unwrap()))
            }),
        ),
        (
            "not a SPIFFE ID",
            "bad_spiffe_id",
            svid("https://example.org/web"),
        ),
        (
            "a trust domain's own ID",
            "spiffe_id_without_path",
            svid("spiffe://example.org"),
        ),
        (
            "another trust domain",
            "wrong_trust_domain",
            svid("spiffe://evil.org/ns/shop/sa/web"),
        ),
        (
            "empty subject, non-critical SAN",
            "san_not_critical",
            with(|p| {
                p.distinguished_name = DistinguishedName::new();
                p.subject_alt_names.clear();
                let uri = tlv(0x86, WEB.as_bytes()); // [6] IMPLICIT IA5String
                p.custom_extensions = vec![CustomExtension::from_oid_content(
                    &[2, 5, 29, 17],
                    tlv(0x30, &uri),
                )];
            }),
        ),
        (
            "no basicConstraints",
            "no_basic_constraints",
            with(|p| p.is_ca = IsCa::NoCa),
        ),
        (
            "CA:TRUE",
            "leaf_is_ca",
            with(|p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0))),
        ),
        (
            "no keyUsage",
            "no_key_usage",
            with(|p| p.key_usages.clear()),
        ),
        (
            "non-critical keyUsage",
            "key_usage_not_critical",
            with(|p| {
                p.key_usages.clear();
                // BIT STRING, 7 unused bits, digitalSignature.
                let mut ku =
                    CustomExtension::from_oid_content(&[2, 5, 29, 15], tlv(0x03, &[7, 0x80]));
                ku.set_criticality(false);
                p.custom_extensions = vec![ku];
            }),
        ),
        (
            "keyUsage without digitalSignature",
            "no_digital_signature",
            with(|p| p.key_usages = vec![KeyUsagePurpose::KeyAgreement]),
        ),
        (
            "keyCertSign",
            "signing_key_usage",
            with(|p| p.key_usages.push(KeyUsagePurpose::KeyCertSign)),
        ),
        (
            "cRLSign",
            "signing_key_usage",
            with(|p| p.key_usages.push(KeyUsagePurpose::CrlSign)),
        ),
        (
            "EKU for neither side",
            "eku_missing_purpose",
            with(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning]),
        ),
    ]
}

fn server_config(pki: &Pki, creds: &Creds) -> Arc<ServerConfig> {
    let td = TrustDomain::parse("example.org").unwrap();
    let verifier = SpiffeClientVerifier::new(pki.roots.clone(), td, provider(), false).unwrap();
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())
        .unwrap();
    let mut config = config;
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

fn client_config(pki: &Pki, creds: &Creds, expected: &str) -> Arc<ClientConfig> {
    let td = TrustDomain::parse("example.org").unwrap();
    let verifier = SpiffeServerVerifier::new(
        pki.roots.clone(),
        td,
        IdentityPattern::parse(expected).unwrap(),
        provider(),
    );
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
        .unwrap();
    Arc::new(config)
}

/// Runs one handshake over an in-memory pipe; returns the server's and the
/// client's outcome.
async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (std::io::Result<()>, std::io::Result<()>) {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let accept = TlsAcceptor::from(server).accept(s);
    let name = ServerName::try_from("dest.test").unwrap();
    let connect = TlsConnector::from(client).connect(name, c);
    // Both ends stay open until both are done, so neither sees a broken pipe.
    let (s, c) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(accept, connect)
    })
    .await
    .expect("handshake finishes");
    (s.map(drop), c.map(drop))
}

#[tokio::test]
async fn a_good_svid_passes_both_verifiers() {
    let pki = Pki::new();
    let (server, client) = (pki.sign(svid(APP)), pki.sign(svid(WEB)));
    let (s, c) = handshake(
        server_config(&pki, &server),
        client_config(&pki, &client, APP),
    )
    .await;
    s.unwrap();
    c.unwrap();
}

#[tokio::test]
async fn a_leaf_without_eku_or_with_key_agreement_passes_both_verifiers() {
    let pki = Pki::new();
    let mut no_eku = svid(WEB);
    no_eku.extended_key_usages.clear();
    let mut agreement = svid(WEB);
    agreement.key_usages.push(KeyUsagePurpose::KeyAgreement);
    for leaf in [no_eku, agreement] {
        let (good, odd) = (pki.sign(svid(WEB)), pki.sign(leaf));
        let (s, c) = handshake(server_config(&pki, &good), client_config(&pki, &odd, WEB)).await;
        assert!(s.is_ok() && c.is_ok(), "as client: {s:?} {c:?}");
        let (s, c) = handshake(server_config(&pki, &odd), client_config(&pki, &good, WEB)).await;
        assert!(s.is_ok() && c.is_ok(), "as server: {s:?} {c:?}");
    }
}

#[tokio::test]
async fn a_single_purpose_leaf_works_on_its_side_only() {
    let pki = Pki::new();
    let good = pki.sign(svid(WEB));
    let mut client_only = svid(WEB);
    client_only.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let mut server_only = svid(WEB);
    server_only.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let (client_only, server_only) = (pki.sign(client_only), pki.sign(server_only));
    let (s, c) = handshake(
        server_config(&pki, &good),
        client_config(&pki, &client_only, WEB),
    )
    .await;
    assert!(
        s.is_ok() && c.is_ok(),
        "clientAuth as a client: {s:?} {c:?}"
    );
    let (s, c) = handshake(
        server_config(&pki, &server_only),
        client_config(&pki, &good, WEB),
    )
    .await;
    assert!(
        s.is_ok() && c.is_ok(),
        "serverAuth as a server: {s:?} {c:?}"
    );
    let (s, _) = handshake(
        server_config(&pki, &good),
        client_config(&pki, &server_only, WEB),
    )
    .await;
    let err = s.expect_err("serverAuth only, as a client");
    assert_eq!(handshake_failure_reason(&err), "wrong_key_usage", "{err}");
}

#[tokio::test]
async fn each_profile_violation_fails_the_server_side_client_verifier_with_its_reason() {
    let pki = Pki::new();
    let server = pki.sign(svid(APP));
    for (what, reason, params) in violations() {
        let bad = pki.sign(params);
        let (s, _) = handshake(server_config(&pki, &server), client_config(&pki, &bad, APP)).await;
        let err = s.expect_err(what);
        assert_eq!(handshake_failure_reason(&err), reason, "{what}: {err}");
    }
}

#[tokio::test]
async fn each_profile_violation_fails_the_client_side_server_verifier_with_its_reason() {
    let pki = Pki::new();
    let client = pki.sign(svid(WEB));
    for (what, reason, params) in violations() {
        let bad = pki.sign(params);
        let (_, c) = handshake(
            server_config(&pki, &bad),
            client_config(&pki, &client, "spiffe://example.org/*"),
        )
        .await;
        let err = c.expect_err(what);
        assert_eq!(handshake_failure_reason(&err), reason, "{what}: {err}");
    }
}

#[tokio::test]
async fn a_valid_svid_with_the_wrong_id_names_what_it_presented() {
    let pki = Pki::new();
    let (server, client) = (pki.sign(svid(WEB)), pki.sign(svid(APP)));
    let (_, c) = handshake(
        server_config(&pki, &server),
        client_config(&pki, &client, "spiffe://example.org/db"),
    )
    .await;
    let err = c.unwrap_err();
    assert_eq!(handshake_failure_reason(&err), "wrong_identity");
    let tls = err
        .get_ref()
        .unwrap()
        .downcast_ref::<rustls::Error>()
        .unwrap();
    assert!(
        matches!(
            tls,
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { presented, .. })
                if presented == &[WEB.to_owned()]
        ),
        "{tls:?}"
    );
    assert!(err.to_string().contains(WEB), "{err}");
}

#[test]
fn the_profile_check_carries_the_offending_bits() {
    let pki = Pki::new();
    let mut p = svid(WEB);
    p.key_usages.push(KeyUsagePurpose::KeyCertSign);
    let err = peer_id(&pki.sign(p).chain[0]).unwrap_err();
    let bits = KeyUsageBits(KeyUsageBits::DIGITAL_SIGNATURE | KeyUsageBits::KEY_CERT_SIGN);
    assert_eq!(err, PeerIdError::SigningKeyUsage(bits));
    assert_eq!(
        err.to_string(),
        "leaf keyUsage (digitalSignature, keyCertSign) has keyCertSign or cRLSign; a leaf SVID must not sign"
    );
}

#[test]
fn verify_client_chain_applies_the_same_profile() {
    let pki = Pki::new();
    let td = TrustDomain::parse("example.org").unwrap();
    let good = pki.sign(svid(WEB));
    let peer = verify_client_chain(&good.chain[0], &[], &pki.roots, &td, UnixTime::now()).unwrap();
    assert_eq!(peer.id().as_str(), WEB);
    for (what, reason, params) in violations() {
        let bad = pki.sign(params);
        let err = verify_client_chain(&bad.chain[0], &[], &pki.roots, &td, UnixTime::now())
            .expect_err(what);
        assert_eq!(super::tls_failure_reason(&err), reason, "{what}: {err}");
    }
}
