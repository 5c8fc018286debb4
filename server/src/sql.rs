//! One way to talk to either database: SQLite (embedded, the default) or
//! PostgreSQL (for farms that run one, and for several server processes
//! sharing a database). Statements are written once, with `?1`-style
//! parameters; for PostgreSQL they become `$1`. Values are the four kinds
//! both databases share: null, 64-bit integer, text and bytes.

use std::sync::{Mutex, MutexGuard};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SqlError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Postgres(#[from] postgres::Error),
    #[error("column {0}: {1}")]
    Column(usize, &'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(v as i64)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(v as i64)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Value {
        Value::Bytes(v.to_vec())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// `[a, b, c]` as parameters.
#[macro_export]
macro_rules! params {
    ($($v:expr),* $(,)?) => { &[$($crate::sql::Value::from($v)),*][..] };
}

/// One row of a result, read by column index.
#[derive(Debug, Clone)]
pub struct Row(Vec<Value>);

impl Row {
    fn at(&self, i: usize) -> Result<&Value, SqlError> {
        self.0.get(i).ok_or(SqlError::Column(i, "no such column"))
    }

    pub fn int(&self, i: usize) -> Result<i64, SqlError> {
        self.opt_int(i)?.ok_or(SqlError::Column(i, "null where a number was expected"))
    }

    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, SqlError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(*v)),
            _ => Err(SqlError::Column(i, "not a number")),
        }
    }

    pub fn text(&self, i: usize) -> Result<String, SqlError> {
        self.opt_text(i)?.ok_or(SqlError::Column(i, "null where text was expected"))
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>, SqlError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Text(v) => Ok(Some(v.clone())),
            _ => Err(SqlError::Column(i, "not text")),
        }
    }

    pub fn bytes(&self, i: usize) -> Result<Vec<u8>, SqlError> {
        match self.at(i)? {
            Value::Bytes(v) => Ok(v.clone()),
            Value::Text(v) => Ok(v.as_bytes().to_vec()),
            _ => Err(SqlError::Column(i, "not bytes")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// An open database.
pub struct Database {
    inner: Inner,
}

enum Inner {
    Sqlite(Mutex<rusqlite::Connection>),
    Postgres { client: Mutex<postgres::Client>, config: Box<postgres::Config> },
}

/// A transaction; it commits when the closure given to [`Database::tx`] returns `Ok`.
pub enum Tx<'a> {
    Sqlite(rusqlite::Transaction<'a>),
    Postgres(postgres::Transaction<'a>),
}

/// Whether `spec` names a PostgreSQL database rather than an SQLite file.
pub fn is_postgres(spec: &str) -> bool {
    spec.starts_with("postgresql://") || spec.starts_with("postgres://")
}

impl Database {
    pub fn sqlite(conn: rusqlite::Connection) -> Database {
        Database { inner: Inner::Sqlite(Mutex::new(conn)) }
    }

    /// Connects to PostgreSQL (`postgresql://user@host:port/dbname`, without TLS:
    /// keep it on this machine or a private network).
    pub fn postgres(url: &str) -> Result<Database, SqlError> {
        let config: postgres::Config = url.parse()?;
        let client = blocking(|| config.connect(postgres::NoTls))?;
        Ok(Database { inner: Inner::Postgres { client: Mutex::new(client), config: Box::new(config) } })
    }

    pub fn backend(&self) -> Backend {
        match self.inner {
            Inner::Sqlite(_) => Backend::Sqlite,
            Inner::Postgres { .. } => Backend::Postgres,
        }
    }

    /// Runs `f` in one transaction: committed when it returns `Ok`, rolled back otherwise.
    /// SQLite's take the write lock at once, so two never wait on each other's.
    pub fn tx<R, E: From<SqlError>>(&self, f: impl FnOnce(&mut Tx<'_>) -> Result<R, E>) -> Result<R, E> {
        match &self.inner {
            Inner::Sqlite(conn) => {
                let mut conn = lock(conn);
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(SqlError::from)?;
                let mut tx = Tx::Sqlite(tx);
                let out = f(&mut tx)?;
                let Tx::Sqlite(tx) = tx else { unreachable!() };
                tx.commit().map_err(SqlError::from)?;
                Ok(out)
            }
            Inner::Postgres { client, config } => blocking(|| {
                let mut client = lock(client);
                if client.is_closed() {
                    log::warn!("the connection to PostgreSQL was closed; connecting again");
                    *client = config.connect(postgres::NoTls).map_err(SqlError::from)?;
                }
                let tx = client.transaction().map_err(SqlError::from)?;
                let mut tx = Tx::Postgres(tx);
                let out = f(&mut tx)?;
                let Tx::Postgres(tx) = tx else { unreachable!() };
                tx.commit().map_err(SqlError::from)?;
                Ok(out)
            }),
        }
    }

    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, SqlError> {
        self.tx(|tx| tx.execute(sql, params))
    }

    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, SqlError> {
        self.tx(|tx| tx.query(sql, params))
    }

    pub fn query_opt(&self, sql: &str, params: &[Value]) -> Result<Option<Row>, SqlError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// Applies the migrations not yet applied, each once, whichever of
    /// several servers starting together gets there first.
    pub fn migrate(&self, migrations: &[&str]) -> Result<(), SqlError> {
        for (i, sql) in migrations.iter().enumerate() {
            self.tx(|tx| -> Result<(), SqlError> {
                let applied = match tx {
                    Tx::Sqlite(t) => t.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))?,
                    Tx::Postgres(t) => {
                        t.execute("SELECT pg_advisory_xact_lock(7216373)", &[])?;
                        t.batch_execute("CREATE TABLE IF NOT EXISTS construir_schema (version BIGINT NOT NULL)")?;
                        let rows = t.query("SELECT version FROM construir_schema", &[])?;
                        match rows.first() {
                            Some(r) => r.get::<_, i64>(0),
                            None => {
                                t.execute("INSERT INTO construir_schema (version) VALUES (0)", &[])?;
                                0
                            }
                        }
                    }
                };
                if applied as usize > i {
                    return Ok(());
                }
                match tx {
                    Tx::Sqlite(t) => {
                        t.execute_batch(sql)?;
                        t.pragma_update(None, "user_version", (i + 1) as i64)?;
                    }
                    Tx::Postgres(t) => {
                        t.batch_execute(&postgres_ddl(sql))?;
                        t.execute("UPDATE construir_schema SET version = $1", &[&((i + 1) as i64)])?;
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}

impl Tx<'_> {
    pub fn backend(&self) -> Backend {
        match self {
            Tx::Sqlite(_) => Backend::Sqlite,
            Tx::Postgres(_) => Backend::Postgres,
        }
    }

    pub fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, SqlError> {
        match self {
            Tx::Sqlite(t) => {
                let params: Vec<rusqlite::types::Value> = params.iter().map(to_sqlite).collect();
                Ok(t.execute(sql, rusqlite::params_from_iter(params))? as u64)
            }
            Tx::Postgres(t) => {
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = params.iter().map(|p| p as _).collect();
                Ok(t.execute(postgres_params(sql).as_str(), &refs)?)
            }
        }
    }

    pub fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, SqlError> {
        match self {
            Tx::Sqlite(t) => {
                let params: Vec<rusqlite::types::Value> = params.iter().map(to_sqlite).collect();
                let mut stmt = t.prepare(sql)?;
                let columns = stmt.column_count();
                let rows = stmt.query_map(rusqlite::params_from_iter(params), |r| {
                    (0..columns).map(|i| Ok(from_sqlite(r.get_ref(i)?))).collect::<rusqlite::Result<Vec<_>>>().map(Row)
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            }
            Tx::Postgres(t) => {
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = params.iter().map(|p| p as _).collect();
                let rows = t.query(postgres_params(sql).as_str(), &refs)?;
                rows.iter().map(from_postgres).collect()
            }
        }
    }

    pub fn query_opt(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>, SqlError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// `FOR UPDATE` where the database has row locks (PostgreSQL): the rows
    /// read are held until the transaction ends. Nothing in SQLite, whose
    /// transactions hold the whole database.
    pub fn for_update(&self) -> &'static str {
        match self.backend() {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    /// `FOR UPDATE SKIP LOCKED` where the database has row locks (PostgreSQL);
    /// nothing in SQLite, where the transaction holds the whole database.
    pub fn skip_locked(&self) -> &'static str {
        match self.backend() {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs blocking database work, also from inside the server's async tasks:
/// the PostgreSQL client blocks on a runtime of its own.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn to_sqlite(v: &Value) -> rusqlite::types::Value {
    use rusqlite::types::Value as V;
    match v {
        Value::Null => V::Null,
        Value::Int(i) => V::Integer(*i),
        Value::Text(s) => V::Text(s.clone()),
        Value::Bytes(b) => V::Blob(b.clone()),
    }
}

fn from_sqlite(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef as V;
    match v {
        V::Null => Value::Null,
        V::Integer(i) => Value::Int(i),
        V::Real(f) => Value::Int(f as i64),
        V::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        V::Blob(b) => Value::Bytes(b.to_vec()),
    }
}

fn from_postgres(row: &postgres::Row) -> Result<Row, SqlError> {
    use postgres::types::Type;
    let mut out = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let t = col.type_();
        let v = if *t == Type::INT8 {
            row.try_get::<_, Option<i64>>(i)?.map(Value::Int)
        } else if *t == Type::INT4 {
            row.try_get::<_, Option<i32>>(i)?.map(|v| Value::Int(v.into()))
        } else if *t == Type::INT2 {
            row.try_get::<_, Option<i16>>(i)?.map(|v| Value::Int(v.into()))
        } else if *t == Type::BOOL {
            row.try_get::<_, Option<bool>>(i)?.map(|v| Value::Int(v.into()))
        } else if *t == Type::BYTEA {
            row.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Bytes)
        } else {
            row.try_get::<_, Option<String>>(i)?.map(Value::Text)
        };
        out.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(out))
}

impl postgres::types::ToSql for Value {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::Type;
        match self {
            Value::Null => Ok(postgres::types::IsNull::Yes),
            Value::Int(i) if *ty == Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
            Value::Int(i) if *ty == Type::BOOL => (*i != 0).to_sql(ty, out),
            Value::Int(i) => i.to_sql(ty, out),
            Value::Text(s) => s.to_sql(ty, out),
            Value::Bytes(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

/// `?1` parameters as PostgreSQL's `$1`.
fn postgres_params(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

/// The schema, written for SQLite, in PostgreSQL's types: 64-bit integers,
/// `BYTEA` for blobs, and identity columns where SQLite numbers rows itself.
fn postgres_ddl(sql: &str) -> String {
    sql.replace("INTEGER PRIMARY KEY", "BIGSERIAL PRIMARY KEY").replace("INTEGER", "BIGINT").replace("BLOB", "BYTEA")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_and_schema_translate_to_postgres() {
        assert_eq!(postgres_params("a = ?1 AND b = ?12 AND c = '?'"), "a = $1 AND b = $12 AND c = '?'");
        assert_eq!(
            postgres_ddl("id INTEGER PRIMARY KEY, n INTEGER NOT NULL, h BLOB, k INTEGER NOT NULL PRIMARY KEY"),
            "id BIGSERIAL PRIMARY KEY, n BIGINT NOT NULL, h BYTEA, k BIGINT NOT NULL PRIMARY KEY"
        );
    }
}
