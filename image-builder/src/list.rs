//! `image-builder list DIR`: the images an operator has, each with its
//! kind, suite, size, creation date, and whether its files still match
//! their checksums.

use std::fs;
use std::io;
use std::path::Path;

use jobfile::deps::LayerSummary;
use jobfile::image::{image_dirs, ImageManifest};
use serde::Serialize;

/// One image directory, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    /// `i<N>`.
    pub image: String,
    pub kind: Option<String>,
    /// `amd64`, `arm64`.
    pub arch: Option<String>,
    pub suite: Option<String>,
    pub kernel: Option<String>,
    /// Bytes on disk of the image's files (a qcow2 root counts as stored, not as its virtual size).
    pub bytes: u64,
    pub created: Option<String>,
    /// `ok`, or why not.
    pub verifies: String,
}

/// Lists `images` (checking every checksum, so it reads every file).
pub fn list(images: &Path) -> io::Result<Vec<Listed>> {
    let mut out = Vec::new();
    for (number, dir) in image_dirs(images)? {
        let image = format!("i{number}");
        let listed = match ImageManifest::load(&dir) {
            Ok(m) => {
                let verifies = match m.verify_files(&dir) {
                    Ok(()) => "ok".to_owned(),
                    Err(e) => jobfile::error_chain(&e),
                };
                let bytes = m.sha256.keys().filter_map(|f| fs::metadata(dir.join(f)).ok()).map(|md| md.len()).sum();
                Listed {
                    image,
                    kind: Some(m.kind),
                    arch: Some(m.arch.debian().to_owned()),
                    suite: m.suite,
                    kernel: Some(m.kernel_version),
                    bytes,
                    created: Some(m.created),
                    verifies,
                }
            }
            Err(e) => Listed {
                image,
                kind: None,
                arch: None,
                suite: None,
                kernel: None,
                bytes: 0,
                created: None,
                verifies: jobfile::error_chain(&e),
            },
        };
        out.push(listed);
    }
    Ok(out)
}

/// The list as a table.
pub fn render(images: &Path, listed: &[Listed]) -> String {
    if listed.is_empty() {
        return format!(
            "no images in {} (make one: image-builder mini --out {}/i0)\n",
            images.display(),
            images.display()
        );
    }
    let dash = || "-".to_owned();
    let mut out = format!(
        "{:<8} {:<12} {:<6} {:<10} {:<18} {:>10}  {:<20}  {}\n",
        "IMAGE", "KIND", "ARCH", "SUITE", "KERNEL", "SIZE", "CREATED", "VERIFIES"
    );
    for l in listed {
        out.push_str(&format!(
            "{:<8} {:<12} {:<6} {:<10} {:<18} {:>10}  {:<20}  {}\n",
            l.image,
            l.kind.clone().unwrap_or_else(dash),
            l.arch.clone().unwrap_or_else(dash),
            l.suite.clone().unwrap_or_else(dash),
            l.kernel.clone().unwrap_or_else(dash),
            jobfile::units::human_size(l.bytes),
            l.created.clone().unwrap_or_else(dash),
            jobfile::sanitize(l.verifies.as_bytes())
        ));
    }
    out
}

/// One layer, as listed (from its record; `construir-host` checks its sha256 when it uses it).
/// The layers as a table (nothing when there are none).
pub fn render_layers(layers: &[LayerSummary]) -> String {
    if layers.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\n{:<14} {:<8} {:>8} {:>10}  {:<20}  {}\n",
        "LAYER", "IMAGE", "PACKAGES", "SIZE", "CREATED", "LAST USED"
    );
    for l in layers {
        out.push_str(&format!(
            "{:<14} {:<8} {:>8} {:>10}  {:<20}  {}\n",
            l.key.get(..12).unwrap_or(&l.key),
            l.image,
            l.packages,
            jobfile::units::human_size(l.bytes),
            l.created,
            l.used
        ));
    }
    out
}
