//! The packer over generated trees: the input is a little program that
//! builds a directory (files, directories, symlinks, hardlinks); the tree is
//! packed within a budget and, when it fits, read back and unpacked to the
//! same tree. When it does not fit, the size it needed is over the budget.
#![no_main]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use jobfile::xz::{EncodeOptions, DEFAULT_MEMLIMIT};
use jobfile::{PackError, PackOptions, UnpackOptions};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 8] = ["a", "b", "dir", "x.txt", "bin", "..a", "lnk", "é"];
const BUDGET: u64 = 64 << 10;

fn build(data: &[u8], root: &Path) {
    let mut dirs = vec![root.to_path_buf()];
    let mut files: Vec<PathBuf> = Vec::new();
    for op in data.chunks(3) {
        let [kind, name, arg] = [op[0], *op.get(1).unwrap_or(&0), *op.get(2).unwrap_or(&0)];
        let parent = dirs[usize::from(arg) % dirs.len()].clone();
        let path = parent.join(NAMES[usize::from(name) % NAMES.len()]);
        if fs::symlink_metadata(&path).is_ok() {
            continue;
        }
        match kind % 4 {
            0 => {
                if fs::create_dir(&path).is_ok() {
                    dirs.push(path);
                }
            }
            1 => {
                let body: Vec<u8> = (0..usize::from(arg) * 37).map(|i| (i as u8).wrapping_mul(name)).collect();
                if fs::write(&path, body).is_ok() {
                    files.push(path);
                }
            }
            2 => {
                let target = NAMES[usize::from(arg) % NAMES.len()];
                let _ = symlink(target, &path);
            }
            _ => {
                if let Some(existing) = files.get(usize::from(arg) % files.len().max(1)) {
                    let _ = fs::hard_link(existing, &path);
                }
            }
        }
    }
}

/// Every path below `dir` with what it is and holds.
fn describe(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).expect("read") {
            let entry = entry.expect("entry");
            let rel = entry.path().strip_prefix(dir).expect("below").to_path_buf();
            let ft = entry.file_type().expect("type");
            let what = if ft.is_symlink() {
                format!("link {:?}", fs::read_link(entry.path()).expect("readlink"))
            } else if ft.is_dir() {
                stack.push(entry.path());
                "dir".to_owned()
            } else {
                format!("file {:?}", fs::read(entry.path()).expect("read"))
            };
            out.insert(rel, what);
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let root = std::env::temp_dir().join(format!("construir-fuzz-pack-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    let (src, dst) = (root.join("src"), root.join("dst"));
    fs::create_dir_all(&src).expect("src");
    fs::create_dir_all(&dst).expect("dst");
    build(data, &src);
    let opts = PackOptions { encode: EncodeOptions { preset: 0, threads: 1 }, ..Default::default() };
    match jobfile::pack_dir(&src, Vec::new(), BUDGET, &opts) {
        Ok((report, packed)) => {
            assert_eq!(report.compressed_len, packed.len() as u64);
            assert!(packed.len() as u64 <= BUDGET);
            let mut archive = jobfile::read_job(&packed[..], DEFAULT_MEMLIMIT).expect("our own stream reads");
            let unpack = UnpackOptions { max_entries: 10_000, max_bytes: 1 << 30, preserve_owner: false, keep_special_bits: true, umask: 0 };
            let result = jobfile::unpack(&mut archive, &dst, &unpack).expect("our own archive unpacks");
            // Links that lead outside (like "..a" is not; "../x" would be) are the only skips.
            let mut want = describe(&src);
            for s in &result.skipped {
                want.remove(Path::new(&s.path));
            }
            assert_eq!(describe(&dst), want);
        }
        Err(PackError::TooLarge { needed, capacity, .. }) => assert!(needed > capacity),
        Err(e) => panic!("packing a tree we built failed: {e}"),
    }
});
