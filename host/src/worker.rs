//! One job, from claimed to delivered: working copy, VM, verdict, result.
//! Whatever happens, the claimed file ends in exactly one of `done/`
//! (after its result is durable), `failed/`, or back in `queue/` when the
//! host is stopping.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobfile::image::ImageManifest;
use jobfile::xz::DEFAULT_MEMLIMIT;
use jobfile::{path_is, JobName, JobStatus};

use crate::cgroup;
use crate::jail::Identity;
use crate::qemu::{self, Accel, Bounds, Cut, VmSpec};
use crate::queue::{self, Dirs};

/// Largest job_status.json the host reads from a result.
const MAX_STATUS: u64 = 64 << 10;

/// What every job on this host gets.
#[derive(Debug, Clone)]
pub struct Limits {
    pub timeout: Duration,
    pub grace: Duration,
    pub memory_mib: u64,
    pub cpus: u32,
    pub networking: bool,
    pub console_limit: usize,
    pub accel: Accel,
    pub qemu: PathBuf,
    pub host_id: String,
    /// Who QEMU runs as (when the host is root).
    pub identity: Option<Identity>,
    /// End a VM that prints nothing on its console for this long.
    pub silence: Option<Duration>,
    /// Where each VM gets a cgroup of its own (cgroup v2, writable).
    pub cgroups: Option<cgroup::Parent>,
}

/// How a job ended, for the host's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Done { path: PathBuf, verdict: String },
    Failed { path: PathBuf, reason: String },
    Requeued,
}

/// Runs a claimed job (`running/<file_name>`) to its end.
pub fn run(
    dirs: &Dirs,
    limits: &Limits,
    file_name: &OsString,
    job: &JobName,
    stop: &Arc<AtomicBool>,
) -> io::Result<Ending> {
    let label = job.input_file_name();
    let claimed = dirs.running.join(file_name);
    let image_dir = dirs.images.join(format!("i{}", job.image()));
    let manifest = match ImageManifest::load(&image_dir) {
        Ok(m) => m,
        Err(e) => {
            return fail(dirs, &claimed, &format!("unknown image i{}: {}", job.image(), jobfile::error_chain(&e)), None)
        }
    };
    // The job's own directory: the working copy and QEMU's temporary files, QEMU's alone.
    let job_dir = dirs.work.join(format!("{}.{label}", limits.host_id));
    let _cleanup = RemoveDir(job_dir.clone());
    make_private_dir(&job_dir, limits.identity)?;
    let work = job_dir.join("disk");
    let size = queue::working_copy(&claimed, &work)?;
    let cmdline = format!(
        "console=ttyS0 panic=-1 quiet loglevel=3 {} construir.job={} construir.timeout={} construir.name={} construir.image={} construir.console={}",
        manifest.cmdline,
        manifest.job_device,
        limits.timeout.as_secs(),
        job.name(),
        job.image(),
        limits.console_limit
    );
    let root_disk = manifest.root_disk.as_ref().map(|r| image_dir.join(r));
    let root_size = root_disk.as_deref().and_then(qcow2_virtual_size).unwrap_or(0);
    // Guest memory plus room for QEMU itself (TCG's translation cache among it).
    let group = match &limits.cgroups {
        Some(parent) => {
            let name = format!("{}.{label}", limits.host_id);
            Some(parent.create(&name, (limits.memory_mib + 1024) << 20, 1024, limits.cpus)?)
        }
        None => None,
    };
    let spec = VmSpec {
        cgroup_procs: group.as_ref().map(|g| g.procs.clone()),
        qemu: limits.qemu.clone(),
        accel: limits.accel,
        memory_mib: limits.memory_mib,
        cpus: limits.cpus,
        kernel: image_dir.join(&manifest.kernel),
        initrd: image_dir.join(&manifest.initrd),
        cmdline,
        root_disk,
        job_disk: work.clone(),
        networking: limits.networking,
        tmpdir: job_dir.clone(),
        name: format!("construir.{}.{}", limits.host_id, job.input_file_name()),
        identity: limits.identity,
        // The job disk never grows; the snapshot overlay grows at most to the root disk's size.
        file_size_limit: size.max(root_size) + (1 << 30),
    };
    log::info!(
        "job {label}: booting image i{} ({}, {} MiB, {} CPUs, job disk {} bytes{})",
        job.image(),
        limits.accel.name(),
        limits.memory_mib,
        limits.cpus,
        size,
        match limits.identity {
            Some(id) => format!(", QEMU as uid {}", id.uid),
            None => String::new(),
        }
    );
    let started = Instant::now();
    let bounds = Bounds {
        deadline: limits.timeout + limits.grace,
        silence: limits.silence,
        console_limit: limits.console_limit,
    };
    let vm = match qemu::run(&spec, bounds, stop) {
        Ok(vm) => vm,
        Err(e) => return fail(dirs, &claimed, &format!("cannot run QEMU: {}", jobfile::error_chain(&e)), None),
    };
    if vm.cut == Some(Cut::Stop) {
        queue::requeue(dirs, file_name)?;
        log::info!("job {label}: VM stopped because the host is stopping; back in the queue");
        return Ok(Ending::Requeued);
    }
    let secs = vm.elapsed.as_secs_f64();
    let how = match (vm.cut, &vm.status) {
        (Some(Cut::Deadline), _) => format!(
            "VM killed after {secs:.1} s: past the job timeout ({} s) plus grace ({} s)",
            limits.timeout.as_secs(),
            limits.grace.as_secs()
        ),
        (Some(Cut::Silence), _) => format!(
            "VM killed after {secs:.1} s: no console output for {} s",
            limits.silence.map_or(0, |s| s.as_secs())
        ),
        (_, Some(st)) if st.success() => format!("VM powered off after {secs:.1} s"),
        // pvpanic with -action panic=exit-failure: QEMU exits 1 when the guest kernel panics.
        (_, Some(st)) if st.code() == Some(1) && vm.stderr.is_empty() => {
            format!("the guest kernel panicked after {secs:.1} s")
        }
        (_, Some(st)) => format!("QEMU exited with {st} after {secs:.1} s{}", stderr_note(&vm.stderr)),
        (_, None) => "QEMU ended".to_owned(),
    };
    log::info!("job {label}: {how}; {} bytes of console output", vm.console.received());

    let status = if vm.cut.is_some() { None } else { read_status(&work) };
    match status {
        Some(st) => {
            let verdict = verdict(&st, &how, started.elapsed());
            let log = vm.console.finish(&verdict);
            match queue::deliver(dirs, &work, job, &log) {
                Ok(path) => {
                    fs::remove_file(&claimed)?;
                    queue::sync_dirs(&[&dirs.running])?;
                    Ok(Ending::Done { path, verdict })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    // Keep both: the result goes to failed/ in place of the input, which is no longer needed.
                    let reason =
                        format!("done/{} already exists; this result was not delivered there", job.done_file_name());
                    let kept = dirs.work.join(job.done_file_name());
                    fs::rename(&work, &kept)?;
                    let path = queue::fail(dirs, &kept, &reason, Some(&log))?;
                    fs::remove_file(&claimed)?;
                    Ok(Ending::Failed { path, reason })
                }
                Err(e) => Err(e),
            }
        }
        None => {
            let reason = format!("no result: {how}; the job disk holds no job_status.json");
            let log = vm.console.finish(&format!("failed: {reason}"));
            fail(dirs, &claimed, &reason, Some(&log))
        }
    }
}

