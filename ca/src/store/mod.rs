//! The CA's state in an embedded SQLite database (`<ca-dir>/state.db`):
//! issued certificates, join tokens (by hash only), denied identities, and the
//! head of the audit trail.
//!
//! Several processes use one store at once (`ca serve` and the `ca token`,
//! `ca deny` commands), so every write that must be atomic with an audit line
//! runs in a `BEGIN IMMEDIATE` transaction: SQLite's write lock then
//! serializes writers across processes, and the audit file is appended under it.
//!
//! Calls are synchronous and short (no fsync per commit: WAL with
//! `synchronous=NORMAL`). An issuance is one decision of a few statements;
//! the API server runs each decision on tokio's blocking pool.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

pub mod chain;

use warden_config::SpiffeId;

/// A write transaction that holds the database's write lock.
pub type WriteTx<'a> = rusqlite::Transaction<'a>;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS issued (
    serial      TEXT PRIMARY KEY,
    spiffe_id   TEXT NOT NULL,
    not_before  INTEGER NOT NULL,
    not_after   INTEGER NOT NULL,
    key_sha256  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    issued_at   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS issued_by_id ON issued (spiffe_id);
CREATE TABLE IF NOT EXISTS tokens (
    hash        TEXT PRIMARY KEY,
    spiffe_id   TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER
);
CREATE TABLE IF NOT EXISTS denied (
    spiffe_id   TEXT PRIMARY KEY,
    since       INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS trust_seq (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    seq         INTEGER NOT NULL
);
INSERT OR IGNORE INTO trust_seq (id, seq) VALUES (1, 1);
CREATE TABLE IF NOT EXISTS audit_head (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    seq         INTEGER NOT NULL,
    hash        TEXT NOT NULL,
    len         INTEGER NOT NULL
);
";

/// What the store knows about a join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// The identity the token lets its holder obtain.
    pub spiffe_id: String,
    /// Unix seconds after which the token is refused.
    pub expires_at: i64,
    /// Unix seconds when it was used, if it was.
    pub used_at: Option<i64>,
}

/// A certificate the CA issued, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedRecord {
    /// Serial number, hex.
    pub serial: String,
    /// The SPIFFE ID in its URI SAN.
    pub spiffe_id: String,
    /// NotBefore, unix seconds.
    pub not_before: i64,
    /// NotAfter, unix seconds.
    pub not_after: i64,
    /// SHA-256 of the SubjectPublicKeyInfo, hex.
    pub key_sha256: String,
    /// `bootstrap`, `renewal`, `offline` or `self`.
    pub kind: String,
    /// The intermediate that signed it (its id in [`chain::AuthorityRecord`]).
    pub issuer: String,
}

/// The last audit line the store has seen committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditHead {
    /// Sequence number of the last line (0: none yet).
    pub seq: i64,
    /// Its hash (64 zeros: none yet).
    pub hash: String,
    /// Length of the audit file in bytes after that line.
    pub len: i64,
}

/// Handle to the CA's database.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // WAL + NORMAL: a commit survives a process crash; fsync happens at checkpoints.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        chain::migrate(&conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// The connection, for one decision's worth of statements.
    pub fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent:
        // an open transaction rolls back when dropped.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The recorded audit head (seq 0 when the trail is empty).
    pub fn audit_head(&self) -> rusqlite::Result<AuditHead> {
        read_audit_head(&self.lock())
    }

    /// Every certificate issued for `id`, oldest first.
    pub fn issued_for(&self, id: &str) -> rusqlite::Result<Vec<IssuedRecord>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT serial, spiffe_id, not_before, not_after, key_sha256, kind, COALESCE(issuer, '')
             FROM issued WHERE spiffe_id = ? ORDER BY issued_at, rowid",
        )?;
        let rows = stmt.query_map([id], |r| {
            Ok(IssuedRecord {
                serial: r.get(0)?,
                spiffe_id: r.get(1)?,
                not_before: r.get(2)?,
                not_after: r.get(3)?,
                key_sha256: r.get(4)?,
                kind: r.get(5)?,
                issuer: r.get(6)?,
            })
        })?;
        rows.collect()
    }
}

