//! The node's driver: runs the sans-IO state machines of `pushmesh-core`
//! on tasks, with no node-wide lock on the per-message path.
//!
//! - Each router [`Shard`] runs on its own task and owns its channels; it
//!   is reached only through its bounded command queue. A publish goes to
//!   one shard; the HTTP API answers once the command is queued.
//! - [`Users`] (sign-in, watchlists, terminate) and the [`Replicator`]
//!   (state changes for peers) sit behind their own small locks, held for
//!   synchronous work only and never on the per-message path.
//! - Effects are done at once by [`DriverSink`]: frames go into the
//!   connections' bounded queues (a full queue closes that client with
//!   4100), peer frames into the cluster links.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pushmesh_core::history::{HistoryStore, Origin};
use pushmesh_core::{
    filter::Tags, AppIdx, Apps, ChannelInfo, ConnId, Delta, NodeId, PeerFrame, PublishError,
    PublishRefused, PublishRequest, PublishedChannel, Replicator, Request, Shard, Sink, Users,
    WebhookScheduler,
};
use pushmesh_protocol::ChannelName;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::conn::{ConnRef, Registry};

mod gate;
mod history;
pub(crate) mod hook_relay;
mod peers;
pub(crate) mod presence_limit;
mod queries;
mod shard_task;
mod sink;

pub use gate::{PublishGate, Refusal};
pub use history::HistoryQueryError;
pub use hook_relay::HookRelay;
use sink::send_control;
pub use sink::DriverSink;

/// How often each shard's periodic work runs (subscription counts, cache expiry).
const TICK: Duration = Duration::from_millis(250);
/// Commands a shard handles before it hands its batch's effects on.
const BATCH: usize = 64;

/// Counters of the router.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Frames queued to connections.
    pub frames_queued: AtomicU64,
    /// Connections closed because their queue was full.
    pub slow_consumers: AtomicU64,
    /// Subscriptions whose barrier timed out (peers did not acknowledge).
    pub barrier_timeouts: AtomicU64,
    /// Publishes answered 503, by reason (see [`Refusal`]).
    pub refused: [AtomicU64; 3],
    /// History publishes answered before any peer acknowledged them
    /// (after `DURABLE_WAIT`).
    pub history_unacked: AtomicU64,
}

/// Connections held by the subscription barrier: (change number they wait
/// for, deadline, connection).
type Waiters = Vec<(u64, Instant, ConnRef)>;

/// What the shard tasks share with the rest of the node.
pub struct Links {
    /// The cluster layer, when clustering is on.
    pub cluster: Option<pushmesh_cluster::Cluster>,
    replicator: Mutex<Replicator>,
    hooks: Mutex<WebhookScheduler>,
    waiters: Mutex<Waiters>,
    barrier_wait: Duration,
    /// Wakes the webhook pump when events were scheduled.
    pub hook_ready: Notify,
    /// Router counters.
    pub stats: HubStats,
    /// Webhook events handed to backups and held for peers.
    pub hook_relay: HookRelay,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Links {
    /// The webhook scheduler (delayed and pending webhook events).
    pub fn hooks(&self) -> MutexGuard<'_, WebhookScheduler> {
        lock(&self.hooks)
    }

    /// Lets held connections go: those whose changes every peer
    /// acknowledged, and those past their deadline (counted).
    pub fn release_barrier(&self, now: Instant) {
        // Called every 50 ms and after every peer frame: nothing to do (the
        // usual case) costs no replicator lock.
        if lock(&self.waiters).is_empty() {
            return;
        }
        let acked = lock(&self.replicator).acked_by_all();
        let mut w = lock(&self.waiters);
        let mut released = Vec::new();
        w.retain(|(seq, deadline, h)| {
            if *seq <= acked {
                released.push(h.clone());
                false
            } else if *deadline <= now {
                self.stats.barrier_timeouts.fetch_add(1, Ordering::Relaxed);
                released.push(h.clone());
                false
            } else {
                true
            }
        });
        drop(w);
        for h in released {
            h.release();
        }
    }
}

