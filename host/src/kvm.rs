//! Does KVM work here? `/dev/kvm` can exist, accept a VM, run a trivial
//! guest, and still hang a real kernel's boot (seen with nested
//! virtualization off). So the probe is the real thing: QEMU with KVM boots
//! an image's kernel with no root, which ends in a panic, and with
//! `-no-reboot` QEMU then exits. If it has not exited within the limit, KVM
//! does not work. The answer is cached per machine boot.

use std::fs::{self, OpenOptions};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Whether QEMU at `qemu` boots `kernel` with KVM within `limit`. Uses and
/// updates the cache file `cache` (keyed by boot id, QEMU and kernel).
pub fn kvm_works(qemu: &Path, kernel: &Path, limit: Duration, cache: &Path) -> bool {
    if OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        return false;
    }
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let key = format!("{} {} {}", boot_id.trim(), qemu.display(), kernel.display());
    if let Ok(text) = fs::read_to_string(cache) {
        if let Some(answer) = text.strip_prefix(&key).and_then(|rest| rest.trim().parse::<bool>().ok()) {
            return answer;
        }
    }
    let answer = boot_probe(qemu, kernel, limit);
    let _ = fs::write(cache, format!("{key} {answer}\n"));
    answer
}

fn boot_probe(qemu: &Path, kernel: &Path, limit: Duration) -> bool {
    let mut cmd = Command::new(qemu);
    cmd.args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-monitor", "none"])
        .args(["-machine", "q35,accel=kvm", "-m", "256", "-nic", "none", "-serial", "null"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "panic=-1 quiet"])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let Ok(mut child) = cmd.spawn() else {
        return false;
    };
    let start = Instant::now();
    loop {
        match child.try_wait() {
            // Panic, reboot, -no-reboot: a clean exit after a whole kernel boot.
            Ok(Some(status)) => return status.success(),
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}
