//! Leaving the VM: sync, then power off. If the kernel refuses, reboot
//! (the host runs QEMU with -no-reboot, so that ends it too); if that fails
//! as well, exiting makes the kernel panic, which the host sees as an exit.

use nix::sys::reboot::{reboot, RebootMode};
use nix::unistd::sync;

pub fn power_off() -> ! {
    sync();
    let off = reboot(RebootMode::RB_POWER_OFF);
    eprintln!("construir-init: power off failed ({off:?}); rebooting instead");
    let again = reboot(RebootMode::RB_AUTOBOOT);
    eprintln!("construir-init: reboot failed ({again:?}); exiting");
    std::process::exit(1)
}
