//! One QEMU run: the command line, the jailed process (see `jail`), the
//! console capture, and the deadlines: boot, silence, job.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use thiserror::Error;

use jobfile::arch::Arch;

use crate::console::ConsoleLog;
use crate::jail::{self, Identity, JailRoot, Plan};

/// Most QEMU stderr kept for error messages.
const MAX_STDERR: usize = 16 << 10;

/// Descriptor numbers the files have inside QEMU.
const FD_KERNEL: i32 = 3;
const FD_INITRD: i32 = 4;
const FD_ROOT: i32 = 5;
const FD_JOB_RW: i32 = 6;
const FD_JOB_RO: i32 = 7;
const FD_LAYER_RW: i32 = 8;
const FD_LAYER_RO: i32 = 9;
const FD_PACKAGES: i32 = 10;
/// Build cache `i` is descriptors `FD_CACHES + 2i` (read-write) and `+ 1`
/// (its read-only twin), in fd set `SET_CACHES + i`.
const FD_CACHES: i32 = 11;
const SET_CACHES: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Everything one VM boot needs. Files are open already: QEMU gets them as
/// descriptors and never a path of ours.
#[derive(Debug)]
pub struct VmSpec {
    pub qemu: PathBuf,
    pub accel: Accel,
    /// The guest's architecture: q35 for amd64, `virt` for arm64.
    pub arch: Arch,
    pub memory_mib: u64,
    pub cpus: u32,
    pub kernel: File,
    pub initrd: Option<File>,
    pub cmdline: String,
    /// Booted as a discarded snapshot (`snapshot=on`), if the image has one.
    pub root_disk: Option<File>,
    /// A layer over the root disk (a qcow2 whose backing is `root_disk`),
    /// booted instead of it.
    pub layer: Option<LayerDisk>,
    /// A layer's build: the package disk, raw, read-only (the guest's third disk).
    pub packages_disk: Option<File>,
    /// The job's working copy, raw, read-write.
    pub job_disk: Option<File>,
    /// The working copies of the job's build caches, raw, read-write, in the
    /// order of `construir.caches=`; cache `i` has the serial
    /// `jobfile::caches::Given::serial(i)`.
    pub cache_disks: Vec<File>,
    pub networking: bool,
    /// QEMU's TMPDIR, for the snapshot overlay (as QEMU sees it).
    pub tmpdir: PathBuf,
    /// Shown by `ps` (`-name`): which job this VM is.
    pub name: String,
    /// Largest file QEMU may write.
    pub file_size_limit: u64,
    /// The VM's cgroup (`.../cgroup.procs`), where there is one.
    pub cgroup_procs: Option<std::ffi::CString>,
    /// Where the console goes as it arrives (sanitized, the first part of
    /// the log's budget), so people can follow a running job.
    pub live_console: Option<File>,
    /// QEMU's end of the debug session's channel (a connected socket), for
    /// the guest's `jobfile::debug::PORT_NAME` port; a debug job's VM only.
    pub debug_port: Option<OwnedFd>,
}

/// A layer the VM boots from.
#[derive(Debug)]
pub struct LayerDisk {
    pub file: File,
    /// Written through (a layer's build), or a discarded snapshot over it (a job).
    pub write: bool,
}

