//! Verified rebuilds on the server's side: how many hosts are live (so a
//! second run is kept apart from the first only where another host can
//! take it), and the verdict once both runs have ended: each result checked
//! against its signed provenance, then the two compared file by file
//! (`jobfile::rebuild::compare`).

use construir_provenance::PublicKey;
use wire::{Place, RebuildOutcome, RebuildVerdict};

use crate::app::App;
use crate::db::{self, DbError, JobRecord};

/// A remote host heard from within this long counts as live.
pub const LIVE_SEEN: i64 = 60;

/// The hosts that could take a job now: remote hosts heard from within
/// [`LIVE_SEEN`] seconds and not disabled, and local hosts whose
/// `running/<host-id>/.host` is held.
pub async fn live_hosts(app: &App) -> Result<usize, DbError> {
    let remote = db::hosts(app.db()).await?.iter().filter(|h| !h.disabled && h.seen_secs_ago() < LIVE_SEEN).count();
    let store = app.store.clone();
    let local = tokio::task::spawn_blocking(move || {
        store.host_dirs().iter().filter(|(_, dir)| jobfile::layout::host_state(dir).0).count()
    })
    .await
    .unwrap_or(0);
    Ok(remote + local)
}

/// Decides every verified rebuild whose two runs have ended and that has no
/// verdict yet, records it on the first run and removes the pair's terms.
/// Returns how many it decided.
pub async fn settle(app: &App, jobs: &[JobRecord]) -> Result<usize, DbError> {
    let mut decided = 0;
    for first in jobs {
        let Some(pair) = first.rebuild.as_ref().filter(|r| r.verdict.is_none()) else { continue };
        let first_place = app.locate(first);
        if !first_place.is_final() {
            continue;
        }
        let twin = jobs.iter().find(|j| j.id == pair.twin);
        if twin.is_none() && db::state_of(app.db(), &pair.twin).await?.is_some() {
            continue; // its upload is being finished
        }
        let second_place = twin.map(|t| app.locate(t));
        if second_place.as_ref().is_some_and(|p| !p.is_final()) {
            continue;
        }
        let keys = signers(app).await?;
        let (app2, first2, twin2) = (app.store.clone(), first.clone(), twin.cloned());
        let verdict = tokio::task::spawn_blocking(move || {
            judge(&app2, &first2, &first_place, twin2.as_ref().zip(second_place.as_ref()), &keys)
        })
        .await
        .unwrap_or_else(|e| not_compared(format!("the comparison broke off: {e}"), Vec::new()));
        if db::set_rebuild_verdict(app.db(), &first.id, &verdict).await? {
            log::info!("job {}: verified rebuild: {}", first.id, verdict.summary());
            let account = db::account_by_id(app.db(), first.account_id).await?.map(|a| a.name);
            db::audit_or_log(
                app.db(),
                account.as_deref(),
                "rebuild_verdict",
                &format!("{} {}", first.id, verdict.outcome.as_str()),
            )
            .await;
            decided += 1;
        }
        for job in std::iter::once(first).chain(twin) {
            jobfile::rebuild::remove_terms(&app.store.running, job.file_name.as_ref());
        }
    }
    Ok(decided)
}

/// Who may sign a result, and with which key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signer {
    /// A remote host, by its account, with the key pinned for it.
    Remote(String),
    /// A Slurm node, with the key the operator pinned for it.
    Slurm(String),
    /// A local host, with the key it published in `running/.keys/`.
    Local(String),
}

impl Signer {
    fn name(&self) -> &str {
        match self {
            Signer::Remote(n) | Signer::Slurm(n) | Signer::Local(n) => n,
        }
    }

    /// Whether this is the host the server recorded for a run.
    fn is(&self, ran_on: &db::RanOn) -> bool {
        match (self, ran_on) {
            (Signer::Remote(a), db::RanOn::Remote(b)) | (Signer::Slurm(a), db::RanOn::Slurm(b)) => a == b,
            _ => false,
        }
    }
}

