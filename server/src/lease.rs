//! Leases: how a job is handed to exactly one remote build host, and what
//! becomes of it when a lease ends. Plain functions over the database and
//! the queue's directories, with no HTTP in them (the handlers are in
//! `http::hosts`).
//!
//! A host account asks for work saying which images it has and how many
//! VMs it runs; the server hands it the oldest waiting job for one of them
//! under a lease, decided in one database transaction, and moves the job
//! file to `running/.farm/`. The host renews the lease while the VM runs
//! (sending the console as it goes) and then delivers the result (`done`)
//! or the reason it failed (`failed`). Every lease carries its sequence
//! number, the fencing token: renewals and deliveries under an expired or
//! superseded lease are refused, so a job is delivered once. A lease that
//! runs out puts the job back in the queue, its attempt counted, and after
//! the attempt limit into `failed/` with the reason (`sweep`).
//!
//! Files follow the database: a delivery is staged in `done/` under a
//! hidden name, accepted in the database, then landed (`land`).
//! `reconcile` finishes whatever a crash interrupted, from what the
//! database says.

use std::fs;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use jobfile::layout::{self, FailLog, Landed, Landing, Terms};

use crate::db::{self, DbError, Ending, JobRecord};
use crate::sql::Database;
use crate::store::Store;

/// How the server hands jobs to remote hosts.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How long a lease lasts without renewal.
    pub lease: Duration,
    /// A job whose leases ran out this many times fails.
    pub max_attempts: u64,
    /// How long a job that names build caches waits for a free host that
    /// holds one of them warm, before any host may take it.
    pub warm_wait: Duration,
    /// How long a verified rebuild's second run is kept from the host that
    /// took its first, when another host is live.
    pub apart_wait: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            lease: Duration::from_secs(30),
            max_attempts: 3,
            warm_wait: Duration::from_secs(20),
            apart_wait: Duration::from_secs(600),
        }
    }
}

/// A remote host heard from within this long counts as free for a warm job
/// (hosts with room ask every second by default).
pub const WARM_SEEN: i64 = 5;

/// The build caches that free remote hosts other than `asking` hold at
/// their current generation: (owner, image, name) for each. A host is free
/// when it was heard from within [`WARM_SEEN`] seconds, is not disabled and
/// holds fewer jobs than its capacity.
pub fn warm_elsewhere(
    hosts: &[db::HostRecord],
    leased: &[JobRecord],
    asking: &str,
    generations: &jobfile::caches::Generations,
) -> std::collections::HashSet<(String, String, String)> {
    let mut out = std::collections::HashSet::new();
    for h in hosts {
        let running = leased.iter().filter(|j| j.host.as_deref() == Some(&h.name)).count() as u64;
        if h.name == asking || h.disabled || h.seen_secs_ago() > WARM_SEEN || running >= h.capacity {
            continue;
        }
        out.extend(current(&h.caches, generations).map(|c| (c.owner.clone(), c.image.clone(), c.name.clone())));
    }
    out
}

/// The held caches that are at their owner's current generation (the others were cleared).
pub fn current<'a>(
    held: &'a [wire::HeldCache],
    generations: &'a jobfile::caches::Generations,
) -> impl Iterator<Item = &'a wire::HeldCache> + 'a {
    held.iter()
        .filter(|c| c.check().is_ok() && c.generation == jobfile::caches::generation(generations, &c.owner, &c.name))
}

/// Whether the host asking should leave `job` for a warmer one: the job
/// names caches, this host holds none of them, a free other host holds
/// one, and the job has waited less than `warm_wait`. Bounded by the wait:
/// no job is held back longer, whoever asks.
pub fn leave_for_warmer(
    job: &db::Candidate,
    here: &std::collections::HashSet<(String, String, String)>,
    elsewhere: &std::collections::HashSet<(String, String, String)>,
    warm_wait: Duration,
) -> bool {
    if job.caches.is_empty() || job.waited_secs >= warm_wait.as_secs() as i64 {
        return false;
    }
    let owner = jobfile::caches::account_owner(job.account_id);
    let key = |name: &String| (owner.clone(), job.image.clone(), name.clone());
    !job.caches.iter().any(|n| here.contains(&key(n))) && job.caches.iter().any(|n| elsewhere.contains(&key(n)))
}

impl Settings {
    pub fn lease_ms(&self) -> i64 {
        self.lease.as_millis() as i64
    }
}

/// Most console bytes the server keeps of a running farm job.
pub const MAX_CONSOLE: u64 = 16 << 20;

