//! The server's state in its database (SQLite, or PostgreSQL for a farm
//! that runs one): accounts (with the hash of their token, their kind and
//! limits), job records (who, when, image, sizes, state changes, verdict,
//! and the lease of the remote host running it), the remote hosts, and an
//! audit log. Job files stay in the queue's directories; a job's state
//! follows what they say (`rebuild` makes the records agree with them),
//! while leases, which hand a job to exactly one remote host, are decided
//! here, each in one transaction.

use std::time::SystemTime;

use serde::Serialize;
use thiserror::Error;

use crate::params;
use crate::sql::{Database, Row, SqlError, Tx};
use crate::store::FileId;
use jobfile::deps::Resolution;

#[derive(Debug, Error)]
pub enum DbError {
    #[error("cannot open the database {path}")]
    Open { path: String, source: SqlError },
    #[error("database error")]
    Sql(#[from] SqlError),
    #[error("no account named {0:?}")]
    NoAccount(String),
    #[error("an account named {0:?} exists already")]
    AccountExists(String),
    #[error("{0:?} is not an account name: use 1 to 32 of a-z 0-9 _ -, starting with a letter")]
    BadAccountName(String),
    /// The job store's directories, where a step needs both (the Slurm executor's).
    #[error("the job store")]
    Io(#[source] std::io::Error),
}

/// The state of a job whose upload is under way: its row holds the bytes
/// reserved for it, and nothing else sees it (no list, no lease, no refresh).
pub const UPLOADING: &str = "uploading";

/// An account's limits; `None` means the server-wide default.
pub use wire::Limits;

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Submits jobs and reads its own.
    Submitter,
    /// A build host: takes work, never submits or reads jobs.
    Host,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Submitter => "submitter",
            Kind::Host => "host",
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
    pub kind: Kind,
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
    /// The remote host that holds its lease now.
    pub host: Option<String>,
    /// Times a remote host was handed it.
    pub attempts: u64,
    /// The inode of the job file the server wrote (none for records made
    /// before it was kept).
    #[serde(skip)]
    pub file_id: Option<FileId>,
    /// The packages resolved at submit, which every host installs exactly.
    pub packages: Option<Resolution>,
    /// The build caches its declaration names.
    pub caches: Vec<String>,
    /// A verified rebuild's second run: the id of the job it repeats.
    pub twin_of: Option<String>,
    /// A verified rebuild's first run: the pair.
    pub rebuild: Option<RebuildRecord>,
    /// The host the server recorded for its run, when not a local host's.
    #[serde(skip)]
    pub ran_on: Option<RanOn>,
    /// The job file's sha256 as the server received it (none for records
    /// made before it was kept).
    #[serde(skip)]
    pub file_sha256: Option<String>,
}

/// The host the server itself recorded for a run (never what a result
/// says of itself): the remote host whose lease delivered it, or the node
/// Slurm ran it on. A local host's run has none: local hosts share the
/// server's directories, and their results are bound to the local key
/// that signed them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RanOn {
    Remote(String),
    Slurm(String),
}

impl RanOn {
    /// As the `ran_on` column holds it.
    pub fn to_column(&self) -> String {
        match self {
            RanOn::Remote(h) => format!("remote:{h}"),
            RanOn::Slurm(n) => format!("slurm:{n}"),
        }
    }

    pub fn from_column(text: &str) -> Option<RanOn> {
        match text.split_once(':')? {
            ("remote", h) => Some(RanOn::Remote(h.to_owned())),
            ("slurm", n) => Some(RanOn::Slurm(n.to_owned())),
            _ => None,
        }
    }

    /// The host's name as `GET /v1/hosts/keys` lists it.
    pub fn key_owner(&self) -> String {
        match self {
            RanOn::Remote(h) => h.clone(),
            RanOn::Slurm(n) => format!("{n} (slurm)"),
        }
    }

    /// The name its results are signed as (`construir-host:<name>`).
    pub fn name(&self) -> &str {
        match self {
            RanOn::Remote(h) | RanOn::Slurm(h) => h,
        }
    }
}

/// What a verified rebuild's first run records of the pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RebuildRecord {
    /// The second run's job id.
    pub twin: String,
    /// `SOURCE_DATE_EPOCH` in both runs.
    pub epoch: u64,
    /// The comparison, once both runs have ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<wire::RebuildVerdict>,
}

pub fn now() -> String {
    jobfile::status::rfc3339(SystemTime::now())
}

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

