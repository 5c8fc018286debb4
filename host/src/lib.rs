//! construir-host: runs queued jobs in throwaway QEMU VMs; says what is
//! happening (`status`), what is wrong (`doctor`) and how it went (metrics).
//! The submitter's `job` commands are `jobfile::tools`.

pub mod caches;
pub mod cgroup;
pub mod config;
pub mod console;
pub mod daemon;
pub mod doctor;
pub mod files;
pub mod handed;
pub mod image;
pub mod jail;
pub mod kvm;
pub mod layers;
pub mod logger;
pub mod metrics;
pub mod packages;
pub mod pending;
pub mod provenance;
pub mod qemu;
pub mod queue;
pub mod remote;
pub mod status;
pub mod worker;
