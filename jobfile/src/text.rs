//! The one sanitizer for every byte a guest or a submitter wrote that is
//! shown to a person: archive paths, console logs, `job log` on a terminal,
//! status strings, QEMU's stderr, `.reason` files, error messages and the
//! host's own log. Two versions of this would drift apart, and the weaker
//! one would become the hole.
//!
//! What it neutralizes, each shown as a visible escape so nothing vanishes
//! unseen: C0 controls and DEL (`\x1b`), C1 controls (U+0080 to U+009F),
//! bidi overrides and isolates and other invisible format characters
//! (`\u{202e}`), line and paragraph separators, and invalid UTF-8, byte by
//! byte (`\xff`; raw 0x80-0x9F bytes are invalid UTF-8 on their own).
//! The output holds none of these, so sanitizing twice changes nothing:
//! every sink may apply it without caring what was cleaned before.
//! In `Lines` mode newline and tab are kept and a CR right before a newline
//! (a serial console's line end) is dropped.

/// Whether newlines and tabs are text or something to escape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One line: every control character is escaped (names, reasons, log lines).
    Line,
    /// Multi-line text: newline and tab kept, CR LF becomes LF (logs, job output).
    Lines,
}

/// Sanitizes a whole byte string for one line of display.
pub fn sanitize(bytes: &[u8]) -> String {
    whole(bytes, Mode::Line)
}

/// Sanitizes multi-line text (newlines and tabs kept).
pub fn sanitize_lines(bytes: &[u8]) -> String {
    whole(bytes, Mode::Lines)
}

fn whole(bytes: &[u8], mode: Mode) -> String {
    let mut s = Sanitizer::new(mode);
    let mut out = String::with_capacity(bytes.len());
    s.push(bytes, &mut out);
    s.finish(&mut out);
    out
}

/// How much of an archive path reports and errors show: a pax path may be
/// a megabyte, and a hundred of them must not cost hundreds of megabytes.
pub const SHOWN_PATH_MAX: usize = 512;

/// Sanitizes at most `max` bytes of `bytes`, saying how many more there were.
pub fn sanitize_capped(bytes: &[u8], max: usize) -> String {
    if bytes.len() <= max {
        return sanitize(bytes);
    }
    format!("{}... ({} more bytes)", sanitize(&bytes[..max]), bytes.len() - max)
}

/// A streaming sanitizer: input may arrive in pieces that split a UTF-8
/// sequence or a CR LF pair; the result is the same as for the whole.
#[derive(Debug, Clone)]
pub struct Sanitizer {
    mode: Mode,
    /// An incomplete UTF-8 sequence (at most 3 bytes) from the previous piece.
    partial: Vec<u8>,
    /// A CR held back to see whether a newline follows.
    cr: bool,
}

impl Sanitizer {
    pub fn new(mode: Mode) -> Self {
        Sanitizer { mode, partial: Vec::new(), cr: false }
    }

