//! History in a shard: numbering and storing the events of history
//! channels, positions on their frames, recovery on subscribe (replay, or
//! a bounded wait for events still on their way), the copy a joining peer
//! gets, and the HTTP history query. The store itself is `crate::history`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pushmesh_protocol::server::{self, Recovery};
use pushmesh_protocol::{wsify, ChannelName};

use super::publish::peer_event;
use super::{Joining, Publish, PublishRefused, Shard};
use crate::app::{AppIdx, ConnId};
use crate::filter::Selector;
use crate::history::{
    AppHistory, Appended, BadPosition, Check, HistoryStats, HistoryStore, NewEvent, Origin,
    Position,
};
use crate::peer_frame::{HistoryStamp, PeerFrame};
use crate::session::Proto;
use crate::sink::{AckFor, Handle, Sink};

/// How long a recovery waits for events a position names but this node
/// has not got yet (they are on their way from a live peer).
pub const RECOVERY_WAIT: Duration = Duration::from_millis(1000);

/// How a subscribe on a history channel is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Answer {
    /// No position asked: the current one is given.
    Fresh,
    /// Every event after this position follows.
    Recovered(Position),
    /// The position cannot be continued: only live events follow.
    Lost,
}

/// The event a publish stores on a history channel.
fn new_event<'a>(p: &Publish<'a>, stamp: HistoryStamp, now: Instant) -> NewEvent<'a> {
    NewEvent {
        origin: Origin(stamp.origin),
        seq: stamp.seq,
        at: now,
        at_ms: stamp.at_ms,
        event: p.event.name,
        data: p.event.data,
        user_id: p.event.user_id,
        tags: p.tags.cloned().unwrap_or_default(),
    }
}

/// One page of a channel's history (`GET .../history`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// Events, oldest first.
    pub events: Vec<HistoryItem>,
    /// The channel's position on this node.
    pub position: String,
    /// False when events after `after` (or, without it, before the first
    /// returned) are gone.
    pub complete: bool,
}

/// One event of a [`HistoryPage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryItem {
    /// Event name.
    pub name: String,
    /// Data.
    pub data: String,
    /// The position after it.
    pub position: String,
    /// When it was published, Unix ms.
    pub published_at_ms: u64,
}

/// Why a history query is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// The channel keeps no history.
    #[error("channel {0:?} keeps no history (see [apps.history] channels)")]
    NotEnabled(String),
    /// `after` is not a position.
    #[error(transparent)]
    BadPosition(#[from] BadPosition),
}

impl<H: Handle> Shard<H> {
    /// Gives the shard a history store (only if some app keeps history).
    pub fn set_history(&mut self, store: HistoryStore) {
        self.history.set_store(store);
    }

    /// The origins that may still send events here: this node's peers'
    /// current incarnations (this node's own is always one).
    pub fn set_live_origins(&mut self, origins: Vec<Origin>) {
        self.history.set_live_origins(origins);
    }

    /// The store's counters.
    pub fn history_stats(&self) -> HistoryStats {
        self.history.stats()
    }

    /// The app's history settings, if `name` keeps history.
    pub(super) fn keeps_history(&self, app: AppIdx, name: &str) -> Option<&AppHistory> {
        self.history.store()?;
        self.apps
            .get(app)
            .history
            .as_ref()
            .filter(|h| h.matches(name))
    }

    /// The channel's position here (`0` before any event).
    pub(super) fn history_head(&self, app: AppIdx, name: &ChannelName) -> String {
        self.history.head(app, name)
    }

    /// How to answer a subscribe asking for `position`; `None`: wait.
    pub(super) fn history_answer(
        &self,
        app: AppIdx,
        name: &ChannelName,
        position: Option<&str>,
    ) -> Option<Answer> {
        self.history.answer(app, name, position)
    }

    /// Parks a subscribe until the events its position names arrive.
    pub(super) fn park_recovery(
        &mut self,
        now: Instant,
        j: Joining<H>,
        proto: Proto,
        position: &str,
        selector: Option<Arc<Selector>>,
    ) {
        self.history.park(now, j, proto, position, selector);
    }

    /// Forgets a parked recovery (the connection unsubscribed).
    pub(super) fn unpark_recovery(&mut self, conn: ConnId, app: AppIdx, name: &ChannelName) {
        self.history.unpark(conn, app, name);
    }

    /// Counts the answer and makes the `recovered` / `position` fields.
    pub(super) fn recovery_fields(
        &mut self,
        app: AppIdx,
        name: &ChannelName,
        a: &Answer,
    ) -> (Option<bool>, String) {
        let recovered = self.history.count(a);
        (recovered, self.history_head(app, name))
    }

    /// `subscription_succeeded` on a history channel.
    pub(super) fn succeeded_frame(
        &mut self,
        app: AppIdx,
        name: &ChannelName,
        a: &Answer,
    ) -> bytes::Bytes {
        let (recovered, position) = self.recovery_fields(app, name, a);
        server::subscription_succeeded_at(
            name.as_str(),
            Recovery {
                recovered,
                position: &position,
            },
        )
    }

