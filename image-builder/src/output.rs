//! Writing an image directory: built aside under a temporary name, checked
//! and summed, then renamed into place, so `--out` never holds half an image.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use jobfile::image::{ImageManifest, MANIFEST};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum OutputError {
    #[error("{path} already exists (use --force to replace it)")]
    Exists { path: PathBuf },
    #[error("cannot write {path}")]
    Io { path: PathBuf, source: io::Error },
}

/// An image being built, in a sibling of its final directory.
pub struct Staging {
    pub dir: PathBuf,
    out: PathBuf,
    force: bool,
    done: bool,
}

impl Staging {
    pub fn new(out: &Path, force: bool) -> Result<Staging, OutputError> {
        if out.exists() && !force {
            return Err(OutputError::Exists { path: out.to_owned() });
        }
        let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        fs::create_dir_all(parent).map_err(|source| OutputError::Io { path: parent.to_owned(), source })?;
        let dir = parent.join(format!(".{name}.building-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).map_err(|source| OutputError::Io { path: dir.clone(), source })?;
        Ok(Staging { dir, out: out.to_owned(), force, done: false })
    }

    /// Sums every file, writes `image.toml`, and moves the image into place.
    pub fn finish(mut self, mut manifest: ImageManifest) -> Result<PathBuf, OutputError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| OutputError::Io { path, source }
        };
        let mut sums = BTreeMap::new();
        let mut names: Vec<_> = fs::read_dir(&self.dir).map_err(io_err(&self.dir))?.filter_map(|e| e.ok()).collect();
        names.sort_by_key(|e| e.file_name());
        for entry in names {
            let name = entry.file_name().to_string_lossy().into_owned();
            sums.insert(name, jobfile::image::sha256_file(&entry.path()).map_err(io_err(&entry.path()))?);
        }
        manifest.sha256 = sums;
        let manifest_path = self.dir.join(MANIFEST);
        fs::write(&manifest_path, manifest.to_toml()).map_err(io_err(&manifest_path))?;
        if self.out.exists() && self.force {
            let old = self.dir.with_extension("old");
            fs::rename(&self.out, &old).map_err(io_err(&self.out))?;
            let _ = fs::remove_dir_all(&old);
        }
        fs::rename(&self.dir, &self.out).map_err(io_err(&self.out))?;
        self.done = true;
        Ok(self.out.clone())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// True when an ELF file has no program interpreter (is statically linked).
/// An ELF file's `e_machine` (62 x86_64, 183 aarch64; 0 when it is no ELF).
pub fn elf_machine(path: &Path) -> io::Result<u16> {
    let mut head = [0u8; 20];
    let n = io::Read::read(&mut fs::File::open(path)?, &mut head)?;
    Ok(if n == 20 && &head[..4] == b"\x7fELF" { u16::from_le_bytes([head[18], head[19]]) } else { 0 })
}

pub fn is_static_elf(path: &Path) -> io::Result<bool> {
    let data = fs::read(path)?;
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return Ok(false); // not a 64-bit ELF
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(data[32..40].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        if at + 4 > data.len() {
            return Ok(false);
        }
        if u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes")) == 3 {
            return Ok(false); // PT_INTERP
        }
    }
    Ok(true)
}
