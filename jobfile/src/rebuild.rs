//! Verified rebuilds: one job run twice, on two hosts where the farm has
//! two, and its two results compared file by file.
//!
//! The server queues the two runs as two job files and leaves each its
//! terms in `running/.pins/<file>.rebuild` (`Terms`): the name both runs
//! give the job, the `SOURCE_DATE_EPOCH` both get, and the other run's file
//! (its sibling). A host that claims one of them writes its id beside it
//! (`running/.pins/<file>.ranon`); until `apart_until`, no host claims a run
//! whose sibling it ran (`keeps_off`). When both have ended, `compare` says
//! which files differ.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::layout::{read_small, write_whole};
use crate::tools::EntryDigest;

/// How many runs a verified rebuild makes: the job and its second run.
pub const RUNS: u32 = 2;

/// What both runs of a verified rebuild share, and what keeps them apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terms {
    /// The other run's job file (an input name in the queue).
    pub sibling: String,
    /// The name the job is given inside both VMs (`CONSTRUIR_JOB`).
    pub name: String,
    /// `SOURCE_DATE_EPOCH` in both VMs: the time of submission.
    pub epoch: u64,
    /// Until this Unix time, a host that ran the sibling leaves this run to
    /// another; 0 when the farm has one host (both runs may share it).
    pub apart_until: u64,
}

/// Most members `compare` lists (the count of all is kept).
pub const MAX_LISTED: usize = 100;

impl Terms {
    /// Whether the terms can be acted on: a sibling that is a job's input
    /// name, a job name, an epoch within what `date` can show.
    pub fn check(&self) -> Result<(), String> {
        crate::JobName::parse(&self.sibling).ok().filter(|j| j.stage() == crate::Stage::Input).ok_or_else(|| {
            format!("sibling {:?} is not a job file's name", crate::sanitize(self.sibling.as_bytes()))
        })?;
        crate::name::check_name(&self.name).map_err(|e| format!("name: {e}"))?;
        if self.epoch > 253_402_300_799 {
            return Err(format!("epoch {} is past the year 9999", self.epoch));
        }
        Ok(())
    }
}

/// `running/.pins/<file>.rebuild`: the terms of one run.
pub fn terms_file(running: &Path, file_name: &OsStr) -> PathBuf {
    pins_entry(running, file_name, ".rebuild")
}

/// `running/.pins/<file>.ranon`: the host that claimed this run.
pub fn ran_on_file(running: &Path, file_name: &OsStr) -> PathBuf {
    pins_entry(running, file_name, ".ranon")
}

fn pins_entry(running: &Path, file_name: &OsStr, ext: &str) -> PathBuf {
    let mut name = file_name.to_owned();
    name.push(ext);
    running.join(".pins").join(name)
}

/// Writes a run's terms whole, before it is in the queue.
pub fn write_terms(running: &Path, file_name: &OsStr, terms: &Terms) -> std::io::Result<PathBuf> {
    terms.check().map_err(std::io::Error::other)?;
    let path = terms_file(running, file_name);
    write_whole(&path, &serde_json::to_vec_pretty(terms).expect("terms always serialize"))?;
    Ok(path)
}

/// A run's terms: `None` for a job that is no verified rebuild's; `Err`
/// says what is wrong with terms that are there.
pub fn read_terms(running: &Path, file_name: &OsStr) -> Result<Option<Terms>, String> {
    let path = terms_file(running, file_name);
    let Some(raw) = read_small(&path, 4096)? else { return Ok(None) };
    let terms: Terms =
        serde_json::from_slice(&raw).map_err(|e| format!("{} is not a rebuild's terms: {e}", path.display()))?;
    terms.check().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Some(terms))
}

/// Notes that `host` claimed the run `file_name` (before it runs it).
pub fn write_ran_on(running: &Path, file_name: &OsStr, host: &str) -> std::io::Result<()> {
    write_whole(&ran_on_file(running, file_name), host.as_bytes())
}

/// The host that claimed the run `file_name`, if one did.
pub fn read_ran_on(running: &Path, file_name: &OsStr) -> Option<String> {
    let raw = read_small(&ran_on_file(running, file_name), 256).ok().flatten()?;
    Some(String::from_utf8_lossy(&raw).trim().to_owned()).filter(|h| !h.is_empty())
}

/// Removes a run's terms and its claim note (when both runs have ended).
pub fn remove_terms(running: &Path, file_name: &OsStr) {
    let _ = std::fs::remove_file(terms_file(running, file_name));
    let _ = std::fs::remove_file(ran_on_file(running, file_name));
}

