//! The submitter's tools: make a job file, and read a result safely.
//!
//! A result comes out of a VM that ran a stranger's code, so every command
//! here treats it as hostile: bounded decoding, safe extraction, and text
//! escaped before it reaches a terminal.

use std::fs::{self, File};
use std::io::{self, BufWriter, IsTerminal, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::text::{Mode, Sanitizer};
use crate::units::human_size;
use crate::xz::{EncodeOptions, DEFAULT_MEMLIMIT};
use crate::{
    path_is, sanitize, ArchiveError, JobName, NameError, PackError, PackOptions, ReadLimits, UnpackError,
    UnpackOptions, UnpackReport,
};

/// Largest `job_status.json` we read.
const MAX_STATUS: u64 = 1 << 20;

/// What `job log`, `job list` and `job unpack` may read by default: bytes
/// the archive produces (holes of sparse files included), and time.
pub fn default_limits(command: &str) -> ReadLimits {
    match command {
        "log" => ReadLimits::new(1 << 30, Duration::from_secs(600)),
        "list" => ReadLimits::new(64 << 30, Duration::from_secs(600)),
        _ => ReadLimits::new(64 << 30, Duration::from_secs(3600)),
    }
}

#[derive(Debug, Error)]
pub enum JobToolError {
    #[error("{dir} is not a directory")]
    NotADirectory { dir: PathBuf },
    #[error("{dir} has no bin/construir: every job needs that script")]
    NoScript { dir: PathBuf },
    #[error("{dir}/bin/construir is not a regular file or a symlink")]
    ScriptNotAFile { dir: PathBuf },
    #[error("cannot derive a job name from {dir}; give one with --name")]
    NoName { dir: PathBuf },
    #[error("{name:?} is not a valid job name (use --name)")]
    BadName { name: String, source: NameError },
    #[error("{image:?} is not a valid image number")]
    BadImage { image: String, source: NameError },
    #[error("--size {size} is below the minimum of 64 KiB (the job file must hold at least the fallback result)")]
    SizeTooSmall { size: u64 },
    #[error("the packed job needs {}{needed} bytes ({}), more than --size {size} ({}); use a larger --size", if *estimated { "about " } else { "" }, human_size(*needed), human_size(*size))]
    TooLarge { needed: u64, size: u64, estimated: bool },
    #[error("{path} already exists (use --force to replace it)")]
    Exists { path: PathBuf },
    #[error("cannot pack {dir}")]
    Pack { dir: PathBuf, source: PackError },
    #[error("cannot write {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot open {path}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: ArchiveError },
    #[error("{path} has no {member} (has the job run yet?)")]
    Missing { path: PathBuf, member: &'static str },
    #[error("{path}: {member} is larger than {limit} bytes")]
    MemberTooLarge { path: PathBuf, member: &'static str, limit: u64 },
    #[error("{path}: job_status.json is not valid JSON")]
    BadStatus { path: PathBuf, source: serde_json::Error },
    #[error("{dir} exists and is not empty; unpack into a new or empty directory")]
    DirNotEmpty { dir: PathBuf },
    #[error("cannot unpack {path} into {dir}")]
    Unpack { path: PathBuf, dir: PathBuf, source: UnpackError },
    #[error("cannot write to standard output")]
    Stdout(#[source] io::Error),
    #[error("{dir}: the job's dependencies")]
    Deps { dir: PathBuf, source: crate::deps::DepsError },
    #[error(
        "{dir} already has construir.toml: declare the packages there, or leave out --packages and --debian-control"
    )]
    DeclarationExists { dir: PathBuf },
}

/// How the host's console log of a job ends: this, then its verdict.
pub const VERDICT_PREFIX: &str = "construir-host: verdict: ";

/// The verdict a host ended a job's console log with (read from the last
/// 8 KiB of `log`, sanitized); `None` without a log or a verdict.
pub fn log_verdict(log: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    // Never through a link, never blocking on a FIFO: only a regular file is a log.
    let mut f = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(log).ok()?;
    let meta = f.metadata().ok()?;
    if !meta.file_type().is_file() {
        return None;
    }
    let len = meta.len();
    f.seek(SeekFrom::Start(len.saturating_sub(8192))).ok()?;
    let mut tail = Vec::new();
    f.take(8192).read_to_end(&mut tail).ok()?;
    let tail = String::from_utf8_lossy(&tail);
    tail.lines().rev().find_map(|l| l.strip_prefix(VERDICT_PREFIX)).map(|v| sanitize(v.as_bytes()))
}

/// What `job pack` needs; also the command-line options of every program
/// that packs (`construir-host job pack`, `construir pack`).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct PackRequest {
    /// The job directory (it must hold bin/construir).
    pub dir: PathBuf,
    /// Base image number to run on (images/i<N>).
    #[cfg_attr(feature = "cli", arg(long, value_name = "N"))]
    pub image: String,
    /// File size, which is also how much output the job may return: 10M, 500K, 1G
    /// (powers of 1024; rounded up to 512 bytes; at least 64K).
    #[cfg_attr(feature = "cli", arg(long, value_name = "SIZE", value_parser = crate::units::size_arg))]
    pub size: u64,
    /// Job name [default: DIR's name].
    #[cfg_attr(feature = "cli", arg(long))]
    pub name: Option<String>,
    /// Directory to write the job file into.
    #[cfg_attr(feature = "cli", arg(long, value_name = "DIR", default_value = "."))]
    pub out: PathBuf,
    /// xz preset, 0 (fastest) to 9 (smallest).
    #[cfg_attr(feature = "cli", arg(long = "xz-preset", default_value_t = crate::xz::DEFAULT_PRESET, value_parser = clap::value_parser!(u32).range(0..=9)))]
    pub preset: u32,
    /// Replace an existing job file of the same name.
    #[cfg_attr(feature = "cli", arg(long))]
    pub force: bool,
    /// Debian packages the job needs, as relations: `libssl-dev,pkg-config (>= 1.8),cmake | cmake-mozilla`
    /// (comma-separated or repeated); written to construir.toml. The host installs them before the job runs.
    #[cfg_attr(feature = "cli", arg(long = "packages", value_name = "RELATIONS", value_delimiter = ','))]
    pub packages: Vec<String>,
    /// Also install the build dependencies of this debian/control inside DIR (Build-Depends, -Arch, -Indep).
    #[cfg_attr(feature = "cli", arg(long, value_name = "PATH"))]
    pub debian_control: Option<String>,
    /// Build caches the job uses, each mounted at /cache/NAME in the VM and kept between its
    /// jobs when it ends ok (comma-separated or repeated; e.g. ccache, cargo, pip); written to construir.toml.
    #[cfg_attr(feature = "cli", arg(long = "cache", value_name = "NAME", value_delimiter = ','))]
    pub caches: Vec<String>,
    /// When the job does not end ok, keep its VM up for a shell in it (`construir-host debug FILE`,
    /// `construir debug ID`); written to construir.toml as `debug = true`.
    #[cfg_attr(feature = "cli", arg(long))]
    pub debug: bool,
}

impl PackRequest {
    /// Whether the flags say what goes into `construir.toml` (else DIR's own file, if any, is used).
    fn declares(&self) -> bool {
        !self.packages.is_empty() || self.debian_control.is_some() || !self.caches.is_empty() || self.debug
    }

    /// Whether `--debug` is the only flag that says what goes into `construir.toml`.
    fn only_debug(&self) -> bool {
        self.debug && self.packages.is_empty() && self.debian_control.is_none() && self.caches.is_empty()
    }

    /// What `pack` writes as `construir.toml`, if anything: from the flags,
    /// or DIR's own file (checked); never both.
    fn declaration(&self) -> Result<Option<String>, JobToolError> {
        let deps_err = |source| JobToolError::Deps { dir: self.dir.clone(), source };
        let own = self.dir.join(crate::deps::DECLARATION);
        let has_own = fs::symlink_metadata(&own).is_ok();
        if !self.declares() {
            if !has_own {
                return Ok(None);
            }
            let mut text = String::new();
            File::open(&own)
                .and_then(|f| f.take(crate::deps::MAX_DECLARATION + 1).read_to_string(&mut text))
                .map_err(|source| JobToolError::Open { path: own.clone(), source })?;
            let d = crate::deps::Declaration::parse(&text).map_err(deps_err)?;
            self.check_control(&d)?;
            return Ok(Some(text));
        }
        if has_own && self.only_debug() {
            // DIR's own file, with `debug = true` added.
            let mut text = String::new();
            File::open(&own)
                .and_then(|f| f.take(crate::deps::MAX_DECLARATION + 1).read_to_string(&mut text))
                .map_err(|source| JobToolError::Open { path: own.clone(), source })?;
            let mut d = crate::deps::Declaration::parse(&text).map_err(deps_err)?;
            self.check_control(&d)?;
            d.debug = true;
            return Ok(Some(d.to_toml()));
        }
        if has_own {
            return Err(JobToolError::DeclarationExists { dir: self.dir.clone() });
        }
        let d = crate::deps::Declaration {
            packages: self.packages.iter().map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()).collect(),
            debian_control: self.debian_control.clone(),
            caches: self.caches.iter().map(|c| c.trim().to_owned()).filter(|c| !c.is_empty()).collect(),
            debug: self.debug,
        };
        let text = d.to_toml();
        crate::deps::Declaration::parse(&text).map_err(deps_err)?;
        self.check_control(&d)?;
        Ok(Some(text))
    }

    /// The `debian/control` a declaration names is in DIR and says what it must.
    fn check_control(&self, d: &crate::deps::Declaration) -> Result<(), JobToolError> {
        let Some(rel) = &d.debian_control else { return Ok(()) };
        let path = self.dir.join(rel);
        let mut text = String::new();
        File::open(&path)
            .and_then(|f| f.take(crate::deps::MAX_CONTROL + 1).read_to_string(&mut text))
            .map_err(|source| JobToolError::Open { path: path.clone(), source })?;
        crate::deps::build_depends(rel, &text)
            .map(drop)
            .map_err(|source| JobToolError::Deps { dir: self.dir.clone(), source })
    }
}

