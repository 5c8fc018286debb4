//! image-builder: makes the base images construir boots (`images/i<N>/`).

pub use jobfile::command;
pub mod debootstrap;
pub mod foreign;
pub use jobfile::ext4;
pub mod initramfs;
pub mod kernel;
pub mod list;
pub mod mini;
pub mod output;
pub mod progress;
pub mod sources;
pub mod verify;

/// One progress line to stderr.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { eprintln!("image-builder: {}", format_args!($($arg)*)) };
}
