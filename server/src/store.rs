//! The server's side of the queue's directory contract: it writes job files
//! into `queue/` (uploaded under a hidden name, then renamed in) and reads
//! where each has got to from `queue/`, `running/<host>/`, `done/` and
//! `failed/`, exactly as build hosts leave them.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use jobfile::name::{classify, Entry};
use jobfile::JobName;
use serde::Serialize;

/// The directories the server shares with build hosts.
#[derive(Debug, Clone)]
pub struct Store {
    pub queue: PathBuf,
    pub running: PathBuf,
    pub done: PathBuf,
    pub failed: PathBuf,
    pub images: PathBuf,
}

/// The first bytes of every xz stream.
pub const XZ_MAGIC: &[u8] = b"\xfd7zXZ\0";

/// Where a job is, as the directories say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Place {
    /// In `queue/`; `position` 1 is next.
    Waiting { position: usize, waiting: usize },
    /// Claimed by `host`, `elapsed_secs` ago.
    Running { host: String, elapsed_secs: u64 },
    /// A result in `done/`.
    Done { verdict: String, result_bytes: u64 },
    /// In `failed/`, with the first line of its reason.
    Failed { reason: String },
    /// In none of them (deleted by hand, or not yet renamed in).
    Missing,
}

impl Place {
    pub fn name(&self) -> &'static str {
        match self {
            Place::Waiting { .. } => "waiting",
            Place::Running { .. } => "running",
            Place::Done { .. } => "done",
            Place::Failed { .. } => "failed",
            Place::Missing => "missing",
        }
    }

    /// Whether the job can change no more.
    pub fn is_final(&self) -> bool {
        matches!(self, Place::Done { .. } | Place::Failed { .. })
    }
}

impl Store {
    /// Beside `queue`, as build hosts default them.
    pub fn beside(queue: &Path) -> Store {
        let queue = std::path::absolute(queue).unwrap_or_else(|_| queue.to_owned());
        let sibling = |n: &str| queue.parent().unwrap_or(Path::new("/")).join(n);
        Store {
            running: sibling("running"),
            done: sibling("done"),
            failed: sibling("failed"),
            images: sibling("images"),
            queue,
        }
    }

    pub fn create_all(&self) -> io::Result<()> {
        for d in [&self.queue, &self.running, &self.done, &self.failed] {
            fs::create_dir_all(d)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", d.display())))?;
        }
        Ok(())
    }

    /// Whether `images/i<image>/` holds an image.
    pub fn has_image(&self, image: &str) -> bool {
        jobfile::image::ImageManifest::load(&self.images.join(format!("i{image}"))).is_ok()
    }

    /// Where the hidden upload of job `id` is written.
    pub fn upload_path(&self, id: &str) -> PathBuf {
        self.queue.join(format!(".upload.{id}.part"))
    }