/// The result of `job pack`.
#[derive(Debug, Clone)]
pub struct Packed {
    pub path: PathBuf,
    pub compressed: u64,
    pub size: u64,
    /// Warnings for the submitter (non-executable script, skipped entries).
    pub warnings: Vec<String>,
}

/// Makes `<out>/<name>_i<image>.tar.xz`: the packed directory, padded
/// sparsely to `size` (rounded up to a whole 512-byte sector). It is written
/// under a temporary dot-name and renamed, so a queue never sees half a file.
pub fn pack(req: &PackRequest) -> Result<Packed, JobToolError> {
    let dir = &req.dir;
    let meta = fs::metadata(dir).map_err(|source| JobToolError::Open { path: dir.clone(), source })?;
    if !meta.is_dir() {
        return Err(JobToolError::NotADirectory { dir: dir.clone() });
    }
    let mut warnings = Vec::new();
    match fs::symlink_metadata(dir.join(crate::JOB_SCRIPT)) {
        Err(_) => return Err(JobToolError::NoScript { dir: dir.clone() }),
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 == 0 => {
            warnings.push("bin/construir is not executable; the guest will run it with /bin/sh".to_owned());
        }
        Ok(m) if m.is_file() || m.file_type().is_symlink() => {}
        Ok(_) => return Err(JobToolError::ScriptNotAFile { dir: dir.clone() }),
    }
    let name = match &req.name {
        Some(n) => n.clone(),
        None => fs::canonicalize(dir)
            .ok()
            .and_then(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
            .ok_or_else(|| JobToolError::NoName { dir: dir.clone() })?,
    };
    crate::name::check_name(&name).map_err(|source| JobToolError::BadName { name: name.clone(), source })?;
    let job = JobName::new(&name, &req.image)
        .map_err(|source| JobToolError::BadImage { image: req.image.clone(), source })?;
    if req.size < crate::MIN_JOB_SIZE {
        return Err(JobToolError::SizeTooSmall { size: req.size });
    }
    let size = req.size.div_ceil(512) * 512;
    // construir.toml goes first: the host reads it without unpacking the rest.
    let declaration = req.declaration()?;

    let path = req.out.join(job.input_file_name());
    if !req.force && fs::symlink_metadata(&path).is_ok() {
        return Err(JobToolError::Exists { path });
    }
    let tmp = req.out.join(format!(".{}.tmp", job.input_file_name()));
    let write_err = |source| JobToolError::Write { path: tmp.clone(), source };
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(|source| JobToolError::Write { path: tmp.clone(), source })?;
    let result = (|| {
        let tmp_meta = file.metadata().map_err(write_err)?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let opts = PackOptions {
            encode: EncodeOptions { preset: req.preset, threads },
            exclude: Some((tmp_meta.dev(), tmp_meta.ino())),
            prepend: match &declaration {
                Some(text) if req.declares() => {
                    vec![(crate::deps::DECLARATION.into(), text.clone().into_bytes())]
                }
                _ => Vec::new(),
            },
            // Then the top directory of the debian/control it names: hosts read no further than their bound for it.
            first: match &declaration {
                Some(text) => {
                    let control = crate::deps::Declaration::parse(text).ok().and_then(|d| d.debian_control);
                    let top =
                        control.as_deref().and_then(|c| c.trim_start_matches("./").split('/').next()).map(Into::into);
                    let declaration = (!req.declares()).then(|| crate::deps::DECLARATION.into());
                    declaration.into_iter().chain(top).collect()
                }
                None => Vec::new(),
            },
        };
        let (report, buffered) = crate::pack_dir(dir, BufWriter::new(&file), size, &opts).map_err(|e| match e {
            PackError::TooLarge { needed, estimated, .. } => JobToolError::TooLarge { needed, size, estimated },
            source => JobToolError::Pack { dir: dir.clone(), source },
        })?;
        drop(buffered);
        for (entry, why) in &report.skipped {
            warnings.push(format!("left out {entry}: {why}"));
        }
        file.set_len(size).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
        fs::rename(&tmp, &path).map_err(|source| JobToolError::Write { path: path.clone(), source })?;
        File::open(&req.out)
            .and_then(|d| d.sync_all())
            .map_err(|source| JobToolError::Write { path: req.out.clone(), source })?;
        Ok(report.compressed_len)
    })();
    match result {
        Ok(compressed) => Ok(Packed { path, compressed, size, warnings }),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn open_archive(path: &Path, limits: ReadLimits) -> Result<crate::ArchiveReader<crate::XzReader<File>>, JobToolError> {
    let file = File::open(path).map_err(|source| JobToolError::Open { path: path.to_owned(), source })?;
    crate::read_job(file, DEFAULT_MEMLIMIT)
        .map(|archive| archive.with_limits(limits))
        .map_err(|e| JobToolError::Read { path: path.to_owned(), source: ArchiveError::Xz(e) })
}

/// Streams one member of a result to `out`, or fails if it is not there.
fn copy_member(
    path: &Path,
    member: &'static str,
    out: &mut dyn Write,
    limit: Option<u64>,
    limits: ReadLimits,
) -> Result<u64, JobToolError> {
    let read_err = |source| JobToolError::Read { path: path.to_owned(), source };
    let mut archive = open_archive(path, limits)?;
    while let Some(h) = archive.next_entry().map_err(read_err)? {
        if h.kind != crate::Kind::File || !path_is(&h.path, member) {
            continue;
        }
        if let Some(limit) = limit.filter(|&l| h.size > l) {
            return Err(JobToolError::MemberTooLarge { path: path.to_owned(), member, limit });
        }
        let copied = io::copy(&mut archive.data(), out).map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => read_err(ArchiveError::from(e)),
            _ => JobToolError::Stdout(e),
        })?;
        return Ok(copied);
    }
    Err(JobToolError::Missing { path: path.to_owned(), member })
}

/// `job log`: the job's output. On a terminal it goes through the one
/// sanitizer (newlines and tabs kept), so hostile output cannot drive the
/// terminal; into a pipe or file it is passed on byte for byte.
pub fn log(path: &Path, limits: ReadLimits) -> Result<(), JobToolError> {
    let stdout = io::stdout();
    let tty = stdout.is_terminal();
    let mut lock = stdout.lock();
    let mut out: Box<dyn Write> = if tty {
        Box::new(TerminalSafe { inner: &mut lock, sanitizer: Sanitizer::new(Mode::Lines) })
    } else {
        Box::new(&mut lock)
    };
    copy_member(path, crate::OUTPUT_FILE, &mut out, None, limits)?;
    drop(out); // a terminal's sanitizer writes what it held back
    lock.flush().map_err(JobToolError::Stdout)
}

/// The run's status record as the result holds it, byte for byte (at most 1 MiB).
pub fn raw_status(path: &Path) -> Result<Vec<u8>, JobToolError> {
    let mut raw = Vec::new();
    copy_member(path, crate::STATUS_FILE, &mut raw, Some(MAX_STATUS), crate::STATUS_LIMITS)?;
    Ok(raw)
}

/// `job status`: the status record, re-serialized with every key and string
/// through the one sanitizer (JSON escaping alone lets C1 and bidi through).
pub fn status(path: &Path) -> Result<serde_json::Value, JobToolError> {
    let raw = raw_status(path)?;
    let value =
        serde_json::from_slice(&raw).map_err(|source| JobToolError::BadStatus { path: path.to_owned(), source })?;
    Ok(sanitize_json(value))
}

/// Every key and string of a JSON value, through the one sanitizer: what a
/// guest or a server wrote reaches a terminal escaped, whatever the format.
pub fn sanitize_json(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) => Value::String(sanitize(s.as_bytes())),
        Value::Array(items) => Value::Array(items.into_iter().map(sanitize_json).collect()),
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| (sanitize(k.as_bytes()), sanitize_json(v))).collect())
        }
        other => other,
    }
}

