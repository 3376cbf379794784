//! Configuration: defaults → TOML file → `PUSHMESH_*` environment → flags.
//!
//! Strict: unknown keys in the file are errors, and a file that fails to
//! load stops the node. Unknown `PUSHMESH_*` variables never stop it (see
//! [`env`]): platforms set their own.

mod app_io;
mod check;
mod cli;
mod cluster;
pub mod env;
mod history;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pushmesh_core::AppConfig;
use pushmesh_protocol::Limits;
use serde::Deserialize;

pub use app_io::{AppIo, AuthorizerConfig, WebhookConfig};
pub use cli::{Cli, ClusterCommand, Command};
pub use cluster::ClusterSettings;
use cluster::{resolve_cluster, FileCluster};
pub use env::{check_env, EnvReport, KNOWN_ENV};

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for pushmesh.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// File.
        path: PathBuf,
        /// What is wrong.
        source: toml::de::Error,
    },
    /// A bad `--app` value.
    #[error("invalid app {0:?}: expected ID:KEY:SECRET with none of them empty")]
    AppSpec(String),
    /// A value that does not parse; `key` names where it came from.
    #[error("invalid configuration: {key} = {value:?} {why}")]
    Value {
        /// The key (with the app or table it belongs to).
        key: String,
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// `[identity_headers]` cannot be used.
    #[error("invalid configuration: {0}")]
    IdentityHeaders(#[from] crate::identity_headers::IdentityHeadersError),
    /// Something else is inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<SocketAddr>,
    activity_timeout: Option<u64>,
    pong_timeout: Option<u64>,
    signin_timeout: Option<u64>,
    max_connections: Option<usize>,
    outbound_queue: Option<usize>,
    router_shards: Option<usize>,
    shard_queue: Option<usize>,
    history_max_bytes: Option<usize>,
    max_message_bytes: Option<usize>,
    compression: Option<bool>,
    compression_min_bytes: Option<usize>,
    compression_level: Option<u32>,
    max_request_bytes: Option<usize>,
    shutdown_timeout: Option<u64>,
    log: Option<String>,
    log_format: Option<LogFormat>,
    wsify_app: Option<String>,
    authorizer_url: Option<String>,
    broadcasting_key: Option<String>,
    webhook_queue: Option<usize>,
    webhook_timeout_ms: Option<u64>,
    webhook_retry_for: Option<u64>,
    webhook_backoff_ms: Option<u64>,
    webhook_delay_ms: Option<u64>,
    connections_per_ip_per_sec: Option<f64>,
    api_requests_per_sec: Option<f64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    metrics_listen: Option<SocketAddr>,
    dashboard_token: Option<String>,
    handshake_timeout_ms: Option<u64>,
    max_pending_handshakes: Option<usize>,
    max_pending_handshakes_per_ip: Option<usize>,
    request_body_timeout_ms: Option<u64>,
    forwarded_header: Option<crate::forwarded::ForwardedHeader>,
    max_connections_per_ip: Option<usize>,
    trusted_proxies: Option<Vec<crate::proxy::Cidr>>,
    proxy_protocol: Option<bool>,
    #[serde(default)]
    identity_headers: crate::identity_headers::IdentityHeaders,
    #[serde(default)]
    apps: Vec<FileApp>,
    #[serde(default)]
    cluster: Option<FileCluster>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileApp {
    id: String,
    key: String,
    secret: String,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    client_events: bool,
    #[serde(default)]
    user_authentication_required: bool,
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default)]
    subscription_count_events: bool,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    wsify_event: Option<String>,
    #[serde(default)]
    authorizer: Option<AuthorizerConfig>,
    #[serde(default)]
    webhooks: Vec<WebhookConfig>,
    #[serde(default)]
    allowed_origins: Vec<String>,
    #[serde(default)]
    history: Option<history::FileHistory>,
}

fn yes() -> bool {
    true
}

