//! The router: channel tables, presence and what peers hold, split into
//! shards by channel. A [`Shard`] owns every channel that hashes to it
//! ([`crate::routing::shard_of`]): its subscribers, presence members, cached
//! event, and the peers' interest, counts and members for it. A publish
//! touches one shard only; shards share nothing, so a driver runs each on
//! its own task (or behind its own lock) with no node-wide lock.
//!
//! Every method takes `now` and a [`Sink`] that receives the effects in order.
//!
//! The inputs are typed: a [`Publish`] (an [`Event`] with optional tags),
//! a [`Subscribe`] (optional presence member, selector and history
//! position), a [`ClientEvent`], a peer's [`PeerFrame`] for one of the
//! shard's channels ([`Shard::handle_channel_frame`]; every event arrives
//! as one [`PeerFrame::Event`]), a peer's [`Delta`] ([`Shard::apply_remote`]).
//!
//! A publish is [`Shard::hand_to_peers`] (may be refused: nothing is
//! delivered anywhere) then [`Shard::deliver_local`] (cannot fail), or both
//! at once with [`Shard::publish`]; `publish.rs`.

mod counts;
mod filter;
mod history;
mod history_state;
mod history_sync;
mod presence;
mod presence_limit;
mod publish;
mod query;
mod remote;
mod subscribe;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use indexmap::{IndexMap, IndexSet};
use pushmesh_protocol::server;
use pushmesh_protocol::webhook::WebhookEvent;
use pushmesh_protocol::ChannelName;
use serde_json::value::RawValue;

pub use filter::MAX_ADVERTISED;
pub use history::{HistoryError, HistoryItem, HistoryPage, RECOVERY_WAIT};
pub use presence_limit::PresenceLimitStats;
pub use query::{
    check_channel_query, check_channels_query, check_users_query, ChannelInfo, KindStats,
    QueryError, KINDS,
};

use crate::app::{AppIdx, Apps, ConnId};
use crate::filter::{Selector, Tags};
#[cfg(doc)]
use crate::peer_frame::PeerFrame;
use crate::peer_frame::{Delta, NodeId};
use crate::per_app::PerApp;
use crate::routing::is_owner;
use crate::session::{not_subscribed, PresenceJoin, Proto};
use crate::sink::{Handle, Sink};

/// How long a cache channel keeps its last event.
pub const CACHE_TTL: Duration = Duration::from_secs(30 * 60);

/// Why a publish was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishRefused {
    /// An interested peer cannot hold more frames (its link is down or slow).
    #[error("the buffer for peer {0} is full")]
    PeerBufferFull(NodeId),
}

/// One shard of the router.
pub struct Shard<H> {
    apps: Arc<Apps>,
    node: NodeId,
    socket_prefix: u32,
    tables: PerApp<Table<H>>,
    /// Peers with a link up.
    peers: BTreeSet<NodeId>,
    /// Occupied channels and subscriptions per kind, kept as they change.
    kinds: [KindStats; 5],
    /// Presence joins waiting for the owner; reservations (`presence_limit.rs`).
    limit: presence_limit::PresenceLimit<H>,
    /// History: the store, live origins, waiting recoveries, copies sent
    /// (`history_state.rs`).
    history: history_state::ShardHistory<H>,
    /// Selectors of presence joins waiting for the owner (`filter.rs`).
    parked_selectors: HashMap<(ConnId, AppIdx, ChannelName), Arc<Selector>>,
    /// Per publish: which groups of the channel matched (reused).
    matched: Vec<bool>,
}

struct Table<H> {
    channels: HashMap<ChannelName, Channel<H>>,
    cache: HashMap<ChannelName, Cached>,
    /// What other nodes hold, per channel.
    remote: HashMap<ChannelName, Remote>,
    /// Channels whose local count changed: replicate, notify.
    dirty_counts: IndexSet<ChannelName>,
    /// Channels whose remote count changed: notify local subscribers.
    dirty_events: IndexSet<ChannelName>,
    /// Connections that had no room for a channel's latest
    /// `subscription_count` (`counts.rs`): sent the count then current at
    /// the next tick.
    deferred_counts: HashMap<ChannelName, std::collections::HashSet<ConnId>>,
}

impl<H> Default for Table<H> {
    fn default() -> Self {
        Self {
            channels: HashMap::new(),
            cache: HashMap::new(),
            remote: HashMap::new(),
            dirty_counts: IndexSet::new(),
            dirty_events: IndexSet::new(),
            deferred_counts: HashMap::new(),
        }
    }
}

