//! The append-only, hash-chained audit trail (`<ca-dir>/audit.jsonl`).
//!
//! One JSON object per line. Each line carries its sequence number, the
//! SHA-256 of the previous line (`prev`) and, as its last member, the SHA-256
//! of itself without that member (`hash`): the line's exact bytes up to
//! `,"hash":` plus the closing `}`. No canonical JSON is needed to check it.
//! The store keeps the last line's sequence number, hash and the file length,
//! so a truncated or re-forged tail is caught too.
//!
//! Lines are appended inside the store's write transaction (see `store.rs`):
//! an event and its audit line commit together. An append first cuts off any
//! bytes past the committed length, left by a process that died mid-commit.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::authority::CaError;
use crate::store::{self, AuditHead, Sql, Store, WriteTx};

pub use crate::store::GENESIS;

const HASH_PREFIX: &str = ",\"hash\":\"";
const HASH_SUFFIX: &str = "\"}";
const HASH_TAIL_LEN: usize = HASH_PREFIX.len() + 64 + HASH_SUFFIX.len();

/// One event to record: a fixed kind plus its fields.
#[derive(Debug, Clone)]
pub struct Event {
    kind: &'static str,
    fields: Map<String, Value>,
}

impl Event {
    /// An event of `kind` (`token_created`, `issued`, `renewed`, `refused`, `denied`, `allowed`, ...).
    pub fn new(kind: &'static str) -> Self {
        Self {
            kind,
            fields: Map::new(),
        }
    }

    /// Adds a field.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.fields.insert(key.to_owned(), value.into());
        self
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Appends `event` to the trail within `tx` (the caller commits): to the
/// file at `path` (SQLite), or as a row of the database (PostgreSQL, where
/// replicas share no file).
pub fn append(
    tx: &mut WriteTx<'_>,
    path: &Path,
    event: Event,
    now: OffsetDateTime,
) -> Result<(), CaError> {
    let head = store::read_audit_head(tx)?;
    let (line, hash) = render(&head, event, now);
    let len = if tx.is_postgres() {
        store::insert_audit_line(tx, head.seq + 1, &line)?;
        0
    } else {
        // A batch syncs the file once before it commits; alone, sync now.
        append_to_file(path, &head, &line, !tx.is_grouped())?;
        head.len + line.len() as i64 + 1
    };
    let new_head = AuditHead {
        seq: head.seq + 1,
        hash,
        len,
    };
    store::set_audit_head(tx, &new_head)?;
    Ok(())
}

/// The line after `head` for `event` (without its newline), and its hash.
fn render(head: &AuditHead, event: Event, now: OffsetDateTime) -> (String, String) {
    let mut obj = Map::new();
    obj.insert("seq".into(), (head.seq + 1).into());
    let time = now.format(&Rfc3339).unwrap_or_default();
    obj.insert("time".into(), time.into());
    obj.insert("event".into(), event.kind.into());
    for (k, v) in event.fields {
        obj.entry(k).or_insert(v);
    }
    obj.insert("prev".into(), head.hash.clone().into());
    let body = Value::Object(obj).to_string();
    let hash = sha256_hex(body.as_bytes());
    let line = format!(
        "{}{HASH_PREFIX}{hash}{HASH_SUFFIX}",
        &body[..body.len() - 1]
    );
    (line, hash)
}

fn append_to_file(path: &Path, head: &AuditHead, line: &str, sync: bool) -> Result<(), CaError> {
    let audit_err = |e: std::io::Error| CaError::Audit(format!("{}: {e}", path.display()));
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
        .map_err(audit_err)?;
    let len = file.metadata().map_err(audit_err)?.len();
    let committed = u64::try_from(head.len).unwrap_or(0);
    if len < committed {
        return Err(CaError::Audit(format!(
            "{} is {len} bytes but {committed} were committed: the trail was cut; run `warden ca audit verify`",
            path.display()
        )));
    }
    if len > committed {
        tracing::warn!(path = %path.display(), len, committed, "dropping an uncommitted audit tail");
        file.set_len(committed).map_err(audit_err)?;
    }
    file.write_all(format!("{line}\n").as_bytes())
        .map_err(audit_err)?;
    // On disk before the store commits: a crash must not keep an event
    // whose line is lost (a batch syncs once, before its commit).
    if sync {
        file.sync_data().map_err(audit_err)?;
    }
    Ok(())
}

/// The first problem found in an audit trail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct AuditFault {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong there.
    pub what: String,
}

