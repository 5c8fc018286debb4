//! The server's API as its HTTP clients call it (the `construir` client and
//! build hosts taking work from a server): one agent, the token, and every
//! answer read as this crate's types, or as the server's refusal.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ErrorBody;

/// One server, as one account.
pub struct Api {
    base: String,
    /// `Bearer <token>`, or what to say when a call needs one and there is none.
    auth: Result<String, String>,
    agent: ureq::Agent,
    /// The CA to trust, for connections made outside the agent (`crate::socket`).
    ca_cert: Option<std::path::PathBuf>,
}

/// How a client reaches its server.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `http(s)://host:port`.
    pub server: String,
    /// The account's token; `Err` says how to give one.
    pub token: Result<String, String>,
    /// A CA to trust (a PEM file) for an `https` server.
    pub ca_cert: Option<std::path::PathBuf>,
    /// Longest a whole call may take (`None`: as long as it goes on).
    pub timeout: Option<Duration>,
}

/// The server said no: its status and what it said, sanitized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub error: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match ureq::http::StatusCode::from_u16(self.status) {
            Ok(status) => write!(f, "{status}: {}", self.error),
            Err(_) => write!(f, "{}: {}", self.status, self.error),
        }
    }
}

/// Why a call did not give its answer.
#[derive(Debug)]
pub enum CallError {
    /// The call needs a token and none was given: how to give one.
    NoToken(String),
    /// The server could not be reached, or the answer not read.
    Unreachable { server: String, source: ureq::Error },
    /// Reading the answer, or writing a download, failed.
    Io { what: String, source: io::Error },
    /// The server said no.
    Refused(Refusal),
    /// The answer is not what this client understands (shown capped, sanitized).
    NotUnderstood(String),
    /// A download ran past what it may be.
    TooLong { path: String, max: u64 },
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::NoToken(how) => write!(f, "{how}"),
            CallError::Unreachable { server, .. } => write!(f, "cannot reach {server}"),
            CallError::Io { what, .. } => write!(f, "{what}"),
            CallError::Refused(r) => write!(f, "the server answered {r}"),
            CallError::NotUnderstood(text) => {
                write!(f, "the server's answer is not what this client understands: {text}")
            }
            CallError::TooLong { path, max } => write!(f, "{path}: the server sent more than the {max} bytes it may"),
        }
    }
}

impl std::error::Error for CallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CallError::Unreachable { source, .. } => Some(source),
            CallError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl CallError {
    /// The server's refusal, when that is what it was.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            CallError::Refused(r) => Some(r),
            _ => None,
        }
    }
}

/// A request body read from a stream.
pub struct Upload<R> {
    pub len: u64,
    pub content_type: &'static str,
    /// Ask the server to say yes before the body goes (`Expect: 100-continue`):
    /// a server that refuses on the headers alone is sent no byte of it.
    pub expect_continue: bool,
    pub body: R,
}

impl Api {
    pub fn new(settings: &Settings) -> io::Result<Api> {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global(settings.timeout);
        if let Some(ca) = &settings.ca_cert {
            config = config.tls_config(trusting(ca)?);
        }
        Ok(Api {
            base: settings.server.trim_end_matches('/').to_owned(),
            auth: settings.token.as_ref().map(|t| format!("Bearer {t}")).map_err(Clone::clone),
            agent: config.build().into(),
            ca_cert: settings.ca_cert.clone(),
        })
    }

    /// The server, as `http(s)://host:port`.
    pub fn server(&self) -> &str {
        &self.base
    }

    /// The CA given to trust, if one was.
    pub fn ca_cert(&self) -> Option<&Path> {
        self.ca_cert.as_deref()
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{path}", self.base)
    }

    /// `Bearer <token>`, or the error saying how to give a token.
    pub fn auth(&self) -> Result<&str, CallError> {
        self.auth.as_deref().map_err(|how| CallError::NoToken(how.clone()))
    }

    fn sent(&self, resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Response, CallError> {
        resp.map_err(|source| CallError::Unreachable { server: self.base.clone(), source })
    }

    /// `GET /v1/<path>`, its answer as `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        answer(self.sent(self.agent.get(self.url(path)).header("Authorization", self.auth()?).call())?)
    }

