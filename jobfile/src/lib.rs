//! The construir job file, shared by the host and the guest.
//!
//! A job file is `<name>_i<image>.tar.xz`: one xz stream holding a tar
//! archive, then zero bytes up to the file's length, which is the job's
//! output capacity. This crate names, reads, safely unpacks and packs such
//! files; see `docs/DESIGN.md` for the contract.

pub mod arch;
pub mod caches;
pub mod cmdline;
pub mod command;
pub mod debug;
pub mod deps;
pub mod ext4;
pub mod fallback;
pub mod image;
pub mod jobenv;
pub mod layout;
#[cfg(feature = "cli")]
pub mod manual;
pub mod name;
pub mod pack;
pub mod rebuild;
pub mod stages;
pub mod status;
pub mod tar_entry;
pub mod tar_reader;
pub mod tar_strict;
pub mod tardiff;
pub mod terminal;
pub mod text;
pub mod tools;
pub mod units;
pub mod unpack;
pub mod xz;
pub mod zero;

use std::io::Read;

pub use name::{JobName, NameError, Stage};
pub use pack::{pack_dir, pack_onto, PackError, PackOptions, PackReport};
pub use status::{JobStatus, Outcome};
pub use tar_entry::{ArchiveError, Kind};
pub use tar_reader::{ArchiveReader, Header, ReadLimits};
pub use text::sanitize;

/// Bytes in lowercase hex (how every sha256 here is written).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
pub use unpack::{unpack, UnpackError, UnpackOptions, UnpackReport};
pub use xz::{EncodeOptions, XzError, XzReader};

/// The script every job runs, relative to `/job`.
pub const JOB_SCRIPT: &str = "bin/construir";
/// The job's captured stdout and stderr, relative to `/job`.
pub const OUTPUT_FILE: &str = "job_output.txt";
/// The status record, relative to `/job`.
pub const STATUS_FILE: &str = "job_status.json";
/// The smallest job file accepted: the fallback archive must always fit.
pub const MIN_JOB_SIZE: u64 = fallback::FALLBACK_MAX;

/// Opens the archive in a job file (or any reader of one): xz with a memory limit, then tar.
pub fn read_job<R: Read>(input: R, memlimit: u64) -> Result<ArchiveReader<XzReader<R>>, XzError> {
    Ok(ArchiveReader::new(XzReader::new(input, memlimit)?))
}

/// Largest `job_status.json` a result's reader takes.
pub const MAX_STATUS: u64 = 64 << 10;

/// What reading a result's status may cost: 16 MiB of archive and 10 s.
pub const STATUS_LIMITS: ReadLimits = ReadLimits::new(16 << 20, std::time::Duration::from_secs(10));

/// The status of a result whose first entry is `job_status.json`, as
/// construir-init always packs it; `None` for anything else. Bounded by
/// `STATUS_LIMITS`: a guest may have written anything.
pub fn read_status<R: Read>(input: R) -> Option<JobStatus> {
    let mut archive = read_job(input, xz::DEFAULT_MEMLIMIT).ok()?.with_limits(STATUS_LIMITS);
    let h = archive.next_entry().ok()??;
    if h.kind != Kind::File || !path_is(&h.path, STATUS_FILE) || h.size > MAX_STATUS {
        return None;
    }
    let mut raw = Vec::new();
    archive.data().take(MAX_STATUS).read_to_end(&mut raw).ok()?;
    serde_json::from_slice(&raw).ok()
}

/// An error and its sources on one line, `outer: inner: innermost`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// True when an archive path names `want` (`./bin/construir` names `bin/construir`).
pub fn path_is(path: &[u8], want: &str) -> bool {
    unpack::split_path(path).is_ok_and(|comps| comps.join(&b'/') == want.as_bytes())
}
