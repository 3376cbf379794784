//! The built-in status page at `/dashboard` (off unless `dashboard_token`
//! is set): plain HTML/JS bundled in the binary, fed by two JSON endpoints.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use pushmesh_protocol::{sign, ChannelKind, ChannelName};
use serde::Deserialize;
use serde_json::json;

use crate::Shared;

const PAGE: &str = include_str!("../assets/dashboard.html");

#[derive(Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
    app: Option<String>,
    socket_id: Option<String>,
    channel: Option<String>,
}

/// Why a dashboard request is refused.
enum Denied {
    Off,
    BadToken,
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        let (status, msg) = match self {
            Self::Off => (
                StatusCode::NOT_FOUND,
                "the status page is off (set dashboard_token)",
            ),
            Self::BadToken => (StatusCode::UNAUTHORIZED, "missing or wrong ?token="),
        };
        (status, Json(json!({ "error": msg }))).into_response()
    }
}

fn authorized(st: &Shared, q: &TokenQuery) -> Result<(), Denied> {
    match (&st.config.dashboard_token, &q.token) {
        (Some(t), Some(given)) if sign::constant_time_eq(t.as_bytes(), given.as_bytes()) => Ok(()),
        (None, _) => Err(Denied::Off),
        _ => Err(Denied::BadToken),
    }
}

/// `GET /dashboard?token=…`.
pub async fn page(State(st): State<Arc<Shared>>, Query(q): Query<TokenQuery>) -> Response {
    match authorized(&st, &q) {
        Ok(()) => Html(PAGE).into_response(),
        Err(r) => r.into_response(),
    }
}

/// `GET /dashboard/api/stats?token=…`.
pub async fn stats(State(st): State<Arc<Shared>>, Query(q): Query<TokenQuery>) -> Response {
    if let Err(r) = authorized(&st, &q) {
        return r.into_response();
    }
    let apps: Vec<_> = st
        .config
        .apps
        .iter()
        .map(|a| json!({"id": a.id, "key": a.key}))
        .collect();
    let (connections, kinds) = (st.node.registry.count(), st.node.channel_stats());
    let mut nodes = vec![
        json!({"node": st.config.node_id, "state": if st.draining.load(Ordering::Relaxed) { "draining" } else { "ready" }, "link": true}),
    ];
    if let Some(c) = &st.cluster {
        for p in c.status().await {
            nodes.push(json!({
                "node": p.node, "state": p.state.unwrap_or_else(|| if p.live { "ready".into() } else { "dead".into() }),
                "link": p.link, "data_in": p.frames.get("data_received"), "data_out": p.frames.get("data_sent"),
            }));
        }
    }
    Json(json!({
        "node": st.config.node_id,
        "connections": connections,
        "channels": kinds.iter().map(|(k, c, s)| json!({"kind": k, "channels": c, "subscriptions": s})).collect::<Vec<_>>(),
        "published": st.stats.published.load(Ordering::Relaxed),
        "delivered": st.node.links.stats.frames_queued.load(Ordering::Relaxed),
        "nodes": nodes,
        "apps": apps,
    }))
    .into_response()
}

/// `GET /dashboard/api/auth?token=…&app=KEY&socket_id=…&channel=…`: signs the
/// console's subscription to a private or presence channel.
pub async fn auth(State(st): State<Arc<Shared>>, Query(q): Query<TokenQuery>) -> Response {
    if let Err(r) = authorized(&st, &q) {
        return r.into_response();
    }
    let bad = |m: &str| (StatusCode::BAD_REQUEST, Json(json!({"error": m}))).into_response();
    let (Some(key), Some(socket), Some(channel)) = (&q.app, &q.socket_id, &q.channel) else {
        return bad("app, socket_id and channel are required");
    };
    let Some(app) = st.config.apps.iter().find(|a| &a.key == key) else {
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
