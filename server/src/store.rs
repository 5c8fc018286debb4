//! The server's side of the queue's directory contract: it writes job files
//! into `queue/` (uploaded under a hidden name, then renamed in) and reads
//! where each has got to from `queue/`, `running/<host>/`, `done/` and
//! `failed/`, exactly as build hosts leave them.
//!
//! Anyone who may write into `queue/` can plant names there, links among
//! them. So the server never follows a link, reads or serves only regular
//! files with one name (`open_regular`), and takes a job file for a job's
//! only when it is the inode the server itself wrote (hosts move job files
//! by `rename`, which keeps it). Ownership comes from the database alone,
//! never from a file's name.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use jobfile::layout::{self, rename_noreplace, Beside, FailLog, Found, Terms};
use jobfile::name::{classify, Entry};
use jobfile::JobName;

/// The directories the server shares with build hosts (it derefs to the
/// layout they all use, `jobfile::layout::Beside`), and what the server does in them.
#[derive(Debug, Clone)]
pub struct Store {
    dirs: Beside,
}

impl std::ops::Deref for Store {
    type Target = Beside;
    fn deref(&self) -> &Beside {
        &self.dirs
    }
}

/// The first bytes of every xz stream.
pub const XZ_MAGIC: &[u8] = b"\xfd7zXZ\0";

/// Where a job is, as the directories say.
pub use wire::Place;

/// Copies `from` to the new file `to`, all-zero blocks as holes, synced:
/// the length and sha256 of what was copied (a rerun's job file, whose
/// digest must be the one recorded at submit).
fn sparse_copy(from: &Path, to: &Path) -> io::Result<(u64, String)> {
    sparse_copy_from(File::open(from)?, to)
}

/// [`sparse_copy`] from an open file (one the caller checked: `open_regular`).
pub(crate) fn sparse_copy_from(mut src: File, to: &Path) -> io::Result<(u64, String)> {
    use sha2::Digest;
    let dst = fs::OpenOptions::new().write(true).create_new(true).mode(0o640).open(to)?;
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = io::Read::read(&mut src, &mut buf)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        if buf[..n].iter().any(|&b| b != 0) {
            std::os::unix::fs::FileExt::write_all_at(&dst, &buf[..n], at)?;
        }
        at += n as u64;
    }
    dst.set_len(at)?;
    dst.sync_all()?;
    Ok((at, jobfile::hex(&sha.finalize())))
}

/// Copies `src`'s data to the new file `to`, unsynced, its holes and
/// zero blocks left as holes (`jobfile::zero::copy_data`: an upload's padding
/// is neither read nor written).
fn data_copy(src: &File, to: &Path) -> io::Result<()> {
    let dst = fs::OpenOptions::new().write(true).create_new(true).mode(0o640).open(to)?;
    let len = src.metadata()?.len();
    jobfile::zero::copy_data(src, &dst, len)?;
    dst.set_len(len)
}

#[cfg(test)]
mod kept {
    #[test]
    fn a_kept_job_file_is_its_bytes_with_holes_where_the_upload_had_them() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let tmp = tempfile::tempdir().expect("tempdir");
        let from = tmp.path().join("upload");
        let f = std::fs::File::create(&from).expect("create");
        f.write_all_at(b"\xfd7zXZ\0 the stream", 0).expect("write");
        f.write_all_at(b"more data", 5 << 20).expect("write");
        f.set_len(10 << 20).expect("pad");
        let to = tmp.path().join("kept");
        super::data_copy(&std::fs::File::open(&from).expect("open"), &to).expect("copy");
        assert_eq!(std::fs::read(&to).expect("read"), std::fs::read(&from).expect("read"));
        assert!(std::fs::metadata(&to).expect("meta").blocks() < 1024, "the padding is holes");
    }
}

/// The queue's waiting files, listed once for many jobs placed in one
/// pass (the follow loop, a list of jobs): each waiting job's position is
/// counted against the same listing, taken when the first one needs it.
/// Placing a thousand waiting jobs lists the queue once, not a thousand times.
#[derive(Debug, Default)]
pub struct Queued(std::sync::OnceLock<Vec<(i64, i64, String)>>);

