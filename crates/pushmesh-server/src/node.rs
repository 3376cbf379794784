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

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use pushmesh_core::history::{HistoryStore, Origin};
use pushmesh_core::machine::{Barrier, ShardInput, ShardMachine, ShardPublish};
use pushmesh_core::{
    filter::Tags, AppIdx, Apps, ChannelInfo, ConnId, NodeId, PublishError, PublishRefused,
    PublishRequest, PublishedChannel, Replicator, Request, Shard, Sink, Users, WebhookScheduler,
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
    pub refused: [AtomicU64; 4],
    /// History publishes answered before any peer acknowledged them
    /// (after `DURABLE_WAIT`).
    pub history_unacked: AtomicU64,
}

/// What the shard tasks share with the rest of the node.
pub struct Links {
    /// The cluster layer, when clustering is on.
    pub cluster: Option<pushmesh_cluster::Cluster>,
    replicator: Mutex<Replicator>,
    hooks: Mutex<WebhookScheduler>,
    waiters: Mutex<Barrier<ConnRef>>,
    barrier_wait: Duration,
    /// Longest wait of a publish's answer for its interested peers' acks.
    publish_ack_wait: Duration,
    /// Wakes the webhook pump when events were scheduled.
    pub hook_ready: Notify,
    /// Router counters.
    pub stats: HubStats,
    /// Webhook events handed to backups and held for peers.
    pub hook_relay: HookRelay,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
        let mut released = Vec::new();
        lock(&self.waiters).release(now, acked, &mut released);
        self.released(released);
    }

    /// Lets go connections the barrier released (counting timeouts).
    fn released(&self, released: Vec<pushmesh_core::machine::Released<ConnRef>>) {
        for r in released {
            if r.timed_out {
                self.stats.barrier_timeouts.fetch_add(1, Ordering::Relaxed);
            }
            r.conn.release();
        }
    }
}

/// A publish a shard accepted: the channel's info (if asked) and the
/// receipts of its data frames, acknowledged before the answer.
pub struct Accepted {
    info: ChannelInfo,
    receipts: Receipts,
}

/// The receipts of a publish's data frames to its peers.
#[derive(Default)]
pub struct Receipts {
    /// To peers with subscribers for it: every one must acknowledge.
    pub(crate) ordered: Vec<pushmesh_cluster::Receipt>,
    /// History copies to peers without: any one peer must hold the event.
    pub(crate) copies: Vec<pushmesh_cluster::Receipt>,
}

/// Longest wait for a peer to acknowledge a history event before the
/// publish is answered anyway (the event is held for the peers).
const DURABLE_WAIT: Duration = Duration::from_secs(2);

impl Receipts {
    fn extend(&mut self, other: Receipts) {
        self.ordered.extend(other.ordered);
        self.copies.extend(other.copies);
    }

