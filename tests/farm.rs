//! The farm end to end: one construir-server and two remote build hosts on
//! this machine (separate directories, real VMs), against SQLite and against
//! PostgreSQL (a private cluster of Debian's package). Every scenario runs
//! once per database.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::Duration;

use construir_e2e::{bin, job_log, qemu_pids, sh, signal, wait_for, Postgres};
use serde_json::Value;

/// One scenario at a time: each runs several VMs already.
static SERIAL: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Db {
    Sqlite,
    Postgres,
}

struct Farm {
    root: tempfile::TempDir,
    db: String,
    _pg: Option<Postgres>,
    queue: PathBuf,
    images: PathBuf,
    server: Option<Child>,
    port: u16,
    /// A second server process on the same database and directories (PostgreSQL only).
    second: Option<(Child, u16)>,
    lease: &'static str,
    /// More options for every server this farm starts.
    server_args: Vec<String>,
    submitter: String,
    hosts: Vec<(String, Option<Child>)>,
}

impl Farm {
    /// A server with images i0 (the mini image) and i7 (i0 with its kernel
    /// changed after image.toml was written), a submitter and two host accounts.
    fn new(db: Db, lease: &'static str) -> Farm {
        let root = tempfile::tempdir().expect("tempdir");
        let pg = (db == Db::Postgres).then(Postgres::start);
        let db = match &pg {
            Some(pg) => pg.url.clone(),
            None => root.path().join("server.db").to_string_lossy().into_owned(),
        };
        let images = root.path().join("server-images");
        fs::create_dir_all(&images).expect("mkdir");
        let i0 = construir_e2e::images().join("i0");
        sh(&format!("cp -a '{}' '{}/i0' && cp -a '{0}' '{1}/i7'", i0.display(), images.display()), root.path());
        let manifest = fs::read_to_string(images.join("i7/image.toml")).expect("image.toml");
        let initrd = manifest
            .lines()
            .find_map(|l| l.strip_prefix("initrd = "))
            .map(|v| v.trim().trim_matches('"').to_owned())
            .expect("an initrd in image.toml");
        let initrd = images.join("i7").join(initrd);
        fs::OpenOptions::new().append(true).open(&initrd).expect("open").write_all(b"tampered").expect("tamper");
        let mut farm = Farm {
            queue: root.path().join("srv/queue"),
            root,
            db,
            _pg: pg,
            images,
            server: None,
            port: 0,
            second: None,
            lease,
            server_args: Vec::new(),
            submitter: String::new(),
            hosts: Vec::new(),
        };
        farm.submitter = farm.account(&["alice"]);
        for h in ["hosta", "hostb"] {
            let token = farm.account(&[h, "--host"]);
            let file = farm.root.path().join(format!("{h}.token"));
            fs::write(&file, token).expect("token file");
            farm.hosts.push((h.to_owned(), None));
        }
        farm.start_server();
        farm
    }

    fn account(&self, args: &[&str]) -> String {
        let out = Command::new(bin("construir-server"))
            .args(["--db", &self.db, "account", "add"])
            .args(args)
            .output()
            .expect("construir-server");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf8").trim().to_owned()
    }

    /// Every server's log.
    fn server_log(&self) -> String {
        ["server.log", "server2.log"]
            .iter()
            .map(|n| fs::read_to_string(self.root.path().join(n)).unwrap_or_default())
            .collect()
    }

    /// Starts the server (again, on the same port after the first time).
    fn start_server(&mut self) {
        let (child, port) = self.spawn_server("server.log", self.port);
        self.port = port;
        self.server = Some(child);
    }

    /// Starts a second server process sharing the first one's database and directories.
    fn start_second_server(&mut self) {
        let served = self.spawn_server("server2.log", 0);
        self.second = Some(served);
    }

