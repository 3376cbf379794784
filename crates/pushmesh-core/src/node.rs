//! [`Core`]: a whole node's state machines composed in one synchronous,
//! single-threaded driver: sessions, router shards, the user registry and
//! the replicator, wired exactly as the server wires them across tasks.
//! The unit, property and simulation tests drive it with virtual time;
//! its outputs are collected as [`Output`]s.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pushmesh_protocol::webhook::WebhookEvent;
use pushmesh_protocol::{ChannelName, CloseCode};

use crate::app::{
    AppConfig, AppIdx, Apps, ConnId, CoreConfig, OpenError, PublishError, PublishRequest,
};
use crate::hook_backup::HookBackup;
use crate::machine::{Barrier, Batch, ShardInput, ShardMachine, ShardSink};
use crate::peer_frame::{Delta, FrameKind, NodeId};
use crate::replication::Replicator;
use crate::router::{ChannelInfo, PublishRefused, QueryError, Shard, KINDS};
use crate::routing::shard_of;
use crate::session::{Request, Session, SessionOutput};
use crate::sink::Sink;
use crate::users::Users;

mod history;
mod hooks;
mod presence_limit;

/// Shards of the test driver: more than one, so tests cross shards.
const SHARDS: usize = 4;

/// What the node wants the driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Write a text frame to a connection.
    Send {
        /// Recipient.
        conn: ConnId,
        /// The encoded frame, shared by every recipient.
        frame: Bytes,
    },
    /// Close a connection (the `pusher:error` with the same code is queued just before).
    Close {
        /// Connection.
        conn: ConnId,
        /// Close code.
        code: CloseCode,
        /// Human-readable reason.
        reason: String,
    },
    /// A frame for a peer node.
    Peer {
        /// Recipient.
        to: NodeId,
        /// Data (channel message) or control.
        kind: FrameKind,
        /// The encoded frame.
        frame: Bytes,
    },
    /// A webhook event of an app.
    Hook {
        /// The app.
        app: AppIdx,
        /// The event.
        event: WebhookEvent,
    },
    /// A webhook event this node held for a peer that is gone: deliver it
    /// (see `hook_backup.rs`).
    HookReleased {
        /// Its stable id.
        id: String,
        /// The app.
        app: AppIdx,
        /// The event.
        event: WebhookEvent,
    },
}

/// A channel a publish reached.
#[derive(Debug, Clone)]
pub struct PublishedChannel {
    /// The channel.
    pub name: ChannelName,
    /// Its state after the publish.
    pub info: ChannelInfo,
}

/// Longest wait of a held connection for the peers before it is released
/// anyway (the server's default `subscribe_barrier_ms`).
const BARRIER_WAIT: Duration = Duration::from_secs(1);

/// A connection held by the subscription barrier: its holds and its frames.
#[derive(Default)]
struct Gate {
    holds: u32,
    frames: VecDeque<Output>,
}

struct CollectSink<'a> {
    out: &'a mut VecDeque<Output>,
    sessions: &'a mut HashMap<ConnId, Session>,
    batch: &'a mut Batch<ConnId>,
    gates: &'a mut HashMap<ConnId, Gate>,
    answer: &'a mut Option<Result<ChannelInfo, PublishRefused>>,
    full: &'a std::collections::BTreeSet<NodeId>,
}

impl CollectSink<'_> {
    fn emit(&mut self, conn: ConnId, o: Output) {
        match self.gates.get_mut(&conn) {
            Some(g) => g.frames.push_back(o),
            None => self.out.push_back(o),
        }
    }
}

