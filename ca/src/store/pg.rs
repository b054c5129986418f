//! The PostgreSQL store, for CA replicas (`store: postgres://...`). One
//! connection per process, used the way the SQLite one is: a decision is a
//! few statements, run synchronously on tokio's blocking pool. Writes
//! serialize on one transaction-scoped advisory lock, taken first in every
//! write transaction, so replicas append to one audit chain and a join token
//! is used once whichever replica sees it. A lost connection is made again
//! at the next call.

use std::future::Future;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls};

use super::sql::{Result, Row, Sql, StoreError, Value};

/// The advisory lock every write transaction takes (any fixed number).
const WRITE_LOCK: &str = "SELECT pg_advisory_xact_lock(2002219565)";

/// A connection and the runtime that drives it.
pub struct Pg {
    url: String,
    /// Always `Some` until dropped (see `Drop`).
    rt: Option<tokio::runtime::Runtime>,
    client: Option<Client>,
    /// A transaction is open on `client`: a lost connection then fails the
    /// transaction instead of reconnecting under it (statements would run
    /// outside it, without the write lock).
    in_tx: bool,
    /// Statements prepared on this connection, by their text (a decision
    /// runs the same few again and again: one round trip each, not two).
    prepared: std::collections::HashMap<String, tokio_postgres::Statement>,
}

impl Drop for Pg {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is not allowed inside the
        // process's own async tasks (a CLI command ends there).
        self.client = None;
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        f.debug_struct("Pg").finish_non_exhaustive()
    }
}

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    // The server's message, when there is one (the Display of a DbError
    // says only "db error").
    match e.as_db_error() {
        Some(db) => StoreError::Postgres(format!("{}: {}", db.code().code(), db.message())),
        None => StoreError::Postgres(e.to_string()),
    }
}

/// Runs `f` to completion on `rt`, from a blocking thread or from inside an
/// async task of the process's own (multi-thread) runtime.
fn block<F: Future>(rt: &tokio::runtime::Runtime, f: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| rt.block_on(f))
        }
        _ => rt.block_on(f),
    }
}

impl Pg {
    /// Connects to `url` (a libpq-style `postgres://` URL).
    pub fn connect(url: &str) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Postgres(format!("runtime: {e}")))?;
        let mut pg = Self {
            url: url.to_owned(),
            rt: Some(rt),
            client: None,
            in_tx: false,
            prepared: std::collections::HashMap::new(),
        };
        pg.ensure()?;
        Ok(pg)
    }

    /// Connects again if the connection was lost.
    fn runtime(&self) -> Result<&tokio::runtime::Runtime> {
        self.rt
            .as_ref()
            .ok_or_else(|| StoreError::Postgres("store closed".into()))
    }

    fn ensure(&mut self) -> Result<()> {
        if self.client.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(());
        }
        if self.in_tx {
            return Err(StoreError::Postgres(
                "the connection was lost during a transaction; nothing of it was kept".into(),
            ));
        }
        let url = self.url.clone();
        let rt = self.runtime()?;
        let (client, conn) = block(
            rt,
            async move { tokio_postgres::connect(&url, NoTls).await },
        )
        .map_err(pg_err)?;
        rt.spawn(async move {
            if let Err(e) = conn.await {
                tracing::warn!(error = %e, "the PostgreSQL connection ended");
            }
        });
        self.client = Some(client);
        self.prepared.clear();
        // A lost replica must not hold the write lock for long, nor wait
        // forever for it; read what is committed, whatever the server's default.
        self.batch(
            "SET idle_in_transaction_session_timeout = '30s'; SET lock_timeout = '20s'; \
             SET default_transaction_isolation = 'read committed'",
        )
    }

    fn parts(&mut self) -> Result<(&tokio::runtime::Runtime, &Client)> {
        self.ensure()?;
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| StoreError::Postgres("not connected".into()))?;
        Ok((self.runtime()?, client))
    }

    /// Runs statements that take no parameters (the schema, BEGIN, COMMIT).
    pub fn batch(&mut self, sql: &str) -> Result<()> {
        let (rt, client) = self.parts()?;
        block(rt, client.batch_execute(sql)).map_err(pg_err)
    }

    /// Starts a write transaction: BEGIN, then the write lock. On failure
    /// the transaction is rolled back (the session is not left aborted).
    pub fn begin_write(&mut self) -> Result<()> {
        self.batch("BEGIN ISOLATION LEVEL READ COMMITTED")?;
        self.in_tx = true;
        if let Err(e) = self.batch(WRITE_LOCK) {
            let _ = self.end("ROLLBACK");
            return Err(e);
        }
        Ok(())
    }

    /// Ends the transaction with `COMMIT` or `ROLLBACK`.
    pub fn end(&mut self, how: &str) -> Result<()> {
        let r = self.batch(how);
        self.in_tx = false;
        if r.is_err() {
            // The session's state is unknown: start from a new one.
            self.client = None;
        }
        r
    }
}

