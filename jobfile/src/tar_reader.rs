//! Reading a tar stream entry by entry, bounded, for archives from strangers.
//!
//! The framing (headers, GNU long names, pax records, sparse maps) is ours so
//! that every piece of metadata has a size cap: a hostile archive can make a
//! tiny xz stream expand into a gigabyte "long name", and no piece of it may be
//! held in memory unbounded. `tar::Header` only decodes a block's fields.
//! Formats: ustar, GNU (long names, base-256 numbers, old sparse), pax
//! (path, linkpath, size, mtime, uid, gid, sparse 1.0).

use std::io::{self, Read};
use std::time::{Duration, Instant};

pub use crate::tar_entry::{ArchiveError, Kind};
use crate::tar_strict::{self, Paths};

const BLOCK: u64 = 512;
/// Longest GNU long name / long link we accept (PATH_MAX is 4096).
const MAX_LONG_NAME: u64 = 64 << 10;
/// Largest pax extended header we accept.
const MAX_PAX: u64 = 1 << 20;
/// Most segments a sparse map may have.
const MAX_SPARSE_SEGMENTS: usize = 1 << 16;
/// After the end-of-archive blocks, how much more we read to reach the end of
/// the xz stream (and so check it) before giving up on the rest.
const MAX_TRAILER: u64 = 16 << 20;

/// Most extension headers (GNU long name or link, pax, pax global) before one entry.
const MAX_EXTENSIONS_PER_ENTRY: u32 = 8;

/// What reading one archive may cost. Every reader of a guest's result sets
/// these; a hostile archive then ends in an error, never in hours or gigabytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Most bytes the archive may produce: tar stream read plus the holes
    /// made up for sparse entries (a sparse entry can declare 2^62 bytes).
    pub max_bytes: u64,
    /// Most extension headers in the whole archive (each costs a parse).
    pub max_extensions: u64,
    /// Most bytes of extension headers (pax records, pax globals, GNU long
    /// names) in the whole archive: a megabyte of xz can hold hundreds of
    /// megabytes of records, and reading them must not take seconds.
    pub max_meta_bytes: u64,
    /// How long reading may take, from when the limits were set.
    pub max_time: Option<Duration>,
    /// Whether every path is kept, so that one named twice, or an entry
    /// below a file or link, is refused (`tar_strict::Paths`): what a
    /// reader of results needs, at the memory of one path per entry.
    pub unique_paths: bool,
}

impl ReadLimits {
    /// No bound on bytes or time (the guest reading its own job), still bounded in extensions.
    pub const UNBOUNDED: ReadLimits = ReadLimits {
        max_bytes: u64::MAX,
        max_extensions: 1 << 24,
        max_meta_bytes: 256 << 20,
        max_time: None,
        unique_paths: false,
    };

    /// Most extension-header bytes a bounded reader (of a guest's result) reads:
    /// far more than real archives carry (a path a file), little enough to parse
    /// in a small fraction of a second.
    pub const RESULT_META_BYTES: u64 = 16 << 20;

    pub const fn new(max_bytes: u64, max_time: Duration) -> Self {
        ReadLimits {
            max_bytes,
            max_time: Some(max_time),
            max_meta_bytes: Self::RESULT_META_BYTES,
            unique_paths: true,
            ..Self::UNBOUNDED
        }
    }
}

/// One entry's metadata. Paths are raw bytes, exactly as the archive holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub path: Vec<u8>,
    pub kind: Kind,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// Size of the contents (the expanded size for sparse files).
    pub size: u64,
    /// Target of a symlink or hardlink.
    pub link: Option<Vec<u8>>,
}

/// Where the current entry's contents are.
struct Current {
    /// Raw bytes of the entry still to read from the stream.
    raw_left: u64,
    /// Zero padding after the raw bytes, up to the block boundary.
    pad: u64,
    /// Logical position and size of the contents.
    pos: u64,
    size: u64,
    /// Data segments (offset, length) of a sparse file, in order; `None` for a plain one.
    sparse: Option<Vec<(u64, u64)>>,
    segment: usize,
}

/// pax records as (key, value), in archive order.
type PaxRecords = Vec<(Vec<u8>, Vec<u8>)>;

#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<PaxRecords>,
}

/// Reads a tar stream from `R`.
pub struct ArchiveReader<R> {
    inner: R,
    offset: u64,
    current: Option<Current>,
    ended: bool,
    limits: ReadLimits,
    deadline: Option<Instant>,
    /// Hole bytes made up so far for sparse entries.
    holes: u64,
    extensions: u64,
    /// Bytes of extension headers read so far.
    meta_bytes: u64,
    /// Every path so far, when the limits ask for unique paths.
    paths: Option<Paths>,
}

