//! History between nodes: the copy a peer's new incarnation gets when
//! its link comes up, the exchange of a gone incarnation's events among
//! the survivors, and merging a peer's copy (see docs/history.md).

use std::time::{Duration, Instant};

use pushmesh_protocol::ChannelName;

use super::{Event, Publish, Shard};
use crate::filter::Tags;
use crate::history::{ChannelLog, NewEvent, Origin, Position};
use crate::peer_frame::{FrameKind, HistoryEvent, HistoryStamp, NodeId, PeerFrame};
use crate::sink::{Handle, Sink};

/// Most events and bytes in one [`PeerFrame::HistorySync`].
const SYNC_EVENTS: usize = 256;
const SYNC_BYTES: usize = 4 << 20;

impl<H: Handle> Shard<H> {
    /// Sends this shard's history to a peer whose new incarnation linked
    /// (a node that joins recovers positions from before its start).
    pub fn send_history(&mut self, now: Instant, to: &NodeId, epoch: u64, sink: &mut impl Sink<H>) {
        if !self.history.send_to(to, epoch) {
            return;
        }
        let Some(store) = self.history.store() else {
            return;
        };
        for (app, name, log) in store.channels() {
            let app_id = &self.apps.get(*app).id;
            send_log(to, app_id, name, log, None, now, sink);
        }
    }

    /// A peer incarnation is gone: every other peer gets this node's copy
    /// of its events, so the survivors end up with the union (one of them
    /// may have got events of it that another never did).
    pub fn share_origin(&mut self, now: Instant, origin: Origin, sink: &mut impl Sink<H>) {
        let Some(store) = self.history.store() else {
            return;
        };
        for (app, name, log) in store.channels() {
            if !log.events().any(|e| e.origin == origin) {
                continue;
            }
            let app_id = &self.apps.get(*app).id;
            for to in &self.peers {
                send_log(to, app_id, name, log, Some(origin), now, sink);
            }
        }
    }

    /// A peer's copy of a channel's history. Older events that continue
    /// this node's held range downwards are filled in (see
    /// `ChannelLog::merge`); newer ones than this node got from their origin
    /// are taken as if they had just arrived: stored and delivered to the
    /// local subscribers (whose positions do not include them). That is how
    /// a node that joins gets the history, and how a node recovers events a
    /// peer dropped for it after declaring it dead.
    pub fn merge_history(
        &mut self,
        now: Instant,
        app_id: &str,
        channel: &str,
        base: &[(u64, u64)],
        events: Vec<HistoryEvent>,
        sink: &mut impl Sink<H>,
    ) {
        let Some((app, name)) = self.peer_channel(app_id, channel) else {
            return;
        };
        let Some(max) = self.keeps_history(app, channel).map(|c| c.max_events) else {
            return;
        };
        let Some(store) = self.history.store_mut() else {
            return;
        };
        let mut peer_base = Position::default();
        for (o, s) in base {
            peer_base.set(Origin(*o), *s);
        }
        let head = store
            .log(app, &name)
            .map(|l| l.head().clone())
            .unwrap_or_default();
        let (older, newer): (Vec<HistoryEvent>, Vec<HistoryEvent>) = events
            .into_iter()
            .filter(|e| e.seq > 0)
            .partition(|e| e.seq <= head.get(Origin(e.origin)));
        let older = older
            .into_iter()
            .map(|e| {
                let at = now
                    .checked_sub(Duration::from_millis(e.age_ms))
                    .unwrap_or(now);
                store.event(NewEvent {
                    origin: Origin(e.origin),
                    seq: e.seq,
                    at,
                    at_ms: e.at_ms,
                    event: &e.event,
                    data: &e.data,
                    user_id: e.user_id.as_deref(),
                    tags: Tags::from_pairs(e.tags).unwrap_or_default(),
                })
            })
            .collect();
        store.merge(app, &name, older, &peer_base, false, max);
        for e in newer {
            // The first of an origin continues its peer base: a gap from
            // this node's head is recorded as such.
            let Ok(tags) = Tags::from_pairs(e.tags) else {
                tracing::debug!(%channel, "dropped a peer's event with invalid tags");
                continue;
            };
            let event = Event {
                user_id: e.user_id.as_deref(),
                ..Event::new(app, &name, &e.event, &e.data)
            };
            let p = Publish {
                event,
                tags: Some(&tags),
            };
            let stamp = HistoryStamp {
                origin: e.origin,
                seq: e.seq,
                at_ms: e.at_ms,
            };
            self.arrived(now, &p, Some(stamp), sink);
        }
        self.resolve_pending(now, app, &name, sink);
    }
}

/// Sends a channel's log (or only the events of `only`) to a peer, in
/// parts of at most [`SYNC_EVENTS`] events and [`SYNC_BYTES`] bytes, each
/// with the base it continues.
fn send_log<H>(
    to: &NodeId,
    app_id: &str,
    name: &ChannelName,
    log: &ChannelLog,
    only: Option<Origin>,
    now: Instant,
    sink: &mut impl Sink<H>,
) {
    let mut base = match only {
        Some(o) => {
            let mut b = Position::default();
            b.set(o, log.base().get(o));
            b
        }
        None => log.base().clone(),
    };
    let mut part: Vec<HistoryEvent> = Vec::new();
    let mut part_base = base.clone();
    let mut bytes = 0;
    for e in log.events().filter(|e| only.is_none_or(|o| e.origin == o)) {
        part.push(HistoryEvent {
            origin: e.origin.0,
            seq: e.seq,
            at_ms: e.at_ms,
            age_ms: now.saturating_duration_since(e.at).as_millis() as u64,
            event: e.event.to_string(),
            data: e.data.to_string(),
            user_id: e.user_id.as_deref().map(str::to_owned),
            tags: e.tags.to_pairs(),
        });
        bytes += e.bytes();
        base.set(e.origin, e.seq);
        if part.len() >= SYNC_EVENTS || bytes >= SYNC_BYTES {
            send_part(
                to,
                app_id,
                name,
                &part_base,
                std::mem::take(&mut part),
                sink,
            );
            part_base = base.clone();
            bytes = 0;
        }
    }
    if !part.is_empty() {
        send_part(to, app_id, name, &part_base, part, sink);
    }
}

fn send_part<H>(
    to: &NodeId,
    app: &str,
    name: &ChannelName,
    base: &Position,
    events: Vec<HistoryEvent>,
    sink: &mut impl Sink<H>,
) {
    let frame = PeerFrame::HistorySync {
        app: app.to_owned(),
        channel: name.to_string(),
        base: base.entries().map(|(o, s)| (o.0, s)).collect(),
        events,
    };
    sink.peer(to, FrameKind::Data, &frame.encode());
}
