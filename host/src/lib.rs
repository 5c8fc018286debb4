//! construir-host: runs queued jobs in throwaway QEMU VMs, and the
//! submitter's `job` tools.

pub mod cgroup;
pub mod config;
pub mod console;
pub mod daemon;
pub mod doctor;
pub mod files;
pub mod image;
pub mod jail;
pub mod kvm;
pub mod logger;
pub mod metrics;
pub mod pending;
pub mod qemu;
pub mod queue;
pub mod status;
pub mod worker;