/// One entry of an archive as provenance and rebuild checks compare it:
/// its path (raw bytes, shown escaped), kind, mode, and for a regular file
/// its size and sha256 (lowercase hex); for a link, its target.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntryDigest {
    pub path: String,
    pub kind: char,
    pub mode: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// Every entry of the archive in the job file or result at `path`, in
/// archive order, each regular file hashed as it streams by (within `limits`).
pub fn digests(path: &Path, limits: ReadLimits) -> Result<Vec<EntryDigest>, JobToolError> {
    use sha2::Digest;
    let read_err = |source| JobToolError::Read { path: path.to_owned(), source };
    let mut archive = open_archive(path, limits)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    while let Some(h) = archive.next_entry().map_err(read_err)? {
        let (mut size, mut sha256) = (None, None);
        if h.kind == crate::Kind::File {
            let mut hasher = sha2::Sha256::new();
            let mut n = 0u64;
            loop {
                let got = archive.read_data(&mut buf).map_err(read_err)?;
                if got == 0 {
                    break;
                }
                hasher.update(&buf[..got]);
                n += got as u64;
            }
            size = Some(n);
            sha256 = Some(crate::hex(&hasher.finalize()));
        }
        out.push(EntryDigest {
            path: sanitize(&h.path),
            kind: h.kind.letter(),
            mode: h.mode,
            size,
            sha256,
            link: h.link.as_deref().map(sanitize),
        });
    }
    archive.finish().map_err(read_err)?;
    Ok(out)
}

