//! Packing a directory into one xz stream of a tar, within a byte budget.
//!
//! Symlinks are stored as links, never followed; sockets, FIFOs and devices
//! are skipped and reported; entries go in sorted order. The output goes
//! through a writer that stops writing at the budget and counts a little
//! further (to twice the budget plus 1 MiB, which evens out the encoder's
//! lag), then stops the compression: the bytes needed are exact if the tree
//! ended by then, else estimated from how much of the tree it took to get
//! there (a cheap walk counts the tree first). The same walk sizes the encoder: a small tree gets a dictionary
//! no larger than itself, which saves allocating and clearing the preset's
//! full one (tens of MiB).

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use liblzma::write::XzEncoder;
use thiserror::Error;

use crate::text::sanitize_capped;
use crate::xz::{sized_encoder, EncodeOptions, XzError};
use crate::zero;

#[derive(Debug, Clone, Default)]
pub struct PackOptions {
    pub encode: EncodeOptions,
    /// A file (device, inode) to leave out: the archive being written, when it is inside the tree.
    pub exclude: Option<(u64, u64)>,
    /// Files given in memory, packed before everything else in this order
    /// (the status first, so a reader finds it without decoding the whole
    /// result). A top-level entry of the same name in the tree is left out:
    /// these never depend on the tree, its free space, or what a job put there.
    pub prepend: Vec<(OsString, Vec<u8>)>,
    /// Top-level names of the tree packed next, before the sorted rest.
    pub first: Vec<OsString>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackReport {
    /// Entries written (directories, files, links).
    pub entries: u64,
    /// Bytes of the xz stream.
    pub compressed_len: u64,
    /// Entries left out, escaped, with the reason.
    pub skipped: Vec<(String, &'static str)>,
}

#[derive(Debug, Error)]
pub enum PackError {
    /// When `estimated`, compression stopped well past the budget and the
    /// rest of the tree is assumed to pack as well as its start.
    #[error("the packed archive needs {}{needed} bytes but only {capacity} are available", if *estimated { "about " } else { "" })]
    TooLarge { needed: u64, capacity: u64, estimated: bool },
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write the archive")]
    Write(#[source] io::Error),
    #[error(transparent)]
    Xz(#[from] XzError),
}

/// Packs `dir` into `out`, failing with [`PackError::TooLarge`] as soon as
/// the output passes `capacity` bytes.
pub fn pack_dir<W: Write>(dir: &Path, out: W, capacity: u64, opts: &PackOptions) -> Result<(PackReport, W), PackError> {
    let prepended: u64 = opts.prepend.iter().map(|(_, data)| tar_size(data.len() as u64)).sum();
    let input = prepended.saturating_add(tree_size(dir, opts.exclude)).saturating_add(1024);
    let out_total = Rc::new(Cell::new(0u64));
    let in_total = Rc::new(Cell::new(0u64));
    let stop_at = capacity.saturating_mul(2).saturating_add(1 << 20);
    let limited = Limited { inner: out, limit: capacity, stop_at, total: out_total.clone() };
    let (stream, in_flight) = sized_encoder(opts.encode, input, capacity)?;
    let xz = XzEncoder::new_stream(limited, stream);
    let counted = Counted { inner: xz, total: in_total.clone() };
    let mut packer =
        Packer { tar: tar::Builder::new(counted), opts, report: PackReport::default(), links: HashMap::new() };
    packer.tar.follow_symlinks(false);
    let too_large = |fed: u64| {
        let out = out_total.get();
        // The part of the tree compressed so far (what was fed, less what
        // the encoder's threads may still hold) predicts the rest. The
        // threads hold at most `in_flight`, often less; xz's output is never
        // much larger than the input it came from, so what came out is a
        // floor on what was compressed (without it, an encoder that keeps up
        // with its input made estimates several times the tree).
        let compressed = fed.saturating_sub(in_flight).max(out.min(fed)).max(1);
        let estimate = (out as f64 * input as f64 / compressed as f64) as u64;
        PackError::TooLarge { needed: estimate.max(out), capacity, estimated: true }
    };
    let walked = (|| {
        for (name, data) in &opts.prepend {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            );
            packer.tar.append_data(&mut header, name, &data[..]).map_err(PackError::Write)?;
            packer.report.entries += 1;
        }
        packer.walk(dir, Path::new(""))
    })();
    if out_total.get() > stop_at {
        return Err(too_large(in_total.get()));
    }
    walked?;
    let Packer { tar, mut report, .. } = packer;
    let finished = tar.into_inner().and_then(|counted| counted.inner.finish()).and_then(|mut limited| {
        limited.flush()?;
        Ok(limited)
    });
    let limited = match finished {
        Ok(_) if out_total.get() > capacity => {
            return Err(PackError::TooLarge { needed: out_total.get(), capacity, estimated: false })
        }
        Ok(l) => l,
        Err(_) if out_total.get() > stop_at => return Err(too_large(in_total.get())),
        Err(e) => return Err(PackError::Write(e)),
    };
    report.compressed_len = out_total.get();
    Ok((report, limited.inner))
}

/// Bytes a tar of `dir` takes before compression (headers and padded data),
/// from a walk that only stats; what cannot be read counts as nothing here
/// and is reported by the pack itself.
fn tree_size(dir: &Path, exclude: Option<(u64, u64)>) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    let mut total = 0u64;
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if exclude == Some((meta.dev(), meta.ino())) {
            continue;
        }
        total = total.saturating_add(if meta.is_dir() {
            512 + tree_size(&entry.path(), exclude)
        } else if meta.is_file() {
            tar_size(meta.len())
        } else {
            512
        });
    }
    total
}

/// A file's header and its data padded to 512 bytes (long names add more; this is an estimate).
fn tar_size(len: u64) -> u64 {
    512 + len.div_ceil(512).saturating_mul(512)
}

/// Packs `dir` onto the start of `file` (a job file or the job disk) within
/// its size, then zeroes everything after the stream. When the archive does
/// not fit, what was written is zeroed again so no broken stream is left, and
/// the error says how many bytes were needed.
pub fn pack_onto(dir: &Path, file: &mut File, opts: &PackOptions) -> Result<PackReport, PackError> {
    let capacity = zero::capacity(file).map_err(PackError::Write)?;
    file.seek(SeekFrom::Start(0)).map_err(PackError::Write)?;
    let packed = pack_dir(dir, BufWriter::with_capacity(1 << 20, &mut *file), capacity, opts).map(|(report, _)| report);
    match packed {
        Ok(report) => {
            zero::zero_range(file, report.compressed_len, capacity).map_err(PackError::Write)?;
            file.sync_all().map_err(PackError::Write)?;
            Ok(report)
        }
        Err(e) => {
            zero::zero_range(file, 0, capacity).map_err(PackError::Write)?;
            Err(e)
        }
    }
}

/// Passes writes through up to `limit` bytes, then only counts them; the
/// write that passes `stop_at` fails, which stops the compression feeding it.
struct Limited<W> {
    inner: W,
    limit: u64,
    stop_at: u64,
    total: Rc<Cell<u64>>,
}

impl<W: Write> Write for Limited<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let before = self.total.get();
        let total = before + buf.len() as u64;
        self.total.set(total);
        if total > self.stop_at {
            return Err(io::Error::new(io::ErrorKind::StorageFull, "the packed archive does not fit"));
        }
        let room = self.limit.saturating_sub(before).min(buf.len() as u64) as usize;
        if room > 0 {
            self.inner.write_all(&buf[..room])?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Counts the bytes written through it (the tar, before compression).
struct Counted<W> {
    inner: W,
    total: Rc<Cell<u64>>,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.total.set(self.total.get() + n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct Packer<'a, W: Write> {
    tar: tar::Builder<W>,
    opts: &'a PackOptions,
    report: PackReport,
    /// Files with several names already packed, by (device, inode).
    links: HashMap<(u64, u64), PathBuf>,
}

impl<W: Write> Packer<'_, W> {
    /// Packs the contents of `dir` (on disk) as `rel` (in the archive), sorted, depth first.
    fn walk(&mut self, dir: &Path, rel: &Path) -> Result<(), PackError> {
        let read_err = |path: &Path| {
            let path = path.to_owned();
            move |source| PackError::Read { path, source }
        };
        let mut names: Vec<_> = fs::read_dir(dir)
            .map_err(read_err(dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(read_err(dir))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        if rel.as_os_str().is_empty() {
            names.retain(|n| !self.opts.prepend.iter().any(|(p, _)| p == n));
            // Named first entries, in the order given; then the rest, sorted.
            let firsts: Vec<OsString> = self.opts.first.iter().filter(|f| names.contains(f)).cloned().collect();
            names.retain(|n| !firsts.contains(n));
            names.splice(0..0, firsts);
        }
        for name in names {
            let path = dir.join(&name);
            let arc = rel.join(&name);
            let meta = fs::symlink_metadata(&path).map_err(read_err(&path))?;
            if self.opts.exclude == Some((meta.dev(), meta.ino())) {
                continue;
            }
            let ft = meta.file_type();
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            let write = |e| PackError::Write(e);
            if ft.is_dir() {
                header.set_size(0);
                // A trailing slash, as GNU tar writes directory names.
                let mut dir_name = arc.clone().into_os_string();
                dir_name.push("/");
                self.tar.append_data(&mut header, &dir_name, io::empty()).map_err(write)?;
                self.report.entries += 1;
                self.walk(&path, &arc)?;
            } else if ft.is_symlink() {
                let target = fs::read_link(&path).map_err(read_err(&path))?;
                header.set_size(0);
                self.tar.append_link(&mut header, &arc, &target).map_err(write)?;
                self.report.entries += 1;
            } else if ft.is_file() {
                if meta.nlink() > 1 {
                    if let Some(first) = self.links.get(&(meta.dev(), meta.ino())) {
                        header.set_entry_type(tar::EntryType::Link);
                        header.set_size(0);
                        let first = first.clone();
                        self.tar.append_link(&mut header, &arc, &first).map_err(write)?;
                        self.report.entries += 1;
                        continue;
                    }
                    self.links.insert((meta.dev(), meta.ino()), arc.clone());
                }
                let file = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(&path)
                    .map_err(read_err(&path))?;
                let data = Exact { inner: file, left: meta.len() };
                self.tar
                    .append_data(&mut header, &arc, data)
                    .map_err(|e| PackError::Read { path: path.clone(), source: e })?;
                self.report.entries += 1;
            } else {
                let why = if ft.is_socket() {
                    "socket"
                } else if ft.is_fifo() {
                    "FIFO"
                } else {
                    "device node"
                };
                self.report
                    .skipped
                    .push((sanitize_capped(arc.as_os_str().as_bytes(), crate::text::SHOWN_PATH_MAX), why));
            }
        }
        Ok(())
    }
}

/// Yields exactly `left` bytes of a file that may change size while read:
/// zeros after a shrink, nothing past the size recorded in the header.
struct Exact {
    inner: File,
    left: u64,
}

impl Read for Exact {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = self.left.min(buf.len() as u64) as usize;
        let n = match self.inner.read(&mut buf[..want])? {
            0 => {
                buf[..want].fill(0);
                want
            }
            n => n,
        };
        self.left -= n as u64;
        Ok(n)
    }
}
