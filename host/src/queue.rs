//! The queue's directories and every move between them. A job file is
//! always in exactly one place: `queue/`, `running/<host>/`, `done/` or
//! `failed/`; each move is one `rename(2)` followed by an fsync of the
//! directories, so a crash leaves it in one of them.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use jobfile::name::{classify, Entry};
use jobfile::JobName;

/// The directories a host works with.
#[derive(Debug, Clone)]
pub struct Dirs {
    pub queue: PathBuf,
    pub running: PathBuf,
    pub done: PathBuf,
    pub failed: PathBuf,
    pub images: PathBuf,
    pub work: PathBuf,
}

impl Dirs {
    /// `running/<host_id>` and the working directory are this host's own.
    pub fn create_all(&self) -> io::Result<()> {
        for d in [&self.queue, &self.running, &self.done, &self.failed, &self.work] {
            fs::create_dir_all(d)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", d.display())))?;
        }
        Ok(())
    }
}

/// A queue entry and what to do with it.
#[derive(Debug)]
pub enum Candidate {
    Job {
        file_name: OsString,
        job: JobName,
        size: u64,
    },
    Refuse {
        file_name: OsString,
        reason: String,
    },
    /// Changed within the settle time: perhaps still being written; look again soon.
    Settling {
        file_name: OsString,
    },
}

/// What `scan` accepts.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub min_size: u64,
    pub max_size: u64,
    /// A file must be unchanged this long before it is claimed.
    pub settle: std::time::Duration,
}

/// Lists what the queue holds now, oldest first. Uploads in progress are left out.
pub fn scan(queue: &Path, rules: Rules) -> io::Result<Vec<Candidate>> {
    let Rules { min_size, max_size, settle } = rules;
    let now = std::time::SystemTime::now();
    let mut found = Vec::new();
    for entry in fs::read_dir(queue)? {
        let entry = entry?;
        let file_name = entry.file_name();
        let Ok(meta) = fs::symlink_metadata(entry.path()) else {
            continue;
        };
        let candidate = match classify(&file_name) {
            Entry::InProgress => continue,
            Entry::Invalid(e) => Candidate::Refuse { file_name, reason: format!("bad job file name: {e}") },
            Entry::Job(_) if !meta.file_type().is_file() => {
                let what = if meta.file_type().is_symlink() {
                    "a symlink"
                } else if meta.is_dir() {
                    "a directory"
                } else {
                    "not a regular file"
                };
                Candidate::Refuse { file_name, reason: format!("{what}: a job must be a regular file") }
            }
            Entry::Job(_) if meta.len() < min_size => Candidate::Refuse {
                file_name,
                reason: format!(
                    "{} bytes is too small: a job file must be at least {min_size} bytes (truncate --size)",
                    meta.len()
                ),
            },
            Entry::Job(_) if meta.len() > max_size => Candidate::Refuse {
                file_name,
                reason: format!("{} bytes is larger than this host accepts ({max_size} bytes)", meta.len()),
            },
            Entry::Job(_) if meta.nlink() > 1 => Candidate::Refuse {
                file_name,
                reason: format!("hardlinked ({} names): a job file must have exactly one name", meta.nlink()),
            },
            Entry::Job(_) if meta.modified().is_ok_and(|m| now.duration_since(m).map_or(true, |age| age < settle)) => {
                Candidate::Settling { file_name }
            }
            Entry::Job(job) => Candidate::Job { file_name, job, size: meta.len() },
        };
        found.push((meta.mtime(), meta.mtime_nsec(), candidate));
    }
    found.sort_by(|a, b| (a.0, a.1, name_of(&a.2)).cmp(&(b.0, b.1, name_of(&b.2))));
    Ok(found.into_iter().map(|(_, _, c)| c).collect())
}

fn name_of(c: &Candidate) -> &OsStr {
    match c {
        Candidate::Job { file_name, .. } | Candidate::Refuse { file_name, .. } | Candidate::Settling { file_name } => {
            file_name
        }
    }
}

