//! The account's page: its jobs, their states and verdicts, links to logs
//! and results. Server-rendered HTML, no script. A browser cannot send a
//! bearer token, so `POST /v1/page-link` (with the token) gives a link that
//! works once, within five minutes, and trades itself for a session cookie
//! (HttpOnly, SameSite=Strict) that the page and its links use.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::api::{ApiError, App, Authed};
use crate::auth;
use crate::db::{self, Account};
use crate::store::Place;

/// How long a login link works, and a session lasts.
const LINK_LIFE: Duration = Duration::from_secs(300);
const SESSION_LIFE: Duration = Duration::from_secs(12 * 3600);
const COOKIE: &str = "construir_session";

/// Login links not yet used, and live sessions: secret to (account id, expiry).
#[derive(Default)]
pub struct Sessions {
    links: Mutex<HashMap<String, (i64, Instant)>>,
    sessions: Mutex<HashMap<String, (i64, Instant)>>,
}

impl Sessions {
    fn issue(map: &Mutex<HashMap<String, (i64, Instant)>>, account: i64, life: Duration) -> String {
        let secret = auth::new_secret();
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, (_, until)| *until > Instant::now());
        m.insert(secret.clone(), (account, Instant::now() + life));
        secret
    }

    /// The account a session cookie belongs to, if it is live.
    fn account_of_session(&self, secret: &str) -> Option<i64> {
        let m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        m.get(secret).filter(|(_, until)| *until > Instant::now()).map(|(a, _)| *a)
    }

    /// Uses up a login link.
    fn redeem(&self, secret: &str) -> Option<i64> {
        let mut m = self.links.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(secret).filter(|(_, until)| *until > Instant::now()).map(|(a, _)| a)
    }
}

/// `POST /v1/page-link`: a one-time link to the account's page.
pub async fn page_link(
    State(app): State<Arc<App>>,
    Authed(account): Authed,
) -> Result<Json<serde_json::Value>, ApiError> {
    let secret = Sessions::issue(&app.sessions.links, account.id, LINK_LIFE);
    Ok(Json(json!({ "path": format!("/page/login/{secret}"), "expires_in_secs": LINK_LIFE.as_secs() })))
}

/// `GET /page/login/<secret>`: trades a link for a session and goes to the page.
pub async fn login(State(app): State<Arc<App>>, UrlPath(secret): UrlPath<String>) -> Response {
    let Some(account) = app.sessions.redeem(&secret) else {
        return (
            StatusCode::NOT_FOUND,
            Html(page_shell(
                "construir",
                "<p>This link has been used or has expired. Ask for a new one: <code>construir page</code>.</p>",
            )),
        )
            .into_response();
    };
    let session = Sessions::issue(&app.sessions.sessions, account, SESSION_LIFE);
    let cookie =
        format!("{COOKIE}={session}; Path=/page; HttpOnly; SameSite=Strict; Max-Age={}", SESSION_LIFE.as_secs());
    (StatusCode::SEE_OTHER, [(header::SET_COOKIE, cookie), (header::LOCATION, "/page".to_owned())]).into_response()
}

fn session_account(app: &App, headers: &HeaderMap) -> Option<Account> {
    let cookies = headers.get(header::COOKIE)?.to_str().ok()?;
    let secret = cookies.split(';').find_map(|c| c.trim().strip_prefix(&format!("{COOKIE}=")))?;
    let id = app.sessions.account_of_session(secret)?;
    db::account_by_id(&app.db, id).ok()?.filter(|a| !a.disabled)
}