impl<R: Read> ArchiveReader<R> {
    pub fn new(inner: R) -> Self {
        ArchiveReader {
            inner,
            offset: 0,
            current: None,
            ended: false,
            limits: ReadLimits::UNBOUNDED,
            deadline: None,
            holes: 0,
            extensions: 0,
            meta_bytes: 0,
            paths: None,
        }
    }

    /// Bounds the rest of the reading; the time limit counts from now.
    pub fn with_limits(mut self, limits: ReadLimits) -> Self {
        self.deadline = limits.max_time.map(|t| Instant::now() + t);
        self.paths = limits.unique_paths.then(Paths::new);
        self.limits = limits;
        self
    }

    /// Errors once the archive has produced too much or taken too long.
    fn check_limits(&self) -> Result<(), ArchiveError> {
        if self.offset.saturating_add(self.holes) > self.limits.max_bytes {
            return Err(ArchiveError::TooMuchData { offset: self.offset, limit: self.limits.max_bytes });
        }
        if let (Some(deadline), Some(limit)) = (self.deadline, self.limits.max_time) {
            if Instant::now() > deadline {
                return Err(ArchiveError::TooSlow { offset: self.offset, limit });
            }
        }
        Ok(())
    }

    /// Counts one extension header against both limits.
    fn count_extension(&mut self, before_entry: &mut u32, what: &'static str, at: u64) -> Result<(), ArchiveError> {
        *before_entry += 1;
        self.extensions += 1;
        if *before_entry > MAX_EXTENSIONS_PER_ENTRY {
            let limit = u64::from(MAX_EXTENSIONS_PER_ENTRY);
            return Err(ArchiveError::TooManyExtensions {
                what: "extension headers before one entry",
                offset: at,
                limit,
            });
        }
        if self.extensions > self.limits.max_extensions {
            return Err(ArchiveError::TooManyExtensions { what, offset: at, limit: self.limits.max_extensions });
        }
        Ok(())
    }

    /// The next entry's header, or `None` at the end of the archive. Whatever
    /// was left unread of the previous entry is skipped.
    pub fn next_entry(&mut self) -> Result<Option<Header>, ArchiveError> {
        self.skip_current()?;
        if self.ended {
            return Ok(None);
        }
        let mut pending = Pending::default();
        let mut extensions = 0u32;
        loop {
            let at = self.offset;
            let mut block = [0u8; BLOCK as usize];
            match self.fill(&mut block)? {
                0 if at == 0 => {
                    // Nothing at all: GNU tar and tarfile refuse it ("does not look like a tar archive").
                    return Err(ArchiveError::Ambiguous { offset: 0, what: "an empty archive".into() });
                }
                0 if pending.is_empty() => {
                    // No end-of-archive blocks: GNU tar accepts this, so do we.
                    self.ended = true;
                    return Ok(None);
                }
                n if n < block.len() => return Err(ArchiveError::Truncated { offset: self.offset }),
                _ => {}
            }
            if block.iter().all(|&b| b == 0) {
                if !pending.is_empty() {
                    return Err(ArchiveError::Truncated { offset: at });
                }
                // The end is two zero blocks (or one, then nothing). After a lone one GNU tar
                // reads the next header on (and fails if it is cut short), where others stop.
                let mut next = [0u8; BLOCK as usize];
                if self.fill(&mut next)? > 0 && next.iter().any(|&b| b != 0) {
                    return Err(ArchiveError::Ambiguous {
                        offset: at,
                        what: "a lone zero block with more of the archive after it".into(),
                    });
                }
                self.ended = true;
                return Ok(None);
            }
            check_checksum(&block, at)?;
            let header = tar::Header::from_byte_slice(&block);
            let flag = block[156];
            let raw_size =
                parse_numeric(&block[124..136]).ok_or(ArchiveError::BadField { offset: at, field: "size" })?;
            if matches!(flag, b'L' | b'K' | b'x' | b'g') {
                self.count_extension(&mut extensions, "extension headers in the archive", at)?;
            }
            match flag {
                b'L' => {
                    let name = self.read_meta(raw_size, MAX_LONG_NAME, "GNU long name", at)?;
                    set_once(&mut pending.long_name, tar_strict::long_name(name, at)?, "GNU long name", at)?;
                }
                b'K' => {
                    let link = self.read_meta(raw_size, MAX_LONG_NAME, "GNU long link", at)?;
                    set_once(&mut pending.long_link, tar_strict::long_name(link, at)?, "GNU long link", at)?;
                }
                b'x' => {
                    let data = self.read_meta(raw_size, MAX_PAX, "pax header", at)?;
                    let records = parse_pax(&data, at)?;
                    tar_strict::check_pax_entry(&records, at)?;
                    set_once(&mut pending.pax, records, "pax", at)?;
                }
                b'g' => {
                    // A global header may carry only a comment: read it to stay framed, and check that.
                    let data = self.read_meta(raw_size, MAX_PAX, "pax global header", at)?;
                    tar_strict::check_pax_global(&parse_pax(&data, at)?, at)?;
                }
                _ => {
                    tar_strict::check_entry_flag(flag, at)?;
                    tar_strict::layout(&block, at)?;
                    return self.start_entry(&block, header, raw_size, pending, at).map(Some);
                }
            }
        }
    }

