//! The job runner outside a VM: this process plays PID 1 by becoming the
//! child subreaper, and kills by process group instead of `kill(-1)`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use construir_guest_init::runner::{run_job, KillScope, RunConfig, RunOutcome};

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn job(dir: &Path, script: &str, mode: u32, timeout: Option<Duration>) -> (RunOutcome, String, String) {
    fs::create_dir_all(dir.join("bin")).expect("mkdir");
    let path = dir.join("bin/construir");
    fs::write(&path, script).expect("write");
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
    let cfg = RunConfig {
        job_dir: dir.to_owned(),
        script: path,
        output: dir.join("job_output.txt"),
        timeout,
        job_name: Some("runner-test".into()),
        kill_scope: KillScope::Group,
        console_max: 1 << 20,
        env: Vec::new(),
    };
    let console = Console::default();
    let outcome = run_job(&cfg, Box::new(console.clone())).expect("run");
    let file = fs::read_to_string(dir.join("job_output.txt")).expect("output");
    let shown = String::from_utf8(console.0.lock().expect("lock").clone()).expect("utf8");
    (outcome, file, shown)
}

// One test function: the runner reaps any child of this process, so the
// cases must not run in parallel with each other.
#[test]
fn runs_jobs_like_pid_1_would() {
    // SAFETY: prctl with an integer argument; no memory is passed.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
    let tmp = tempfile::tempdir().expect("tempdir");

    // Environment, cwd, stdout and stderr, to the file and the console.
    let d = tmp.path().join("env");
    let (o, file, shown) = job(&d, "#!/bin/sh\necho \"out $CONSTRUIR_JOB $HOME $LANG $TERM $(pwd)\"\necho err >&2\nenv | sort | cut -d= -f1 | tr '\\n' ' '\n", 0o755, None);
    assert_eq!((o.exit_code, o.signal, o.timed_out), (Some(0), None, false));
    let want_head = format!("out runner-test /root C.UTF-8 dumb {}\nerr\n", d.display());
    assert!(file.starts_with(&want_head), "{file}");
    // Exactly our variables, plus what the shell itself sets.
    let vars: Vec<&str> = file
        .lines()
        .nth(2)
        .expect("env line")
        .split_whitespace()
        .filter(|v| !["PWD", "OLDPWD", "SHLVL", "_"].contains(v))
        .collect();
    assert_eq!(vars, ["CONSTRUIR_JOB", "HOME", "LANG", "PATH", "TERM", "TZ"], "{file}");
    assert_eq!(file, shown);
    assert_eq!(o.output_bytes, file.len() as u64);

    // Exit codes; a script that is not executable runs with /bin/sh.
    let (o, file, _) = job(&tmp.path().join("exit3"), "echo failing\nexit 3\n", 0o644, None);
    assert_eq!((o.exit_code, o.timed_out, file.as_str()), (Some(3), false, "failing\n"));
    // Executable without a #! line: the kernel refuses it, the shell runs it.
    let (o, file, _) = job(&tmp.path().join("noshebang"), "echo no shebang\n", 0o755, None);
    assert_eq!((o.exit_code, file.as_str()), (Some(0), "no shebang\n"));

    // A script past its deadline is killed; output so far is kept.
    let start = Instant::now();
    let (o, file, _) = job(
        &tmp.path().join("slow"),
        "#!/bin/sh\necho started\nsleep 30\necho never\n",
        0o755,
        Some(Duration::from_secs(1)),
    );
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
    assert!(o.timed_out);
    assert_eq!(o.signal, Some(libc::SIGKILL));
    assert_eq!(file, "started\n");

    // A daemon left running (holding the output pipe) is killed and reaped, and the run ends.
    let d = tmp.path().join("daemon");
    let start = Instant::now();
    let (o, file, _) = job(
        &d,
        "#!/bin/sh\n(sleep 60; echo leaked > leaked.txt) &\necho $! > daemon.pid\necho main done\n",
        0o755,
        None,
    );
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
    assert_eq!((o.exit_code, file.as_str()), (Some(0), "main done\n"));
    let pid: i32 = fs::read_to_string(d.join("daemon.pid")).expect("pid").trim().parse().expect("number");
    // SAFETY: kill with signal 0 only checks whether the process exists.
    assert_eq!(unsafe { libc::kill(pid, 0) }, -1, "background process {pid} still exists");
}
