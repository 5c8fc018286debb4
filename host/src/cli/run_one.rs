//! `construir-host run-one`: one job file through one VM, in the foreground.

use construir_host::limits::Limits;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use construir_host::daemon::{self, RunOptions};
use construir_host::queue::{Dirs, Rules};
use construir_host::remote::move_file;
use construir_host::{handed, logger};
use jobfile::layout::{beside_entry, AttemptDir, Beside};
use jobfile::{tools, JobName};

use super::args::{RunArgs, RunOneArgs};
use super::setup::{emulators_found, prepare};

/// Most bytes of the live console mirrored into `--console` (what the server keeps of one).
const MIRRORED_CONSOLE: u64 = 16 << 20;

/// The images directory to boot from: `--images`, or, for an image handed
/// over by checksum, a checked copy on this machine's own disk under `base`.
fn images_to_boot(a: &RunArgs, job: &JobName, checksum: Option<&str>, base: &Path) -> Result<PathBuf> {
    let images = a.dirs.images.clone().context("give --images DIR: where the base images (i<N>/image.toml) are")?;
    let Some(expected) = checksum else { return Ok(images) };
    handed::local_image(&images, job.image(), expected, &base.join("construir-images"))
        .with_context(|| format!("image i{} in {} is not the server's", job.image(), images.display()))
}

/// Runs the daemon over the private spool; with `console` (from, to), the
/// live console is mirrored to `to` while it runs.
fn run_mirrored(opts: &RunOptions, stop: Arc<AtomicBool>, console: Option<(PathBuf, PathBuf)>) -> Result<()> {
    let running = Arc::new(AtomicBool::new(true));
    let mirror = console.map(|(from, to)| {
        let running = running.clone();
        std::thread::spawn(move || handed::mirror_console(from, to, MIRRORED_CONSOLE, running))
    });
    let ran = daemon::run(opts, stop);
    running.store(false, Ordering::Relaxed);
    if let Some(mirror) = mirror {
        let _ = mirror.join();
    }
    ran?;
    Ok(())
}

/// Where run-one takes the job's terms from and puts what comes of it.
struct Places {
    out: PathBuf,
    terms: Option<PathBuf>,
    console: Option<PathBuf>,
}

impl Places {
    /// From `--attempt` (a Slurm attempt's fixed places), or `--out`,
    /// `--terms` and `--console` (the result beside FILE by default).
    fn of(args: &RunOneArgs) -> Result<Places> {
        let places = match &args.attempt {
            Some(dir) => {
                let attempt = AttemptDir::at(dir);
                Places { out: attempt.out(), terms: Some(attempt.terms()), console: Some(attempt.console()) }
            }
            None => Places {
                out: args.out.clone().unwrap_or_else(|| {
                    args.file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned()
                }),
                terms: args.terms.clone(),
                console: args.console.clone(),
            },
        };
        if args.terms_sha256.is_some() && places.terms.is_none() {
            bail!("--terms-sha256 checks the terms given with --terms or --attempt: give one");
        }
        Ok(places)
    }
}

/// `run-one`: a private spool with the one job in it, run by the daemon
/// until it is empty; then the result and log go beside the job file.
pub(crate) fn run_one(args: RunOneArgs) -> Result<ExitCode> {
    let places = Places::of(&args)?;
    let RunOneArgs { file, run: mut a, image_checksum, job_sha256, terms_sha256, .. } = args;
    logger::init(a.verbose, a.log_format);
    if a.queue.is_some() || a.server.is_some() || a.once {
        bail!("run-one takes the job FILE alone: no QUEUE, --server or --once");
    }
    if a.config.is_some() || a.show_config {
        bail!("run-one reads no config file: give its options on the command line");
    }
    let name = file.file_name().and_then(|n| n.to_str()).context("FILE has no file name")?;
    let job = JobName::parse(name).with_context(|| format!("{name}: not a job file name"))?;
    let meta = std::fs::symlink_metadata(&file).with_context(|| format!("cannot read {}", file.display()))?;
    if !meta.is_file() {
        bail!("{} is not a file (a link is not followed)", file.display());
    }
    std::fs::create_dir_all(&places.out).with_context(|| format!("cannot create {}", places.out.display()))?;
    let result_path = places.out.join(job.done_file_name());
    if result_path.exists() {
        bail!("{} exists already: move it away first", result_path.display());
    }
    let base = a.dirs.work.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let images = images_to_boot(&a, &job, image_checksum.as_deref(), &base)?;
    let spool = nix::unistd::mkdtemp(&base.join("construir-run-one.XXXXXX"))
        .with_context(|| format!("cannot make a spool in {}", base.display()))?;
    let host_id = a.host_id.clone().unwrap_or_else(daemon::default_host_id);
    // The key outlives the private spool: beside the images, as a host's is beside its queue.
    if a.host_key.is_none() {
        let beside = a.dirs.images.clone().unwrap_or_else(|| images.clone());
        a.host_key = Some(construir_host::provenance::default_key_path(&beside.join("queue"), &host_id));
    }
    let shared = Beside { images, ..Beside::queue(&spool.join("queue")) };
    let dirs = Dirs::of(shared, &host_id, spool.join("work"));
    let handed = Handed {
        file: &file,
        job_sha256: job_sha256.as_deref(),
        terms_sha256: terms_sha256.as_deref(),
        host_id: &host_id,
    };
    let outcome = run_in_spool(&a, &handed, &places, &dirs, &job);
    if let Err(e) = std::fs::remove_dir_all(&spool) {
        log::warn!("cannot remove the spool {}: {e}", spool.display());
    }
    match outcome {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("construir-host: error: {e:#}");
            Ok(ExitCode::from(2))
        }
    }
}

