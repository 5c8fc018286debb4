//! The queue-directory contract, in one place: the directories beside a
//! queue, and the files the host, `status`, `run-one`, the remote host and
//! the server leave for each other in them (a failed job's reason, a cancel
//! request, a running job's live console).
//!
//! ```text
//! queue/                      job files waiting (<name>_i<image>.tar.xz)
//! running/<host-id>/          claimed by that host; .console.<file> while it runs
//! running/.cancel/<file>      a request to stop <file>, whichever host runs it
//! running/.attempts/          the hosts' counts of each job's attempts
//! running/.farm/<file>        a job the server has leased to a remote host
//! running/.slurm/<file>       a job the server has handed to Slurm
//! running/.pins/<file>.*      the job's terms: its pin, owner, rebuild (`Terms`)
//! running/.pins/<file>.ranon  the host that claimed that run (`crate::rebuild`)
//! running/.caches/            the build caches' shared files (`CacheTree`)
//! done/<name>_d<image>.tar.xz a result, with <name>_d<image>.log and
//!                             <name>_d<image>.intoto.jsonl (its signed provenance);
//!                             all three land by `land`: log, provenance, the result
//!                             last, because a result in done/ is how everyone sees
//!                             that a job ended (the server judges a verified rebuild
//!                             once, for good, as soon as both results are there)
//! running/.keys/<host-id>.pub a host's public key, for the server
//! failed/<file>               a failed job, with <file>.reason (first line: why;
//!                             a refused one also "original name: ...") and maybe <file>.log;
//!                             all put there by `fail` or `refuse`
//! images/i<N>/                the base images
//! <shared>/runs/<id>.<n>/     a Slurm attempt's directory (`AttemptDir`)
//! ```

mod attempt;
mod cache_tree;
mod failed;
mod land;
mod terms;

pub use attempt::AttemptDir;
pub use cache_tree::CacheTree;
pub use failed::{fail, refuse, FailLog};
pub use land::{land, rename_noreplace, Landed, Landing};
pub use terms::{owner_file, pin_file, BadTerms, Member, TermFiles, Terms};

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The directories beside a queue, as every part defaults them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beside {
    pub queue: PathBuf,
    /// The parent of every host's `running/<host-id>/`.
    pub running: PathBuf,
    pub done: PathBuf,
    pub failed: PathBuf,
    pub images: PathBuf,
}

impl Beside {
    /// `running/`, `done/`, `failed/` and `images/` as siblings of `queue`
    /// (made absolute, so that a relative queue names the same directories).
    pub fn queue(queue: &Path) -> Beside {
        let queue = std::path::absolute(queue).unwrap_or_else(|_| queue.to_owned());
        Beside {
            running: sibling(&queue, "running"),
            done: sibling(&queue, "done"),
            failed: sibling(&queue, "failed"),
            images: sibling(&queue, "images"),
            queue,
        }
    }

    /// The hosts' directories in `running/`, as (host id, path), sorted: real
    /// directories only, none of the dot-names the contract keeps for itself
    /// (`.cancel`, `.attempts`, `.farm`) and no name that is not UTF-8.
    pub fn host_dirs(&self) -> Vec<(String, PathBuf)> {
        let Ok(rd) = fs::read_dir(&self.running) else { return Vec::new() };
        let mut dirs: Vec<_> = rd
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
            .filter(|(name, _)| !name.starts_with('.'))
            .collect();
        dirs.sort();
        dirs
    }

    /// Where the job `file_name` (its input name, `<name>_i<image>.tar.xz`)
    /// is now, looking in `queue/`, each of `hosts` (as `host_dirs` gives
    /// them), `done/` and `failed/`. A file under the job's input name
    /// counts only when `is_job` says it is the job's (the server: the inode
    /// it wrote); a result counts only as a regular file with one name.
    /// Nothing is followed through a link.
    pub fn locate(
        &self,
        file_name: &str,
        hosts: &[(String, PathBuf)],
        is_job: impl Fn(&fs::Metadata) -> bool,
    ) -> Found {
        let Ok(job) = crate::JobName::parse(file_name) else { return Found::Missing };
        let at = |path: &Path| fs::symlink_metadata(path).ok();
        if let Some(meta) = at(&self.queue.join(file_name)).filter(&is_job) {
            return Found::Waiting(meta);
        }
        for (host, dir) in hosts {
            if let Some(meta) = at(&dir.join(file_name)).filter(&is_job) {
                return Found::Running { host: host.clone(), dir: dir.clone(), meta };
            }
        }
        let (result, log) = (self.done.join(job.done_file_name()), self.done.join(job.done_with_extension("log")));
        if let Some(meta) = at(&result).filter(lone_file) {
            return Found::Done { result, log, meta };
        }
        // The job file itself, or a failed result a host kept.
        let failed = [(self.failed.join(file_name), true), (self.failed.join(job.done_file_name()), false)];
        for (file, input) in failed {
            if at(&file).is_some_and(|m| if input { is_job(&m) } else { lone_file(&m) }) {
                let log = Some(beside_entry(&file, "log")).filter(|l| at(l).is_some_and(|m| lone_file(&m)));
                return Found::Failed { reason: read_reason(&file), log, file };
            }
        }
        Found::Missing
    }
}

