//! `GET /app/{key}/sse?channel=…`: subscriptions over Server-Sent Events.
//!
//! The endpoint is thin: the request is parsed and authorized by the core
//! (`SseRequest`), the stream is a Pusher session of its own connection
//! (same queue, same slow-consumer rule, same `Registry` for quotas and
//! drain) subscribed through the one Subscribe path, and its task
//! ([`stream`]) writes the queued Pusher frames as SSE events
//! (`pushmesh_protocol::sse::StreamWriter`).
//!
//! Refusals that would last (unknown key 404, disabled app, origin and
//! token 403, a bad request 400) are HTTP errors with JSON bodies: an
//! `EventSource` stops there. Refusals that pass (the node draining or
//! joining, over a quota or the per-IP rate) are a 200 stream that says
//! `pusher:error` with the Pusher close code and ends: `EventSource`
//! reconnects after `retry:` (through the balancer, with its
//! `Last-Event-ID`), as pusher-js does after 4100 / 4200.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::{Bytes, BytesMut};
use pushmesh_core::session::{SseAuthError, SseRequest, SseRequestError};
use pushmesh_core::{OpenError, Session};
use pushmesh_protocol::sse::{write_event, StreamWriter};
use pushmesh_protocol::{server, CloseCode};
use serde_json::json;

use crate::conn::ConnRef;
use crate::websocket::Upgrading;
use crate::ws::{check_origin, OriginRefused};
use crate::Shared;

mod stream;