impl VmSpec {
    /// QEMU's arguments. Files are passed as descriptors the host opened
    /// (`/proc/self/fd/N`, fd sets), so no path of ours is on the command
    /// line: nothing to inject options into, and QEMU needs no access to
    /// the images or the queue.
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&["-name", &format!("guest={},process={}", self.name, self.name)]);
        push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-monitor", "none"]);
        a.extend(self.machine_args());
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&["-m", &format!("{}M", self.memory_mib), "-smp", &self.cpus.to_string()]);
        push(&["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]);
        push(&["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]);
        push(&["-nic", if self.networking { "user,model=virtio-net-pci" } else { "none" }]);
        push(&["-kernel", &format!("/proc/self/fd/{FD_KERNEL}")]);
        if self.initrd.is_some() {
            push(&["-initrd", &format!("/proc/self/fd/{FD_INITRD}")]);
        }
        push(&["-append", &self.cmdline]);
        match (&self.root_disk, &self.layer) {
            (Some(_), None) => {
                push(&["-add-fd", &format!("fd={FD_ROOT},set=1")]);
                push(&["-drive", "if=none,id=root,file=/dev/fdset/1,format=qcow2,snapshot=on,cache=unsafe"]);
                push(&["-device", "virtio-blk-pci,drive=root"]);
            }
            (Some(_), Some(layer)) => {
                // The layer's own header names its backing by a path of ours: the fd set replaces it.
                push(&["-add-fd", &format!("fd={FD_ROOT},set=1"), "-add-fd", &format!("fd={FD_LAYER_RW},set=3")]);
                let how = if layer.write {
                    push(&["-add-fd", &format!("fd={FD_LAYER_RO},set=3")]);
                    "cache=writeback"
                } else {
                    "snapshot=on,cache=unsafe"
                };
                let drive = format!(
                    "if=none,id=root,file=/dev/fdset/3,format=qcow2,backing.driver=qcow2,backing.file.filename=/dev/fdset/1,{how}"
                );
                push(&["-drive", &drive]);
                push(&["-device", "virtio-blk-pci,drive=root"]);
            }
            (None, _) => {}
        }
        if self.job_disk.is_some() {
            push(&["-add-fd", &format!("fd={FD_JOB_RW},set=2"), "-add-fd", &format!("fd={FD_JOB_RO},set=2")]);
            push(&[
                "-drive",
                "if=none,id=job,file=/dev/fdset/2,format=raw,discard=unmap,detect-zeroes=unmap,werror=report,rerror=report",
            ]);
            push(&["-device", "virtio-blk-pci,drive=job"]);
        }
        if self.packages_disk.is_some() {
            push(&["-add-fd", &format!("fd={FD_PACKAGES},set=4")]);
            push(&["-drive", "if=none,id=packages,file=/dev/fdset/4,format=raw,read-only=on"]);
            push(&["-device", "virtio-blk-pci,drive=packages"]);
        }
        for i in 0..self.cache_disks.len() {
            let (set, rw) = (SET_CACHES + i, FD_CACHES + 2 * i as i32);
            push(&["-add-fd", &format!("fd={rw},set={set}"), "-add-fd", &format!("fd={},set={set}", rw + 1)]);
            push(&[
                "-drive",
                &format!(
                    "if=none,id=cache{i},file=/dev/fdset/{set},format=raw,discard=unmap,detect-zeroes=unmap,werror=report,rerror=report"
                ),
            ]);
            push(&["-device", &format!("virtio-blk-pci,drive=cache{i},serial={}", jobfile::caches::Given::serial(i))]);
        }
        if self.debug_port.is_some() {
            let fd = self.fd_debug();
            push(&["-device", "virtio-serial-pci,id=debugbus,max_ports=2"]);
            push(&["-chardev", &format!("socket,id=debug,fd={fd}")]);
            let port = format!("virtserialport,bus=debugbus.0,chardev=debug,name={}", jobfile::debug::PORT_NAME);
            push(&["-device", &port]);
        }
        a.into_iter().map(OsString::from).collect()
    }

    /// The machine, its CPU, and how a guest kernel panic is told from a power-off.
    fn machine_args(&self) -> Vec<String> {
        let kvm = self.accel == Accel::Kvm;
        let (machine, cpu) = match self.arch {
            Arch::Amd64 => (
                format!("q35,accel={},usb=off,vmport=off,smbus=off,sata=off,graphics=off", self.accel.name()),
                if kvm { "host" } else { "max" },
            ),
            // `virt`: PCIe (virtio-*-pci as on q35), a PL011 console, PSCI power-off; no firmware,
            // QEMU loads the kernel. Under TCG the pointer authentication of `max` is QEMU's
            // cheap implementation-defined one, not the architected cipher.
            Arch::Arm64 => (
                format!("virt,accel={},gic-version={}", self.accel.name(), if kvm { "host" } else { "3" }),
                if kvm { "host" } else { "max,pauth-impdef=on" },
            ),
        };
        let mut args = vec!["-machine".to_owned(), machine, "-cpu".to_owned(), cpu.to_owned()];
        if self.arch == Arch::Amd64 {
            // A guest kernel panic makes QEMU exit with a failure instead of looking like a power-off.
            // (Debian's arm64 kernel has no pvpanic driver: there the console tells, see `Markers`.)
            args.extend(["-device", "pvpanic-pci", "-action", "panic=exit-failure"].map(str::to_owned));
        }
        args
    }

    /// The debug channel's number in QEMU: the first after the caches'.
    fn fd_debug(&self) -> i32 {
        FD_CACHES + 2 * self.cache_disks.len() as i32
    }

    /// Each file's (descriptor, number in QEMU).
    fn descriptors(&self) -> io::Result<Descriptors> {
        let mut fds = vec![(self.kernel.as_raw_fd(), FD_KERNEL)];
        let mut reopened = vec![FD_KERNEL];
        if let Some(f) = &self.initrd {
            fds.push((f.as_raw_fd(), FD_INITRD));
            reopened.push(FD_INITRD);
        }
        if let Some(f) = &self.root_disk {
            fds.push((f.as_raw_fd(), FD_ROOT));
        }
        let mut read_only = Vec::new();
        if let Some(f) = &self.job_disk {
            // A read-only descriptor of the same open file, for QEMU's read-only probes of the fd set.
            let ro = File::open(format!("/proc/self/fd/{}", f.as_raw_fd()))?;
            fds.push((f.as_raw_fd(), FD_JOB_RW));
            fds.push((ro.as_raw_fd(), FD_JOB_RO));
            read_only.push(ro);
        }
        if let Some(layer) = &self.layer {
            fds.push((layer.file.as_raw_fd(), FD_LAYER_RW));
            if layer.write {
                let ro = File::open(format!("/proc/self/fd/{}", layer.file.as_raw_fd()))?;
                fds.push((ro.as_raw_fd(), FD_LAYER_RO));
                read_only.push(ro);
            }
        }
        if let Some(f) = &self.packages_disk {
            fds.push((f.as_raw_fd(), FD_PACKAGES));
        }
        for (i, f) in self.cache_disks.iter().enumerate() {
            let ro = File::open(format!("/proc/self/fd/{}", f.as_raw_fd()))?;
            fds.push((f.as_raw_fd(), FD_CACHES + 2 * i as i32));
            fds.push((ro.as_raw_fd(), FD_CACHES + 2 * i as i32 + 1));
            read_only.push(ro);
        }
        if let Some(port) = &self.debug_port {
            fds.push((port.as_raw_fd(), self.fd_debug()));
        }
        Ok(Descriptors { fds, reopened, read_only })
    }
}

/// What QEMU is given, as the jail moves it: (descriptor, number in QEMU).
struct Descriptors {
    fds: Vec<(i32, i32)>,
    /// Numbers QEMU reopens through /proc/self/fd (kernel, initrd): Landlock must allow them.
    reopened: Vec<i32>,
    /// The read-only twins of the writable disks' descriptors, held until QEMU has its copies.
    read_only: Vec<File>,
}

/// How QEMU is confined besides what every QEMU gets.
#[derive(Debug, Clone, Copy)]
pub enum Confinement<'a> {
    /// As this (unprivileged) host's own user, no namespaces.
    Plain,
    /// Its own uid, namespaces and minimal root, built in `dir` (see `VmDir`).
    Jailed { identity: Identity, root: &'a JailRoot, dir: &'a Path, landlock_abi: u32 },
}

/// A VM's own directory under `work/`: root's and 0700, so nothing QEMU
/// does can plant or swap a file in it. It holds the working copy (`disk`),
/// `scratch/` (QEMU's only writable directory: the snapshot overlay), and
/// `root/` (where its minimal root is mounted, in its own namespace).
/// Removed when dropped.
#[derive(Debug)]
pub struct VmDir {
    pub path: PathBuf,
    pub fd: OwnedFd,
}

impl VmDir {
    /// Creates `path` afresh; `scratch/` belongs to `owner` when there is one.
    pub fn create(path: &Path, owner: Option<Identity>) -> io::Result<Self> {
        if fs::symlink_metadata(path).is_ok() {
            fs::remove_dir_all(path)?;
        }
        fs::DirBuilder::new().mode(0o700).create(path)?;
        let fd = crate::files::open_dir(path)?;
        let dir = VmDir { path: path.to_owned(), fd };
        fs::DirBuilder::new().mode(0o700).create(path.join("scratch"))?;
        fs::DirBuilder::new().mode(0o755).create(path.join("root"))?;
        if let Some(id) = owner {
            std::os::unix::fs::chown(path.join("scratch"), Some(id.uid), Some(id.gid))?;
        }
        Ok(dir)
    }
}

impl Drop for VmDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// What every VM of this host is confined with: a uid pool and a minimal
/// root when the host is root, and Landlock where the kernel has it.
#[derive(Debug, Clone, Default)]
pub struct Confiner {
    pub ids: Option<Arc<jail::IdPool>>,
    pub root: Option<JailRoot>,
    /// Landlock ABI version (0: the kernel has none).
    pub landlock_abi: u32,
}

/// One VM's uid and directory, held for the VM's life.
#[derive(Debug)]
pub struct Prepared {
    pub lease: Option<jail::IdLease>,
    pub dir: VmDir,
}

impl Confiner {
    /// Takes a uid for one VM and makes its directory at `path`.
    pub fn prepare(&self, path: &Path) -> Result<Prepared, QemuError> {
        let lease = self.ids.as_ref().map(|p| p.acquire()).transpose().map_err(QemuError::Jail)?;
        let dir = VmDir::create(path, lease.as_ref().map(|l| l.id)).map_err(QemuError::Open)?;
        Ok(Prepared { lease, dir })
    }
}

impl Prepared {
    pub fn confinement<'a>(&'a self, confiner: &'a Confiner) -> Confinement<'a> {
        match (&self.lease, &confiner.root) {
            (Some(lease), Some(root)) => Confinement::Jailed {
                identity: lease.id,
                root,
                dir: &self.dir.path,
                landlock_abi: confiner.landlock_abi,
            },
            _ => Confinement::Plain,
        }
    }

    /// QEMU's TMPDIR as QEMU sees it.
    pub fn tmpdir(&self, confiner: &Confiner) -> PathBuf {
        match self.confinement(confiner) {
            Confinement::Jailed { .. } => PathBuf::from(jail::SCRATCH),
            Confinement::Plain => self.dir.path.join("scratch"),
        }
    }
}

#[derive(Debug, Error)]
pub enum QemuError {
    #[error("cannot prepare the VM's descriptors")]
    Open(#[source] io::Error),
    #[error("cannot prepare QEMU's jail")]
    Jail(#[source] crate::jail::JailError),
    #[error("cannot start {qemu}")]
    Spawn { qemu: PathBuf, source: io::Error },
    #[error("cannot wait for QEMU")]
    Wait(#[source] io::Error),
}

/// Why the host ended a VM itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Past the job's timeout plus grace.
    Deadline,
    /// No console output for the silence limit.
    Silence,
    /// construir-init did not say it started within the boot limit.
    NoBoot,
    /// The host is stopping.
    Stop,
    /// The job's submitter asked for it to stop (`running/.cancel/<name>`).
    Cancel,
}

/// How a VM run ended.
#[derive(Debug)]
pub struct VmRun {
    /// QEMU's own exit, `None` when the host ended it.
    pub status: Option<ExitStatus>,
    pub cut: Option<Cut>,
    pub elapsed: Duration,
    pub console: ConsoleLog,
    pub stderr: String,
    /// When construir-init said it started, counted from QEMU's start.
    pub booted: Option<Duration>,
    /// The guest kernel said it panicked (watched for where no pvpanic device tells: arm64).
    pub panicked: bool,
}

/// What construir-init prints as its very first act; the host's sign that the VM booted.
pub const BOOT_MARKER: &[u8] = b"construir-init: version ";

/// What a Linux kernel prints when it panics (at KERN_EMERG, past `quiet`).
/// Where the guest has no pvpanic driver, its reboot on panic (`panic=-1`,
/// which `-no-reboot` turns into QEMU's exit) would look like a power-off
/// but for this line. Only the job itself can print it falsely, and then
/// only its own result is lost.
pub const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";

/// Owns QEMU's process: kills its whole group and reaps it on drop. The
/// group is signalled only while QEMU is unreaped (an exited but unreaped
/// leader keeps its pid and group id from being reused).
struct Guard {
    child: Child,
    reaped: Option<ExitStatus>,
    /// Woken when QEMU exits.
    exit: ExitWatch,
}

impl Guard {
    /// Whether QEMU has exited, without reaping it.
    fn exited(&self) -> io::Result<bool> {
        let pid = Pid::from_raw(self.child.id() as i32);
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT) {
            Ok(WaitStatus::StillAlive) => Ok(false),
            Ok(_) => Ok(true),
            Err(nix::errno::Errno::ECHILD) => Ok(self.reaped.is_some()),
            Err(e) => Err(e.into()),
        }
    }

    /// Kills the group (while QEMU is unreaped), then reaps QEMU.
    fn end(&mut self) -> Option<ExitStatus> {
        if self.reaped.is_none() {
            let _ = kill(Pid::from_raw(-(self.child.id() as i32)), Signal::SIGKILL);
            self.reaped = self.child.wait().ok();
        }
        self.reaped
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.end();
    }
}

/// Waits for QEMU's exit, woken the moment it exits (a pidfd, Linux 5.3
/// and later), so that a VM's end is seen when it happens, not at the next
/// look; where there is no pidfd, it looks again after the wait.
struct ExitWatch(Option<std::os::fd::OwnedFd>);

impl ExitWatch {
    fn of(child: &Child) -> ExitWatch {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; nothing else is touched.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        // SAFETY: a non-negative return is a descriptor that is ours alone.
        ExitWatch((fd >= 0).then(|| unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) }))
    }

    /// Returns when the process has exited or `most` has passed.
    fn wait(&self, most: Duration) {
        let Some(fd) = &self.0 else { return thread::sleep(most) };
        let mut poll = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(fd), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd, valid for the call; poll writes only its revents.
        unsafe { libc::poll(&mut poll, 1, most.as_millis() as libc::c_int) };
    }
}

