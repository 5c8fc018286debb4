//! Ending an entry in `failed/`: the one way the host, the server's leases
//! and its Slurm runs do it.
//!
//! ```text
//! failed/<name>          the entry (a job file, or a result kept aside)
//! failed/<name>.reason   first line: why; a refused entry also "original name: ..."
//! failed/<name>.log      its console, when there is one
//! ```
//!
//! The reason and the log are in place before the entry, so whoever sees
//! the entry in `failed/` reads why. A name that is taken gets `.1`, `.2`...:
//! nothing in `failed/` is ever replaced.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::land::rename_noreplace;
use super::{beside_entry, write_whole};

/// The log of a failed entry.
#[derive(Debug, Clone, Copy)]
pub enum FailLog<'a> {
    /// These bytes.
    Bytes(&'a [u8]),
    /// The file at this path, moved (on one filesystem) or copied; a file
    /// that is not there is no log.
    Move(&'a Path),
}

/// Moves `from` into `failed` as `name` (or `name.1`...), with `reason`
/// (sanitized, one line) and `log` beside it. `Ok(None)` when `from` is not
/// there (moved by an earlier call): nothing is written. Returns where the
/// entry is now.
pub fn fail(
    failed: &Path,
    from: &Path,
    name: &OsStr,
    reason: &str,
    log: Option<FailLog>,
) -> io::Result<Option<PathBuf>> {
    let text = format!("{}\n", crate::sanitize(reason.as_bytes()));
    put(failed, from, name, text.as_bytes(), log)
}

/// Moves a refused queue entry `from` into `failed` under the name the
/// caller chose (never the name it came with: an entry dropped into the
/// queue as `victim_i1.tar.xz.log` must not become a log), the name it
/// came with inside its reason, sanitized.
pub fn refuse(failed: &Path, from: &Path, chosen: &OsStr, reason: &str) -> io::Result<Option<PathBuf>> {
    let original = from.file_name().unwrap_or_default();
    let text = format!(
        "{}\noriginal name: {}\n",
        crate::sanitize(reason.as_bytes()),
        crate::sanitize(original.as_encoded_bytes())
    );
    put(failed, from, chosen, text.as_bytes(), None)
}

fn put(failed: &Path, from: &Path, name: &OsStr, reason: &[u8], log: Option<FailLog>) -> io::Result<Option<PathBuf>> {
    if fs::symlink_metadata(from).is_err() {
        return Ok(None);
    }
    let mut n = 0;
    loop {
        let target = failed.join(numbered(name, n));
        n += 1;
        let (reason_file, log_file) = (beside_entry(&target, "reason"), beside_entry(&target, "log"));
        if [&target, &reason_file, &log_file].iter().any(|p| fs::symlink_metadata(p).is_ok()) {
            continue;
        }
        write_whole(&reason_file, reason)?;
        match log {
            Some(FailLog::Bytes(bytes)) => write_whole(&log_file, bytes)?,
            Some(FailLog::Move(path)) => move_or_copy(path, &log_file)?,
            None => {}
        }
        match rename_noreplace(from, &target) {
            Ok(()) => {}
            Err(e) => {
                let _ = fs::remove_file(&reason_file);
                let _ = fs::remove_file(&log_file);
                match e.kind() {
                    io::ErrorKind::AlreadyExists => continue,
                    io::ErrorKind::NotFound => return Ok(None),
                    _ => return Err(e),
                }
            }
        }
        for dir in [from.parent(), Some(failed)].into_iter().flatten() {
            fs::File::open(dir)?.sync_all()?;
        }
        return Ok(Some(target));
    }
}

fn numbered(name: &OsStr, n: u32) -> OsString {
    let mut name = name.to_owned();
    if n > 0 {
        name.push(format!(".{n}"));
    }
    name
}

/// Moves the file at `from` to `to` (never replacing it), or copies it
/// when they are on two filesystems; a `from` that is not there moves nothing.
fn move_or_copy(from: &Path, to: &Path) -> io::Result<()> {
    match rename_noreplace(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let file = super::open_unfollowed(from)?;
            if !super::lone_file(&file.metadata()?) {
                return Err(io::Error::other(format!("{} is not a regular file with one name", from.display())));
            }
            write_whole(to, &read_all(file)?)?;
            fs::remove_file(from)
        }
        Err(e) => Err(e),
    }
}

fn read_all(mut file: fs::File) -> io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    io::Read::read_to_end(&mut file, &mut raw)?;
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::{fail, refuse, FailLog};
    use std::ffi::OsStr;
    use std::fs;

    #[test]
    fn a_failed_entry_lands_with_its_reason_and_log_and_never_replaces_one() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let failed = tmp.path().join("failed");
        fs::create_dir(&failed).expect("dir");
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        fs::write(&a, "first").expect("w");
        fs::write(&b, "second").expect("w");
        let name = OsStr::new("j_i1.tar.xz");
        let at = fail(&failed, &a, name, "timed out\x1b[2J", Some(FailLog::Bytes(b"console\n"))).expect("fail");
        assert_eq!(at, Some(failed.join("j_i1.tar.xz")));
        assert_eq!(fs::read_to_string(failed.join("j_i1.tar.xz.reason")).expect("r"), "timed out\\x1b[2J\n");
        assert_eq!(fs::read_to_string(failed.join("j_i1.tar.xz.log")).expect("log"), "console\n");
        let console = tmp.path().join("console");
        fs::write(&console, "moved").expect("w");
        let at = fail(&failed, &b, name, "cancelled", Some(FailLog::Move(&console))).expect("fail");
        assert_eq!(at, Some(failed.join("j_i1.tar.xz.1")));
        assert_eq!(fs::read_to_string(failed.join("j_i1.tar.xz.1.log")).expect("log"), "moved");
        assert_eq!(fs::read_to_string(failed.join("j_i1.tar.xz")).expect("kept"), "first");
        assert!(!console.exists());
        assert_eq!(fail(&failed, &b, name, "again", None).expect("gone"), None, "moved already: nothing written");
        assert!(!failed.join("j_i1.tar.xz.2.reason").exists());
    }

    #[test]
    fn a_refused_entry_keeps_the_name_it_came_with_only_in_its_reason() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let from = tmp.path().join("victim_i1.tar.xz.log");
        fs::write(&from, "x").expect("w");
        let at = refuse(tmp.path(), &from, OsStr::new("refused.h1"), "not a job").expect("refuse");
        assert_eq!(at, Some(tmp.path().join("refused.h1")));
        let reason = fs::read_to_string(tmp.path().join("refused.h1.reason")).expect("reason");
        assert_eq!(reason, "not a job\noriginal name: victim_i1.tar.xz.log\n");
    }
}
