//! The Pusher WebSocket endpoint `/app/{key}` and its per-connection task.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;
use pushmesh_core::{AppIdx, ConnId, Keepalive, KeepaliveAction, Session, SessionOutput};
use pushmesh_protocol::wire::{Event, Outbound, ReadError};
use pushmesh_protocol::{server, CloseCode};
use tokio::time::{sleep_until, timeout};

use crate::conn::{CloseRequest, ConnRef, Next, Outbox};
use crate::edge::Ticket;
use crate::metrics::EdgeMetrics;
use crate::node::Node;
use crate::reject::websocket_key_refusal;
use crate::websocket::socket::{Limits, ReadEnd, Written};
use crate::websocket::{WsSocket, WsUpgrade};
use crate::Shared;

/// How long one batch of writes may take before the client counts as dead.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the client's close frame after sending ours.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Most frames taken from the queue for one flush.
const WRITE_BATCH: usize = 256;

/// What the upgrade decided before the socket exists.
enum Admission {
    App(AppIdx),
    Refuse(CloseCode, String),
}

/// An `Origin` the app does not allow (the value, empty when absent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("origin {0:?} is not allowed for this app")]
pub struct OriginRefused(pub String);

/// Checks the request's `Origin` against the app's `allowed_origins`
/// (empty: every origin; `*` allows all too).
pub(crate) fn check_origin(
    st: &Shared,
    app: AppIdx,
    headers: &HeaderMap,
) -> Result<(), OriginRefused> {
    let allowed = &st.config.app_io[app.0 as usize].allowed_origins;
    if allowed.is_empty() || allowed.iter().any(|a| a == "*") {
        return Ok(());
    }
    let origin = headers
        .get(axum::http::header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .unwrap_or("");
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
        Ok(())
    } else {
        Err(OriginRefused(origin.to_string()))
    }
}

/// Protocol versions a client may ask for; the server speaks 7 to all of
/// them (4 to 6 differ from 7 in nothing a client sends; pysher asks for 6).
pub const PROTOCOL_VERSIONS: std::ops::RangeInclusive<u32> = 4..=7;

/// `GET /app/{key}`: upgrades to a Pusher protocol connection.
#[allow(clippy::too_many_arguments)]
pub async fn pusher_ws(
    State(st): State<Arc<Shared>>,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ticket: Option<Extension<Ticket>>,
    trusted: Option<Extension<crate::identity_headers::PeerTrusted>>,
    headers: HeaderMap,
    ws: WsUpgrade,
) -> Response {
    if let Some(refused) = websocket_key_refusal(&headers) {
        return refused;
    }
    let trusted = trusted.is_some_and(|Extension(t)| t.0);
    let identity = st
        .config
        .identity_headers
        .read(trusted, &headers, &st.stats.edge.identity);
    let admission = match q.get("protocol").map(|p| p.parse::<u32>()) {
        Some(Err(_)) => Admission::Refuse(
            CloseCode::InvalidVersionFormat,
            "protocol version must be a number".into(),
        ),
        Some(Ok(v)) if !PROTOCOL_VERSIONS.contains(&v) => Admission::Refuse(
            CloseCode::UnsupportedProtocol,
            format!("unsupported protocol version {v}; this server speaks 4 to 7"),
        ),
        _ if !st.ip_limiter.allow(&peer.ip(), Instant::now()) => {
            st.stats
                .edge
                .ip_rate_limited
                .fetch_add(1, Ordering::Relaxed);
            Admission::Refuse(
                CloseCode::OverCapacity,
                "too many new connections from this address, retry later".into(),
            )
        }
        // A draining node sends newcomers elsewhere.
        _ if st.draining.load(std::sync::atomic::Ordering::Relaxed) => Admission::Refuse(
            CloseCode::ReconnectImmediately,
            "node is draining, reconnect".into(),
        ),
        // So does a node that has not joined its cluster: it could not yet
        // promise its subscribers the messages published elsewhere.
        _ if !st.node.gate.joined() => Admission::Refuse(
            CloseCode::ReconnectImmediately,
            "node is joining its cluster, reconnect".into(),
        ),
        // A missing protocol is taken as 7.
        _ => match st.app_by_key(&key) {
            Some(app) => match check_origin(&st, app, &headers) {
                Ok(()) => match identity
                    .as_ref()
                    .map(|i| i.check(st.node.apps.get(app).limits.max_user_id_length))
                {
                    Some(Err(e)) => Admission::Refuse(CloseCode::Unauthorized, e.to_string()),
                    _ => Admission::App(app),
                },
                Err(reason) => {
                    st.stats.edge.origin_refused.fetch_add(1, Ordering::Relaxed);
                    Admission::Refuse(CloseCode::Unauthorized, reason.to_string())
                }
            },
            None => Admission::Refuse(CloseCode::AppNotFound, format!("no app with key {key:?}")),
        },
    };
    let limits = Limits {
        max_message: st.config.max_message_bytes,
    };
    ws.on_upgrade(st.config.compression, limits, move |socket| async move {
        // Established: the pending slot goes; the per-IP slot stays
        // with the connection.
        let _ticket = ticket.inspect(|t| t.established());
        match admission {
            Admission::App(app) => run_connection(st, socket, app, peer, identity).await,
            Admission::Refuse(code, reason) => {
                tracing::debug!(code = code.code(), %reason, "connection refused");
                refuse(socket, code, &reason).await;
            }
        }
    })
}

