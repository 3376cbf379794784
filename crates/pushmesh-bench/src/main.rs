//! `pushmesh-bench`: load scenarios against any Pusher-compatible server,
//! and the ideal reference server.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use pushmesh_bench::load::{self, LoadOptions, Report, Target};

#[derive(Parser)]
#[command(
    name = "pushmesh-bench",
    version,
    about = "Load generator for Pusher-protocol servers (pushmesh, sockudo, soketi)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Server {
    /// Server host (an IP address).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// WebSocket + HTTP API port.
    #[arg(long, default_value_t = 6001)]
    port: u16,
    /// App id.
    #[arg(long, default_value = "app-id")]
    app_id: String,
    /// App key.
    #[arg(long, default_value = "app-key")]
    key: String,
    /// App secret.
    #[arg(long, default_value = "app-secret")]
    secret: String,
    /// The server's pid: measure its CPU time (and RSS) from /proc.
    #[arg(long)]
    pid: Option<u32>,
}

#[derive(Args, Clone)]
struct Common {
    /// Publishes per second (0: as fast as the server accepts).
    #[arg(long, default_value_t = 10)]
    rate: u64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Extra payload bytes per event.
    #[arg(long, default_value_t = 0)]
    payload: usize,
    /// Loopback source addresses to spread client sockets over (127.0.0.1..N).
    #[arg(long, default_value_t = 8)]
    source_addrs: u8,
    /// Print machine-readable JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Exit 0 even if messages were lost or duplicated.
    #[arg(long)]
    tolerate_loss: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
    /// WebSocket handshakes in flight at once while setting up clients.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Distinct subscription filters (pushmesh only; 0: none): every
    /// subscriber still gets every event (see `LoadOptions::filters`).
    #[arg(long, default_value_t = 0)]
    filters: usize,
    /// Subscribers negotiate permessage-deflate (and inflate what they get).
    #[arg(long)]
    compression: bool,
    /// Subscribers are Server-Sent Events streams (`GET /app/{key}/sse`,
    /// pushmesh only) instead of WebSockets.
    #[arg(long)]
    sse: bool,
    /// Events carry a realistic ~2 KB JSON order instead of padding.
    #[arg(long)]
    json_order: bool,
}

/// What the publish/subscribe scenarios take.
#[derive(Args, Clone)]
struct PubSub {
    #[command(flatten)]
    server: Server,
    #[command(flatten)]
    common: Common,
    /// Subscribers.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// N subscribers on one channel; events at a fixed rate through the HTTP API.
    Fanout {
        #[command(flatten)]
        run: PubSub,
    },
    /// N subscribers in groups of K per channel; publishes spread over channels.
    Channels {
        #[command(flatten)]
        run: PubSub,
        /// Subscribers per channel.
        #[arg(long, default_value_t = 1)]
        group: usize,
    },
    /// Open N idle subscribed connections, hold them, report RSS per connection.
    Connections {
        #[command(flatten)]
        server: Server,
        #[command(flatten)]
        common: Common,
        /// Connections.
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Seconds to hold them before measuring.
        #[arg(long, default_value_t = 2.0)]
        hold: f64,
    },
    /// Subscribers on one node, publishes through another: the hop's extra latency.
    Cluster {
        #[command(flatten)]
        server: Server,
        #[command(flatten)]
        common: Common,
        /// Subscribers (on --host/--port).
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        /// Host of the publishing node.
        #[arg(long, default_value = "127.0.0.1")]
        via_host: String,
        /// Port of the publishing node.
        #[arg(long)]
        via_port: u16,
    },
    /// Subscribe many channels over a few connections and hold them (until
    /// killed): the state a new peer link must sync (`scripts/bench-link-sync`).
    HoldChannels {
        #[command(flatten)]
        server: Server,
        /// Channels.
        #[arg(long, default_value_t = 1_000_000)]
        channels: usize,
        /// Connections to spread them over.
        #[arg(long, default_value_t = 20)]
        connections: usize,
    },
    /// The ideal reference server for `fanout`.
    IdealServer {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:6101")]
        listen: std::net::SocketAddr,
    },
}

fn target(s: &Server) -> Target {
    Target {
        host: s.host.clone(),
        port: s.port,
        app_id: s.app_id.clone(),
        key: s.key.clone(),
        secret: s.secret.clone(),
        pid: s.pid,
    }
}

fn options(c: &Common, subscribers: usize, group: usize) -> LoadOptions {
    LoadOptions {
        subscribers,
        group,
        rate: c.rate,
        duration: Duration::from_secs_f64(c.duration),
        payload: c.payload,
        source_addrs: c.source_addrs.max(1),
        progress: !c.quiet,
        ts_offset_us: 0,
        publish_via: None,
        drain: Duration::from_secs(10),
        connect_concurrency: c.connect_concurrency,
        filters: c.filters,
        compression: c.compression,
        sse: c.sse,
        json_order: c.json_order,
    }
}

fn finish(r: &Report, c: &Common) -> anyhow::Result<std::process::ExitCode> {
    if c.json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        print!("{}", load::table(r));
    }
    if (r.lost > 0 || r.duplicated > 0) && !c.tolerate_loss {
        eprintln!(
            "pushmesh-bench: {} lost, {} duplicated",
            r.lost, r.duplicated
        );
        return Ok(std::process::ExitCode::from(3));
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Runs publish/subscribe scenario `name` (its subscribers in groups of
/// `group` per channel, all in one without) and reports it.
async fn pubsub(
    name: &str,
    run: &PubSub,
    group: Option<usize>,
) -> anyhow::Result<std::process::ExitCode> {
    let group = group.unwrap_or(run.subscribers);
    let options = options(&run.common, run.subscribers, group);
    let r = load::run_pubsub(name, &target(&run.server), &options).await?;
    finish(&r, &run.common)
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Fanout { run } => pubsub("fanout", &run, None).await,
        Cmd::Channels { run, group } => pubsub("channels", &run, Some(group)).await,
        Cmd::Connections {
            server,
            common,
            connections,
            hold,
        } => {
            let r = load::run_connections(
                &target(&server),
                connections,
                Duration::from_secs_f64(hold),
                &options(&common, connections, 1),
            )
            .await?;
            finish(&r, &common)
        }
        Cmd::Cluster {
            server,
            common,
            subscribers,
            via_host,
            via_port,
        } => {
            let t = target(&server);
            let via = Target {
                host: via_host,
                port: via_port,
                pid: None,
                ..t.clone()
            };
            let r =
                load::run_cluster(&t, &via, &options(&common, subscribers, subscribers)).await?;
            finish(&r, &common)
        }
        Cmd::HoldChannels {
            server,
            channels,
            connections,
        } => {
            let t = target(&server);
            let start = std::time::Instant::now();
            let held = pushmesh_bench::load::hold_channels(&t, channels, connections).await?;
            println!(
                "holding {channels} channels on {} connections (subscribed in {:.1} s)",
                held.len(),
                start.elapsed().as_secs_f64()
            );
            tokio::signal::ctrl_c().await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Cmd::IdealServer { listen } => {
            let addr = pushmesh_bench::ideal::spawn(listen, Default::default())
                .await
                .context("cannot listen")?;
            println!("ideal server listening on {addr}");
            tokio::signal::ctrl_c().await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}
