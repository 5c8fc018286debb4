//! The Slurm executor (`serve --executor slurm`): the server hands each
//! waiting job to a site's Slurm, which places it on a node, where
//! `construir-host run-one` runs it in a jailed VM as any host would.
//!
//! A job handed to Slurm leaves the queue for `running/.slurm/` (a rename,
//! as a host's claim) and gets an attempt directory on the directory the
//! nodes share, `<dir>/runs/<job id>.<attempt>/`: a copy of the job file,
//! the terms the server left for it, and `run.sh`, the batch script. The
//! script publishes the node's key (`key.pub`), runs `run-one` (result,
//! log and provenance into `out/`, its spool with the live console under
//! `work/`) and writes its exit code into `exit` last. Images reach the
//! nodes in `<dir>/images/`, and `run-one --image-checksum` checks each
//! against the server's before it is used.
//!
//! Exactly once: the database holds one row per job in Slurm (its
//! attempt, its directory, Slurm's id). Only the row's attempt is ever
//! read; a job that goes back to the queue has its directory removed and
//! its Slurm job cancelled, and the next attempt gets a new directory, so
//! a requeued, preempted or resurrected Slurm job can leave nothing the
//! server takes. Slurm is told `--no-requeue`. A result is taken once: it
//! lands in `done/` by rename, and the row goes after. A cancel goes to the
//! node's run-one as a host's cancel request (the VM stops, the partial
//! console comes back); a job still pending, or a run-one that does not
//! stop, is `scancel`led. A result that appears after the cancel is refused.
//! A server that restarts finds its rows and follows them again.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jobfile::arch::Arch;
use jobfile::image::ImageManifest;
use jobfile::layout::{self, AttemptDir, FailLog, Landed, Landing, Terms};

use crate::app::App;
use crate::attempt::Attempt;
use crate::db::{self, DbError, JobRecord, SlurmRun};
use crate::store::{is_own, Store};

mod placement;
pub use placement::{constraints, parse_constraint, Constraints};

/// How the server hands jobs to Slurm (`serve --executor slurm`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The directory every node sees at the same path.
    pub dir: PathBuf,
    pub partition: Option<String>,
    pub account: Option<String>,
    /// The node features each guest architecture's jobs need (Slurm's `--constraint`).
    pub constraints: Constraints,
    /// Each job's resources: the VM's CPUs and memory, and its timeout.
    pub cpus: u32,
    pub memory_mib: u64,
    pub timeout: Duration,
    /// `construir-host` on the nodes.
    pub host_bin: String,
    /// The node's key file, on the node's own disk (never under `dir`).
    pub host_key: String,
    /// Where run-one keeps its private spool, the VM's working copy and
    /// its checked copies of images: a directory on the node's own disk.
    pub node_dir: String,
    /// More arguments for `run-one` (`--accel tcg`, `--vm-ids ...`).
    pub run_args: Vec<String>,
    /// Most jobs in Slurm at once.
    pub max_jobs: usize,
    /// A job that comes back from Slurm without a result this many times fails.
    pub max_attempts: u64,
    /// `sbatch`, `scontrol`, `scancel` (their directory, or none for `PATH`).
    pub bin_dir: Option<PathBuf>,
}

/// What a job's VM may take past its own memory (QEMU, TCG's translation cache).
const MEMORY_OVERHEAD_MIB: u64 = 512;
/// A node's run-one ends a job this long after its timeout at most (its grace, packing).
const GRACE: Duration = Duration::from_secs(180);
/// After a cancel request reaches run-one, how long before the Slurm job is cancelled too.
const CANCEL_GRACE: u64 = 30;
/// How long a Slurm command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

impl Settings {
    fn runs(&self) -> PathBuf {
        self.dir.join("runs")
    }

    fn images(&self) -> PathBuf {
        self.dir.join("images")
    }

    fn command(&self, name: &str) -> tokio::process::Command {
        let program = self.bin_dir.as_ref().map_or_else(|| PathBuf::from(name), |d| d.join(name));
        let mut cmd = tokio::process::Command::new(program);
        cmd.kill_on_drop(true).stdin(std::process::Stdio::null());
        cmd
    }

    /// The memory Slurm grants a job: the VM's and QEMU's own.
    pub fn slurm_memory_mib(&self) -> u64 {
        self.memory_mib + MEMORY_OVERHEAD_MIB
    }

    /// The time Slurm grants a job, in whole minutes: its timeout and the grace.
    pub fn slurm_minutes(&self) -> u64 {
        (self.timeout + GRACE).as_secs().div_ceil(60)
    }
}

/// A Slurm job as `scontrol -o show job` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmJob {
    pub state: String,
    pub node: Option<String>,
    pub reason: String,
}

impl SlurmJob {
    /// Whether Slurm has finished with it (it runs no more, and will not).
    pub fn ended(&self) -> bool {
        matches!(
            self.state.as_str(),
            "COMPLETED"
                | "FAILED"
                | "CANCELLED"
                | "TIMEOUT"
                | "NODE_FAIL"
                | "PREEMPTED"
                | "OUT_OF_MEMORY"
                | "BOOT_FAIL"
                | "DEADLINE"
                | "SPECIAL_EXIT"
                | "REVOKED"
        )
    }

    /// Reads one line of `scontrol -o show job ID`: `Key=Value` words.
    pub fn parse(line: &str) -> Option<SlurmJob> {
        let field = |key: &str| {
            line.split_ascii_whitespace().find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        };
        let state = field("JobState")?.to_owned();
        let node = field("NodeList").filter(|n| !n.is_empty() && *n != "(null)").map(str::to_owned);
        let reason = field("Reason").unwrap_or("None").to_owned();
        Some(SlurmJob { state, node, reason })
    }
}

/// Quotes a word for `sh`.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

impl Settings {
    /// Refuses a node key under the shared directory, where every node could read it.
    pub fn check(&self) -> Result<(), String> {
        for (option, path, why) in [
            ("--slurm-host-key", &self.host_key, "every node can read that directory, and so sign as any other"),
            ("--slurm-node-dir", &self.node_dir, "every node can write that directory, and so change a running job"),
        ] {
            if Path::new(path).starts_with(&self.dir) || !Path::new(path).is_absolute() {
                return Err(format!(
                    "{option} {path} must be an absolute path on each node's own disk, not under --slurm-dir {} ({why})",
                    self.dir.display()
                ));
            }
        }
        Ok(())
    }
}

