//! A real one-node Slurm cluster for the tests: `scripts/slurm-cluster`
//! (Debian's slurm-wlm and munge, on loopback, in a directory of its own),
//! the same the bench starts. Every Slurm command a test or the server runs
//! reaches it through `SLURM_CONF`. Its jobs are cancelled and its daemons
//! stopped when it is dropped.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Cluster {
    pub dir: PathBuf,
    /// The file `SLURM_CONF` names.
    pub conf: PathBuf,
}

/// The node's name, as Slurm and the server show it.
pub const NODE: &str = "node1";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/slurm-cluster")
}

impl Cluster {
    /// Starts the cluster under `dir`; returns once its node is idle.
    pub fn start(dir: &Path) -> Cluster {
        let out = Command::new(script()).arg("start").arg(dir).output().expect("scripts/slurm-cluster");
        assert!(out.status.success(), "the Slurm cluster did not start: {}", String::from_utf8_lossy(&out.stderr));
        let conf = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Cluster { dir: conf.parent().expect("its directory").to_owned(), conf }
    }

    /// A Slurm command against this cluster: its stdout, or its stderr as the error.
    pub fn run(&self, tool: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new(tool).args(args).env("SLURM_CONF", &self.conf).output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The Slurm job named `name` as `squeue` has it: (id, state, node).
    pub fn job_named(&self, name: &str) -> Option<(String, String, String)> {
        let out = self.run("squeue", &["-h", "-n", name, "-o", "%i|%T|%N"]).ok()?;
        let mut parts = out.lines().next()?.split('|');
        Some((parts.next()?.to_owned(), parts.next()?.to_owned(), parts.next().unwrap_or("").to_owned()))
    }

    /// The daemons' logs, for a failure's message.
    pub fn logs(&self) -> String {
        ["slurmctld.log", "slurmd.log"]
            .iter()
            .map(|f| format!("--- {f}\n{}", fs::read_to_string(self.dir.join(f)).unwrap_or_default()))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).output();
    }
}
