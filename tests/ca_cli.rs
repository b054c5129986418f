//! `warden ca init | issue | token` and `warden check`, offline.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_creates_a_root_an_intermediate_and_private_keys_readable_only_by_the_owner() {
    let ca = Ca::init("example.org");
    for f in [
        "ca.yaml",
        "root.pem",
        "intermediate.pem",
        "bundle.pem",
        "state.db",
        "audit.jsonl",
    ] {
        assert!(ca.dir.join(f).exists(), "{f} missing");
    }
    assert_eq!(mode(&ca.dir.join("root-key.pem")), 0o600);
    assert_eq!(mode(&ca.dir.join("intermediate-key.pem")), 0o600);
    let int = certs(&std::fs::read_to_string(ca.dir.join("intermediate.pem")).unwrap());
    // The intermediate verifies under the root as a CA: openssl checks the chain.
    let (_, c) = x509_parser::parse_x509_certificate(&int[0]).unwrap();
    assert!(c.is_ca());
    let bc = c.basic_constraints().unwrap().unwrap().value;
    assert_eq!(
        bc.path_len_constraint,
        Some(0),
        "the intermediate cannot mint CAs"
    );
    let key = std::fs::read_to_string(ca.dir.join("intermediate-key.pem")).unwrap();
    assert!(rcgen::KeyPair::from_pem(&key).unwrap().algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256);
}

#[test]
fn init_refuses_to_overwrite_an_existing_ca() {
    let ca = Ca::init("example.org");
    let before = std::fs::read(ca.dir.join("intermediate-key.pem")).unwrap();
    let out = run(&[
        "ca",
        "init",
        "--dir",
        ca.dir(),
        "--trust-domain",
        "example.org",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(
        std::fs::read(ca.dir.join("intermediate-key.pem")).unwrap(),
        before
    );
}

#[test]
fn init_can_put_the_intermediate_under_an_existing_root_without_copying_its_key() {
    let tmp = tempfile::tempdir().unwrap();
    let root_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let root = p.self_signed(&root_key).unwrap();
    let (rc, rk) = (tmp.path().join("root.pem"), tmp.path().join("root.key"));
    std::fs::write(&rc, root.pem()).unwrap();
    std::fs::write(&rk, root_key.serialize_pem()).unwrap();
    let dir = tmp.path().join("ca");
    run_ok(&[
        "ca",
        "init",
        "--dir",
        s(&dir),
        "--trust-domain",
        "corp.test",
        "--root-cert",
        s(&rc),
        "--root-key",
        s(&rk),
    ]);
    assert!(
        !dir.join("root-key.pem").exists(),
        "the external root key stays outside"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("bundle.pem"))
            .unwrap()
            .trim(),
        root.pem().trim()
    );

    let out = tmp.path().join("out");
    run_ok(&[
        "ca",
        "issue",
        "--dir",
        s(&dir),
        "--spiffe-id",
        "spiffe://corp.test/app",
        "--out-dir",
        s(&out),
    ]);
    let chain = std::fs::read_to_string(out.join("cert.pem")).unwrap();
    webpki_verifies(&chain, &root.pem()).unwrap();
}

#[test]
fn init_refuses_a_root_key_that_does_not_match_the_root_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root = p.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap();
    let other = rcgen::KeyPair::generate().unwrap();
    let (rc, rk) = (tmp.path().join("root.pem"), tmp.path().join("root.key"));
    std::fs::write(&rc, root.pem()).unwrap();
    std::fs::write(&rk, other.serialize_pem()).unwrap();
    let out = run(&[
        "ca",
        "init",
        "--dir",
        s(&tmp.path().join("ca")),
        "--trust-domain",
        "td",
        "--root-cert",
        s(&rc),
        "--root-key",
        s(&rk),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not belong"));
}

#[test]
fn issued_certificate_is_an_x509_svid_that_verifies_against_the_bundle() {
    let ca = Ca::init("example.org");
    let id = ca.id("/ns/prod/sa/web");
    let out = ca.issue(&id, Some("2h"));
    assert_eq!(mode(&out.join("key.pem")), 0o600);
    let chain_pem = std::fs::read_to_string(out.join("cert.pem")).unwrap();
    let bundle = std::fs::read_to_string(out.join("bundle.pem")).unwrap();
    assert_eq!(bundle, ca.bundle_pem());
    let chain = certs(&chain_pem);
    assert_eq!(chain.len(), 2, "leaf then intermediate");

    webpki_verifies(&chain_pem, &bundle).unwrap();
    openssl_verifies(ca.tmp.path(), &chain_pem, &bundle).unwrap();

    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert_eq!(uri_sans(&chain[0]), vec![id.clone()]);
    assert!(!leaf.is_ca());
    assert!(
        leaf.basic_constraints().unwrap().is_some(),
        "CA:FALSE is explicit"
    );
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let v = leaf.validity();
    let life = v.not_after.timestamp() - v.not_before.timestamp();
    assert_eq!(life, 2 * 3600 + 30, "TTL plus the 30 s clock-skew backdate");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((v.not_after.timestamp() - (now + 7200)).abs() < 60);

    // The key in key.pem is the certificate's key.
    let key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(out.join("key.pem")).unwrap()).unwrap();
    assert_eq!(
        leaf.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
    );
}

#[test]
fn default_lifetime_is_one_hour_and_longer_requests_are_capped_at_max_ttl() {
    let ca = Ca::init("example.org");
    let life = |ttl: Option<&str>| {
        let out = ca.issue(&ca.id("/a"), ttl);
        let chain = certs(&std::fs::read_to_string(out.join("cert.pem")).unwrap());
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp()
    };
    assert_eq!(life(None), 3600 + 30);
    assert_eq!(life(Some("100d")), 24 * 3600 + 30);
}

#[test]
fn token_is_printed_once_and_only_its_hash_is_stored() {
    let ca = Ca::init("example.org");
    let token = ca.token(&ca.id("/web"));
    assert_eq!(token.len(), 43);
    let db = std::fs::read(ca.dir.join("state.db")).unwrap();
    let wal = std::fs::read(ca.dir.join("state.db-wal")).unwrap_or_default();
    let audit = std::fs::read_to_string(ca.dir.join("audit.jsonl")).unwrap();
    for hay in [&db[..], &wal[..], audit.as_bytes()] {
        assert!(
            !hay.windows(token.len()).any(|w| w == token.as_bytes()),
            "token stored in clear"
        );
    }
    assert_ne!(ca.token(&ca.id("/web")), token, "tokens are random");
}

#[test]
fn identities_outside_the_trust_domain_or_reserved_for_the_ca_are_refused() {
    let ca = Ca::init("example.org");
    for id in ["spiffe://other.org/web", "spiffe://example.org/warden/ca"] {
        let out = run(&["ca", "token", "--dir", ca.dir(), "--spiffe-id", id]);
        assert!(!out.status.success(), "{id}");
        let out = run(&[
            "ca",
            "issue",
            "--dir",
            ca.dir(),
            "--spiffe-id",
            id,
            "--out-dir",
            s(&ca.tmp.path().join("x")),
        ]);
        assert!(!out.status.success(), "{id}");
    }
}

#[test]
fn an_invalid_spiffe_id_is_a_usage_error() {
    let ca = Ca::init("example.org");
    for bad in [
        "spiffe://Example.org/web",
        "spiffe://example.org/a/../b",
        "spiffe://example.org/a%20b",
        "http://example.org/web",
    ] {
        let out = run(&["ca", "token", "--dir", ca.dir(), "--spiffe-id", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
    }
}

#[test]
fn check_names_file_line_and_column_of_every_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("ca.yaml");
    std::fs::write(
        &f,
        "trust_domain: example.org\ndefault_ttl: 48h\nmax_ttl: 2h\n",
    )
    .unwrap();
    let out = run(&["check", "--config", s(&f)]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:2:14: default_ttl 2days is longer than max_ttl 2h",
            f.display()
        )),
        "{err}"
    );

    std::fs::write(&f, "trust_domain: Example.org\n").unwrap();
    let err = String::from_utf8_lossy(&run(&["check", "--config", s(&f)]).stderr).to_string();
    assert!(err.contains(&format!("{}:1:15:", f.display())), "{err}");

    std::fs::write(&f, "trust_domain: example.org\n").unwrap();
    assert!(run(&["check", "--config", s(&f)]).status.success());
}

