//! The `construir-host` program: its command line (`args`), the merging
//! of `host.toml` with it (`settings`), and one module for each command
//! that does more than call into the library.

pub(crate) mod args;
pub(crate) mod cache;
pub(crate) mod doctor;
pub(crate) mod job;
pub(crate) mod run_one;
pub(crate) mod settings;
pub(crate) mod setup;
