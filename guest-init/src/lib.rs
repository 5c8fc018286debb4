//! construir-init: PID 1 of the job VM.
//!
//! An ordered checklist (docs/DESIGN.md, "Inside the VM"): mount, read settings,
//! unpack the job disk into `/job`, run `bin/construir`, write
//! `job_status.json`, pack `/job` back onto the disk within its size. Every
//! step that fails is logged and turned into a status; the caller powers off
//! whatever happens.

pub mod caches;
pub mod debug;
pub mod device;
pub mod mounts;
pub mod packages;
pub mod power;
pub mod root;
pub mod runner;

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use jobfile::units::rfc3339;
use jobfile::xz::{EncodeOptions, DEFAULT_MEMLIMIT};
use jobfile::{error_chain, fallback, JobStatus, Outcome, PackError, PackOptions, UnpackOptions};

use crate::runner::{KillScope, RunConfig};
use jobfile::cmdline::Settings;
use jobfile::stages::StageTime;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Logs one line to the console. Never panics: a console that cannot be
/// written to must not take PID 1 down (eprintln! would panic).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "construir-init: {}", format_args!($($arg)*));
    }};
}

/// The paths init works with; tests point them elsewhere.
#[derive(Debug, Clone)]
pub struct Paths {
    pub cmdline: PathBuf,
    pub job_dir: PathBuf,
    pub module_list: PathBuf,
    /// The kernel's uptime (`/proc/uptime`): how long it booted before the job disk was read.
    pub uptime: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            cmdline: "/proc/cmdline".into(),
            job_dir: "/job".into(),
            module_list: device::MODULE_LIST.into(),
            uptime: "/proc/uptime".into(),
        }
    }
}

/// The seconds since the kernel started, from `/proc/uptime`'s first number.
fn uptime(path: &Path) -> Option<Duration> {
    let text = fs::read_to_string(path).ok()?;
    let secs = text.split_ascii_whitespace().next()?.parse::<f64>().ok()?;
    Duration::try_from_secs_f64(secs).ok()
}

/// Boot-time setup that only makes sense as PID 1. In an initramfs whose
/// command line names a `root=` (the Debian images), this loads the root
/// disk's modules and switches to it. An error is fatal: there is no system
/// to run the job in, and the job disk is left as it is.
pub fn setup_system(paths: &Paths) -> Result<(), String> {
    for failure in mounts::mount_all() {
        say!("{failure}");
    }
    console_on_stdio();
    for failure in device::load_modules(&paths.module_list) {
        say!("{failure}");
    }
    let cmdline = fs::read_to_string(&paths.cmdline).unwrap_or_default();
    if let Some(spec) = root::RootSpec::from_cmdline(&cmdline) {
        if root::in_initramfs() {
            let spec = spec.map_err(|e| e.to_string())?;
            let (settings, _) = Settings::from_cmdline(&cmdline);
            root::switch_root(&spec, settings.device_wait).map_err(|e| e.to_string())?;
            for failure in mounts::mount_all() {
                say!("{failure}");
            }
        }
    }
    if let Err(e) = mounts::remount_root_rw() {
        say!("cannot remount / read-write: {e}");
    }
    if let Err(e) = nix::unistd::sethostname("construir") {
        say!("cannot set the hostname: {e}");
    }
    if let Err(e) = loopback_up() {
        say!("cannot bring up lo: {e}");
    }
    Ok(())
}

