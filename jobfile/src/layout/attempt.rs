//! A Slurm attempt's directory: the contract between the server, which
//! prepares it on a filesystem every node shares, and `run-one`, which a
//! node runs in it (`construir-host run-one ./<file> --attempt .`).
//!
//! ```text
//! <attempt>/<file>      the job file, as the server copied it
//! <attempt>/terms/      its terms, as running/ holds them (.pins/<file>.*)
//! <attempt>/run.sh      the batch script Slurm runs on the node
//! <attempt>/console     the live console, mirrored while the job runs
//! <attempt>/out/        the result, its .log and .intoto.jsonl; or <file>.reason and <file>.log
//! <attempt>/slurm.out   what the batch job printed (run-one's own errors)
//! <attempt>/exit        run-one's exit code, written last (none: Slurm stopped it)
//! ```
//!
//! A cancel is Slurm's own (`scancel`): it stops the batch job, which then
//! writes no `exit`, and the server ends the job as cancelled. Every node
//! can write the directory, so the server trusts nothing in it: it reads
//! each file beneath one descriptor, never through a link, within a bound,
//! and checks a copy of the result against the node's pinned key.

use std::path::{Path, PathBuf};

/// One attempt's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptDir {
    pub dir: PathBuf,
}

impl AttemptDir {
    pub const TERMS: &'static str = "terms";
    pub const SCRIPT: &'static str = "run.sh";
    pub const CONSOLE: &'static str = "console";
    pub const OUT: &'static str = "out";
    pub const SLURM_OUT: &'static str = "slurm.out";
    pub const EXIT: &'static str = "exit";

    pub fn at(dir: &Path) -> AttemptDir {
        AttemptDir { dir: dir.to_owned() }
    }

    /// Where the job file is copied.
    pub fn job(&self, file_name: &str) -> PathBuf {
        self.dir.join(file_name)
    }

    pub fn terms(&self) -> PathBuf {
        self.dir.join(Self::TERMS)
    }

    pub fn script(&self) -> PathBuf {
        self.dir.join(Self::SCRIPT)
    }

    pub fn console(&self) -> PathBuf {
        self.dir.join(Self::CONSOLE)
    }

    pub fn out(&self) -> PathBuf {
        self.dir.join(Self::OUT)
    }

    pub fn slurm_out(&self) -> PathBuf {
        self.dir.join(Self::SLURM_OUT)
    }
}
