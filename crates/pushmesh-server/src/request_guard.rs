//! Checks on a request before the router sees it: WebSocket upgrades on a
//! draining node, and the deadline of a request's body.
//!
//! A draining node answers a new upgrade on `/app/{key}` or `/ws` with
//! HTTP 503, `Retry-After` and a JSON body: a failed handshake, which
//! clients retry with a backoff (pusher-js does), where a 4200 close would
//! ask them to reconnect at once, to the same node behind a balancer that
//! has not noticed yet. Clients already connected still get 4200 when the
//! drain closes them. A clustered node that has not joined yet answers a
//! `/ws` upgrade the same way (`reason: "joining"`, `Retry-After: 1`): it
//! cannot promise its subscribers what is published elsewhere. On
//! `/app/{key}` it takes the upgrade and closes with 4100 instead (see
//! `ws.rs`): pusher-js answers a 41xx close by reconnecting after 1 s,
//! where after a failed handshake it waits 15 s or more, far longer than
//! joining takes.
//!
//! A request body must arrive whole within `request_body_timeout_ms` of the
//! request's headers, or the request is answered 408 and the connection
//! closed: a keep-alive connection cannot be held open by a body that
//! trickles in. Bodies are buffered here, up to `max_request_bytes` (413
//! beyond), so the handlers get them complete.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde_json::json;

use crate::Shared;

/// Seconds a client refused by a draining node should wait.
pub const DRAINING_RETRY_AFTER: u32 = 5;

/// Seconds a client refused by a node still joining its cluster should
/// wait (joining takes about a second on a healthy cluster).
pub const JOINING_RETRY_AFTER: u32 = 1;

/// Counters of the checks.
#[derive(Debug, Default)]
pub struct GuardCounters {
    /// Upgrades answered 503 because the node is draining.
    pub upgrades_refused_draining: AtomicU64,
    /// Upgrades refused because the node has not joined its cluster (`/ws`:
    /// HTTP 503; `/app/{key}`: a 4100 close).
    pub upgrades_refused_joining: AtomicU64,
    /// Requests answered 408: the body was not complete in time.
    pub body_timeouts: AtomicU64,
}

/// Whether a request asks for a WebSocket upgrade.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Whether the request has a body to read.
fn has_body<B>(req: &Request<B>) -> bool {
    let h = req.headers();
    h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

fn refused(status: StatusCode, body: serde_json::Value, close: bool) -> Response {
    let mut resp = (status, Json(body)).into_response();
    if close {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The request, its body complete, for the router; or the answer.
pub async fn check(st: &Arc<Shared>, req: Request<Incoming>) -> Result<Request<Body>, Response> {
    let counters = &st.edge.guard;
    if is_upgrade(&req) {
        let path = req.uri().path();
        let client_path = path.starts_with("/app/") || path == "/ws";
        let refusal = if !client_path {
            None
        } else if st.draining.load(Ordering::Relaxed) {
            Some((
                &counters.upgrades_refused_draining,
                "node is draining, connect again later",
                "draining",
                DRAINING_RETRY_AFTER,
            ))
        } else if !st.node.gate.joined() && path == "/ws" {
            Some((
                &counters.upgrades_refused_joining,
                "node is joining its cluster, connect again shortly",
                "joining",
                JOINING_RETRY_AFTER,
            ))
        } else {
            None
        };
        if let Some((counter, error, reason, retry_after)) = refusal {
            counter.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(path, reason, "upgrade refused");
            let mut resp = refused(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "error": error, "reason": reason }),
                true,
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            return Err(resp);
        }
    }
    if !has_body(&req) {
        return Ok(req.map(Body::new));
    }
    let limit = st.config.max_request_bytes;
    let (parts, body) = req.into_parts();
    let read = Limited::new(body, limit).collect();
    match tokio::time::timeout(st.config.request_body_timeout, read).await {
        Ok(Ok(collected)) => Ok(Request::from_parts(parts, Body::from(collected.to_bytes()))),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({ "error": format!("request body is larger than {limit} bytes") }),
            true,
        )),
        Ok(Err(e)) => Err(refused(
            StatusCode::BAD_REQUEST,
            json!({ "error": format!("request body could not be read: {e}") }),
            true,
        )),
        Err(_) => {
            counters.body_timeouts.fetch_add(1, Ordering::Relaxed);
            let ms = st.config.request_body_timeout.as_millis();
            Err(refused(
                StatusCode::REQUEST_TIMEOUT,
                json!({ "error": format!("request body not complete within {ms} ms") }),
                true,
            ))
        }
    }
}
