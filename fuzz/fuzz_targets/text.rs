//! The one sanitizer: whatever the bytes, its output holds no control,
//! C1, bidi or other hidden character, sanitizing it again changes nothing,
//! and feeding it in two pieces gives what feeding it whole gives.
#![no_main]

use jobfile::text::{sanitize, sanitize_lines, Mode, Sanitizer};
use libfuzzer_sys::fuzz_target;

fn hidden(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(c as u32, 0xad | 0x061c | 0x180e | 0x200b..=0x200f | 0x2028..=0x202e | 0x2060..=0x206f | 0xfeff | 0xfff9..=0xfffb | 0xe0000..=0xe007f)
}

fuzz_target!(|data: &[u8]| {
    let line = sanitize(data);
    assert!(!line.chars().any(|c| hidden(c) || c == '\n' || c == '\t'), "{line:?}");
    assert_eq!(sanitize(line.as_bytes()), line);
    let lines = sanitize_lines(data);
    assert!(!lines.chars().any(hidden), "{lines:?}");
    assert_eq!(sanitize_lines(lines.as_bytes()), lines);
    let cut = data.first().map_or(0, |&b| b as usize % (data.len() + 1));
    let mut s = Sanitizer::new(Mode::Lines);
    let mut pieces = String::new();
    s.push(&data[..cut], &mut pieces);
    s.push(&data[cut..], &mut pieces);
    s.finish(&mut pieces);
    assert_eq!(pieces, lines);
});
