//! The Pusher WebSocket endpoint `/app/{key}` and its protocol on the
//! shared connection loop ([`crate::websocket::driver`]).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use pushmesh_core::session::Identity;
use pushmesh_core::{AppIdx, Session};
use pushmesh_protocol::wire::ReadError;
use pushmesh_protocol::{server, CloseCode};
use tokio::time::timeout;

use crate::conn::{CloseRequest, ConnRef};
use crate::node::Node;
use crate::reject::websocket_key_refusal;
use crate::websocket::driver::{
    await_close, pong_not_received, pump, Close, CompressionGauge, Connection, End, Flow, Protocol,
    WRITE_TIMEOUT,
};
use crate::websocket::{Upgrading, WsSocket, WsUpgrade};
use crate::Shared;

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
    let io = st.apps.io(app).0;
    let allowed = &io.allowed_origins;
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
pub async fn pusher_ws(
    State(st): State<Arc<Shared>>,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    req: Upgrading,
    ws: WsUpgrade,
) -> Response {
    if let Some(refused) = websocket_key_refusal(&req.headers) {
        return refused;
    }
    let identity = req.identity(&st);
    let admission = admit(&st, &key, &q, &req, identity.as_ref());
    let peer = req.peer;
    let node = st.clone();
    req.upgrade(&node, ws, move |socket| async move {
        match admission {
            Admission::App(app) => run_connection(&st, socket, app, peer, identity).await,
            Admission::Refuse(code, reason) => {
                tracing::debug!(code = code.code(), %reason, "connection refused");
                refuse(socket, code, &reason).await;
            }
        }
    })
}

