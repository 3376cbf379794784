//! The Pusher HTTP API (spec §7): signed requests, JSON errors.
//!
//! Every error maps to its status and a JSON body `{"error": "..."}` in one
//! place, [`ApiError`]'s `IntoResponse`.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use pushmesh_core::{
    AppIdx, ChannelInfo, PublishError, PublishRequest, PublishedChannel, QueryError,
};
use pushmesh_protocol::api::{BatchRequest, InfoFlags, TriggerRequest};
use pushmesh_protocol::sign::{self, ApiAuthError};
use serde_json::{json, Map, Value};

use crate::Shared;

mod history;
pub use history::channel_history;

/// An HTTP API failure.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 401.
    #[error("{0}")]
    Unauthorized(#[from] ApiAuthError),
    /// 403.
    #[error("{0}")]
    Forbidden(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 413.
    #[error("{0}")]
    TooLarge(String),
    /// 429.
    #[error("{0}")]
    TooManyRequests(String),
    /// 503 with `Retry-After`: the node cannot promise delivery now.
    #[error("cannot deliver now ({0}); retry")]
    Unavailable(String),
}

impl From<PublishError> for ApiError {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::DataTooLarge(_) => Self::TooLarge(e.to_string()),
            PublishError::Unavailable(reason) => Self::Unavailable(reason),
            _ => Self::BadRequest(e.to_string()),
        }
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        Self::BadRequest(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(reason) => {
                let body = json!({ "error": self.to_string(), "reason": reason });
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(axum::http::header::RETRY_AFTER, "1")],
                    Json(body),
                )
                    .into_response();
            }
        };
        tracing::debug!(status = status.as_u16(), error = %self, "api request refused");
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A request that passed authentication.
struct Authed {
    app: AppIdx,
    query: Vec<(String, String)>,
    body: Bytes,
}