/// Every key the server knows, with whose it is: remote hosts' and Slurm
/// nodes' pinned keys, and the keys local hosts published.
pub async fn signers(app: &App) -> Result<Vec<(Signer, PublicKey)>, DbError> {
    let mut keys: Vec<(Signer, PublicKey)> = db::hosts(app.db())
        .await?
        .into_iter()
        .filter_map(|h| Some((Signer::Remote(h.name.clone()), PublicKey::parse(h.key.as_deref()?).ok()?)))
        .collect();
    let store = app.store.clone();
    let local = tokio::task::spawn_blocking(move || store.local_host_keys()).await.unwrap_or_default();
    keys.extend(local.into_iter().filter_map(|(h, k)| Some((Signer::Local(h), PublicKey::parse(&k).ok()?))));
    let nodes = db::node_keys(app.db()).await?;
    keys.extend(nodes.into_iter().filter_map(|(n, k)| Some((Signer::Slurm(n), PublicKey::parse(&k).ok()?))));
    Ok(keys)
}

/// Checks `result` against its provenance as made by the host the server
/// recorded for the run (`ran_on`): signed with that host's key and as
/// that host. A run with no recorded host must be a local host's, signed
/// with the key that local host published, as itself. The statement must
/// name as its job the file the server received (`job_sha256`, when the
/// record keeps it). Returns the host's name and the check's findings.
/// Never takes the statement's word alone, nor any key the server knows.
pub fn verify_run(
    (result, provenance, log): (&std::path::Path, &std::path::Path, Option<&std::path::Path>),
    ran_on: Option<&db::RanOn>,
    job_sha256: Option<&str>,
    signers: &[(Signer, PublicKey)],
) -> Result<(String, construir_provenance::Verified), String> {
    let allowed: Vec<(String, PublicKey)> = signers
        .iter()
        .filter(|(s, _)| match ran_on {
            Some(r) => s.is(r),
            None => matches!(s, Signer::Local(_)),
        })
        .map(|(s, k)| (s.name().to_owned(), *k))
        .collect();
    if allowed.is_empty() {
        return Err(match ran_on {
            Some(r) => format!("no key is pinned for {}, which ran it", jobfile::sanitize(r.key_owner().as_bytes())),
            None => "no local host published a key".to_owned(),
        });
    }
    let (host, verified) =
        construir_provenance::verify_signed_as(result, provenance, &allowed, log).map_err(|e| match e {
            e @ construir_provenance::VerifyError::WrongBuilder { .. } => e.to_string(),
            e => format!("its provenance does not verify: {}", jobfile::error_chain(&e)),
        })?;
    if let Some(want) = job_sha256 {
        let named = signed_job(&verified.statement);
        if named != want {
            return Err(format!(
                "its statement names the job file {}, but the server received {want}",
                jobfile::sanitize(named.as_bytes())
            ));
        }
    }
    Ok((host, verified))
}

/// The job file's sha256 a statement names.
fn signed_job(statement: &construir_provenance::Statement) -> String {
    statement.predicate.build_definition.external_parameters.job.digest.sha256.clone()
}

/// What both runs of a verified rebuild must have been given alike: the
/// image (its name and manifest) and the rebuild's name and epoch.
fn run_terms(statement: &construir_provenance::Statement) -> serde_json::Value {
    let ext = &statement.predicate.build_definition.external_parameters;
    let rebuild = ext.rebuild.as_ref();
    serde_json::json!({
        "image": ext.image.name,
        "manifest": ext.image.manifest.sha256,
        "name": rebuild.map(|r| &r.name),
        "epoch": rebuild.map(|r| r.source_date_epoch),
    })
}

fn not_compared(reason: String, hosts: Vec<String>) -> RebuildVerdict {
    RebuildVerdict {
        without_caches: false,
        outcome: RebuildOutcome::NotCompared,
        same_host: hosts.len() == 2 && hosts[0] == hosts[1],
        hosts,
        files: 0,
        differing: Vec::new(),
        differing_total: 0,
        reason: Some(reason),
        decided: db::now(),
    }
}

/// One run's result, checked against its provenance: the host that signed
/// it (its builder id without `construir-host:`), and its files.
struct Run {
    host: String,
    files: Vec<jobfile::tools::EntryDigest>,
    /// What it was given that both runs share (`run_terms`).
    terms: serde_json::Value,
}