pub fn unix_ms() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Opens the database `spec` (an SQLite file, created when missing, or a
/// `postgresql://` URL) and applies the migrations it lacks.
pub async fn open(spec: &str) -> Result<Database, DbError> {
    let opened =
        if crate::sql::is_postgres(spec) { Database::postgres(spec).await } else { Database::sqlite(spec).await };
    let db = opened.map_err(|source| DbError::Open { path: redact(spec), source })?;
    db.migrate().await.map_err(|source| DbError::Open { path: redact(spec), source })?;
    Ok(db)
}

/// A database URL without its password, for messages.
fn redact(spec: &str) -> String {
    match (spec.find("://"), spec.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let user = &spec[s + 3..at];
            let user = user.split(':').next().unwrap_or("");
            format!("{}{user}{}", &spec[..s + 3], &spec[at..])
        }
        _ => spec.to_owned(),
    }
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

fn account_from_row(r: &Row) -> Result<Account, SqlError> {
    let opt = |i: usize| r.opt_int(i).map(|v| v.map(|v| v as u64));
    Ok(Account {
        id: r.int(0)?,
        name: r.text(1)?,
        token_hash: r.bytes(2)?,
        disabled: r.int(3)? != 0,
        created: r.text(4)?,
        limits: Limits {
            max_job_bytes: opt(5)?,
            max_waiting: opt(6)?,
            max_stored_bytes: opt(7)?,
            max_per_hour: opt(8)?,
            retention_days: opt(9)?,
        },
        kind: if r.text(10)? == "host" { Kind::Host } else { Kind::Submitter },
    })
}

const ACCOUNT_COLUMNS: &str =
    "id, name, token_hash, disabled, created, max_job_bytes, max_waiting, max_stored_bytes, max_per_hour, retention_days, kind";

pub async fn add_account(db: &Database, name: &str, kind: Kind, token_hash: &[u8]) -> Result<Account, DbError> {
    check_account_name(name)?;
    db.tx(async |tx| {
        if tx.query_opt("SELECT id FROM accounts WHERE name = $1", params![name]).await?.is_some() {
            return Err(DbError::AccountExists(name.to_owned()));
        }
        tx.execute(
            "INSERT INTO accounts (name, token_hash, created, kind) VALUES ($1, $2, $3, $4)",
            params![name, token_hash, now(), kind.name()],
        )
        .await?;
        audit_in(tx, Some(name), if kind == Kind::Host { "host_account_added" } else { "account_added" }, "").await
    })
    .await?;
    account_by_name(db, name).await?.ok_or_else(|| DbError::NoAccount(name.to_owned()))
}

pub async fn account_by_name(db: &Database, name: &str) -> Result<Option<Account>, DbError> {
    let row = db.query_opt(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE name = $1"), params![name]).await?;
    Ok(row.as_ref().map(account_from_row).transpose()?)
}

pub async fn account_by_id(db: &Database, id: i64) -> Result<Option<Account>, DbError> {
    let row = db.query_opt(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1"), params![id]).await?;
    Ok(row.as_ref().map(account_from_row).transpose()?)
}

pub async fn accounts(db: &Database) -> Result<Vec<Account>, DbError> {
    let rows = db.query(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY name"), &[]).await?;
    Ok(rows.iter().map(account_from_row).collect::<Result<_, _>>()?)
}

async fn update_account(
    db: &Database,
    name: &str,
    sql: &str,
    params: &[crate::sql::Value],
    action: &str,
    detail: &str,
) -> Result<(), DbError> {
    db.tx(async |tx| {
        if tx.execute(sql, params).await? == 0 {
            return Err(DbError::NoAccount(name.to_owned()));
        }
        audit_in(tx, Some(name), action, detail).await
    })
    .await
}

pub async fn set_disabled(db: &Database, name: &str, disabled: bool) -> Result<(), DbError> {
    let action = if disabled { "account_disabled" } else { "account_enabled" };
    update_account(db, name, "UPDATE accounts SET disabled = $1 WHERE name = $2", params![disabled, name], action, "")
        .await
}

pub async fn set_token(db: &Database, name: &str, token_hash: &[u8]) -> Result<(), DbError> {
    update_account(
        db,
        name,
        "UPDATE accounts SET token_hash = $1 WHERE name = $2",
        params![token_hash, name],
        "token_replaced",
        "",
    )
    .await
}

/// Removes an account; its job records stay (with their files) for the audit.
pub async fn remove_account(db: &Database, name: &str) -> Result<(), DbError> {
    let account = account_by_name(db, name).await?.ok_or_else(|| DbError::NoAccount(name.to_owned()))?;
    // The records keep their account id; the name is free again only for a new account.
    update_account(
        db,
        name,
        "UPDATE accounts SET disabled = 1, name = $1, token_hash = $2 WHERE id = $3",
        params![format!("removed-{}-{}", account.id, name), &b""[..], account.id],
        "account_removed",
        "",
    )
    .await
}

pub async fn set_limits(db: &Database, name: &str, l: &Limits) -> Result<(), DbError> {
    update_account(
        db,
        name,
        "UPDATE accounts SET max_job_bytes = $1, max_waiting = $2, max_stored_bytes = $3, max_per_hour = $4, retention_days = $5 WHERE name = $6",
        params![l.max_job_bytes, l.max_waiting, l.max_stored_bytes, l.max_per_hour, l.retention_days, name],
        "limits_set",
        &serde_json::to_string(l).unwrap_or_default(),
    ).await
}

pub async fn audit(db: &Database, account: Option<&str>, action: &str, detail: &str) -> Result<(), DbError> {
    db.tx(async |tx| audit_in(tx, account, action, detail).await).await
}

async fn audit_in(tx: &mut Tx, account: Option<&str>, action: &str, detail: &str) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO audit (time, account, action, detail) VALUES ($1, $2, $3, $4)",
        params![now(), account, action, jobfile::sanitize(detail.as_bytes())],
    )
    .await?;
    Ok(())
}

/// One audit entry: time, account, action, detail.
pub type AuditEntry = (String, Option<String>, String, String);

/// The audit log, newest first.
pub async fn audit_log(db: &Database, limit: usize) -> Result<Vec<AuditEntry>, DbError> {
    let rows = db
        .query("SELECT time, account, action, detail FROM audit ORDER BY id DESC LIMIT $1", params![limit as i64])
        .await?;
    Ok(rows
        .iter()
        .map(|r| Ok((r.text(0)?, r.opt_text(1)?, r.text(2)?, r.text(3)?)))
        .collect::<Result<_, SqlError>>()?)
}

fn job_from_row(r: &Row) -> Result<JobRecord, SqlError> {
    Ok(JobRecord {
        id: r.text(0)?,
        account_id: r.int(1)?,
        name: r.text(2)?,
        image: r.text(3)?,
        file_name: r.text(4)?,
        size: r.int(5)? as u64,
        submitted: r.text(6)?,
        submitted_unix: r.int(7)?,
        state: r.text(8)?,
        updated: r.text(9)?,
        verdict: r.opt_text(10)?,
        result_bytes: r.opt_int(11)?.map(|v| v as u64),
        deleted: r.opt_text(12)?,
        host: r.opt_text(13)?,
        attempts: r.int(14)? as u64,
        file_id: r.opt_int(15)?.map(|ino| FileId { ino: ino as u64, birth_ns: r.opt_int(16).ok().flatten() }),
        packages: packages_from(r, 17)?,
        caches: caches_from(r, 18)?,
        twin_of: r.opt_text(19)?,
        rebuild: r
            .opt_text(20)?
            .map(|t| serde_json::from_str(&t).map_err(|e| SqlError::Column(20, format!("not a rebuild: {e}"))))
            .transpose()?,
        ran_on: r.opt_text(21)?.as_deref().and_then(RanOn::from_column),
        file_sha256: r.opt_text(22)?,
    })
}

/// How many columns `JOB_COLUMNS` names (its commas outside parentheses, and one).
fn job_column_count() -> usize {
    let mut depth = 0i32;
    1 + JOB_COLUMNS
        .chars()
        .filter(|c| {
            depth += match c {
                '(' => 1,
                ')' => -1,
                _ => 0,
            };
            *c == ',' && depth == 0
        })
        .count()
}

/// The rebuild column as it holds a pair (NULL for none).
fn rebuild_text(rebuild: Option<&RebuildRecord>) -> Option<String> {
    rebuild.map(|r| serde_json::to_string(r).expect("a RebuildRecord always serializes"))
}

/// The packages column (`index`) of a row.
fn packages_from(r: &Row, index: usize) -> Result<Option<Resolution>, SqlError> {
    r.opt_text(index)?
        .map(|text| serde_json::from_str(&text).map_err(|e| SqlError::Column(index, format!("not a resolution: {e}"))))
        .transpose()
}

/// The caches column (`index`) of a row: a JSON list of names.
fn caches_from(r: &Row, index: usize) -> Result<Vec<String>, SqlError> {
    r.opt_text(index)?
        .map(|text| {
            serde_json::from_str(&text).map_err(|e| SqlError::Column(index, format!("not a list of names: {e}")))
        })
        .transpose()
        .map(Option::unwrap_or_default)
}

/// The caches as the column holds them (NULL for none).
fn caches_text(caches: &[String]) -> Option<String> {
    (!caches.is_empty()).then(|| serde_json::to_string(caches).expect("names always serialize"))
}

/// The packages as the column holds them.
fn packages_text(packages: Option<&Resolution>) -> Option<String> {
    packages.map(|p| serde_json::to_string(p).expect("a Resolution always serializes"))
}

/// A job's host is its remote host's (the lease's) or the Slurm node's that runs it.
const JOB_COLUMNS: &str = "id, account_id, name, image, file_name, size, submitted, submitted_unix, state, updated, verdict, result_bytes, deleted, COALESCE(lease_host, (SELECT node FROM slurm_runs WHERE slurm_runs.job_id = jobs.id)), attempts, file_ino, file_birth, packages, caches, twin_of, rebuild, ran_on, file_sha256";

pub async fn insert_job(db: &Database, j: &JobRecord) -> Result<(), DbError> {
    db.execute(
        "INSERT INTO jobs (id, account_id, name, image, file_name, size, submitted, submitted_unix, state, updated, verdict, result_bytes, deleted, file_ino, file_birth, packages, caches, twin_of, rebuild) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)",
        params![
            &j.id,
            j.account_id,
            &j.name,
            &j.image,
            &j.file_name,
            j.size,
            &j.submitted,
            j.submitted_unix,
            &j.state,
            &j.updated,
            j.verdict.clone(),
            j.result_bytes,
            j.deleted.clone(),
            j.file_id.map(|f| f.ino),
            j.file_id.and_then(|f| f.birth_ns),
            packages_text(j.packages.as_ref()),
            caches_text(&j.caches),
            j.twin_of.clone(),
            rebuild_text(j.rebuild.as_ref())
        ],
    ).await?;
    Ok(())
}

pub async fn delete_job(db: &Database, id: &str) -> Result<(), DbError> {
    db.execute("DELETE FROM jobs WHERE id = $1", params![id]).await?;
    Ok(())
}

/// A job of `account_id`: another account's id is the same as no job.
pub async fn job(db: &Database, account_id: i64, id: &str) -> Result<Option<JobRecord>, DbError> {
    let row = db
        .query_opt(
            &format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND account_id = $2 AND state != $3 AND twin_of IS NULL"
            ),
            params![id, account_id, UPLOADING],
        )
        .await?;
    Ok(row.as_ref().map(job_from_row).transpose()?)
}

/// A job by its file name in the queue's directories.
pub async fn job_by_file(db: &Database, file_name: &str) -> Result<Option<JobRecord>, DbError> {
    let row = db
        .query_opt(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE file_name = $1 AND state != $2"),
            params![file_name, UPLOADING],
        )
        .await?;
    Ok(row.as_ref().map(job_from_row).transpose()?)
}

pub async fn jobs_of(db: &Database, account_id: i64) -> Result<Vec<JobRecord>, DbError> {
    let rows = db
        .query(
            &format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE account_id = $1 AND state != $2 AND twin_of IS NULL ORDER BY submitted_unix DESC, id"
            ),
            params![account_id, UPLOADING],
        )
        .await?;
    Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
}