/// When to end a VM from the outside.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub deadline: Duration,
    pub silence: Option<Duration>,
    /// construir-init must say it started within this.
    pub boot: Option<Duration>,
    pub console_limit: usize,
}

/// Boots the VM and waits for it to power off, or ends it at its deadline,
/// after too long a silence, when it does not boot in time, or when `stop` is set.
pub fn run(
    spec: &VmSpec,
    confinement: Confinement,
    bounds: Bounds,
    stop: &AtomicBool,
    cancel: &AtomicBool,
) -> Result<VmRun, QemuError> {
    let mut vm = start(spec, confinement, bounds)?;
    let cut = match vm.watch(stop, cancel, false)? {
        Watched::Ended => None,
        Watched::Cut(cut) => Some(cut),
        Watched::SessionOpen => unreachable!("not watched for"),
    };
    Ok(vm.finish(cut))
}

/// A VM while it runs: QEMU (killed when this is dropped), the console's
/// reader, and what the bounds are checked against.
pub struct Vm {
    guard: Guard,
    start: Instant,
    bounds: Bounds,
    /// Milliseconds from QEMU's start to the console's last output.
    last_output: Arc<AtomicU64>,
    /// Milliseconds from QEMU's start to init's first line, plus one; 0 until then.
    booted: Arc<AtomicU64>,
    /// Milliseconds from QEMU's start to init's word that a debug session
    /// is open, plus one; 0 until then (or when the VM has no session port).
    opened: Arc<AtomicU64>,
    /// Whether the console showed the kernel's panic (watched for on arm64 only).
    panicked: Arc<AtomicBool>,
    console: Arc<Mutex<ConsoleLog>>,
    reader: JoinHandle<()>,
    errors: JoinHandle<String>,
}

