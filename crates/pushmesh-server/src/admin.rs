//! The admin API (`/admin/apps…`, docs/operations.md "Apps at runtime"):
//! on only when `admin_token` is set (else every `/admin` path is 404),
//! `Authorization: Bearer <token>` compared in constant time, failures
//! limited per client address (429 with `Retry-After` once over) and
//! counted. Writes go to this node's registry, are made durable in
//! `data_dir` before they are answered, then sent to every peer; without a
//! `data_dir` writes are refused (409). No response or log line carries a
//! secret, except the answers that create one (`POST /admin/apps`, `POST
//! …/secret`).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use pushmesh_core::app_registry::{AdminApp, RegistryError};
use serde_json::{json, Map, Value};

use crate::apps::{self, admin_app_config, now_ms, Source};
use crate::config::app_json::{app_from_json, app_to_json, REDACTED};
use crate::operator_token::{self, Checked};
use crate::Shared;

/// `pushmesh_admin_requests_total{outcome}` labels, in counter order.
pub const OUTCOMES: [&str; 7] = [
    "ok",
    "unauthorized",
    "rate_limited",
    "invalid",
    "not_found",
    "conflict",
    "error",
];

/// Default grace of a rotated secret.
const GRACE_SECS: u64 = 3600;
/// Length of a generated secret.
const SECRET_LEN: usize = 40;

/// An admin API answer that is not a success.
struct Refused(StatusCode, String);

impl Refused {
    fn outcome(&self) -> usize {
        match self.0 {
            StatusCode::UNAUTHORIZED => 1,
            StatusCode::TOO_MANY_REQUESTS => 2,
            StatusCode::BAD_REQUEST => 3,
            StatusCode::NOT_FOUND => 4,
            StatusCode::CONFLICT => 5,
            _ => 6,
        }
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        r
    }
}

type Answer = Result<(StatusCode, Value), Refused>;

fn bad(msg: impl Into<String>) -> Refused {
    Refused(StatusCode::BAD_REQUEST, msg.into())
}

fn conflict(msg: impl Into<String>) -> Refused {
    Refused(StatusCode::CONFLICT, msg.into())
}

fn not_found(id: &str) -> Refused {
    Refused(StatusCode::NOT_FOUND, format!("no app with id {id:?}"))
}

/// Checks the bearer token, limiting failures per client address.
fn authorize(st: &Shared, headers: &HeaderMap, ip: std::net::IpAddr) -> Result<(), Refused> {
    let Some(token) = &st.config.admin_token else {
        return Err(Refused(
            StatusCode::NOT_FOUND,
            "the admin API is off (set admin_token)".into(),
        ));
    };
    match operator_token::check(
        &st.admin_failures,
        ip,
        operator_token::bearer(headers),
        token,
    ) {
        Checked::Accepted => Ok(()),
        Checked::Limited => Err(Refused(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed admin requests from this address".into(),
        )),
        Checked::Missing | Checked::Wrong => Err(Refused(
            StatusCode::UNAUTHORIZED,
            "missing or wrong Authorization: Bearer token".into(),
        )),
    }
}

