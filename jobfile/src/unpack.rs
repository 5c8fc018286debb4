//! Safe extraction of an archive from a stranger into a directory.
//!
//! Every path is walked from the target's directory file descriptor one
//! component at a time with `O_NOFOLLOW`, so nothing is ever written through a
//! symlink, whoever made it. Entries that would land outside the target, links
//! that lead outside it, device nodes and FIFOs are skipped and reported; caps
//! on entries and bytes end the extraction with an error.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag, AT_FDCWD};
use nix::sys::stat::{fchmod, fstatat, futimens, mkdirat, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};
use thiserror::Error;

use crate::tar_reader::{ArchiveError, ArchiveReader, Header, Kind};
use crate::text::{sanitize_capped, SHOWN_PATH_MAX};

/// Most skipped entries a report lists one by one (the rest are only counted).
const MAX_LISTED_SKIPS: usize = 100;

#[derive(Debug, Clone)]
pub struct UnpackOptions {
    /// Refuse archives with more entries than this.
    pub max_entries: u64,
    /// Refuse archives whose files add up to more bytes than this.
    pub max_bytes: u64,
    /// Give files the owner the archive names (only root can).
    pub preserve_owner: bool,
    /// Keep setuid, setgid and sticky bits (off: they are dropped).
    pub keep_special_bits: bool,
    /// Permission bits taken away from every mode the archive gives (the user's umask).
    pub umask: u32,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            max_entries: 1_000_000,
            max_bytes: 64 << 30,
            preserve_owner: false,
            keep_special_bits: false,
            umask: 0o022,
        }
    }
}

/// Why an entry was not extracted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SkipReason {
    #[error("absolute path")]
    Absolute,
    #[error("path contains ..")]
    DotDot,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("symlink target leads outside the directory")]
    LinkOutside,
    #[error("hardlink target is outside the directory or not in the archive")]
    HardlinkTarget,
    #[error("hardlink target is not a regular file")]
    HardlinkToNonFile,
    #[error("a parent is a symlink or not a directory")]
    ThroughLink,
    #[error("a directory is in the way")]
    DirectoryInTheWay,
    #[error("name too long")]
    NameTooLong,
    #[error("device node")]
    Device,
    #[error("FIFO")]
    Fifo,
    #[error("unsupported entry type {0:?}")]
    UnknownType(char),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The entry's path, escaped for display.
    pub path: String,
    pub reason: SkipReason,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    /// Bytes of file contents written (holes included).
    pub bytes: u64,
    /// The first skipped entries.
    pub skipped: Vec<Skipped>,
    /// All skipped entries, listed or not.
    pub skipped_total: u64,
}

#[derive(Debug, Error)]
pub enum UnpackError {
    #[error("cannot open the target directory {path}")]
    OpenTarget { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("the archive has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("the archive's files add up to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("cannot extract {path}")]
    Write { path: String, source: io::Error },
}

/// Unpacks every entry of `archive` into the directory `target`.
pub fn unpack<R: Read>(
    archive: &mut ArchiveReader<R>,
    target: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackReport, UnpackError> {
    let root = openat(AT_FDCWD, target, OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| UnpackError::OpenTarget { path: target.to_owned(), source: e.into() })?;
    let mut u = Unpacker { root, opts, report: UnpackReport::default(), dirs: Vec::new(), entries: 0 };
    while let Some(header) = archive.next_entry()? {
        u.entries += 1;
        if u.entries > opts.max_entries {
            return Err(UnpackError::TooManyEntries { limit: opts.max_entries });
        }
        match u.entry(&header, archive) {
            Ok(()) => {}
            Err(Outcome::Skip(reason)) => u.skip(&header.path, reason),
            Err(Outcome::Fail(e)) => return Err(e),
        }
    }
    u.finish_dirs();
    Ok(u.report)
}

/// Splits an archive path into components, refusing anything that could leave the target.
/// `./a//b/.` gives `[a, b]`; the archive's root (`./`) gives `[]`.
pub fn split_path(path: &[u8]) -> Result<Vec<&[u8]>, SkipReason> {
    if path.starts_with(b"/") {
        return Err(SkipReason::Absolute);
    }
    if path.contains(&0) {
        return Err(SkipReason::Nul);
    }
    let mut comps = Vec::new();
    for comp in path.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err(SkipReason::DotDot),
            c => comps.push(c),
        }
    }
    Ok(comps)
}

/// Whether a symlink whose parent is `depth` real directories below the target
/// resolves inside it. Only leading `..` are allowed: after a normal component
/// the `..` would apply to whatever that component is (perhaps another symlink),
/// which no lexical check can know.
pub fn link_stays_inside(target: &[u8], depth: usize) -> bool {
    if target.is_empty() || target.starts_with(b"/") || target.contains(&0) {
        return false;
    }
    let (mut ups, mut below) = (0usize, false);
    for comp in target.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." if below => return false,
            b".." => {
                ups += 1;
                if ups > depth {
                    return false;
                }
            }
            _ => below = true,
        }
    }
    true
}

