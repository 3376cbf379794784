//! Configuration: defaults → TOML file → `PUSHMESH_*` environment → flags.
//!
//! Strict: unknown keys in the file and unknown `PUSHMESH_*` variables are
//! errors, and a file that fails to load stops the node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use pushmesh_core::AppConfig;
use pushmesh_protocol::Limits;
use serde::Deserialize;

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
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An unknown `PUSHMESH_*` environment variable.
    #[error("unknown environment variable {0} (known: {known})", known = KNOWN_ENV.join(", "))]
    UnknownEnv(String),
    /// A bad `--app` value.
    #[error("invalid app {0:?}: expected ID:KEY:SECRET with none of them empty")]
    AppSpec(String),
    /// Something else is inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Environment variables the node reads; any other `PUSHMESH_*` is an error.
pub const KNOWN_ENV: &[&str] = &[
    "PUSHMESH_CONFIG",
    "PUSHMESH_LISTEN",
    "PUSHMESH_APPS",
    "PUSHMESH_ACTIVITY_TIMEOUT",
    "PUSHMESH_MAX_CONNECTIONS",
    "PUSHMESH_LOG",
    "PUSHMESH_LOG_FORMAT",
];

/// Command-line flags; each also reads its `PUSHMESH_*` variable.
#[derive(Debug, Parser)]
#[command(
    name = "pushmesh",
    version,
    about = "A self-hosted, clustered Pusher Channels (protocol 7) server.",
    long_about = "A self-hosted, clustered Pusher Channels (protocol 7) server.\n\n\
        With no arguments it runs one node on 0.0.0.0:6001 with a development app \
        and prints its credentials.\n\nPrecedence: defaults < --config file < PUSHMESH_* \
        environment < flags. See docs/configuration.md."
)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "PUSHMESH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address for WebSocket clients and the HTTP API [default: 0.0.0.0:6001].
    #[arg(long, env = "PUSHMESH_LISTEN", value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// An app as ID:KEY:SECRET; repeatable; replaces the development app.
    /// In the environment: comma-separated.
    #[arg(
        long = "app",
        env = "PUSHMESH_APPS",
        value_name = "ID:KEY:SECRET",
        value_delimiter = ','
    )]
    pub apps: Vec<String>,
    /// Seconds of client silence before the server pings it [default: 120].
    #[arg(long, env = "PUSHMESH_ACTIVITY_TIMEOUT", value_name = "SECS")]
    pub activity_timeout: Option<u64>,
    /// Most WebSocket connections on this node [default: unlimited].
    #[arg(long, env = "PUSHMESH_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Log filter, `RUST_LOG` syntax [default: info].
    #[arg(long, env = "PUSHMESH_LOG", value_name = "FILTER")]
    pub log: Option<String>,
    /// Log format [default: text].
    #[arg(long, env = "PUSHMESH_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
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
    max_message_bytes: Option<usize>,
    max_request_bytes: Option<usize>,
    shutdown_timeout: Option<u64>,
    log: Option<String>,
    log_format: Option<LogFormat>,
    #[serde(default)]
    apps: Vec<FileApp>,
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
    /// Largest WebSocket message from a client, in bytes.
    pub max_message_bytes: usize,
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
            development: true,
            activity_timeout: Duration::from_secs(120),
            pong_timeout: Duration::from_secs(30),
            signin_timeout: Duration::from_secs(30),
            max_connections: None,
            outbound_queue: 1024,
            max_message_bytes: 64 * 1024,
            max_request_bytes: 1024 * 1024,
            shutdown_timeout: Duration::from_secs(10),
            log: "info".into(),
            log_format: LogFormat::Text,
        }
    }
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
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.into(),
            message,
        })
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

impl Config {
    /// Resolves flags (with their environment variables) over an optional file.
    pub fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        check_env(std::env::vars().map(|(k, _)| k))?;
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
        let mut apps: Vec<AppConfig> = file
            .apps
            .into_iter()
            .map(|a| AppConfig {
                id: a.id,
                key: a.key,
                secret: a.secret,
                enabled: a.enabled,
                client_events: a.client_events,
                user_authentication_required: a.user_authentication_required,
                max_connections: a.max_connections,
                subscription_count_events: a.subscription_count_events,
                limits: a.limits,
            })
            .collect();
        if !cli.apps.is_empty() {
            apps = cli
                .apps
                .iter()
                .map(|s| parse_app(s))
                .collect::<Result<_, _>>()?;
        }
        let development = apps.is_empty();
        if development {
            apps.push(development_app());
        }
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
            development,
            activity_timeout: cli
                .activity_timeout
                .or(file.activity_timeout)
                .map_or(d.activity_timeout, secs),
            pong_timeout: file.pong_timeout.map_or(d.pong_timeout, secs),
            signin_timeout: file.signin_timeout.map_or(d.signin_timeout, secs),
            max_connections: cli.max_connections.or(file.max_connections),
            outbound_queue: file.outbound_queue.unwrap_or(d.outbound_queue),
            max_message_bytes: file.max_message_bytes.unwrap_or(d.max_message_bytes),
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
        if cfg.outbound_queue == 0 {
            return Err(ConfigError::Invalid(
                "outbound_queue must be at least 1".into(),
            ));
        }
        Ok(cfg)
    }
}

/// Refuses unknown `PUSHMESH_*` environment variables (a typo would otherwise be ignored).
pub fn check_env(names: impl Iterator<Item = String>) -> Result<(), ConfigError> {
    for n in names {
        if n.starts_with("PUSHMESH_") && !KNOWN_ENV.contains(&n.as_str()) {
            return Err(ConfigError::UnknownEnv(n));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut v = vec!["pushmesh"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn defaults_to_development_app() {
        let c = Config::resolve(FileConfig::default(), cli(&[])).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.development);
        assert_eq!(c.apps[0].key, "app-key");
        assert_eq!(c.listen.port(), 6001);
    }

    #[test]
    fn flags_override_file() {
        let file = FileConfig::parse(
            r#"
listen = "127.0.0.1:7000"
activity_timeout = 60
[[apps]]
id = "1"
key = "k"
secret = "s"
client_events = true
[apps.limits]
max_presence_members = 5
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let c = Config::resolve(file, cli(&["--listen", "127.0.0.1:7001"]))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.listen.port(), 7001);
        assert_eq!(c.activity_timeout, Duration::from_secs(60));
        assert!(!c.development);
        assert_eq!(c.apps[0].limits.max_presence_members, 5);
        assert_eq!(c.apps[0].limits.max_event_channels, 100);
    }

    #[test]
    fn app_flags_replace_apps() {
        let c = Config::resolve(
            FileConfig::default(),
            cli(&["--app", "1:a:b", "--app", "2:c:d:e"]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.apps.len(), 2);
        assert_eq!(c.apps[1].secret, "d:e");
        assert!(Config::resolve(FileConfig::default(), cli(&["--app", "1::b"])).is_err());
        assert!(Config::resolve(
            FileConfig::default(),
            cli(&["--app", "1:a:b", "--app", "1:c:d"])
        )
        .is_err());
    }

    #[test]
    fn strict() {
        assert!(FileConfig::parse("lisen = \"x\"").is_err());
        assert!(FileConfig::parse("[[apps]]\nid=\"1\"\nkey=\"k\"\nsecret=\"s\"\nbogus=1").is_err());
        assert!(check_env(["PUSHMESH_LISTEN".to_string()].into_iter()).is_ok());
        assert!(matches!(
            check_env(["PUSHMESH_LISTN".to_string()].into_iter()),
            Err(ConfigError::UnknownEnv(_))
        ));
    }
}
