//! A Slurm attempt's directory as the server reads it. Every node can
//! write the shared directory, so nothing there is trusted: the attempt's
//! directory is opened once, without following a link, and every file in
//! it is opened beneath that descriptor one component at a time, never
//! through a link, checked to be a regular file with one name, and read
//! within a bound. What the server checks is a copy on its own disk, and
//! the copy is what lands.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;

/// An attempt directory, held open.
pub struct Attempt {
    dir: OwnedFd,
}

impl Attempt {
    /// Opens `dir` (not through a link).
    pub fn open(dir: &Path) -> io::Result<Attempt> {
        let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
        let dir = openat(nix::fcntl::AT_FDCWD, dir, flags, Mode::empty())?;
        Ok(Attempt { dir })
    }

    /// Opens the regular file at `rel` (components below the attempt), no
    /// link followed on the way, a FIFO or device never waited on.
    pub fn open_file(&self, rel: &[&str]) -> io::Result<File> {
        let (last, dirs) = rel.split_last().ok_or_else(|| io::Error::other("an empty path"))?;
        let mut held: Option<OwnedFd> = None;
        for comp in dirs {
            check_component(comp)?;
            let at = held.as_ref().map_or(self.dir.as_fd(), |d| d.as_fd());
            let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
            held = Some(openat(at, *comp, flags, Mode::empty())?);
        }
        check_component(last)?;
        let at = held.as_ref().map_or(self.dir.as_fd(), |d| d.as_fd());
        let flags = OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let file = File::from(openat(at, *last, flags, Mode::empty())?);
        let meta = file.metadata()?;
        if !meta.file_type().is_file() || meta.nlink() != 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a regular file with one name", rel.join("/")),
            ));
        }
        Ok(file)
    }

    /// Whether a regular file is at `rel`.
    pub fn has(&self, rel: &[&str]) -> bool {
        self.open_file(rel).is_ok()
    }

    /// The file at `rel`, whole, when it is at most `max` bytes; `None` when it is not there.
    pub fn read_small(&self, rel: &[&str], max: u64) -> io::Result<Option<Vec<u8>>> {
        let file = match self.open_file(rel) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut data = Vec::new();
        file.take(max + 1).read_to_end(&mut data)?;
        if data.len() as u64 > max {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} is over {max} bytes", rel.join("/"))));
        }
        Ok(Some(data))
    }

    /// The last `max` bytes of the file at `rel` (empty when it is not there or cannot be read).
    pub fn tail(&self, rel: &[&str], max: u64) -> Vec<u8> {
        use std::io::{Seek, SeekFrom};
        let Ok(mut file) = self.open_file(rel) else { return Vec::new() };
        let len = file.metadata().map_or(0, |m| m.len());
        if file.seek(SeekFrom::Start(len.saturating_sub(max))).is_err() {
            return Vec::new();
        }
        let mut data = Vec::new();
        let _ = file.take(max).read_to_end(&mut data);
        data
    }

    /// Copies the file at `rel` to `to` (made new, synced), refusing one
    /// over `max` bytes; `Ok(false)` when there is none.
    pub fn copy_out(&self, rel: &[&str], to: &Path, max: u64) -> io::Result<bool> {
        let from = match self.open_file(rel) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let mut out = std::fs::OpenOptions::new().write(true).create_new(true).open(to)?;
        let copied = io::copy(&mut from.take(max + 1), &mut out)?;
        if copied > max {
            drop(out);
            let _ = std::fs::remove_file(to);
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} is over {max} bytes", rel.join("/"))));
        }
        out.flush()?;
        out.sync_all()?;
        Ok(true)
    }
}

/// One plain name: no separator, not `.` or `..`.
fn check_component(comp: &str) -> io::Result<()> {
    if comp.is_empty() || comp == "." || comp == ".." || comp.contains('/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{comp:?} is not a plain name")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn links_fifos_second_names_and_large_files_in_an_attempt_are_never_read() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("attempt");
        std::fs::create_dir_all(dir.join("out")).expect("mkdir");
        std::fs::write(dir.join("exit"), b"0\n").expect("exit");
        std::fs::write(tmp.path().join("secret"), b"root only").expect("secret");
        symlink(tmp.path().join("secret"), dir.join("out/linked.log")).expect("link");
        symlink(tmp.path(), dir.join("elsewhere")).expect("dir link");
        std::fs::hard_link(tmp.path().join("secret"), dir.join("out/second-name")).expect("hard link");
        nix::unistd::mkfifo(&dir.join("fifo"), Mode::from_bits_truncate(0o600)).expect("fifo");
        std::fs::write(dir.join("big"), vec![b'x'; 5000]).expect("big");
        let a = Attempt::open(&dir).expect("open");
        assert_eq!(a.read_small(&["exit"], 16).expect("exit").as_deref(), Some(&b"0\n"[..]));
        assert!(a.read_small(&["out", "linked.log"], 100).is_err(), "a link is not followed");
        assert!(a.read_small(&["elsewhere", "secret"], 100).is_err(), "a linked directory is not entered");
        assert!(a.read_small(&["out", "second-name"], 100).is_err(), "a file with two names");
        assert!(a.read_small(&["fifo"], 100).is_err(), "a fifo is not waited on");
        assert!(a.read_small(&["big"], 100).is_err(), "over the bound");
        assert_eq!(a.read_small(&["none"], 100).expect("absent"), None);
        assert!(a.read_small(&["..", "secret"], 100).is_err(), "no way up");
        assert_eq!(a.tail(&["big"], 10), vec![b'x'; 10]);
        let to = tmp.path().join("copy");
        assert!(a.copy_out(&["big"], &to, 100).is_err(), "a copy over the bound");
        assert!(!to.exists(), "nothing of it is kept");
        assert!(a.copy_out(&["exit"], &to, 100).expect("copy"));
        assert_eq!(std::fs::read(&to).expect("read"), b"0\n");
        symlink(tmp.path().join("elsewhere-dir"), tmp.path().join("attempt-link")).expect("link");
        assert!(Attempt::open(&tmp.path().join("attempt-link")).is_err(), "the attempt itself through a link");
    }
}
