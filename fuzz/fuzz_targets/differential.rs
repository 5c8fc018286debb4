//! The result reader against GNU tar (`jobfile::tardiff`): on any bytes,
//! either the reader refuses them or `tar -x` extracts exactly the names
//! and contents the reader lists. Each run extracts into a scratch
//! directory of this process's own.
#![no_main]

use jobfile::tardiff::check;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let scratch = std::env::temp_dir().join(format!("construir-tardiff.{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch directory");
    if let Err(why) = check(data, &scratch) {
        panic!("the reader and GNU tar disagree: {why}");
    }
});