impl Store {
    /// Beside `queue`, as build hosts default them.
    pub fn beside(queue: &Path) -> Store {
        Store::new(Beside::queue(queue))
    }

    pub fn new(dirs: Beside) -> Store {
        Store { dirs }
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

    /// Bytes free for the server on the queue's filesystem.
    pub fn free_bytes(&self) -> io::Result<u64> {
        let st = nix::sys::statvfs::statvfs(&self.queue).map_err(io::Error::from)?;
        Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
    }

    /// Where the hidden upload of job `id` is written.
    pub fn upload_path(&self, id: &str) -> PathBuf {
        self.queue.join(format!(".upload.{id}.part"))
    }

    /// Where the job file `id` was submitted as is kept, for `rerun`:
    /// `server-inputs/<id>.tar.xz` beside the queue (no host reads it).
    pub fn kept_input(&self, id: &str) -> PathBuf {
        layout::sibling(&self.queue, "server-inputs").join(format!("{id}.tar.xz"))
    }

    /// Keeps a copy of the job file `from` (open before it was queued: its
    /// bytes, whatever its name is now) as job `id`'s input, its zero blocks
    /// left as holes (the padding costs nothing). Not synced: it is a
    /// convenience for `rerun`, which checks it against the sha256 recorded
    /// at submit, and a copy a crash lost or tore is said to be not kept.
    pub fn keep_input(&self, from: File, id: &str) -> io::Result<()> {
        let to = self.kept_input(id);
        fs::create_dir_all(to.parent().expect("in server-inputs"))?;
        let tmp = to.with_extension("part");
        let _ = fs::remove_file(&tmp);
        let copied = data_copy(&from, &tmp).and_then(|()| fs::rename(&tmp, &to));
        if copied.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        copied
    }

    /// Copies job `id`'s kept input to `to` (a new file): its length and sha256.
    pub fn copy_input(&self, id: &str, to: &Path) -> io::Result<(u64, String)> {
        sparse_copy(&self.kept_input(id), to)
    }

    /// Removes job `id`'s kept input, if there is one.
    pub fn forget_input(&self, id: &str) {
        let _ = fs::remove_file(self.kept_input(id));
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

    /// Writes the terms of the job `file_name` (`running/.pins/`), before the job is queued.
    pub fn write_terms(&self, file_name: &str, terms: &Terms) -> io::Result<()> {
        terms.write(&self.running, file_name.as_ref())
    }

    /// Ends the job `file_name` in `failed/`: `from` moved there with
    /// `reason` and `log` beside it, by the queue's one way
    /// (`jobfile::layout::fail`). `Ok(false)` when `from` is gone (moved already).
    pub fn fail(&self, from: &Path, file_name: &str, reason: &str, log: Option<FailLog>) -> io::Result<bool> {
        Ok(layout::fail(&self.failed, from, file_name.as_ref(), reason, log)?.is_some())
    }

    /// Renames a finished upload into the queue under `file_name`, never replacing anything.
    pub fn enqueue(&self, upload: &Path, file_name: &str) -> io::Result<()> {
        rename_noreplace(upload, &self.queue.join(file_name))?;
        File::open(&self.queue)?.sync_all()
    }

    /// Where `file_name` (a job's input name) is now. `ino` is the inode the
    /// server wrote (recorded at upload): a file of that name with another
    /// inode, a link or a file with several names is not the job's.
    pub fn locate(&self, file_name: &str, ino: Option<FileId>) -> Place {
        self.locate_among(file_name, ino, &Queued::default())
    }

    /// `locate`, a waiting job's position counted in `queued`: one listing
    /// of the queue for every job placed in one pass.
    pub fn locate_among(&self, file_name: &str, ino: Option<FileId>, queued: &Queued) -> Place {
        match self.dirs.locate(file_name, &self.host_dirs(), |m| is_own(m, ino)) {
            Found::Waiting(meta) => {
                let mine = (meta.ctime(), meta.ctime_nsec(), file_name);
                let waiting = queued.0.get_or_init(|| self.waiting());
                let ahead = waiting.iter().filter(|(c, n, name)| (*c, *n, name.as_str()) < mine).count();
                Place::Waiting { position: ahead + 1, waiting: waiting.len() }
            }
            Found::Running { host, meta, .. } => {
                let claimed = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(meta.ctime().max(0) as u64);
                let elapsed_secs = SystemTime::now().duration_since(claimed).unwrap_or_default().as_secs();
                Place::Running { host, elapsed_secs }
            }
            Found::Done { log, meta, .. } => {
                let verdict = jobfile::tools::log_verdict(&log).unwrap_or_else(|| "(no log)".to_owned());
                Place::Done { verdict, result_bytes: meta.len() }
            }
            Found::Failed { reason, .. } => {
                Place::Failed { reason: reason.map_or_else(|| "(no reason)".to_owned(), |r| r.why) }
            }
            Found::Missing => Place::Missing,
        }
    }

    /// Whether `queue/<file_name>` is the job file the server wrote (inode
    /// `ino`), waiting: the only file a remote host may be handed.
    pub fn waiting_own(&self, file_name: &str, ino: Option<FileId>) -> bool {
        fs::symlink_metadata(self.queue.join(file_name)).is_ok_and(|m| is_own(&m, ino))
    }

    /// The hosts' directories in `running/` (`Beside::host_dirs`), `.farm`,
    /// where the jobs leased to remote hosts wait, and `.slurm`, where those
    /// handed to Slurm do.
    fn host_dirs(&self) -> Vec<(String, PathBuf)> {
        let mut dirs = self.dirs.host_dirs();
        for (name, dir) in [(FARM_DIR, self.farm_dir()), (SLURM_DIR, self.slurm_dir())] {
            if fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                dirs.push((name.to_owned(), dir));
            }
        }
        dirs
    }

    /// Whether the job has ended (its result in `done/`, or it in `failed/`): three stats.
    pub fn finished(&self, file_name: &str) -> bool {
        let Ok(job) = JobName::parse(file_name) else { return false };
        [self.done.join(job.done_file_name()), self.failed.join(file_name), self.failed.join(job.done_file_name())]
            .iter()
            .any(|p| fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file()))
    }

