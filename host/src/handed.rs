//! What a server hands `run-one` through a directory that others can
//! write (a Slurm site's shared directory: every node writes there): the
//! job file, the server's terms and the image. Each is copied onto this
//! machine's own disk, never through a link, hashed as it is copied and
//! checked against a digest that reached run-one on another channel (its
//! command line, which Slurm keeps from the moment `sbatch` takes the
//! batch script). The copies are what the VM gets: nothing is read from
//! the shared directory after it was checked.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use jobfile::image::{ImageManifest, MANIFEST};
use jobfile::layout::{open_unfollowed, TermFiles, Terms};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum HandedError {
    #[error("cannot copy {from} to {to}")]
    Copy { from: PathBuf, to: PathBuf, source: io::Error },
    #[error("{path} is not a regular file with one name")]
    NotAFile { path: PathBuf },
    #[error("{path} has sha256 {actual}; the server handed over {expected}")]
    Mismatch { path: PathBuf, expected: String, actual: String },
    #[error("image i{number} in {dir} cannot be read")]
    Image { number: String, dir: PathBuf, source: Box<jobfile::image::ImageError> },
    #[error("the terms in {dir}: {why}")]
    Terms { dir: PathBuf, why: String },
    #[error("{path} is not a directory this user alone owns and writes")]
    NotOwn { path: PathBuf, source: Box<deps::ResolveError> },
}

/// Copies the regular file `from` (not through a link) to the new file
/// `to` (mode 0644 whatever the umask: a jailed QEMU reads images as its
/// own user), synced, and returns its sha256; with `want`, refuses (and
/// removes the copy) when the digest is another.
pub fn copy_checked(from: &Path, to: &Path, want: Option<&str>) -> Result<String, HandedError> {
    use sha2::Digest;
    let err = |source| HandedError::Copy { from: from.to_owned(), to: to.to_owned(), source };
    let src = open_unfollowed(from).map_err(err)?;
    let meta = src.metadata().map_err(err)?;
    if !meta.file_type().is_file() || meta.nlink() != 1 {
        return Err(HandedError::NotAFile { path: from.to_owned() });
    }
    let mut out = fs::OpenOptions::new().write(true).create_new(true).open(to).map_err(err)?;
    out.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644)).map_err(err)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut src = src;
    let copied = (|| -> io::Result<()> {
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
        out.sync_all()
    })();
    let actual = jobfile::hex(&hasher.finalize());
    let checked = copied.map_err(err).and_then(|()| match want {
        Some(expected) if !expected.eq_ignore_ascii_case(&actual) => {
            Err(HandedError::Mismatch { path: from.to_owned(), expected: expected.to_owned(), actual: actual.clone() })
        }
        _ => Ok(()),
    });
    if let Err(e) = checked {
        let _ = fs::remove_file(to);
        return Err(e);
    }
    Ok(actual)
}

/// Copies the image at `from` into `dir`, each file checked: its
/// `image.toml` against `checksum`, every file it names against that.
fn copy_image(from: &Path, dir: &Path, number: &str, checksum: &str) -> Result<(), HandedError> {
    copy_checked(&from.join(MANIFEST), &dir.join(MANIFEST), Some(checksum))?;
    // Parsed before its files are there: it is the server's (its digest matched), so it says what to copy.
    let path = dir.join(MANIFEST);
    let text = fs::read_to_string(&path).map_err(|source| HandedError::Copy {
        from: path.clone(),
        to: path.clone(),
        source,
    })?;
    let manifest: ImageManifest = toml::from_str(&text).map_err(|source| HandedError::Image {
        number: number.to_owned(),
        dir: dir.to_owned(),
        source: Box::new(jobfile::image::ImageError::Parse { path: path.clone(), source }),
    })?;
    for (file, sha) in &manifest.sha256 {
        if file.is_empty() || file.contains('/') || file.starts_with('.') {
            return Err(HandedError::NotAFile { path: from.join(file) });
        }
        copy_checked(&from.join(file), &dir.join(file), Some(sha))?;
    }
    let image =
        |source| HandedError::Image { number: number.to_owned(), dir: dir.to_owned(), source: Box::new(source) };
    ImageManifest::load(dir).map_err(image)?;
    Ok(())
}

