//! The build machine's kernel and the modules a guest needs from it.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

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
        let mut order = Vec::new();
        for name in wanted {
            let name = name.replace('-', "_");
            if !deps.contains_key(&name) {
                if builtin.lines().any(|l| module_name(l) == name) {
                    continue;
                }
                return Err(KernelError::UnknownModule { name, dep: dep_path });
            }
            visit(&name, &deps, &by_file, &mut order);
        }
        Ok(order.into_iter().map(|file| self.modules.join(file)).collect())
    }
}

/// Depth first: a module's dependencies before the module.
fn visit(
    name: &str,
    deps: &HashMap<String, (String, Vec<String>)>,
    by_file: &HashMap<&str, &str>,
    order: &mut Vec<String>,
) {
    let Some((file, needs)) = deps.get(name) else {
        return;
    };
    if order.contains(file) {
        return;
    }
    for dep in needs {
        if let Some(dep_name) = by_file.get(dep.as_str()) {
            visit(dep_name, deps, by_file, order);
        }
    }
    if !order.contains(file) {
        order.push(file.clone());
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
        assert!(matches!(k.resolve_modules(&["nope"]), Err(KernelError::UnknownModule { .. })));
    }
}
