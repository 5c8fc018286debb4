//! `construir cache list|clear`: your build caches on the server's hosts; `construir cache
//! results|forget`: your entries in its result cache.

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

/// Your entries in the result cache.
pub fn results(api: &Api, json: bool) -> Result<()> {
    let list: wire::result_cache::ResultCacheList = api.get("result-cache")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else if list.entries.is_empty() {
        eprintln!("construir: you have no results in this server's result cache");
    } else {
        println!(
            "{:<64}  {:<16} {:<20} {:<6} {:>10}  {:<20}  {:<6}  HOST",
            "KEY", "JOB", "NAME", "IMAGE", "SIZE", "LAST USED", "SHARED"
        );
        for e in &list.entries {
            println!(
                "{:<64}  {:<16} {:<20} i{:<5} {:>10}  {:<20}  {:<6}  {}",
                shown(&e.key),
                shown(&e.job),
                shown(&e.name),
                shown(&e.image),
                human_size(e.bytes),
                shown(&e.used),
                if e.shared { "yes" } else { "no" },
                shown(&e.host)
            );
        }
    }
    Ok(())
}

/// Drops the entry `key`, or every one of yours (`None`).
pub fn forget(api: &Api, key: Option<&str>) -> Result<()> {
    let path = match key {
        Some(key) if key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()) => format!("result-cache/{key}"),
        Some(key) => anyhow::bail!("{:?} is not a key (64 hex digits, as `construir cache results` shows)", shown(key)),
        None => "result-cache".to_owned(),
    };
    let gone: wire::result_cache::Forgotten = api.delete(&path)?;
    eprintln!("construir: forgot {} result(s), {}: the next such job runs", gone.entries, human_size(gone.bytes));
    Ok(())
}