/// What the caller handed run-one, and the digests to check it against.
struct Handed<'a> {
    file: &'a Path,
    job_sha256: Option<&'a str>,
    terms_sha256: Option<&'a str>,
    host_id: &'a str,
}

/// Runs the one job in the private spool `dirs`, then hands out what came
/// of it: the result with its log and provenance, or its reason and log.
fn run_in_spool(a: &RunArgs, handed: &Handed, places: &Places, dirs: &Dirs, job: &JobName) -> Result<ExitCode> {
    let name = job.input_file_name();
    dirs.create_all()?;
    // A copy, checked: the VM writes its result over its disk, and FILE stays as it was.
    let staged = dirs.work.join(".incoming");
    handed::copy_checked(handed.file, &staged, handed.job_sha256)?;
    if let Some(terms) = &places.terms {
        handed::take_terms(terms, &dirs.running, name.as_ref(), handed.terms_sha256)?;
    }
    std::fs::rename(&staged, dirs.queue.join(&name))?;
    let (opts, stop) = prepare(a, dirs.clone(), handed.host_id.to_owned(), emulators_found(a)?)?;
    // One job handed over by a scheduler: nobody could reach a session here, so it opens none.
    let limits = Limits { debug: None, ..opts.limits };
    let opts =
        RunOptions { once: true, workers: 1, rules: Rules { settle: Duration::ZERO, ..opts.rules }, limits, ..opts };
    let console = places.console.clone().map(|to| (jobfile::layout::live_console(&dirs.host_dir, name.as_ref()), to));
    run_mirrored(&opts, stop, console)?;
    hand_out(dirs, job, &places.out)
}

/// Moves what the job left in the spool to `out`: a result with its log and
/// provenance (the result last), or the failed job's reason and log.
fn hand_out(dirs: &Dirs, job: &JobName, out: &Path) -> Result<ExitCode> {
    let name = job.input_file_name();
    let result = dirs.done.join(job.done_file_name());
    if result.exists() {
        let result_path = out.join(job.done_file_name());
        let log = dirs.done.join(job.done_with_extension("log"));
        let verdict = tools::log_verdict(&log).unwrap_or_else(|| "(no verdict)".to_owned());
        move_file(&log, &out.join(job.done_with_extension("log")))?;
        let provenance = jobfile::layout::provenance_beside(&result);
        if provenance.exists() {
            move_file(&provenance, &jobfile::layout::provenance_beside(&result_path))?;
        }
        move_file(&result, &result_path)?;
        println!("{}", result_path.display());
        eprintln!("construir-host: {name}: {verdict}");
        return Ok(if verdict.starts_with("ok") { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    // Failed or refused: the one job of this private queue has a .reason beside it.
    let beside = |ext: &str| {
        std::fs::read_dir(&dirs.failed)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == ext))
    };
    let reason = beside("reason")
        .and_then(|p| jobfile::layout::read_reason(&p.with_extension("")))
        .map_or_else(|| "ended without a result or a reason".to_owned(), |r| r.why);
    let entry = out.join(&name);
    std::fs::write(beside_entry(&entry, "reason"), format!("{reason}\n"))?;
    if let Some(log) = beside("log") {
        move_file(&log, &beside_entry(&entry, "log"))?;
    }
    eprintln!("construir-host: {name}: failed: {reason}");
    Ok(ExitCode::from(1))
}