impl Sink<ConnId> for CollectSink<'_> {
    fn send(&mut self, to: &ConnId, frame: &Bytes) {
        self.emit(
            *to,
            Output::Send {
                conn: *to,
                frame: frame.clone(),
            },
        );
    }

    fn hold(&mut self, to: &ConnId) {
        self.gates.entry(*to).or_default().holds += 1;
        self.batch.hold(*to);
    }

    fn close(&mut self, to: &ConnId, code: CloseCode, reason: &str) {
        if let Some(s) = self.sessions.get_mut(to) {
            s.close(code, reason);
            let mut todo = Vec::new();
            while let Some(o) = s.poll() {
                todo.push(o);
            }
            for o in todo {
                match o {
                    SessionOutput::Send(frame) => self.emit(*to, Output::Send { conn: *to, frame }),
                    SessionOutput::Close { code, reason } => self.emit(
                        *to,
                        Output::Close {
                            conn: *to,
                            code,
                            reason,
                        },
                    ),
                    SessionOutput::Route(_) => {}
                }
            }
        }
    }

    fn peer_has_room(&mut self, to: &NodeId) -> bool {
        !self.full.contains(to)
    }

    fn peer(&mut self, to: &NodeId, kind: FrameKind, frame: &Bytes) {
        self.out.push_back(Output::Peer {
            to: to.clone(),
            kind,
            frame: frame.clone(),
        });
    }

    fn hook(&mut self, app: AppIdx, event: WebhookEvent) {
        self.batch.hook(app, event);
    }

    fn replicate(&mut self, delta: Delta) {
        self.batch.replicate(delta);
    }
}

impl ShardSink<ConnId> for CollectSink<'_> {
    type Reply = ();

    fn answer(&mut self, _: (), outcome: Result<ChannelInfo, PublishRefused>) {
        *self.answer = Some(outcome);
    }
}

/// A node's state machines in one synchronous driver. See the module docs.
pub struct Core {
    apps: Arc<Apps>,
    sessions: HashMap<ConnId, Session>,
    conn_counts: Vec<usize>,
    shards: Vec<ShardMachine<ConnId>>,
    users: Users<ConnId>,
    replicator: Replicator,
    out: VecDeque<Output>,
    batch: Batch<ConnId>,
    gates: HashMap<ConnId, Gate>,
    answer: Option<Result<ChannelInfo, PublishRefused>>,
    barrier: Barrier<ConnId>,
    barrier_timeouts: u64,
    /// The latest time the driver gave: the time of the calls that take none.
    now: Instant,
    /// Peers whose data buffer is full, as the driver last said.
    full: std::collections::BTreeSet<NodeId>,
    timed_out: std::collections::HashSet<ConnId>,
    activity_timeout_secs: u64,
    max_connections: Option<usize>,
    socket_prefix: u32,
    hook_backup: HookBackup,
}

macro_rules! sink {
    ($s:ident) => {
        CollectSink {
            out: &mut $s.out,
            sessions: &mut $s.sessions,
            batch: &mut $s.batch,
            gates: &mut $s.gates,
            answer: &mut $s.answer,
            full: &$s.full,
        }
    };
}

// After the macro: it uses `sink!`.
mod peers;
mod publish;
mod tagged;

impl Core {
    /// A node serving `config.apps`, with 4 router shards, started at `now`.
    pub fn new(now: Instant, config: CoreConfig) -> Self {
        Self::with_shards(now, config, SHARDS)
    }