/// Where a job is now, as the queue's directories say (`Beside::locate`).
#[derive(Debug)]
pub enum Found {
    /// In `queue/`.
    Waiting(fs::Metadata),
    /// Claimed: in `running/<host>/` (`dir`).
    Running {
        host: String,
        dir: PathBuf,
        meta: fs::Metadata,
    },
    /// Ended with a result in `done/`, and its log beside it.
    Done {
        result: PathBuf,
        log: PathBuf,
        meta: fs::Metadata,
    },
    /// In `failed/`: the job file or a failed result (`file`), with what
    /// its `.reason` says and its log when it has one.
    Failed {
        file: PathBuf,
        reason: Option<Reason>,
        log: Option<PathBuf>,
    },
    Missing,
}

/// A regular file with one name: what a result, a log or a reason must be.
pub fn lone_file(meta: &fs::Metadata) -> bool {
    meta.file_type().is_file() && meta.nlink() == 1
}

/// The directory `name` beside `queue`.
pub fn sibling(queue: &Path, name: &str) -> PathBuf {
    let abs = std::path::absolute(queue).unwrap_or_else(|_| queue.to_owned());
    abs.parent().unwrap_or(Path::new("/")).join(name)
}

/// Where the server keeps the jobs it has leased to remote hosts:
/// `running/.farm/` (a dot-name, so no host's recovery takes them).
pub const FARM: &str = ".farm";

/// Where the server keeps the jobs it has handed to Slurm: `running/.slurm/`.
pub const SLURM: &str = ".slurm";

/// Writes `data` to `path` whole: a temporary name in its directory (made
/// when missing), synced, then renamed.
pub fn write_whole(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("a file in a directory");
    fs::create_dir_all(dir)?;
    let mut tmp_name = OsString::from(".");
    tmp_name.push(path.file_name().expect("a file name"));
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    // A new file, never through a link or onto one left there (a stale one is removed, not followed).
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    std::io::Write::write_all(&mut file, data)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

/// Reads a small file: a regular file with one name, never through a link,
/// at most `max` bytes. `None` when there is none.
pub fn read_small(path: &Path, max: u64) -> Result<Option<Vec<u8>>, String> {
    let file = match open_unfollowed(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let meta = file.metadata().map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !lone_file(&meta) || meta.len() > max {
        return Err(format!("{} is not a regular file with one name of at most {max} bytes", path.display()));
    }
    let mut raw = Vec::new();
    file.take(max).read_to_end(&mut raw).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(Some(raw))
}

/// The extension of a result's signed provenance, beside it in `done/`.
pub const PROVENANCE_EXTENSION: &str = "intoto.jsonl";

/// The provenance file beside the result at `result` (`x_d1.tar.xz` ->
/// `x_d1.intoto.jsonl`; any other name gets the extension added).
pub fn provenance_beside(result: &Path) -> PathBuf {
    let name = result.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = name.strip_suffix(crate::name::SUFFIX).unwrap_or(&name);
    result.with_file_name(format!("{stem}.{PROVENANCE_EXTENSION}"))
}

/// The console log beside the result at `result` (`x_d1.tar.xz` -> `x_d1.log`), when there is one.
pub fn log_beside(result: &Path) -> Option<PathBuf> {
    let name = result.file_name()?.to_str()?;
    let log = result.with_file_name(format!("{}.log", name.strip_suffix(crate::name::SUFFIX)?));
    log.exists().then_some(log)
}

/// Where a host on the queue publishes its public key: `running/.keys/<host-id>.pub`.
pub fn host_key_file(running: &Path, host_id: &str) -> PathBuf {
    running.join(".keys").join(format!("{host_id}.pub"))
}

/// The file in `running/<host-id>/` that a running host holds locked: it
/// says the host is alive (to `status`, and to a second host started with
/// the same id, which refuses to start), and what it is.
pub const HOST_FILE: &str = ".host";

/// What a running host says of itself in its `HOST_FILE`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostInfo {
    pub pid: u32,
    /// RFC 3339, UTC.
    pub started: String,
    pub workers: usize,
    pub version: String,
    /// RFC 3339: when it stopped cleanly (absent while it runs, or if it died).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

/// Whether the host whose claims are in `host_dir` (a `running/<host-id>/`)
/// is alive, and what it said of itself. A directory without a `HOST_FILE`
/// (left by an older host, or never used) counts as not alive.
pub fn host_state(host_dir: &Path) -> (bool, Option<HostInfo>) {
    let Ok(file) = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(host_dir.join(HOST_FILE))
    else {
        return (false, None);
    };
    let info = fs::read_to_string(host_dir.join(HOST_FILE)).ok().and_then(|t| serde_json::from_str(&t).ok());
    // A shared lock is refused only while the host holds its exclusive one.
    let alive = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock).is_err();
    (alive, info)
}

/// Where cancel requests are: `running/.cancel/`, shared by every host on the queue.
pub fn cancel_dir(running: &Path) -> PathBuf {
    running.join(".cancel")
}

/// A request to stop the running job `file_name`: an empty file in
/// `running/.cancel/`; whichever host runs the job stops its VM and sends
/// the job to `failed/`. `running` is the parent of the hosts' directories.
pub fn cancel_request(running: &Path, file_name: &OsStr) -> PathBuf {
    cancel_dir(running).join(file_name)
}

/// Where a running job's console is written as it arrives:
/// `running/<host-id>/.console.<file name>` (removed when the job ends; its
/// whole log then lands beside the result).
pub fn live_console(host_dir: &Path, file_name: &OsStr) -> PathBuf {
    let mut name = OsString::from(".console.");
    name.push(file_name);
    host_dir.join(name)
}

/// The file beside `entry` with `.<what>` appended to its name (`reason`, `log`).
pub fn beside_entry(entry: &Path, what: &str) -> PathBuf {
    let mut name = entry.file_name().unwrap_or_default().to_owned();
    name.push(".");
    name.push(what);
    entry.with_file_name(name)
}

/// Opens a file in the queue's directories for reading: never through a
/// link, and without blocking on a FIFO; the caller checks what it opened
/// on the descriptor.
pub fn open_unfollowed(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC).open(path)
}

