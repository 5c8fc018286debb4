//! An entry's files: `result-cache/<key>.a<account>/` beside the queue,
//! the server's alone (no host reads or writes there). Each file is copied
//! in whole from what a host delivered (its zero blocks as holes), and
//! recorded with its sha256; it is served only while every file is still
//! a regular file with one name and that digest.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::store::{open_regular, sparse_copy_from};

/// The result, as the VM left the job file.
pub const RESULT: &str = "result.tar.xz";
/// The console log.
pub const LOG: &str = "log";
/// The run's signed provenance, as the host wrote it.
pub const PROVENANCE: &str = "provenance.intoto.jsonl";
/// A verified rebuild's second run's provenance (a shared entry).
pub const SECOND: &str = "second.intoto.jsonl";

/// Where entries live.
#[derive(Debug, Clone)]
pub struct Entries {
    pub root: PathBuf,
}

/// An entry's files copied and not yet in place (`Entries::stage`): each
/// name with its sha256 as copied, and the bytes they take.
#[derive(Debug)]
pub struct Staged {
    dir: PathBuf,
    pub files: BTreeMap<String, String>,
    pub bytes: u64,
}

impl Staged {
    /// Where one of its files is.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Puts it in place as `account`'s entry `key` (whose row is not there
    /// yet: what is in that place is a leftover, and replaced).
    pub fn commit(self, entries: &Entries, account: i64, key: &str) -> io::Result<()> {
        let dir = entries.dir(account, key);
        let _ = fs::remove_dir_all(&dir);
        let moved = fs::rename(&self.dir, &dir).and_then(|()| fs::File::open(&entries.root)?.sync_all());
        if moved.is_err() {
            let _ = fs::remove_dir_all(&self.dir);
        }
        moved
    }

    pub fn discard(self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Entries {
    /// The directory of `account`'s entry `key`.
    pub fn dir(&self, account: i64, key: &str) -> PathBuf {
        self.root.join(format!("{key}.a{account}"))
    }

    /// Copies `sources` (each a name in the entry and the file to copy,
    /// never through a link, synced) into a hidden directory for job `job`.
    pub fn stage(&self, job: &str, sources: &[(&str, &Path)]) -> io::Result<Staged> {
        fs::create_dir_all(&self.root)?;
        let dir = self.root.join(format!(".{job}.tmp"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir)?;
        let mut staged = Staged { dir, files: BTreeMap::new(), bytes: 0 };
        for (name, from) in sources {
            let copied = open_regular(from, None).and_then(|f| sparse_copy_from(f, &staged.path(name)));
            let (_, sha256) = match copied.and_then(|c| Ok((c, taken(&staged.path(name))?))) {
                Ok(((len, sha256), bytes)) => {
                    staged.bytes += bytes;
                    (len, sha256)
                }
                Err(e) => {
                    staged.discard();
                    return Err(e);
                }
            };
            staged.files.insert((*name).to_owned(), sha256);
        }
        Ok(staged)
    }

    /// Whether every file of the entry is there as stored: a regular file
    /// with one name and its recorded sha256. `Err` says what is not.
    pub fn check(&self, account: i64, key: &str, files: &BTreeMap<String, String>) -> Result<(), String> {
        let dir = self.dir(account, key);
        if !files.contains_key(RESULT) || !files.contains_key(PROVENANCE) {
            return Err("its record names no result or no provenance".into());
        }
        for (name, want) in files {
            let path = dir.join(name);
            let file = open_regular(&path, None).map_err(|e| format!("{name}: {e}"))?;
            let got = sha256_of(file).map_err(|e| format!("{name}: {e}"))?;
            if &got != want {
                return Err(format!("{name} was changed on disk (sha256 {got}, stored as {want})"));
            }
        }
        Ok(())
    }

    /// The path of one of the entry's files.
    pub fn file(&self, account: i64, key: &str, name: &str) -> PathBuf {
        self.dir(account, key).join(name)
    }

    /// Removes the entry's files (whatever is left of them).
    pub fn remove(&self, account: i64, key: &str) {
        let _ = fs::remove_dir_all(self.dir(account, key));
    }
}

/// Bytes a file takes on disk (its holes take none).
fn taken(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs::metadata(path)?.blocks() * 512)
}

fn sha256_of(mut file: fs::File) -> io::Result<String> {
    use sha2::Digest;
    let mut sha = sha2::Sha256::new();
    io::copy(&mut file, &mut sha)?;
    Ok(jobfile::hex(&sha.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_served_only_while_each_file_is_as_stored() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let entries = Entries { root: tmp.path().join("result-cache") };
        let (result, provenance) = (tmp.path().join("r"), tmp.path().join("p"));
        fs::write(&result, b"\xfd7zXZ\0result").expect("w");
        fs::write(&provenance, b"{}\n").expect("w");
        let staged = entries.stage("j1", &[(RESULT, &result), (PROVENANCE, &provenance)]).expect("stage");
        let files = staged.files.clone();
        assert!(staged.bytes > 0);
        staged.commit(&entries, 3, "k").expect("commit");
        assert!(!entries.root.join(".j1.tmp").exists(), "nothing staged is left");
        assert_eq!(entries.check(3, "k", &files), Ok(()));
        assert!(entries.check(4, "k", &files).is_err(), "another account's entry is another directory");
        // One byte changed: refused, and said so.
        let stored = entries.file(3, "k", RESULT);
        fs::write(&stored, b"\xfd7zXZ\0resulT").expect("w");
        let why = entries.check(3, "k", &files).expect_err("changed");
        assert!(why.starts_with("result.tar.xz was changed on disk"), "{why}");
        // A second name, or a link in its place: refused too.
        fs::write(&stored, b"\xfd7zXZ\0result").expect("w");
        fs::hard_link(&stored, tmp.path().join("second")).expect("link");
        assert!(entries.check(3, "k", &files).is_err());
        fs::remove_file(tmp.path().join("second")).expect("rm");
        fs::remove_file(&stored).expect("rm");
        std::os::unix::fs::symlink(&result, &stored).expect("symlink");
        assert!(entries.check(3, "k", &files).is_err());
        // Missing: refused; removed: gone.
        entries.remove(3, "k");
        assert!(entries.check(3, "k", &files).expect_err("gone").starts_with("provenance.intoto.jsonl: "));
        assert!(!entries.dir(3, "k").exists());
    }
}
