//! The CA's own certificates in the store: every root and intermediate it
//! has held, with its state, so that rotation is a sequence of recorded
//! steps that every process (and replica) sees the same way. Keys are never
//! stored here; they stay in files of the CA's state directory (0600).
//!
//! States: a root is `published` (in the bundle, not signing), `active`
//! (its intermediate signs), or `retired` (out of the bundle). An
//! intermediate is `published` (prepared, not signing yet), `active`,
//! `previous` (signs nothing, its leaves still live) or `retired`.

use rusqlite::Connection;

use super::WriteTx;
use super::sql::{Result, Sql, StoreError};

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
    /// A tag under `store.key` over its id, kind, parent and certificate
    /// ([`AuthorityRecord::vouched`]); `None` on a CA without `store.key`.
    pub mac: Option<String>,
}

impl AuthorityRecord {
    /// The fields the tag covers: what it is and where it sits, never its
    /// state (a state the store changes can only act on certificates the
    /// CA itself recorded).
    pub fn vouched(&self) -> [&str; 4] {
        [
            self.id.as_str(),
            self.kind.as_str(),
            self.parent.as_deref().unwrap_or(""),
            self.cert_pem.as_str(),
        ]
    }
}

/// The table, and the column that ties each issued leaf to its intermediate
/// (SQLite; the PostgreSQL schema has both from the start).
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
    let has_mac = conn
        .prepare("SELECT 1 FROM pragma_table_info('authorities') WHERE name = 'mac'")?
        .exists([])?;
    if !has_mac {
        conn.execute_batch("ALTER TABLE authorities ADD COLUMN mac TEXT")?;
    }
    let has_issuer = conn
        .prepare("SELECT 1 FROM pragma_table_info('issued') WHERE name = 'issuer'")?
        .exists([])?;
    if !has_issuer {
        conn.execute_batch("ALTER TABLE issued ADD COLUMN issuer TEXT")?;
    }
    Ok(())
}

fn bad(what: &str, v: &str) -> StoreError {
    StoreError::Row(format!("authorities: bad {what} {v:?}"))
}

/// Every root and intermediate, oldest first.
pub fn authorities(db: &mut dyn Sql) -> Result<Vec<AuthorityRecord>> {
    let rows = db.rows(
        "SELECT id, kind, parent, cert_pem, not_before, not_after, state, created_at, changed_at, mac
         FROM authorities ORDER BY created_at, id",
        &[],
    )?;
    rows.iter()
        .map(|r| {
            let kind = r.text(1)?;
            let state = r.text(6)?;
            Ok(AuthorityRecord {
                id: r.text(0)?,
                kind: match kind.as_str() {
                    "root" => Kind::Root,
                    "intermediate" => Kind::Intermediate,
                    other => return Err(bad("kind", other)),
                },
                parent: r.opt_text(2)?,
                cert_pem: r.text(3)?,
                not_before: r.int(4)?,
                not_after: r.int(5)?,
                state: State::parse(&state).ok_or_else(|| bad("state", &state))?,
                created_at: r.int(7)?,
                changed_at: r.int(8)?,
                mac: r.opt_text(9)?,
            })
        })
        .collect()
}

/// Records a new root or intermediate.
pub fn insert_authority(tx: &mut WriteTx<'_>, a: &AuthorityRecord) -> Result<()> {
    tx.exec(
        "INSERT INTO authorities (id, kind, parent, cert_pem, not_before, not_after, state, created_at, changed_at, mac)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        &[
            (&a.id).into(),
            a.kind.as_str().into(),
            a.parent.as_deref().into(),
            (&a.cert_pem).into(),
            a.not_before.into(),
            a.not_after.into(),
            a.state.as_str().into(),
            a.created_at.into(),
            a.changed_at.into(),
            a.mac.as_deref().into(),
        ],
    )?;
    Ok(())
}

/// Moves `id` from state `from` to `to`; false when it was not in `from`
/// (another process moved it first).
pub fn move_authority(
    tx: &mut WriteTx<'_>,
    id: &str,
    from: State,
    to: State,
    now: i64,
) -> Result<bool> {
    let n = tx.exec(
        "UPDATE authorities SET state = $1, changed_at = $2 WHERE id = $3 AND state = $4",
        &[
            to.as_str().into(),
            now.into(),
            id.into(),
            from.as_str().into(),
        ],
    )?;
    Ok(n == 1)
}

/// Leaves signed by an intermediate of root `root` that are still valid at `now`.
pub fn live_leaves_under_root(db: &mut dyn Sql, root: &str, now: i64) -> Result<i64> {
    db.row(
        "SELECT COUNT(*) FROM issued WHERE not_after > $1
         AND issuer IN (SELECT id FROM authorities WHERE parent = $2)",
        &[now.into(), root.into()],
    )?
    .map_or(Ok(0), |r| r.int(0))
}

/// The last NotAfter of the leaves `issuer` signed (None: it signed none).
pub fn last_leaf_expiry(db: &mut dyn Sql, issuer: &str) -> Result<Option<i64>> {
    db.row(
        "SELECT MAX(not_after) FROM issued WHERE issuer = $1",
        &[issuer.into()],
    )?
    .map_or(Ok(None), |r| r.opt_int(0))
}

/// Ties leaves recorded before the CA knew its intermediates apart to `issuer`.
pub fn adopt_leaves(tx: &mut WriteTx<'_>, issuer: &str) -> Result<()> {
    tx.exec(
        "UPDATE issued SET issuer = $1 WHERE issuer IS NULL",
        &[issuer.into()],
    )?;
    Ok(())
}
