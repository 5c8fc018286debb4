//! `construir wait`: follow a job until it ends (a verified rebuild: until
//! both runs have ended and been compared).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use wire::client::Api;

use crate::show::{checked_id, describe, shown};

/// Exits 0 when the job's result is ok (and, verified, reproducible), 1 otherwise.
pub fn run(api: &Api, id: &str) -> Result<ExitCode> {
    Ok(if followed(api, checked_id(id)?)? { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Follows a job to its end; true when its result is ok.
fn followed(api: &Api, id: &str) -> Result<bool> {
    let mut last = String::new();
    let started = Instant::now();
    loop {
        let job = super::job(api, id)?;
        // Elapsed time changes every poll: print a running line once a minute at most.
        let line = describe(&job);
        let key = if matches!(job.place, wire::Place::Running { .. }) {
            format!("running {}", started.elapsed().as_secs() / 60)
        } else {
            line.clone()
        };
        if key != last {
            eprintln!("construir: {id}: {line}");
            last = key;
        }
        let ok = match &job.place {
            wire::Place::Done { verdict, .. } => {
                super::debug::tell_open(api, id, &job, verdict);
                job.status.as_ref().is_some_and(|s| s.result == jobfile::Outcome::Ok)
            }
            wire::Place::Failed { .. } | wire::Place::Missing => false,
            _ => {
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        // A verified rebuild: until its second run has ended too and the two have been compared.
        let Some(rebuild) = &job.rebuild else { return Ok(ok) };
        match &rebuild.verdict {
            Some(verdict) => {
                eprintln!("construir: {id}: verified rebuild: {}", shown(&verdict.summary()));
                return Ok(ok && verdict.outcome == wire::RebuildOutcome::Reproducible);
            }
            None => {
                let line = format!("its second run: {}", shown(&rebuild.second.describe()));
                let key = if matches!(rebuild.second, wire::Place::Running { .. }) {
                    format!("second running {}", started.elapsed().as_secs() / 60)
                } else {
                    line.clone()
                };
                if key != last {
                    eprintln!("construir: {id}: {line}");
                    last = key;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}
