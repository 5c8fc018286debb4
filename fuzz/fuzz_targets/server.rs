//! What construir-server parses from clients and hosts, before any handler
//! acts on it: byte ranges, tokens, job ids, job names and images from a
//! submission's query, a host's lease request, and the page's sign-in
//! headers. Any bytes are taken without panicking, and whatever passes
//! each check is what the server may safely store and show.
#![no_main]

use construir_server::http::{self, page};
use construir_server::auth;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for len in [0u64, 1, 4096, u64::MAX] {
        if let Some((start, end)) = http::parse_range(&text, len) {
            assert!(start < end && end <= len, "{text:?} on {len}: {start}..{end}");
        }
    }
    if let Some(id) = auth::account_of(&text) {
        assert!(text.starts_with("cst1.") && text.ends_with(|c: char| c.is_ascii_hexdigit()), "{id}");
    }
    if auth::is_job_id(&text) {
        assert!(text.len() == 16 && !text.contains(['/', '.']));
    }
    // A submission's name and image, as the query gives them (split at the first NUL).
    let (name, image) = text.split_once('\0').unwrap_or((&text, "0"));
    if let Ok(job) = jobfile::JobName::new(name, image) {
        let back = jobfile::JobName::parse(&job.input_file_name()).expect("an accepted name parses back");
        assert_eq!(back.name(), job.name());
        assert!(!job.input_file_name().contains('/'));
    }
    // A host's lease request: what passes the check is bounded, plain and printable.
    if let Ok(req) = serde_json::from_slice::<wire::LeaseRequest>(data) {
        if req.check().is_ok() {
            assert!(req.images.len() <= wire::MAX_HOST_IMAGES);
            for i in &req.images {
                assert!(i.name.bytes().all(|b| b.is_ascii_digit()) && i.checksum.len() == 64);
                assert_eq!(jobfile::sanitize(i.checksum.as_bytes()), i.checksum);
            }
            assert_eq!(jobfile::sanitize(req.version.as_bytes()), req.version);
        }
    }
    // The page's sign-in: whatever headers come, the check answers.
    let mut headers = axum::http::HeaderMap::new();
    for line in text.lines().take(8) {
        if let Some((k, v)) = line.split_once(':') {
            if let (Ok(k), Ok(v)) =
                (axum::http::HeaderName::from_bytes(k.trim().as_bytes()), axum::http::HeaderValue::from_str(v.trim()))
            {
                headers.append(k, v);
            }
        }
    }
    let _ = page::same_origin(&headers);
});