    /// `DELETE /v1/<path>`, its answer as `T`.
    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        answer(self.sent(self.agent.delete(self.url(path)).header("Authorization", self.auth()?).call())?)
    }

    /// `POST /v1/<path>` with `body` as JSON.
    pub fn post_json<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, CallError> {
        let body = serde_json::to_vec(body).expect("a request always serializes");
        let req = self.agent.post(self.url(path)).header("Authorization", self.auth()?);
        answer(self.sent(req.header("Content-Type", "application/json").send(&body[..]))?)
    }

    /// `POST /v1/<path>` with `body` as it is.
    pub fn post_bytes<T: DeserializeOwned>(&self, path: &str, body: &[u8]) -> Result<T, CallError> {
        answer(self.sent(self.agent.post(self.url(path)).header("Authorization", self.auth()?).send(body))?)
    }

    /// `POST /v1/<path>` (or a path with its query) with a streamed body.
    pub fn post_stream<T: DeserializeOwned>(&self, path: &str, upload: Upload<impl Read>) -> Result<T, CallError> {
        let mut body = upload.body;
        let mut req = self
            .agent
            .post(self.url(path))
            .header("Authorization", self.auth()?)
            .header("Content-Type", upload.content_type)
            .header("Content-Length", upload.len.to_string());
        if upload.expect_continue {
            req = req.header("Expect", "100-continue");
        }
        answer(self.sent(req.send(ureq::SendBody::from_reader(&mut body)))?)
    }

    /// `GET /v1/<path>` from byte `from` on, written into `out`, at most
    /// `max` bytes; how many were written (none when nothing is past `from`).
    pub fn download(&self, path: &str, from: u64, max: Option<u64>, out: &mut dyn Write) -> Result<u64, CallError> {
        let mut req = self.agent.get(self.url(path)).header("Authorization", self.auth()?);
        if from > 0 {
            req = req.header("Range", format!("bytes={from}-"));
        }
        let resp = self.sent(req.call())?;
        if resp.status() == 416 {
            return Ok(0);
        }
        if !resp.status().is_success() {
            return Err(refusal(resp));
        }
        let limit = max.map_or(u64::MAX, |m| m.saturating_add(1));
        let mut body = resp.into_body().into_with_config().limit(limit).reader();
        let n = io::copy(&mut body, out)
            .map_err(|source| CallError::Io { what: format!("cannot download {path}"), source })?;
        match max {
            Some(max) if n > max => Err(CallError::TooLong { path: path.to_owned(), max }),
            _ => Ok(n),
        }
    }
}

type Response = ureq::http::Response<ureq::Body>;

/// A 2xx answer as `T`; any other, the server's refusal.
fn answer<T: DeserializeOwned>(resp: Response) -> Result<T, CallError> {
    if !resp.status().is_success() {
        return Err(refusal(resp));
    }
    let text = read_text(resp)?;
    serde_json::from_str(&text)
        .map_err(|_| CallError::NotUnderstood(jobfile::text::sanitize_capped(text.as_bytes(), 200)))
}

pub(crate) fn refusal_of(status: u16, text: String) -> CallError {
    let error = serde_json::from_str::<ErrorBody>(&text).map_or(text, |e| e.error);
    CallError::Refused(Refusal { status, error: jobfile::sanitize(error.as_bytes()) })
}

fn refusal(resp: Response) -> CallError {
    let status = resp.status().as_u16();
    let text = match read_text(resp) {
        Ok(text) => text,
        Err(e) => return e,
    };
    refusal_of(status, text)
}

fn read_text(resp: Response) -> Result<String, CallError> {
    resp.into_body()
        .read_to_string()
        .map_err(|e| CallError::Io { what: "cannot read the server's answer".into(), source: io::Error::other(e) })
}

/// TLS that trusts the certificates in the PEM file `ca` (`--ca-cert`).
pub fn trusting(ca: &Path) -> io::Result<ureq::tls::TlsConfig> {
    let pem = std::fs::read(ca).map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", ca.display())))?;
    let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} holds no PEM certificate", ca.display())));
    }
    Ok(ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::new_with_certs(&certs)).build())
}
