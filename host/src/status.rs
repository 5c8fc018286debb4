//! `construir-host status`: what is happening now, read from the queue's
//! directories alone, so it works beside running hosts, for a queue that
//! several hosts share, and after a host has died.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use jobfile::layout::Beside;
use jobfile::name::{classify, Entry};
use serde::Serialize;

use crate::queue::{self, Dirs, HostInfo};

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub queue: PathBuf,
    pub waiting: Waiting,
    pub hosts: Vec<Host>,
    pub running: Vec<Claim>,
    /// Claims whose host is not running: they go back to the queue when it starts again.
    pub stuck: Vec<Claim>,
    pub recent: Vec<Finished>,
    /// The layers jobs' packages were installed into, most recently used first.
    pub layers: Vec<jobfile::deps::LayerSummary>,
}

/// The layers under `dir` (`cache/layers/`), for `status`.
pub fn layers(dir: &Path) -> Vec<jobfile::deps::LayerSummary> {
    jobfile::deps::layer_summaries(dir)
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Waiting {
    pub count: usize,
    pub oldest_secs: Option<u64>,
    pub by_image: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub id: String,
    pub alive: bool,
    #[serde(flatten)]
    pub info: Option<HostInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Claim {
    pub name: String,
    pub host: String,
    pub elapsed_secs: u64,
    pub attempt: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finished {
    /// RFC 3339, UTC: when it landed.
    pub time: String,
    /// `done` or `failed`.
    pub outcome: &'static str,
    pub name: String,
    /// The host's verdict (done/) or reason (failed/), sanitized.
    pub verdict: String,
}

/// Reads the directories; `recent` results at most.
pub fn gather(d: &Beside, recent: usize) -> io::Result<Status> {
    let now = SystemTime::now();
    let age = |meta: &fs::Metadata, ctime: bool| {
        let t = if ctime { meta.ctime() } else { meta.mtime() };
        let then = SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
        now.duration_since(then).unwrap_or_default().as_secs()
    };
    let mut waiting = Waiting::default();
    for entry in fs::read_dir(&d.queue).map_err(|e| in_dir(&d.queue, e))? {
        let entry = entry?;
        let Entry::Job(job) = classify(&entry.file_name()) else { continue };
        let Ok(meta) = entry.metadata() else { continue };
        waiting.count += 1;
        *waiting.by_image.entry(format!("i{}", job.image())).or_default() += 1;
        let a = age(&meta, false);
        waiting.oldest_secs = Some(waiting.oldest_secs.map_or(a, |o| o.max(a)));
    }
    let (mut hosts, mut running, mut stuck) = (Vec::new(), Vec::new(), Vec::new());
    let mut host_dirs: Vec<_> = match fs::read_dir(&d.running) {
        Ok(rd) => rd.filter_map(|e| e.ok()).filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(in_dir(&d.running, e)),
    };
    host_dirs.sort_by_key(|e| e.file_name());
    for host_dir in host_dirs {
        let id = host_dir.file_name().to_string_lossy().into_owned();
        if id.starts_with('.') {
            continue; // .attempts
        }
        let (alive, info) = queue::host_state(&host_dir.path());
        let counters = Dirs::of(d.clone(), &id, PathBuf::new());
        let mut claims: Vec<_> = fs::read_dir(host_dir.path())?
            .filter_map(|e| e.ok())
            .filter(|e| matches!(classify(&e.file_name()), Entry::Job(_)))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some(Claim {
                    name: jobfile::sanitize(e.file_name().as_encoded_bytes()),
                    host: id.clone(),
                    // The claim's rename set its ctime.
                    elapsed_secs: age(&meta, true),
                    attempt: queue::read_counter(&counters, &e.file_name(), "attempts") + 1,
                })
            })
            .collect();
        claims.sort_by_key(|c| std::cmp::Reverse(c.elapsed_secs));
        if alive || info.is_some() || !claims.is_empty() {
            hosts.push(Host { id: jobfile::sanitize(id.as_bytes()), alive, info });
        }
        if alive {
            running.extend(claims);
        } else {
            stuck.extend(claims);
        }
    }
    let mut finished = Vec::new();
    for (dir, outcome) in [(&d.done, "done"), (&d.failed, "failed")] {
        let Ok(rd) = fs::read_dir(dir) else { continue };
        for entry in rd.filter_map(|e| e.ok()) {
            let name = entry.file_name();
            let bytes = name.as_encoded_bytes();
            if bytes.starts_with(b".") || !(bytes.ends_with(b".tar.xz") || outcome == "failed") {
                continue;
            }
            if outcome == "failed" && (bytes.ends_with(b".reason") || bytes.ends_with(b".log")) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            finished.push((meta.ctime(), outcome, entry.path()));
        }
    }
    finished.sort_by_key(|f| std::cmp::Reverse(f.0));
    let recent = finished
        .into_iter()
        .take(recent)
        .map(|(ctime, outcome, path)| {
            let mut name = jobfile::sanitize(path.file_name().unwrap_or(OsStr::new("")).as_encoded_bytes());
            let verdict = if outcome == "done" {
                verdict_of(&path)
            } else {
                let (reason, original) = reason_of(&path);
                // A refused entry is filed under a name the host chose; show the one it came with.
                if let Some(original) = original.filter(|_| name.starts_with("refused.")) {
                    name = format!("{original} (as {name})");
                }
                reason
            };
            Finished {
                time: jobfile::units::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(ctime.max(0) as u64)),
                outcome,
                name,
                verdict,
            }
        })
        .collect();
    let queue = std::path::absolute(&d.queue).unwrap_or_else(|_| d.queue.clone());
    Ok(Status { queue, waiting, hosts, running, stuck, recent, layers: Vec::new() })
}

