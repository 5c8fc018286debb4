//! What waits in the queue, kept in memory between claims, in the order it
//! arrived.
//!
//! The host learns of entries from inotify (one event per arrival) and from a
//! rescan at start-up and every `--rescan` (names only; an entry already known
//! is not stat'ed again). Arrival order is the order the host saw names
//! arrive; entries found by a scan go in by their ctime (a rename or a write
//! sets it), then by name. A claim stats only the entry it takes, so a full
//! queue costs memory per entry (its name and a few numbers), never a walk
//! per claim.
//!
//! An entry renamed into the queue (`IN_MOVED_TO`) is complete: the usual way
//! to submit is to write elsewhere and `mv` in, and a rename is atomic. Any
//! other entry (written in place, or found by a scan) must first settle:
//! unchanged for `--settle`, counted from when this host first saw it so, or
//! with an mtime at least that old. Only then are its size and links judged,
//! so a file that is still being written is never refused as too small.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use jobfile::name::{classify, Entry};
use jobfile::JobName;

use crate::queue::{Rules, Scanned};

/// A queue entry to move to failed/, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub file_name: OsString,
    /// One word for metrics: `bad_name`, `not_a_file`, `too_small`, `too_large`, `hardlinked`, `unknown_image`.
    pub kind: &'static str,
    pub reason: String,
}

/// A job ready to be claimed: its name, and what the host saw of it.
#[derive(Debug, Clone)]
pub struct Ready {
    pub file_name: OsString,
    pub job: JobName,
    pub scanned: Scanned,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Renamed in, or settled.
    Complete,
    /// Must be unchanged since `since` for the settle time.
    Settling { scanned: Scanned, since: Instant },
}

#[derive(Debug)]
struct Item {
    seq: u64,
    state: State,
}

#[derive(Debug)]
pub struct Pending {
    rules: Rules,
    next_seq: u64,
    order: BTreeMap<u64, OsString>,
    items: HashMap<OsString, Item>,
    /// How many items are settling: none, and `settle` has nothing to look at.
    settling: usize,
}

impl Pending {
    pub fn new(rules: Rules) -> Self {
        Pending { rules, next_seq: 0, order: BTreeMap::new(), items: HashMap::new(), settling: 0 }
    }

    /// Entries waiting (complete or settling).
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// An entry appeared under `file_name` (inotify: `renamed_in` for
    /// `IN_MOVED_TO`, else `IN_CREATE`). Refusals that can be told at once
    /// (bad name, not a regular file) are pushed to `refused`.
    pub fn arrived(&mut self, queue: &Path, file_name: &OsStr, renamed_in: bool, refused: &mut Vec<Refusal>) {
        if let Some(item) = self.items.get_mut(file_name) {
            // Replaced by a rename: complete now; otherwise the settle tracker sees the change.
            if renamed_in && matches!(item.state, State::Settling { .. }) {
                item.state = State::Complete;
                self.settling -= 1;
            }
            return;
        }
        match classify(file_name) {
            Entry::InProgress => {}
            Entry::Invalid(e) => refused.push(Refusal {
                file_name: file_name.to_owned(),
                kind: "bad_name",
                reason: format!("bad job file name: {e}"),
            }),
            Entry::Job(_) => {
                let Ok(meta) = fs::symlink_metadata(queue.join(file_name)) else { return };
                if let Some((kind, reason)) = not_a_file(&meta) {
                    refused.push(Refusal { file_name: file_name.to_owned(), kind, reason });
                    return;
                }
                let state = if renamed_in || old_enough(&meta, self.rules.settle) {
                    State::Complete
                } else {
                    self.settling += 1;
                    State::Settling { scanned: Scanned::of(&meta), since: Instant::now() }
                };
                let seq = self.next_seq;
                self.next_seq += 1;
                self.order.insert(seq, file_name.to_owned());
                self.items.insert(file_name.to_owned(), Item { seq, state });
            }
        }
    }