    /// Appends the sanitized form of `bytes` to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut String) {
        let joined;
        let mut input = bytes;
        if !self.partial.is_empty() {
            // At most 3 held bytes: an incomplete sequence from the last piece.
            let mut held = std::mem::take(&mut self.partial);
            held.extend_from_slice(bytes);
            joined = held;
            input = &joined;
        }
        loop {
            match std::str::from_utf8(input) {
                Ok(s) => {
                    for c in s.chars() {
                        self.char(c, out);
                    }
                    return;
                }
                Err(e) => {
                    let (good, rest) = input.split_at(e.valid_up_to());
                    for c in std::str::from_utf8(good).expect("valid prefix").chars() {
                        self.char(c, out);
                    }
                    match e.error_len() {
                        Some(n) => {
                            for &b in &rest[..n] {
                                self.byte(b, out);
                            }
                            input = &rest[n..];
                        }
                        None => {
                            // Incomplete at the end: wait for the next piece.
                            self.partial = rest.to_vec();
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Flushes what is held back (an incomplete sequence is escaped).
    pub fn finish(&mut self, out: &mut String) {
        for b in std::mem::take(&mut self.partial) {
            self.byte(b, out);
        }
        if std::mem::take(&mut self.cr) {
            out.push_str("\\r");
        }
    }

    fn char(&mut self, c: char, out: &mut String) {
        if std::mem::take(&mut self.cr) && c != '\n' {
            out.push_str("\\r");
        }
        match c {
            '\n' | '\t' if self.mode == Mode::Lines => out.push(c),
            '\r' if self.mode == Mode::Lines => self.cr = true,
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if is_hidden(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }

    fn byte(&mut self, b: u8, out: &mut String) {
        if std::mem::take(&mut self.cr) {
            out.push_str("\\r");
        }
        out.push_str(&format!("\\x{b:02x}"));
    }
}

/// C1 controls, format characters (bidi, zero-width, tags) and separators:
/// all invisible or able to reorder what a reader sees.
fn is_hidden(c: char) -> bool {
    matches!(c as u32,
        0x80..=0x9f
        | 0xad
        | 0x061c
        | 0x180e
        | 0x200b..=0x200f
        | 0x2028..=0x202e
        | 0x2060..=0x206f
        | 0xfeff
        | 0xfff9..=0xfffb
        | 0xe0000..=0xe007f
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_table() {
        let table: [(&[u8], &str); 11] = [
            (b"plain name_i1.tar.xz", "plain name_i1.tar.xz"),
            (b"a\x1b[2Jb", "a\\x1b[2Jb"),
            (b"bell\x07del\x7f", "bell\\x07del\\x7f"),
            (b"two\nlines\r\ttab", "two\\nlines\\r\\ttab"),
            ("c1 \u{9b}31m".as_bytes(), "c1 \\u{9b}31m"),
            (b"raw c1 \x9b31m", "raw c1 \\x9b31m"),
            ("rtl \u{202e}gpj.exe".as_bytes(), "rtl \\u{202e}gpj.exe"),
            ("isolate \u{2066}x\u{2069}".as_bytes(), "isolate \\u{2066}x\\u{2069}"),
            ("zero\u{200b}width\u{feff}".as_bytes(), "zero\\u{200b}width\\u{feff}"),
            (b"bad \xff\xfe utf8", "bad \\xff\\xfe utf8"),
            ("kept: é ü 漢字 🦀".as_bytes(), "kept: é ü 漢字 🦀"),
        ];
        for (input, want) in table {
            assert_eq!(sanitize(input), want, "{input:?}");
        }
    }

    #[test]
    fn lines_keep_newlines_tabs_and_drop_crlf_crs() {
        assert_eq!(sanitize_lines(b"a\r\nb\tc\rd\n\x1b]0;t\x07"), "a\nb\tc\\rd\n\\x1b]0;t\\x07");
    }

    #[test]
    fn pieces_give_the_same_result_as_the_whole() {
        let whole = "é漢🦀\r\nx\u{202e}y\r".as_bytes().iter().chain(b"\xff\xe6\x97z").copied().collect::<Vec<u8>>();
        let want = sanitize_lines(&whole);
        for cut in 0..whole.len() {
            for cut2 in cut..whole.len() {
                let mut s = Sanitizer::new(Mode::Lines);
                let mut out = String::new();
                s.push(&whole[..cut], &mut out);
                s.push(&whole[cut..cut2], &mut out);
                s.push(&whole[cut2..], &mut out);
                s.finish(&mut out);
                assert_eq!(out, want, "cut at {cut}, {cut2}");
            }
        }
    }

    #[test]
    fn output_never_holds_a_control_or_format_character() {
        let all: Vec<u8> = (0..=255u8).collect();
        for out in [sanitize(&all), sanitize_lines(&all)] {
            assert!(!out.chars().any(|c| (c.is_control() && c != '\n' && c != '\t') || is_hidden(c)), "{out}");
        }
    }

    #[test]
    fn sanitizing_twice_changes_nothing() {
        let all: Vec<u8> = (0..=255u8).chain("\u{202e}é".bytes()).collect();
        let once = sanitize(&all);
        assert_eq!(sanitize(once.as_bytes()), once);
        let lines = sanitize_lines(&all);
        assert_eq!(sanitize_lines(lines.as_bytes()), lines);
    }

    #[test]
    fn capped_says_how_much_was_left_out() {
        assert_eq!(sanitize_capped(b"abcdef", 3), "abc... (3 more bytes)");
        assert_eq!(sanitize_capped(b"abc", 3), "abc");
    }
}