pub async fn all_jobs(db: &Database) -> Result<Vec<JobRecord>, DbError> {
    let rows = db
        .query(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE state != $1 ORDER BY submitted_unix, id"),
            params![UPLOADING],
        )
        .await?;
    Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
}

/// Records a job's state as the directories show it, and audits the change;
/// nothing when the record says so already. Returns the state it had.
pub async fn update_state(
    db: &Database,
    id: &str,
    state: &str,
    verdict: Option<&str>,
    result_bytes: Option<u64>,
) -> Result<Option<String>, DbError> {
    db.tx(async |tx| {
        let before = tx.query_opt("SELECT state FROM jobs WHERE id = $1", params![id]).await?.map(|r| r.text(0)).transpose()?;
        let changed = tx.execute(
            "UPDATE jobs SET state = $1, updated = $2, verdict = COALESCE($3, verdict), result_bytes = COALESCE($4, result_bytes) WHERE id = $5 AND state != $6 AND (state != $1 OR verdict IS DISTINCT FROM $3)",
            params![state, now(), verdict, result_bytes, id, UPLOADING],
        ).await?;
        if changed > 0 && before.as_deref() != Some(state) {
            let change = format!("{id} {} -> {state}", before.as_deref().unwrap_or("?"));
            audit_in(tx, None, "state", &change).await?;
        }
        Ok(before)
    }).await
}

/// A job's recorded state.
pub async fn state_of(db: &Database, id: &str) -> Result<Option<String>, DbError> {
    Ok(db.query_opt("SELECT state FROM jobs WHERE id = $1", params![id]).await?.map(|r| r.text(0)).transpose()?)
}

pub async fn mark_deleted(db: &Database, id: &str) -> Result<(), DbError> {
    db.execute("UPDATE jobs SET deleted = $1 WHERE id = $2", params![now(), id]).await?;
    Ok(())
}

/// What an account holds and does at the moment an upload starts, every
/// upload under way included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Jobs not finished (uploads under way included).
    pub unfinished: u64,
    /// Jobs submitted in the last hour (uploads under way included).
    pub last_hour: u64,
    /// Bytes its jobs hold (uploads under way: what they reserved).
    pub stored_bytes: u64,
    /// Its uploads under way.
    pub uploads: u64,
    /// Bytes every account's uploads under way reserved, server-wide.
    pub reserved_everywhere: u64,
}

/// Takes an upload's reservation: counts the account's usage and inserts
/// `record` (state `uploading`, `size` what `decide` allows it) in one
/// transaction that holds the account's row, so that uploads started
/// together are counted one after another, by every server sharing the
/// database. `finished` says from the directories whether a job has ended.
/// `decide` turns the usage into the bytes to reserve, or the refusal.
pub async fn reserve_upload<R>(
    db: &Database,
    record: &JobRecord,
    finished: impl Fn(&str) -> bool,
    decide: impl FnOnce(&Usage) -> Result<u64, R>,
) -> Result<Result<u64, R>, DbError> {
    db.tx(async |tx| {
        let lock = format!("SELECT id FROM accounts WHERE id = $1{}", tx.for_update());
        tx.query_opt(&lock, params![record.account_id]).await?.ok_or_else(|| DbError::NoAccount(record.account_id.to_string()))?;
        let hour_ago = unix_now() - 3600;
        let mut usage = Usage::default();
        let rows = tx.query(
            "SELECT file_name, state, size, submitted_unix FROM jobs WHERE account_id = $1 AND deleted IS NULL",
            params![record.account_id],
        ).await?;
        for r in rows {
            let (file_name, state, size) = (r.text(0)?, r.text(1)?, r.int(2)? as u64);
            let uploading = state == UPLOADING;
            usage.uploads += u64::from(uploading);
            usage.stored_bytes += size;
            usage.last_hour += u64::from(r.int(3)? >= hour_ago);
            usage.unfinished += u64::from(uploading || (state != "done" && state != "failed" && !finished(&file_name)));
        }
        let everywhere = tx.query_opt(
            "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM jobs WHERE state = $1",
            params![UPLOADING],
        ).await?;
        usage.reserved_everywhere = everywhere.map(|r| r.int(0)).transpose()?.unwrap_or(0) as u64;
        let bytes = match decide(&usage) {
            Ok(bytes) => bytes,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let mut reserved = record.clone();
        reserved.state = UPLOADING.to_owned();
        reserved.size = bytes;
        tx.execute(
            "INSERT INTO jobs (id, account_id, name, image, file_name, size, submitted, submitted_unix, state, updated, twin_of, rebuild) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            params![
                &reserved.id,
                reserved.account_id,
                &reserved.name,
                &reserved.image,
                &reserved.file_name,
                reserved.size,
                &reserved.submitted,
                reserved.submitted_unix,
                &reserved.state,
                &reserved.updated,
                reserved.twin_of.clone(),
                rebuild_text(reserved.rebuild.as_ref())
            ],
        ).await?;
        Ok(Ok(bytes))
    }).await
}

/// Ends an upload: its record takes the real size and the inode of the file
/// the server wrote, and becomes an ordinary waiting job. `false` when the
/// reservation is gone (removed as stale).
/// `true` also when the reservation was finished already with this same
/// file: the follow loop, seeing the part gone and the file in the queue
/// between the upload's rename and this, takes it for an upload whose
/// server died there and finishes it itself (`sweep_uploads`).
pub async fn finish_upload(
    db: &Database,
    id: &str,
    (size, sha256): (u64, &str),
    file: FileId,
    packages: Option<&Resolution>,
    caches: &[String],
) -> Result<bool, DbError> {
    let (packages, caches) = (packages_text(packages), caches_text(caches));
    db.tx(async |tx| {
        let finished = tx.execute(
            "UPDATE jobs SET size = $1, file_ino = $2, file_birth = $6, packages = $7, caches = $8, file_sha256 = $9, state = 'waiting', updated = $3 WHERE id = $4 AND state = $5",
            params![size, file.ino, now(), id, UPLOADING, file.birth_ns, packages.clone(), caches.clone(), sha256],
        ).await? == 1;
        if finished {
            return Ok(true);
        }
        let row = tx.query_opt("SELECT file_ino FROM jobs WHERE id = $1 AND state != $2", params![id, UPLOADING]).await?;
        Ok(row.map(|r| r.opt_int(0)).transpose()?.flatten() == Some(file.ino as i64))
    }).await
}

/// Drops an upload's reservation (it was refused, broke off, or died with a server).
pub async fn drop_upload(db: &Database, id: &str) -> Result<(), DbError> {
    db.execute("DELETE FROM jobs WHERE id = $1 AND state = $2", params![id, UPLOADING]).await?;
    Ok(())
}

