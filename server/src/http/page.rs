//! The account's page: its jobs, their states and verdicts, links to logs
//! and results. Server-rendered HTML, no script. A browser cannot send a
//! bearer token, so `POST /v1/page-link` (with the token) gives a link that
//! works once, within five minutes. Opening it shows which account it signs
//! in to and asks to confirm; only that same-origin form trades the link
//! for a session cookie (HttpOnly, SameSite=Strict, Secure under TLS). So a
//! link someone else made cannot sign a browser into their account unseen.
//!
//! The links and sessions themselves are `crate::sessions`'.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;

use super::{ApiError, Authed};
use crate::app::App;
use crate::db::{self, Account};
use crate::sessions::{still_valid, Sessions, COOKIE, LINK_LIFE, SESSION_LIFE};
use crate::store::Place;

/// `POST /v1/page-link`: a one-time link to the account's page.
#[utoipa::path(
    post,
    path = "/v1/page-link",
    tag = "submitters",
    responses((status = 200, description = "a one-time path that logs a browser into the page", body = wire::PageLink), (status = 401, description = "no valid token", body = wire::ErrorBody), (status = 429, description = "too many failed authentications from this address", body = wire::ErrorBody), (status = 403, description = "a build host's token", body = wire::ErrorBody), (status = 503, description = "too many login links are live", body = wire::ErrorBody)),
    security(("bearer" = []))
)]
pub async fn page_link(State(app): State<Arc<App>>, Authed(account): Authed) -> Result<Json<wire::PageLink>, ApiError> {
    let secret = Sessions::issue(&app.sessions.links, &account, LINK_LIFE).ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too many login links are live; try again in a few minutes")
    })?;
    Ok(Json(wire::PageLink { path: format!("/page/login/{secret}"), expires_in_secs: LINK_LIFE.as_secs() }))
}

/// The page when the database cannot be read: said so (and logged), never an empty page.
fn unavailable(e: &db::DbError) -> Response {
    log::error!("the page cannot read the database: {}", jobfile::error_chain(e));
    let text = "<p>The server cannot read its database just now, so your jobs cannot be shown. Try again in a \
                moment; if it lasts, tell the server's operator.</p>";
    (StatusCode::SERVICE_UNAVAILABLE, Html(page_shell("construir", text))).into_response()
}

/// The account a sign-in link grants, while it may still sign in; else the page that says why not.
async fn granted(app: &App, grant: Option<crate::sessions::Grant>) -> Result<Account, Response> {
    let Some(grant) = grant else { return Err(link_gone()) };
    match still_valid(&app.db, &grant).await {
        Ok(Some(account)) => Ok(account),
        Ok(None) => Err(link_gone()),
        Err(e) => Err(unavailable(&e)),
    }
}

fn link_gone() -> Response {
    (
        StatusCode::NOT_FOUND,
        Html(page_shell(
            "construir",
            "<p>This link has been used or has expired. Ask for a new one: <code>construir page</code>.</p>",
        )),
    )
        .into_response()
}

/// `GET /page/login/<secret>`: says which account the link signs in to, and
/// asks to confirm. Nothing is signed in, and the link is not used up, until then.
pub async fn login(State(app): State<Arc<App>>, UrlPath(secret): UrlPath<String>, headers: HeaderMap) -> Response {
    let grant = Sessions::live(&app.sessions.links, &secret);
    let account = match granted(&app, grant).await {
        Ok(account) => account,
        Err(response) => return response,
    };
    let now_signed_in = session_account(&app, &headers)
        .await
        .ok()
        .flatten()
        .filter(|a| a.id != account.id)
        .map(|a| format!("<p>This browser is signed in as <b>{}</b> now; confirming switches it.</p>", escape(&a.name)))
        .unwrap_or_default();
    let body = format!(
        r#"<h1>Sign in as <b>{name}</b>?</h1>
<p>This link was made by <code>construir page</code> for the account <b>{name}</b>. Confirm only if you ran that
command yourself just now: a link someone else sends you would show you their account, and what you do there is theirs to see.</p>
{now_signed_in}<form method="post" action="/page/login"><input type="hidden" name="link" value="{secret}">
<button type="submit">Sign in as {name}</button></form>"#,
        name = escape(&account.name),
        secret = escape(&secret),
    );
    Html(page_shell("construir: sign in", &body)).into_response()
}

#[derive(serde::Deserialize)]
pub struct LoginForm {
    link: String,
}