/// How the certificate with `serial` was obtained (`bootstrap`, `renewal`,
/// `kubernetes`, ...), when this CA issued it.
pub fn issued_kind(conn: &Connection, serial: &str) -> rusqlite::Result<Option<String>> {
    use rusqlite::OptionalExtension;
    conn.prepare_cached("SELECT kind FROM issued WHERE serial = ?")?
        .query_row([serial], |r| r.get(0))
        .optional()
}

/// Starts a transaction that holds the write lock from its first statement.
pub fn begin_write(conn: &mut Connection) -> rusqlite::Result<WriteTx<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
}

/// Looks a token up by its hash.
pub fn token(conn: &Connection, hash: &str) -> rusqlite::Result<Option<TokenRecord>> {
    conn.prepare_cached("SELECT spiffe_id, expires_at, used_at FROM tokens WHERE hash = ?")?
        .query_row([hash], |r| {
            Ok(TokenRecord {
                spiffe_id: r.get(0)?,
                expires_at: r.get(1)?,
                used_at: r.get(2)?,
            })
        })
        .optional()
}

/// Whether `id` is on the deny list.
pub fn is_denied(conn: &Connection, id: &SpiffeId) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM denied WHERE spiffe_id = ?")?
        .exists([id.as_str()])
}

/// Reads the audit head.
pub fn read_audit_head(conn: &Connection) -> rusqlite::Result<AuditHead> {
    let head = conn
        .prepare_cached("SELECT seq, hash, len FROM audit_head WHERE id = 1")?
        .query_row([], |r| {
            Ok(AuditHead {
                seq: r.get(0)?,
                hash: r.get(1)?,
                len: r.get(2)?,
            })
        })
        .optional()?;
    Ok(head.unwrap_or_else(|| AuditHead {
        seq: 0,
        hash: GENESIS.to_owned(),
        len: 0,
    }))
}

/// `prev` of the audit trail's first line: the head of an empty trail.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Records the new audit head.
pub fn set_audit_head(tx: &WriteTx<'_>, head: &AuditHead) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO audit_head (id, seq, hash, len) VALUES (1, ?, ?, ?)
         ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, len = excluded.len",
    )?
    .execute(params![head.seq, head.hash, head.len])?;
    Ok(())
}

/// Stores a new token's hash.
pub fn insert_token(
    tx: &WriteTx<'_>,
    hash: &str,
    id: &SpiffeId,
    now: i64,
    expires_at: i64,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO tokens (hash, spiffe_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
    )?
    .execute(params![hash, id.as_str(), now, expires_at])?;
    Ok(())
}

/// Marks a token used; false when it was already used, expired or unknown
/// (the check and the mark are one statement, so two racing requests
/// cannot both use it).
pub fn consume_token(tx: &WriteTx<'_>, hash: &str, now: i64) -> rusqlite::Result<bool> {
    let n = tx
        .prepare_cached("UPDATE tokens SET used_at = ?1 WHERE hash = ?2 AND used_at IS NULL AND expires_at > ?1")?
        .execute(params![now, hash])?;
    Ok(n == 1)
}

/// Records an issued certificate.
pub fn insert_issued(tx: &WriteTx<'_>, r: &IssuedRecord, now: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO issued (serial, spiffe_id, not_before, not_after, key_sha256, kind, issued_at, issuer)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )?
    .execute(params![
        r.serial,
        r.spiffe_id,
        r.not_before,
        r.not_after,
        r.key_sha256,
        r.kind,
        now,
        r.issuer
    ])?;
    Ok(())
}

/// Puts `id` on the deny list (true) or takes it off (false); returns
/// whether anything changed.
pub fn set_denied(
    tx: &WriteTx<'_>,
    id: &SpiffeId,
    denied: bool,
    now: i64,
) -> rusqlite::Result<bool> {
    let n = if denied {
        tx.prepare_cached("INSERT OR IGNORE INTO denied (spiffe_id, since) VALUES (?, ?)")?
            .execute(params![id.as_str(), now])?
    } else {
        tx.prepare_cached("DELETE FROM denied WHERE spiffe_id = ?")?
            .execute([id.as_str()])?
    };
    if n > 0 {
        bump_trust_sequence(tx)?;
    }
    Ok(n > 0)
}

