//! `construir-loadbench`: one construir-server under load, driven at the
//! protocol level. Submitters upload jobs while build hosts lease, fetch,
//! renew and deliver them, with no VMs: what is measured is the server.
//!
//! Usage: construir-loadbench SERVER_BIN IMAGES JOB_FILE sqlite|postgres
//!        [JOBS SUBMITTERS HOSTS]
//!
//! Prints one line of `key=value` figures (scripts/bench makes its rows of
//! them) and exits non-zero unless every job was delivered exactly once and
//! the server says so of each.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Args {
    server: PathBuf,
    images: PathBuf,
    job: Vec<u8>,
    postgres: bool,
    jobs: usize,
    submitters: usize,
    hosts: usize,
}

fn args() -> Result<Args, String> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 4 && a.len() != 7 {
        return Err(
            "usage: construir-loadbench SERVER_BIN IMAGES JOB_FILE sqlite|postgres [JOBS SUBMITTERS HOSTS]".into()
        );
    }
    let postgres = match a[3].as_str() {
        "sqlite" => false,
        "postgres" => true,
        other => return Err(format!("{other:?}: the database is sqlite or postgres")),
    };
    let number = |s: &str| {
        s.parse::<usize>().map_err(|e| format!("{s:?}: {e}")).and_then(|n| match n {
            0 => Err("counts are at least 1".to_owned()),
            n => Ok(n),
        })
    };
    let (jobs, submitters, hosts) =
        if a.len() == 7 { (number(&a[4])?, number(&a[5])?, number(&a[6])?) } else { (1000, 50, 20) };
    Ok(Args {
        server: a[0].clone().into(),
        images: a[1].clone().into(),
        job: fs::read(&a[2]).map_err(|e| format!("{}: {e}", a[2]))?,
        postgres,
        jobs,
        submitters,
        hosts,
    })
}

