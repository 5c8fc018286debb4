//! `construir-host cache list` and `cache clear`: the build caches a host
//! keeps, read and removed from the directory alone (it works beside a
//! running host).

use anyhow::{bail, Context, Result};
use construir_host::caches::{CacheSummary, Caches, CACHES_DIR};

use crate::cli::args::{CacheCommand, QueueArgs};

pub(crate) fn run_cache(cmd: CacheCommand) -> Result<()> {
    match cmd {
        CacheCommand::List { at, json } => {
            let (shared, _, file) = at.resolve()?;
            let caches = store(&QueueArgs::package_cache(&shared, &file));
            let listed = caches.list();
            if json {
                println!("{}", serde_json::to_string_pretty(&listed)?);
            } else {
                print!("{}", render(caches.dir(), &listed));
            }
        }
        CacheCommand::Clear { name, all, owner, at } => {
            let (shared, _, file) = at.resolve()?;
            if let Some(name) = &name {
                if let Err(why) = jobfile::caches::check_name(name) {
                    bail!("{why}");
                }
            }
            if owner.is_empty() || owner.starts_with('.') || owner.contains('/') {
                bail!("{:?} is not an owner", jobfile::sanitize(owner.as_bytes()));
            }
            let caches = store(&QueueArgs::package_cache(&shared, &file));
            let removed = caches
                .clear(&owner, if all { None } else { name.as_deref() })
                .with_context(|| format!("cannot clear build caches in {}", caches.dir().display()))?;
            let noun = if removed == 1 { "build cache" } else { "build caches" };
            let named = name.filter(|_| !all).map(|n| format!(" named {n}")).unwrap_or_default();
            println!("removed {removed} {noun}{named} of {}", jobfile::sanitize(owner.as_bytes()));
        }
    }
    Ok(())
}

/// The store under `cache` (its sizes do not matter for listing or clearing).
fn store(cache: &std::path::Path) -> Caches {
    Caches::new(&cache.join(CACHES_DIR), 0, u64::MAX)
}

/// The caches as a table, or a line saying there are none.
fn render(dir: &std::path::Path, listed: &[CacheSummary]) -> String {
    if listed.is_empty() {
        return format!("no build caches in {}\n", jobfile::sanitize(dir.as_os_str().as_encoded_bytes()));
    }
    let mut out =
        format!("{:<16} {:<8} {:<20} {:>7} {:>10}  {}\n", "OWNER", "IMAGE", "CACHE", "VERSION", "SIZE", "LAST USED");
    for c in listed {
        out.push_str(&format!(
            "{:<16} {:<8} {:<20} {:>7} {:>10}  {}\n",
            c.owner,
            c.image,
            c.name,
            c.version,
            jobfile::units::human_size(c.bytes),
            c.used
        ));
    }
    out
}
