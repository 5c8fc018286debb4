//! A debug session: the root shell a failed job's VM keeps open for its
//! owner, after its result is packed (docs/DESIGN.md, "Debug sessions").
//! This module is the contract between the session's parts:
//!
//! - the guest's port (`PORT_NAME`, a virtio-console port) and the console
//!   line init prints once the result is packed and synced (`OPEN_MARKER`);
//! - the frames that travel toward the guest (`Frame`: the shell's input,
//!   or the terminal's size); what comes back is the shell's bytes, as they
//!   are. Hosts and the server relay both directions as bytes and never
//!   read them; only init decodes frames;
//! - where a local queue's open session is (`running/.debug/`): its socket
//!   and what it says of itself (`Session`).

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The name of the guest's session port (`/sys/class/virtio-ports/*/name`).
pub const PORT_NAME: &str = "construir.debug";
/// What init prints on the console once the result is packed and synced
/// and the session is open. It is the guest's word: the host reads the
/// result then, and its own bounds hold whether the word is true or not.
pub const OPEN_MARKER: &[u8] = b"construir-init: debug session open";
/// The longest payload of one frame.
pub const MAX_FRAME: usize = 16 << 10;
/// How long a session waits for someone to attach, by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(600);
/// How long a session lasts at most, by default.
pub const DEFAULT_MAX: Duration = Duration::from_secs(3600);

const DATA: u8 = 0;
const SIZE: u8 = 1;

/// One frame toward the guest: `[kind: u8][length: u16 BE][payload]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Input for the shell.
    Data(Vec<u8>),
    /// The terminal's size; the first frame of a session is one.
    Size { rows: u16, cols: u16 },
}

impl Frame {
    /// The frames that carry `bytes` (at most `MAX_FRAME` each), appended to `out`.
    pub fn data(bytes: &[u8], out: &mut Vec<u8>) {
        for chunk in bytes.chunks(MAX_FRAME) {
            out.push(DATA);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
    }

    /// The encoded frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Frame::Data(bytes) => Frame::data(bytes, &mut out),
            Frame::Size { rows, cols } => {
                out.extend_from_slice(&[SIZE, 0, 4]);
                out.extend_from_slice(&rows.to_be_bytes());
                out.extend_from_slice(&cols.to_be_bytes());
            }
        }
        out
    }
}

/// Turns a byte stream back into frames, whatever the reads' boundaries.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// The whole frames `bytes` completes. An unknown kind, an oversized
    /// frame or a size frame of the wrong length is an error: the stream
    /// cannot be followed after it.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Frame>, String> {
        self.buf.extend_from_slice(bytes);
        let mut frames = Vec::new();
        let mut at = 0;
        while self.buf.len() - at >= 3 {
            let kind = self.buf[at];
            let len = u16::from_be_bytes([self.buf[at + 1], self.buf[at + 2]]) as usize;
            if len > MAX_FRAME {
                return Err(format!("a frame of {len} bytes (at most {MAX_FRAME})"));
            }
            if self.buf.len() - at - 3 < len {
                break;
            }
            let payload = &self.buf[at + 3..at + 3 + len];
            frames.push(match (kind, len) {
                (DATA, _) => Frame::Data(payload.to_vec()),
                (SIZE, 4) => Frame::Size {
                    rows: u16::from_be_bytes([payload[0], payload[1]]),
                    cols: u16::from_be_bytes([payload[2], payload[3]]),
                },
                (SIZE, n) => return Err(format!("a size frame of {n} bytes (4 expected)")),
                (k, _) => return Err(format!("a frame of unknown kind {k}")),
            });
            at += 3 + len;
        }
        self.buf.drain(..at);
        Ok(frames)
    }
}

/// What an open session on a local queue says of itself, in
/// `running/.debug/<file name>.json`; written by the host that runs the VM,
/// removed when the VM is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The host that runs the VM.
    pub host: String,
    /// The socket's name in `running/.debug/` (a short name: socket paths are bounded).
    pub socket: String,
    /// Unix seconds: when the session opened, the latest someone may
    /// attach, the latest it ends.
    pub opened: u64,
    pub attach_by: u64,
    pub ends_by: u64,
    /// Unix seconds: when someone attached (one may, once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached: Option<u64>,
}

/// Where local sessions are: `running/.debug/`, shared by every host on the queue.
pub fn session_dir(running: &Path) -> PathBuf {
    running.join(".debug")
}

/// The record of the session of the job `file_name` (the name it was claimed by).
pub fn session_file(running: &Path, file_name: &OsStr) -> PathBuf {
    let mut name = file_name.to_owned();
    name.push(".json");
    session_dir(running).join(name)
}

/// The session socket's name for `file_name`: 24 hex digits of its sha256.
pub fn socket_name(file_name: &OsStr) -> String {
    let digest = Sha256::digest(file_name.as_encoded_bytes());
    let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("{hex}.sock")
}

