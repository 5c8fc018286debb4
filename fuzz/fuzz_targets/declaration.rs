//! A job's declaration, as a stranger writes it: `construir.toml`, a
//! `debian/control`, a server's pin. Nothing panics; whatever is accepted
//! is in Debian's grammar (only the characters it allows reach apt), and a
//! declaration written back reads the same.
#![no_main]

use jobfile::deps::{build_depends, check_relation, Declaration, Resolution};
use libfuzzer_sys::fuzz_target;

fn in_grammar(r: &str) -> bool {
    r.chars().all(|c| c.is_ascii_alphanumeric() || c.is_whitespace() || "+-.:~()<>=|![]".contains(c))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(d) = Declaration::parse(text) {
        for r in &d.packages {
            assert!(check_relation(r).is_ok() && in_grammar(r), "{r:?}");
        }
        assert_eq!(Declaration::parse(&d.to_toml()).as_ref(), Ok(&d));
    }
    if let Ok(relations) = build_depends("debian/control", text) {
        for r in &relations {
            assert!(check_relation(r).is_ok() && in_grammar(r) && !r.contains(','), "{r:?}");
        }
    }
    if check_relation(text).is_ok() {
        assert!(in_grammar(text), "{text:?}");
    }
    if let Ok(res) = serde_json::from_slice::<Resolution>(data) {
        if res.check().is_ok() {
            for p in &res.install {
                assert!(p.sha256.len() == 64 && !p.filename.contains(".."), "{p:?}");
            }
        }
    }
});
