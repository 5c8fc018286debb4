//! What the client shows of the server's answers: sanitized, in a few words.

use anyhow::{bail, Result};

/// Text from the server as a person sees it: through the one sanitizer.
pub fn shown(text: &str) -> String {
    jobfile::sanitize(text.as_bytes())
}

pub fn checked_id(id: &str) -> Result<&str> {
    if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(id)
    } else {
        bail!("{:?} is not a job id (16 hex digits, as `construir submit` printed)", jobfile::sanitize(id.as_bytes()))
    }
}

/// One line saying where a job is, sanitized (and, served from the result cache, whose result it is).
pub fn describe(job: &wire::Job) -> String {
    match &job.from_cache {
        Some(hit) => shown(&format!("{} ({})", job.place.describe(), hit.describe())),
        None => shown(&job.place.describe()),
    }
}

/// A verified rebuild's state in a few words, after `describe`'s line.
pub fn rebuild_note(job: &wire::Job) -> String {
    let Some(rebuild) = &job.rebuild else { return String::new() };
    match &rebuild.verdict {
        Some(v) if v.outcome == wire::RebuildOutcome::Differs => {
            format!("; NOT reproducible ({} of {} files differ)", v.differing_total, v.files)
        }
        Some(v) => format!("; {}", v.outcome.as_str().replace('_', " ")),
        None => format!("; second run {}", rebuild.second.name()),
    }
}