/// The resolved configuration of a node.
#[derive(Debug, Clone)]
pub struct Config {
    /// WebSocket + HTTP API address.
    pub listen: SocketAddr,
    /// Apps served.
    pub apps: Vec<AppConfig>,
    /// Per-app I/O settings, parallel to `apps`.
    pub app_io: Vec<AppIo>,
    /// Index (in `apps`) of the app that carries wsify traffic.
    pub wsify_app: usize,
    /// Key for `POST /broadcast`.
    pub broadcasting_key: Option<String>,
    /// Webhook events queued per URL before the oldest is dropped.
    pub webhook_queue: usize,
    /// Timeout of one webhook request.
    pub webhook_timeout: Duration,
    /// How long an event is retried before it is dropped.
    pub webhook_retry_for: Duration,
    /// First retry delay (doubles, with jitter, up to 30 s).
    pub webhook_backoff: Duration,
    /// How long `channel_vacated` / `member_removed` wait for a return.
    pub webhook_delay: Duration,
    /// New WebSocket connections allowed per client IP per second (burst: twice that); 0: off.
    pub connections_per_ip_per_sec: f64,
    /// HTTP API requests allowed per app per second (burst: twice that); 0: off.
    pub api_requests_per_sec: f64,
    /// TLS certificate and key files.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Separate address for /metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// Token that opens the status page at /dashboard; none: the page is off.
    pub dashboard_token: Option<String>,
    /// Time a connection has, from accept, to be upgraded or send a whole request.
    pub handshake_timeout: Duration,
    /// Connections accepted and not yet established, at most; 0: unlimited.
    pub max_pending_handshakes: usize,
    /// Connections of one client address accepted and not yet established,
    /// at most; more get HTTP 429. 0: unlimited.
    pub max_pending_handshakes_per_ip: usize,
    /// Time a request has, from its headers, to send its whole body (408).
    pub request_body_timeout: Duration,
    /// Which header of a trusted proxy names the client's address.
    pub forwarded_header: crate::forwarded::ForwardedHeader,
    /// Open connections per client IP, at most; 0: unlimited.
    pub max_connections_per_ip: usize,
    /// Proxies whose PROXY headers and `X-Forwarded-For` are believed.
    pub trusted_proxies: crate::proxy::TrustedProxies,
    /// Whether trusted proxies may send a PROXY protocol header.
    pub proxy_protocol: bool,
    /// `[identity_headers]`: identity set by the load balancer (issue #13).
    pub identity_headers: crate::identity_headers::IdentityHeaders,
    /// Clustering, when on.
    pub cluster: Option<ClusterSettings>,
    /// This node's id (also without clustering).
    pub node_id: String,
    /// True when no app was configured and the development app is used.
    pub development: bool,
    /// Announced `activity_timeout`.
    pub activity_timeout: Duration,
    /// How long to wait for a pong after pinging.
    pub pong_timeout: Duration,
    /// How long a connection of an app that requires sign-in has to sign in.
    pub signin_timeout: Duration,
    /// Most connections on the node.
    pub max_connections: Option<usize>,
    /// Frames queued per connection before it counts as too slow (4100).
    pub outbound_queue: usize,
    /// Router shards, each on its own task (default: the number of CPUs).
    pub router_shards: usize,
    /// Commands queued per router shard before senders wait.
    pub shard_queue: usize,
    /// Most bytes of message history the node keeps (oldest evicted).
    pub history_max_bytes: usize,
    /// Largest WebSocket message from a client, in bytes (inflated, when
    /// it came compressed).
    pub max_message_bytes: usize,
    /// permessage-deflate: on or off, smallest message compressed, level.
    pub compression: pushmesh_protocol::wire::Compression,
    /// Largest HTTP API body, in bytes.
    pub max_request_bytes: usize,
    /// How long a graceful shutdown waits for clients to go.
    pub shutdown_timeout: Duration,
    /// Log filter.
    pub log: String,
    /// Log format.
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 6001)),
            apps: vec![development_app()],
            app_io: vec![AppIo::default()],
            wsify_app: 0,
            broadcasting_key: None,
            webhook_queue: 10_000,
            webhook_timeout: Duration::from_secs(5),
            webhook_retry_for: Duration::from_secs(300),
            webhook_backoff: Duration::from_millis(500),
            webhook_delay: Duration::from_secs(3),
            connections_per_ip_per_sec: 100.0,
            api_requests_per_sec: 0.0,
            tls: None,
            metrics_listen: None,
            dashboard_token: None,
            handshake_timeout: Duration::from_secs(10),
            max_pending_handshakes: 1024,
            max_pending_handshakes_per_ip: 128,
            request_body_timeout: Duration::from_secs(10),
            forwarded_header: crate::forwarded::ForwardedHeader::XForwardedFor,
            max_connections_per_ip: 0,
            trusted_proxies: crate::proxy::TrustedProxies::default(),
            proxy_protocol: false,
            identity_headers: crate::identity_headers::IdentityHeaders::default(),
            cluster: None,
            node_id: generated_node_id(),
            development: true,
            activity_timeout: Duration::from_secs(120),
            pong_timeout: Duration::from_secs(30),
            signin_timeout: Duration::from_secs(30),
            max_connections: None,
            outbound_queue: 1024,
            router_shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            shard_queue: 4096,
            history_max_bytes: pushmesh_core::history::MAX_BYTES,
            max_message_bytes: 64 * 1024,
            compression: pushmesh_protocol::wire::Compression::default(),
            max_request_bytes: 1024 * 1024,
            shutdown_timeout: Duration::from_secs(10),
            log: "info".into(),
            log_format: LogFormat::Text,
        }
    }
}