async fn refuse(mut socket: WsSocket, code: CloseCode, reason: &str) {
    let frame = server::error(reason, Some(code.code()));
    let _ = timeout(WRITE_TIMEOUT, socket.send_text(&frame)).await;
    let _ = timeout(WRITE_TIMEOUT, socket.send_close(code.code(), reason)).await;
    await_close(&mut socket).await;
}

/// Completes the closing handshake: reads (and drops) what the client still
/// sends until its close frame, bounded in time. Closing the TCP socket with
/// unread input would reset it and the client could lose the close frame.
pub(crate) async fn await_close(socket: &mut WsSocket) {
    let _ = timeout(CLOSE_TIMEOUT, socket.await_close()).await;
}

/// Why the connection loop ended.
enum End {
    /// The client went away or the socket failed.
    Gone,
    /// The client sent a close frame (its code, if any): it is echoed
    /// (RFC 6455 §5.5.1) before the socket goes.
    ClientClosed(Option<u16>),
    /// The server closes with a code.
    Close(CloseRequest),
    /// The client sent a message over the size limit (WebSocket 1009).
    TooBig(String),
    /// The client broke the WebSocket protocol (1002, 1007).
    Invalid(ReadError),
}

/// The close code a client's close frame is echoed with.
pub(crate) fn echo_code(close: Option<(u16, String)>) -> Option<u16> {
    close.map(|(code, _)| code)
}

/// Echoes a client's close frame (an empty one if it had no code).
pub(crate) async fn echo_close(socket: &mut WsSocket, code: Option<u16>) {
    let frame = match code {
        Some(c) => pushmesh_protocol::wire::frame::close(c, ""),
        None => pushmesh_protocol::wire::frame::close_empty(),
    };
    let _ = timeout(CLOSE_TIMEOUT, socket.send_frame(frame)).await;
}

