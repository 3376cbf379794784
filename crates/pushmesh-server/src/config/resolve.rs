//! [`Config::resolve`]: flags (with their environment variables, read by
//! clap) over the file over the defaults, in stages: the apps, the node's
//! values, then the checks across values.

use std::time::Duration;

use pushmesh_core::AppConfig;

use super::cluster::resolve_cluster;
use super::{
    check, development_app, generated_node_id, parse_app, AppIo, Cli, Config, ConfigError, FileApp,
    FileConfig,
};

/// The apps and their I/O settings, and which one wsify uses.
struct Apps {
    apps: Vec<AppConfig>,
    app_io: Vec<AppIo>,
    wsify_app: usize,
    /// No app was configured: the development app stands in.
    development: bool,
}

impl Config {
    /// Layers `cli` over `file` over the defaults.
    pub fn resolve(mut file: FileConfig, cli: Cli) -> Result<Self, ConfigError> {
        let apps = resolve_apps(&mut file, &cli)?;
        let cfg = layer(file, cli, apps)?;
        check_values(&cfg)?;
        Ok(cfg)
    }
}

/// An app of the file, its webhook event types checked.
pub(super) fn file_app(a: FileApp) -> Result<(AppConfig, AppIo), ConfigError> {
    for t in a
        .webhooks
        .iter()
        .flat_map(|w| w.event_types.iter().flatten())
    {
        if !pushmesh_protocol::webhook::EVENT_NAMES.contains(&t.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "app {:?}: unknown webhook event type {t:?} (known: {})",
                a.id,
                pushmesh_protocol::webhook::EVENT_NAMES.join(", ")
            )));
        }
    }
    let history = a.history.map(|h| h.resolve(&a.id)).transpose()?;
    let app = AppConfig {
        id: a.id,
        key: a.key,
        secret: a.secret,
        previous_secret: None,
        enabled: a.enabled,
        client_events: a.client_events,
        user_authentication_required: a.user_authentication_required,
        max_connections: a.max_connections,
        subscription_count_events: a.subscription_count_events,
        limits: a.limits,
        webhooks: !a.webhooks.is_empty(),
        wsify_event: a.wsify_event.unwrap_or_else(|| "broadcast".into()),
        history,
    };
    let io = AppIo {
        authorizer: a.authorizer,
        webhooks: a.webhooks,
        allowed_origins: a.allowed_origins,
    };
    Ok((app, io))
}

/// The file's apps, or `--app`'s (they replace them), or the development
/// app; the wsify app and its authorizer URL; checks across apps.
fn resolve_apps(file: &mut FileConfig, cli: &Cli) -> Result<Apps, ConfigError> {
    let (mut apps, mut app_io): (Vec<AppConfig>, Vec<AppIo>) = std::mem::take(&mut file.apps)
        .into_iter()
        .map(file_app)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    if !cli.apps.is_empty() {
        apps = cli
            .apps
            .iter()
            .map(|s| parse_app(s))
            .collect::<Result<_, _>>()?;
        app_io = vec![AppIo::default(); apps.len()];
    }
    let development = apps.is_empty();
    if development {
        apps.push(development_app());
        app_io.push(AppIo::default());
    }
    let wsify_app = match &file.wsify_app {
        None => 0,
        Some(id) => apps.iter().position(|a| &a.id == id).ok_or_else(|| {
            ConfigError::Invalid(format!("wsify_app {id:?} is not a configured app"))
        })?,
    };
    if let Some(url) = cli.authorizer_url.clone().or(file.authorizer_url.take()) {
        app_io[wsify_app].set_authorizer_url(url);
    }
    check::app_values(&apps, &app_io)?;
    Ok(Apps {
        apps,
        app_io,
        wsify_app,
        development,
    })
}

/// Milliseconds, if given, else the default.
fn millis(v: Option<u64>, default: Duration) -> Duration {
    v.map_or(default, Duration::from_millis)
}

/// Seconds, if given, else the default.
fn secs(v: Option<u64>, default: Duration) -> Duration {
    v.map_or(default, Duration::from_secs)
}