    /// Reads the current entry's contents (holes of sparse files read as zeros).
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, ArchiveError> {
        let Some(cur) = self.current.as_mut() else {
            return Ok(0);
        };
        if cur.pos >= cur.size || buf.is_empty() {
            return Ok(0);
        }
        // How many bytes from here are stored data (Some) or a hole (None).
        let stored = match &cur.sparse {
            None => Some(cur.size - cur.pos),
            Some(map) => {
                while cur.segment < map.len() && map[cur.segment].0 + map[cur.segment].1 <= cur.pos {
                    cur.segment += 1;
                }
                match map.get(cur.segment) {
                    Some(&(off, len)) if off <= cur.pos => Some(off + len - cur.pos),
                    Some(&(off, _)) => {
                        let hole = (off - cur.pos).min(buf.len() as u64) as usize;
                        buf[..hole].fill(0);
                        cur.pos += hole as u64;
                        self.holes += hole as u64;
                        self.check_limits()?;
                        return Ok(hole);
                    }
                    None => None,
                }
            }
        };
        match stored {
            Some(n) => {
                let want = n.min(buf.len() as u64).min(cur.raw_left) as usize;
                if want == 0 {
                    return Err(ArchiveError::Truncated { offset: self.offset });
                }
                let got = self.fill(&mut buf[..want])?;
                if got < want {
                    return Err(ArchiveError::Truncated { offset: self.offset });
                }
                let cur = self.current.as_mut().expect("checked above");
                cur.raw_left -= got as u64;
                cur.pos += got as u64;
                Ok(got)
            }
            None => {
                // Past the last segment: the rest of the file is a hole.
                let hole = (cur.size - cur.pos).min(buf.len() as u64) as usize;
                buf[..hole].fill(0);
                cur.pos += hole as u64;
                self.holes += hole as u64;
                self.check_limits()?;
                Ok(hole)
            }
        }
    }

