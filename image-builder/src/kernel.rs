//! The build machine's kernel and the modules a guest needs from it.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use jobfile::arch::Arch;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum KernelError {
    #[error("no kernel in /boot (install the linux-image-amd64 package)")]
    NoKernel,
    #[error("cannot tell the kernel version of {path}: name it vmlinuz-<version>")]
    NoVersion { path: PathBuf },
    #[error("cannot read {path} (is the kernel's module tree installed?)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("module {name} is neither in {dep} nor built into the kernel")]
    UnknownModule { name: String, dep: PathBuf },
}

/// A kernel image and its module tree.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub image: PathBuf,
    pub version: String,
    pub modules: PathBuf,
}

impl Kernel {
    /// The newest `/boot/vmlinuz-*`, or the one given.
    pub fn find(explicit: Option<&Path>, boot: &Path, modules_root: &Path) -> Result<Kernel, KernelError> {
        let image = match explicit {
            Some(p) => p.to_owned(),
            None => {
                let entries =
                    fs::read_dir(boot).map_err(|source| KernelError::Read { path: boot.to_owned(), source })?;
                let mut kernels: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
                    .collect();
                kernels.sort_by(|a, b| version_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
                kernels.pop().ok_or(KernelError::NoKernel)?
            }
        };
        let version = image
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .ok_or_else(|| KernelError::NoVersion { path: image.clone() })?
            .to_owned();
        let modules = modules_root.join(&version);
        Ok(Kernel { image, version, modules })
    }

    /// The module files to load for `wanted`, dependencies first, each once.
    /// Modules built into the kernel need no file and are left out.
    pub fn resolve_modules(&self, wanted: &[&str]) -> Result<Vec<PathBuf>, KernelError> {
        Ok(self.resolve_module_groups(wanted)?.into_iter().flatten().collect())
    }

    /// The same, as groups that share no module: each group in load order,
    /// and the groups free to load at the same time.
    pub fn resolve_module_groups(&self, wanted: &[&str]) -> Result<Vec<Vec<PathBuf>>, KernelError> {
        let dep_path = self.modules.join("modules.dep");
        let dep_text =
            fs::read_to_string(&dep_path).map_err(|source| KernelError::Read { path: dep_path.clone(), source })?;
        let builtin_path = self.modules.join("modules.builtin");
        let builtin = fs::read_to_string(&builtin_path).unwrap_or_default();
        let deps: HashMap<String, (String, Vec<String>)> = dep_text
            .lines()
            .filter_map(|line| {
                let (file, rest) = line.split_once(':')?;
                Some((module_name(file), (file.to_owned(), rest.split_whitespace().map(str::to_owned).collect())))
            })
            .collect();
        let by_file: HashMap<&str, &str> =
            deps.iter().map(|(name, (file, _))| (file.as_str(), name.as_str())).collect();
        let soft = Soft::read(&self.modules);
        let tree = Tree { deps: &deps, by_file: &by_file, soft: &soft };
        let mut groups: Vec<Vec<String>> = Vec::new();
        for name in wanted {
            let name = name.replace('-', "_");
            if !deps.contains_key(&name) {
                if builtin.lines().any(|l| module_name(l) == name) {
                    continue;
                }
                return Err(KernelError::UnknownModule { name, dep: dep_path });
            }
            let mut order = Vec::new();
            tree.visit(&name, &mut order);
            // Groups sharing a module with this one become one, loaded in turn.
            let mut merged = Vec::new();
            let mut rest = Vec::new();
            for group in groups {
                if group.iter().any(|m| order.contains(m)) {
                    merged.extend(group);
                } else {
                    rest.push(group);
                }
            }
            for m in order {
                if !merged.contains(&m) {
                    merged.push(m);
                }
            }
            rest.push(merged);
            groups = rest;
        }
        Ok(groups.into_iter().map(|g| g.into_iter().map(|file| self.modules.join(file)).collect()).collect())
    }
}

/// The kernel file an image boots, written to `out_dir`: the uncompressed
/// ELF inside a bzImage when it has a PVH entry point (`vmlinux`), else the
/// bzImage itself (`vmlinuz`). QEMU loads a PVH kernel straight into memory
/// and jumps to it: no firmware boot loader, no decompression in the guest,
/// which under TCG is most of a bare boot (about 3 s of 5.4 s here).
/// Returns the file's name and whether it is the PVH one.
pub fn install_kernel(bzimage: &Path, out_dir: &Path, arch: Arch) -> std::io::Result<(&'static str, bool)> {
    let bytes = fs::read(bzimage)?;
    if arch == Arch::Arm64 {
        // Debian's arm64 kernel is a gzipped Image: stored as the Image
        // itself, so no boot spends time inflating it.
        let image = if bytes.starts_with(b"\x1f\x8b") { gunzip(bzimage)? } else { bytes };
        fs::write(out_dir.join("Image"), image)?;
        return Ok(("Image", false));
    }
    match pvh_elf(&bytes) {
        Some(elf) => {
            fs::write(out_dir.join("vmlinux"), elf)?;
            Ok(("vmlinux", true))
        }
        None => {
            fs::write(out_dir.join("vmlinuz"), &bytes)?;
            Ok(("vmlinuz", false))
        }
    }
}

/// `gzip -dc path`.
fn gunzip(path: &Path) -> std::io::Result<Vec<u8>> {
    let out = std::process::Command::new("gzip").arg("-dc").arg(path).output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "gzip -dc {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

/// The ELF kernel an xz-compressed bzImage carries, if it has a PVH entry
/// point (a Xen `PHYS32_ENTRY` note, `CONFIG_PVH`). Other compressions, and
/// kernels without the note, give `None`.
pub fn pvh_elf(bzimage: &[u8]) -> Option<Vec<u8>> {
    use std::io::Read;
    const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";
    let start = bzimage.windows(XZ_MAGIC.len()).position(|w| w == XZ_MAGIC)?;
    let mut reader = jobfile::xz::XzReader::new(&bzimage[start..], jobfile::xz::DEFAULT_MEMLIMIT).ok()?;
    let mut elf = Vec::new();
    // A kernel is tens of MB; anything past 512 MiB is not one.
    reader.by_ref().take(512 << 20).read_to_end(&mut elf).ok()?;
    has_pvh_note(&elf).then_some(elf)
}

/// Whether a 64-bit little-endian ELF has the Xen `PHYS32_ENTRY` note (type 18) in a `PT_NOTE` segment.
fn has_pvh_note(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| elf.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let u64_at =
        |o: usize| elf.get(o..o + 8).and_then(|b| usize::try_from(u64::from_le_bytes(b.try_into().ok()?)).ok());
    if elf.get(..6) != Some(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph) != Some(4) {
            continue; // not PT_NOTE
        }
        let (Some(off), Some(size)) = (u64_at(ph + 8), u64_at(ph + 32)) else { continue };
        let mut at = off;
        let end = off.saturating_add(size).min(elf.len());
        while at + 12 <= end {
            let (Some(namesz), Some(descsz), Some(kind)) = (u32_at(at), u32_at(at + 4), u32_at(at + 8)) else {
                break;
            };
            let name = elf.get(at + 12..at + 12 + namesz).unwrap_or_default();
            if name == b"Xen\0" && kind == 18 {
                return true;
            }
            at += 12 + namesz.div_ceil(4) * 4 + descsz.div_ceil(4) * 4;
        }
    }
    false
}

/// What `modprobe` would also load: `modules.softdep`'s `pre:` modules (e.g.
/// ext4 needs `crypto-crc32c`, which nothing else loads without a modprobe),
/// with names found through `modules.alias`.
#[derive(Default)]
struct Soft {
    pre: HashMap<String, Vec<String>>,
    aliases: HashMap<String, Vec<String>>,
}

impl Soft {
    fn read(modules: &Path) -> Soft {
        let mut soft = Soft::default();
        for line in fs::read_to_string(modules.join("modules.softdep")).unwrap_or_default().lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let Some(module) = words.next() else { continue };
            let mut in_pre = false;
            for w in words {
                match w {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    dep if in_pre => soft.pre.entry(module.replace('-', "_")).or_default().push(dep.to_owned()),
                    _ => {}
                }
            }
        }
        for line in fs::read_to_string(modules.join("modules.alias")).unwrap_or_default().lines() {
            let mut words = line.split_whitespace();
            if let (Some("alias"), Some(alias), Some(module)) = (words.next(), words.next(), words.next()) {
                soft.aliases.entry(alias.to_owned()).or_default().push(module.replace('-', "_"));
            }
        }
        soft
    }
}

