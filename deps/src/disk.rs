//! The package disk a layer is built from: an ext4 filesystem holding the
//! resolution (`packages.json`) and each `.deb` as `debs/<sha256>.deb`,
//! exactly those, made with `mkfs.ext4 -d` and handed to the VM read-only.

use std::fs;
use std::io;
use std::path::Path;

use jobfile::deps::{Resolution, DISK_DEBS as DEBS, DISK_RESOLUTION as RESOLUTION};
use jobfile::ext4;

use crate::Fetched;

/// Writes the package disk for `resolution` (its files in `fetched`) to
/// `raw`, staging the tree in `scratch` (on the cache's filesystem, so the
/// `.deb`s are hard links, not copies, where it can be).
pub fn write(resolution: &Resolution, fetched: &Fetched, scratch: &Path, raw: &Path) -> io::Result<()> {
    let tree = scratch.join("tree");
    fs::create_dir_all(tree.join(DEBS))?;
    let mut bytes = 0;
    for (p, file) in &fetched.files {
        let to = tree.join(DEBS).join(format!("{}.deb", p.sha256));
        if fs::hard_link(file, &to).is_err() {
            fs::copy(file, &to)?;
        }
        bytes += p.size;
    }
    let json = serde_json::to_vec_pretty(resolution).expect("a Resolution always serializes");
    fs::write(tree.join(RESOLUTION), &json)?;
    // Room for ext4's own structures: a tenth more, and 16 MiB.
    let size = (bytes + json.len() as u64) / 10 * 11 + (16 << 20);
    ext4::make_filesystem(&tree, raw, size, "construir-pkgs")
        .map_err(|e| io::Error::other(jobfile::error_chain(&e)))?;
    fs::remove_dir_all(&tree)
}
