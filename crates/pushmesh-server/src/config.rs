//! Configuration: defaults → TOML file → `PUSHMESH_*` environment → flags.
//!
//! Strict: unknown keys in the file are errors, and a file that fails to
//! load stops the node. Unknown `PUSHMESH_*` variables never stop it (see
//! [`env`]): platforms set their own.

mod app_io;
pub mod app_json;
mod check;
mod cli;
mod cluster;
pub mod env;
mod history;
mod resolve;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pushmesh_core::AppConfig;
use pushmesh_protocol::Limits;
use serde::Deserialize;

pub use app_io::{AppIo, AuthorizerConfig, WebhookConfig};
pub use cli::{AdminTarget, AppsCommand, Cli, ClusterCommand, Command};
pub use cluster::ClusterSettings;
use cluster::FileCluster;
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
    sse_max_channels: Option<usize>,
    sse_heartbeat_secs: Option<u64>,
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
    admin_token: Option<String>,
    admin_token_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
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
    /// Token of the admin API (`/admin/*`); none: the API is off (404).
    pub admin_token: Option<String>,
    /// Where the node keeps what must survive a restart (the admin API's
    /// apps); none: the admin API refuses changes (409).
    pub data_dir: Option<PathBuf>,
    /// The configuration file, read again on SIGHUP for its apps; none
    /// when the apps came from `--app` or are the development app.
    pub apps_file: Option<PathBuf>,
    /// `--authorizer-url` / `PUSHMESH_AUTHORIZER_URL`: the wsify app's
    /// authorizer URL, over the file's, at start and on every reload.
    pub authorizer_url: Option<String>,
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
    /// Most channels on one SSE stream (`/app/{key}/sse`).
    pub sse_max_channels: usize,
    /// How often an SSE stream gets its `: ping` comment.
    pub sse_heartbeat: Duration,
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
            admin_token: None,
            data_dir: None,
            apps_file: None,
            authorizer_url: None,
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
            sse_max_channels: 16,
            sse_heartbeat: Duration::from_secs(15),
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
        previous_secret: None,
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
                previous_secret: None,
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
}

#[cfg(test)]
mod tests;