    /// A node serving `config.apps`, with `shards` router shards.
    pub fn with_shards(now: Instant, config: CoreConfig, shards: usize) -> Self {
        let apps = Arc::new(Apps::new(config.apps));
        let node = NodeId::new(&config.node_id);
        let shards = shards.max(1);
        let origin = crate::history::Origin::of(&config.node_id, config.epoch);
        // Every shard has a history store, empty until an app keeps
        // history: apps can be added at runtime (`set_apps`).
        // Tests run on a virtual clock: Unix ms count from its start.
        let clock = (now, 0);
        Self {
            conn_counts: vec![0; apps.len()],
            shards: (0..shards)
                .map(|_| {
                    let mut s = Shard::new(apps.clone(), node.clone(), config.socket_prefix);
                    let budget = config.history_max_bytes / shards;
                    s.set_history(crate::history::HistoryStore::new(origin, budget, clock));
                    ShardMachine::new(s)
                })
                .collect(),
            users: Users::new(apps.clone()),
            hook_backup: HookBackup::new(node.clone(), config.epoch),
            replicator: Replicator::new(node, config.epoch),
            apps,
            sessions: HashMap::new(),
            out: VecDeque::new(),
            batch: Batch::default(),
            gates: HashMap::new(),
            answer: None,
            barrier: Barrier::default(),
            barrier_timeouts: 0,
            now,
            full: std::collections::BTreeSet::new(),
            timed_out: std::collections::HashSet::new(),
            activity_timeout_secs: config.activity_timeout_secs,
            max_connections: config.max_connections,
            socket_prefix: config.socket_prefix,
        }
    }

    /// The apps changed (the admin API's view replicated here, or a
    /// reloaded file): every machine takes the new snapshot; connections
    /// of a removed app are closed with 4001, of a disabled one with 4003;
    /// the others take the app's new settings.
    pub fn set_apps(&mut self, now: Instant, apps: Apps) {
        let apps = Arc::new(apps);
        self.conn_counts.resize(apps.len(), 0);
        {
            let mut sink = sink!(self);
            for s in &mut self.shards {
                s.handle(now, ShardInput::Apps(apps.clone()), &mut sink);
            }
        }
        self.users.set_apps(apps.clone());
        self.apps = apps.clone();
        let mut conns: Vec<ConnId> = self.sessions.keys().copied().collect();
        conns.sort();
        for conn in conns {
            let Some(s) = self.sessions.get_mut(&conn) else {
                continue;
            };
            if let Some((code, why)) = s.app_changed(&apps) {
                s.close(code, why);
                self.pump(now, conn);
            }
        }
    }

    /// The apps this node serves now.
    pub fn apps(&self) -> &Arc<Apps> {
        &self.apps
    }

    /// The app with this key.
    pub fn app_by_key(&self, key: &str) -> Option<AppIdx> {
        self.apps.by_key(key)
    }

    /// The app with this id.
    pub fn app_by_id(&self, id: &str) -> Option<AppIdx> {
        self.apps.by_id(id)
    }

    /// An app's configuration.
    pub fn app(&self, app: AppIdx) -> &AppConfig {
        self.apps.get(app)
    }

    /// Connections open on this node.
    pub fn connection_count(&self) -> usize {
        self.sessions.len()
    }

    /// The driver's view of `peer`'s data buffer: while it has no room, a
    /// publish the peer is interested in is refused (503, nothing
    /// delivered), as the server's shards ask the cluster layer.
    pub fn set_peer_room(&mut self, peer: &NodeId, room: bool) {
        if room {
            self.full.remove(peer);
        } else {
            self.full.insert(peer.clone());
        }
    }

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The socket id of a connection.
    pub fn socket_id(&self, conn: ConnId) -> Option<&str> {
        self.sessions.get(&conn).map(Session::socket_id)
    }

    fn shard(&self, app: AppIdx, channel: &str) -> usize {
        shard_of(app, channel, self.shards.len())
    }

    /// Moves a session's outputs out, routing its requests.
    fn pump(&mut self, now: Instant, conn: ConnId) {
        self.now = self.now.max(now);
        let mut todo = Vec::new();
        if let Some(s) = self.sessions.get_mut(&conn) {
            while let Some(o) = s.poll() {
                todo.push(o);
            }
        }
        for o in todo {
            match o {
                SessionOutput::Send(frame) => self.out.push_back(Output::Send { conn, frame }),
                SessionOutput::Close { code, reason } => {
                    self.out.push_back(Output::Close { conn, code, reason })
                }
                SessionOutput::Route(req) => self.route(now, conn, req),
            }
        }
        self.flush_deltas();
    }