/// Whether `host` leaves the run `file_name` to another host now (Unix
/// time `now`): it ran the sibling, and the terms still keep them apart.
pub fn keeps_off(running: &Path, file_name: &OsStr, host: &str, now: u64) -> bool {
    let Ok(Some(terms)) = read_terms(running, file_name) else { return false };
    now < terms.apart_until && read_ran_on(running, terms.sibling.as_ref()).as_deref() == Some(host)
}

/// How one file differs between the two runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    /// The member's path in the result, escaped as listings escape it.
    pub path: String,
    /// What differs: `content`, `mode`, `kind`, `link`, `only in the first run`, `only in the second run`.
    pub what: String,
}

/// The fields of `job_status.json` that are times, and so differ in every
/// run: left out when two runs' records are compared.
pub const STATUS_TIMES: [&str; 4] = ["started_at", "ended_at", "duration_secs", "stages"];

/// A digest of a run's status record with its times left out
/// (`timeless:<sha256>` of the rest, keys sorted); `None` when it is no
/// JSON object. Every other field, known to construir or not, counts.
pub fn timeless_status(raw: &[u8]) -> Option<String> {
    use sha2::Digest;
    let mut value: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(raw).ok()?;
    for key in STATUS_TIMES {
        value.remove(key);
    }
    let canonical = serde_json::to_vec(&value).expect("a JSON map always serializes");
    Some(format!("timeless:{}", crate::hex(&sha2::Sha256::digest(&canonical))))
}

/// A result's listing as two runs are compared: its `job_status.json` is
/// weighed by [`timeless_status`] (its times aside); every other member,
/// the console included, by its content. A status that cannot be read
/// keeps its plain digest, which another run's will not match.
pub fn comparable(mut files: Vec<EntryDigest>, result: &Path) -> Vec<EntryDigest> {
    let Some(status) =
        files.iter_mut().find(|e| e.kind == '-' && crate::path_is(e.path.as_bytes(), crate::STATUS_FILE))
    else {
        return files;
    };
    if let Some(timeless) = crate::tools::raw_status(result).ok().and_then(|raw| timeless_status(&raw)) {
        status.sha256 = Some(timeless);
        status.size = None;
    }
    files
}

/// What `compare` found: how many members the two results hold between
/// them, and those that differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    /// Files compared: members other than directories, by path, in either
    /// result.
    pub files: u64,
    /// The members that differ, in path order.
    pub differing: Vec<Difference>,
}

