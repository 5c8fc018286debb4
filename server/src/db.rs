//! The server's state in SQLite: accounts (with the hash of their token and
//! their limits), job records (who, when, image, sizes, state changes,
//! verdict) and an audit log. The queue's directories stay the truth for
//! job files; a job's record follows what the directories say
//! (`rebuild` makes the records agree with them).

use std::path::Path;
use std::time::SystemTime;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DbError {
    #[error("cannot open the database {path}")]
    Open { path: String, source: rusqlite::Error },
    #[error("database error")]
    Sql(#[from] rusqlite::Error),
    #[error("no account named {0:?}")]
    NoAccount(String),
    #[error("an account named {0:?} exists already")]
    AccountExists(String),
    #[error("{0:?} is not an account name: use 1 to 32 of a-z 0-9 _ -, starting with a letter")]
    BadAccountName(String),
}

/// The schema, one migration per entry; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE accounts (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash BLOB NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL,
    max_job_bytes INTEGER,
    max_waiting INTEGER,
    max_stored_bytes INTEGER,
    max_per_hour INTEGER,
    retention_days INTEGER
);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    image TEXT NOT NULL,
    file_name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    submitted TEXT NOT NULL,
    submitted_unix INTEGER NOT NULL,
    state TEXT NOT NULL,
    updated TEXT NOT NULL,
    verdict TEXT,
    result_bytes INTEGER,
    deleted TEXT
);
CREATE INDEX jobs_by_account ON jobs(account_id, submitted_unix);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    account TEXT,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
"#];

/// An account's limits; `None` means the server-wide default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub max_job_bytes: Option<u64>,
    pub max_waiting: Option<u64>,
    pub max_stored_bytes: Option<u64>,
    pub max_per_hour: Option<u64>,
    pub retention_days: Option<u64>,
}