/// `GET /page`: the account's jobs.
pub async fn page(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let Some(account) = session_account(&app, &headers) else {
        return (
            StatusCode::UNAUTHORIZED,
            Html(page_shell(
                "construir",
                "<p>Not signed in. Run <code>construir page</code> for a link to your page.</p>",
            )),
        )
            .into_response();
    };
    let jobs = db::jobs_of(&app.db, account.id).unwrap_or_default();
    let mut rows = String::new();
    for job in &jobs {
        let place = app.refresh(job);
        let (detail, class) = match &place {
            Place::Waiting { position, waiting } => (format!("position {position} of {waiting}"), "waiting"),
            Place::Running { host, elapsed_secs } => (format!("on {host} for {elapsed_secs} s"), "running"),
            Place::Done { verdict, .. } => (verdict.clone(), if verdict.starts_with("ok") { "ok" } else { "bad" }),
            Place::Failed { reason } => (reason.clone(), "bad"),
            Place::Missing => (String::new(), "bad"),
        };
        let id = escape(&job.id);
        let mut links = String::new();
        if app.store.log_path(&job.file_name).is_some() {
            let _ = write!(links, r#"<a href="/page/jobs/{id}/log">log</a> "#);
        }
        if job.deleted.is_none() && app.store.result_path(&job.file_name).is_some() {
            let _ = write!(links, r#"<a href="/page/jobs/{id}/result">result</a>"#);
        }
        let _ = write!(
            rows,
            r#"<tr class="{class}"><td><code>{id}</code></td><td>{}</td><td>i{}</td><td>{}</td><td>{}</td><td>{}</td><td>{links}</td></tr>"#,
            escape(&job.name),
            escape(&job.image),
            escape(&job.submitted),
            place.name(),
            escape(&detail),
        );
    }
    let mut hosts = String::new();
    for h in crate::farm::hosts_view(&app, &account).unwrap_or_default() {
        let images: Vec<String> = h["images"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["name"].as_str().map(|n| format!("i{n}")))
            .collect();
        let _ = write!(
            hosts,
            "<tr><td>{}</td><td>{} s ago</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(h["name"].as_str().unwrap_or_default()),
            h["seen_secs_ago"],
            escape(&images.join(" ")),
            h["capacity"],
            h["running"],
        );
    }
    let hosts = if hosts.is_empty() {
        String::new()
    } else {
        format!(
            r#"<h2>Build hosts</h2>
<table><thead><tr><th>host</th><th>last seen</th><th>images</th><th>capacity</th><th>running</th></tr></thead>
<tbody>{hosts}</tbody></table>"#
        )
    };
    let body = format!(
        r#"<h1>{} <small>{} job(s)</small></h1>
<table><thead><tr><th>id</th><th>name</th><th>image</th><th>submitted</th><th>state</th><th>verdict</th><th></th></tr></thead>
<tbody>{rows}</tbody></table>{hosts}"#,
        escape(&account.name),
        jobs.len()
    );
    Html(page_shell(&format!("construir: {}", account.name), &body)).into_response()
}

/// `GET /page/jobs/<id>/log` and `/result`, with the session cookie.
pub async fn page_file(
    State(app): State<Arc<App>>,
    UrlPath((id, what)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(account) = session_account(&app, &headers) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let job = match db::job(&app.db, account.id, &id) {
        Ok(Some(job)) => job,
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let (path, kind) = match what.as_str() {
        "log" => (app.store.log_path(&job.file_name), "text/plain; charset=utf-8"),
        "result" => (app.store.result_path(&job.file_name), "application/x-xz"),
        _ => (None, ""),
    };
    match path {
        Some(p) => crate::api::serve_file(&p, &headers, kind).await.into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Text for HTML: every byte that could end a tag, an attribute or an entity is escaped.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page_shell(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>{}</title>
<style>
body {{ font: 15px/1.4 sans-serif; margin: 2em; color: #222; }}
h1 small {{ font-weight: normal; color: #777; font-size: 60%; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .35em .6em; border-bottom: 1px solid #ddd; vertical-align: top; }}
tr.ok td:nth-child(5) {{ color: #176117; }}
tr.bad td:nth-child(5) {{ color: #a31515; }}
tr.running td:nth-child(5), tr.waiting td:nth-child(5) {{ color: #1d4f91; }}
code {{ font-size: 90%; }}
</style></head>
<body>{body}</body></html>
"#,
        escape(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_cannot_break_out_of_the_markup() {
        assert_eq!(
            escape(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
    }

    #[test]
    fn a_link_works_once_and_sessions_expire() {
        let s = Sessions::default();
        let link = Sessions::issue(&s.links, 7, LINK_LIFE);
        assert_eq!(s.redeem(&link), Some(7));
        assert_eq!(s.redeem(&link), None, "used up");
        let session = Sessions::issue(&s.sessions, 7, Duration::ZERO);
        assert_eq!(s.account_of_session(&session), None, "expired");
        let session = Sessions::issue(&s.sessions, 7, SESSION_LIFE);
        assert_eq!(s.account_of_session(&session), Some(7));
    }
}
