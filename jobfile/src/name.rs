//! Job file names: `<name>_i<image>.tar.xz` in the queue, `<name>_d<image>.tar.xz` when done.
//!
//! The rules are docs/DESIGN.md's. Parsing never trusts the input: every refusal says
//! which rule was broken, and the names it accepts are always safe as a single
//! path component on any filesystem we care about.

use std::ffi::OsStr;
use std::fmt;

use thiserror::Error;

/// Longest `<name>` part, in bytes (all allowed characters are ASCII).
pub const MAX_NAME_LEN: usize = 100;
/// Most digits an image number may have.
pub const MAX_IMAGE_DIGITS: usize = 9;
/// Every job file ends with this.
pub const SUFFIX: &str = ".tar.xz";

/// Whether a job is waiting to run (`_i`) or has a result (`_d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Input,
    Done,
}

impl Stage {
    fn letter(self) -> char {
        match self {
            Stage::Input => 'i',
            Stage::Done => 'd',
        }
    }
}

/// A parsed job file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobName {
    name: String,
    image: String,
    stage: Stage,
}

/// Why a file name is not a job name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("file name is not valid UTF-8")]
    NotUtf8,
    #[error("file name does not end in {SUFFIX}")]
    NoSuffix,
    #[error("file name has no _i<image> (or _d<image>) before {SUFFIX}")]
    NoImage,
    #[error("image number must be 1 to {MAX_IMAGE_DIGITS} decimal digits, not {0:?}")]
    BadImage(String),
    #[error("job name is empty")]
    EmptyName,
    #[error("job name is {0} characters long; the limit is {MAX_NAME_LEN}")]
    NameTooLong(usize),
    #[error("job name must not start with {0:?}")]
    BadStart(char),
    #[error("job name contains {0:?}; allowed are A-Z a-z 0-9 . _ -")]
    BadChar(char),
    #[error("expected a queued job (_i<image>), found a result (_d<image>)")]
    NotInput,
    #[error("expected a result (_d<image>), found a queued job (_i<image>)")]
    NotDone,
}

/// What a queue directory entry's name says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// An upload in progress (`.name`, `*.part`, `*.tmp`): leave it alone.
    InProgress,
    /// A well-formed job name.
    Job(JobName),
    /// Anything else: refuse it with this reason.
    Invalid(NameError),
}

/// Classifies a directory entry of the queue. Upload-in-progress names are
/// recognised before anything else, so a half-written file is never refused.
pub fn classify(file_name: &OsStr) -> Entry {
    let bytes = file_name.as_encoded_bytes();
    if bytes.starts_with(b".") || bytes.ends_with(b".part") || bytes.ends_with(b".tmp") {
        return Entry::InProgress;
    }
    match JobName::parse_os(file_name) {
        Ok(job) => Entry::Job(job),
        Err(e) => Entry::Invalid(e),
    }
}

/// Checks the `<name>` part alone (for `job pack --name`).
pub fn check_name(name: &str) -> Result<(), NameError> {
    let len = name.chars().count();
    if len == 0 {
        return Err(NameError::EmptyName);
    }
    if len > MAX_NAME_LEN {
        return Err(NameError::NameTooLong(len));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(NameError::BadChar(c));
    }
    match name.chars().next() {
        Some(c @ ('.' | '-')) => Err(NameError::BadStart(c)),
        _ => Ok(()),
    }
}

/// Checks an image number as written: 1 to 9 ASCII digits.
pub fn check_image(image: &str) -> Result<(), NameError> {
    if image.is_empty() || image.len() > MAX_IMAGE_DIGITS || !image.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NameError::BadImage(image.to_owned()));
    }
    Ok(())
}

impl JobName {
    /// A name for a new queued job, checked.
    pub fn new(name: &str, image: &str) -> Result<Self, NameError> {
        check_name(name)?;
        check_image(image)?;
        Ok(JobName { name: name.to_owned(), image: image.to_owned(), stage: Stage::Input })
    }

    /// Parses a file name that may be at either stage.
    pub fn parse(file_name: &str) -> Result<Self, NameError> {
        let stem = file_name.strip_suffix(SUFFIX).ok_or(NameError::NoSuffix)?;
        // The image marker is the last `_i` / `_d`: names may contain `_i` themselves.
        let at = stem.rfind(['_']).ok_or(NameError::NoImage)?;
        let (name, marker) = (&stem[..at], &stem[at + 1..]);
        let stage = match marker.chars().next() {
            Some('i') => Stage::Input,
            Some('d') => Stage::Done,
            _ => return Err(NameError::NoImage),
        };
        let image = &marker[1..];
        check_image(image)?;
        check_name(name)?;
        Ok(JobName { name: name.to_owned(), image: image.to_owned(), stage })
    }

    /// Parses an OS file name; anything not UTF-8 is refused.
    pub fn parse_os(file_name: &OsStr) -> Result<Self, NameError> {
        Self::parse(file_name.to_str().ok_or(NameError::NotUtf8)?)
    }

    /// Parses a queued job's name (`_i`), refusing results.
    pub fn parse_input(file_name: &str) -> Result<Self, NameError> {
        let job = Self::parse(file_name)?;
        match job.stage {
            Stage::Input => Ok(job),
            Stage::Done => Err(NameError::NotInput),
        }
    }