/// Image `i<number>` of `images`, copied into `store` (a directory of its
/// own on this machine's disk) and checked: its `image.toml` against
/// `checksum`, every file it names against that. Returns the images
/// directory to boot from (`store/<checksum>`), kept for the next job
/// with the same image and checked again then.
pub fn local_image(images: &Path, number: &str, checksum: &str, store: &Path) -> Result<PathBuf, HandedError> {
    let name = format!("i{number}");
    let root = store;
    let own = |path: &Path| -> Result<(), HandedError> {
        let made = fs::create_dir_all(path)
            .and_then(|()| fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)));
        made.map_err(|source| HandedError::Copy { from: path.into(), to: path.into(), source })?;
        deps::own_dir(path).map_err(|source| HandedError::NotOwn { path: path.to_owned(), source: Box::new(source) })
    };
    own(root)?;
    let kept = root.join(checksum);
    if kept.join(&name).join(MANIFEST).exists() {
        verify(&kept.join(&name), number, checksum)?;
        return Ok(kept);
    }
    let staging = root.join(format!(".{checksum}.{}.part", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    let dir = staging.join(&name);
    for d in [&staging, &dir] {
        // Readable by the jailed QEMU's own user, whatever the umask.
        let made = fs::create_dir_all(d)
            .and_then(|()| fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)));
        made.map_err(|source| HandedError::Copy { from: d.to_path_buf(), to: d.to_path_buf(), source })?;
    }
    if let Err(e) = copy_image(&images.join(&name), &dir, number, checksum) {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    // Another run-one may have kept the same image meanwhile: either copy is as good.
    if fs::rename(&staging, &kept).is_err() {
        let _ = fs::remove_dir_all(&staging);
        verify(&kept.join(&name), number, checksum)?;
    }
    Ok(kept)
}

/// A kept copy, checked again before it is booted.
fn verify(dir: &Path, number: &str, checksum: &str) -> Result<(), HandedError> {
    let image =
        |source| HandedError::Image { number: number.to_owned(), dir: dir.to_owned(), source: Box::new(source) };
    let manifest_path = dir.join(MANIFEST);
    let actual = jobfile::image::sha256_file(&manifest_path).map_err(|source| HandedError::Copy {
        from: manifest_path.clone(),
        to: manifest_path.clone(),
        source,
    })?;
    if actual != checksum {
        return Err(HandedError::Mismatch { path: manifest_path, expected: checksum.to_owned(), actual });
    }
    ImageManifest::load(dir).and_then(|m| m.verify_files(dir)).map_err(image)
}

/// The terms in `from` (as a queue's `running/` holds them) for
/// `file_name`, read once, checked against `want` (`TermFiles::digest`)
/// and written under `running`, then read back as a host reads its own.
/// A verified rebuild's run is placed already: nothing is kept apart here.
pub fn take_terms(from: &Path, running: &Path, file_name: &OsStr, want: Option<&str>) -> Result<(), HandedError> {
    let bad = |why: String| HandedError::Terms { dir: from.to_owned(), why };
    let terms = TermFiles::read(from, file_name).map_err(bad)?;
    if let Some(expected) = want {
        let actual = terms.digest();
        if actual != expected {
            return Err(HandedError::Mismatch { path: from.to_owned(), expected: expected.to_owned(), actual });
        }
    }
    terms.write(running).map_err(|e| bad(e.to_string()))?;
    let mine = |why: String| HandedError::Terms { dir: running.to_owned(), why };
    let read = Terms::read(running, file_name).map_err(|e| mine(e.to_string()))?;
    if let Some(terms) = read.rebuild {
        let rebuild = Some(jobfile::rebuild::Terms { apart_until: 0, ..terms });
        Terms { rebuild, ..Terms::default() }.write(running, file_name).map_err(|e| mine(e.to_string()))?;
    }
    Ok(())
}