/// Steps 2 to 6: settings, unpack, run, status, pack. Returns the final status.
pub fn run_job_disk(paths: &Paths, kill_scope: KillScope) -> JobStatus {
    let cmdline = fs::read_to_string(&paths.cmdline).unwrap_or_default();
    let (settings, warnings) = Settings::from_cmdline(&cmdline);
    for w in warnings {
        say!("{w}");
    }
    if let (Some(deadline), KillScope::Everything) = (settings.deadline, kill_scope) {
        power::watchdog(deadline);
    }
    // Where the time went: the host's stages before the VM, then the kernel's boot to here.
    let mut stages = settings.stages.clone();
    stages.extend(uptime(&paths.uptime).map(|t| StageTime::new("boot", t)));
    let mut status = JobStatus {
        init_version: VERSION.to_owned(),
        image: settings.image.clone(),
        job: settings.name.clone(),
        stages,
        ..JobStatus::default()
    };
    let mut disk = match device::open_job_device(&settings.job_device, settings.device_wait) {
        Ok(d) => d,
        Err(e) => {
            say!("{e}");
            // Nowhere to write a result: the host sees no status and reports it.
            status.message = Some(e.to_string());
            return status;
        }
    };
    say!("job disk {} ({} bytes)", settings.job_device.display(), jobfile::zero::capacity(&mut disk).unwrap_or(0));
    if let Some(device) = &settings.packages {
        // A layer's build: install, then the status and apt's last words onto the status disk.
        packages::build_layer(device, settings.device_wait, kill_scope, &mut status);
        finish_with_fallback(&mut disk, &status, Path::new(packages::WORK));
        return status;
    }
    status.layer = settings.layer.clone();
    status.packages = packages::installed(Path::new("/")).map(|r| r.install).unwrap_or_default();
    if let Some(layer) = &status.layer {
        say!("the root is layer {layer}: {} packages installed for this job", status.packages.len());
    }

    let unpacking = Instant::now();
    let unpacked = unpack(&mut disk, &paths.job_dir, &mut status);
    status.stages.push(StageTime::new("unpack", unpacking.elapsed()));
    if let Err(e) = unpacked {
        say!("bad job archive: {e}");
        status.result = Outcome::BadArchive;
        status.message = Some(format!("cannot unpack the job: {e}"));
        finish_with_fallback(&mut disk, &status, &paths.job_dir);
        return status;
    }
    let script = paths.job_dir.join(jobfile::JOB_SCRIPT);
    // A verified rebuild's two runs date what they make alike (reproducible-builds.org's variable).
    let epoch: Vec<(String, String)> =
        settings.epoch.map(|e| ("SOURCE_DATE_EPOCH".to_owned(), e.to_string())).into_iter().collect();
    if let Some(why) = undeclared(paths, &settings) {
        say!("{why}");
        status.result = Outcome::InstallFailed;
        status.message = Some(why);
    } else if fs::metadata(&script).is_err() {
        say!("the job has no bin/construir");
        status.result = Outcome::NoJobScript;
        status.message = Some("the job archive has no bin/construir".into());
    } else {
        let given = caches_named(paths, &settings);
        status.caches = caches::mount_all(&given, settings.device_wait);
        let names: Vec<String> = given.into_iter().map(|g| g.name).collect();
        let mut env = jobfile::caches::variables(&names);
        env.extend(epoch.iter().cloned());
        run(&settings, paths, &script, &env, kill_scope, &mut status);
        let job = status.duration_secs.and_then(|s| Duration::try_from_secs_f64(s).ok());
        status.stages.extend(job.map(|t| StageTime::new("job", t)));
        caches::unmount_all(&status.caches);
    }
    pack(&mut disk, &settings, paths, &mut status);
    if settings.debug && status.result != Outcome::Ok {
        let shell = debug::Shell {
            job_dir: &paths.job_dir,
            job_name: settings.name.as_deref(),
            env: &epoch,
            device_wait: settings.device_wait,
        };
        debug::serve(&disk, &shell);
    }
    status
}

/// The caches the job named: as the host gives them, or, when the host did
/// not read the job's `construir.toml` (not the archive's first file), as
/// that file names them, none given.
fn caches_named(paths: &Paths, settings: &Settings) -> Vec<jobfile::caches::Given> {
    if settings.declared {
        return settings.caches.clone();
    }
    let Ok(text) = fs::read_to_string(paths.job_dir.join(jobfile::deps::DECLARATION)) else { return Vec::new() };
    let Ok(d) = jobfile::deps::Declaration::parse(&text) else { return Vec::new() };
    d.caches.into_iter().map(|name| jobfile::caches::Given { name, version: None }).collect()
}

