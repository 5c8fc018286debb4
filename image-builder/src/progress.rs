//! Progress through a build's stages, each line with the time since the
//! build began, and each stage's own time when it ends.

use std::time::{Duration, Instant};

/// The stages of one build, named up front so each line says `k/N`.
pub struct Progress {
    started: Instant,
    stages: &'static [&'static str],
    current: Option<(usize, Instant)>,
}

impl Progress {
    pub fn new(stages: &'static [&'static str]) -> Progress {
        Progress { started: Instant::now(), stages, current: None }
    }

    /// Ends the current stage (saying how long it took) and starts `name`.
    pub fn stage(&mut self, name: &str, what: impl std::fmt::Display) {
        self.end_current();
        let k = self.stages.iter().position(|s| *s == name).expect("a stage named up front");
        eprintln!("{}", self.line(&format!("{}/{} {name}: {what}", k + 1, self.stages.len())));
        self.current = Some((k, Instant::now()));
    }

    /// A line inside the current stage.
    pub fn note(&self, what: impl std::fmt::Display) {
        eprintln!("{}", self.line(&format!("  {what}")));
    }

    /// Ends the last stage; the whole build's time.
    pub fn finish(&mut self) -> Duration {
        self.end_current();
        self.started.elapsed()
    }

    fn end_current(&mut self) {
        if let Some((k, since)) = self.current.take() {
            eprintln!("{}", self.line(&format!("  {} took {:.1} s", self.stages[k], since.elapsed().as_secs_f64())));
        }
    }

    fn line(&self, text: &str) -> String {
        format!("image-builder: [{:>6.1} s] {text}", self.started.elapsed().as_secs_f64())
    }
}
