//! Refusals before a handler runs, in the API's one error shape.
//!
//! Every 4xx the node answers carries `{"error": "..."}` as
//! `application/json`: [`json_errors`] rewrites the ones axum produces by
//! itself (405 on a known route, a path that does not decode, a query that
//! does not parse, a WebSocket request without its headers), keeping their
//! status and their text as the message.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// Longest framework error text kept as the message.
const MAX_TEXT: usize = 4096;

/// Middleware: a 4xx without a JSON body gets one.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !resp.status().is_client_error() || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, MAX_TEXT)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        parts
            .status
            .canonical_reason()
            .unwrap_or("refused")
            .to_lowercase()
    } else {
        text
    };
    tracing::debug!(status = parts.status.as_u16(), %message, "request refused");
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let body = json!({ "error": message }).to_string();
    Response::from_parts(parts, Body::from(body))
}

/// Checks `Sec-WebSocket-Key`: the base64 of 16 bytes (RFC 6455 §4.1);
/// the 400 to answer when it is not. axum only checks that it is there.
pub fn websocket_key_refusal(headers: &HeaderMap) -> Option<Response> {
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    if is_base64_of_16_bytes(key) {
        None
    } else {
        let e = json!({ "error": "Sec-WebSocket-Key must be the base64 encoding of 16 bytes" });
        Some((StatusCode::BAD_REQUEST, Json(e)).into_response())
    }
}

/// 16 bytes are 22 base64 digits and `==`; the last digit carries 2 bits,
/// so in canonical base64 it is one of `A`, `Q`, `g`, `w`.
fn is_base64_of_16_bytes(key: &[u8]) -> bool {
    let digit = |c: &u8| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/';
    key.len() == 24
        && key[..22].iter().all(digit)
        && matches!(key[21], b'A' | b'Q' | b'g' | b'w')
        && &key[22..] == b"=="
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_keys() {
        let with = |k: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::SEC_WEBSOCKET_KEY,
                HeaderValue::from_str(k).unwrap_or_else(|e| panic!("{e}")),
            );
            websocket_key_refusal(&h).is_none()
        };
        assert!(with("dGhlIHNhbXBsZSBub25jZQ=="), "RFC 6455's example");
        assert!(!with(""));
        assert!(!with("not base64!!"));
        assert!(!with("AAAA"), "3 bytes");
        assert!(!with("dGhlIHNhbXBsZSBub25jZQ"), "padding missing");
        assert!(
            !with("dGhlIHNhbXBsZSBub25jZR=="),
            "non-canonical last digit"
        );
        assert!(!with("dGhlIHNhbXBsZSBub25j*Q=="));
        assert!(with("AAAAAAAAAAAAAAAAAAAAAA=="));
    }
}
