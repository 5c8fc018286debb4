//! One line per event to stderr, every message through the one sanitizer.
//! Three forms: `text` (time, level, message) for a terminal or a file;
//! under systemd, when stderr is the journal, no time of our own (the
//! journal keeps one) and a `<N>` syslog priority prefix that journald
//! turns into the line's priority; `json`, one object a line, for log
//! shippers.

use std::io::Write;
use std::os::fd::AsFd;
use std::time::SystemTime;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `journal` when stderr is systemd's journal, `text` otherwise.
    Auto,
    Text,
    Journal,
    Json,
}

struct Logger {
    format: LogFormat,
}

impl log::Log for Logger {
    fn enabled(&self, meta: &log::Metadata) -> bool {
        meta.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let line = format_line(self.format, record.level(), &record.args().to_string(), SystemTime::now());
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// One log line, newline included.
pub fn format_line(format: LogFormat, level: log::Level, message: &str, now: SystemTime) -> String {
    // Messages quote names and text from strangers.
    let message = jobfile::sanitize(message.as_bytes());
    match format {
        LogFormat::Journal => format!("<{}>{message}\n", syslog_priority(level)),
        LogFormat::Json => {
            let object = serde_json::json!({
                "time": jobfile::units::rfc3339(now),
                "level": level.as_str().to_ascii_lowercase(),
                "priority": syslog_priority(level),
                "message": message,
            });
            format!("{object}\n")
        }
        LogFormat::Text | LogFormat::Auto => {
            format!("{} {:<5} {message}\n", jobfile::units::rfc3339(now), level)
        }
    }
}

/// sd-daemon(3) priorities: error 3, warning 4, info 6, debug 7.
fn syslog_priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// True when stderr is systemd's journal: `JOURNAL_STREAM` names the
/// device and inode of the stream systemd connected, and stderr is it.
pub fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = value.split_once(':') else { return false };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else { return false };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

/// Installs the logger; `verbose` adds debug lines.
pub fn init(verbose: bool, format: LogFormat) {
    let format = match format {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journal,
        LogFormat::Auto => LogFormat::Text,
        other => other,
    };
    let _ = log::set_boxed_logger(Box::new(Logger { format }));
    log::set_max_level(if verbose { log::LevelFilter::Debug } else { log::LevelFilter::Info });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_format_carries_level_and_a_sanitized_message() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(86_400);
        let msg = "job x\u{1b}[2J_i0.tar.xz: done";
        assert_eq!(
            format_line(LogFormat::Text, log::Level::Info, msg, t),
            "1970-01-02T00:00:00Z INFO  job x\\x1b[2J_i0.tar.xz: done\n"
        );
        assert_eq!(format_line(LogFormat::Journal, log::Level::Warn, msg, t), "<4>job x\\x1b[2J_i0.tar.xz: done\n");
        assert_eq!(format_line(LogFormat::Journal, log::Level::Error, "e", t), "<3>e\n");
        let json: serde_json::Value =
            serde_json::from_str(&format_line(LogFormat::Json, log::Level::Debug, msg, t)).expect("one JSON object");
        assert_eq!(json["level"], "debug");
        assert_eq!(json["priority"], 7);
        assert_eq!(json["time"], "1970-01-02T00:00:00Z");
        assert_eq!(json["message"], "job x\\x1b[2J_i0.tar.xz: done");
    }
}