    /// Waits until every peer with subscribers acknowledged (bounded by
    /// `ack_wait`: past it, 503 `peer_unacknowledged`), and for a history
    /// event until one peer holds it (bounded by 2 s: past it the answer
    /// is 2xx anyway, counted, the event held for the peers).
    async fn wait(&self, ack_wait: Duration, stats: &HubStats) -> Result<(), Refusal> {
        let start = tokio::time::Instant::now();
        // `publish_ack_ms = 0`: answered once the peers' buffers hold it.
        if !ack_wait.is_zero()
            && !pushmesh_cluster::all_acked(&self.ordered, start + ack_wait).await
        {
            return Err(Refusal::PeerUnacknowledged);
        }
        if self.copies.is_empty() || self.ordered.iter().any(pushmesh_cluster::Receipt::acked) {
            return Ok(());
        }
        if !pushmesh_cluster::first_ack(&self.copies, start + DURABLE_WAIT).await {
            stats.history_unacked.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

type Query = Box<dyn FnOnce(&Shard<ConnRef>, Instant) + Send>;

/// How a shard answers a publish.
type Reply = oneshot::Sender<Result<Accepted, PublishRefused>>;

/// Work for a shard task: an input of its [`ShardMachine`], or a
/// read-only query of its state.
enum Cmd {
    Input(ShardInput<ConnRef, Reply>),
    Query(Query),
}

/// A shard's counters, readable without asking the shard.
#[derive(Default)]
struct KindSlots([[AtomicUsize; 2]; 5], history::HistorySlots);

/// The node: apps, router shards, users, replication, connections.
pub struct Node {
    /// The apps served: a snapshot replaced whole when they change
    /// ([`Node::set_apps`]).
    apps: Arc<ArcSwap<Apps>>,
    /// Bumped with every new snapshot: a connection takes its app's new
    /// settings when it sees another number.
    apps_generation: AtomicU64,
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
    /// Longest wait of a publish's answer for its interested peers' acks.
    pub publish_ack_wait: Duration,
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
        let swap = Arc::new(ArcSwap::new(apps.clone()));
        let node = NodeId::new(&s.node_id);
        hooks.set_origin(&s.node_id, s.epoch);
        let links = Arc::new(Links {
            cluster,
            replicator: Mutex::new(Replicator::new(node.clone(), s.epoch)),
            hooks: Mutex::new(hooks),
            waiters: Mutex::new(Barrier::default()),
            barrier_wait: s.barrier_wait,
            publish_ack_wait: s.publish_ack_wait,
            hook_ready: Notify::new(),
            stats: HubStats::default(),
            hook_relay: HookRelay::new(node.clone(), s.epoch, swap.clone()),
        });
        let mut shards = Vec::new();
        let mut slots = Vec::new();
        let origin = Origin::of(&s.node_id, s.epoch);
        let wall_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let clock = (Instant::now(), wall_ms);
        for _ in 0..s.shards.max(1) {
            let (tx, rx) = mpsc::channel(s.shard_queue.max(16));
            let slot = Arc::new(KindSlots::default());
            let mut shard = Shard::new(apps.clone(), node.clone(), s.socket_prefix);
            // Every shard has a history store, empty until an app keeps
            // history: apps can be added at runtime.
            let budget = s.history_max_bytes / s.shards.max(1);
            shard.set_history(HistoryStore::new(origin, budget, clock));
            tokio::spawn(shard_task::run_shard(
                ShardMachine::new(shard),
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
            apps: swap,
            apps_generation: AtomicU64::new(0),
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

    /// The apps served now.
    pub fn apps(&self) -> Arc<Apps> {
        self.apps.load_full()
    }

    /// The number of the current apps snapshot.
    pub fn apps_generation(&self) -> u64 {
        self.apps_generation.load(Ordering::Acquire)
    }

    /// New apps (added, changed, removed; slots kept): every shard and the
    /// user registry take them, connections of a removed app are closed
    /// with 4001 and of a disabled one with 4003, the others take their
    /// app's new settings with their next frame.
    pub async fn set_apps(&self, apps: Apps) {
        let apps = Arc::new(apps);
        self.registry.grow(apps.len());
        lock(&self.users).set_apps(apps.clone());
        for s in &self.shards {
            let _ = s.send(Cmd::Input(ShardInput::Apps(apps.clone()))).await;
        }
        self.apps.store(apps.clone());
        self.apps_generation.fetch_add(1, Ordering::AcqRel);
        self.registry.close_unserved(&apps);
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
                let input = ShardInput::Request(h.clone(), req);
                h.routed();
                self.to_shard(app, channel.as_str(), Cmd::Input(input))
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

    /// Publishes one event (validated here) to its channels, with tags
    /// for subscription filters if given. Answers once every interested
    /// peer's buffer holds it; with `info`, once it is delivered here too.
    pub async fn publish(
        &self,
        app: AppIdx,
        req: &PublishRequest<'_>,
        info: bool,
        tags: Option<Arc<Tags>>,
    ) -> Result<Vec<PublishedChannel>, PublishError> {
        let names = self.apps().validate_publish(app, req)?;
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
        self.after_acknowledged_frames().await;
        let mut replies = Vec::with_capacity(names.len());
        for p in ShardPublish::each(app, names, req, tags, info) {
            let name = p.channel.clone();
            replies.push((name, self.to_shard_publish(p).await));
        }
        let mut out = Vec::with_capacity(replies.len());
        let mut refused = None;
        let mut receipts = Receipts::default();
        for (name, rx) in replies {
            match rx.await {
                Ok(Ok(a)) => {
                    receipts.extend(a.receipts);
                    out.push(PublishedChannel { name, info: a.info });
                }
                Ok(Err(e)) => refused = Some(e),
                // The shard is gone: the node is stopping.
                Err(_) => return Err(self.refused(Refusal::Draining)),
            }
        }
        // Every channel's peers at once: one wait, the slowest peer's.
        receipts
            .wait(self.links.publish_ack_wait, &self.links.stats)
            .await
            .map_err(|r| self.refused(r))?;
        if let Some(e) = refused {
            tracing::debug!(error = %e, "publish refused");
            return Err(self.refused(Refusal::PeerBufferFull));
        }
        Ok(out)
    }

    /// Waits until every peer frame this node has acknowledged is on its
    /// shard's queue, so a publish taken now goes after them (a peer's
    /// publish answered before this one was sent is delivered first here
    /// too). At once when nothing is pending; bounded by `publish_ack_ms`.
    async fn after_acknowledged_frames(&self) {
        if let (Some(c), false) = (&self.links.cluster, self.links.publish_ack_wait.is_zero()) {
            let deadline = tokio::time::Instant::now() + self.links.publish_ack_wait;
            if !c.caught_up(deadline).await {
                tracing::debug!("publish taken before the peers' frames were handled");
            }
        }
    }

    /// Queues a publish on its channel's shard; its answer comes on the receiver.
    async fn to_shard_publish(
        &self,
        p: ShardPublish,
    ) -> oneshot::Receiver<Result<Accepted, PublishRefused>> {
        let (reply, rx) = oneshot::channel();
        let (app, channel) = (p.app, p.channel.clone());
        let cmd = Cmd::Input(ShardInput::Publish(p, reply));
        self.to_shard(app, channel.as_str(), cmd).await;
        rx
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
        let name = self
            .apps()
            .validate_wsify_broadcast(app, channel, content)?;
        let _entered = self.gate.enter().map_err(|r| self.refused(r))?;
        self.after_acknowledged_frames().await;
        let content: Arc<RawValue> = Arc::from(content.to_owned());
        let p = ShardPublish {
            app,
            channel: name,
            event: Arc::from(self.apps().get(app).wsify_event.as_str()),
            data: Arc::from(content.get()),
            content: Some(content),
            exclude: None,
            tags,
            info: false,
        };
        match self.to_shard_publish(p).await.await {
            Ok(Ok(a)) => a
                .receipts
                .wait(self.links.publish_ack_wait, &self.links.stats)
                .await
                .map_err(|r| self.refused(r)),
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
