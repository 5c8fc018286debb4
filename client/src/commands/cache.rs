//! `construir cache list|clear`: your build caches on the server's hosts.

use anyhow::Result;
use jobfile::units::human_size;
use wire::client::Api;

use crate::show::shown;

pub fn list(api: &Api, json: bool) -> Result<()> {
    let list: wire::CacheList = api.get("caches")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else if list.caches.is_empty() {
        eprintln!("construir: you have no build caches on this server's hosts");
    } else {
        println!("{:<24} {:<6} {:>7} {:>10}  {:<20}  HOST", "NAME", "IMAGE", "VERSION", "SIZE", "LAST USED");
        for c in &list.caches {
            println!(
                "{:<24} i{:<5} {:>7} {:>10}  {:<20}  {}",
                shown(&c.name),
                shown(&c.image),
                c.version,
                human_size(c.bytes),
                shown(&c.used),
                shown(&c.host)
            );
        }
    }
    Ok(())
}

/// Clears the cache `name`, or every one of yours (`None`).
pub fn clear(api: &Api, name: Option<String>) -> Result<()> {
    if let Some(name) = &name {
        jobfile::caches::check_name(name).map_err(|e| anyhow::anyhow!(e))?;
    }
    let cleared: wire::ClearedCaches = api.post_json("caches/clear", &wire::ClearCaches { name })?;
    if cleared.cleared.is_empty() {
        eprintln!("construir: you have no build caches to clear");
    } else {
        eprintln!(
            "construir: cleared {} ({} cop{} on hosts): no job starts from what {} held",
            shown(&cleared.cleared.join(", ")),
            cleared.copies,
            if cleared.copies == 1 { "y" } else { "ies" },
            if cleared.cleared.len() == 1 { "it" } else { "they" }
        );
    }
    Ok(())
}
