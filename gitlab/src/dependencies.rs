//! The artifacts of the jobs a CI job depends on (`needs:`, `dependencies:`),
//! downloaded by the crate and put into the checkout as GitLab's own runner
//! does, before the job is packed. Each file's path is the zip's own,
//! enclosed (no `..`, nothing absolute); nothing is written through a link
//! the repository holds, and the whole is bounded by the job's size.

use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path};

use gitlab_runner::artifact::Artifact;

/// What went into the checkout from one job's artifacts.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Put {
    pub files: usize,
    pub bytes: u64,
    /// Entries left out, with why.
    pub skipped: Vec<String>,
}

/// Writes each file of `artifact` under `checkout`; `budget` is what may
/// still be written, and shrinks.
pub fn put(checkout: &Path, artifact: &mut Artifact, budget: &mut u64) -> Result<Put, String> {
    let mut put = Put::default();
    for i in 0..artifact.len() {
        let Some(mut file) = artifact.by_index(i) else { continue };
        let name = jobfile::sanitize(file.name().as_bytes());
        let Some(rel) = file.path() else {
            put.skipped.push(format!("{name}: not a path inside the checkout"));
            continue;
        };
        if file.name().ends_with('/') {
            if let Err(why) = make_dirs(checkout, &rel) {
                put.skipped.push(format!("{name}: {why}"));
            }
            continue;
        }
        let Some(parent) = rel.parent() else { continue };
        if let Err(why) = make_dirs(checkout, parent) {
            put.skipped.push(format!("{name}: {why}"));
            continue;
        }
        let target = checkout.join(&rel);
        if fs::symlink_metadata(&target).is_ok_and(|m| !m.is_file()) {
            put.skipped.push(format!("{name}: the checkout has something other than a file there"));
            continue;
        }
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&target)
            .map_err(|e| format!("cannot write {}: {e}", target.display()))?;
        let n = std::io::copy(&mut file.by_ref().take(*budget + 1), &mut out).map_err(|e| format!("{name}: {e}"))?;
        if n > *budget {
            return Err(
                "the artifacts of earlier jobs come to more than the job's size (CONSTRUIR_JOB_SIZE)".to_owned()
            );
        }
        *budget -= n;
        put.files += 1;
        put.bytes += n;
    }
    Ok(put)
}

/// Makes `rel`'s directories under `root`, refusing to pass through a link or a file.
fn make_dirs(root: &Path, rel: &Path) -> Result<(), String> {
    let mut at = root.to_owned();
    for c in rel.components() {
        let Component::Normal(part) = c else { return Err("not a plain path".into()) };
        at.push(part);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err("a link or a file of the checkout is in its path".into()),
            Err(_) => fs::create_dir(&at).map_err(|e| format!("cannot make {}: {e}", at.display()))?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_made_but_never_through_a_link_or_a_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(outside.path(), d.path().join("out")).expect("symlink");
        fs::write(d.path().join("file"), b"x").expect("write");
        assert!(make_dirs(d.path(), Path::new("a/b")).is_ok());
        assert!(d.path().join("a/b").is_dir());
        assert!(make_dirs(d.path(), Path::new("out/x")).expect_err("a link").contains("a link"));
        assert!(make_dirs(d.path(), Path::new("file/x")).expect_err("a file").contains("a link or a file"));
        assert_eq!(fs::read_dir(outside.path()).expect("ls").count(), 0, "something was made through the link");
    }
}