    /// Job files waiting in the queue, as hosts would take them (regular
    /// files with one name; a link or a second name is refused, not run):
    /// (ctime, ctime ns, name).
    fn waiting(&self) -> Vec<(i64, i64, String)> {
        let Ok(rd) = fs::read_dir(&self.queue) else { return Vec::new() };
        rd.flatten()
            .filter(|e| matches!(classify(&e.file_name()), Entry::Job(_)))
            .filter_map(|e| {
                let meta = e.metadata().ok().filter(layout::lone_file)?;
                Some((meta.ctime(), meta.ctime_nsec(), e.file_name().to_string_lossy().into_owned()))
            })
            .collect()
    }

    /// The console log: the whole log of a finished job, or the live
    /// console a host writes while it runs the job.
    pub fn log_path(&self, file_name: &str) -> Option<PathBuf> {
        let job = JobName::parse(file_name).ok()?;
        let regular = |p: &PathBuf| fs::symlink_metadata(p).is_ok_and(|m| is_own(&m, None));
        let finished =
            [self.done.join(job.done_with_extension("log")), layout::beside_entry(&self.failed.join(file_name), "log")];
        if let Some(p) = finished.into_iter().find(regular) {
            return Some(p);
        }
        self.host_dirs().into_iter().map(|(_, dir)| layout::live_console(&dir, file_name.as_ref())).find(regular)
    }

