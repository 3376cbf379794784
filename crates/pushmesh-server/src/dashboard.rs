//! The built-in status page at `/dashboard` (off unless `dashboard_token`
//! is set): plain HTML/JS bundled in the binary, fed by JSON endpoints.
//!
//! The token never goes in a URL (proxies log URLs): the page's login
//! form posts it to `POST /dashboard/login`, which sets the cookie
//! `pushmesh_dashboard` (HttpOnly, SameSite=Strict, Path=/dashboard; its
//! value an HMAC of the token, valid on every node with the same token);
//! scripts send `Authorization: Bearer <token>`. A `?token=` is refused
//! with 400. Failures count against the address like the admin API's.

pub mod history;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Form, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use pushmesh_protocol::{sign, ChannelKind, ChannelName};
use serde::Deserialize;
use serde_json::json;

use crate::operator_token::{self, Checked};
use crate::Shared;

const PAGE: &str = include_str!("../assets/dashboard.html");
const LOGIN: &str = include_str!("../assets/dashboard_login.html");
/// The session cookie's name.
pub const COOKIE: &str = "pushmesh_dashboard";
/// How long the cookie lasts.
const COOKIE_MAX_AGE_SECS: u64 = 12 * 3600;

#[derive(Deserialize)]
pub struct PageQuery {
    token: Option<String>,
    app: Option<String>,
    socket_id: Option<String>,
    channel: Option<String>,
}

/// Why a dashboard request is refused.
#[derive(Debug, PartialEq, Eq)]
enum Denied {
    Off,
    NoSession,
    TokenInUrl,
    RateLimited,
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        let (status, msg) = match self {
            Self::Off => (
                StatusCode::NOT_FOUND,
                "the status page is off (set dashboard_token)",
            ),
            Self::NoSession => (
                StatusCode::UNAUTHORIZED,
                "log in at /dashboard or send Authorization: Bearer <dashboard_token>",
            ),
            Self::TokenInUrl => (
                StatusCode::BAD_REQUEST,
                "the dashboard token goes in an Authorization: Bearer header or the login cookie, never the URL",
            ),
            Self::RateLimited => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed dashboard logins from this address",
            ),
        };
        let mut r = (status, Json(json!({ "error": msg }))).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// The cookie's value for `token`: an HMAC, so the cookie is not the
/// token itself and any node with the same token accepts it.
fn session_value(token: &str) -> String {
    sign::sign(token, "pushmesh dashboard session")
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Checks the session: the token in the URL is refused, then the bearer
/// header or the cookie.
fn authorized(
    st: &Shared,
    headers: &HeaderMap,
    q: &PageQuery,
    ip: std::net::IpAddr,
) -> Result<(), Denied> {
    let Some(token) = &st.config.dashboard_token else {
        return Err(Denied::Off);
    };
    if q.token.is_some() {
        return Err(Denied::TokenInUrl);
    }
    let checked = match (operator_token::bearer(headers), cookie(headers, COOKIE)) {
        (Some(b), _) => operator_token::check(&st.admin_failures, ip, Some(b), token),
        (None, Some(c)) => {
            operator_token::check(&st.admin_failures, ip, Some(c), &session_value(token))
        }
        (None, None) => operator_token::check(&st.admin_failures, ip, None, token),
    };
    match checked {
        Checked::Accepted => Ok(()),
        Checked::Limited => Err(Denied::RateLimited),
        Checked::Missing | Checked::Wrong => Err(Denied::NoSession),
    }
}

/// A 303 back to the page, setting the session cookie to `value` for
/// `max_age` seconds (0 clears it).
fn to_page_with_cookie(value: &str, max_age: u64, secure: bool) -> Response {
    let secure = if secure { "; Secure" } else { "" };
    let set = format!(
        "{COOKIE}={value}; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    );
    let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, "/dashboard")]).into_response();
    if let Ok(v) = HeaderValue::from_str(&set) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// `GET /dashboard`: the page, or the login form without a session.
pub async fn page(
    State(st): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
) -> Response {
    match authorized(&st, &headers, &q, peer.ip()) {
        Ok(()) => Html(PAGE).into_response(),
        Err(Denied::NoSession) => Html(LOGIN).into_response(),
        Err(r) => r.into_response(),
    }
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
}