enum Outcome {
    Skip(SkipReason),
    Fail(UnpackError),
}

struct Unpacker<'a> {
    root: OwnedFd,
    opts: &'a UnpackOptions,
    report: UnpackReport,
    /// Directories whose mode and times are set at the end, once nothing more goes into them.
    dirs: Vec<(Vec<Vec<u8>>, Header)>,
    entries: u64,
}

impl Unpacker<'_> {
    fn entry<R: Read>(&mut self, h: &Header, archive: &mut ArchiveReader<R>) -> Result<(), Outcome> {
        let comps = split_path(&h.path).map_err(Outcome::Skip)?;
        let Some((last, parents)) = comps.split_last() else {
            return Ok(()); // The archive's own root: the target already exists.
        };
        let shown = || sanitize_capped(&h.path, SHOWN_PATH_MAX);
        let fail = |e: Errno| classify(e, shown());
        match h.kind {
            Kind::Dir => {
                let parent = self.walk(parents, true).map_err(fail)?;
                match mkdirat(&parent, *last, Mode::from_bits_truncate(0o700)) {
                    Ok(()) => {}
                    Err(Errno::EEXIST) => {
                        let st = fstatat(&parent, *last, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(fail)?;
                        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
                            return Err(Outcome::Skip(SkipReason::ThroughLink));
                        }
                    }
                    Err(e) => return Err(fail(e)),
                }
                self.dirs.push((comps.iter().map(|c| c.to_vec()).collect(), h.clone()));
                self.report.dirs += 1;
            }
            Kind::File => {
                if self.report.bytes.saturating_add(h.size) > self.opts.max_bytes {
                    return Err(Outcome::Fail(UnpackError::TooLarge { limit: self.opts.max_bytes }));
                }
                let parent = self.walk(parents, true).map_err(fail)?;
                remove_existing(&parent, last).map_err(fail)?;
                let fd = openat(
                    &parent,
                    *last,
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(fail)?;
                let mut file = File::from(fd);
                let written = write_sparse(&mut archive.data(), &mut file, h.size)
                    .map_err(|source| Outcome::Fail(data_error(source, shown())))?;
                self.report.bytes += written;
                self.set_attrs(&file, h).map_err(fail)?;
                self.report.files += 1;
            }
            Kind::Symlink => {
                let target = h.link.as_deref().unwrap_or_default();
                if !link_stays_inside(target, parents.len()) {
                    return Err(Outcome::Skip(SkipReason::LinkOutside));
                }
                let parent = self.walk(parents, true).map_err(fail)?;
                remove_existing(&parent, last).map_err(fail)?;
                symlinkat(OsStr::from_bytes(target), &parent, *last).map_err(fail)?;
                if self.opts.preserve_owner {
                    let (uid, gid) = owner(h);
                    fchownat(&parent, *last, Some(uid), Some(gid), AtFlags::AT_SYMLINK_NOFOLLOW).map_err(fail)?;
                }
                let t = TimeSpec::new(h.mtime, 0);
                utimensat(&parent, *last, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(fail)?;
                self.report.symlinks += 1;
            }
            Kind::Hardlink => {
                let target = split_path(h.link.as_deref().unwrap_or_default())
                    .map_err(|_| Outcome::Skip(SkipReason::HardlinkTarget))?;
                let Some((tlast, tparents)) = target.split_last() else {
                    return Err(Outcome::Skip(SkipReason::HardlinkTarget));
                };
                if target == comps {
                    return Err(Outcome::Skip(SkipReason::HardlinkTarget));
                }
                let src = self.walk(tparents, false).map_err(|_| Outcome::Skip(SkipReason::HardlinkTarget))?;
                // Only regular files: a link to a symlink would re-create that symlink at
                // another depth, where its relative target may lead outside the directory.
                let st = fstatat(&src, *tlast, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(|_| Outcome::Skip(SkipReason::HardlinkTarget))?;
                if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
                    return Err(Outcome::Skip(SkipReason::HardlinkToNonFile));
                }
                let parent = self.walk(parents, true).map_err(fail)?;
                remove_existing(&parent, last).map_err(fail)?;
                match linkat(&src, *tlast, &parent, *last, AtFlags::empty()) {
                    Ok(()) => self.report.hardlinks += 1,
                    Err(Errno::ENOENT | Errno::EPERM) => return Err(Outcome::Skip(SkipReason::HardlinkTarget)),
                    Err(e) => return Err(fail(e)),
                }
            }
            Kind::CharDevice | Kind::BlockDevice => return Err(Outcome::Skip(SkipReason::Device)),
            Kind::Fifo => return Err(Outcome::Skip(SkipReason::Fifo)),
            Kind::Other(flag) => return Err(Outcome::Skip(SkipReason::UnknownType(flag as char))),
        }
        Ok(())
    }

    /// Opens the directory at `comps` below the root without following any
    /// symlink, creating missing directories when asked.
    fn walk(&self, comps: &[&[u8]], create: bool) -> Result<OwnedFd, Errno> {
        let mut dir = openat(&self.root, ".", OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())?;
        for comp in comps {
            if create {
                match mkdirat(&dir, *comp, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e),
                }
            }
            dir = openat(
                &dir,
                *comp,
                OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
        }
        Ok(dir)
    }

    fn set_attrs<F: AsFd>(&self, fd: F, h: &Header) -> Result<(), Errno> {
        if self.opts.preserve_owner {
            let (uid, gid) = owner(h);
            fchown(&fd, Some(uid), Some(gid))?;
        }
        // After chown: chown clears setuid/setgid bits.
        let bits = if self.opts.keep_special_bits { 0o7777 } else { 0o777 };
        fchmod(&fd, Mode::from_bits_truncate(h.mode & bits & !self.opts.umask))?;
        let t = TimeSpec::new(h.mtime, 0);
        futimens(&fd, &t, &t)
    }

    /// Directory modes and times last, deepest first, so a read-only
    /// directory never stops its own contents from being written.
    fn finish_dirs(&mut self) {
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|(comps, _)| std::cmp::Reverse(comps.len()));
        for (comps, h) in &dirs {
            let comps: Vec<&[u8]> = comps.iter().map(Vec::as_slice).collect();
            if let Ok(fd) = self.walk(&comps, false) {
                // A directory the archive later made unreachable keeps its default mode.
                let _ = self.set_attrs(&fd, h);
            }
        }
    }

    fn skip(&mut self, path: &[u8], reason: SkipReason) {
        self.report.skipped_total += 1;
        if self.report.skipped.len() < MAX_LISTED_SKIPS {
            self.report.skipped.push(Skipped { path: sanitize_capped(path, SHOWN_PATH_MAX), reason });
        }
    }
}