    /// The current entry's contents as a `Read`.
    pub fn data(&mut self) -> EntryData<'_, R> {
        EntryData { reader: self }
    }

    /// After the last entry: reads on to the end of the underlying stream (so
    /// the xz check of the whole stream is verified), at most 16 MiB more.
    pub fn finish(mut self) -> Result<R, ArchiveError> {
        while self.next_entry()?.is_some() {}
        let mut buf = [0u8; 16 << 10];
        let mut left = MAX_TRAILER;
        while left > 0 {
            let n = self.inner.read(&mut buf[..left.min(16 << 10) as usize])?;
            if n == 0 {
                break;
            }
            left -= n as u64;
            self.offset += n as u64;
            self.check_limits()?;
        }
        Ok(self.inner)
    }

    fn start_entry(
        &mut self,
        block: &[u8; 512],
        header: &tar::Header,
        raw_size: u64,
        pending: Pending,
        at: u64,
    ) -> Result<Header, ArchiveError> {
        let pax = pending.pax.unwrap_or_default();
        let pax_get = |key: &[u8]| pax.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let pax_num = |key: &[u8], field: &'static str| -> Result<Option<u64>, ArchiveError> {
            pax_get(key).map(|v| parse_decimal(&v).ok_or(ArchiveError::BadField { offset: at, field })).transpose()
        };
        let both_names = (pending.long_name.is_some() && pax_get(b"path").is_some())
            || (pending.long_link.is_some() && pax_get(b"linkpath").is_some());
        let mut path = pax_get(b"path").or(pending.long_name).unwrap_or_else(|| header.path_bytes().into_owned());
        let link =
            pax_get(b"linkpath").or(pending.long_link).or_else(|| header.link_name_bytes().map(|l| l.into_owned()));
        let raw_size = pax_num(b"size", "pax size")?.unwrap_or(raw_size);
        let field = |range: std::ops::Range<usize>, name: &'static str| {
            parse_numeric(&block[range]).ok_or(ArchiveError::BadField { offset: at, field: name })
        };
        let mode = field(100..108, "mode")? as u32 & 0o7777;
        let uid = match pax_num(b"uid", "pax uid")? {
            Some(v) => v,
            None => field(108..116, "uid")?,
        };
        let gid = match pax_num(b"gid", "pax gid")? {
            Some(v) => v,
            None => field(116..124, "gid")?,
        };
        let mtime = match pax_get(b"mtime") {
            Some(v) => parse_pax_time(&v).ok_or(ArchiveError::BadField { offset: at, field: "pax mtime" })?,
            None => field(136..148, "mtime")? as i64,
        };
        let flag = block[156];
        let kind = Kind::from_flag(flag);
        let pad = (BLOCK - raw_size % BLOCK) % BLOCK;
        if raw_size.checked_add(pad).is_none() {
            return Err(ArchiveError::SizeOverflow { offset: at });
        }
        self.current = Some(Current { raw_left: raw_size, pad, pos: 0, size: raw_size, sparse: None, segment: 0 });

        let mut size = raw_size;
        if flag == b'S' {
            let (map, real) = self.gnu_sparse_map(block, at)?;
            size = self.set_sparse(map, real, at)?;
        } else if let Some(major) = pax_get(b"GNU.sparse.major") {
            let minor = pax_get(b"GNU.sparse.minor").unwrap_or_default();
            if major != b"1" || minor != b"0" {
                let version = crate::text::sanitize_capped(&[&major[..], b".", &minor[..]].concat(), 64);
                return Err(ArchiveError::UnsupportedSparse(version, at));
            }
            if let Some(name) = pax_get(b"GNU.sparse.name") {
                path = name;
            }
            let real = pax_num(b"GNU.sparse.realsize", "GNU.sparse.realsize")?
                .ok_or(ArchiveError::BadSparse { offset: at })?;
            let map = self.pax_sparse_map(at)?;
            size = self.set_sparse(map, real, at)?;
        }
        let link = link.filter(|l| !l.is_empty());
        tar_strict::check_entry(&path, link.as_deref(), kind, flag, raw_size, both_names, at)?;
        if let Some(paths) = self.paths.as_mut() {
            paths.add(&path, kind, link.as_deref(), at)?;
        }
        if let Some(cur) = self.current.as_mut() {
            cur.size = size;
        }
        Ok(Header { path, kind, mode, uid, gid, mtime, size, link })
    }

    /// Checks a sparse map against the stored bytes and installs it; returns the real size.
    fn set_sparse(&mut self, map: Vec<(u64, u64)>, real: u64, at: u64) -> Result<u64, ArchiveError> {
        let cur = self.current.as_mut().expect("set by start_entry");
        let mut end = 0u64;
        let mut stored = 0u64;
        for &(off, len) in &map {
            let seg_end = off.checked_add(len).ok_or(ArchiveError::BadSparse { offset: at })?;
            if off < end || seg_end > real {
                return Err(ArchiveError::BadSparse { offset: at });
            }
            end = seg_end;
            stored = stored.checked_add(len).ok_or(ArchiveError::BadSparse { offset: at })?;
        }
        if stored != cur.raw_left {
            return Err(ArchiveError::BadSparse { offset: at });
        }
        if end != real {
            // GNU tar sizes the file by where its map ends (it writes a last, empty segment
            // there), others by the declared real size: the two must be one.
            let what = format!("a sparse map that ends at {end} for a file of {real} bytes");
            return Err(ArchiveError::Ambiguous { offset: at, what });
        }
        cur.sparse = Some(map.into_iter().filter(|&(_, len)| len > 0).collect());
        Ok(real)
    }

    /// The old GNU sparse map: four slots in the header, 21 more per extension block.
    fn gnu_sparse_map(&mut self, block: &[u8; 512], at: u64) -> Result<(Vec<(u64, u64)>, u64), ArchiveError> {
        let bad = || ArchiveError::BadSparse { offset: at };
        let real = parse_numeric(&block[483..495]).ok_or_else(bad)?;
        let mut map = Vec::new();
        // Four slots in the header, then the "extended" flag.
        let mut ended = sparse_slots(&block[386..482], &mut map, at)?;
        let mut extended = block[482] != 0;
        while extended {
            if map.len() > MAX_SPARSE_SEGMENTS || ended {
                // GNU tar reads on into the next block after an empty slot; nothing writes that.
                return Err(bad());
            }
            let mut ext = [0u8; BLOCK as usize];
            if self.fill(&mut ext)? < ext.len() {
                return Err(ArchiveError::Truncated { offset: self.offset });
            }
            // An extension block is 21 slots of (offset, length), then the flag.
            ended = sparse_slots(&ext[..21 * 24], &mut map, at)?;
            extended = ext[504] != 0;
        }
        Ok((map, real))
    }

    /// The pax 1.0 sparse map: decimal lines at the start of the data, padded to a block.
    fn pax_sparse_map(&mut self, at: u64) -> Result<Vec<(u64, u64)>, ArchiveError> {
        let mut numbers = Vec::new();
        let mut digits = Vec::new();
        let mut count: Option<u64> = None;
        loop {
            let mut block = [0u8; BLOCK as usize];
            let cur = self.current.as_mut().expect("set by start_entry");
            if cur.raw_left < BLOCK {
                return Err(ArchiveError::BadSparse { offset: at });
            }
            cur.raw_left -= BLOCK;
            if self.fill(&mut block)? < block.len() {
                return Err(ArchiveError::Truncated { offset: self.offset });
            }
            for &b in &block {
                if count.is_some_and(|c| numbers.len() as u64 == 2 * c) {
                    break;
                }
                match b {
                    b'0'..=b'9' if digits.len() < 20 => digits.push(b),
                    b'\n' => {
                        let n = parse_decimal(&digits).ok_or(ArchiveError::BadSparse { offset: at })?;
                        digits.clear();
                        match count {
                            None if n as usize <= MAX_SPARSE_SEGMENTS => count = Some(n),
                            None => return Err(ArchiveError::BadSparse { offset: at }),
                            Some(_) => numbers.push(n),
                        }
                    }
                    _ => return Err(ArchiveError::BadSparse { offset: at }),
                }
            }
            if count.is_some_and(|c| numbers.len() as u64 == 2 * c) {
                return Ok(numbers.chunks(2).map(|p| (p[0], p[1])).collect());
            }
        }
    }

    /// Reads a metadata entry's contents (and its padding), refusing more than `limit`.
    fn read_meta(&mut self, size: u64, limit: u64, what: &'static str, at: u64) -> Result<Vec<u8>, ArchiveError> {
        if size > limit {
            return Err(ArchiveError::MetadataTooLarge { what, offset: at, size, limit });
        }
        self.meta_bytes = self.meta_bytes.saturating_add(size);
        if self.meta_bytes > self.limits.max_meta_bytes {
            return Err(ArchiveError::TooMuchMetadata { offset: at, limit: self.limits.max_meta_bytes });
        }
        let mut data = vec![0u8; size as usize];
        if self.fill(&mut data)? < data.len() {
            return Err(ArchiveError::Truncated { offset: self.offset });
        }
        self.skip((BLOCK - size % BLOCK) % BLOCK)?;
        Ok(data)
    }

    fn skip_current(&mut self) -> Result<(), ArchiveError> {
        if let Some(cur) = self.current.take() {
            let n = cur.raw_left.checked_add(cur.pad).ok_or(ArchiveError::SizeOverflow { offset: self.offset })?;
            self.skip(n)?;
        }
        Ok(())
    }

    /// Reads past `n` bytes, within the limits.
    fn skip(&mut self, mut n: u64) -> Result<(), ArchiveError> {
        let mut buf = [0u8; 16 << 10];
        while n > 0 {
            let want = n.min(buf.len() as u64) as usize;
            let got = self.fill(&mut buf[..want])?;
            if got < want {
                return Err(ArchiveError::Truncated { offset: self.offset });
            }
            n -= got as u64;
        }
        Ok(())
    }

    /// Reads until `buf` is full or the input ends; returns how much was read.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, ArchiveError> {
        let mut n = 0;
        while n < buf.len() {
            match self.inner.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.offset += n as u64;
        self.check_limits()?;
        Ok(n)
    }
}

