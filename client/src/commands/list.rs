//! `construir list`: your jobs, newest first.

use anyhow::Result;
use wire::client::Api;

use crate::show::{describe, rebuild_note, shown};

pub fn run(api: &Api) -> Result<()> {
    let list: wire::JobList = api.get("jobs")?;
    for job in &list.jobs {
        println!(
            "{}  {:<20}  i{:<4} {}  {}",
            shown(&job.id),
            shown(&job.submitted),
            shown(&job.image),
            shown(&job.name),
            describe(job) + &rebuild_note(job)
        );
    }
    Ok(())
}
