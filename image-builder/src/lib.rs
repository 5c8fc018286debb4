//! image-builder: makes the base images construir boots (`images/i<N>/`).

pub mod initramfs;
pub mod kernel;
pub mod mini;
pub mod output;

/// One progress line to stderr.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { eprintln!("image-builder: {}", format_args!($($arg)*)) };
}
