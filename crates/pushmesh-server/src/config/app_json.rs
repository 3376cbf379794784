//! One `[[apps]]` table as JSON, for the admin API (`/admin/apps`): read
//! with the file's own type and checks, so an app made through the API has
//! exactly the settings, names, defaults and limits of one in the file; and
//! written back without its secret. Also the file's apps read again on
//! SIGHUP.

use std::path::Path;

use pushmesh_core::AppConfig;
use serde_json::{json, Map, Value};

use super::{check, resolve::file_app, AppIo, ConfigError, FileApp, FileConfig};

/// What the admin API shows instead of a webhook header's value (which
/// often carries a credential).
pub const REDACTED: &str = "<redacted>";

/// An app from a JSON object of `[[apps]]` fields (`id`, `key`, `secret`
/// included): the same checks as the file's.
pub fn app_from_json(v: Value) -> Result<(AppConfig, AppIo), ConfigError> {
    let app: FileApp =
        serde_json::from_value(v).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    if app.id.is_empty() || app.key.is_empty() || app.secret.is_empty() {
        return Err(ConfigError::Invalid(
            "id, key and secret must not be empty".into(),
        ));
    }
    let (cfg, io) = file_app(app)?;
    check::app_values(std::slice::from_ref(&cfg), std::slice::from_ref(&io))?;
    Ok((cfg, io))
}

/// An app as the admin API shows it: every setting under its `[[apps]]`
/// name, never its secret (nor webhook header values, which often carry
/// credentials).
pub fn app_to_json(cfg: &AppConfig, io: &AppIo) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("id".into(), json!(cfg.id));
    m.insert("key".into(), json!(cfg.key));
    m.insert("enabled".into(), json!(cfg.enabled));
    m.insert("client_events".into(), json!(cfg.client_events));
    m.insert(
        "user_authentication_required".into(),
        json!(cfg.user_authentication_required),
    );
    m.insert("max_connections".into(), json!(cfg.max_connections));
    m.insert(
        "subscription_count_events".into(),
        json!(cfg.subscription_count_events),
    );
    m.insert(
        "limits".into(),
        serde_json::to_value(&cfg.limits).unwrap_or(Value::Null),
    );
    m.insert("wsify_event".into(), json!(cfg.wsify_event));
    m.insert("allowed_origins".into(), json!(io.allowed_origins));
    m.insert(
        "history".into(),
        match &cfg.history {
            Some(h) => json!({
                "channels": h.channels,
                "max_events": h.max_events,
                "ttl_secs": h.ttl.as_secs(),
            }),
            None => Value::Null,
        },
    );
    m.insert(
        "webhooks".into(),
        Value::Array(
            io.webhooks
                .iter()
                .map(|w| {
                    json!({
                        "url": w.url,
                        "event_types": w.event_types,
                        "headers": w.headers.keys().map(|k| (k.clone(), json!(REDACTED))).collect::<Map<_, _>>(),
                        "batch_ms": w.batch_ms,
                    })
                })
                .collect(),
        ),
    );
    m.insert(
        "authorizer".into(),
        match &io.authorizer {
            Some(a) => json!({
                "url": a.url,
                "timeout_ms": a.timeout_ms,
                "max_concurrent": a.max_concurrent,
                "commands": a.commands,
            }),
            None => Value::Null,
        },
    );
    m
}

/// The apps of the configuration file at `path`, read again (SIGHUP),
/// with the file's checks: each app's, and ids and keys unique. The wsify
/// app (`wsify`) gets `authorizer_url` (the flag's), else the file's
/// top-level `authorizer_url`, as at start.
pub fn reload_file_apps(
    path: &Path,
    wsify: &str,
    authorizer_url: Option<&str>,
) -> Result<Vec<(AppConfig, AppIo)>, ConfigError> {
    let mut file = FileConfig::load(path)?;
    let mut apps = std::mem::take(&mut file.apps)
        .into_iter()
        .map(file_app)
        .collect::<Result<Vec<_>, _>>()?;
    for (i, (a, _)) in apps.iter().enumerate() {
        if a.id.is_empty() || a.key.is_empty() || a.secret.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "app {:?}: id, key and secret must not be empty",
                a.id
            )));
        }
        if apps[..i]
            .iter()
            .any(|(b, _)| b.id == a.id || b.key == a.key)
        {
            return Err(ConfigError::Invalid(format!(
                "app {:?}: id and key must be unique across apps",
                a.id
            )));
        }
    }
    let url = authorizer_url
        .map(str::to_owned)
        .or(file.authorizer_url.take());
    if let (Some(url), Some((_, io))) = (url, apps.iter_mut().find(|(a, _)| a.id == wsify)) {
        io.set_authorizer_url(url);
    }
    let (cfgs, ios): (Vec<_>, Vec<_>) = apps.iter().cloned().unzip();
    check::app_values(&cfgs, &ios)?;
    Ok(apps)
}