async fn run_connection(
    st: Arc<Shared>,
    mut socket: WsSocket,
    app: AppIdx,
    peer: SocketAddr,
    identity: Option<pushmesh_core::session::Identity>,
) {
    let conn = ConnId(st.next_conn.fetch_add(1, Ordering::Relaxed));
    let (h, mut rx) = ConnRef::new(conn, st.config.outbound_queue);
    let opened = Instant::now();
    let node = &st.node;
    let cfg = node.apps.get(app).clone();
    if let Err(e) = node.registry.admit(app, &cfg, &h) {
        tracing::debug!(conn = conn.0, error = %e, "connection refused");
        Box::pin(refuse(socket, e.close_code(), &e.to_string())).await;
        return;
    }
    let _compressing = CompressionGauge::new(&st, socket.compressing());
    let socket_id = node.socket_id(conn);
    let requires_signin = cfg.user_authentication_required;
    let mut session = Session::pusher(
        opened,
        conn,
        app,
        cfg,
        &socket_id,
        st.config.activity_timeout.as_secs(),
    );
    if let Some(id) = identity {
        // Checked before the upgrade.
        if let Err(e) = session.set_identity(id) {
            session.close(CloseCode::Unauthorized, &e.to_string());
        }
    }
    let mut pending_close = pump(node, &h, &mut session).await;
    tracing::debug!(conn = conn.0, client = %peer.ip(), "connection opened");
    st.stats
        .edge
        .connections_opened
        .fetch_add(1, Ordering::Relaxed);

    let mut keepalive = Keepalive::new(opened, st.config.activity_timeout, st.config.pong_timeout);
    let signin_deadline = requires_signin.then(|| opened + st.config.signin_timeout);
    let mut signin_checked = false;
    // One timer each for keepalive and sign-in, reset only when their
    // deadline moves (not re-armed for every message).
    let mut ka_deadline = keepalive.deadline();
    let ka_sleep = sleep_until(ka_deadline.into());
    tokio::pin!(ka_sleep);
    // Only apps that require sign-in pay for this timer.
    let mut signin_sleep = signin_deadline.map(|d| Box::pin(sleep_until(d.into())));
    let end = loop {
        if let Some(req) = pending_close.take() {
            break End::Close(req);
        }
        if keepalive.deadline() != ka_deadline {
            ka_deadline = keepalive.deadline();
            ka_sleep.as_mut().reset(ka_deadline.into());
        }
        tokio::select! {
            biased;
            next = rx.recv() => match next {
                Next::Close => {
                    if let Some(req) = h.take_close() {
                        session.close(req.code, &req.reason);
                        pending_close = pump(node, &h, &mut session).await;
                    }
                }
                Next::Frame(first) => {
                    // A close request (e.g. 4100 for this very connection)
                    // wins over a write stuck on a client that does not read.
                    let (ok, closing) = write_or_close(&mut socket, &mut rx, &h, first, &st.stats.edge).await;
                    if closing {
                        if let Some(req) = h.take_close() {
                            session.close(req.code, &req.reason);
                            pending_close = pump(node, &h, &mut session).await;
                        }
                    } else if !ok {
                        break End::Gone;
                    }
                }
            },
            msg = socket.recv() => {
                let now = Instant::now();
                keepalive.on_activity(now);
                match msg {
                    Ok(Event::Text(t)) => {
                        st.stats.edge.bytes_in.fetch_add(t.len() as u64, Ordering::Relaxed);
                        // The reader checked it is UTF-8.
                        let text = std::str::from_utf8(&t).unwrap_or_default();
                        session.handle_frame(now, text);
                        pending_close = pump(node, &h, &mut session).await;
                    }
                    Ok(Event::Binary(_)) => {
                        session.handle_binary();
                        pending_close = pump(node, &h, &mut session).await;
                    }
                    Ok(Event::Ping(p)) => {
                        if Box::pin(timeout(WRITE_TIMEOUT, socket.pong(&p))).await.map_or(true, |r| r.is_err()) {
                            break End::Gone;
                        }
                    }
                    Ok(Event::Pong(_)) => {}
                    Ok(Event::Close(c)) => break End::ClientClosed(echo_code(c)),
                    Err(ReadEnd::Gone) => break End::Gone,
                    Err(ReadEnd::Invalid(ReadError::TooBig(_))) => {
                        let reason = format!("message larger than {} bytes", st.config.max_message_bytes);
                        tracing::debug!(conn = conn.0, "oversize message");
                        let _ = Box::pin(timeout(WRITE_TIMEOUT, socket.send_text(&server::error(&reason, None)))).await;
                        break End::TooBig(reason);
                    }
                    Err(ReadEnd::Invalid(e)) => {
                        tracing::debug!(conn = conn.0, error = %e, "websocket protocol error");
                        break End::Invalid(e);
                    }
                }
            }
            () = &mut ka_sleep => {
                match keepalive.poll(Instant::now()) {
                    KeepaliveAction::Wait => ka_sleep.as_mut().reset(keepalive.deadline().into()),
                    KeepaliveAction::SendPing => {
                        if Box::pin(timeout(WRITE_TIMEOUT, socket.send_text(&server::ping()))).await.map_or(true, |r| r.is_err()) {
                            break End::Gone;
                        }
                    }
                    KeepaliveAction::Close => break End::Close(CloseRequest {
                        code: CloseCode::PongNotReceived,
                        reason: "pong not received in time".into(),
                    }),
                }
            }
            () = async { if let Some(s) = signin_sleep.as_mut() { s.await } }, if signin_sleep.is_some() && !signin_checked => {
                signin_checked = true;
                session.signin_deadline();
                pending_close = pump(node, &h, &mut session).await;
            }
        }
    };

    // Leave the router first so nothing more is queued for this connection.
    session.disconnect();
    let _ = pump(node, &h, &mut session).await;
    node.registry.remove(app, conn);
    let (code_label, reason) = Box::pin(finish(&st, &mut socket, &mut rx, end)).await;
    st.stats.edge.closed(&code_label);
    tracing::debug!(
        conn = conn.0,
        reason = %reason,
        duration_ms = opened.elapsed().as_millis() as u64,
        "connection closed"
    );
}

