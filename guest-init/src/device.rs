//! The job disk: load the drivers it needs (in an initramfs), wait for it,
//! and open it.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use thiserror::Error;

pub use jobfile::image::MODULE_LIST;

/// Loads the modules in `list` (if the file exists) with `finit_module`.
/// The list is groups separated by blank lines: each group in its order (a
/// module after what it needs), the groups at once on their own threads
/// (image-builder puts modules that share nothing in different groups).
/// Already-loaded modules are fine, and so is a module for hardware this VM
/// lacks (ENODEV: e.g. crc32c-intel on a CPU without SSE4.2, beside
/// crc32c-generic). Compressed modules (`.ko.xz`, `.ko.zst`, `.ko.gz`) are
/// left to the kernel to decompress. Returns what failed.
pub fn load_modules(list: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(list) else {
        return Vec::new();
    };
    let groups = module_groups(&text);
    std::thread::scope(|scope| {
        let loading: Vec<_> = groups.iter().map(|group| scope.spawn(|| load_group(group))).collect();
        loading.into_iter().flat_map(|h| h.join().unwrap_or_else(|_| vec!["a module loader panicked".into()])).collect()
    })
}

/// The list's groups: blank lines separate them; `#` starts a comment.
fn module_groups(text: &str) -> Vec<Vec<&str>> {
    let mut groups = vec![Vec::new()];
    for line in text.lines().map(str::trim) {
        if line.is_empty() {
            groups.push(Vec::new());
        } else if !line.starts_with('#') {
            groups.last_mut().expect("never empty").push(line);
        }
    }
    groups.retain(|g| !g.is_empty());
    groups
}

fn load_group(group: &[&str]) -> Vec<String> {
    let mut failures = Vec::new();
    for line in group {
        let loaded =
            File::open(line).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))).and_then(|f| {
                let params = CString::default();
                let compressed = [".ko.xz", ".ko.zst", ".ko.gz"].iter().any(|ext| line.ends_with(ext));
                // MODULE_INIT_COMPRESSED_FILE (include/uapi/linux/module.h).
                let flags = if compressed { ModuleInitFlags::from_bits_retain(4) } else { ModuleInitFlags::empty() };
                finit_module(&f, &params, flags)
            });
        match loaded {
            Ok(()) | Err(Errno::EEXIST) | Err(Errno::ENODEV) => {}
            Err(e) => failures.push(format!("cannot load module {line}: {e}")),
        }
    }
    failures
}

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("job disk {} did not appear within {} s", path.display(), waited.as_secs())]
    Missing { path: PathBuf, waited: Duration },
    #[error("{} is not a block device", path.display())]
    NotABlockDevice { path: PathBuf },
    #[error("cannot open job disk {}", path.display())]
    Open { path: PathBuf, source: io::Error },
}

/// Waits until `path` is a block device, up to `wait`, then opens it read-write.
pub fn open_job_device(path: &Path, wait: Duration) -> Result<File, DeviceError> {
    let start = Instant::now();
    loop {
        match fs::metadata(path) {
            Ok(m) if m.file_type().is_block_device() => break,
            Ok(_) => return Err(DeviceError::NotABlockDevice { path: path.to_owned() }),
            Err(_) if start.elapsed() < wait => sleep(Duration::from_millis(20)),
            Err(_) => return Err(DeviceError::Missing { path: path.to_owned(), waited: wait }),
        }
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| DeviceError::Open { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_split_by_blank_lines() {
        let text = "# made by image-builder\n/a.ko\n/b.ko\n\n\n/c.ko\n  \n/d.ko.xz\n";
        assert_eq!(module_groups(text), [vec!["/a.ko", "/b.ko"], vec!["/c.ko"], vec!["/d.ko.xz"]]);
        assert!(module_groups("").is_empty());
    }
}
