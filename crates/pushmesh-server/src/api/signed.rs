//! [`SignedRequest`]: the extractor every HTTP API handler takes. It reads
//! the body (bounded), finds the app, checks the signature, that the app is
//! enabled and under its API rate, before the handler runs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::response::{IntoResponse, Response};
use pushmesh_core::AppIdx;
use pushmesh_protocol::sign::{self, ApiAuthError};

use super::ApiError;
use crate::Shared;

/// A request that passed authentication: its app, decoded query and body.
pub struct SignedRequest {
    /// The app whose key signed it.
    pub app: AppIdx,
    /// The query string's pairs, decoded.
    pub query: Vec<(String, String)>,
    /// The body (at most `max_request_bytes`).
    pub body: Bytes,
}

impl SignedRequest {
    /// The first value of a query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        param(&self.query, name)
    }
}

fn param<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

impl FromRequest<Arc<Shared>> for SignedRequest {
    type Rejection = Response;

    async fn from_request(req: Request, st: &Arc<Shared>) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(&mut parts, st)
            .await
            .map_err(IntoResponse::into_response)?;
        let query = form_urlencoded(parts.uri.query().unwrap_or(""));
        let app_id = match params.get("app_id") {
            Some(id) => id.clone(),
            // `POST /users/{user_id}/terminate_connections`, as the Python
            // SDK sends it: the app is the one whose key signed it.
            None => app_id_of_key(st, &query).map_err(IntoResponse::into_response)?,
        };
        let body = axum::body::to_bytes(body, st.config.max_request_bytes)
            .await
            .map_err(|_| {
                ApiError::TooLarge(format!(
                    "request body is larger than {} bytes",
                    st.config.max_request_bytes
                ))
                .into_response()
            })?;
        let app = authenticate(st, &app_id, &parts, &query, &body)
            .map_err(IntoResponse::into_response)?;
        Ok(Self { app, query, body })
    }
}

/// The id of the app named by the query's `auth_key`.
fn app_id_of_key(st: &Shared, query: &[(String, String)]) -> Result<String, ApiError> {
    let key = param(query, "auth_key").ok_or(ApiAuthError::Missing("auth_key"))?;
    let app = st.node.apps().by_key(key).ok_or(ApiAuthError::WrongKey)?;
    Ok(st.node.apps().get(app).id.clone())
}

fn authenticate(
    st: &Shared,
    app_id: &str,
    parts: &axum::http::request::Parts,
    query: &[(String, String)],
    body: &[u8],
) -> Result<AppIdx, ApiError> {
    let apps = &st.node.apps();
    let app = apps
        .by_id(app_id)
        .ok_or_else(|| ApiError::NotFound(format!("no app with id {app_id:?}")))?;
    let c = apps.get(app);
    let now = now_unix();
    c.verify_with(|secret| {
        sign::verify_api_request(
            parts.method.as_str(),
            parts.uri.path(),
            query,
            body,
            &c.key,
            secret,
            now,
        )
    })?;
    if !c.enabled {
        return Err(ApiError::Forbidden(format!("app {app_id:?} is disabled")));
    }
    if !st.api_limiter.allow(&app, Instant::now()) {
        st.stats
            .edge
            .api_rate_limited
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Err(ApiError::TooManyRequests(format!(
            "app {app_id:?} is over its API rate of {} requests per second",
            st.config.api_requests_per_sec
        )));
    }
    Ok(app)
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Decodes a query string. `+` stays `+`: the Pusher SDKs sign values unescaped.
pub(crate) fn form_urlencoded(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_queries() {
        let q = form_urlencoded("a=1&info=user_count%2Csubscription_count&b=&c&d=%zz&e=x+y");
        assert_eq!(q[0], ("a".into(), "1".into()));
        assert_eq!(q[1].1, "user_count,subscription_count");
        assert_eq!(q[2], ("b".into(), "".into()));
        assert_eq!(q[3], ("c".into(), "".into()));
        assert_eq!(q[4].1, "%zz");
        assert_eq!(q[5].1, "x+y");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%41"), "A");
    }
}
