//! The node state machine: apps, connections, channels, presence, users.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use indexmap::{IndexMap, IndexSet};
use pushmesh_protocol::client::{ClientMessage, ParseError};
use pushmesh_protocol::server::{self, MemberRef, WatchlistEvent};
use pushmesh_protocol::sign::{self, AuthError};
use pushmesh_protocol::webhook::WebhookEvent;
use pushmesh_protocol::wsify;
use pushmesh_protocol::{ChannelKind, ChannelName, CloseCode, Limits};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::cluster::{ClusterState, Delta, FrameKind, NodeId, Remote};

/// How long a cache channel keeps its last event.
pub const CACHE_TTL: Duration = Duration::from_secs(30 * 60);

/// A connection, numbered by the driver; unique for the life of the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Index of an app in the node's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AppIdx(pub u32);

/// One application: credentials, switches and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppConfig {
    /// App id, used in the HTTP API path.
    pub id: String,
    /// Public key, used in the WebSocket path and in signatures.
    pub key: String,
    /// Secret for signatures.
    pub secret: String,
    /// A disabled app refuses connections (4003) and API calls (403).
    pub enabled: bool,
    /// Whether clients may send `client-` events.
    pub client_events: bool,
    /// Whether connections must sign in (else closed with 4009).
    pub user_authentication_required: bool,
    /// Most connections of this app on this node (4004 beyond).
    pub max_connections: Option<usize>,
    /// Whether to send `pusher_internal:subscription_count`.
    pub subscription_count_events: bool,
    /// Protocol limits.
    pub limits: Limits,
    /// Whether to emit [`Output::Hook`] events (the app has webhooks).
    pub webhooks: bool,
    /// Name of the Pusher event a wsify `broadcast` becomes.
    pub wsify_event: String,
}

/// Node-wide settings of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// The apps served.
    pub apps: Vec<AppConfig>,
    /// `activity_timeout` announced to clients, in seconds.
    pub activity_timeout_secs: u64,
    /// Most connections on this node (4100 beyond).
    pub max_connections: Option<usize>,
    /// First part of every socket id of this node (`<prefix>.<conn>`).
    pub socket_prefix: u32,
    /// This node's id in the cluster.
    pub node_id: String,
    /// This node's incarnation (e.g. its start time in ms), higher on each restart.
    pub epoch: u64,
}

/// What the core wants the driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Write a text frame to a connection.
    Send {
        /// Recipient.
        conn: ConnId,
        /// The encoded frame, shared by every recipient.
        frame: Bytes,
    },
    /// Close a connection with a Pusher code. The driver then calls
    /// [`Core::disconnect`] when the socket is gone.
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
        /// The encoded frame, shared by every recipient.
        frame: Bytes,
    },
    /// A webhook event of an app (only for apps with `webhooks`).
    Hook {
        /// The app.
        app: AppIdx,
        /// The event.
        event: WebhookEvent,
    },
}

/// Why a connection is refused at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The app is disabled.
    #[error("app is disabled")]
    AppDisabled,
    /// The app is over its connection quota.
    #[error("app is over its connection quota")]
    AppOverQuota,
    /// The node is over capacity.
    #[error("node is over capacity")]
    NodeOverCapacity,
}

impl OpenError {
    /// The close code that goes with the error.
    pub fn close_code(self) -> CloseCode {
        match self {
            Self::AppDisabled => CloseCode::AppDisabled,
            Self::AppOverQuota => CloseCode::OverConnectionQuota,
            Self::NodeOverCapacity => CloseCode::OverCapacity,
        }
    }
}

/// Why a publish through the HTTP API is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// No channel given.
    #[error("no channel given: set \"channel\" or \"channels\"")]
    NoChannels,
    /// Too many channels.
    #[error("too many channels: at most {0}")]
    TooManyChannels(usize),
    /// A bad channel name.
    #[error("invalid channel name {name:?}: {reason}")]
    InvalidChannel {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// Event name too long or empty.
    #[error("event name must be 1 to {0} characters")]
    EventName(usize),
    /// Data too large.
    #[error("event data is larger than {0} bytes")]
    DataTooLarge(usize),
    /// An encrypted channel in a multi-channel trigger.
    #[error("encrypted channels cannot be triggered together with other channels")]
    EncryptedMulti,
    /// Too many events in a batch.
    #[error("too many events in batch: at most {0}")]
    BatchTooLarge(usize),
}

/// Why a channel query is refused (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// A bad channel name.
    #[error("invalid channel name: {0}")]
    InvalidChannel(String),
    /// `user_count` or users asked of a non-presence channel.
    #[error("{0} is only available for presence channels")]
    PresenceOnly(&'static str),
}

/// One publish (one event to one or more channels).
#[derive(Debug, Clone)]
pub struct PublishRequest<'a> {
    /// Event name.
    pub name: &'a str,
    /// Event data, sent as a JSON string.
    pub data: &'a str,
    /// Target channel names, unvalidated.
    pub channels: &'a [String],
    /// The socket to leave out.
    pub exclude_socket: Option<&'a str>,
}

/// The state of one channel after a publish or on query.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChannelInfo {
    /// Whether anyone is subscribed.
    pub occupied: bool,
    /// Distinct users (presence channels).
    pub user_count: Option<usize>,
    /// Subscribed connections.
    pub subscription_count: usize,
    /// Cached event name and data, with seconds left, for cache channels.
    pub cache: Option<(String, String, u64)>,
}

/// A channel a publish reached.
#[derive(Debug, Clone)]
pub struct PublishedChannel {
    /// The channel.
    pub name: ChannelName,
    /// Its state after the publish.
    pub info: ChannelInfo,
}

