//! The bounded tar reader on arbitrary bytes: no panic and no overflow
//! whatever the sizes say, and never more data handed out than the byte
//! limit allows (holes of sparse entries included).
#![no_main]

use jobfile::{ArchiveReader, ReadLimits};
use libfuzzer_sys::fuzz_target;

const MAX_BYTES: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let limits = ReadLimits { max_bytes: MAX_BYTES, max_extensions: 32, max_meta_bytes: 4 << 20, max_time: None, unique_paths: true };
    let mut reader = ArchiveReader::new(data).with_limits(limits);
    let mut handed_out = 0u64;
    let mut buf = [0u8; 8192];
    while let Ok(Some(_)) = reader.next_entry() {
        loop {
            match reader.read_data(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    handed_out += n as u64;
                    assert!(handed_out <= MAX_BYTES, "{handed_out} bytes handed out past the limit");
                }
            }
        }
    }
});
