//! The pushmesh node: WebSocket and HTTP API edge around the sans-IO core.
//!
//! [`Server::bind`] opens the listener; [`Server::run`] serves until the
//! shutdown future resolves, then drains in order: not ready (and
//! `draining` in gossip) while still serving and routing publishes for
//! `drain_wait_ms` → publishes refused (503) → clients closed with 4200 →
//! pending webhooks sent → peer links flushed (held frames acknowledged) →
//! links closed as leaving → gossip left.

pub mod admin;
pub mod admission;
pub mod api;
pub mod apps;
pub mod apps_cli;
pub mod authorizer;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod dashboard;
pub mod edge;
pub mod forwarded;
pub mod identity;
pub mod identity_headers;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod operator_token;
pub mod proxy;
pub mod refusal;
pub mod reject;
pub mod reload;
pub mod request_guard;
pub mod sse;
pub mod tags;
pub mod tls;
pub mod webhooks;
pub mod websocket;
pub mod ws;
pub mod wsify;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use authorizer::{Authorizer, AuthorizerStats};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use pushmesh_core::{AppIdx, Apps, WebhookScheduler};
use pushmesh_protocol::CloseCode;
use serde_json::json;
use tokio::net::TcpListener;
use webhooks::Webhooks;

pub use config::Config;
use node::{Node, NodeSettings};

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
    /// The TLS certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The HTTP client for webhooks could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Http(#[source] reqwest::Error),
    /// The cluster layer could not start, or this node's id is taken.
    #[error("cluster: {0}")]
    Cluster(#[from] cluster::ClusterStartError),
    /// The admin API's store in `data_dir` cannot be used.
    #[error("data_dir: {0}")]
    Apps(#[source] apps::store::StoreError),
}

/// Counters of the node.
#[derive(Debug, Default)]
pub struct Stats {
    /// Events accepted (HTTP API, `POST /broadcast`, wsify broadcasts).
    pub published: AtomicU64,
    /// Authorizer counters (all apps).
    pub authorizer: Arc<AuthorizerStats>,
    /// Edge counters (connections, bytes, HTTP requests, limits).
    pub edge: metrics::EdgeMetrics,
}

/// State shared by every task of the node.
pub struct Shared {
    /// The configuration it runs with.
    pub config: Config,
    /// The router, users, replication and connections.
    pub node: Node,
    next_conn: AtomicU64,
    /// Counters.
    pub stats: Stats,
    /// Webhook delivery.
    pub webhooks: Webhooks,
    /// The wsify app's authorizer (replaced when its settings change).
    authorizer: arc_swap::ArcSwapOption<Authorizer>,
    /// The pooled HTTP client of webhooks and the authorizer.
    http: reqwest::Client,
    /// The cluster layer, when clustering is on.
    pub cluster: Option<pushmesh_cluster::Cluster>,
    cluster_events: Mutex<Option<tokio::sync::mpsc::Receiver<pushmesh_cluster::ClusterEvent>>>,
    /// Set when the node starts draining: no new connections, not ready.
    pub draining: std::sync::atomic::AtomicBool,
    /// New connections per client IP.
    pub ip_limiter: limits::RateLimiter<std::net::IpAddr>,
    /// HTTP API requests per app.
    pub api_limiter: limits::RateLimiter<AppIdx>,
    /// Accept loops: pending handshakes, connections per IP, proxies.
    pub edge: edge::Edge,
    /// The apps beyond the core's snapshot: sources, I/O settings, the
    /// admin API's registry and store.
    pub apps: apps::AppsState,
    /// Failed admin API requests and dashboard logins per client address.
    pub admin_failures: limits::RateLimiter<std::net::IpAddr>,
    /// The status page's sampled figures.
    pub dashboard: dashboard::history::History,
}

impl Shared {
    fn app_by_key(&self, key: &str) -> Option<AppIdx> {
        self.node.apps().by_key(key)
    }

    /// The wsify authorizer, if the wsify app has one (only the wsify
    /// app's connections call one).
    pub fn authorizer(&self, app: AppIdx) -> Option<Arc<Authorizer>> {
        if app.0 as usize != self.config.wsify_app {
            return None;
        }
        self.authorizer.load_full()
    }

    /// Serves the wsify app's authorizer settings: the same settings keep
    /// the authorizer (and its calls in flight), others replace it.
    pub fn set_authorizer(&self, cfg: Option<&config::AuthorizerConfig>) {
        let current = self.authorizer.load();
        if current.as_deref().map(Authorizer::config) == cfg {
            return;
        }
        if let Some(c) = cfg {
            tracing::info!(url = %c.url, "wsify authorizer set");
        } else if current.is_some() {
            tracing::info!("wsify authorizer removed");
        }
        self.authorizer.store(cfg.map(|c| {
            Arc::new(Authorizer::new(
                c,
                self.http.clone(),
                self.stats.authorizer.clone(),
            ))
        }));
    }
}

/// A bound, not yet serving, node.
pub struct Server {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    tls: Option<Arc<tls::Reloadable>>,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds the listener and builds the node's state.
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        let listener = edge::bind(config.listen).map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
        let tls = match &config.tls {
            Some((cert, key)) => Some(Arc::new(tls::Reloadable::new(cert.clone(), key.clone())?)),
            None => None,
        };
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::Bind { addr, source })?,
            ),
            None => None,
        };
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let (cluster, cluster_events) = match &config.cluster {
            None => (None, None),
            Some(c) => {
                let (cl, rx) = cluster::start(c, epoch).await?;
                (Some(cl), Some(rx))
            }
        };
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(32)
            .user_agent(concat!("pushmesh/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ServerError::Http)?;
        let stats = Stats::default();
        let authorizer = config.app_io[config.wsify_app]
            .authorizer
            .as_ref()
            .map(|a| Arc::new(Authorizer::new(a, http.clone(), stats.authorizer.clone())));
        let webhooks = Webhooks::new(&config, http.clone());
        let scheduler = WebhookScheduler::new(config.webhook_delay);
        let ip_rate = config.connections_per_ip_per_sec;
        let api_rate = config.api_requests_per_sec;
        let node = Node::start(
            NodeSettings {
                apps: Apps::new(config.apps.clone()),
                node_id: config.node_id.clone(),
                epoch,
                shards: config.router_shards,
                shard_queue: config.shard_queue,
                history_max_bytes: config.history_max_bytes,
                max_connections: config.max_connections,
                socket_prefix: rand::random_range(1..1_000_000_000),
                barrier_wait: config
                    .cluster
                    .as_ref()
                    .map_or(Duration::from_secs(1), |c| c.subscribe_barrier),
                publish_ack_wait: config
                    .cluster
                    .as_ref()
                    .map_or(Duration::from_secs(1), |c| c.publish_ack),
                joining: config.cluster.is_some(),
            },
            cluster.clone(),
            scheduler,
        );
        webhooks.confirm_to(node.links.clone());
        let edge = edge::Edge::new(&config);
        let store = match &config.data_dir {
            Some(dir) => Some(apps::store::Store::open(dir).map_err(ServerError::Apps)?),
            None => None,
        };
        let config_apps = config
            .apps
            .iter()
            .cloned()
            .zip(config.app_io.iter().cloned())
            .collect();
        let apps_state =
            apps::AppsState::new(&config.node_id, config_apps, store).map_err(ServerError::Apps)?;
        let shared = Arc::new(Shared {
            edge,
            config,
            node,
            cluster,
            cluster_events: Mutex::new(cluster_events),
            draining: std::sync::atomic::AtomicBool::new(false),
            ip_limiter: limits::RateLimiter::new(ip_rate, ip_rate * 2.0),
            api_limiter: limits::RateLimiter::new(api_rate, api_rate * 2.0),
            next_conn: AtomicU64::new(1),
            stats,
            webhooks,
            authorizer: arc_swap::ArcSwapOption::new(authorizer),
            http,
            apps: apps_state,
            admin_failures: limits::RateLimiter::new(1.0, 10.0),
            dashboard: dashboard::history::History::default(),
        });
        // The admin API's apps saved here serve before the first request.
        apps::rebuild(&shared).await;
        Ok(Self {
            listener,
            metrics_listener,
            tls,
            shared,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, ServerError> {
        Ok(self.listener.local_addr()?)
    }

    /// The TLS certificate, reloadable (SIGHUP: see [`reload`]).
    pub fn tls(&self) -> Option<Arc<tls::Reloadable>> {
        self.tls.clone()
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
        st.webhooks.start();
        let cluster_tasks = cluster::spawn_tasks(&st);
        let pump = tokio::spawn(webhook_pump(st.clone()));
        let grace = tokio::spawn(apps::grace_timer(st.clone()));
        let sampler = st
            .config
            .dashboard_token
            .is_some()
            .then(|| tokio::spawn(dashboard::history::sample(st.clone())));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let st2 = st.clone();
        let st3 = st.clone();
        let drain = async move {
            shutdown.await;
            st2.draining.store(true, Ordering::Relaxed);
            if let (Some(c), Some(settings)) = (&st2.cluster, &st2.config.cluster) {
                tracing::info!("draining: marked in gossip, waiting for the load balancer");
                c.set_key(pushmesh_cluster::KEY_STATE, "draining".into())
                    .await;
                tokio::time::sleep(settings.drain_wait).await;
            }
            // Past the wait: no publish is taken any more (503), so none
            // is acknowledged and then lost with the clients and links.
            st2.node.gate.close();
            // Those already taken are handed to the peers before the links
            // are flushed below.
            st2.node.gate.wait_idle(Duration::from_secs(2)).await;
            tracing::info!("shutting down: closing clients with 4200");
            st2.node.registry.close_all(
                CloseCode::ReconnectImmediately,
                "server shutting down, reconnect",
            );
            let deadline = Instant::now() + st2.config.shutdown_timeout;
            while st2.node.registry.count() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Pending webhooks (delayed ones included) go out before the end.
            let pending = st2.node.links.hooks().flush();
            st2.webhooks.route(pending);
            while !st2.webhooks.idle() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            st2.webhooks.abandon();
            if let Some(c) = &st2.cluster {
                // Everything acknowledged to publishers reaches the peers.
                c.flush(tokio::time::Instant::now() + Duration::from_secs(2))
                    .await;
                c.shutdown(Duration::from_secs(2)).await;
            }
            let _ = stop_tx.send(true);
        };
        let mut stop = stop_rx;
        if let Some(ml) = self.metrics_listener {
            let metrics_app = Router::new()
                .route("/metrics", get(all_metrics))
                // Health checks that no handshake flood on the client
                // listener can delay (see operations.md).
                .route("/healthz", get(healthz))
                .route("/readyz", get(cluster::readyz))
                .layer(axum::middleware::from_fn(reject::json_errors))
                .with_state(st.clone());
            let st4 = st.clone();
            tokio::spawn(edge::serve(
                ml,
                metrics_app,
                edge::Listener::Internal,
                st4,
                std::future::pending(),
            ));
        }
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let serve = async move {
            let public = edge::Listener::Public(self.tls);
            edge::serve(self.listener, app, public, st3, stopped).await;
            Ok::<(), ServerError>(())
        };
        let (r, ()) = tokio::join!(serve, drain);
        pump.abort();
        grace.abort();
        if let Some(s) = sampler {
            s.abort();
        }
        for t in cluster_tasks {
            t.abort();
        }
        st.webhooks.stop();
        r?;
        Ok(())
    }
}

/// Moves webhook events from the scheduler to the senders, as soon as they
/// are scheduled or their delay is over.
async fn webhook_pump(st: Arc<Shared>) {
    let notify = &st.node.links.hook_ready;
    loop {
        let next_due = {
            let mut hooks = st.node.links.hooks();
            let ready = hooks.poll(Instant::now());
            let due = hooks.next_due();
            drop(hooks);
            st.webhooks.route(ready);
            due
        };
        match next_due {
            Some(due) => {
                tokio::select! {
                    () = notify.notified() => {}
                    () = tokio::time::sleep_until(due.into()) => {}
                }
            }
            None => notify.notified().await,
        }
    }
}

fn router(st: Arc<Shared>) -> Router {
    Router::new()
        .route("/app/{key}", get(ws::pusher_ws))
        .route("/app/{key}/sse", get(sse::open).options(sse::preflight))
        .route("/ws", get(wsify::wsify_ws))
        .route("/broadcast", post(wsify::broadcast))
        .route("/apps/{app_id}/events", post(api::events))
        .route("/apps/{app_id}/batch_events", post(api::batch_events))
        .route("/apps/{app_id}/channels", get(api::channels))
        .route("/apps/{app_id}/channels/{channel}", get(api::channel))
        .route(
            "/apps/{app_id}/channels/{channel}/users",
            get(api::channel_users),
        )
        .route(
            "/apps/{app_id}/channels/{channel}/history",
            get(api::channel_history),
        )
        .route(
            "/apps/{app_id}/users/{user_id}/terminate_connections",
            post(api::terminate_connections),
        )
        // The Python SDK's terminate_user_connections leaves out /apps/{id}.
        .route(
            "/users/{user_id}/terminate_connections",
            post(api::terminate_connections_by_key),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(cluster::readyz))
        .route("/cluster", get(cluster::cluster_status))
        .route("/metrics", get(all_metrics))
        .route("/stats", get(stats))
        .route("/admin/apps", get(admin::list).post(admin::create))
        .route(
            "/admin/apps/{id}",
            get(admin::get).patch(admin::update).delete(admin::delete),
        )
        .route("/admin/apps/{id}/secret", post(admin::rotate))
        .route("/admin/apps/{id}/stats", get(admin::stats))
        .route("/admin", any(admin::fallback))
        .route("/admin/{*rest}", any(admin::fallback))
        .route("/dashboard", get(dashboard::page))
        .route("/dashboard/login", post(dashboard::login))
        .route("/dashboard/logout", post(dashboard::logout))
        .route("/dashboard/api/stats", get(dashboard::stats))
        .route("/dashboard/api/auth", get(dashboard::auth))
        .fallback(api::not_found)
        .layer(axum::middleware::from_fn(reject::json_errors))
        .layer(axum::middleware::from_fn_with_state(
            st.clone(),
            metrics::track_http,
        ))
        .with_state(st)
}

/// `GET /metrics`: the node's metrics and the accept loops'.
async fn all_metrics(
    axum::extract::State(st): axum::extract::State<Arc<Shared>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut out = metrics::render(&st);
    let ready = cluster::unready(&st).await.is_none();
    metrics::render_node_state(&mut out, ready, st.draining.load(Ordering::Relaxed));
    cluster::render_metrics(&st, &mut out);
    node::presence_limit::render_metrics(&st.node, &mut out).await;
    st.edge.render_metrics(&mut out);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn stats(
    axum::extract::State(st): axum::extract::State<Arc<Shared>>,
) -> Json<serde_json::Value> {
    let connections = st.node.registry.count();
    let w = &st.webhooks.stats;
    let a = &st.stats.authorizer;
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    Json(json!({
        "connections": connections,
        "published": n(&st.stats.published),
        "frames_queued": n(&st.node.links.stats.frames_queued),
        "slow_consumers": n(&st.node.links.stats.slow_consumers),
        "webhooks": {
            "sent": n(&w.sent), "retried": n(&w.retried), "dropped": n(&w.dropped), "requests": n(&w.requests),
        },
        "authorizer": {
            "allowed": n(&a.allowed), "refused": n(&a.refused), "unavailable": n(&a.unavailable),
            "notifications_skipped": n(&a.notifications_skipped),
        },
    }))
}
