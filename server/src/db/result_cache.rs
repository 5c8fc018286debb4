//! The `result_cache` table: each account's entries (what a result was made
//! of, where its files are, their digests), and each job's side of it
//! (`cache_lookup`, `cache_note`, `from_cache` on `jobs`).

use jobfile::deps::Resolution;

use super::audit::audit_in;
use super::jobs::{packages_text, select_jobs};
use super::{now, unix_now, DbError, JobRecord, JobState};
use crate::params;
use crate::sql::{Database, Row, SqlError};
use crate::store::FileId;

/// One entry: an account's cached result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub account_id: i64,
    /// Everything that can change the result (`crate::result_cache::key`).
    pub key: String,
    /// What a submission fixes: the part of the key a submission can be looked up by.
    pub lookup: String,
    /// A digest of the operator's salt when it was stored.
    pub salt: String,
    /// The job whose run made it, its name and image.
    pub job_id: String,
    pub name: String,
    pub image: String,
    /// When that job was submitted.
    pub made: String,
    /// The host that signed it, and the host the server recorded for the run (`RanOn`).
    pub host: String,
    pub ran_on: Option<String>,
    /// The job file's sha256 its statement names.
    pub file_sha256: String,
    /// Reproduced on these two hosts by a verified rebuild (shared).
    pub hosts: Vec<String>,
    pub shared: bool,
    pub bytes: u64,
    /// Each file as stored, by its name in the entry's directory, with its sha256.
    pub files: std::collections::BTreeMap<String, String>,
    /// The verdict of the run (`ok`).
    pub verdict: String,
    pub created_unix: i64,
    pub used_unix: i64,
}

const COLUMNS: &str = "account_id, key, lookup, salt, job_id, name, image, made, host, ran_on, file_sha256, hosts, shared, bytes, files, verdict, created_unix, used_unix";

fn entry_from_row(r: &Row) -> Result<Entry, SqlError> {
    Ok(Entry {
        account_id: r.int("account_id")?,
        key: r.text("key")?,
        lookup: r.text("lookup")?,
        salt: r.text("salt")?,
        job_id: r.text("job_id")?,
        name: r.text("name")?,
        image: r.text("image")?,
        made: r.text("made")?,
        host: r.text("host")?,
        ran_on: r.opt_text("ran_on")?,
        file_sha256: r.text("file_sha256")?,
        hosts: r.opt_json("hosts")?.unwrap_or_default(),
        shared: r.int("shared")? != 0,
        bytes: r.count("bytes")?,
        files: r.opt_json("files")?.unwrap_or_default(),
        verdict: r.text("verdict")?,
        created_unix: r.int("created_unix")?,
        used_unix: r.int("used_unix")?,
    })
}

async fn select(db: &Database, condition: &str, params: &[crate::sql::Value]) -> Result<Vec<Entry>, DbError> {
    let rows = db.query(&format!("SELECT {COLUMNS} FROM result_cache WHERE {condition}"), params).await?;
    Ok(rows.iter().map(entry_from_row).collect::<Result<_, _>>()?)
}

/// Stores `entry` and notes on its job that it was stored, in one
/// transaction. `false` when the account has an entry of that key already
/// (the job is then noted as such, and nothing else changes).
pub async fn insert(db: &Database, entry: &Entry) -> Result<bool, DbError> {
    db.tx(async |tx| {
        let hosts = (!entry.hosts.is_empty()).then(|| serde_json::to_string(&entry.hosts).expect("names serialize"));
        let files = serde_json::to_string(&entry.files).expect("names and digests serialize");
        let added = tx.execute(
            &format!("INSERT INTO result_cache ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) ON CONFLICT (account_id, key) DO NOTHING"),
            params![
                entry.account_id,
                &entry.key,
                &entry.lookup,
                &entry.salt,
                &entry.job_id,
                &entry.name,
                &entry.image,
                &entry.made,
                &entry.host,
                entry.ran_on.clone(),
                &entry.file_sha256,
                hosts,
                i64::from(entry.shared),
                entry.bytes,
                files,
                &entry.verdict,
                entry.created_unix,
                entry.used_unix
            ],
        ).await? == 1;
        let note = if added { "stored".to_owned() } else { "not stored: the cache holds its result already".to_owned() };
        tx.execute("UPDATE jobs SET cache_note = $1 WHERE id = $2", params![note, &entry.job_id]).await?;
        if added {
            let detail = format!("{} {} ({} bytes{})", entry.job_id, entry.key, entry.bytes, if entry.shared { ", shared" } else { "" });
            audit_in(tx, None, "result_cached", &detail).await?;
        }
        Ok(added)
    })
    .await
}

/// Notes on job `id` what became of it for the cache (`stored`, or why not).
pub async fn set_note(db: &Database, id: &str, note: &str) -> Result<(), DbError> {
    db.execute("UPDATE jobs SET cache_note = $1 WHERE id = $2", params![note, id]).await?;
    Ok(())
}