/// An event for one channel, from the HTTP API or a wsify broadcast.
pub struct Publish {
    app: AppIdx,
    channel: ChannelName,
    event: Arc<str>,
    data: Arc<str>,
    content: Option<Arc<RawValue>>,
    exclude: Option<Arc<str>>,
    /// Whether the reply carries the channel's info (it costs a lookup).
    info: bool,
    reply: oneshot::Sender<Result<Accepted, PublishRefused>>,
    /// Tags for subscription filters (issue #13).
    tags: Option<Arc<Tags>>,
}

/// A publish a shard accepted: the channel's info (if asked) and the
/// receipts of its history frames, acknowledged before the answer.
pub struct Accepted {
    info: ChannelInfo,
    receipts: Vec<pushmesh_cluster::Receipt>,
}

/// Longest wait for a peer to acknowledge a history event before the
/// publish is answered anyway (the event is held for the peers).
const DURABLE_WAIT: Duration = Duration::from_secs(2);

/// Waits (bounded) until a peer holds each accepted history event.
async fn durable(receipts: &[pushmesh_cluster::Receipt], stats: &HubStats) {
    if receipts.is_empty() {
        return;
    }
    let deadline = tokio::time::Instant::now() + DURABLE_WAIT;
    if !pushmesh_cluster::first_ack(receipts, deadline).await {
        stats.history_unacked.fetch_add(1, Ordering::Relaxed);
    }
}

type Query = Box<dyn FnOnce(&Shard<ConnRef>, Instant) + Send>;

/// Work for a shard task.
enum Cmd {
    Req(ConnRef, Request),
    Publish(Box<Publish>),
    Remote(PeerFrame),
    Apply(Vec<(NodeId, Delta)>),
    Peers(BTreeSet<NodeId>, Vec<Origin>),
    /// Cached events and history for a peer whose link came up, then
    /// this shard's `CopyDone` frame (encoded).
    SendCache(NodeId, u64, bytes::Bytes),
    ShareOrigin(Origin),
    Query(Query),
}

/// A shard's counters, readable without asking the shard.
#[derive(Default)]
struct KindSlots([[AtomicUsize; 2]; 5], history::HistorySlots);

/// The node: apps, router shards, users, replication, connections.
pub struct Node {
    /// The apps served.
    pub apps: Arc<Apps>,
    shards: Vec<mpsc::Sender<Cmd>>,
    slots: Vec<Arc<KindSlots>>,
    users: Mutex<Users<ConnRef>>,
    /// Shared with the shard tasks.
    pub links: Arc<Links>,
    /// Open connections.
    pub registry: Registry,
    /// First part of every socket id of this node.
    pub socket_prefix: u32,
    /// Whether publishes are taken (joining, open, closed).
    pub gate: PublishGate,
    applying: AtomicUsize,
}

/// Settings of [`Node::start`].
pub struct NodeSettings {
    /// The apps.
    pub apps: Apps,
    /// This node's id.
    pub node_id: String,
    /// This incarnation.
    pub epoch: u64,
    /// Router shards (tasks).
    pub shards: usize,
    /// Commands queued per shard.
    pub shard_queue: usize,
    /// Most bytes of history on the node (split evenly over the shards).
    pub history_max_bytes: usize,
    /// Most connections on this node.
    pub max_connections: Option<usize>,
    /// First part of socket ids.
    pub socket_prefix: u32,
    /// Longest wait of the subscription barrier.
    pub barrier_wait: Duration,
    /// Whether the node must join a cluster before it takes publishes.
    pub joining: bool,
}

