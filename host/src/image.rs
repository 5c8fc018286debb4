//! The base images a host boots (`images/i<N>/`): which exist, their
//! manifests, the files a VM is given, and checks an operator runs.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use jobfile::image::{ImageError, ImageManifest};

/// One image directory and its manifest.
#[derive(Debug, Clone)]
pub struct Image {
    /// The image's number as job names carry it (1 to 9 digits).
    pub number: String,
    pub dir: PathBuf,
    pub manifest: ImageManifest,
}

/// The files a VM boots from, opened by the host (QEMU gets descriptors).
#[derive(Debug)]
pub struct BootFiles {
    /// The image's architecture: which QEMU boots these.
    pub arch: jobfile::arch::Arch,
    pub kernel: File,
    pub initrd: File,
    pub root_disk: Option<File>,
}

impl Image {
    /// Loads `images/i<number>`.
    pub fn load(images: &Path, number: &str) -> Result<Image, ImageError> {
        let dir = images.join(format!("i{number}"));
        let manifest = ImageManifest::load(&dir)?;
        Ok(Image { number: number.to_owned(), dir, manifest })
    }

    /// Opens the kernel, initrd and root disk, following no link.
    pub fn open(&self) -> io::Result<BootFiles> {
        let open = |name: &str| {
            let path = self.dir.join(name);
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))
        };
        Ok(BootFiles {
            arch: self.manifest.arch,
            kernel: open(&self.manifest.kernel)?,
            initrd: open(&self.manifest.initrd)?,
            root_disk: self.manifest.root_disk.as_deref().map(open).transpose()?,
        })
    }

    /// Bytes on disk of every file the image lists.
    pub fn disk_usage(&self) -> u64 {
        self.manifest.sha256.keys().filter_map(|f| fs::metadata(self.dir.join(f)).ok()).map(|m| m.len()).sum()
    }
}

/// An image directory found by `scan`: its number, path, and the image or
/// why it cannot be loaded.
pub type Found = (String, PathBuf, Result<Image, ImageError>);

/// Every `i<N>` directory under `images` (N: 1 to 9 digits), by number.
pub fn scan(images: &Path) -> io::Result<Vec<Found>> {
    let dirs = jobfile::image::image_dirs(images)?;
    Ok(dirs.into_iter().map(|(number, dir)| (number.clone(), dir, Image::load(images, &number))).collect())
}

/// The kernel of the first usable image of this machine's architecture, for the KVM probe.
pub fn any_kernel(images: &Path) -> Option<PathBuf> {
    scan(images)
        .ok()?
        .into_iter()
        .filter_map(|(_, _, image)| image.ok())
        .find(|i| i.manifest.arch.is_native())
        .map(|i| i.dir.join(&i.manifest.kernel))
}

/// A qcow2 image's virtual size (big-endian u64 at byte 24 of its header).
pub fn qcow2_virtual_size(file: &File) -> Option<u64> {
    let mut header = [0u8; 32];
    file.read_exact_at(&mut header, 0).ok()?;
    (&header[..4] == b"QFI\xfb").then(|| u64::from_be_bytes(header[24..32].try_into().expect("8 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_lists_image_directories_by_number_with_their_errors() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for d in ["i10", "i2", "other", "i07", "ix", "i1234567890"] {
            fs::create_dir(tmp.path().join(d)).expect("mkdir");
        }
        fs::write(tmp.path().join("i3"), "a file").expect("write");
        let found = scan(tmp.path()).expect("scan");
        let numbers: Vec<&str> = found.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(numbers, ["2", "07", "10"], "i3 is no directory, i1234567890 too long");
        assert!(found.iter().all(|(_, _, img)| matches!(img, Err(ImageError::Read { .. }))));
        assert_eq!(any_kernel(tmp.path()), None);
    }

    #[test]
    fn qcow2_size_is_read_from_its_header() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("root.qcow2");
        let mut header = b"QFI\xfb".to_vec();
        header.resize(24, 0);
        header.extend_from_slice(&(20u64 << 30).to_be_bytes());
        fs::write(&path, &header).expect("write");
        assert_eq!(qcow2_virtual_size(&File::open(&path).expect("open")), Some(20 << 30));
        fs::write(&path, b"not qcow2 at all, just text here!").expect("write");
        assert_eq!(qcow2_virtual_size(&File::open(&path).expect("open")), None);
    }
}