/// Both of `tls_cert` and `tls_key`, or neither.
fn tls_pair<T>(cert: Option<T>, key: Option<T>) -> Result<Option<(T, T)>, ConfigError> {
    match (cert, key) {
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (None, None) => Ok(None),
        _ => Err(ConfigError::Invalid(
            "give both tls_cert and tls_key, or neither".into(),
        )),
    }
}

/// Every value: the flag, else the file, else the default.
fn layer(file: FileConfig, cli: Cli, apps: Apps) -> Result<Config, ConfigError> {
    let d = Config::default();
    let cluster = resolve_cluster(&cli, file.cluster.unwrap_or_default())?;
    let node_id = cluster
        .as_ref()
        .map(|c| c.node_id.clone())
        .or(cli.node_id.clone())
        .unwrap_or_else(generated_node_id);
    let broadcasting_key = cli
        .broadcasting_key
        .or(file.broadcasting_key)
        .filter(|k| !k.is_empty());
    let Apps {
        apps,
        app_io,
        wsify_app,
        development,
    } = apps;
    for (i, a) in apps.iter().enumerate() {
        if a.id.is_empty() || a.key.is_empty() || a.secret.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "app #{i} needs a non-empty id, key and secret"
            )));
        }
        if apps[..i].iter().any(|b| b.id == a.id || b.key == a.key) {
            return Err(ConfigError::Invalid(format!(
                "app {:?}: id and key must be unique across apps",
                a.id
            )));
        }
    }
    let admin_token = match (
        cli.admin_token.clone().or(file.admin_token),
        cli.admin_token_file.clone().or(file.admin_token_file),
    ) {
        (Some(t), _) => Some(t),
        (None, Some(path)) => Some(
            std::fs::read_to_string(&path)
                .map_err(|source| ConfigError::Read { path, source })?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    }
    .filter(|t| !t.is_empty());
    if admin_token.as_ref().is_some_and(|t| t.len() < 16) {
        return Err(ConfigError::Invalid(
            "admin_token must be at least 16 characters".into(),
        ));
    }
    let apps_file = if cli.apps.is_empty() && !development {
        cli.config.clone()
    } else {
        None
    };
    Ok(Config {
        admin_token,
        data_dir: cli.data_dir.clone().or(file.data_dir),
        apps_file,
        authorizer_url: cli.authorizer_url.clone(),
        listen: cli.listen.or(file.listen).unwrap_or(d.listen),
        apps,
        app_io,
        wsify_app,
        broadcasting_key,
        webhook_queue: file.webhook_queue.unwrap_or(d.webhook_queue),
        webhook_timeout: millis(file.webhook_timeout_ms, d.webhook_timeout),
        webhook_retry_for: secs(file.webhook_retry_for, d.webhook_retry_for),
        webhook_backoff: millis(file.webhook_backoff_ms, d.webhook_backoff),
        webhook_delay: millis(file.webhook_delay_ms, d.webhook_delay),
        connections_per_ip_per_sec: file
            .connections_per_ip_per_sec
            .unwrap_or(d.connections_per_ip_per_sec),
        api_requests_per_sec: file.api_requests_per_sec.unwrap_or(d.api_requests_per_sec),
        tls: tls_pair(
            cli.tls_cert.clone().or(file.tls_cert),
            cli.tls_key.clone().or(file.tls_key),
        )?,
        metrics_listen: cli.metrics_listen.or(file.metrics_listen),
        dashboard_token: cli
            .dashboard_token
            .or(file.dashboard_token)
            .filter(|t| !t.is_empty()),
        handshake_timeout: millis(file.handshake_timeout_ms, d.handshake_timeout),
        max_pending_handshakes: file
            .max_pending_handshakes
            .unwrap_or(d.max_pending_handshakes),
        max_pending_handshakes_per_ip: cli
            .max_pending_handshakes_per_ip
            .or(file.max_pending_handshakes_per_ip)
            .unwrap_or(d.max_pending_handshakes_per_ip),
        request_body_timeout: millis(
            cli.request_body_timeout_ms.or(file.request_body_timeout_ms),
            d.request_body_timeout,
        ),
        forwarded_header: cli
            .forwarded_header
            .or(file.forwarded_header)
            .unwrap_or(d.forwarded_header),
        max_connections_per_ip: file
            .max_connections_per_ip
            .unwrap_or(d.max_connections_per_ip),
        trusted_proxies: crate::proxy::TrustedProxies(if cli.trusted_proxies.is_empty() {
            file.trusted_proxies.unwrap_or_default()
        } else {
            cli.trusted_proxies
        }),
        proxy_protocol: cli
            .proxy_protocol
            .or(file.proxy_protocol)
            .unwrap_or(d.proxy_protocol),
        identity_headers: file.identity_headers,
        cluster,
        node_id,
        development,
        activity_timeout: secs(
            cli.activity_timeout.or(file.activity_timeout),
            d.activity_timeout,
        ),
        pong_timeout: secs(file.pong_timeout, d.pong_timeout),
        signin_timeout: secs(file.signin_timeout, d.signin_timeout),
        max_connections: cli.max_connections.or(file.max_connections),
        outbound_queue: file.outbound_queue.unwrap_or(d.outbound_queue),
        sse_max_channels: file.sse_max_channels.unwrap_or(d.sse_max_channels),
        sse_heartbeat: secs(file.sse_heartbeat_secs, d.sse_heartbeat),
        router_shards: file.router_shards.unwrap_or(d.router_shards),
        shard_queue: file.shard_queue.unwrap_or(d.shard_queue),
        history_max_bytes: file.history_max_bytes.unwrap_or(d.history_max_bytes),
        max_message_bytes: file.max_message_bytes.unwrap_or(d.max_message_bytes),
        compression: pushmesh_protocol::wire::Compression {
            enabled: cli
                .compression
                .or(file.compression)
                .unwrap_or(d.compression.enabled),
            min_bytes: cli
                .compression_min_bytes
                .or(file.compression_min_bytes)
                .unwrap_or(d.compression.min_bytes),
            level: cli
                .compression_level
                .or(file.compression_level)
                .unwrap_or(d.compression.level),
        },
        max_request_bytes: file.max_request_bytes.unwrap_or(d.max_request_bytes),
        shutdown_timeout: secs(file.shutdown_timeout, d.shutdown_timeout),
        log: cli.log.or(file.log).unwrap_or(d.log),
        log_format: cli.log_format.or(file.log_format).unwrap_or(d.log_format),
    })
}