/// Checks every line of the trail's text against the chain, then the tail
/// against `head` (what the store recorded). Returns the number of lines.
pub fn verify_text(text: &str, head: &AuditHead) -> Result<usize, AuditFault> {
    let fault = |line: usize, what: String| AuditFault { line, what };
    let mut prev = GENESIS.to_owned();
    let mut count = 0usize;
    let mut rest = text;
    while !rest.is_empty() {
        let n = count + 1;
        let Some(end) = rest.find('\n') else {
            return Err(fault(n, "incomplete line (no newline at the end)".into()));
        };
        let line = &rest[..end];
        rest = &rest[end + 1..];
        let hash = check_line(line, n, &prev).map_err(|what| fault(n, what))?;
        prev = hash;
        count = n;
    }
    let recorded = usize::try_from(head.seq).unwrap_or(0);
    if count < recorded {
        return Err(fault(
            count + 1,
            format!("missing: the store recorded {recorded} lines, the file has {count}"),
        ));
    }
    if count > recorded {
        return Err(fault(
            recorded + 1,
            format!(
                "not recorded by the store, which has {recorded} lines: written outside warden?"
            ),
        ));
    }
    if count > 0 && prev != head.hash {
        return Err(fault(
            count,
            "differs from the store's record of the last line".into(),
        ));
    }
    Ok(count)
}

/// Checks one line: its own hash, its sequence number and its link to `prev`.
/// Returns its hash.
fn check_line(line: &str, seq: usize, prev: &str) -> Result<String, String> {
    if line.len() <= HASH_TAIL_LEN || !line.is_char_boundary(line.len() - HASH_TAIL_LEN) {
        return Err("not an audit entry (no trailing hash)".into());
    }
    let (body_head, tail) = line.split_at(line.len() - HASH_TAIL_LEN);
    let hash = tail
        .strip_prefix(HASH_PREFIX)
        .and_then(|t| t.strip_suffix(HASH_SUFFIX))
        .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or("not an audit entry (no trailing hash)")?;
    let body = format!("{body_head}}}");
    if sha256_hex(body.as_bytes()) != hash {
        return Err("edited: its content does not match its hash".into());
    }
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("not JSON: {e}"))?;
    let got_seq = v.get("seq").and_then(Value::as_u64);
    if got_seq != Some(seq as u64) {
        return Err(format!(
            "out of order: sequence number {} where {seq} was expected (a line was inserted, deleted or moved)",
            got_seq.map_or("none".into(), |s| s.to_string())
        ));
    }
    if v.get("prev").and_then(Value::as_str) != Some(prev) {
        return Err(
            "does not follow the line before it (a line was deleted, inserted or moved)".into(),
        );
    }
    Ok(hash.to_owned())
}

/// Verifies the trail of the CA in `dir` (its store there, or the
/// PostgreSQL store at `postgres`), returning the number of lines.
pub fn verify_dir(dir: &Path, postgres: Option<&str>) -> Result<usize, VerifyError> {
    use crate::authority::files;
    let read = |e: store::StoreError| VerifyError::Read(e.to_string());
    if let Some(url) = postgres {
        let store = Store::open_postgres(url).map_err(read)?;
        // The head and the lines from one snapshot: replicas append meanwhile.
        let (head, lines) = {
            let mut conn = store.lock();
            conn.exec("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", &[])
                .map_err(read)?;
            let head = store::read_audit_head(&mut *conn).map_err(read)?;
            let lines = store::audit_lines(&mut *conn, i64::MAX).map_err(read)?;
            conn.exec("COMMIT", &[]).map_err(read)?;
            (head, lines)
        };
        let mut text = lines.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        return Ok(verify_text(&text, &head)?);
    }
    let path = dir.join(files::AUDIT);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(VerifyError::Read(format!("{}: {e}", path.display()))),
    };
    let state = dir.join(files::STATE);
    if !state.exists() {
        // Never create an empty store here: a wiped directory must not verify.
        return Err(VerifyError::Read(format!(
            "{} is missing: no CA here, or its store was removed",
            state.display()
        )));
    }
    let store = Store::open(&state).map_err(read)?;
    let head = store.audit_head().map_err(read)?;
    Ok(verify_text(&text, &head)?)
}

/// Why `audit verify` failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The trail or the store could not be read.
    #[error("cannot read the audit trail: {0}")]
    Read(String),
    /// The trail was tampered with.
    #[error("{0}")]
    Tampered(#[from] AuditFault),
}