    /// Asks whichever host runs `file_name` to stop it (`running/.cancel/<name>`).
    /// A job that ended meanwhile has nothing to stop: `Ok(false)`, and no
    /// request is left behind.
    pub fn request_cancel(&self, file_name: &str) -> io::Result<bool> {
        let dir = layout::cancel_dir(&self.running);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(file_name), b"")?;
        File::open(&dir)?.sync_all()?;
        if self.finished(file_name) {
            self.forget_cancel(file_name);
            return Ok(false);
        }
        Ok(true)
    }

    /// The result of a finished job.
    pub fn result_path(&self, file_name: &str) -> Option<PathBuf> {
        let job = JobName::parse(file_name).ok()?;
        Some(self.done.join(job.done_file_name())).filter(|p| fs::symlink_metadata(p).is_ok_and(|m| is_own(&m, None)))
    }

    /// The signed provenance beside the job's result (`done/<name>_d<N>.intoto.jsonl`): never a link or a second name.
    pub fn provenance_path(&self, file_name: &str) -> Option<PathBuf> {
        self.done_file(file_name, layout::PROVENANCE_EXTENSION)
    }

    /// The file `done/<name>_d<N>.<extension>` beside the job's result: never a link or a second name.
    pub fn done_file(&self, file_name: &str, extension: &str) -> Option<PathBuf> {
        let job = JobName::parse(file_name).ok()?;
        Some(self.done.join(job.done_with_extension(extension)))
            .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| is_own(&m, None)))
    }

    /// The public keys the hosts on this queue published (`running/.keys/<host-id>.pub`): (host id, key).
    pub fn local_host_keys(&self) -> Vec<(String, String)> {
        let Ok(rd) = fs::read_dir(self.running.join(".keys")) else { return Vec::new() };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(host) = name.strip_suffix(".pub") else { continue };
            let Ok(Some(raw)) = layout::read_small(&e.path(), 4096) else { continue };
            if let Ok(key) = construir_provenance::PublicKey::parse(&String::from_utf8_lossy(&raw)) {
                out.push((jobfile::sanitize(host.as_bytes()), key.to_string()));
            }
        }
        out.sort();
        out
    }

    /// Takes a waiting job out of the queue into `failed/` with `reason`.
    /// `Ok(false)` when it is no longer waiting (a host claimed it first).
    pub fn cancel_waiting(&self, file_name: &str, reason: &str) -> io::Result<bool> {
        let failed = self.fail(&self.queue.join(file_name), file_name, reason, None)?;
        if failed {
            Terms::remove_run(&self.running, file_name.as_ref());
        }
        Ok(failed)
    }

    /// The names of job files in the directories that look like the
    /// server's own (`<account>.<16 hex>.<name>`), as input names: for
    /// saying at start how many have no record (the server takes ownership
    /// from its database only, never from a name).
    pub fn server_style_names(&self) -> Vec<String> {
        let mut dirs = vec![self.queue.clone(), self.done.clone(), self.failed.clone()];
        dirs.extend(self.host_dirs().into_iter().map(|(_, d)| d));
        let mut out: Vec<String> = dirs
            .iter()
            .filter_map(|d| fs::read_dir(d).ok())
            .flat_map(|rd| rd.flatten())
            .filter_map(|e| JobName::parse(&e.file_name().into_string().ok()?).ok())
            .filter(|job| {
                let mut parts = job.name().splitn(3, '.');
                let (_, id) = (parts.next(), parts.next());
                id.is_some_and(crate::auth::is_job_id) && parts.next().is_some()
            })
            .map(|job| job.input_file_name())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Where jobs leased to remote hosts wait on the server: `running/.farm/`
/// (a name no host id can take, so no local host ever recovers them).
pub const FARM_DIR: &str = layout::FARM;

/// Where the jobs handed to Slurm wait on the server: `running/.slurm/`
/// (a dot-name, as `.farm`).
pub const SLURM_DIR: &str = layout::SLURM;

impl Store {
    pub fn slurm_dir(&self) -> PathBuf {
        self.running.join(SLURM_DIR)
    }

    /// A job handed to Slurm: its file on the server.
    pub fn in_slurm(&self, file_name: &str) -> PathBuf {
        self.slurm_dir().join(file_name)
    }

    /// The console of a job in Slurm, as the server copies it from the node's run.
    pub fn slurm_console(&self, file_name: &str) -> PathBuf {
        layout::live_console(&self.slurm_dir(), file_name.as_ref())
    }

    pub fn farm_dir(&self) -> PathBuf {
        self.running.join(FARM_DIR)
    }

    /// A leased job's file on the server.
    pub fn leased(&self, file_name: &str) -> PathBuf {
        self.farm_dir().join(file_name)
    }

    /// The console a remote host sends while it runs the job.
    pub fn farm_console(&self, file_name: &str) -> PathBuf {
        layout::live_console(&self.farm_dir(), file_name.as_ref())
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
        layout::cancel_request(&self.running, file_name.as_ref()).exists()
    }

    /// How long ago a cancel was asked for `file_name`, if one was.
    pub fn cancel_age(&self, file_name: &str) -> Option<std::time::Duration> {
        let asked = fs::metadata(layout::cancel_request(&self.running, file_name.as_ref())).ok()?.modified().ok()?;
        Some(asked.elapsed().unwrap_or_default())
    }

    pub fn forget_cancel(&self, file_name: &str) {
        let _ = fs::remove_file(layout::cancel_request(&self.running, file_name.as_ref()));
    }
}

/// Which file a job's is: its inode and its birth time. A rename keeps both;
/// a file made in its place may get the freed inode number again, but not
/// its birth time (where the filesystem keeps one: ext4, xfs, btrfs, tmpfs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub ino: u64,
    /// Nanoseconds since the epoch; `None` where the filesystem keeps no birth time.
    pub birth_ns: Option<i64>,
}

