//! A newc cpio archive (what the kernel unpacks as an initramfs), written
//! uncompressed: the guest boots under TCG as often as not, where
//! decompressing costs more than reading the extra bytes.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::path::Path;

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Builds a cpio archive in memory-light steps: entries are written as they come.
pub struct Cpio<W: Write> {
    out: W,
    ino: u32,
    dirs: BTreeSet<String>,
    written: u64,
}

impl<W: Write> Cpio<W> {
    pub fn new(out: W) -> Self {
        Cpio { out, ino: 1, dirs: BTreeSet::new(), written: 0 }
    }

    /// A directory, and every missing parent of it.
    pub fn dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, 0o755)?;
        }
        self.dirs.insert(path.to_owned());
        self.entry(path, S_IFDIR | mode, 0, &[])
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.parent(path)?;
        self.entry(path.trim_start_matches('/'), S_IFREG | mode, 0, data)
    }

    /// Copies a file from the build machine.
    pub fn copy(&mut self, path: &str, mode: u32, from: &Path) -> io::Result<()> {
        let data =
            fs::read(from).map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", from.display())))?;
        self.file(path, mode, &data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.parent(path)?;
        self.entry(path.trim_start_matches('/'), S_IFLNK | 0o777, 0, target.as_bytes())
    }

    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.parent(path)?;
        self.entry(path.trim_start_matches('/'), S_IFCHR | mode, (major << 8) | minor, &[])
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 0, &[])?;
        // Pad to 512 bytes as cpio(1) does.
        let pad = (512 - self.written % 512) % 512;
        self.out.write_all(&vec![0u8; pad as usize])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn parent(&mut self, path: &str) -> io::Result<()> {
        match path.trim_start_matches('/').rsplit_once('/') {
            Some((parent, _)) => self.dir(parent, 0o755),
            None => Ok(()),
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: u32, data: &[u8]) -> io::Result<()> {
        let ino = self.ino;
        self.ino += 1;
        let nlink = if mode & S_IFMT == S_IFDIR { 2 } else { 1 };
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0, // uid
            0, // gid
            0, // mtime: fixed, so the same inputs give the same image
            data.len(),
            0,
            0, // dev major, minor
            rdev >> 8,
            rdev & 0xff,
            name.len() + 1,
            0, // check
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad4()?;
        self.put(data)?;
        self.pad4()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.put(&[0u8; 3][..pad as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn gnu_cpio_reads_what_we_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = Cpio::new(Vec::new());
        c.file("/init", 0o755, b"#!/bin/sh\n").expect("file");
        c.symlink("/bin/sh", "busybox").expect("link");
        c.char_device("/dev/console", 0o600, 5, 1).expect("dev");
        c.dir("/job", 0o755).expect("dir");
        let bytes = c.finish().expect("finish");
        assert_eq!(bytes.len() % 512, 0);
        let archive = dir.path().join("a.cpio");
        fs::write(&archive, &bytes).expect("write");
        let out = Command::new("cpio")
            .args(["-itv", "--quiet", "-F"])
            .arg(&archive)
            .output()
            .expect("cpio(1) (scripts/test installs it)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let listing = String::from_utf8_lossy(&out.stdout);
        for want in ["init", "bin/sh -> busybox", "dev/console", "job"] {
            assert!(listing.contains(want), "{want} missing from:\n{listing}");
        }
    }
}
