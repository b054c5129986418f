//! The CA's own certificates in the store: every root and intermediate it
//! has held, with its state, so that rotation is a sequence of recorded
//! steps that every process (and replica) sees the same way. Keys are never
//! stored here; they stay in files of the CA's state directory (0600).
//!
//! States: a root is `published` (in the bundle, not signing), `active`
//! (its intermediate signs), or `retired` (out of the bundle). An
//! intermediate is `published` (prepared, not signing yet), `active`,
//! `previous` (signs nothing, its leaves still live) or `retired`.

use rusqlite::{Connection, params};

use super::WriteTx;

/// Root or intermediate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A trust anchor.
    Root,
    /// The CA that signs workloads, under a root.
    Intermediate,
}

impl Kind {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Root => "root",
            Self::Intermediate => "intermediate",
        }
    }
}

/// Where a root or an intermediate is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Trusted (a root in the bundle) or prepared (an intermediate), not signing.
    Published,
    /// Signing (the intermediate), or the root of the one that signs.
    Active,
    /// An intermediate that no longer signs; its leaves are still valid.
    Previous,
    /// Gone from the bundle and from every decision.
    Retired,
}

impl State {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Published => "published",
            Self::Active => "active",
            Self::Previous => "previous",
            Self::Retired => "retired",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "published" => Self::Published,
            "active" => Self::Active,
            "previous" => Self::Previous,
            "retired" => Self::Retired,
            _ => return None,
        })
    }
}

/// One of the CA's certificates, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityRecord {
    /// SHA-256 of the certificate's DER, hex: how commands name it.
    pub id: String,
    /// Root or intermediate.
    pub kind: Kind,
    /// The root an intermediate is signed by.
    pub parent: Option<String>,
    /// The certificate.
    pub cert_pem: String,
    /// NotBefore, unix seconds.
    pub not_before: i64,
    /// NotAfter, unix seconds.
    pub not_after: i64,
    /// Where it is in its life.
    pub state: State,
    /// When it was recorded, unix seconds.
    pub created_at: i64,
    /// When its state last changed, unix seconds.
    pub changed_at: i64,
}

/// The table, and the column that ties each issued leaf to its intermediate.
pub(super) fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS authorities (
            id          TEXT PRIMARY KEY,
            kind        TEXT NOT NULL,
            parent      TEXT,
            cert_pem    TEXT NOT NULL,
            not_before  INTEGER NOT NULL,
            not_after   INTEGER NOT NULL,
            state       TEXT NOT NULL,
            created_at  INTEGER NOT NULL,
            changed_at  INTEGER NOT NULL
        );",
    )?;
    let has_issuer = conn
        .prepare("SELECT 1 FROM pragma_table_info('issued') WHERE name = 'issuer'")?
        .exists([])?;
    if !has_issuer {
        conn.execute_batch("ALTER TABLE issued ADD COLUMN issuer TEXT")?;
    }
    Ok(())
}

/// Every root and intermediate, oldest first.
pub fn authorities(conn: &Connection) -> rusqlite::Result<Vec<AuthorityRecord>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, kind, parent, cert_pem, not_before, not_after, state, created_at, changed_at
         FROM authorities ORDER BY created_at, rowid",
    )?;
    let rows = stmt.query_map([], |r| {
        let kind: String = r.get(1)?;
        let state: String = r.get(6)?;
        let bad = |what: &str, v: &str| {
            rusqlite::Error::FromSqlConversionFailure(
                0,
                rusqlite::types::Type::Text,
                format!("authorities: bad {what} {v:?}").into(),
            )
        };
        Ok(AuthorityRecord {
            id: r.get(0)?,
            kind: match kind.as_str() {
                "root" => Kind::Root,
                "intermediate" => Kind::Intermediate,
                other => return Err(bad("kind", other)),
            },
            parent: r.get(2)?,
            cert_pem: r.get(3)?,
            not_before: r.get(4)?,
            not_after: r.get(5)?,
            state: State::parse(&state).ok_or_else(|| bad("state", &state))?,
            created_at: r.get(7)?,
            changed_at: r.get(8)?,
        })
    })?;
    rows.collect()
}

/// Records a new root or intermediate.
pub fn insert_authority(tx: &WriteTx<'_>, a: &AuthorityRecord) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO authorities (id, kind, parent, cert_pem, not_before, not_after, state, created_at, changed_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )?
    .execute(params![
        a.id,
        a.kind.as_str(),
        a.parent,
        a.cert_pem,
        a.not_before,
        a.not_after,
        a.state.as_str(),
        a.created_at,
        a.changed_at
    ])?;
    Ok(())
}

/// Moves `id` from state `from` to `to`; false when it was not in `from`
/// (another process moved it first).
pub fn move_authority(
    tx: &WriteTx<'_>,
    id: &str,
    from: State,
    to: State,
    now: i64,
) -> rusqlite::Result<bool> {
    let n = tx
        .prepare_cached(
            "UPDATE authorities SET state = ?, changed_at = ? WHERE id = ? AND state = ?",
        )?
        .execute(params![to.as_str(), now, id, from.as_str()])?;
    Ok(n == 1)
}

/// Leaves signed by an intermediate of root `root` that are still valid at `now`.
pub fn live_leaves_under_root(conn: &Connection, root: &str, now: i64) -> rusqlite::Result<i64> {
    conn.prepare_cached(
        "SELECT COUNT(*) FROM issued WHERE not_after > ?
         AND issuer IN (SELECT id FROM authorities WHERE parent = ?)",
    )?
    .query_row(params![now, root], |r| r.get(0))
}

/// The last NotAfter of the leaves `issuer` signed (None: it signed none).
pub fn last_leaf_expiry(conn: &Connection, issuer: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT MAX(not_after) FROM issued WHERE issuer = ?")?
        .query_row([issuer], |r| r.get(0))
}

/// Ties leaves recorded before the CA knew its intermediates apart to `issuer`.
pub fn adopt_leaves(tx: &WriteTx<'_>, issuer: &str) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE issued SET issuer = ? WHERE issuer IS NULL")?
        .execute([issuer])?;
    Ok(())
}
