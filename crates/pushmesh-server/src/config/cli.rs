//! Command-line flags and subcommands; each flag also reads its
//! `PUSHMESH_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use super::LogFormat;

/// Command-line flags; each also reads its `PUSHMESH_*` variable.
#[derive(Debug, Parser)]
#[command(
    name = "pushmesh",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("PUSHMESH_COMMIT"), ")"),
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
    /// wsify authorizer webhook for the app carrying wsify traffic.
    #[arg(long, env = "PUSHMESH_AUTHORIZER_URL", value_name = "URL")]
    pub authorizer_url: Option<String>,
    /// Key required by `POST /broadcast?key=KEY`.
    #[arg(long, env = "PUSHMESH_BROADCASTING_KEY", value_name = "KEY")]
    pub broadcasting_key: Option<String>,
    /// This node's id in the cluster [default: generated per start].
    #[arg(long, env = "PUSHMESH_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,
    /// Cluster id; gossip of other clusters is ignored [default: pushmesh].
    #[arg(long, env = "PUSHMESH_CLUSTER_ID", value_name = "ID")]
    pub cluster_id: Option<String>,
    /// UDP address for gossip; setting it (or --seed) turns clustering on.
    #[arg(long, env = "PUSHMESH_GOSSIP_LISTEN", value_name = "ADDR:PORT")]
    pub gossip_listen: Option<SocketAddr>,
    /// Gossip address peers use [default: --gossip-listen].
    #[arg(long, env = "PUSHMESH_GOSSIP_ADVERTISE", value_name = "ADDR:PORT")]
    pub gossip_advertise: Option<SocketAddr>,
    /// UDP address for QUIC peer links [default: gossip port + 1].
    #[arg(long, env = "PUSHMESH_CLUSTER_LISTEN", value_name = "ADDR:PORT")]
    pub cluster_listen: Option<SocketAddr>,
    /// QUIC address peers use [default: --cluster-listen].
    #[arg(long, env = "PUSHMESH_CLUSTER_ADVERTISE", value_name = "ADDR:PORT")]
    pub cluster_advertise: Option<SocketAddr>,
    /// A gossip seed, HOST:PORT; repeatable; host names are re-resolved.
    #[arg(
        long = "seed",
        env = "PUSHMESH_SEEDS",
        value_name = "HOST:PORT",
        value_delimiter = ','
    )]
    pub seeds: Vec<String>,
    /// Cluster secret: seals gossip; derives development certificates.
    #[arg(
        long,
        env = "PUSHMESH_CLUSTER_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub cluster_secret: Option<String>,
    /// File holding the cluster secret.
    #[arg(long, env = "PUSHMESH_CLUSTER_SECRET_FILE", value_name = "FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Cluster CA certificate (PEM) [default: derived from the secret].
    #[arg(long, env = "PUSHMESH_CLUSTER_CA", value_name = "FILE")]
    pub cluster_ca: Option<PathBuf>,
    /// This node's certificate (PEM).
    #[arg(long, env = "PUSHMESH_CLUSTER_CERT", value_name = "FILE")]
    pub cluster_cert: Option<PathBuf>,
    /// This node's private key (PKCS#8 PEM).
    #[arg(long, env = "PUSHMESH_CLUSTER_KEY", value_name = "FILE")]
    pub cluster_key: Option<PathBuf>,
    /// TLS certificate chain (PEM): serve wss:// and https:// directly.
    #[arg(long, env = "PUSHMESH_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM). Reloaded with the certificate on SIGHUP.
    #[arg(long, env = "PUSHMESH_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Serve /metrics on this separate address (plain HTTP) as well.
    #[arg(long, env = "PUSHMESH_METRICS_LISTEN", value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,
    /// Token that opens the status page at /dashboard [default: none, the page is off].
    #[arg(
        long,
        env = "PUSHMESH_DASHBOARD_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub dashboard_token: Option<String>,
    /// Token of the admin API at /admin [default: none, the API is off].
    #[arg(
        long,
        env = "PUSHMESH_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// File holding the admin API's token.
    #[arg(long, env = "PUSHMESH_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Directory for what must survive a restart (apps made through the admin API).
    #[arg(long, env = "PUSHMESH_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A clustered node is not ready until it has joined at least this many
    /// nodes, itself included [default: 1].
    #[arg(long, env = "PUSHMESH_MIN_CLUSTER_SIZE", value_name = "N")]
    pub min_cluster_size: Option<usize>,
    /// Proxies whose PROXY headers and X-Forwarded-For are believed (CIDRs);
    /// repeatable; in the environment: comma-separated.
    #[arg(
        long = "trusted-proxy",
        env = "PUSHMESH_TRUSTED_PROXIES",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<crate::proxy::Cidr>,
    /// Read PROXY protocol v1/v2 headers from trusted proxies [default: false].
    #[arg(long, env = "PUSHMESH_PROXY_PROTOCOL", value_name = "BOOL")]
    pub proxy_protocol: Option<bool>,
    /// Which header of a trusted proxy names the client: x-forwarded-for or
    /// forwarded (RFC 7239) [default: x-forwarded-for].
    #[arg(long, env = "PUSHMESH_FORWARDED_HEADER", value_name = "HEADER")]
    pub forwarded_header: Option<crate::forwarded::ForwardedHeader>,
    /// Connections of one client address accepted and not yet established,
    /// at most; more get HTTP 429 [default: 128; 0: unlimited].
    #[arg(long, env = "PUSHMESH_MAX_PENDING_HANDSHAKES_PER_IP", value_name = "N")]
    pub max_pending_handshakes_per_ip: Option<usize>,
    /// Time a request has, after its headers, to send its whole body
    /// (then 408) [default: 10000].
    #[arg(long, env = "PUSHMESH_REQUEST_BODY_TIMEOUT_MS", value_name = "MS")]
    pub request_body_timeout_ms: Option<u64>,
    /// Negotiate permessage-deflate with clients that offer it [default: true].
    #[arg(long, env = "PUSHMESH_COMPRESSION", value_name = "BOOL")]
    pub compression: Option<bool>,
    /// Messages shorter than this go uncompressed [default: 256].
    #[arg(long, env = "PUSHMESH_COMPRESSION_MIN_BYTES", value_name = "BYTES")]
    pub compression_min_bytes: Option<usize>,
    /// Deflate level, 1 (fastest) to 9 [default: 1].
    #[arg(long, env = "PUSHMESH_COMPRESSION_LEVEL", value_name = "N")]
    pub compression_level: Option<u32>,
    /// Subcommands.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands of `pushmesh`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Cluster tools.
    Cluster {
        /// What to do.
        #[command(subcommand)]
        action: ClusterCommand,
    },
    /// Apps at runtime: calls a node's admin API (`/admin/apps`).
    Apps {
        /// Where and how to reach the admin API.
        #[command(flatten)]
        target: AdminTarget,
        /// What to do.
        #[command(subcommand)]
        action: AppsCommand,
    },
}