/// What run-one must find in the attempt, by digest: handed to it in the
/// batch script, which Slurm keeps from the moment `sbatch` takes it (a
/// node that rewrites the attempt's files cannot change these).
pub struct Digests {
    /// The image's `image.toml`.
    pub image: String,
    /// The job file, as the server received it (none for old records).
    pub job: Option<String>,
    /// The terms the server left (`TermFiles::digest`).
    pub terms: String,
}

/// The batch script of one attempt: run the job, note the exit code last.
/// The node's key stays on the node; the server takes only the key the
/// operator pinned for it (`construir-server slurm pin-key`). run-one
/// works on the node's own disk and copies what it runs there, checked
/// against `digests`; the live console comes back as `console`.
pub fn batch_script(settings: &Settings, job: &JobRecord, attempt: u64, dir: &Path, digests: &Digests) -> String {
    let key = quote(&settings.host_key);
    let mut run = vec![
        quote(&settings.host_bin),
        "run-one".into(),
        quote(&format!("./{}", job.file_name)),
        "--images".into(),
        quote(&settings.images().to_string_lossy()),
        "--attempt .".into(),
        format!("--work {}", quote(&settings.node_dir)),
        format!("--image-checksum {} --terms-sha256 {}", digests.image, digests.terms),
        "--host-id \"$node\" --host-key \"$key\"".into(),
        format!("--timeout {}s --memory {}M --cpus {}", settings.timeout.as_secs(), settings.memory_mib, settings.cpus),
    ];
    run.extend(digests.job.iter().map(|sha| format!("--job-sha256 {sha}")));
    run.extend(settings.run_args.iter().map(|a| quote(a)));
    format!(
        "#!/bin/sh\n\
         # Written by construir-server: job {id}, attempt {attempt}. Slurm runs it on a node.\n\
         cd {dir} || exit 2\n\
         # Stopped by Slurm (scancel, preemption, its time limit): no exit note, so the server gives the job back.\n\
         trap 'exit 143' TERM INT\n\
         node=\"${{SLURMD_NODENAME:-$(hostname)}}\"\n\
         key={key}\n\
         {run}\n\
         code=$?\n\
         echo \"$code\" > {note}.part && mv {note}.part {note}\n\
         exit \"$code\"\n",
        note = AttemptDir::EXIT,
        id = job.id,
        dir = quote(&dir.to_string_lossy()),
        run = run.join(" "),
    )
}

