//! The X.509-SVID leaf profile, end to end: a leaf signed by our own CA
//! that breaks a rule of the profile is refused by an inbound listener
//! (counted under its own handshake reason) and, presented by a
//! destination, by an outbound listener (the app gets 502). A valid SVID
//! with the wrong ID is logged with the ID it presented.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, SanType};
use rcgen::{ExtendedKeyUsagePurpose as Eku, IsCa, KeyUsagePurpose as Ku};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const WEB: &str = "spiffe://example.org/web";

fn creds(ca: &Ca, path: &str) -> Creds {
    Creds {
        dir: ca.issue(&ca.id(path), None),
    }
}

/// DER of a short (< 128 bytes) TLV.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    assert!(content.len() < 128);
    let mut v = vec![tag, content.len() as u8];
    v.extend_from_slice(content);
    v
}

/// Each way to break the profile: what, the reason label, the leaf's params.
fn violations() -> Vec<(&'static str, &'static str, CertificateParams)> {
    let with = |edit: fn(&mut CertificateParams)| {
        let mut p = svid_params(&[WEB]);
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
            svid_params(&[WEB, "spiffe://example.org/admin"]),
        ),
        (
            "another trust domain",
            "wrong_trust_domain",
            svid_params(&["spiffe://evil.org/web"]),
        ),
        (
            "a trust domain's own ID",
            "spiffe_id_without_path",
            svid_params(&["spiffe://example.org"]),
        ),
        (
            "not a SPIFFE ID",
            "bad_spiffe_id",
            svid_params(&["https://example.org/web"]),
        ),
        (
            "an empty subject and a non-critical SAN",
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
            "a non-critical keyUsage",
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
            with(|p| p.key_usages = vec![Ku::KeyAgreement]),
        ),
        (
            "digitalSignature + keyCertSign (the outside report)",
            "signing_key_usage",
            with(|p| p.key_usages.push(Ku::KeyCertSign)),
        ),
        (
            "cRLSign",
            "signing_key_usage",
            with(|p| p.key_usages.push(Ku::CrlSign)),
        ),
        (
            "EKU for neither side",
            "eku_missing_purpose",
            with(|p| p.extended_key_usages = vec![Eku::CodeSigning]),
        ),
    ]
}

#[test]
fn an_inbound_listener_refuses_each_leaf_that_breaks_the_profile_and_counts_it_by_reason() {
    let ca = Ca::init("example.org");
    let app = EchoApp::start();
    let config = format!(
        "{}admin: 127.0.0.1:0\ninbound:\n  - name: app\n    listen: 127.0.0.1:0\n    app: {}\n    policy:\n      rules:\n        - {{name: all, action: allow, from: [spiffe://example.org/*]}}\n",
        creds(&ca, "/app").identity_yaml(),
        app.addr
    );
    let proxy = Proxy::start(ca.tmp.path(), &config);
    let (addr, bundle) = (proxy.addr("app"), ca.bundle_pem());

    // The same forging, profile intact, gets through: what fails below is the profile.
    let (good, good_key) = forge_leaf(&ca.dir, svid_params(&[WEB]));
    let (status, _) = mtls_get(addr, &bundle, Some((&good, &good_key)), "GET", "/x", "").unwrap();
    assert_eq!(status, 200);

    let mut counts: HashMap<&str, f64> = HashMap::new();
    for (what, reason, params) in violations() {
        let (chain, key) = forge_leaf(&ca.dir, params);
        let mut tls = mtls_connect(addr, &bundle, Some((&chain, &key)), &[b"http/1.1"]).unwrap();
        // TLS 1.3: connect() and the write succeed; the refusal is on the first read.
        let r = h1_over(&mut tls, "GET", "/x", "");
        assert!(r.is_err(), "{what}: the request got an answer: {r:?}");
        *counts.entry(reason).or_default() += 1.0;
    }
    let metric = |reason: &str| {
        proxy.metric(&format!(
            "warden_proxy_handshake_failures_total{{direction=\"inbound\",listener=\"app\",reason=\"{reason}\"}}"
        ))
    };
    assert!(
        wait_for(Duration::from_secs(5), || counts
            .iter()
            .all(|(reason, n)| metric(reason) == *n)),
        "{:?}",
        counts.keys().map(|r| (r, metric(r))).collect::<Vec<_>>()
    );
    assert_eq!(
        proxy.metric(
            "warden_proxy_requests_total{class=\"2xx\",direction=\"inbound\",listener=\"app\"}"
        ),
        1.0,
        "only the good leaf reached the app"
    );
}

