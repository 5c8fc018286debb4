//! `image.toml`: what an image is and how to boot it. Written by
//! `image-builder`, read by the host (and only trusted as far as the images
//! directory is, which the operator owns).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The manifest's file name inside an image directory.
pub const MANIFEST: &str = "image.toml";
/// Inside an initramfs: the kernel modules construir-init loads, one path per line, in order.
pub const MODULE_LIST: &str = "/etc/construir/modules";
/// The modules a debug session's port needs (`crate::debug`), loaded only
/// when a session opens; in the initramfs (mini) or the root (Debian), as
/// `MODULE_LIST` is written.
pub const DEBUG_MODULE_LIST: &str = "/etc/construir/modules-debug";
/// Those modules, by name.
pub const DEBUG_MODULES: &[&str] = &["virtio_console"];

/// One installed package, for Debian images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
}

/// The Debian archive a Debian image was built from, recorded by
/// `image-builder debootstrap` so that a job's packages are resolved
/// against the same archive and the image's own installed packages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Archive {
    /// The mirror, as the building machine's apt sources named it.
    pub uri: String,
    pub suite: String,
    pub components: Vec<String>,
    /// dpkg's architecture (`amd64`).
    pub architecture: String,
    /// The image's `/var/lib/dpkg/status`, a file of the image directory.
    pub dpkg_status: String,
}

/// The file name under which a Debian image keeps its dpkg status.
pub const DPKG_STATUS: &str = "dpkg-status";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    /// `mini` or `debootstrap`.
    pub kind: String,
    /// What the image's kernel and programs run on (`amd64` when the file predates the field).
    #[serde(default)]
    pub arch: crate::arch::Arch,
    pub description: String,
    pub builder_version: String,
    /// RFC 3339, UTC.
    pub created: String,
    pub kernel_version: String,
    /// Kernel file, initramfs and (optional) root disk, relative to the image directory.
    pub kernel: String,
    pub initrd: String,
    #[serde(default)]
    pub root_disk: Option<String>,
    /// What the host appends to the kernel command line to boot this image.
    pub cmdline: String,
    /// Where the job disk appears in the guest.
    pub job_device: String,
    #[serde(default)]
    pub suite: Option<String>,
    #[serde(default)]
    pub packages: Vec<Package>,
    /// Where the image's packages came from (Debian images built since the
    /// archive was recorded; `None` for mini images and older ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<Archive>,
    /// sha256 of each file of the image, by file name.
    #[serde(default)]
    pub sha256: BTreeMap<String, String>,
}

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a valid image manifest")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("{path} names {file}, which is missing from the image")]
    MissingFile { path: PathBuf, file: String },
    #[error("{path} names {file:?}, which is not a plain file name")]
    BadFileName { path: PathBuf, file: String },
    #[error("{path} has no sha256 for its files")]
    NoChecksums { path: PathBuf },
    #[error("{file} does not match image.toml (sha256 {got}, expected {want}): the image was changed or damaged")]
    Mismatch { file: PathBuf, got: String, want: String },
}

impl ImageManifest {
    /// Reads `dir/image.toml` and checks that the files it names are there.
    pub fn load(dir: &Path) -> Result<Self, ImageError> {
        let path = dir.join(MANIFEST);
        let text = fs::read_to_string(&path).map_err(|source| ImageError::Read { path: path.clone(), source })?;
        let manifest: ImageManifest =
            toml::from_str(&text).map_err(|source| ImageError::Parse { path: path.clone(), source })?;
        let status = manifest.archive.as_ref().map(|a| &a.dpkg_status);
        for file in
            [Some(&manifest.kernel), Some(&manifest.initrd), manifest.root_disk.as_ref(), status].into_iter().flatten()
        {
            if file.is_empty() || file.contains('/') || file.starts_with('.') {
                return Err(ImageError::BadFileName { path: path.clone(), file: file.clone() });
            }
            if !dir.join(file).is_file() {
                return Err(ImageError::MissingFile { path: path.clone(), file: file.clone() });
            }
        }
        Ok(manifest)
    }