/// The trust feed's sequence: grows with every change to what proxies are
/// pushed (the deny list; the bundle when roots rotate).
pub fn trust_sequence(conn: &Connection) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT seq FROM trust_seq WHERE id = 1")?
        .query_row([], |r| r.get::<_, i64>(0))
        .map(|s| s.max(0) as u64)
}

/// Moves the trust feed on, inside the transaction that changed it.
pub fn bump_trust_sequence(tx: &WriteTx<'_>) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE trust_seq SET seq = seq + 1 WHERE id = 1")?
        .execute([])?;
    Ok(())
}

/// Every denied identity, sorted.
pub fn denied_ids(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("SELECT spiffe_id FROM denied ORDER BY spiffe_id")?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    rows.collect()
}

/// What the store holds, counted (for `warden ca status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Certificates ever issued.
    pub issued: i64,
    /// Of them, still valid.
    pub valid: i64,
    /// Join tokens neither used nor expired.
    pub tokens: i64,
    /// Denied identities.
    pub denied: i64,
}

/// Counts at `now`.
pub fn counts(conn: &Connection, now: i64) -> rusqlite::Result<Counts> {
    let one = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> rusqlite::Result<i64> {
        conn.prepare_cached(sql)?.query_row(p, |r| r.get(0))
    };
    Ok(Counts {
        issued: one("SELECT COUNT(*) FROM issued", &[])?,
        valid: one("SELECT COUNT(*) FROM issued WHERE not_after > ?", &[&now])?,
        tokens: one(
            "SELECT COUNT(*) FROM tokens WHERE used_at IS NULL AND expires_at > ?",
            &[&now],
        )?,
        denied: one("SELECT COUNT(*) FROM denied", &[])?,
    })
}

/// One line of `warden ca list`: its columns, as text.
pub type Row = Vec<String>;

/// `warden ca list certs`: certificates still valid at `now` (every one
/// with `all`), newest first: serial, SPIFFE ID, kind, NotAfter, issuer.
pub fn list_certs(conn: &Connection, now: i64, all: bool) -> rusqlite::Result<Vec<Row>> {
    let mut stmt = conn.prepare_cached(
        "SELECT serial, spiffe_id, kind, not_after, COALESCE(issuer, '') FROM issued
         WHERE ?2 OR not_after > ?1 ORDER BY issued_at DESC, rowid DESC",
    )?;
    let rows = stmt.query_map(params![now, all], |r| {
        Ok(vec![
            r.get::<_, String>(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get::<_, i64>(3)?.to_string(),
            r.get::<_, String>(4)?.chars().take(16).collect(),
        ])
    })?;
    rows.collect()
}

/// `warden ca list tokens`: join tokens neither used nor expired (every one
/// with `all`): the first 16 hex characters of the token's SHA-256, the
/// SPIFFE ID, expiry, use time.
pub fn list_tokens(conn: &Connection, now: i64, all: bool) -> rusqlite::Result<Vec<Row>> {
    let mut stmt = conn.prepare_cached(
        "SELECT hash, spiffe_id, expires_at, used_at FROM tokens
         WHERE ?2 OR (used_at IS NULL AND expires_at > ?1) ORDER BY created_at DESC, rowid DESC",
    )?;
    let rows = stmt.query_map(params![now, all], |r| {
        Ok(vec![
            r.get::<_, String>(0)?.chars().take(16).collect(),
            r.get(1)?,
            r.get::<_, i64>(2)?.to_string(),
            r.get::<_, Option<i64>>(3)?
                .map_or_else(|| "-".to_owned(), |t| t.to_string()),
        ])
    })?;
    rows.collect()
}

/// `warden ca list denied`: denied identities and since when.
pub fn list_denied(conn: &Connection) -> rusqlite::Result<Vec<Row>> {
    let mut stmt = conn.prepare_cached("SELECT spiffe_id, since FROM denied ORDER BY spiffe_id")?;
    let rows = stmt.query_map([], |r| {
        Ok(vec![
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?.to_string(),
        ])
    })?;
    rows.collect()
}