/// Refuses the configuration with `why` when `bad`.
fn invalid_if(bad: bool, why: &str) -> Result<(), ConfigError> {
    if bad {
        Err(ConfigError::Invalid(why.into()))
    } else {
        Ok(())
    }
}

/// Checks across the resolved values.
fn check_values(cfg: &Config) -> Result<(), ConfigError> {
    invalid_if(
        cfg.activity_timeout.is_zero() || cfg.pong_timeout.is_zero(),
        "activity_timeout and pong_timeout must be at least 1 second",
    )?;
    invalid_if(
        cfg.router_shards == 0 || cfg.shard_queue == 0,
        "router_shards and shard_queue must be at least 1",
    )?;
    invalid_if(
        cfg.handshake_timeout.is_zero(),
        "handshake_timeout_ms must be at least 1",
    )?;
    invalid_if(
        cfg.request_body_timeout.is_zero(),
        "request_body_timeout_ms must be at least 1",
    )?;
    cfg.identity_headers
        .check(!cfg.trusted_proxies.is_empty())?;
    invalid_if(
        cfg.proxy_protocol && cfg.trusted_proxies.is_empty(),
        "proxy_protocol needs trusted_proxies: PROXY headers are read from trusted proxies only",
    )?;
    if !(1..=9).contains(&cfg.compression.level) {
        return Err(ConfigError::Invalid(format!(
            "compression_level must be 1 to 9, not {}",
            cfg.compression.level
        )));
    }
    invalid_if(
        cfg.sse_max_channels == 0 || cfg.sse_heartbeat.is_zero(),
        "sse_max_channels and sse_heartbeat_secs must be at least 1",
    )?;
    invalid_if(cfg.outbound_queue == 0, "outbound_queue must be at least 1")
}