pub(crate) struct App {
    pub(crate) cfg: AppConfig,
    pub(crate) channels: HashMap<ChannelName, Channel>,
    pub(crate) users: HashMap<String, User>,
    cache: HashMap<ChannelName, Cached>,
    /// Channels whose local count changed: replicate, notify.
    dirty_counts: IndexSet<ChannelName>,
    /// Channels whose remote count changed: notify local subscribers.
    pub(crate) dirty_events: IndexSet<ChannelName>,
    conn_count: usize,
    /// What other nodes hold, per channel.
    pub(crate) remote: HashMap<ChannelName, Remote>,
    /// Users signed in on other nodes.
    pub(crate) remote_users: HashMap<String, BTreeSet<NodeId>>,
}

#[derive(Default)]
pub(crate) struct Channel {
    /// Pusher connections.
    pub(crate) subscribers: IndexSet<ConnId>,
    /// wsify connections receiving raw content.
    wsify_raw: IndexSet<ConnId>,
    /// wsify connections receiving `{"channel","content"}` envelopes.
    wsify_env: IndexSet<ConnId>,
    pub(crate) members: IndexMap<String, Member>,
}

impl Channel {
    pub(crate) fn count(&self) -> usize {
        self.subscribers.len() + self.wsify_raw.len() + self.wsify_env.len()
    }

    fn set(&mut self, proto: Proto) -> &mut IndexSet<ConnId> {
        match proto {
            Proto::Pusher => &mut self.subscribers,
            Proto::Wsify { envelope: false } => &mut self.wsify_raw,
            Proto::Wsify { envelope: true } => &mut self.wsify_env,
        }
    }
}

/// Which protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Pusher,
    Wsify { envelope: bool },
}

pub(crate) struct Member {
    pub(crate) info: Option<Box<RawValue>>,
    conns: u32,
}

struct Cached {
    event: String,
    data: String,
    frame: Bytes,
    at: Instant,
}

#[derive(Default)]
pub(crate) struct User {
    pub(crate) conns: IndexSet<ConnId>,
    pub(crate) watchers: IndexSet<ConnId>,
}

struct SignedIn {
    id: String,
    watchlist: Vec<String>,
}

struct Conn {
    app: AppIdx,
    proto: Proto,
    socket_id: String,
    /// Channels, with the presence user id where there is one.
    subs: HashMap<ChannelName, Option<String>>,
    user: Option<SignedIn>,
    events_window: Instant,
    events_in_window: u32,
    closing: bool,
}

#[derive(Deserialize)]
struct ChannelData {
    user_id: serde_json::Value,
    #[serde(default)]
    user_info: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct UserData {
    id: String,
    #[serde(default)]
    watchlist: Option<Vec<String>>,
}

/// The node state machine. See the crate docs.
pub struct Core {
    pub(crate) apps: Vec<App>,
    pub(crate) by_id: HashMap<String, AppIdx>,
    by_key: HashMap<String, AppIdx>,
    conns: HashMap<ConnId, Conn>,
    pub(crate) out: VecDeque<Output>,
    pub(crate) cluster: ClusterState,
    activity_timeout_secs: u64,
    max_connections: Option<usize>,
    socket_prefix: u32,
}

impl Core {
    /// A core serving `config.apps`.
    pub fn new(config: CoreConfig) -> Self {
        let mut by_id = HashMap::new();
        let mut by_key = HashMap::new();
        let apps = config
            .apps
            .into_iter()
            .enumerate()
            .map(|(i, cfg)| {
                let idx = AppIdx(i as u32);
                by_id.insert(cfg.id.clone(), idx);
                by_key.insert(cfg.key.clone(), idx);
                App {
                    cfg,
                    channels: HashMap::new(),
                    users: HashMap::new(),
                    cache: HashMap::new(),
                    dirty_counts: IndexSet::new(),
                    dirty_events: IndexSet::new(),
                    conn_count: 0,
                    remote: HashMap::new(),
                    remote_users: HashMap::new(),
                }
            })
            .collect();
        Self {
            apps,
            by_id,
            by_key,
            conns: HashMap::new(),
            out: VecDeque::new(),
            cluster: ClusterState::new(NodeId::new(&config.node_id), config.epoch),
            activity_timeout_secs: config.activity_timeout_secs,
            max_connections: config.max_connections,
            socket_prefix: config.socket_prefix,
        }
    }

    /// The app with this key.
    pub fn app_by_key(&self, key: &str) -> Option<AppIdx> {
        self.by_key.get(key).copied()
    }

    /// The app with this id.
    pub fn app_by_id(&self, id: &str) -> Option<AppIdx> {
        self.by_id.get(id).copied()
    }

    /// An app's configuration.
    pub fn app(&self, app: AppIdx) -> &AppConfig {
        &self.apps[app.0 as usize].cfg
    }

    /// Connections open on this node.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The socket id of a connection.
    pub fn socket_id(&self, conn: ConnId) -> Option<&str> {
        self.conns.get(&conn).map(|c| c.socket_id.as_str())
    }

    fn send(&mut self, conn: ConnId, frame: Bytes) {
        self.out.push_back(Output::Send { conn, frame });
    }

