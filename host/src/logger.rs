//! One line per event to stderr: time, level, message (sanitized). Job lines name the job.

use std::io::Write;
use std::time::SystemTime;

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, meta: &log::Metadata) -> bool {
        meta.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let now = jobfile::status::rfc3339(SystemTime::now());
            // Every line through the one sanitizer: messages quote names and text from strangers.
            let message = jobfile::sanitize(record.args().to_string().as_bytes());
            let _ = writeln!(std::io::stderr().lock(), "{now} {:<5} {message}", record.level());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger; `verbose` adds debug lines.
pub fn init(verbose: bool) {
    static LOGGER: Logger = Logger;
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(if verbose { log::LevelFilter::Debug } else { log::LevelFilter::Info });
}
