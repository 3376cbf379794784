//! [`ShardMachine`]: one router shard as a state machine with typed
//! inputs — the one composition of a shard that both drivers run. The
//! server's shard task takes commands from its queue and hands each to
//! [`ShardMachine::handle`]; the test driver ([`crate::Core`]) does the
//! same synchronously. The order of a publish (peers' buffers, answer,
//! local fan-out) and what ends a batch ([`Batch`]: numbering of state
//! changes, barrier holds, webhook hand-off) are decided here, not in a
//! driver. Time is an input: the machine says when it next needs it
//! ([`ShardMachine::poll_timeout`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pushmesh_protocol::ChannelName;
use serde_json::value::RawValue;

use crate::app::{AppIdx, Apps, PublishRequest};
use crate::filter::Tags;
use crate::history::Origin;
use crate::peer_frame::{Delta, FrameKind, NodeId, PeerFrame};
use crate::router::{ChannelInfo, ClientEvent, Event, Publish, PublishRefused, Shard, Subscribe};
use crate::session::Request;
use crate::sink::{Handle, Sink};

mod barrier;
mod batch;
mod effects;

pub use barrier::{Barrier, Released};
pub use batch::{Batch, BatchEnd};
pub use effects::{copy_done_frames, split_apply, SplitApply};

/// How often a shard with timed work ([`Shard::needs_tick`]) is ticked:
/// subscription counts are coalesced over it, cached events expire on it.
pub const TICK: Duration = Duration::from_millis(250);

/// An event for one channel of one shard (from the HTTP API, `/broadcast`
/// or a wsify client). Cheap to clone: its parts are shared.
#[derive(Debug, Clone)]
pub struct ShardPublish {
    /// The app.
    pub app: AppIdx,
    /// The channel (validated).
    pub channel: ChannelName,
    /// Event name.
    pub event: Arc<str>,
    /// Event data (a string, as Pusher sends it).
    pub data: Arc<str>,
    /// The JSON content of a wsify broadcast.
    pub content: Option<Arc<RawValue>>,
    /// Socket id that does not receive it.
    pub exclude: Option<Arc<str>>,
    /// Tags for subscription filters.
    pub tags: Option<Arc<Tags>>,
    /// Whether the answer carries the channel's info (answered after the
    /// local fan-out then, since the info includes it).
    pub info: bool,
}

impl ShardPublish {
    /// `req`'s event on each of `channels` (validated), its parts built
    /// once and shared by every channel's publish.
    pub fn each(
        app: AppIdx,
        channels: Vec<ChannelName>,
        req: &PublishRequest<'_>,
        tags: Option<Arc<Tags>>,
        info: bool,
    ) -> impl Iterator<Item = ShardPublish> {
        let event: Arc<str> = Arc::from(req.name);
        let data: Arc<str> = Arc::from(req.data);
        let exclude: Option<Arc<str>> = req.exclude_socket.map(Arc::from);
        channels.into_iter().map(move |channel| ShardPublish {
            app,
            channel,
            event: event.clone(),
            data: data.clone(),
            content: None,
            exclude: exclude.clone(),
            tags: tags.clone(),
            info,
        })
    }
}

/// Work for a shard. `R` is how the driver answers a publish.
pub enum ShardInput<C, R> {
    /// A session's subscribe, unsubscribe or client event.
    Request(C, Request),
    /// A publish, answered through [`ShardSink::answer`].
    Publish(ShardPublish, R),
    /// A channel's frame from a peer.
    PeerFrame(PeerFrame),
    /// Peers' state changes for this shard's channels (from the replicator).
    Apply(Vec<(NodeId, Delta)>),
    /// The peers with a link up changed.
    Peers {
        /// Peers with a link up.
        peers: BTreeSet<NodeId>,
        /// Their incarnations (history origins still live).
        origins: Vec<Origin>,
    },
    /// A link to `peer` (incarnation `epoch`) came up: cached events and
    /// history go to it, then this shard's part of `CopyDone` (`done`).
    SendCache {
        /// The peer.
        peer: NodeId,
        /// Its incarnation.
        epoch: u64,
        /// This shard's encoded `CopyDone`.
        done: Bytes,
    },
    /// An origin is gone: the survivors exchange what they hold of its history.
    ShareOrigin(Origin),
    /// The apps changed (added, changed, removed: `Apps` keeps every slot).
    Apps(Arc<Apps>),
}

/// A driver's sink for a shard: its effects plus the answers to publishes.
pub trait ShardSink<C>: Sink<C> {
    /// How the driver answers a publish (a oneshot on the server).
    type Reply;
    /// The outcome of a publish: `Ok` once every interested peer's buffer
    /// holds it (with the channel's info if it was asked for), `Err` if a
    /// peer's buffer is full (nothing was delivered anywhere then).
    fn answer(&mut self, reply: Self::Reply, outcome: Result<ChannelInfo, PublishRefused>);
}

