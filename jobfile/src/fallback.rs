//! The fallback archive: when `/job` does not fit the job file, the submitter
//! still gets `job_status.json` and the end of `job_output.txt`, in at most
//! 64 KiB, which every job file has (smaller ones are refused).

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

use liblzma::write::XzEncoder;

use crate::xz::{encoder, EncodeOptions};
use crate::{zero, OUTPUT_FILE, STATUS_FILE};

/// The fallback archive always fits in this many bytes.
pub const FALLBACK_MAX: u64 = 64 << 10;
/// The most output text it starts from; less if that does not fit compressed.
pub const FALLBACK_TAIL: usize = 48 << 10;

/// Builds the fallback archive from the status and the tail of the output,
/// shortening the tail until the stream fits `min(capacity, FALLBACK_MAX)`.
/// Returns the stream and how many output bytes it kept.
pub fn build(status_json: &[u8], output_tail: &[u8], capacity: u64) -> io::Result<(Vec<u8>, usize)> {
    let budget = capacity.min(FALLBACK_MAX);
    let mut keep = output_tail.len().min(FALLBACK_TAIL);
    loop {
        let tail = &output_tail[output_tail.len() - keep..];
        let stream = compress(status_json, tail)?;
        if stream.len() as u64 <= budget {
            return Ok((stream, keep));
        }
        if keep == 0 {
            return Err(io::Error::other(format!(
                "even the status alone needs {} bytes; the job file holds {capacity}",
                stream.len()
            )));
        }
        keep /= 2;
    }
}

/// Writes a fallback stream at the start of `file` and zeroes the rest.
pub fn write_onto(file: &mut File, stream: &[u8]) -> io::Result<()> {
    let capacity = zero::capacity(file)?;
    file.write_all_at(stream, 0)?;
    zero::zero_range(file, stream.len() as u64, capacity)?;
    file.sync_all()
}

fn compress(status_json: &[u8], tail: &[u8]) -> io::Result<Vec<u8>> {
    let stream = encoder(EncodeOptions::default()).map_err(io::Error::other)?;
    let mut tar = tar::Builder::new(XzEncoder::new_stream(Vec::new(), stream));
    for (name, data) in [(STATUS_FILE, status_json), (OUTPUT_FILE, tail)] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        tar.append_data(&mut h, name, data)?;
    }
    let mut xz = tar.into_inner()?;
    xz.flush()?;
    xz.finish()
}