/// The server under test, killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn account(server: &Path, db: &str, name: &str, host: bool) -> Result<String, String> {
    let mut cmd = Command::new(server);
    cmd.args(["--db", db, "account", "add", name]);
    if host {
        cmd.arg("--host");
    }
    let out = cmd.output().map_err(|e| format!("{}: {e}", server.display()))?;
    if !out.status.success() {
        return Err(format!("account add {name}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn start(server: &Path, db: &str, queue: &Path, images: &Path, log: &Path) -> Result<Server, String> {
    let child = Command::new(server)
        .args(["--db", db, "serve"])
        .arg(queue)
        .arg("--images")
        .arg(images)
        .args(["--listen", "127.0.0.1:0", "--max-waiting", "100000", "--max-per-hour", "1000000"])
        .args(["--max-stored", "1T", "--min-free", "100M", "--max-connections-per-address", "1024"])
        .stdin(Stdio::null())
        .stderr(fs::File::create(log).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("{}: {e}", server.display()))?;
    let mut server = Server { child, url: String::new() };
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        let text = fs::read_to_string(log).unwrap_or_default();
        if let Some(url) = text.lines().find_map(|l| l.strip_prefix("construir-server: listening on ")) {
            server.url = url.to_owned();
            return Ok(server);
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            return Err(format!("the server exited ({status}): {text}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("the server did not start: {}", fs::read_to_string(log).unwrap_or_default()))
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// Milliseconds each call of one kind took.
#[derive(Default)]
struct Times(Mutex<Vec<f64>>);

impl Times {
    fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(start.elapsed().as_secs_f64() * 1000.0);
        out
    }

    /// (p50, p99) in ms.
    fn percentiles(&self) -> (f64, f64) {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if v.is_empty() {
            return (0.0, 0.0);
        }
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
        (at(0.50), at(0.99))
    }
}

fn read_json(resp: ureq::http::Response<ureq::Body>) -> Result<(u16, Value), String> {
    let status = resp.status().as_u16();
    let text = resp.into_body().read_to_string().map_err(|e| e.to_string())?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

#[derive(Default)]
struct Tally {
    submit: Times,
    lease: Times,
    renew: Times,
    /// Job id -> how many times a host's delivery of it was accepted.
    delivered: Mutex<HashMap<String, usize>>,
    accepted: AtomicUsize,
}

/// One submitter: `count` uploads, one after another. Returns the job ids.
fn submitter(url: &str, token: &str, job: &[u8], count: usize, tally: &Tally) -> Result<Vec<String>, String> {
    let agent = agent();
    let mut ids = Vec::new();
    for i in 0..count {
        let resp = tally.submit.time(|| {
            agent
                .post(format!("{url}/v1/jobs"))
                .query("name", format!("load{i}"))
                .query("image", "0")
                .header("Authorization", format!("Bearer {token}"))
                .send(job)
        });
        let (status, v) = read_json(resp.map_err(|e| format!("submit: {e}"))?)?;
        if status != 201 {
            return Err(format!("submit answered {status}: {v}"));
        }
        ids.push(v["id"].as_str().ok_or("a submission without an id")?.to_owned());
    }
    Ok(ids)
}

/// One build host with room for one job at a time: lease, fetch the file,
/// renew twice (a console line each), deliver; until `jobs` are delivered.
fn host(url: &str, name: &str, token: &str, image: &Value, jobs: usize, tally: &Tally) -> Result<(), String> {
    let agent = agent();
    let auth = format!("Bearer {token}");
    // Each host signs what it delivers, as a real one does.
    let key = construir_e2e::server::test_host_key();
    let body = json!({ "images": [image], "capacity": 1, "running": 0, "version": "loadbench", "key": key.public().to_string() })
        .to_string();
    while tally.accepted.load(Ordering::SeqCst) < jobs {
        let start = Instant::now();
        let resp = agent
            .post(format!("{url}/v1/host/lease"))
            .header("Authorization", &auth)
            .header("Content-Type", "application/json")
            .send(body.as_bytes());
        let (status, v) = read_json(resp.map_err(|e| format!("lease: {e}"))?)?;
        if status != 200 {
            return Err(format!("lease answered {status}: {v}"));
        }
        let lease = &v["lease"];
        if lease.is_null() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        tally.lease.0.lock().unwrap_or_else(|p| p.into_inner()).push(start.elapsed().as_secs_f64() * 1000.0);
        let id = lease["id"].as_str().ok_or("a lease without an id")?.to_owned();
        let seq = lease["seq"].as_u64().ok_or("a lease without a seq")?.to_string();
        let resp = agent
            .get(format!("{url}/v1/host/jobs/{id}/file"))
            .query("seq", &seq)
            .header("Authorization", &auth)
            .call()
            .map_err(|e| format!("job file: {e}"))?;
        if resp.status().as_u16() != 200 {
            return Err(format!("job file answered {:?}", read_json(resp)?));
        }
        let mut file = Vec::new();
        resp.into_body().into_reader().read_to_end(&mut file).map_err(|e| format!("job file: {e}"))?;
        let mut console = Vec::new();
        for line in ["construir-init: unpacked /job\n", "building\n"] {
            let offset = console.len().to_string();
            console.extend_from_slice(line.as_bytes());
            let resp = tally.renew.time(|| {
                agent
                    .post(format!("{url}/v1/host/jobs/{id}/renew"))
                    .query("seq", &seq)
                    .query("offset", &offset)
                    .header("Authorization", &auth)
                    .send(line.as_bytes())
            });
            let (status, v) = read_json(resp.map_err(|e| format!("renew: {e}"))?)?;
            if status != 200 {
                return Err(format!("renew answered {status}: {v}"));
            }
        }
        console.extend_from_slice(b"construir-init: job exited with status 0\n");
        let provenance = construir_e2e::server::signed_provenance(&key, name, &file, &file, &console);
        let mut delivery = console.clone();
        delivery.extend_from_slice(&provenance);
        delivery.extend_from_slice(&file);
        let resp = agent
            .post(format!("{url}/v1/host/jobs/{id}/done"))
            .query("seq", &seq)
            .query("log_bytes", console.len().to_string())
            .query("provenance_bytes", provenance.len().to_string())
            .header("Authorization", &auth)
            .send(&delivery[..]);
        let (status, v) = read_json(resp.map_err(|e| format!("deliver: {e}"))?)?;
        if status != 200 || v["delivered"] != json!(true) {
            return Err(format!("delivery of {id} answered {status}: {v}"));
        }
        *tally.delivered.lock().unwrap_or_else(|p| p.into_inner()).entry(id).or_default() += 1;
        tally.accepted.fetch_add(1, Ordering::SeqCst);
    }
    Ok(())
}

fn status_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    match run() {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("construir-loadbench: {e}");
            std::process::exit(1);
        }
    }
}

fn run() -> Result<String, String> {
    let a = args()?;
    let work = tempfile::Builder::new().prefix("construir-loadbench.").tempdir().map_err(|e| e.to_string())?;
    let pg = a.postgres.then(construir_e2e::Postgres::start);
    let db = match &pg {
        Some(pg) => pg.url.clone(),
        None => work.path().join("server.db").to_string_lossy().into_owned(),
    };
    let submitter_tokens: Vec<String> =
        (0..a.submitters).map(|i| account(&a.server, &db, &format!("sub{i}"), false)).collect::<Result<_, _>>()?;
    let host_tokens: Vec<String> =
        (0..a.hosts).map(|i| account(&a.server, &db, &format!("host{i}"), true)).collect::<Result<_, _>>()?;
    let checksum = jobfile::image::sha256_file(&a.images.join("i0").join(jobfile::image::MANIFEST))
        .map_err(|e| format!("{}: no image i0: {e}", a.images.display()))?;
    let image = json!({ "name": "0", "checksum": checksum });
    let server = start(&a.server, &db, &work.path().join("queue"), &a.images, &work.path().join("server.log"))?;
    let pid = server.child.id();
    let rss_idle = status_kib(pid, "VmRSS");
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let (ids, host_results) = std::thread::scope(|s| {
        let hosts: Vec<_> = host_tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let (url, image, tally) = (&server.url, &image, &tally);
                s.spawn(move || host(url, &format!("host{i}"), t, image, a.jobs, tally))
            })
            .collect();
        let subs: Vec<_> = submitter_tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let count = a.jobs / a.submitters + usize::from(i < a.jobs % a.submitters);
                let (url, job, tally) = (&server.url, &a.job, &tally);
                s.spawn(move || submitter(url, t, job, count, tally))
            })
            .collect();
        let mut ids = Vec::new();
        let mut failure = None;
        for (i, h) in subs.into_iter().enumerate() {
            match h.join() {
                Ok(Ok(mut v)) => ids.push((i, std::mem::take(&mut v))),
                Ok(Err(e)) => failure = Some(e),
                Err(_) => failure = Some("a submitter panicked".into()),
            }
        }
        if failure.is_some() {
            // Without every submission the hosts would wait for ever.
            tally.accepted.store(usize::MAX / 2, Ordering::SeqCst);
        }
        let results: Vec<_> =
            hosts.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a host panicked".into()))).collect();
        (failure.map_or(Ok(ids), Err), results)
    });
    let elapsed = started.elapsed().as_secs_f64();
    let ids = ids?;
    for r in host_results {
        r?;
    }
    let rss_peak = status_kib(pid, "VmHWM");
    // Exactly once: every submitted job delivered by one host, once, and the server says done.
    let delivered = tally.delivered.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let total: usize = ids.iter().map(|(_, v)| v.len()).sum();
    if total != a.jobs {
        return Err(format!("{total} of {} jobs were submitted", a.jobs));
    }
    if let Some((id, n)) = delivered.iter().find(|(_, n)| **n != 1) {
        return Err(format!("job {id} was delivered {n} times"));
    }
    let agent = agent();
    for (i, job_ids) in &ids {
        for id in job_ids {
            if !delivered.contains_key(id) {
                return Err(format!("job {id} was never delivered"));
            }
            let resp = agent
                .get(format!("{}/v1/jobs/{id}", server.url))
                .header("Authorization", format!("Bearer {}", submitter_tokens[*i]))
                .call()
                .map_err(|e| e.to_string())?;
            let (status, v) = read_json(resp)?;
            if status != 200 || v["state"] != "done" {
                return Err(format!("job {id}: the server says {status} {v}"));
            }
        }
    }
    if delivered.len() != a.jobs {
        return Err(format!("{} jobs delivered, {} submitted", delivered.len(), a.jobs));
    }
    let done = fs::read_dir(work.path().join("done"))
        .map_err(|e| e.to_string())?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with("_d0.tar.xz"))
        .count();
    if done != a.jobs {
        return Err(format!("{done} results in done/, {} jobs", a.jobs));
    }
    let (s50, s99) = tally.submit.percentiles();
    let (l50, l99) = tally.lease.percentiles();
    let (r50, r99) = tally.renew.percentiles();
    drop(server);
    drop(pg);
    Ok(format!(
        "jobs={} seconds={elapsed:.2} jobs_per_s={:.1} submit_p50_ms={s50:.1} submit_p99_ms={s99:.1} \
         lease_p50_ms={l50:.1} lease_p99_ms={l99:.1} renew_p50_ms={r50:.1} renew_p99_ms={r99:.1} \
         rss_idle_mib={:.1} rss_peak_mib={:.1} exactly_once=yes",
        a.jobs,
        a.jobs as f64 / elapsed,
        rss_idle as f64 / 1024.0,
        rss_peak as f64 / 1024.0
    ))
}
