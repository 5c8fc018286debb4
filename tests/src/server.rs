//! A construir-server on loopback for the tests, and the ways they talk to
//! it: the `construir` client, the server's own commands, raw HTTP.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use crate::{bin, wait_for, Queue};

/// A server on a free loopback port, killed when dropped.
pub struct Server {
    child: Child,
    pub url: String,
    pub log: PathBuf,
}

impl Server {
    pub fn start(q: &Queue, db: &Path, extra: &[&str]) -> Server {
        Server::start_with_images(q, db, crate::images(), extra)
    }

    /// The same, serving the images in `images`.
    pub fn start_with_images(q: &Queue, db: &Path, images: &Path, extra: &[&str]) -> Server {
        Server::start_with_env(q, db, images, extra, &[])
    }

    /// The same, with `env` set for the server (`SLURM_CONF` for its Slurm commands).
    pub fn start_with_env(q: &Queue, db: &Path, images: &Path, extra: &[&str], env: &[(&str, &Path)]) -> Server {
        let log = q.root.path().join(format!("server-{}.log", rand_u32()));
        let child = Command::new(bin("construir-server"))
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .arg("--db")
            .arg(db)
            .arg("serve")
            .arg(&q.queue)
            .args(["--listen", "127.0.0.1:0", "--follow-every", "1s", "--images"])
            .arg(images)
            .args(extra)
            .stderr(fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start construir-server");
        let mut url = String::new();
        assert!(
            wait_for(Duration::from_secs(20), || {
                url = fs::read_to_string(&log)
                    .unwrap_or_default()
                    .lines()
                    .find_map(|l| l.strip_prefix("construir-server: listening on ").map(str::to_owned))
                    .unwrap_or_default();
                !url.is_empty()
            }),
            "the server did not start: {}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        Server { child, url, log }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn addr(&self) -> String {
        self.url.trim_start_matches("http://").trim_start_matches("https://").to_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn rand_u32() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
}

pub fn server_cmd(db: &Path, args: &[&str]) -> Output {
    Command::new(bin("construir-server")).arg("--db").arg(db).args(args).output().expect("construir-server")
}

pub fn add_account(db: &Path, name: &str) -> String {
    let out = server_cmd(db, &["account", "add", name]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf8").trim().to_owned()
}

/// `construir` as a submitter runs it, in `cwd`.
pub fn client(s: &Server, token: &str, cwd: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("construir"))
        .args(["--server", &s.url, "--token", token])
        .args(args)
        .current_dir(cwd)
        .env("HOME", cwd)
        .output()
        .expect("construir");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn job_dir(root: &Path, name: &str, script: &str) -> PathBuf {
    let dir = root.join(name);
    fs::create_dir_all(dir.join("bin")).expect("mkdir");
    fs::write(dir.join("bin/construir"), script).expect("write");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir.join("bin/construir"), fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// One raw HTTP/1.1 request; the status code and the body.
pub fn raw(addr: &str, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    s.write_all(request).expect("send");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned())
}

pub fn upload_files(q: &Queue) -> Vec<String> {
    fs::read_dir(&q.queue)
        .expect("ls")
        .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".upload."))
        .collect()
}

/// An HTTP answer as read off the wire.
#[derive(Debug, Clone)]
pub struct Answer {
    pub code: u16,
    /// The status line and headers.
    pub head: String,
    pub body: String,
}

impl Answer {
    /// A header's value (the first of that name), by its name in any case.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Reads a whole answer from `s` (the request asked to close the connection).
pub fn read_answer(s: &mut TcpStream) -> Answer {
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    // A chunked body (the page, the lists): joined again.
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut joined = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            joined.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        joined
    } else {
        body.to_owned()
    };
    Answer { code, head: head.to_owned(), body }
}

/// One request on a new connection (`Connection: close` is added), the answer.
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(head.as_bytes()).expect("send");
    let _ = s.write_all(body);
    read_answer(&mut s)
}

/// `http` with a bearer token (and a JSON body's type, for a body that is an object).
pub fn api(addr: &str, token: &str, method: &str, path: &str, body: &[u8]) -> Answer {
    let auth = format!("Bearer {token}");
    let mut headers = vec![("Authorization", auth.as_str())];
    if body.starts_with(b"{") {
        headers.push(("Content-Type", "application/json"));
    }
    http(addr, method, path, &headers, body)
}

/// A TCP connection to `addr` from the loopback address `from` (127.0.0.x):
/// another client, as the server counts clients.
pub fn connect_from(from: &str, addr: &str) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let src: std::net::Ipv4Addr = from.parse().expect("an IPv4 address");
    let dst: std::net::SocketAddrV4 = addr.parse().expect("ip:port");
    let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket; each call gets a valid sockaddr_in of the length given.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let a = sockaddr(src, 0);
        if libc::bind(fd, std::ptr::addr_of!(a).cast(), len) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let b = sockaddr(*dst.ip(), dst.port());
        if libc::connect(fd, std::ptr::addr_of!(b).cast(), len) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// The least a server takes as a job file: an xz stream's magic, then zeros, `len` bytes in all.
pub fn job_bytes(len: usize) -> Vec<u8> {
    let mut v = b"\xfd7zXZ\0".to_vec();
    v.resize(len, 0);
    v
}

/// Submits `body` as job `name` for image 0 over raw HTTP; the answer.
pub fn submit_raw(addr: &str, token: &str, name: &str, body: &[u8]) -> Answer {
    api(addr, token, "POST", &format!("/v1/jobs?name={name}&image=0"), body)
}

/// The sha256 of image i0's image.toml, as a host tells the server.
pub fn i0_checksum() -> String {
    let out = Command::new("sha256sum").arg(crate::images().join("i0/image.toml")).output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().expect("a sum").to_owned()
}

/// A host's lease request saying it has i0, with the key it signs with.
pub fn lease_body(capacity: u64) -> Vec<u8> {
    format!(
        r#"{{"images":[{{"name":"0","checksum":"{}"}}],"capacity":{capacity},"running":0,"version":"test","key":"{}"}}"#,
        i0_checksum(),
        test_host_key().public()
    )
    .into_bytes()
}

/// The key that protocol-level test hosts sign their results with.
pub fn test_host_key() -> construir_provenance::HostKey {
    construir_provenance::HostKey::from_seed([9; 32])
}

/// A small, real result: an archive holding `out.txt` with `text`.
pub fn result_bytes(text: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("out.txt"), text).expect("write");
    let mut out = Vec::new();
    jobfile::pack_dir(dir.path(), &mut out, 1 << 20, &jobfile::PackOptions::default()).expect("pack");
    out
}