/// Compares two results' listings member by member (path, kind, content
/// digest, link target, mode), the run records too (see [`comparable`]).
pub fn compare(first: &[EntryDigest], second: &[EntryDigest]) -> Comparison {
    use std::collections::{BTreeMap, BTreeSet};
    let index = |list: &[EntryDigest]| -> BTreeMap<String, EntryDigest> {
        list.iter()
            .map(|e| (e.path.trim_start_matches("./").trim_end_matches('/').to_owned(), e.clone()))
            .filter(|(p, _)| !p.is_empty() && p != ".")
            .collect()
    };
    let (a, b) = (index(first), index(second));
    let paths: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut differing = Vec::new();
    for path in &paths {
        let what = match (a.get(*path), b.get(*path)) {
            (Some(_), None) => "only in the first run",
            (None, Some(_)) => "only in the second run",
            (Some(x), Some(y)) if x.kind != y.kind => "kind",
            (Some(x), Some(y)) if x.sha256 != y.sha256 || x.size != y.size => "content",
            (Some(x), Some(y)) if x.link != y.link => "link",
            (Some(x), Some(y)) if x.mode != y.mode => "mode",
            _ => continue,
        };
        differing.push(Difference { path: (*path).clone(), what: what.to_owned() });
    }
    let is_dir = |p: &String| a.get(p).or(b.get(p)).is_some_and(|e| e.kind == 'd');
    let files = paths.iter().filter(|p| !is_dir(p)).count() as u64;
    Comparison { files, differing }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, mode: u32, content: &str) -> EntryDigest {
        EntryDigest {
            path: path.into(),
            kind: 'f',
            mode,
            size: Some(content.len() as u64),
            sha256: Some(crate::hex(content.as_bytes())),
            link: None,
        }
    }

    /// A status entry as `comparable` leaves it: weighed without its times.
    fn status(json: &str) -> EntryDigest {
        EntryDigest { sha256: timeless_status(json.as_bytes()), size: None, ..file("./job_status.json", 0o644, "") }
    }

    #[test]
    fn two_results_differ_by_content_mode_kind_link_and_presence_and_their_records_but_for_times() {
        let dir = EntryDigest { path: "./out/".into(), kind: 'd', mode: 0o755, size: None, sha256: None, link: None };
        let link = |to: &str| EntryDigest {
            path: "out/l".into(),
            kind: 'l',
            mode: 0o777,
            size: None,
            sha256: None,
            link: Some(to.into()),
        };
        let first = vec![
            dir.clone(),
            status(r#"{"exit_code":0,"started_at":"1","ended_at":"2","duration_secs":1.0}"#),
            file("job_output.txt", 0o644, "at 1"),
            file("out/same", 0o644, "same"),
            file("out/time", 0o644, "1700000000"),
            file("out/run.sh", 0o755, "x"),
            file("out/gone", 0o644, "x"),
            link("a"),
            file("out/was-file", 0o644, "x"),
        ];
        let second = vec![
            dir,
            status(r#"{"duration_secs":7.5,"exit_code":0,"started_at":"5"}"#),
            file("job_output.txt", 0o644, "at 2"),
            file("./out/same", 0o644, "same"),
            file("out/time", 0o644, "1700000009"),
            file("out/run.sh", 0o644, "x"),
            file("out/new", 0o644, "x"),
            link("b"),
            EntryDigest { path: "out/was-file/".into(), kind: 'd', mode: 0o755, size: None, sha256: None, link: None },
        ];
        let found = compare(&first, &second);
        assert_eq!(found.files, 9, "the two records, same, time, run.sh, gone, new, l, was-file (out is a directory)");
        let got: Vec<(String, String)> = found.differing.into_iter().map(|d| (d.path, d.what)).collect();
        let want = [
            ("job_output.txt", "content"),
            ("out/gone", "only in the first run"),
            ("out/l", "link"),
            ("out/new", "only in the second run"),
            ("out/run.sh", "mode"),
            ("out/time", "content"),
            ("out/was-file", "kind"),
        ];
        assert_eq!(got, want.map(|(p, w)| (p.to_owned(), w.to_owned())));
        assert!(compare(&first, &first).differing.is_empty(), "a result is the same as itself");
        // A status that differs in anything but its times differs.
        let exited = vec![status(r#"{"exit_code":1,"started_at":"1"}"#)];
        let other = compare(&first[1..2], &exited);
        assert_eq!(other.differing.len(), 1, "{other:?}");
        assert_eq!(timeless_status(b"[1]"), None, "no object");
    }

    #[test]
    fn a_host_keeps_off_the_sibling_of_a_run_it_claimed_until_the_terms_let_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let running = tmp.path();
        let (a, b) = ("alice.0000000000000001.x_i1.tar.xz", "alice.0000000000000002.x_i1.tar.xz");
        let terms = |sibling: &str| Terms {
            sibling: sibling.into(),
            name: "x".into(),
            epoch: 1_700_000_000,
            apart_until: 1000,
        };
        write_terms(running, a.as_ref(), &terms(b)).expect("terms");
        write_terms(running, b.as_ref(), &terms(a)).expect("terms");
        assert_eq!(read_terms(running, a.as_ref()).expect("read"), Some(terms(b)));
        assert!(!keeps_off(running, b.as_ref(), "h1", 10), "nobody ran its sibling yet");
        write_ran_on(running, a.as_ref(), "h1").expect("ran on");
        assert!(keeps_off(running, b.as_ref(), "h1", 10), "h1 ran the sibling");
        assert!(!keeps_off(running, b.as_ref(), "h2", 10), "another host takes it");
        assert!(!keeps_off(running, b.as_ref(), "h1", 1000), "past apart_until, h1 may take it too");
        assert!(!keeps_off(running, "other_i1.tar.xz".as_ref(), "h1", 10), "a job with no terms");
        remove_terms(running, a.as_ref());
        assert_eq!(read_terms(running, a.as_ref()).expect("read"), None);
        assert_eq!(read_ran_on(running, a.as_ref()), None);
        let bad = Terms { sibling: "../../etc/passwd".into(), ..terms(b) };
        assert!(write_terms(running, a.as_ref(), &bad).is_err(), "a sibling that is no job file's name");
        std::fs::write(terms_file(running, a.as_ref()), b"{\"sibling\":\"x\"}").expect("write");
        assert!(read_terms(running, a.as_ref()).is_err_and(|e| e.contains("is not a rebuild's terms")));
    }
}