/// A hasher for connection ids (assigned by the node, never by a client):
/// zero-sized, so an empty map costs no hasher state.
type ConnHasher = std::hash::BuildHasherDefault<std::hash::DefaultHasher>;

struct Sub<H> {
    h: H,
    proto: Proto,
    /// Its group of selected subscriptions, or `filter::PLAIN`.
    group: u32,
}

struct Channel<H> {
    /// Every subscriber, Pusher and wsify, in subscription order.
    subs: IndexMap<ConnId, Sub<H>, ConnHasher>,
    /// How many of `subs` are wsify connections (their frames differ).
    wsify: u32,
    /// Presence channels only.
    presence: Option<Box<Presence>>,
    /// Groups of subscriptions with a selector (`filter.rs`).
    groups: Option<Box<filter::Groups>>,
}

#[derive(Default)]
struct Presence {
    /// The member each connection is.
    of: HashMap<ConnId, String>,
    members: IndexMap<String, Member>,
}

impl<H> Default for Channel<H> {
    fn default() -> Self {
        Self {
            subs: IndexMap::default(),
            wsify: 0,
            presence: None,
            groups: None,
        }
    }
}

impl<H> Channel<H> {
    fn count(&self) -> usize {
        self.subs.len()
    }

    fn handle(&self, conn: ConnId) -> Option<&H> {
        self.subs.get(&conn).map(|s| &s.h)
    }

    fn has_member(&self, user: &str) -> bool {
        self.presence
            .as_ref()
            .is_some_and(|p| p.members.contains_key(user))
    }

    fn members(&self) -> impl Iterator<Item = (&String, &Member)> {
        self.presence.iter().flat_map(|p| p.members.iter())
    }

    fn member_count(&self) -> usize {
        self.presence.as_ref().map_or(0, |p| p.members.len())
    }

    fn presence_of(&self, conn: ConnId) -> Option<&String> {
        self.presence.as_ref().and_then(|p| p.of.get(&conn))
    }

    /// Pusher subscribers (the ones that get protocol events).
    fn pusher(&self) -> impl Iterator<Item = (&ConnId, &H)> {
        self.subs
            .iter()
            .filter(|(_, s)| s.proto == Proto::Pusher)
            .map(|(c, s)| (c, &s.h))
    }

    /// Adds a subscriber; false if it was there already.
    fn insert(&mut self, conn: ConnId, h: H, proto: Proto) -> bool {
        if self.subs.contains_key(&conn) {
            return false;
        }
        if proto != Proto::Pusher {
            self.wsify += 1;
        }
        let group = filter::PLAIN;
        self.subs.insert(conn, Sub { h, proto, group });
        true
    }
}

struct Member {
    info: Option<Box<RawValue>>,
    conns: u32,
}

struct Cached {
    event: String,
    data: String,
    frame: Bytes,
    at: Instant,
}

/// What the node holds about other nodes for one channel.
#[derive(Default)]
struct Remote {
    interested: BTreeSet<NodeId>,
    counts: BTreeMap<NodeId, usize>,
    members: IndexMap<String, RemoteMember>,
    /// What interested peers advertised about their filters (`filter.rs`).
    filters: BTreeMap<NodeId, filter::PeerFilters>,
}

impl Remote {
    fn is_empty(&self) -> bool {
        self.interested.is_empty()
            && self.counts.is_empty()
            && self.members.is_empty()
            && self.filters.is_empty()
    }
}

struct RemoteMember {
    info: Option<Box<RawValue>>,
    nodes: BTreeSet<NodeId>,
}

/// One event to deliver on a channel of this shard.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    /// App.
    pub app: AppIdx,
    /// Channel.
    pub channel: &'a ChannelName,
    /// Event name.
    pub name: &'a str,
    /// Data (a JSON string's content).
    pub data: &'a str,
    /// wsify content, when the event came from a wsify broadcast.
    pub content: Option<&'a RawValue>,
    /// Socket id to leave out.
    pub exclude_socket: Option<&'a str>,
    /// `user_id` of a presence client event.
    pub user_id: Option<&'a str>,
}

impl<'a> Event<'a> {
    /// An event of `app` on `channel` with nobody left out, no wsify
    /// content and no `user_id` (set those with struct update syntax).
    pub fn new(app: AppIdx, channel: &'a ChannelName, name: &'a str, data: &'a str) -> Self {
        Self {
            app,
            channel,
            name,
            data,
            content: None,
            exclude_socket: None,
            user_id: None,
        }
    }
}