/// The provenance of `result` and its `log`, signed by `key`, as a host writes it.
/// Provenance for `result` of the job file `job` as the build host `builder` signs it.
pub fn signed_provenance(
    key: &construir_provenance::HostKey,
    builder: &str,
    job: &[u8],
    result: &[u8],
    log: &[u8],
) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("r_d0.tar.xz");
    fs::write(&path, result).expect("write");
    let st = construir_provenance::statement(&construir_provenance::Job {
        result: &path,
        result_name: "r_d0.tar.xz".into(),
        log,
        log_name: "r_d0.log".into(),
        invocation: "r_i0.tar.xz".into(),
        external: construir_provenance::External {
            job: construir_provenance::JobParameter {
                name: String::new(),
                digest: construir_provenance::Sha256 { sha256: construir_provenance::sha256_bytes(job) },
            },
            image: construir_provenance::ImageParameter { name: "i0".into(), ..Default::default() },
            ..Default::default()
        },
        internal: construir_provenance::Machine::default(),
        dependencies: vec![],
        builder_id: format!("construir-host:{builder}"),
        version: "test".into(),
        started: String::new(),
        finished: String::new(),
    })
    .expect("statement");
    let mut line = serde_json::to_vec(&construir_provenance::sign(&st, key)).expect("json");
    line.push(b'\n');
    line
}

/// The path and body of a `done` delivery: the log, the provenance, then the result.
pub fn delivery(id: &str, seq: u64, log: &[u8], provenance: &[u8], result: &[u8]) -> (String, Vec<u8>) {
    let path =
        format!("/v1/host/jobs/{id}/done?seq={seq}&log_bytes={}&provenance_bytes={}", log.len(), provenance.len());
    let mut body = log.to_vec();
    body.extend_from_slice(provenance);
    body.extend_from_slice(result);
    (path, body)
}

impl Server {
    /// Stops the server (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A remote build host of `s`, running until dropped.
pub struct RemoteHost {
    pub process: crate::Spawned,
    /// Its log (`construir-host run`'s standard error).
    pub log: PathBuf,
}

impl RemoteHost {
    /// A host account `name` made in `db`, its token in `root/<name>.token`, and
    /// `construir-host run` on the spool `root/<name>/spool` for the server
    /// `s`, with TCG, 1 GiB and 1 CPU, `--images images`, and `extra`.
    pub fn start(s: &Server, db: &Path, root: &Path, name: &str, images: &Path, extra: &[&str]) -> RemoteHost {
        let out = server_cmd(db, &["account", "add", name, "--host"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let token_file = root.join(format!("{name}.token"));
        fs::write(&token_file, String::from_utf8_lossy(&out.stdout).trim()).expect("token");
        let spool = root.join(name).join("spool");
        fs::create_dir_all(&spool).expect("mkdir");
        let log = root.join(name).join("host.log");
        let process = crate::Spawned(
            Command::new(bin("construir-host"))
                .arg("run")
                .arg(&spool)
                .args(["--server", &s.url, "--token-file"])
                .arg(&token_file)
                .args(["--accel", "tcg", "--memory", "1G", "--cpus", "1", "--host-id", name])
                .arg("--images")
                .arg(images)
                .args(extra)
                .stderr(fs::File::create(&log).expect("log"))
                .spawn()
                .expect("start construir-host"),
        );
        RemoteHost { process, log }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}