impl Limits {
    /// Each limit of `self`, or `defaults`' where `self` has none.
    pub fn or(self, defaults: Limits) -> Limits {
        Limits {
            max_job_bytes: self.max_job_bytes.or(defaults.max_job_bytes),
            max_waiting: self.max_waiting.or(defaults.max_waiting),
            max_stored_bytes: self.max_stored_bytes.or(defaults.max_stored_bytes),
            max_per_hour: self.max_per_hour.or(defaults.max_per_hour),
            retention_days: self.retention_days.or(defaults.retention_days),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Account {
    pub id: i64,
    pub name: String,
    #[serde(skip)]
    pub token_hash: Vec<u8>,
    pub disabled: bool,
    pub created: String,
    pub limits: Limits,
}

/// A job as the database records it.
#[derive(Debug, Clone, Serialize)]
pub struct JobRecord {
    pub id: String,
    #[serde(skip)]
    pub account_id: i64,
    pub name: String,
    pub image: String,
    #[serde(skip)]
    pub file_name: String,
    pub size: u64,
    pub submitted: String,
    #[serde(skip)]
    pub submitted_unix: i64,
    pub state: String,
    pub updated: String,
    pub verdict: Option<String>,
    pub result_bytes: Option<u64>,
    /// When retention deleted its result and log.
    pub deleted: Option<String>,
}

pub fn now() -> String {
    jobfile::status::rfc3339(SystemTime::now())
}

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Opens (creating) the database at `path` and applies the migrations it lacks.
pub fn open(path: &Path) -> Result<Connection, DbError> {
    let conn = Connection::open(path).map_err(|source| DbError::Open { path: path.display().to_string(), source })?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let applied: usize = conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(conn)
}

fn check_account_name(name: &str) -> Result<(), DbError> {
    let ok = (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(DbError::BadAccountName(name.to_owned()))
    }
}

fn account_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Account> {
    let opt = |i: usize| r.get::<_, Option<i64>>(i).map(|v| v.map(|v| v as u64));
    Ok(Account {
        id: r.get(0)?,
        name: r.get(1)?,
        token_hash: r.get(2)?,
        disabled: r.get::<_, i64>(3)? != 0,
        created: r.get(4)?,
        limits: Limits {
            max_job_bytes: opt(5)?,
            max_waiting: opt(6)?,
            max_stored_bytes: opt(7)?,
            max_per_hour: opt(8)?,
            retention_days: opt(9)?,
        },
    })
}

const ACCOUNT_COLUMNS: &str =
    "id, name, token_hash, disabled, created, max_job_bytes, max_waiting, max_stored_bytes, max_per_hour, retention_days";

pub fn add_account(conn: &Connection, name: &str, token_hash: &[u8]) -> Result<Account, DbError> {
    check_account_name(name)?;
    if account_by_name(conn, name)?.is_some() {
        return Err(DbError::AccountExists(name.to_owned()));
    }
    conn.execute(
        "INSERT INTO accounts (name, token_hash, created) VALUES (?1, ?2, ?3)",
        params![name, token_hash, now()],
    )?;
    audit(conn, Some(name), "account_added", "")?;
    account_by_name(conn, name)?.ok_or_else(|| DbError::NoAccount(name.to_owned()))
}

pub fn account_by_name(conn: &Connection, name: &str) -> Result<Option<Account>, DbError> {
    Ok(conn
        .query_row(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE name = ?1"), [name], account_from_row)
        .optional()?)
}

pub fn account_by_id(conn: &Connection, id: i64) -> Result<Option<Account>, DbError> {
    Ok(conn
        .query_row(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ?1"), [id], account_from_row)
        .optional()?)
}

pub fn accounts(conn: &Connection) -> Result<Vec<Account>, DbError> {
    let mut stmt = conn.prepare(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY name"))?;
    let rows = stmt.query_map([], account_from_row)?.collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn set_disabled(conn: &Connection, name: &str, disabled: bool) -> Result<(), DbError> {
    let n = conn.execute("UPDATE accounts SET disabled = ?1 WHERE name = ?2", params![disabled as i64, name])?;
    if n == 0 {
        return Err(DbError::NoAccount(name.to_owned()));
    }
    audit(conn, Some(name), if disabled { "account_disabled" } else { "account_enabled" }, "")
}

pub fn set_token(conn: &Connection, name: &str, token_hash: &[u8]) -> Result<(), DbError> {
    let n = conn.execute("UPDATE accounts SET token_hash = ?1 WHERE name = ?2", params![token_hash, name])?;
    if n == 0 {
        return Err(DbError::NoAccount(name.to_owned()));
    }
    audit(conn, Some(name), "token_replaced", "")
}

/// Removes an account; its job records stay (with their files) for the audit.
pub fn remove_account(conn: &Connection, name: &str) -> Result<(), DbError> {
    let account = account_by_name(conn, name)?.ok_or_else(|| DbError::NoAccount(name.to_owned()))?;
    // The records keep their account id; the name is free again only for a new account.
    conn.execute(
        "UPDATE accounts SET disabled = 1, name = ?1, token_hash = x'' WHERE id = ?2",
        params![format!("removed-{}-{}", account.id, name), account.id],
    )?;
    audit(conn, Some(name), "account_removed", "")
}

pub fn set_limits(conn: &Connection, name: &str, l: &Limits) -> Result<(), DbError> {
    let v = |x: Option<u64>| x.map(|x| x as i64);
    let n = conn.execute(
        "UPDATE accounts SET max_job_bytes = ?1, max_waiting = ?2, max_stored_bytes = ?3, max_per_hour = ?4, retention_days = ?5 WHERE name = ?6",
        params![v(l.max_job_bytes), v(l.max_waiting), v(l.max_stored_bytes), v(l.max_per_hour), v(l.retention_days), name],
    )?;
    if n == 0 {
        return Err(DbError::NoAccount(name.to_owned()));
    }
    audit(conn, Some(name), "limits_set", &serde_json::to_string(l).unwrap_or_default())
}

pub fn audit(conn: &Connection, account: Option<&str>, action: &str, detail: &str) -> Result<(), DbError> {
    conn.execute(
        "INSERT INTO audit (time, account, action, detail) VALUES (?1, ?2, ?3, ?4)",
        params![now(), account, action, jobfile::sanitize(detail.as_bytes())],
    )?;
    Ok(())
}

/// One audit entry: time, account, action, detail.
pub type AuditEntry = (String, Option<String>, String, String);

/// The audit log, newest first.
pub fn audit_log(conn: &Connection, limit: usize) -> Result<Vec<AuditEntry>, DbError> {
    let mut stmt = conn.prepare("SELECT time, account, action, detail FROM audit ORDER BY id DESC LIMIT ?1")?;
    let rows = stmt.query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
    Ok(JobRecord {
        id: r.get(0)?,
        account_id: r.get(1)?,
        name: r.get(2)?,
        image: r.get(3)?,
        file_name: r.get(4)?,
        size: r.get::<_, i64>(5)? as u64,
        submitted: r.get(6)?,
        submitted_unix: r.get(7)?,
        state: r.get(8)?,
        updated: r.get(9)?,
        verdict: r.get(10)?,
        result_bytes: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
        deleted: r.get(12)?,
    })
}

const JOB_COLUMNS: &str =
    "id, account_id, name, image, file_name, size, submitted, submitted_unix, state, updated, verdict, result_bytes, deleted";

pub fn insert_job(conn: &Connection, j: &JobRecord) -> Result<(), DbError> {
    conn.execute(
        &format!("INSERT INTO jobs ({JOB_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"),
        params![
            j.id,
            j.account_id,
            j.name,
            j.image,
            j.file_name,
            j.size as i64,
            j.submitted,
            j.submitted_unix,
            j.state,
            j.updated,
            j.verdict,
            j.result_bytes.map(|v| v as i64),
            j.deleted
        ],
    )?;
    Ok(())
}

/// A job of `account_id`: another account's id is the same as no job.
pub fn job(conn: &Connection, account_id: i64, id: &str) -> Result<Option<JobRecord>, DbError> {
    Ok(conn
        .query_row(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1 AND account_id = ?2"),
            params![id, account_id],
            job_from_row,
        )
        .optional()?)
}

pub fn jobs_of(conn: &Connection, account_id: i64) -> Result<Vec<JobRecord>, DbError> {
    let mut stmt = conn
        .prepare(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE account_id = ?1 ORDER BY submitted_unix DESC, id"))?;
    let rows = stmt.query_map([account_id], job_from_row)?.collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn all_jobs(conn: &Connection) -> Result<Vec<JobRecord>, DbError> {
    let mut stmt = conn.prepare(&format!("SELECT {JOB_COLUMNS} FROM jobs ORDER BY submitted_unix, id"))?;
    let rows = stmt.query_map([], job_from_row)?.collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Records a job's state as the directories show it.
pub fn update_state(
    conn: &Connection,
    id: &str,
    state: &str,
    verdict: Option<&str>,
    result_bytes: Option<u64>,
) -> Result<(), DbError> {
    conn.execute(
        "UPDATE jobs SET state = ?1, updated = ?2, verdict = COALESCE(?3, verdict), result_bytes = COALESCE(?4, result_bytes) WHERE id = ?5 AND (state != ?1 OR verdict IS NOT ?3)",
        params![state, now(), verdict, result_bytes.map(|v| v as i64), id],
    )?;
    Ok(())
}

/// A job's recorded state.
pub fn state_of(conn: &Connection, id: &str) -> Result<Option<String>, DbError> {
    Ok(conn.query_row("SELECT state FROM jobs WHERE id = ?1", [id], |r| r.get(0)).optional()?)
}

pub fn mark_deleted(conn: &Connection, id: &str) -> Result<(), DbError> {
    conn.execute("UPDATE jobs SET deleted = ?1 WHERE id = ?2", params![now(), id])?;
    Ok(())
}

/// Jobs the account submitted since `since_unix`.
pub fn submitted_since(conn: &Connection, account_id: i64, since_unix: i64) -> Result<u64, DbError> {
    Ok(conn.query_row(
        "SELECT COUNT(*) FROM jobs WHERE account_id = ?1 AND submitted_unix >= ?2",
        params![account_id, since_unix],
        |r| r.get::<_, i64>(0),
    )? as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_are_added_found_limited_disabled_and_removed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let conn = open(&tmp.path().join("s.db")).expect("open");
        let a = add_account(&conn, "alice", b"hash").expect("add");
        assert!(matches!(add_account(&conn, "alice", b"x"), Err(DbError::AccountExists(_))));
        for bad in ["", "Alice", "1abc", "a b", &"a".repeat(33)] {
            assert!(matches!(add_account(&conn, bad, b"x"), Err(DbError::BadAccountName(_))), "{bad:?}");
        }
        let limits = Limits { max_waiting: Some(3), ..Limits::default() };
        set_limits(&conn, "alice", &limits).expect("limits");
        assert_eq!(account_by_id(&conn, a.id).expect("get").expect("some").limits, limits);
        set_disabled(&conn, "alice", true).expect("disable");
        assert!(account_by_name(&conn, "alice").expect("get").expect("some").disabled);
        remove_account(&conn, "alice").expect("remove");
        assert!(account_by_name(&conn, "alice").expect("get").is_none());
        add_account(&conn, "alice", b"new").expect("the name is free again");
        let actions: Vec<String> = audit_log(&conn, 10).expect("audit").into_iter().map(|r| r.2).collect();
        assert_eq!(actions, ["account_added", "account_removed", "account_disabled", "limits_set", "account_added"]);
        // Reopening applies no migration twice.
        drop(conn);
        let conn = open(&tmp.path().join("s.db")).expect("reopen");
        assert_eq!(accounts(&conn).expect("list").len(), 2);
    }
}