    fn route(&mut self, now: Instant, conn: ConnId, req: Request) {
        let mut sink = sink!(self);
        match req {
            Request::SignIn {
                app,
                user,
                watchlist,
                user_data,
            } => self
                .users
                .signin(&conn, app, &user, &watchlist, &user_data, &mut sink),
            Request::SignOut {
                app,
                user,
                watchlist,
            } => self.users.signout(conn, app, &user, &watchlist, &mut sink),
            req => {
                let Some((app, channel)) = req.channel() else {
                    return;
                };
                let i = shard_of(app, channel.as_str(), self.shards.len());
                self.shards[i].handle(now, ShardInput::Request(conn, req), &mut sink);
            }
        }
    }

    /// A new WebSocket connection for `app`. Queues `connection_established`.
    pub fn open(&mut self, now: Instant, app: AppIdx, conn: ConnId) -> Result<String, OpenError> {
        let socket_id = self.admit(app, conn)?;
        let cfg = self.apps.get(app).clone();
        let s = Session::pusher(now, conn, app, cfg, &socket_id, self.activity_timeout_secs);
        self.sessions.insert(conn, s);
        self.pump(now, conn);
        Ok(socket_id)
    }

    /// A new wsify connection (no handshake frame: wsify has none).
    pub fn open_wsify(
        &mut self,
        now: Instant,
        app: AppIdx,
        conn: ConnId,
        envelope: bool,
    ) -> Result<String, OpenError> {
        let socket_id = self.admit(app, conn)?;
        let cfg = self.apps.get(app).clone();
        let s = Session::wsify(now, conn, app, cfg, &socket_id, envelope);
        self.sessions.insert(conn, s);
        Ok(socket_id)
    }

    fn admit(&mut self, app: AppIdx, conn: ConnId) -> Result<String, OpenError> {
        let cfg = self.apps.get(app);
        if !cfg.enabled {
            return Err(OpenError::AppDisabled);
        }
        if self
            .max_connections
            .is_some_and(|m| self.sessions.len() >= m)
        {
            return Err(OpenError::NodeOverCapacity);
        }
        let n = &mut self.conn_counts[app.0 as usize];
        if cfg.max_connections.is_some_and(|m| *n >= m) {
            return Err(OpenError::AppOverQuota);
        }
        *n += 1;
        Ok(format!("{}.{}", self.socket_prefix, conn.0))
    }