impl Authed {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

async fn authenticate(
    st: &Shared,
    app_id: &str,
    method: &Method,
    uri: &Uri,
    body: Body,
) -> Result<Authed, ApiError> {
    let body = axum::body::to_bytes(body, st.config.max_request_bytes)
        .await
        .map_err(|_| {
            ApiError::TooLarge(format!(
                "request body is larger than {} bytes",
                st.config.max_request_bytes
            ))
        })?;
    let apps = &st.node.apps;
    let app = apps
        .by_id(app_id)
        .ok_or_else(|| ApiError::NotFound(format!("no app with id {app_id:?}")))?;
    let c = apps.get(app);
    let (key, secret, enabled) = (&c.key, &c.secret, c.enabled);
    let query: Vec<(String, String)> = form_urlencoded(uri.query().unwrap_or(""));
    sign::verify_api_request(
        method.as_str(),
        uri.path(),
        &query,
        &body,
        key,
        secret,
        now_unix(),
    )?;
    if !enabled {
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
    Ok(Authed { app, query, body })
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

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

fn info_json(info: &ChannelInfo, flags: InfoFlags) -> Value {
    let mut m = Map::new();
    if flags.user_count {
        if let Some(n) = info.user_count {
            m.insert("user_count".into(), n.into());
        }
    }
    if flags.subscription_count {
        m.insert("subscription_count".into(), info.subscription_count.into());
    }
    Value::Object(m)
}

fn published_json(channels: &[PublishedChannel], flags: InfoFlags) -> Value {
    let mut m = Map::new();
    for c in channels {
        m.insert(c.name.to_string(), info_json(&c.info, flags));
    }
    Value::Object(m)
}

/// `POST /apps/{app_id}/events`.
pub async fn events(
    State(st): State<Arc<Shared>>,
    Path(app_id): Path<String>,
    method: Method,
    uri: Uri,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let a = authenticate(&st, &app_id, &method, &uri, body).await?;
    let req: TriggerRequest = parse_json(&a.body)?;
    let channels = match (req.channels, req.channel) {
        (Some(c), _) => c,
        (None, Some(c)) => vec![c],
        (None, None) => Vec::new(),
    };
    let data = req
        .data
        .into_string()
        .map_err(|e| ApiError::BadRequest(format!("invalid data: {e}")))?;
    let flags = InfoFlags::parse(req.info.as_deref());
    let tags = crate::tags::parse(req.tags.as_deref().map(serde_json::value::RawValue::get))
        .map_err(|e| ApiError::BadRequest(crate::tags::refusal(&e)))?;
    let published = st
        .node
        .publish(
            a.app,
            &PublishRequest {
                name: &req.name,
                data: &data,
                channels: &channels,
                exclude_socket: req.socket_id.as_deref(),
            },
            flags.any(),
            tags,
        )
        .await?;
    st.stats
        .published
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if flags.any() {
        Ok(Json(
            json!({ "channels": published_json(&published, flags) }),
        ))
    } else {
        Ok(Json(json!({})))
    }
}

/// `POST /apps/{app_id}/batch_events`.
pub async fn batch_events(
    State(st): State<Arc<Shared>>,
    Path(app_id): Path<String>,
    method: Method,
    uri: Uri,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let a = authenticate(&st, &app_id, &method, &uri, body).await?;
    let req: BatchRequest = parse_json(&a.body)?;
    let mut events = Vec::with_capacity(req.batch.len());
    let mut batch_tags = Vec::with_capacity(req.batch.len());
    for e in req.batch {
        batch_tags.push(
            crate::tags::parse(e.tags.as_deref().map(serde_json::value::RawValue::get))
                .map_err(|err| ApiError::BadRequest(crate::tags::refusal(&err)))?,
        );
        let data = e
            .data
            .into_string()
            .map_err(|err| ApiError::BadRequest(format!("invalid data: {err}")))?;
        events.push((
            e.name,
            data,
            vec![e.channel],
            e.socket_id,
            InfoFlags::parse(e.info.as_deref()),
        ));
    }
    let any_info = events.iter().any(|e| e.4.any());
    let max = st.node.apps.get(a.app).limits.max_batch_events;
    if events.len() > max {
        return Err(PublishError::BatchTooLarge(max).into());
    }
    // Validate all first: a batch is accepted whole or refused whole.
    let mut valid = Vec::with_capacity(events.len());
    for (name, data, channels, socket_id, _) in &events {
        valid.push(st.node.apps.validate_publish(
            a.app,
            &PublishRequest {
                name,
                data,
                channels,
                exclude_socket: socket_id.as_deref(),
            },
        )?);
    }
    let mut results = Vec::with_capacity(events.len());
    for (((name, data, channels, socket_id, flags), names), tags) in
        events.iter().zip(valid).zip(batch_tags)
    {
        let req = PublishRequest {
            name,
            data,
            channels,
            exclude_socket: socket_id.as_deref(),
        };
        // A refusal (503) stops the batch: the events before it were
        // delivered, this one and those after it were not.
        let p = st
            .node
            .publish_valid(a.app, names, &req, flags.any(), tags)
            .await?;
        results.push((p, *flags));
    }
    st.stats
        .published
        .fetch_add(results.len() as u64, std::sync::atomic::Ordering::Relaxed);
    if any_info {
        let batch: Vec<Value> = results
            .iter()
            .map(|(p, f)| p.first().map_or(json!({}), |c| info_json(&c.info, *f)))
            .collect();
        Ok(Json(json!({ "batch": batch })))
    } else {
        Ok(Json(json!({})))
    }
}

/// `GET /apps/{app_id}/channels`.
pub async fn channels(
    State(st): State<Arc<Shared>>,
    Path(app_id): Path<String>,
    method: Method,
    uri: Uri,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let a = authenticate(&st, &app_id, &method, &uri, body).await?;
    let flags = InfoFlags::parse(a.param("info"));
    let prefix = a.param("filter_by_prefix");
    let list = st.node.channels(a.app, prefix, flags.user_count).await?;
    let mut m = Map::new();
    for (name, info) in list {
        m.insert(name.to_string(), info_json(&info, flags));
    }
    Ok(Json(json!({ "channels": m })))
}

/// `GET /apps/{app_id}/channels/{channel}`.
pub async fn channel(
    State(st): State<Arc<Shared>>,
    Path((app_id, channel)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let a = authenticate(&st, &app_id, &method, &uri, body).await?;
    let flags = InfoFlags::parse(a.param("info"));
    let info = st.node.channel(a.app, &channel, flags.user_count).await?;
    let mut v = info_json(&info, flags);
    if let Value::Object(m) = &mut v {
        m.insert("occupied".into(), info.occupied.into());
        if flags.cache {
            if let Some((event, data, ttl)) = &info.cache {
                m.insert(
                    "cache".into(),
                    json!({ "event": event, "data": data, "ttl": ttl }),
                );
            }
        }
    }
    Ok(Json(v))
}

/// `GET /apps/{app_id}/channels/{channel}/users`.
pub async fn channel_users(
    State(st): State<Arc<Shared>>,
    Path((app_id, channel)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let a = authenticate(&st, &app_id, &method, &uri, body).await?;
    let users = st.node.channel_users(a.app, &channel).await?;
    let users: Vec<Value> = users.into_iter().map(|id| json!({ "id": id })).collect();
    Ok(Json(json!({ "users": users })))
}

/// `POST /apps/{app_id}/users/{user_id}/terminate_connections`.
pub async fn terminate_connections(
    State(st): State<Arc<Shared>>,
    Path((app_id, user_id)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let a = authenticate(&st, &app_id, &method, &uri, body).await?;
    st.node.terminate_user(a.app, &user_id);
    Ok(Json(json!({})))
}

/// `POST /users/{user_id}/terminate_connections`, as the Python SDK sends
/// it (without `/apps/{app_id}`): the app is the one whose key signed the
/// request (`auth_key`).
pub async fn terminate_connections_by_key(
    State(st): State<Arc<Shared>>,
    Path(user_id): Path<String>,
    method: Method,
    uri: Uri,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let query = form_urlencoded(uri.query().unwrap_or(""));
    let key = query
        .iter()
        .find(|(k, _)| k == "auth_key")
        .map(|(_, v)| v.as_str())
        .ok_or(ApiAuthError::Missing("auth_key"))?;
    let app = st.node.apps.by_key(key).ok_or(ApiAuthError::WrongKey)?;
    let app_id = st.node.apps.get(app).id.clone();
    let a = authenticate(&st, &app_id, &method, &uri, body).await?;
    st.node.terminate_user(a.app, &user_id);
    Ok(Json(json!({})))
}

/// Any other path.
pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
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
