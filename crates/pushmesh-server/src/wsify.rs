//! The wsify protocol on `/ws`, its authorizer, and `POST /broadcast`.
//!
//! wsify connections belong to one app (`wsify_app`) and share its channels
//! with Pusher clients. Commands of one connection are handled one at a time,
//! in order (the authorizer's verdict on a `join` comes before the next
//! command is read); the authorizer call is bounded by its timeout.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pushmesh_core::session::Identity;
use pushmesh_core::{AppIdx, Session};
use pushmesh_protocol::wire::ReadError;
use pushmesh_protocol::wsify::{self, WsifyCommand};
use pushmesh_protocol::CloseCode;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::time::timeout;

use crate::authorizer::Verdict;
use crate::conn::{CloseRequest, ConnRef};
use crate::websocket::driver::{
    await_close, pong_not_received, pump, CompressionGauge, Connection, End, Flow, Protocol,
    CLOSE_TIMEOUT, WRITE_TIMEOUT,
};
use crate::websocket::{Upgrading, WsSocket, WsUpgrade};
use crate::Shared;

/// WebSocket close code for "the server is restarting, reconnect".
const WS_SERVICE_RESTART: u16 = 1012;
/// WebSocket close code for "try again later" (authorizer down, too slow).
const WS_TRY_AGAIN_LATER: u16 = 1013;
/// WebSocket close code for a policy violation.
const WS_POLICY: u16 = 1008;

fn ws_code(code: CloseCode) -> u16 {
    match code {
        CloseCode::ReconnectImmediately => WS_SERVICE_RESTART,
        CloseCode::OverCapacity => WS_TRY_AGAIN_LATER,
        _ => WS_POLICY,
    }
}

/// Query or headers as `{name: [values]}`.
fn multi_map<'a>(pairs: impl Iterator<Item = (&'a str, String)>) -> Value {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in pairs {
        m.entry(k.to_owned()).or_default().push(v);
    }
    json!(m)
}

fn query_map(raw: Option<&str>) -> (Value, bool) {
    let pairs = crate::api::form_urlencoded(raw.unwrap_or(""));
    let envelope = pairs
        .iter()
        .any(|(k, v)| k == "envelope" && matches!(v.as_str(), "1" | "true" | "yes"));
    (
        multi_map(pairs.iter().map(|(k, v)| (k.as_str(), v.clone()))),
        envelope,
    )
}

/// `GET /ws`: a wsify connection, authorized by the app's authorizer if any.
pub async fn wsify_ws(
    State(st): State<Arc<Shared>>,
    RawQuery(raw): RawQuery,
    req: Upgrading,
    ws: WsUpgrade,
) -> Response {
    if let Some(refused) = crate::reject::websocket_key_refusal(&req.headers) {
        return refused;
    }
    let app = AppIdx(st.config.wsify_app as u32);
    let identity = req.identity(&st);
    let (query, envelope) = query_map(raw.as_deref());
    if let Err(refused) = admit(&st, app, &req, identity.as_ref(), &query).await {
        return refused;
    }
    let node = st.clone();
    req.upgrade(&node, ws, move |socket| async move {
        run_wsify(&st, socket, app, envelope, query, identity).await;
    })
}

fn refusal(status: StatusCode, error: impl Into<String>) -> Response {
    (status, Json(json!({ "error": error.into() }))).into_response()
}

/// Whether the connection may open, decided before the upgrade (the
/// authorizer's `connect` verdict included).
async fn admit(
    st: &Shared,
    app: AppIdx,
    req: &Upgrading,
    identity: Option<&Identity>,
    query: &Value,
) -> Result<(), Response> {
    let max_user = st.node.apps().get(app).limits.max_user_id_length;
    if let Some(Err(e)) = identity.map(|i| i.check(max_user)) {
        return Err(refusal(StatusCode::FORBIDDEN, e.to_string()));
    }
    // Joining or draining: not now, elsewhere (the balancer retries).
    let draining = st.draining.load(Ordering::Relaxed);
    if draining || !st.node.gate.joined() {
        let reason = if draining { "draining" } else { "joining" };
        let e = json!({ "error": format!("node is {reason}, connect again"), "reason": reason });
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            [(axum::http::header::RETRY_AFTER, "1")],
            Json(e),
        )
            .into_response());
    }
    if !st.ip_limiter.allow(&req.peer.ip(), Instant::now()) {
        st.stats
            .edge
            .ip_rate_limited
            .fetch_add(1, Ordering::Relaxed);
        return Err(refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "too many new connections from this address, retry later",
        ));
    }
    if let Err(r) = crate::ws::check_origin(st, app, &req.headers) {
        st.stats.edge.origin_refused.fetch_add(1, Ordering::Relaxed);
        return Err(refusal(StatusCode::FORBIDDEN, r.to_string()));
    }
    let Some(authz) = st.authorizer(app).filter(|a| a.wants("connect")) else {
        return Ok(());
    };
    // Identity headers from an untrusted peer are the client's own
    // claim: the authorizer never sees them (it may believe them).
    let ids = &st.config.identity_headers;
    let hdrs = multi_map(
        req.headers
            .iter()
            .filter(|(k, _)| req.trusted || !ids.names(k.as_str()))
            .map(|(k, v)| {
                (
                    k.as_str(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            }),
    );
    let body = json!({"command": "connect", "args": {"headers": hdrs, "query": query}});
    match authz.ask(&body).await {
        Verdict::Allowed => Ok(()),
        Verdict::Refused(s) => {
            tracing::debug!(status = s, "wsify connect refused by the authorizer");
            Err(refusal(
                StatusCode::FORBIDDEN,
                format!("connection refused by the authorizer ({s})"),
            ))
        }
        Verdict::Unavailable(why) => {
            tracing::warn!(error = %why, "wsify authorizer unavailable on connect");
            Err(refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "authorizer unavailable, retry later",
            ))
        }
    }
}

