//! ext4 disks made from a directory (an image's root, a job's package disk) with
//! `mkfs.ext4 -d` (no loop mounts, no root needed for this part), then
//! converted to qcow2 so the unused space costs nothing.

use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::command::{self, CommandError};

/// Makes `raw`, a sparse ext4 filesystem of `size` bytes with the contents of `root`.
pub fn make_filesystem(root: &Path, raw: &Path, size: u64, label: &str) -> Result<(), CommandError> {
    let io_err = |source| CommandError::Spawn { program: format!("creating {}", raw.display()), source };
    File::create(raw).and_then(|f| f.set_len(size)).map_err(io_err)?;
    command::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", label, "-E", "lazy_itable_init=1,lazy_journal_init=1", "-d"])
            .arg(root)
            .arg(raw),
        "mkfs.ext4",
        Duration::from_secs(30 * 60),
        |_| {},
    )?;
    Ok(())
}

/// Converts `raw` to `qcow2` (unused space costs nothing) and removes `raw`.
pub fn to_qcow2(raw: &Path, qcow2: &Path) -> Result<(), CommandError> {
    command::run(
        Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(raw).arg(qcow2),
        "qemu-img convert",
        Duration::from_secs(30 * 60),
        |_| {},
    )?;
    let _ = std::fs::remove_file(raw);
    Ok(())
}