/// How watching a VM stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watched {
    /// QEMU exited by itself.
    Ended,
    /// The host has to end it.
    Cut(Cut),
    /// Init said its result is packed and a debug session is open.
    SessionOpen,
}

/// Starts QEMU under `confinement`, with a thread reading its console.
pub fn start(spec: &VmSpec, confinement: Confinement, bounds: Bounds) -> Result<Vm, QemuError> {
    let Descriptors { fds, reopened, read_only } = spec.descriptors().map_err(QemuError::Open)?;
    let limits = jail::Limits { file_size: spec.file_size_limit, open_files: 1024 };
    let kvm = spec.accel == Accel::Kvm;
    let mut plan = match confinement {
        Confinement::Plain => Plan::plain(limits, fds),
        Confinement::Jailed { identity, root, dir, landlock_abi } => {
            Plan::jailed(identity, limits, fds, reopened, root, dir, kvm, spec.networking, landlock_abi)
                .map_err(QemuError::Jail)?
        }
    };
    plan.cgroup = spec.cgroup_procs.clone();
    let mut cmd = Command::new(&spec.qemu);
    cmd.args(spec.args())
        .env_clear()
        .env("TMPDIR", &spec.tmpdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: `enter` only makes async-signal-safe syscalls on the plan, built above.
    unsafe {
        cmd.pre_exec(move || jail::enter(&plan));
    }
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|source| QemuError::Spawn { qemu: spec.qemu.clone(), source })?;
    drop(read_only); // QEMU holds its own copy now
    let stdout = child.stdout.take().expect("stdout was piped");
    let stderr = child.stderr.take().expect("stderr was piped");
    let guard = Guard { exit: ExitWatch::of(&child), child, reaped: None };
    let (last_output, booted, opened, panicked) = (Arc::default(), Arc::default(), Arc::default(), Arc::default());
    let mut log = ConsoleLog::new(bounds.console_limit);
    if let Some(file) = spec.live_console.as_ref().and_then(|f| f.try_clone().ok()) {
        log.write_live_to(file);
    }
    let console = Arc::new(Mutex::new(log));
    let watched = Markers {
        start,
        seen: Arc::clone(&last_output),
        booted: Arc::clone(&booted),
        opened: spec.debug_port.is_some().then(|| Arc::clone(&opened)),
        panicked: (spec.arch != Arch::Amd64).then(|| Arc::clone(&panicked)),
        carry: Vec::new(),
    };
    let reader = read_console(stdout, Arc::clone(&console), watched);
    let errors = capture(stderr, MAX_STDERR);
    Ok(Vm { guard, start, bounds, last_output, booted, opened, panicked, console, reader, errors })
}

