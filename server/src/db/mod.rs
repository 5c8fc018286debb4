//! The server's state in its database (SQLite, or PostgreSQL for a farm
//! that runs one), one module for each thing it stores: `accounts`,
//! `audit`, `jobs` and their `uploads`, remote `hosts` and their `leases`,
//! build `caches`, `slurm` runs and nodes, and rebuild `verdicts`. Job files
//! stay in the queue's directories; a job's state follows what they say
//! (`rebuild` makes the records agree with them), while leases, which hand
//! a job to exactly one remote host, are decided here, each in one
//! transaction. Rows are read by column name.

mod accounts;
mod audit;
mod caches;
mod hosts;
mod jobs;
mod leases;
pub mod result_cache;
mod slurm;
mod uploads;
mod verdicts;

use std::time::SystemTime;

use serde::Serialize;
use thiserror::Error;

use crate::sql::{Database, SqlError};

pub use accounts::{
    account_by_id, account_by_name, accounts, add_account, remove_account, set_disabled, set_limits, set_token,
    Account, Kind,
};
pub use audit::{audit, audit_log, audit_or_log, AuditEntry};
pub use caches::{cache_generations, clear_caches};
pub use hosts::{caches_given, given_caches, host_key, host_seen, host_touch, hosts, pin_key, unpin_key, HostRecord};
#[cfg(test)]
pub(crate) use jobs::test_record;
pub use jobs::{
    all_jobs, delete_job, ended_before, insert_job, job, job_by_file, job_by_id, jobs_of, jobs_to_follow, mark_deleted,
    set_ran_on, state_of, update_state, waiting_jobs, JobRecord, RanOn, RebuildRecord,
};
pub use leases::{
    end_lease, expire_leases, extend_leases, farm_state, farm_state_by_id, lease_next, lease_reason, leased_jobs,
    live_lease, renew, unlease, Candidate, Delivered, Ending, Lease,
};
pub use slurm::{
    node_keys, pin_node_key, slurm_abandon, slurm_cancel_sent, slurm_end, slurm_runs, slurm_start, slurm_update,
    unpin_node_key, SlurmRun,
};
pub use uploads::{drop_upload, file_recorded, finish_submission, finish_upload, reserve_upload, uploads, Usage};
pub use verdicts::{set_rebuild, set_rebuild_verdict, twin};
/// An account's limits; `None` means the server-wide default.
pub use wire::Limits;

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