/// The open session of `file_name`, if its record is there and reads.
pub fn read_session(running: &Path, file_name: &OsStr) -> Option<Session> {
    let text = crate::layout::read_small(&session_file(running, file_name), 4096).ok()??;
    serde_json::from_slice(&text).ok()
}

/// Writes the record (whole, by rename).
pub fn write_session(running: &Path, file_name: &OsStr, session: &Session) -> io::Result<()> {
    let json = serde_json::to_vec_pretty(session).map_err(io::Error::other)?;
    crate::layout::write_whole(&session_file(running, file_name), &json)
}

/// A request to end the session of `file_name` now (its owner's cancel):
/// an empty file the host that serves it looks for.
pub fn end_request(running: &Path, file_name: &OsStr) -> PathBuf {
    let mut name = file_name.to_owned();
    name.push(".end");
    session_dir(running).join(name)
}

/// Asks for the session of `file_name` to end; `false` when none is open.
pub fn request_end(running: &Path, file_name: &OsStr) -> io::Result<bool> {
    if read_session(running, file_name).is_none() {
        return Ok(false);
    }
    fs::write(end_request(running, file_name), b"")?;
    Ok(true)
}

/// Removes the record, the socket and any request to end it.
pub fn remove_session(running: &Path, file_name: &OsStr) {
    let _ = fs::remove_file(session_file(running, file_name));
    let _ = fs::remove_file(session_dir(running).join(socket_name(file_name)));
    let _ = fs::remove_file(end_request(running, file_name));
}

/// The socket's path through an open descriptor of its directory
/// (`/proc/self/fd/N/<name>`), so that no queue path, however long, meets
/// the 108 bytes a socket address holds.
fn through(dir: &fs::File, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()))
}

/// Listens on the session socket of `file_name` (owner and group may connect).
pub fn listen(running: &Path, file_name: &OsStr) -> io::Result<UnixListener> {
    let dir_path = session_dir(running);
    fs::create_dir_all(&dir_path)?;
    let dir = fs::File::open(&dir_path)?;
    let name = socket_name(file_name);
    let _ = fs::remove_file(dir_path.join(&name));
    let listener = UnixListener::bind(through(&dir, &name))?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir_path.join(&name), fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Connects to the open session of `file_name` on a local queue.
pub fn connect(running: &Path, file_name: &OsStr) -> io::Result<UnixStream> {
    let dir = fs::File::open(session_dir(running))?;
    UnixStream::connect(through(&dir, &socket_name(file_name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_any_split_and_bad_ones_are_refused() {
        let mut bytes = Frame::Size { rows: 40, cols: 120 }.encode();
        Frame::data(b"ls /job\r", &mut bytes);
        bytes.extend(Frame::Data(vec![b'x'; MAX_FRAME + 5]).encode());
        for split in [1, 2, 3, 7, 100, bytes.len()] {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for chunk in bytes.chunks(split) {
                got.extend(d.push(chunk).expect("frames"));
            }
            assert_eq!(got[0], Frame::Size { rows: 40, cols: 120 });
            assert_eq!(got[1], Frame::Data(b"ls /job\r".to_vec()));
            let rest: Vec<u8> =
                got[2..].iter().flat_map(|f| if let Frame::Data(b) = f { b.clone() } else { vec![] }).collect();
            assert_eq!(rest.len(), MAX_FRAME + 5, "split {split}");
        }
        assert!(Decoder::default().push(&[9, 0, 0]).is_err());
        assert!(Decoder::default().push(&[SIZE, 0, 3, 1, 2, 3]).is_err());
        assert!(Decoder::default().push(&[DATA, 0xff, 0xff]).is_err());
    }

    #[test]
    fn a_session_is_found_by_its_file_name_and_its_socket_connects() {
        let dir = tempfile::tempdir().expect("tempdir");
        let running = dir.path().join("a-long-queue-path-".repeat(6));
        fs::create_dir_all(&running).expect("mkdir");
        let file = OsStr::new("a-job-with-a-rather-long-name-that-would-not-fit-in-a-socket-address_i0.tar.xz");
        let listener = listen(&running, file).expect("listen");
        let session = Session {
            host: "h".into(),
            socket: socket_name(file),
            opened: 1,
            attach_by: 2,
            ends_by: 3,
            attached: None,
        };
        write_session(&running, file, &session).expect("write");
        assert_eq!(read_session(&running, file), Some(session));
        let mut client = connect(&running, file).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        io::Write::write_all(&mut client, b"hi").expect("write");
        let mut got = [0u8; 2];
        io::Read::read_exact(&mut server, &mut got).expect("read");
        assert_eq!(&got, b"hi");
        remove_session(&running, file);
        assert_eq!(read_session(&running, file), None);
        assert!(connect(&running, file).is_err());
    }
}
