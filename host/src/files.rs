//! File plumbing the queue and the worker share: durable writes and
//! renames, sparse copies, trimming a result's zero padding, and creating
//! files through a directory descriptor. Everything that touches a file a
//! VM could have written works on descriptors, never on a path looked up
//! again.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use nix::fcntl::{openat, renameat2, OFlag, RenameFlags};
use nix::sys::stat::Mode;

/// Opens a directory to work in by descriptor.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))?;
    Ok(dir.into())
}

/// Creates `name` in `dir`: it must not exist, and a symlink there is never followed.
pub fn create_new_at(dir: &impl AsFd, name: &OsStr, mode: u32) -> io::Result<File> {
    let fd = openat(
        dir,
        name,
        OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode),
    )?;
    Ok(File::from(fd))
}

/// `renameat2(RENAME_NOREPLACE)` between two directory descriptors.
pub fn rename_noreplace_at(from_dir: &impl AsFd, from: &OsStr, to_dir: &impl AsFd, to: &OsStr) -> io::Result<()> {
    renameat2(from_dir, from, to_dir, to, RenameFlags::RENAME_NOREPLACE).map_err(io::Error::from)
}

/// `rename(2)` that refuses to replace an existing target (`RENAME_NOREPLACE`).
pub use jobfile::layout::rename_noreplace;

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
    std::fs::rename(&tmp, path)?;
    sync_dirs(&[dir])
}

/// fsyncs directories, so renames in them are durable (an empty path is `.`).
pub fn sync_dirs(dirs: &[&Path]) -> io::Result<()> {
    for d in dirs {
        File::open(if d.as_os_str().is_empty() { Path::new(".") } else { d })?.sync_all()?;
    }
    Ok(())
}

/// The next data (or hole) at or after `from`; `None` past the end or where the filesystem cannot say.
fn seek(f: &File, from: u64, whence: nix::unistd::Whence) -> Option<u64> {
    let r = nix::unistd::lseek(f, libc::off_t::try_from(from).ok()?, whence).ok()?;
    u64::try_from(r).ok()
}

/// Copies the first `len` bytes of `src` to the same offsets of `dst`,
/// skipping holes and all-zero blocks (`jobfile::zero::copy_data`).
pub fn copy_sparse(src: &File, dst: &File, len: u64) -> io::Result<()> {
    jobfile::zero::copy_data(src, dst, len)
}

/// Length of the file without its trailing zero bytes, rounded up to 4 (xz
/// streams are whole 4-byte units, and an xz stream never ends in zeros).
/// Holes are skipped with SEEK_DATA/SEEK_HOLE, so a huge padded file costs
/// only its data.
pub fn trimmed_len(f: &File) -> io::Result<u64> {
    let len = f.metadata()?.len();
    // The end of the last data segment: nothing after it but a hole.
    let mut end = 0u64;
    let mut pos = 0u64;
    while let Some(data) = seek(f, pos, nix::unistd::Whence::SeekData).filter(|&d| d < len) {
        let hole = seek(f, data, nix::unistd::Whence::SeekHole).unwrap_or(len).min(len);
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

/// Reads a file through `read_at` from its own position, leaving the
/// descriptor's shared offset alone.
#[derive(Debug)]
pub struct ReadAt<'a> {
    file: &'a File,
    pos: u64,
}

impl<'a> ReadAt<'a> {
    pub fn new(file: &'a File) -> Self {
        ReadAt { file, pos: 0 }
    }
}

impl io::Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The sha256 of everything in `f` (read through the descriptor, from its
/// start; the file's offset is left alone), in lowercase hex.
pub fn sha256(f: &File) -> io::Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        match f.read_at(&mut buf, at) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                at += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(jobfile::hex(&h.finalize()))
}

/// The status at the start of a working copy or status disk (see `jobfile::read_status`).
pub fn read_status(disk: &File) -> Option<jobfile::JobStatus> {
    jobfile::read_status(ReadAt::new(disk))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_keeps_data_within_len_and_trim_finds_the_end() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp.path().join("src"))
            .expect("create");
        src.write_all_at(b"head", 0).expect("write");
        src.write_all_at(b"tail!", 200_000).expect("write");
        src.write_all_at(b"beyond the scanned size", 300_001).expect("write");
        let dir = open_dir(tmp.path()).expect("dir");
        let dst = create_new_at(&dir, OsStr::new("dst"), 0o600).expect("create");
        copy_sparse(&src, &dst, 300_001).expect("copy");
        dst.set_len(300_032).expect("len");
        let mut copy = vec![0u8; 300_032];
        dst.read_exact_at(&mut copy, 0).expect("read");
        assert_eq!(&copy[..4], b"head");
        assert_eq!(&copy[200_000..200_005], b"tail!");
        assert!(copy[200_005..].iter().all(|&b| b == 0), "nothing past len is copied");
        assert_eq!(trimmed_len(&dst).expect("trim"), 200_008);
        // A large hole after the data costs nothing and changes nothing.
        dst.set_len(64 << 30).expect("grow");
        assert_eq!(trimmed_len(&dst).expect("trim"), 200_008);
        // create_new_at never replaces and never follows a link.
        assert_eq!(
            create_new_at(&dir, OsStr::new("dst"), 0o600).expect_err("exists").kind(),
            io::ErrorKind::AlreadyExists
        );
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), tmp.path().join("planted")).expect("symlink");
        assert!(create_new_at(&dir, OsStr::new("planted"), 0o600).is_err());
        assert!(!tmp.path().join("elsewhere").exists(), "the link was not followed");
    }
}
