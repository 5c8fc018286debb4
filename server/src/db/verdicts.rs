//! Verified rebuilds: the pair's second run, and the verdict recorded once
//! on the first run's row.

use super::jobs::{job_from_row, rebuild_text, JOB_COLUMNS};
use super::{DbError, JobRecord, JobState, RebuildRecord};
use crate::params;
use crate::sql::Database;

/// A verified rebuild's second run, by the first's id.
pub async fn twin(db: &Database, first: &str) -> Result<Option<JobRecord>, DbError> {
    let row = db
        .query_opt(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE twin_of = $1 AND state != $2"),
            params![first, JobState::Uploading.as_str()],
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
        let Some(mut record) = row.opt_json::<RebuildRecord>("rebuild")? else { return Ok(false) };
        if record.verdict.is_some() {
            return Ok(false);
        }
        record.verdict = Some(verdict.clone());
        tx.execute("UPDATE jobs SET rebuild = $1 WHERE id = $2", params![rebuild_text(Some(&record)), first]).await?;
        Ok(true)
    })
    .await
}

/// Records the pair of an upload under way again (its `SOURCE_DATE_EPOCH`,
/// known once the job file has arrived).
pub async fn set_rebuild(db: &Database, first: &str, record: &RebuildRecord) -> Result<(), DbError> {
    let text = rebuild_text(Some(record));
    db.execute("UPDATE jobs SET rebuild = $1 WHERE id = $2", params![text, first]).await?;
    Ok(())
}