/// Reads the console into `log` until QEMU closes it, watching for init's words.
fn read_console(
    mut out: impl Read + Send + 'static,
    log: Arc<Mutex<ConsoleLog>>,
    mut markers: Markers,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    // Into the log first: a snapshot taken once the session's marker is seen holds it.
                    log.lock().unwrap_or_else(|e| e.into_inner()).push(&buf[..n]);
                    markers.push(&buf[..n]);
                }
            }
        }
    })
}

/// The words of init's the host acts on, found in the console as it arrives.
struct Markers {
    start: Instant,
    seen: Arc<AtomicU64>,
    booted: Arc<AtomicU64>,
    /// Looked for only when the VM has a session port.
    opened: Option<Arc<AtomicU64>>,
    /// Looked for (all along) only where no pvpanic device tells of a panic.
    panicked: Option<Arc<AtomicBool>>,
    /// The end of the previous read, so a marker split across two reads is still seen.
    carry: Vec<u8>,
}

impl Markers {
    fn push(&mut self, bytes: &[u8]) {
        let now = self.start.elapsed().as_millis() as u64;
        self.seen.store(now, Ordering::Relaxed);
        let watching_open = self.opened.as_ref().is_some_and(|o| o.load(Ordering::Relaxed) == 0);
        let watching_panic = self.panicked.as_ref().is_some_and(|p| !p.load(Ordering::Relaxed));
        if self.booted.load(Ordering::Relaxed) != 0 && !watching_open && !watching_panic {
            return;
        }
        self.carry.extend_from_slice(bytes);
        let has = |marker: &[u8], carry: &[u8]| carry.windows(marker.len()).any(|w| w == marker);
        if self.booted.load(Ordering::Relaxed) == 0 && has(BOOT_MARKER, &self.carry) {
            self.booted.store(now + 1, Ordering::Relaxed);
        }
        if let Some(opened) = self.opened.as_ref().filter(|_| watching_open) {
            if self.booted.load(Ordering::Relaxed) != 0 && has(jobfile::debug::OPEN_MARKER, &self.carry) {
                opened.store(now + 1, Ordering::Relaxed);
            }
        }
        if let Some(panicked) = self.panicked.as_ref().filter(|_| watching_panic) {
            if has(PANIC_MARKER, &self.carry) {
                panicked.store(true, Ordering::Relaxed);
            }
        }
        let longest = BOOT_MARKER.len().max(jobfile::debug::OPEN_MARKER.len()).max(PANIC_MARKER.len());
        let keep = self.carry.len().saturating_sub(longest);
        self.carry.drain(..keep);
    }
}