fn in_dir(dir: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("cannot read {}: {e}", dir.display()))
}

/// The verdict the host ended a result's log with.
fn verdict_of(result: &Path) -> String {
    let log = result.with_file_name(
        result.file_name().unwrap_or_default().to_string_lossy().trim_end_matches(".tar.xz").to_owned() + ".log",
    );
    jobfile::tools::log_verdict(&log).unwrap_or_else(|| "(no log)".to_owned())
}

/// The first line of a failed entry's `.reason`, and the name it came
/// with when the host refused it.
pub fn reason_of(entry: &Path) -> (String, Option<String>) {
    match jobfile::layout::read_reason(entry) {
        Some(r) => (r.why, r.original),
        None => ("(no reason)".to_owned(), None),
    }
}

/// `1h 02m`, `3m 10s`, `12s`.
pub fn human_duration(secs: u64) -> String {
    match secs {
        s if s >= 86_400 => format!("{}d {:02}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m {:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// One line for each claim: its name, its host, `when`, its attempt.
fn claims(out: &mut String, list: &[Claim], when: impl Fn(&Claim) -> String) {
    for c in list {
        out.push_str(&format!("  {:<40} on {:<16} {} attempt {}\n", c.name, c.host, when(c), c.attempt));
    }
}

/// The status for a person.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let w = &s.waiting;
    out.push_str(&format!("queue {}: {} waiting", s.queue.display(), w.count));
    if let Some(oldest) = w.oldest_secs {
        let by: Vec<String> = w.by_image.iter().map(|(i, n)| format!("{i} {n}")).collect();
        out.push_str(&format!(", oldest {} (by image: {})", human_duration(oldest), by.join(", ")));
    }
    out.push('\n');
    out.push_str(&format!("hosts: {}\n", s.hosts.len()));
    for h in &s.hosts {
        let state = match &h.info {
            _ if h.alive => "running",
            Some(HostInfo { stopped: Some(_), .. }) => "stopped",
            _ => "gone",
        };
        match &h.info {
            Some(i) => out.push_str(&format!(
                "  {:<20} {state:<8} pid {}, {} worker(s), started {}{}, version {}\n",
                h.id,
                i.pid,
                i.workers,
                i.started,
                i.stopped.as_deref().map(|t| format!(", stopped {t}")).unwrap_or_default(),
                i.version
            )),
            None => out.push_str(&format!("  {:<20} {state}\n", h.id)),
        }
    }
    out.push_str(&format!("running: {}\n", s.running.len()));
    claims(&mut out, &s.running, |c| format!("{:>8} ", human_duration(c.elapsed_secs)));
    if !s.stuck.is_empty() {
        out.push_str(&format!(
            "stuck: {} (their host is not running; they go back to the queue when it starts again)\n",
            s.stuck.len()
        ));
        claims(&mut out, &s.stuck, |c| format!("claimed {} ago,", human_duration(c.elapsed_secs)));
    }
    out.push_str(&format!("recent: {}\n", s.recent.len()));
    for f in &s.recent {
        out.push_str(&format!("  {}  {:<6}  {}: {}\n", f.time, f.outcome, f.name, f.verdict));
    }
    if !s.layers.is_empty() {
        let total: u64 = s.layers.iter().map(|l| l.bytes).sum();
        out.push_str(&format!("layers: {} ({})\n", s.layers.len(), jobfile::units::human_size(total)));
        for l in &s.layers {
            out.push_str(&format!(
                "  {}  {:<6} {:>4} packages {:>10}  last used {}\n",
                l.key.get(..12).unwrap_or(&l.key),
                l.image,
                l.packages,
                jobfile::units::human_size(l.bytes),
                l.used
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        for (secs, want) in [(0, "0s"), (59, "59s"), (61, "1m 01s"), (3725, "1h 02m"), (90_000, "1d 01h")] {
            assert_eq!(human_duration(secs), want);
        }
    }
}