/// The jobs that may be cached, have ended, and are not decided yet.
pub async fn undecided(db: &Database) -> Result<Vec<JobRecord>, DbError> {
    let condition = "cache_lookup IS NOT NULL AND cache_note IS NULL AND state IN ($1, $2) ORDER BY submitted_unix, id";
    select_jobs(db, condition, params![JobState::Done.as_str(), JobState::Failed.as_str()]).await
}

/// The entries a submission of `account_id` with `lookup` may be served:
/// its own first, then (when `shared` is allowed) any account's shared
/// ones; the most recently used first within each.
pub async fn candidates(db: &Database, lookup: &str, account_id: i64, shared: bool) -> Result<Vec<Entry>, DbError> {
    let condition = "lookup = $1 AND (account_id = $2 OR (shared = 1 AND $3 = 1)) AND account_id NOT IN (SELECT id FROM accounts WHERE removed IS NOT NULL) ORDER BY CASE WHEN account_id = $2 THEN 0 ELSE 1 END, used_unix DESC";
    select(db, condition, params![lookup, account_id, i64::from(shared)]).await
}

/// Whether `account_id` has an entry `key`.
pub async fn exists(db: &Database, account_id: i64, key: &str) -> Result<bool, DbError> {
    let row = db
        .query_opt("SELECT key FROM result_cache WHERE account_id = $1 AND key = $2", params![account_id, key])
        .await?;
    Ok(row.is_some())
}

/// Marks an entry used now.
pub async fn touch(db: &Database, account_id: i64, key: &str) -> Result<(), DbError> {
    db.execute(
        "UPDATE result_cache SET used_unix = $1 WHERE account_id = $2 AND key = $3",
        params![unix_now(), account_id, key],
    )
    .await?;
    Ok(())
}

/// Removes an entry's row; `false` when it was gone already.
pub async fn remove(db: &Database, account_id: i64, key: &str) -> Result<bool, DbError> {
    let n = db.execute("DELETE FROM result_cache WHERE account_id = $1 AND key = $2", params![account_id, key]).await?;
    Ok(n > 0)
}

/// An account's entries, the most recently used first.
pub async fn entries_of(db: &Database, account_id: i64) -> Result<Vec<Entry>, DbError> {
    select(db, "account_id = $1 ORDER BY used_unix DESC, key", params![account_id]).await
}

/// Every entry, the least recently used first (the order eviction takes them in).
pub async fn least_recently_used(db: &Database) -> Result<Vec<Entry>, DbError> {
    select(db, "1 = 1 ORDER BY used_unix, created_unix, key", &[]).await
}

/// The entries of accounts that were removed.
pub async fn of_removed_accounts(db: &Database) -> Result<Vec<Entry>, DbError> {
    select(db, "account_id IN (SELECT id FROM accounts WHERE removed IS NOT NULL)", &[]).await
}

/// Bytes every entry takes.
pub async fn total_bytes(db: &Database) -> Result<u64, DbError> {
    let row = db.query_opt("SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) AS total FROM result_cache", &[]).await?;
    Ok(row.map(|r| r.count("total")).transpose()?.unwrap_or(0))
}

/// What a hit's job record is finished with: its file as received, the
/// result landed for it, and whose result it is.
pub struct Hit<'a> {
    pub id: &'a str,
    pub size: u64,
    pub sha256: &'a str,
    /// The result the server landed for it in `done/` (its identity).
    pub file: FileId,
    pub packages: Option<&'a Resolution>,
    pub from_cache: &'a wire::result_cache::CacheHit,
    pub verdict: &'a str,
    pub result_bytes: u64,
}

/// Ends an upload served from the cache: its record becomes a job that is
/// done, with the hit, in one transaction with its audit. `false` when its
/// reservation is gone.
pub async fn finish_hit(db: &Database, hit: &Hit<'_>, (account, detail): (&str, &str)) -> Result<bool, DbError> {
    db.tx(async |tx| {
        let from = serde_json::to_string(hit.from_cache).expect("a hit serializes");
        let finished = tx.execute(
            "UPDATE jobs SET size = $1, file_ino = $2, file_birth = $3, packages = $4, file_sha256 = $5, from_cache = $6, state = $7, verdict = $8, result_bytes = $9, cache_note = $10, updated = $11 WHERE id = $12 AND state = $13",
            params![
                hit.size,
                hit.file.ino,
                hit.file.birth_ns,
                packages_text(hit.packages),
                hit.sha256,
                from,
                JobState::Done.as_str(),
                hit.verdict,
                hit.result_bytes,
                "served from the cache",
                now(),
                hit.id,
                JobState::Uploading.as_str()
            ],
        ).await? == 1;
        if finished {
            audit_in(tx, Some(account), "submitted", detail).await?;
            audit_in(tx, Some(account), "result_cache_hit", &format!("{} {}", hit.id, hit.from_cache.key)).await?;
        }
        Ok(finished)
    })
    .await
}
