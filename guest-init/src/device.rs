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

/// Loads every module in `list` (if the file exists) with `finit_module`,
/// in order. Already-loaded modules are fine. Returns what failed.
pub fn load_modules(list: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(list) else {
        return Vec::new();
    };
    let mut failures = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let loaded =
            File::open(line).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))).and_then(|f| {
                let params = CString::default();
                finit_module(&f, &params, ModuleInitFlags::empty())
            });
        match loaded {
            Ok(()) | Err(Errno::EEXIST) => {}
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