/// Where a job is, as its record last saw it (stored as text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Its upload is under way: its row holds the bytes reserved for it,
    /// and nothing else sees it (no list, no lease, no refresh).
    Uploading,
    Waiting,
    Running,
    Done,
    Failed,
    /// Its file is in none of the queue's directories.
    Missing,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Uploading => "uploading",
            JobState::Waiting => "waiting",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Missing => "missing",
        }
    }

    /// As the `state` column holds it.
    pub fn parse(text: &str) -> Option<JobState> {
        [JobState::Uploading, JobState::Waiting, JobState::Running, JobState::Done, JobState::Failed, JobState::Missing]
            .into_iter()
            .find(|s| s.as_str() == text)
    }

    /// The state of a job found at `place`.
    pub fn of(place: &wire::Place) -> JobState {
        match place {
            wire::Place::Waiting { .. } => JobState::Waiting,
            wire::Place::Running { .. } => JobState::Running,
            wire::Place::Done { .. } => JobState::Done,
            wire::Place::Failed { .. } => JobState::Failed,
            wire::Place::Missing => JobState::Missing,
        }
    }

    /// Done or failed: it has ended.
    pub fn ended(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub fn now() -> String {
    jobfile::units::rfc3339(SystemTime::now())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileId;
    use jobfile::deps::Resolution;

    /// Reserves an upload of 1 MiB for `account`'s job `id`, admitted.
    async fn reserve(db: &Database, account: &Account, id: &str) {
        let record = test_record(account, id, "j", 1 << 20, JobState::Uploading);
        reserve_upload(db, &record, |_| false, |_| Ok::<u64, ()>(1 << 20)).await.expect("reserve").expect("admitted");
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
        let actions: Vec<String> = audit_log(&conn, 10).await.expect("audit").into_iter().map(|e| e.action).collect();
        assert_eq!(actions, ["account_added", "account_removed", "account_disabled", "limits_set", "account_added"]);
        // Reopening applies no migration twice.
        drop(conn);
        let conn = open(&tmp.path().join("s.db").to_string_lossy()).await.expect("reopen");
        assert_eq!(accounts(&conn).await.expect("list").len(), 2);
    }

    #[tokio::test]
    async fn the_follow_loop_reads_again_what_can_change_and_retention_what_has_ended() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let db = open(&tmp.path().join("s.db").to_string_lossy()).await.expect("open");
        let alice = add_account(&db, "alice", Kind::Submitter, b"a").await.expect("add");
        let job = |id: &str, state| test_record(&alice, id, id, 1 << 20, state);
        let pair = RebuildRecord { twin: "5000000000000000".into(), epoch: 1, verdict: None };
        let jobs = [
            job("1000000000000000", JobState::Done),
            job("2000000000000000", JobState::Waiting),
            job("3000000000000000", JobState::Running),
            job("4000000000000000", JobState::Failed),
            // A verified rebuild both of whose runs ended, still without its verdict.
            JobRecord { rebuild: Some(pair), ..job("4100000000000000", JobState::Done) },
            JobRecord { twin_of: Some("4100000000000000".into()), ..job("5000000000000000", JobState::Failed) },
            job("6000000000000000", JobState::Missing),
            job("7000000000000000", JobState::Uploading),
        ];
        for (i, j) in jobs.iter().enumerate() {
            insert_job(&db, &JobRecord { submitted_unix: 1000 + i as i64, ..j.clone() }).await.expect("insert");
        }
        let ids = |jobs: Vec<JobRecord>| jobs.into_iter().map(|j| j.id[..2].to_owned()).collect::<Vec<_>>();
        // Not the jobs that ended for good, nor an upload; the pair waiting for its verdict, both runs.
        assert_eq!(ids(jobs_to_follow(&db).await.expect("follow")), ["20", "30", "41", "50", "60"]);
        // Retention sees only the ended jobs submitted before its cut-off.
        assert_eq!(ids(ended_before(&db, 1004).await.expect("ended")), ["10", "40"]);
        assert_eq!(ids(ended_before(&db, 2000).await.expect("ended")), ["10", "40", "41", "50"]);
        mark_deleted(&db, "1000000000000000").await.expect("deleted");
        assert_eq!(ids(ended_before(&db, 2000).await.expect("ended")), ["40", "41", "50"]);
    }

    #[tokio::test]
    async fn an_upload_finished_by_the_follow_loop_first_is_still_the_uploads_own() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let db = open(&tmp.path().join("s.db").to_string_lossy()).await.expect("open");
        let alice = add_account(&db, "alice", Kind::Submitter, b"a").await.expect("add");
        let record = |id: &str| test_record(&alice, id, "j", 1 << 20, JobState::Uploading);
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
        assert_eq!(state_of(&db, "0123456789abcdef").await.expect("state"), Some(JobState::Waiting));
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
            reserve(&db, &alice, id).await;
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
        reserve(&db, &alice, id).await;
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
            log.iter()
                .any(|e| e.action == "caches_cleared" && e.detail == "ccache (generation 2), cargo (generation 1)"),
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
        let job = test_record(&alice, "0123456789abcdef", "j", 1 << 20, JobState::Waiting);
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
            !end_lease(&db, &job.id, "h1", 1, Ending::Done, "ok", "t").await.expect("end"),
            "the first host's late delivery"
        );
        assert!(end_lease(&db, &job.id, "h2", 2, Ending::Done, "ok", "t").await.expect("end"));
        assert!(!end_lease(&db, &job.id, "h2", 2, Ending::Done, "ok", "t").await.expect("end"), "delivered once");
        let (_, delivered) = farm_state(&db, &job.file_name).await.expect("state").expect("job");
        assert_eq!(delivered.map(|d| (d.seq, d.how)), Some((2, Ending::Done)));
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
        assert_eq!(delivered.map(|d| d.how), Some(Ending::Failed));
        assert!(record.verdict.unwrap_or_default().contains("last host h1"));
    }
}
