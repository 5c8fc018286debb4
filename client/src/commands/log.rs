//! `construir log`: the job's console, as far as it has got while it runs,
//! whole once it has finished; with `--follow`, as it arrives.

use std::io::{self, Write};
use std::time::Duration;

use anyhow::{Context, Result};
use wire::client::Api;

use crate::show::checked_id;

pub fn run(api: &Api, id: &str, follow: bool, run: u32) -> Result<()> {
    let id = checked_id(id)?;
    let mut shown: u64 = 0;
    loop {
        let state = match (follow, run) {
            (false, _) => "",
            (true, 1) => super::job(api, id)?.place.name(),
            (true, _) => {
                super::job(api, id)?.rebuild.context("the job is no verified rebuild: it has one run")?.second.name()
            }
        };
        if !follow || state == "running" || state == "done" || state == "failed" {
            // What has not been shown yet: the live console while it runs, the whole log at the end.
            let mut raw = Vec::new();
            match api.download(&format!("jobs/{id}/log?run={run}"), shown, None, &mut raw) {
                Ok(n) => {
                    shown += n;
                    // Sanitized by the host; again here: nothing from a VM reaches a terminal raw.
                    io::stdout().write_all(jobfile::text::sanitize_lines(&raw).as_bytes())?;
                    io::stdout().flush()?;
                }
                Err(e) if !follow => return Err(e.into()),
                Err(_) => {}
            }
        }
        if !follow || state == "done" || state == "failed" || state == "missing" {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
