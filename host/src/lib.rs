//! construir-host: runs queued jobs in throwaway QEMU VMs, and the
//! submitter's `job` tools.

pub mod cgroup;
pub mod console;
pub mod daemon;
pub mod files;
pub mod jail;
pub mod job;
pub mod kvm;
pub mod logger;
pub mod pending;
pub mod qemu;
pub mod queue;
pub mod units;
pub mod worker;
