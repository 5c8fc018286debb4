//! One QEMU run: the command line, the jailed process (see `jail`), the
//! console capture, the deadline and the silence limit.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use thiserror::Error;

use crate::console::ConsoleLog;
use crate::jail::{self, Identity};

/// Most QEMU stderr kept for error messages.
const MAX_STDERR: usize = 16 << 10;

/// Descriptor numbers the files have inside QEMU.
const FD_KERNEL: i32 = 3;
const FD_INITRD: i32 = 4;
const FD_ROOT: i32 = 5;
const FD_JOB_RW: i32 = 6;
const FD_JOB_RO: i32 = 7;

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

/// Everything one VM boot needs.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub qemu: PathBuf,
    pub accel: Accel,
    pub memory_mib: u64,
    pub cpus: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// Booted as a discarded snapshot (`snapshot=on`), if the image has one.
    pub root_disk: Option<PathBuf>,
    /// The job's working copy, raw.
    pub job_disk: PathBuf,
    pub networking: bool,
    /// QEMU's own directory, for temporary files (the snapshot overlay).
    pub tmpdir: PathBuf,
    /// Shown by `ps` (`-name`): which job this VM is.
    pub name: String,
    /// Who QEMU runs as, when the host is root.
    pub identity: Option<Identity>,
    /// Largest file QEMU may write.
    pub file_size_limit: u64,
    /// The VM's cgroup (`.../cgroup.procs`), where there is one.
    pub cgroup_procs: Option<std::ffi::CString>,
}

impl VmSpec {
    /// QEMU's arguments. Files are passed as descriptors the host opened
    /// (`/proc/self/fd/N`, fd sets), so no path of ours is on the command
    /// line: nothing to inject options into, and an unprivileged QEMU needs
    /// no access to the images or the queue.
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&["-name", &format!("guest={},process={}", self.name, self.name)]);
        push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-monitor", "none"]);
        let machine = format!("q35,accel={},usb=off,vmport=off,smbus=off,sata=off,graphics=off", self.accel.name());
        push(&["-machine", &machine, "-cpu", if self.accel == Accel::Kvm { "host" } else { "max" }]);
        push(&["-m", &format!("{}M", self.memory_mib), "-smp", &self.cpus.to_string()]);
        push(&["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]);
        // A guest kernel panic makes QEMU exit with a failure instead of looking like a power-off.
        push(&["-device", "pvpanic-pci", "-action", "panic=exit-failure"]);
        push(&["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]);
        push(&["-nic", if self.networking { "user,model=virtio-net-pci" } else { "none" }]);
        push(&["-kernel", &format!("/proc/self/fd/{FD_KERNEL}"), "-initrd", &format!("/proc/self/fd/{FD_INITRD}")]);
        push(&["-append", &self.cmdline]);
        if self.root_disk.is_some() {
            push(&["-add-fd", &format!("fd={FD_ROOT},set=1")]);
            push(&["-drive", "if=none,id=root,file=/dev/fdset/1,format=qcow2,snapshot=on"]);
            push(&["-device", "virtio-blk-pci,drive=root"]);
        }
        push(&["-add-fd", &format!("fd={FD_JOB_RW},set=2"), "-add-fd", &format!("fd={FD_JOB_RO},set=2")]);
        push(&[
            "-drive",
            "if=none,id=job,file=/dev/fdset/2,format=raw,discard=unmap,detect-zeroes=unmap,werror=report,rerror=report",
        ]);
        push(&["-device", "virtio-blk-pci,drive=job"]);
        a.into_iter().map(OsString::from).collect()
    }

    /// Opens every file QEMU needs, as (file, descriptor number in QEMU).
    fn open_files(&self) -> io::Result<Vec<(File, i32)>> {
        let open = |path: &Path, write: bool| {
            OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))
        };
        let mut files = vec![(open(&self.kernel, false)?, FD_KERNEL), (open(&self.initrd, false)?, FD_INITRD)];
        if let Some(root) = &self.root_disk {
            files.push((open(root, false)?, FD_ROOT));
        }
        files.push((open(&self.job_disk, true)?, FD_JOB_RW));
        files.push((open(&self.job_disk, false)?, FD_JOB_RO));
        Ok(files)
    }
}