/// The parameters, typed as PostgreSQL expects them.
fn pg_params(params: &[Value]) -> Vec<Box<dyn ToSql + Sync + Send>> {
    params
        .iter()
        .map(|p| -> Box<dyn ToSql + Sync + Send> {
            match p {
                Value::Int(v) => Box::new(*v),
                Value::Text(v) => Box::new(v.clone()),
                Value::Null => Box::new(None::<String>),
            }
        })
        .collect()
}

fn pg_row(r: &tokio_postgres::Row) -> Result<Row> {
    let mut row = Vec::with_capacity(r.len());
    for (i, col) in r.columns().iter().enumerate() {
        let bad = |e: tokio_postgres::Error| StoreError::Row(format!("column {i}: {e}"));
        let v = match *col.type_() {
            Type::INT8 => r.try_get::<_, Option<i64>>(i).map_err(bad)?.map(Value::Int),
            Type::INT4 => r
                .try_get::<_, Option<i32>>(i)
                .map_err(bad)?
                .map(|v| Value::Int(v.into())),
            Type::BOOL => r
                .try_get::<_, Option<bool>>(i)
                .map_err(bad)?
                .map(|v| Value::Int(v.into())),
            Type::TEXT | Type::VARCHAR => r
                .try_get::<_, Option<String>>(i)
                .map_err(bad)?
                .map(Value::Text),
            ref other => return Err(StoreError::Row(format!("column {i} has type {other}"))),
        };
        row.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(row))
}

impl Pg {
    /// `sql` prepared on the current connection (once per connection).
    fn statement(&mut self, sql: &str) -> Result<tokio_postgres::Statement> {
        self.ensure()?;
        if let Some(st) = self.prepared.get(sql) {
            return Ok(st.clone());
        }
        let (rt, client) = self.parts()?;
        let st = block(rt, client.prepare(sql)).map_err(pg_err)?;
        self.prepared.insert(sql.to_owned(), st.clone());
        Ok(st)
    }
}

impl Sql for Pg {
    fn exec(&mut self, sql: &str, params: &[Value]) -> Result<u64> {
        let st = self.statement(sql)?;
        let (rt, client) = self.parts()?;
        let owned = pg_params(params);
        let refs: Vec<&(dyn ToSql + Sync)> = owned.iter().map(|b| &**b as _).collect();
        block(rt, client.execute(&st, &refs)).map_err(pg_err)
    }

    fn rows(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        let st = self.statement(sql)?;
        let (rt, client) = self.parts()?;
        let owned = pg_params(params);
        let refs: Vec<&(dyn ToSql + Sync)> = owned.iter().map(|b| &**b as _).collect();
        let rows = block(rt, client.query(&st, &refs)).map_err(pg_err)?;
        rows.iter().map(pg_row).collect()
    }
}