/// Why the job cannot run for want of its packages: it declares some in
/// `construir.toml`, but the host did not read that (it reads it only as
/// the archive's first file), so nothing was installed.
fn undeclared(paths: &Paths, settings: &Settings) -> Option<String> {
    if settings.declared {
        return None;
    }
    let text = fs::read_to_string(paths.job_dir.join(jobfile::deps::DECLARATION)).ok()?;
    match jobfile::deps::Declaration::parse(&text) {
        Ok(d) if d.is_empty() => None,
        Ok(_) => Some(format!(
            "{} declares packages but is not the job archive's first file, so the host did not install them; \
             pack the job with `job pack` (it puts the file first) or name it first to tar",
            jobfile::deps::DECLARATION
        )),
        Err(e) => Some(format!("{e}; nothing was installed")),
    }
}

fn unpack(disk: &mut File, job_dir: &Path, status: &mut JobStatus) -> Result<(), String> {
    fs::create_dir_all(job_dir).map_err(|e| format!("cannot create {}: {e}", job_dir.display()))?;
    disk.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let mut archive = jobfile::read_job(BufReader::with_capacity(1 << 20, &mut *disk), DEFAULT_MEMLIMIT)
        .map_err(|e| e.to_string())?;
    // The job's own modes, exactly: it is the submitter's tree, unpacked as root in a throwaway VM.
    let opts = UnpackOptions {
        preserve_owner: true,
        keep_special_bits: true,
        max_entries: 10_000_000,
        max_bytes: u64::MAX,
        umask: 0,
    };
    let report = jobfile::unpack(&mut archive, job_dir, &opts).map_err(|e| error_chain(&e))?;
    say!("unpacked {} files, {} directories, {} links", report.files, report.dirs, report.symlinks + report.hardlinks);
    for s in &report.skipped {
        say!("skipped {}: {}", s.path, s.reason);
        status.skipped_entries.push(format!("{}: {}", s.path, s.reason));
    }
    if report.skipped_total > report.skipped.len() as u64 {
        status.skipped_entries.push(format!("... and {} more", report.skipped_total - report.skipped.len() as u64));
    }
    Ok(())
}

fn run(
    settings: &Settings,
    paths: &Paths,
    script: &Path,
    env: &[(String, String)],
    kill_scope: KillScope,
    status: &mut JobStatus,
) {
    let cfg = RunConfig {
        job_dir: paths.job_dir.clone(),
        script: script.to_owned(),
        output: paths.job_dir.join(jobfile::OUTPUT_FILE),
        timeout: settings.timeout,
        job_name: settings.name.clone(),
        kill_scope,
        console_max: settings.console_max,
        env: env.to_vec(),
    };
    say!(
        "running bin/construir{}",
        settings.timeout.map(|t| format!(" (timeout {} s)", t.as_secs())).unwrap_or_default()
    );
    match runner::run_job(&cfg, Box::new(io::stderr())) {
        Ok(o) => {
            status.exit_code = o.exit_code;
            status.signal = o.signal;
            status.timed_out = o.timed_out;
            status.started_at = Some(rfc3339(o.started));
            status.ended_at = Some(rfc3339(o.ended));
            status.duration_secs = Some((o.duration.as_secs_f64() * 1000.0).round() / 1000.0);
            status.output_bytes = Some(o.output_bytes);
            status.killed_leftovers = Some(o.leftovers);
            status.result = match (o.timed_out, o.exit_code) {
                (true, _) => Outcome::TimedOut,
                (false, Some(0)) => Outcome::Ok,
                _ => Outcome::Failed,
            };
            say!(
                "job ended: {} (exit code {}, signal {}) after {:.1} s, {} bytes of output, {} leftover processes killed",
                status.result.as_str(),
                o.exit_code.map_or("-".into(), |c| c.to_string()),
                o.signal.map_or("-".into(), |s| s.to_string()),
                o.duration.as_secs_f64(),
                o.output_bytes,
                o.leftovers
            );
        }
        Err(e) => {
            say!("cannot run the job: {e}");
            status.result = Outcome::Failed;
            status.message = Some(format!("cannot run bin/construir: {e}"));
            let now = rfc3339(SystemTime::now());
            status.started_at = Some(now.clone());
            status.ended_at = Some(now);
        }
    }
}