/// Whether a request comes from a page of this server itself (a form on
/// it), as the browser says: `Sec-Fetch-Site`, else `Origin` against `Host`.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = get("sec-fetch-site") {
        return site == "same-origin";
    }
    match (get("origin"), get("host")) {
        (Some(origin), Some(host)) => origin.split_once("://").is_some_and(|(_, rest)| rest == host),
        // No browser sends a cross-site form without either header.
        (None, _) => true,
        _ => false,
    }
}

/// `POST /page/login`: the confirmation; trades the link for a session.
pub async fn confirm_login(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<LoginForm>,
) -> Response {
    if !same_origin(&headers) {
        return (StatusCode::FORBIDDEN, Html(page_shell("construir", "<p>Sign in from the link's own page.</p>")))
            .into_response();
    }
    let grant = app.sessions.redeem(&form.link);
    let account = match granted(&app, grant).await {
        Ok(account) => account,
        Err(response) => return response,
    };
    let Some(session) = Sessions::issue(&app.sessions.sessions, &account, SESSION_LIFE) else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many sessions are live; try again later").into_response();
    };
    let secure = if app.settings.tls { "; Secure" } else { "" };
    let cookie = format!(
        "{COOKIE}={session}; Path=/page; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_LIFE.as_secs()
    );
    (StatusCode::SEE_OTHER, [(header::SET_COOKIE, cookie), (header::LOCATION, "/page".to_owned())]).into_response()
}

/// The account this browser's session cookie is signed in as.
async fn session_account(app: &App, headers: &HeaderMap) -> Result<Option<Account>, db::DbError> {
    let cookies = headers.get(header::COOKIE).and_then(|c| c.to_str().ok()).unwrap_or_default();
    let Some(secret) = cookies.split(';').find_map(|c| c.trim().strip_prefix(&format!("{COOKIE}="))) else {
        return Ok(None);
    };
    let Some(grant) = Sessions::live(&app.sessions.sessions, secret) else { return Ok(None) };
    still_valid(&app.db, &grant).await
}

/// `GET /page`: the account's jobs, and the build hosts.
pub async fn page(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let account = match session_account(&app, &headers).await {
        Ok(Some(account)) => account,
        Ok(None) => {
            let text = "<p>Not signed in. Run <code>construir page</code> for a link to your page.</p>";
            return (StatusCode::UNAUTHORIZED, Html(page_shell("construir", text))).into_response();
        }
        Err(e) => return unavailable(&e),
    };
    let jobs = match db::jobs_of(&app.db, account.id).await {
        Ok(jobs) => jobs,
        Err(e) => return unavailable(&e),
    };
    let hosts = match super::hosts::hosts_view(&app, &account).await {
        Ok(hosts) => hosts_table(&hosts),
        Err(e) => return unavailable(&e),
    };
    let mut rows = String::new();
    let queued = crate::store::Queued::default();
    for job in &jobs {
        rows.push_str(&job_row(&app, job, &app.refresh_among(job, &queued).await));
    }
    let body = format!(
        r#"<h1>{} <small>{} job(s)</small></h1>
<table><thead><tr><th>id</th><th>name</th><th>image</th><th>submitted</th><th>state</th><th>verdict</th><th></th></tr></thead>
<tbody>{rows}</tbody></table>{hosts}"#,
        escape(&account.name),
        jobs.len()
    );
    Html(page_shell(&format!("construir: {}", account.name), &body)).into_response()
}