/// One router shard and its timer. See the module docs.
pub struct ShardMachine<C> {
    shard: Shard<C>,
    /// When the next tick is due, if the shard has timed work.
    next_tick: Option<Instant>,
}

impl<C: Handle> ShardMachine<C> {
    /// A machine running `shard`.
    pub fn new(shard: Shard<C>) -> Self {
        Self {
            shard,
            next_tick: None,
        }
    }

    /// The shard, for read-only queries.
    pub fn shard(&self) -> &Shard<C> {
        &self.shard
    }

    /// Does one input. Its effects go to `sink`; state changes, holds and
    /// webhook events are collected in the sink's [`Batch`].
    pub fn handle<S: ShardSink<C>>(
        &mut self,
        now: Instant,
        input: ShardInput<C, S::Reply>,
        sink: &mut S,
    ) {
        let shard = &mut self.shard;
        match input {
            ShardInput::Request(h, req) => request(shard, now, h, req, sink),
            ShardInput::Publish(p, reply) => publish(shard, now, &p, reply, sink),
            ShardInput::PeerFrame(frame) => shard.handle_channel_frame(now, frame, sink),
            ShardInput::Apply(changes) => {
                for (peer, delta) in changes {
                    shard.apply_remote(&peer, delta, sink);
                }
            }
            ShardInput::Apps(apps) => shard.set_apps(apps),
            ShardInput::Peers { peers, origins } => {
                shard.set_peers(peers);
                shard.set_live_origins(origins);
                shard.presence_peers_changed(now, sink);
            }
            ShardInput::SendCache { peer, epoch, done } => {
                shard.send_cache(now, &peer, sink);
                shard.send_history(now, &peer, epoch, sink);
                sink.peer(&peer, FrameKind::Data, &done);
            }
            ShardInput::ShareOrigin(o) => shard.share_origin(now, o, sink),
        }
        self.arm(now);
    }

    /// When the machine next needs [`ShardMachine::handle_timeout`]; `None`
    /// while the shard is idle.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_tick
    }

    /// Time passed: the shard's periodic work, if it is due.
    pub fn handle_timeout(&mut self, now: Instant, sink: &mut impl Sink<C>) {
        if self.next_tick.is_some_and(|t| t <= now) {
            self.next_tick = None;
            self.shard.tick(now, sink);
        }
        self.arm(now);
    }

    fn arm(&mut self, now: Instant) {
        if self.next_tick.is_none() && self.shard.needs_tick() {
            self.next_tick = Some(now + TICK);
        }
    }
}

fn request<C: Handle>(
    shard: &mut Shard<C>,
    now: Instant,
    h: C,
    req: Request,
    sink: &mut impl Sink<C>,
) {
    match req {
        Request::Subscribe {
            app,
            channel,
            proto,
            presence,
            position,
            selector,
        } => {
            let s = Subscribe {
                conn: h,
                app,
                channel,
                proto,
                presence,
                selector,
                position,
            };
            shard.subscribe(now, s, sink)
        }
        Request::Unsubscribe { app, channel } => shard.unsubscribe(h.conn(), app, &channel, sink),
        Request::ClientEvent {
            app,
            channel,
            event,
            data,
            socket_id,
        } => {
            let e = ClientEvent {
                app,
                channel: &channel,
                event: &event,
                data: &data,
                socket_id: &socket_id,
            };
            shard.client_event(now, &h, e, sink)
        }
        // The user registry's, not a shard's.
        Request::SignIn { .. } | Request::SignOut { .. } => {}
    }
}

/// A publish: handed to every interested peer's buffer first (refused
/// whole if one is full); answered then, before the local fan-out — or
/// after it when the channel's info was asked for.
fn publish<C: Handle, S: ShardSink<C>>(
    shard: &mut Shard<C>,
    now: Instant,
    p: &ShardPublish,
    reply: S::Reply,
    sink: &mut S,
) {
    let event = Event {
        content: p.content.as_deref(),
        exclude_socket: p.exclude.as_deref(),
        ..Event::new(p.app, &p.channel, &p.event, &p.data)
    };
    let publish = Publish {
        event,
        tags: p.tags.as_deref(),
    };
    match shard.hand_to_peers(now, &publish, sink) {
        Err(e) => sink.answer(reply, Err(e)),
        Ok(()) if !p.info => {
            sink.answer(reply, Ok(ChannelInfo::default()));
            shard.deliver_local(now, &publish, sink);
        }
        Ok(()) => {
            shard.deliver_local(now, &publish, sink);
            let info = shard.info(now, p.app, &p.channel);
            sink.answer(reply, Ok(info));
        }
    }
}
