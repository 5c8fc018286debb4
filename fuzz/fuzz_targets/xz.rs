//! The bounded xz decoder: any bytes give data or an error, never a panic,
//! and never more memory than the limit.
#![no_main]

use std::io::Read;

use jobfile::XzReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut reader) = XzReader::new(data, 32 << 20) else { return };
    let mut out = Vec::new();
    let _ = (&mut reader).take(8 << 20).read_to_end(&mut out);
});
