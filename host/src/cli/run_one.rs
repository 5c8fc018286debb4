//! `construir-host run-one`: one job file through one VM, in the foreground.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use super::*;
use anyhow::{bail, Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use construir_host::daemon::{self, RunOptions};
use construir_host::handed;
use construir_host::logger;
use construir_host::queue::{Dirs, Rules};
use jobfile::layout::Beside;
use jobfile::tools::{self};

/// Most bytes of the live console mirrored into `--console` (what the server keeps of one).
const MIRRORED_CONSOLE: u64 = 16 << 20;

/// The images directory to boot from: `--images`, or, for an image handed
/// over by checksum, a checked copy on this machine's own disk under `base`.
fn images_to_boot(a: &RunArgs, job: &jobfile::JobName, checksum: Option<&str>, base: &Path) -> Result<PathBuf> {
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

/// `run-one`: a private spool with the one job in it, run by the daemon
/// until it is empty; then the result and log go beside the job file.
pub(crate) fn run_one(args: RunOneArgs) -> Result<ExitCode> {
    use construir_host::remote::move_file;
    let mut a = args.run;
    logger::init(a.verbose, a.log_format);
    if a.queue.is_some() || a.server.is_some() || a.once {
        bail!("run-one takes the job FILE alone: no QUEUE, --server or --once");
    }
    if a.config.is_some() || a.show_config {
        bail!("run-one reads no config file: give its options on the command line");
    }
    let name = args.file.file_name().and_then(|n| n.to_str()).context("FILE has no file name")?;
    let job = jobfile::JobName::parse(name).with_context(|| format!("{name}: not a job file name"))?;
    let meta = std::fs::symlink_metadata(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    if !meta.is_file() {
        bail!("{} is not a file (a link is not followed)", args.file.display());
    }
    let out = match args.out.clone() {
        Some(dir) => dir,
        None => args.file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned(),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let result_path = out.join(job.done_file_name());
    if result_path.exists() {
        bail!("{} exists already: move it away first", result_path.display());
    }
    let base = a.dirs.work.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let images = images_to_boot(&a, &job, args.image_checksum.as_deref(), &base)?;
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
    let outcome = (|| -> Result<ExitCode> {
        dirs.create_all()?;
        // A copy, checked: the VM writes its result over its disk, and FILE stays as it was.
        let staged = dirs.work.join(".incoming");
        handed::copy_checked(&args.file, &staged, args.job_sha256.as_deref())?;
        if let Some(terms) = &args.terms {
            handed::take_terms(terms, &dirs.running, name.as_ref(), args.terms_sha256.as_deref())?;
        }
        std::fs::rename(&staged, dirs.queue.join(name))?;
        let (opts, stop) = prepare(&a, dirs.clone(), host_id.clone())?;
        let opts = RunOptions { once: true, workers: 1, rules: Rules { settle: Duration::ZERO, ..opts.rules }, ..opts };
        let console = args.console.clone().map(|to| (jobfile::layout::live_console(&dirs.host_dir, name.as_ref()), to));
        run_mirrored(&opts, stop, console)?;
        let result = dirs.done.join(job.done_file_name());
        if result.exists() {
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
        // Failed or refused: the reason (and log, if any) beside where the result would be.
        // The one job of this private queue failed: its entry is whatever has a .reason beside it.
        let reason = std::fs::read_dir(&dirs.failed)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "reason"))
            .and_then(|p| jobfile::layout::read_reason(&p.with_extension("")))
            .map_or_else(|| "ended without a result or a reason".to_owned(), |r| r.why);
        std::fs::write(out.join(format!("{name}.reason")), format!("{reason}\n"))?;
        if let Some(log) = std::fs::read_dir(&dirs.failed)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "log"))
        {
            move_file(&log, &out.join(format!("{name}.log")))?;
        }
        eprintln!("construir-host: {name}: failed: {reason}");
        Ok(ExitCode::from(1))
    })();
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