/// Counts a connection that negotiated compression while it is open.
pub(crate) struct CompressionGauge<'a>(Option<&'a Shared>);

impl<'a> CompressionGauge<'a> {
    pub(crate) fn new(st: &'a Shared, compressing: bool) -> Self {
        if compressing {
            st.stats
                .edge
                .compression_connections
                .fetch_add(1, Ordering::Relaxed);
        }
        Self(compressing.then_some(st))
    }
}

impl Drop for CompressionGauge<'_> {
    fn drop(&mut self) {
        if let Some(st) = self.0 {
            st.stats
                .edge
                .compression_connections
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Ends a connection: writes what is queued, the close frame, and waits
/// (bounded) for the client's. Boxed by the caller: only closing pays for it.
async fn finish(st: &Shared, socket: &mut WsSocket, rx: &mut Outbox, end: End) -> (String, String) {
    let code_label = match &end {
        End::Gone | End::ClientClosed(_) => "client".to_string(),
        End::Close(req) => req.code.code().to_string(),
        End::TooBig(_) => "1009".to_string(),
        End::Invalid(e) => e.close_code().to_string(),
    };
    let reason = match end {
        End::Gone => "client went away".to_string(),
        End::ClientClosed(code) => {
            echo_close(socket, code).await;
            "client closed".to_string()
        }
        End::Close(req) => {
            // Frames queued before the close (e.g. the pusher:error) go first.
            let _ = flush_queued(socket, rx, &st.stats.edge).await;
            let _ = timeout(
                CLOSE_TIMEOUT,
                socket.send_close(req.code.code(), &req.reason),
            )
            .await;
            await_close(socket).await;
            format!("{} {}", req.code.code(), req.reason)
        }
        End::TooBig(reason) => {
            let _ = timeout(WRITE_TIMEOUT, socket.send_close(1009, &reason)).await;
            await_close(socket).await;
            format!("1009 {reason}")
        }
        End::Invalid(e) => {
            let reason = e.to_string();
            let _ = timeout(WRITE_TIMEOUT, socket.send_close(e.close_code(), &reason)).await;
            await_close(socket).await;
            format!("{} {reason}", e.close_code())
        }
    };
    (code_label, reason)
}

/// Does what a session asks: frames into the connection's own queue,
/// requests to the router; returns the close it asked for, if any.
/// Routing (rare: subscribe, client events) runs in a boxed future, so the
/// connection task's own future stays small (memory per connection).
pub(crate) async fn pump(node: &Node, h: &ConnRef, session: &mut Session) -> Option<CloseRequest> {
    let mut close = None;
    let mut routes = Vec::new();
    while let Some(out) = session.poll() {
        match out {
            SessionOutput::Send(frame) => node.send_to(h, frame),
            SessionOutput::Close { code, reason } => close = Some(CloseRequest { code, reason }),
            SessionOutput::Route(req) => routes.push(req),
        }
    }
    if !routes.is_empty() {
        Box::pin(async move {
            for req in routes {
                node.route(h, req).await;
            }
        })
        .await;
    }
    close
}

/// Writes a batch unless a close is requested meanwhile (e.g. 4100 for this
/// very connection, which must win over a write stuck on a client that does
/// not read). Returns (write succeeded, close requested).
pub(crate) async fn write_or_close(
    socket: &mut WsSocket,
    rx: &mut Outbox,
    h: &ConnRef,
    first: Outbound,
    stats: &EdgeMetrics,
) -> (bool, bool) {
    let write = write_batch(socket, rx, first, WRITE_TIMEOUT, stats);
    tokio::pin!(write);
    let close = h.close_requested();
    tokio::pin!(close);
    // The write first: when it completes at once (the usual case) the close
    // waiter is never even registered.
    tokio::select! {
        biased;
        ok = &mut write => (ok, false),
        () = &mut close => (true, true),
    }
}

/// Writes `first` and whatever else is queued: the shared frames as they
/// are (compressed ones for a compressing connection), several per
/// `writev(2)`, then flushes once.
pub(crate) async fn write_batch(
    socket: &mut WsSocket,
    rx: &mut Outbox,
    first: Outbound,
    limit: Duration,
    stats: &EdgeMetrics,
) -> bool {
    let mut w = Written::default();
    socket.queue(&first, &mut w);
    let mut n = 1;
    while n < WRITE_BATCH {
        match rx.try_recv() {
            Some(m) => socket.queue(&m, &mut w),
            None => break,
        }
        n += 1;
    }
    stats.bytes_out.fetch_add(w.payload, Ordering::Relaxed);
    if w.deflate_plain > 0 {
        stats
            .compression_plain
            .fetch_add(w.deflate_plain, Ordering::Relaxed);
        stats
            .compression_compressed
            .fetch_add(w.deflate_compressed, Ordering::Relaxed);
    }
    flush_within(socket, limit).await
}

/// Flushes, bounded by `limit`; the timer is only armed when the socket
/// cannot take everything at once (the flush is cancel-safe: what it did
/// not write stays queued for the second try).
async fn flush_within(socket: &mut WsSocket, limit: Duration) -> bool {
    use futures_util::FutureExt;
    match socket.flush().now_or_never() {
        Some(r) => r.is_ok(),
        None => matches!(timeout(limit, socket.flush()).await, Ok(Ok(()))),
    }
}

pub(crate) async fn flush_queued(
    socket: &mut WsSocket,
    rx: &mut Outbox,
    stats: &EdgeMetrics,
) -> bool {
    match rx.try_recv() {
        // On the way out: bounded tighter, the client may be the slow one.
        Some(first) => write_batch(socket, rx, first, CLOSE_TIMEOUT, stats).await,
        // What an interrupted write left.
        None => matches!(timeout(CLOSE_TIMEOUT, socket.flush()).await, Ok(Ok(()))),
    }
}