/// The uploads under way, as (id, file name), for the sweep of dead ones.
pub async fn uploads(db: &Database) -> Result<Vec<(String, String)>, DbError> {
    let rows = db.query("SELECT id, file_name FROM jobs WHERE state = $1", params![UPLOADING]).await?;
    Ok(rows.iter().map(|r| Ok((r.text(0)?, r.text(1)?))).collect::<Result<_, SqlError>>()?)
}

/// Whether a job of this file name is recorded (uploads under way included).
pub async fn file_recorded(db: &Database, file_name: &str) -> Result<bool, DbError> {
    Ok(db.query_opt("SELECT id FROM jobs WHERE file_name = $1", params![file_name]).await?.is_some())
}

// ---- The farm: remote hosts and their leases ----

/// A job handed to a remote host until `expires_ms`; `seq` fences it: only
/// the holder of the newest lease of a job may renew it or deliver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lease {
    pub id: String,
    pub file_name: String,
    pub size: u64,
    pub seq: u64,
    pub attempt: u64,
    pub expires_ms: i64,
    /// The job file the server wrote.
    #[serde(skip)]
    pub ino: Option<FileId>,
    /// The packages pinned at submit.
    pub packages: Option<Resolution>,
    /// Its submitter's account: the owner of its build caches.
    pub account_id: i64,
}

/// A job that `lease_next` may hand out, for its caller to say whether this host should take it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub file_name: String,
    pub ino: Option<FileId>,
    pub account_id: i64,
    pub image: String,
    /// The build caches it names.
    pub caches: Vec<String>,
    /// How long it has waited since it was submitted.
    pub waited_secs: i64,
}

/// A remote host as it last said: its images, how many VMs it runs at once.
#[derive(Debug, Clone, Serialize)]
pub struct HostRecord {
    pub name: String,
    pub last_seen: String,
    #[serde(skip)]
    pub last_seen_unix: i64,
    pub images: serde_json::Value,
    pub capacity: u64,
    pub version: String,
    pub disabled: bool,
    /// The build caches it last said it holds.
    pub caches: Vec<wire::HeldCache>,
    /// The public key pinned for it (the first it signed with).
    pub key: Option<String>,
}

impl HostRecord {
    /// Seconds since it was last heard from.
    pub fn seen_secs_ago(&self) -> i64 {
        unix_now() - self.last_seen_unix
    }
}

/// Records that host `account_id` called, with what it has (`caches`: its held caches as JSON).
pub async fn host_seen(
    db: &Database,
    account_id: i64,
    images: &str,
    capacity: u64,
    version: &str,
    caches: &str,
) -> Result<(), DbError> {
    db.execute(
        "INSERT INTO hosts (account_id, last_seen, last_seen_unix, images, capacity, version, caches) VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (account_id) DO UPDATE SET last_seen = excluded.last_seen, last_seen_unix = excluded.last_seen_unix,
         images = excluded.images, capacity = excluded.capacity, version = excluded.version, caches = excluded.caches",
        params![account_id, now(), unix_now(), images, capacity, version, caches],
    ).await?;
    Ok(())
}

/// Records that host `host_id` was given a job with these build caches
/// (`owner`'s, on `image`): the caches it may say it holds.
pub async fn caches_given(
    db: &Database,
    host_id: i64,
    owner: &str,
    image: &str,
    names: &[String],
) -> Result<(), DbError> {
    for name in names {
        db.execute(
            "INSERT INTO host_caches (host_id, owner, image, name) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            params![host_id, owner, image, name.as_str()],
        )
        .await?;
    }
    Ok(())
}

/// The build caches host `host_id` was given jobs for: (owner, image, name).
pub async fn given_caches(
    db: &Database,
    host_id: i64,
) -> Result<std::collections::HashSet<(String, String, String)>, DbError> {
    let rows = db.query("SELECT owner, image, name FROM host_caches WHERE host_id = $1", params![host_id]).await?;
    Ok(rows.iter().map(|r| Ok((r.text(0)?, r.text(1)?, r.text(2)?))).collect::<Result<_, SqlError>>()?)
}

/// Pins `key` for host `account_id` when it has none yet; returns the key
/// pinned now (this one, or the one it had).
pub async fn pin_key(db: &Database, account: &Account, key: &str) -> Result<String, DbError> {
    db.tx(async |tx| {
        let pinned = tx
            .execute("UPDATE hosts SET key = $1 WHERE account_id = $2 AND key IS NULL", params![key, account.id])
            .await?;
        if pinned == 1 {
            audit_in(tx, Some(&account.name), "host_key_pinned", key).await?;
        }
        let row = tx.query_opt("SELECT key FROM hosts WHERE account_id = $1", params![account.id]).await?;
        Ok(row.map(|r| r.opt_text(0)).transpose()?.flatten().unwrap_or_default())
    })
    .await
}

/// The key pinned for host `account_id`.
pub async fn host_key(db: &Database, account_id: i64) -> Result<Option<String>, DbError> {
    let row = db.query_opt("SELECT key FROM hosts WHERE account_id = $1", params![account_id]).await?;
    Ok(row.map(|r| r.opt_text(0)).transpose()?.flatten())
}

/// Forgets the key pinned for host `name`: the next key it sends is pinned.
pub async fn unpin_key(db: &Database, name: &str) -> Result<(), DbError> {
    let account = account_by_name(db, name).await?.ok_or_else(|| DbError::NoAccount(name.to_owned()))?;
    db.tx(async |tx| {
        tx.execute("UPDATE hosts SET key = NULL WHERE account_id = $1", params![account.id]).await?;
        audit_in(tx, Some(name), "host_key_unpinned", "").await
    })
    .await
}

/// Records that host `account_id` was heard from (a renewal), keeping what it said last.
pub async fn host_touch(db: &Database, account_id: i64) -> Result<(), DbError> {
    db.execute(
        "UPDATE hosts SET last_seen = $1, last_seen_unix = $2 WHERE account_id = $3",
        params![now(), unix_now(), account_id],
    )
    .await?;
    Ok(())
}

pub async fn hosts(db: &Database) -> Result<Vec<HostRecord>, DbError> {
    let rows = db
        .query(
            "SELECT a.name, h.last_seen, h.last_seen_unix, h.images, h.capacity, h.version, a.disabled, h.caches, h.key
         FROM hosts h JOIN accounts a ON a.id = h.account_id ORDER BY a.name",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            Ok(HostRecord {
                name: r.text(0)?,
                last_seen: r.text(1)?,
                last_seen_unix: r.int(2)?,
                images: serde_json::from_str(&r.text(3)?).unwrap_or(serde_json::Value::Null),
                capacity: r.int(4)? as u64,
                version: r.text(5)?,
                disabled: r.int(6)? != 0,
                caches: r.opt_text(7)?.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default(),
                key: r.opt_text(8)?,
            })
        })
        .collect::<Result<_, SqlError>>()?)
}

/// Jobs leased now: (host, job record).
pub async fn leased_jobs(db: &Database) -> Result<Vec<JobRecord>, DbError> {
    let rows = db
        .query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE lease_host IS NOT NULL ORDER BY lease_host, id"), &[])
        .await?;
    Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
}

