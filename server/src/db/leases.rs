//! Leases: a job handed to exactly one remote host at a time, fenced by a
//! sequence number, each decision in one transaction; and the deliveries
//! the database accepted.

use jobfile::deps::Resolution;
use serde::Serialize;

use super::audit::audit_in;
use super::jobs::{file_id, job_from_row, JOB_COLUMNS};
use super::{unix_ms, unix_now, DbError, JobRecord, RanOn};
use crate::params;
use crate::sql::{Database, Row, SqlError};
use crate::store::FileId;

/// How a lease ends: its job delivered, failed, or given back (not counted as an attempt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Done,
    Failed,
    Released,
}

impl Ending {
    /// As the `delivered_as` column and the audit log hold it.
    pub fn as_str(self) -> &'static str {
        match self {
            Ending::Done => "done",
            Ending::Failed => "failed",
            Ending::Released => "released",
        }
    }

    pub fn parse(text: &str) -> Option<Ending> {
        [Ending::Done, Ending::Failed, Ending::Released].into_iter().find(|e| e.as_str() == text)
    }
}

/// A job handed to a remote host until `expires_ms`; `seq` fences it: only
/// the holder of the newest lease of a job may renew it or deliver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lease {
    /// The job's id.
    pub id: String,
    /// The lease: its fencing number, which time the job is handed out, when it ends.
    pub seq: u64,
    pub attempt: u64,
    pub expires_ms: i64,
    /// The job file: its name and size.
    pub file_name: String,
    pub size: u64,
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

/// Jobs leased now: (host, job record).
pub async fn leased_jobs(db: &Database) -> Result<Vec<JobRecord>, DbError> {
    super::jobs::select_jobs(db, "lease_host IS NOT NULL ORDER BY lease_host, id", &[]).await
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
    let marks: Vec<String> = (0..images.len()).map(|i| format!("${}", i + 1)).collect();
    let waiting = format!(
        "FROM jobs WHERE lease_host IS NULL AND delivered_seq IS NULL AND deleted IS NULL
           AND state NOT IN ('done', 'failed', 'uploading') AND image IN ({})",
        marks.join(", ")
    );
    let params: Vec<crate::sql::Value> = images.iter().map(|i| i.as_str().into()).collect();
    // Nothing waiting (a host asking again and again while the queue is empty): a read, no write transaction.
    if db.query_opt(&format!("SELECT id {waiting} ORDER BY submitted_unix, id LIMIT 1"), &params).await?.is_none() {
        return Ok(None);
    }
    db.tx(async |tx| {
        // The 64 oldest, the first few alone: nearly always the oldest is taken, and each row read costs.
        let mut rows = Vec::new();
        for (limit, offset) in [(8, 0), (56, 8)] {
            let sql = format!(
                "SELECT id, file_name, size, lease_seq, attempts, file_ino, file_birth, packages, account_id, image, caches, submitted_unix
                 {waiting} ORDER BY submitted_unix, id LIMIT {limit} OFFSET {offset}{}",
                tx.skip_locked()
            );
            if offset > 0 && rows.len() < offset {
                break;
            }
            rows = tx.query(&sql, &params).await?;
            if let Some(lease) = lease_first(tx, host, lease_ms, &rows, &take).await? {
                return Ok(Some(lease));
            }
        }
        Ok(None)
    })
    .await
}

