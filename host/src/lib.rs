//! construir-host: runs queued jobs in throwaway QEMU VMs, and the
//! submitter's `job` tools.

pub mod job;
pub mod units;
