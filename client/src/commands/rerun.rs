//! `construir rerun`: a job's file again, as a new job; then maybe `wait`.

use std::process::ExitCode;

use anyhow::{Context, Result};
use wire::client::Api;

use crate::show::{checked_id, describe};

pub fn run(api: &Api, id: &str, debug: bool, wait: bool) -> Result<ExitCode> {
    let id = checked_id(id)?;
    let path = format!("jobs/{id}/rerun{}", if debug { "?debug=true" } else { "" });
    let job: wire::Job = api.post_bytes(&path, b"").with_context(|| format!("cannot run job {id} again"))?;
    let new = checked_id(&job.id)?.to_owned();
    println!("{new}");
    let how = if debug { "a debug run" } else { "a new job" };
    eprintln!("construir: job {id} runs again as {new} ({how}): {}", describe(&job));
    if wait {
        return super::wait::run(api, &new);
    }
    Ok(ExitCode::SUCCESS)
}
