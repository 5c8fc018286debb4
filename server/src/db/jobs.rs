//! The `jobs` table: a job's record (who, when, image, sizes, its state as
//! the directories last showed it, its verdict), what it was given at
//! submit, and where it ran.

use jobfile::deps::Resolution;
use serde::Serialize;

use super::audit::audit_in;
#[cfg(test)]
use super::Account;
use super::{now, DbError, JobState};
use crate::params;
use crate::sql::{Database, Row, SqlError, Tx, Value};
use crate::store::FileId;

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
    pub state: JobState,
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
    /// The lookup key of a job whose result may be cached (`crate::result_cache`).
    #[serde(skip)]
    pub cache_lookup: Option<String>,
    /// What became of it for the result cache (`stored`, or why not).
    pub cache_note: Option<String>,
    /// Served from the result cache: whose result it is.
    pub from_cache: Option<wire::result_cache::CacheHit>,
}

impl JobRecord {
    /// A job's record as its upload starts: `account_id`'s job `id`,
    /// `name` on `image`, queued as `file_name`, submitted now, nothing
    /// else known yet.
    pub fn uploading(id: &str, account_id: i64, name: &str, image: &str, file_name: String) -> JobRecord {
        let now = now();
        JobRecord {
            id: id.to_owned(),
            account_id,
            name: name.to_owned(),
            image: image.to_owned(),
            file_name,
            size: 0,
            submitted: now.clone(),
            submitted_unix: super::unix_now(),
            state: JobState::Uploading,
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
            cache_lookup: None,
            cache_note: None,
            from_cache: None,
        }
    }
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

pub(super) fn job_from_row(r: &Row) -> Result<JobRecord, SqlError> {
    let state = r.text("state")?;
    Ok(JobRecord {
        id: r.text("id")?,
        account_id: r.int("account_id")?,
        name: r.text("name")?,
        image: r.text("image")?,
        file_name: r.text("file_name")?,
        size: r.count("size")?,
        submitted: r.text("submitted")?,
        submitted_unix: r.int("submitted_unix")?,
        state: JobState::parse(&state)
            .ok_or_else(|| SqlError::Column("state".into(), format!("{state:?} is no job state")))?,
        updated: r.text("updated")?,
        verdict: r.opt_text("verdict")?,
        result_bytes: r.opt_int("result_bytes")?.map(|v| v.max(0) as u64),
        deleted: r.opt_text("deleted")?,
        host: r.opt_text("host")?,
        attempts: r.count("attempts")?,
        file_id: file_id(r)?,
        packages: r.opt_json("packages")?,
        caches: r.opt_json("caches")?.unwrap_or_default(),
        twin_of: r.opt_text("twin_of")?,
        rebuild: r.opt_json("rebuild")?,
        ran_on: r.opt_text("ran_on")?.as_deref().and_then(RanOn::from_column),
        file_sha256: r.opt_text("file_sha256")?,
        cache_lookup: r.opt_text("cache_lookup")?,
        cache_note: r.opt_text("cache_note")?,
        from_cache: r.opt_json("from_cache")?,
    })
}

/// The job file the server wrote, from the `file_ino` and `file_birth` columns.
pub(super) fn file_id(r: &Row) -> Result<Option<FileId>, SqlError> {
    Ok(r.opt_int("file_ino")?.map(|ino| FileId { ino: ino as u64, birth_ns: r.opt_int("file_birth").ok().flatten() }))
}

/// The rebuild column as it holds a pair (NULL for none).
pub(super) fn rebuild_text(rebuild: Option<&RebuildRecord>) -> Option<String> {
    rebuild.map(|r| serde_json::to_string(r).expect("a RebuildRecord always serializes"))
}

/// The caches as the column holds them (NULL for none).
pub(super) fn caches_text(caches: &[String]) -> Option<String> {
    (!caches.is_empty()).then(|| serde_json::to_string(caches).expect("names always serialize"))
}

/// The packages as the column holds them.
pub(super) fn packages_text(packages: Option<&Resolution>) -> Option<String> {
    packages.map(|p| serde_json::to_string(p).expect("a Resolution always serializes"))
}

/// A job's host is its remote host's (the lease's) or the Slurm node's that runs it.
pub(super) const JOB_COLUMNS: &str = "id, account_id, name, image, file_name, size, submitted, submitted_unix, state, updated, verdict, result_bytes, deleted, COALESCE(lease_host, (SELECT node FROM slurm_runs WHERE slurm_runs.job_id = jobs.id)) AS host, attempts, file_ino, file_birth, packages, caches, twin_of, rebuild, ran_on, file_sha256, cache_lookup, cache_note, from_cache";

pub async fn insert_job(db: &Database, j: &JobRecord) -> Result<(), DbError> {
    db.tx(async |tx| insert_in(tx, j).await).await
}

/// Inserts the record `j` in the transaction `tx`.
pub(super) async fn insert_in(tx: &mut Tx, j: &JobRecord) -> Result<(), DbError> {
    tx.execute(
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
            j.state.as_str(),
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
    let condition = "id = $1 AND account_id = $2 AND state != $3 AND twin_of IS NULL";
    select_one(db, condition, params![id, account_id, JobState::Uploading.as_str()]).await
}

/// A job by its file name in the queue's directories.
pub async fn job_by_file(db: &Database, file_name: &str) -> Result<Option<JobRecord>, DbError> {
    select_one(db, "file_name = $1 AND state != $2", params![file_name, JobState::Uploading.as_str()]).await
}

pub async fn jobs_of(db: &Database, account_id: i64) -> Result<Vec<JobRecord>, DbError> {
    let condition = "account_id = $1 AND state != $2 AND twin_of IS NULL ORDER BY submitted_unix DESC, id";
    select_jobs(db, condition, params![account_id, JobState::Uploading.as_str()]).await
}

pub async fn all_jobs(db: &Database) -> Result<Vec<JobRecord>, DbError> {
    select_jobs(db, "state != $1 ORDER BY submitted_unix, id", params![JobState::Uploading.as_str()]).await
}

/// The jobs the follow loop brings up to date, oldest first: those that
/// have not ended, and the verified rebuilds still waiting for their
/// verdict with their second runs. A job that ended is final (a request
/// about it still reads it again), so a server with a long history does not
/// read it all again every round.
pub async fn jobs_to_follow(db: &Database) -> Result<Vec<JobRecord>, DbError> {
    let (waiting, running, missing) =
        (JobState::Waiting.as_str(), JobState::Running.as_str(), JobState::Missing.as_str());
    let condition = "state IN ($1, $2, $3) OR (rebuild IS NOT NULL AND state != $4)";
    let mut jobs = select_jobs(db, condition, params![waiting, running, missing, JobState::Uploading.as_str()]).await?;
    jobs.retain(|j| !j.state.ended() || j.rebuild.as_ref().is_some_and(|r| r.verdict.is_none()));
    let twins: Vec<String> = jobs.iter().filter_map(|j| j.rebuild.as_ref()).map(|r| r.twin.clone()).collect();
    for twin in twins {
        if !jobs.iter().any(|j| j.id == twin) {
            jobs.extend(job_by_id(db, &twin).await?);
        }
    }
    jobs.sort_by(|a, b| (a.submitted_unix, &a.id).cmp(&(b.submitted_unix, &b.id)));
    Ok(jobs)
}

/// The jobs recorded as waiting, oldest first (the Slurm dispatcher's
/// candidates), without reading the jobs that ended.
pub async fn waiting_jobs(db: &Database) -> Result<Vec<JobRecord>, DbError> {
    select_jobs(db, "state = $1 ORDER BY submitted_unix, id", params![JobState::Waiting.as_str()]).await
}

/// The jobs that ended and whose files are kept, submitted before `unix`:
/// the only ones retention may clear.
pub async fn ended_before(db: &Database, unix: i64) -> Result<Vec<JobRecord>, DbError> {
    let condition = "submitted_unix < $1 AND state IN ($2, $3) AND deleted IS NULL ORDER BY submitted_unix, id";
    select_jobs(db, condition, params![unix, JobState::Done.as_str(), JobState::Failed.as_str()]).await
}

/// A job by its id, whichever account's.
pub async fn job_by_id(db: &Database, id: &str) -> Result<Option<JobRecord>, DbError> {
    select_one(db, "id = $1 AND state != $2", params![id, JobState::Uploading.as_str()]).await
}

/// The records of the jobs matching `condition` (SQL after `WHERE`, ordering included), with its parameters.
pub(super) async fn select_jobs(db: &Database, condition: &str, params: &[Value]) -> Result<Vec<JobRecord>, DbError> {
    let rows = db.query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE {condition}"), params).await?;
    Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
}

/// The one job matching `condition` (a unique key), if any.
async fn select_one(db: &Database, condition: &str, params: &[Value]) -> Result<Option<JobRecord>, DbError> {
    let row = db.query_opt(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE {condition}"), params).await?;
    Ok(row.as_ref().map(job_from_row).transpose()?)
}

/// Records a job's state as the directories show it, and audits the change;
/// nothing when the record says so already. Returns the state it had.
pub async fn update_state(
    db: &Database,
    id: &str,
    state: JobState,
    verdict: Option<&str>,
    result_bytes: Option<u64>,
) -> Result<Option<String>, DbError> {
    db.tx(async |tx| {
        let before = tx.query_opt("SELECT state FROM jobs WHERE id = $1", params![id]).await?.map(|r| r.text("state")).transpose()?;
        let changed = tx.execute(
            "UPDATE jobs SET state = $1, updated = $2, verdict = COALESCE($3, verdict), result_bytes = COALESCE($4, result_bytes) WHERE id = $5 AND state != $6 AND (state != $1 OR verdict IS DISTINCT FROM $3)",
            params![state.as_str(), now(), verdict, result_bytes, id, JobState::Uploading.as_str()],
        ).await?;
        if changed > 0 && before.as_deref() != Some(state.as_str()) {
            let change = format!("{id} {} -> {state}", before.as_deref().unwrap_or("?"));
            audit_in(tx, None, "state", &change).await?;
        }
        Ok(before)
    }).await
}

/// A job's recorded state.
pub async fn state_of(db: &Database, id: &str) -> Result<Option<JobState>, DbError> {
    let row = db.query_opt("SELECT state FROM jobs WHERE id = $1", params![id]).await?;
    Ok(row.map(|r| r.text("state")).transpose()?.as_deref().and_then(JobState::parse))
}

pub async fn mark_deleted(db: &Database, id: &str) -> Result<(), DbError> {
    db.execute("UPDATE jobs SET deleted = $1 WHERE id = $2", params![now(), id]).await?;
    Ok(())
}

/// Records the host a run ended on (a Slurm node, once Slurm named it).
pub async fn set_ran_on(db: &Database, id: &str, ran_on: &RanOn) -> Result<(), DbError> {
    db.execute("UPDATE jobs SET ran_on = $1 WHERE id = $2", params![ran_on.to_column(), id]).await?;
    Ok(())
}

/// A job record as tests make them: `account`'s job `id`, named `name`, on
/// image 0, in `state`, its file `<account>.<id>.<name>_i0.tar.xz`.
#[cfg(test)]
pub(crate) fn test_record(account: &Account, id: &str, name: &str, size: u64, state: JobState) -> JobRecord {
    let file_name = format!("{}.{id}.{name}_i0.tar.xz", account.name);
    JobRecord { size, state, ..JobRecord::uploading(id, account.id, name, "0", file_name) }
}
