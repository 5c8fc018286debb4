//! One way to talk to either database, over sqlx: SQLite (embedded, the
//! default) or PostgreSQL (for farms that run one, and for several server
//! processes sharing a database). A pool of connections of sqlx's `Any`
//! driver; statements are written once, with `$1`-style parameters, which
//! both understand. Values are the four kinds both databases share: null,
//! 64-bit integer, text and bytes. The schema is migrations as files, one
//! set written in PostgreSQL's dialect (`server/migrations/`; SQLite gets
//! them translated), applied by sqlx's migrator.

use std::borrow::Cow;
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migrate, Migration, MigrationSource, Migrator};
use sqlx::{Any, AnyPool, Executor};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SqlError {
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("column {0}: {1}")]
    Column(String, String),
}

/// A parameter. Nulls keep their kind: PostgreSQL types every parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Int(Option<i64>),
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(Some(v))
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(Some(v as i64))
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(Some(v as i64))
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(Some(v.to_owned()))
    }
}
impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(Some(v))
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(Some(v.clone()))
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Value {
        Value::Bytes(Some(v.to_vec()))
    }
}
impl From<Option<i64>> for Value {
    fn from(v: Option<i64>) -> Value {
        Value::Int(v)
    }
}
impl From<Option<u64>> for Value {
    fn from(v: Option<u64>) -> Value {
        Value::Int(v.map(|v| v as i64))
    }
}
impl From<Option<&str>> for Value {
    fn from(v: Option<&str>) -> Value {
        Value::Text(v.map(str::to_owned))
    }
}
impl From<Option<String>> for Value {
    fn from(v: Option<String>) -> Value {
        Value::Text(v)
    }
}

/// `[a, b, c]` as parameters.
#[macro_export]
macro_rules! params {
    ($($v:expr),* $(,)?) => { &[$($crate::sql::Value::from($v)),*][..] };
}

/// One row of a result, read by column name and the kind the caller expects.
pub struct Row(AnyRow);

impl Row {
    fn get<'r, T: sqlx::Decode<'r, Any> + sqlx::Type<Any>>(&'r self, column: &str) -> Result<Option<T>, SqlError> {
        use sqlx::Row as _;
        self.0.try_get::<Option<T>, _>(column).map_err(|e| SqlError::Column(column.to_owned(), e.to_string()))
    }

    pub fn int(&self, column: &str) -> Result<i64, SqlError> {
        self.opt_int(column)?
            .ok_or_else(|| SqlError::Column(column.to_owned(), "null where a number was expected".into()))
    }

    pub fn opt_int(&self, column: &str) -> Result<Option<i64>, SqlError> {
        self.get::<i64>(column)
    }

    /// A count or size: a number that is never negative.
    pub fn count(&self, column: &str) -> Result<u64, SqlError> {
        Ok(self.int(column)?.max(0) as u64)
    }

    pub fn flag(&self, column: &str) -> Result<bool, SqlError> {
        Ok(self.int(column)? != 0)
    }

    pub fn text(&self, column: &str) -> Result<String, SqlError> {
        self.opt_text(column)?.ok_or_else(|| SqlError::Column(column.to_owned(), "null where text was expected".into()))
    }

    pub fn opt_text(&self, column: &str) -> Result<Option<String>, SqlError> {
        self.get::<String>(column)
    }

    /// A column that holds JSON, as `T` (`None` for a null).
    pub fn opt_json<T: serde::de::DeserializeOwned>(&self, column: &str) -> Result<Option<T>, SqlError> {
        self.opt_text(column)?
            .map(|text| serde_json::from_str(&text).map_err(|e| SqlError::Column(column.to_owned(), e.to_string())))
            .transpose()
    }