/// Claims a job: `rename(queue/x, running/x)`. Another host may win the race;
/// then this returns `Ok(false)`.
pub fn claim(dirs: &Dirs, file_name: &OsStr) -> io::Result<bool> {
    match rename_noreplace(&dirs.queue.join(file_name), &dirs.running.join(file_name)) {
        Ok(()) => {
            sync_dirs(&[&dirs.queue, &dirs.running])?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Moves `from` into `failed/` under its own name (or a numbered one if that
/// is taken) and writes `<name>.reason` beside it.
pub fn fail(dirs: &Dirs, from: &Path, reason: &str, log: Option<&[u8]>) -> io::Result<PathBuf> {
    let file_name = from.file_name().unwrap_or(OsStr::new("unnamed")).to_owned();
    let mut target = dirs.failed.join(&file_name);
    let mut n = 1;
    loop {
        match rename_noreplace(from, &target) {
            Ok(()) => break,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let mut numbered = file_name.clone();
                numbered.push(format!(".{n}"));
                target = dirs.failed.join(numbered);
                n += 1;
            }
            Err(e) => return Err(e),
        }
    }
    let mut reason_name = target.file_name().expect("has a name").to_owned();
    reason_name.push(".reason");
    write_durable(&dirs.failed.join(reason_name), format!("{reason}\n").as_bytes())?;
    if let Some(log) = log {
        let mut log_name = target.file_name().expect("has a name").to_owned();
        log_name.push(".log");
        write_durable(&dirs.failed.join(log_name), log)?;
    }
    sync_dirs(&[from.parent().unwrap_or(Path::new(".")), &dirs.failed])?;
    Ok(target)
}

/// Puts a claimed job back in the queue (the host is stopping).
pub fn requeue(dirs: &Dirs, file_name: &OsStr) -> io::Result<()> {
    rename_noreplace(&dirs.running.join(file_name), &dirs.queue.join(file_name))?;
    sync_dirs(&[&dirs.running, &dirs.queue])
}

/// Copies a job file to its working copy, keeping holes, with the size
/// rounded up to whole 512-byte sectors (a disk cannot end mid-sector).
pub fn working_copy(from: &Path, to: &Path) -> io::Result<u64> {
    // Never through a link: the claimed file must still be the one regular file we scanned.
    let mut src = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(from)?;
    let meta = src.metadata()?;
    if !meta.file_type().is_file() || meta.nlink() != 1 {
        return Err(io::Error::other(format!("{} is no longer a regular file with one name", from.display())));
    }
    let len = meta.len();
    let mut dst = OpenOptions::new().write(true).create(true).truncate(true).open(to)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        // Skip holes: the padding of a job file usually is one.
        let data = match seek_data(&src, pos) {
            Some(d) if d < len => d,
            _ => break,
        };
        src.seek(SeekFrom::Start(data))?;
        dst.seek(SeekFrom::Start(data))?;
        let want = (len - data).min(buf.len() as u64) as usize;
        let n = src.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all(&buf[..n])?;
        }
        pos = data + n as u64;
    }
    let size = len.div_ceil(512) * 512;
    dst.set_len(size)?;
    dst.sync_all()?;
    Ok(size)
}

fn seek_data(f: &File, from: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open descriptor; no memory involved.
    let r = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, libc::SEEK_DATA) };
    (r >= 0).then_some(r as u64)
}

/// Length of the file without its trailing zero bytes, rounded up to 4 (xz
/// streams are whole 4-byte units, and an xz stream never ends in zeros).
/// Holes are skipped with SEEK_DATA/SEEK_HOLE, so a huge padded file costs
/// only its data.
pub fn trimmed_len(path: &Path) -> io::Result<u64> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    // The end of the last data segment: nothing after it but a hole.
    let mut end = 0u64;
    let mut pos = 0u64;
    while let Some(data) = seek_data(&f, pos).filter(|&d| d < len) {
        let hole = seek_hole(&f, data).unwrap_or(len).min(len);
        end = hole;
        pos = hole;
    }
    let mut buf = vec![0u8; 1 << 20];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.read_exact_at(&mut buf[..n], start)?;
        if let Some(p) = buf[..n].iter().rposition(|&b| b != 0) {
            return Ok((start + p as u64 + 1).div_ceil(4) * 4);
        }
        end = start;
    }
    Ok(0)
}