/// One publish on a channel of this shard: the event and its optional
/// parts. The one input of [`Shard::publish`], [`Shard::hand_to_peers`]
/// and [`Shard::deliver_local`] (an untagged event: `Publish::from(event)`).
#[derive(Debug, Clone, Copy)]
pub struct Publish<'a> {
    /// What is delivered.
    pub event: Event<'a>,
    /// Its tags (issue #13): only subscriptions whose filter matches take
    /// it, and only peers whose advertised filters can match get it.
    /// `None`: untagged (subscriptions with a filter do not take it).
    pub tags: Option<&'a Tags>,
}

impl<'a> From<Event<'a>> for Publish<'a> {
    fn from(event: Event<'a>) -> Self {
        Self { event, tags: None }
    }
}

impl Publish<'_> {
    /// Its tags; none (the empty set) if untagged.
    fn tags(&self) -> &Tags {
        self.tags.unwrap_or(Tags::none())
    }
}

/// A subscribe of a connection (authorized by its session): the input of
/// [`Shard::subscribe`], with the parts of `Request::Subscribe`.
#[derive(Debug, Clone)]
pub struct Subscribe<H> {
    /// The connection.
    pub conn: H,
    /// App.
    pub app: AppIdx,
    /// Channel (of this shard).
    pub channel: ChannelName,
    /// The connection's protocol.
    pub proto: Proto,
    /// The member, on presence channels (it carries its own position).
    pub presence: Option<PresenceJoin>,
    /// What the subscription receives; `None`: every untagged event and
    /// every tagged one.
    pub selector: Option<Arc<Selector>>,
    /// On a history channel: recover every event after this position.
    pub position: Option<Box<str>>,
}

/// A `client-` event from a connection (limits checked by its session):
/// the input of [`Shard::client_event`].
#[derive(Debug, Clone, Copy)]
pub struct ClientEvent<'a> {
    /// App.
    pub app: AppIdx,
    /// Channel.
    pub channel: &'a ChannelName,
    /// Event name.
    pub event: &'a str,
    /// Data.
    pub data: &'a str,
    /// The sender's socket id (left out of the delivery).
    pub socket_id: &'a str,
}

/// A connection joining one channel of the shard: what every step of a
/// subscribe (answered now, parked for history or for the presence
/// owner) carries along.
struct Joining<H> {
    h: H,
    app: AppIdx,
    name: ChannelName,
}

impl<H: Handle> Shard<H> {
    /// An empty shard of a node.
    pub fn new(apps: Arc<Apps>, node: NodeId, socket_prefix: u32) -> Self {
        Self {
            tables: PerApp::new(apps.len(), Table::default),
            apps,
            node,
            socket_prefix,
            peers: BTreeSet::new(),
            kinds: [KindStats::default(); 5],
            limit: presence_limit::PresenceLimit::default(),
            history: history_state::ShardHistory::default(),
            parked_selectors: HashMap::new(),
            matched: Vec::new(),
        }
    }

    /// Keeps the per-kind counters: one subscription more (`delta` 1) or
    /// less (-1); `edge` when the channel became occupied or vacated.
    fn counted(&mut self, name: &ChannelName, edge: bool, delta: isize) {
        let k = &mut self.kinds[query::kind_index(name.kind())];
        k.subscriptions = k.subscriptions.saturating_add_signed(delta);
        if edge {
            k.channels = k.channels.saturating_add_signed(delta);
        }
    }

    /// A new snapshot of the node's apps: tables for new slots; a changed
    /// app's settings apply from the next input on.
    pub fn set_apps(&mut self, apps: Arc<Apps>) {
        self.tables.grow(apps.len(), Table::default);
        self.apps = apps;
    }

    /// The peers with a link up changed (their state arrives as deltas).
    pub fn set_peers(&mut self, peers: BTreeSet<NodeId>) {
        // A peer that is gone gets the whole history again if it links
        // again (it may have been declared dead and its frames dropped).
        self.history.keep_peers(&peers);
        self.peers = peers;
    }

    fn table(&mut self, app: AppIdx) -> &mut Table<H> {
        &mut self.tables[app]
    }

    fn app_id(&self, app: AppIdx) -> &str {
        &self.apps.get(app).id
    }

    /// A webhook event, fired by the channel's owner only.
    fn hook(&self, app: AppIdx, channel: &str, event: WebhookEvent, sink: &mut impl Sink<H>) {
        let cfg = self.apps.get(app);
        if cfg.webhooks && is_owner(&self.node, &self.peers, &cfg.id, channel) {
            sink.hook(app, event);
        }
    }