/// Creates the job's directory, mode 0700, owned by QEMU's user when there is one.
fn make_private_dir(dir: &Path, identity: Option<Identity>) -> io::Result<()> {
    let _ = fs::remove_dir_all(dir);
    fs::DirBuilder::new().mode(0o700).create(dir)?;
    if let Some(id) = identity {
        std::os::unix::fs::chown(dir, Some(id.uid), Some(id.gid))?;
    }
    Ok(())
}

/// Removes a directory tree when dropped.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A qcow2 image's virtual size (big-endian u64 at byte 24 of its header).
fn qcow2_virtual_size(path: &Path) -> Option<u64> {
    let mut header = [0u8; 32];
    File::open(path).ok()?.read_exact(&mut header).ok()?;
    (&header[..4] == b"QFI\xfb").then(|| u64::from_be_bytes(header[24..32].try_into().expect("8 bytes")))
}

fn fail(dirs: &Dirs, claimed: &Path, reason: &str, log: Option<&[u8]>) -> io::Result<Ending> {
    let path = queue::fail(dirs, claimed, reason, log)?;
    Ok(Ending::Failed { path, reason: reason.to_owned() })
}

/// The status, if the disk starts with a result archive whose first entry is
/// `job_status.json` (construir-init always puts it first). Read with
/// bounds: the guest may have written anything.
pub fn read_status(path: &Path) -> Option<JobStatus> {
    let file = File::open(path).ok()?;
    let mut archive = jobfile::read_job(file, DEFAULT_MEMLIMIT).ok()?;
    let h = archive.next_entry().ok()??;
    if h.kind != jobfile::Kind::File || !path_is(&h.path, jobfile::STATUS_FILE) || h.size > MAX_STATUS {
        return None;
    }
    let mut raw = Vec::new();
    archive.data().take(MAX_STATUS).read_to_end(&mut raw).ok()?;
    serde_json::from_slice(&raw).ok()
}

fn verdict(st: &JobStatus, how: &str, total: Duration) -> String {
    let mut v = st.result.as_str().to_owned();
    if let Some(code) = st.exit_code {
        v.push_str(&format!(" (exit code {code})"));
    }
    if let Some(sig) = st.signal {
        v.push_str(&format!(" (signal {sig})"));
    }
    if let Some(d) = st.duration_secs {
        v.push_str(&format!("; the job ran {d:.1} s"));
    }
    v.push_str(&format!("; {how}; {:.1} s from claim to result", total.as_secs_f64()));
    if let Some(m) = &st.message {
        v.push_str(&format!("; {}", jobfile::escape(m.as_bytes())));
    }
    v
}

fn stderr_note(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {}", stderr.lines().last().unwrap_or_default())
    }
}
