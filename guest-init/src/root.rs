//! From the initramfs to the image's root disk, when init is the
//! initramfs's `/init` and the kernel command line names a `root=`: wait for
//! the disk, mount it, move `/dev`, `/proc`, `/sys` and `/run` onto it,
//! delete the initramfs's files (their memory goes back to the job), and make
//! the disk `/` (switch_root's steps). Init then carries on as PID 1 of the
//! real root: the same process, no second exec.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
use nix::unistd::{chdir, chroot};
use thiserror::Error;

/// Where the root disk is mounted before it becomes `/`.
const NEW_ROOT: &str = "/newroot";

/// Mounts that move with the switch; `/dev/pts` moves inside `/dev`.
const MOVED: &[&str] = &["/dev", "/proc", "/sys", "/run"];

/// The kernel's own `root=`, `rootfstype=` and `rootflags=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSpec {
    pub device: PathBuf,
    pub fstype: String,
    pub flags: MountFlags,
}

/// `rootflags=` split into what mount(2) takes as flags and the rest, which
/// the filesystem reads as its data string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountFlags {
    pub flags: MsFlags,
    pub data: String,
}

impl MountFlags {
    pub fn parse(words: &str) -> MountFlags {
        let mut out = MountFlags { flags: MsFlags::empty(), data: String::new() };
        let mut data = Vec::new();
        for word in words.split(',').filter(|w| !w.is_empty()) {
            match word {
                "ro" => out.flags |= MsFlags::MS_RDONLY,
                "rw" => out.flags &= !MsFlags::MS_RDONLY,
                "noatime" => out.flags |= MsFlags::MS_NOATIME,
                "nodiratime" => out.flags |= MsFlags::MS_NODIRATIME,
                "relatime" => out.flags |= MsFlags::MS_RELATIME,
                "lazytime" => out.flags |= MsFlags::MS_LAZYTIME,
                "nosuid" => out.flags |= MsFlags::MS_NOSUID,
                "nodev" => out.flags |= MsFlags::MS_NODEV,
                "noexec" => out.flags |= MsFlags::MS_NOEXEC,
                "sync" => out.flags |= MsFlags::MS_SYNCHRONOUS,
                other => data.push(other),
            }
        }
        out.data = data.join(",");
        out
    }
}

impl RootSpec {
    /// The root named on a kernel command line, if any. `root=` must be a
    /// device path (there is no udev to resolve `UUID=` or `LABEL=`).
    pub fn from_cmdline(cmdline: &str) -> Option<Result<RootSpec, SwitchError>> {
        let mut device = None;
        let mut fstype = "ext4".to_owned();
        let mut flags = MountFlags::parse("");
        for word in cmdline.split_ascii_whitespace() {
            if let Some(v) = word.strip_prefix("root=") {
                device = Some(v.to_owned());
            } else if let Some(v) = word.strip_prefix("rootfstype=") {
                fstype = v.to_owned();
            } else if let Some(v) = word.strip_prefix("rootflags=") {
                flags = MountFlags::parse(v);
            }
        }
        let device = device?;
        if !device.starts_with("/dev/") {
            return Some(Err(SwitchError::NotAPath { root: device }));
        }
        Some(Ok(RootSpec { device: device.into(), fstype, flags }))
    }
}

#[derive(Debug, Error)]
pub enum SwitchError {
    #[error("root={root} is not a device path (this init has no udev: give root=/dev/...)")]
    NotAPath { root: String },
    #[error("the root disk {} did not appear within {} s", path.display(), waited.as_secs())]
    Missing { path: PathBuf, waited: Duration },
    #[error("{} is not a block device", path.display())]
    NotABlockDevice { path: PathBuf },
    #[error("cannot {what}: {source}")]
    Step { what: String, source: nix::Error },
}

fn step(what: impl Into<String>) -> impl FnOnce(nix::Error) -> SwitchError {
    let what = what.into();
    move |source| SwitchError::Step { what, source }
}

/// Whether `/` is an initramfs (ramfs or tmpfs), the only root we switch from.
pub fn in_initramfs() -> bool {
    // ramfs's magic (include/uapi/linux/magic.h); nix names only tmpfs's.
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    statfs("/").is_ok_and(|s| s.filesystem_type() == RAMFS_MAGIC || s.filesystem_type() == TMPFS_MAGIC)
}