    /// A binary frame, which the protocol does not use.
    pub fn handle_binary(&mut self, conn: ConnId) {
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.handle_binary();
        }
        self.pump(self.now, conn);
    }

    /// A text frame from a client.
    pub fn handle_frame(&mut self, now: Instant, conn: ConnId, text: &str) {
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.handle_frame(now, text);
        }
        self.pump(now, conn);
    }

    /// The driver saw the connection go away (or closed it).
    pub fn disconnect(&mut self, now: Instant, conn: ConnId) {
        let Some(s) = self.sessions.get_mut(&conn) else {
            return;
        };
        s.disconnect();
        let app = s.app();
        self.pump(now, conn);
        self.sessions.remove(&conn);
        let n = &mut self.conn_counts[app.0 as usize];
        *n = n.saturating_sub(1);
    }

    /// Whether a connection has signed in.
    pub fn is_signed_in(&self, conn: ConnId) -> bool {
        self.sessions.get(&conn).is_some_and(Session::is_signed_in)
    }

    /// The sign-in deadline passed: closes the connection unless it signed in.
    pub fn signin_deadline(&mut self, conn: ConnId) {
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.signin_deadline();
        }
        self.pump(self.now, conn);
    }

    /// Closes a connection with `code`.
    pub fn close_connection(&mut self, conn: ConnId, code: CloseCode, reason: &str) {
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.close(code, reason);
        }
        self.pump(self.now, conn);
    }

    /// Closes every connection with `code`.
    pub fn close_all(&mut self, code: CloseCode, reason: &str) {
        let ids: Vec<ConnId> = self.sessions.keys().copied().collect();
        for id in ids {
            self.close_connection(id, code, reason);
        }
    }

    /// Per channel kind: (kind, occupied channels, subscriptions) on this node.
    pub fn channel_stats(&self) -> Vec<(&'static str, usize, usize)> {
        let mut out: Vec<_> = KINDS.iter().map(|k| (*k, 0, 0)).collect();
        for s in &self.shards {
            for (i, k) in s.shard().stats().iter().enumerate() {
                out[i].1 += k.channels;
                out[i].2 += k.subscriptions;
            }
        }
        out
    }

    /// Subscribers of a channel on this node only.
    pub fn local_subscriber_count(&self, app: AppIdx, channel: &str) -> usize {
        self.shards[self.shard(app, channel)]
            .shard()
            .local_subscriber_count(app, channel)
    }

    /// Presence members whose connections are on this node.
    pub fn local_members(&self, app: AppIdx, channel: &str) -> Vec<String> {
        self.shards[self.shard(app, channel)]
            .shard()
            .local_members(app, channel)
    }

    /// `GET /channels`: occupied channels, optionally filtered by prefix.
    pub fn channels(
        &self,
        now: Instant,
        app: AppIdx,
        prefix: Option<&str>,
        user_count: bool,
    ) -> Result<Vec<(ChannelName, ChannelInfo)>, QueryError> {
        crate::router::check_channels_query(prefix, user_count)?;
        let mut out = Vec::new();
        for s in &self.shards {
            s.shard().occupied(now, app, prefix, &mut out);
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// `GET /channels/{name}`.
    pub fn channel(
        &self,
        now: Instant,
        app: AppIdx,
        name: &str,
        user_count: bool,
    ) -> Result<ChannelInfo, QueryError> {
        let name = crate::router::check_channel_query(name, user_count)?;
        Ok(self.shards[self.shard(app, name.as_str())]
            .shard()
            .info(now, app, &name))
    }

    /// `GET /channels/{name}/users`: the presence members' ids.
    pub fn channel_users(&self, app: AppIdx, name: &str) -> Result<Vec<String>, QueryError> {
        let name = crate::router::check_users_query(name)?;
        Ok(self.shards[self.shard(app, name.as_str())]
            .shard()
            .users(app, &name))
    }

    /// `POST /users/{id}/terminate_connections`.
    pub fn terminate_user(&mut self, app: AppIdx, user_id: &str) -> usize {
        let mut sink = sink!(self);
        self.users.terminate(app, user_id, &mut sink)
    }

    /// Time passed: the shards' periodic work that is due, and held
    /// connections past their deadline.
    pub fn tick(&mut self, now: Instant) {
        self.now = self.now.max(now);
        for i in 0..self.shards.len() {
            let mut sink = sink!(self);
            self.shards[i].handle_timeout(now, &mut sink);
        }
        self.flush_deltas();
    }

    /// When the node next needs [`Core::tick`]: the earliest of the shards'
    /// timers and the barrier's deadlines; `None` when nothing is timed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let shards = self.shards.iter().filter_map(ShardMachine::poll_timeout);
        shards.chain(self.barrier.poll_timeout()).min()
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        self.replicator.node()
    }

    /// Checks a publish against the app's limits without doing it.
    pub fn validate_publish(
        &self,
        app: AppIdx,
        req: &PublishRequest<'_>,
    ) -> Result<Vec<ChannelName>, PublishError> {
        self.apps.validate_publish(app, req)
    }

    /// The channels a connection asked for.
    pub fn channels_of(&self, conn: ConnId) -> Vec<String> {
        self.sessions
            .get(&conn)
            .map(|s| s.channels().map(ToString::to_string).collect())
            .unwrap_or_default()
    }
}