/// Why a stream request is answered with an HTTP error (one place maps
/// them to status and JSON body).
#[derive(Debug, thiserror::Error)]
pub enum SseError {
    /// No app with this key (404).
    #[error("no app with key {0:?}")]
    UnknownKey(String),
    /// The app is disabled (403).
    #[error("app is disabled")]
    AppDisabled,
    /// The request's `Origin` is not allowed (403).
    #[error(transparent)]
    Origin(#[from] OriginRefused),
    /// The identity headers name a user or device the app refuses (403).
    #[error(transparent)]
    Identity(#[from] pushmesh_core::session::IdentityError),
    /// The token (403).
    #[error(transparent)]
    Auth(#[from] SseAuthError),
    /// The request (400).
    #[error(transparent)]
    Request(#[from] SseRequestError),
}

impl SseError {
    fn status(&self) -> StatusCode {
        match self {
            Self::UnknownKey(_) => StatusCode::NOT_FOUND,
            Self::Request(_) => StatusCode::BAD_REQUEST,
            Self::AppDisabled | Self::Origin(_) | Self::Identity(_) | Self::Auth(_) => {
                StatusCode::FORBIDDEN
            }
        }
    }
}

impl IntoResponse for SseError {
    fn into_response(self) -> Response {
        tracing::debug!(error = %self, "sse stream refused");
        (self.status(), Json(json!({ "error": self.to_string() }))).into_response()
    }
}

/// Unix seconds, for token expiry.
fn seconds_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `OPTIONS /app/{key}/sse`: the CORS preflight a browser may send for a
/// cross-origin `EventSource` (its `Last-Event-ID` header).
pub async fn preflight(
    State(st): State<Arc<Shared>>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(app) = st.app_by_key(&key) else {
        return SseError::UnknownKey(key).into_response();
    };
    if let Err(e) = check_origin(&st, app, &headers) {
        return SseError::from(e).into_response();
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    cors(&headers, h);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("last-event-id, cache-control"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    resp
}

/// The CORS answer for an allowed `Origin` (checked before).
fn cors(req: &HeaderMap, out: &mut HeaderMap) {
    if let Some(origin) = req.get(header::ORIGIN) {
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        out.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        out.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// `GET /app/{key}/sse`: opens a stream.
pub async fn open(
    State(st): State<Arc<Shared>>,
    Path(key): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
    req: Upgrading,
) -> Response {
    match admit(&st, &key, &pairs, &req) {
        Ok(Admitted::Stream(s)) => respond(&req.headers, stream::spawn(st, *s)),
        Ok(Admitted::Later(code, reason)) => {
            tracing::debug!(code = code.code(), %reason, "sse stream sent elsewhere");
            respond(&req.headers, Body::from(later(code, &reason)))
        }
        Err(e) => e.into_response(),
    }
}

/// What a stream request gets.
enum Admitted {
    /// An open stream, subscribed.
    Stream(Box<stream::Stream>),
    /// Reconnect later: the Pusher close code and why.
    Later(CloseCode, String),
}

fn admit(
    st: &Shared,
    key: &str,
    pairs: &[(String, String)],
    req: &Upgrading,
) -> Result<Admitted, SseError> {
    let app = st
        .app_by_key(key)
        .ok_or_else(|| SseError::UnknownKey(key.to_owned()))?;
    let cfg = st.node.apps().get(app).clone();
    if !cfg.enabled {
        return Err(SseError::AppDisabled);
    }
    // A browser sends `Origin` on a cross-origin EventSource only; a
    // same-origin page and a non-browser consumer send none.
    if req.headers.contains_key(header::ORIGIN) {
        check_origin(st, app, &req.headers).inspect_err(|_| {
            st.stats.edge.origin_refused.fetch_add(1, Ordering::Relaxed);
        })?;
    }
    let last_event_id = req
        .headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok());
    let request = SseRequest::parse(
        pairs,
        last_event_id,
        st.config.sse_max_channels,
        cfg.limits.max_channel_name_length,
    )?;
    let identity = req.identity(st);
    if let Some(id) = &identity {
        id.check(cfg.limits.max_user_id_length)?;
    }
    let user = identity.as_ref().and_then(|i| i.user.as_deref());
    request.authorize(&cfg, user, seconds_now())?;
    if let Some(later) = transient_refusal(st, req) {
        return Ok(later);
    }
    let h = ConnRef::new(
        pushmesh_core::ConnId(st.next_conn.fetch_add(1, Ordering::Relaxed)),
        st.config.outbound_queue,
    );
    match st.node.registry.admit(app, &cfg, &h.0) {
        Ok(()) => {}
        Err(OpenError::AppDisabled) => return Err(SseError::AppDisabled),
        Err(e) => return Ok(Admitted::Later(e.close_code(), e.to_string())),
    }
    let (h, rx) = h;
    let conn = h.id();
    let mut session = Session::sse(Instant::now(), conn, app, cfg, &st.node.socket_id(conn));
    if let Some(id) = identity {
        // Checked above.
        let _ = session.set_identity(id);
    }
    let (positions, resumed, cursor) = request.positions();
    for (name, position) in request.channels.iter().zip(&positions) {
        // The filter was checked when the request was parsed.
        if let Err(e) = session.sse_subscribe(name, request.filter.as_deref(), position.as_deref())
        {
            st.node.registry.remove(app, conn);
            return Err(SseError::Request(e.into()));
        }
    }
    Ok(Admitted::Stream(Box::new(stream::Stream {
        app,
        h,
        rx,
        session,
        writer: StreamWriter::new(cursor, resumed),
    })))
}

/// Why a stream should come back later, if it should: the per-IP rate,
/// a draining node, a node not yet in its cluster (as `/app/{key}`).
fn transient_refusal(st: &Shared, req: &Upgrading) -> Option<Admitted> {
    if !st.ip_limiter.allow(&req.peer.ip(), Instant::now()) {
        st.stats
            .edge
            .ip_rate_limited
            .fetch_add(1, Ordering::Relaxed);
        return Some(Admitted::Later(
            CloseCode::OverCapacity,
            "too many new connections from this address, retry later".into(),
        ));
    }
    if st.draining.load(Ordering::Relaxed) {
        return Some(Admitted::Later(
            CloseCode::ReconnectImmediately,
            "node is draining, reconnect".into(),
        ));
    }
    if !st.node.gate.joined() {
        return Some(Admitted::Later(
            CloseCode::OverCapacity,
            "node is joining its cluster, reconnect shortly".into(),
        ));
    }
    None
}

/// A stream that only says `retry:` and the `pusher:error`, then ends.
fn later(code: CloseCode, reason: &str) -> Bytes {
    let mut out = BytesMut::new();
    StreamWriter::start(&mut out);
    write_event(
        &mut out,
        None,
        "pusher:error",
        &server::error(reason, Some(code.code())),
    );
    out.freeze()
}

/// The 200 answer of a stream with its headers.
fn respond(req: &HeaderMap, body: Body) -> Response {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    cors(req, h);
    resp
}
