//! Landing a finished job's files in `done/`: the one way the host, a
//! lease's delivery and a Slurm attempt put a result in place.
//!
//! ```text
//! done/.<staged log>          ─┐ 1. the log        (its name decides who delivers)
//! done/.<staged provenance>   ─┤ 2. the provenance (a stale one, without a result, is replaced)
//! done/.<staged result>       ─┘ 3. the result, last
//! ```
//!
//! The result is last because a result in `done/` is how everyone sees that
//! a job ended: the server, `status` and the client read a run's log and
//! provenance as soon as its result is there, and the server decides a
//! verified rebuild once, for good. So whoever sees the result sees the
//! files that come with it. Each step is a rename that never replaces, so
//! two deliveries of one name (two hosts, or one repeated after a crash)
//! cannot mix their files: the first to place the log wins, and a loser
//! takes back what it placed.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::JobName;

/// A finished job's files, staged in (or on the filesystem of) `done/`
/// under names no reader takes for a result: a dot-name, or a path outside `done/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Landing {
    /// The job the files are of: it names the places they land in.
    pub job: JobName,
    pub log: Option<PathBuf>,
    pub provenance: Option<PathBuf>,
    pub result: PathBuf,
}

/// How a landing ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Landed {
    /// In place: the result's path in `done/`.
    Done(PathBuf),
    /// A delivery of that name is already there: nothing of ours is in
    /// place, and the staged files are where they were.
    Taken,
}

impl Landing {
    /// The staged files with the names they land as, in landing order.
    fn steps(&self) -> Vec<(&Path, OsString)> {
        let job = &self.job;
        let mut steps = Vec::new();
        if let Some(log) = &self.log {
            steps.push((log.as_path(), OsString::from(job.done_with_extension("log"))));
        }
        if let Some(prov) = &self.provenance {
            steps.push((prov.as_path(), OsString::from(job.done_with_extension(super::PROVENANCE_EXTENSION))));
        }
        steps.push((self.result.as_path(), OsString::from(job.done_file_name())));
        steps
    }

    /// Removes what is still staged (a taken delivery the caller does not keep).
    pub fn discard(&self) {
        for (from, _) in self.steps() {
            let _ = fs::remove_file(from);
        }
    }
}

/// Puts `landing` in place in `done`: the log, then the provenance, then
/// the result, each by a rename that never replaces (see the module's
/// diagram for why in this order). A staged file that is no longer there
/// counts as landed by an earlier call, so a landing repeated after a
/// crash part-way finishes it. When a log or result of that name is
/// already there, what this call placed is taken back and the answer is
/// `Taken`. A provenance of that name with no result beside it is left
/// from a result since collected, and is replaced.
pub fn land(done: &Path, landing: &Landing) -> io::Result<Landed> {
    let steps = landing.steps();
    let mut placed: Vec<(&Path, PathBuf)> = Vec::new();
    let result = done.join(landing.job.done_file_name());
    for (from, name) in &steps {
        let to = done.join(name);
        let mut moved = rename_noreplace(from, &to);
        let is_provenance = landing.provenance.as_deref() == Some(*from);
        if is_provenance && matches!(&moved, Err(e) if e.kind() == io::ErrorKind::AlreadyExists) && !exists(&result) {
            fs::remove_file(&to)?;
            moved = rename_noreplace(from, &to);
        }
        match moved {
            Ok(()) => placed.push((from, to)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                for (from, to) in placed.iter().rev() {
                    rename_noreplace(to, from)?;
                }
                sync_dir(done)?;
                return Ok(Landed::Taken);
            }
            Err(e) => return Err(e),
        }
    }
    sync_dir(done)?;
    Ok(Landed::Done(result))
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// `rename(2)` that never replaces what is at `to`.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        from,
        nix::fcntl::AT_FDCWD,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::{land, Landed, Landing};
    use crate::JobName;
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    use std::fs;
    use std::path::Path;

    fn staged(done: &Path, tag: &str, with_provenance: bool) -> Landing {
        let job = JobName::parse("j_i1.tar.xz").expect("name");
        let at = |what: &str| {
            let p = done.join(format!(".j.{tag}.{what}.tmp"));
            fs::write(&p, format!("{tag} {what}")).expect("stage");
            p
        };
        Landing {
            log: Some(at("log")),
            provenance: with_provenance.then(|| at("provenance")),
            result: at("result"),
            job,
        }
    }

    #[test]
    fn the_result_lands_last_so_whoever_sees_it_sees_its_log_and_provenance() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let done = tmp.path();
        let landing = staged(done, "a", true);
        // What a reader of done/ sees, in order: the names renamed into it.
        let watch = Inotify::init(InitFlags::IN_NONBLOCK).expect("inotify");
        watch.add_watch(done, AddWatchFlags::IN_MOVED_TO).expect("watch");
        assert_eq!(land(done, &landing).expect("land"), Landed::Done(done.join("j_d1.tar.xz")));
        let arrived: Vec<String> = watch
            .read_events()
            .expect("events")
            .into_iter()
            .filter_map(|e| e.name.map(|n| n.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(arrived, ["j_d1.log", "j_d1.intoto.jsonl", "j_d1.tar.xz"]);
        assert_eq!(fs::read_to_string(done.join("j_d1.intoto.jsonl")).expect("prov"), "a provenance");
        // Repeated (a crash before the caller noted it): nothing is left to do, and it says so the same.
        assert_eq!(land(done, &landing).expect("again"), Landed::Done(done.join("j_d1.tar.xz")));
    }

    #[test]
    fn a_second_delivery_of_a_name_takes_nothing_and_mixes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let done = tmp.path();
        let first = staged(done, "a", true);
        let second = staged(done, "b", true);
        assert!(matches!(land(done, &first).expect("first"), Landed::Done(_)));
        assert_eq!(land(done, &second).expect("second"), Landed::Taken);
        for (what, tag) in [("tar.xz", "a"), ("log", "a"), ("intoto.jsonl", "a")] {
            let found = fs::read_to_string(done.join(format!("j_d1.{what}"))).expect("landed");
            assert!(found.starts_with(tag), "{what}: {found}");
        }
        assert!(second.result.exists() && second.log.as_ref().is_some_and(|l| l.exists()), "still staged");
        second.discard();
        assert!(!second.result.exists());

        // A result alone (its log collected) still takes the name: what was placed goes back.
        fs::remove_file(done.join("j_d1.log")).expect("rm");
        let third = staged(done, "c", false);
        assert_eq!(land(done, &third).expect("third"), Landed::Taken);
        assert!(!done.join("j_d1.log").exists() && third.log.as_ref().is_some_and(|l| l.exists()));
    }

    #[test]
    fn a_provenance_left_without_its_result_is_replaced() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let done = tmp.path();
        fs::write(done.join("j_d1.intoto.jsonl"), "stale").expect("stale");
        let landing = staged(done, "a", true);
        assert!(matches!(land(done, &landing).expect("land"), Landed::Done(_)));
        assert_eq!(fs::read_to_string(done.join("j_d1.intoto.jsonl")).expect("prov"), "a provenance");
    }
}