/// Runs an authorized request and counts its outcome.
async fn run<F>(st: &Shared, headers: &HeaderMap, peer: SocketAddr, f: F) -> Response
where
    F: std::future::Future<Output = Answer>,
{
    let answer = match authorize(st, headers, peer.ip()) {
        Ok(()) => f.await,
        Err(e) => Err(e),
    };
    let i = match &answer {
        Ok(_) => 0,
        Err(e) => e.outcome(),
    };
    st.apps.requests[i].fetch_add(1, Ordering::Relaxed);
    match answer {
        Ok((status, Value::Null)) => status.into_response(),
        Ok((status, body)) => (status, Json(body)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// An app of the node as JSON (no secret), with its source.
fn app_json(st: &Shared, id: &str) -> Option<Value> {
    let apps = st.node.apps();
    Some(slot_json(st, &apps, apps.by_id(id)?))
}

/// The app in slot `i` of `apps` as JSON, with its source.
fn slot_json(st: &Shared, apps: &pushmesh_core::Apps, i: pushmesh_core::AppIdx) -> Value {
    let (io, source) = st.apps.io(i);
    let mut m = app_to_json(apps.get(i), &io);
    m.insert("source".into(), json!(source.as_str()));
    Value::Object(m)
}

/// `GET /admin/apps`.
pub async fn list(
    State(st): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let st2 = st.clone();
    run(&st, &headers, peer, async move {
        let apps = st2.node.apps();
        let mut list: Vec<Value> = apps
            .iter()
            .map(|(i, _)| slot_json(&st2, &apps, i))
            .collect();
        list.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        Ok((StatusCode::OK, json!({ "apps": list })))
    })
    .await
}

/// `GET /admin/apps/{id}`.
pub async fn get(
    State(st): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let st2 = st.clone();
    run(&st, &headers, peer, async move {
        app_json(&st2, &id)
            .map(|v| (StatusCode::OK, v))
            .ok_or_else(|| not_found(&id))
    })
    .await
}

/// `GET /admin/apps/{id}/stats`: summed over the cluster's live nodes.
pub async fn stats(
    State(st): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let st2 = st.clone();
    run(&st, &headers, peer, async move {
        if st2.node.apps().by_id(&id).is_none() {
            return Err(not_found(&id));
        }
        let stats = apps::stats::cluster(&st2, Some(&id)).await;
        let (s, nodes) = (stats.sum(&id), stats.nodes());
        Ok((
            StatusCode::OK,
            json!({
                "connections": s.connections,
                "channels": s.channels,
                "subscriptions": s.subscriptions,
                "messages_published": s.messages_published,
                "messages_delivered": s.messages_delivered,
                "bytes_sent": s.bytes_sent,
                "webhooks_sent": s.webhooks_sent,
                "nodes": nodes,
            }),
        ))
    })
    .await
}

/// The body as a JSON object.
fn object(body: &[u8]) -> Result<Map<String, Value>, Refused> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(bad("the body must be a JSON object")),
        Err(e) => Err(bad(format!("invalid JSON: {e}"))),
    }
}

/// Checks an admin app's settings (with the file's rules) and splits them
/// into the record's parts.
fn admin_app(
    mut m: Map<String, Value>,
    previous: Option<(String, u64)>,
) -> Result<AdminApp, Refused> {
    // wsify connections belong to the wsify app (`wsify_app`, an app of the
    // configuration file): an authorizer on another app would never be
    // called, so it is refused rather than silently kept.
    if m.get("authorizer").is_some_and(|v| !v.is_null()) {
        return Err(bad(
            "authorizer: only the wsify app (wsify_app, an app of the configuration file) calls an authorizer",
        ));
    }
    m.remove("authorizer");
    if let Some(Value::Array(hooks)) = m.get("webhooks") {
        for (i, w) in hooks.iter().enumerate() {
            if let Some((name, _)) = w
                .get("headers")
                .and_then(Value::as_object)
                .and_then(|h| h.iter().find(|(_, v)| v.as_str() == Some(REDACTED)))
            {
                return Err(bad(format!(
                    "webhooks[{i}].headers.{name}: give the header's value (the API shows it as {REDACTED:?})"
                )));
            }
        }
    }
    m.remove("source");
    app_from_json(Value::Object(m.clone())).map_err(|e| bad(e.to_string()))?;
    let key = m
        .remove("key")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let secret = m
        .remove("secret")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    m.remove("id");
    Ok(AdminApp {
        key,
        secret,
        previous_secret: previous,
        settings: Value::Object(m).to_string(),
    })
}

/// Writes a record (durably, then to the peers, then served here).
async fn write(st: &Shared, id: &str, app: Option<AdminApp>) -> Result<(), Refused> {
    let record = crate::node::lock(&st.apps.registry).write(now_ms(), id, app);
    apps::persist(st, vec![record.clone()]).await.map_err(|e| {
        tracing::error!(error = %e, "cannot persist the apps");
        Refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot persist the change".into(),
        )
    })?;
    apps::broadcast(st, vec![record]);
    apps::rebuild(st).await;
    Ok(())
}

fn writable(st: &Shared) -> Result<(), Refused> {
    if st.apps.store.is_none() {
        return Err(conflict(
            "this node has no data_dir: apps made through the admin API would not survive a restart, so changes are refused (set data_dir, --data-dir or PUSHMESH_DATA_DIR)",
        ));
    }
    Ok(())
}

fn registry_refusal(e: RegistryError) -> Refused {
    match e {
        RegistryError::NotFound(id) => not_found(&id),
        e => conflict(e.to_string()),
    }
}

/// A config app cannot change through the API.
fn not_config(st: &Shared, id: &str) -> Result<(), Refused> {
    let apps = st.node.apps();
    match apps.by_id(id) {
        Some(i) if st.apps.io(i).1 == Source::Config => Err(conflict(format!(
            "app {id:?} comes from the configuration file: change it there (SIGHUP reloads it)"
        ))),
        _ => Ok(()),
    }
}

fn generated_secret() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), SECRET_LEN)
}

