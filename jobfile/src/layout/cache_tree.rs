//! The build caches' shared files beside a queue, `running/.caches/`:
//!
//! ```text
//! running/.caches/generations.json      the server's cleared caches (owner -> name -> generation)
//! running/.caches/host.<host-id>.json   the build caches that host holds, as it last said
//! ```
//!
//! The server writes the generations; each host reads them before it lends
//! a cache, and writes its own report, which the server reads.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{read_small, write_whole};
use crate::caches::Generations;

/// Most bytes of a generations file or of one host's report that are read.
const MAX_FILE: u64 = 16 << 20;

/// `running/.caches/` of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheTree {
    pub dir: PathBuf,
}

impl CacheTree {
    /// The tree under `running` (the parent of the hosts' directories).
    pub fn of(running: &Path) -> CacheTree {
        CacheTree { dir: running.join(".caches") }
    }

    /// The server's cleared caches, as every host on the queue reads them.
    pub fn generations_file(&self) -> PathBuf {
        self.dir.join("generations.json")
    }

    /// The caches the host `host_id` holds, as it last wrote them.
    pub fn report_file(&self, host_id: &str) -> PathBuf {
        self.dir.join(format!("host.{host_id}.json"))
    }

    /// Writes the cleared caches' generations whole.
    pub fn write_generations(&self, generations: &Generations) -> std::io::Result<()> {
        let raw = serde_json::to_vec_pretty(generations).expect("generations always serialize");
        write_whole(&self.generations_file(), &raw)
    }

    /// Reads the cleared caches' generations; none when there is no file. A
    /// file that cannot be read is an error: a host must not use a cache its
    /// owner may have cleared.
    pub fn generations(&self) -> Result<Generations, String> {
        let path = self.generations_file();
        let Some(raw) = read_small(&path, MAX_FILE)? else { return Ok(Default::default()) };
        serde_json::from_slice(&raw).map_err(|e| format!("{} is not a map of generations: {e}", path.display()))
    }

    /// Writes what `host_id` holds, whole.
    pub fn write_report<T: Serialize>(&self, host_id: &str, held: &T) -> std::io::Result<()> {
        let raw = serde_json::to_vec_pretty(held).map_err(std::io::Error::other)?;
        write_whole(&self.report_file(host_id), &raw)
    }

    /// What `host_id` last said it holds: `None` when it said nothing.
    pub fn report<T: DeserializeOwned>(&self, host_id: &str) -> Result<Option<T>, String> {
        parse(&self.report_file(host_id))
    }

    /// Every host's report, as (host id, what it holds or why it cannot be read).
    pub fn reports<T: DeserializeOwned>(&self) -> Vec<(String, Result<T, String>)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(host) = name.strip_prefix("host.").and_then(|n| n.strip_suffix(".json")) else { continue };
            if let Some(read) = parse(&e.path()).transpose() {
                out.push((host.to_owned(), read));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

fn parse<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, String> {
    let Some(raw) = read_small(path, MAX_FILE)? else { return Ok(None) };
    serde_json::from_slice(&raw).map(Some).map_err(|e| format!("{} cannot be read: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::CacheTree;

    #[test]
    fn generations_and_reports_round_trip_and_a_bad_report_says_why() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let tree = CacheTree::of(tmp.path());
        assert_eq!(tree.generations().expect("none"), Default::default());
        let mut generations = crate::caches::Generations::new();
        generations.entry("a1".into()).or_default().insert("cargo".into(), 3);
        tree.write_generations(&generations).expect("write");
        assert_eq!(tree.generations().expect("read"), generations);
        tree.write_report("h1", &vec!["x".to_owned()]).expect("report");
        std::fs::write(tree.report_file("h2"), "{").expect("bad");
        let reports = tree.reports::<Vec<String>>();
        assert_eq!(reports[0], ("h1".to_owned(), Ok(vec!["x".to_owned()])));
        assert!(reports[1].0 == "h2" && reports[1].1.is_err());
        assert_eq!(tree.report::<Vec<String>>("h3").expect("none"), None);
    }
}