    fn spawn_server(&self, log_name: &str, port: u16) -> (Child, u16) {
        let listen = format!("127.0.0.1:{port}");
        let path = self.root.path().join(log_name);
        let read = || fs::read_to_string(&path).unwrap_or_default();
        let starts = |log: &str| log.matches("listening on http://").count();
        // Counted before the start: a quick server may say it listens before a count made after.
        let before = starts(&read());
        let log = fs::OpenOptions::new().create(true).append(true).open(&path).expect("log");
        let child = Command::new(bin("construir-server"))
            .args(["--db", &self.db, "serve"])
            .arg(&self.queue)
            .args(["--listen", &listen, "--follow-every", "1s", "--lease", self.lease, "--images"])
            .arg(&self.images)
            .args(&self.server_args)
            .stderr(log)
            .spawn()
            .expect("start construir-server");
        assert!(wait_for(Duration::from_secs(30), || starts(&read()) > before), "the server did not start: {}", read());
        let log = read();
        let url =
            log.lines().rev().find_map(|l| l.strip_prefix("construir-server: listening on http://")).expect("url");
        (child, url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port"))
    }

    fn kill_second(&mut self) {
        if let Some((mut c, _)) = self.second.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn kill_server(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn host_dir(&self, host: &str) -> PathBuf {
        self.root.path().join(host)
    }

    fn host_log(&self, host: &str) -> String {
        fs::read_to_string(self.host_dir(host).join("host.log")).unwrap_or_default()
    }

    /// Starts remote host `i` (0: hosta, 1: hostb) with `images` as its images directory.
    fn start_host(&mut self, i: usize, images: &Path) {
        let url = self.url();
        self.start_host_of(i, images, &url);
    }

    /// The same, taking work from the server at `url`.
    fn start_host_of(&mut self, i: usize, images: &Path, url: &str) {
        self.start_host_with(i, images, url, &[]);
    }

    /// The same, with more options for the host.
    fn start_host_with(&mut self, i: usize, images: &Path, url: &str, extra: &[&str]) {
        let name = self.hosts[i].0.clone();
        let dir = self.host_dir(&name);
        fs::create_dir_all(&dir).expect("mkdir");
        let log = fs::OpenOptions::new().create(true).append(true).open(dir.join("host.log")).expect("log");
        let child = Command::new(bin("construir-host"))
            .arg("run")
            .arg(dir.join("spool"))
            .args(["--server", url, "--token-file"])
            .arg(self.root.path().join(format!("{name}.token")))
            .args(["--accel", "tcg", "--memory", "1G", "--cpus", "1", "--host-id", &name])
            .arg("--images")
            .arg(images)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start construir-host");
        self.hosts[i].1 = Some(child);
    }

    fn host(&self, i: usize) -> &Child {
        self.hosts[i].1.as_ref().expect("host running")
    }

    fn stop_host(&mut self, i: usize, sig: i32) {
        if let Some(mut c) = self.hosts[i].1.take() {
            signal(&c, sig);
            let _ = c.wait();
        }
    }

    /// Submits a 1 MiB job running `script` for image `image`; its id.
    fn submit(&self, name: &str, image: &str, script: &str) -> String {
        self.submit_sized(name, image, script, "1M")
    }

    /// Submits a job of `size` running `script` for image `image`; its id.
    fn submit_sized(&self, name: &str, image: &str, script: &str, size: &str) -> String {
        self.submit_with(name, image, script, size, &[])
    }

    /// The same, with more arguments to `construir submit`.
    fn submit_with(&self, name: &str, image: &str, script: &str, size: &str, extra: &[&str]) -> String {
        let dir = self.root.path().join("src").join(name);
        fs::create_dir_all(dir.join("bin")).expect("mkdir");
        fs::write(dir.join("bin/construir"), script).expect("script");
        sh("chmod +x bin/construir", &dir);
        let out = Command::new(bin("construir"))
            .args(["--server", &self.url(), "--token", &self.submitter, "submit"])
            .arg(&dir)
            .args(["--image", image, "--size", size])
            .args(extra)
            .current_dir(self.root.path())
            .env("HOME", self.root.path())
            .output()
            .expect("construir submit");
        assert!(
            out.status.success(),
            "submit: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.server_log()
        );
        String::from_utf8(out.stdout).expect("utf8").lines().next().expect("an id").trim().to_owned()
    }

    /// One HTTP/1.1 request with `headers`; the whole answer, head and body.
    fn http(&self, method: &str, path: &str, headers: &str, body: &[u8]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).expect("send");
        s.write_all(body).expect("send");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn api(&self, token: &str, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        let text = self.http(method, path, &format!("Authorization: Bearer {token}\r\n"), body);
        let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        (code, serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())))
    }

    fn job(&self, id: &str) -> Value {
        let (code, v) = self.api(&self.submitter, "GET", &format!("/v1/jobs/{id}"), b"");
        assert_eq!(code, 200, "{v}");
        v
    }

    fn state(&self, id: &str) -> String {
        self.job(id)["state"].as_str().unwrap_or_default().to_owned()
    }

    fn wait_state(&self, id: &str, state: &str, limit: Duration) {
        assert!(
            wait_for(limit, || self.state(id) == state),
            "job {id} is not {state} after {limit:?}{}",
            self.logs(id)
        );
    }

    /// Where the job is and every log, for a failure's message.
    fn logs(&self, id: &str) -> String {
        format!(
            "\njob: {}\nserver log:\n{}\nhosta:\n{}\nhostb:\n{}",
            self.job(id),
            self.server_log(),
            self.host_log("hosta"),
            self.host_log("hostb")
        )
    }

    /// Waits until job `id` runs on `host`.
    fn wait_running_on(&self, id: &str, host: &str) {
        assert!(
            wait_for(Duration::from_secs(60), || self.job(id)["place"]["host"] == host),
            "job {id} did not run on {host}{}",
            self.logs(id)
        );
    }

    /// The job's result in the server's done/ and what its script printed.
    fn output(&self, id: &str, name: &str) -> String {
        let result = self.root.path().join("srv/done").join(format!("alice.{id}.{name}_d0.tar.xz"));
        String::from_utf8_lossy(&job_log(&result)).into_owned()
    }

    /// The audit log's lines (`construir-server audit`).
    fn audit(&self) -> String {
        let out = Command::new(bin("construir-server"))
            .args(["--db", &self.db, "audit", "--limit", "10000"])
            .output()
            .expect("audit");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// How many deliveries of `id` the server accepted.
    fn deliveries(&self, id: &str) -> usize {
        self.audit().lines().filter(|l| l.split_whitespace().nth(2) == Some("done") && l.contains(id)).count()
    }

    fn results(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.root.path().join("srv/done"))
            .expect("done/")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tar.xz") && !n.starts_with('.'))
            .collect();
        v.sort();
        v
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        for i in 0..self.hosts.len() {
            self.stop_host(i, libc::SIGKILL);
        }
        self.kill_server();
        self.kill_second();
        for (name, _) in &self.hosts {
            for pid in qemu_pids(name) {
                // SAFETY: kill on a pid found by name; no memory involved.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Twenty jobs through two hosts, one of which starts without images and
/// fetches them: each job is done exactly once, by one host or the other,
/// and the tampered image is refused (its job waits, and no host takes it).
/// On PostgreSQL each host talks to its own server process, the two sharing
/// the database and the directories.
fn twenty_jobs_over_two_hosts(db: Db) {
    let _serial = lock();
    let mut farm = Farm::new(db, "6s");
    // hosta has i0, and the server's tampered i7 as well: it must not offer that one.
    let hosta_images = farm.root.path().join("hosta-images");
    fs::create_dir_all(&hosta_images).expect("mkdir");
    let i0 = construir_e2e::images().join("i0");
    sh(
        &format!(
            "cp -a '{}' '{2}/i0' && cp -a '{}' '{2}/i7'",
            i0.display(),
            farm.images.join("i7").display(),
            hosta_images.display()
        ),
        farm.root.path(),
    );
    let hostb_images = farm.root.path().join("hostb-images"); // empty: hostb fetches from the server
    farm.start_host(0, &hosta_images);
    if db == Db::Postgres {
        // Two server processes share the database and the directories; each host talks to one.
        farm.start_second_server();
        let second = format!("http://127.0.0.1:{}", farm.second.as_ref().expect("second").1);
        farm.start_host_of(1, &hostb_images, &second);
    } else {
        farm.start_host(1, &hostb_images);
    }

    let tampered = farm.submit("needs-i7", "7", "#!/bin/sh\necho must never run\n");
    let ids: Vec<(String, String)> = (0..20)
        .map(|i| {
            let name = format!("job{i:02}");
            let id = farm.submit(&name, "0", &format!("#!/bin/sh\necho \"this is {name} speaking\"\n"));
            (id, name)
        })
        .collect();
    for (id, _) in &ids {
        farm.wait_state(id, "done", Duration::from_secs(400));
    }
    for (id, name) in &ids {
        assert!(farm.job(id)["place"]["verdict"].as_str().unwrap_or_default().starts_with("ok (exit code 0)"));
        let out = farm.output(id, name);
        assert!(out.contains(&format!("this is {name} speaking")), "{id}: {out}");
        assert_eq!(farm.deliveries(id), 1, "job {id} delivered once");
    }
    assert_eq!(farm.results().len(), 20, "{:?}", farm.results());
    let by = |host: &str| farm.server_log().matches(&format!("delivered by host {host} ")).count();
    assert_eq!(by("hosta") + by("hostb"), 20, "{}", farm.server_log());
    assert!(by("hosta") > 0 && by("hostb") > 0, "both hosts ran jobs: hosta {}, hostb {}", by("hosta"), by("hostb"));
    if db == Db::Postgres {
        let second = fs::read_to_string(farm.root.path().join("server2.log")).expect("server2.log");
        assert!(second.contains("delivered by host hostb "), "the second server took hostb's results:\n{second}");
    }
    // A verified rebuild over the two remote hosts: each run named and dated alike, on each host.
    let script = "#!/bin/sh\nmkdir -p out\necho \"made: $CONSTRUIR_JOB $SOURCE_DATE_EPOCH\" | tee out/made\n";
    let pair = farm.submit_with("pair", "0", script, "1M", &["--verify-on", "2"]);
    assert!(
        wait_for(Duration::from_secs(300), || !farm.job(&pair)["rebuild"]["verdict"].is_null()),
        "no verdict{}",
        farm.logs(&pair)
    );
    let rebuild = farm.job(&pair)["rebuild"].clone();
    assert_eq!(rebuild["verdict"]["outcome"], "reproducible", "{rebuild}{}", farm.logs(&pair));
    let mut hosts: Vec<&str> =
        rebuild["verdict"]["hosts"].as_array().expect("hosts").iter().filter_map(|h| h.as_str()).collect();
    hosts.sort_unstable();
    assert_eq!(hosts, ["hosta", "hostb"], "{rebuild}");
    let made = farm.output(&pair, "pair");
    assert!(
        made.contains(&format!("made: pair {}\n", rebuild["epoch"])),
        "the name given and the time of submission: {made}"
    );

    // hostb fetched i0 and verified it; both hosts refused the tampered i7.
    let b = farm.host_log("hostb");
    assert!(b.contains("image i0: fetched from the server, every checksum verified"), "{b}");
    assert!(b.contains("image i7 refused") && b.contains("does not match image.toml"), "{b}");
    assert!(hostb_images.join("i0/image.toml").is_file());
    assert!(!hostb_images.join("i7").exists());
    // Nothing of a refused fetch is kept. The host tries i7 again every minute: a try under way
    // holds its hidden directory for a moment, one that was refused leaves nothing.
    let fetching = || {
        fs::read_dir(&hostb_images)
            .expect("ls")
            .filter(|e| e.as_ref().expect("e").file_name().to_string_lossy().starts_with(".fetch"))
            .count()
    };
    assert!(wait_for(Duration::from_secs(30), || fetching() == 0), "a fetch left {} hidden directories", fetching());
    assert_eq!(farm.state(&tampered), "waiting", "no host has i7 as the server has it");
    let a = farm.host_log("hosta");
    assert!(a.contains("image i7 is not offered to the server") && a.contains("does not match image.toml"), "{a}");

    // The hosts as the API shows them: last seen, images, capacity, what each runs now.
    let (code, hosts) = farm.api(&farm.submitter, "GET", "/v1/hosts", b"");
    assert_eq!(code, 200);
    let hosts = hosts["hosts"].as_array().expect("hosts").clone();
    assert_eq!(hosts.iter().map(|h| h["name"].as_str().unwrap_or_default()).collect::<Vec<_>>(), ["hosta", "hostb"]);
    for h in &hosts {
        assert_eq!(h["capacity"], 1);
        assert_eq!(h["running"], 0);
        assert!(h["seen_secs_ago"].as_i64().is_some_and(|s| s < 30), "{h}");
        let images: Vec<&str> =
            h["images"].as_array().expect("images").iter().filter_map(|i| i["name"].as_str()).collect();
        assert_eq!(images, ["0"], "{h}");
        assert_eq!(h["images"][0]["arch"], "amd64", "from the server's own image.toml: {h}");
    }
    // As `construir hosts` prints them.
    let out = Command::new(bin("construir"))
        .args(["--server", &farm.url(), "--token", &farm.submitter, "hosts"])
        .output()
        .expect("construir hosts");
    let text = String::from_utf8_lossy(&out.stdout);
    for h in ["hosta", "hostb"] {
        let line = text.lines().find(|l| l.starts_with(h)).unwrap_or_else(|| panic!("no {h} in:\n{text}"));
        assert!(line.contains("       1       0  i0") && line.ends_with(" -"), "no warm caches: {line:?}");
        assert!(line.contains(" amd64 "), "its images' architecture: {line:?}");
        // And, below the table, the key the server pinned for it.
        let key = text.lines().rev().find(|l| l.starts_with(h)).unwrap_or_default();
        assert!(key.split_whitespace().nth(1).is_some_and(|k| k.starts_with("ed25519:")), "{text}");
    }

    // And as the page shows them.
    let (_, link) = farm.api(&farm.submitter, "POST", "/v1/page-link", b"");
    let secret = link["path"].as_str().expect("path").rsplit('/').next().expect("secret").to_owned();
    let login = farm.http(
        "POST",
        "/page/login",
        "Content-Type: application/x-www-form-urlencoded\r\nSec-Fetch-Site: same-origin\r\n",
        format!("link={secret}").as_bytes(),
    );
    let cookie = login
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie:")
                .then(|| l[11..].split(';').next().unwrap_or("").trim().to_owned())
        })
        .expect("a session cookie");
    let page = farm.http("GET", "/page", &format!("Cookie: {cookie}\r\n"), b"");
    assert!(page.contains("<h2>Build hosts</h2>"), "{page}");
    for h in ["hosta", "hostb"] {
        assert!(page.contains(&format!("<tr><td>{h}</td>")), "{page}");
    }
    assert!(page.contains("<td>i0</td><td>amd64</td><td>1</td><td>0</td><td><code>ed25519:"), "{page}");
    assert!(page.contains("verified rebuild: reproducible: all 4 files the same on host"), "{page}");

    // A host's token takes work; it cannot read or submit jobs.
    let host_token = fs::read_to_string(farm.root.path().join("hosta.token")).expect("token");
    let (code, v) = farm.api(&host_token, "GET", "/v1/jobs", b"");
    assert_eq!(code, 403, "{v}");
    let (code, _) = farm.api(&farm.submitter, "POST", "/v1/host/lease", b"{}");
    assert_eq!(code, 403, "a submitter cannot take work");
}

/// A host SIGKILLed mid-job: the other finishes the job once its lease runs
/// out. A host frozen past its lease: the job goes to the other host, the
/// frozen one's lease is refused when it wakes, and its late upload too.
fn killed_and_frozen_hosts(db: Db) {
    let _serial = lock();
    let mut farm = Farm::new(db, "4s");
    let images = construir_e2e::images().to_path_buf();
    farm.start_host(0, &images);
    let slow = "#!/bin/sh\necho started\nsleep 6\necho \"finished by $(hostname)\"\n";
    let killed = farm.submit("killed", "0", slow);
    farm.wait_running_on(&killed, "hosta");
    // The console follows through the server while the job runs.
    let live = || farm.api(&farm.submitter, "GET", &format!("/v1/jobs/{killed}/log"), b"");
    assert!(
        wait_for(Duration::from_secs(60), || live().1.as_str().is_some_and(|l| l.contains("started"))),
        "{:?}{}",
        live(),
        farm.logs(&killed)
    );
    assert_eq!(farm.state(&killed), "running");
    farm.stop_host(0, libc::SIGKILL);
    farm.start_host(1, &images);
    farm.wait_state(&killed, "done", Duration::from_secs(120));
    let job = farm.job(&killed);
    assert_eq!(job["attempts"], 2, "{job}");
    assert!(farm.output(&killed, "killed").contains("finished"), "{}", farm.output(&killed, "killed"));
    assert_eq!(farm.deliveries(&killed), 1);
    assert!(
        farm.server_log().contains(&format!("job {killed} delivered by host hostb (lease 2)")),
        "{}",
        farm.server_log()
    );
    assert!(farm.audit().contains("lease_expired"), "{}", farm.audit());

    // Freeze hostb in the middle of a job; hosta (restarted) takes the job over.
    let frozen = farm.submit("frozen", "0", slow);
    farm.wait_running_on(&frozen, "hostb");
    signal(farm.host(1), libc::SIGSTOP);
    farm.start_host(0, &images);
    farm.wait_state(&frozen, "done", Duration::from_secs(120));
    signal(farm.host(1), libc::SIGCONT);
    assert!(
        wait_for(Duration::from_secs(30), || farm.host_log("hostb").contains("lease lost")
            || farm.host_log("hostb").contains("the server refused the result")),
        "{}",
        farm.host_log("hostb")
    );
    // Its upload under the old lease, late: refused.
    let token = fs::read_to_string(farm.root.path().join("hostb.token")).expect("token");
    let mut body = b"late log\n".to_vec();
    body.extend(vec![0u8; 4096]);
    let (code, v) = farm.api(&token, "POST", &format!("/v1/host/jobs/{frozen}/done?seq=1&log_bytes=9"), &body);
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap_or_default().starts_with("lease lost"), "{v}");
    let (code, _) = farm.api(&token, "POST", &format!("/v1/host/jobs/{frozen}/renew?seq=1"), b"");
    assert_eq!(code, 409);
    assert_eq!(farm.deliveries(&frozen), 1, "{}", farm.audit());
    assert!(
        farm.server_log().contains(&format!("job {frozen} delivered by host hosta (lease 2)")),
        "{}",
        farm.server_log()
    );
    assert_eq!(farm.results().len(), 2);
}

/// The server SIGKILLed and restarted while hosts run jobs: every job is
/// done once, none lost.
fn server_restart(db: Db) {
    let _serial = lock();
    let mut farm = Farm::new(db, "10s");
    let images = construir_e2e::images().to_path_buf();
    farm.start_host(0, &images);
    farm.start_host(1, &images);
    let ids: Vec<(String, String)> = (0..6)
        .map(|i| {
            let name = format!("r{i}");
            (farm.submit(&name, "0", &format!("#!/bin/sh\nsleep 2\necho \"{name} survived\"\n")), name)
        })
        .collect();
    assert!(wait_for(Duration::from_secs(60), || ids.iter().any(|(id, _)| farm.state(id) == "running")));
    farm.kill_server();
    std::thread::sleep(Duration::from_secs(3));
    farm.start_server();
    for (id, _) in &ids {
        farm.wait_state(id, "done", Duration::from_secs(240));
    }
    for (id, name) in &ids {
        assert!(farm.output(id, name).contains(&format!("{name} survived")));
        assert_eq!(farm.deliveries(id), 1, "{id}\n{}", farm.audit());
    }
    assert_eq!(farm.results().len(), 6, "{:?}", farm.results());
}

/// A loopback proxy that moves at most `rate` bytes a second each way on
/// each connection: a slow link between a host and the server. It stops
/// when dropped; it counts the bytes it moved toward the client.
struct Throttle {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    to_client: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Throttle {
    fn start(server_port: u16, rate: u64) -> Throttle {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let to_client = Arc::new(AtomicU64::new(0));
        let (stop2, counted) = (stop.clone(), to_client.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let Ok(server) = TcpStream::connect(("127.0.0.1", server_port)) else { continue };
                client.set_nonblocking(false).expect("blocking");
                for (from, to, count) in [
                    (client.try_clone().expect("clone"), server.try_clone().expect("clone"), None),
                    (server, client, Some(counted.clone())),
                ] {
                    let stop = stop2.clone();
                    std::thread::spawn(move || pump_slowly(from, to, rate, &stop, count.as_deref()));
                }
            }
        });
        Throttle { port, stop, to_client }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Copies `from` to `to` at `rate` bytes a second at most, in pieces of a tenth of it.
fn pump_slowly(
    mut from: TcpStream,
    mut to: TcpStream,
    rate: u64,
    stop: &std::sync::atomic::AtomicBool,
    count: Option<&std::sync::atomic::AtomicU64>,
) {
    let mut buf = vec![0u8; (rate / 10).max(1) as usize];
    let _ = from.set_read_timeout(Some(Duration::from_secs(1)));
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                if let Some(c) = count {
                    c.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A job that takes longer to download and to deliver than its lease lasts,
/// over a slow link, while another job runs on the same host: both are
/// delivered once, neither goes back to the queue (finding 5 of issue 17).
fn slow_link_short_lease(db: Db) {
    let _serial = lock();
    let mut farm = Farm::new(db, "3s");
    // Only i0 here: fetching the tampered i7 over this link would take minutes.
    fs::remove_dir_all(farm.images.join("i7")).expect("rm i7");
    // 64 KiB/s: the 1 MiB job file takes 16 s to come, its 600 KiB result 10 s to go back.
    let link = Throttle::start(farm.port, 64 << 10);
    let images = construir_e2e::images().to_path_buf();
    farm.start_host_with(0, &images, &link.url(), &["--workers", "2"]);
    let other = farm.submit("beside", "0", "#!/bin/sh\necho started beside\nsleep 25\necho beside done\n");
    farm.wait_running_on(&other, "hosta");
    let started = std::time::Instant::now();
    let big = farm.submit_sized(
        "big",
        "0",
        "#!/bin/sh\ndd if=/dev/urandom of=noise.bin bs=1024 count=600 2>/dev/null\necho made the noise\n",
        "1M",
    );
    farm.wait_running_on(&big, "hosta");
    let downloaded = started.elapsed();
    for id in [&other, &big] {
        farm.wait_state(id, "done", Duration::from_secs(300));
    }
    assert!(downloaded >= Duration::from_secs(9), "the link was not slow: the job came in {downloaded:?}");
    assert!(link.to_client.load(std::sync::atomic::Ordering::Relaxed) >= 1 << 20, "the job file went through the link");
    for (id, name, said) in [(&other, "beside", "beside done"), (&big, "big", "made the noise")] {
        let job = farm.job(id);
        assert!(job["place"]["verdict"].as_str().unwrap_or_default().starts_with("ok (exit code 0)"), "{job}");
        assert_eq!(job["attempts"], 1, "{id} went back to the queue: {job}{}", farm.logs(id));
        assert_eq!(farm.deliveries(id), 1);
        assert!(farm.output(id, name).contains(said), "{}", farm.output(id, name));
    }
    let result = farm.root.path().join("srv/done").join(format!("alice.{big}.big_d0.tar.xz"));
    assert!(fs::metadata(&result).expect("result").len() > 500 << 10, "the result came back whole");
    assert!(!farm.audit().contains("lease_expired"), "{}", farm.audit());
    assert!(!farm.host_log("hosta").contains("lease lost"), "{}", farm.host_log("hosta"));
}

/// Clients sending bad tokens, half headers, stalled uploads and floods of
/// connections at the server while hosts renew leases and a submitter
/// submits: no lease is lost and every job is delivered once. Every abuser
/// is bounded in count and time and stops by itself.
fn abuse_run(db: Db) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let _serial = lock();
    let mut farm = Farm::new(db, "4s");
    farm.server_args = ["--header-timeout", "3s", "--idle-timeout", "4s"].map(String::from).to_vec();
    farm.kill_server();
    farm.start_server();
    let mallory = farm.account(&["mallory"]);
    let images = construir_e2e::images().to_path_buf();
    farm.start_host(0, &images);
    farm.start_host(1, &images);
    let stop = AtomicBool::new(false);
    let addr = format!("127.0.0.1:{}", farm.port);
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let going = || !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline;
    let (ids, bad_tokens) = std::thread::scope(|scope| {
        // Bad tokens, from the very address the hosts and the submitter use.
        let bad = scope.spawn(|| {
            let mut n = 0;
            while going() && n < 3000 {
                let head = format!("GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer cst1.1.{n:064x}\r\nConnection: close\r\n\r\n");
                if let Ok(mut s) = TcpStream::connect(&addr) {
                    let _ = s.write_all(head.as_bytes());
                    let _ = s.read(&mut [0u8; 64]);
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            n
        });
        // Half headers from another address, thirty held at a time.
        scope.spawn(|| {
            let mut held = std::collections::VecDeque::new();
            for _ in 0..600 {
                if !going() {
                    break;
                }
                if let Ok(mut s) = construir_e2e::server::connect_from("127.0.0.2", &addr) {
                    let _ = s.write_all(b"POST /v1/host/lease HTTP/1.1\r\nHost: x\r\nAuthoriz");
                    held.push_back(s);
                }
                if held.len() > 30 {
                    held.pop_front();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        // Stalled uploads by an account of its own, as many as it may have.
        scope.spawn(|| {
            for _ in 0..60 {
                if !going() {
                    break;
                }
                let head = format!("POST /v1/jobs?name=stall&image=0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {mallory}\r\nContent-Length: 500000\r\nConnection: close\r\n\r\n");
                let socks: Vec<TcpStream> = (0..4)
                    .filter_map(|_| construir_e2e::server::connect_from("127.0.0.3", &addr).ok())
                    .map(|mut s| {
                        let _ = s.write_all(head.as_bytes());
                        let _ = s.write_all(b"\xfd7zXZ\0");
                        s
                    })
                    .collect();
                std::thread::sleep(Duration::from_secs(5));
                drop(socks);
            }
        });
        // A flood of idle connections from one more address, past its cap.
        scope.spawn(|| {
            let mut flood = Vec::new();
            for _ in 0..100 {
                if let Ok(s) = construir_e2e::server::connect_from("127.0.0.4", &addr) {
                    flood.push(s);
                }
            }
            while going() {
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let ids: Vec<(String, String)> = (0..6)
            .map(|i| {
                let name = format!("a{i}");
                let id = farm.submit(&name, "0", &format!("#!/bin/sh\nsleep 3\necho \"{name} held\"\n"));
                (id, name)
            })
            .collect();
        for (id, _) in &ids {
            farm.wait_state(id, "done", Duration::from_secs(200));
        }
        stop.store(true, Ordering::Relaxed);
        (ids, bad.join().expect("thread"))
    });
    for (id, name) in &ids {
        let job = farm.job(id);
        assert_eq!(job["attempts"], 1, "{job}{}", farm.logs(id));
        assert_eq!(farm.deliveries(id), 1);
        assert!(farm.output(id, name).contains(&format!("{name} held")));
    }
    assert!(!farm.audit().contains("lease_expired"), "{}", farm.audit());
    for h in ["hosta", "hostb"] {
        let log = farm.host_log(h);
        assert!(!log.contains("lease lost") && !log.contains("cannot renew"), "{h}:\n{log}");
    }
    let log = farm.server_log();
    assert!(bad_tokens > 100, "{bad_tokens} bad tokens sent");
    assert!(log.contains("bad tokens this minute; answering 429"), "{log}");
    assert!(log.contains("connections from this address, the limit"), "{log}");
    assert!(log.contains("its upload did not finish; removed it and its reservation"), "{log}");
}

/// A remote host's debug session, reached through the server: the host
/// offers it over its own connection, the page says it is open, the owner
/// gets a shell in a real terminal, and the result is the job's own.
fn remote_debug_session(db: Db) {
    let _serial = lock();
    let farm = Farm::new(db, "6s");
    let mut farm = farm;
    let images = farm.images.clone();
    farm.start_host_with(0, &images, &farm.url(), &["--debug-wait", "90s"]);
    let id = farm.submit_with(
        "remote",
        "0",
        "#!/bin/sh\necho remote-marker > marker.txt\necho failing far away\nexit 5\n",
        "1M",
        &["--debug"],
    );
    farm.wait_state(&id, "done", Duration::from_secs(120));
    assert!(
        wait_for(Duration::from_secs(20), || farm.job(&id)["debug"]["host"] == "hosta"),
        "no session offered{}",
        farm.logs(&id)
    );
    // The page says so.
    let (code, link) = farm.api(&farm.submitter, "POST", "/v1/page-link", b"");
    assert_eq!(code, 200, "{link}");
    let secret = link["path"].as_str().unwrap_or_default().rsplit('/').next().unwrap_or_default().to_owned();
    fs::write(farm.root.path().join("form"), format!("link={secret}")).expect("form");
    let page = sh(
        &format!(
            "curl -sS -c jar -o /dev/null -H 'Sec-Fetch-Site: same-origin' --data-binary @form {0}/page/login && curl -sS -b jar {0}/page",
            farm.url()
        ),
        farm.root.path(),
    );
    assert!(page.contains(&format!("debug session open on hosta: `construir debug {id}` before")), "{page}");
    // The owner's terminal.
    let token = farm.root.path().join("alice.token");
    fs::write(&token, &farm.submitter).expect("token");
    sh("chmod 600 alice.token", farm.root.path());
    let t = construir_e2e::Terminal::start(&format!(
        "'{}' --server {} --token-file '{}' debug {id}",
        bin("construir").display(),
        farm.url(),
        token.display()
    ));
    assert!(t.shows("construir-debug:/job#", Duration::from_secs(60)), "{}{}", t.screen(), farm.logs(&id));
    t.type_text("cat marker.txt; echo overwritten > marker.txt; exit");
    t.press("Enter");
    assert!(t.shows("remote-marker", Duration::from_secs(20)), "{}", t.screen());
    assert!(t.shows("the session ended", Duration::from_secs(30)), "{}", t.screen());
    assert!(wait_for(Duration::from_secs(20), || qemu_pids("hosta").is_empty()), "{}", farm.host_log("hosta"));
    let log = farm.host_log("hosta");
    assert!(log.contains("its owner attached through the server"), "{log}");
    assert!(farm.output(&id, "remote").contains("failing far away"));
    let result = farm.root.path().join("srv/done").join(format!("alice.{id}.remote_d0.tar.xz"));
    let unpacked = farm.root.path().join("unpacked");
    let out = Command::new(bin("construir-host"))
        .args(["job", "unpack"])
        .arg(&result)
        .arg(&unpacked)
        .output()
        .expect("unpack");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read_to_string(unpacked.join("marker.txt")).expect("marker"), "remote-marker\n");
    let audit = farm.audit();
    assert!(audit.contains(&format!("debug_attached     {id} (on host hosta)")), "{audit}");
    assert!(audit.lines().any(|l| l.contains("debug_ended") && l.contains(&id)), "{audit}");
    assert!(farm.job(&id)["debug"].is_null(), "the session is over");
}

#[test]
fn sqlite_a_remote_host_s_debug_session_is_reached_through_the_server_and_leaves_the_result_as_it_was() {
    remote_debug_session(Db::Sqlite);
}

#[test]
fn sqlite_a_job_slower_to_move_than_its_lease_and_another_beside_it_are_each_delivered_once_none_requeued() {
    slow_link_short_lease(Db::Sqlite);
}

#[test]
fn postgres_abuse_from_every_side_loses_no_lease_and_delivers_every_job_once() {
    abuse_run(Db::Postgres);
}

#[test]
fn sqlite_twenty_jobs_each_done_once_over_two_hosts_one_fetching_images_and_a_tampered_image_refused() {
    twenty_jobs_over_two_hosts(Db::Sqlite);
}

#[test]
fn postgres_twenty_jobs_each_done_once_over_two_hosts_one_fetching_images_and_a_tampered_image_refused() {
    twenty_jobs_over_two_hosts(Db::Postgres);
}

#[test]
fn sqlite_a_killed_host_s_job_is_finished_elsewhere_and_a_frozen_host_s_late_upload_refused() {
    killed_and_frozen_hosts(Db::Sqlite);
}

#[test]
fn postgres_a_killed_host_s_job_is_finished_elsewhere_and_a_frozen_host_s_late_upload_refused() {
    killed_and_frozen_hosts(Db::Postgres);
}

#[test]
fn sqlite_a_server_restarted_mid_run_loses_and_doubles_nothing() {
    server_restart(Db::Sqlite);
}

#[test]
fn postgres_a_server_restarted_mid_run_loses_and_doubles_nothing() {
    server_restart(Db::Postgres);
}
