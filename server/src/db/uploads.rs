//! Uploads under way: a job's row while its file arrives, holding the bytes
//! reserved for it, counted against its account's limits.

use jobfile::deps::Resolution;

use super::audit::audit_in;
use super::jobs::{caches_text, insert_in, packages_text};
use super::{now, unix_now, DbError, JobRecord, JobState};
use crate::params;
use crate::sql::{Database, SqlError, Tx};
use crate::store::FileId;

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
        tx.query_opt(&lock, params![record.account_id])
            .await?
            .ok_or_else(|| DbError::NoAccount(record.account_id.to_string()))?;
        let hour_ago = unix_now() - 3600;
        let mut usage = Usage::default();
        let rows = tx
            .query(
                "SELECT file_name, state, size, submitted_unix FROM jobs WHERE account_id = $1 AND deleted IS NULL",
                params![record.account_id],
            )
            .await?;
        for r in rows {
            let (file_name, size) = (r.text("file_name")?, r.count("size")?);
            let state = JobState::parse(&r.text("state")?);
            let uploading = state == Some(JobState::Uploading);
            usage.uploads += u64::from(uploading);
            usage.stored_bytes += size;
            usage.last_hour += u64::from(r.int("submitted_unix")? >= hour_ago);
            usage.unfinished += u64::from(uploading || (!state.is_some_and(JobState::ended) && !finished(&file_name)));
        }
        let everywhere = tx
            .query_opt(
                "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) AS reserved FROM jobs WHERE state = $1",
                params![JobState::Uploading.as_str()],
            )
            .await?;
        // Its entries in the result cache are its bytes too.
        let cached = tx
            .query_opt(
                "SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) AS cached FROM result_cache WHERE account_id = $1",
                params![record.account_id],
            )
            .await?;
        usage.stored_bytes += cached.map(|r| r.count("cached")).transpose()?.unwrap_or(0);
        usage.reserved_everywhere = everywhere.map(|r| r.count("reserved")).transpose()?.unwrap_or(0);
        let bytes = match decide(&usage) {
            Ok(bytes) => bytes,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let mut reserved = record.clone();
        reserved.state = JobState::Uploading;
        reserved.size = bytes;
        insert_in(tx, &reserved).await?;
        Ok(Ok(bytes))
    })
    .await
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
    db.tx(async |tx| finish_in(tx, id, (size, sha256), file, packages, caches).await).await
}

/// A submission's uploads (one job, or a verified rebuild's two runs, each
/// `(id, file)`) finished together, and `audit` (account, detail) recorded
/// as `submitted`, in one transaction. `false` when a reservation vanished.
pub async fn finish_submission(
    db: &Database,
    jobs: &[(&str, FileId)],
    size: (u64, &str),
    packages: Option<&Resolution>,
    caches: &[String],
    cache: Result<&str, &str>,
    (account, detail): (&str, &str),
) -> Result<bool, DbError> {
    db.tx(async |tx| {
        for (id, file) in jobs {
            if !finish_in(tx, id, size, *file, packages, caches).await? {
                return Ok(false);
            }
        }
        // The first run is the one whose result the cache may keep (`crate::result_cache`), or why not.
        if let Some((id, _)) = jobs.first() {
            let (lookup, note) = match cache {
                Ok(lookup) => (Some(lookup), None),
                Err(why) => (None, Some(format!("not stored: {why}"))),
            };
            tx.execute("UPDATE jobs SET cache_lookup = $1, cache_note = $2 WHERE id = $3", params![lookup, note, *id])
                .await?;
        }
        audit_in(tx, Some(account), "submitted", detail).await?;
        Ok(true)
    })
    .await
}

async fn finish_in(
    tx: &mut Tx,
    id: &str,
    (size, sha256): (u64, &str),
    file: FileId,
    packages: Option<&Resolution>,
    caches: &[String],
) -> Result<bool, DbError> {
    let (packages, caches) = (packages_text(packages), caches_text(caches));
    let finished = tx.execute(
        "UPDATE jobs SET size = $1, file_ino = $2, file_birth = $6, packages = $7, caches = $8, file_sha256 = $9, state = 'waiting', updated = $3 WHERE id = $4 AND state = $5",
        params![size, file.ino, now(), id, JobState::Uploading.as_str(), file.birth_ns, packages, caches, sha256],
    ).await? == 1;
    if finished {
        return Ok(true);
    }
    let row = tx
        .query_opt("SELECT file_ino FROM jobs WHERE id = $1 AND state != $2", params![id, JobState::Uploading.as_str()])
        .await?;
    Ok(row.map(|r| r.opt_int("file_ino")).transpose()?.flatten() == Some(file.ino as i64))
}

/// Drops an upload's reservation (it was refused, broke off, or died with a server).
pub async fn drop_upload(db: &Database, id: &str) -> Result<(), DbError> {
    db.execute("DELETE FROM jobs WHERE id = $1 AND state = $2", params![id, JobState::Uploading.as_str()]).await?;
    Ok(())
}

/// The uploads under way, as (id, file name), for the sweep of dead ones.
pub async fn uploads(db: &Database) -> Result<Vec<(String, String)>, DbError> {
    let rows =
        db.query("SELECT id, file_name FROM jobs WHERE state = $1", params![JobState::Uploading.as_str()]).await?;
    Ok(rows.iter().map(|r| Ok((r.text("id")?, r.text("file_name")?))).collect::<Result<_, SqlError>>()?)
}

/// Whether a job of this file name is recorded (uploads under way included).
pub async fn file_recorded(db: &Database, file_name: &str) -> Result<bool, DbError> {
    Ok(db.query_opt("SELECT id FROM jobs WHERE file_name = $1", params![file_name]).await?.is_some())
}