impl Vm {
    /// Waits until QEMU exits, a bound is passed, `stop` or `cancel` is set,
    /// or (when `session` is set) init says a debug session is open.
    pub fn watch(&mut self, stop: &AtomicBool, cancel: &AtomicBool, session: bool) -> Result<Watched, QemuError> {
        let bounds = self.bounds;
        loop {
            if self.guard.exited().map_err(QemuError::Wait)? {
                return Ok(Watched::Ended);
            }
            let elapsed = self.start.elapsed();
            let quiet = elapsed.saturating_sub(Duration::from_millis(self.last_output.load(Ordering::Relaxed)));
            let cut = if elapsed >= bounds.deadline {
                Some(Cut::Deadline)
            } else if bounds.boot.is_some_and(|b| elapsed >= b) && self.booted.load(Ordering::Relaxed) == 0 {
                Some(Cut::NoBoot)
            } else if bounds.silence.is_some_and(|s| quiet >= s) {
                Some(Cut::Silence)
            } else if stop.load(Ordering::Relaxed) {
                Some(Cut::Stop)
            } else if cancel.load(Ordering::Relaxed) {
                Some(Cut::Cancel)
            } else {
                None
            };
            if let Some(cut) = cut {
                return Ok(Watched::Cut(cut));
            }
            if session && self.opened.load(Ordering::Relaxed) != 0 {
                return Ok(Watched::SessionOpen);
            }
            self.guard.exit.wait(Duration::from_millis(50));
        }
    }

    /// Whether QEMU has exited, waiting at most `most` for it.
    pub fn exited_within(&self, most: Duration) -> Result<bool, QemuError> {
        if self.guard.exited().map_err(QemuError::Wait)? {
            return Ok(true);
        }
        self.guard.exit.wait(most);
        self.guard.exited().map_err(QemuError::Wait)
    }

