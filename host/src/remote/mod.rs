//! A build host that takes its jobs from a construir-server (`run --server`).
//!
//! The host keeps a private spool: a queue of its own that the ordinary
//! daemon runs, unchanged (same jail, same VMs, same verdicts). Beside it
//! a pump talks to the server: it takes a job under a lease when the host
//! has room, puts the job file into the spool, renews the lease while the
//! job runs (sending the console as it grows), and delivers the result or
//! the failure when the daemon has put it in `done/` or `failed/`. A lease
//! the server no longer honours (it ran out while this host was cut off or
//! frozen, and another host has the job) stops the job's VM here; its
//! result is dropped, and would be refused.
//!
//! Renewals run on a thread of their own (`renew_loop`), beside the pump's
//! transfers: however long a download or a delivery takes over a slow link,
//! every other lease this host holds is renewed on time, and the lease of
//! the job being moved too (the server also renews a lease while its own
//! transfer moves).
//!
//! The host also fetches the images the server offers that it lacks, and
//! installs one only when every file matches the server's checksums.

mod images;
mod offer;
mod pump;

pub use images::{fetch_images, local_images};
pub use pump::{locate, move_file, run, Local};

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use wire::client::{Api, CallError, Settings};

/// Where and as whom the host takes work.
#[derive(Debug, Clone)]
pub struct Remote {
    /// `http(s)://host:port`.
    pub server: String,
    /// A host account's token.
    pub token: String,
    /// Trust this CA for the server's TLS certificate (beside the system's).
    pub ca_cert: Option<PathBuf>,
    /// How often to ask for work while the host has room.
    pub poll: Duration,
}

impl Remote {
    /// The server's API, as this host calls it (a call may take an hour: a
    /// job file or a result goes over a slow link).
    pub fn api(&self) -> std::io::Result<Api> {
        Api::new(&Settings {
            server: self.server.clone(),
            token: Ok(self.token.clone()),
            ca_cert: self.ca_cert.clone(),
            timeout: Some(Duration::from_secs(3600)),
        })
    }
}

/// The status of a call's answer: 200 for one read, the server's for a
/// refusal, none when there was no answer.
fn status_of<T>(answer: &Result<T, CallError>) -> Option<u16> {
    match answer {
        Ok(_) => Some(200),
        Err(e) => e.refusal().map(|r| r.status),
    }
}

/// Downloads `path` into a new file `to`, at most `max` bytes, synced.
fn download_to(api: &Api, path: &str, to: &Path, max: u64) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut out = File::create(to).with_context(|| format!("cannot create {}", to.display()))?;
    api.download(path, 0, Some(max), &mut out)?;
    out.sync_all()?;
    Ok(())
}

/// What the host does with the server's answer to a renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Renewal {
    /// 200: renewed (with the term and whether the submitter cancelled).
    Renewed,
    /// 409 while the result is being delivered: the delivery ended the
    /// lease, and the delivery's answer decides.
    EndedByDelivery,
    /// 409 otherwise: the lease ran out or went to another host; stop the job here.
    Lost,
    /// Anything else: the server's passing trouble; renew again soon.
    Failed,
}

fn renewal(status: u16, delivering: bool) -> Renewal {
    match status {
        200 => Renewal::Renewed,
        409 if delivering => Renewal::EndedByDelivery,
        409 => Renewal::Lost,
        _ => Renewal::Failed,
    }
}

/// What is being delivered: a result, or the reason a job failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivering {
    Result,
    Failure,
}

/// What the host does with the server's answer to a delivery (no answer at all: it tries again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settlement {
    /// 200: delivered; the job is done with here.
    Accepted,
    /// 409: the lease is gone (ran out, or the job went elsewhere); drop the job.
    LeaseGone,
    /// Another 4xx for a result (not 408 or 429): refused for good; report
    /// the job failed instead, once.
    RefusedForGood,
    /// 5xx, 408, 429, anything unforeseen, or a refused failure report: try again later.
    TryAgain,
}

fn settlement(status: u16, what: Delivering) -> Settlement {
    match status {
        200 => Settlement::Accepted,
        409 => Settlement::LeaseGone,
        s if (400..500).contains(&s) && ![408, 429].contains(&s) && what == Delivering::Result => {
            Settlement::RefusedForGood
        }
        _ => Settlement::TryAgain,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewals_answer_maps_to_what_the_host_does() {
        let table = [
            (200, false, Renewal::Renewed),
            (200, true, Renewal::Renewed),
            (409, true, Renewal::EndedByDelivery),
            (409, false, Renewal::Lost),
            (401, false, Renewal::Failed),
            (404, false, Renewal::Failed),
            (429, false, Renewal::Failed),
            (500, false, Renewal::Failed),
            (503, true, Renewal::Failed),
        ];
        for (status, delivering, want) in table {
            assert_eq!(renewal(status, delivering), want, "{status}, delivering {delivering}");
        }
    }

    #[test]
    fn a_deliverys_answer_maps_to_what_the_host_does() {
        use Delivering::{Failure, Result};
        let table = [
            (200, Result, Settlement::Accepted),
            (200, Failure, Settlement::Accepted),
            (409, Result, Settlement::LeaseGone),
            (409, Failure, Settlement::LeaseGone),
            (400, Result, Settlement::RefusedForGood),
            (413, Result, Settlement::RefusedForGood),
            (404, Result, Settlement::RefusedForGood),
            // A refused failure report is not turned into another failure report.
            (400, Failure, Settlement::TryAgain),
            (408, Result, Settlement::TryAgain),
            (429, Result, Settlement::TryAgain),
            (500, Result, Settlement::TryAgain),
            (502, Failure, Settlement::TryAgain),
            (302, Result, Settlement::TryAgain),
        ];
        for (status, what, want) in table {
            assert_eq!(settlement(status, what), want, "{status} for a {what:?}");
        }
    }
}