    /// The entry is gone from the queue (claimed, moved away, deleted).
    pub fn gone(&mut self, file_name: &OsStr) {
        if let Some(item) = self.items.remove(file_name) {
            self.order.remove(&item.seq);
            if matches!(item.state, State::Settling { .. }) {
                self.settling -= 1;
            }
        }
    }

    /// Reads the queue's names: unknown ones are added (by ctime, then name),
    /// known ones that are no longer there are dropped. Known entries are not
    /// stat'ed again.
    pub fn rescan(&mut self, queue: &Path, refused: &mut Vec<Refusal>) -> io::Result<()> {
        let mut present = std::collections::HashSet::with_capacity(self.items.len());
        let mut new = Vec::new();
        for entry in fs::read_dir(queue)? {
            let file_name = entry?.file_name();
            if self.items.contains_key(&file_name) {
                present.insert(file_name);
            } else if !matches!(classify(&file_name), Entry::InProgress) {
                let ctime =
                    fs::symlink_metadata(queue.join(&file_name)).map_or((0, 0), |m| (m.ctime(), m.ctime_nsec()));
                new.push((ctime, file_name));
            }
        }
        let gone: Vec<OsString> = self.items.keys().filter(|k| !present.contains(*k)).cloned().collect();
        for name in gone {
            self.gone(&name);
        }
        new.sort();
        for (_, file_name) in new {
            self.arrived(queue, &file_name, false, refused);
        }
        Ok(())
    }

    /// Looks again at entries still settling: those unchanged for the
    /// settle time become complete, or are refused if their size or links are
    /// wrong. Returns how long until the next one might settle.
    pub fn settle(&mut self, queue: &Path, refused: &mut Vec<Refusal>) -> Option<Duration> {
        if self.settling == 0 {
            return None;
        }
        let settle = self.rules.settle;
        let mut next: Option<Duration> = None;
        let mut gone = Vec::new();
        for (name, item) in self.items.iter_mut() {
            let State::Settling { scanned, since } = item.state else { continue };
            let Ok(meta) = fs::symlink_metadata(queue.join(name)) else {
                gone.push(name.clone());
                continue;
            };
            if let Some((kind, reason)) = not_a_file(&meta) {
                refused.push(Refusal { file_name: name.clone(), kind, reason });
                gone.push(name.clone());
                continue;
            }
            let now = Scanned::of(&meta);
            if now != scanned {
                item.state = State::Settling { scanned: now, since: Instant::now() };
                next = Some(next.map_or(settle, |n| n.min(settle)));
            } else if since.elapsed() >= settle || old_enough(&meta, settle) {
                item.state = State::Complete;
                self.settling -= 1;
                if let Some((kind, reason)) = self.rules.judge(&meta) {
                    refused.push(Refusal { file_name: name.clone(), kind, reason });
                    gone.push(name.clone());
                }
            } else {
                let left = settle.saturating_sub(since.elapsed());
                next = Some(next.map_or(left, |n| n.min(left)));
            }
        }
        for name in gone {
            self.gone(&name);
        }
        next
    }

    /// The first complete entry, in arrival order, that is still a good job
    /// file (one lstat each) and that `leave` does not leave to other hosts;
    /// it leaves the index, as do entries found gone or refused on the way
    /// (those left stay, and are asked about again next time).
    pub fn next_ready(
        &mut self,
        queue: &Path,
        refused: &mut Vec<Refusal>,
        leave: impl Fn(&OsStr) -> bool,
    ) -> Option<Ready> {
        let mut gone = Vec::new();
        let mut ready = None;
        for (_, name) in self.order.iter() {
            let Some(item) = self.items.get(name) else { continue };
            if !matches!(item.state, State::Complete) || leave(name) {
                continue;
            }
            gone.push(name.clone());
            let Ok(meta) = fs::symlink_metadata(queue.join(name)) else { continue };
            let Entry::Job(job) = classify(name) else { continue };
            if let Some((kind, reason)) = not_a_file(&meta).or_else(|| self.rules.judge(&meta)) {
                refused.push(Refusal { file_name: name.clone(), kind, reason });
                continue;
            }
            ready = Some(Ready { file_name: name.clone(), job, scanned: Scanned::of(&meta) });
            break;
        }
        for name in gone {
            self.gone(&name);
        }
        ready
    }
}

