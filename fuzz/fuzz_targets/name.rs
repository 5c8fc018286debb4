//! Job file names: any bytes are classified without panicking, and every
//! accepted name prints back exactly as it was.
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use jobfile::name::{classify, Entry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Entry::Job(job) = classify(OsStr::from_bytes(data)) {
        assert_eq!(job.to_string().as_bytes(), data);
        assert!(job.name().len() <= 100 && !job.name().starts_with(['.', '-']));
        let done = job.done_file_name();
        let back = jobfile::JobName::parse_done(&done).expect("a done name parses");
        assert_eq!(back.input_file_name(), job.input_file_name());
    }
});