    /// Checks every file the manifest lists against its sha256.
    pub fn verify_files(&self, dir: &Path) -> Result<(), ImageError> {
        if self.sha256.is_empty() {
            return Err(ImageError::NoChecksums { path: dir.join(MANIFEST) });
        }
        for (file, want) in &self.sha256 {
            if file.is_empty() || file.contains('/') || file.starts_with('.') {
                return Err(ImageError::BadFileName { path: dir.join(MANIFEST), file: file.clone() });
            }
            let path = dir.join(file);
            let got = sha256_file(&path).map_err(|source| ImageError::Read { path: path.clone(), source })?;
            if !got.eq_ignore_ascii_case(want) {
                return Err(ImageError::Mismatch { file: path, got, want: want.clone() });
            }
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("an ImageManifest always serializes")
    }
}

/// The image directories under `images`: every `i<N>` (N: 1 to 9 digits)
/// that is a directory, as (N, path), by number.
pub fn image_dirs(images: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(images)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(number) = name.to_str().and_then(|n| n.strip_prefix('i')) else { continue };
        let digits = !number.is_empty() && number.len() <= 9 && number.bytes().all(|b| b.is_ascii_digit());
        if digits && entry.file_type().is_ok_and(|t| t.is_dir()) {
            found.push((number.to_owned(), entry.path()));
        }
    }
    found.sort_by(|(a, _), (b, _)| (a.len(), a).cmp(&(b.len(), b)));
    Ok(found)
}

/// A file's sha256, in lower-case hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf)? {
            0 => break,
            n => h.update(&buf[..n]),
        }
    }
    Ok(crate::hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ImageManifest {
        ImageManifest {
            kind: "mini".into(),
            arch: crate::arch::Arch::Amd64,
            description: "test".into(),
            builder_version: "0.1.0".into(),
            created: "2026-11-24T00:00:00Z".into(),
            kernel_version: "6.1.0".into(),
            kernel: "vmlinuz".into(),
            initrd: "initrd.img".into(),
            root_disk: None,
            cmdline: "rdinit=/init".into(),
            job_device: "/dev/vda".into(),
            suite: None,
            packages: vec![],
            archive: None,
            sha256: BTreeMap::from([("vmlinuz".into(), "ab".into())]),
        }
    }

    #[test]
    fn round_trips_and_checks_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(MANIFEST), sample().to_toml()).expect("write");
        assert!(
            matches!(ImageManifest::load(dir.path()), Err(ImageError::MissingFile { file, .. }) if file == "vmlinuz")
        );
        fs::write(dir.path().join("vmlinuz"), "k").expect("write");
        fs::write(dir.path().join("initrd.img"), "i").expect("write");
        assert_eq!(ImageManifest::load(dir.path()).expect("load"), sample());
        // Checksums: "ab" is no file's sha256; the real one passes; a changed byte fails.
        let m = sample();
        assert!(matches!(m.verify_files(dir.path()), Err(ImageError::Mismatch { .. })));
        let mut m = sample();
        m.sha256.insert("vmlinuz".into(), sha256_file(&dir.path().join("vmlinuz")).expect("hash"));
        m.verify_files(dir.path()).expect("matches");
        fs::write(dir.path().join("vmlinuz"), "K").expect("write");
        assert!(matches!(m.verify_files(dir.path()), Err(ImageError::Mismatch { .. })));
        m.sha256.clear();
        assert!(matches!(m.verify_files(dir.path()), Err(ImageError::NoChecksums { .. })));
        let mut evil = sample();
        evil.kernel = "../../etc/shadow".into();
        fs::write(dir.path().join(MANIFEST), evil.to_toml()).expect("write");
        assert!(matches!(ImageManifest::load(dir.path()), Err(ImageError::BadFileName { .. })));
    }
}