/// The current entry's contents, as a `Read`.
pub struct EntryData<'a, R> {
    reader: &'a mut ArchiveReader<R>,
}

impl<R: Read> Read for EntryData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read_data(buf).map_err(|e| match e {
            ArchiveError::Read(inner) => inner,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        })
    }
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.long_name.is_none() && self.long_link.is_none() && self.pax.is_none()
    }
}

fn set_once<T>(slot: &mut Option<T>, value: T, what: &'static str, offset: u64) -> Result<(), ArchiveError> {
    if slot.is_some() {
        return Err(ArchiveError::DuplicateExtension { what, offset });
    }
    *slot = Some(value);
    Ok(())
}

/// The stored checksum must match the header's sum (unsigned, or the historic signed one).
fn check_checksum(block: &[u8; 512], offset: u64) -> Result<(), ArchiveError> {
    let stored = parse_octal(&block[148..156]).ok_or(ArchiveError::BadChecksum { offset })?;
    let field = 148..156;
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &b) in block.iter().enumerate() {
        let b = if field.contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    if stored == unsigned || stored as i64 == signed {
        Ok(())
    } else {
        Err(ArchiveError::BadChecksum { offset })
    }
}

/// GNU sparse slots, 24 bytes each (offset, length): the map ends at the
/// first slot whose length starts with NUL (as GNU tar reads it), which
/// must be all zeros, as every slot after it. Returns whether it ended.
fn sparse_slots(slots: &[u8], map: &mut Vec<(u64, u64)>, at: u64) -> Result<bool, ArchiveError> {
    let mut ended = false;
    for slot in slots.chunks(24) {
        if slot.iter().all(|&b| b == 0) {
            ended = true;
            continue;
        }
        if ended || slot[12] == 0 {
            return Err(ArchiveError::Ambiguous {
                offset: at,
                what: "a GNU sparse map with a gap or a half-empty slot".into(),
            });
        }
        let bad = || ArchiveError::BadSparse { offset: at };
        map.push((parse_numeric(&slot[..12]).ok_or_else(bad)?, parse_numeric(&slot[12..]).ok_or_else(bad)?));
    }
    Ok(ended)
}

