//! The tar reader and the safe unpacker on arbitrary tar bytes: no panic, and
//! after every input nothing exists outside the target directory and every
//! symlink inside it stays inside.
#![no_main]

use std::fs;
use std::path::{Path, PathBuf};

use jobfile::unpack::link_stays_inside;
use jobfile::{ArchiveReader, ReadLimits, UnpackOptions};
use libfuzzer_sys::fuzz_target;

fn sandbox() -> PathBuf {
    std::env::temp_dir().join(format!("construir-fuzz-unpack-{}", std::process::id()))
}

fn check_links(dir: &Path, depth: usize) {
    for entry in fs::read_dir(dir).expect("read target") {
        let entry = entry.expect("entry");
        let ft = entry.file_type().expect("type");
        if ft.is_symlink() {
            let target = fs::read_link(entry.path()).expect("readlink");
            assert!(link_stays_inside(target.as_os_str().as_encoded_bytes(), depth), "{:?} -> {target:?}", entry.path());
        } else if ft.is_dir() {
            check_links(&entry.path(), depth + 1);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let root = sandbox();
    let _ = fs::remove_dir_all(&root);
    let target = root.join("target");
    fs::create_dir_all(&target).expect("sandbox");
    let opts = UnpackOptions { max_entries: 1000, max_bytes: 16 << 20, preserve_owner: false, keep_special_bits: false, umask: 0o022 };
    let limits = ReadLimits { max_bytes: 32 << 20, max_extensions: 64, max_meta_bytes: 4 << 20, max_time: None, unique_paths: false };
    let _ = jobfile::unpack(&mut ArchiveReader::new(data).with_limits(limits), &target, &opts);
    let names: Vec<_> = fs::read_dir(&root).expect("sandbox").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(names, ["target"], "something was written outside the target");
    check_links(&target, 0);
});