    fn remote_interest(&self, app: AppIdx, name: &ChannelName) -> bool {
        self.tables[app]
            .remote
            .get(name)
            .is_some_and(|r| !r.interested.is_empty())
    }

    /// The local subscriber count of a channel went 0→1 (`add`) or N→0.
    fn local_interest(&self, app: AppIdx, name: &ChannelName, add: bool, sink: &mut impl Sink<H>) {
        sink.replicate(Delta::Interest {
            app: self.app_id(app).to_owned(),
            channel: name.to_string(),
            add,
        });
        if !self.remote_interest(app, name) {
            let channel = name.to_string();
            let event = if add {
                WebhookEvent::ChannelOccupied { channel }
            } else {
                WebhookEvent::ChannelVacated { channel }
            };
            self.hook(app, name.as_str(), event, sink);
        }
    }

    /// A `client-` event from a connection (limits checked by its session):
    /// refused unless the connection is in the channel; delivered to the
    /// others here and on interested peers.
    pub fn client_event(
        &mut self,
        now: Instant,
        h: &H,
        e: ClientEvent<'_>,
        sink: &mut impl Sink<H>,
    ) {
        let ClientEvent {
            app,
            channel: name,
            event,
            data,
            socket_id,
        } = e;
        let conn = h.conn();
        let Some(ch) = self.tables[app]
            .channels
            .get(name)
            .filter(|c| c.handle(conn).is_some())
        else {
            sink.send(h, &server::error(&not_subscribed(name.as_str()), None));
            return;
        };
        let user_id = ch.presence_of(conn).cloned();
        if self.apps.get(app).webhooks {
            // Fired where the event happens: once per cluster.
            let hook = WebhookEvent::ClientEvent {
                channel: name.to_string(),
                event: event.to_owned(),
                data: data.to_owned(),
                socket_id: socket_id.to_owned(),
                user_id: user_id.clone(),
            };
            sink.hook(app, hook);
        }
        let ev = Event {
            app,
            channel: name,
            name: event,
            data,
            content: None,
            exclude_socket: Some(socket_id),
            user_id: user_id.as_deref(),
        };
        // Client events are never acknowledged to their sender: one that a
        // peer's buffer cannot hold is dropped everywhere, like a publish
        // answered 503.
        let _ = self.publish(now, &Publish::from(ev), sink);
    }

    /// Remembers the last event of a cache channel; returns its frame
    /// (with its `position` on a history channel).
    fn cache_event(&mut self, now: Instant, ev: &Event<'_>, position: Option<&str>) -> Bytes {
        let frame = match position {
            Some(p) => {
                server::channel_event_at(ev.name, ev.channel.as_str(), ev.data, ev.user_id, p)
            }
            None => server::channel_event(ev.name, ev.channel.as_str(), ev.data, ev.user_id),
        };
        if ev.channel.is_cache() {
            self.table(ev.app).cache.insert(
                ev.channel.clone(),
                Cached {
                    event: ev.name.to_owned(),
                    data: ev.data.to_owned(),
                    frame: frame.clone(),
                    at: now,
                },
            );
        }
        frame
    }

    /// The connection of this node a socket id names, if any.
    fn local_conn_of(&self, socket_id: &str) -> Option<ConnId> {
        let (prefix, n) = socket_id.split_once('.')?;
        if prefix.parse::<u32>().ok()? != self.socket_prefix {
            return None;
        }
        Some(ConnId(n.parse().ok()?))
    }

    /// Whether [`Shard::tick`] has anything to do: cached events to
    /// expire, counts to report, presence joins or recoveries waiting for
    /// an answer, history to expire. An idle shard needs no time.
    pub fn needs_tick(&self) -> bool {
        self.tables.iter().any(|(_, t)| {
            !t.cache.is_empty()
                || !t.dirty_counts.is_empty()
                || !t.dirty_events.is_empty()
                || !t.deferred_counts.is_empty()
        }) || self.limit.has_parked()
            || self.history.needs_tick()
    }

    /// Periodic work: count replication, `subscription_count` events and
    /// webhooks (coalesced per tick), cache expiry.
    pub fn tick(&mut self, now: Instant, sink: &mut impl Sink<H>) {
        for app in self.tables.apps() {
            let cfg = self.apps.get(app).clone();
            let t = &mut self.tables[app];
            t.cache
                .retain(|_, c| now.saturating_duration_since(c.at) < CACHE_TTL);
            self.count_tick(app, &cfg, sink);
        }
        self.presence_limit_tick(now, sink);
        self.history_tick(now, sink);
    }
}