/// Whether the connection may open, decided before the upgrade.
fn admit(
    st: &Shared,
    key: &str,
    q: &HashMap<String, String>,
    req: &Upgrading,
    identity: Option<&Identity>,
) -> Admission {
    match q.get("protocol").map(|p| p.parse::<u32>()) {
        Some(Err(_)) => Admission::Refuse(
            CloseCode::InvalidVersionFormat,
            "protocol version must be a number".into(),
        ),
        Some(Ok(v)) if !PROTOCOL_VERSIONS.contains(&v) => Admission::Refuse(
            CloseCode::UnsupportedProtocol,
            format!("unsupported protocol version {v}; this server speaks 4 to 7"),
        ),
        _ if !st.ip_limiter.allow(&req.peer.ip(), Instant::now()) => {
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
        _ if st.draining.load(Ordering::Relaxed) => Admission::Refuse(
            CloseCode::ReconnectImmediately,
            "node is draining, reconnect".into(),
        ),
        // A node that has not joined its cluster could not yet promise its
        // subscribers the messages published elsewhere: 4100, which
        // pusher-js answers by reconnecting after 1 s (joining takes about
        // that), not at once (4200) nor after 15 s (a failed handshake).
        _ if !st.node.gate.joined() => {
            st.edge
                .guard
                .upgrades_refused_joining
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Admission::Refuse(
                CloseCode::OverCapacity,
                "node is joining its cluster, reconnect shortly".into(),
            )
        }
        // A missing protocol is taken as 7.
        _ => match st.app_by_key(key) {
            Some(app) => match check_origin(st, app, &req.headers) {
                Ok(()) => match identity
                    .map(|i| i.check(st.node.apps().get(app).limits.max_user_id_length))
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
    }
}

async fn refuse(mut socket: WsSocket, code: CloseCode, reason: &str) {
    let frame = server::error(reason, Some(code.code()));
    let _ = timeout(WRITE_TIMEOUT, socket.send_text(&frame)).await;
    let _ = timeout(WRITE_TIMEOUT, socket.send_close(code.code(), reason)).await;
    await_close(&mut socket).await;
}

/// The Pusher protocol on the connection loop: every message goes to the
/// session, whose frames and closes the loop carries out.
struct Pusher<'a> {
    node: &'a Node,
    h: ConnRef,
    conn: u64,
    session: Session,
    max_message: usize,
    signin_deadline: Option<Instant>,
}

impl Pusher<'_> {
    /// Does what the session asked; a close it asked for ends the loop.
    async fn pump(&mut self) -> Flow {
        match pump(self.node, &self.h, &mut self.session).await {
            Some(req) => Flow::End(End::close(req.code.code(), req.reason)),
            None => Flow::Continue,
        }
    }
}

impl Protocol for Pusher<'_> {
    fn session(&mut self) -> &mut Session {
        &mut self.session
    }

    async fn close_requested(&mut self, req: CloseRequest) -> Flow {
        self.session.close(req.code, &req.reason);
        self.pump().await
    }

    async fn text(&mut self, _socket: &mut WsSocket, text: &str, now: Instant) -> Flow {
        self.session.handle_frame(now, text);
        self.pump().await
    }

    async fn binary(&mut self, _socket: &mut WsSocket) -> Flow {
        self.session.handle_binary();
        self.pump().await
    }

    async fn invalid(&mut self, socket: &mut WsSocket, e: ReadError) -> End {
        let conn = self.conn;
        if let ReadError::TooBig(_) = e {
            let reason = format!("message larger than {} bytes", self.max_message);
            tracing::debug!(conn, "oversize message");
            let error = server::error(&reason, None);
            let _ = Box::pin(timeout(WRITE_TIMEOUT, socket.send_text(&error))).await;
            return at_once(1009, reason);
        }
        tracing::debug!(conn, error = %e, "websocket protocol error");
        at_once(e.close_code(), e.to_string())
    }

    async fn ping(&mut self, socket: &mut WsSocket) -> bool {
        let ping = server::ping();
        Box::pin(timeout(WRITE_TIMEOUT, socket.send_text(&ping)))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn pong_timeout(&self) -> End {
        pong_not_received(|c| c.code())
    }

    fn deadline(&self) -> Option<Instant> {
        self.signin_deadline
    }

    async fn deadline_passed(&mut self) -> Flow {
        self.session.signin_deadline();
        self.pump().await
    }
}

/// A close sent at once, not after the queued frames (a broken protocol).
fn at_once(code: u16, reason: String) -> End {
    End::Close(Close {
        code,
        reason,
        after_queued: false,
    })
}

async fn run_connection(
    st: &Shared,
    socket: WsSocket,
    app: AppIdx,
    peer: std::net::SocketAddr,
    identity: Option<Identity>,
) {
    let mut c = Connection::new(st, socket, app);
    let cfg = match c.admit() {
        Ok(cfg) => cfg,
        Err(e) => {
            tracing::debug!(conn = c.conn.0, error = %e, "connection refused");
            Box::pin(refuse(c.socket, e.close_code(), &e.to_string())).await;
            return;
        }
    };
    let _compressing = CompressionGauge::new(st, c.socket.compressing());
    let socket_id = st.node.socket_id(c.conn);
    let requires_signin = cfg.user_authentication_required;
    let mut session = Session::pusher(
        c.opened,
        c.conn,
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
    let mut pusher = Pusher {
        node: &st.node,
        h: c.h.clone(),
        conn: c.conn.0,
        session,
        max_message: st.config.max_message_bytes,
        signin_deadline: requires_signin.then(|| c.opened + st.config.signin_timeout),
    };
    let first = pusher.pump().await;
    tracing::debug!(conn = c.conn.0, client = %peer.ip(), "connection opened");
    c.opened();
    let end = match first {
        Flow::End(end) => end,
        Flow::Continue => c.run(&mut pusher).await,
    };
    c.leave(pusher.session()).await;
    let reason = Box::pin(c.finish(end)).await;
    tracing::debug!(
        conn = c.conn.0,
        reason = %reason,
        duration_ms = c.opened.elapsed().as_millis() as u64,
        "connection closed"
    );
}
