//! Embeds config/guest/ (the files baked into Debian images) into image-builder,
//! so the binary needs no checkout at run time.

use std::fmt::Write;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn walk(dir: &Path, base: &Path, out: &mut Vec<(String, PathBuf, u32)>) {
    let mut entries: Vec<_> =
        fs::read_dir(dir).expect("config/guest is readable").map(|e| e.expect("entry").path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, base, out);
        } else {
            let rel = path.strip_prefix(base).expect("below base").to_string_lossy().into_owned();
            let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
            out.push((rel, path.canonicalize().expect("canonical"), mode));
        }
    }
}

fn main() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/guest");
    println!("cargo:rerun-if-changed={}", base.display());
    let mut files = Vec::new();
    walk(&base, &base, &mut files);
    let mut code = String::from("/// (path in the image, contents, mode) for every file of config/guest/.\npub const GUEST_FILES: &[(&str, &[u8], u32)] = &[\n");
    for (rel, abs, mode) in &files {
        writeln!(code, "    ({rel:?}, include_bytes!({:?}), 0o{mode:o}),", abs.display().to_string())
            .expect("write to string");
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("guest_files.rs");
    fs::write(out, code).expect("write guest_files.rs");
}
