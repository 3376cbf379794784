//! The Pusher HTTP API (spec §7): signed requests, JSON errors.
//!
//! Every error maps to its status and a JSON body `{"error": "..."}` in one
//! place, [`ApiError`]'s `IntoResponse`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use pushmesh_core::{
    ChannelInfo, PublishError, PublishRequest, PublishedChannel, QueryError, Refusal, Tags,
};
use pushmesh_protocol::api::{BatchRequest, EventData, InfoFlags, TriggerRequest};
use pushmesh_protocol::sign::ApiAuthError;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::Shared;

mod history;
mod signed;
pub use history::channel_history;
pub(crate) use signed::form_urlencoded;
pub use signed::SignedRequest;

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
    Unavailable(Refusal),
}

impl From<PublishError> for ApiError {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::DataTooLarge(_) => Self::TooLarge(e.to_string()),
            PublishError::Unavailable(r) => Self::Unavailable(r),
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
                let body = json!({ "error": self.to_string(), "reason": reason.as_str() });
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

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// An event's data as its string and its parsed `tags`.
fn data_and_tags(
    data: EventData,
    tags: Option<&RawValue>,
) -> Result<(String, Option<Arc<Tags>>), ApiError> {
    let tags = crate::tags::parse(tags.map(RawValue::get))
        .map_err(|e| ApiError::BadRequest(crate::tags::refusal(&e)))?;
    let data = data
        .into_string()
        .map_err(|e| ApiError::BadRequest(format!("invalid data: {e}")))?;
    Ok((data, tags))
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
    a: SignedRequest,
) -> Result<Json<Value>, ApiError> {
    let req: TriggerRequest = parse_json(&a.body)?;
    let channels = match (req.channels, req.channel) {
        (Some(c), _) => c,
        (None, Some(c)) => vec![c],
        (None, None) => Vec::new(),
    };
    let (data, tags) = data_and_tags(req.data, req.tags.as_deref())?;
    let flags = InfoFlags::parse(req.info.as_deref());
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
    st.apps.count_published(a.app, 1);
    if flags.any() {
        Ok(Json(
            json!({ "channels": published_json(&published, flags) }),
        ))
    } else {
        Ok(Json(json!({})))
    }
}

/// One event of a batch, its data and tags parsed.
struct Batched {
    name: String,
    data: String,
    channels: Vec<String>,
    socket_id: Option<String>,
    flags: InfoFlags,
    tags: Option<Arc<Tags>>,
}

impl Batched {
    fn request(&self) -> PublishRequest<'_> {
        PublishRequest {
            name: &self.name,
            data: &self.data,
            channels: &self.channels,
            exclude_socket: self.socket_id.as_deref(),
        }
    }
}

/// `POST /apps/{app_id}/batch_events`.
pub async fn batch_events(
    State(st): State<Arc<Shared>>,
    a: SignedRequest,
) -> Result<Json<Value>, ApiError> {
    let req: BatchRequest = parse_json(&a.body)?;
    let mut events = Vec::with_capacity(req.batch.len());
    for e in req.batch {
        // The tags are checked before the data, as they always were.
        let (data, tags) = data_and_tags(e.data, e.tags.as_deref())?;
        events.push(Batched {
            name: e.name,
            data,
            channels: vec![e.channel],
            socket_id: e.socket_id,
            flags: InfoFlags::parse(e.info.as_deref()),
            tags,
        });
    }
    let any_info = events.iter().any(|e| e.flags.any());
    let max = st.node.apps().get(a.app).limits.max_batch_events;
    if events.len() > max {
        return Err(PublishError::BatchTooLarge(max).into());
    }
    // Validate all first: a batch is accepted whole or refused whole.
    let valid = events
        .iter()
        .map(|e| st.node.apps().validate_publish(a.app, &e.request()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut results = Vec::with_capacity(events.len());
    for (mut e, names) in events.into_iter().zip(valid) {
        let tags = e.tags.take();
        // A refusal (503) stops the batch: the events before it were
        // delivered, this one and those after it were not.
        let p = st
            .node
            .publish_valid(a.app, names, &e.request(), e.flags.any(), tags)
            .await?;
        results.push((p, e.flags));
    }
    st.stats
        .published
        .fetch_add(results.len() as u64, std::sync::atomic::Ordering::Relaxed);
    st.apps.count_published(a.app, results.len() as u64);
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
    a: SignedRequest,
) -> Result<Json<Value>, ApiError> {
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
    Path((_, channel)): Path<(String, String)>,
    a: SignedRequest,
) -> Result<Json<Value>, ApiError> {
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
    Path((_, channel)): Path<(String, String)>,
    a: SignedRequest,
) -> Result<Json<Value>, ApiError> {
    let users = st.node.channel_users(a.app, &channel).await?;
    let users: Vec<Value> = users.into_iter().map(|id| json!({ "id": id })).collect();
    Ok(Json(json!({ "users": users })))
}

/// `POST /apps/{app_id}/users/{user_id}/terminate_connections`.
pub async fn terminate_connections(
    State(st): State<Arc<Shared>>,
    Path((_, user_id)): Path<(String, String)>,
    a: SignedRequest,
) -> Result<Json<Value>, ApiError> {
    st.node.terminate_user(a.app, &user_id);
    Ok(Json(json!({})))
}

/// `POST /users/{user_id}/terminate_connections`, as the Python SDK sends
/// it (without `/apps/{app_id}`): the app is the one whose key signed the
/// request (`auth_key`).
pub async fn terminate_connections_by_key(
    State(st): State<Arc<Shared>>,
    Path(user_id): Path<String>,
    a: SignedRequest,
) -> Result<Json<Value>, ApiError> {
    st.node.terminate_user(a.app, &user_id);
    Ok(Json(json!({})))
}

/// Any other path.
pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}
