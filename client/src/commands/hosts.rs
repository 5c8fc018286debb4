//! `construir hosts`: the build hosts that take work from the server, and
//! the keys their results are signed with.

use anyhow::Result;
use wire::client::Api;

use crate::show::shown;

pub fn run(api: &Api) -> Result<()> {
    let wire::HostList { hosts } = api.get("hosts")?;
    if hosts.is_empty() {
        eprintln!("construir: no build host has taken work from this server yet");
    }
    println!(
        "{:<20} {:>10} {:>8} {:>7}  {:<12} {:<12} YOUR WARM CACHES",
        "HOST", "SEEN", "CAPACITY", "RUNNING", "IMAGES", "ARCH"
    );
    for h in &hosts {
        println!(
            "{:<20} {:>8} s {:>8} {:>7}  {:<12} {:<12} {}",
            shown(&h.name),
            h.seen_secs_ago,
            h.capacity,
            h.running,
            shown(&h.image_names()),
            if h.images.is_empty() { "-".to_owned() } else { h.archs() },
            if h.your_caches.is_empty() { "-".to_owned() } else { shown(&h.your_caches.join(", ")) }
        );
    }
    // The keys their results are signed with, as the server pinned them.
    if hosts.iter().any(|h| h.key.is_some()) {
        println!();
        println!("{:<20} SIGNS WITH", "HOST");
        for h in hosts.iter().filter(|h| h.key.is_some()) {
            println!("{:<20} {}", shown(&h.name), shown(h.key.as_deref().unwrap_or_default()));
        }
    }
    Ok(())
}