    /// How long QEMU has run.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// When construir-init said it started, counted from QEMU's start.
    pub fn booted(&self) -> Option<Duration> {
        self.booted.load(Ordering::Relaxed).checked_sub(1).map(Duration::from_millis)
    }

    /// The console so far, as a log of its own.
    pub fn console_so_far(&self) -> ConsoleLog {
        self.console.lock().unwrap_or_else(|e| e.into_inner()).snapshot()
    }

    /// Ends QEMU (killing it, unless it exited) and says how the run ended;
    /// `cut` is why the host ended it, if it did.
    pub fn finish(mut self, cut: Option<Cut>) -> VmRun {
        let status = self.guard.end();
        let elapsed = self.start.elapsed();
        let booted = self.booted();
        let _ = self.reader.join();
        let console =
            std::mem::replace(&mut *self.console.lock().unwrap_or_else(|e| e.into_inner()), ConsoleLog::new(0));
        let stderr = self.errors.join().unwrap_or_default();
        let status = if cut.is_some() { None } else { status };
        let panicked = self.panicked.load(Ordering::Relaxed);
        VmRun { status, cut, elapsed, console, stderr, booted, panicked }
    }
}

fn capture(mut pipe: impl Read + Send + 'static, limit: usize) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = limit.saturating_sub(kept.len()).min(n);
                    kept.extend_from_slice(&buf[..room]);
                }
            }
        }
        jobfile::text::sanitize_lines(&kept).trim().to_owned()
    })
}

/// QEMU's version, as (major, minor), from `--version`.
pub fn version(qemu: &Path) -> io::Result<(u32, u32)> {
    let out = Command::new(qemu).arg("--version").env_clear().stdin(Stdio::null()).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(&text).ok_or_else(|| io::Error::other(format!("cannot read a version from {:?}", text.trim())))
}