impl Node {
    /// Builds the node and spawns its shard tasks.
    pub fn start(
        s: NodeSettings,
        cluster: Option<pushmesh_cluster::Cluster>,
        mut hooks: WebhookScheduler,
    ) -> Self {
        let apps = Arc::new(s.apps);
        let node = NodeId::new(&s.node_id);
        hooks.set_origin(&s.node_id, s.epoch);
        let links = Arc::new(Links {
            cluster,
            replicator: Mutex::new(Replicator::new(node.clone(), s.epoch)),
            hooks: Mutex::new(hooks),
            waiters: Mutex::new(Vec::new()),
            barrier_wait: s.barrier_wait,
            hook_ready: Notify::new(),
            stats: HubStats::default(),
            hook_relay: HookRelay::new(node.clone(), s.epoch, apps.clone()),
        });
        let mut shards = Vec::new();
        let mut slots = Vec::new();
        let history = apps.iter().any(|(_, a)| a.history.is_some());
        let origin = Origin::of(&s.node_id, s.epoch);
        let wall_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let clock = (Instant::now(), wall_ms);
        for _ in 0..s.shards.max(1) {
            let (tx, rx) = mpsc::channel(s.shard_queue.max(16));
            let slot = Arc::new(KindSlots::default());
            let mut shard = Shard::new(apps.clone(), node.clone(), s.socket_prefix);
            if history {
                let budget = s.history_max_bytes / s.shards.max(1);
                shard.set_history(HistoryStore::new(origin, budget, clock));
            }
            tokio::spawn(shard_task::run_shard(
                shard,
                rx,
                links.clone(),
                slot.clone(),
            ));
            shards.push(tx);
            slots.push(slot);
        }
        Self {
            users: Mutex::new(Users::new(apps.clone())),
            registry: Registry::new(apps.len(), s.max_connections),
            apps,
            shards,
            slots,
            links,
            socket_prefix: s.socket_prefix,
            applying: AtomicUsize::new(0),
            gate: PublishGate(
                AtomicU8::new(if s.joining {
                    PublishGate::JOINING
                } else {
                    PublishGate::OPEN
                }),
                AtomicUsize::new(0),
            ),
        }
    }

    fn shard(&self, app: AppIdx, channel: &str) -> &mpsc::Sender<Cmd> {
        &self.shards[pushmesh_core::shard_of(app, channel, self.shards.len())]
    }

    async fn to_shard(&self, app: AppIdx, channel: &str, cmd: Cmd) {
        // A closed queue means the node is stopping; nothing to do then.
        let _ = self.shard(app, channel).send(cmd).await;
    }

    /// The socket id of a connection of this node.
    pub fn socket_id(&self, conn: ConnId) -> String {
        format!("{}.{}", self.socket_prefix, conn.0)
    }

    /// Queues a frame for one connection (its own session's output).
    pub fn send_to(&self, h: &ConnRef, frame: Bytes) {
        let mut sink = DriverSink::new(&self.links);
        sink.send(h, &frame);
        sink.finish();
    }

    /// Hands a session's request to its shard or to the user registry.
    pub async fn route(&self, h: &ConnRef, req: Request) {
        match req {
            Request::SignIn {
                app,
                user,
                watchlist,
                user_data,
            } => self.with_users(|u, sink| u.signin(h, app, &user, &watchlist, &user_data, sink)),
            Request::SignOut {
                app,
                user,
                watchlist,
            } => self.with_users(|u, sink| u.signout(h.0.id(), app, &user, &watchlist, sink)),
            req => {
                let Some((app, channel)) = req.channel().map(|(a, c)| (a, c.clone())) else {
                    return;
                };
                self.to_shard(app, channel.as_str(), Cmd::Req(h.clone(), req))
                    .await;
            }
        }
    }