/// Packs `/job` onto the disk with the status as its first entry (given from
/// memory: it never depends on the job's free space or on what the job left
/// at that name); when it does not fit, writes the fallback archive instead.
fn pack(disk: &mut File, settings: &Settings, paths: &Paths, status: &mut JobStatus) {
    let threads = match settings.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        n => n,
    };
    let opts = PackOptions {
        encode: EncodeOptions { preset: settings.xz_preset, threads },
        exclude: None,
        prepend: vec![(jobfile::STATUS_FILE.into(), status.to_json())],
        first: vec![jobfile::OUTPUT_FILE.into()],
    };
    match jobfile::pack_onto(&paths.job_dir, disk, &opts) {
        Ok(report) => say!(
            "packed /job: {} entries, {} bytes; result {}",
            report.entries,
            report.compressed_len,
            status.result.as_str()
        ),
        Err(PackError::TooLarge { needed, capacity, estimated }) => {
            let about = if estimated { "about " } else { "" };
            say!("/job needs {about}{needed} bytes packed, the job file holds {capacity}: writing the status and the end of the output");
            status.result = Outcome::OutputTooLarge;
            status.needed_bytes = Some(needed);
            status.capacity_bytes = Some(capacity);
            status.needed_bytes_estimated = estimated;
            status.message = Some(format!(
                "the packed /job needs {about}{needed} bytes{}; the job file holds {capacity}",
                if estimated { " (estimated: packing stopped once it could not fit)" } else { "" }
            ));
            finish_with_fallback(disk, status, &paths.job_dir);
        }
        Err(e) => {
            say!("cannot pack /job: {}", error_chain(&e));
            status.message = Some(format!("cannot pack /job: {}", error_chain(&e)));
            finish_with_fallback(disk, status, &paths.job_dir);
        }
    }
}

/// The status and the tail of the output, always within 64 KiB.
fn finish_with_fallback(disk: &mut File, status: &JobStatus, job_dir: &Path) {
    let tail = read_tail(&job_dir.join(jobfile::OUTPUT_FILE), fallback::FALLBACK_TAIL as u64);
    let capacity = jobfile::zero::capacity(disk).unwrap_or(0);
    let written = fallback::build(&status.to_json(), &tail, capacity).and_then(|(stream, kept)| {
        fallback::write_onto(disk, &stream)?;
        Ok((stream.len(), kept))
    });
    match written {
        Ok((len, kept)) => say!(
            "wrote the fallback result: {len} bytes, last {kept} bytes of output; result {}",
            status.result.as_str()
        ),
        Err(e) => say!("cannot write the fallback result: {e}"),
    }
}

fn read_tail(path: &Path, max: u64) -> Vec<u8> {
    let mut tail = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if f.seek(SeekFrom::Start(len.saturating_sub(max))).is_ok() {
            let _ = f.take(max).read_to_end(&mut tail);
        }
    }
    tail
}

/// PID 1's stdio must reach the console even if the kernel could not open
/// /dev/console for us (an initramfs without the node).
fn console_on_stdio() {
    if nix::fcntl::fcntl(io::stderr(), nix::fcntl::FcntlArg::F_GETFD).is_ok() {
        return;
    }
    let Ok(console) = fs::OpenOptions::new().read(true).write(true).open("/dev/console") else { return };
    let failed: Vec<&str> = [
        ("stdin", nix::unistd::dup2_stdin(&console)),
        ("stdout", nix::unistd::dup2_stdout(&console)),
        ("stderr", nix::unistd::dup2_stderr(&console)),
    ]
    .into_iter()
    .filter_map(|(name, r)| r.is_err().then_some(name))
    .collect();
    if !failed.is_empty() {
        // With no console on stdio, the kernel's log is the one place left to say so.
        let _ = fs::OpenOptions::new().write(true).open("/dev/kmsg").and_then(|mut k| {
            io::Write::write_all(
                &mut k,
                format!("construir-init: cannot put the console on {}\n", failed.join(", ")).as_bytes(),
            )
        });
    }
}

/// Brings up the loopback interface (the only network a job has by default).
fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain socket for the SIOCGIFFLAGS/SIOCSIFFLAGS ioctls; closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: the ioctls read and write `req`, which lives across both calls.
    let result = unsafe {
        if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) < 0 {
            Err(io::Error::last_os_error())
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(sock) };
    result
}
