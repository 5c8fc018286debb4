//! The VM's console as the host keeps it: the first part and the last part
//! of it within a fixed budget, through the one sanitizer (`jobfile::text`),
//! because it is written by a guest that may be hostile and read in people's
//! terminals.

use std::collections::VecDeque;

use jobfile::text::{Mode, Sanitizer};

/// Longest line kept whole; longer lines are cut into pieces of this size.
const MAX_LINE: usize = 4096;

#[derive(Debug)]
pub struct ConsoleLog {
    head: Vec<u8>,
    head_max: usize,
    tail: VecDeque<u8>,
    tail_max: usize,
    /// Bytes dropped between head and tail.
    dropped: u64,
    /// Bytes received from the guest, before cleaning.
    received: u64,
    line: Vec<u8>,
    sanitizer: Sanitizer,
    /// Gets what goes into the head as it arrives.
    live: Option<std::fs::File>,
}

impl ConsoleLog {
    /// Keeps at most `limit` bytes: three quarters from the start, a quarter from the end.
    pub fn new(limit: usize) -> Self {
        let head_max = limit / 4 * 3;
        ConsoleLog {
            head: Vec::new(),
            head_max,
            tail: VecDeque::new(),
            tail_max: limit - head_max,
            dropped: 0,
            received: 0,
            line: Vec::new(),
            sanitizer: Sanitizer::new(Mode::Lines),
            live: None,
        }
    }

    /// Also writes the kept start of the console to `file` as it arrives;
    /// once that part is full, one line says the rest comes with the result.
    pub fn write_live_to(&mut self, file: std::fs::File) {
        self.live = Some(file);
    }

    /// What is kept so far, as a log of its own (without the live copy):
    /// a debug job's log when its result is read while its VM runs on.
    pub fn snapshot(&self) -> ConsoleLog {
        ConsoleLog {
            head: self.head.clone(),
            head_max: self.head_max,
            tail: self.tail.clone(),
            tail_max: self.tail_max,
            dropped: self.dropped,
            received: self.received,
            line: self.line.clone(),
            sanitizer: self.sanitizer.clone(),
            live: None,
        }
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    /// Takes raw bytes from the guest.
    pub fn push(&mut self, bytes: &[u8]) {
        self.received += bytes.len() as u64;
        for &b in bytes {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= MAX_LINE {
                let line = std::mem::take(&mut self.line);
                let mut text = String::with_capacity(line.len());
                self.sanitizer.push(&line, &mut text);
                self.keep(text.as_bytes());
            }
        }
    }

    fn keep(&mut self, text: &[u8]) {
        let room = self.head_max.saturating_sub(self.head.len());
        let (to_head, rest) = text.split_at(room.min(text.len()));
        self.head.extend_from_slice(to_head);
        if let Some(live) = &mut self.live {
            use std::io::Write;
            let full = !rest.is_empty();
            let written = live.write_all(to_head).and_then(|()| {
                if full {
                    live.write_all(b"\n[construir-host: the live console stops here; the rest comes with the result]\n")
                } else {
                    Ok(())
                }
            });
            if full || written.is_err() {
                self.live = None;
            }
        }
        for &b in rest {
            if self.tail.len() == self.tail_max {
                self.tail.pop_front();
                self.dropped += 1;
            }
            if self.tail_max > 0 {
                self.tail.push_back(b);
            } else {
                self.dropped += 1;
            }
        }
    }

    /// The kept text, with a note where the middle was dropped, then `verdict`.
    pub fn finish(self, verdict: &str) -> Vec<u8> {
        let mut out = self.text();
        out.extend_from_slice(format!("{}{verdict}\n", jobfile::tools::VERDICT_PREFIX).as_bytes());
        out
    }

    /// The kept text, with a note where the middle was dropped, ending in a newline.
    pub fn text(mut self) -> Vec<u8> {
        let line = std::mem::take(&mut self.line);
        let mut text = String::new();
        self.sanitizer.push(&line, &mut text);
        self.sanitizer.finish(&mut text);
        if !text.is_empty() {
            self.keep(text.as_bytes());
            self.keep(b"\n");
        }
        let mut out = self.head;
        if self.dropped > 0 {
            out.extend_from_slice(
                format!("\n[construir-host: {} bytes of console output dropped here]\n", self.dropped).as_bytes(),
            );
            // Resume at a line start.
            let tail: Vec<u8> = self.tail.into_iter().collect();
            let start = tail.iter().position(|&b| b == b'\n').map_or(0, |p| p + 1);
            out.extend_from_slice(&tail[start..]);
        } else {
            out.extend(self.tail);
        }
        if !out.is_empty() && !out.ends_with(b"\n") {
            out.push(b'\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_sequences_are_neutralized() {
        let mut log = ConsoleLog::new(1 << 20);
        log.push(b"plain\r\n\x1b[2J\x1b]0;title\x07cleared\xc2\x9b31mC1\n\xff\xfebytes\n\xe2\x80");
        log.push(b"\xaesplit\n"); // U+202E, cut across two reads
        let out = String::from_utf8(log.finish("ok")).expect("utf8");
        assert_eq!(
            out,
            "plain\n\\x1b[2J\\x1b]0;title\\x07cleared\\u{9b}31mC1\n\\xff\\xfebytes\n\\u{202e}split\nconstruir-host: verdict: ok\n"
        );
        assert!(!out.bytes().any(|b| b == 0x1b || b == 0x07 || b == b'\r'));
    }

    #[test]
    fn a_flood_is_capped_keeping_head_and_tail() {
        let mut log = ConsoleLog::new(4000);
        for i in 0..100_000 {
            log.push(format!("line {i}\n").as_bytes());
        }
        assert!(log.received() > 700_000);
        let out = String::from_utf8(log.finish("failed: reasons")).expect("utf8");
        assert!(out.len() < 4000 + 200, "{} bytes", out.len());
        assert!(out.starts_with("line 0\nline 1\n"));
        assert!(out.contains("bytes of console output dropped here]"));
        assert!(out.ends_with("line 99999\nconstruir-host: verdict: failed: reasons\n"), "{}", &out[out.len() - 100..]);
    }

    #[test]
    fn the_live_copy_gets_the_kept_start_as_it_arrives_then_says_where_the_rest_is() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("live");
        let mut log = ConsoleLog::new(400);
        log.write_live_to(std::fs::File::create(&path).expect("create"));
        log.push(b"booting\n\x1b[2Jcleared\n");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "booting\n\\x1b[2Jcleared\n", "sanitized, at once");
        for i in 0..100 {
            log.push(format!("line {i}\n").as_bytes());
        }
        let live = std::fs::read_to_string(&path).expect("read");
        assert!(live.starts_with("booting\n") && live.len() < 400, "{live}");
        assert!(
            live.ends_with("[construir-host: the live console stops here; the rest comes with the result]\n"),
            "{live}"
        );
        log.push(b"more\n");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), live, "nothing after the note");
    }

    #[test]
    fn one_endless_line_is_cut_and_capped() {
        let mut log = ConsoleLog::new(10_000);
        log.push(&vec![b'x'; 5_000_000]);
        let out = log.finish("v");
        assert!(out.len() < 10_200);
    }
}