/// Hands `host` the oldest job for one of `images` that `take` accepts
/// (it is in the queue; no warmer host should have it), in one
/// transaction (rows another server holds are skipped).
pub async fn lease_next(
    db: &Database,
    host: &str,
    images: &[String],
    lease_ms: i64,
    take: impl Fn(&Candidate) -> bool,
) -> Result<Option<Lease>, DbError> {
    if images.is_empty() {
        return Ok(None);
    }
    db.tx(async |tx| {
        let marks: Vec<String> = (0..images.len()).map(|i| format!("${}", i + 1)).collect();
        let sql = format!(
            "SELECT id, file_name, size, lease_seq, attempts, file_ino, file_birth, packages, account_id, image, caches, submitted_unix FROM jobs
             WHERE lease_host IS NULL AND delivered_seq IS NULL AND deleted IS NULL
               AND state NOT IN ('done', 'failed', 'uploading') AND image IN ({})
             ORDER BY submitted_unix, id LIMIT 64{}",
            marks.join(", "),
            tx.skip_locked()
        );
        let params: Vec<crate::sql::Value> = images.iter().map(|i| i.as_str().into()).collect();
        for r in tx.query(&sql, &params).await? {
            let file_name = r.text(1)?;
            let ino = r.opt_int(5)?.map(|v| FileId { ino: v as u64, birth_ns: r.opt_int(6).ok().flatten() });
            let candidate = Candidate {
                file_name: file_name.clone(),
                ino,
                account_id: r.int(8)?,
                image: r.text(9)?,
                caches: caches_from(&r, 10)?,
                waited_secs: unix_now() - r.int(11)?,
            };
            if !take(&candidate) {
                continue;
            }
            let (id, seq, attempt) = (r.text(0)?, r.int(3)? as u64 + 1, r.int(4)? as u64 + 1);
            let expires_ms = unix_ms() + lease_ms;
            tx.execute(
                "UPDATE jobs SET lease_host = $1, lease_seq = $2, lease_expires_ms = $3, attempts = $4 WHERE id = $5",
                params![host, seq, expires_ms, attempt, &id],
            )
            .await?;
            audit_in(tx, Some(host), "leased", &format!("{id} lease {seq}, attempt {attempt}")).await?;
            let packages = packages_from(&r, 7)?;
            let (size, account_id) = (r.int(2)? as u64, candidate.account_id);
            return Ok(Some(Lease { id, file_name, size, seq, attempt, expires_ms, ino, packages, account_id }));
        }
        Ok(None)
    })
    .await
}

/// Takes back a lease whose job turned out not to be in the queue after all
/// (a local host claimed it, or its submitter cancelled it): no attempt counted.
pub async fn unlease(db: &Database, lease: &Lease) -> Result<(), DbError> {
    db.execute(
        "UPDATE jobs SET lease_host = NULL, lease_expires_ms = NULL, attempts = attempts - 1 WHERE id = $1 AND lease_seq = $2 AND lease_host IS NOT NULL",
        params![&lease.id, lease.seq],
    ).await?;
    Ok(())
}

/// The lease `seq` of job `id` as `host` holds it, unexpired: the job's file name and inode.
pub async fn live_lease(
    db: &Database,
    id: &str,
    host: &str,
    seq: u64,
) -> Result<Option<(String, Option<FileId>)>, DbError> {
    let row = db.query_opt(
        "SELECT file_name, file_ino, file_birth FROM jobs WHERE id = $1 AND lease_host = $2 AND lease_seq = $3 AND lease_expires_ms > $4",
        params![id, host, seq, unix_ms()],
    ).await?;
    let file = |r: &Row| -> Result<Option<FileId>, SqlError> {
        Ok(r.opt_int(1)?.map(|v| FileId { ino: v as u64, birth_ns: r.opt_int(2).ok().flatten() }))
    };
    Ok(row.map(|r| Ok::<_, SqlError>((r.text(0)?, file(&r)?))).transpose()?)
}

/// Extends a live lease; the job's file name, or `None` when the lease is expired or superseded.
pub async fn renew(db: &Database, id: &str, host: &str, seq: u64, lease_ms: i64) -> Result<Option<String>, DbError> {
    db.tx(async |tx| {
        let now = unix_ms();
        let n = tx.execute(
            "UPDATE jobs SET lease_expires_ms = $1 WHERE id = $2 AND lease_host = $3 AND lease_seq = $4 AND lease_expires_ms > $5",
            params![now + lease_ms, id, host, seq, now],
        ).await?;
        if n != 1 {
            return Ok(None);
        }
        Ok(tx.query_opt("SELECT file_name FROM jobs WHERE id = $1", params![id]).await?.map(|r| r.text(0)).transpose()?)
    }).await
}

/// Ends a live lease with the job delivered (`done`) or failed, or given
/// back (`released`, not counted as an attempt). Exactly one caller can
/// succeed for a job: `false` for every expired or superseded lease.
pub async fn end_lease(
    db: &Database,
    id: &str,
    host: &str,
    seq: u64,
    how: &str,
    verdict: &str,
    part: &str,
) -> Result<bool, DbError> {
    db.tx(async |tx| {
        let now = unix_ms();
        let n = if how == "released" {
            tx.execute(
                "UPDATE jobs SET lease_host = NULL, lease_expires_ms = NULL, attempts = attempts - 1 WHERE id = $1 AND lease_host = $2 AND lease_seq = $3 AND lease_expires_ms > $4",
                params![id, host, seq, now],
            ).await?
        } else {
            tx.execute(
                "UPDATE jobs SET lease_host = NULL, lease_expires_ms = NULL, delivered_seq = $1, delivered_as = $2, verdict = $3, delivered_part = $7, ran_on = $8 WHERE id = $4 AND lease_host = $5 AND lease_seq = $1 AND lease_expires_ms > $6",
                params![seq, how, verdict, id, host, now, part, RanOn::Remote(host.to_owned()).to_column()],
            ).await?
        };
        if n == 1 {
            audit_in(tx, Some(host), how, &format!("{id} lease {seq}: {verdict}")).await?;
        }
        Ok(n == 1)
    }).await
}

/// Records the host a run ended on (a Slurm node, once Slurm named it).
pub async fn set_ran_on(db: &Database, id: &str, ran_on: &RanOn) -> Result<(), DbError> {
    db.execute("UPDATE jobs SET ran_on = $1 WHERE id = $2", params![ran_on.to_column(), id]).await?;
    Ok(())
}

/// A delivery the database has accepted: which lease, done or failed, and the verdict or reason.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub seq: u64,
    pub how: String,
    pub verdict: String,
    /// The staging tag of the accepted delivery's parts.
    pub part: String,
}

/// What the database says of a job's farm side, for putting its files right after a crash.
pub async fn farm_state(db: &Database, file_name: &str) -> Result<Option<(JobRecord, Option<Delivered>)>, DbError> {
    farm_state_where(db, "file_name", file_name).await
}

/// `farm_state`, of the job with this id.
pub async fn farm_state_by_id(db: &Database, id: &str) -> Result<Option<(JobRecord, Option<Delivered>)>, DbError> {
    farm_state_where(db, "id", id).await
}

async fn farm_state_where(
    db: &Database,
    column: &'static str,
    value: &str,
) -> Result<Option<(JobRecord, Option<Delivered>)>, DbError> {
    let Some(row) = db
        .query_opt(
            &format!("SELECT {JOB_COLUMNS}, delivered_seq, delivered_as, delivered_part FROM jobs WHERE {column} = $1"),
            params![value],
        )
        .await?
    else {
        return Ok(None);
    };
    let job = job_from_row(&row)?;
    // The columns after JOB_COLUMNS.
    let n = job_column_count();
    let delivered = match (row.opt_int(n)?, row.opt_text(n + 1)?) {
        (Some(seq), Some(how)) => Some(Delivered {
            seq: seq as u64,
            how,
            verdict: job.verdict.clone().unwrap_or_default(),
            part: row.opt_text(n + 2)?.unwrap_or_default(),
        }),
        _ => None,
    };
    Ok(Some((job, delivered)))
}