#[derive(Debug, Error)]
pub enum QemuError {
    #[error("cannot open the VM's files")]
    Open(#[source] io::Error),
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
    /// The host is stopping.
    Stop,
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
}

/// Kills the whole session of a child on drop, and reaps it.
struct Guard(Child);

impl Guard {
    fn kill(&mut self) {
        let _ = kill(Pid::from_raw(-(self.0.id() as i32)), Signal::SIGKILL);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// When to end a VM from the outside.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub deadline: Duration,
    pub silence: Option<Duration>,
    pub console_limit: usize,
}

/// Boots the VM and waits for it to power off, or ends it at its deadline,
/// after too long a silence, or when `stop` is set.
pub fn run(spec: &VmSpec, bounds: Bounds, stop: &Arc<AtomicBool>) -> Result<VmRun, QemuError> {
    let files = spec.open_files().map_err(QemuError::Open)?;
    let fds: Vec<(i32, i32)> = files.iter().map(|(f, n)| (f.as_raw_fd(), *n)).collect();
    let (identity, limits) = (spec.identity, jail::Limits { file_size: spec.file_size_limit, open_files: 1024 });
    let mut cmd = Command::new(&spec.qemu);
    cmd.args(spec.args())
        .env_clear()
        .env("TMPDIR", &spec.tmpdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: `enter` only makes async-signal-safe syscalls on values prepared above.
    unsafe {
        let cgroup = spec.cgroup_procs.clone();
        cmd.pre_exec(move || jail::enter(identity, limits, &fds, cgroup.as_ref()));
    }
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|source| QemuError::Spawn { qemu: spec.qemu.clone(), source })?;
    drop(files); // QEMU holds its own copies now
    let stdout = child.stdout.take().expect("stdout was piped");
    let stderr = child.stderr.take().expect("stderr was piped");
    let mut guard = Guard(child);
    let last_output = Arc::new(AtomicU64::new(0));
    let seen = last_output.clone();
    let console = thread::spawn(move || {
        let mut log = ConsoleLog::new(bounds.console_limit);
        let mut out = stdout;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    log.push(&buf[..n]);
                    seen.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
            }
        }
        log
    });
    let errors = capture(stderr, MAX_STDERR);

    let (mut status, mut cut) = (None, None);
    loop {
        if let Some(st) = guard.0.try_wait().map_err(QemuError::Wait)? {
            status = Some(st);
            break;
        }
        let quiet = start.elapsed().saturating_sub(Duration::from_millis(last_output.load(Ordering::Relaxed)));
        if start.elapsed() >= bounds.deadline {
            cut = Some(Cut::Deadline);
        } else if bounds.silence.is_some_and(|s| quiet >= s) {
            cut = Some(Cut::Silence);
        } else if stop.load(Ordering::Relaxed) {
            cut = Some(Cut::Stop);
        }
        if cut.is_some() {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    guard.kill();
    let elapsed = start.elapsed();
    let console = console.join().unwrap_or_else(|_| ConsoleLog::new(0));
    let stderr = errors.join().unwrap_or_default();
    Ok(VmRun { status, cut, elapsed, console, stderr })
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
        String::from_utf8_lossy(&kept).trim().to_owned()
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
        VmSpec {
            qemu: "qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            memory_mib: 512,
            cpus: 1,
            kernel: "/images/i0,file=/etc/shadow/vmlinuz".into(),
            initrd: "i".into(),
            cmdline: "console=ttyS0".into(),
            root_disk: Some("/q/evil,format=raw".into()),
            job_disk: "/queue/j,snapshot=off".into(),
            networking: false,
            tmpdir: "/tmp".into(),
            name: "host.job_i0.tar.xz".into(),
            identity: None,
            file_size_limit: 1 << 30,
            cgroup_procs: None,
        }
    }

    #[test]
    fn no_path_reaches_the_command_line() {
        let joined: Vec<String> = spec().args().iter().map(|a| a.to_string_lossy().into_owned()).collect();
        let joined = joined.join(" ");
        for path in ["/images", "/etc/shadow", "/q/evil", "/queue/j"] {
            assert!(!joined.contains(path), "{path} on the command line: {joined}");
        }
        assert!(joined.contains("-kernel /proc/self/fd/3"), "{joined}");
        assert!(joined.contains("file=/dev/fdset/1,format=qcow2,snapshot=on"), "{joined}");
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
    fn versions() {
        assert_eq!(parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n"), Some((7, 2)));
        assert_eq!(parse_version("QEMU emulator version 10.0.2\n"), Some((10, 0)));
        assert_eq!(parse_version("nonsense"), None);
    }
}