/// Mirrors `from` (the live console in run-one's private spool) to `to`
/// (the attempt's `console`, which the server reads) while `running`
/// holds, at most `max` bytes of it, every half second, and once more at the end.
pub fn mirror_console(from: PathBuf, to: PathBuf, max: u64, running: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::Ordering;
    let mut copied = u64::MAX;
    loop {
        let last = !running.load(Ordering::Relaxed);
        if let Ok(file) = File::open(&from) {
            let len = file.metadata().map_or(0, |m| m.len()).min(max);
            if len != copied {
                let mut data = Vec::new();
                if file.take(max).read_to_end(&mut data).is_ok() && jobfile::layout::write_whole(&to, &data).is_ok() {
                    copied = data.len() as u64;
                }
            }
        }
        if last {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_taken_only_as_the_digest_says_and_never_through_a_link() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let from = tmp.path().join("job_i0.tar.xz");
        fs::write(&from, b"the job").expect("write");
        let sha = construir_provenance::sha256_bytes(b"the job");
        let to = tmp.path().join("copy");
        assert_eq!(copy_checked(&from, &to, Some(&sha)).expect("copy"), sha);
        assert_eq!(fs::read(&to).expect("read"), b"the job");
        let other = tmp.path().join("other");
        let wrong = copy_checked(&from, &other, Some(&"0".repeat(64))).expect_err("another digest");
        assert!(matches!(wrong, HandedError::Mismatch { .. }), "{wrong}");
        assert!(!other.exists(), "a refused copy is removed");
        let link = tmp.path().join("link_i0.tar.xz");
        std::os::unix::fs::symlink(&from, &link).expect("link");
        assert!(copy_checked(&link, &other, None).is_err(), "through a link");
    }

    #[test]
    fn an_image_is_booted_from_a_checked_local_copy_and_a_changed_one_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let shared = tmp.path().join("shared/images/i3");
        fs::create_dir_all(&shared).expect("mkdir");
        fs::write(shared.join("vmlinuz"), b"kernel").expect("kernel");
        fs::write(shared.join("initrd.img"), b"initrd").expect("initrd");
        let manifest = format!(
            "kind = \"mini\"\ndescription = \"\"\nbuilder_version = \"0\"\ncreated = \"\"\nkernel_version = \"6\"\n\
             kernel = \"vmlinuz\"\ninitrd = \"initrd.img\"\ncmdline = \"\"\njob_device = \"/dev/vda\"\n\n\
             [sha256]\n\"vmlinuz\" = \"{}\"\n\"initrd.img\" = \"{}\"\n",
            construir_provenance::sha256_bytes(b"kernel"),
            construir_provenance::sha256_bytes(b"initrd")
        );
        fs::write(shared.join(MANIFEST), &manifest).expect("manifest");
        let checksum = construir_provenance::sha256_bytes(manifest.as_bytes());
        let local = tmp.path().join("node");
        let images = tmp.path().join("shared/images");
        let dir = local_image(&images, "3", &checksum, &local).expect("copied and checked");
        assert_eq!(dir, local.join(&checksum));
        assert_eq!(fs::read(dir.join("i3/vmlinuz")).expect("kernel"), b"kernel");
        // A node rewrites the shared kernel: the kept copy is still what is booted.
        fs::write(shared.join("vmlinuz"), b"evil kernel").expect("swap");
        let again = local_image(&images, "3", &checksum, &local).expect("the kept copy");
        assert_eq!(fs::read(again.join("i3/vmlinuz")).expect("kernel"), b"kernel");
        // A fresh node copies the swapped kernel and refuses it.
        let fresh = tmp.path().join("fresh-node");
        let refused = local_image(&images, "3", &checksum, &fresh).expect_err("a changed kernel");
        assert!(matches!(refused, HandedError::Mismatch { .. }), "{refused}");
        // An image.toml that is not the server's is refused before anything else is copied.
        let wrong = local_image(&images, "3", &"f".repeat(64), &fresh).expect_err("another manifest");
        assert!(wrong.to_string().contains("the server handed over"), "{wrong}");
    }
}