/// Ends the leases that ran out (hosts killed or cut off): each job goes
/// back to the queue, or to failed/ after `max_attempts`. Returns the ended
/// leases, with whether the job failed; the caller moves the files.
pub async fn expire_leases(db: &Database, max_attempts: u64) -> Result<Vec<(JobRecord, bool)>, DbError> {
    db.tx(async |tx| {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE lease_host IS NOT NULL AND lease_expires_ms <= $1 ORDER BY id{}",
            tx.skip_locked()
        );
        let expired = tx.query(&sql, params![unix_ms()]).await?.iter().map(job_from_row).collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::new();
        for job in expired {
            let host = job.host.clone().unwrap_or_default();
            let give_up = job.attempts >= max_attempts;
            if give_up {
                let reason = lease_reason(&job, &host, max_attempts);
                tx.execute(
                    "UPDATE jobs SET lease_host = NULL, lease_expires_ms = NULL, delivered_seq = lease_seq, delivered_as = 'failed', verdict = $1 WHERE id = $2",
                    params![reason, &job.id],
                ).await?;
            } else {
                tx.execute("UPDATE jobs SET lease_host = NULL, lease_expires_ms = NULL WHERE id = $1", params![&job.id]).await?;
            }
            let what = if give_up { "failed" } else { "back in the queue" };
            audit_in(tx, Some(&host), "lease_expired", &format!("{} attempt {}: {what}", job.id, job.attempts)).await?;
            out.push((job, give_up));
        }
        Ok(out)
    }).await
}

/// Why a job whose hosts kept losing it failed.
pub fn lease_reason(job: &JobRecord, host: &str, max_attempts: u64) -> String {
    format!(
        "lost: the host running it stopped answering {} time(s) (the limit is {max_attempts}; last host {host}, its lease ran out)",
        job.attempts
    )
}

/// Gives every live lease at least `lease_ms` more: after a server restart,
/// hosts could not renew while it was down.
pub async fn extend_leases(db: &Database, lease_ms: i64) -> Result<u64, DbError> {
    Ok(db
        .execute(
            "UPDATE jobs SET lease_expires_ms = $1 WHERE lease_host IS NOT NULL AND lease_expires_ms < $1",
            params![unix_ms() + lease_ms],
        )
        .await?)
}

// ---- Build caches ----

/// Every account's cleared caches, as hosts read them: owner (`a<id>`) ->
/// cache name -> generation.
pub async fn cache_generations(db: &Database) -> Result<jobfile::caches::Generations, DbError> {
    let rows = db.query("SELECT account_id, name, generation FROM cache_generations", &[]).await?;
    let mut out = jobfile::caches::Generations::new();
    for r in &rows {
        let owner = jobfile::caches::account_owner(r.int(0)?);
        out.entry(owner).or_default().insert(r.text(1)?, r.int(2)? as u64);
    }
    Ok(out)
}

/// Clears `account`'s caches named `names`: raises each one's generation,
/// so that no host lends what they held again. Returns each name with its
/// new generation.
pub async fn clear_caches(db: &Database, account: &Account, names: &[String]) -> Result<Vec<(String, u64)>, DbError> {
    db.tx(async |tx| {
        let mut out = Vec::new();
        for name in names {
            tx.execute(
                "INSERT INTO cache_generations (account_id, name, generation) VALUES ($1, $2, 1)
                 ON CONFLICT (account_id, name) DO UPDATE SET generation = cache_generations.generation + 1",
                params![account.id, name],
            )
            .await?;
            let row = tx
                .query_opt(
                    "SELECT generation FROM cache_generations WHERE account_id = $1 AND name = $2",
                    params![account.id, name],
                )
                .await?;
            let generation = row.map(|r| r.int(0)).transpose()?.unwrap_or(0) as u64;
            out.push((name.clone(), generation));
        }
        let detail = out.iter().map(|(n, g)| format!("{n} (generation {g})")).collect::<Vec<_>>().join(", ");
        audit_in(tx, Some(&account.name), "caches_cleared", &detail).await?;
        Ok(out)
    })
    .await
}

/// A job record as tests make them: `account`'s job `id`, named `name`, on
/// image 0, in `state`, its file `<account>.<id>.<name>_i0.tar.xz`.
#[cfg(test)]
pub(crate) fn test_record(account: &Account, id: &str, name: &str, size: u64, state: &str) -> JobRecord {
    let now = now();
    JobRecord {
        id: id.into(),
        account_id: account.id,
        name: name.into(),
        image: "0".into(),
        file_name: format!("{}.{id}.{name}_i0.tar.xz", account.name),
        size,
        submitted: now.clone(),
        submitted_unix: unix_now(),
        state: state.into(),
        updated: now,
        verdict: None,
        result_bytes: None,
        deleted: None,
        host: None,
        attempts: 0,
        file_id: None,
        packages: None,
        caches: Vec::new(),
        twin_of: None,
        rebuild: None,
        ran_on: None,
        file_sha256: None,
    }
}

// ---- The Slurm executor ----

/// A job handed to Slurm: one row while it is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmRun {
    pub job_id: String,
    pub attempt: u64,
    /// Its attempt's directory on the shared directory.
    pub dir: String,
    /// Slurm's job id, once sbatch answered.
    pub slurm_id: Option<String>,
    /// Where it is, as shown for its host: the node, or that it is pending.
    pub node: Option<String>,
    pub cancel_sent: bool,
    pub started_unix: i64,
}

/// Records a job handed to Slurm (before sbatch: a crash in between leaves
/// the row, and the server finds the Slurm job by its name), counting the attempt.
pub async fn slurm_start(db: &Database, job_id: &str, attempt: u64, dir: &str) -> Result<(), DbError> {
    db.tx(async |tx| {
        tx.execute(
            "INSERT INTO slurm_runs (job_id, attempt, dir, started_unix) VALUES ($1, $2, $3, $4)",
            params![job_id, attempt, dir, unix_now()],
        )
        .await?;
        tx.execute("UPDATE jobs SET attempts = $1 WHERE id = $2", params![attempt, job_id]).await?;
        Ok(())
    })
    .await
}

/// Notes what Slurm said of a run: its id, where it is.
pub async fn slurm_update(
    db: &Database,
    job_id: &str,
    slurm_id: Option<&str>,
    node: Option<&str>,
) -> Result<(), DbError> {
    db.execute(
        "UPDATE slurm_runs SET slurm_id = COALESCE($1, slurm_id), node = COALESCE($2, node) WHERE job_id = $3",
        params![slurm_id, node, job_id],
    )
    .await?;
    Ok(())
}

pub async fn slurm_cancel_sent(db: &Database, job_id: &str) -> Result<(), DbError> {
    db.execute("UPDATE slurm_runs SET cancel_sent = 1 WHERE job_id = $1", params![job_id]).await?;
    Ok(())
}

/// The run's row is gone: it ended, went back to the queue, or failed.
pub async fn slurm_end(db: &Database, job_id: &str) -> Result<(), DbError> {
    db.execute("DELETE FROM slurm_runs WHERE job_id = $1", params![job_id]).await?;
    Ok(())
}

/// A job Slurm did not take: its row goes, and its attempts are as they were (`attempts`).
pub async fn slurm_abandon(db: &Database, job_id: &str, attempts: u64) -> Result<(), DbError> {
    db.tx(async |tx| {
        tx.execute("DELETE FROM slurm_runs WHERE job_id = $1", params![job_id]).await?;
        tx.execute("UPDATE jobs SET attempts = $1 WHERE id = $2", params![attempts, job_id]).await?;
        Ok(())
    })
    .await
}

/// Every job in Slurm now, oldest first.
pub async fn slurm_runs(db: &Database) -> Result<Vec<SlurmRun>, DbError> {
    let rows = db
        .query(
            "SELECT job_id, attempt, dir, slurm_id, node, cancel_sent, started_unix FROM slurm_runs ORDER BY started_unix, job_id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            Ok(SlurmRun {
                job_id: r.text(0)?,
                attempt: r.int(1)? as u64,
                dir: r.text(2)?,
                slurm_id: r.opt_text(3)?,
                node: r.opt_text(4)?,
                cancel_sent: r.int(5)? != 0,
                started_unix: r.int(6)?,
            })
        })
        .collect::<Result<_, SqlError>>()?)
}

