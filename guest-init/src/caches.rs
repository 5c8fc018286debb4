//! The job's build caches in the VM: each disk the host gave (found by its
//! virtio serial, `construir-cache<i>`) mounted at `/cache/<name>`; a cache
//! the host does not give, or whose disk does not mount (a former job of
//! the same owner may have written anything there), is an empty directory
//! instead, and the status says why. Unmounted, and synced, before the
//! result is packed, so that what the job wrote is on the disk when the VM
//! powers off.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use jobfile::caches::{CacheStatus, Given, MOUNT_DIR};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::say;

/// Where the kernel lists block devices.
const SYS_BLOCK: &str = "/sys/block";

/// Mounts each of `given`; returns what became of each, in order.
pub fn mount_all(given: &[Given], wait: Duration) -> Vec<CacheStatus> {
    let mut out = Vec::new();
    // The n-th cache that has a version has the n-th disk.
    let mut disks = 0;
    for g in given {
        let target = Path::new(MOUNT_DIR).join(&g.name);
        let mut status = CacheStatus { name: g.name.clone(), version: g.version, mounted: false, problem: None };
        if let Err(e) = fs::create_dir_all(&target) {
            status.problem = Some(format!("cannot create {}: {e}", target.display()));
        } else if g.version.is_none() {
            status.problem = Some(
                "the host gives no disk for it (caches are off on that host, or construir.toml is not the \
                 archive's first file): an empty directory, not kept"
                    .to_owned(),
            );
        } else {
            let serial = Given::serial(disks);
            disks += 1;
            match find_by_serial(Path::new(SYS_BLOCK), &serial, wait) {
                None => status.problem = Some(format!("no disk with serial {serial} appeared")),
                Some(device) => {
                    // No atime: a cache is read far more than written, and each first read would be a write.
                    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME;
                    match mount(Some(&device), &target, Some("ext4"), flags, None::<&str>) {
                        Ok(()) => status.mounted = true,
                        Err(e) => {
                            status.problem =
                                Some(format!("its disk does not mount as ext4 ({e}): an empty directory, not kept"))
                        }
                    }
                }
            }
        }
        match &status.problem {
            None => say!("cache {} (version {}) at {}", g.name, g.version.unwrap_or(0), target.display()),
            Some(why) => say!("cache {}: {why}", g.name),
        }
        out.push(status);
    }
    out
}

/// Unmounts the mounted caches and syncs, so that their disks are whole
/// when the VM powers off. One that stays busy is detached: what was
/// written is synced either way.
pub fn unmount_all(caches: &[CacheStatus]) {
    nix::unistd::sync();
    for c in caches.iter().filter(|c| c.mounted) {
        let target = Path::new(MOUNT_DIR).join(&c.name);
        if let Err(e) = umount2(&target, MntFlags::empty()) {
            say!("cannot unmount cache {} ({e}); detaching it", c.name);
            let _ = umount2(&target, MntFlags::MNT_DETACH);
        }
    }
    nix::unistd::sync();
}

/// The device node of the block device whose serial is `serial`, waiting
/// up to `wait` for it to appear.
fn find_by_serial(sys_block: &Path, serial: &str, wait: Duration) -> Option<PathBuf> {
    let start = Instant::now();
    loop {
        if let Ok(rd) = fs::read_dir(sys_block) {
            for entry in rd.flatten() {
                let found = fs::read_to_string(entry.path().join("serial")).is_ok_and(|s| s.trim() == serial);
                if found {
                    return Some(Path::new("/dev").join(entry.file_name()));
                }
            }
        }
        if start.elapsed() >= wait {
            return None;
        }
        sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_is_found_by_its_serial_and_only_by_it() {
        let sys = tempfile::tempdir().expect("tempdir");
        for (dev, serial) in [("vda", ""), ("vdb", "construir-cache10\n"), ("vdc", "construir-cache1\n")] {
            fs::create_dir_all(sys.path().join(dev)).expect("mkdir");
            fs::write(sys.path().join(dev).join("serial"), serial).expect("w");
        }
        let none = Duration::ZERO;
        assert_eq!(find_by_serial(sys.path(), "construir-cache1", none), Some(PathBuf::from("/dev/vdc")));
        assert_eq!(find_by_serial(sys.path(), "construir-cache10", none), Some(PathBuf::from("/dev/vdb")));
        assert_eq!(find_by_serial(sys.path(), "construir-cache2", none), None);
    }
}