/// The admin API to call.
#[derive(Debug, clap::Args)]
pub struct AdminTarget {
    /// Base URL of a node.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:6001")]
    pub url: String,
    /// File holding the admin token [default: the PUSHMESH_ADMIN_TOKEN variable].
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

/// `pushmesh apps ...`: each prints the API's JSON answer.
#[derive(Debug, clap::Subcommand)]
pub enum AppsCommand {
    /// Every app (no secrets).
    List,
    /// One app.
    Get {
        /// App id.
        id: String,
    },
    /// Creates an app; prints it with its secret.
    Create {
        /// App id.
        #[arg(long)]
        id: String,
        /// App key.
        #[arg(long)]
        key: String,
        /// Its secret [default: generated].
        #[arg(long)]
        secret: Option<String>,
        /// Any other `[[apps]]` setting, as FIELD=JSON (repeatable), e.g. client_events=true.
        #[arg(long = "set", value_name = "FIELD=JSON")]
        set: Vec<String>,
    },
    /// Changes an app's settings.
    Update {
        /// App id.
        id: String,
        /// A setting as FIELD=JSON (repeatable), e.g. enabled=false.
        #[arg(long = "set", value_name = "FIELD=JSON", required = true)]
        set: Vec<String>,
    },
    /// Deletes an app (its connections close with 4001).
    Delete {
        /// App id.
        id: String,
    },
    /// A new secret; the old one keeps working for the grace period.
    RotateSecret {
        /// App id.
        id: String,
        /// How long the old secret keeps working [default: 3600].
        #[arg(long, value_name = "SECONDS")]
        grace_secs: Option<u64>,
    },
    /// The app's counters summed over the cluster.
    Stats {
        /// App id.
        id: String,
    },
}

/// `pushmesh cluster ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// Generates a cluster CA and one certificate per node (PEM files).
    Init {
        /// Directory to write into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// A node id; repeatable.
        #[arg(long = "node", value_name = "ID", required = true)]
        nodes: Vec<String>,
    },
}