/// Leases `host` the first of `rows` (waiting jobs, oldest first) that `take` accepts.
async fn lease_first(
    tx: &mut crate::sql::Tx,
    host: &str,
    lease_ms: i64,
    rows: &[crate::sql::Row],
    take: &impl Fn(&Candidate) -> bool,
) -> Result<Option<Lease>, DbError> {
    for r in rows {
        let file_name = r.text("file_name")?;
        let ino = file_id(r)?;
        let candidate = Candidate {
            file_name: file_name.clone(),
            ino,
            account_id: r.int("account_id")?,
            image: r.text("image")?,
            caches: r.opt_json("caches")?.unwrap_or_default(),
            waited_secs: unix_now() - r.int("submitted_unix")?,
        };
        if !take(&candidate) {
            continue;
        }
        let (id, seq, attempt) = (r.text("id")?, r.count("lease_seq")? + 1, r.count("attempts")? + 1);
        let expires_ms = unix_ms() + lease_ms;
        tx.execute(
            "UPDATE jobs SET lease_host = $1, lease_seq = $2, lease_expires_ms = $3, attempts = $4 WHERE id = $5",
            params![host, seq, expires_ms, attempt, &id],
        )
        .await?;
        audit_in(tx, Some(host), "leased", &format!("{id} lease {seq}, attempt {attempt}")).await?;
        let packages = r.opt_json("packages")?;
        let (size, account_id) = (r.count("size")?, candidate.account_id);
        return Ok(Some(Lease { id, file_name, size, seq, attempt, expires_ms, ino, packages, account_id }));
    }
    Ok(None)
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
    Ok(row.map(|r| Ok::<_, SqlError>((r.text("file_name")?, file_id(&r)?))).transpose()?)
}

/// Extends a live lease; the job's file name, or `None` when the lease is expired or superseded.
pub async fn renew(db: &Database, id: &str, host: &str, seq: u64, lease_ms: i64) -> Result<Option<String>, DbError> {
    let now = unix_ms();
    let row = db.execute_returning(
        "UPDATE jobs SET lease_expires_ms = $1 WHERE id = $2 AND lease_host = $3 AND lease_seq = $4 AND lease_expires_ms > $5
         RETURNING file_name",
        params![now + lease_ms, id, host, seq, now],
    ).await?;
    Ok(row.map(|r| r.text("file_name")).transpose()?)
}

/// Ends a live lease with the job delivered (`done`) or failed, or given
/// back (`released`, not counted as an attempt). Exactly one caller can
/// succeed for a job: `false` for every expired or superseded lease.
pub async fn end_lease(
    db: &Database,
    id: &str,
    host: &str,
    seq: u64,
    how: Ending,
    verdict: &str,
    part: &str,
) -> Result<bool, DbError> {
    db.tx(async |tx| {
        let now = unix_ms();
        let n = if how == Ending::Released {
            tx.execute(
                "UPDATE jobs SET lease_host = NULL, lease_expires_ms = NULL, attempts = attempts - 1 WHERE id = $1 AND lease_host = $2 AND lease_seq = $3 AND lease_expires_ms > $4",
                params![id, host, seq, now],
            ).await?
        } else {
            tx.execute(
                "UPDATE jobs SET lease_host = NULL, lease_expires_ms = NULL, delivered_seq = $1, delivered_as = $2, verdict = $3, delivered_part = $7, ran_on = $8 WHERE id = $4 AND lease_host = $5 AND lease_seq = $1 AND lease_expires_ms > $6",
                params![seq, how.as_str(), verdict, id, host, now, part, RanOn::Remote(host.to_owned()).to_column()],
            ).await?
        };
        if n == 1 {
            audit_in(tx, Some(host), how.as_str(), &format!("{id} lease {seq}: {verdict}")).await?;
        }
        Ok(n == 1)
    }).await
}

/// A delivery the database has accepted: which lease, done or failed, and the verdict or reason.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub seq: u64,
    pub how: Ending,
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
    let delivered = delivered(&row, &job)?;
    Ok(Some((job, delivered)))
}

/// The delivery the database accepted for a job's row, if any.
fn delivered(row: &Row, job: &JobRecord) -> Result<Option<Delivered>, SqlError> {
    let how = row.opt_text("delivered_as")?;
    let how = how
        .as_deref()
        .map(|h| Ending::parse(h).ok_or_else(|| SqlError::Column("delivered_as".into(), format!("{h:?} is no ending"))))
        .transpose()?;
    Ok(match (row.opt_int("delivered_seq")?, how) {
        (Some(seq), Some(how)) => Some(Delivered {
            seq: seq.max(0) as u64,
            how,
            verdict: job.verdict.clone().unwrap_or_default(),
            part: row.opt_text("delivered_part")?.unwrap_or_default(),
        }),
        _ => None,
    })
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