/// A one-certificate TLS server on 127.0.0.1:0 that answers each HTTP/1.1
/// request with `200 ok` (a destination that is not a warden proxy).
fn destination((chain_pem, key_pem): (String, String)) -> SocketAddr {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(sock) = sock else { continue };
            let config = config.clone();
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, sock);
                let mut reader = std::io::BufReader::new(&mut tls);
                while read_request(&mut reader).is_some() {
                    let out = reader.get_mut();
                    if out
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .and_then(|()| out.flush())
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn outbound_listener(
    name: &str,
    destination: SocketAddr,
    server_id: &str,
    protocol: &str,
) -> String {
    format!(
        "  - name: {name}\n    listen: 127.0.0.1:0\n    destination: {destination}\n    server_id: {server_id}\n    protocol: {protocol}\n"
    )
}

#[test]
fn an_outbound_listener_refuses_each_destination_whose_leaf_breaks_the_profile_with_502() {
    let ca = Ca::init("example.org");
    let good = destination(forge_leaf(&ca.dir, svid_params(&[WEB])));
    let cases: Vec<_> = violations()
        .into_iter()
        .map(|(what, reason, params)| (what, reason, destination(forge_leaf(&ca.dir, params))))
        .collect();
    let mut config = format!(
        "{}admin: 127.0.0.1:0\noutbound:\n{}",
        creds(&ca, "/client").identity_yaml(),
        outbound_listener("good", good, "spiffe://example.org/*", "http")
    );
    for (i, (_, _, dest)) in cases.iter().enumerate() {
        config += &outbound_listener(&format!("bad-{i}"), *dest, "spiffe://example.org/*", "http");
    }
    let proxy = Proxy::start(ca.tmp.path(), &config);

    // The same forging, profile intact, gets through: what fails below is the profile.
    assert_eq!(
        plain_get(proxy.addr("good"), "/x").unwrap(),
        (200, "ok".into())
    );
    for (i, (what, reason, _)) in cases.iter().enumerate() {
        let (status, _) = plain_get(proxy.addr(&format!("bad-{i}")), "/x").unwrap();
        assert_eq!(status, 502, "{what}");
        let counted = proxy.metric(&format!(
            "warden_proxy_rejected_requests_total{{direction=\"outbound\",listener=\"bad-{i}\",reason=\"upstream_unavailable\"}}"
        ));
        assert_eq!(counted, 1.0, "{what}");
        // The handshake is counted by the rule the destination broke, as inbound.
        let by_rule = proxy.metric(&format!(
            "warden_proxy_handshake_failures_total{{direction=\"outbound\",listener=\"bad-{i}\",reason=\"{reason}\"}}"
        ));
        assert_eq!(by_rule, 1.0, "{what}");
    }
}

#[test]
fn a_destination_with_a_valid_svid_but_the_wrong_id_is_refused_and_logged_with_the_id_it_presented()
{
    let ca = Ca::init("example.org");
    let impostor = destination(forge_leaf(&ca.dir, svid_params(&[WEB])));
    let config = format!(
        "{}admin: 127.0.0.1:0\noutbound:\n{}{}",
        creds(&ca, "/client").identity_yaml(),
        outbound_listener("db-http", impostor, "spiffe://example.org/db", "http"),
        outbound_listener("db-tcp", impostor, "spiffe://example.org/db", "tcp"),
    );
    let proxy = Proxy::start(ca.tmp.path(), &config);

    let (status, _) = plain_get(proxy.addr("db-http"), "/x").unwrap();
    assert_eq!(status, 502);
    let mut tcp = std::net::TcpStream::connect(proxy.addr("db-tcp")).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = tcp.write_all(b"hello\n");
    let mut got = Vec::new();
    let _ = tcp.read_to_end(&mut got);
    assert!(got.is_empty(), "the app's bytes never reach the impostor");

    let metric = |listener: &str| {
        proxy.metric(&format!(
            "warden_proxy_rejected_requests_total{{direction=\"outbound\",listener=\"{listener}\",reason=\"wrong_server_identity\"}}"
        ))
    };
    assert!(wait_for(Duration::from_secs(5), || metric("db-http")
        == 1.0
        && metric("db-tcp") == 1.0));
    // Both paths name what the destination presented.
    let logged = |s: &str| {
        ["listener=db-tcp", "listener=db-http"]
            .iter()
            .all(|l| s.lines().any(|line| line.contains(l) && line.contains(WEB)))
    };
    assert!(
        wait_for(Duration::from_secs(5), || logged(
            &proxy.stderr.lock().unwrap()
        )),
        "{}",
        proxy.stderr.lock().unwrap()
    );
}
