//! What a job's interrupted runs are counted in, and what a host does at
//! start with the claims it left when it last stopped.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use jobfile::JobName;

use super::delivery::{self, end_delivered, finish_claim, resume_delivery, Resumed};
use super::{fail, requeue, Dirs, Ending};
use crate::files::write_durable;

/// Where the counts of a job's interrupted runs are kept: beside the claim
/// directories, shared by every host, so they survive the job moving around.
/// `kind` is `attempts` (the host died while running it) or `noboot` (its VM
/// did not boot).
pub fn counter_file(dirs: &Dirs, file_name: &OsStr, kind: &str) -> PathBuf {
    let mut name = file_name.to_owned();
    name.push(format!(".{kind}"));
    dirs.running.join(".attempts").join(name)
}

/// Reads a counter (0 when there is none).
pub fn read_counter(dirs: &Dirs, file_name: &OsStr, kind: &str) -> u32 {
    fs::read_to_string(counter_file(dirs, file_name, kind)).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

/// Writes a counter durably.
pub fn write_counter(dirs: &Dirs, file_name: &OsStr, kind: &str, value: u32) -> io::Result<()> {
    let path = counter_file(dirs, file_name, kind);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    write_durable(&path, format!("{value}\n").as_bytes())
}

/// Forgets a job's counters (it has ended).
pub fn forget_counters(dirs: &Dirs, file_name: &OsStr) {
    for kind in ["attempts", "noboot"] {
        let _ = fs::remove_file(counter_file(dirs, file_name, kind));
    }
    // The packages the server pinned for it and its caches' owner: the job has ended.
    jobfile::layout::Terms::remove_run(&dirs.running, file_name);
}

/// Records that a job's VM did not boot; true when this is the first time
/// in a row (the job gets another try, not counted as an attempt).
pub fn note_no_boot(dirs: &Dirs, file_name: &OsStr) -> io::Result<bool> {
    let seen = read_counter(dirs, file_name, "noboot");
    write_counter(dirs, file_name, "noboot", seen + 1)?;
    Ok(seen == 0)
}

/// The job's VM booted: earlier boot failures no longer count.
pub fn forget_no_boot(dirs: &Dirs, file_name: &OsStr) {
    let _ = fs::remove_file(counter_file(dirs, file_name, "noboot"));
}

/// Jobs this host had claimed when it last stopped (it crashed, or was
/// killed). A job whose result it had staged has ended: its delivery is
/// finished and it never runs again. Any other goes back to the queue with
/// one more attempt counted, or to failed/ once it has used them all. The
/// VM directories it left are removed. Each job that ends here is passed to
/// `ended`.
pub fn recover(
    dirs: &Dirs,
    host_id: &str,
    max_attempts: u32,
    mut ended: impl FnMut(&OsStr, io::Result<Ending>),
) -> io::Result<()> {
    let in_dir = |e: io::Error| io::Error::new(e.kind(), format!("cannot read {}: {e}", dirs.host_dir.display()));
    delivery::drop_orphan_notes(dirs).map_err(in_dir)?;
    // Live consoles of the runs that were cut short: their jobs start again.
    for entry in fs::read_dir(&dirs.host_dir).map_err(in_dir)?.flatten() {
        if entry.file_name().as_encoded_bytes().starts_with(b".console.") {
            let _ = fs::remove_file(entry.path());
        }
    }
    for entry in fs::read_dir(&dirs.host_dir).map_err(in_dir)? {
        let name = entry?.file_name();
        if name.as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let label = jobfile::sanitize(name.as_encoded_bytes());
        if let Some(job) = name.to_str().and_then(|n| JobName::parse(n).ok()) {
            let ending = match resume_delivery(dirs, &name, &job)? {
                None => None,
                Some(Resumed::Landed(d)) => {
                    let verdict =
                        "its result was staged before the last stop and has landed now; the job is not run again";
                    Some(end_delivered(dirs, &name, &job, d, verdict.to_owned()))
                }
                Some(Resumed::Ended) => Some(finish_claim(dirs, &name).map(|()| Ending::Done {
                    path: dirs.done.join(job.done_file_name()),
                    verdict: "its result was delivered before the last stop; the job is not run again".to_owned(),
                })),
            };
            if let Some(ending) = ending {
                ended(&name, ending);
                continue;
            }
        }
        let attempts = read_counter(dirs, &name, "attempts") + 1;
        if attempts >= max_attempts {
            let reason = format!(
                "the host stopped {attempts} times while running this job (crashed or was killed); not trying again"
            );
            let path = fail(dirs, &dirs.host_dir.join(&name), &reason, None);
            ended(&name, path.map(|path| Ending::Failed { path, reason }));
            continue;
        }
        write_counter(dirs, &name, "attempts", attempts)?;
        match requeue(dirs, &name) {
            Ok(()) => log::info!("job {label}: unfinished at the last stop (attempt {attempts}); back in the queue"),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let reason = "a job of the same name was queued again while this one was unfinished".to_owned();
                let path = fail(dirs, &dirs.host_dir.join(&name), &reason, None);
                ended(&name, path.map(|path| Ending::Failed { path, reason }));
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("cannot requeue {label}: {e}"))),
        }
    }
    // This host's VM directories, and KVM probes' left by a host killed while probing.
    let prefix = format!("{host_id}.");
    for entry in fs::read_dir(&dirs.work)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let dead_probe = name
            .strip_prefix(".kvm-probe.")
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        if name.starts_with(&prefix) || dead_probe {
            let _ = fs::remove_dir_all(entry.path()).or_else(|_| fs::remove_file(entry.path()));
        }
    }
    Ok(())
}
