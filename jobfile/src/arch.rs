//! The guest architectures construir boots: what an image is built for
//! (`image.toml`'s `arch`), and everything that follows from it, named in
//! one place: Debian's name, the kernel's, the QEMU that runs it, its
//! console and its kernel package.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A guest architecture, by Debian's name (as `image.toml` and the wire carry it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// x86_64 (images made before the architecture was recorded are this).
    #[default]
    Amd64,
    /// aarch64.
    Arm64,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Amd64, Arch::Arm64];

    /// Debian's name (`dpkg --print-architecture`): `amd64`, `arm64`.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The kernel's name (`uname -m`), as Rust and `file` know it too: `x86_64`, `aarch64`.
    pub fn machine(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64",
            Arch::Arm64 => "aarch64",
        }
    }

    /// The architecture this program was built for.
    pub fn host() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Arm64
        } else {
            Arch::Amd64
        }
    }

    /// Whether a guest of this architecture can use the host's CPU (KVM)
    /// rather than emulation (TCG).
    pub fn is_native(self) -> bool {
        self == Arch::host()
    }

    /// The QEMU system emulator for this guest, as Debian names it.
    pub fn qemu(self) -> &'static str {
        match self {
            Arch::Amd64 => "qemu-system-x86_64",
            Arch::Arm64 => "qemu-system-aarch64",
        }
    }

    /// The Debian package that holds `qemu()`.
    pub fn qemu_package(self) -> &'static str {
        match self {
            Arch::Amd64 => "qemu-system-x86",
            Arch::Arm64 => "qemu-system-arm",
        }
    }

    /// The guest's serial console: the 16550 on q35, the PL011 on `virt`.
    pub fn console(self) -> &'static str {
        match self {
            Arch::Amd64 => "ttyS0",
            Arch::Arm64 => "ttyAMA0",
        }
    }

    /// Debian's kernel package for this architecture.
    pub fn kernel_package(self) -> &'static str {
        match self {
            Arch::Amd64 => "linux-image-amd64",
            Arch::Arm64 => "linux-image-arm64",
        }
    }

    /// The user-mode emulator that runs this architecture's programs on
    /// another (qemu-user-static), for building its images.
    pub fn user_emulator(self) -> &'static str {
        match self {
            Arch::Amd64 => "qemu-x86_64-static",
            Arch::Arm64 => "qemu-aarch64-static",
        }
    }

    /// The ELF `e_machine` of its programs.
    pub fn elf_machine(self) -> u16 {
        match self {
            Arch::Amd64 => 62,
            Arch::Arm64 => 183,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.debian())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown architecture {0:?}: use amd64 (x86_64) or arm64 (aarch64)")]
pub struct UnknownArch(pub String);

impl FromStr for Arch {
    type Err = UnknownArch;

    /// Debian's name or the kernel's.
    fn from_str(s: &str) -> Result<Arch, UnknownArch> {
        Arch::ALL
            .into_iter()
            .find(|a| s.eq_ignore_ascii_case(a.debian()) || s.eq_ignore_ascii_case(a.machine()))
            .ok_or_else(|| UnknownArch(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_names_parse_and_debians_is_shown() {
        assert_eq!("arm64".parse(), Ok(Arch::Arm64));
        assert_eq!("aarch64".parse(), Ok(Arch::Arm64));
        assert_eq!("x86_64".parse(), Ok(Arch::Amd64));
        assert_eq!("AMD64".parse(), Ok(Arch::Amd64));
        assert_eq!("riscv64".parse::<Arch>(), Err(UnknownArch("riscv64".into())));
        assert_eq!(Arch::Arm64.to_string(), "arm64");
        assert_eq!(Arch::default(), Arch::Amd64, "images from before the field are amd64");
        assert_eq!(Arch::host().machine(), std::env::consts::ARCH);
        assert!(Arch::host().is_native());
    }

    #[test]
    fn it_is_written_by_debians_name() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct M {
            arch: Arch,
        }
        assert_eq!(toml::to_string(&M { arch: Arch::Arm64 }).expect("toml"), "arch = \"arm64\"\n");
        assert_eq!(toml::from_str::<M>("arch = \"amd64\"").expect("toml"), M { arch: Arch::Amd64 });
        assert!(toml::from_str::<M>("arch = \"aarch64\"").is_err(), "the file carries Debian's name only");
    }
}