/// Mounts `spec` and makes it `/`. On success the process's root and working
/// directory are the disk's; the initramfs's files are gone.
pub fn switch_root(spec: &RootSpec, wait: Duration) -> Result<(), SwitchError> {
    wait_for_block_device(&spec.device, wait)?;
    let _ = fs::create_dir_all(NEW_ROOT);
    let data = (!spec.flags.data.is_empty()).then_some(spec.flags.data.as_str());
    mount(Some(&spec.device), NEW_ROOT, Some(spec.fstype.as_str()), spec.flags.flags, data).map_err(step(format!(
        "mount {} ({}) on {NEW_ROOT}",
        spec.device.display(),
        spec.fstype
    )))?;
    for from in MOVED {
        let to = format!("{NEW_ROOT}{from}");
        let _ = fs::create_dir_all(&to);
        mount(Some(*from), to.as_str(), None::<&str>, MsFlags::MS_MOVE, None::<&str>)
            .map_err(step(format!("move {from} to the root disk")))?;
    }
    // Our own /tmp in the initramfs is empty; the real root gets a fresh one.
    let _ = umount2("/tmp", MntFlags::MNT_DETACH);
    let old_root_dev = fs::symlink_metadata("/").map(|m| m.dev()).map_err(|e| SwitchError::Step {
        what: "stat /".into(),
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    remove_tree(Path::new("/"), old_root_dev);
    chdir(NEW_ROOT).map_err(step(format!("chdir {NEW_ROOT}")))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(step("move the root disk onto /"))?;
    chroot(".").map_err(step("chroot into the root disk"))?;
    chdir("/").map_err(step("chdir /"))?;
    Ok(())
}

fn wait_for_block_device(path: &Path, wait: Duration) -> Result<(), SwitchError> {
    let start = Instant::now();
    loop {
        match fs::metadata(path) {
            Ok(m) if m.file_type().is_block_device() => return Ok(()),
            Ok(_) => return Err(SwitchError::NotABlockDevice { path: path.to_owned() }),
            Err(_) if start.elapsed() < wait => sleep(Duration::from_millis(10)),
            Err(_) => return Err(SwitchError::Missing { path: path.to_owned(), waited: wait }),
        }
    }
}

/// Deletes what is beneath `dir` on the filesystem `dev`, never crossing
/// into another (the new root and the moved mounts are other filesystems).
/// Best effort: what cannot be removed only costs memory.
fn remove_tree(dir: &Path, dev: u64) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else { continue };
        // The mounted root disk and the moved mounts are other filesystems: never entered.
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            remove_tree(&path, dev);
            let _ = fs::remove_dir(&path);
        } else {
            let _ = fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kernels_root_words() {
        let spec = RootSpec::from_cmdline("console=ttyS0 root=/dev/vda rootfstype=ext4 rootflags=noatime,ro,commit=60")
            .expect("a root")
            .expect("valid");
        assert_eq!(spec.device, Path::new("/dev/vda"));
        assert_eq!(spec.fstype, "ext4");
        assert_eq!(spec.flags.flags, MsFlags::MS_NOATIME | MsFlags::MS_RDONLY);
        assert_eq!(spec.flags.data, "commit=60");
        assert!(RootSpec::from_cmdline("console=ttyS0 rdinit=/init").is_none());
        let err = RootSpec::from_cmdline("root=UUID=1234").expect("a root").expect_err("not a path");
        assert!(err.to_string().contains("root=UUID=1234 is not a device path"), "{err}");
        assert_eq!(RootSpec::from_cmdline("root=/dev/vdb").expect("a root").expect("valid").fstype, "ext4");
    }

    #[test]
    fn remove_tree_stays_on_its_filesystem() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        fs::write(dir.path().join("a/b/f"), "x").expect("write");
        std::os::unix::fs::symlink("/etc", dir.path().join("a/link")).expect("symlink");
        let dev = fs::metadata(dir.path()).expect("stat").dev();
        remove_tree(dir.path(), dev);
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 0);
        assert!(Path::new("/etc/passwd").exists(), "a symlink is removed, never followed");
        remove_tree(dir.path(), dev + 1); // another filesystem's id: nothing is touched
    }
}
