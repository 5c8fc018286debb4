//! What the tar reader and its strict checks share: what an entry is, and
//! what can be wrong with an archive.

use std::io;
use std::time::Duration;

use thiserror::Error;

use crate::xz::XzError;

#[derive(Debug, Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Xz(XzError),
    #[error("cannot read the archive")]
    Read(#[source] io::Error),
    #[error("the tar archive is truncated at byte {offset}")]
    Truncated { offset: u64 },
    #[error("tar header at byte {offset} has a bad checksum (not a tar archive, or corrupt)")]
    BadChecksum { offset: u64 },
    #[error("tar header at byte {offset} has an unreadable {field}")]
    BadField { offset: u64, field: &'static str },
    #[error("{what} at byte {offset} is {size} bytes; the limit is {limit}")]
    MetadataTooLarge { what: &'static str, offset: u64, size: u64, limit: u64 },
    #[error("two {what} headers in a row at byte {offset}")]
    DuplicateExtension { what: &'static str, offset: u64 },
    #[error("malformed pax header at byte {offset}")]
    BadPax { offset: u64 },
    #[error("malformed sparse map at byte {offset}")]
    BadSparse { offset: u64 },
    #[error("unsupported sparse format {0} at byte {1} (GNU old sparse and pax 1.0 are supported)")]
    UnsupportedSparse(String, u64),
    #[error("more than {limit} bytes of extension headers in the archive (the reader's limit) at byte {offset}")]
    TooMuchMetadata { offset: u64, limit: u64 },
    #[error("more than {limit} {what} at byte {offset}")]
    TooManyExtensions { what: &'static str, offset: u64, limit: u64 },
    #[error("the archive produces more than {limit} bytes (the reader's limit) at byte {offset}")]
    TooMuchData { offset: u64, limit: u64 },
    #[error("reading the archive took longer than {} s (the reader's limit), at byte {offset}", limit.as_secs())]
    TooSlow { offset: u64, limit: Duration },
    #[error("entry at byte {offset} declares a size that does not fit in 64 bits once framed")]
    SizeOverflow { offset: u64 },
    #[error("the archive is ambiguous at byte {offset}: {what} (tar readers disagree on it)")]
    Ambiguous { offset: u64, what: String },
}

impl From<io::Error> for ArchiveError {
    fn from(e: io::Error) -> Self {
        if e.get_ref().is_some_and(|inner| inner.is::<ArchiveError>()) {
            if let Some(Ok(archive)) = e.into_inner().map(|inner| inner.downcast::<ArchiveError>()) {
                return *archive;
            }
            return ArchiveError::Read(io::Error::other("archive error lost in transit"));
        }
        if e.get_ref().is_some_and(|inner| inner.is::<XzError>()) {
            if let Some(Ok(xz)) = e.into_inner().map(|inner| inner.downcast::<XzError>()) {
                return ArchiveError::Xz(*xz);
            }
            return ArchiveError::Read(io::Error::other("xz error lost in transit"));
        }
        ArchiveError::Read(e)
    }
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Hardlink,
    CharDevice,
    BlockDevice,
    Fifo,
    /// Any other type flag (volume labels, multi-volume parts, vendor types).
    Other(u8),
}

impl Kind {
    pub(crate) fn from_flag(flag: u8) -> Kind {
        match flag {
            b'0' | b'\0' | b'7' | b'S' => Kind::File,
            b'1' => Kind::Hardlink,
            b'2' => Kind::Symlink,
            b'3' => Kind::CharDevice,
            b'4' => Kind::BlockDevice,
            b'5' | b'D' => Kind::Dir,
            b'6' => Kind::Fifo,
            other => Kind::Other(other),
        }
    }

    /// One letter, as `ls -l` and `tar -tv` show it.
    pub fn letter(self) -> char {
        match self {
            Kind::File => '-',
            Kind::Dir => 'd',
            Kind::Symlink => 'l',
            Kind::Hardlink => 'h',
            Kind::CharDevice => 'c',
            Kind::BlockDevice => 'b',
            Kind::Fifo => 'p',
            Kind::Other(_) => '?',
        }
    }
}
