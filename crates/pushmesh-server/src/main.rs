//! The `pushmesh` binary: parse the configuration, install logging, serve.

use anyhow::Context;
use clap::Parser;
use pushmesh_server::config::{self, Cli, ClusterCommand, Command, Config, LogFormat};
use pushmesh_server::Server;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let mut cli = Cli::parse();
    let command = cli.command.take();
    if let Some(Command::Cluster { action }) = command {
        return match action {
            ClusterCommand::Init { out, nodes } => {
                match pushmesh_cluster::tls::init(&out, &nodes) {
                    Ok(files) => {
                        for f in files {
                            println!("wrote {f}");
                        }
                        println!("keep ca-key.pem offline; give each node its <id>.pem, <id>-key.pem and ca.pem");
                        std::process::ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("pushmesh: {e}");
                        std::process::ExitCode::FAILURE
                    }
                }
            }
        };
    }
    if let Some(Command::Apps { target, action }) = command {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("pushmesh: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        return match rt.block_on(pushmesh_server::apps_cli::run(&target, &action)) {
            Ok(Some(v)) => {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                std::process::ExitCode::SUCCESS
            }
            Ok(None) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pushmesh apps: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let config = match Config::from_cli(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pushmesh: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pushmesh: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Warnings/errors per second per call site, and the burst allowed.
const LOG_PER_SEC: f64 = 10.0;
const LOG_BURST: f64 = 20.0;

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => EnvFilter::try_new(f),
        _ => EnvFilter::try_new(&config.log),
    }
    .context("invalid log filter")?;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    // Warnings and errors are rate-limited per call site, so a flood of bad
    // input or a dead peer cannot fill the disk; debug lines are off by default.
    let limiter = pushmesh_server::limits::RateLimiter::<usize>::new(LOG_PER_SEC, LOG_BURST);
    let rate_limit = tracing_subscriber::filter::dynamic_filter_fn(move |meta, _| {
        if *meta.level() > tracing::Level::WARN || !meta.is_event() {
            return true;
        }
        let site = meta as *const _ as usize;
        limiter.allow(&site, std::time::Instant::now())
    });
    // Colours only on a terminal, not in journald or files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt = match config.log_format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(rate_limit).with_filter(filter))
        .init();
    Ok(())
}

/// Warns about unknown `PUSHMESH_*` variables (never fatal: platforms such
/// as Kubernetes set their own, and those service links are not reported).
fn report_env() {
    let names = std::env::vars_os().filter_map(|(k, _)| k.into_string().ok());
    let report = config::check_env(names);
    for (name, known) in &report.typos {
        tracing::warn!(variable = %name, did_you_mean = %known, "unknown environment variable ignored");
    }
    if !report.unknown.is_empty() {
        let list = report.unknown.join(", ");
        tracing::warn!(variables = %list, "unknown environment variables ignored");
    }
}

fn banner(config: &Config, addr: std::net::SocketAddr) {
    let port = addr.port();
    println!("pushmesh {} listening on {addr}", env!("CARGO_PKG_VERSION"));
    if let Some(c) = &config.cluster {
        println!(
            "  node {} of cluster {}: gossip {} (advertised {}), QUIC {} (advertised {})",
            c.node_id,
            c.cluster_id,
            c.gossip_listen,
            c.gossip_advertise,
            c.cluster_listen,
            c.cluster_advertise
        );
    }
    // Secrets are never printed or logged: only the development app's, which
    // is public (and serves only when no app is configured).
    for a in &config.apps {
        println!("  app id: {}  key: {}", a.id, a.key);
    }
    let dev = config::development_app();
    if let Some(a) = config
        .apps
        .first()
        .filter(|a| config.development && a.secret == dev.secret)
    {
        println!(
            "\nDevelopment app (no app configured; do not use in production). Connect with pusher-js:\n\n  \
             new Pusher('{key}', {{ wsHost: '127.0.0.1', wsPort: {port}, forceTLS: false,\n    \
             enabledTransports: ['ws'], cluster: 'mt1' }});\n\n\
             and publish with the Node SDK:\n\n  \
             new Pusher({{ appId: '{id}', key: '{key}', secret: '{secret}', host: '127.0.0.1', port: '{port}', useTLS: false }})\n",
            key = a.key,
            id = a.id,
            secret = a.secret
        );
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .event_interval(EVENT_INTERVAL)
        .build()?
        .block_on(serve(config))
}

/// Scheduler ticks between two polls of the I/O driver (tokio's default:
/// 61). Lower, so an HTTP publish is noticed between the connection tasks a
/// large fan-out woke (see docs/benchmarks.md).
const EVENT_INTERVAL: u32 = 11;

async fn serve(config: Config) -> anyhow::Result<()> {
    init_logging(&config)?;
    report_env();
    // Signal handlers first: a SIGTERM right after start is a graceful stop too.
    let shutdown = shutdown_signal()?;
    // SIGHUP reloads and never stops the node: handled from here on.
    #[cfg(unix)]
    let hup = pushmesh_server::reload::install().context("cannot handle SIGHUP")?;
    let server = Server::bind(config.clone()).await?;
    #[cfg(unix)]
    pushmesh_server::reload::spawn(hup, server.tls(), server.shared());
    let addr = server.local_addr()?;
    banner(&config, addr);
    tracing::info!(%addr, apps = config.apps.len(), "pushmesh started");
    // A node that finds its node_id in use by a live node refuses to start.
    let refuse = pushmesh_server::identity::refuse_duplicate_identity(server.shared());
    tokio::select! {
        r = server.run(shutdown) => r?,
        Err(e) = refuse => {
            tracing::error!(error = %e, "refusing to start");
            return Err(e.into());
        }
    }
    tracing::info!("pushmesh stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM; the handlers are installed when this returns.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let (mut int, mut term) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        )
    };
    Ok(async move {
        #[cfg(unix)]
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    })
}
