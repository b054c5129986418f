//! The CA's state in an embedded SQLite database (`<ca-dir>/state.db`):
//! issued certificates, join tokens (by hash only), denied identities, and the
//! head of the audit trail.
//!
//! Several processes use one store at once (`ca serve` and the `ca token`,
//! `ca deny` commands), so every write that must be atomic with an audit line
//! runs in a `BEGIN IMMEDIATE` transaction: SQLite's write lock then
//! serializes writers across processes, and the audit file is appended under it.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use warden_config::SpiffeId;

/// A write transaction that holds the database's write lock.
pub type WriteTx = sqlx::Transaction<'static, sqlx::Sqlite>;

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
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub async fn open(path: &Path) -> Result<Self, sqlx::Error> {
        let opts = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL: a commit survives a process crash; fsync happens at checkpoints.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        Ok(Self { pool })
    }

    /// Starts a transaction that holds the write lock from its first statement.
    pub async fn begin_write(&self) -> Result<WriteTx, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    /// Looks a token up by its hash.
    pub async fn token(&self, hash: &str) -> Result<Option<TokenRecord>, sqlx::Error> {
        let row = sqlx::query("SELECT spiffe_id, expires_at, used_at FROM tokens WHERE hash = ?")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| TokenRecord {
            spiffe_id: r.get(0),
            expires_at: r.get(1),
            used_at: r.get(2),
        }))
    }

    /// Whether `id` is on the deny list.
    pub async fn is_denied(&self, id: &SpiffeId) -> Result<bool, sqlx::Error> {
        let row = sqlx::query("SELECT 1 FROM denied WHERE spiffe_id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// Every certificate issued for `id`, oldest first.
    pub async fn issued_for(&self, id: &str) -> Result<Vec<IssuedRecord>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT serial, spiffe_id, not_before, not_after, key_sha256, kind
             FROM issued WHERE spiffe_id = ? ORDER BY issued_at, rowid",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| IssuedRecord {
                serial: r.get(0),
                spiffe_id: r.get(1),
                not_before: r.get(2),
                not_after: r.get(3),
                key_sha256: r.get(4),
                kind: r.get(5),
            })
            .collect())
    }

    /// The recorded audit head (seq 0 when the trail is empty).
    pub async fn audit_head(&self) -> Result<AuditHead, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        read_audit_head(&mut conn).await
    }
}

/// Reads the audit head inside a transaction or on a connection.
pub async fn read_audit_head(conn: &mut sqlx::SqliteConnection) -> Result<AuditHead, sqlx::Error> {
    let row = sqlx::query("SELECT seq, hash, len FROM audit_head WHERE id = 1")
        .fetch_optional(&mut *conn)
        .await?;
    Ok(match row {
        Some(r) => AuditHead {
            seq: r.get(0),
            hash: r.get(1),
            len: r.get(2),
        },
        None => AuditHead {
            seq: 0,
            hash: crate::audit::GENESIS.to_owned(),
            len: 0,
        },
    })
}

/// Writes within a [`WriteTx`]; each is committed with its audit line or not at all.
pub mod write {
    use super::*;

    /// Records the new audit head.
    pub async fn set_audit_head(tx: &mut WriteTx, head: &AuditHead) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO audit_head (id, seq, hash, len) VALUES (1, ?, ?, ?)
             ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, len = excluded.len",
        )
        .bind(head.seq)
        .bind(&head.hash)
        .bind(head.len)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Stores a new token's hash.
    pub async fn insert_token(
        tx: &mut WriteTx,
        hash: &str,
        id: &SpiffeId,
        now: i64,
        expires_at: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO tokens (hash, spiffe_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
        )
        .bind(hash)
        .bind(id.as_str())
        .bind(now)
        .bind(expires_at)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Marks a token used; false when it was already used, expired or unknown
    /// (the check and the mark are one statement, so two racing requests
    /// cannot both use it).
    pub async fn consume_token(
        tx: &mut WriteTx,
        hash: &str,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE tokens SET used_at = ? WHERE hash = ? AND used_at IS NULL AND expires_at > ?",
        )
        .bind(now)
        .bind(hash)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records an issued certificate.
    pub async fn insert_issued(
        tx: &mut WriteTx,
        r: &IssuedRecord,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO issued (serial, spiffe_id, not_before, not_after, key_sha256, kind, issued_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&r.serial)
        .bind(&r.spiffe_id)
        .bind(r.not_before)
        .bind(r.not_after)
        .bind(&r.key_sha256)
        .bind(&r.kind)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Puts `id` on the deny list (true) or takes it off (false); returns
    /// whether anything changed.
    pub async fn set_denied(
        tx: &mut WriteTx,
        id: &SpiffeId,
        denied: bool,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        let q = if denied {
            sqlx::query("INSERT OR IGNORE INTO denied (spiffe_id, since) VALUES (?, ?)")
                .bind(id.as_str())
                .bind(now)
        } else {
            sqlx::query("DELETE FROM denied WHERE spiffe_id = ?").bind(id.as_str())
        };
        Ok(q.execute(&mut **tx).await?.rows_affected() > 0)
    }
}
