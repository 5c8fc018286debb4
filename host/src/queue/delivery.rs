//! Delivering a finished job into `done/` so that a crash at any point
//! neither loses the result nor runs the job again.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;

use jobfile::layout::{self, Landed, Landing};
use jobfile::JobName;
use nix::fcntl::AtFlags;
use nix::sys::stat::fstatat;
use nix::unistd::{unlinkat, UnlinkatFlags};

use super::{Dirs, Ending};
use crate::files::{self, create_new_at, open_dir, rename_noreplace_at, sync_dirs, write_durable};

/// How a delivery ended.
#[derive(Debug)]
pub enum Delivery {
    /// The result is `done/<name>_d<N>.tar.xz`, its log beside it.
    Done(PathBuf),
    /// A result or log of that name is already there: ours is kept at
    /// `staged` (in `done/`, a dot-name) and its log is handed back.
    Taken { staged: PathBuf, log: Vec<u8> },
}

/// A result and its log staged in `done/` under names unique to one host
/// and attempt, not yet in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub result: OsString,
    pub log: OsString,
    /// Its signed provenance, staged beside it once signed (`None` on a host that does not sign).
    pub provenance: Option<OsString>,
    /// The staged result's inode: once it has landed, the result of that
    /// name is ours only if it still has this inode.
    pub ino: u64,
}

/// Delivering a finished job takes three steps: `stage` the result and its
/// log in `done/`, `note_delivery` beside the claim, `land` them; then the
/// caller ends the claim (`finish_claim`). A host that dies after the note
/// finishes the delivery at its next start (`resume_delivery`) rather than
/// running the job again.
///
/// Stages a finished working copy (`disk_name` in `job_dir`, open as
/// `disk`) and its log in `done/`: trimmed of its zero padding, never longer
/// than `limit` (the claimed size), under dot-names unique to this host and
/// attempt (`tag`). Nothing is in place yet: `land` does that.
#[allow(clippy::too_many_arguments)]
pub fn stage(
    dirs: &Dirs,
    job_dir: &impl AsFd,
    disk_name: &OsStr,
    disk: &File,
    limit: u64,
    job: &JobName,
    log: &[u8],
    tag: &str,
) -> io::Result<Staged> {
    let keep = files::trimmed_len(disk)?.min(limit);
    disk.set_len(keep)?;
    disk.set_permissions(fs::Permissions::from_mode(0o644))?;
    disk.sync_all()?;
    let done = open_dir(&dirs.done)?;
    let result = OsString::from(format!(".{}.{tag}.tmp", job.done_file_name()));
    let ino = match rename_noreplace_at(job_dir, disk_name, &done, &result) {
        Ok(()) => {
            let st = fstatat(&done, result.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
            if st.st_ino != disk.metadata()?.ino() {
                return Err(io::Error::other("the working copy was replaced before delivery"));
            }
            st.st_ino
        }
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            // work/ is on another filesystem: copy from our descriptor, never from a path.
            let copy = create_new_at(&done, &result, 0o644)?;
            files::copy_sparse(disk, &copy, keep)?;
            copy.set_len(keep)?;
            copy.sync_all()?;
            copy.metadata()?.ino()
        }
        Err(e) => return Err(e),
    };
    let staged_log = OsString::from(format!(".{}.{tag}.tmp", job.done_with_extension("log")));
    let mut log_file = create_new_at(&done, &staged_log, 0o644)?;
    log_file.write_all(log)?;
    log_file.sync_all()?;
    File::from(done).sync_all()?;
    Ok(Staged { result, log: staged_log, provenance: None, ino })
}

/// Puts a staged delivery in place without replacing anything, by the
/// queue's one way to land (`jobfile::layout::land`): the log, the
/// provenance, then the result. When a log or result of that name is
/// already there, nothing of ours stays in place: the result is handed back
/// with its log, the provenance dropped. Safe to call again after a crash
/// part-way: what was already placed counts as landed.
pub fn land(dirs: &Dirs, job: &JobName, staged: &Staged) -> io::Result<Delivery> {
    let landing = Landing {
        job: job.clone(),
        log: Some(dirs.done.join(&staged.log)),
        provenance: staged.provenance.as_ref().map(|p| dirs.done.join(p)),
        result: dirs.done.join(&staged.result),
    };
    match layout::land(&dirs.done, &landing)? {
        Landed::Done(path) => Ok(Delivery::Done(path)),
        Landed::Taken => {
            let done = open_dir(&dirs.done)?;
            let log = read_at(&done, &staged.log).unwrap_or_default();
            let _ = unlinkat(&done, staged.log.as_os_str(), UnlinkatFlags::NoRemoveDir);
            if let Some(prov) = &staged.provenance {
                let _ = unlinkat(&done, prov.as_os_str(), UnlinkatFlags::NoRemoveDir);
            }
            File::from(done).sync_all()?;
            Ok(Delivery::Taken { staged: dirs.done.join(&staged.result), log })
        }
    }
}