impl FileId {
    pub fn of(meta: &fs::Metadata) -> FileId {
        let birth_ns = meta
            .created()
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_nanos()).ok());
        FileId { ino: meta.ino(), birth_ns }
    }

    /// Whether `meta` is this file (a birth time is compared where both have one).
    pub fn is(&self, meta: &fs::Metadata) -> bool {
        let other = FileId::of(meta);
        other.ino == self.ino
            && (self.birth_ns.is_none() || other.birth_ns.is_none() || other.birth_ns == self.birth_ns)
    }
}

/// Whether `meta` (from `lstat`) is a file the server may take as a job's:
/// a regular file with one name and, when known, the file the server wrote.
pub fn is_own(meta: &fs::Metadata, id: Option<FileId>) -> bool {
    meta.file_type().is_file() && meta.nlink() == 1 && id.is_none_or(|i| i.is(meta))
}

/// Opens a file the server reads or serves: never through a link, never a
/// FIFO or device (opened without blocking, then checked on the descriptor),
/// only a regular file with one name, and the file `id` when given.
pub fn open_regular(path: &Path, id: Option<FileId>) -> io::Result<File> {
    let file = layout::open_unfollowed(path)?;
    if !is_own(&file.metadata()?, id) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is not a file the server wrote or a host delivered (a link, a second name, or another inode)",
                path.display()
            ),
        ));
    }
    Ok(file)
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
        assert_eq!(s.locate(name, None), Place::Missing);
        fs::write(s.queue.join("other_i0.tar.xz"), b"x").expect("write");
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(s.queue.join(name), b"x").expect("write");
        let ino = FileId::of(&fs::metadata(s.queue.join(name)).expect("stat"));
        assert_eq!(s.locate(name, Some(ino)), Place::Waiting { position: 2, waiting: 2 });
        let other = FileId { ino: ino.ino + 1, ..ino };
        assert_eq!(s.locate(name, Some(other)), Place::Missing, "another inode is not the job's");
        fs::create_dir_all(s.running.join("build1")).expect("mkdir");
        fs::create_dir_all(s.running.join(".cancel")).expect("mkdir");
        fs::write(s.running.join(".cancel").join(name), b"").expect("a cancel request");
        assert_eq!(s.locate(name, Some(ino)), Place::Waiting { position: 2, waiting: 2 }, "not running on .cancel");
        fs::rename(s.queue.join(name), s.running.join("build1").join(name)).expect("claim");
        assert!(matches!(s.locate(name, Some(ino)), Place::Running { ref host, .. } if host == "build1"));
        std::os::unix::fs::symlink(s.running.join("build1"), s.running.join("linked")).expect("symlink");
        assert!(matches!(s.locate(name, Some(ino)), Place::Running { ref host, .. } if host == "build1"));
        fs::remove_file(s.running.join("build1").join(name)).expect("rm");
        fs::write(s.done.join("alice.0123456789abcdef.hello_d0.tar.xz"), b"result").expect("write");
        fs::write(
            s.done.join("alice.0123456789abcdef.hello_d0.log"),
            "hi\nconstruir-host: verdict: ok (exit code 0)\n",
        )
        .expect("write");
        assert_eq!(s.locate(name, Some(ino)), Place::Done { verdict: "ok (exit code 0)".into(), result_bytes: 6 });
        assert!(s.result_path(name).is_some() && s.log_path(name).is_some());
        assert_eq!(s.server_style_names(), [name]);

        let waiting = "alice.1111111111111111.w_i0.tar.xz";
        fs::write(s.queue.join(waiting), b"x").expect("write");
        assert!(s.cancel_waiting(waiting, "cancelled by alice").expect("cancel"));
        assert_eq!(s.locate(waiting, None), Place::Failed { reason: "cancelled by alice".into() });
        assert!(!s.cancel_waiting(waiting, "again").expect("cancel"), "no longer waiting");
    }

    #[test]
    fn links_second_names_fifos_and_other_inodes_are_never_opened_or_taken_for_a_job() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = Store::beside(&tmp.path().join("queue"));
        s.create_all().expect("dirs");
        let secret = tmp.path().join("secret");
        fs::write(&secret, b"root only").expect("write");
        let name = "alice.0123456789abcdef.pwn_i0.tar.xz";
        std::os::unix::fs::symlink(&secret, s.queue.join(name)).expect("symlink");
        assert_eq!(s.locate(name, None), Place::Missing);
        assert!(!s.waiting_own(name, None));
        assert!(open_regular(&s.queue.join(name), None).is_err());
        fs::remove_file(s.queue.join(name)).expect("rm");
        fs::hard_link(&secret, s.queue.join(name)).expect("link");
        assert!(!s.waiting_own(name, None), "a second name");
        assert!(open_regular(&s.queue.join(name), None).is_err());
        fs::remove_file(s.queue.join(name)).expect("rm");
        nix::unistd::mkfifo(&s.queue.join(name), nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("fifo");
        assert!(open_regular(&s.queue.join(name), None).is_err(), "a FIFO, opened without blocking");
        fs::remove_file(s.queue.join(name)).expect("rm");
        fs::write(s.queue.join(name), b"mine").expect("write");
        let id = FileId::of(&fs::metadata(s.queue.join(name)).expect("stat"));
        let other = FileId { ino: id.ino + 1, ..id };
        assert!(s.waiting_own(name, Some(id)) && !s.waiting_own(name, Some(other)));
        assert!(open_regular(&s.queue.join(name), Some(id)).is_ok());
        assert!(open_regular(&s.queue.join(name), Some(other)).is_err());
        // A log in done/ that is a link: its target's verdict is never read.
        fs::write(&secret, "construir-host: verdict: the secret\n").expect("write");
        let done = "bob.0123456789abcdef.d_i0.tar.xz";
        fs::write(s.done.join("bob.0123456789abcdef.d_d0.tar.xz"), b"result").expect("write");
        std::os::unix::fs::symlink(&secret, s.done.join("bob.0123456789abcdef.d_d0.log")).expect("symlink");
        assert_eq!(s.locate(done, None), Place::Done { verdict: "(no log)".into(), result_bytes: 6 });
        assert!(s.log_path(done).is_none());
        // Removed and made again: the inode number may come back, the birth time does not.
        fs::remove_file(s.queue.join(name)).expect("rm");
        std::thread::sleep(std::time::Duration::from_millis(5));
        fs::write(s.queue.join(name), b"theirs").expect("write");
        let again = FileId::of(&fs::metadata(s.queue.join(name)).expect("stat"));
        if again.birth_ns.is_some() {
            assert!(!s.waiting_own(name, Some(id)), "a file made in the job's place");
        }
    }
}
