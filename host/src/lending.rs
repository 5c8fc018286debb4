//! A job's build caches, seen from its run: each lent to the VM as a
//! working copy of its last kept version, then kept, reset or dropped by
//! how the job ended; and what this host holds, reported for the server.

use std::io;

use jobfile::caches::Given;
use jobfile::layout::CacheTree;
use jobfile::{JobName, JobStatus};

use crate::caches::{self, Checkout};
use crate::limits::Limits;
use crate::queue::{self, Dirs};

/// Lends the job each cache it names, from this host's caches: those of
/// `owner`, the account the server named for the job (or `local` for a job
/// with none: a local queue has no accounts), at the generation the server
/// last said. With caches off, or when one cannot be lent, the guest is told
/// it is not given (an empty directory). A verified rebuild's run
/// (`rebuild`) is lent none: a poisoned cache would feed both runs the same
/// objects, so each starts empty.
pub fn lend(
    dirs: &Dirs,
    limits: &Limits,
    owner: Option<&str>,
    job: &JobName,
    names: &[String],
    rebuild: bool,
) -> (Vec<Checkout>, Vec<Given>) {
    let label = job.input_file_name();
    let (mut checkouts, mut given) = (Vec::new(), Vec::new());
    if rebuild && !names.is_empty() {
        log::info!("job {label}: a verified rebuild's run: its build caches start empty");
    }
    let owner = owner.unwrap_or(caches::LOCAL_OWNER);
    let generations = if names.is_empty() || limits.caches.is_none() || rebuild {
        None
    } else {
        CacheTree::of(&dirs.running)
            .generations()
            .inspect_err(|why| log::warn!("job {label}: its build caches are not given: {why}"))
            .ok()
    };
    for name in names {
        let lent = limits.caches.as_ref().zip(generations.as_ref()).and_then(|(caches, generations)| {
            let tag = queue::unique_tag(&limits.host_id);
            let generation = jobfile::caches::generation(generations, owner, name);
            caches
                .checkout(owner, job.image(), name, generation, &tag)
                .inspect_err(|e| log::warn!("job {label}: cannot lend it build cache {name}: {e}; it runs without"))
                .ok()
        });
        given.push(Given { name: name.clone(), version: lent.as_ref().map(|c| c.version) });
        if let Some(c) = lent {
            log::info!("job {label}: build cache {name} at version {}", c.version);
            checkouts.push(c);
        }
    }
    (checkouts, given)
}

/// What the job's end means for each cache it was lent: kept as the new
/// version when the job ended ok with the cache mounted; started again,
/// empty, when the guest could not mount it (garbage from a former job of
/// the same key); otherwise dropped.
pub fn settle(limits: &Limits, label: &str, checkouts: Vec<Checkout>, st: &JobStatus) {
    let Some(caches) = &limits.caches else { return };
    for c in checkouts {
        let name = c.name.clone();
        let seen = st.caches.iter().find(|s| s.name == name);
        match seen {
            Some(s) if s.mounted && st.result == jobfile::Outcome::Ok => match caches.keep(c) {
                Ok(v) => log::info!("job {label}: build cache {name} kept as version {v}"),
                Err(e) => log::warn!("job {label}: cannot keep build cache {name}: {e}"),
            },
            Some(s) if !s.mounted && s.version.is_some() => {
                let why = s.problem.as_deref().map(|p| jobfile::sanitize(p.as_bytes())).unwrap_or_default();
                log::warn!("job {label}: build cache {name} did not mount in the VM ({why}); it starts again empty");
                if let Err(e) = caches.reset(c) {
                    log::warn!("job {label}: cannot reset build cache {name}: {e}");
                }
            }
            _ => log::info!("job {label}: build cache {name} not kept (the job ended {})", st.result.as_str()),
        }
    }
}

/// Writes what this host's caches hold for the server (after removing
/// those their owners cleared); nothing with caches off.
pub fn report(dirs: &Dirs, limits: &Limits) {
    let Some(caches) = &limits.caches else { return };
    let done = CacheTree::of(&dirs.running)
        .generations()
        .map_err(io::Error::other)
        .and_then(|generations| caches.report(&dirs.running, &limits.host_id, &generations));
    if let Err(e) = done {
        log::warn!("cannot report this host's build caches: {e}");
    }
}
