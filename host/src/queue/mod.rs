//! The queue's directories and every move between them. A job file is
//! always in exactly one place: `queue/`, `running/<host>/`, `done/` or
//! `failed/`; each move is one `rename(2)` followed by an fsync of the
//! directories, so a crash leaves it in one of them. Names in `failed/` and
//! staging names in `done/` are the host's own, so nothing a queue writer
//! drops in can sit there looking host-written.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use jobfile::layout::Beside;

mod delivery;
mod recovery;

pub use delivery::{
    drop_delivery_note, end_delivered, finish_claim, land, note_delivery, resume_delivery, stage, Delivery, Resumed,
    Staged,
};
pub use recovery::{forget_counters, forget_no_boot, note_no_boot, read_counter, recover};

use crate::files::{self, create_new_at, rename_noreplace, sync_dirs};

/// How a job ended, for the host's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Done { path: PathBuf, verdict: String },
    Failed { path: PathBuf, reason: String },
    Requeued,
}

/// The queue's directories as one host sees them: the shared layout
/// (`jobfile::layout::Beside`, which it derefs to: `queue`, `running`, `done`,
/// `failed`, `images`), this host's own `running/<host-id>/`, and its
/// working directory on local disk.
#[derive(Debug, Clone)]
pub struct Dirs {
    pub shared: Beside,
    /// `running/<host-id>/`: this host's claims and its notes about them.
    pub host_dir: PathBuf,
    pub work: PathBuf,
}

impl std::ops::Deref for Dirs {
    type Target = Beside;
    fn deref(&self) -> &Beside {
        &self.shared
    }
}

impl Dirs {
    /// Host `host_id` on the directories `shared`.
    pub fn of(shared: Beside, host_id: &str, work: PathBuf) -> Dirs {
        Dirs { host_dir: shared.running.join(host_id), shared, work }
    }

    /// The usual tree under `root`, created, with `running/host` as this host's.
    #[cfg(test)]
    pub(crate) fn for_test(root: &Path) -> Dirs {
        let d = Dirs::of(Beside::queue(&root.join("queue")), "host", root.join("work"));
        d.create_all().expect("dirs");
        d
    }

    /// `running/<host_id>` and the working directory are this host's own.
    pub fn create_all(&self) -> io::Result<()> {
        for d in [&self.queue, &self.host_dir, &self.done, &self.failed, &self.work] {
            fs::create_dir_all(d)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", d.display())))?;
        }
        Ok(())
    }
}

/// What the scan saw of a job file; after the claim the file must still be this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
}

impl Scanned {
    pub(crate) fn of(meta: &fs::Metadata) -> Self {
        Scanned { dev: meta.dev(), ino: meta.ino(), size: meta.len(), mtime: (meta.mtime(), meta.mtime_nsec()) }
    }
}

/// Which queue entries a host takes (see `pending`).
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub min_size: u64,
    pub max_size: u64,
    /// A file must be unchanged this long before it is claimed.
    pub settle: std::time::Duration,
}

