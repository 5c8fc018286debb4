//! The end-to-end harness: our binaries as built by cargo, a mini image
//! built once per test run by our own image-builder, and queues in
//! temporary directories. Jobs are made by hand with tar and truncate, the
//! way docs/DESIGN.md says any submitter may make them.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod browser;
pub mod gitlab;
pub mod server;
pub mod slurm;

/// A process a test started, killed and reaped when dropped unless it ended
/// first: a failing assert never leaves a host running behind the test.
pub struct Spawned(pub std::process::Child);

impl std::ops::Deref for Spawned {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Says, where a person sees it, that `test` did not run and why: straight to
/// standard error, past the test harness's capture (which would hide it in a
/// passing test). `scripts/test` counts these lines as skipped.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("construir-e2e: skipped: {test}: {why}\n").as_bytes());
}

/// One of our binaries, from the same cargo build as this test.
pub fn bin(name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("test executable path");
    // target/<triple>/<profile>/deps/<test> -> target/<triple>/<profile>/<name>
    let path = me.parent().and_then(Path::parent).expect("target layout").join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace` (scripts/test does)", path.display());
    path
}

/// The images directory holding `i0`, a mini image, built once per test run.
pub fn images() -> &'static Path {
    static IMAGES: OnceLock<PathBuf> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let target = bin("construir-host").parent().expect("profile dir").join("e2e-images");
        let out = target.join("i0");
        let status = Command::new(bin("image-builder"))
            .args(["mini", "--force", "--out"])
            .arg(&out)
            .arg("--init")
            .arg(bin("construir-init"))
            .status()
            .expect("run image-builder");
        assert!(status.success(), "image-builder mini failed");
        target
    })
}

/// An images directory in `root` whose `i0` never boots: the mini image's
/// kernel with an initramfs whose /init only sleeps, saying nothing.
pub fn never_booting_images(root: &Path) -> PathBuf {
    let dir = root.join("never-boots");
    let i0 = dir.join("i0");
    fs::create_dir_all(i0.join("initrd/bin")).expect("mkdir");
    let kernel = jobfile::image::ImageManifest::load(&images().join("i0")).expect("i0").kernel;
    for file in [kernel.as_str(), "image.toml"] {
        fs::copy(images().join("i0").join(file), i0.join(file)).expect("copy");
    }
    fs::copy("/bin/busybox", i0.join("initrd/bin/busybox")).expect("busybox (busybox-static)");
    fs::write(
        i0.join("initrd/init"),
        "#!/bin/busybox sh
/bin/busybox sleep 100000
",
    )
    .expect("init");
    fs::set_permissions(i0.join("initrd/init"), fs::Permissions::from_mode(0o755)).expect("chmod");
    sh("find . | cpio -o -H newc --quiet > ../initrd.img", &i0.join("initrd"));
    dir
}

/// The directory our e2e images live in (beside the binaries).
pub fn images_dir() -> PathBuf {
    bin("construir-host").parent().expect("profile dir").join("e2e-images")
}

/// Where debootstrap keeps packages between the e2e builds.
pub fn deb_cache() -> PathBuf {
    bin("construir-host").parent().expect("profile dir").join("e2e-debs")
}

/// Builds a bookworm image with `image-builder debootstrap` into `out`.
pub fn build_debian(out: &Path) -> (Output, Duration) {
    let start = Instant::now();
    let out = Command::new(bin("image-builder"))
        .args(["debootstrap", "--force", "--suite", "bookworm", "--out"])
        .arg(out)
        .arg("--init")
        .arg(bin("construir-init"))
        .arg("--cache")
        .arg(deb_cache())
        .output()
        .expect("run image-builder");
    (out, start.elapsed())
}

/// The images directory holding `i100`, a Debian bookworm image, built once per test run.
pub fn debian_images() -> &'static Path {
    static IMAGES: OnceLock<PathBuf> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let dir = images_dir().join("debian");
        let (out, took) = build_debian(&dir.join("i100"));
        assert!(out.status.success(), "image-builder debootstrap failed:\n{}", String::from_utf8_lossy(&out.stderr));
        eprintln!("built the bookworm image in {:.0} s", took.as_secs_f64());
        dir
    })
}

/// The images directory holding `i7`, a mini image for arm64 (the
/// archive's kernel and busybox, our aarch64 init), built once per test run.
pub fn arm64_mini_images() -> &'static Path {
    static IMAGES: OnceLock<PathBuf> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let dir = images_dir().join("arm64");
        let out = Command::new(bin("image-builder"))
            .args(["mini", "--arch", "arm64", "--force", "--out"])
            .arg(dir.join("i7"))
            .arg("--cache")
            .arg(deb_cache().join("foreign"))
            .output()
            .expect("run image-builder");
        assert!(
            out.status.success(),
            "image-builder mini --arch arm64 failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

/// The images directory holding `i107`, a Debian bookworm image for arm64
/// (debootstrap through qemu-user-static), built once per test run.
pub fn arm64_debian_images() -> &'static Path {
    static IMAGES: OnceLock<PathBuf> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let dir = images_dir().join("debian-arm64");
        let start = Instant::now();
        let out = Command::new(bin("image-builder"))
            .args(["debootstrap", "--arch", "arm64", "--force", "--suite", "bookworm", "--out"])
            .arg(dir.join("i107"))
            .arg("--cache")
            .arg(deb_cache())
            .output()
            .expect("run image-builder");
        assert!(
            out.status.success(),
            "image-builder debootstrap --arch arm64 failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("built the bookworm arm64 image in {:.0} s", start.elapsed().as_secs_f64());
        dir
    })
}

/// The statement of a signed provenance file, checked against the key of
/// the host that made it (`keys/<host>.key` beside `q`'s queue).
pub fn signed_statement(q: &Queue, provenance: &Path) -> serde_json::Value {
    let key_path = q.root.path().join(format!("keys/{}.key", q.host_id));
    let (key, _) = construir_provenance::HostKey::load_or_create(&key_path).expect("the host's key");
    let envelopes = construir_provenance::read(provenance).expect("provenance");
    let (payload, _) = construir_provenance::dsse::open(&envelopes[0], &[key.public()]).expect("signed by the host");
    serde_json::from_slice(&payload).expect("statement")
}

/// A queue with its sibling directories in a temporary directory.
pub struct Queue {
    pub root: tempfile::TempDir,
    /// This queue's `--host-id`: names its VMs, so a test can find them.
    pub host_id: String,
    pub queue: PathBuf,
    pub done: PathBuf,
    pub failed: PathBuf,
}

/// What a `construir-host run` printed, and how long it took.
pub struct HostRun {
    pub log: String,
    pub elapsed: Duration,
    pub success: bool,
}

impl Default for Queue {
    fn default() -> Self {
        Self::new()
    }
}

impl Queue {
    pub fn new() -> Self {
        // Private (0700), as tempdir makes it: a jailed QEMU needs no path to anything here.
        let root = tempfile::tempdir().expect("tempdir");
        let queue = root.path().join("queue");
        fs::create_dir(&queue).expect("mkdir queue");
        let host_id = root.path().file_name().expect("name").to_string_lossy().trim_start_matches('.').to_owned();
        Queue { done: root.path().join("done"), failed: root.path().join("failed"), queue, root, host_id }
    }

    /// Makes `<file_name>` by hand: `job/bin/construir` with `script`, any
    /// extra files, `tar -cJf`, `truncate --size`, then moved into the queue.
    pub fn add_job(&self, file_name: &str, script: &str, size: &str, extra: &[(&str, &[u8])]) -> PathBuf {
        let dir = self.root.path().join(format!("src-{file_name}"));
        fs::create_dir_all(dir.join("bin")).expect("mkdir");
        fs::write(dir.join("bin/construir"), script).expect("write script");
        fs::set_permissions(dir.join("bin/construir"), fs::Permissions::from_mode(0o755)).expect("chmod");
        for (path, data) in extra {
            let p = dir.join(path);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs::write(p, data).expect("write");
        }
        let staged = self.root.path().join(file_name);
        // Finished a minute ago, as far as the host's settle time is concerned.
        sh(
            &format!("tar -cJf '{0}' . && truncate --size {size} '{0}' && touch -d '-1 min' '{0}'", staged.display()),
            &dir,
        );
        let queued = self.queue.join(file_name);
        fs::rename(&staged, &queued).expect("into the queue");
        queued
    }

    /// `construir-host run QUEUE --once` with TCG and small VMs, plus `extra`.
    pub fn run(&self, extra: &[&str]) -> HostRun {
        self.run_with_images(images(), extra)
    }

    /// The same, on the images in `images`.
    pub fn run_with_images(&self, images: &Path, extra: &[&str]) -> HostRun {
        let start = Instant::now();
        let out = Command::new(bin("construir-host"))
            .arg("run")
            .arg(&self.queue)
            .args(["--once", "--accel", "tcg", "--memory", "1G", "--cpus", "1", "--host-id", &self.host_id, "--images"])
            .arg(images)
            .args(extra)
            .output()
            .expect("run construir-host");
        let run = HostRun {
            log: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: start.elapsed(),
            success: out.status.success(),
        };
        assert!(qemu_pids(&self.host_id).is_empty(), "a QEMU process outlived the host run");
        run
    }

    /// Starts `construir-host run QUEUE` (not --once) in the background; its log goes to `<root>/host-<tag>.log`.
    pub fn spawn(&self, tag: &str, host_id: &str, extra: &[&str]) -> Spawned {
        Spawned(self.host_command(tag, host_id, extra).spawn().expect("start construir-host"))
    }

    /// Two hosts of one VM each, tagged `a` and `b` (ids `<host_id>-a`,
    /// `-b`), once both hold their place: their ids and their processes.
    pub fn spawn_two(&self) -> ((String, Spawned), (String, Spawned)) {
        let (a, b) = (format!("{}-a", self.host_id), format!("{}-b", self.host_id));
        let host_a = self.spawn("a", &a, &["--workers", "1"]);
        let host_b = self.spawn("b", &b, &["--workers", "1"]);
        let running = self.root.path().join("running");
        assert!(
            wait_for(Duration::from_secs(20), || [&a, &b].iter().all(|h| running.join(h).join(".host").exists())),
            "{}{}",
            self.log("a"),
            self.log("b")
        );
        ((a, host_a), (b, host_b))
    }

    /// `spawn`, on the images in `images`.
    pub fn spawn_with_images(&self, tag: &str, host_id: &str, images: &Path, extra: &[&str]) -> Spawned {
        Spawned(self.host_command_on(tag, host_id, images, extra).spawn().expect("start construir-host"))
    }

    /// The command `spawn` runs, for a test that needs to change how the host starts.
    pub fn host_command(&self, tag: &str, host_id: &str, extra: &[&str]) -> Command {
        self.host_command_on(tag, host_id, images(), extra)
    }

    fn host_command_on(&self, tag: &str, host_id: &str, images: &Path, extra: &[&str]) -> Command {
        let log = fs::File::create(self.log_path(tag)).expect("host log");
        let mut cmd = Command::new(bin("construir-host"));
        cmd.arg("run")
            .arg(&self.queue)
            .args(["--accel", "tcg", "--memory", "1G", "--cpus", "1", "--host-id", host_id, "--images"])
            .arg(images)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(log);
        cmd
    }

    pub fn log_path(&self, tag: &str) -> PathBuf {
        self.root.path().join(format!("host-{tag}.log"))
    }

    pub fn log(&self, tag: &str) -> String {
        fs::read_to_string(self.log_path(tag)).unwrap_or_default()
    }

    /// A refused queue entry in failed/: its path (a name the host chose,
    /// `refused.…`) and its `.reason`, found by the sanitized name it came with.
    pub fn refusal(&self, shown_name: &str) -> (PathBuf, String) {
        let wanted = format!("original name: {shown_name}");
        for entry in fs::read_dir(&self.failed).expect("failed/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|x| x == "reason") {
                let text = fs::read_to_string(&path).expect("reason");
                if text.lines().any(|l| l == wanted) {
                    let name = path.file_name().expect("name").to_string_lossy().into_owned();
                    assert!(name.starts_with("refused."), "{name}");
                    return (path.with_extension(""), text);
                }
            }
        }
        panic!("no refusal of {shown_name} in {}: {:?}", self.failed.display(), Self::list(&self.failed))
    }

    /// The `.reason` of a job in failed/ under its own name, or of a refused entry of that name.
    pub fn reason(&self, name: &str) -> String {
        fs::read_to_string(self.failed.join(format!("{name}.reason"))).unwrap_or_else(|_| self.refusal(name).1)
    }

    pub fn done(&self, file_name: &str) -> PathBuf {
        self.done.join(file_name)
    }

    /// Non-dot names in a directory, sorted.
    pub fn list(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// `construir-host job <cmd> FILE` and its stdout.
pub fn job_tool(cmd: &str, file: &Path) -> Output {
    Command::new(bin("construir-host")).args(["job", cmd]).arg(file).output().expect("run construir-host job")
}

pub fn job_log(file: &Path) -> Vec<u8> {
    let out = job_tool("log", file);
    assert!(out.status.success(), "job log: {}{}", String::from_utf8_lossy(&out.stderr), why_not_done(file));
    out.stdout
}

pub fn job_status(file: &Path) -> serde_json::Value {
    let out = job_tool("status", file);
    assert!(out.status.success(), "job status: {}{}", String::from_utf8_lossy(&out.stderr), why_not_done(file));
    serde_json::from_slice(&out.stdout).expect("status is JSON")
}

/// When a result expected in done/ is missing, the reason and log its job left in failed/, for the panic message.
fn why_not_done(file: &Path) -> String {
    let (Some(dir), Some(name)) = (file.parent(), file.file_name().and_then(|n| n.to_str())) else {
        return String::new();
    };
    if file.exists() || dir.file_name().is_none_or(|d| d != "done") {
        return String::new();
    }
    let Some(at) = name.rfind("_d") else { return String::new() };
    let queued = format!("{}_i{}", &name[..at], &name[at + 2..]);
    let failed = dir.with_file_name("failed");
    let read = |ext: &str| fs::read_to_string(failed.join(format!("{queued}.{ext}"))).unwrap_or_default();
    format!("\nfailed/{queued}.reason:\n{}\nfailed/{queued}.log:\n{}", read("reason"), read("log"))
}

pub fn sh(script: &str, cwd: &Path) -> String {
    let out = Command::new("sh").arg("-ec").arg(script).current_dir(cwd).output().expect("sh");
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// QEMU processes of the host with this id (they are named `construir.<host-id>.<job>`;
/// their first argument is QEMU's binary, by its full path when jailed).
pub fn qemu_pids(host_id: &str) -> Vec<u32> {
    let needle = format!("construir.{host_id}.");
    let Ok(procs) = fs::read_dir("/proc") else { return Vec::new() };
    procs
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()).map(|pid| (pid, e.path())))
        .filter(|(_, p)| {
            fs::read(p.join("cmdline")).is_ok_and(|c| {
                let argv0 = c.split(|&b| b == 0).next().unwrap_or_default();
                let program = argv0.rsplit(|&b| b == b'/').next().unwrap_or_default();
                program.starts_with(b"qemu") && c.windows(needle.len()).any(|w| w == needle.as_bytes())
            })
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// Polls `cond` every 100 ms until it holds or `limit` passes; returns whether it held.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

/// One `Name:\tvalue` line of /proc/<pid>/status.
pub fn proc_status(pid: u32, field: &str) -> String {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Sends `sig` to a child process.
pub fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill on a pid we own; no memory involved.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// A private PostgreSQL cluster (Debian's package, as scripts/test installs
/// it) on a free loopback port, its data in a directory of its own; stopped
/// and removed when dropped. Its one database is `construir`.
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    pub url: String,
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).find(|b| b.join("initdb").exists()))
            .expect("PostgreSQL is not installed (scripts/test installs Debian's postgresql package)");
        // PostgreSQL will not run as root: the cluster belongs to the postgres account, in a
        // directory that account can reach (a test's own temporary directory is private to root).
        let dir = PathBuf::from(sh("mktemp -d /tmp/construir-pg.XXXXXX", Path::new("/")).trim());
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let data = dir.join("data");
        let as_postgres = |args: &[&str]| {
            let out = Command::new("runuser").args(["-u", "postgres", "--"]).args(args).output().expect("runuser");
            assert!(
                out.status.success(),
                "{args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        sh(&format!("chown postgres: '{}'", dir.display()), Path::new("/"));
        let tool = |name: &str| bin.join(name).to_string_lossy().into_owned();
        let data_s = data.to_string_lossy().into_owned();
        as_postgres(&[&tool("initdb"), "-D", &data_s, "-U", "postgres", "--auth=trust", "--no-sync"]);
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='{}' -c fsync=off",
            dir.display()
        );
        let log = dir.join("log").to_string_lossy().into_owned();
        as_postgres(&[&tool("pg_ctl"), "-D", &data_s, "-l", &log, "-o", &options, "-w", "start"]);
        let pg = Postgres { dir, bin: bin.clone(), url: format!("postgresql://postgres@127.0.0.1:{port}/construir") };
        as_postgres(&[&tool("createdb"), "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "construir"]);
        pg
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A program in a real terminal: a tmux session of its own (its own
/// server socket), 120x30, driven with keys and read from the screen.
pub struct Terminal {
    socket: String,
}

impl Terminal {
    /// Runs `command` (a shell line) in a new terminal; when it ends, the
    /// terminal shows `EXIT=<code>` and stays for a minute to be read.
    pub fn start(command: &str) -> Terminal {
        let socket = format!("construir-test-{}-{}", std::process::id(), crate::server::rand_u32());
        let line = format!("{command}; echo EXIT=$?; sleep 60");
        let out = Command::new("tmux")
            .args(["-L", &socket, "new-session", "-d", "-s", "t", "-x", "120", "-y", "30", &line])
            .output()
            .expect("tmux (install it: scripts/test does)");
        assert!(out.status.success(), "tmux: {}", String::from_utf8_lossy(&out.stderr));
        Terminal { socket }
    }

    /// Types `text` as it is.
    pub fn type_text(&self, text: &str) {
        let out = Command::new("tmux").args(["-L", &self.socket, "send-keys", "-t", "t", "-l", text]).output();
        assert!(out.is_ok_and(|o| o.status.success()), "tmux send-keys");
    }

    /// Presses a key by tmux's name for it (`Enter`, `C-c`).
    pub fn press(&self, key: &str) {
        let out = Command::new("tmux").args(["-L", &self.socket, "send-keys", "-t", "t", key]).output();
        assert!(out.is_ok_and(|o| o.status.success()), "tmux send-keys {key}");
    }

    /// What the screen shows now.
    pub fn screen(&self) -> String {
        let out = Command::new("tmux").args(["-L", &self.socket, "capture-pane", "-p", "-t", "t"]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    }

    /// Waits until the screen shows `text` (true), or `limit` passes (false).
    pub fn shows(&self, text: &str, limit: Duration) -> bool {
        wait_for(limit, || self.screen().contains(text))
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-L", &self.socket, "kill-server"]).output();
    }
}
