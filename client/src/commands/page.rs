//! `construir page`: a link to your page on the server (it works once, within five minutes).

use anyhow::Result;
use wire::client::Api;

use crate::show::shown;

pub fn run(api: &Api) -> Result<()> {
    let link: wire::PageLink = api.post_bytes("page-link", b"")?;
    println!("{}{}", api.server(), shown(&link.path));
    Ok(())
}
