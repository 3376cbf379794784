//! The WebSocket upgrade: an extractor that checks the request as
//! RFC 6455 §4.2.1 asks, negotiates permessage-deflate, and answers 101.
//! tungstenite derives the accept key; hyper hands over the connection.

use std::future::Future;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hyper_util::rt::TokioIo;
use pushmesh_protocol::wire::{negotiate, Compression};
use serde_json::json;

use super::socket::{Limits, WsSocket};

/// A request to upgrade, checked.
pub struct WsUpgrade {
    key: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
    /// The `Sec-WebSocket-Extensions` answer, when the client offered
    /// permessage-deflate acceptably (whether to use it is decided by
    /// [`WsUpgrade::on_upgrade`]).
    deflate: Option<String>,
}

/// Why a request is not a WebSocket upgrade (axum's texts and statuses).
pub struct WsRefusal(StatusCode, &'static str);

impl IntoResponse for WsRefusal {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

impl<S: Send + Sync> FromRequestParts<S> for WsUpgrade {
    type Rejection = WsRefusal;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, WsRefusal> {
        if parts.method != Method::GET {
            return Err(WsRefusal(
                StatusCode::METHOD_NOT_ALLOWED,
                "Request method must be `GET`",
            ));
        }
        if !header_has(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(WsRefusal(
                StatusCode::BAD_REQUEST,
                "Connection header did not include 'upgrade'",
            ));
        }
        if !header_has(&parts.headers, header::UPGRADE, "websocket") {
            return Err(WsRefusal(
                StatusCode::BAD_REQUEST,
                "`Upgrade` header did not include 'websocket'",
            ));
        }
        if parts
            .headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(WsRefusal(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Version` header did not include '13'",
            ));
        }
        let key = parts
            .headers
            .get(header::SEC_WEBSOCKET_KEY)
            .cloned()
            .ok_or(WsRefusal(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Key` header missing",
            ))?;
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(WsRefusal(
                StatusCode::UPGRADE_REQUIRED,
                "WebSocket request couldn't be upgraded since no upgrade state was present",
            ))?;
        let offers = parts
            .headers
            .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .filter_map(|v| v.to_str().ok());
        let deflate = negotiate(offers).map(|a| a.response);
        Ok(Self {
            key,
            on_upgrade,
            deflate,
        })
    }
}

impl WsUpgrade {
    /// Answers 101 and runs `task` on the upgraded socket. Compression is
    /// used when the client offered it and `compression.enabled`.
    pub fn on_upgrade<F, Fut>(self, compression: Compression, limits: Limits, task: F) -> Response
    where
        F: FnOnce(WsSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let deflate = self.deflate.filter(|_| compression.enabled);
        let accept = tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        let mut resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_ACCEPT, accept);
        if let Some(d) = &deflate {
            resp = resp.header(header::SEC_WEBSOCKET_EXTENSIONS, d.as_str());
        }
        let on_upgrade = self.on_upgrade;
        let compress = deflate.is_some().then_some(compression);
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(io) => task(WsSocket::new(TokioIo::new(io), compress, limits)).await,
                Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
            }
        });
        resp.body(axum::body::Body::empty())
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    }
}