/// Reads a small file in `dir`, not following a link.
fn read_at(dir: &impl AsFd, name: &OsStr) -> io::Result<Vec<u8>> {
    let fd = nix::fcntl::openat(
        dir,
        name,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let mut data = Vec::new();
    io::Read::read_to_end(&mut File::from(fd), &mut data)?;
    Ok(data)
}

/// Where a host notes, beside a claim, the delivery it has staged for it:
/// `running/<host>/.delivering.<file name>`. Between the result landing in
/// `done/` and the claim's removal, this note is what tells a restarted
/// host that the job has ended and must not run again.
fn delivery_note(dirs: &Dirs, file_name: &OsStr) -> PathBuf {
    let mut name = OsString::from(".delivering.");
    name.push(file_name);
    dirs.host_dir.join(name)
}

/// Records durably that `staged` is the delivery of the claimed `file_name`.
pub fn note_delivery(dirs: &Dirs, file_name: &OsStr, staged: &Staged) -> io::Result<()> {
    let mut text = format!("{}\n{}\n{}\n", staged.ino, staged.result.to_string_lossy(), staged.log.to_string_lossy());
    if let Some(prov) = &staged.provenance {
        text.push_str(&format!("{}\n", prov.to_string_lossy()));
    }
    write_durable(&delivery_note(dirs, file_name), text.as_bytes())
}

/// The delivery a host noted for a claim before it stopped, if any.
pub fn noted_delivery(dirs: &Dirs, file_name: &OsStr) -> Option<Staged> {
    let text = fs::read_to_string(delivery_note(dirs, file_name)).ok()?;
    let mut lines = text.lines();
    let ino = lines.next()?.parse().ok()?;
    let (result, log, provenance) = (lines.next()?, lines.next()?, lines.next());
    // Only names of the shape `stage` makes: a dot-name in done/, nothing else.
    let ours = |n: &str| n.starts_with('.') && n.ends_with(".tmp") && !n.contains('/');
    let provenance = match provenance {
        Some(p) if !ours(p) => return None,
        p => p.map(OsString::from),
    };
    (ours(result) && ours(log)).then(|| Staged { result: result.into(), log: log.into(), provenance, ino })
}

/// The claim and its delivery note are gone: the job has ended.
pub fn finish_claim(dirs: &Dirs, file_name: &OsStr) -> io::Result<()> {
    fs::remove_file(dirs.host_dir.join(file_name))?;
    match fs::remove_file(delivery_note(dirs, file_name)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    sync_dirs(&[&dirs.host_dir])
}

/// Forgets a delivery note whose staged result is gone (the job runs again).
pub fn drop_delivery_note(dirs: &Dirs, file_name: &OsStr) -> io::Result<()> {
    match fs::remove_file(delivery_note(dirs, file_name)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// What a restarted host found of a delivery it had staged.
#[derive(Debug)]
pub enum Resumed {
    /// The staged result was still there; it has landed now (or was taken).
    Landed(Delivery),
    /// Nothing staged is left: the result landed (and may since have been
    /// collected from `done/`) or was set aside in `failed/` before the stop.
    Ended,
}

/// At start-up, for a claim this host left: if it had staged a delivery for
/// it, the job has run and must not run again; what is left of the delivery
/// is finished. `None` when no delivery was staged: the job goes back to the
/// queue as any interrupted one.
pub fn resume_delivery(dirs: &Dirs, file_name: &OsStr, job: &JobName) -> io::Result<Option<Resumed>> {
    let Some(mut staged) = noted_delivery(dirs, file_name) else {
        drop_delivery_note(dirs, file_name)?;
        return Ok(None);
    };
    if staged.provenance.is_none() {
        staged.provenance = provenance_by_tag(dirs, job, &staged);
    }
    let done = open_dir(&dirs.done)?;
    let exists = |name: &OsStr| fstatat(&done, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok();
    let in_place = fstatat(&done, job.done_file_name().as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|st| st.st_ino == staged.ino);
    if exists(&staged.result) || (in_place && exists(&staged.log)) {
        return Ok(Some(Resumed::Landed(land(dirs, job, &staged)?)));
    }
    // The result landed (a host before this one landed it first) and was
    // collected before its log and provenance could follow.
    let provenance = jobfile::layout::PROVENANCE_EXTENSION;
    for (from, ext) in [(Some(&staged.log), "log"), (staged.provenance.as_ref(), provenance)] {
        let Some(from) = from.filter(|f| exists(f)) else { continue };
        match rename_noreplace_at(&done, from, &done, OsStr::new(&job.done_with_extension(ext))) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    File::from(done).sync_all()?;
    Ok(Some(Resumed::Ended))
}

/// The provenance a host before notes named it staged beside `staged`: the
/// result's tag, on the provenance's name (`.<name>_d<N>.intoto.jsonl.<tag>.tmp`),
/// when it is there.
fn provenance_by_tag(dirs: &Dirs, job: &JobName, staged: &Staged) -> Option<OsString> {
    let prefix = format!(".{}.", job.done_file_name());
    let tag = staged.result.to_str()?.strip_prefix(&prefix)?.strip_suffix(".tmp")?;
    let name = format!(".{}.{tag}.tmp", job.done_with_extension(jobfile::layout::PROVENANCE_EXTENSION));
    dirs.done.join(&name).exists().then(|| name.into())
}

/// Delivery notes whose claim is gone (the host stopped between the two
/// removals): dropped, so a later claim of the same name is not taken for
/// delivered.
pub fn drop_orphan_notes(dirs: &Dirs) -> io::Result<()> {
    for entry in fs::read_dir(&dirs.host_dir)? {
        let name = entry?.file_name();
        if let Some(claim) = name.as_encoded_bytes().strip_prefix(b".delivering.") {
            let claim = OsStr::from_bytes(claim);
            if fs::symlink_metadata(dirs.host_dir.join(claim)).is_err() {
                fs::remove_file(dirs.host_dir.join(&name))?;
            }
        }
    }
    Ok(())
}

/// Ends a claim whose result was staged and landed (or found taken): the
/// claim and its delivery note go. A result that found `done/<name>` taken
/// goes to failed/ in place of the input, with its log, so both are kept.
pub fn end_delivered(
    dirs: &Dirs,
    file_name: &OsStr,
    job: &JobName,
    delivery: Delivery,
    verdict: String,
) -> io::Result<Ending> {
    let ending = match delivery {
        Delivery::Done(path) => Ending::Done { path, verdict },
        Delivery::Taken { staged, log } => {
            let reason = format!(
                "done/{} (or its log) already exists; this result was not delivered there",
                job.done_file_name()
            );
            let path = super::fail_as(dirs, &staged, OsStr::new(&job.done_file_name()), &reason, Some(&log))?;
            Ending::Failed { path, reason }
        }
    };
    finish_claim(dirs, file_name)?;
    Ok(ending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::rename_noreplace;
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    fn dirs(root: &Path) -> Dirs {
        Dirs::for_test(root)
    }

    /// The worker's three steps, for a claim of `job`'s input name, its
    /// working copy `disk` in `work`.
    fn deliver(
        d: &Dirs,
        (work, disk): (&impl AsFd, &File),
        limit: u64,
        job: &JobName,
        log: &[u8],
        tag: &str,
    ) -> io::Result<Delivery> {
        let staged = stage(d, work, OsStr::new("disk"), disk, limit, job, log, tag)?;
        note_delivery(d, OsStr::new(&job.input_file_name()), &staged)?;
        land(d, job, &staged)
    }

    #[test]
    fn a_host_that_died_during_delivery_finishes_it_at_restart_and_never_runs_the_job_again() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = dirs(tmp.path());
        let job = JobName::parse("j_i1.tar.xz").expect("name");
        let claim = OsStr::new("j_i1.tar.xz");
        let work = open_dir(&d.work).expect("work");
        let (result, log) = (d.done.join("j_d1.tar.xz"), d.done.join("j_d1.log"));
        let staged_for = |tag: &str, data: &[u8]| {
            fs::write(d.host_dir.join(claim), b"input").expect("claim");
            let disk = create_new_at(&work, OsStr::new("disk"), 0o600).expect("create");
            disk.write_all_at(data, 0).expect("write");
            let staged = stage(&d, &work, OsStr::new("disk"), &disk, 1 << 20, &job, b"the log\n", tag).expect("stage");
            note_delivery(&d, claim, &staged).expect("note");
            staged
        };
        let finish = |expect: &[u8]| {
            match resume_delivery(&d, claim, &job).expect("resume") {
                Some(Resumed::Landed(Delivery::Done(path))) => assert_eq!(path, result),
                // Both had landed: nothing left to do but end the claim.
                Some(Resumed::Ended) => assert!(result.exists() && log.exists()),
                other => panic!("{other:?}"),
            }
            finish_claim(&d, claim).expect("finish");
            assert_eq!(fs::read(&result).expect("result"), expect);
            assert_eq!(fs::read(&log).expect("log"), b"the log\n");
            assert_eq!(fs::read_dir(&d.host_dir).expect("ls").count(), 0, "claim and note gone");
            assert_eq!(fs::read_dir(&d.done).expect("ls").count(), 2, "nothing staged is left");
            fs::remove_file(&result).expect("rm");
            fs::remove_file(&log).expect("rm");
        };

        // Died after staging, before anything landed: the staged result lands.
        staged_for("h.1", b"one");
        finish(b"one\0");
        // Died after the log landed, before the result.
        let staged = staged_for("h.6", b"six");
        rename_noreplace(&d.done.join(&staged.log), &log).expect("as if landed");
        finish(b"six\0");
        // Died after the result landed, before its log (as a host before this one landed them).
        let staged = staged_for("h.2", b"two");
        rename_noreplace(&d.done.join(&staged.result), &result).expect("as if landed");
        finish(b"two\0");
        // Died after both landed, before the claim went.
        let staged = staged_for("h.3", b"three");
        land(&d, &job, &staged).expect("land");
        finish(b"three\0\0\0");

        // Died after landing, and the result was collected from done/ before
        // the restart: the job has still ended, and its log follows.
        let staged = staged_for("h.4", b"four");
        rename_noreplace(&d.done.join(&staged.result), &result).expect("as if landed");
        fs::remove_file(&result).expect("collected");
        assert!(matches!(resume_delivery(&d, claim, &job).expect("resume"), Some(Resumed::Ended)));
        finish_claim(&d, claim).expect("finish");
        assert_eq!(fs::read(&log).expect("log"), b"the log\n");
        fs::remove_file(&log).expect("rm");

        // Died after the result was set aside in failed/ (its name was taken).
        let staged = staged_for("h.5", b"five");
        fs::write(&result, b"another host's").expect("other");
        match land(&d, &job, &staged).expect("land") {
            Delivery::Taken { staged, .. } => fs::rename(staged, d.failed.join("j_d1.tar.xz")).expect("aside"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(resume_delivery(&d, claim, &job).expect("resume"), Some(Resumed::Ended)));
        assert_eq!(fs::read(&result).expect("kept"), b"another host's");

        // No note: an ordinary interrupted job, run again.
        assert!(resume_delivery(&d, OsStr::new("other_i1.tar.xz"), &job).expect("resume").is_none());
        // A forged note cannot name a file outside done/'s dot-names.
        fs::write(d.host_dir.join(".delivering.j_i1.tar.xz"), "1\n../../etc/passwd\n.x.tmp\n").expect("forge");
        assert!(noted_delivery(&d, claim).is_none());
        // A note whose claim is gone is dropped at start-up.
        fs::remove_file(d.host_dir.join(claim)).expect("rm");
        drop_orphan_notes(&d).expect("orphans");
        assert_eq!(fs::read_dir(&d.host_dir).expect("ls").count(), 0);
    }

    /// A working copy named `disk` in `work`, holding `data`.
    fn disk_with(work: &impl AsFd, data: &[u8]) -> File {
        let disk = create_new_at(work, OsStr::new("disk"), 0o600).expect("create");
        disk.write_all_at(data, 0).expect("write");
        disk
    }

    #[test]
    fn a_host_lands_its_provenance_with_its_result_and_after_a_crash_too() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = dirs(tmp.path());
        let job = JobName::parse("j_i1.tar.xz").expect("name");
        let work = open_dir(&d.work).expect("work");
        let claim = OsStr::new("j_i1.tar.xz");
        for tag in ["h.1", "h.2"] {
            fs::write(d.host_dir.join(claim), b"input").expect("claim");
            let disk = disk_with(&work, b"data");
            let mut staged = stage(&d, &work, OsStr::new("disk"), &disk, 1 << 20, &job, b"log\n", tag).expect("stage");
            // As the worker signs it: staged beside the result, under the result's tag.
            let prov = OsString::from(format!(".j_d1.intoto.jsonl.{tag}.tmp"));
            fs::write(d.done.join(&prov), tag).expect("provenance");
            staged.provenance = Some(prov);
            note_delivery(&d, claim, &staged).expect("note");
            assert_eq!(noted_delivery(&d, claim).as_ref(), Some(&staged), "the note names all three");
            if tag == "h.1" {
                assert!(matches!(land(&d, &job, &staged).expect("land"), Delivery::Done(_)));
            } else {
                // The host died before it landed anything: the restart lands all three.
                assert!(matches!(resume_delivery(&d, claim, &job).expect("resume"), Some(Resumed::Landed(_))));
            }
            finish_claim(&d, claim).expect("finish");
            assert_eq!(fs::read_to_string(d.done.join("j_d1.intoto.jsonl")).expect("provenance"), tag);
            for landed in ["j_d1.tar.xz", "j_d1.log", "j_d1.intoto.jsonl"] {
                fs::remove_file(d.done.join(landed)).expect("collected");
            }
            assert_eq!(fs::read_dir(&d.done).expect("ls").count(), 0, "nothing staged is left");
        }
    }

    #[test]
    fn deliver_trims_caps_at_the_claimed_size_and_never_replaces() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = dirs(tmp.path());
        let job = JobName::parse("j_i1.tar.xz").expect("name");
        let work = open_dir(&d.work).expect("work");
        let disk = disk_with(&work, b"data!\0\0\0\0\0\0\0\0\0");
        let out = match deliver(&d, (&work, &disk), 1 << 20, &job, b"log\n", "h.1").expect("deliver") {
            Delivery::Done(path) => path,
            other => panic!("{other:?}"),
        };
        // Trailing zeros go, up to a whole 4-byte unit.
        assert_eq!(fs::read(&out).expect("read"), b"data!\0\0\0");
        assert_eq!(fs::read(d.done.join("j_d1.log")).expect("log"), b"log\n");

        // A second result of the same name is kept aside, and the first result and log stay as they were.
        let disk = disk_with(&work, b"second");
        match deliver(&d, (&work, &disk), 1 << 20, &job, b"log2\n", "h.2").expect("deliver") {
            Delivery::Taken { staged, log } => {
                assert_eq!(fs::read(staged).expect("kept"), b"second\0\0");
                assert_eq!(log, b"log2\n", "the log comes back with the result kept aside");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fs::read(&out).expect("read"), b"data!\0\0\0");
        assert_eq!(fs::read(d.done.join("j_d1.log")).expect("log"), b"log\n");

        // A log already there (no result): the result is taken back, not paired with it.
        fs::remove_file(&out).expect("rm");
        let disk = disk_with(&work, b"third");
        assert!(matches!(
            deliver(&d, (&work, &disk), 1 << 20, &job, b"log3\n", "h.3").expect("deliver"),
            Delivery::Taken { .. }
        ));
        assert!(!out.exists());
        assert_eq!(fs::read(d.done.join("j_d1.log")).expect("log"), b"log\n");

        // A working copy grown past the claimed size is cut back to it.
        fs::remove_file(d.done.join("j_d1.log")).expect("rm");
        let disk = disk_with(&work, &[7u8; 4096]);
        let out = match deliver(&d, (&work, &disk), 1024, &job, b"log\n", "h.4").expect("deliver") {
            Delivery::Done(path) => path,
            other => panic!("{other:?}"),
        };
        assert_eq!(fs::metadata(out).expect("stat").len(), 1024);
        let leftovers: Vec<_> = fs::read_dir(&d.done)
            .expect("ls")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert_eq!(leftovers.len(), 2, "the two results kept aside, no staged logs: {leftovers:?}");
    }
}