#[test]
fn a_broken_ca_config_stops_every_command_with_its_location() {
    let ca = Ca::init("example.org");
    let cfg = ca.dir.join("ca.yaml");
    std::fs::write(&cfg, "trust_domain: example.org\nmax_ttl: forever\n").unwrap();
    let out = run(&[
        "ca",
        "token",
        "--dir",
        ca.dir(),
        "--spiffe-id",
        &ca.id("/a"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ca.yaml:2:10:"));
    let _ = Duration::ZERO;
}

#[test]
fn join_tokens_live_at_most_seven_days() {
    let ca = Ca::init("example.org");
    let out = run(&[
        "ca",
        "token",
        "--dir",
        ca.dir(),
        "--spiffe-id",
        &ca.id("/a"),
        "--ttl",
        "8d",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("capped"));
    let out = run(&[
        "ca",
        "token",
        "--dir",
        ca.dir(),
        "--spiffe-id",
        &ca.id("/a"),
        "--ttl",
        "100000000y",
    ]);
    assert!(
        !out.status.success(),
        "an absurd lifetime is an error, not a crash"
    );
    assert_ne!(out.status.code(), Some(101));
}

#[test]
fn status_and_list_show_the_chain_and_what_the_store_holds() {
    let ca = Ca::init("example.org");
    let web = ca.id("/web");
    let out = ca.issue(&web, None);
    ca.token(&ca.id("/api"));
    run_ok(&[
        "ca",
        "deny",
        "--dir",
        ca.dir(),
        "--spiffe-id",
        &ca.id("/bad"),
    ]);
    let status = run_ok(&["ca", "status", "--dir", ca.dir()]);
    for want in [
        "trust domain    example.org",
        "root         active",
        "intermediate active",
        "certificates    1 issued, 1 still valid",
        "join tokens     1 unused",
        "denied          1",
    ] {
        assert!(status.contains(want), "{want:?} not in\n{status}");
    }
    let serial = {
        let pem = std::fs::read_to_string(out.join("cert.pem")).unwrap();
        let der = certs(&pem).remove(0);
        let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
        hex::encode(c.raw_serial())
    };
    let certs_list = run_ok(&["ca", "list", "certs", "--dir", ca.dir()]);
    assert!(certs_list.starts_with("serial\tspiffe_id\tkind\tnot_after\tissuer\n"));
    assert!(
        certs_list.contains(&format!("{serial}\t{web}\toffline\t")),
        "{certs_list}"
    );
    let tokens = run_ok(&["ca", "list", "tokens", "--dir", ca.dir()]);
    assert_eq!(tokens.lines().count(), 2, "{tokens}");
    assert!(tokens.contains(&ca.id("/api")), "{tokens}");
    let denied = run_ok(&["ca", "list", "denied", "--dir", ca.dir()]);
    assert!(denied.contains(&ca.id("/bad")), "{denied}");
    assert!(
        !run(&["ca", "list", "nothing", "--dir", ca.dir()])
            .status
            .success()
    );
}