/// A numeric header field: base-256 when the high bit of its first byte is
/// set (GNU, for large values), octal otherwise; an empty field is 0.
fn parse_numeric(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        if field[0] & 0x40 != 0 {
            return None; // negative
        }
        let mut v: u64 = u64::from(field[0] & 0x3f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    if field.iter().all(|&b| b == 0 || b == b' ') {
        return Some(0);
    }
    parse_octal(field)
}

/// An octal field: optional spaces, digits, then only NULs or spaces to
/// the field's end (tarfile refuses what GNU tar reads past, so neither
/// reading wins: anything after the number is refused).
fn parse_octal(field: &[u8]) -> Option<u64> {
    let start = field.iter().position(|&b| b != b' ').unwrap_or(field.len());
    let digits = field[start..].iter().take_while(|&&b| b != 0 && b != b' ').count();
    if !field[start + digits..].iter().all(|&b| b == 0 || b == b' ') {
        return None;
    }
    let mut v: u64 = 0;
    for &b in &field[start..start + digits] {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
    }
    (digits > 0).then_some(v)
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// A pax time: seconds, optionally negative, optionally with a fraction (dropped).
fn parse_pax_time(s: &[u8]) -> Option<i64> {
    let (neg, s) = match s.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let whole = s.split(|&b| b == b'.').next()?;
    let v = i64::try_from(parse_decimal(whole)?).ok()?;
    Some(if neg { -v } else { v })
}

/// pax records: `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
fn parse_pax(mut data: &[u8], offset: u64) -> Result<PaxRecords, ArchiveError> {
    let bad = || ArchiveError::BadPax { offset };
    let mut records = Vec::new();
    // Records fill the header's size exactly: GNU tar refuses anything after them, tarfile stops there.
    while !data.is_empty() {
        let space = data.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let len = parse_decimal(&data[..space]).ok_or_else(bad)? as usize;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(bad());
        }
        let record = &data[space + 1..len - 1];
        let eq = record.iter().position(|&b| b == b'=').ok_or_else(bad)?;
        records.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(records)
}

/// One pax extended-header record, `<len> <key>=<value>\n`, whose length
/// counts its own digits: what this reader parses, for building archives
/// by hand (tests, fuzz seeds).
pub fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries_of(tar_bytes: &[u8]) -> Result<Vec<(Header, Vec<u8>)>, ArchiveError> {
        let mut r = ArchiveReader::new(tar_bytes);
        let mut out = Vec::new();
        while let Some(h) = r.next_entry()? {
            let mut data = Vec::new();
            r.data().read_to_end(&mut data)?;
            out.push((h, data));
        }
        Ok(out)
    }

    fn header_block(name: &[u8], flag: u8, size: u64) -> [u8; 512] {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::new(flag));
        h.set_cksum();
        *h.as_bytes()
    }

    #[test]
    fn reads_long_names_and_links_from_the_tar_crate() {
        let long = "d/".repeat(150) + "file.txt";
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o755);
        b.append_data(&mut h, &long, &b"hello"[..]).expect("append");
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Symlink);
        b.append_link(&mut l, "link", "t/".repeat(80) + "x").expect("link");
        let bytes = b.into_inner().expect("finish");
        let got = entries_of(&bytes).expect("read");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0.path, long.as_bytes());
        assert_eq!(got[0].0.mode, 0o755);
        assert_eq!(got[0].1, b"hello");
        assert_eq!(got[1].0.kind, Kind::Symlink);
        assert_eq!(got[1].0.link.as_deref(), Some(("t/".repeat(80) + "x").as_bytes()));
    }

    #[test]
    fn a_huge_long_name_is_refused_without_reading_it() {
        let mut bytes = header_block(b"././@LongLink", b'L', 10 << 30).to_vec();
        bytes.extend_from_slice(&[b'a'; 1024]);
        match entries_of(&bytes) {
            Err(ArchiveError::MetadataTooLarge { size, .. }) => assert_eq!(size, 10 << 30),
            other => panic!("expected MetadataTooLarge, got {other:?}"),
        }
    }

    #[test]
    fn pax_records_override_the_header() {
        let records =
            [pax_record("path", "pax/named/file.bin"), pax_record("linkpath", "target"), pax_record("size", "3")]
                .concat();
        let mut bytes = header_block(b"PaxHeader", b'x', records.len() as u64).to_vec();
        bytes.extend_from_slice(&records);
        bytes.resize(1024, 0);
        bytes.extend_from_slice(&header_block(b"short", b'0', 3));
        bytes.extend_from_slice(b"abc");
        bytes.resize(bytes.len() + 509 + 1024, 0);
        let got = entries_of(&bytes).expect("read");
        assert_eq!(got[0].0.path, b"pax/named/file.bin");
        assert_eq!(got[0].0.link.as_deref(), Some(&b"target"[..]));
        assert_eq!(got[0].1, b"abc");
    }

    #[test]
    fn corrupt_headers_are_errors_not_panics() {
        let mut bad = header_block(b"x", b'0', 0);
        bad[0] ^= 1;
        assert!(matches!(entries_of(&bad), Err(ArchiveError::BadChecksum { offset: 0 })));
        let short = header_block(b"x", b'0', 100);
        assert!(matches!(entries_of(&short), Err(ArchiveError::Truncated { .. })));
        assert!(matches!(entries_of(&short[..300]), Err(ArchiveError::Truncated { .. })));
        let mut pax = header_block(b"p", b'x', 12).to_vec();
        pax.extend_from_slice(b"99 path=x\n\0\0");
        pax.resize(2048, 0);
        assert!(matches!(entries_of(&pax), Err(ArchiveError::BadPax { .. })));
        assert!(entries_of(
            b"garbage that is no tar archive whatsoever, repeated until it is long enough".repeat(10).as_slice()
        )
        .is_err());
    }

    fn pax_entry(kind: u8, records: &[u8]) -> Vec<u8> {
        let mut bytes = header_block(b"PaxHeader", kind, records.len() as u64).to_vec();
        bytes.extend_from_slice(records);
        bytes.resize(bytes.len().div_ceil(512) * 512, 0);
        bytes
    }

    fn read_all(bytes: &[u8], limits: ReadLimits) -> Result<u64, ArchiveError> {
        let mut r = ArchiveReader::new(bytes).with_limits(limits);
        let mut total = 0;
        while r.next_entry()?.is_some() {
            total += io::copy(&mut r.data(), &mut io::sink()).map_err(ArchiveError::from)?;
        }
        Ok(total)
    }

    #[test]
    fn the_end_is_two_zero_blocks_or_one_then_nothing_never_a_lone_one_with_more_after_it() {
        let mut file = header_block(b"a", b'0', 2).to_vec();
        file.extend_from_slice(b"hi");
        file.resize(1024, 0);
        let zero = [0u8; 512];
        for (tail, ok) in [
            (vec![], true),
            (zero.to_vec(), true),
            ([zero, zero].concat(), true),
            ([&zero[..], &[0u8; 100]].concat(), true),
            ([zero.to_vec(), header_block(b"b", b'0', 0).to_vec()].concat(), false),
            ([&zero[..], b"garbage"].concat(), false),
        ] {
            let bytes = [file.clone(), tail.clone()].concat();
            match read_all(&bytes, ReadLimits::UNBOUNDED) {
                Ok(2) if ok => {}
                Err(ArchiveError::Ambiguous { offset: 1024, what }) if !ok => assert!(what.contains("lone zero block")),
                other => panic!("{} bytes after the entry: {other:?}", tail.len()),
            }
        }
    }

    #[test]
    fn a_flood_of_pax_global_headers_stops_at_the_per_entry_limit() {
        let one = pax_entry(b'g', &pax_record("comment", "x"));
        let flood = one.repeat(100_000); // 100 MB of headers in a few KB of xz
        match read_all(&flood, ReadLimits::UNBOUNDED) {
            Err(ArchiveError::TooManyExtensions { limit: 8, offset, .. }) => assert_eq!(offset, 8 * 1024),
            other => panic!("{other:?}"),
        }
        // Within the per-entry limit, the total across entries still counts.
        let mut many = Vec::new();
        for _ in 0..50 {
            many.extend_from_slice(&one);
            many.extend_from_slice(&header_block(b"f", b'0', 0));
        }
        let limits = ReadLimits { max_extensions: 10, ..ReadLimits::UNBOUNDED };
        assert!(matches!(read_all(&many, limits), Err(ArchiveError::TooManyExtensions { limit: 10, .. })));
    }

    #[test]
    fn pax_global_headers_stop_at_the_metadata_limit_long_before_the_archive_ends() {
        // One global header of 1 MiB between entries, 64 times: 64 MiB of records,
        // within every per-header and per-entry limit.
        let record = pax_record("comment", &"x".repeat((1 << 20) - 64));
        let one = pax_entry(b'g', &record);
        let mut bytes = Vec::new();
        for i in 0..64 {
            bytes.extend_from_slice(&one);
            bytes.extend_from_slice(&header_block(format!("f{i}").as_bytes(), b'0', 0));
        }
        bytes.resize(bytes.len() + 1024, 0);
        let limits = ReadLimits::new(u64::MAX, Duration::from_secs(3600));
        match read_all(&bytes, limits) {
            Err(ArchiveError::TooMuchMetadata { offset, limit }) => {
                assert_eq!(limit, ReadLimits::RESULT_META_BYTES);
                assert!(offset <= limit + (2 << 20), "read {offset} bytes before stopping");
            }
            other => panic!("{other:?}"),
        }
        assert!(read_all(&bytes, ReadLimits::UNBOUNDED).is_ok(), "64 MiB is within the guest's own bound");
    }

    #[test]
    fn a_sparse_entry_declaring_2_pow_62_bytes_stops_at_the_byte_limit() {
        let records = [
            pax_record("GNU.sparse.major", "1"),
            pax_record("GNU.sparse.minor", "0"),
            pax_record("GNU.sparse.realsize", &(1u64 << 62).to_string()),
        ]
        .concat();
        let mut bytes = pax_entry(b'x', &records);
        // The data: a map of one empty segment at the end (as GNU tar ends a map), padded to a block.
        bytes.extend_from_slice(&header_block(b"huge", b'0', 512));
        let mut map = format!("1\n{}\n0\n", 1u64 << 62).into_bytes();
        map.resize(512, 0);
        bytes.extend_from_slice(&map);
        bytes.resize(bytes.len() + 1024, 0);
        let limits = ReadLimits { max_bytes: 8 << 20, ..ReadLimits::UNBOUNDED };
        assert!(matches!(read_all(&bytes, limits), Err(ArchiveError::TooMuchData { limit, .. }) if limit == 8 << 20));
    }

    #[test]
    fn a_pax_size_near_u64_max_is_an_error_not_an_overflow() {
        // Past off_t, as GNU tar: refused as a record; within it, the framing overflows or runs out.
        for size in [u64::MAX, u64::MAX - 1, u64::MAX - 511, u64::MAX - 512, i64::MAX as u64, i64::MAX as u64 - 511] {
            let mut bytes = pax_entry(b'x', &pax_record("size", &size.to_string()));
            bytes.extend_from_slice(&header_block(b"big", b'0', 0));
            bytes.resize(bytes.len() + 4096, 0);
            let got = read_all(&bytes, ReadLimits::UNBOUNDED);
            assert!(
                matches!(
                    got,
                    Err(ArchiveError::SizeOverflow { .. }
                        | ArchiveError::Truncated { .. }
                        | ArchiveError::Ambiguous { .. })
                ),
                "{size}: {got:?}"
            );
        }
    }

    #[test]
    fn reading_stops_at_the_time_limit() {
        let mut bytes = header_block(b"f", b'0', 1 << 20).to_vec();
        bytes.resize(bytes.len() + (1 << 20) + 1024, 0);
        let limits = ReadLimits::new(u64::MAX, Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        assert!(matches!(read_all(&bytes, limits), Err(ArchiveError::TooSlow { .. })));
        assert_eq!(read_all(&bytes, ReadLimits::new(u64::MAX, Duration::from_secs(60))).expect("in time"), 1 << 20);
    }

    #[test]
    fn parses_numbers_strictly() {
        assert_eq!(parse_octal(b"0000644\0"), Some(0o644));
        assert_eq!(parse_octal(b"  755 \0"), Some(0o755));
        assert_eq!(parse_octal(b"12389\0"), None);
        assert_eq!(parse_numeric(b"\0\0\0\0\0\0\0\0"), Some(0));
        assert_eq!(parse_numeric(&[0x80, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0]), Some(2 << 32));
        assert_eq!(parse_numeric(&[0xff, 0xff]), None);
        assert_eq!(parse_decimal(b"123"), Some(123));
        assert_eq!(parse_decimal(b"99999999999999999999"), None);
        assert_eq!(parse_pax_time(b"1700000000.123456"), Some(1_700_000_000));
        assert_eq!(parse_pax_time(b"-5"), Some(-5));
    }
}