    pub fn bytes(&self, column: &str) -> Result<Vec<u8>, SqlError> {
        match self.get::<Vec<u8>>(column) {
            Ok(v) => Ok(v.unwrap_or_default()),
            // A blob written as text by an older schema reads as its bytes.
            Err(_) => Ok(self.text(column)?.into_bytes()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// An open database: a pool of connections to it.
pub struct Database {
    pool: AnyPool,
    backend: Backend,
    /// SQLite's writers, in this process: one connection that every write
    /// takes in turn, so that none sleeps in SQLite's busy handler (which
    /// polls, waking 1 to 100 ms late) while another holds the write lock,
    /// and none holds the lock while it waits for a connection readers
    /// use. Another process that writes (an operator's `account` command)
    /// is still waited for by the busy timeout. PostgreSQL writes through
    /// `pool`: it locks rows, not the database.
    writer: Option<AnyPool>,
}

/// A transaction; it commits when the closure given to [`Database::tx`] returns `Ok`.
pub struct Tx {
    inner: sqlx::Transaction<'static, Any>,
    backend: Backend,
}

/// Whether `spec` names a PostgreSQL database rather than an SQLite file.
pub fn is_postgres(spec: &str) -> bool {
    spec.starts_with("postgresql://") || spec.starts_with("postgres://")
}

/// The schema's migrations, one file each (`server/migrations/`), written
/// in PostgreSQL's dialect; SQLite gets them in its own (`InSqlite`).
static MIGRATIONS: Migrator = sqlx::migrate!("./migrations");

/// A migration's SQL in SQLite's dialect: the same statements, SQLite's
/// names for the types (its rowid for an id, INTEGER for every integer,
/// BLOB for bytes). What comes out is byte for byte what the SQLite
/// migrations were when each backend had files of its own, so databases
/// made then keep their checksums.
pub fn sqlite_dialect(sql: &str) -> String {
    sql.replace("BIGSERIAL PRIMARY KEY", "INTEGER PRIMARY KEY").replace("BIGINT", "INTEGER").replace("BYTEA", "BLOB")
}

/// The migrations, in SQLite's dialect.
#[derive(Debug)]
struct InSqlite;

impl MigrationSource<'static> for InSqlite {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, BoxDynError>> {
        let migrations = MIGRATIONS
            .iter()
            .map(|m| {
                let sql = Cow::Owned(sqlite_dialect(&m.sql));
                Migration::new(m.version, m.description.clone(), m.migration_type, sql, m.no_tx)
            })
            .collect();
        Box::pin(std::future::ready(Ok(migrations)))
    }
}

/// Connections in the pool: SQLite's writers take turns anyway (WAL lets
/// readers run beside them); PostgreSQL serves several at once.
const SQLITE_CONNECTIONS: u32 = 4;
const POSTGRES_CONNECTIONS: u32 = 8;

/// How long a request waits for a connection before it is an error.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// The key of PostgreSQL's advisory lock that servers starting together
/// take while one of them adopts a database made before sqlx's migrator.
const ADOPT_LOCK: i64 = 7216373;

impl Database {
    /// Opens an SQLite file (made when missing), in WAL mode with full
    /// sync, foreign keys on, and a busy timeout of 10 s.
    pub async fn sqlite(path: &str) -> Result<Database, SqlError> {
        sqlx::any::install_default_drivers();
        // The path as sqlx reads it: percent-decoded, up to a `?`.
        let escaped = path.replace('%', "%25").replace('?', "%3F").replace('#', "%23");
        let url = format!("sqlite://{escaped}?mode=rwc");
        let open = |connections| {
            AnyPoolOptions::new().max_connections(connections).acquire_timeout(ACQUIRE_TIMEOUT).after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute(
                        "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL;",
                    )
                    .await?;
                    Ok(())
                })
            })
        };
        let pool = open(SQLITE_CONNECTIONS).connect(&url).await?;
        let writer = open(1).connect(&url).await?;
        Ok(Database { pool, backend: Backend::Sqlite, writer: Some(writer) })
    }

    /// Connects to PostgreSQL (`postgresql://user@host:port/dbname`, without TLS:
    /// keep it on this machine or a private network).
    pub async fn postgres(url: &str) -> Result<Database, SqlError> {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(POSTGRES_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(url)
            .await?;
        Ok(Database { pool, backend: Backend::Postgres, writer: None })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Runs `f` in one transaction: committed when it returns `Ok`, rolled back otherwise.
    /// SQLite's take the write lock at once (`BEGIN IMMEDIATE`), so two never
    /// deadlock upgrading a read to a write; they wait their turn.
    pub async fn tx<R, E, F>(&self, f: F) -> Result<R, E>
    where
        E: From<SqlError>,
        F: AsyncFnOnce(&mut Tx) -> Result<R, E>,
    {
        let inner = match self.backend {
            Backend::Sqlite => self.writes().begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
        .map_err(SqlError::from)?;
        let mut tx = Tx { inner, backend: self.backend };
        let out = f(&mut tx).await?;
        tx.inner.commit().await.map_err(SqlError::from)?;
        Ok(out)
    }

    /// One statement on its own (it is its own transaction); the rows it changed.
    pub async fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, SqlError> {
        Ok(bind(sqlx::query(sql), params).execute(self.writes()).await?.rows_affected())
    }

    /// One statement that changes rows and returns one (`… RETURNING …`) on its own.
    pub async fn execute_returning(&self, sql: &str, params: &[Value]) -> Result<Option<Row>, SqlError> {
        Ok(bind(sqlx::query(sql), params).fetch_optional(self.writes()).await?.map(Row))
    }

    /// Where writes go: SQLite's one writing connection (`writer`), or the pool.
    fn writes(&self) -> &AnyPool {
        self.writer.as_ref().unwrap_or(&self.pool)
    }

    /// One query on its own: a consistent read that waits on no writer.
    pub async fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, SqlError> {
        Ok(bind(sqlx::query(sql), params).fetch_all(&self.pool).await?.into_iter().map(Row).collect())
    }

    pub async fn query_opt(&self, sql: &str, params: &[Value]) -> Result<Option<Row>, SqlError> {
        Ok(bind(sqlx::query(sql), params).fetch_optional(&self.pool).await?.map(Row))
    }

    /// Applies the migrations not yet applied (`server/migrations/<backend>/`),
    /// each once, whichever of several servers starting together gets there
    /// first (sqlx's migrator holds a lock while it works). A database made
    /// before the migrator, which counted its migrations itself, is adopted
    /// first: those it applied are recorded as applied.
    pub async fn migrate(&self) -> Result<(), SqlError> {
        let sqlite;
        let migrator = match self.backend {
            Backend::Sqlite => {
                sqlite = Migrator::new(InSqlite).await?;
                &sqlite
            }
            Backend::Postgres => &MIGRATIONS,
        };
        self.adopt(migrator).await?;
        migrator.run(&self.pool).await?;
        Ok(())
    }

    /// How many migrations a database from before sqlx's migrator had applied
    /// (SQLite: `PRAGMA user_version`; PostgreSQL: the `construir_schema` table),
    /// recorded in the migrator's table when it has none yet.
    async fn adopt(&self, migrator: &Migrator) -> Result<(), SqlError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(ADOPT_LOCK).execute(&mut *tx).await?;
        }
        let known = |table: &str| match self.backend {
            Backend::Sqlite => format!("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '{table}'"),
            Backend::Postgres => format!("SELECT CAST(COUNT(*) AS BIGINT) FROM pg_tables WHERE tablename = '{table}'"),
        };
        let count = async |tx: &mut sqlx::Transaction<'_, Any>, sql: String| -> Result<i64, SqlError> {
            Ok(sqlx::query_scalar::<_, i64>(&sql).fetch_one(&mut **tx).await?)
        };
        if count(&mut tx, known("_sqlx_migrations")).await? > 0 {
            return Ok(());
        }
        let applied = match self.backend {
            Backend::Sqlite => count(&mut tx, "PRAGMA user_version".to_owned()).await?,
            Backend::Postgres if count(&mut tx, known("construir_schema")).await? > 0 => {
                count(&mut tx, "SELECT MAX(version) FROM construir_schema".to_owned()).await.unwrap_or(0)
            }
            Backend::Postgres => 0,
        };
        if applied <= 0 {
            return Ok(());
        }
        tx.ensure_migrations_table().await?;
        for m in migrator.iter().filter(|m| m.version <= applied) {
            sqlx::query(
                "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES ($1, $2, TRUE, $3, 0)",
            )
            .bind(m.version)
            .bind(m.description.to_string())
            .bind(m.checksum.to_vec())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        log::info!("the database's {applied} migration(s) from before sqlx's migrator are recorded as applied");
        Ok(())
    }
}