async fn send_now(socket: &mut WsSocket, frame: Bytes) -> bool {
    matches!(
        timeout(WRITE_TIMEOUT, socket.send_text(&frame)).await,
        Ok(Ok(()))
    )
}

/// The wsify protocol on the connection loop: commands, one at a time,
/// each past the authorizer if it wants it; errors as envelope frames.
struct Wsify<'a> {
    st: &'a Shared,
    h: ConnRef,
    conn: u64,
    session: Session,
    app: AppIdx,
    envelope: bool,
    /// `{"id", "query"}`, as the authorizer is told.
    connection: Value,
}

impl Wsify<'_> {
    /// Sends an error frame if the client asked for envelopes.
    async fn error(&self, socket: &mut WsSocket, command: &str, message: &str) -> Flow {
        if self.envelope && !send_now(socket, wsify::error_frame(command, message)).await {
            Flow::End(End::Gone)
        } else {
            Flow::Continue
        }
    }
}

impl Protocol for Wsify<'_> {
    fn session(&mut self) -> &mut Session {
        &mut self.session
    }

    async fn close_requested(&mut self, req: CloseRequest) -> Flow {
        Flow::End(End::close(ws_code(req.code), req.reason))
    }

    async fn text(&mut self, socket: &mut WsSocket, text: &str, _now: Instant) -> Flow {
        match self.command(text).await {
            Handled::Ok => Flow::Continue,
            Handled::Error(command, message) => {
                tracing::debug!(conn = self.conn, %command, %message, "wsify command refused");
                self.error(socket, &command, &message).await
            }
            Handled::Close(why) => Flow::End(End::close(WS_TRY_AGAIN_LATER, why)),
        }
    }

    async fn binary(&mut self, socket: &mut WsSocket) -> Flow {
        self.error(socket, "", "binary frames are not supported")
            .await
    }

    async fn invalid(&mut self, _socket: &mut WsSocket, e: ReadError) -> End {
        tracing::debug!(conn = self.conn, error = %e, "wsify protocol error");
        let reason = match &e {
            ReadError::TooBig(n) => format!("message larger than {n} bytes"),
            other => other.to_string(),
        };
        End::close(e.close_code(), reason)
    }

    async fn ping(&mut self, socket: &mut WsSocket) -> bool {
        let ping = pushmesh_protocol::wire::frame::ping(b"");
        matches!(
            timeout(WRITE_TIMEOUT, socket.send_frame(ping)).await,
            Ok(Ok(()))
        )
    }

    fn pong_timeout(&self) -> End {
        pong_not_received(ws_code)
    }
}

async fn run_wsify(
    st: &Shared,
    socket: WsSocket,
    app: AppIdx,
    envelope: bool,
    query: Value,
    identity: Option<Identity>,
) {
    let mut c = Connection::new(st, socket, app);
    let cfg = match c.admit() {
        Ok(cfg) => cfg,
        Err(e) => {
            let reason = e.to_string();
            let close = c.socket.send_close(ws_code(e.close_code()), &reason);
            let _ = timeout(CLOSE_TIMEOUT, close).await;
            await_close(&mut c.socket).await;
            return;
        }
    };
    let _compressing = CompressionGauge::new(st, c.socket.compressing());
    let socket_id = st.node.socket_id(c.conn);
    let mut session = Session::wsify(c.opened, c.conn, app, cfg, &socket_id, envelope);
    if let Some(id) = identity {
        // Checked before the upgrade; signs in (no frame for wsify).
        if session.set_identity(id).is_ok() {
            let _ = c.pump(&mut session).await;
        }
    }
    c.opened();
    let mut proto = Wsify {
        st,
        h: c.h.clone(),
        conn: c.conn.0,
        session,
        app,
        envelope,
        connection: json!({ "id": socket_id, "query": query }),
    };
    let end = c.run(&mut proto).await;
    let channels: Vec<String> = proto.session.channels().map(ToString::to_string).collect();
    c.leave(&mut proto.session).await;
    // The authorizer as it is now (SIGHUP may have changed it).
    if let Some(a) = st.authorizer(app) {
        let connection = &proto.connection;
        if a.wants("leave") {
            for c in channels {
                a.notify(
                    json!({"command": "leave", "args": {"channel": c}, "connection": connection}),
                );
            }
        }
        a.notify(json!({"command": "disconnect", "args": {}, "connection": connection}));
    }
    Box::pin(c.finish(end)).await;
    tracing::debug!(
        conn = c.conn.0,
        duration_ms = c.opened.elapsed().as_millis() as u64,
        "wsify connection closed"
    );
}