impl Rules {
    /// Why a settled regular file is not a job file this host takes, if it is not.
    fn judge(&self, meta: &fs::Metadata) -> Option<(&'static str, String)> {
        if meta.len() < self.min_size {
            Some((
                "too_small",
                format!(
                    "{} bytes is too small: a job file must be at least {} bytes (truncate --size)",
                    meta.len(),
                    self.min_size
                ),
            ))
        } else if meta.len() > self.max_size {
            Some((
                "too_large",
                format!("{} bytes is larger than this host accepts ({} bytes)", meta.len(), self.max_size),
            ))
        } else if meta.nlink() > 1 {
            Some(("hardlinked", format!("hardlinked ({} names): a job file must have exactly one name", meta.nlink())))
        } else {
            None
        }
    }
}

/// Why an entry is not a regular file, if it is not.
fn not_a_file(meta: &fs::Metadata) -> Option<(&'static str, String)> {
    let ft = meta.file_type();
    if ft.is_file() {
        return None;
    }
    let what = if ft.is_symlink() {
        "a symlink"
    } else if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    };
    Some(("not_a_file", format!("{what}: a job must be a regular file")))
}

/// An mtime at least `settle` in the past.
fn old_enough(meta: &fs::Metadata, settle: Duration) -> bool {
    meta.modified().is_ok_and(|m| SystemTime::now().duration_since(m).is_ok_and(|age| age >= settle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    const RULES: Rules = Rules { min_size: 65_536, max_size: 1 << 30, settle: Duration::ZERO };

    fn names(refused: &[Refusal]) -> Vec<String> {
        let mut v: Vec<String> =
            refused.iter().map(|r| format!("{}: {}", r.file_name.to_string_lossy(), r.reason)).collect();
        v.sort();
        v
    }

    #[test]
    fn a_scan_sorts_refuses_and_hands_out_jobs_in_order() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let q = tmp.path();
        let big = vec![0u8; 70_000];
        fs::write(q.join("good_i1.tar.xz"), &big).expect("write");
        fs::write(q.join("small_i1.tar.xz"), b"tiny").expect("write");
        fs::write(q.join("bad name_i1.tar.xz"), &big).expect("write");
        fs::write(q.join(".uploading_i1.tar.xz"), &big).expect("write");
        fs::write(q.join("x_i1.tar.xz.part"), &big).expect("write");
        fs::create_dir(q.join("dir_i1.tar.xz")).expect("mkdir");
        std::os::unix::fs::symlink("/etc/passwd", q.join("link_i1.tar.xz")).expect("symlink");
        let mut p = Pending::new(RULES);
        let mut refused = Vec::new();
        p.rescan(q, &mut refused).expect("scan");
        assert_eq!(p.len(), 2, "good and small wait; the rest is refused or ignored");
        let ready = p.next_ready(q, &mut refused, |_| false).expect("a job");
        assert_eq!(ready.file_name, "good_i1.tar.xz");
        assert_eq!(ready.scanned.size, 70_000);
        assert!(p.next_ready(q, &mut refused, |_| false).is_none());
        let refused = names(&refused);
        assert_eq!(refused.len(), 4, "{refused:?}");
        assert!(refused[0].starts_with("bad name_i1.tar.xz: bad job file name"), "{refused:?}");
        assert!(refused[1].starts_with("dir_i1.tar.xz: a directory"), "{refused:?}");
        assert!(refused[2].starts_with("link_i1.tar.xz: a symlink"), "{refused:?}");
        assert!(refused[3].starts_with("small_i1.tar.xz: 4 bytes is too small"), "{refused:?}");
        assert!(p.is_empty());
    }

    #[test]
    fn arrival_order_wins_over_names_and_a_rename_needs_no_settle() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let q = tmp.path();
        let rules = Rules { settle: Duration::from_secs(3600), ..RULES };
        let mut p = Pending::new(rules);
        let mut refused = Vec::new();
        for name in ["c_i1.tar.xz", "a_i1.tar.xz", "b_i1.tar.xz"] {
            fs::write(q.join(name), vec![0u8; 70_000]).expect("write");
            p.arrived(q, OsStr::new(name), true, &mut refused);
        }
        // Written in place just now: it must settle (an hour here) before anything is judged.
        fs::write(q.join("inplace_i1.tar.xz"), b"still writing").expect("write");
        p.arrived(q, OsStr::new("inplace_i1.tar.xz"), false, &mut refused);
        let order: Vec<OsString> =
            std::iter::from_fn(|| p.next_ready(q, &mut refused, |_| false).map(|r| r.file_name)).collect();
        assert_eq!(order, ["c_i1.tar.xz", "a_i1.tar.xz", "b_i1.tar.xz"]);
        assert!(p.settle(q, &mut refused).is_some_and(|d| d > Duration::from_secs(3000)));
        assert_eq!(p.len(), 1);
        assert!(refused.is_empty(), "a file still being written is not refused as too small: {refused:?}");
        // Claimed elsewhere: gone from the index.
        p.gone(OsStr::new("inplace_i1.tar.xz"));
        assert!(p.is_empty());
    }

    #[test]
    fn a_file_dated_in_the_future_still_settles_and_a_change_starts_the_count_again() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let q = tmp.path();
        let path = q.join("future_i1.tar.xz");
        fs::write(&path, vec![0u8; 70_000]).expect("write");
        let future = SystemTime::now() + Duration::from_secs(365 * 24 * 3600);
        File::options().write(true).open(&path).expect("open").set_modified(future).expect("set mtime");
        // Wide margins: each "still settling" below holds unless this thread stalls for 2 s.
        let rules = Rules { settle: Duration::from_secs(2), ..RULES };
        let mut p = Pending::new(rules);
        let mut refused = Vec::new();
        p.rescan(q, &mut refused).expect("scan");
        assert!(p.settle(q, &mut refused).is_some());
        assert!(p.next_ready(q, &mut refused, |_| false).is_none(), "still settling");
        std::thread::sleep(Duration::from_millis(2100));
        fs::write(&path, vec![1u8; 70_001]).expect("rewrite");
        File::options().write(true).open(&path).expect("open").set_modified(future).expect("set mtime");
        assert!(p.settle(q, &mut refused).is_some(), "changed: the count starts again");
        assert!(p.next_ready(q, &mut refused, |_| false).is_none());
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(p.settle(q, &mut refused), None);
        assert_eq!(p.next_ready(q, &mut refused, |_| false).expect("settled").scanned.size, 70_001);
        assert!(refused.is_empty(), "{refused:?}");
    }

    #[test]
    fn a_rescan_stats_only_new_names_and_drops_vanished_ones() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let q = tmp.path();
        let mut p = Pending::new(RULES);
        let mut refused = Vec::new();
        for i in 0..50 {
            fs::write(q.join(format!("j{i:02}_i1.tar.xz")), vec![0u8; 70_000]).expect("write");
        }
        p.rescan(q, &mut refused).expect("scan");
        assert_eq!(p.len(), 50);
        fs::remove_file(q.join("j07_i1.tar.xz")).expect("rm");
        p.rescan(q, &mut refused).expect("scan");
        assert_eq!(p.len(), 49);
        // Written in one go, in name order: ctime order is name order here.
        let first = p.next_ready(q, &mut refused, |_| false).expect("job").file_name;
        assert_eq!(first, "j00_i1.tar.xz");
    }
}