/// Runs a Slurm command; its stdout, or what it said when it failed.
async fn slurm(settings: &Settings, name: &str, args: &[String]) -> Result<String, String> {
    let mut cmd = settings.command(name);
    cmd.args(args);
    let out = tokio::time::timeout(COMMAND_TIMEOUT, cmd.output())
        .await
        .map_err(|_| format!("{name} gave no answer within {} s", COMMAND_TIMEOUT.as_secs()))?
        .map_err(|e| format!("cannot run {name}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let said = String::from_utf8_lossy(&out.stderr);
        Err(format!("{name} failed ({}): {}", out.status, jobfile::sanitize(said.trim().as_bytes())))
    }
}

/// What Slurm says of job `id`: `Ok(None)` when it knows no such job (any more).
async fn show(settings: &Settings, id: &str) -> Result<Option<SlurmJob>, String> {
    match slurm(settings, "scontrol", &["-o".into(), "show".into(), "job".into(), id.into()]).await {
        Ok(out) => Ok(out.lines().find_map(SlurmJob::parse)),
        Err(e) if e.contains("Invalid job id") => Ok(None),
        Err(e) => Err(e),
    }
}

/// What Slurm says of every job it knows, by id, in one call; `None`
/// when it cannot be asked (each job is then asked about alone).
async fn show_all(settings: &Settings) -> Option<std::collections::HashMap<String, SlurmJob>> {
    let out = slurm(settings, "scontrol", &["-o".into(), "show".into(), "job".into()]).await.ok()?;
    let id = |line: &str| line.split_ascii_whitespace().find_map(|w| w.strip_prefix("JobId=")).map(str::to_owned);
    Some(out.lines().filter_map(|l| Some((id(l)?, SlurmJob::parse(l)?))).collect())
}

/// The Slurm job of an attempt, found by its name (for a row whose sbatch
/// answer a crash lost).
async fn find_by_name(settings: &Settings, name: &str) -> Result<Option<String>, String> {
    let out = slurm(settings, "squeue", &["-h".into(), "-n".into(), name.into(), "-o".into(), "%i".into()]).await?;
    Ok(out.lines().map(str::trim).find(|l| !l.is_empty()).map(str::to_owned))
}

fn job_name(job_id: &str, attempt: u64) -> String {
    format!("construir.{job_id}.{attempt}")
}

/// Copies image `i<number>` into the shared directory when it is not
/// there as the server has it; returns the sha256 of its `image.toml`.
fn ensure_image(store: &Store, settings: &Settings, number: &str) -> io::Result<String> {
    use jobfile::image::{sha256_file, MANIFEST};
    let name = format!("i{number}");
    let ours = store.images.join(&name);
    let checksum = sha256_file(&ours.join(MANIFEST))?;
    let shared = settings.images().join(&name);
    if sha256_file(&shared.join(MANIFEST)).is_ok_and(|c| c == checksum) {
        return Ok(checksum);
    }
    fs::create_dir_all(settings.images())?;
    let staged = settings.images().join(format!(".{name}.{}.part", std::process::id()));
    let _ = fs::remove_dir_all(&staged);
    fs::create_dir(&staged)?;
    for e in fs::read_dir(&ours)? {
        let e = e?;
        if e.file_type()?.is_file() {
            fs::copy(e.path(), staged.join(e.file_name()))?;
        }
    }
    // The old copy aside first: a node reads the new one whole or the old one whole.
    if shared.exists() {
        let old = settings.images().join(format!(".{name}.{}.old", std::process::id()));
        let _ = fs::remove_dir_all(&old);
        fs::rename(&shared, &old)?;
        let _ = fs::remove_dir_all(&old);
    }
    fs::rename(&staged, &shared)?;
    log::info!("slurm: image {name} copied to {}", shared.display());
    Ok(checksum)
}

/// Prepares the attempt directory: the job file, its terms, the script.
/// Returns the image's architecture, which says where Slurm may place it.
fn prepare(store: &Store, settings: &Settings, job: &JobRecord, attempt: u64, dir: &Path) -> io::Result<Arch> {
    let image = ensure_image(store, settings, &job.image)?;
    let arch = ImageManifest::load(&store.images.join(format!("i{}", job.image))).map_err(io::Error::other)?.arch;
    let _ = fs::remove_dir_all(dir);
    let places = AttemptDir::at(dir);
    fs::create_dir_all(places.out())?;
    fs::copy(store.in_slurm(&job.file_name), places.job(&job.file_name))?;
    let terms = layout::TermFiles::read(&store.running, job.file_name.as_ref()).map_err(io::Error::other)?;
    terms.write(&places.terms())?;
    let digests = Digests { image, job: job.file_sha256.clone(), terms: terms.digest() };
    let script = places.script();
    fs::write(&script, batch_script(settings, job, attempt, dir, &digests))?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
    Ok(arch)
}

/// Hands the oldest waiting jobs to Slurm, up to `max_jobs` there at once.
/// `Ok(false)` when Slurm (or the shared directory) did not take one: that
/// job is back in the queue, its attempt not counted, and the caller waits
/// before it hands Slurm more.
async fn dispatch(app: &App, settings: &Settings, in_slurm: usize) -> Result<bool, DbError> {
    let mut room = settings.max_jobs.saturating_sub(in_slurm);
    if room == 0 {
        return Ok(true);
    }
    for job in db::waiting_jobs(app.db()).await? {
        if room == 0 {
            break;
        }
        if job.state != db::JobState::Waiting || !app.store.waiting_own(&job.file_name, job.file_id) {
            continue;
        }
        fs::create_dir_all(app.store.slurm_dir()).map_err(db::DbError::Io)?;
        let (queued, held) = (app.store.queue.join(&job.file_name), app.store.in_slurm(&job.file_name));
        // A claim as a host's: one rename, which only one of the server, a host or a lease wins.
        if !app.store.move_job(&queued, &held).map_err(db::DbError::Io)? {
            continue;
        }
        if !fs::symlink_metadata(&held).is_ok_and(|m| is_own(&m, job.file_id)) {
            log::warn!(
                "job {}: a file not written by the server took its place in the queue; not handed to Slurm",
                job.id
            );
            let _ = app.store.move_job(&held, &queued);
            continue;
        }
        room -= 1;
        let attempt = job.attempts + 1;
        let dir = settings.runs().join(format!("{}.{attempt}", job.id));
        db::slurm_start(app.db(), &job.id, attempt, &dir.to_string_lossy()).await?;
        let (store, s, j, d) = (app.store.clone(), settings.clone(), job.clone(), dir.clone());
        let prepared = tokio::task::spawn_blocking(move || prepare(&store, &s, &j, attempt, &d))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        let submitted = match prepared {
            Err(e) => Err(format!("cannot prepare its directory {}: {e}", dir.display())),
            Ok(arch) => {
                let args = placement::sbatch_args(settings, &job_name(&job.id, attempt), &dir, arch);
                slurm(settings, "sbatch", &args).await
            }
        };
        match submitted {
            Ok(out) => {
                let id = out.trim().split(';').next().unwrap_or_default().to_owned();
                let pending = format!("slurm job {id} (pending)");
                db::slurm_update(app.db(), &job.id, Some(&id), Some(&pending)).await?;
                log::info!("job {}: handed to Slurm as job {id} (attempt {attempt})", job.id);
            }
            Err(why) => {
                // Slurm's trouble, not the job's: it waits in the queue, its attempt not counted.
                log::error!("job {}: Slurm did not take it ({why}); back in the queue", job.id);
                let _ = fs::remove_dir_all(&dir);
                db::slurm_abandon(app.db(), &job.id, job.attempts).await?;
                app.store.move_job(&held, &queued).map_err(DbError::Io)?;
                app.refresh(&job).await;
                return Ok(false);
            }
        }
        app.refresh(&job).await;
    }
    Ok(true)
}

/// Copies the node's live console (which run-one mirrors into the
/// attempt's `console`) to the server's `running/.slurm/.console.<file>`,
/// bounded, no link followed.
fn copy_console(store: &Store, dir: &Path, file_name: &str) {
    let Ok(attempt) = Attempt::open(dir) else { return };
    let Ok(file) = attempt.open_file(&[AttemptDir::CONSOLE]) else { return };
    let to = store.slurm_console(file_name);
    let from_len = file.metadata().map_or(0, |m| m.len()).min(crate::lease::MAX_CONSOLE);
    if fs::metadata(&to).map_or(0, |m| m.len()) != from_len {
        use std::io::Read;
        let mut data = Vec::new();
        let _ = file.take(crate::lease::MAX_CONSOLE).read_to_end(&mut data);
        let _ = jobfile::layout::write_whole(&to, &data);
    }
}

/// Follows one job in Slurm; `true` when it has ended here.
async fn follow_one(
    app: &App,
    settings: &Settings,
    run: &SlurmRun,
    known: Option<&std::collections::HashMap<String, SlurmJob>>,
) -> Result<bool, DbError> {
    let Some(job) = db::job_by_id(app.db(), &run.job_id).await? else {
        db::slurm_end(app.db(), &run.job_id).await?;
        return Ok(true);
    };
    let dir = PathBuf::from(&run.dir);
    let held = app.store.in_slurm(&job.file_name);
    if !held.exists() {
        // Landed already (a crash came between the result and the row), or moved by hand.
        db::slurm_end(app.db(), &run.job_id).await?;
        let _ = fs::remove_dir_all(&dir);
        return Ok(true);
    }
    let cancelled = app.store.cancel_requested(&job.file_name);
    let Some(slurm_id) = run.slurm_id.clone() else {
        // sbatch's answer was lost with a server: the job is found by its name, or it never reached Slurm.
        match find_by_name(settings, &job_name(&job.id, run.attempt)).await {
            Ok(Some(id)) => db::slurm_update(app.db(), &job.id, Some(&id), None).await?,
            Ok(None) => give_back(app, settings, &job, run, "it never reached Slurm (the server stopped)").await?,
            Err(e) => log::warn!("job {}: cannot ask Slurm about it: {e}", job.id),
        }
        return Ok(false);
    };
    // Slurm, not the shared directory, says whether the job ended and on which node:
    // an exit note is read only once Slurm says its job ended.
    let asked = match known {
        Some(known) => Ok(known.get(&slurm_id).cloned()),
        None => show(settings, &slurm_id).await,
    };
    let seen = match asked {
        Ok(seen) => seen,
        Err(e) => {
            log::warn!("job {}: cannot ask Slurm about job {slurm_id}: {e}", job.id);
            return Ok(false);
        }
    };
    copy_console(&app.store, &dir, &job.file_name);
    match &seen {
        Some(s) if !s.ended() => {
            let shown = match &s.node {
                Some(node) if s.state == "RUNNING" => format!("{node} (slurm job {slurm_id})"),
                _ => format!("slurm job {slurm_id} ({})", s.state.to_lowercase()),
            };
            if run.node.as_deref() != Some(&shown) {
                db::slurm_update(app.db(), &job.id, None, Some(&shown)).await?;
            }
            if cancelled && !run.cancel_sent {
                // Slurm stops it, running or pending; the console so far is already here.
                scancel(settings, &slurm_id).await;
                db::slurm_cancel_sent(app.db(), &job.id).await?;
            } else if cancelled && app.store.cancel_age(&job.file_name).is_some_and(|age| age.as_secs() > CANCEL_GRACE)
            {
                scancel(settings, &slurm_id).await;
            }
            Ok(false)
        }
        // Ended: the exit note may still be on its way through the shared directory.
        _ => {
            let noted = || Attempt::open(&dir).is_ok_and(|a| a.has(&[AttemptDir::EXIT]));
            if !noted() {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            // The node that ran it, as Slurm names it once its job ended.
            let node = seen.as_ref().and_then(|s| s.node.clone());
            if noted() {
                finish(app, settings, &job, run, cancelled, node.as_deref()).await?;
                return Ok(true);
            }
            let how = match &seen {
                Some(s) => format!(
                    "Slurm job {slurm_id} ended {}{} without a result",
                    s.state,
                    s.node.as_ref().map(|n| format!(" on {n}")).unwrap_or_default()
                ),
                None => format!("Slurm no longer knows job {slurm_id}, and it left no result"),
            };
            if cancelled {
                fail(app, &job, run, "cancelled at its submitter's request").await?;
            } else {
                give_back(app, settings, &job, run, &how).await?;
            }
            Ok(true)
        }
    }
}

async fn scancel(settings: &Settings, slurm_id: &str) {
    if let Err(e) = slurm(settings, "scancel", &[slurm_id.to_owned()]).await {
        log::warn!("cannot cancel Slurm job {slurm_id}: {e}");
    }
}

/// An attempt that ended with run-one's exit note: the result landed, the
/// failure and its reason, or (run-one could not run it) another attempt.
/// `node` is the node Slurm says ran it.
async fn finish(
    app: &App,
    settings: &Settings,
    job: &JobRecord,
    run: &SlurmRun,
    cancelled: bool,
    node: Option<&str>,
) -> Result<(), DbError> {
    let dir = PathBuf::from(&run.dir);
    let name = jobfile::JobName::parse(&job.file_name).map_err(|e| DbError::Io(io::Error::other(e)))?;
    let Ok(attempt) = Attempt::open(&dir) else {
        return give_back(app, settings, job, run, "its attempt directory cannot be opened").await;
    };
    let code = attempt.read_small(&[AttemptDir::EXIT], 64).ok().flatten().unwrap_or_default();
    let code = jobfile::sanitize(String::from_utf8_lossy(&code).trim().as_bytes());
    if cancelled {
        // A result that comes after the cancel is refused: the submitter asked for none.
        copy_final_log(&app.store, &attempt, &job.file_name, &name);
        return fail(app, job, run, "cancelled at its submitter's request").await;
    }
    if attempt.has(&[AttemptDir::OUT, &name.done_file_name()]) {
        let Some(node) = node else {
            let how = "Slurm no longer names the node that ran it, so its result cannot be checked";
            return give_back(app, settings, job, run, how).await;
        };
        let (store, job2, node2) = (app.store.clone(), job.clone(), node.to_owned());
        let key = db::node_keys(app.db()).await?.into_iter().find(|(n, _)| n == node).map(|(_, k)| k);
        let staged = tokio::task::spawn_blocking(move || stage_and_check(&store, &attempt, &job2, &node2, key))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        let staged = match staged {
            Ok(staged) => staged,
            Err(why) => {
                log::warn!("job {}: refused the result from {node}: {why}", job.id);
                return fail(app, job, run, &format!("the result from Slurm node {node} was refused: {why}")).await;
            }
        };
        // Recorded before the result lands: whoever reads the result finds the node it must be signed by.
        db::set_ran_on(app.db(), &job.id, &db::RanOn::Slurm(node.to_owned())).await?;
        let (store, file_name) = (app.store.clone(), job.file_name.clone());
        let landed = tokio::task::spawn_blocking(move || land(&store, staged, &file_name))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        landed.map_err(DbError::Io)?;
        log::info!("job {}: done on {node} (slurm job {})", job.id, run.slurm_id.as_deref().unwrap_or("?"));
        db::slurm_end(app.db(), &job.id).await?;
        let _ = fs::remove_dir_all(&dir);
        app.refresh(job).await;
        return Ok(());
    }
    let reason = attempt.read_small(&[AttemptDir::OUT, &format!("{}.reason", job.file_name)], 4096).ok().flatten();
    if let Some(reason) = reason {
        let why = jobfile::sanitize(reason.split(|&b| b == b'\n').next().unwrap_or_default());
        copy_final_log(&app.store, &attempt, &job.file_name, &name);
        return fail(app, job, run, &why).await;
    }
    // run-one could not run it (exit 2): what it said is in Slurm's output.
    let said = tail(&attempt, AttemptDir::SLURM_OUT, 600);
    give_back(app, settings, job, run, &format!("run-one on the node could not run it (exit {code}): {said}")).await
}

/// A result's three files copied out of the attempt onto `done/`'s disk
/// (`.slurm.<name>.part`); what is not landed is removed.
struct Staged(Landing);

impl Drop for Staged {
    fn drop(&mut self) {
        self.0.discard();
    }
}

/// Copies the result, its log and its provenance out of the attempt (no
/// link followed, each within its bound), then checks the copies: signed
/// with the key the operator pinned for `node`, as `node`. What was
/// checked is what lands.
fn stage_and_check(
    store: &Store,
    attempt: &Attempt,
    job: &JobRecord,
    node: &str,
    key: Option<String>,
) -> Result<Staged, String> {
    let key = key.ok_or_else(|| {
        format!("no key is pinned for it (construir-server slurm pin-key {node} KEY, with what construir-host key prints there)")
    })?;
    let key =
        construir_provenance::PublicKey::parse(&key).map_err(|e| format!("its pinned key cannot be read: {e}"))?;
    let name = jobfile::JobName::parse(&job.file_name).map_err(|e| e.to_string())?;
    let take = |file: String, max: u64| -> Result<Option<PathBuf>, String> {
        let to = store.done.join(format!(".slurm.{file}.part"));
        let _ = fs::remove_file(&to);
        let copied =
            attempt.copy_out(&[AttemptDir::OUT, &file], &to, max).map_err(|e| format!("cannot take {file}: {e}"))?;
        Ok(copied.then_some(to))
    };
    let log = take(name.done_with_extension("log"), crate::lease::MAX_CONSOLE * 2)?;
    let provenance =
        take(name.done_with_extension(layout::PROVENANCE_EXTENSION), construir_provenance::MAX_PROVENANCE)?;
    let result = take(name.done_file_name(), job.size)?;
    // Held from here on: whatever is refused below is removed with it.
    let staged = Staged(Landing { job: name, log, provenance, result: result.clone().unwrap_or_default() });
    let result = result.ok_or("no result")?;
    let provenance = staged.0.provenance.as_deref().ok_or("no provenance came with it")?;
    let signers = [(crate::rebuild::Signer::Slurm(node.to_owned()), key)];
    let ran_on = db::RanOn::Slurm(node.to_owned());
    let files = (result.as_path(), provenance, staged.0.log.as_deref());
    crate::rebuild::verify_run(files, Some(&ran_on), job.file_sha256.as_deref(), &signers)?;
    Ok(staged)
}

/// Where run-one's log of a failed job is copied out of the attempt, on
/// `failed/`'s disk, before it lands beside the job.
fn final_log(store: &Store, file_name: &str) -> PathBuf {
    store.failed.join(format!(".slurm.{file_name}.log.part"))
}

/// Copies run-one's log of a failed job out of the attempt (`final_log`);
/// the console so far stands in for it when there is none.
fn copy_final_log(store: &Store, attempt: &Attempt, file_name: &str, name: &jobfile::JobName) {
    let target = final_log(store, file_name);
    for from in [format!("{file_name}.log"), name.done_with_extension("log")] {
        let _ = fs::remove_file(&target);
        if attempt.copy_out(&[AttemptDir::OUT, &from], &target, crate::lease::MAX_CONSOLE * 2).unwrap_or(false) {
            return;
        }
    }
}

/// The last `max` bytes of a text file in the attempt, one line, sanitized.
fn tail(attempt: &Attempt, file: &str, max: u64) -> String {
    let shown = jobfile::sanitize(&attempt.tail(&[file], max));
    let line = shown.split("\\n").filter(|l| !l.trim().is_empty()).collect::<Vec<_>>().join("; ");
    if line.is_empty() {
        "(it said nothing)".to_owned()
    } else {
        line
    }
}

/// Lands a checked result by the queue's one way (`jobfile::layout::land`:
/// the log and provenance, then the result); then the job's file leaves
/// `running/.slurm/`. The server's names are its own: a name taken is this
/// result landed before, and what is still staged goes with `staged`.
fn land(store: &Store, staged: Staged, file_name: &str) -> io::Result<()> {
    let _: Landed = layout::land(&store.done, &staged.0)?;
    drop(staged);
    let _ = fs::remove_file(store.in_slurm(file_name));
    let _ = fs::remove_file(store.slurm_console(file_name));
    Terms::remove_run(&store.running, file_name.as_ref());
    store.forget_cancel(file_name);
    Ok(())
}

/// Ends the job in `failed/` with `reason` (and the console so far, when no log came back).
async fn fail(app: &App, job: &JobRecord, run: &SlurmRun, reason: &str) -> Result<(), DbError> {
    let (store, file_name) = (app.store.clone(), job.file_name.clone());
    let reason_owned = reason.to_owned();
    let moved = tokio::task::spawn_blocking(move || -> io::Result<()> {
        let (copied, console) = (final_log(&store, &file_name), store.slurm_console(&file_name));
        let log = if copied.exists() { &copied } else { &console };
        store.fail(&store.in_slurm(&file_name), &file_name, &reason_owned, Some(FailLog::Move(log)))?;
        let _ = fs::remove_file(&copied);
        let _ = fs::remove_file(&console);
        Terms::remove_run(&store.running, file_name.as_ref());
        store.forget_cancel(&file_name);
        Ok(())
    })
    .await
    .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
    moved.map_err(DbError::Io)?;
    log::info!("job {}: failed: {reason}", job.id);
    db::slurm_end(app.db(), &job.id).await?;
    let _ = fs::remove_dir_all(&run.dir);
    app.refresh(job).await;
    Ok(())
}

/// An attempt that came to nothing: its Slurm job cancelled and its
/// directory removed (nothing it might still leave is ever read), then the
/// job back in the queue, or failed once it has had `max_attempts`.
async fn give_back(app: &App, settings: &Settings, job: &JobRecord, run: &SlurmRun, how: &str) -> Result<(), DbError> {
    if let Some(id) = &run.slurm_id {
        if show(settings, id).await.ok().flatten().is_some_and(|s| !s.ended()) {
            scancel(settings, id).await;
        }
    }
    let _ = fs::remove_dir_all(&run.dir);
    let _ = fs::remove_file(app.store.slurm_console(&job.file_name));
    if run.attempt >= settings.max_attempts {
        let reason = format!("{how}; it came back from Slurm {} times, the most allowed", run.attempt);
        return fail(app, job, run, &reason).await;
    }
    let back = app.store.move_job(&app.store.in_slurm(&job.file_name), &app.store.queue.join(&job.file_name));
    back.map_err(DbError::Io)?;
    log::warn!("job {}: {how}; back in the queue (attempt {} of {})", job.id, run.attempt, settings.max_attempts);
    db::slurm_end(app.db(), &job.id).await?;
    app.refresh(job).await;
    Ok(())
}

/// At start: a job file in `running/.slurm/` that no row holds (a crash
/// between the claim and the row) goes back to the queue.
pub async fn recover(app: &App) -> Result<(), DbError> {
    let rows = db::slurm_runs(app.db()).await?;
    let Ok(rd) = fs::read_dir(app.store.slurm_dir()) else { return Ok(()) };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(job_name) = jobfile::JobName::parse(&name) else { continue };
        let Some(job) = db::job_by_file(app.db(), &name).await? else { continue };
        if rows.iter().any(|r| r.job_id == job.id) {
            continue;
        }
        if app.store.done.join(job_name.done_file_name()).exists() {
            let _ = fs::remove_file(e.path());
        } else if app.store.move_job(&e.path(), &app.store.queue.join(&name)).map_err(DbError::Io)? {
            log::warn!("job {}: it was being handed to Slurm when the server stopped; back in the queue", job.id);
        }
        app.refresh(&job).await;
    }
    Ok(())
}

/// Follows every job in Slurm and hands it more, every `every`, for ever.
/// How long the server waits before it hands Slurm more jobs after Slurm did not take one.
pub const PAUSE: Duration = Duration::from_secs(30);

pub async fn run(app: std::sync::Arc<App>, settings: Settings, every: Duration) {
    if let Err(e) = recover(&app).await {
        log::error!("slurm: cannot recover: {}", jobfile::error_chain(&e));
    }
    let mut paused_until: Option<tokio::time::Instant> = None;
    loop {
        let hand_out = paused_until.is_none_or(|t| tokio::time::Instant::now() >= t);
        match step(&app, &settings, hand_out).await {
            Ok(true) => paused_until = None,
            Ok(false) => {
                log::warn!("slurm: no more jobs are handed to Slurm for {} s", PAUSE.as_secs());
                paused_until = Some(tokio::time::Instant::now() + PAUSE);
            }
            Err(e) => log::error!("slurm: {}", jobfile::error_chain(&e)),
        }
        tokio::time::sleep(every).await;
    }
}

/// Follows every job in Slurm, then (when `hand_out`) hands it more;
/// `Ok(false)` when Slurm did not take one.
async fn step(app: &App, settings: &Settings, hand_out: bool) -> Result<bool, DbError> {
    let runs = db::slurm_runs(app.db()).await?;
    let mut left = runs.len();
    // One question to Slurm for all of them, not one process per job every second.
    let known = if runs.is_empty() { None } else { show_all(settings).await };
    for run in &runs {
        if follow_one(app, settings, run, known.as_ref()).await? {
            left -= 1;
        }
    }
    if !hand_out {
        return Ok(true);
    }
    dispatch(app, settings, left).await
}

/// Whether this machine can hand jobs to Slurm: `sbatch --version` runs,
/// and every `--slurm-constraint` names nodes it could place a job on.
pub async fn check(settings: &Settings) -> Result<String, String> {
    let version = slurm(settings, "sbatch", &["--version".to_owned()]).await.map(|v| v.trim().to_owned())?;
    placement::check(settings).await?;
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn settings(dir: &Path) -> Settings {
        Settings {
            dir: dir.to_owned(),
            partition: None,
            account: None,
            constraints: Constraints::new(),
            cpus: 1,
            memory_mib: 1024,
            timeout: Duration::from_secs(60),
            host_bin: "construir-host".into(),
            host_key: "/var/lib/construir/host.key".into(),
            node_dir: "/var/tmp/construir".into(),
            run_args: Vec::new(),
            max_jobs: 4,
            max_attempts: 3,
            // No Slurm here: a step that asked it would fail, and the test with it.
            bin_dir: Some(dir.join("no-slurm")),
        }
    }

    /// An app on a temporary store and database, with alice's job handed to
    /// Slurm (its file in `running/.slurm/`, its row, its attempt directory).
    async fn handed_to_slurm(root: &Path) -> (std::sync::Arc<App>, JobRecord, SlurmRun) {
        let store = Store::beside(&root.join("queue"));
        store.create_all().expect("dirs");
        let db = db::open(&root.join("server.db").to_string_lossy()).await.expect("db");
        let alice = db::add_account(&db, "alice", crate::db::Kind::Submitter, b"h").await.expect("account");
        let job = db::test_record(&alice, "0123456789abcdef", "hello", 3, db::JobState::Running);
        db::insert_job(&db, &job).await.expect("insert");
        fs::create_dir_all(store.slurm_dir()).expect("mkdir");
        fs::write(store.in_slurm(&job.file_name), b"job").expect("job file");
        let dir = root.join("shared/runs/0123456789abcdef.1");
        fs::create_dir_all(dir.join("out")).expect("mkdir");
        db::slurm_start(&db, &job.id, 1, &dir.to_string_lossy()).await.expect("row");
        db::slurm_update(&db, &job.id, Some("7"), Some("node1 (slurm job 7)")).await.expect("row");
        let app = App::for_test(db, store);
        let run = db::slurm_runs(app.db()).await.expect("rows").remove(0);
        slurm_says(root, "COMPLETED", "node1");
        (app, job, run)
    }

    /// A stand-in `scontrol` that says every job is in `state` on `node`, and a `scancel` that does nothing.
    fn slurm_says(root: &Path, state: &str, node: &str) {
        use std::os::unix::fs::PermissionsExt;
        let bin = root.join("no-slurm");
        fs::create_dir_all(&bin).expect("mkdir");
        let scontrol = format!("#!/bin/sh\necho \"JobId=$4 JobState={state} Reason=None NodeList={node}\"\n");
        for (name, text) in [("scontrol", scontrol.as_str()), ("scancel", "#!/bin/sh\nexit 0\n")] {
            fs::write(bin.join(name), text).expect("write");
            fs::set_permissions(bin.join(name), fs::Permissions::from_mode(0o755)).expect("chmod");
        }
    }

    #[tokio::test]
    async fn a_job_slurm_does_not_take_waits_in_the_queue_its_attempt_not_counted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (app, job, run) = handed_to_slurm(tmp.path()).await;
        // Another job, waiting; Slurm's controller is down.
        db::slurm_end(app.db(), &run.job_id).await.expect("row");
        let store = &app.store;
        assert!(store.move_job(&store.in_slurm(&job.file_name), &store.queue.join(&job.file_name)).expect("back"));
        db::update_state(app.db(), &job.id, db::JobState::Waiting, None, None).await.expect("state");
        fs::create_dir_all(store.images.join("i0")).expect("mkdir");
        fs::write(store.images.join("i0/image.toml"), "kind = \"mini\"\n").expect("image");
        let bin = tmp.path().join("no-slurm");
        fs::create_dir_all(&bin).expect("mkdir");
        fs::write(
            bin.join("sbatch"),
            "#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Unable to contact slurm controller' >&2\nexit 1\n",
        )
        .expect("sbatch");
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(bin.join("sbatch"), fs::Permissions::from_mode(0o755)).expect("chmod");
        let settings = settings(tmp.path());
        let before = db::job_by_id(app.db(), &job.id).await.expect("db").expect("job").attempts;
        assert!(!step(&app, &settings, true).await.expect("step"), "Slurm did not take it: the caller pauses");
        assert!(store.queue.join(&job.file_name).exists(), "back in the queue");
        assert!(db::slurm_runs(app.db()).await.expect("rows").is_empty());
        let record = db::job_by_id(app.db(), &job.id).await.expect("db").expect("job");
        assert_eq!((record.attempts, record.state.as_str()), (before, "waiting"), "nothing counted, nothing failed");
        assert!(!settings.runs().join(format!("{}.{}", job.id, before + 1)).exists(), "no attempt directory is kept");
        assert!(step(&app, &settings, false).await.expect("step"), "paused: nothing handed out");
        assert!(store.queue.join(&job.file_name).exists());
        assert!(
            check(&settings).await.is_err_and(|e| e.contains("Unable to contact slurm controller")),
            "check says why"
        );
    }

    #[tokio::test]
    async fn a_result_that_comes_after_the_cancel_is_refused_and_the_job_fails_as_cancelled() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (app, job, run) = handed_to_slurm(tmp.path()).await;
        let dir = PathBuf::from(&run.dir);
        let name = jobfile::JobName::parse(&job.file_name).expect("name");
        fs::write(dir.join("out").join(name.done_file_name()), b"a result").expect("result");
        fs::write(dir.join("out").join(name.done_with_extension("log")), b"the console\n").expect("log");
        fs::write(dir.join("exit"), b"0\n").expect("exit");
        fs::create_dir_all(jobfile::layout::cancel_dir(&app.store.running)).expect("mkdir");
        fs::write(jobfile::layout::cancel_request(&app.store.running, job.file_name.as_ref()), b"").expect("cancel");
        assert!(follow_one(&app, &settings(tmp.path()), &run, None).await.expect("follow"), "it has ended");
        assert!(!app.store.done.join(name.done_file_name()).exists(), "the result is refused");
        assert_eq!(
            app.store.locate(&job.file_name, None),
            wire::Place::Failed { reason: "cancelled at its submitter's request".into() }
        );
        assert_eq!(fs::read(app.store.failed.join(format!("{}.log", job.file_name))).expect("log"), b"the console\n");
        assert!(db::slurm_runs(app.db()).await.expect("rows").is_empty(), "its row is gone");
        assert!(!dir.exists(), "its attempt directory is gone");
    }

    #[tokio::test]
    async fn an_exit_without_a_result_or_a_reason_gives_the_job_back_and_a_result_without_a_key_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (app, job, run) = handed_to_slurm(tmp.path()).await;
        let dir = PathBuf::from(&run.dir);
        fs::write(dir.join("slurm.out"), b"construir-host: error: image i0 is not the server's\n").expect("out");
        fs::write(dir.join("exit"), b"2\n").expect("exit");
        assert!(follow_one(&app, &settings(tmp.path()), &run, None).await.expect("follow"));
        assert!(app.store.queue.join(&job.file_name).exists(), "back in the queue");
        assert!(!dir.exists(), "nothing of that attempt is kept");
        // Handed out again, it comes back with a result but no key: refused, with why.
        let store = &app.store;
        assert!(store.move_job(&store.queue.join(&job.file_name), &store.in_slurm(&job.file_name)).expect("move"));
        let dir = tmp.path().join("shared/runs/0123456789abcdef.2");
        fs::create_dir_all(dir.join("out")).expect("mkdir");
        db::slurm_start(app.db(), &job.id, 2, &dir.to_string_lossy()).await.expect("row");
        db::slurm_update(app.db(), &job.id, Some("8"), Some("node1 (slurm job 8)")).await.expect("row");
        let name = jobfile::JobName::parse(&job.file_name).expect("name");
        fs::write(dir.join("out").join(name.done_file_name()), b"a result").expect("result");
        fs::write(dir.join("exit"), b"0\n").expect("exit");
        let run = db::slurm_runs(app.db()).await.expect("rows").remove(0);
        assert!(follow_one(&app, &settings(tmp.path()), &run, None).await.expect("follow"));
        assert!(!store.done.join(name.done_file_name()).exists());
        assert_eq!(
            store.locate(&job.file_name, None),
            wire::Place::Failed {
                reason: "the result from Slurm node node1 was refused: no key is pinned for it (construir-server \
                         slurm pin-key node1 KEY, with what construir-host key prints there)"
                    .into()
            }
        );
    }

    #[tokio::test]
    async fn an_exit_note_and_result_are_not_read_while_slurm_says_the_job_has_not_ended() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (app, job, run) = handed_to_slurm(tmp.path()).await;
        let dir = PathBuf::from(&run.dir);
        let name = jobfile::JobName::parse(&job.file_name).expect("name");
        fs::write(dir.join("out").join(name.done_file_name()), b"a forged result").expect("result");
        fs::write(dir.join("exit"), b"0\n").expect("exit");
        for state in ["PENDING", "RUNNING"] {
            slurm_says(tmp.path(), state, "node1");
            assert!(!follow_one(&app, &settings(tmp.path()), &run, None).await.expect("follow"), "{state}: not ended");
            assert!(!app.store.done.join(name.done_file_name()).exists(), "{state}: nothing lands");
            assert!(app.store.in_slurm(&job.file_name).exists(), "{state}: still Slurm's");
        }
    }

    #[tokio::test]
    async fn a_log_linked_to_a_file_the_node_cannot_read_is_not_copied_or_served() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (app, job, run) = handed_to_slurm(tmp.path()).await;
        let dir = PathBuf::from(&run.dir);
        let secret = tmp.path().join("server.db-secret");
        fs::write(&secret, b"token hashes").expect("secret");
        std::os::unix::fs::symlink(&secret, dir.join("out").join(format!("{}.log", job.file_name))).expect("link");
        fs::write(dir.join("out").join(format!("{}.reason", job.file_name)), b"the job broke\n").expect("reason");
        fs::write(dir.join("exit"), b"1\n").expect("exit");
        assert!(follow_one(&app, &settings(tmp.path()), &run, None).await.expect("follow"));
        assert_eq!(app.store.locate(&job.file_name, None), wire::Place::Failed { reason: "the job broke".into() });
        let log = fs::read(app.store.failed.join(format!("{}.log", job.file_name))).unwrap_or_default();
        assert!(!log.windows(12).any(|w| w == b"token hashes"), "the linked file was copied");
    }

    #[test]
    fn scontrol_s_one_line_is_read_for_state_node_and_reason() {
        let line = "JobId=42 JobName=construir.0123456789abcdef.1 UserId=root(0) JobState=RUNNING Reason=None \
                    Dependency=(null) Requeue=0 Restarts=0 BatchFlag=1 ExitCode=0:0 NodeList=node1 BatchHost=node1";
        let job = SlurmJob::parse(line).expect("a job");
        assert_eq!(job, SlurmJob { state: "RUNNING".into(), node: Some("node1".into()), reason: "None".into() });
        assert!(!job.ended());
        let pending = SlurmJob::parse("JobId=43 JobState=PENDING Reason=Resources NodeList=(null)").expect("a job");
        assert_eq!((pending.node, pending.reason.as_str()), (None, "Resources"));
        for state in ["COMPLETED", "CANCELLED", "NODE_FAIL", "PREEMPTED", "TIMEOUT", "OUT_OF_MEMORY"] {
            assert!(SlurmJob::parse(&format!("JobState={state}")).expect("job").ended(), "{state}");
        }
        assert!(SlurmJob::parse("slurm_load_jobs error: Invalid job id specified").is_none());
    }

    #[test]
    fn the_batch_script_quotes_every_path_and_notes_the_exit_code_last() {
        let settings = Settings {
            dir: "/shared/it's".into(),
            partition: None,
            account: None,
            constraints: Constraints::new(),
            cpus: 2,
            memory_mib: 1024,
            timeout: Duration::from_secs(600),
            host_bin: "/opt/construir/bin/construir-host".into(),
            host_key: "/var/lib/construir/host.key".into(),
            node_dir: "/var/tmp/construir".into(),
            run_args: vec!["--accel".into(), "tcg".into()],
            max_jobs: 8,
            max_attempts: 3,
            bin_dir: None,
        };
        let job = crate::db::test_record(
            &crate::db::Account {
                id: 1,
                name: "alice".into(),
                token_hash: vec![],
                disabled: false,
                created: String::new(),
                limits: Default::default(),
                kind: crate::db::Kind::Submitter,
                removed: None,
            },
            "0123456789abcdef",
            "hello",
            1 << 20,
            db::JobState::Waiting,
        );
        let digests = Digests { image: "a".repeat(64), job: Some("b".repeat(64)), terms: "c".repeat(64) };
        let script = batch_script(&settings, &job, 2, Path::new("/shared/it's/runs/x.2"), &digests);
        assert!(script.starts_with("#!/bin/sh\n# Written by construir-server: job 0123456789abcdef, attempt 2."));
        assert!(script.contains("cd '/shared/it'\\''s/runs/x.2' || exit 2"), "{script}");
        assert!(script.contains("key='/var/lib/construir/host.key'"), "{script}");
        assert!(!script.contains("key.pub"), "a node's key is never taken from the shared directory");
        assert!(settings.check().is_ok());
        let under = Settings { host_key: "/shared/it's/keys/node.key".into(), ..settings.clone() };
        assert!(under.check().is_err_and(|e| e.contains("not under --slurm-dir")), "a key every node can read");
        let shared_work = Settings { node_dir: "/shared/it's/work".into(), ..settings.clone() };
        assert!(shared_work.check().is_err_and(|e| e.contains("--slurm-node-dir")), "work every node can write");
        assert!(
            script.contains("'./alice.0123456789abcdef.hello_i0.tar.xz' --images '/shared/it'\\''s/images'"),
            "{script}"
        );
        assert!(script.contains("--timeout 600s --memory 1024M --cpus 2 --job-sha256 bbbb"), "{script}");
        assert!(script.contains("'--accel' 'tcg'"), "{script}");
        assert!(script.contains(&format!("--image-checksum {} --terms-sha256 {}", "a".repeat(64), "c".repeat(64))));
        assert!(script.contains("--work '/var/tmp/construir'") && script.contains("--attempt ."), "{script}");
        assert!(
            script.trim_end().ends_with("echo \"$code\" > exit.part && mv exit.part exit\nexit \"$code\""),
            "{script}"
        );
        assert_eq!((settings.slurm_memory_mib(), settings.slurm_minutes()), (1536, 13));
    }
}
