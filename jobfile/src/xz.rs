//! The xz layer of a job file: one stream, decoded with a memory limit and
//! stopped at its end (what follows is zero padding), and the encoder settings.
//!
//! The decoder drives liblzma directly rather than through its `Read` adapter
//! so that every failure maps to its own error and we know exactly how many
//! compressed bytes the stream took.

use std::io::{self, Read};

use liblzma::stream::{Action, Check, Error as LzmaError, Filters, LzmaOptions, MtStreamBuilder, Status, Stream};
use thiserror::Error;

/// Default decoder memory limit: enough for every preset (`-9` needs 65 MiB),
/// far below what a hostile header could ask for.
pub const DEFAULT_MEMLIMIT: u64 = 256 << 20;
/// Default compression preset, as `tar -J` uses.
pub const DEFAULT_PRESET: u32 = 6;

#[derive(Debug, Error)]
pub enum XzError {
    #[error("not an xz file (no xz stream header)")]
    Format,
    #[error("the xz stream needs more than {limit} bytes of memory to decode (its dictionary is too large)")]
    MemLimit { limit: u64 },
    #[error("the xz stream is corrupt or truncated")]
    Corrupt,
    #[error("the xz stream uses options this decoder does not support")]
    Options,
    #[error("the xz stream ends before its end marker (file truncated)")]
    Truncated,
    #[error("cannot set up the xz {what}")]
    Setup { what: &'static str, source: LzmaError },
    #[error("cannot read the compressed input")]
    Read(#[source] io::Error),
}

impl From<XzError> for io::Error {
    fn from(e: XzError) -> Self {
        match e {
            XzError::Read(inner) => inner,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// Decodes one xz stream from `R`, stopping at its end marker.
pub struct XzReader<R> {
    inner: R,
    stream: Stream,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
    eof_in: bool,
    done: bool,
    memlimit: u64,
}

impl<R: Read> XzReader<R> {
    /// A decoder that refuses streams needing more than `memlimit` bytes.
    pub fn new(inner: R, memlimit: u64) -> Result<Self, XzError> {
        // Flags 0: one stream only (no CONCATENATED), so the padding after it is never read as data.
        let stream =
            Stream::new_stream_decoder(memlimit, 0).map_err(|source| XzError::Setup { what: "decoder", source })?;
        Ok(XzReader {
            inner,
            stream,
            buf: vec![0; 64 << 10].into_boxed_slice(),
            pos: 0,
            len: 0,
            eof_in: false,
            done: false,
            memlimit,
        })
    }

    /// Compressed bytes the stream has taken so far (all of it once at its end).
    pub fn compressed_len(&self) -> u64 {
        self.stream.total_in()
    }

    /// True once the stream's end marker has been read and checked.
    pub fn finished(&self) -> bool {
        self.done
    }

    fn map_error(&self, e: LzmaError) -> XzError {
        match e {
            LzmaError::Format => XzError::Format,
            LzmaError::MemLimit => XzError::MemLimit { limit: self.memlimit },
            LzmaError::Options => XzError::Options,
            // Corrupt data, a bad check, or padding where data should be.
            _ => XzError::Corrupt,
        }
    }

    fn read_xz(&mut self, out: &mut [u8]) -> Result<usize, XzError> {
        if self.done || out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pos == self.len && !self.eof_in {
                self.len = loop {
                    match self.inner.read(&mut self.buf) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(XzError::Read(e)),
                    }
                };
                self.pos = 0;
                self.eof_in = self.len == 0;
            }
            let action = if self.eof_in { Action::Finish } else { Action::Run };
            let (in_before, out_before) = (self.stream.total_in(), self.stream.total_out());
            let status = self.stream.process(&self.buf[self.pos..self.len], out, action);
            self.pos += (self.stream.total_in() - in_before) as usize;
            let produced = (self.stream.total_out() - out_before) as usize;
            match status {
                Ok(Status::StreamEnd) => {
                    self.done = true;
                    return Ok(produced);
                }
                Ok(_) if produced > 0 => return Ok(produced),
                Ok(_) if self.eof_in => return Err(XzError::Truncated),
                Ok(_) => continue,
                Err(e) => return Err(self.map_error(e)),
            }
        }
    }
}

impl<R: Read> Read for XzReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.read_xz(out).map_err(io::Error::from)
    }
}

/// Digs an [`XzError`] out of an `io::Error` that carried it through a `Read`.
pub fn xz_error_in(e: &io::Error) -> Option<&XzError> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<XzError>())
}

/// How to compress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    /// 0 (fastest) to 9 (smallest).
    pub preset: u32,
    /// Encoder threads; 1 gives the single-threaded encoder.
    pub threads: u32,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions { preset: DEFAULT_PRESET, threads: 1 }
    }
}

/// An xz encoder for the options: CRC64 check, like the `xz` command.
pub fn encoder(opts: EncodeOptions) -> Result<Stream, XzError> {
    let preset = opts.preset.min(9);
    let stream = if opts.threads > 1 {
        MtStreamBuilder::new().threads(opts.threads).preset(preset).check(Check::Crc64).encoder()
    } else {
        Stream::new_easy_encoder(preset, Check::Crc64)
    };
    stream.map_err(|source| XzError::Setup { what: "encoder", source })
}

