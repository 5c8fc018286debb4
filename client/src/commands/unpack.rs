//! `construir unpack`: extract a result safely into a new or empty directory.

use std::path::Path;

use anyhow::Result;
use jobfile::tools;
use jobfile::units::human_size;

pub fn run(file: &Path, dir: &Path) -> Result<()> {
    let report = tools::unpack(file, dir, tools::default_limits("unpack"))?;
    for s in &report.skipped {
        eprintln!("construir: skipped {}: {}", s.path, s.reason);
    }
    eprintln!(
        "construir: unpacked {} files, {} directories, {} symlinks ({}) into {}",
        report.files,
        report.dirs,
        report.symlinks,
        human_size(report.bytes),
        dir.display()
    );
    Ok(())
}