impl Tx {
    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, SqlError> {
        Ok(bind(sqlx::query(sql), params).execute(&mut *self.inner).await?.rows_affected())
    }

    pub async fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, SqlError> {
        Ok(bind(sqlx::query(sql), params).fetch_all(&mut *self.inner).await?.into_iter().map(Row).collect())
    }

    pub async fn query_opt(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>, SqlError> {
        Ok(bind(sqlx::query(sql), params).fetch_optional(&mut *self.inner).await?.map(Row))
    }

    /// `FOR UPDATE` where the database has row locks (PostgreSQL): the rows
    /// read are held until the transaction ends. Nothing in SQLite, whose
    /// transactions hold the whole database.
    pub fn for_update(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    /// `FOR UPDATE SKIP LOCKED` where the database has row locks (PostgreSQL);
    /// nothing in SQLite, where the transaction holds the whole database.
    pub fn skip_locked(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }
}

type Query<'q> = sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>;

fn bind<'q>(mut q: Query<'q>, params: &'q [Value]) -> Query<'q> {
    for p in params {
        q = match p {
            Value::Int(v) => q.bind(*v),
            Value::Text(v) => q.bind(v.as_deref()),
            Value::Bytes(v) => q.bind(v.as_deref()),
        };
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD_SCHEMA: [&str; 3] = [
        include_str!("../migrations/0001_accounts_jobs_audit.sql"),
        include_str!("../migrations/0002_farm.sql"),
        include_str!("../migrations/0003_file_identity.sql"),
    ];

    /// The sha384 of each SQLite migration as its own file held it, before
    /// both backends shared one: what SQLite databases made then recorded.
    const SQLITE_CHECKSUMS: [&str; 11] = [
        "d799f796adb941cccb63f30e24d9c4d8efa2c9d1e6fceab0ab5d5f65cdc3e207d0897f4911c9ca07bdfd9d4ad6dce389",
        "faf001dfe6d1da0dbb626793f34742f3c090e9306caab6464b0123f9bfe1f3c06538dc909b2badcb8760bfa77f3aa068",
        "434f6473afb360584cdea02095fe46358596ac023ed8745aecb9209b0bd15b071f654c9584383a2af45e2e0c9fcca4c4",
        "7da6ed076059b7c934f49e71c7d6a75ee136f9b322cef0ebda0bbce4ee46341f3afc4d9490990207d85aea597217ca17",
        "3f2d9f85b7e2c902536a8321257db69d315236785c6fb94fed4961f62ef932f4299735283fa700085512d0eb4ef63cc6",
        "801568a8e7c838aca9ea20028df245d4cda374d05c313734410d7efba432165163931dbada48b9368857129dad4d2126",
        "7aa5aced3e1103c2258c1d90822b939a0cdb51e14a92e3ac1c72a0ba9f103ca5369e704c09f16afe2457d2aa1f7e0fac",
        "cfe8c681e3b8e68b3b06d58f55062fd43706de61e846201c6227ede339c7b8cc02d120651444a0627b42c2ee87676bf2",
        "5be3d0efed7b5d28f85eb5377e72683eaeb52ac416586d487d7c4ddb4397d84a4d2ec9cab6558725222ce3c8d71aba69",
        "43f9f222af6081642f5407b11c5e27cb8ca1f293f3426e57f8943c2436125f095d53f2c460d97aed2eec55cc2404d070",
        "12b8766f5316006ee627107d7922d36814e91c38c01985ff3992ce94cc19fcf41807eec6124a1351deac7461403ac0ed",
    ];

    #[tokio::test]
    async fn sqlite_gets_every_migration_with_the_checksum_its_databases_recorded() {
        let sqlite = Migrator::new(InSqlite).await.expect("migrations");
        let sums: Vec<String> = sqlite.iter().map(|m| jobfile::hex(&m.checksum)).collect();
        assert_eq!(sums, SQLITE_CHECKSUMS);
        assert_eq!(MIGRATIONS.iter().count(), SQLITE_CHECKSUMS.len());
    }

    async fn applied(db: &Database) -> i64 {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(&db.pool)
            .await
            .expect("count")
    }

    #[tokio::test]
    async fn a_database_from_before_the_migrator_is_adopted_and_keeps_its_rows() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("old.db").to_string_lossy().into_owned();
        // As the server before sqlx left it: the schema, counted in user_version, and an account.
        let old = Database::sqlite(&path).await.expect("open");
        for sql in OLD_SCHEMA {
            sqlx::raw_sql(&sqlite_dialect(sql)).execute(&old.pool).await.expect("old schema");
        }
        sqlx::raw_sql("PRAGMA user_version = 3").execute(&old.pool).await.expect("version");
        old.execute(
            "INSERT INTO accounts (name, token_hash, created) VALUES ($1, $2, $3)",
            crate::params!["old", &b"h"[..], "then"],
        )
        .await
        .expect("account");
        old.pool.close().await;

        // The three it had are adopted as applied; every later one is applied now.
        let all = MIGRATIONS.iter().count() as i64;
        assert!(all > 3);
        let db = crate::db::open(&path).await.expect("adopted");
        assert_eq!(applied(&db).await, all);
        let account = crate::db::account_by_name(&db, "old").await.expect("read").expect("kept");
        assert_eq!((account.token_hash, account.kind), (b"h".to_vec(), crate::db::Kind::Submitter));
        db.pool.close().await;
        // Opened again: nothing to adopt or apply, nothing applied twice.
        let db = crate::db::open(&path).await.expect("reopened");
        assert_eq!(applied(&db).await, all);

        // A new database gets every migration from the migrator itself.
        let fresh = crate::db::open(&tmp.path().join("new.db").to_string_lossy()).await.expect("new");
        assert_eq!(applied(&fresh).await, MIGRATIONS.iter().count() as i64);
    }

    #[tokio::test]
    async fn nulls_keep_their_kind_and_values_read_back_as_written() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let db = Database::sqlite(&tmp.path().join("a?b#c%d.db").to_string_lossy()).await.expect("an odd name");
        assert!(tmp.path().join("a?b#c%d.db").is_file(), "the file is named as asked");
        db.execute("CREATE TABLE t (i INTEGER, s TEXT, b BLOB)", &[]).await.expect("table");
        let (none_i, none_s): (Option<i64>, Option<&str>) = (None, None);
        db.execute("INSERT INTO t VALUES ($1, $2, $3)", crate::params![7i64, "x", &b"\x00\xff"[..]])
            .await
            .expect("row");
        db.execute("INSERT INTO t VALUES ($1, $2, NULL)", crate::params![none_i, none_s]).await.expect("nulls");
        let rows = db.query("SELECT i, s, b FROM t ORDER BY i IS NULL", &[]).await.expect("read");
        assert_eq!((rows[0].int("i").expect("i"), rows[0].text("s").expect("s")), (7, "x".to_owned()));
        assert_eq!(rows[0].bytes("b").expect("b"), b"\x00\xff");
        assert_eq!((rows[1].opt_int("i").expect("i"), rows[1].opt_text("s").expect("s")), (None, None));
        assert!(rows[1].int("i").is_err(), "a null is not a number");
        assert!(rows[0].int("nothing").is_err(), "a column that is not there");
        // A transaction that fails leaves nothing.
        let failed: Result<(), SqlError> = db
            .tx(async |tx| {
                tx.execute("INSERT INTO t VALUES (8, 'y', NULL)", &[]).await?;
                Err(SqlError::Column("i".into(), "on purpose".into()))
            })
            .await;
        assert!(failed.is_err());
        assert_eq!(db.query("SELECT i FROM t", &[]).await.expect("read").len(), 2);
    }
}