/// `job list`: one line per entry, like `tar -tv`, paths escaped.
pub fn list(path: &Path, out: &mut dyn Write, limits: ReadLimits) -> Result<u64, JobToolError> {
    let read_err = |source| JobToolError::Read { path: path.to_owned(), source };
    let mut archive = open_archive(path, limits)?;
    let mut n = 0;
    while let Some(h) = archive.next_entry().map_err(read_err)? {
        let link = match (&h.link, h.kind) {
            (Some(l), crate::Kind::Symlink) => format!(" -> {}", sanitize(l)),
            (Some(l), crate::Kind::Hardlink) => format!(" link to {}", sanitize(l)),
            _ => String::new(),
        };
        writeln!(
            out,
            "{}{} {:>6}/{:<6} {:>12} {}{link}",
            h.kind.letter(),
            mode_string(h.mode),
            h.uid,
            h.gid,
            h.size,
            sanitize(&h.path)
        )
        .map_err(JobToolError::Stdout)?;
        n += 1;
    }
    archive.finish().map_err(read_err)?;
    Ok(n)
}

/// `job unpack`: safe extraction into a new or empty directory, modes
/// through the user's umask, as any file the user creates.
pub fn unpack(path: &Path, dir: &Path, limits: ReadLimits) -> Result<UnpackReport, JobToolError> {
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(JobToolError::DirNotEmpty { dir: dir.to_owned() });
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(|source| JobToolError::Write { path: dir.to_owned(), source })?;
        }
        Err(source) => return Err(JobToolError::Open { path: dir.to_owned(), source }),
    }
    let mut archive = open_archive(path, limits)?;
    let opts = UnpackOptions {
        preserve_owner: false,
        keep_special_bits: false,
        umask: current_umask(),
        ..UnpackOptions::default()
    };
    crate::unpack(&mut archive, dir, &opts).map_err(|source| JobToolError::Unpack {
        path: path.to_owned(),
        dir: dir.to_owned(),
        source,
    })
}