/// Most bytes of a `.reason` that are read: the reason and the original name
/// are its first lines, and whatever follows is not read.
pub const REASON_READ: u64 = 4096;

/// What a failed job's `.reason` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    /// Its first line, sanitized and trimmed; never empty.
    pub why: String,
    /// The name a refused entry came into the queue with, sanitized.
    pub original: Option<String>,
}

/// Reads the `.reason` beside the failed entry `entry`: only a regular file
/// with one name (never through a link, never a FIFO or device), its first
/// `REASON_READ` bytes. `None` when there is none, it cannot be read, or its
/// first line is empty; each caller says what stands in for it.
pub fn read_reason(entry: &Path) -> Option<Reason> {
    let file = open_unfollowed(&beside_entry(entry, "reason")).ok()?;
    let meta = file.metadata().ok()?;
    if !lone_file(&meta) {
        return None;
    }
    let mut buf = Vec::new();
    file.take(REASON_READ).read_to_end(&mut buf).ok()?;
    let text = crate::text::sanitize_lines(&buf);
    let why = text.lines().next().unwrap_or("").trim().to_owned();
    let original = text.lines().find_map(|l| l.strip_prefix("original name: ")).map(|n| n.trim().to_owned());
    (!why.is_empty()).then_some(Reason { why, original })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directories_beside_a_queue_are_its_siblings_however_it_is_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let b = Beside::queue(&tmp.path().join("q"));
        assert_eq!(b.running, tmp.path().join("running"));
        assert_eq!(b.done, tmp.path().join("done"));
        assert_eq!(b.failed, tmp.path().join("failed"));
        assert_eq!(b.images, tmp.path().join("images"));
        assert_eq!(sibling(Path::new("/srv/q"), "done"), Path::new("/srv/done"));
        assert!(Beside::queue(Path::new("relative/q")).done.is_absolute());
        assert_eq!(
            cancel_request(&b.running, OsStr::new("a_i0.tar.xz")),
            tmp.path().join("running/.cancel/a_i0.tar.xz")
        );
        assert_eq!(
            live_console(&b.running.join("h1"), OsStr::new("a_i0.tar.xz")),
            b.running.join("h1/.console.a_i0.tar.xz")
        );
    }

    #[test]
    fn a_job_is_located_in_exactly_the_directory_its_file_is_in() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let b = Beside::queue(&tmp.path().join("queue"));
        for d in [&b.queue, &b.running.join("h1"), &b.running.join(".farm"), &b.done, &b.failed] {
            fs::create_dir_all(d).expect("dir");
        }
        let hosts = b.host_dirs();
        assert_eq!(hosts, vec![("h1".to_owned(), b.running.join("h1"))], "no dot-names");
        let any = |m: &fs::Metadata| lone_file(m);
        let is = |name: &str| format!("{:?}", b.locate(name, &hosts, any));
        fs::write(b.queue.join("w_i0.tar.xz"), "j").expect("w");
        fs::write(b.running.join("h1/r_i0.tar.xz"), "j").expect("w");
        fs::write(b.done.join("d_d0.tar.xz"), "result").expect("w");
        fs::write(b.failed.join("f_i0.tar.xz"), "j").expect("w");
        fs::write(b.failed.join("f_i0.tar.xz.reason"), "timed out\n").expect("w");
        fs::write(b.failed.join("f_i0.tar.xz.log"), "console").expect("w");
        fs::write(b.failed.join("k_d0.tar.xz"), "kept result").expect("w");
        assert!(is("w_i0.tar.xz").starts_with("Waiting"), "{}", is("w_i0.tar.xz"));
        assert!(matches!(b.locate("r_i0.tar.xz", &hosts, any), Found::Running { host, .. } if host == "h1"));
        assert!(matches!(b.locate("d_i0.tar.xz", &hosts, any),
            Found::Done { result, meta, .. } if result == b.done.join("d_d0.tar.xz") && meta.len() == 6));
        match b.locate("f_i0.tar.xz", &hosts, any) {
            Found::Failed { file, reason, log } => {
                assert_eq!(file, b.failed.join("f_i0.tar.xz"));
                assert_eq!(reason.map(|r| r.why).as_deref(), Some("timed out"));
                assert_eq!(log, Some(b.failed.join("f_i0.tar.xz.log")));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(b.locate("k_i0.tar.xz", &hosts, any),
            Found::Failed { file, reason: None, log: None } if file == b.failed.join("k_d0.tar.xz")));
        assert!(matches!(b.locate("gone_i0.tar.xz", &hosts, any), Found::Missing));
        assert!(matches!(b.locate("not a job", &hosts, any), Found::Missing));
        // What is not the job's is not it: a file `is_job` refuses, a link, a result with a second name.
        assert!(matches!(b.locate("w_i0.tar.xz", &hosts, |_| false), Found::Missing));
        std::os::unix::fs::symlink(b.queue.join("w_i0.tar.xz"), b.queue.join("l_i0.tar.xz")).expect("link");
        assert!(matches!(b.locate("l_i0.tar.xz", &hosts, any), Found::Missing));
        fs::hard_link(b.done.join("d_d0.tar.xz"), tmp.path().join("second")).expect("link");
        assert!(matches!(b.locate("d_i0.tar.xz", &hosts, |_| true), Found::Missing));
    }

    #[test]
    fn a_reason_is_its_first_line_sanitized_with_the_original_name_of_a_refused_entry() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let entry = tmp.path().join("refused.x");
        assert_eq!(read_reason(&entry), None, "no file");
        fs::write(beside_entry(&entry, "reason"), "  not a job file \x1b[2J\noriginal name: evil\x1b]0;x\x07\n")
            .expect("w");
        let r = read_reason(&entry).expect("a reason");
        assert!(r.why.starts_with("not a job file ") && !r.why.contains('\x1b'), "{:?}", r.why);
        assert!(r.original.as_deref().is_some_and(|o| o.starts_with("evil") && !o.contains('\x1b')));
        fs::write(beside_entry(&entry, "reason"), "\nsecond line\n").expect("w");
        assert_eq!(read_reason(&entry), None, "an empty first line is no reason");
        // Past the first 4 KiB nothing is read.
        let long = "x".repeat(REASON_READ as usize + 100);
        fs::write(beside_entry(&entry, "reason"), &long).expect("w");
        assert_eq!(read_reason(&entry).expect("reason").why.len(), REASON_READ as usize);
    }

    #[test]
    fn a_reason_is_never_read_through_a_link_or_a_second_name() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let secret = tmp.path().join("secret");
        fs::write(&secret, "the secret\n").expect("w");
        let a = tmp.path().join("a");
        std::os::unix::fs::symlink(&secret, beside_entry(&a, "reason")).expect("symlink");
        assert_eq!(read_reason(&a), None);
        let b = tmp.path().join("b");
        fs::hard_link(&secret, beside_entry(&b, "reason")).expect("link");
        assert_eq!(read_reason(&b), None);
        let c = tmp.path().join("c");
        nix::unistd::mkfifo(&beside_entry(&c, "reason"), nix::sys::stat::Mode::S_IRWXU).expect("fifo");
        assert_eq!(read_reason(&c), None, "a FIFO neither blocks nor reads");
    }
}