fn parse_version(text: &str) -> Option<(u32, u32)> {
    let rest = text.split("version ").nth(1)?;
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        let null = || File::open("/dev/null").expect("open");
        VmSpec {
            qemu: "qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            arch: Arch::Amd64,
            memory_mib: 512,
            cpus: 1,
            kernel: null(),
            initrd: Some(null()),
            cmdline: "console=ttyS0".into(),
            root_disk: Some(null()),
            layer: None,
            packages_disk: None,
            job_disk: Some(null()),
            cache_disks: Vec::new(),
            networking: false,
            tmpdir: "/tmp".into(),
            name: "host.job_i0.tar.xz".into(),
            file_size_limit: 1 << 30,
            cgroup_procs: None,
            live_console: None,
            debug_port: None,
        }
    }

    #[test]
    fn no_path_reaches_the_command_line() {
        let joined: Vec<String> = spec().args().iter().map(|a| a.to_string_lossy().into_owned()).collect();
        let joined = joined.join(" ");
        assert!(!joined.contains("/dev/null"), "{joined}");
        assert!(joined.contains("-kernel /proc/self/fd/3"), "{joined}");
        assert!(joined.contains("file=/dev/fdset/1,format=qcow2,snapshot=on"), "{joined}");
    }

    #[test]
    fn a_layer_boots_over_its_image_as_a_snapshot_and_is_written_only_when_built() {
        let null = || File::open("/dev/null").expect("open");
        let text = |s: &VmSpec| s.args().iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
        let job = VmSpec { layer: Some(LayerDisk { file: null(), write: false }), ..spec() };
        let a = text(&job);
        assert!(
            a.contains(
                "file=/dev/fdset/3,format=qcow2,backing.driver=qcow2,backing.file.filename=/dev/fdset/1,snapshot=on"
            ),
            "{a}"
        );
        assert!(!a.contains("fd=9,") && !a.contains("id=packages"), "{a}");
        let build =
            VmSpec { layer: Some(LayerDisk { file: null(), write: true }), packages_disk: Some(null()), ..spec() };
        let a = text(&build);
        assert!(
            a.contains("backing.file.filename=/dev/fdset/1,cache=writeback")
                && !a.contains("fdset/3,format=qcow2,snapshot"),
            "{a}"
        );
        assert!(a.contains("-add-fd fd=9,set=3") && a.contains("file=/dev/fdset/4,format=raw,read-only=on"), "{a}");
        // The disks' order is the guest's vda, vdb, vdc: root, job (status), packages.
        let (root, job, packages) = (
            a.find("drive=root").expect("root"),
            a.find("drive=job").expect("job"),
            a.find("drive=packages").expect("p"),
        );
        assert!(root < job && job < packages, "{a}");
        assert!(!a.contains("/dev/null"), "{a}");
    }

    #[test]
    fn each_cache_is_a_raw_disk_by_descriptor_with_its_serial_after_the_job_disk() {
        let null = || File::open("/dev/null").expect("open");
        let two = VmSpec { cache_disks: vec![null(), null()], ..spec() };
        let a = two.args().iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
        for (i, (rw, ro, set)) in [(11, 12, 10), (13, 14, 11)].into_iter().enumerate() {
            assert!(a.contains(&format!("-add-fd fd={rw},set={set} -add-fd fd={ro},set={set}")), "{a}");
            assert!(a.contains(&format!("id=cache{i},file=/dev/fdset/{set},format=raw,discard=unmap")), "{a}");
            assert!(a.contains(&format!("virtio-blk-pci,drive=cache{i},serial=construir-cache{i}")), "{a}");
        }
        assert!(a.find("drive=job").expect("job") < a.find("drive=cache0").expect("cache0"), "{a}");
        assert!(!a.contains("/dev/null"), "{a}");
        let d = two.descriptors().expect("descriptors");
        let numbers: Vec<i32> = d.fds.iter().map(|&(_, to)| to).collect();
        assert!(numbers.ends_with(&[11, 12, 13, 14]), "{numbers:?}");
        assert!(d.fds.len() <= crate::jail::MAX_FDS);
        // Eight caches, the most a job may name, still fit what the jail passes on.
        let eight = VmSpec {
            cache_disks: (0..8).map(|_| null()).collect(),
            layer: Some(LayerDisk { file: null(), write: false }),
            ..spec()
        };
        assert!(eight.descriptors().expect("descriptors").fds.len() <= crate::jail::MAX_FDS);
    }

    #[test]
    fn no_network_unless_asked_and_the_sandbox_is_on() {
        let args: Vec<String> = spec().args().iter().map(|a| a.to_string_lossy().into_owned()).collect();
        let nic = args.iter().position(|a| a == "-nic").expect("-nic");
        assert_eq!(args[nic + 1], "none");
        for flag in ["-nodefaults", "-no-reboot", "-no-user-config"] {
            assert!(args.iter().any(|a| a == flag), "{flag}");
        }
        assert!(args.iter().any(|a| a == "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"));
        let with_net = VmSpec { networking: true, ..spec() };
        assert!(with_net.args().iter().any(|a| a == "user,model=virtio-net-pci"));
    }

    #[test]
    fn an_arm64_guest_is_a_virt_machine_without_pvpanic_and_kvm_only_with_the_hosts_cpu() {
        let text = |s: &VmSpec| s.args().iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
        let amd64 = text(&spec());
        assert!(amd64.contains("-machine q35,accel=tcg") && amd64.contains("-cpu max "), "{amd64}");
        assert!(amd64.contains("-device pvpanic-pci -action panic=exit-failure"), "{amd64}");
        let tcg = text(&VmSpec { arch: Arch::Arm64, ..spec() });
        assert!(tcg.contains("-machine virt,accel=tcg,gic-version=3 -cpu max,pauth-impdef=on"), "{tcg}");
        assert!(!tcg.contains("pvpanic") && !tcg.contains("q35"), "{tcg}");
        assert!(tcg.contains("-device virtio-blk-pci,drive=job"), "the job disk is the same virtio disk: {tcg}");
        let kvm = text(&VmSpec { arch: Arch::Arm64, accel: Accel::Kvm, ..spec() });
        assert!(kvm.contains("-machine virt,accel=kvm,gic-version=host -cpu host"), "{kvm}");
    }

    #[test]
    fn the_kernels_panic_line_is_seen_across_reads_only_where_it_is_watched_for() {
        let markers = |watch: bool| Markers {
            start: Instant::now(),
            seen: Arc::default(),
            booted: Arc::new(AtomicU64::new(1)),
            opened: None,
            panicked: watch.then(Arc::default),
            carry: Vec::new(),
        };
        let mut m = markers(true);
        m.push(b"[ 3.1] Kernel pan");
        assert!(!m.panicked.as_ref().expect("watched").load(Ordering::Relaxed));
        m.push(b"ic - not syncing: Attempted to kill init!\r\n");
        assert!(m.panicked.as_ref().expect("watched").load(Ordering::Relaxed), "split across two reads");
        let mut amd64 = markers(false);
        amd64.push(b"Kernel panic - not syncing");
        assert!(amd64.panicked.is_none(), "pvpanic tells on amd64");
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n"), Some((7, 2)));
        assert_eq!(parse_version("QEMU emulator version 10.0.2\n"), Some((10, 0)));
        assert_eq!(parse_version("nonsense"), None);
    }
}