/// This process's umask (read by setting it, then setting it back).
fn current_umask() -> u32 {
    use nix::sys::stat::{umask, Mode};
    let old = umask(Mode::from_bits_truncate(0o022));
    umask(old);
    old.bits()
}

fn mode_string(mode: u32) -> String {
    let bits = [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o40, 'r'),
        (0o20, 'w'),
        (0o10, 'x'),
        (0o4, 'r'),
        (0o2, 'w'),
        (0o1, 'x'),
    ];
    bits.iter().map(|&(bit, c)| if mode & bit != 0 { c } else { '-' }).collect()
}

/// Sanitizes text on its way to a terminal, piece by piece.
struct TerminalSafe<W: Write> {
    inner: W,
    sanitizer: Sanitizer,
}

impl<W: Write> Write for TerminalSafe<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut clean = String::with_capacity(buf.len());
        self.sanitizer.push(buf, &mut clean);
        self.inner.write_all(clean.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> Drop for TerminalSafe<W> {
    fn drop(&mut self) {
        let mut rest = String::new();
        self.sanitizer.finish(&mut rest);
        let _ = self.inner.write_all(rest.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_output_has_no_escape_sequences() {
        let mut out = Vec::new();
        let mut term = TerminalSafe { inner: &mut out, sanitizer: Sanitizer::new(Mode::Lines) };
        term.write_all(b"ok\t\x1b[2Jcleared\r\n\x07\xe2\x80").expect("write");
        term.write_all(b"\xaeend\r").expect("write");
        drop(term);
        assert_eq!(String::from_utf8(out).expect("utf8"), "ok\t\\x1b[2Jcleared\n\\x07\\u{202e}end\\r");
    }

    #[test]
    fn modes() {
        assert_eq!(mode_string(0o755), "rwxr-xr-x");
        assert_eq!(mode_string(0o640), "rw-r-----");
    }
}
