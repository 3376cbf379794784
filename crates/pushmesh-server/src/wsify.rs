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
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use pushmesh_core::{AppIdx, ConnId, Keepalive, KeepaliveAction, Session};
use pushmesh_protocol::wire::{Event, ReadError};
use pushmesh_protocol::wsify::{self, WsifyCommand};
use pushmesh_protocol::CloseCode;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::time::{sleep_until, timeout};

use crate::authorizer::Verdict;
use crate::conn::{CloseRequest, ConnRef, Next};
use crate::websocket::socket::{Limits, ReadEnd};
use crate::websocket::{WsSocket, WsUpgrade};
use crate::ws::{
    await_close, echo_close, echo_code, flush_queued, pump, write_or_close, CompressionGauge,
    CLOSE_TIMEOUT, WRITE_TIMEOUT,
};
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
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    ticket: Option<axum::Extension<crate::edge::Ticket>>,
    trusted: Option<axum::Extension<crate::identity_headers::PeerTrusted>>,
    headers: HeaderMap,
    ws: WsUpgrade,
) -> Response {
    if let Some(refused) = crate::reject::websocket_key_refusal(&headers) {
        return refused;
    }
    let app = AppIdx(st.config.wsify_app as u32);
    let trusted = trusted.is_some_and(|axum::Extension(t)| t.0);
    let identity = st
        .config
        .identity_headers
        .read(trusted, &headers, &st.stats.edge.identity);
    let max_user = st.node.apps.get(app).limits.max_user_id_length;
    if let Some(Err(e)) = identity.as_ref().map(|i| i.check(max_user)) {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({ "error": e.to_string() })),
        )
            .into_response();
    }
    // Joining or draining: not now, elsewhere (the balancer retries).
    let draining = st.draining.load(Ordering::Relaxed);
    if draining || !st.node.gate.joined() {
        let reason = if draining { "draining" } else { "joining" };
        let e = json!({ "error": format!("node is {reason}, connect again"), "reason": reason });
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(axum::http::header::RETRY_AFTER, "1")],
            Json(e),
        )
            .into_response();
    }
    if !st.ip_limiter.allow(&peer.ip(), Instant::now()) {
        st.stats
            .edge
            .ip_rate_limited
            .fetch_add(1, Ordering::Relaxed);
        let e = json!({ "error": "too many new connections from this address, retry later" });
        return (StatusCode::TOO_MANY_REQUESTS, Json(e)).into_response();
    }
    if let Err(r) = crate::ws::check_origin(&st, app, &headers) {
        st.stats.edge.origin_refused.fetch_add(1, Ordering::Relaxed);
        let e = json!({ "error": r.to_string() });
        return (StatusCode::FORBIDDEN, Json(e)).into_response();
    }
    let (query, envelope) = query_map(raw.as_deref());
    if let Some(authz) = st.authorizer(app).filter(|a| a.wants("connect")) {
        // Identity headers from an untrusted peer are the client's own
        // claim: the authorizer never sees them (it may believe them).
        let ids = &st.config.identity_headers;
        let hdrs = multi_map(
            headers
                .iter()
                .filter(|(k, _)| trusted || !ids.names(k.as_str()))
                .map(|(k, v)| {
                    (
                        k.as_str(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                }),
        );
        let body = json!({"command": "connect", "args": {"headers": hdrs, "query": query}});
        match authz.ask(&body).await {
            Verdict::Allowed => {}
            Verdict::Refused(s) => {
                tracing::debug!(status = s, "wsify connect refused by the authorizer");
                let e = json!({ "error": format!("connection refused by the authorizer ({s})") });
                return (StatusCode::FORBIDDEN, Json(e)).into_response();
            }
            Verdict::Unavailable(why) => {
                tracing::warn!(error = %why, "wsify authorizer unavailable on connect");
                let e = json!({ "error": "authorizer unavailable, retry later" });
                return (StatusCode::SERVICE_UNAVAILABLE, Json(e)).into_response();
            }
        }
    }
    let limits = Limits {
        max_message: st.config.max_message_bytes,
    };
    ws.on_upgrade(st.config.compression, limits, move |socket| async move {
        // Established: the pending slot goes; the per-IP slot stays
        // with the connection.
        let _ticket = ticket.inspect(|t| t.established());
        run_wsify(st, socket, app, envelope, query, identity).await;
    })
}

enum End {
    Gone,
    /// The client's close frame (its code): echoed (RFC 6455 §5.5.1).
    ClientClosed(Option<u16>),
    Close(u16, String),
}

async fn send_now(socket: &mut WsSocket, frame: Bytes) -> bool {
    matches!(
        timeout(WRITE_TIMEOUT, socket.send_text(&frame)).await,
        Ok(Ok(()))
    )
}

async fn run_wsify(
    st: Arc<Shared>,
    mut socket: WsSocket,
    app: AppIdx,
    envelope: bool,
    query: Value,
    identity: Option<pushmesh_core::session::Identity>,
) {
    let conn = ConnId(st.next_conn.fetch_add(1, Ordering::Relaxed));
    let (h, mut rx) = ConnRef::new(conn, st.config.outbound_queue);
    let opened = Instant::now();
    let node = &st.node;
    let cfg = node.apps.get(app).clone();
    if let Err(e) = node.registry.admit(app, &cfg, &h) {
        let _ = timeout(
            CLOSE_TIMEOUT,
            socket.send_close(ws_code(e.close_code()), &e.to_string()),
        )
        .await;
        await_close(&mut socket).await;
        return;
    }
    let _compressing = CompressionGauge::new(&st, socket.compressing());
    let socket_id = node.socket_id(conn);
    let mut session = Session::wsify(opened, conn, app, cfg, &socket_id, envelope);
    if let Some(id) = identity {
        // Checked before the upgrade; signs in (no frame for wsify).
        if session.set_identity(id).is_ok() {
            let _ = pump(&st.node, &h, &mut session).await;
        }
    }
    st.stats
        .edge
        .connections_opened
        .fetch_add(1, Ordering::Relaxed);
    let authz = st.authorizer(app);
    let identity = json!({ "id": socket_id, "query": query });
    let mut keepalive = Keepalive::new(opened, st.config.activity_timeout, st.config.pong_timeout);
    let mut ka_deadline = keepalive.deadline();
    let ka_sleep = sleep_until(ka_deadline.into());
    tokio::pin!(ka_sleep);
    let end = loop {
        if keepalive.deadline() != ka_deadline {
            ka_deadline = keepalive.deadline();
            ka_sleep.as_mut().reset(ka_deadline.into());
        }
        tokio::select! {
            biased;
            next = rx.recv() => match next {
                Next::Close => {
                    if let Some(CloseRequest { code, reason }) = h.take_close() {
                        break End::Close(ws_code(code), reason);
                    }
                }
                Next::Frame(first) => {
                    let (ok, closing) = write_or_close(&mut socket, &mut rx, &h, first, &st.stats.edge).await;
                    if closing {
                        if let Some(CloseRequest { code, reason }) = h.take_close() {
                            break End::Close(ws_code(code), reason);
                        }
                    } else if !ok {
                        break End::Gone;
                    }
                }
            },
            msg = socket.recv() => {
                keepalive.on_activity(Instant::now());
                let text = match msg {
                    Ok(Event::Text(t)) => {
                        st.stats.edge.bytes_in.fetch_add(t.len() as u64, Ordering::Relaxed);
                        // The reader checked it is UTF-8.
                        std::str::from_utf8(&t).unwrap_or_default().to_owned()
                    }
                    Ok(Event::Binary(_)) => {
                        if envelope && !send_now(&mut socket, wsify::error_frame("", "binary frames are not supported")).await {
                            break End::Gone;
                        }
                        continue;
                    }
                    Ok(Event::Ping(p)) => {
                        if !matches!(timeout(WRITE_TIMEOUT, socket.pong(&p)).await, Ok(Ok(()))) {
                            break End::Gone;
                        }
                        continue;
                    }
                    Ok(Event::Pong(_)) => continue,
                    Ok(Event::Close(c)) => break End::ClientClosed(echo_code(c)),
                    Err(ReadEnd::Gone) => break End::Gone,
                    Err(ReadEnd::Invalid(e)) => {
                        tracing::debug!(conn = conn.0, error = %e, "wsify protocol error");
                        let reason = match &e {
                            ReadError::TooBig(n) => format!("message larger than {n} bytes"),
                            other => other.to_string(),
                        };
                        break End::Close(e.close_code(), reason);
                    }
                };
                match handle_command(&st, &h, &mut session, app, &text, authz.as_deref(), &identity).await {
                    Handled::Ok => {}
                    Handled::Error(command, message) => {
                        tracing::debug!(conn = conn.0, %command, %message, "wsify command refused");
                        if envelope && !send_now(&mut socket, wsify::error_frame(&command, &message)).await {
                            break End::Gone;
                        }
                    }
                    Handled::Close(why) => break End::Close(WS_TRY_AGAIN_LATER, why),
                }
            }
            () = &mut ka_sleep => {
                match keepalive.poll(Instant::now()) {
                    KeepaliveAction::Wait => ka_sleep.as_mut().reset(keepalive.deadline().into()),
                    KeepaliveAction::SendPing => {
                        if !matches!(timeout(WRITE_TIMEOUT, socket.send_frame(pushmesh_protocol::wire::frame::ping(b""))).await, Ok(Ok(()))) {
                            break End::Gone;
                        }
                    }
                    KeepaliveAction::Close => break End::Close(WS_POLICY, "pong not received in time".into()),
                }
            }
        }
    };
    let channels: Vec<String> = session.channels().map(ToString::to_string).collect();
    session.disconnect();
    let _ = pump(node, &h, &mut session).await;
    node.registry.remove(app, conn);
    if let Some(a) = &authz {
        if a.wants("leave") {
            for c in channels {
                a.notify(
                    json!({"command": "leave", "args": {"channel": c}, "connection": identity}),
                );
            }
        }
        a.notify(json!({"command": "disconnect", "args": {}, "connection": identity}));
    }
    st.stats.edge.closed(&match &end {
        End::Gone | End::ClientClosed(_) => "client".to_string(),
        End::Close(code, _) => code.to_string(),
    });
    if let End::ClientClosed(code) = end {
        echo_close(&mut socket, code).await;
    }
    if let End::Close(code, reason) = &end {
        let _ = flush_queued(&mut socket, &mut rx, &st.stats.edge).await;
        let _ = timeout(CLOSE_TIMEOUT, socket.send_close(*code, reason)).await;
        await_close(&mut socket).await;
    }
    tracing::debug!(
        conn = conn.0,
        duration_ms = opened.elapsed().as_millis() as u64,
        "wsify connection closed"
    );
}

enum Handled {
    Ok,
    Error(String, String),
    Close(String),
}

async fn handle_command(
    st: &Shared,
    h: &ConnRef,
    session: &mut Session,
    app: AppIdx,
    text: &str,
    authz: Option<&crate::authorizer::Authorizer>,
    identity: &Value,
) -> Handled {
    // Each frame is parsed on its own: a bad one is refused, never replaced
    // by an earlier command (a wsify flaw).
    let cmd = match WsifyCommand::parse(text) {
        Ok(c) => c,
        Err(e) => return Handled::Error(String::new(), e.to_string()),
    };
    let name = cmd.name();
    if let Some(a) = authz.filter(|a| a.wants(name)) {
        let mut body: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut body {
            m.insert("connection".into(), identity.clone());
        }
        match a.ask(&body).await {
            Verdict::Allowed => {}
            Verdict::Refused(s) => {
                return Handled::Error(name.into(), format!("not allowed by the authorizer ({s})"))
            }
            Verdict::Unavailable(why) => {
                tracing::warn!(error = %why, command = name, "wsify authorizer unavailable, closing for reconnect");
                return Handled::Close("authorizer unavailable, reconnect later".into());
            }
        }
    }
    let r = match &cmd {
        WsifyCommand::Join {
            channel,
            filter,
            position,
        } => session.wsify_join_filtered(channel, filter.as_deref(), position.as_deref()),
        WsifyCommand::Leave { channel } => {
            session.wsify_leave(channel);
            Ok(())
        }
        WsifyCommand::Broadcast {
            channel,
            content,
            tags,
        } => match crate::tags::parse(tags.as_deref()) {
            Ok(tags) => st
                .node
                .wsify_broadcast(app, channel, content, tags)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(crate::tags::refusal(&e)),
        },
    };
    let _ = pump(&st.node, h, session).await;
    if let WsifyCommand::Broadcast { .. } = cmd {
        if r.is_ok() {
            st.stats.published.fetch_add(1, Ordering::Relaxed);
        }
    }
    match r {
        Ok(()) => Handled::Ok,
        Err(e) => Handled::Error(name.into(), e),
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
            (StatusCode::OK, Json(json!({ "ok": true }))).into_response()
        }
        Err(e) => crate::api::ApiError::from(e).into_response(),
    }
}
