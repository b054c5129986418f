//! `warden ca audit verify`: every issuance, refusal, token and deny/allow is
//! in a hash-chained trail, and every kind of tampering is caught and located.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::*;

/// A CA whose trail has a handful of lines of different kinds.
fn ca_with_history() -> Ca {
    let ca = Ca::init("example.org");
    let id = ca.id("/web");
    ca.token(&id);
    ca.issue(&id, None);
    run_ok(&["ca", "deny", "--dir", ca.dir(), "--spiffe-id", &id]);
    run_ok(&["ca", "allow", "--dir", ca.dir(), "--spiffe-id", &id]);
    ca.token(&ca.id("/api"));
    ca
}

fn trail(ca: &Ca) -> Vec<String> {
    std::fs::read_to_string(ca.dir.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_trail(ca: &Ca, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(ca.dir.join("audit.jsonl"), text).unwrap();
}

/// Runs `audit verify`; returns (success, stdout + stderr).
fn verify(ca: &Ca) -> (bool, String) {
    let out = run(&["ca", "audit", "verify", "--dir", ca.dir()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn assert_caught(ca: &Ca, line: usize) {
    let (ok, text) = verify(ca);
    assert!(!ok, "tampering not caught:\n{text}");
    assert!(
        text.contains(&format!("line {line}:")),
        "expected line {line} to be named:\n{text}"
    );
}

#[test]
fn an_untouched_trail_verifies_and_records_every_kind_of_event() {
    let ca = ca_with_history();
    let (ok, text) = verify(&ca);
    assert!(ok, "{text}");
    let lines = trail(&ca);
    assert!(text.contains(&format!("{} lines", lines.len())), "{text}");
    let events: Vec<String> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        events,
        [
            // The first open records the chain init made (see rotation.rs).
            "chain_recorded",
            "ca_initialized",
            "token_created",
            "issued",
            "denied",
            "allowed",
            "token_created"
        ]
    );
}

#[test]
fn refusals_that_name_an_identity_are_in_the_trail_and_junk_is_only_counted() {
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    let id = ca.id("/web");
    let token = ca.token(&id);
    let (_, c) = csr(&[&id]);
    assert_eq!(
        certify(srv.api, &ca.bundle_pem(), None, &c, Some(&token))
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        certify(srv.api, &ca.bundle_pem(), None, &c, Some(&token))
            .unwrap()
            .0,
        401
    );
    let last = trail(&ca).last().cloned().unwrap();
    let v: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(
        (
            v["event"].as_str(),
            v["reason"].as_str(),
            v["spiffe_id"].as_str()
        ),
        (Some("refused"), Some("token_used"), Some(id.as_str()))
    );
    assert!(verify(&ca).0);

    // Junk that names no identity is counted, not written: anyone can send it.
    let before = trail(&ca).len();
    for _ in 0..20 {
        certify(srv.api, &ca.bundle_pem(), None, &c, Some("bogus")).unwrap();
    }
    assert_eq!(trail(&ca).len(), before);
    assert_eq!(
        srv.metric("warden_ca_refusals_total{reason=\"token_unknown\"}"),
        20.0
    );
}

#[test]
fn an_edited_line_is_caught_at_that_line() {
    let ca = ca_with_history();
    let mut lines = trail(&ca);
    lines[2] = lines[2].replace("spiffe://example.org/web", "spiffe://example.org/wex");
    write_trail(&ca, &lines);
    assert_caught(&ca, 3);
}

#[test]
fn an_edited_line_with_a_recomputed_hash_is_caught_at_the_next_line() {
    let ca = ca_with_history();
    let mut lines = trail(&ca);
    let edited = lines[2].replace("spiffe://example.org/web", "spiffe://example.org/wex");
    let (body, _) = edited.rsplit_once(",\"hash\":\"").unwrap();
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        format!("{body}}}").as_bytes(),
    ));
    lines[2] = format!("{body},\"hash\":\"{hash}\"}}");
    write_trail(&ca, &lines);
    assert_caught(&ca, 4);
}

#[test]
fn a_deleted_line_is_caught() {
    let ca = ca_with_history();
    let mut lines = trail(&ca);
    lines.remove(1);
    write_trail(&ca, &lines);
    assert_caught(&ca, 2);
}

#[test]
fn an_inserted_line_is_caught() {
    let ca = ca_with_history();
    let mut lines = trail(&ca);
    let copy = lines[1].clone();
    lines.insert(3, copy);
    write_trail(&ca, &lines);
    assert_caught(&ca, 4);
}

#[test]
fn reordered_lines_are_caught() {
    let ca = ca_with_history();
    let mut lines = trail(&ca);
    lines.swap(2, 3);
    write_trail(&ca, &lines);
    assert_caught(&ca, 3);
}

#[test]
fn a_removed_last_line_is_caught_through_the_store() {
    let ca = ca_with_history();
    let mut lines = trail(&ca);
    let n = lines.len();
    lines.pop();
    write_trail(&ca, &lines);
    assert_caught(&ca, n);
}

#[test]
fn a_line_appended_outside_warden_is_caught() {
    let ca = ca_with_history();
    let mut lines = trail(&ca);
    let n = lines.len();
    lines.push(lines[n - 1].clone());
    write_trail(&ca, &lines);
    assert_caught(&ca, n + 1);
}

#[test]
fn a_cut_trail_stops_further_issuance_instead_of_forking_the_chain() {
    let ca = ca_with_history();
    let mut lines = trail(&ca);
    lines.truncate(2);
    write_trail(&ca, &lines);
    let out = run(&[
        "ca",
        "token",
        "--dir",
        ca.dir(),
        "--spiffe-id",
        &ca.id("/x"),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("audit"));
}

#[test]
fn a_directory_without_a_store_does_not_verify() {
    let ca = ca_with_history();
    std::fs::remove_file(ca.dir.join("state.db")).unwrap();
    let _ = std::fs::remove_file(ca.dir.join("state.db-wal"));
    let _ = std::fs::remove_file(ca.dir.join("state.db-shm"));
    let (ok, text) = verify(&ca);
    assert!(!ok, "{text}");
    assert!(text.contains("missing"), "{text}");
    assert!(
        !ca.dir.join("state.db").exists(),
        "verify must not create a store"
    );
}

#[test]
fn a_backup_taken_while_the_ca_runs_verifies_and_serves_again() {
    let ca = ca_with_history();
    run_ok(&["ca", "root", "add", "--dir", ca.dir()]);
    let _running = ca.serve();
    let out = ca.tmp.path().join("backup");
    let printed = run_ok(&["ca", "backup", "--dir", ca.dir(), "--to", s(&out)]);
    assert!(printed.contains("audit lines"), "{printed}");
    // The CA goes on writing; the copy is the snapshot.
    ca.token(&ca.id("/later"));
    assert!(run_ok(&["ca", "audit", "verify", "--dir", s(&out)]).contains("ok"));
    use std::os::unix::fs::PermissionsExt;
    for secret in ["intermediate-key.pem", "state.db", "audit.jsonl"] {
        let mode = std::fs::metadata(out.join(secret))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{secret} is private");
    }
    assert_eq!(std::fs::read_dir(out.join("keys")).unwrap().count(), 1);
    // Restored: the copy serves, with the added root still in its bundle.
    let restored = Server::start(&out);
    assert_eq!(restored.admin_get("/ready").0, 200);
    let status = run_ok(&["ca", "status", "--dir", s(&out)]);
    assert!(status.contains("published"), "{status}");
    // A backup never overwrites.
    assert!(
        !run(&["ca", "backup", "--dir", ca.dir(), "--to", s(&out)])
            .status
            .success()
    );
}