/// `POST /dashboard/login` (form field `token`): sets the cookie and goes
/// back to the page; a wrong token is 401 and counts as a failure.
pub async fn login(
    State(st): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(f): Form<LoginForm>,
) -> Response {
    let Some(token) = &st.config.dashboard_token else {
        return Denied::Off.into_response();
    };
    let ip = peer.ip();
    match operator_token::check(&st.admin_failures, ip, Some(f.token.trim()), token) {
        Checked::Accepted => to_page_with_cookie(
            &session_value(token),
            COOKIE_MAX_AGE_SECS,
            st.config.tls.is_some(),
        ),
        Checked::Limited => Denied::RateLimited.into_response(),
        Checked::Missing | Checked::Wrong => {
            tracing::warn!(client = %ip, "status page: wrong token at login");
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({ "error": "wrong dashboard token" })),
            )
                .into_response()
        }
    }
}

/// `POST /dashboard/logout`: clears the cookie.
pub async fn logout() -> Response {
    to_page_with_cookie("", 0, false)
}

/// `GET /dashboard/api/stats`: this node's live figures, the cluster's
/// nodes and their links, every app and the sampled history.
pub async fn stats(
    State(st): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
) -> Response {
    if let Err(r) = authorized(&st, &headers, &q, peer.ip()) {
        return r.into_response();
    }
    let view = st.dashboard.view();
    let snapshot = st.node.apps();
    let rows: std::collections::HashMap<&str, &history::AppRow> =
        view.apps.iter().map(|r| (r.id.as_str(), r)).collect();
    let apps: Vec<_> = snapshot
        .iter()
        .map(|(i, a)| {
            let row = rows.get(a.id.as_str());
            let mut j = json!({
                "id": a.id, "key": a.key, "enabled": a.enabled,
                "source": st.apps.io(i).1.as_str(),
            });
            if let Some(row) = row {
                if let (Some(o), Ok(serde_json::Value::Object(r))) =
                    (j.as_object_mut(), serde_json::to_value(row))
                {
                    o.extend(r.into_iter().filter(|(k, _)| k != "id"));
                }
            }
            j
        })
        .collect();
    let (connections, kinds) = (st.node.registry.count(), st.node.channel_stats());
    let me = if st.draining.load(Ordering::Relaxed) {
        "draining"
    } else {
        "ready"
    };
    let sampled = |node: &str| {
        view.nodes
            .iter()
            .find(|n| n.node == node)
            .and_then(|n| n.connections)
    };
    let mut nodes = vec![json!({
        "node": st.config.node_id, "state": me, "link": true, "connections": connections,
    })];
    if let Some(c) = &st.cluster {
        for p in c.status().await {
            let state = p
                .state
                .clone()
                .unwrap_or_else(|| if p.live { "ready" } else { "dead" }.into());
            nodes.push(json!({
                "node": p.node, "state": state, "link": p.link,
                "connections": sampled(&p.node),
                "data_in": p.frames.get("data_received"), "data_out": p.frames.get("data_sent"),
            }));
        }
    }
    Json(json!({
        "node": st.config.node_id,
        "connections": connections,
        "cluster_connections": view.history.last().map(|s| s.connections),
        "channels": kinds.iter().map(|(k, c, s)| json!({"kind": k, "channels": c, "subscriptions": s})).collect::<Vec<_>>(),
        "published": st.stats.published.load(Ordering::Relaxed),
        "delivered": st.node.links.stats.frames_queued.load(Ordering::Relaxed),
        "nodes": nodes,
        "apps": apps,
        "history": view.history,
        "sample_every_secs": history::SAMPLE_EVERY.as_secs(),
    }))
    .into_response()
}

/// `GET /dashboard/api/auth?app=KEY&socket_id=…&channel=…`: signs the
/// console's subscription to a private or presence channel.
pub async fn auth(
    State(st): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
) -> Response {
    if let Err(r) = authorized(&st, &headers, &q, peer.ip()) {
        return r.into_response();
    }
    let bad = |m: &str| (StatusCode::BAD_REQUEST, Json(json!({"error": m}))).into_response();
    let (Some(key), Some(socket), Some(channel)) = (&q.app, &q.socket_id, &q.channel) else {
        return bad("app, socket_id and channel are required");
    };
    let apps = st.node.apps();
    let Some(app) = apps.by_key(key).map(|i| apps.get(i).clone()) else {
        return bad("unknown app key");
    };
    let Ok(name) = ChannelName::parse(channel) else {
        return bad("invalid channel name");
    };
    if name.kind() == ChannelKind::Presence {
        let data = json!({"user_id": "pushmesh-dashboard", "user_info": {"name": "dashboard"}})
            .to_string();
        let sig = sign::sign(&app.secret, &sign::presence_string(socket, channel, &data));
        Json(json!({"auth": format!("{}:{sig}", app.key), "channel_data": data})).into_response()
    } else {
        let sig = sign::sign(&app.secret, &sign::channel_string(socket, channel));
        Json(json!({"auth": format!("{}:{sig}", app.key)})).into_response()
    }
}