struct Tree<'a> {
    deps: &'a HashMap<String, (String, Vec<String>)>,
    by_file: &'a HashMap<&'a str, &'a str>,
    soft: &'a Soft,
}

impl Tree<'_> {
    /// Depth first: a module's soft and hard dependencies before the module.
    fn visit(&self, name: &str, order: &mut Vec<String>) {
        let Some((file, needs)) = self.deps.get(name) else {
            return;
        };
        if order.contains(file) {
            return;
        }
        for pre in self.soft.pre.get(name).into_iter().flatten() {
            let plain = pre.replace('-', "_");
            if self.deps.contains_key(&plain) {
                self.visit(&plain, order);
            } else {
                for module in self.soft.aliases.get(pre.as_str()).into_iter().flatten() {
                    self.visit(module, order);
                }
            }
        }
        for dep in needs {
            if let Some(dep_name) = self.by_file.get(dep.as_str()) {
                self.visit(dep_name, order);
            }
        }
        if !order.contains(file) {
            order.push(file.clone());
        }
    }
}

/// `kernel/drivers/block/virtio_blk.ko(.xz)` -> `virtio_blk`
fn module_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    base.split(".ko").next().unwrap_or(base).replace('-', "_")
}

/// Compares version strings by their runs of digits as numbers (`6.10` > `6.9`).
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let mut num = String::new();
        let mut text = String::new();
        for c in s.chars() {
            if c.is_ascii_digit() {
                if !text.is_empty() {
                    out.push((0, std::mem::take(&mut text)));
                }
                num.push(c);
            } else {
                if !num.is_empty() {
                    out.push((num.parse().unwrap_or(u64::MAX), String::new()));
                    num.clear();
                }
                text.push(c);
            }
        }
        if !num.is_empty() {
            out.push((num.parse().unwrap_or(u64::MAX), String::new()));
        }
        if !text.is_empty() {
            out.push((0, text));
        }
        out
    }
    parts(a).cmp(&parts(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with one PT_NOTE segment holding one note.
    fn elf_with_note(name: &[u8], kind: u32) -> Vec<u8> {
        let mut e = vec![0u8; 0x40 + 56];
        e[..6].copy_from_slice(b"\x7fELF\x02\x01");
        e[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // phoff
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let mut note = Vec::new();
        note.extend((name.len() as u32).to_le_bytes());
        note.extend(4u32.to_le_bytes());
        note.extend(kind.to_le_bytes());
        note.extend(name);
        note.resize(note.len().div_ceil(4) * 4, 0);
        note.extend(0x0100_0000u32.to_le_bytes());
        let ph = 0x40;
        e[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        let note_at = e.len() as u64;
        e[ph + 8..ph + 16].copy_from_slice(&note_at.to_le_bytes());
        e[ph + 32..ph + 40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        e.extend(note);
        e
    }

    #[test]
    fn the_pvh_kernel_is_found_inside_an_xz_bzimage() {
        use liblzma::write::XzEncoder;
        use std::io::Write;
        let elf = elf_with_note(b"Xen\0", 18);
        let mut bzimage = b"MZ setup code and a boot header".to_vec();
        let mut enc = XzEncoder::new(Vec::new(), 6);
        enc.write_all(&elf).expect("compress");
        bzimage.extend(enc.finish().expect("finish"));
        bzimage.extend(b"trailing data after the payload");
        assert_eq!(pvh_elf(&bzimage).as_deref(), Some(&elf[..]));
        // No PVH note (another Xen note), or no xz payload: keep the bzImage.
        let mut other = b"MZ".to_vec();
        let mut enc = XzEncoder::new(Vec::new(), 6);
        enc.write_all(&elf_with_note(b"Xen\0", 5)).expect("compress");
        other.extend(enc.finish().expect("finish"));
        assert!(pvh_elf(&other).is_none());
        assert!(pvh_elf(b"MZ a gzip kernel \x1f\x8b").is_none());
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("bz"), &bzimage).expect("write");
        assert_eq!(
            install_kernel(&dir.path().join("bz"), dir.path(), Arch::Amd64).expect("install"),
            ("vmlinux", true)
        );
        assert_eq!(fs::read(dir.path().join("vmlinux")).expect("read"), elf);
    }

    #[test]
    fn newest_kernel_by_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        for v in ["6.1.0-9-amd64", "6.1.0-10-amd64", "5.10.0-30-amd64"] {
            fs::write(dir.path().join(format!("vmlinuz-{v}")), "k").expect("write");
        }
        fs::write(dir.path().join("config-7.0"), "c").expect("write");
        let k = Kernel::find(None, dir.path(), Path::new("/lib/modules")).expect("find");
        assert_eq!(k.version, "6.1.0-10-amd64");
        assert_eq!(k.modules, Path::new("/lib/modules/6.1.0-10-amd64"));
    }

    #[test]
    fn modules_come_after_their_dependencies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = Kernel { image: "vmlinuz-x".into(), version: "x".into(), modules: dir.path().to_owned() };
        fs::write(
            dir.path().join("modules.dep"),
            "kernel/d/virtio_pci.ko: kernel/d/virtio_pci_legacy_dev.ko kernel/d/virtio.ko kernel/d/virtio_ring.ko\n\
             kernel/d/virtio_blk.ko: kernel/d/virtio.ko kernel/d/virtio_ring.ko\n\
             kernel/d/virtio.ko: kernel/d/virtio_ring.ko\n\
             kernel/d/virtio_ring.ko:\n\
             kernel/d/virtio_pci_legacy_dev.ko:\n",
        )
        .expect("write");
        fs::write(dir.path().join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").expect("write");
        let got = k.resolve_modules(&["virtio_pci", "virtio-blk", "ext4"]).expect("resolve");
        let names: Vec<String> = got.iter().map(|p| module_name(&p.to_string_lossy())).collect();
        assert_eq!(names, ["virtio_pci_legacy_dev", "virtio_ring", "virtio", "virtio_pci", "virtio_blk"]);
        // Soft dependencies come first, found by name or through an alias.
        fs::write(
            dir.path().join("modules.dep"),
            "kernel/fs/jbd2/jbd2.ko:\nkernel/crypto/crc32c_generic.ko:\nkernel/arch/crc32c-intel.ko:\nkernel/lib/crc16.ko:\n\
             kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/jbd2/jbd2.ko\n",
        )
        .expect("write");
        fs::write(dir.path().join("modules.builtin"), "").expect("write");
        fs::write(
            dir.path().join("modules.softdep"),
            "# comment\nsoftdep ext4 pre: crypto-crc32c\nsoftdep jbd2 pre: crc16 post: x\n",
        )
        .expect("write");
        fs::write(
            dir.path().join("modules.alias"),
            "alias crypto-crc32c crc32c_intel\nalias crypto-crc32c crc32c_generic\n",
        )
        .expect("write");
        let got = k.resolve_modules(&["ext4"]).expect("resolve");
        let names: Vec<String> = got.iter().map(|p| module_name(&p.to_string_lossy())).collect();
        assert_eq!(names, ["crc32c_intel", "crc32c_generic", "crc16", "jbd2", "ext4"]);
        // Modules that share nothing load side by side; those that share a dependency, in turn.
        fs::write(
            dir.path().join("modules.dep"),
            "kernel/v/virtio.ko:\nkernel/v/virtio_pci.ko: kernel/v/virtio.ko\nkernel/v/virtio_blk.ko: kernel/v/virtio.ko\n\
             kernel/p/pvpanic.ko:\nkernel/lib/crc16.ko:\nkernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko\n",
        )
        .expect("write");
        fs::write(dir.path().join("modules.softdep"), "").expect("write");
        let groups = k.resolve_module_groups(&["virtio_pci", "pvpanic", "virtio_blk", "ext4"]).expect("resolve");
        let names: Vec<Vec<String>> =
            groups.iter().map(|g| g.iter().map(|p| module_name(&p.to_string_lossy())).collect()).collect();
        assert_eq!(names, [vec!["pvpanic"], vec!["virtio", "virtio_pci", "virtio_blk"], vec!["crc16", "ext4"]]);
        assert!(matches!(k.resolve_modules(&["nope"]), Err(KernelError::UnknownModule { .. })));
    }
}
