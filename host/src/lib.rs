//! construir-host: runs queued jobs in throwaway QEMU VMs; says what is
//! happening (`status`), what is wrong (`doctor`) and how it went (metrics).
//! The submitter's `job` commands are `jobfile::tools`.

pub mod caches;
pub mod cgroup;
pub mod claim;
pub mod config;
pub mod console;
pub mod daemon;
pub mod debug;
pub mod debug_job;
pub mod doctor;
pub mod emulators;
pub mod files;
pub mod handed;
pub mod image;
pub mod intake;
pub mod jail;
pub mod kvm;
pub mod layer_build;
pub mod layers;
pub mod lending;
pub mod limits;
pub mod logger;
pub mod metrics;
pub mod outcome;
pub mod packages;
pub mod pending;
pub mod provenance;
pub mod qemu;
pub mod queue;
pub mod remote;
pub mod stages;
pub mod status;
pub mod worker;