fn checked_run(
    store: &crate::store::Store,
    job: &JobRecord,
    keys: &[(Signer, PublicKey)],
    which: &str,
) -> Result<Run, String> {
    let result = store.result_path(&job.file_name).ok_or_else(|| format!("the {which} run's result is gone"))?;
    let provenance =
        store.provenance_path(&job.file_name).ok_or_else(|| format!("the {which} run's result has no provenance"))?;
    let log = jobfile::layout::log_beside(&result);
    let files = (result.as_path(), provenance.as_path(), log.as_deref());
    let (host, verified) = verify_run(files, job.ran_on.as_ref(), job.file_sha256.as_deref(), keys)
        .map_err(|e| format!("the {which} run's result: {e}"))?;
    let files = jobfile::tools::digests(&result, construir_provenance::member_limits())
        .map_err(|e| format!("the {which} run's result cannot be listed: {}", jobfile::error_chain(&e)))?;
    let terms = run_terms(&verified.statement);
    Ok(Run { host: jobfile::sanitize(host.as_bytes()), files: jobfile::rebuild::comparable(files, &result), terms })
}

/// The verdict on a pair whose runs have ended (`second` none: its record is gone).
fn judge(
    store: &crate::store::Store,
    first: &JobRecord,
    first_place: &Place,
    second: Option<(&JobRecord, &Place)>,
    keys: &[(Signer, PublicKey)],
) -> RebuildVerdict {
    let Some((second, second_place)) = second else {
        return not_compared(
            "the second run was lost: the server stopped while the job was submitted".into(),
            Vec::new(),
        );
    };
    for (place, which) in [(first_place, "first"), (second_place, "second")] {
        match place {
            Place::Done { .. } => {}
            Place::Failed { reason } => return not_compared(format!("the {which} run failed: {reason}"), Vec::new()),
            other => return not_compared(format!("the {which} run is {}", other.name()), Vec::new()),
        }
    }
    let runs =
        checked_run(store, first, keys, "first").and_then(|a| Ok((a, checked_run(store, second, keys, "second")?)));
    let (a, b) = match runs {
        Ok(runs) => runs,
        Err(reason) => return not_compared(reason, Vec::new()),
    };
    let hosts = vec![a.host.clone(), b.host.clone()];
    let epoch = first.rebuild.as_ref().map(|r| r.epoch);
    if a.terms != b.terms || a.terms["epoch"].as_u64() != epoch {
        let why = format!(
            "the two runs were not given the same job: {} and {} (the server gave epoch {})",
            a.terms,
            b.terms,
            epoch.unwrap_or_default()
        );
        return not_compared(jobfile::sanitize(why.as_bytes()), hosts);
    }
    for (run, which) in [(&a, "first"), (&b, "second")] {
        if let Some(bad) = run.files.iter().find(|e| e.kind == '-' && e.sha256.is_none()) {
            return not_compared(format!("the {which} run's {} could not be read", bad.path), hosts);
        }
    }
    let jobfile::rebuild::Comparison { files, differing } = jobfile::rebuild::compare(&a.files, &b.files);
    RebuildVerdict {
        without_caches: !first.caches.is_empty(),
        outcome: if differing.is_empty() { RebuildOutcome::Reproducible } else { RebuildOutcome::Differs },
        same_host: a.host == b.host,
        hosts,
        files,
        differing_total: differing.len() as u64,
        differing: differing.into_iter().take(jobfile::rebuild::MAX_LISTED).collect(),
        reason: None,
        decided: db::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use construir_provenance::HostKey;
    use std::path::{Path, PathBuf};

    /// A real result (packed as a guest packs one) with its log, signed by
    /// `key` as `builder`, naming `job_sha256` as its job file.
    fn signed(dir: &Path, key: &HostKey, builder: &str, job_sha256: &str) -> (PathBuf, PathBuf, PathBuf) {
        signed_as(dir, "r", key, builder, job_sha256)
    }

    /// `signed`, for the job `<stem>_i0.tar.xz`.
    fn signed_as(
        dir: &Path,
        stem: &str,
        key: &HostKey,
        builder: &str,
        job_sha256: &str,
    ) -> (PathBuf, PathBuf, PathBuf) {
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("out")).expect("mkdir");
        std::fs::write(tree.join("out/a"), b"alpha").expect("write");
        let result = dir.join(format!("{stem}_d0.tar.xz"));
        let _ = std::fs::remove_file(&result);
        let file = std::fs::File::create(&result).expect("create");
        jobfile::pack_dir(&tree, file, 1 << 20, &jobfile::PackOptions::default()).expect("pack");
        let log = dir.join(format!("{stem}_d0.log"));
        std::fs::write(&log, b"console\n").expect("log");
        let statement = construir_provenance::statement(&construir_provenance::Job {
            result: &result,
            result_name: format!("{stem}_d0.tar.xz"),
            log: b"console\n",
            log_name: format!("{stem}_d0.log"),
            invocation: format!("{stem}_i0.tar.xz"),
            external: construir_provenance::External {
                job: construir_provenance::JobParameter {
                    name: "r_i0.tar.xz".into(),
                    digest: construir_provenance::Sha256 { sha256: job_sha256.into() },
                },
                image: construir_provenance::ImageParameter { name: "i0".into(), ..Default::default() },
                rebuild: Some(construir_provenance::RebuildParameter {
                    name: "pair".into(),
                    source_date_epoch: 1,
                    other_run: String::new(),
                }),
                ..Default::default()
            },
            internal: construir_provenance::Machine::default(),
            dependencies: vec![],
            builder_id: construir_provenance::builder_id(builder),
            version: "test".into(),
            started: String::new(),
            finished: String::new(),
        })
        .expect("statement");
        let provenance = dir.join(format!("{stem}_d0.intoto.jsonl"));
        construir_provenance::write(&provenance, &construir_provenance::sign(&statement, key)).expect("write");
        (result, provenance, log)
    }

    #[test]
    fn a_result_is_taken_only_as_made_by_the_host_recorded_for_its_run_for_the_job_received() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (node, remote, local) =
            (HostKey::from_seed([1; 32]), HostKey::from_seed([2; 32]), HostKey::from_seed([3; 32]));
        let signers = vec![
            (Signer::Slurm("node1".into()), node.public()),
            (Signer::Remote("hosta".into()), remote.public()),
            (Signer::Local("a".into()), local.public()),
        ];
        let job = "ab".repeat(32);
        let check = |key: &HostKey, builder: &str, ran_on: Option<db::RanOn>, want_job: &str| {
            let (r, p, l) = signed(tmp.path(), key, builder, &job);
            verify_run((&r, &p, Some(&l)), ran_on.as_ref(), Some(want_job), &signers).map(|(host, _)| host)
        };
        let slurm = || Some(db::RanOn::Slurm("node1".into()));
        let remote_a = || Some(db::RanOn::Remote("hosta".into()));
        assert_eq!(check(&node, "node1", slurm(), &job).expect("the node Slurm named"), "node1");
        assert_eq!(check(&remote, "hosta", remote_a(), &job).expect("the leased host"), "hosta");
        assert_eq!(check(&local, "a", None, &job).expect("a local host, as itself"), "a");
        // A node's key is trusted only for a job Slurm ran on that node.
        let e = check(&node, "node1", remote_a(), &job).expect_err("a node's key for a remote host's run");
        assert!(e.contains("no signature is by a key given"), "{e}");
        let e = check(&node, "node1", Some(db::RanOn::Slurm("node2".into())), &job).expect_err("another node");
        assert!(e.contains("no key is pinned for node2 (slurm)"), "{e}");
        // No host signs as another, with its own key or any.
        let e = check(&remote, "node1", remote_a(), &job).expect_err("signed as another");
        assert!(e.contains("it is signed as construir-host:node1, not as hosta"), "{e}");
        let e = check(&remote, "a", None, &job).expect_err("a remote key for a local run");
        assert!(e.contains("no signature is by a key given"), "{e}");
        let e = check(&local, "b", None, &job).expect_err("a local host naming another");
        assert!(e.contains("it is signed as construir-host:b, not as a"), "{e}");
        // And the statement names the job file the server received.
        let e = check(&node, "node1", slurm(), &"cd".repeat(32)).expect_err("another job");
        assert!(e.contains("but the server received"), "{e}");
    }

    /// A verified rebuild's two runs, both of local host `a` (its key
    /// published), with no verdict yet.
    async fn local_pair(root: &Path, key: &HostKey) -> (std::sync::Arc<App>, JobRecord, JobRecord) {
        let store = crate::store::Store::beside(&root.join("queue"));
        store.create_all().expect("dirs");
        let published = format!("{} a\n", key.public());
        jobfile::layout::write_whole(&jobfile::layout::host_key_file(&store.running, "a"), published.as_bytes())
            .expect("key");
        let db = db::open(&root.join("server.db").to_string_lossy()).await.expect("db");
        let alice = db::add_account(&db, "alice", db::Kind::Submitter, b"h").await.expect("account");
        let (one, two) = ("00000000000000a1", "00000000000000a2");
        let mut first = db::test_record(&alice, one, "pair", 3, db::JobState::Running);
        first.rebuild = Some(db::RebuildRecord { twin: two.into(), epoch: 1, verdict: None });
        let mut second = db::test_record(&alice, two, "pair", 3, db::JobState::Running);
        second.twin_of = Some(one.into());
        for job in [&first, &second] {
            db::insert_job(&db, job).await.expect("insert");
        }
        (App::for_test(db, store), first, second)
    }

    /// A run's result, log and provenance signed by `key`, staged in done/
    /// as a host stages them, ready for `jobfile::layout::land`.
    fn staged_run(app: &App, job: &JobRecord, key: &HostKey) -> jobfile::layout::Landing {
        let name = jobfile::JobName::parse(&job.file_name).expect("name");
        let stem = job.file_name.trim_end_matches("_i0.tar.xz");
        let dir = app.store.done.join(format!(".stage.{}", job.id));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let (result, provenance, log) = signed_as(&dir, stem, key, "a", &"ab".repeat(32));
        jobfile::layout::Landing { job: name, log: Some(log), provenance: Some(provenance), result }
    }

    async fn verdict_of(app: &App, first: &JobRecord) -> Option<wire::RebuildVerdict> {
        let jobs = db::all_jobs(app.db()).await.expect("jobs");
        settle(app, &jobs).await.expect("settle");
        let first = db::job_by_id(app.db(), &first.id).await.expect("job").expect("there");
        first.rebuild.and_then(|r| r.verdict)
    }

    #[tokio::test]
    async fn a_verdict_is_final_so_a_result_must_never_be_seen_before_its_provenance() {
        // The race: a host that put its result in place before its provenance
        // (as local hosts did) could have its run judged in between, and the
        // verdict is recorded once, for good.
        let tmp = tempfile::tempdir().expect("tempdir");
        let key = HostKey::from_seed([3; 32]);
        let (app, first, second) = local_pair(tmp.path(), &key).await;
        let done = &app.store.done;
        jobfile::layout::land(done, &staged_run(&app, &first, &key)).expect("first run");
        let late = staged_run(&app, &second, &key);
        let result = done.join(late.job.done_file_name());
        jobfile::layout::rename_noreplace(&late.result, &result).expect("the result alone, first");
        let verdict = verdict_of(&app, &first).await.expect("decided in between");
        assert_eq!(verdict.outcome, wire::RebuildOutcome::NotCompared);
        let reason = verdict.reason.clone().unwrap_or_default();
        assert!(reason.contains("the second run's result has no provenance"), "{verdict:?}");
        jobfile::layout::rename_noreplace(
            late.provenance.as_ref().expect("p"),
            &jobfile::layout::provenance_beside(&result),
        )
        .expect("the provenance, too late");
        assert_eq!(verdict_of(&app, &first).await, Some(verdict), "recorded for good");

        // Fixed: every lander lands by `jobfile::layout::land`, the result last
        // (its own test watches the order), so the pair is judged whole.
        let tmp = tempfile::tempdir().expect("tempdir");
        let (app, first, second) = local_pair(tmp.path(), &key).await;
        for job in [&first, &second] {
            let landing = staged_run(&app, job, &key);
            assert!(matches!(
                jobfile::layout::land(&app.store.done, &landing).expect("land"),
                jobfile::layout::Landed::Done(_)
            ));
        }
        let verdict = verdict_of(&app, &first).await.expect("decided");
        assert_eq!(verdict.outcome, wire::RebuildOutcome::Reproducible, "{verdict:?}");
    }
}
