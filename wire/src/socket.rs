//! A WebSocket to the server, for a debug session's bytes: the submitter's
//! terminal (`construir debug`) and a remote host's side of a session it
//! offers. Binary messages carry the bytes as they are (frames toward the
//! guest, the shell's output back); nothing else is read from them. Over
//! plain TCP or TLS (the CA given, or the web's roots), as the API is.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jobfile::terminal::{Link, Received};
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{HandshakeError, Message, WebSocket};

use crate::client::{refusal_of, Api, CallError};

/// The most one message may carry.
pub const MAX_MESSAGE: usize = 64 << 10;

/// The connection under the WebSocket.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// An open WebSocket to the server.
pub struct Socket {
    ws: WebSocket<Stream>,
}

fn config() -> WebSocketConfig {
    WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE)).max_frame_size(Some(MAX_MESSAGE))
}

impl Socket {
    /// A WebSocket to `GET /v1/<path>` of `api`'s server, authenticated as its account.
    pub fn open(api: &Api, path: &str) -> Result<Socket, CallError> {
        Socket::connect(api.server(), &format!("/v1/{path}"), api.auth()?, api.ca_cert())
    }

    /// Connects to `base` (`http(s)://host:port`) and upgrades `GET path`, with `auth` as its `Authorization`.
    pub fn connect(base: &str, path: &str, auth: &str, ca_cert: Option<&Path>) -> Result<Socket, CallError> {
        let unreachable = |e: io::Error| CallError::Io { what: format!("cannot reach {base}"), source: e };
        let (tls, rest) = match base.split_once("://") {
            Some(("https", rest)) => (true, rest),
            Some(("http", rest)) => (false, rest),
            _ => return Err(unreachable(io::Error::other("the server is not an http(s):// address"))),
        };
        let authority = rest.split('/').next().unwrap_or(rest);
        let host = host_of(authority);
        let after_host = authority.rsplit(']').next().unwrap_or(authority);
        let address = if after_host.contains(':') {
            authority.to_owned()
        } else {
            format!("{authority}:{}", if tls { 443 } else { 80 })
        };
        let tcp = TcpStream::connect(&address).map_err(unreachable)?;
        tcp.set_nodelay(true).map_err(unreachable)?;
        tcp.set_read_timeout(Some(Duration::from_secs(30))).map_err(unreachable)?;
        let stream = if tls {
            let config = tls_config(ca_cert).map_err(unreachable)?;
            let name = rustls_pki_types::ServerName::try_from(host.to_owned())
                .map_err(|e| unreachable(io::Error::other(e.to_string())))?;
            let conn = rustls::ClientConnection::new(Arc::new(config), name)
                .map_err(|e| unreachable(io::Error::other(e.to_string())))?;
            Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)))
        } else {
            Stream::Plain(tcp)
        };
        let url = format!("{}://{authority}{path}", if tls { "wss" } else { "ws" });
        let mut request = url.into_client_request().map_err(|e| unreachable(io::Error::other(e.to_string())))?;
        let value = auth.parse().map_err(|_| unreachable(io::Error::other("the token is not a header value")))?;
        request.headers_mut().insert("Authorization", value);
        match tungstenite::client::client_with_config(request, stream, Some(config())) {
            Ok((ws, _)) => Ok(Socket { ws }),
            Err(HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
                let status = resp.status().as_u16();
                let body = resp.into_body().map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
                Err(refusal_of(status, body))
            }
            Err(e) => Err(unreachable(io::Error::other(e.to_string()))),
        }
    }

    /// Closes the socket, saying why (at most a short line).
    pub fn close(mut self, why: &str) {
        let frame = tungstenite::protocol::CloseFrame {
            code: tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: why.chars().take(100).collect::<String>().into(),
        };
        let _ = self.ws.close(Some(frame));
        let _ = self.ws.flush();
    }
}

impl Link for Socket {
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        for chunk in bytes.chunks(MAX_MESSAGE) {
            self.ws.send(Message::Binary(chunk.to_vec().into())).map_err(into_io)?;
        }
        Ok(())
    }

    fn recv(&mut self, wait: Duration) -> io::Result<Received> {
        self.ws.get_ref().tcp().set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
        match self.ws.read() {
            Ok(Message::Binary(b)) => Ok(Received::Bytes(b.to_vec())),
            Ok(Message::Close(_)) | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Ok(Received::Closed)
            }
            Ok(_) => Ok(Received::Idle),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(Received::Idle)
            }
            Err(e) => Err(into_io(e)),
        }
    }
}

fn into_io(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        e => io::Error::other(e.to_string()),
    }
}

/// The host part of `host:port` or `[v6]:port`.
fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

/// TLS trusting `ca` (a PEM file), or the web's roots.
fn tls_config(ca: Option<&Path>) -> io::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(ca) => {
            use rustls_pki_types::pem::PemObject;
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca)
                .map_err(|e| io::Error::other(format!("cannot read {}: {e}", ca.display())))?;
            for cert in certs {
                let cert = cert.map_err(|e| io::Error::other(format!("{}: {e}", ca.display())))?;
                roots.add(cert).map_err(|e| io::Error::other(format!("{}: {e}", ca.display())))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| io::Error::other(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_found_in_either_form() {
        assert_eq!(host_of("127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(host_of("[::1]:8080"), "::1");
        assert_eq!(host_of("example"), "example");
    }
}
