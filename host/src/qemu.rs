//! One QEMU run: the command line, the process (in its own process group,
//! killed with the host), the console capture, and the deadline.

use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use thiserror::Error;

use crate::console::ConsoleLog;

/// Most QEMU stderr kept for error messages.
const MAX_STDERR: usize = 16 << 10;

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
    /// Where QEMU may put temporary files (the snapshot overlay).
    pub tmpdir: PathBuf,
}

impl VmSpec {
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |items: &[&OsStr]| a.extend(items.iter().map(|&i| i.to_owned()));
        let s = |text: &'static str| OsStr::new(text);
        push(&[
            s("-nodefaults"),
            s("-no-user-config"),
            s("-display"),
            s("none"),
            s("-no-reboot"),
            s("-monitor"),
            s("none"),
        ]);
        let machine = format!("q35,accel={},usb=off,vmport=off", self.accel.name());
        push(&[s("-machine"), machine.as_ref(), s("-cpu"), s(if self.accel == Accel::Kvm { "host" } else { "max" })]);
        let (memory, cpus) = (format!("{}M", self.memory_mib), self.cpus.to_string());
        push(&[s("-m"), memory.as_ref(), s("-smp"), cpus.as_ref()]);
        push(&[s("-sandbox"), s("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")]);
        push(&[s("-chardev"), s("stdio,id=console,signal=off"), s("-serial"), s("chardev:console")]);
        push(&[s("-nic"), s(if self.networking { "user,model=virtio-net-pci" } else { "none" })]);
        push(&[
            s("-kernel"),
            self.kernel.as_os_str(),
            s("-initrd"),
            self.initrd.as_os_str(),
            s("-append"),
            self.cmdline.as_ref(),
        ]);
        if let Some(root) = &self.root_disk {
            push(&[
                s("-drive"),
                &drive("root", root, "format=qcow2,snapshot=on"),
                s("-device"),
                s("virtio-blk-pci,drive=root"),
            ]);
        }
        let job =
            drive("job", &self.job_disk, "format=raw,discard=unmap,detect-zeroes=unmap,werror=report,rerror=report");
        push(&[s("-drive"), &job, s("-device"), s("virtio-blk-pci,drive=job")]);
        a
    }
}

/// A `-drive` value whose file name cannot inject options: QEMU reads a
/// doubled comma as a literal one.
fn drive(id: &str, file: &Path, opts: &str) -> OsString {
    let name = file.as_os_str().to_string_lossy().replace(',', ",,");
    format!("if=none,id={id},file={name},{opts}").into()
}

#[derive(Debug, Error)]
pub enum QemuError {
    #[error("cannot start {qemu}")]
    Spawn { qemu: PathBuf, source: io::Error },
    #[error("cannot wait for QEMU")]
    Wait(#[source] io::Error),
}

/// How a VM run ended.
#[derive(Debug)]
pub struct VmRun {
    /// QEMU's own exit, `None` when we killed it.
    pub status: Option<ExitStatus>,
    pub killed_at_deadline: bool,
    pub stopped: bool,
    pub elapsed: Duration,
    pub console: ConsoleLog,
    pub stderr: String,
}

/// Kills the whole process group of a child on drop, and reaps it.
struct Guard(Option<Child>);

impl Guard {
    fn kill(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = kill(Pid::from_raw(-(child.id() as i32)), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Boots the VM and waits for it to power off, to `deadline`, or to `stop`.
pub fn run(
    spec: &VmSpec,
    deadline: Duration,
    console_limit: usize,
    stop: &Arc<AtomicBool>,
) -> Result<VmRun, QemuError> {
    let mut cmd = Command::new(&spec.qemu);
    cmd.args(spec.args())
        .env_clear()
        .env("TMPDIR", &spec.tmpdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; it only changes this (child) process.
    unsafe {
        cmd.pre_exec(|| {
            // QEMU dies with the host.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|source| QemuError::Spawn { qemu: spec.qemu.clone(), source })?;
    let stdout = child.stdout.take().expect("stdout was piped");
    let stderr = child.stderr.take().expect("stderr was piped");
    let mut guard = Guard(Some(child));
    let console = thread::spawn(move || {
        let mut log = ConsoleLog::new(console_limit);
        let mut out = stdout;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => log.push(&buf[..n]),
            }
        }
        log
    });
    let errors = capture(stderr, MAX_STDERR);

    let (mut status, mut killed_at_deadline, mut stopped) = (None, false, false);
    loop {
        let child = guard.0.as_mut().expect("held until the end");
        if let Some(st) = child.try_wait().map_err(QemuError::Wait)? {
            status = Some(st);
            break;
        }
        if start.elapsed() >= deadline {
            killed_at_deadline = true;
            break;
        }
        if stop.load(Ordering::Relaxed) {
            stopped = true;
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    guard.kill();
    let elapsed = start.elapsed();
    let console = console.join().unwrap_or_else(|_| ConsoleLog::new(0));
    let stderr = errors.join().unwrap_or_default();
    Ok(VmRun { status, killed_at_deadline, stopped, elapsed, console, stderr })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_cannot_add_drive_options() {
        let d = drive("job", Path::new("/q/evil,format=qcow2,file=/etc/shadow"), "format=raw");
        assert_eq!(d, "if=none,id=job,file=/q/evil,,format=qcow2,,file=/etc/shadow,format=raw");
    }

    #[test]
    fn no_network_unless_asked() {
        let spec = VmSpec {
            qemu: "qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            memory_mib: 512,
            cpus: 1,
            kernel: "k".into(),
            initrd: "i".into(),
            cmdline: "console=ttyS0".into(),
            root_disk: None,
            job_disk: "j".into(),
            networking: false,
            tmpdir: "/tmp".into(),
        };
        let args: Vec<String> = spec.args().iter().map(|a| a.to_string_lossy().into_owned()).collect();
        let nic = args.iter().position(|a| a == "-nic").expect("-nic");
        assert_eq!(args[nic + 1], "none");
        assert!(args.contains(&"-nodefaults".to_owned()) && args.contains(&"-no-reboot".to_owned()));
        assert!(args.iter().any(|a| a.starts_with("on,obsolete=deny")));
        let with_net = VmSpec { networking: true, ..spec };
        assert!(with_net.args().iter().any(|a| a == "user,model=virtio-net-pci"));
    }
}