/// `POST /admin/apps`: 201 with the app and its secret.
pub async fn create(
    State(st): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let st2 = st.clone();
    run(&st, &headers, peer, async move {
        writable(&st2)?;
        let mut m = object(&body)?;
        let id = match m.get("id") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(bad("id: required, a non-empty string")),
        };
        let key = match m.get("key") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(bad("key: required, a non-empty string")),
        };
        match m.get("secret") {
            None | Some(Value::Null) => {
                m.insert("secret".into(), json!(generated_secret()));
            }
            Some(Value::String(s)) if !s.is_empty() => {}
            _ => return Err(bad("secret: a non-empty string")),
        }
        let app = admin_app(m, None)?;
        let secret = app.secret.clone();
        let _changing = st2.apps.changing.lock().await;
        crate::node::lock(&st2.apps.registry)
            .check_new(&id, &key)
            .map_err(registry_refusal)?;
        write(&st2, &id, Some(app)).await?;
        tracing::info!(app = %id, key = %key, "app created through the admin API");
        let mut v = app_json(&st2, &id).unwrap_or_else(|| json!({ "id": id }));
        v["secret"] = json!(secret);
        Ok((StatusCode::CREATED, v))
    })
    .await
}

/// `PATCH /admin/apps/{id}`: 200 with the merged app.
pub async fn update(
    State(st): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let st2 = st.clone();
    run(&st, &headers, peer, async move {
        not_config(&st2, &id)?;
        let patch = object(&body)?;
        if patch
            .get("id")
            .is_some_and(|v| v.as_str() != Some(id.as_str()))
        {
            return Err(bad("id: cannot change (delete the app and create another)"));
        }
        writable(&st2)?;
        let _changing = st2.apps.changing.lock().await;
        let old = crate::node::lock(&st2.apps.registry)
            .get(&id)
            .cloned()
            .ok_or_else(|| not_found(&id))?;
        let (cfg, _) = admin_app_config(&id, &old).ok_or_else(|| {
            Refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "stored app unusable".into(),
            )
        })?;
        let mut m: Map<String, Value> = serde_json::from_str(&old.settings).unwrap_or_default();
        m.insert("id".into(), json!(id));
        m.insert("key".into(), json!(cfg.key));
        m.insert("secret".into(), json!(old.secret));
        for (k, v) in patch {
            m.insert(k, v);
        }
        let app = admin_app(m, old.previous_secret.clone())?;
        crate::node::lock(&st2.apps.registry)
            .check_key(&id, &app.key)
            .map_err(registry_refusal)?;
        write(&st2, &id, Some(app)).await?;
        tracing::info!(app = %id, "app changed through the admin API");
        app_json(&st2, &id)
            .map(|v| (StatusCode::OK, v))
            .ok_or_else(|| {
                conflict(format!(
                    "app {id:?} does not serve: another app holds its key"
                ))
            })
    })
    .await
}

/// `DELETE /admin/apps/{id}`: 204; its connections close with 4001.
pub async fn delete(
    State(st): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let st2 = st.clone();
    run(&st, &headers, peer, async move {
        not_config(&st2, &id)?;
        writable(&st2)?;
        let _changing = st2.apps.changing.lock().await;
        if crate::node::lock(&st2.apps.registry).get(&id).is_none() {
            return Err(not_found(&id));
        }
        write(&st2, &id, None).await?;
        tracing::info!(app = %id, "app deleted through the admin API");
        Ok((StatusCode::NO_CONTENT, Value::Null))
    })
    .await
}

/// `POST /admin/apps/{id}/secret`: a new secret; the old one stays valid
/// for `grace_secs` (default 3600).
pub async fn rotate(
    State(st): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let st2 = st.clone();
    run(&st, &headers, peer, async move {
        not_config(&st2, &id)?;
        let grace = if body.iter().all(u8::is_ascii_whitespace) {
            GRACE_SECS
        } else {
            match object(&body)?.get("grace_secs") {
                None => GRACE_SECS,
                Some(v) => v
                    .as_u64()
                    .filter(|g| *g <= 30 * 86_400)
                    .ok_or_else(|| bad("grace_secs: a whole number of seconds, at most 2592000"))?,
            }
        };
        writable(&st2)?;
        let _changing = st2.apps.changing.lock().await;
        let mut app = crate::node::lock(&st2.apps.registry)
            .get(&id)
            .cloned()
            .ok_or_else(|| not_found(&id))?;
        let secret = generated_secret();
        let old = std::mem::replace(&mut app.secret, secret.clone());
        app.previous_secret = (grace > 0).then(|| (old, now_ms() + grace * 1000));
        write(&st2, &id, Some(app)).await?;
        tracing::info!(app = %id, grace_secs = grace, "app secret rotated through the admin API");
        Ok((StatusCode::OK, json!({ "secret": secret })))
    })
    .await
}

/// Any other `/admin` path: 404 (JSON) when the API is on or off.
pub async fn fallback() -> Response {
    Refused(StatusCode::NOT_FOUND, "no such admin endpoint".into()).into_response()
}
