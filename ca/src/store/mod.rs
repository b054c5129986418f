//! The CA's state: issued certificates, join tokens (by hash only), denied
//! identities, the CA's own chain ([`chain`]), the trust feed's sequence and
//! the head of the audit trail. An embedded SQLite database
//! (`<state-dir>/state.db`) by default; a shared PostgreSQL database
//! (`store: postgres://...` in `ca.yaml`) when several CA replicas run.
//!
//! Several processes use one store at once (`ca serve` replicas and the
//! `ca token`, `ca deny` commands), so every write that must be atomic with
//! an audit line runs in a write transaction that holds the store's write
//! lock from its first statement: SQLite's `BEGIN IMMEDIATE`, PostgreSQL's
//! transaction-scoped advisory lock. The audit line is appended under it.
//!
//! Calls are synchronous and short. An issuance is one decision of a few
//! statements; the API server runs each decision on tokio's blocking pool.
//! Every statement is written once (see [`sql`]) for both databases.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};

pub mod chain;
mod pg;
pub mod sql;

use warden_config::SpiffeId;

pub use sql::{Row, Sql, StoreError, Value};

const SQLITE_SCHEMA: &str = "
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
CREATE TABLE IF NOT EXISTS replicas (
    name        TEXT PRIMARY KEY,
    started_at  INTEGER NOT NULL,
    seen_at     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_head (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    seq         INTEGER NOT NULL,
    hash        TEXT NOT NULL,
    len         INTEGER NOT NULL
);
";

/// The same tables in PostgreSQL, and the audit lines themselves (replicas
/// have no common file to append to). Created under the write lock, so
/// replicas starting together do not race.
const POSTGRES_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS issued (
    serial      TEXT PRIMARY KEY,
    spiffe_id   TEXT NOT NULL,
    not_before  BIGINT NOT NULL,
    not_after   BIGINT NOT NULL,
    key_sha256  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    issued_at   BIGINT NOT NULL,
    issuer      TEXT
);
CREATE INDEX IF NOT EXISTS issued_by_id ON issued (spiffe_id);
CREATE TABLE IF NOT EXISTS tokens (
    hash        TEXT PRIMARY KEY,
    spiffe_id   TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT
);
CREATE TABLE IF NOT EXISTS denied (
    spiffe_id   TEXT PRIMARY KEY,
    since       BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS trust_seq (
    id          BIGINT PRIMARY KEY CHECK (id = 1),
    seq         BIGINT NOT NULL
);
INSERT INTO trust_seq (id, seq) VALUES (1, 1) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS audit_head (
    id          BIGINT PRIMARY KEY CHECK (id = 1),
    seq         BIGINT NOT NULL,
    hash        TEXT NOT NULL,
    len         BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS replicas (
    name        TEXT PRIMARY KEY,
    started_at  BIGINT NOT NULL,
    seen_at     BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_lines (
    seq         BIGINT PRIMARY KEY,
    line        TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS authority_keys (
    id          TEXT PRIMARY KEY,
    sealed      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS authorities (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    parent      TEXT,
    cert_pem    TEXT NOT NULL,
    not_before  BIGINT NOT NULL,
    not_after   BIGINT NOT NULL,
    state       TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    changed_at  BIGINT NOT NULL,
    mac         TEXT
);
ALTER TABLE authorities ADD COLUMN IF NOT EXISTS mac TEXT;
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
    /// Length of the audit file in bytes after that line (SQLite; 0 in
    /// PostgreSQL, which keeps the lines themselves).
    pub len: i64,
}

/// One of the two databases.
#[derive(Debug)]
pub enum Db {
    /// The embedded default.
    Sqlite(Connection),
    /// Shared by replicas (boxed: it is the larger by far).
    Postgres(Box<pg::Pg>),
}

impl Sql for Db {
    fn exec(&mut self, sql: &str, params: &[Value]) -> sql::Result<u64> {
        match self {
            Self::Sqlite(c) => c.exec(sql, params),
            Self::Postgres(p) => p.exec(sql, params),
        }
    }
    fn rows(&mut self, sql: &str, params: &[Value]) -> sql::Result<Vec<Row>> {
        match self {
            Self::Sqlite(c) => c.rows(sql, params),
            Self::Postgres(p) => p.rows(sql, params),
        }
    }
}

/// The connection and the group commit in progress on it.
#[derive(Debug)]
pub struct Conn {
    /// The database.
    pub db: Db,
    batch: Batch,
}

impl Sql for Conn {
    fn exec(&mut self, sql: &str, params: &[Value]) -> sql::Result<u64> {
        self.db.exec(sql, params)
    }
    fn rows(&mut self, sql: &str, params: &[Value]) -> sql::Result<Vec<Row>> {
        self.db.rows(sql, params)
    }
}

/// Group commit: writes that arrive while one commits share the next
/// transaction, so one pair of fsyncs (the audit file's, the database's)
/// makes a whole batch durable; each write is answered only once its batch
/// committed. A write that fails rolls back to its own savepoint and leaves
/// the others in.
#[derive(Debug, Default)]
struct Batch {
    /// A batch transaction is open.
    open: bool,
    /// Number of the open (or last) batch.
    epoch: u64,
    /// The last batch that ended, and its error if it did not commit.
    ended: u64,
    failed: Option<(u64, String)>,
    /// Writes in the open batch that wait for its commit.
    jobs: usize,
}

/// Most writes in one batch.
const MAX_BATCH: usize = 256;

/// Handle to the CA's database.
#[derive(Debug)]
pub struct Store {
    db: Mutex<Conn>,
    /// Wakes writers waiting for their batch's commit.
    committed: Condvar,
    /// Writers waiting to join the open batch: its commit waits for them.
    joining: AtomicUsize,
    /// The audit file synced before each batch commits (SQLite).
    audit_file: OnceLock<PathBuf>,
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path`.
    pub fn open(path: &Path) -> sql::Result<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // WAL + FULL: every commit is on disk before it returns.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SQLITE_SCHEMA)?;
        chain::migrate(&conn)?;
        Ok(Self::with(Db::Sqlite(conn)))
    }

    fn with(db: Db) -> Self {
        Self {
            db: Mutex::new(Conn {
                db,
                batch: Batch::default(),
            }),
            committed: Condvar::new(),
            joining: AtomicUsize::new(0),
            audit_file: OnceLock::new(),
        }
    }

    /// The audit trail file whose appends each batch makes durable.
    pub fn set_audit_file(&self, path: PathBuf) {
        let _ = self.audit_file.set(path);
    }

    /// Runs `f` in the open batch transaction (opening one if needed) and
    /// returns once that batch committed: see [`Batch`].
    pub fn write_grouped<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut WriteTx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        self.joining.fetch_add(1, Ordering::SeqCst);
        let mut conn = self.lock();
        self.joining.fetch_sub(1, Ordering::SeqCst);
        if !conn.batch.open {
            conn.db.begin_raw()?;
            conn.batch.open = true;
            conn.batch.epoch += 1;
            conn.batch.jobs = 0;
        }
        let epoch = conn.batch.epoch;
        conn.db.exec("SAVEPOINT job", &[])?;
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            f(&mut WriteTx::Batch(&mut conn.db))
        }));
        let result = match run {
            Ok(r) => r,
            Err(panic) => {
                // Never let half a write ride along in the batch.
                let _ = conn.db.exec("ROLLBACK TO job", &[]);
                let _ = conn.db.exec("RELEASE job", &[]);
                std::panic::resume_unwind(panic);
            }
        };
        match result {
            Err(e) => {
                conn.db.exec("ROLLBACK TO job", &[])?;
                conn.db.exec("RELEASE job", &[])?;
                if conn.batch.jobs == 0 && self.joining.load(Ordering::SeqCst) == 0 {
                    // Nobody else is in it: close the empty transaction.
                    self.end_batch(&mut conn);
                }
                Err(e)
            }
            Ok(value) => {
                conn.db.exec("RELEASE job", &[])?;
                conn.batch.jobs += 1;
                loop {
                    if conn.batch.ended >= epoch {
                        return match &conn.batch.failed {
                            Some((e, why)) if *e == epoch => {
                                Err(StoreError::Postgres(format!("commit failed: {why}")).into())
                            }
                            _ => Ok(value),
                        };
                    }
                    let last_in = self.joining.load(Ordering::SeqCst) == 0;
                    if conn.batch.open && (last_in || conn.batch.jobs >= MAX_BATCH) {
                        self.end_batch(&mut conn);
                        continue;
                    }
                    conn = self
                        .committed
                        .wait_timeout(conn, Duration::from_millis(1))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
            }
        }
    }

    /// The connection with no batch open (it commits the open one first),
    /// for a write that does not group: a rotation step, a shared key.
    pub fn lock_exclusive(&self) -> MutexGuard<'_, Conn> {
        let mut conn = self.lock();
        if conn.batch.open {
            self.end_batch(&mut conn);
        }
        conn
    }

    /// Commits the open batch (the audit file first), or records why not,
    /// and wakes its writers.
    fn end_batch(&self, conn: &mut Conn) {
        let synced = match self.audit_file.get() {
            Some(path) if conn.batch.jobs > 0 && !conn.db.is_postgres() => {
                std::fs::File::open(path)
                    .and_then(|f| f.sync_data())
                    .map_err(|e| format!("{}: {e}", path.display()))
            }
            _ => Ok(()),
        };
        let outcome = synced.and_then(|()| conn.db.end("COMMIT").map_err(|e| e.to_string()));
        if let Err(why) = outcome {
            let _ = conn.db.end("ROLLBACK");
            tracing::error!(error = %why, writes = conn.batch.jobs, "a batch of store writes did not commit; none of them is answered as done");
            conn.batch.failed = Some((conn.batch.epoch, why));
        }
        conn.batch.open = false;
        conn.batch.ended = conn.batch.epoch;
        self.committed.notify_all();
    }

    /// Connects to the PostgreSQL database at `url` and creates what is missing.
    pub fn open_postgres(url: &str) -> sql::Result<Self> {
        let mut pg = pg::Pg::connect(url)?;
        pg.begin_write()?;
        pg.batch(&format!("{POSTGRES_SCHEMA} COMMIT;"))?;
        Ok(Self::with(Db::Postgres(Box::new(pg))))
    }

    /// The connection, for one decision's worth of statements.
    pub fn lock(&self) -> MutexGuard<'_, Conn> {
        // A panic while holding the lock cannot leave the database
        // inconsistent: an open transaction rolls back when dropped.
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this is the shared PostgreSQL store.
    pub fn is_postgres(&self) -> bool {
        self.lock().db.is_postgres()
    }

    /// The recorded audit head (seq 0 when the trail is empty).
    pub fn audit_head(&self) -> sql::Result<AuditHead> {
        read_audit_head(&mut *self.lock())
    }

    /// Every certificate issued for `id`, oldest first.
    pub fn issued_for(&self, id: &str) -> sql::Result<Vec<IssuedRecord>> {
        let rows = self.lock().rows(
            "SELECT serial, spiffe_id, not_before, not_after, key_sha256, kind, COALESCE(issuer, '')
             FROM issued WHERE spiffe_id = $1 ORDER BY issued_at, serial",
            &[id.into()],
        )?;
        rows.iter()
            .map(|r| {
                Ok(IssuedRecord {
                    serial: r.text(0)?,
                    spiffe_id: r.text(1)?,
                    not_before: r.int(2)?,
                    not_after: r.int(3)?,
                    key_sha256: r.text(4)?,
                    kind: r.text(5)?,
                    issuer: r.text(6)?,
                })
            })
            .collect()
    }
}

impl Db {
    /// Whether this is PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }

    /// Ends a batch's transaction with `COMMIT` or `ROLLBACK`.
    fn end(&mut self, how: &str) -> sql::Result<()> {
        match self {
            Self::Sqlite(c) => Ok(c.execute_batch(how)?),
            Self::Postgres(p) => p.end(how),
        }
    }

    /// Opens a write transaction by statement (a batch's).
    fn begin_raw(&mut self) -> sql::Result<()> {
        match self {
            Self::Sqlite(c) => Ok(c.execute_batch("BEGIN IMMEDIATE")?),
            Self::Postgres(p) => p.begin_write(),
        }
    }
}

/// A write transaction that holds the store's write lock.
pub enum WriteTx<'a> {
    /// `BEGIN IMMEDIATE`.
    Sqlite(rusqlite::Transaction<'a>),
    /// `BEGIN` and the advisory lock.
    Postgres(PgTx<'a>),
    /// One write of a group commit (see [`Store::write_grouped`]): its
    /// batch commits it.
    Batch(&'a mut Db),
}

/// A PostgreSQL write transaction; rolled back unless committed.
pub struct PgTx<'a> {
    pg: &'a mut pg::Pg,
    done: bool,
}

impl Drop for PgTx<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.pg.end("ROLLBACK");
        }
    }
}

impl Sql for WriteTx<'_> {
    fn exec(&mut self, sql: &str, params: &[Value]) -> sql::Result<u64> {
        match self {
            Self::Sqlite(t) => t.exec(sql, params),
            Self::Postgres(p) => p.pg.exec(sql, params),
            Self::Batch(db) => db.exec(sql, params),
        }
    }
    fn rows(&mut self, sql: &str, params: &[Value]) -> sql::Result<Vec<Row>> {
        match self {
            Self::Sqlite(t) => t.rows(sql, params),
            Self::Postgres(p) => p.pg.rows(sql, params),
            Self::Batch(db) => db.rows(sql, params),
        }
    }
}

impl WriteTx<'_> {
    /// Makes everything in it durable, or nothing.
    pub fn commit(self) -> sql::Result<()> {
        match self {
            Self::Sqlite(t) => Ok(t.commit()?),
            Self::Postgres(mut p) => {
                p.done = true;
                p.pg.end("COMMIT")
            }
            // Its batch commits it.
            Self::Batch(_) => Ok(()),
        }
    }

    /// Whether the audit lines go into the database (PostgreSQL) rather
    /// than the trail file.
    pub fn is_postgres(&self) -> bool {
        match self {
            Self::Sqlite(_) => false,
            Self::Postgres(_) => true,
            Self::Batch(db) => db.is_postgres(),
        }
    }

    /// Whether a batch makes this write durable (the audit file is synced
    /// once for the batch, not per line).
    pub fn is_grouped(&self) -> bool {
        matches!(self, Self::Batch(_))
    }
}

/// How the certificate with `serial` was obtained (`bootstrap`, `renewal`,
/// `kubernetes`, ...), when this CA issued it.
pub fn issued_kind(db: &mut dyn Sql, serial: &str) -> sql::Result<Option<String>> {
    db.row(
        "SELECT kind FROM issued WHERE serial = $1",
        &[serial.into()],
    )?
    .map(|r| r.text(0))
    .transpose()
}

/// Starts a transaction that holds the write lock from its first statement
/// (a rotation step, a shared key: writes that do not group).
pub fn begin_write(conn: &mut Conn) -> sql::Result<WriteTx<'_>> {
    if conn.batch.open {
        return Err(StoreError::Row(
            "a batch is open on this connection: use write_grouped".into(),
        ));
    }
    match &mut conn.db {
        Db::Sqlite(c) => Ok(WriteTx::Sqlite(
            c.transaction_with_behavior(TransactionBehavior::Immediate)?,
        )),
        Db::Postgres(pg) => {
            pg.begin_write()?;
            Ok(WriteTx::Postgres(PgTx { pg, done: false }))
        }
    }
}

/// Looks a token up by its hash.
pub fn token(db: &mut dyn Sql, hash: &str) -> sql::Result<Option<TokenRecord>> {
    db.row(
        "SELECT spiffe_id, expires_at, used_at FROM tokens WHERE hash = $1",
        &[hash.into()],
    )?
    .map(|r| {
        Ok(TokenRecord {
            spiffe_id: r.text(0)?,
            expires_at: r.int(1)?,
            used_at: r.opt_int(2)?,
        })
    })
    .transpose()
}

/// Whether `id` is on the deny list.
pub fn is_denied(db: &mut dyn Sql, id: &SpiffeId) -> sql::Result<bool> {
    Ok(db
        .row(
            "SELECT 1 FROM denied WHERE spiffe_id = $1",
            &[id.as_str().into()],
        )?
        .is_some())
}

/// Reads the audit head.
pub fn read_audit_head(db: &mut dyn Sql) -> sql::Result<AuditHead> {
    let head = db.row("SELECT seq, hash, len FROM audit_head WHERE id = 1", &[])?;
    match head {
        Some(r) => Ok(AuditHead {
            seq: r.int(0)?,
            hash: r.text(1)?,
            len: r.int(2)?,
        }),
        None => Ok(AuditHead {
            seq: 0,
            hash: GENESIS.to_owned(),
            len: 0,
        }),
    }
}

/// `prev` of the audit trail's first line: the head of an empty trail.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Records the new audit head.
pub fn set_audit_head(tx: &mut WriteTx<'_>, head: &AuditHead) -> sql::Result<()> {
    tx.exec(
        "INSERT INTO audit_head (id, seq, hash, len) VALUES (1, $1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, len = excluded.len",
        &[head.seq.into(), (&head.hash).into(), head.len.into()],
    )?;
    Ok(())
}

/// Stores an audit line in the database (PostgreSQL).
pub fn insert_audit_line(tx: &mut WriteTx<'_>, seq: i64, line: &str) -> sql::Result<()> {
    tx.exec(
        "INSERT INTO audit_lines (seq, line) VALUES ($1, $2)",
        &[seq.into(), line.into()],
    )?;
    Ok(())
}

/// The audit lines up to `seq` (the head read before), in order
/// (PostgreSQL); a line past it is still reported by `verify_text`'s count.
pub fn audit_lines(db: &mut dyn Sql, seq: i64) -> sql::Result<Vec<String>> {
    db.rows(
        "SELECT line FROM audit_lines WHERE seq <= $1 ORDER BY seq",
        &[seq.into()],
    )?
    .iter()
    .map(|r| r.text(0))
    .collect()
}

/// Stores a new token's hash.
pub fn insert_token(
    tx: &mut WriteTx<'_>,
    hash: &str,
    id: &SpiffeId,
    now: i64,
    expires_at: i64,
) -> sql::Result<()> {
    tx.exec(
        "INSERT INTO tokens (hash, spiffe_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
        &[
            hash.into(),
            id.as_str().into(),
            now.into(),
            expires_at.into(),
        ],
    )?;
    Ok(())
}

/// Marks a token used; false when it was already used, expired or unknown
/// (the check and the mark are one statement, so two racing requests
/// cannot both use it).
pub fn consume_token(tx: &mut WriteTx<'_>, hash: &str, now: i64) -> sql::Result<bool> {
    let n = tx.exec(
        "UPDATE tokens SET used_at = $1 WHERE hash = $2 AND used_at IS NULL AND expires_at > $1",
        &[now.into(), hash.into()],
    )?;
    Ok(n == 1)
}

/// Records an issued certificate.
pub fn insert_issued(tx: &mut WriteTx<'_>, r: &IssuedRecord, now: i64) -> sql::Result<()> {
    tx.exec(
        "INSERT INTO issued (serial, spiffe_id, not_before, not_after, key_sha256, kind, issued_at, issuer)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            (&r.serial).into(),
            (&r.spiffe_id).into(),
            r.not_before.into(),
            r.not_after.into(),
            (&r.key_sha256).into(),
            (&r.kind).into(),
            now.into(),
            (&r.issuer).into(),
        ],
    )?;
    Ok(())
}

/// Puts `id` on the deny list (true) or takes it off (false); returns
/// whether anything changed.
pub fn set_denied(
    tx: &mut WriteTx<'_>,
    id: &SpiffeId,
    denied: bool,
    now: i64,
) -> sql::Result<bool> {
    let n = if denied {
        tx.exec(
            "INSERT INTO denied (spiffe_id, since) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[id.as_str().into(), now.into()],
        )?
    } else {
        tx.exec(
            "DELETE FROM denied WHERE spiffe_id = $1",
            &[id.as_str().into()],
        )?
    };
    if n > 0 {
        bump_trust_sequence(tx)?;
    }
    Ok(n > 0)
}

/// The trust feed's sequence: grows with every change to what proxies are
/// pushed (the deny list; the bundle when roots rotate).
pub fn trust_sequence(db: &mut dyn Sql) -> sql::Result<u64> {
    let r = db.row("SELECT seq FROM trust_seq WHERE id = 1", &[])?;
    Ok(r.map(|r| r.int(0)).transpose()?.unwrap_or(0).max(0) as u64)
}

/// Moves the trust feed on, inside the transaction that changed it: to the
/// next number, or to the time in milliseconds if that is higher, so that
/// after a store is restored from a backup the next change still passes
/// every sequence a proxy has seen (proxies never go back).
pub fn bump_trust_sequence(tx: &mut WriteTx<'_>) -> sql::Result<()> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    tx.exec(
        "UPDATE trust_seq SET seq = CASE WHEN seq + 1 > $1 THEN seq + 1 ELSE $1 END WHERE id = 1",
        &[now_ms.into()],
    )?;
    Ok(())
}

/// Every denied identity, sorted.
pub fn denied_ids(db: &mut dyn Sql) -> sql::Result<Vec<String>> {
    db.rows("SELECT spiffe_id FROM denied ORDER BY spiffe_id", &[])?
        .iter()
        .map(|r| r.text(0))
        .collect()
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
pub fn counts(db: &mut dyn Sql, now: i64) -> sql::Result<Counts> {
    let mut one = |sql: &str, p: &[Value]| -> sql::Result<i64> {
        db.row(sql, p)?.map_or(Ok(0), |r| r.int(0))
    };
    Ok(Counts {
        issued: one("SELECT COUNT(*) FROM issued", &[])?,
        valid: one(
            "SELECT COUNT(*) FROM issued WHERE not_after > $1",
            &[now.into()],
        )?,
        tokens: one(
            "SELECT COUNT(*) FROM tokens WHERE used_at IS NULL AND expires_at > $1",
            &[now.into()],
        )?,
        denied: one("SELECT COUNT(*) FROM denied", &[])?,
    })
}

/// One line of `warden ca list`: its columns, as text.
pub type ListRow = Vec<String>;

fn as_text(v: &Value) -> String {
    match v {
        Value::Int(i) => i.to_string(),
        Value::Text(t) => t.clone(),
        Value::Null => "-".to_owned(),
    }
}

fn listed(rows: Vec<Row>) -> Vec<ListRow> {
    rows.iter()
        .map(|r| r.0.iter().map(as_text).collect())
        .collect()
}

/// `warden ca list certs`: certificates still valid at `now` (every one
/// with `all`), newest first: serial, SPIFFE ID, kind, NotAfter, issuer
/// (its first 16 hex characters).
pub fn list_certs(db: &mut dyn Sql, now: i64, all: bool) -> sql::Result<Vec<ListRow>> {
    let filter = if all { "" } else { "WHERE not_after > $1" };
    let sql = format!(
        "SELECT serial, spiffe_id, kind, not_after, SUBSTR(COALESCE(issuer, ''), 1, 16) FROM issued
         {filter} ORDER BY issued_at DESC, serial"
    );
    let params: Vec<Value> = if all { vec![] } else { vec![now.into()] };
    Ok(listed(db.rows(&sql, &params)?))
}

/// `warden ca list tokens`: join tokens neither used nor expired (every one
/// with `all`): the first 16 hex characters of the token's SHA-256, the
/// SPIFFE ID, expiry, use time.
pub fn list_tokens(db: &mut dyn Sql, now: i64, all: bool) -> sql::Result<Vec<ListRow>> {
    let filter = if all {
        ""
    } else {
        "WHERE used_at IS NULL AND expires_at > $1"
    };
    let sql = format!(
        "SELECT SUBSTR(hash, 1, 16), spiffe_id, expires_at, used_at FROM tokens
         {filter} ORDER BY created_at DESC, hash"
    );
    let params: Vec<Value> = if all { vec![] } else { vec![now.into()] };
    Ok(listed(db.rows(&sql, &params)?))
}

/// `warden ca list denied`: denied identities and since when.
pub fn list_denied(db: &mut dyn Sql) -> sql::Result<Vec<ListRow>> {
    Ok(listed(db.rows(
        "SELECT spiffe_id, since FROM denied ORDER BY spiffe_id",
        &[],
    )?))
}

/// Shares a rotation key with the other replicas, sealed (PostgreSQL).
pub fn insert_sealed_key(tx: &mut WriteTx<'_>, id: &str, sealed: &str) -> sql::Result<()> {
    tx.exec(
        "INSERT INTO authority_keys (id, sealed) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        &[id.into(), sealed.into()],
    )?;
    Ok(())
}

/// The sealed key of CA certificate `id`, if a replica shared it (PostgreSQL).
pub fn sealed_key(db: &mut dyn Sql, id: &str) -> sql::Result<Option<String>> {
    db.row(
        "SELECT sealed FROM authority_keys WHERE id = $1",
        &[id.into()],
    )?
    .map(|r| r.text(0))
    .transpose()
}

/// Records that the `ca serve` process `name` is alive at `now` (every
/// replica does, every few seconds, for `warden ca status`).
pub fn heartbeat(tx: &mut WriteTx<'_>, name: &str, started_at: i64, now: i64) -> sql::Result<()> {
    tx.exec(
        "INSERT INTO replicas (name, started_at, seen_at) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO UPDATE SET started_at = excluded.started_at, seen_at = excluded.seen_at",
        &[name.into(), started_at.into(), now.into()],
    )?;
    Ok(())
}

/// The replicas seen since `since`: name, start time, last seen.
pub fn replicas(db: &mut dyn Sql, since: i64) -> sql::Result<Vec<(String, i64, i64)>> {
    db.rows(
        "SELECT name, started_at, seen_at FROM replicas WHERE seen_at >= $1 ORDER BY name",
        &[since.into()],
    )?
    .iter()
    .map(|r| Ok((r.text(0)?, r.int(1)?, r.int(2)?)))
    .collect()
}
