//! The server's HTTP API as this host calls it: requests, answers, and
//! what an error answer says.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::*;

/// The server's API, as a host uses it.
pub struct Api {
    pub(crate) base: String,
    pub(crate) auth: String,
    pub(crate) agent: ureq::Agent,
}

/// An answer: the status and the JSON body (or the text, as a JSON string).
pub(crate) type Answer = (u16, Value);

impl Api {
    pub fn new(remote: &Remote) -> Result<Api> {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global(Some(Duration::from_secs(3600)));
        if let Some(ca) = &remote.ca_cert {
            config = config.tls_config(jobfile::http::trusting(ca)?);
        }
        let agent: ureq::Agent = config.build().into();
        Ok(Api {
            base: remote.server.trim_end_matches('/').to_owned(),
            auth: format!("Bearer {}", remote.token),
            agent,
        })
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}/v1/{path}", self.base)
    }

    pub(crate) fn answer(resp: ureq::http::Response<ureq::Body>) -> Result<Answer> {
        let status = resp.status().as_u16();
        let text = resp.into_body().read_to_string().context("cannot read the server's answer")?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    pub fn get_json(&self, path: &str) -> Result<Answer> {
        let resp = self.agent.get(self.url(path)).header("Authorization", &self.auth).call();
        Api::answer(resp.with_context(|| format!("cannot reach {}", self.base))?)
    }

    pub fn post_json(&self, path: &str, body: &impl serde::Serialize) -> Result<Answer> {
        let body = serde_json::to_vec(body).context("cannot write the request")?;
        let resp = self
            .agent
            .post(self.url(path))
            .header("Authorization", &self.auth)
            .header("Content-Type", "application/json")
            .send(&body[..]);
        Api::answer(resp.with_context(|| format!("cannot reach {}", self.base))?)
    }

    pub(crate) fn post_bytes(&self, path: &str, body: &[u8]) -> Result<Answer> {
        let resp = self.agent.post(self.url(path)).header("Authorization", &self.auth).send(body);
        Api::answer(resp.with_context(|| format!("cannot reach {}", self.base))?)
    }

    pub(crate) fn post_reader(&self, path: &str, len: u64, body: impl Read) -> Result<Answer> {
        let mut body = body;
        let resp = self
            .agent
            .post(self.url(path))
            .header("Authorization", &self.auth)
            .header("Content-Length", len.to_string())
            .header("Content-Type", "application/octet-stream")
            .send(ureq::SendBody::from_reader(&mut body));
        Api::answer(resp.with_context(|| format!("cannot reach {}", self.base))?)
    }

    /// Writes what `path` answers into `to`, at most `max` bytes. The status,
    /// and the error body when it is not 200.
    pub(crate) fn download(&self, path: &str, to: &Path, max: u64) -> Result<Answer> {
        let resp = self.agent.get(self.url(path)).header("Authorization", &self.auth).call();
        let resp = resp.with_context(|| format!("cannot reach {}", self.base))?;
        if resp.status().as_u16() != 200 {
            return Api::answer(resp);
        }
        let mut out = File::create(to).with_context(|| format!("cannot create {}", to.display()))?;
        let mut body = resp.into_body().into_with_config().limit(max.saturating_add(1)).reader();
        let n = io::copy(&mut body, &mut out).with_context(|| format!("cannot download {path}"))?;
        if n > max {
            bail!("{path}: the server sent more than the {max} bytes it announced");
        }
        out.sync_all()?;
        Ok((200, Value::Null))
    }
}

/// What went wrong in an answer, for a log line.
pub(crate) fn why(answer: &Answer) -> String {
    let text =
        serde_json::from_value::<wire::ErrorBody>(answer.1.clone()).map_or_else(|_| answer.1.to_string(), |e| e.error);
    format!("{}: {}", answer.0, jobfile::sanitize(text.as_bytes()))
}

/// A successful answer's body as the API's type `T`.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(answer: &Answer) -> Result<T> {
    serde_json::from_value(answer.1.clone()).with_context(|| {
        format!(
            "the server's answer is not what this host understands: {}",
            jobfile::text::sanitize_capped(answer.1.to_string().as_bytes(), 200)
        )
    })
}
