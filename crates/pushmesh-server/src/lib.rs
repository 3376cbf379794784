//! The pushmesh node: WebSocket and HTTP API edge around the sans-IO core.
//!
//! [`Server::bind`] opens the listener; [`Server::run`] serves until the
//! shutdown future resolves, then closes every client with 4200 and waits
//! (bounded) for them to go.

pub mod api;
pub mod config;
pub mod hub;
pub mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::{Json, Router};
use pushmesh_core::{AppIdx, Core, CoreConfig};
use pushmesh_protocol::CloseCode;
use serde_json::json;
use tokio::net::TcpListener;

pub use config::Config;
use hub::{Hub, HubStats};

/// How often the core's periodic work runs (subscription counts, cache expiry).
const TICK: Duration = Duration::from_millis(250);

/// Why the server cannot start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("server error: {0}")]
    Serve(#[from] std::io::Error),
}

/// Counters of the node.
#[derive(Debug, Default)]
pub struct Stats {
    /// Events accepted through the HTTP API.
    pub published: AtomicU64,
    /// Hub counters.
    pub hub: HubStats,
}

/// State shared by every task of the node.
pub struct Shared {
    /// The configuration it runs with.
    pub config: Config,
    hub: Mutex<Hub>,
    next_conn: AtomicU64,
    /// Counters.
    pub stats: Stats,
}

impl Shared {
    /// Locks the hub. Never hold the guard across an `.await`.
    pub fn lock(&self) -> MutexGuard<'_, Hub> {
        // A panic while holding the lock is a bug; the state is still the best we have.
        self.hub.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn app_by_key(&self, key: &str) -> Option<AppIdx> {
        self.lock().core.app_by_key(key)
    }
}

impl std::ops::Deref for Stats {
    type Target = HubStats;
    fn deref(&self) -> &HubStats {
        &self.hub
    }
}

/// A bound, not yet serving, node.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds the listener and builds the node's state.
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let core = Core::new(CoreConfig {
            apps: config.apps.clone(),
            activity_timeout_secs: config.activity_timeout.as_secs(),
            max_connections: config.max_connections,
            socket_prefix: rand::random_range(1..1_000_000_000),
        });
        let shared = Arc::new(Shared {
            config,
            hub: Mutex::new(Hub::new(core)),
            next_conn: AtomicU64::new(1),
            stats: Stats::default(),
        });
        Ok(Self { listener, shared })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, ServerError> {
        Ok(self.listener.local_addr()?)
    }

    /// The node's shared state.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown` resolves, then drains.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let st = self.shared;
        let app = router(st.clone());
        let ticker = tokio::spawn(tick_loop(st.clone()));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let st2 = st.clone();
        let drain = async move {
            shutdown.await;
            tracing::info!("shutting down: closing clients with 4200");
            {
                let mut hub = st2.lock();
                hub.core.close_all(
                    CloseCode::ReconnectImmediately,
                    "server shutting down, reconnect",
                );
                hub.dispatch(&st2.stats);
            }
            let deadline = Instant::now() + st2.config.shutdown_timeout;
            while st2.lock().attached() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = stop_tx.send(true);
        };
        let mut stop = stop_rx;
        let serve = axum::serve(self.listener, app).with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        });
        let (r, ()) = tokio::join!(async { serve.await }, drain);
        ticker.abort();
        r?;
        Ok(())
    }
}

async fn tick_loop(st: Arc<Shared>) {
    let mut iv = tokio::time::interval(TICK);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        iv.tick().await;
        let mut hub = st.lock();
        hub.core.tick(Instant::now());
        hub.dispatch(&st.stats);
    }
}

fn router(st: Arc<Shared>) -> Router {
    Router::new()
        .route("/app/{key}", get(ws::pusher_ws))
        .route("/apps/{app_id}/events", post(api::events))
        .route("/apps/{app_id}/batch_events", post(api::batch_events))
        .route("/apps/{app_id}/channels", get(api::channels))
        .route("/apps/{app_id}/channels/{channel}", get(api::channel))
        .route(
            "/apps/{app_id}/channels/{channel}/users",
            get(api::channel_users),
        )
        .route(
            "/apps/{app_id}/users/{user_id}/terminate_connections",
            post(api::terminate_connections),
        )
        .route("/healthz", get(healthz))
        .route("/stats", get(stats))
        .fallback(api::not_found)
        .with_state(st)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn stats(
    axum::extract::State(st): axum::extract::State<Arc<Shared>>,
) -> Json<serde_json::Value> {
    let connections = st.lock().core.connection_count();
    Json(json!({
        "connections": connections,
        "published": st.stats.published.load(Ordering::Relaxed),
        "frames_queued": st.stats.frames_queued.load(Ordering::Relaxed),
        "slow_consumers": st.stats.slow_consumers.load(Ordering::Relaxed),
    }))
}
