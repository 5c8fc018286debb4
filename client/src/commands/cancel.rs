//! `construir cancel`: a waiting job leaves the queue, a running one's VM is stopped.

use anyhow::Result;
use wire::client::Api;

use crate::show::{checked_id, describe, shown};

pub fn run(api: &Api, id: &str) -> Result<()> {
    let job: wire::Job = api.post_bytes(&format!("jobs/{}/cancel", checked_id(id)?), b"")?;
    match &job.cancel {
        Some(note) => eprintln!("construir: {id}: cancel {}", shown(note)),
        None => eprintln!("construir: {id}: {}", describe(&job)),
    }
    Ok(())
}