fn generated_node_id() -> String {
    format!("node-{:08x}", rand::random::<u32>())
}

/// The app used when none is configured. Never use it in production.
pub fn development_app() -> AppConfig {
    AppConfig {
        id: "app-id".into(),
        key: "app-key".into(),
        secret: "app-secret".into(),
        enabled: true,
        client_events: true,
        user_authentication_required: false,
        max_connections: None,
        subscription_count_events: true,
        limits: Limits::default(),
        webhooks: false,
        wsify_event: "broadcast".into(),
        history: None,
    }
}

fn parse_app(spec: &str) -> Result<AppConfig, ConfigError> {
    let mut parts = spec.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(id), Some(key), Some(secret))
            if !id.is_empty() && !key.is_empty() && !secret.is_empty() =>
        {
            Ok(AppConfig {
                id: id.into(),
                key: key.into(),
                secret: secret.into(),
                ..development_app()
            })
        }
        _ => Err(ConfigError::AppSpec(spec.into())),
    }
}

impl FileConfig {
    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}

impl Config {
    /// Resolves flags (with their environment variables) over an optional file.
    /// Unknown `PUSHMESH_*` variables are not checked here: see [`check_env`].
    pub fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        Self::resolve(file, cli)
    }

    /// Layers `cli` over `file` over the defaults.
    pub fn resolve(file: FileConfig, cli: Cli) -> Result<Self, ConfigError> {
        let d = Config::default();
        let secs = Duration::from_secs;
        let mut apps: Vec<AppConfig> = Vec::new();
        let mut app_io: Vec<AppIo> = Vec::new();
        for a in file.apps {
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
            apps.push(AppConfig {
                id: a.id,
                key: a.key,
                secret: a.secret,
                enabled: a.enabled,
                client_events: a.client_events,
                user_authentication_required: a.user_authentication_required,
                max_connections: a.max_connections,
                subscription_count_events: a.subscription_count_events,
                limits: a.limits,
                webhooks: !a.webhooks.is_empty(),
                wsify_event: a.wsify_event.unwrap_or_else(|| "broadcast".into()),
                history,
            });
            app_io.push(AppIo {
                authorizer: a.authorizer,
                webhooks: a.webhooks,
                allowed_origins: a.allowed_origins,
            });
        }
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
        if let Some(url) = cli.authorizer_url.clone().or(file.authorizer_url) {
            let io = &mut app_io[wsify_app];
            match &mut io.authorizer {
                Some(a) => a.url = url,
                None => io.authorizer = Some(AuthorizerConfig::with_url(url)),
            }
        }
        check::app_values(&apps, &app_io)?;
        for (a, io) in apps.iter().zip(&app_io) {
            if let Some(z) = &io.authorizer {
                for c in &z.commands {
                    if !app_io::all_commands().contains(c) {
                        return Err(ConfigError::Invalid(format!(
                            "app {:?}: unknown authorizer command {c:?}",
                            a.id
                        )));
                    }
                }
            }
        }
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
        let cfg = Config {
            listen: cli.listen.or(file.listen).unwrap_or(d.listen),
            apps,
            app_io,
            wsify_app,
            broadcasting_key,
            webhook_queue: file.webhook_queue.unwrap_or(d.webhook_queue),
            webhook_timeout: file
                .webhook_timeout_ms
                .map_or(d.webhook_timeout, Duration::from_millis),
            webhook_retry_for: file.webhook_retry_for.map_or(d.webhook_retry_for, secs),
            webhook_backoff: file
                .webhook_backoff_ms
                .map_or(d.webhook_backoff, Duration::from_millis),
            webhook_delay: file
                .webhook_delay_ms
                .map_or(d.webhook_delay, Duration::from_millis),
            connections_per_ip_per_sec: file
                .connections_per_ip_per_sec
                .unwrap_or(d.connections_per_ip_per_sec),
            api_requests_per_sec: file.api_requests_per_sec.unwrap_or(d.api_requests_per_sec),
            tls: match (
                cli.tls_cert.clone().or(file.tls_cert),
                cli.tls_key.clone().or(file.tls_key),
            ) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => {
                    return Err(ConfigError::Invalid(
                        "give both tls_cert and tls_key, or neither".into(),
                    ))
                }
            },
            metrics_listen: cli.metrics_listen.or(file.metrics_listen),
            dashboard_token: cli
                .dashboard_token
                .or(file.dashboard_token)
                .filter(|t| !t.is_empty()),
            handshake_timeout: file
                .handshake_timeout_ms
                .map_or(d.handshake_timeout, Duration::from_millis),
            max_pending_handshakes: file
                .max_pending_handshakes
                .unwrap_or(d.max_pending_handshakes),
            max_pending_handshakes_per_ip: cli
                .max_pending_handshakes_per_ip
                .or(file.max_pending_handshakes_per_ip)
                .unwrap_or(d.max_pending_handshakes_per_ip),
            request_body_timeout: cli
                .request_body_timeout_ms
                .or(file.request_body_timeout_ms)
                .map_or(d.request_body_timeout, Duration::from_millis),
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
            activity_timeout: cli
                .activity_timeout
                .or(file.activity_timeout)
                .map_or(d.activity_timeout, secs),
            pong_timeout: file.pong_timeout.map_or(d.pong_timeout, secs),
            signin_timeout: file.signin_timeout.map_or(d.signin_timeout, secs),
            max_connections: cli.max_connections.or(file.max_connections),
            outbound_queue: file.outbound_queue.unwrap_or(d.outbound_queue),
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
            shutdown_timeout: file.shutdown_timeout.map_or(d.shutdown_timeout, secs),
            log: cli.log.or(file.log).unwrap_or(d.log),
            log_format: cli.log_format.or(file.log_format).unwrap_or(d.log_format),
        };
        if cfg.activity_timeout.is_zero() || cfg.pong_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "activity_timeout and pong_timeout must be at least 1 second".into(),
            ));
        }
        if cfg.router_shards == 0 || cfg.shard_queue == 0 {
            return Err(ConfigError::Invalid(
                "router_shards and shard_queue must be at least 1".into(),
            ));
        }
        if cfg.handshake_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "handshake_timeout_ms must be at least 1".into(),
            ));
        }
        if cfg.request_body_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "request_body_timeout_ms must be at least 1".into(),
            ));
        }
        cfg.identity_headers
            .check(!cfg.trusted_proxies.is_empty())?;
        if cfg.proxy_protocol && cfg.trusted_proxies.is_empty() {
            return Err(ConfigError::Invalid(
                "proxy_protocol needs trusted_proxies: PROXY headers are read from trusted proxies only".into(),
            ));
        }
        if !(1..=9).contains(&cfg.compression.level) {
            return Err(ConfigError::Invalid(format!(
                "compression_level must be 1 to 9, not {}",
                cfg.compression.level
            )));
        }
        if cfg.outbound_queue == 0 {
            return Err(ConfigError::Invalid(
                "outbound_queue must be at least 1".into(),
            ));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests;