/// An encoder for about `input` bytes whose output must fit in `capacity`.
/// The dictionary is at most the input's size (rounded up to a power of two,
/// at least 64 KiB): a larger one cannot help, and costs its memory and the
/// time to clear it. With threads, blocks are at most half the capacity (at
/// least 1 MiB), so output starts early enough to tell that it will not fit.
/// Also returns how much input the encoder may hold before its output shows
/// it (a block per thread; nothing to speak of single-threaded).
pub fn sized_encoder(opts: EncodeOptions, input: u64, capacity: u64) -> Result<(Stream, u64), XzError> {
    let setup = |source| XzError::Setup { what: "encoder", source };
    let preset = opts.preset.min(9);
    let mut lzma = LzmaOptions::new_preset(preset).map_err(setup)?;
    let full = lzma_dict_size(preset);
    let dict = input.clamp(64 << 10, u64::from(full)).next_power_of_two().min(u64::from(full)) as u32;
    lzma.dict_size(dict);
    let mut filters = Filters::new();
    filters.lzma2(&lzma);
    if opts.threads > 1 {
        // xz's own default block: three dictionaries (at least 1 MiB).
        let block = (3 * u64::from(dict)).max(1 << 20).min((capacity / 2).max(1 << 20));
        let stream = MtStreamBuilder::new()
            .threads(opts.threads)
            .filters(filters)
            .block_size(block)
            .check(Check::Crc64)
            .encoder()
            .map_err(setup)?;
        Ok((stream, block * u64::from(opts.threads)))
    } else {
        Ok((Stream::new_stream_encoder(&filters, Check::Crc64).map_err(setup)?, 0))
    }
}

/// The dictionary size of an xz preset (`xz --help`'s table).
fn lzma_dict_size(preset: u32) -> u32 {
    match preset {
        0 => 256 << 10,
        1 => 1 << 20,
        2 => 2 << 20,
        3 | 4 => 4 << 20,
        5 | 6 => 8 << 20,
        7 => 16 << 20,
        8 => 32 << 20,
        _ => 64 << 20,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use liblzma::write::XzEncoder;
    use std::io::Write;

    fn compress(data: &[u8], opts: EncodeOptions) -> Vec<u8> {
        let mut enc = XzEncoder::new_stream(Vec::new(), encoder(opts).expect("encoder"));
        enc.write_all(data).expect("compress");
        enc.finish().expect("finish")
    }

    fn decode_all(input: &[u8], memlimit: u64) -> Result<Vec<u8>, XzError> {
        let mut r = XzReader::new(input, memlimit)?;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match r.read_xz(&mut buf)? {
                0 => return Ok(out),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    #[test]
    fn stops_at_stream_end_and_ignores_padding() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for threads in [1, 2] {
            let mut file = compress(&data, EncodeOptions { preset: 1, threads });
            let stream_len = file.len() as u64;
            file.resize(file.len() + 10_000, 0);
            let mut r = XzReader::new(&file[..], DEFAULT_MEMLIMIT).expect("decoder");
            let mut out = Vec::new();
            r.read_to_end(&mut out).expect("decode");
            assert_eq!(out, data);
            assert!(r.finished());
            assert_eq!(r.compressed_len(), stream_len);
        }
    }

    #[test]
    fn each_bad_input_has_its_error() {
        let good = compress(b"hello world", EncodeOptions::default());
        assert!(matches!(decode_all(b"this is not xz at all, not even close", DEFAULT_MEMLIMIT), Err(XzError::Format)));
        assert!(matches!(decode_all(&[0u8; 4096], DEFAULT_MEMLIMIT), Err(XzError::Format)));
        assert!(matches!(decode_all(&good[..good.len() - 10], DEFAULT_MEMLIMIT), Err(XzError::Truncated)));
        // Truncated, then zero padding: the zeros are read as (bad) stream data.
        let mut padded = good[..good.len() - 12].to_vec();
        padded.resize(4096, 0);
        assert!(matches!(decode_all(&padded, DEFAULT_MEMLIMIT), Err(XzError::Corrupt)));
        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x55;
        assert!(matches!(decode_all(&flipped, DEFAULT_MEMLIMIT), Err(XzError::Corrupt | XzError::Options)));
        assert!(decode_all(&[], DEFAULT_MEMLIMIT).is_err());
    }

    #[test]
    fn a_preset_beyond_the_limit_is_refused() {
        let big = compress(b"x", EncodeOptions { preset: 9, threads: 1 });
        assert_eq!(decode_all(&big, DEFAULT_MEMLIMIT).expect("fits"), b"x");
        match decode_all(&big, 16 << 20) {
            Err(XzError::MemLimit { limit }) => assert_eq!(limit, 16 << 20),
            other => panic!("expected MemLimit, got {other:?}"),
        }
    }

    #[test]
    fn a_small_input_gets_a_dictionary_no_larger_than_itself() {
        let data: Vec<u8> = (0..30_000u32).map(|i| (i % 97) as u8).collect();
        for threads in [1, 2] {
            let (stream, _) =
                sized_encoder(EncodeOptions { preset: 9, threads }, data.len() as u64, 1 << 20).expect("encoder");
            let mut enc = XzEncoder::new_stream(Vec::new(), stream);
            enc.write_all(&data).expect("compress");
            let small = enc.finish().expect("finish");
            // Preset 9's own 64 MiB dictionary needs about 65 MiB to decode; this one fits in 1 MiB.
            assert_eq!(decode_all(&small, 1 << 20).expect("a 64 KiB dictionary"), data);
        }
        // A large input keeps the preset's dictionary.
        let (stream, held) = sized_encoder(EncodeOptions { preset: 6, threads: 2 }, 1 << 30, 1 << 30).expect("encoder");
        let mut enc = XzEncoder::new_stream(Vec::new(), stream);
        enc.write_all(b"x").expect("compress");
        let big = enc.finish().expect("finish");
        assert!(matches!(decode_all(&big, 4 << 20), Err(XzError::MemLimit { .. })));
        assert_eq!(held, 2 * (24 << 20), "two threads hold a block of three 8 MiB dictionaries each");
    }
}