fn seek_hole(f: &File, from: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open descriptor; no memory involved.
    let r = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, libc::SEEK_HOLE) };
    (r >= 0).then_some(r as u64)
}

/// Delivers a finished working copy as `done/<name>_d<N>.tar.xz` with its
/// log beside it. Never replaces an existing result: then it fails with `AlreadyExists`.
pub fn deliver(dirs: &Dirs, work: &Path, job: &JobName, log: &[u8]) -> io::Result<PathBuf> {
    let trimmed = trimmed_len(work)?;
    let f = OpenOptions::new().write(true).open(work)?;
    f.set_len(trimmed)?;
    f.sync_all()?;
    let target = dirs.done.join(job.done_file_name());
    if target.symlink_metadata().is_ok() {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} already exists", target.display())));
    }
    // Into done/ under a dot-name first (a copy if work/ is on another filesystem), then the final name.
    let staged = dirs.done.join(format!(".{}.tmp", job.done_file_name()));
    if let Err(e) = fs::rename(work, &staged) {
        if e.raw_os_error() != Some(libc::EXDEV) {
            return Err(e);
        }
        fs::copy(work, &staged)?;
        File::open(&staged)?.sync_all()?;
        fs::remove_file(work)?;
    }
    write_durable(&dirs.done.join(job.done_with_extension("log")), log)?;
    if let Err(e) = rename_noreplace(&staged, &target) {
        let _ = fs::rename(&staged, work);
        return Err(e);
    }
    sync_dirs(&[&dirs.done])?;
    Ok(target)
}

/// Writes a whole file under a dot-name, fsyncs it, renames it into place.
pub fn write_durable(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or(OsStr::new("file")));
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    sync_dirs(&[dir])
}

/// fsyncs directories, so renames in them are durable (an empty path is `.`).
pub fn sync_dirs(dirs: &[&Path]) -> io::Result<()> {
    for d in dirs {
        File::open(if d.as_os_str().is_empty() { Path::new(".") } else { d })?.sync_all()?;
    }
    Ok(())
}