    /// Removes `.upload.*.part` files unchanged for `idle` (at start: another
    /// server sharing the store may be receiving an upload; one idle that long
    /// has been cut off).
    pub fn remove_stale_uploads(&self, idle: std::time::Duration) -> io::Result<usize> {
        let mut n = 0;
        for e in fs::read_dir(&self.queue)?.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let quiet = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
            if name.starts_with(".upload.") && name.ends_with(".part") && quiet.is_some_and(|q| q >= idle) {
                fs::remove_file(e.path())?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Renames a finished upload into the queue under `file_name`, never replacing anything.
    pub fn enqueue(&self, upload: &Path, file_name: &str) -> io::Result<()> {
        rename_noreplace(upload, &self.queue.join(file_name))?;
        File::open(&self.queue)?.sync_all()
    }

    /// Where `file_name` (a job's input name) is now.
    pub fn locate(&self, file_name: &str) -> Place {
        let Ok(job) = JobName::parse(file_name) else { return Place::Missing };
        if let Ok(meta) = fs::symlink_metadata(self.queue.join(file_name)) {
            let mine = (meta.ctime(), meta.ctime_nsec(), file_name.to_owned());
            let (mut ahead, mut waiting) = (0, 0);
            for (ctime, nsec, name) in self.waiting() {
                waiting += 1;
                if (ctime, nsec, name.as_str()) < (mine.0, mine.1, mine.2.as_str()) {
                    ahead += 1;
                }
            }
            return Place::Waiting { position: ahead + 1, waiting };
        }
        if let Ok(hosts) = fs::read_dir(&self.running) {
            for host in hosts.flatten() {
                if let Ok(meta) = fs::symlink_metadata(host.path().join(file_name)) {
                    let claimed = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(meta.ctime().max(0) as u64);
                    let elapsed_secs = SystemTime::now().duration_since(claimed).unwrap_or_default().as_secs();
                    return Place::Running { host: host.file_name().to_string_lossy().into_owned(), elapsed_secs };
                }
            }
        }
        let done = self.done.join(job.done_file_name());
        if let Ok(meta) = fs::metadata(&done) {
            let verdict = jobfile::tools::log_verdict(&self.done.join(job.done_with_extension("log")))
                .unwrap_or_else(|| "(no log)".to_owned());
            return Place::Done { verdict, result_bytes: meta.len() };
        }
        for candidate in [file_name.to_owned(), job.done_file_name()] {
            if fs::symlink_metadata(self.failed.join(&candidate)).is_ok() {
                let reason = read_head(&self.failed.join(format!("{candidate}.reason")), 4096);
                let reason = reason.lines().next().unwrap_or("(no reason)");
                return Place::Failed { reason: jobfile::sanitize(reason.as_bytes()) };
            }
        }
        Place::Missing
    }

    /// Whether the job has ended (its result in `done/`, or it in `failed/`): two stats.
    pub fn finished(&self, file_name: &str) -> bool {
        let Ok(job) = JobName::parse(file_name) else { return false };
        self.done.join(job.done_file_name()).exists()
            || fs::symlink_metadata(self.failed.join(file_name)).is_ok()
            || fs::symlink_metadata(self.failed.join(job.done_file_name())).is_ok()
    }

    /// Job files waiting in the queue: (ctime, ctime ns, name).
    fn waiting(&self) -> Vec<(i64, i64, String)> {
        let Ok(rd) = fs::read_dir(&self.queue) else { return Vec::new() };
        rd.flatten()
            .filter(|e| matches!(classify(&e.file_name()), Entry::Job(_)))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((meta.ctime(), meta.ctime_nsec(), e.file_name().to_string_lossy().into_owned()))
            })
            .collect()
    }

    /// The console log: the whole log of a finished job, or the live
    /// console a host writes while it runs the job.
    pub fn log_path(&self, file_name: &str) -> Option<PathBuf> {
        let job = JobName::parse(file_name).ok()?;
        let finished = [self.done.join(job.done_with_extension("log")), self.failed.join(format!("{file_name}.log"))];
        if let Some(p) = finished.into_iter().find(|p| p.is_file()) {
            return Some(p);
        }
        let hosts = fs::read_dir(&self.running).ok()?;
        hosts.flatten().map(|h| h.path().join(format!(".console.{file_name}"))).find(|p| p.is_file())
    }