    /// Sends a recovering subscriber every event after `from`, in order,
    /// each with the position it has after it.
    pub(super) fn replay(
        &self,
        h: &H,
        app: AppIdx,
        name: &ChannelName,
        proto: Proto,
        from: &Position,
        sink: &mut impl Sink<H>,
    ) {
        let Some(log) = self.history.store().and_then(|s| s.log(app, name)) else {
            return;
        };
        let selector = self.selector_of(app, name, h.conn());
        for (e, at) in log.after(from) {
            if selector.as_ref().is_some_and(|s| !s.matches(&e.tags)) {
                continue;
            }
            let pos = at.to_string();
            let frame = match proto {
                Proto::Pusher => server::channel_event_at(
                    &e.event,
                    name.as_str(),
                    &e.data,
                    e.user_id.as_deref(),
                    &pos,
                ),
                Proto::Wsify { envelope } => {
                    let content = wsify::content_of_event_data(&e.data);
                    if envelope {
                        wsify::envelope_frame_at(name.as_str(), &content, &pos)
                    } else {
                        wsify::raw_frame(content.get())
                    }
                }
            };
            sink.send(h, &frame);
        }
    }

    /// The first half of a publish on a history channel: room in every
    /// peer's buffer (every node keeps the history), then numbered, stored
    /// and sent to every peer.
    pub(super) fn history_hand(
        &mut self,
        now: Instant,
        p: &Publish<'_>,
        sink: &mut impl Sink<H>,
    ) -> Result<(), PublishRefused> {
        for peer in &self.peers {
            if !sink.peer_has_room(peer) {
                return Err(PublishRefused::PeerBufferFull(peer.clone()));
            }
        }
        let ev = &p.event;
        let max = self
            .keeps_history(ev.app, ev.channel.as_str())
            .map_or(1, |c| c.max_events);
        let Some(store) = self.history.store_mut() else {
            return Ok(());
        };
        let stamp = HistoryStamp {
            origin: store.origin().0,
            seq: store.next_own_seq(ev.app, ev.channel),
            at_ms: store.wall_ms(now),
        };
        let e = store.event(new_event(p, stamp, now));
        store.append(ev.app, ev.channel, e, max);
        if !self.peers.is_empty() {
            let frame = PeerFrame::Event(peer_event(self.app_id(ev.app), p, Some(stamp))).encode();
            let remote = self.tables[ev.app].remote.get(ev.channel);
            let tags = p.tags();
            for to in &self.peers {
                let why = if remote.is_some_and(|r| {
                    r.interested.contains(to) && super::filter::peer_wants(r, to, tags)
                }) {
                    AckFor::Order
                } else {
                    AckFor::Copy
                };
                sink.peer_durable(to, &frame, why);
            }
        }
        Ok(())
    }

    /// Stores a peer's history event (if the channel keeps history here);
    /// false if it is held already (then it was delivered already, or
    /// predates every position given out here).
    pub(super) fn store_peer_event(
        &mut self,
        now: Instant,
        p: &Publish<'_>,
        stamp: HistoryStamp,
    ) -> bool {
        let ev = &p.event;
        let Some(max) = self
            .keeps_history(ev.app, ev.channel.as_str())
            .map(|c| c.max_events)
        else {
            return true;
        };
        let Some(store) = self.history.store_mut() else {
            return true;
        };
        let e = store.event(new_event(p, stamp, now));
        store.append(ev.app, ev.channel, e, max) != Appended::Duplicate
    }

    /// Parked recoveries of a channel that can now be answered.
    pub(super) fn resolve_pending(
        &mut self,
        now: Instant,
        app: AppIdx,
        name: &ChannelName,
        sink: &mut impl Sink<H>,
    ) {
        if !self.history.has_pending() {
            return;
        }
        for (p, a) in self.history.take_answerable(app, name) {
            self.subscribe_answered(now, p.j, p.proto, Some(a), p.selector, sink);
        }
    }

    /// Periodic work: expiry, and parked recoveries that waited too long
    /// (answered `recovered: false`).
    pub(super) fn history_tick(&mut self, now: Instant, sink: &mut impl Sink<H>) {
        let apps = self.apps.clone();
        if let Some(store) = self.history.store_mut() {
            store.expire(now, |a| apps.get(a).history.as_ref().map(|h| h.ttl));
        }
        for p in self.history.take_late(now) {
            let lost = Some(Answer::Lost);
            self.subscribe_answered(now, p.j, p.proto, lost, p.selector, sink);
        }
    }

    /// A page of a channel's history as this node holds it.
    pub fn history_page(
        &self,
        app: AppIdx,
        name: &ChannelName,
        after: Option<&str>,
        limit: usize,
    ) -> Result<HistoryPage, HistoryError> {
        if self.keeps_history(app, name.as_str()).is_none() {
            return Err(HistoryError::NotEnabled(name.to_string()));
        }
        let after = after.map(Position::parse).transpose()?;
        let Some(log) = self.history.store().and_then(|s| s.log(app, name)) else {
            return Ok(HistoryPage {
                events: Vec::new(),
                position: "0".into(),
                complete: true,
            });
        };
        let item = |e: &crate::history::Stored, at: Position| HistoryItem {
            name: e.event.to_string(),
            data: e.data.to_string(),
            position: at.to_string(),
            published_at_ms: e.at_ms,
        };
        let (events, complete) = match &after {
            Some(p) => {
                let complete = log.check(p, |_| true) != Check::Lost;
                let events = log
                    .after(p)
                    .take(limit)
                    .map(|(e, at)| item(e, at))
                    .collect();
                (events, complete)
            }
            None => {
                let skip = log.len().saturating_sub(limit);
                let events = log
                    .after(log.base())
                    .skip(skip)
                    .map(|(e, at)| item(e, at))
                    .collect();
                (events, log.complete() && skip == 0)
            }
        };
        Ok(HistoryPage {
            events,
            position: log.head().to_string(),
            complete,
        })
    }
}