/// The key pinned for Slurm node `node`, pinning `key` when none is: the key returned.
pub async fn pin_node_key(db: &Database, node: &str, key: &str) -> Result<String, DbError> {
    db.tx(async |tx| {
        let lock = format!("SELECT key FROM slurm_nodes WHERE node = $1{}", tx.for_update());
        if let Some(row) = tx.query_opt(&lock, params![node]).await? {
            return Ok(row.text(0)?);
        }
        tx.execute("INSERT INTO slurm_nodes (node, key, pinned) VALUES ($1, $2, $3)", params![node, key, now()])
            .await?;
        Ok(key.to_owned())
    })
    .await
}

/// The Slurm nodes' pinned keys: (node, key).
pub async fn node_keys(db: &Database) -> Result<Vec<(String, String)>, DbError> {
    let rows = db.query("SELECT node, key FROM slurm_nodes ORDER BY node", &[]).await?;
    Ok(rows.iter().map(|r| Ok((r.text(0)?, r.text(1)?))).collect::<Result<_, SqlError>>()?)
}

/// Forgets a Slurm node's key (replaced on purpose): the next it signs with is pinned.
pub async fn unpin_node_key(db: &Database, node: &str) -> Result<bool, DbError> {
    Ok(db.execute("DELETE FROM slurm_nodes WHERE node = $1", params![node]).await? == 1)
}

