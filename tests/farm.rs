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
        let log = fs::OpenOptions::new().create(true).append(true).open(&path).expect("log");
        let child = Command::new(bin("construir-server"))
            .args(["--db", &self.db, "serve"])
            .arg(&self.queue)
            .args(["--listen", &listen, "--follow-every", "1s", "--lease", self.lease, "--images"])
            .arg(&self.images)
            .stderr(log)
            .spawn()
            .expect("start construir-server");
        let starts = |log: &str| log.matches("listening on http://").count();
        let before = starts(&read());
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

    /// Submits a job printing `message` (then sleeping `sleep` seconds) for image `image`; its id.
    fn submit(&self, name: &str, image: &str, script: &str) -> String {
        let dir = self.root.path().join("src").join(name);
        fs::create_dir_all(dir.join("bin")).expect("mkdir");
        fs::write(dir.join("bin/construir"), script).expect("script");
        sh("chmod +x bin/construir", &dir);
        let out = Command::new(bin("construir"))
            .args(["--server", &self.url(), "--token", &self.submitter, "submit"])
            .arg(&dir)
            .args(["--image", image, "--size", "1M"])
            .current_dir(self.root.path())
            .env("HOME", self.root.path())
            .output()
            .expect("construir submit");
        assert!(out.status.success(), "submit: {}", String::from_utf8_lossy(&out.stderr));
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

    // hostb fetched i0 and verified it; both hosts refused the tampered i7.
    let b = farm.host_log("hostb");
    assert!(b.contains("image i0: fetched from the server, every checksum verified"), "{b}");
    assert!(b.contains("image i7 refused") && b.contains("does not match image.toml"), "{b}");
    assert!(hostb_images.join("i0/image.toml").is_file());
    assert!(!hostb_images.join("i7").exists());
    assert!(fs::read_dir(&hostb_images).expect("ls").all(|e| !e
        .expect("e")
        .file_name()
        .to_string_lossy()
        .starts_with(".fetch")));
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
    }
    // As `construir hosts` prints them.
    let out = Command::new(bin("construir"))
        .args(["--server", &farm.url(), "--token", &farm.submitter, "hosts"])
        .output()
        .expect("construir hosts");
    let text = String::from_utf8_lossy(&out.stdout);
    for h in ["hosta", "hostb"] {
        let line = text.lines().find(|l| l.starts_with(h)).unwrap_or_else(|| panic!("no {h} in:\n{text}"));
        assert!(line.ends_with("       1       0  i0"), "{line:?}");
    }

    // And as the page shows them.
    let (_, link) = farm.api(&farm.submitter, "POST", "/v1/page-link", b"");
    let login = farm.http("GET", link["path"].as_str().expect("path"), "", b"");
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
    assert!(page.contains("<td>i0</td><td>1</td><td>0</td></tr>"), "{page}");

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