/// One job's row: where it is, its verdict (a verified rebuild's too), its log and result.
fn job_row(app: &App, job: &db::JobRecord, place: &Place) -> String {
    let (detail, class) = match place {
        Place::Waiting { position, waiting } => (format!("position {position} of {waiting}"), "waiting"),
        Place::Running { host, elapsed_secs } => (format!("on {host} for {elapsed_secs} s"), "running"),
        Place::Done { verdict, .. } => (verdict.clone(), if verdict.starts_with("ok") { "ok" } else { "bad" }),
        Place::Failed { reason } => (reason.clone(), "bad"),
        Place::Missing => (String::new(), "bad"),
    };
    let detail = match job.rebuild.as_ref().map(|r| r.verdict.as_ref()) {
        Some(Some(verdict)) => format!("{detail}; verified rebuild: {}", verdict.summary()),
        Some(None) => format!("{detail}; verified rebuild: its second run has not ended"),
        None => detail,
    };
    let detail = match &job.from_cache {
        Some(hit) => format!("{detail} ({})", hit.describe()),
        None => detail,
    };
    // The verdict of a debug job says a session opened; the page says whether it is open now.
    let session = matches!(place, Place::Done { .. }).then(|| crate::debug::session(app, job)).flatten();
    let detail = match session {
        Some(s) if s.attached => {
            format!("{detail} [debug session open on {}, attached; it ends by {}]", s.host, s.ends_by)
        }
        Some(s) => format!(
            "{detail} [debug session open on {}: `construir debug {}` before {}; it ends by {}]",
            s.host, job.id, s.attach_by, s.ends_by
        ),
        None => detail,
    };
    let id = escape(&job.id);
    let mut links = String::new();
    if app.store.log_path(&job.file_name).is_some() {
        let _ = write!(links, r#"<a href="/page/jobs/{id}/log">log</a> "#);
    }
    if job.deleted.is_none() && app.store.result_path(&job.file_name).is_some() {
        let _ = write!(links, r#"<a href="/page/jobs/{id}/result">result</a>"#);
    }
    format!(
        r#"<tr class="{class}"><td><code>{id}</code></td><td>{}</td><td>i{}</td><td>{}</td><td>{}</td><td>{}</td><td>{links}</td></tr>"#,
        escape(&job.name),
        escape(&job.image),
        escape(&job.submitted),
        place.name(),
        escape(&detail),
    )
}

/// The build hosts, with the keys their results are signed with (nothing when there is none).
fn hosts_table(hosts: &[wire::HostView]) -> String {
    let mut rows = String::new();
    for h in hosts {
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{} s ago</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            escape(&h.name),
            h.seen_secs_ago,
            escape(&h.image_names()),
            escape(&h.archs()),
            h.capacity,
            h.running,
            escape(h.key.as_deref().unwrap_or("none pinned")),
        );
    }
    if rows.is_empty() {
        return String::new();
    }
    format!(
        r#"<h2>Build hosts</h2>
<table><thead><tr><th>host</th><th>last seen</th><th>images</th><th>architectures</th><th>capacity</th><th>running</th><th>signs with</th></tr></thead>
<tbody>{rows}</tbody></table>"#
    )
}

/// `GET /page/jobs/<id>/log` and `/result`, with the session cookie.
pub async fn page_file(
    State(app): State<Arc<App>>,
    UrlPath((id, what)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let account = match session_account(&app, &headers).await {
        Ok(Some(account)) => account,
        Ok(None) => return StatusCode::UNAUTHORIZED.into_response(),
        Err(e) => return unavailable(&e),
    };
    let job = match db::job(&app.db, account.id, &id).await {
        Ok(Some(job)) => job,
        Ok(None) => return StatusCode::NOT_FOUND.into_response(),
        Err(e) => return unavailable(&e),
    };
    let (path, kind) = match what.as_str() {
        "log" => (app.store.log_path(&job.file_name), "text/plain; charset=utf-8"),
        "result" => (app.store.result_path(&job.file_name), "application/x-xz"),
        _ => (None, ""),
    };
    match path {
        Some(p) => super::serve_file(&p, None, &headers, kind).await.into_response(),
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
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'">
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
button {{ font: inherit; padding: .4em 1em; margin-top: 1em; }}
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
    fn only_a_same_origin_form_may_sign_in() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, axum::http::HeaderValue::from_static(v));
            }
            m
        };
        assert!(same_origin(&h(&[("sec-fetch-site", "same-origin")])));
        assert!(!same_origin(&h(&[("sec-fetch-site", "cross-site")])));
        assert!(!same_origin(&h(&[("sec-fetch-site", "same-site")])));
        assert!(same_origin(&h(&[("origin", "http://127.0.0.1:8765"), ("host", "127.0.0.1:8765")])));
        assert!(!same_origin(&h(&[("origin", "https://evil.example"), ("host", "127.0.0.1:8765")])));
        assert!(!same_origin(&h(&[("origin", "null"), ("host", "127.0.0.1:8765")])));
    }

    #[tokio::test]
    async fn the_page_says_so_when_the_database_fails_and_shows_no_empty_list() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::beside(&tmp.path().join("queue"));
        store.create_all().expect("dirs");
        let db = db::open(&tmp.path().join("s.db").to_string_lossy()).await.expect("db");
        let alice = db::add_account(&db, "alice", db::Kind::Submitter, b"h").await.expect("account");
        let app = App::for_test(db, store);
        let session = Sessions::issue(&app.sessions.sessions, &alice, SESSION_LIFE).expect("session");
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, format!("{COOKIE}={session}").parse().expect("cookie"));
        let read = |resp: Response| async move {
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
            (status, String::from_utf8_lossy(&body).into_owned())
        };
        let (status, body) = read(page(State(app.clone()), headers.clone()).await).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains("alice <small>0 job(s)</small>"), "{body}");
        app.db.execute("DROP TABLE jobs", &[]).await.expect("break the database");
        let (status, body) = read(page(State(app.clone()), headers.clone()).await).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("cannot read its database") && !body.contains("0 job(s)"), "{body}");
    }
}