    /// Asks whichever host runs `file_name` to stop it (`running/.cancel/<name>`).
    pub fn request_cancel(&self, file_name: &str) -> io::Result<()> {
        let dir = self.running.join(".cancel");
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(file_name), b"")?;
        File::open(&dir)?.sync_all()
    }

    /// The result of a finished job.
    pub fn result_path(&self, file_name: &str) -> Option<PathBuf> {
        let job = JobName::parse(file_name).ok()?;
        Some(self.done.join(job.done_file_name())).filter(|p| p.is_file())
    }

    /// Takes a waiting job out of the queue into `failed/` with `reason`.
    /// `Ok(false)` when it is no longer waiting (a host claimed it first).
    pub fn cancel_waiting(&self, file_name: &str, reason: &str) -> io::Result<bool> {
        let target = self.failed.join(file_name);
        match rename_noreplace(&self.queue.join(file_name), &target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        fs::write(
            self.failed.join(format!("{file_name}.reason")),
            format!("{}\n", jobfile::sanitize(reason.as_bytes())),
        )?;
        File::open(&self.failed)?.sync_all()?;
        File::open(&self.queue)?.sync_all()?;
        Ok(true)
    }

    /// Every job file in the directories whose name starts with `prefix`
    /// (the server's own names start with the account's), as input names.
    pub fn files_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut dirs = vec![self.queue.clone(), self.done.clone(), self.failed.clone()];
        if let Ok(hosts) = fs::read_dir(&self.running) {
            dirs.extend(hosts.flatten().map(|h| h.path()));
        }
        for dir in dirs {
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.starts_with(prefix) {
                    continue;
                }
                if let Ok(job) = JobName::parse(&name) {
                    out.push(job.input_file_name());
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

/// Where jobs leased to remote hosts wait on the server: `running/.farm/`
/// (a name no host id can take, so no local host ever recovers them).
pub const FARM_DIR: &str = ".farm";

impl Store {
    pub fn farm_dir(&self) -> PathBuf {
        self.running.join(FARM_DIR)
    }

    /// A leased job's file on the server.
    pub fn leased(&self, file_name: &str) -> PathBuf {
        self.farm_dir().join(file_name)
    }

    /// The console a remote host sends while it runs the job.
    pub fn farm_console(&self, file_name: &str) -> PathBuf {
        self.farm_dir().join(format!(".console.{file_name}"))
    }

    /// Moves a job file between the server's directories, never replacing
    /// one; `Ok(false)` when it is not at `from` (another server moved it).
    pub fn move_job(&self, from: &Path, to: &Path) -> io::Result<bool> {
        match rename_noreplace(from, to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        for dir in [from.parent(), to.parent()].into_iter().flatten() {
            File::open(dir)?.sync_all()?;
        }
        Ok(true)
    }

    /// Whether a cancel was asked for `file_name` (see `request_cancel`).
    pub fn cancel_requested(&self, file_name: &str) -> bool {
        self.running.join(".cancel").join(file_name).exists()
    }

    pub fn forget_cancel(&self, file_name: &str) {
        let _ = fs::remove_file(self.running.join(".cancel").join(file_name));
    }

    /// Puts `failed/<file_name>.reason` beside a failed job.
    pub fn write_reason(&self, file_name: &str, reason: &str) -> io::Result<()> {
        fs::write(
            self.failed.join(format!("{file_name}.reason")),
            format!("{}\n", jobfile::sanitize(reason.as_bytes())),
        )?;
        File::open(&self.failed)?.sync_all()
    }
}

fn read_head(path: &Path, max: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(f) = File::open(path) {
        let _ = f.take(max).read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        from,
        nix::fcntl::AT_FDCWD,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_found_waiting_running_done_or_failed_as_hosts_leave_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = Store::beside(&tmp.path().join("queue"));
        s.create_all().expect("dirs");
        let name = "alice.0123456789abcdef.hello_i0.tar.xz";
        assert_eq!(s.locate(name), Place::Missing);
        fs::write(s.queue.join("other_i0.tar.xz"), b"x").expect("write");
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(s.queue.join(name), b"x").expect("write");
        assert_eq!(s.locate(name), Place::Waiting { position: 2, waiting: 2 });
        fs::create_dir_all(s.running.join("build1")).expect("mkdir");
        fs::rename(s.queue.join(name), s.running.join("build1").join(name)).expect("claim");
        assert!(matches!(s.locate(name), Place::Running { ref host, .. } if host == "build1"));
        fs::remove_file(s.running.join("build1").join(name)).expect("rm");
        fs::write(s.done.join("alice.0123456789abcdef.hello_d0.tar.xz"), b"result").expect("write");
        fs::write(
            s.done.join("alice.0123456789abcdef.hello_d0.log"),
            "hi\nconstruir-host: verdict: ok (exit code 0)\n",
        )
        .expect("write");
        assert_eq!(s.locate(name), Place::Done { verdict: "ok (exit code 0)".into(), result_bytes: 6 });
        assert!(s.result_path(name).is_some() && s.log_path(name).is_some());
        assert_eq!(s.files_with_prefix("alice."), [name]);

        let waiting = "alice.1111111111111111.w_i0.tar.xz";
        fs::write(s.queue.join(waiting), b"x").expect("write");
        assert!(s.cancel_waiting(waiting, "cancelled by alice").expect("cancel"));
        assert_eq!(s.locate(waiting), Place::Failed { reason: "cancelled by alice".into() });
        assert!(!s.cancel_waiting(waiting, "again").expect("cancel"), "no longer waiting");
    }
}
