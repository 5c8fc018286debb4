//! The QEMU a host runs each guest architecture with, and how: KVM only
//! for the host's own architecture where KVM works, TCG for every other.
//! An image's architecture (`image.toml`) picks its emulator; a host with
//! no QEMU for an architecture refuses that architecture's jobs, saying
//! so, and a host of a server neither fetches nor offers such images.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use jobfile::arch::Arch;

use crate::qemu::{self, Accel};

/// The oldest QEMU construir runs.
pub const MIN_VERSION: (u32, u32) = (7, 2);

/// One architecture's QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emulator {
    pub arch: Arch,
    /// As given (`--qemu`, `--qemu-arm64`): a name found on PATH, or a path.
    pub qemu: PathBuf,
    /// Its version, (major, minor).
    pub version: (u32, u32),
    pub accel: Accel,
}

impl Emulator {
    /// `major.minor`, as provenance names it.
    pub fn version_text(&self) -> String {
        format!("{}.{}", self.version.0, self.version.1)
    }

    /// The binary's file name (`qemu-system-aarch64`).
    pub fn name(&self) -> String {
        self.qemu.file_name().map_or_else(|| self.arch.qemu().to_owned(), |n| n.to_string_lossy().into_owned())
    }
}

/// Why an architecture's QEMU cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmulatorError {
    #[error("cannot run {qemu} ({why}); install {package}, or give --qemu{flag} PATH")]
    Missing { qemu: PathBuf, why: String, package: &'static str, flag: &'static str },
    #[error("{qemu} is QEMU {major}.{minor}; construir needs {}.{} or newer", MIN_VERSION.0, MIN_VERSION.1)]
    TooOld { qemu: PathBuf, major: u32, minor: u32 },
}

/// The `--qemu` flag's suffix for `arch`: none for amd64 (the flag predates the others).
pub fn flag_suffix(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "",
        Arch::Arm64 => "-arm64",
    }
}

/// Asks `qemu` its version and checks it.
pub fn probe(arch: Arch, qemu: &Path) -> Result<(u32, u32), EmulatorError> {
    let (major, minor) = qemu::version(qemu).map_err(|e| EmulatorError::Missing {
        qemu: qemu.to_owned(),
        why: e.to_string(),
        package: arch.qemu_package(),
        flag: flag_suffix(arch),
    })?;
    if (major, minor) < MIN_VERSION {
        return Err(EmulatorError::TooOld { qemu: qemu.to_owned(), major, minor });
    }
    Ok((major, minor))
}

/// A QEMU found for an architecture: (architecture, QEMU as given, version).
pub type Found = (Arch, PathBuf, (u32, u32));

/// Every architecture this host can run, by architecture.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Emulators(pub BTreeMap<Arch, Emulator>);

impl Emulators {
    /// The emulators of `found` (architecture, QEMU, version), the host's
    /// own architecture with `native` (KVM or TCG, as decided), the others with TCG.
    pub fn new(found: impl IntoIterator<Item = Found>, native: Accel) -> Emulators {
        Emulators(
            found
                .into_iter()
                .map(|(arch, qemu, version)| {
                    let accel = if arch.is_native() { native } else { Accel::Tcg };
                    (arch, Emulator { arch, qemu, version, accel })
                })
                .collect(),
        )
    }

    /// Just one architecture's (tests, probes).
    pub fn only(arch: Arch, qemu: &Path, accel: Accel) -> Emulators {
        Emulators::new([(arch, qemu.to_owned(), MIN_VERSION)], accel)
    }

    pub fn get(&self, arch: Arch) -> Option<&Emulator> {
        self.0.get(&arch)
    }

    /// The architectures this host runs.
    pub fn archs(&self) -> Vec<Arch> {
        self.0.keys().copied().collect()
    }

    /// The host's own architecture's accelerator (TCG when it has no QEMU for it).
    pub fn native_accel(&self) -> Accel {
        self.get(Arch::host()).map_or(Accel::Tcg, |e| e.accel)
    }

    /// Why a job for an `arch` image cannot run here, when it cannot.
    pub fn refusal(&self, arch: Arch) -> Option<String> {
        self.get(arch).is_none().then(|| {
            format!(
                "its image is {arch} and this host has no QEMU for {arch} guests (install {} on the host, or give construir-host --qemu{} PATH)",
                arch.qemu_package(),
                flag_suffix(arch)
            )
        })
    }

    /// One line for the log: each architecture, its QEMU and accelerator.
    pub fn describe(&self) -> String {
        self.0
            .values()
            .map(|e| format!("{} with {} {} ({})", e.arch, e.name(), e.version_text(), e.accel.name()))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_hosts_own_architecture_gets_kvm() {
        let e = Emulators::new(
            [
                (Arch::Amd64, PathBuf::from("qemu-system-x86_64"), (7, 2)),
                (Arch::Arm64, PathBuf::from("/usr/bin/qemu-system-aarch64"), (7, 2)),
            ],
            Accel::Kvm,
        );
        assert_eq!(e.get(Arch::host()).map(|e| e.accel), Some(Accel::Kvm));
        let foreign = Arch::ALL.into_iter().find(|a| !a.is_native()).expect("another architecture");
        assert_eq!(e.get(foreign).map(|e| e.accel), Some(Accel::Tcg), "a foreign guest is emulated");
        assert_eq!(e.archs(), [Arch::Amd64, Arch::Arm64]);
        assert_eq!(e.refusal(Arch::Arm64), None);
        assert_eq!(e.get(Arch::Arm64).map(Emulator::name).as_deref(), Some("qemu-system-aarch64"));
    }

    #[test]
    fn a_missing_architecture_is_refused_with_its_fix() {
        let e = Emulators::only(Arch::Amd64, Path::new("qemu-system-x86_64"), Accel::Tcg);
        let why = e.refusal(Arch::Arm64).expect("refused");
        assert!(why.contains("arm64") && why.contains("qemu-system-arm") && why.contains("--qemu-arm64"), "{why}");
        let missing = probe(Arch::Arm64, Path::new("/nonexistent/qemu-system-aarch64")).expect_err("no such QEMU");
        assert!(missing.to_string().contains("install qemu-system-arm"), "{missing}");
    }
}
