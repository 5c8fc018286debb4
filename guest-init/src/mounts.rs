//! The fixed mounts PID 1 needs, as one table walked by one function.

use std::fs;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC);

const MOUNTS: &[Mount] = &[
    Mount { source: "proc", target: "/proc", fstype: "proc", flags: NOSUID_NODEV_NOEXEC, data: None },
    Mount { source: "sysfs", target: "/sys", fstype: "sysfs", flags: NOSUID_NODEV_NOEXEC, data: None },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("gid=5,mode=0620,ptmxmode=0666"),
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
];

/// Mounts every entry of the table that is not mounted yet; returns what failed.
pub fn mount_all() -> Vec<String> {
    let mounted = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut failures = Vec::new();
    for m in MOUNTS {
        if is_mounted(&mounted, m.target) {
            continue;
        }
        let _ = fs::create_dir_all(m.target);
        match mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => failures.push(format!("cannot mount {} on {}: {e}", m.fstype, m.target)),
        }
    }
    if Path::new("/dev/pts/ptmx").exists() && !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    failures
}

/// The root disk is a discarded snapshot: make it writable for the job.
/// In an initramfs the root is already writable and this is a no-op.
pub fn remount_root_rw() -> Result<(), Errno> {
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REMOUNT, None::<&str>)
}

fn is_mounted(mounts: &str, target: &str) -> bool {
    mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mount_points() {
        let table = "proc /proc proc rw 0 0\nsysfs /sys sysfs rw 0 0\n";
        assert!(is_mounted(table, "/proc"));
        assert!(!is_mounted(table, "/dev"));
        assert!(!is_mounted(table, "/pro"));
    }
}
