//! The little SQL both stores speak: statements written once, with `$1`
//! placeholders, values that are integers, text or NULL, and rows read back
//! by column. SQLite gets `?1` for `$1`; PostgreSQL takes the text as is.
//! Every integer column is 64-bit in both (`BIGINT` in PostgreSQL).

use rusqlite::types::ValueRef;

/// A parameter or a column value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A 64-bit integer (booleans are 0 and 1).
    Int(i64),
    /// Text.
    Text(String),
    /// NULL (as a text parameter).
    Null,
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Self::Text(v.to_owned())
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Self::Text(v.clone())
    }
}

impl From<Option<&str>> for Value {
    fn from(v: Option<&str>) -> Self {
        v.map_or(Self::Null, Self::from)
    }
}

/// Why a statement failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL said no, or is unreachable.
    #[error("postgres: {0}")]
    Postgres(String),
    /// A row did not hold what the statement promised.
    #[error("store row: {0}")]
    Row(String),
}

/// Results of this module.
pub type Result<T> = std::result::Result<T, StoreError>;

/// One row of a result.
#[derive(Debug, Clone)]
pub struct Row(pub Vec<Value>);

impl Row {
    fn at(&self, i: usize) -> Result<&Value> {
        self.0
            .get(i)
            .ok_or_else(|| StoreError::Row(format!("no column {i}")))
    }

    /// Column `i` as an integer.
    pub fn int(&self, i: usize) -> Result<i64> {
        match self.at(i)? {
            Value::Int(v) => Ok(*v),
            other => Err(StoreError::Row(format!(
                "column {i} is {other:?}, not an integer"
            ))),
        }
    }

    /// Column `i` as an integer or NULL.
    pub fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            _ => self.int(i).map(Some),
        }
    }

    /// Column `i` as text.
    pub fn text(&self, i: usize) -> Result<String> {
        match self.at(i)? {
            Value::Text(v) => Ok(v.clone()),
            other => Err(StoreError::Row(format!(
                "column {i} is {other:?}, not text"
            ))),
        }
    }

    /// Column `i` as text or NULL.
    pub fn opt_text(&self, i: usize) -> Result<Option<String>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            _ => self.text(i).map(Some),
        }
    }
}

/// Something statements run on: a connection or a transaction of either store.
pub trait Sql {
    /// Runs a statement; returns the rows it changed.
    fn exec(&mut self, sql: &str, params: &[Value]) -> Result<u64>;
    /// Runs a query; returns its rows.
    fn rows(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>>;

    /// The first row, if any.
    fn row(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>> {
        Ok(self.rows(sql, params)?.into_iter().next())
    }
}

/// `$N` placeholders as SQLite numbers them.
fn sqlite_text(sql: &str) -> String {
    sql.replace('$', "?")
}

fn sqlite_params(params: &[Value]) -> Vec<rusqlite::types::Value> {
    params
        .iter()
        .map(|p| match p {
            Value::Int(v) => rusqlite::types::Value::Integer(*v),
            Value::Text(v) => rusqlite::types::Value::Text(v.clone()),
            Value::Null => rusqlite::types::Value::Null,
        })
        .collect()
}

fn sqlite_exec(conn: &rusqlite::Connection, sql: &str, params: &[Value]) -> Result<u64> {
    let mut stmt = conn.prepare_cached(&sqlite_text(sql))?;
    let n = stmt.execute(rusqlite::params_from_iter(sqlite_params(params)))?;
    Ok(n as u64)
}

fn sqlite_rows(conn: &rusqlite::Connection, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
    let mut stmt = conn.prepare_cached(&sqlite_text(sql))?;
    let width = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(sqlite_params(params)))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let mut row = Vec::with_capacity(width);
        for i in 0..width {
            row.push(match r.get_ref(i)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(v) => Value::Int(v),
                ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                other => {
                    return Err(StoreError::Row(format!(
                        "column {i} has type {:?}",
                        other.data_type()
                    )));
                }
            });
        }
        out.push(Row(row));
    }
    Ok(out)
}

impl Sql for rusqlite::Connection {
    fn exec(&mut self, sql: &str, params: &[Value]) -> Result<u64> {
        sqlite_exec(self, sql, params)
    }
    fn rows(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        sqlite_rows(self, sql, params)
    }
}

impl Sql for rusqlite::Transaction<'_> {
    fn exec(&mut self, sql: &str, params: &[Value]) -> Result<u64> {
        sqlite_exec(self, sql, params)
    }
    fn rows(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        sqlite_rows(self, sql, params)
    }
}
