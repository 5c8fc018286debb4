//! `construir status`: the job's state, and its job_status.json once it has finished, as JSON.

use anyhow::Result;
use jobfile::tools;
use wire::client::Api;

pub fn run(api: &Api, id: &str) -> Result<()> {
    // Every key and string through the one sanitizer: job_status.json is the guest's writing.
    let job = serde_json::to_value(super::job(api, id)?)?;
    println!("{}", serde_json::to_string_pretty(&tools::sanitize_json(job))?);
    Ok(())
}
