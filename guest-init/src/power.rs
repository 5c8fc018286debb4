//! Leaving the VM: sync, then power off. If the kernel refuses, reboot
//! (the host runs QEMU with -no-reboot, so that ends it too); if that fails
//! as well, exiting makes the kernel panic, which the host sees as an exit.
//! And the watchdog: PID 1's own deadline, which ends the VM whatever is
//! stuck (a process in D state, a pack that hangs, a sync that never ends).
//! It does not power off: a clean power-off is init's word that the result
//! is packed and synced, and the host reads a result only after one. The
//! watchdog ends PID 1 instead; the kernel panics, the pvpanic device makes
//! QEMU exit with a failure, and the host reports that no result came back.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::reboot::{reboot, RebootMode};
use nix::unistd::sync;

use crate::say;

/// How long a sync may take before the power-off goes ahead without it.
const SYNC_WAIT: Duration = Duration::from_secs(10);

pub fn power_off() -> ! {
    bounded_sync();
    let off = reboot(RebootMode::RB_POWER_OFF);
    say!("power off failed ({off:?}); rebooting instead");
    let again = reboot(RebootMode::RB_AUTOBOOT);
    say!("reboot failed ({again:?}); exiting");
    std::process::exit(1)
}

/// `sync`, on another thread, waited for at most `SYNC_WAIT`: a disk that
/// never answers must not keep the VM up.
fn bounded_sync() {
    let (tx, rx) = mpsc::channel();
    let spawned = thread::Builder::new().name("sync".into()).spawn(move || {
        sync();
        let _ = tx.send(());
    });
    if spawned.is_ok() && rx.recv_timeout(SYNC_WAIT).is_err() {
        say!("sync did not finish within {} s; powering off without it", SYNC_WAIT.as_secs());
    }
}

/// Ends the VM `after` it booted (uptime), whatever the rest of init is doing.
pub fn watchdog(after: Duration) {
    let boot = uptime().unwrap_or_default();
    let left = after.saturating_sub(boot);
    let started = Instant::now();
    say!("watchdog armed: the VM ends {} s after boot at the latest", after.as_secs());
    let spawned = thread::Builder::new().name("watchdog".into()).spawn(move || {
        while started.elapsed() < left {
            thread::sleep(left.saturating_sub(started.elapsed()).min(Duration::from_secs(1)));
        }
        say!("watchdog: {} s since boot and the VM is still up; ending it without a result", after.as_secs());
        // SAFETY: _exit ends the process at once; PID 1 exiting panics the kernel, by design here.
        unsafe { libc::_exit(1) }
    });
    if let Err(e) = spawned {
        say!("cannot start the watchdog: {e}");
    }
}

/// Seconds since the kernel booted, from /proc/uptime.
fn uptime() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_secs_f64(secs))
}