/// A job by its id, whichever account's.
pub async fn job_by_id(db: &Database, id: &str) -> Result<Option<JobRecord>, DbError> {
    let row = db
        .query_opt(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND state != $2"), params![id, UPLOADING])
        .await?;
    Ok(row.as_ref().map(job_from_row).transpose()?)
}

/// A verified rebuild's second run, by the first's id.
pub async fn twin(db: &Database, first: &str) -> Result<Option<JobRecord>, DbError> {
    let row = db
        .query_opt(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE twin_of = $1 AND state != $2"),
            params![first, UPLOADING],
        )
        .await?;
    Ok(row.as_ref().map(job_from_row).transpose()?)
}

/// Records a verified rebuild's verdict on its first run, in one
/// transaction; `false` when a verdict was recorded already (by another
/// server sharing the database).
pub async fn set_rebuild_verdict(db: &Database, first: &str, verdict: &wire::RebuildVerdict) -> Result<bool, DbError> {
    db.tx(async |tx| {
        let lock = format!("SELECT rebuild FROM jobs WHERE id = $1{}", tx.for_update());
        let Some(row) = tx.query_opt(&lock, params![first]).await? else { return Ok(false) };
        let Some(text) = row.opt_text(0)? else { return Ok(false) };
        let mut record: RebuildRecord =
            serde_json::from_str(&text).map_err(|e| SqlError::Column(0, format!("not a rebuild: {e}")))?;
        if record.verdict.is_some() {
            return Ok(false);
        }
        record.verdict = Some(verdict.clone());
        tx.execute("UPDATE jobs SET rebuild = $1 WHERE id = $2", params![rebuild_text(Some(&record)), first]).await?;
        Ok(true)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_columns_are_counted_as_job_from_row_reads_them() {
        // job_from_row reads 0..=22; what farm_state reads comes after (the host column is a subquery with a comma).
        assert_eq!(job_column_count(), 23);
    }

    #[tokio::test]
    async fn accounts_are_added_found_limited_disabled_and_removed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let conn = open(&tmp.path().join("s.db").to_string_lossy()).await.expect("open");
        let a = add_account(&conn, "alice", Kind::Submitter, b"hash").await.expect("add");
        assert!(matches!(add_account(&conn, "alice", Kind::Submitter, b"x").await, Err(DbError::AccountExists(_))));
        for bad in ["", "Alice", "1abc", "a b", &"a".repeat(33)] {
            assert!(
                matches!(add_account(&conn, bad, Kind::Submitter, b"x").await, Err(DbError::BadAccountName(_))),
                "{bad:?}"
            );
        }
        let limits = Limits { max_waiting: Some(3), ..Limits::default() };
        set_limits(&conn, "alice", &limits).await.expect("limits");
        assert_eq!(account_by_id(&conn, a.id).await.expect("get").expect("some").limits, limits);
        set_disabled(&conn, "alice", true).await.expect("disable");
        assert!(account_by_name(&conn, "alice").await.expect("get").expect("some").disabled);
        remove_account(&conn, "alice").await.expect("remove");
        assert!(account_by_name(&conn, "alice").await.expect("get").is_none());
        add_account(&conn, "alice", Kind::Submitter, b"new").await.expect("the name is free again");
        let actions: Vec<String> = audit_log(&conn, 10).await.expect("audit").into_iter().map(|r| r.2).collect();
        assert_eq!(actions, ["account_added", "account_removed", "account_disabled", "limits_set", "account_added"]);
        // Reopening applies no migration twice.
        drop(conn);
        let conn = open(&tmp.path().join("s.db").to_string_lossy()).await.expect("reopen");
        assert_eq!(accounts(&conn).await.expect("list").len(), 2);
    }

    #[tokio::test]
    async fn an_upload_finished_by_the_follow_loop_first_is_still_the_uploads_own() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let db = open(&tmp.path().join("s.db").to_string_lossy()).await.expect("open");
        let alice = add_account(&db, "alice", Kind::Submitter, b"a").await.expect("add");
        let record = |id: &str| test_record(&alice, id, "j", 1 << 20, UPLOADING);
        let file = FileId { ino: 41, birth_ns: Some(7) };
        for id in ["0123456789abcdef", "1123456789abcdef"] {
            reserve_upload(&db, &record(id), |_| false, |_| Ok::<u64, ()>(1 << 20))
                .await
                .expect("reserve")
                .expect("admitted");
        }
        // The follow loop finishes it first (the part gone, the file in the queue) ...
        assert!(finish_upload(&db, "0123456789abcdef", (1 << 20, "ab"), file, None, &[]).await.expect("by the loop"));
        // ... and the upload's own finish then agrees, for the same file only.
        assert!(finish_upload(&db, "0123456789abcdef", (1 << 20, "ab"), file, None, &[]).await.expect("by the upload"));
        assert!(!finish_upload(
            &db,
            "0123456789abcdef",
            (1 << 20, "ab"),
            FileId { ino: 42, birth_ns: Some(7) },
            None,
            &[]
        )
        .await
        .expect("other"));
        assert_eq!(state_of(&db, "0123456789abcdef").await.expect("state").as_deref(), Some("waiting"));
        // A reservation dropped as cut off is gone for good.
        drop_upload(&db, "1123456789abcdef").await.expect("drop");
        assert!(!finish_upload(&db, "1123456789abcdef", (1 << 20, "ab"), file, None, &[]).await.expect("dropped"));
    }

    #[tokio::test]
    async fn the_packages_pinned_at_submit_are_in_the_record_and_go_with_the_lease() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let db = open(&tmp.path().join("s.db").to_string_lossy()).await.expect("open");
        let alice = add_account(&db, "alice", Kind::Submitter, b"a").await.expect("add");
        let pinned = Resolution {
            install: vec![jobfile::deps::Pinned {
                name: "pkgconf".into(),
                version: "1.8.1-1".into(),
                architecture: "amd64".into(),
                sha256: "c".repeat(64),
                size: 25892,
                filename: "pool/main/p/pkgconf/pkgconf_1.8.1-1_amd64.deb".into(),
            }],
            remove: vec!["pkg-config".into()],
        };
        for (id, packages) in [("0123456789abcdef", Some(&pinned)), ("1123456789abcdef", None)] {
            reserve_upload(
                &db,
                &test_record(&alice, id, "j", 1 << 20, UPLOADING),
                |_| false,
                |_| Ok::<u64, ()>(1 << 20),
            )
            .await
            .expect("reserve")
            .expect("admitted");
            let file = FileId { ino: 41, birth_ns: None };
            assert!(finish_upload(&db, id, (1 << 20, "ab"), file, packages, &[]).await.expect("finish"));
        }
        let first = job(&db, alice.id, "0123456789abcdef").await.expect("job").expect("some");
        assert_eq!(first.packages.as_ref(), Some(&pinned));
        let second = job(&db, alice.id, "1123456789abcdef").await.expect("job").expect("some");
        assert_eq!(second.packages, None);
        let lease = lease_next(&db, "h1", &["0".to_owned()], 60_000, |_| true).await.expect("lease").expect("one");
        assert_eq!((lease.id.as_str(), lease.packages.as_ref()), ("0123456789abcdef", Some(&pinned)));
        let lease = lease_next(&db, "h1", &["0".to_owned()], 60_000, |_| true).await.expect("lease").expect("one");
        assert_eq!((lease.id.as_str(), lease.packages), ("1123456789abcdef", None));
    }

    #[tokio::test]
    async fn caches_named_at_submit_go_to_the_lease_and_clearing_raises_each_generation() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let db = open(&tmp.path().join("s.db").to_string_lossy()).await.expect("open");
        let alice = add_account(&db, "alice", Kind::Submitter, b"a").await.expect("add");
        let bob = add_account(&db, "bob", Kind::Submitter, b"b").await.expect("add");
        let id = "0123456789abcdef";
        reserve_upload(&db, &test_record(&alice, id, "j", 1 << 20, UPLOADING), |_| false, |_| Ok::<u64, ()>(1 << 20))
            .await
            .expect("reserve")
            .expect("admitted");
        let caches = ["ccache".to_owned(), "cargo".to_owned()];
        assert!(finish_upload(&db, id, (1 << 20, "ab"), FileId { ino: 41, birth_ns: None }, None, &caches)
            .await
            .expect("finish"));
        assert_eq!(job(&db, alice.id, id).await.expect("job").expect("some").caches, caches);
        // The lease's candidate names them, with the account that owns them.
        let seen = std::sync::Mutex::new(Vec::new());
        let lease = lease_next(&db, "h1", &["0".to_owned()], 60_000, |c| {
            seen.lock().expect("lock").push((c.account_id, c.image.clone(), c.caches.clone()));
            true
        })
        .await
        .expect("lease")
        .expect("one");
        assert_eq!(lease.account_id, alice.id);
        assert_eq!(seen.into_inner().expect("lock"), [(alice.id, "0".to_owned(), caches.to_vec())]);
        // Clearing: each name's generation goes up by one, for that account only.
        assert!(cache_generations(&db).await.expect("generations").is_empty());
        let one = clear_caches(&db, &alice, &["ccache".to_owned()]).await.expect("clear");
        assert_eq!(one, [("ccache".to_owned(), 1)]);
        let two = clear_caches(&db, &alice, &caches).await.expect("clear");
        assert_eq!(two, [("ccache".to_owned(), 2), ("cargo".to_owned(), 1)]);
        clear_caches(&db, &bob, &["ccache".to_owned()]).await.expect("clear");
        let g = cache_generations(&db).await.expect("generations");
        let a = jobfile::caches::account_owner(alice.id);
        let b = jobfile::caches::account_owner(bob.id);
        assert_eq!(
            (jobfile::caches::generation(&g, &a, "ccache"), jobfile::caches::generation(&g, &a, "cargo")),
            (2, 1)
        );
        assert_eq!(jobfile::caches::generation(&g, &b, "ccache"), 1);
        assert_eq!(jobfile::caches::generation(&g, &b, "cargo"), 0);
        let log = audit_log(&db, 10).await.expect("audit");
        assert!(
            log.iter().any(|e| e.2 == "caches_cleared" && e.3 == "ccache (generation 2), cargo (generation 1)"),
            "{log:?}"
        );
        // What a host says it holds is kept with it.
        let held = vec![wire::HeldCache {
            owner: a.clone(),
            image: "0".into(),
            name: "ccache".into(),
            generation: 2,
            version: 3,
            bytes: 8192,
            used: now(),
        }];
        let h1 = add_account(&db, "h1", Kind::Host, b"h").await.expect("add");
        host_seen(&db, h1.id, "[]", 2, "0.1.0", &serde_json::to_string(&held).expect("json")).await.expect("seen");
        assert_eq!(hosts(&db).await.expect("hosts")[0].caches, held);
    }

    #[tokio::test]
    async fn a_lease_is_fenced_expires_back_to_the_queue_and_fails_past_the_attempt_limit() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let db = open(&tmp.path().join("s.db").to_string_lossy()).await.expect("open");
        let alice = add_account(&db, "alice", Kind::Submitter, b"a").await.expect("add");
        let job = test_record(&alice, "0123456789abcdef", "j", 1 << 20, "waiting");
        insert_job(&db, &job).await.expect("insert");
        let images = ["0".to_owned()];
        assert_eq!(
            lease_next(&db, "h1", &["7".to_owned()], 60_000, |_| true).await.expect("lease"),
            None,
            "no such image"
        );
        assert_eq!(lease_next(&db, "h1", &images, 60_000, |_| false).await.expect("lease"), None, "not in the queue");
        let first = lease_next(&db, "h1", &images, 60_000, |_| true).await.expect("lease").expect("a job");
        assert_eq!((first.seq, first.attempt), (1, 1));
        assert_eq!(lease_next(&db, "h2", &images, 60_000, |_| true).await.expect("lease"), None, "leased already");
        assert_eq!(renew(&db, &job.id, "h1", 1, 60_000).await.expect("renew").as_deref(), Some(job.file_name.as_str()));
        assert!(renew(&db, &job.id, "h2", 1, 60_000).await.expect("renew").is_none(), "another host");
        assert!(renew(&db, &job.id, "h1", 2, 60_000).await.expect("renew").is_none(), "another lease");
        // Run out: back to the queue, the attempt counted; the old lease is fenced off.
        db.execute("UPDATE jobs SET lease_expires_ms = 0", &[]).await.expect("expire");
        assert!(renew(&db, &job.id, "h1", 1, 60_000).await.expect("renew").is_none(), "expired");
        let expired = expire_leases(&db, 2).await.expect("expire");
        assert_eq!(expired.len(), 1);
        assert!(!expired[0].1, "one attempt of two: back in the queue");
        let second = lease_next(&db, "h2", &images, 60_000, |_| true).await.expect("lease").expect("again");
        assert_eq!((second.seq, second.attempt), (2, 2));
        assert!(
            !end_lease(&db, &job.id, "h1", 1, "done", "ok", "t").await.expect("end"),
            "the first host's late delivery"
        );
        assert!(end_lease(&db, &job.id, "h2", 2, "done", "ok", "t").await.expect("end"));
        assert!(!end_lease(&db, &job.id, "h2", 2, "done", "ok", "t").await.expect("end"), "delivered once");
        let (_, delivered) = farm_state(&db, &job.file_name).await.expect("state").expect("job");
        assert_eq!(delivered.map(|d| (d.seq, d.how)), Some((2, "done".to_owned())));
        assert_eq!(
            lease_next(&db, "h1", &images, 60_000, |_| true).await.expect("lease"),
            None,
            "delivered jobs stay delivered"
        );

        // Past the attempt limit, a lost job fails with the reason.
        let mut other = job.clone();
        other.id = "fedcba9876543210".into();
        other.file_name = "alice.fedcba9876543210.k_i0.tar.xz".into();
        insert_job(&db, &other).await.expect("insert");
        lease_next(&db, "h1", &images, 60_000, |_| true).await.expect("lease").expect("a job");
        db.execute("UPDATE jobs SET lease_expires_ms = 0", &[]).await.expect("expire");
        let expired = expire_leases(&db, 1).await.expect("expire");
        assert!(expired[0].1, "the limit reached");
        let (record, delivered) = farm_state(&db, &other.file_name).await.expect("state").expect("job");
        assert_eq!(delivered.map(|d| d.how), Some("failed".to_owned()));
        assert!(record.verdict.unwrap_or_default().contains("last host h1"));
    }
}