/// Claims a job: `rename(queue/x, running/x)`. Another host may win the race;
/// then this returns `Ok(false)`.
pub fn claim(dirs: &Dirs, file_name: &OsStr) -> io::Result<bool> {
    match rename_noreplace(&dirs.queue.join(file_name), &dirs.host_dir.join(file_name)) {
        Ok(()) => {
            sync_dirs(&[&dirs.queue, &dirs.host_dir])?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// A name no other host and no other attempt of this host uses:
/// `<host>.<pid>.<nanoseconds>.<n>`.
pub fn unique_tag(host_id: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{host_id}.{}.{nanos}.{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
}

/// Moves a claimed job `from` (a valid job name) into `failed/` under its
/// own name (or a numbered one if that is taken) and writes
/// `<name>.reason`, and the console log as `<name>.log` if there is one.
pub fn fail(dirs: &Dirs, from: &Path, reason: &str, log: Option<&[u8]>) -> io::Result<PathBuf> {
    fail_as(dirs, from, from.file_name().unwrap_or(OsStr::new("unnamed")), reason, log)
}

/// `fail`, under `name` (a valid job or result name) rather than `from`'s
/// own: the queue's one way to fail an entry (`jobfile::layout::fail`).
pub fn fail_as(dirs: &Dirs, from: &Path, name: &OsStr, reason: &str, log: Option<&[u8]>) -> io::Result<PathBuf> {
    let log = log.map(jobfile::layout::FailLog::Bytes);
    jobfile::layout::fail(&dirs.failed, from, name, reason, log)?.ok_or_else(|| gone(from))
}

/// Moves a refused queue entry into `failed/` under a name the host chooses
/// (`refused.<tag>`); the name it came with is inside the `.reason`,
/// sanitized. So a file dropped into the queue as `victim_i1.tar.xz.log`
/// never becomes a log in `failed/`.
pub fn refuse(dirs: &Dirs, host_id: &str, file_name: &OsStr, reason: &str) -> io::Result<PathBuf> {
    let from = dirs.queue.join(file_name);
    let chosen = OsString::from(format!("refused.{}", unique_tag(host_id)));
    jobfile::layout::refuse(&dirs.failed, &from, &chosen, reason)?.ok_or_else(|| gone(&from))
}

fn gone(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{} is gone", path.display()))
}

/// Puts a claimed job back in the queue (the host is stopping).
pub fn requeue(dirs: &Dirs, file_name: &OsStr) -> io::Result<()> {
    rename_noreplace(&dirs.host_dir.join(file_name), &dirs.queue.join(file_name))?;
    sync_dirs(&[&dirs.host_dir, &dirs.queue])
}

/// Takes a claimed job out of its submitter's hands and makes the working
/// copy: the claimed file must still be the one the scan saw (same inode,
/// size and mtime, one name, regular); on a root host it becomes root's,
/// mode 0600; at most the scanned size is copied, into `disk_name` created
/// new in `job_dir` (no link followed, nothing replaced). Returns the copy,
/// its size rounded up to whole 512-byte sectors (a disk cannot end mid-sector).
pub fn take_claimed(
    claimed: &Path,
    scanned: &Scanned,
    job_dir: &impl AsFd,
    disk_name: &OsStr,
) -> io::Result<(File, u64)> {
    let src = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(claimed)?;
    let meta = src.metadata()?;
    if !meta.file_type().is_file() || meta.nlink() != 1 || Scanned::of(&meta) != *scanned {
        return Err(io::Error::other(format!(
            "{} changed after it was scanned (it must stay one regular file of {} bytes, unchanged, once queued)",
            claimed.display(),
            scanned.size
        )));
    }
    if crate::jail::running_as_root() {
        // A submitter keeps no say over a claimed file: not its owner, no permissions.
        nix::unistd::fchown(&src, Some(nix::unistd::Uid::from_raw(0)), Some(nix::unistd::Gid::from_raw(0)))?;
    }
    src.set_permissions(fs::Permissions::from_mode(0o600))?;
    let dst = create_new_at(job_dir, disk_name, 0o600)?;
    files::copy_sparse(&src, &dst, scanned.size)?;
    let size = scanned.size.div_ceil(512) * 512;
    dst.set_len(size)?;
    dst.sync_all()?;
    Ok((dst, size))
}

/// Where a running job's console is written as it arrives:
/// `running/<host-id>/.console.<file name>` (removed when the job ends; its
/// whole log then lands beside the result).
pub fn live_console(dirs: &Dirs, file_name: &OsStr) -> PathBuf {
    jobfile::layout::live_console(&dirs.host_dir, file_name)
}

/// A request to stop a running job: a file `running/.cancel/<file name>`,
/// shared by every host on the queue; whichever host runs the job stops its
/// VM and sends the job to failed/.
pub fn cancel_request(dirs: &Dirs, file_name: &OsStr) -> PathBuf {
    jobfile::layout::cancel_request(&dirs.running, file_name)
}

pub use jobfile::layout::{host_state, HostInfo, HOST_FILE};

/// Takes this host's place in `running/<host-id>/`: an exclusive lock on
/// its `HOST_FILE`, held while the returned lock lives. Fails when another
/// live host has the same id.
pub fn hold_host(dirs: &Dirs, info: &HostInfo) -> io::Result<nix::fcntl::Flock<File>> {
    let path = dirs.host_dir.join(HOST_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)?;
    let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        io::Error::other(format!(
            "another host with the same host id holds {} ({e}); give each host its own --host-id",
            path.display()
        ))
    })?;
    write_host_info(&lock, info)?;
    Ok(lock)
}

/// Rewrites a held `HOST_FILE` (at a clean stop, with `stopped` set).
pub fn write_host_info(held: &nix::fcntl::Flock<File>, info: &HostInfo) -> io::Result<()> {
    held.set_len(0)?;
    held.write_all_at(serde_json::to_string(info).expect("serializes").as_bytes(), 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::open_dir;
    use std::os::unix::fs::FileExt;

    fn dirs(root: &Path) -> Dirs {
        Dirs::for_test(root)
    }

    #[test]
    fn a_host_holds_its_place_and_a_second_host_of_the_same_id_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = dirs(tmp.path());
        assert_eq!(host_state(&d.host_dir), (false, None));
        let info = HostInfo {
            pid: 42,
            started: "2026-11-30T00:00:00Z".into(),
            workers: 2,
            version: "0.1.0".into(),
            stopped: None,
        };
        let held = hold_host(&d, &info).expect("first");
        let e = hold_host(&d, &info).expect_err("second");
        assert!(e.to_string().contains("another host with the same host id"), "{e}");
        assert_eq!(host_state(&d.host_dir), (true, Some(info.clone())));
        drop(held);
        assert_eq!(host_state(&d.host_dir), (false, Some(info)), "a host that has gone leaves its file unlocked");
    }

    #[test]
    fn a_job_is_claimed_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = dirs(tmp.path());
        fs::write(d.queue.join("good_i1.tar.xz"), vec![0u8; 70_000]).expect("write");
        assert!(claim(&d, OsStr::new("good_i1.tar.xz")).expect("claim"));
        assert!(!claim(&d, OsStr::new("good_i1.tar.xz")).expect("second claim"), "a job is claimed once");
        assert!(d.host_dir.join("good_i1.tar.xz").exists());
    }

    #[test]
    fn refused_entries_get_host_chosen_names_with_the_original_inside() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = dirs(tmp.path());
        // Names a queue writer might use to plant host-looking files in failed/.
        for name in ["victim_i1.tar.xz.log", "victim_i1.tar.xz.reason", "evil\x1b[2J_i1.tar.xz"] {
            let name = name.replace("\\x1b", "\x1b");
            fs::write(d.queue.join(&name), b"planted").expect("write");
            let target = refuse(&d, "hostA", OsStr::new(&name), "bad job file name").expect("refuse");
            let chosen = target.file_name().expect("name").to_string_lossy().into_owned();
            assert!(chosen.starts_with("refused.hostA."), "{chosen}");
            assert_eq!(fs::read(&target).expect("moved"), b"planted");
            let reason = fs::read_to_string(target.with_file_name(format!("{chosen}.reason"))).expect("reason");
            assert_eq!(reason, format!("bad job file name\noriginal name: {}\n", jobfile::sanitize(name.as_bytes())));
            assert!(!reason.contains('\x1b'));
        }
        assert!(!d.failed.join("victim_i1.tar.xz.log").exists());
        assert!(!d.failed.join("victim_i1.tar.xz.reason").exists());
        // The symlink is moved as a link, never followed.
        std::os::unix::fs::symlink("/etc/passwd", d.queue.join("link_i1.tar.xz")).expect("symlink");
        let moved = refuse(&d, "hostA", OsStr::new("link_i1.tar.xz"), "a symlink").expect("refuse");
        assert!(fs::symlink_metadata(moved).expect("moved").file_type().is_symlink());
        assert!(Path::new("/etc/passwd").exists());
    }

    fn claimed_job(d: &Dirs, data: &[u8]) -> (PathBuf, Scanned) {
        let path = d.host_dir.join("j_i1.tar.xz");
        fs::write(&path, data).expect("write");
        let meta = fs::symlink_metadata(&path).expect("stat");
        (path, Scanned::of(&meta))
    }

    #[test]
    fn a_claimed_file_that_grew_or_changed_is_not_taken_and_at_most_its_size_is_copied() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = dirs(tmp.path());
        let job_dir = open_dir(&d.work).expect("work");
        let (path, scanned) = claimed_job(&d, b"job bytes");
        // Grown through a descriptor the submitter kept: refused, nothing copied.
        let held = OpenOptions::new().write(true).open(&path).expect("open");
        held.write_all_at(b"more", 9).expect("grow");
        let e = take_claimed(&path, &scanned, &job_dir, OsStr::new("disk")).expect_err("changed");
        assert!(e.to_string().contains("changed after it was scanned"), "{e}");
        assert!(!d.work.join("disk").exists());
        // Unchanged: taken, 0600, copied and rounded to a sector.
        let (path, scanned) = claimed_job(&d, b"job bytes");
        let (copy, size) = take_claimed(&path, &scanned, &job_dir, OsStr::new("disk")).expect("take");
        assert_eq!(size, 512);
        assert_eq!(fs::metadata(&path).expect("stat").permissions().mode() & 0o777, 0o600);
        let mut head = [0u8; 9];
        copy.read_exact_at(&mut head, 0).expect("read");
        assert_eq!(&head, b"job bytes");
        // The working copy is never created through a planted link, nor over an existing file.
        std::os::unix::fs::symlink("/etc/passwd", d.work.join("disk2")).expect("symlink");
        assert!(take_claimed(&path, &scanned, &job_dir, OsStr::new("disk2")).is_err());
        assert!(take_claimed(&path, &scanned, &job_dir, OsStr::new("disk")).is_err());
    }
}