/// An image as the server offers it: its number, the sha256 of its
/// `image.toml` (which holds the sha256 of every other file), and the files.
pub use wire::{OfferedFile, OfferedImage as Offered};

/// The images in the server's images directory, each with its checksum.
pub fn offered_images(store: &Store) -> Vec<Offered> {
    let Ok(rd) = fs::read_dir(&store.images) else { return Vec::new() };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let dir_name = e.file_name().to_string_lossy().into_owned();
        let Some(number) =
            dir_name.strip_prefix('i').filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let dir = e.path();
        let Ok(manifest) = jobfile::image::ImageManifest::load(&dir) else { continue };
        let Ok(checksum) = jobfile::image::sha256_file(&dir.join(jobfile::image::MANIFEST)) else { continue };
        let mut files = vec![OfferedFile {
            name: jobfile::image::MANIFEST.to_owned(),
            size: fs::metadata(dir.join(jobfile::image::MANIFEST)).map_or(0, |m| m.len()),
            sha256: checksum.clone(),
        }];
        for (name, sha256) in &manifest.sha256 {
            let size = fs::metadata(dir.join(name)).map_or(0, |m| m.len());
            files.push(OfferedFile { name: name.clone(), size, sha256: sha256.clone() });
        }
        out.push(Offered { name: number.to_owned(), checksum, arch: manifest.arch, files });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Staged parts of a delivery: `done/.farm.<id>.<seq>.<tag>.{log,result}.part`,
/// the tag new for every request, so that two deliveries on one lease
/// never write the same file.
pub fn part(store: &Store, id: &str, seq: u64, tag: &str, what: &str) -> PathBuf {
    store.done.join(format!(".farm.{id}.{seq}.{tag}.{what}.part"))
}

/// Puts the files of an accepted delivery in place: the staged log and
/// result into `done/`, or the job into `failed/` with its reason. Safe to
/// repeat, and to race with itself: each step is a rename that only one wins.
pub fn land(
    store: &Store,
    file_name: &str,
    id: &str,
    seq: u64,
    tag: &str,
    how: Ending,
    verdict: &str,
) -> io::Result<()> {
    let job = jobfile::JobName::parse(file_name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let leased = store.leased(file_name);
    let log = part(store, id, seq, tag, "log");
    if how == Ending::Done {
        let landing = Landing {
            job,
            log: Some(log),
            provenance: Some(part(store, id, seq, tag, "provenance")),
            result: part(store, id, seq, tag, "result"),
        };
        // The server's names are its own: a name taken is this delivery landed before.
        if layout::land(&store.done, &landing)? == Landed::Taken {
            landing.discard();
        }
        let _ = fs::remove_file(&leased);
    } else {
        store.fail(&leased, file_name, verdict, Some(FailLog::Move(&log)))?;
        let _ = fs::remove_file(&log);
    }
    let _ = fs::remove_file(store.farm_console(file_name));
    Terms::remove_run(&store.running, file_name.as_ref());
    store.forget_cancel(file_name);
    Ok(())
}

/// Ends the leases that ran out and moves their files; then finishes
/// whatever a crash left between the database and the directories. The
/// jobs it moved, whose records are to be brought up to date.
pub async fn sweep(db: &Database, store: &Store, settings: &Settings) -> Result<Vec<JobRecord>, DbError> {
    let mut moved_jobs = Vec::new();
    for (job, gave_up) in db::expire_leases(db, settings.max_attempts).await? {
        let host = job.host.clone().unwrap_or_default();
        let leased = store.leased(&job.file_name);
        let moved = if gave_up {
            let reason = db::lease_reason(&job, &host, settings.max_attempts);
            log::warn!("job {}: the lease of host {host} ran out; {reason}", job.id);
            land(store, &job.file_name, &job.id, 0, "", Ending::Failed, &reason).map(|()| true)
        } else {
            log::warn!(
                "job {}: the lease of host {host} ran out (attempt {} of {}); back in the queue",
                job.id,
                job.attempts,
                settings.max_attempts
            );
            let _ = fs::remove_file(store.farm_console(&job.file_name));
            store.move_job(&leased, &store.queue.join(&job.file_name))
        };
        if let Err(e) = moved {
            log::error!("job {}: cannot move {}: {e}", job.id, leased.display());
        }
        moved_jobs.push(job);
    }
    moved_jobs.extend(reconcile(db, store, settings).await?);
    Ok(moved_jobs)
}

/// Makes `running/.farm/` and the staged deliveries agree with the
/// database: a delivered job's files are landed, a job no lease holds goes
/// back to the queue (or to failed/ past the attempt limit), and staged
/// parts no delivery will use are removed once they are a minute old. The
/// jobs it put right, whose records are to be brought up to date.
pub async fn reconcile(db: &Database, store: &Store, settings: &Settings) -> Result<Vec<JobRecord>, DbError> {
    let put_right = reconcile_farm(db, store, settings).await?;
    reconcile_staged(db, store).await?;
    Ok(put_right)
}

/// The jobs in `running/.farm/` that no lease holds: landed as delivered,
/// failed past the attempt limit, or back in the queue.
async fn reconcile_farm(db: &Database, store: &Store, settings: &Settings) -> Result<Vec<JobRecord>, DbError> {
    let mut put_right = Vec::new();
    let Ok(rd) = fs::read_dir(store.farm_dir()) else { return Ok(put_right) };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let Some((job, delivered)) = db::farm_state(db, &name).await? else { continue };
        if job.host.is_some() {
            continue;
        }
        let done = match delivered {
            Some(d) => land(store, &name, &job.id, d.seq, &d.part, d.how, &d.verdict),
            None if job.attempts >= settings.max_attempts => {
                let reason = db::lease_reason(&job, "(unknown)", settings.max_attempts);
                land(store, &name, &job.id, 0, "", Ending::Failed, &reason)
            }
            None => store.move_job(&e.path(), &store.queue.join(&name)).map(|_| ()),
        };
        match done {
            Ok(()) => log::info!("job {}: finished what a crash left in {}", job.id, e.path().display()),
            Err(e) => log::error!("job {}: cannot put its files right: {e}", job.id),
        }
        put_right.push(job);
    }
    Ok(put_right)
}

/// The staged parts of deliveries in `done/`: landed when the database
/// accepted their delivery, removed once a minute old when it did not.
async fn reconcile_staged(db: &Database, store: &Store) -> Result<(), DbError> {
    let Ok(rd) = fs::read_dir(&store.done) else { return Ok(()) };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".farm.") else { continue };
        let mut bits = rest.split('.');
        let (Some(id), Some(seq), Some(tag)) =
            (bits.next(), bits.next().and_then(|s| s.parse::<u64>().ok()), bits.next())
        else {
            continue;
        };
        if !crate::auth::is_job_id(id) {
            continue;
        }
        let old = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok())
            >= Some(Duration::from_secs(60));
        let delivered = db::farm_state_by_id(db, id)
            .await?
            .and_then(|(job, d)| d.filter(|d| d.seq == seq && d.part == tag).map(|d| (job, d)));
        match delivered {
            Some((job, d)) if job.host.is_none() => {
                if let Err(e) = land(store, &job.file_name, id, d.seq, &d.part, d.how, &d.verdict) {
                    log::error!("job {id}: cannot land its delivery: {e}");
                }
            }
            Some(_) => {}
            None if old => {
                let _ = fs::remove_file(e.path());
            }
            None => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{Kind, Lease};

    #[test]
    fn a_job_waits_a_bounded_while_for_a_free_host_whose_cache_is_warm() {
        let held = |owner: &str, name: &str, generation: u64| wire::HeldCache {
            owner: owner.into(),
            image: "1".into(),
            name: name.into(),
            generation,
            version: 1,
            bytes: 4096,
            used: db::now(),
        };
        let host = |name: &str, caches: Vec<wire::HeldCache>, seen_ago: i64, capacity: u64| db::HostRecord {
            name: name.into(),
            last_seen: String::new(),
            last_seen_unix: db::unix_now() - seen_ago,
            images: serde_json::Value::Null,
            capacity,
            version: String::new(),
            disabled: false,
            caches,
            key: None,
        };
        let mut generations = jobfile::caches::Generations::new();
        generations.entry("a7".into()).or_default().insert("cleared".into(), 3);
        let hosts = [
            host("warm", vec![held("a7", "ccache", 0), held("a7", "cleared", 2)], 1, 2),
            host("gone", vec![held("a7", "cargo", 0)], 60, 2),
            host("full", vec![held("a7", "go", 0)], 1, 1),
        ];
        let mut busy = db::test_record(
            &db::Account {
                id: 9,
                name: "x".into(),
                token_hash: vec![],
                disabled: false,
                created: String::new(),
                limits: Default::default(),
                kind: Kind::Submitter,
                removed: None,
            },
            "0123456789abcdef",
            "b",
            1,
            db::JobState::Waiting,
        );
        busy.host = Some("full".into());
        let elsewhere = warm_elsewhere(&hosts, &[busy], "cold", &generations);
        // Only the free host's caches at their current generation: not one a host no longer
        // heard from holds, not a full host's, not one its owner cleared.
        let key = |name: &str| ("a7".to_owned(), "1".to_owned(), name.to_owned());
        assert_eq!(elsewhere, [key("ccache")].into_iter().collect());
        // The asking host's own caches do not count as elsewhere.
        assert!(!warm_elsewhere(&hosts, &[], "warm", &generations).contains(&key("ccache")));
        let job = |caches: &[&str], waited_secs: i64| db::Candidate {
            file_name: "j_i1.tar.xz".into(),
            ino: None,
            account_id: 7,
            image: "1".into(),
            caches: caches.iter().map(|c| c.to_string()).collect(),
            waited_secs,
        };
        let wait = Duration::from_secs(20);
        let none = std::collections::HashSet::new();
        let here: std::collections::HashSet<_> = [key("cargo")].into_iter().collect();
        for (what, candidate, here, leave) in [
            ("warm elsewhere, cold here, fresh: left for the warm host", job(&["ccache"], 3), &none, true),
            ("past the wait: taken by whoever asks", job(&["ccache"], 20), &none, false),
            ("no caches: taken", job(&[], 0), &none, false),
            ("warm nowhere: taken", job(&["zig"], 0), &none, false),
            ("warm here too: taken", job(&["ccache", "cargo"], 0), &here, false),
            (
                "another account's same name is not warm",
                db::Candidate { account_id: 8, ..job(&["ccache"], 0) },
                &none,
                false,
            ),
            ("another image is not warm", db::Candidate { image: "2".into(), ..job(&["ccache"], 0) }, &none, false),
        ] {
            assert_eq!(leave_for_warmer(&candidate, here, &elsewhere, wait), leave, "{what}");
        }
    }

    /// A database and the queue's directories in a temporary place, with one
    /// submitter account and its waiting job `hello` (a file in `queue/`).
    struct Fixture {
        _dir: tempfile::TempDir,
        db: Database,
        store: Store,
        file_name: String,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::beside(&dir.path().join("queue"));
        store.create_all().expect("dirs");
        let db = db::open(&dir.path().join("server.db").to_string_lossy()).await.expect("db");
        let alice = db::add_account(&db, "alice", Kind::Submitter, b"h").await.expect("account");
        let job = db::test_record(&alice, "0123456789abcdef", "hello", 3, db::JobState::Waiting);
        let file_name = job.file_name.clone();
        fs::write(store.queue.join(&file_name), b"job").expect("job file");
        db::insert_job(&db, &job).await.expect("insert");
        Fixture { _dir: dir, db, store, file_name }
    }

    /// Hands the job to `host` for `lease_ms`, and moves its file as the lease handler does.
    async fn lease_to(f: &Fixture, host: &str, lease_ms: i64) -> Lease {
        let lease =
            db::lease_next(&f.db, host, &["0".to_owned()], lease_ms, |_| true).await.expect("lease").expect("a job");
        fs::create_dir_all(f.store.farm_dir()).expect("farm dir");
        assert!(f.store.move_job(&f.store.queue.join(&f.file_name), &f.store.leased(&f.file_name)).expect("move"));
        lease
    }

    fn settings(max_attempts: u64) -> Settings {
        Settings { max_attempts, ..Settings::default() }
    }

    #[tokio::test]
    async fn a_delivery_lands_the_log_before_the_result_and_lands_once() {
        let f = fixture().await;
        let lease = lease_to(&f, "h1", 30_000).await;
        fs::write(part(&f.store, &lease.id, lease.seq, "t1", "log"), "console\n").expect("log part");
        fs::write(part(&f.store, &lease.id, lease.seq, "t1", "result"), "result").expect("result part");
        assert!(db::end_lease(&f.db, &lease.id, "h1", lease.seq, Ending::Done, "ok", "t1").await.expect("end"));
        land(&f.store, &f.file_name, &lease.id, lease.seq, "t1", Ending::Done, "ok").expect("land");
        let job = jobfile::JobName::parse(&f.file_name).expect("name");
        assert_eq!(fs::read_to_string(f.store.done.join(job.done_file_name())).expect("result"), "result");
        assert_eq!(fs::read_to_string(f.store.done.join(job.done_with_extension("log"))).expect("log"), "console\n");
        assert!(!f.store.leased(&f.file_name).exists(), "the job file left running/.farm");
        // Landing again (a crash between the two) changes nothing and fails nothing.
        land(&f.store, &f.file_name, &lease.id, lease.seq, "t1", Ending::Done, "ok").expect("land again");
        assert_eq!(fs::read_to_string(f.store.done.join(job.done_file_name())).expect("result"), "result");
        // Nothing is left for the sweep to do.
        assert!(sweep(&f.db, &f.store, &settings(3)).await.expect("sweep").is_empty());
    }

    #[tokio::test]
    async fn a_lease_that_runs_out_puts_the_job_back_and_past_the_limit_fails_it_with_the_reason() {
        let f = fixture().await;
        // Nothing has run out yet.
        let lease = lease_to(&f, "h1", 60_000).await;
        assert!(sweep(&f.db, &f.store, &settings(2)).await.expect("sweep").is_empty());
        assert!(f.store.leased(&f.file_name).exists());
        assert!(db::end_lease(&f.db, &lease.id, "h1", lease.seq, Ending::Released, "", "").await.expect("release"));
        f.store.move_job(&f.store.leased(&f.file_name), &f.store.queue.join(&f.file_name)).expect("back");

        // Attempt 1 of 2 runs out: back in the queue, for another host.
        let first = lease_to(&f, "h1", 0).await;
        assert_eq!(first.attempt, 1);
        let moved = sweep(&f.db, &f.store, &settings(2)).await.expect("sweep");
        assert_eq!(moved.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), [first.id.as_str()]);
        assert!(f.store.queue.join(&f.file_name).exists(), "back in the queue");
        // Its late delivery is refused: the fencing number moved on.
        assert!(!db::end_lease(&f.db, &first.id, "h1", first.seq, Ending::Done, "ok", "t").await.expect("late"));

        // Attempt 2 of 2 runs out: failed, with the reason, and never handed out again.
        let second = lease_to(&f, "h2", 0).await;
        assert_eq!((second.attempt, second.seq), (2, first.seq + 1));
        sweep(&f.db, &f.store, &settings(2)).await.expect("sweep");
        assert!(f.store.failed.join(&f.file_name).exists(), "in failed/");
        let reason = fs::read_to_string(f.store.failed.join(format!("{}.reason", f.file_name))).expect("reason");
        assert!(reason.contains("h2") && reason.contains('2'), "{reason}");
        assert!(db::lease_next(&f.db, "h3", &["0".to_owned()], 30_000, |_| true).await.expect("lease").is_none());
    }

    #[tokio::test]
    async fn reconcile_finishes_a_delivery_a_crash_interrupted_and_removes_only_old_stray_parts() {
        let f = fixture().await;
        let lease = lease_to(&f, "h1", 30_000).await;
        fs::write(part(&f.store, &lease.id, lease.seq, "t1", "log"), "console\n").expect("log part");
        fs::write(part(&f.store, &lease.id, lease.seq, "t1", "result"), "result").expect("result part");
        // Accepted in the database, then the server died before landing.
        assert!(db::end_lease(&f.db, &lease.id, "h1", lease.seq, Ending::Done, "ok", "t1").await.expect("end"));
        // A part of a delivery that was never accepted, one fresh and one an hour old.
        let fresh = part(&f.store, &lease.id, lease.seq, "t2", "result");
        let stale = part(&f.store, &lease.id, lease.seq, "t3", "result");
        fs::write(&fresh, "x").expect("fresh");
        fs::write(&stale, "x").expect("stale");
        let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        fs::File::options().write(true).open(&stale).expect("open").set_modified(hour_ago).expect("age");

        let put_right = reconcile(&f.db, &f.store, &settings(3)).await.expect("reconcile");
        assert_eq!(put_right.len(), 1);
        let job = jobfile::JobName::parse(&f.file_name).expect("name");
        assert_eq!(fs::read_to_string(f.store.done.join(job.done_file_name())).expect("result"), "result");
        assert!(!f.store.leased(&f.file_name).exists());
        assert!(fresh.exists(), "a fresh part may still be in use");
        assert!(!stale.exists(), "an old part no delivery uses is removed");
        // Run again: nothing more to do.
        assert!(reconcile(&f.db, &f.store, &settings(3)).await.expect("again").is_empty());
    }

    #[tokio::test]
    async fn a_job_file_no_lease_holds_goes_back_to_the_queue() {
        let f = fixture().await;
        let lease = lease_to(&f, "h1", 30_000).await;
        // Given back in the database, but the server died before moving the file.
        assert!(db::end_lease(&f.db, &lease.id, "h1", lease.seq, Ending::Released, "", "").await.expect("release"));
        reconcile(&f.db, &f.store, &settings(3)).await.expect("reconcile");
        assert!(f.store.queue.join(&f.file_name).exists());
        assert!(!f.store.leased(&f.file_name).exists());
    }
}