fn owner(h: &Header) -> (Uid, Gid) {
    let id = |v: u64| u32::try_from(v).unwrap_or(u32::MAX - 1);
    (Uid::from_raw(id(h.uid)), Gid::from_raw(id(h.gid)))
}

/// Kernel refusals that mean "this entry's path is hostile" are skips; the rest are failures.
fn classify(e: Errno, path: String) -> Outcome {
    match e {
        Errno::ELOOP | Errno::ENOTDIR => Outcome::Skip(SkipReason::ThroughLink),
        Errno::ENAMETOOLONG => Outcome::Skip(SkipReason::NameTooLong),
        Errno::EISDIR => Outcome::Skip(SkipReason::DirectoryInTheWay),
        e => Outcome::Fail(UnpackError::Write { path, source: e.into() }),
    }
}

/// A failure while copying an entry's data: the archive's fault (corrupt,
/// truncated) or the disk's.
fn data_error(e: io::Error, path: String) -> UnpackError {
    let from_archive = e.get_ref().is_some_and(|inner| inner.is::<ArchiveError>() || inner.is::<crate::XzError>());
    if from_archive {
        return UnpackError::Archive(ArchiveError::from(e));
    }
    UnpackError::Write { path, source: e }
}

/// Makes room for a new non-directory: an existing file or link is removed
/// (later entries win, as with tar), an existing directory is left alone.
fn remove_existing(parent: &OwnedFd, name: &[u8]) -> Result<(), Errno> {
    match unlinkat(parent, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Copies `size` bytes, leaving all-zero blocks as holes, so sparse and
/// zero-filled files stay small on disk. Returns the bytes accounted for.
pub(crate) fn write_sparse(data: &mut impl Read, file: &mut File, size: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 << 10];
    let mut done = 0u64;
    while done < size {
        let want = (size - done).min(buf.len() as u64) as usize;
        let n = data.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "entry data ends early"));
        }
        if buf[..n].iter().all(|&b| b == 0) {
            file.seek(SeekFrom::Current(n as i64))?;
        } else {
            file.write_all(&buf[..n])?;
        }
        done += n as u64;
    }
    file.set_len(size)?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::sanitize;

    #[test]
    fn split_path_table() {
        let ok: [(&[u8], &[&[u8]]); 5] = [
            (b"a/b/c", &[b"a", b"b", b"c"]),
            (b"./a//b/./", &[b"a", b"b"]),
            (b"./", &[]),
            (b".", &[]),
            (b"...", &[b"..."]),
        ];
        for (path, want) in ok {
            assert_eq!(split_path(path).as_deref(), Ok(want), "{}", sanitize(path));
        }
        let bad: [(&[u8], SkipReason); 4] = [
            (b"/etc/passwd", SkipReason::Absolute),
            (b"../x", SkipReason::DotDot),
            (b"a/../../x", SkipReason::DotDot),
            (b"a\0b", SkipReason::Nul),
        ];
        for (path, want) in bad {
            assert_eq!(split_path(path), Err(want), "{}", sanitize(path));
        }
    }

    #[test]
    fn link_targets_table() {
        let table: [(&[u8], usize, bool); 12] = [
            (b"file", 0, true),
            (b"./file", 0, true),
            (b"sub/file", 0, true),
            (b".", 0, true),
            (b"../file", 1, true),
            (b"../../a/b", 2, true),
            (b"../file", 0, false),
            (b"../../x", 1, false),
            (b"/etc/passwd", 5, false),
            (b"", 0, false),
            // `y/..` is wherever y's parent is if y is a symlink: refused.
            (b"y/..", 3, false),
            (b"a/../../b", 3, false),
        ];
        for (target, depth, inside) in table {
            assert_eq!(link_stays_inside(target, depth), inside, "{} at depth {depth}", sanitize(target));
        }
    }
}