    fn close(&mut self, conn: ConnId, code: CloseCode, reason: impl Into<String>) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.closing {
                return;
            }
            c.closing = true;
        }
        let reason = reason.into();
        let pusher = self
            .conns
            .get(&conn)
            .is_some_and(|c| c.proto == Proto::Pusher);
        if pusher {
            self.send(conn, server::error(&reason, Some(code.code())));
        }
        self.out.push_back(Output::Close { conn, code, reason });
    }

    fn error(&mut self, conn: ConnId, message: &str) {
        self.send(conn, server::error(message, None));
    }

    /// A new WebSocket connection for `app`. Queues `connection_established`.
    pub fn open(&mut self, _now: Instant, app: AppIdx, conn: ConnId) -> Result<String, OpenError> {
        let a = &self.apps[app.0 as usize];
        if !a.cfg.enabled {
            return Err(OpenError::AppDisabled);
        }
        if self.max_connections.is_some_and(|m| self.conns.len() >= m) {
            return Err(OpenError::NodeOverCapacity);
        }
        if a.cfg.max_connections.is_some_and(|m| a.conn_count >= m) {
            return Err(OpenError::AppOverQuota);
        }
        self.apps[app.0 as usize].conn_count += 1;
        let socket_id = format!("{}.{}", self.socket_prefix, conn.0);
        self.conns.insert(
            conn,
            Conn {
                app,
                proto: Proto::Pusher,
                socket_id: socket_id.clone(),
                subs: HashMap::new(),
                user: None,
                events_window: _now,
                events_in_window: 0,
                closing: false,
            },
        );
        self.send(
            conn,
            server::connection_established(&socket_id, self.activity_timeout_secs),
        );
        Ok(socket_id)
    }

    /// A binary frame, which the protocol does not use.
    pub fn handle_binary(&mut self, conn: ConnId) {
        self.error(
            conn,
            "binary frames are not supported; send JSON text frames",
        );
    }

    /// A text frame from a client.
    pub fn handle_frame(&mut self, now: Instant, conn: ConnId, text: &str) {
        match self.conns.get(&conn) {
            Some(c) if !c.closing => {}
            _ => return,
        }
        let msg = match ClientMessage::parse(text) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(conn = conn.0, error = %e, "refused client frame");
                let message = match &e {
                    ParseError::UnknownEvent(_) => e.to_string(),
                    _ => e.to_string(),
                };
                self.error(conn, &message);
                return;
            }
        };
        match msg {
            ClientMessage::Ping => self.send(conn, server::pong()),
            ClientMessage::Pong => {}
            ClientMessage::Subscribe {
                channel,
                auth,
                channel_data,
            } => self.subscribe(
                now,
                conn,
                &channel,
                auth.as_deref(),
                channel_data.as_deref(),
            ),
            ClientMessage::Unsubscribe { channel } => {
                if let Ok(name) = ChannelName::parse_with_limit(&channel, usize::MAX) {
                    self.unsubscribe(conn, &name);
                }
            }
            ClientMessage::Signin { auth, user_data } => self.signin(conn, &auth, &user_data),
            ClientMessage::ClientEvent {
                event,
                channel,
                data,
            } => self.client_event(now, conn, &event, &channel, &data),
        }
    }

    fn subscribe(
        &mut self,
        now: Instant,
        conn: ConnId,
        channel: &str,
        auth: Option<&str>,
        channel_data: Option<&str>,
    ) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let app = c.app;
        let cfg = &self.apps[app.0 as usize].cfg;
        let name = match ChannelName::parse_with_limit(channel, cfg.limits.max_channel_name_length)
        {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(conn = conn.0, error = %e, "refused subscribe");
                self.error(conn, &format!("invalid channel name {channel:?}: {e}"));
                return;
            }
        };
        let socket_id = c.socket_id.as_str();
        // Authorization.
        let auth_result: Result<(), String> = match name.kind() {
            ChannelKind::Public => Ok(()),
            ChannelKind::ServerToUser => match (&c.user, name.server_to_user_id()) {
                (Some(u), Some(id)) if u.id == id => Ok(()),
                _ => Err("only the signed-in user may subscribe to this channel".into()),
            },
            ChannelKind::Private | ChannelKind::PrivateEncrypted => match auth {
                None => Err("missing auth".into()),
                Some(a) => sign::verify_client_auth(
                    &cfg.key,
                    &cfg.secret,
                    a,
                    &sign::channel_string(socket_id, name.as_str()),
                )
                .map_err(|e: AuthError| e.to_string()),
            },
            ChannelKind::Presence => match (auth, channel_data) {
                (None, _) => Err("missing auth".into()),
                (_, None) => Err("missing channel_data".into()),
                (Some(a), Some(d)) => sign::verify_client_auth(
                    &cfg.key,
                    &cfg.secret,
                    a,
                    &sign::presence_string(socket_id, name.as_str(), d),
                )
                .map_err(|e: AuthError| e.to_string()),
            },
        };
        if let Err(e) = auth_result {
            tracing::debug!(conn = conn.0, channel = %name, error = %e, "subscription refused");
            let frame = server::subscription_error(name.as_str(), "AuthError", &e, 401);
            self.send(conn, frame);
            return;
        }

        if name.kind() == ChannelKind::Presence {
            if !self.subscribe_presence(conn, app, &name, channel_data.unwrap_or_default()) {
                return;
            }
        } else {
            self.add_subscriber(conn, app, Proto::Pusher, &name);
            self.send(conn, server::subscription_succeeded(name.as_str()));
        }
        if name.is_cache() {
            self.send_cached(now, conn, app, &name);
        }
    }

    fn subscribe_presence(
        &mut self,
        conn: ConnId,
        app: AppIdx,
        name: &ChannelName,
        data: &str,
    ) -> bool {
        let limits = self.apps[app.0 as usize].cfg.limits.clone();
        let parsed: ChannelData = match serde_json::from_str(data) {
            Ok(d) => d,
            Err(_) => {
                let f = server::subscription_error(
                    name.as_str(),
                    "AuthError",
                    "channel_data must be a JSON object with user_id",
                    400,
                );
                self.send(conn, f);
                return false;
            }
        };
        let user_id = match parsed.user_id {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            _ => String::new(),
        };
        let info_len = parsed.user_info.as_ref().map_or(0, |i| i.get().len());
        let problem = if user_id.is_empty() {
            Some("user_id must be a non-empty string or number")
        } else if user_id.len() > limits.max_user_id_length {
            Some("user_id is too long")
        } else if info_len > limits.max_presence_user_info_bytes {
            Some("user_info is too large")
        } else {
            None
        };
        if let Some(p) = problem {
            self.send(
                conn,
                server::subscription_error(name.as_str(), "AuthError", p, 400),
            );
            return false;
        }
        let remote_has = self.remote_member(app, name.as_str(), &user_id);
        let already = self.apps[app.0 as usize]
            .channels
            .get(name)
            .is_some_and(|c| c.subscribers.contains(&conn));
        if already {
            // Already subscribed: answer again, change nothing.
            let f = self.presence_frame(app, name);
            self.send(conn, f);
            return true;
        }
        let is_new_local = !self.apps[app.0 as usize]
            .channels
            .get(name)
            .is_some_and(|c| c.members.contains_key(&user_id));
        let is_new_member = is_new_local && !remote_has;
        if is_new_member && self.member_count(app, name.as_str()) >= limits.max_presence_members {
            let f = server::subscription_error(
                name.as_str(),
                "LimitReached",
                "presence channel is full",
                403,
            );
            self.send(conn, f);
            return false;
        }
        let info_json = parsed.user_info.as_ref().map(|i| i.get().to_owned());
        let a = &mut self.apps[app.0 as usize];
        let ch = a.channels.entry(name.clone()).or_default();
        let occupied = ch.count() == 0;
        if is_new_local {
            ch.members.insert(
                user_id.clone(),
                Member {
                    info: parsed.user_info,
                    conns: 1,
                },
            );
        } else if let Some(m) = ch.members.get_mut(&user_id) {
            m.conns += 1;
        }
        a.dirty_counts.insert(name.clone());
        if occupied {
            self.local_interest(app, name, true);
        }
        if is_new_local {
            let app_id = self.apps[app.0 as usize].cfg.id.clone();
            self.broadcast_delta(Delta::Member {
                app: app_id,
                channel: name.to_string(),
                user: user_id.clone(),
                info: info_json.clone(),
                add: true,
            });
        }
        if is_new_member {
            // To the subscribers already there, not to the joining connection.
            let info = info_json.and_then(|s| RawValue::from_string(s).ok());
            self.member_event(app, name.as_str(), &user_id, info.as_deref(), true);
        }
        if let Some(ch) = self.apps[app.0 as usize].channels.get_mut(name) {
            ch.subscribers.insert(conn);
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.subs.insert(name.clone(), Some(user_id));
        }
        let succeeded = self.presence_frame(app, name);
        self.send(conn, succeeded);
        true
    }

    /// Presence members of a channel, cluster-wide: local ones, then remote ones.
    fn members_union(&self, app: AppIdx, name: &str) -> Vec<(String, Option<Box<RawValue>>)> {
        let a = &self.apps[app.0 as usize];
        let local = a.channels.get(name);
        let mut out: Vec<(String, Option<Box<RawValue>>)> = local
            .map(|c| {
                c.members
                    .iter()
                    .map(|(id, m)| (id.clone(), m.info.clone()))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(r) = a.remote.get(name) {
            for (id, m) in &r.members {
                if !local.is_some_and(|c| c.members.contains_key(id)) {
                    out.push((id.clone(), m.info.clone()));
                }
            }
        }
        out
    }

    fn member_count(&self, app: AppIdx, name: &str) -> usize {
        let a = &self.apps[app.0 as usize];
        let local = a.channels.get(name);
        let remote_only = a.remote.get(name).map_or(0, |r| {
            r.members
                .keys()
                .filter(|id| !local.is_some_and(|c| c.members.contains_key(*id)))
                .count()
        });
        local.map_or(0, |c| c.members.len()) + remote_only
    }

    fn presence_frame(&self, app: AppIdx, name: &ChannelName) -> Bytes {
        let members = self.members_union(app, name.as_str());
        server::presence_subscription_succeeded(
            name.as_str(),
            members.iter().map(|(id, info)| MemberRef {
                id: id.as_str(),
                info: info.as_deref(),
            }),
        )
    }

    fn send_cached(&mut self, now: Instant, conn: ConnId, app: AppIdx, name: &ChannelName) {
        let a = &mut self.apps[app.0 as usize];
        match a.cache.get(name) {
            Some(c) if now.saturating_duration_since(c.at) < CACHE_TTL => {
                let f = c.frame.clone();
                self.send(conn, f);
            }
            _ => {
                a.cache.remove(name);
                let hook = a.cfg.webhooks;
                self.send(conn, server::cache_miss(name.as_str()));
                if hook {
                    let event = WebhookEvent::CacheMiss {
                        channel: name.to_string(),
                    };
                    self.out.push_back(Output::Hook { app, event });
                }
            }
        }
    }

    /// Adds a non-presence subscriber; idempotent.
    fn add_subscriber(&mut self, conn: ConnId, app: AppIdx, proto: Proto, name: &ChannelName) {
        let a = &mut self.apps[app.0 as usize];
        let ch = a.channels.entry(name.clone()).or_default();
        let occupied = ch.count() == 0;
        if !ch.set(proto).insert(conn) {
            return;
        }
        a.dirty_counts.insert(name.clone());
        if let Some(c) = self.conns.get_mut(&conn) {
            c.subs.insert(name.clone(), None);
        }
        if occupied {
            self.local_interest(app, name, true);
        }
    }

    fn unsubscribe(&mut self, conn: ConnId, name: &ChannelName) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(presence_user) = c.subs.remove(name) else {
            return;
        };
        let (app, proto) = (c.app, c.proto);
        let a = &mut self.apps[app.0 as usize];
        let Some(ch) = a.channels.get_mut(name) else {
            return;
        };
        ch.set(proto).swap_remove(&conn);
        let mut member_gone = None;
        if let Some(uid) = presence_user {
            let gone = match ch.members.get_mut(&uid) {
                Some(m) => {
                    m.conns -= 1;
                    m.conns == 0
                }
                None => false,
            };
            if gone {
                ch.members.swap_remove(&uid);
                member_gone = Some(uid);
            }
        }
        let empty = ch.count() == 0;
        a.dirty_counts.insert(name.clone());
        if empty {
            a.channels.remove(name);
        }
        if let Some(uid) = member_gone {
            let app_id = self.apps[app.0 as usize].cfg.id.clone();
            self.broadcast_delta(Delta::Member {
                app: app_id,
                channel: name.to_string(),
                user: uid.clone(),
                info: None,
                add: false,
            });
            if !self.remote_member(app, name.as_str(), &uid) {
                self.member_event(app, name.as_str(), &uid, None, false);
            }
        }
        if empty {
            self.local_interest(app, name, false);
        }
    }

    fn signin(&mut self, conn: ConnId, auth: &str, user_data: &str) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let app = c.app;
        let cfg = &self.apps[app.0 as usize].cfg;
        let limits = &cfg.limits;
        if let Err(e) = sign::verify_client_auth(
            &cfg.key,
            &cfg.secret,
            auth,
            &sign::signin_string(&c.socket_id, user_data),
        ) {
            tracing::debug!(conn = conn.0, error = %e, "sign-in refused");
            self.close(
                conn,
                CloseCode::Unauthorized,
                format!("sign-in failed: {e}"),
            );
            return;
        }
        let data: UserData = match serde_json::from_str(user_data) {
            Ok(d) => d,
            Err(_) => {
                self.close(
                    conn,
                    CloseCode::Unauthorized,
                    "sign-in failed: user_data must be a JSON object with a string id",
                );
                return;
            }
        };
        if data.id.is_empty() || data.id.len() > limits.max_user_id_length {
            let m = format!(
                "sign-in failed: id must be 1 to {} characters",
                limits.max_user_id_length
            );
            self.close(conn, CloseCode::Unauthorized, m);
            return;
        }
        let watchlist = data.watchlist.unwrap_or_default();
        if watchlist.len() > limits.max_watchlist_size {
            let m = format!(
                "watchlist is longer than {} users",
                limits.max_watchlist_size
            );
            self.close(conn, CloseCode::WatchlistLimit, m);
            return;
        }
        match &c.user {
            Some(u) if u.id == data.id => {
                self.send(conn, server::signin_success(user_data));
                return;
            }
            Some(_) => {
                self.error(conn, "already signed in as another user");
                return;
            }
            None => {}
        }
        let remote_online: Vec<bool> = watchlist
            .iter()
            .map(|w| self.remote_online(app, w))
            .collect();
        let was_online_elsewhere = self.remote_online(app, &data.id);
        let a = &mut self.apps[app.0 as usize];
        let user = a.users.entry(data.id.clone()).or_default();
        let came_online = user.conns.is_empty();
        user.conns.insert(conn);
        for w in &watchlist {
            a.users.entry(w.clone()).or_default().watchers.insert(conn);
        }
        let online: Vec<&str> = watchlist
            .iter()
            .zip(&remote_online)
            .filter(|(w, remote)| {
                **remote || a.users.get(w.as_str()).is_some_and(|u| !u.conns.is_empty())
            })
            .map(|(w, _)| w.as_str())
            .collect();
        let initial = (!watchlist.is_empty()).then(|| {
            server::watchlist_events(&[WatchlistEvent {
                name: "online",
                user_ids: online,
            }])
        });
        if came_online {
            let app_id = self.apps[app.0 as usize].cfg.id.clone();
            self.broadcast_delta(Delta::User {
                app: app_id,
                user: data.id.clone(),
                online: true,
            });
            if !was_online_elsewhere {
                self.watchlist_event(app, &data.id, true);
            }
        }
        self.send(conn, server::signin_success(user_data));
        if let Some(f) = initial {
            self.send(conn, f);
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.user = Some(SignedIn {
                id: data.id,
                watchlist,
            });
        }
    }

    fn client_event(&mut self, now: Instant, conn: ConnId, event: &str, channel: &str, data: &str) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let app = c.app;
        let cfg = &self.apps[app.0 as usize].cfg;
        let limits = &cfg.limits;
        if now.saturating_duration_since(c.events_window) >= Duration::from_secs(1) {
            c.events_window = now;
            c.events_in_window = 0;
        }
        c.events_in_window += 1;
        if c.events_in_window > limits.client_events_per_second {
            let m = format!(
                "client event rate limit exceeded: at most {} per second",
                limits.client_events_per_second
            );
            self.close(conn, CloseCode::ClientEventRateLimit, m);
            return;
        }
        let refusal = if !cfg.client_events {
            Some("client events are not enabled for this app".to_owned())
        } else if event.len() > limits.max_event_name_length {
            Some(format!(
                "event name is longer than {} characters",
                limits.max_event_name_length
            ))
        } else if data.len() > limits.max_event_payload_bytes {
            Some(format!(
                "event data is larger than {} bytes",
                limits.max_event_payload_bytes
            ))
        } else {
            None
        };
        if let Some(m) = refusal {
            self.error(conn, &m);
            return;
        }
        let Some((name, presence_user)) = c.subs.get_key_value(channel) else {
            self.error(
                conn,
                &format!(
                    "client event on {channel:?}, which this connection has not subscribed to"
                ),
            );
            return;
        };
        if !name.allows_client_events() {
            self.error(
                conn,
                "client events are only allowed on private and presence channels",
            );
            return;
        }
        let name = name.clone();
        let presence_user = presence_user.clone();
        let socket_id = c.socket_id.clone();
        if cfg.webhooks {
            // Fired where the event happens: once per cluster.
            let hook = WebhookEvent::ClientEvent {
                channel: name.to_string(),
                event: event.to_owned(),
                data: data.to_owned(),
                socket_id: socket_id.clone(),
                user_id: presence_user.clone(),
            };
            self.out.push_back(Output::Hook { app, event: hook });
        }
        self.deliver_local(
            now,
            app,
            &name,
            event,
            data,
            None,
            Some(conn),
            presence_user.as_deref(),
        );
        self.forward(
            app,
            &name,
            event,
            data,
            Some(&socket_id),
            presence_user.as_deref(),
        );
    }

    /// The driver saw the connection go away (or closed it). Cleans up its
    /// subscriptions, presence memberships and sign-in.
    pub fn disconnect(&mut self, _now: Instant, conn: ConnId) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let channels: Vec<ChannelName> = c.subs.keys().cloned().collect();
        for name in &channels {
            self.unsubscribe(conn, name);
        }
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        let a = &mut self.apps[c.app.0 as usize];
        a.conn_count = a.conn_count.saturating_sub(1);
        let Some(user) = c.user else { return };
        for w in &user.watchlist {
            if let Some(u) = a.users.get_mut(w) {
                u.watchers.swap_remove(&conn);
                if u.conns.is_empty() && u.watchers.is_empty() {
                    a.users.remove(w);
                }
            }
        }
        let Some(u) = a.users.get_mut(&user.id) else {
            return;
        };
        u.conns.swap_remove(&conn);
        if !u.conns.is_empty() {
            return;
        }
        let app = c.app;
        let app_id = a.cfg.id.clone();
        self.broadcast_delta(Delta::User {
            app: app_id,
            user: user.id.clone(),
            online: false,
        });
        if !self.remote_online(app, &user.id) {
            self.watchlist_event(app, &user.id, false);
        }
        let a = &mut self.apps[app.0 as usize];
        if a.users
            .get(&user.id)
            .is_some_and(|u| u.watchers.is_empty() && u.conns.is_empty())
        {
            a.users.remove(&user.id);
        }
    }

    /// Whether a connection has signed in (for apps that require it).
    pub fn is_signed_in(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| c.user.is_some())
    }

    /// The sign-in deadline passed: closes the connection unless it signed in.
    pub fn signin_deadline(&mut self, conn: ConnId) {
        if self.conns.contains_key(&conn) && !self.is_signed_in(conn) {
            self.close(
                conn,
                CloseCode::Unauthorized,
                "sign-in required: not signed in in time",
            );
        }
    }

    /// Closes a connection with `code` (drain, keepalive, slow consumer).
    pub fn close_connection(&mut self, conn: ConnId, code: CloseCode, reason: &str) {
        self.close(conn, code, reason);
    }

    /// Closes every connection with `code` (graceful shutdown: 4200).
    pub fn close_all(&mut self, code: CloseCode, reason: &str) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            self.close(id, code, reason);
        }
    }

    /// Publishes one event from the HTTP API. Every subscriber but the
    /// excluded socket gets the same encoded frame.
    pub fn publish(
        &mut self,
        now: Instant,
        app: AppIdx,
        req: &PublishRequest<'_>,
    ) -> Result<Vec<PublishedChannel>, PublishError> {
        let names = self.validate_publish(app, req)?;
        let exclude = req.exclude_socket.and_then(|s| self.local_conn_of(s));
        let mut published = Vec::with_capacity(names.len());
        for name in names {
            self.deliver_local(now, app, &name, req.name, req.data, None, exclude, None);
            self.forward(app, &name, req.name, req.data, req.exclude_socket, None);
            let info = self.info_of(now, app, &name);
            published.push(PublishedChannel { name, info });
        }
        Ok(published)
    }

    /// Remembers the last event of a cache channel; returns its frame.
    pub(crate) fn cache_event(
        &mut self,
        now: Instant,
        app: AppIdx,
        name: &ChannelName,
        event: &str,
        data: &str,
        user_id: Option<&str>,
    ) -> Bytes {
        let frame = server::channel_event(event, name.as_str(), data, user_id);
        if name.is_cache() {
            self.apps[app.0 as usize].cache.insert(
                name.clone(),
                Cached {
                    event: event.to_owned(),
                    data: data.to_owned(),
                    frame: frame.clone(),
                    at: now,
                },
            );
        }
        frame
    }

    /// Delivers one event to every local subscriber of a channel, Pusher and
    /// wsify alike, each protocol's frame encoded once. Never forwards.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn deliver_local(
        &mut self,
        now: Instant,
        app: AppIdx,
        name: &ChannelName,
        event: &str,
        data: &str,
        content: Option<&RawValue>,
        exclude: Option<ConnId>,
        user_id: Option<&str>,
    ) {
        let frame = self.cache_event(now, app, name, event, data, user_id);
        let a = &self.apps[app.0 as usize];
        let Some(ch) = a.channels.get(name) else {
            return;
        };
        self.out.reserve(ch.count());
        for s in ch.subscribers.iter().copied() {
            if Some(s) != exclude {
                self.out.push_back(Output::Send {
                    conn: s,
                    frame: frame.clone(),
                });
            }
        }
        if ch.wsify_raw.is_empty() && ch.wsify_env.is_empty() {
            return;
        }
        let owned;
        let content = match content {
            Some(c) => c,
            None => {
                owned = wsify::content_of_event_data(data);
                &owned
            }
        };
        for (set, frame) in [
            (&ch.wsify_raw, wsify::raw_frame(content.get())),
            (&ch.wsify_env, wsify::envelope_frame(name.as_str(), content)),
        ] {
            for s in set.iter().copied() {
                if Some(s) != exclude {
                    self.out.push_back(Output::Send {
                        conn: s,
                        frame: frame.clone(),
                    });
                }
            }
        }
    }

    /// A new wsify connection (no handshake frame: wsify has none).
    pub fn open_wsify(
        &mut self,
        now: Instant,
        app: AppIdx,
        conn: ConnId,
        envelope: bool,
    ) -> Result<String, OpenError> {
        let socket_id = self.open(now, app, conn)?;
        // Drop the Pusher handshake queued by open().
        if let Some(Output::Send { conn: c, .. }) = self.out.back() {
            if *c == conn {
                self.out.pop_back();
            }
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.proto = Proto::Wsify { envelope };
        }
        Ok(socket_id)
    }

    /// Checks a channel name a wsify client may use: public channels only
    /// (private, presence and encrypted channels need Pusher signatures).
    pub fn wsify_channel(&self, conn: ConnId, channel: &str) -> Result<ChannelName, String> {
        let max = self.conns.get(&conn).map_or(164, |c| {
            self.apps[c.app.0 as usize]
                .cfg
                .limits
                .max_channel_name_length
        });
        let name = ChannelName::parse_with_limit(channel, max).map_err(|e| e.to_string())?;
        if name.kind() != ChannelKind::Public {
            return Err(format!(
                "channel {channel:?} needs Pusher authorization; wsify clients may join public channels only"
            ));
        }
        Ok(name)
    }

    /// wsify `join`: idempotent (joining twice delivers once).
    pub fn wsify_join(&mut self, conn: ConnId, channel: &str) -> Result<(), String> {
        let name = self.wsify_channel(conn, channel)?;
        let Some(c) = self.conns.get(&conn) else {
            return Ok(());
        };
        let (app, proto) = (c.app, c.proto);
        self.add_subscriber(conn, app, proto, &name);
        Ok(())
    }

    /// wsify `leave`: leaving a channel never joined does nothing.
    pub fn wsify_leave(&mut self, conn: ConnId, channel: &str) {
        if let Ok(name) = ChannelName::parse_with_limit(channel, usize::MAX) {
            self.unsubscribe(conn, &name);
        }
    }

    /// A wsify `broadcast` (from a client or `POST /broadcast`): wsify
    /// clients get the content, Pusher clients the app's `wsify_event` with
    /// the content's JSON as `data`. The sender, if any, gets it too, as in wsify.
    pub fn wsify_broadcast(
        &mut self,
        now: Instant,
        app: AppIdx,
        channel: &str,
        content: &RawValue,
    ) -> Result<(), PublishError> {
        let cfg = &self.apps[app.0 as usize].cfg;
        let invalid = |reason: String| PublishError::InvalidChannel {
            name: channel.to_owned(),
            reason,
        };
        let name = ChannelName::parse_with_limit(channel, cfg.limits.max_channel_name_length)
            .map_err(|e| invalid(e.to_string()))?;
        if name.kind() != ChannelKind::Public {
            return Err(invalid(
                "wsify broadcasts go to public channels only".into(),
            ));
        }
        if content.get().len() > cfg.limits.max_event_payload_bytes {
            return Err(PublishError::DataTooLarge(
                cfg.limits.max_event_payload_bytes,
            ));
        }
        let event = cfg.wsify_event.clone();
        self.deliver_local(
            now,
            app,
            &name,
            &event,
            content.get(),
            Some(content),
            None,
            None,
        );
        self.forward(app, &name, &event, content.get(), None, None);
        Ok(())
    }

    /// Per channel kind: (kind, occupied channels, subscriptions) on this node.
    pub fn channel_stats(&self) -> Vec<(&'static str, usize, usize)> {
        let mut out = [
            ("public", 0, 0),
            ("private", 0, 0),
            ("private_encrypted", 0, 0),
            ("presence", 0, 0),
            ("server_to_user", 0, 0),
        ];
        for a in &self.apps {
            for (name, ch) in &a.channels {
                let i = match name.kind() {
                    ChannelKind::Public => 0,
                    ChannelKind::Private => 1,
                    ChannelKind::PrivateEncrypted => 2,
                    ChannelKind::Presence => 3,
                    ChannelKind::ServerToUser => 4,
                };
                out[i].1 += 1;
                out[i].2 += ch.count();
            }
        }
        out.to_vec()
    }

    /// Subscribers of a channel on this node only.
    pub fn local_subscriber_count(&self, app: AppIdx, channel: &str) -> usize {
        self.apps[app.0 as usize]
            .channels
            .get(channel)
            .map_or(0, Channel::count)
    }

    /// Presence members whose connections are on this node.
    pub fn local_members(&self, app: AppIdx, channel: &str) -> Vec<String> {
        self.apps[app.0 as usize]
            .channels
            .get(channel)
            .map(|c| c.members.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The app of a connection.
    pub fn app_of(&self, conn: ConnId) -> Option<AppIdx> {
        self.conns.get(&conn).map(|c| c.app)
    }

    /// The channels a connection is in.
    pub fn channels_of(&self, conn: ConnId) -> Vec<String> {
        self.conns
            .get(&conn)
            .map(|c| c.subs.keys().map(|n| n.to_string()).collect())
            .unwrap_or_default()
    }

    /// Checks a publish against the app's limits without doing it.
    pub fn validate_publish(
        &self,
        app: AppIdx,
        req: &PublishRequest<'_>,
    ) -> Result<Vec<ChannelName>, PublishError> {
        let limits = &self.apps[app.0 as usize].cfg.limits;
        if req.channels.is_empty() {
            return Err(PublishError::NoChannels);
        }
        if req.channels.len() > limits.max_event_channels {
            return Err(PublishError::TooManyChannels(limits.max_event_channels));
        }
        if req.name.is_empty() || req.name.len() > limits.max_event_name_length {
            return Err(PublishError::EventName(limits.max_event_name_length));
        }
        if req.data.len() > limits.max_event_payload_bytes {
            return Err(PublishError::DataTooLarge(limits.max_event_payload_bytes));
        }
        let names = req
            .channels
            .iter()
            .map(|c| {
                let max = if c.starts_with(pushmesh_protocol::channel::SERVER_TO_USER_PREFIX) {
                    usize::MAX
                } else {
                    limits.max_channel_name_length
                };
                ChannelName::parse_with_limit(c, max).map_err(|e| PublishError::InvalidChannel {
                    name: c.clone(),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if names.len() > 1
            && names
                .iter()
                .any(|n| n.kind() == ChannelKind::PrivateEncrypted)
        {
            return Err(PublishError::EncryptedMulti);
        }
        Ok(names)
    }

    pub(crate) fn local_conn_of(&self, socket_id: &str) -> Option<ConnId> {
        let (prefix, n) = socket_id.split_once('.')?;
        if prefix.parse::<u32>().ok()? != self.socket_prefix {
            return None;
        }
        Some(ConnId(n.parse().ok()?))
    }

    fn info_of(&self, now: Instant, app: AppIdx, name: &ChannelName) -> ChannelInfo {
        let a = &self.apps[app.0 as usize];
        let ch = a.channels.get(name);
        ChannelInfo {
            occupied: self.cluster_occupied(app, name),
            user_count: (name.kind() == ChannelKind::Presence)
                .then(|| self.member_count(app, name.as_str())),
            subscription_count: ch.map_or(0, Channel::count) + self.remote_count(app, name),
            cache: a.cache.get(name).and_then(|c| {
                let age = now.saturating_duration_since(c.at);
                (age < CACHE_TTL)
                    .then(|| (c.event.clone(), c.data.clone(), (CACHE_TTL - age).as_secs()))
            }),
        }
    }

    /// `GET /channels`: occupied channels, optionally filtered by prefix.
    pub fn channels(
        &self,
        now: Instant,
        app: AppIdx,
        prefix: Option<&str>,
        user_count: bool,
    ) -> Result<Vec<(ChannelName, ChannelInfo)>, QueryError> {
        if user_count && !prefix.is_some_and(|p| p.starts_with("presence-")) {
            return Err(QueryError::PresenceOnly("user_count"));
        }
        let a = &self.apps[app.0 as usize];
        let names: BTreeSet<&ChannelName> = a
            .channels
            .iter()
            .filter(|(_, c)| c.count() > 0)
            .map(|(n, _)| n)
            .chain(
                a.remote
                    .iter()
                    .filter(|(_, r)| !r.interested.is_empty())
                    .map(|(n, _)| n),
            )
            .filter(|n| {
                n.kind() != ChannelKind::ServerToUser
                    && prefix.is_none_or(|p| n.as_str().starts_with(p))
            })
            .collect();
        let mut out: Vec<_> = names
            .into_iter()
            .map(|n| (n.clone(), self.info_of(now, app, n)))
            .collect();
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
        let name = ChannelName::parse_with_limit(name, usize::MAX)
            .map_err(|e| QueryError::InvalidChannel(e.to_string()))?;
        if user_count && name.kind() != ChannelKind::Presence {
            return Err(QueryError::PresenceOnly("user_count"));
        }
        Ok(self.info_of(now, app, &name))
    }

    /// `GET /channels/{name}/users`: the presence members' ids.
    pub fn channel_users(&self, app: AppIdx, name: &str) -> Result<Vec<String>, QueryError> {
        let name = ChannelName::parse_with_limit(name, usize::MAX)
            .map_err(|e| QueryError::InvalidChannel(e.to_string()))?;
        if name.kind() != ChannelKind::Presence {
            return Err(QueryError::PresenceOnly("users"));
        }
        Ok(self
            .members_union(app, name.as_str())
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// `POST /users/{id}/terminate_connections`: closes every connection of
    /// the user, on this node and (through peers) everywhere.
    pub fn terminate_user(&mut self, app: AppIdx, user_id: &str) -> usize {
        self.forward_terminate(app, user_id);
        self.terminate_local(app, user_id)
    }

    /// Periodic work: count replication, `subscription_count` events and
    /// webhooks (coalesced per tick), cache expiry.
    pub fn tick(&mut self, now: Instant) {
        for idx in 0..self.apps.len() {
            let app = AppIdx(idx as u32);
            let a = &mut self.apps[idx];
            a.cache
                .retain(|_, c| now.saturating_duration_since(c.at) < CACHE_TTL);
            let local = std::mem::take(&mut a.dirty_counts);
            let mut remote = std::mem::take(&mut a.dirty_events);
            for name in &local {
                let count = self.apps[idx].channels.get(name).map_or(0, Channel::count);
                let app_id = self.apps[idx].cfg.id.clone();
                self.broadcast_delta(Delta::Count {
                    app: app_id,
                    channel: name.to_string(),
                    count,
                });
                remote.swap_remove(name);
            }
            for name in local.iter().chain(remote.iter()) {
                let total = self.apps[idx].channels.get(name).map_or(0, Channel::count)
                    + self.remote_count(app, name);
                // Presence channels count members, not subscriptions (as Pusher).
                if name.kind() == ChannelKind::Presence {
                    continue;
                }
                let event = WebhookEvent::SubscriptionCount {
                    channel: name.to_string(),
                    subscription_count: total,
                };
                self.hook(app, name.as_str(), event);
                let a = &self.apps[idx];
                if !a.cfg.subscription_count_events {
                    continue;
                }
                let Some(ch) = a.channels.get(name) else {
                    continue;
                };
                let f = server::subscription_count(name.as_str(), total);
                let subs: Vec<ConnId> = ch.subscribers.iter().copied().collect();
                for s in subs {
                    self.out.push_back(Output::Send {
                        conn: s,
                        frame: f.clone(),
                    });
                }
            }
        }
    }
}