    /// Parses a result's name (`_d`), refusing queued jobs.
    pub fn parse_done(file_name: &str) -> Result<Self, NameError> {
        let job = Self::parse(file_name)?;
        match job.stage {
            Stage::Done => Ok(job),
            Stage::Input => Err(NameError::NotDone),
        }
    }

    /// The `<name>` part.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The image number exactly as written (leading zeros kept).
    pub fn image(&self) -> &str {
        &self.image
    }

    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The same job at another stage: only the `i`/`d` letter changes.
    pub fn at(&self, stage: Stage) -> JobName {
        JobName { stage, ..self.clone() }
    }

    /// `<name>_i<image>.tar.xz`
    pub fn input_file_name(&self) -> String {
        self.at(Stage::Input).to_string()
    }

    /// `<name>_d<image>.tar.xz`
    pub fn done_file_name(&self) -> String {
        self.at(Stage::Done).to_string()
    }

    /// The result's name with another extension in place of `.tar.xz`
    /// (`<name>_d<image>.log`, `.reason`).
    pub fn done_with_extension(&self, ext: &str) -> String {
        format!("{}_d{}.{ext}", self.name, self.image)
    }
}

impl fmt::Display for JobName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{}{}{SUFFIX}", self.name, self.stage.letter(), self.image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn accepts_well_formed_names() {
        let table = [
            ("hello_i100.tar.xz", "hello", "100", Stage::Input),
            ("hello_d100.tar.xz", "hello", "100", Stage::Done),
            ("a_i1.tar.xz", "a", "1", Stage::Input),
            ("my.job-2_x_i007.tar.xz", "my.job-2_x", "007", Stage::Input),
            ("name_i5_i123456789.tar.xz", "name_i5", "123456789", Stage::Input),
            ("_lead_i3.tar.xz", "_lead", "3", Stage::Input),
        ];
        for (file, name, image, stage) in table {
            let job = JobName::parse(file).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!((job.name(), job.image(), job.stage()), (name, image, stage), "{file}");
            assert_eq!(job.to_string(), file, "round trip of {file}");
        }
    }

    #[test]
    fn refuses_each_broken_rule_with_its_reason() {
        let long = format!("{}_i1.tar.xz", "x".repeat(101));
        let table: Vec<(&str, NameError)> = vec![
            ("hello_i100.tar.gz", NameError::NoSuffix),
            ("hello.tar.xz", NameError::NoImage),
            ("hello_x100.tar.xz", NameError::NoImage),
            ("hello_i.tar.xz", NameError::BadImage(String::new())),
            ("hello_i1234567890.tar.xz", NameError::BadImage("1234567890".into())),
            ("hello_i12a.tar.xz", NameError::BadImage("12a".into())),
            ("hello_i+1.tar.xz", NameError::BadImage("+1".into())),
            ("_i100.tar.xz", NameError::EmptyName),
            (long.as_str(), NameError::NameTooLong(101)),
            ("-rf_i1.tar.xz", NameError::BadStart('-')),
            ("he llo_i1.tar.xz", NameError::BadChar(' ')),
            ("a/b_i1.tar.xz", NameError::BadChar('/')),
            ("ünï_i1.tar.xz", NameError::BadChar('ü')),
            ("a\nb_i1.tar.xz", NameError::BadChar('\n')),
        ];
        for (file, want) in table {
            assert_eq!(JobName::parse(file), Err(want), "{file:?}");
        }
        assert_eq!(JobName::parse_input("a_d1.tar.xz"), Err(NameError::NotInput));
        assert_eq!(JobName::parse_done("a_i1.tar.xz"), Err(NameError::NotDone));
    }

    #[test]
    fn a_hundred_characters_is_the_limit() {
        let name = "x".repeat(100);
        assert!(JobName::new(&name, "1").is_ok());
        assert_eq!(JobName::new(&format!("{name}y"), "1"), Err(NameError::NameTooLong(101)));
    }

    #[test]
    fn classify_leaves_uploads_in_progress_alone() {
        for name in [".hello_i1.tar.xz", "hello_i1.tar.xz.part", "hello_i1.tar.xz.tmp", ".", ".."] {
            assert_eq!(classify(OsStr::new(name)), Entry::InProgress, "{name}");
        }
        assert!(matches!(classify(OsStr::new("hello_i1.tar.xz")), Entry::Job(_)));
        assert_eq!(classify(OsStr::from_bytes(b"bad\xff_i1.tar.xz")), Entry::Invalid(NameError::NotUtf8));
        assert_eq!(classify(OsStr::new("notes.txt")), Entry::Invalid(NameError::NoSuffix));
    }

    #[test]
    fn done_name_changes_only_the_stage_letter() {
        let job = JobName::parse("x_i_i42.tar.xz").expect("valid");
        assert_eq!(job.done_file_name(), "x_i_d42.tar.xz");
        assert_eq!(job.done_with_extension("log"), "x_i_d42.log");
        assert_eq!(JobName::parse(&job.done_file_name()).expect("valid").input_file_name(), "x_i_i42.tar.xz");
    }
}