enum Handled {
    Ok,
    Error(String, String),
    Close(String),
}

impl Wsify<'_> {
    /// One command: parsed, past the authorizer, then done.
    async fn command(&mut self, text: &str) -> Handled {
        // Each frame is parsed on its own: a bad one is refused, never replaced
        // by an earlier command (a wsify flaw).
        let cmd = match WsifyCommand::parse(text) {
            Ok(c) => c,
            Err(e) => return Handled::Error(String::new(), e.to_string()),
        };
        let name = cmd.name();
        if let Some(a) = self.st.authorizer(self.app).filter(|a| a.wants(name)) {
            let mut body: Value = serde_json::from_str(text).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut body {
                m.insert("connection".into(), self.connection.clone());
            }
            match a.ask(&body).await {
                Verdict::Allowed => {}
                Verdict::Refused(s) => {
                    return Handled::Error(
                        name.into(),
                        format!("not allowed by the authorizer ({s})"),
                    )
                }
                Verdict::Unavailable(why) => {
                    tracing::warn!(error = %why, command = name, "wsify authorizer unavailable, closing for reconnect");
                    return Handled::Close("authorizer unavailable, reconnect later".into());
                }
            }
        }
        let session = &mut self.session;
        let r = match &cmd {
            WsifyCommand::Join {
                channel,
                filter,
                position,
            } => session
                .wsify_join_filtered(channel, filter.as_deref(), position.as_deref())
                .map_err(|e| e.to_string()),
            WsifyCommand::Leave { channel } => {
                session.wsify_leave(channel);
                Ok(())
            }
            WsifyCommand::Broadcast {
                channel,
                content,
                tags,
            } => match crate::tags::parse(tags.as_deref()) {
                Ok(tags) => self
                    .st
                    .node
                    .wsify_broadcast(self.app, channel, content, tags)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(crate::tags::refusal(&e)),
            },
        };
        let _ = pump(&self.st.node, &self.h, &mut self.session).await;
        if let WsifyCommand::Broadcast { .. } = cmd {
            if r.is_ok() {
                self.st.stats.published.fetch_add(1, Ordering::Relaxed);
                self.st.apps.count_published(self.app, 1);
            }
        }
        match r {
            Ok(()) => Handled::Ok,
            Err(e) => Handled::Error(name.into(), e),
        }
    }
}

#[derive(Deserialize)]
struct BroadcastArgs {
    content: Box<RawValue>,
}

#[derive(Deserialize)]
struct BroadcastBody {
    channel: String,
    #[serde(default)]
    content: Option<Box<RawValue>>,
    #[serde(default)]
    args: Option<BroadcastArgs>,
    #[serde(default)]
    tags: Option<Box<RawValue>>,
}

/// `POST /broadcast?key=KEY`: `{"channel","content"}` or `{"channel","args":{"content"}}`.
pub async fn broadcast(
    State(st): State<Arc<Shared>>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> Response {
    let err = |s: StatusCode, m: String| (s, Json(json!({ "error": m }))).into_response();
    let query = crate::api::form_urlencoded(raw.as_deref().unwrap_or(""));
    let given = query
        .iter()
        .find(|(k, _)| k == "key")
        .map(|(_, v)| v.as_str());
    match (&st.config.broadcasting_key, given) {
        (Some(key), Some(g))
            if pushmesh_protocol::sign::constant_time_eq(key.as_bytes(), g.as_bytes()) => {}
        (Some(_), _) => {
            return err(
                StatusCode::FORBIDDEN,
                "wrong or missing broadcasting key (?key=...)".into(),
            )
        }
        (None, _) if st.config.development => {}
        (None, _) => {
            return err(
                StatusCode::FORBIDDEN,
                "no broadcasting key is configured (--broadcasting-key); POST /broadcast is off"
                    .into(),
            )
        }
    }
    let b: BroadcastBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return err(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")),
    };
    let Some(content) = b.content.or(b.args.map(|a| a.content)) else {
        return err(
            StatusCode::BAD_REQUEST,
            "body needs \"content\" or \"args\": {\"content\"}".into(),
        );
    };
    let tags = match crate::tags::parse(b.tags.as_deref().map(RawValue::get)) {
        Ok(t) => t,
        Err(e) => return err(StatusCode::BAD_REQUEST, crate::tags::refusal(&e)),
    };
    let app = AppIdx(st.config.wsify_app as u32);
    let r = st
        .node
        .wsify_broadcast(app, &b.channel, &content, tags)
        .await;
    match r {
        Ok(()) => {
            st.stats.published.fetch_add(1, Ordering::Relaxed);
            st.apps.count_published(app, 1);
            (StatusCode::OK, Json(json!({ "ok": true }))).into_response()
        }
        Err(e) => crate::api::ApiError::from(e).into_response(),
    }
}
