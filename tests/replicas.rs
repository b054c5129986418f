//! CA replicas on one PostgreSQL store (`store: postgres://...`), with a real
//! server started by the harness (initdb + pg_ctl): a join token is used
//! exactly once across replicas under concurrency; a replica killed with
//! SIGKILL mid-load loses no issuance and duplicates none, and the audit
//! trail in the database stays one verifiable chain; a deny made through
//! one replica reaches proxies watching the other.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use common::postgres::Postgres;
use common::{Ca, Server, certify, csr, run, run_ok};

/// A CA whose store is `pg`, and two replicas serving it.
fn replicated(pg: &Postgres) -> (Ca, Server, Server) {
    let ca = Ca::init("example.org");
    let path = ca.dir.join("ca.yaml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!("store: {}\n", pg.url()));
    std::fs::write(path, text).unwrap();
    let a = Server::start(&ca.dir);
    let b = Server::start(&ca.dir);
    (ca, a, b)
}

fn serials(ca: &Ca) -> Vec<String> {
    run_ok(&["ca", "list", "certs", "--all", "--dir", ca.dir()])
        .lines()
        .skip(1)
        .map(|l| l.split('\t').next().unwrap().to_owned())
        .collect()
}

#[test]
fn a_join_token_is_used_exactly_once_across_two_replicas_under_50_concurrent_uses() {
    let Some(pg) = Postgres::start() else { return };
    let (ca, a, b) = replicated(&pg);
    let id = ca.id("/web");
    let token = ca.token(&id);
    let bundle = ca.bundle_pem();
    let before = serials(&ca).len();
    let answers: Vec<(u16, serde_json::Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let (token, bundle) = (token.clone(), bundle.clone());
                let addr = if i % 2 == 0 { a.api } else { b.api };
                s.spawn(move || {
                    let (_, c) = csr(&["spiffe://example.org/web"]);
                    certify(addr, &bundle, None, &c, Some(&token)).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok: Vec<_> = answers.iter().filter(|(s, _)| *s == 200).collect();
    assert_eq!(ok.len(), 1, "{answers:?}");
    for (status, v) in answers.iter().filter(|(s, _)| *s != 200) {
        assert_eq!(*status, 401, "{v}");
        assert_eq!(v["type"], "urn:warden:problem:token-used", "{v}");
    }
    // Exactly one certificate in the shared store: the one answered.
    let after = serials(&ca);
    assert_eq!(after.len(), before + 1);
    assert!(after.contains(&ok[0].1["serial"].as_str().unwrap().to_owned()));
    assert!(run_ok(&["ca", "audit", "verify", "--dir", ca.dir()]).contains("ok"));
    // Both replicas say they are alive, in the shared store.
    let status = run_ok(&["ca", "status", "--dir", ca.dir()]);
    assert!(status.contains("replicas        2 serving"), "{status}");
    drop((a, b));
}

#[test]
fn a_replica_killed_mid_load_loses_no_issuance_and_the_chain_verifies() {
    let Some(pg) = Postgres::start() else { return };
    let (ca, mut a, b) = replicated(&pg);
    let bundle = ca.bundle_pem();
    // 60 identities, one token each; clients alternate replicas and move
    // to the other one when theirs does not answer.
    let tokens: Vec<(String, String)> = (0..60)
        .map(|i| {
            let id = ca.id(&format!("/w{i}"));
            let t = ca.token(&id);
            (id, t)
        })
        .collect();
    let answered = Arc::new(Mutex::new(HashMap::<String, String>::new()));
    let refused = Arc::new(Mutex::new(Vec::new()));
    let (a_api, b_api) = (a.api, b.api);
    std::thread::scope(|s| {
        for chunk in tokens.chunks(15) {
            let (answered, refused, bundle) = (answered.clone(), refused.clone(), bundle.clone());
            s.spawn(move || {
                for (i, (id, token)) in chunk.iter().enumerate() {
                    let order = if i % 2 == 0 {
                        [a_api, b_api]
                    } else {
                        [b_api, a_api]
                    };
                    for addr in order {
                        let (_, c) = csr(&[id]);
                        match certify(addr, &bundle, None, &c, Some(token)) {
                            Ok((200, v)) => {
                                let serial = v["serial"].as_str().unwrap().to_owned();
                                assert!(
                                    answered
                                        .lock()
                                        .unwrap()
                                        .insert(id.clone(), serial)
                                        .is_none(),
                                    "{id} answered twice"
                                );
                                break;
                            }
                            // Issued by the replica that died before it answered.
                            Ok((401, v)) if v["type"] == "urn:warden:problem:token-used" => {
                                refused.lock().unwrap().push(id.clone());
                                break;
                            }
                            Ok(other) => panic!("{id}: {other:?}"),
                            Err(_) => continue, // that replica is gone: the other one
                        }
                    }
                }
            });
        }
        // Kill one replica while the load runs.
        s.spawn(|| {
            common::wait_for(std::time::Duration::from_secs(20), || {
                answered.lock().unwrap().len() >= 15
            });
            a.child.kill().unwrap();
            a.child.wait().unwrap();
        });
    });
    let answered = answered.lock().unwrap().clone();
    let refused = refused.lock().unwrap().clone();
    assert!(
        answered.len() >= 55,
        "{} answered, {refused:?} refused",
        answered.len()
    );
    // Nothing answered is missing from the store, nothing is there twice.
    let stored = serials(&ca);
    let unique: HashSet<_> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "a serial is stored twice");
    for serial in answered.values() {
        assert!(
            unique.contains(serial),
            "answered {serial} is not in the store"
        );
    }
    let list = run_ok(&["ca", "list", "certs", "--all", "--dir", ca.dir()]);
    for (id, _) in &tokens {
        let n = list
            .lines()
            .filter(|l| l.contains(&format!("\t{id}\t")))
            .count();
        assert!(n <= 1, "{id} has {n} certificates");
        // A token a dead replica used was issued there: stored, not lost.
        if refused.contains(id) {
            assert_eq!(n, 1, "{id}: its token was used but nothing was stored");
        }
    }
    let verified = run(&["ca", "audit", "verify", "--dir", ca.dir()]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    drop(b);
}

#[test]
fn replicas_with_their_own_state_directories_rotate_one_chain_and_both_sign_with_it() {
    let Some(pg) = Postgres::start() else { return };
    let ca = Ca::init_with("example.org", &["--intermediate-ttl", "12s"]);
    let path = ca.dir.join("ca.yaml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!("store: {}\nrotation_overlap: 1s\n", pg.url()));
    std::fs::write(path, text).unwrap();
    // As pods: the CA directory shared (a Secret), a state volume each.
    let states = [ca.tmp.path().join("state-a"), ca.tmp.path().join("state-b")];
    let replicas: Vec<Server> = states
        .iter()
        .map(|d| Server::start_with(&ca.dir, "127.0.0.1:0", &["--state-dir", common::s(d)]))
        .collect();
    let status = || run_ok(&["ca", "status", "--dir", ca.dir()]);
    let first = status()
        .lines()
        .find(|l| l.contains("intermediate active"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap()
        .to_owned();
    assert!(
        common::wait_for(std::time::Duration::from_secs(30), || status()
            .lines()
            .filter(|l| l.contains("intermediate previous") || l.contains("intermediate retired"))
            .count()
            >= 1),
        "{}",
        status()
    );
    let active = status()
        .lines()
        .find(|l| l.contains("intermediate active"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap()
        .to_owned();
    // Whichever replica made it, both hold its key now and sign with it.
    for d in &states {
        let keys: Vec<String> = std::fs::read_dir(d.join("keys"))
            .map(|r| {
                r.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            common::wait_for(std::time::Duration::from_secs(5), || std::fs::read_dir(
                d.join("keys")
            )
            .is_ok_and(|r| r
                .filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with(&active)))),
            "{} holds {keys:?}, not {active}",
            d.display()
        );
    }
    let bundle = ca.bundle_pem();
    for (i, r) in replicas.iter().enumerate() {
        // A replica adopts a rotation another made at its next look at the
        // store (a fraction of a second): until then it signs with the
        // first intermediate, legitimately.
        let mut n = 0;
        let mut signed = || {
            n += 1;
            let id = ca.id(&format!("/after{i}-{n}"));
            let token = ca.token(&id);
            let (_, c) = csr(&[&id]);
            let (status, v) = certify(r.api, &bundle, None, &c, Some(&token)).unwrap();
            assert_eq!(status, 200, "{v}");
            let list = run_ok(&["ca", "list", "certs", "--dir", ca.dir()]);
            let line = list
                .lines()
                .find(|l| l.starts_with(v["serial"].as_str().unwrap()))
                .unwrap()
                .to_owned();
            line.rsplit('\t').next().unwrap().to_owned()
        };
        let mut issuer = String::new();
        // A rotated intermediate (the next one may already sign by now,
        // on this 12-second schedule), whose key this replica holds.
        assert!(
            common::wait_for(std::time::Duration::from_secs(5), || {
                issuer = signed();
                issuer != first
            }),
            "replica {i} still signs with the first intermediate {first}"
        );
        let held = std::fs::read_dir(states[i].join("keys"))
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with(&issuer));
        assert!(
            held,
            "replica {i} signed with {issuer} without holding its key"
        );
    }
    // The shared store holds the new key sealed, never in the clear.
    let sealed = pg.query("SELECT id || ' ' || sealed FROM authority_keys");
    assert!(sealed.contains(&active), "{sealed}");
    assert!(!sealed.contains("PRIVATE KEY"), "{sealed}");
    assert!(run_ok(&["ca", "audit", "verify", "--dir", ca.dir()]).contains("ok"));
}

#[test]
fn a_root_written_into_the_store_by_someone_else_is_never_trusted() {
    let Some(pg) = Postgres::start() else { return };
    let (ca, a, _b) = replicated(&pg);
    // Someone with the database's password, not store.key, adds a root.
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let forged = params.self_signed(&key).unwrap();
    let id = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(forged.der()))
    };
    pg.query(&format!(
        "INSERT INTO authorities (id, kind, parent, cert_pem, not_before, not_after, state, created_at, changed_at) \
         VALUES ('{id}', 'root', NULL, '{}', 0, 4102444800, 'published', 0, 0); \
         UPDATE trust_seq SET seq = seq + 1 WHERE id = 1",
        forged.pem()
    ));
    // The replicas see the change and refuse the chain it makes.
    assert!(common::wait_for(std::time::Duration::from_secs(10), || a
        .metric("warden_ca_rotation_failures_total")
        >= 1.0));
    let bundle = std::process::Command::new("curl")
        .args(["-sk", &format!("https://{}/v1/bundle", a.api)])
        .output()
        .unwrap()
        .stdout;
    let bundle = String::from_utf8(bundle).unwrap();
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1, "{bundle}");
    assert!(!bundle.contains(forged.pem().lines().nth(1).unwrap()));
    // And a command refuses to work on such a store rather than trust it.
    let status = run(&["ca", "status", "--dir", ca.dir()]);
    assert!(!status.status.success());
    assert!(String::from_utf8_lossy(&status.stderr).contains("not vouched for by store.key"));
}
