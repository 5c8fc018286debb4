//! Headless Chromium driven as a person uses it: open a page, click a
//! button, read what it shows, take a screenshot. It speaks the DevTools
//! protocol over `--remote-debugging-pipe` (JSON messages ending in a NUL
//! byte on file descriptors 3 and 4), so a test needs nothing beyond
//! Debian's `chromium` package. A click is a real mouse event at the
//! element's place on the page; no script is run in the page.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A headless Chromium with one page, killed when dropped.
pub struct Browser {
    child: Child,
    to: File,
    from: mpsc::Receiver<Value>,
    /// Events that came while a command's answer was awaited.
    events: Vec<Value>,
    next: u64,
    session: String,
    _profile: tempfile::TempDir,
}

/// How long any one step may take.
const STEP: Duration = Duration::from_secs(30);

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just made and are owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl Browser {
    /// Starts Chromium (a fresh profile in `scratch`) with an empty page `width` x `height`.
    pub fn start(scratch: &Path, width: u32, height: u32) -> Browser {
        use std::os::fd::AsRawFd;
        let profile = tempfile::tempdir_in(scratch).expect("profile");
        let (cmd_read, cmd_write) = pipe();
        let (resp_read, resp_write) = pipe();
        let (cr, rw) = (cmd_read.as_raw_fd(), resp_write.as_raw_fd());
        let mut command = Command::new("chromium");
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-pipe",
                &format!("--window-size={width},{height}"),
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(profile.path().join("chromium.log")).expect("log"));
        // SAFETY: only dup2 between fork and exec, on descriptors open in the parent.
        unsafe {
            command.pre_exec(move || {
                // Out of the way first: either may be 3 or 4 already.
                let (a, b) = (libc::fcntl(cr, libc::F_DUPFD, 10), libc::fcntl(rw, libc::F_DUPFD, 10));
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("chromium (Debian package chromium; scripts/test installs it)");
        drop((cmd_read, resp_write));
        let (tx, rx) = mpsc::channel();
        let reader = File::from(resp_read);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            while reader.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                buf.pop();
                if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
                buf.clear();
            }
        });
        let mut b = Browser {
            child,
            to: File::from(cmd_write),
            from: rx,
            events: Vec::new(),
            next: 1,
            session: String::new(),
            _profile: profile,
        };
        let target = b.call("Target.createTarget", json!({ "url": "about:blank" }))["targetId"].clone();
        let attached = b.call("Target.attachToTarget", json!({ "targetId": target, "flatten": true }));
        b.session = attached["sessionId"].as_str().expect("a session").to_owned();
        b.call("Page.enable", json!({}));
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        );
        b
    }

    fn send(&mut self, method: &str, params: Value) -> u64 {
        let id = self.next;
        self.next += 1;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).expect("json");
        bytes.push(0);
        if let Err(e) = self.to.write_all(&bytes) {
            panic!("cannot write to chromium ({e}): {}", self.stderr());
        }
        id
    }

    fn recv(&mut self, deadline: Instant) -> Value {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.from.recv_timeout(left) {
            Ok(v) => v,
            Err(e) => panic!("chromium did not answer ({e}): {}", self.stderr()),
        }
    }

    /// What Chromium said on stderr.
    fn stderr(&self) -> String {
        std::fs::read_to_string(self._profile.path().join("chromium.log")).unwrap_or_default()
    }

    /// Sends a command and waits for its answer; panics on a protocol error.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.send(method, params);
        let deadline = Instant::now() + STEP;
        loop {
            let msg = self.recv(deadline);
            if msg["id"] == id {
                assert!(msg.get("error").is_none(), "{method}: {}", msg["error"]);
                return msg["result"].clone();
            }
            self.events.push(msg);
        }
    }

    /// Waits for the page's next `load` event.
    fn wait_load(&mut self) {
        if let Some(i) = self.events.iter().position(|e| e["method"] == "Page.loadEventFired") {
            self.events.remove(i);
            return;
        }
        let deadline = Instant::now() + STEP;
        loop {
            let msg = self.recv(deadline);
            if msg["method"] == "Page.loadEventFired" {
                return;
            }
        }
    }

    /// Opens `url` and waits until it has loaded.
    pub fn open(&mut self, url: &str) {
        self.events.clear();
        let nav = self.call("Page.navigate", json!({ "url": url }));
        assert!(nav.get("errorText").is_none(), "{url}: {nav}");
        self.wait_load();
    }

    /// The page's markup, as it is now.
    pub fn dom(&mut self) -> String {
        let root = self.call("DOM.getDocument", json!({ "depth": 0 }))["root"]["nodeId"].clone();
        self.call("DOM.getOuterHTML", json!({ "nodeId": root }))["outerHTML"].as_str().unwrap_or_default().to_owned()
    }

    /// Clicks the first element matching `selector` with the mouse, and waits for the page it leads to.
    pub fn click_and_wait(&mut self, selector: &str) {
        let root = self.call("DOM.getDocument", json!({ "depth": 0 }))["root"]["nodeId"].clone();
        let node = self.call("DOM.querySelector", json!({ "nodeId": root, "selector": selector }))["nodeId"].clone();
        assert_ne!(node, json!(0), "no {selector} on the page:\n{}", self.dom());
        let quad = self.call("DOM.getBoxModel", json!({ "nodeId": node }))["model"]["content"].clone();
        let q: Vec<f64> = quad.as_array().expect("a quad").iter().filter_map(Value::as_f64).collect();
        let (x, y) = ((q[0] + q[4]) / 2.0, (q[1] + q[5]) / 2.0);
        self.events.clear();
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            );
        }
        self.wait_load();
    }

    /// A PNG of the page as shown.
    pub fn screenshot(&mut self, to: &Path) {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let data = shot["data"].as_str().expect("image data");
        std::fs::write(to, base64_decode(data)).expect("write the screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64 (the protocol's encoding of binary data).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in text.bytes().filter_map(value) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