    fn with_users<R>(&self, f: impl FnOnce(&mut Users<ConnRef>, &mut DriverSink<'_>) -> R) -> R {
        let mut sink = DriverSink::new(&self.links);
        let r = f(&mut lock(&self.users), &mut sink);
        sink.finish();
        r
    }

    /// Publishes one event (validated here) to its channels. Answers once
    /// the work is queued on the shards; with `info`, once it is done.
    pub async fn publish(
        &self,
        app: AppIdx,
        req: &PublishRequest<'_>,
        info: bool,
    ) -> Result<Vec<PublishedChannel>, PublishError> {
        let names = self.apps.validate_publish(app, req)?;
        self.publish_valid(app, names, req, info, None).await
    }

    /// [`Node::publish`] with tags (issue #13).
    pub async fn publish_tagged(
        &self,
        app: AppIdx,
        req: &PublishRequest<'_>,
        info: bool,
        tags: Option<Arc<Tags>>,
    ) -> Result<Vec<PublishedChannel>, PublishError> {
        let names = self.apps.validate_publish(app, req)?;
        self.publish_valid(app, names, req, info, tags).await
    }

    /// Publishes an event already validated with [`Apps::validate_publish`].
    pub async fn publish_valid(
        &self,
        app: AppIdx,
        names: Vec<ChannelName>,
        req: &PublishRequest<'_>,
        info: bool,
        tags: Option<Arc<Tags>>,
    ) -> Result<Vec<PublishedChannel>, PublishError> {
        let _entered = self.gate.enter().map_err(|r| self.refused(r))?;
        let event: Arc<str> = Arc::from(req.name);
        let data: Arc<str> = Arc::from(req.data);
        let exclude: Option<Arc<str>> = req.exclude_socket.map(Arc::from);
        let mut replies = Vec::with_capacity(names.len());
        for name in names {
            let (reply, rx) = oneshot::channel();
            let p = Publish {
                app,
                channel: name.clone(),
                event: event.clone(),
                data: data.clone(),
                content: None,
                exclude: exclude.clone(),
                info,
                reply,
                tags: tags.clone(),
            };
            self.to_shard(app, name.as_str(), Cmd::Publish(Box::new(p)))
                .await;
            replies.push((name, rx));
        }
        let mut out = Vec::with_capacity(replies.len());
        let mut refused = None;
        for (name, rx) in replies {
            match rx.await {
                Ok(Ok(a)) => {
                    durable(&a.receipts, &self.links.stats).await;
                    out.push(PublishedChannel { name, info: a.info });
                }
                Ok(Err(e)) => refused = Some(e),
                // The shard is gone: the node is stopping.
                Err(_) => return Err(self.refused(Refusal::Draining)),
            }
        }
        if let Some(e) = refused {
            tracing::debug!(error = %e, "publish refused");
            return Err(self.refused(Refusal::PeerBufferFull));
        }
        Ok(out)
    }

    /// Counts a refusal and makes the error the API answers 503 with.
    fn refused(&self, r: Refusal) -> PublishError {
        self.links.stats.refused[r as usize].fetch_add(1, Ordering::Relaxed);
        PublishError::Unavailable(r)
    }

    /// A wsify broadcast (from a client or `POST /broadcast`).
    pub async fn wsify_broadcast(
        &self,
        app: AppIdx,
        channel: &str,
        content: &RawValue,
        tags: Option<Arc<Tags>>,
    ) -> Result<(), PublishError> {
        let name = self.apps.validate_wsify_broadcast(app, channel, content)?;
        let _entered = self.gate.enter().map_err(|r| self.refused(r))?;
        let cfg = self.apps.get(app);
        let content: Arc<RawValue> = Arc::from(content.to_owned());
        let (reply, rx) = oneshot::channel();
        let p = Publish {
            app,
            channel: name.clone(),
            event: Arc::from(cfg.wsify_event.as_str()),
            data: Arc::from(content.get()),
            content: Some(content),
            exclude: None,
            info: false,
            reply,
            tags,
        };
        self.to_shard(app, name.as_str(), Cmd::Publish(Box::new(p)))
            .await;
        match rx.await {
            Ok(Ok(a)) => {
                durable(&a.receipts, &self.links.stats).await;
                Ok(())
            }
            Ok(Err(_)) => Err(self.refused(Refusal::PeerBufferFull)),
            Err(_) => Err(self.refused(Refusal::Draining)),
        }
    }

    /// `POST /users/{id}/terminate_connections`.
    pub fn terminate_user(&self, app: AppIdx, user: &str) -> usize {
        self.with_users(|u, sink| u.terminate(app, user, sink))
    }

    /// Per channel kind: (kind, occupied channels, subscriptions) on this
    /// node, as the shards last reported (never waits for them).
    pub fn channel_stats(&self) -> Vec<(&'static str, usize, usize)> {
        let mut out: Vec<_> = pushmesh_core::router::KINDS
            .iter()
            .map(|k| (*k, 0, 0))
            .collect();
        for s in &self.slots {
            for (o, slot) in out.iter_mut().zip(&s.0) {
                o.1 += slot[0].load(Ordering::Relaxed);
                o.2 += slot[1].load(Ordering::Relaxed);
            }
        }
        out
    }
}
