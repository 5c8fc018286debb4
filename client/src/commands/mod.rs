//! One file for each command of `construir`.

pub mod cache;
pub mod cancel;
pub mod debug;
pub mod fetch;
pub mod hosts;
pub mod list;
pub mod log;
pub mod page;
pub mod rerun;
pub mod status;
pub mod submit;
pub mod unpack;
pub mod verify;
pub mod wait;

use anyhow::Result;
use wire::client::Api;

use crate::show::checked_id;

/// The job `id` as the server has it.
pub fn job(api: &Api, id: &str) -> Result<wire::Job> {
    Ok(api.get(&format!("jobs/{}", checked_id(id)?))?)
}