/// `rename(2)` that refuses to replace an existing target (`RENAME_NOREPLACE`).
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
    };
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: both strings are NUL-terminated and live across the call.
    let r = unsafe {
        libc::renameat2(libc::AT_FDCWD, from_c.as_ptr(), libc::AT_FDCWD, to_c.as_ptr(), libc::RENAME_NOREPLACE)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(root: &Path) -> Dirs {
        let d = Dirs {
            queue: root.join("queue"),
            running: root.join("running/host"),
            done: root.join("done"),
            failed: root.join("failed"),
            images: root.join("images"),
            work: root.join("work"),
        };
        d.create_all().expect("dirs");
        d
    }

    #[test]
    fn scan_classifies_and_claim_moves_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = dirs(tmp.path());
        let big = vec![0u8; 70_000];
        fs::write(d.queue.join("good_i1.tar.xz"), &big).expect("write");
        fs::write(d.queue.join("small_i1.tar.xz"), b"tiny").expect("write");
        fs::write(d.queue.join("bad name_i1.tar.xz"), &big).expect("write");
        fs::write(d.queue.join(".uploading_i1.tar.xz"), &big).expect("write");
        fs::write(d.queue.join("x_i1.tar.xz.part"), &big).expect("write");
        fs::create_dir(d.queue.join("dir_i1.tar.xz")).expect("mkdir");
        std::os::unix::fs::symlink("/etc/passwd", d.queue.join("link_i1.tar.xz")).expect("symlink");
        let rules = Rules { min_size: 65_536, max_size: 1 << 30, settle: std::time::Duration::ZERO };
        let found = scan(&d.queue, rules).expect("scan");
        let mut jobs = Vec::new();
        let mut refused = Vec::new();
        for c in found {
            match c {
                Candidate::Job { file_name, .. } => jobs.push(file_name),
                Candidate::Settling { .. } => panic!("nothing settles with a zero settle time"),
                Candidate::Refuse { file_name, reason } => {
                    refused.push(format!("{}: {reason}", file_name.to_string_lossy()))
                }
            }
        }
        assert_eq!(jobs, ["good_i1.tar.xz"]);
        refused.sort();
        assert_eq!(refused.len(), 4, "{refused:?}");
        assert!(refused[0].starts_with("bad name_i1.tar.xz: bad job file name"), "{refused:?}");
        assert!(refused[1].starts_with("dir_i1.tar.xz: a directory"), "{refused:?}");
        assert!(refused[2].starts_with("link_i1.tar.xz: a symlink"), "{refused:?}");
        assert!(refused[3].starts_with("small_i1.tar.xz: 4 bytes is too small"), "{refused:?}");

        assert!(claim(&d, OsStr::new("good_i1.tar.xz")).expect("claim"));
        assert!(!claim(&d, OsStr::new("good_i1.tar.xz")).expect("second claim"), "a job is claimed once");
        assert!(d.running.join("good_i1.tar.xz").exists());

        let failed = fail(&d, &d.queue.join("bad name_i1.tar.xz"), "bad job file name", None).expect("fail");
        assert_eq!(failed, d.failed.join("bad name_i1.tar.xz"));
        assert_eq!(
            fs::read_to_string(d.failed.join("bad name_i1.tar.xz.reason")).expect("reason"),
            "bad job file name\n"
        );
        // The symlink is moved as a link, never followed.
        fail(&d, &d.queue.join("link_i1.tar.xz"), "a symlink", None).expect("fail");
        assert!(fs::symlink_metadata(d.failed.join("link_i1.tar.xz")).expect("moved").file_type().is_symlink());
        assert!(Path::new("/etc/passwd").exists());
    }

    #[test]
    fn working_copy_keeps_data_and_rounds_to_sectors_and_trim_finds_the_end() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src");
        let f = File::create(&src).expect("create");
        f.write_all_at(b"head", 0).expect("write");
        f.write_all_at(b"tail!", 200_000).expect("write");
        f.set_len(300_001).expect("len");
        let dst = tmp.path().join("dst");
        assert_eq!(working_copy(&src, &dst).expect("copy"), 300_032);
        let copy = fs::read(&dst).expect("read");
        assert_eq!(&copy[..4], b"head");
        assert_eq!(&copy[200_000..200_005], b"tail!");
        assert_eq!(trimmed_len(&dst).expect("trim"), 200_008);
        // A large hole after the data costs nothing and changes nothing.
        OpenOptions::new().write(true).open(&dst).expect("open").set_len(64 << 30).expect("grow");
        assert_eq!(trimmed_len(&dst).expect("trim"), 200_008);
    }

    #[test]
    fn deliver_never_replaces_a_result() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = dirs(tmp.path());
        let job = JobName::parse("j_i1.tar.xz").expect("name");
        let work = d.work.join("w");
        fs::write(&work, b"data!\0\0\0\0\0\0\0\0\0").expect("write");
        let out = deliver(&d, &work, &job, b"log\n").expect("deliver");
        // Trailing zeros go, up to a whole 4-byte unit.
        assert_eq!(fs::read(&out).expect("read"), b"data!\0\0\0");
        assert_eq!(fs::read(d.done.join("j_d1.log")).expect("log"), b"log\n");
        fs::write(&work, b"second").expect("write");
        let e = deliver(&d, &work, &job, b"log2\n").expect_err("exists");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&out).expect("read"), b"data!\0\0\0");
        assert!(work.exists(), "the second result is not lost");
    }
}
