//! The one publish path of a shard, for every kind of event (API publish,
//! wsify broadcast, client event; tagged or not; history channel or not):
//!
//! 1. [`Shard::hand_to_peers`]: refused whole if a peer it goes to cannot
//!    hold it; else one [`PeerFrame::Event`] to each interested peer whose
//!    filters can match (on a history channel: numbered, stored here and
//!    sent to every peer, `history.rs`). After it, the publish cannot fail.
//! 2. [`Shard::deliver_local`]: every local subscriber that takes it (one
//!    evaluation per group of subscriptions sharing a selector), each
//!    protocol's frame encoded once and shared.
//!
//! A peer's event arrives as one [`PeerFrame::Event`] and goes through
//! [`Shard::deliver_peer_event`]: stored first on a history channel (a
//! duplicate is dropped), then step 2 only.

use std::collections::BTreeSet;
use std::time::Instant;

use pushmesh_protocol::wsify;

use super::filter::{peer_wants, PLAIN};
use super::{Event, Publish, PublishRefused, Shard};
use crate::filter::Tags;
use crate::peer_frame::{FrameKind, HistoryStamp, PeerEvent, PeerFrame};
use crate::session::Proto;
use crate::sink::{AckFor, Handle, Sink};

impl<H: Handle> Shard<H> {
    /// A whole publish: [`Shard::hand_to_peers`], then, if the peers took
    /// it, [`Shard::deliver_local`]. A refused publish is delivered nowhere
    /// (the API answers 503).
    pub fn publish(
        &mut self,
        now: Instant,
        p: &Publish<'_>,
        sink: &mut impl Sink<H>,
    ) -> Result<(), PublishRefused> {
        self.hand_to_peers(now, p, sink)?;
        self.deliver_local(now, p, sink);
        Ok(())
    }

    /// The first half of a publish: refused if a peer it goes to cannot
    /// hold it, else handed to every peer it goes to (interested peers
    /// whose advertised filters can match its tags; every peer on a
    /// history channel). After it succeeds the publish cannot fail any
    /// more: a driver may answer 2xx then, before the local fan-out.
    pub fn hand_to_peers(
        &mut self,
        now: Instant,
        p: &Publish<'_>,
        sink: &mut impl Sink<H>,
    ) -> Result<(), PublishRefused> {
        if self
            .keeps_history(p.event.app, p.event.channel.as_str())
            .is_some()
        {
            return self.history_hand(now, p, sink);
        }
        self.check_peer_room(p, sink)?;
        self.forward(p, sink);
        Ok(())
    }

    /// The second half of a publish: every local subscriber that takes it
    /// (Pusher and wsify, each protocol's frame encoded once; each group of
    /// selected subscriptions evaluated once), and the cache.
    pub fn deliver_local(&mut self, now: Instant, p: &Publish<'_>, sink: &mut impl Sink<H>) {
        let ev = &p.event;
        let position = self
            .keeps_history(ev.app, ev.channel.as_str())
            .map(|_| self.history_head(ev.app, ev.channel));
        let frame = self.cache_event(now, ev, position.as_deref());
        let exclude = ev.exclude_socket.and_then(|s| self.local_conn_of(s));
        let Some(ch) = self.tables[ev.app].channels.get(ev.channel) else {
            return;
        };
        // Which groups take it: untagged events only plain subscriptions.
        let matched = &mut self.matched;
        matched.clear();
        if let Some(groups) = ch.groups.as_ref() {
            if !groups.evaluate(p.tags(), ch.subs.len(), matched) {
                return;
            }
        }
        let wsify_frames = (ch.wsify > 0).then(|| {
            let owned;
            let content = match ev.content {
                Some(c) => c,
                None => {
                    owned = wsify::content_of_event_data(ev.data);
                    &owned
                }
            };
            let envelope = match &position {
                Some(p) => wsify::envelope_frame_at(ev.channel.as_str(), content, p),
                None => wsify::envelope_frame(ev.channel.as_str(), content),
            };
            (wsify::raw_frame(content.get()), envelope)
        });
        for (c, s) in &ch.subs {
            if Some(*c) == exclude {
                continue;
            }
            if s.group != PLAIN && !matched.get(s.group as usize).copied().unwrap_or(false) {
                continue;
            }
            let f = match (s.proto, &wsify_frames) {
                (Proto::Wsify { envelope: false }, Some((raw, _))) => raw,
                (Proto::Wsify { envelope: true }, Some((_, env))) => env,
                _ => &frame,
            };
            sink.send(&s.h, f);
        }
    }

    /// Whether every peer the publish goes to can hold it.
    fn check_peer_room(
        &self,
        p: &Publish<'_>,
        sink: &mut impl Sink<H>,
    ) -> Result<(), PublishRefused> {
        if self.peers.is_empty() {
            return Ok(());
        }
        let ev = &p.event;
        let remote = self.tables[ev.app].remote.get(ev.channel);
        let to = if ev.channel.is_cache() {
            &self.peers
        } else {
            match remote {
                Some(r) => &r.interested,
                None => return Ok(()),
            }
        };
        let tags = p.tags();
        for peer in to {
            if remote.is_some_and(|r| !peer_wants(r, peer, tags)) && !ev.channel.is_cache() {
                continue;
            }
            if !sink.peer_has_room(peer) {
                return Err(PublishRefused::PeerBufferFull(peer.clone()));
            }
        }
        Ok(())
    }

    /// Sends an event to every peer interested in the channel whose filters
    /// can match (one frame, encoded once), and the new cached event of a
    /// cache channel to the others.
    fn forward(&self, p: &Publish<'_>, sink: &mut impl Sink<H>) {
        if self.peers.is_empty() {
            return;
        }
        let ev = &p.event;
        let app_id = self.app_id(ev.app);
        let remote = self.tables[ev.app].remote.get(ev.channel);
        let interested = remote.map(|r| &r.interested);
        if let (Some(r), Some(interested)) = (remote, interested.filter(|i| !i.is_empty())) {
            let tags = p.tags();
            let mut frame = None;
            for to in interested.iter().filter(|peer| peer_wants(r, peer, tags)) {
                let frame = frame
                    .get_or_insert_with(|| PeerFrame::Event(peer_event(app_id, p, None)).encode());
                sink.peer_durable(to, frame, AckFor::Order);
            }
        }
        let n = interested.map_or(0, BTreeSet::len);
        if ev.channel.is_cache() && n < self.peers.len() {
            let frame = PeerFrame::CacheSet {
                app: app_id.to_owned(),
                channel: ev.channel.to_string(),
                event: ev.name.to_owned(),
                data: ev.data.to_owned(),
                age_ms: 0,
            }
            .encode();
            for to in &self.peers {
                if !interested.is_some_and(|i| i.contains(to)) {
                    sink.peer(to, FrameKind::Data, &frame);
                }
            }
        }
    }

    /// A peer's event ([`PeerFrame::Event`]): on a history channel stored
    /// first (a duplicate is dropped: it was delivered already), then
    /// delivered locally, never forwarded. Invalid tags drop it.
    pub fn deliver_peer_event(&mut self, now: Instant, e: PeerEvent, sink: &mut impl Sink<H>) {
        let Some((app, name)) = self.peer_channel(&e.app, &e.channel) else {
            return;
        };
        let tags = match e.tags.map(Tags::from_pairs).transpose() {
            Ok(tags) => tags,
            Err(_) => {
                tracing::debug!(channel = %e.channel, "dropped a peer's event with invalid tags");
                return;
            }
        };
        let event = Event {
            exclude_socket: e.exclude.as_deref(),
            user_id: e.user_id.as_deref(),
            ..Event::new(app, &name, &e.event, &e.data)
        };
        let p = Publish {
            event,
            tags: tags.as_ref(),
        };
        self.arrived(now, &p, e.position, sink);
    }

    /// An event from a peer (its frame, or a newer event of its history
    /// copy), with its number on a history channel.
    pub(super) fn arrived(
        &mut self,
        now: Instant,
        p: &Publish<'_>,
        position: Option<HistoryStamp>,
        sink: &mut impl Sink<H>,
    ) {
        let Some(stamp) = position else {
            return self.deliver_local(now, p, sink);
        };
        if self.store_peer_event(now, p, stamp) {
            self.deliver_local(now, p, sink);
            self.resolve_pending(now, p.event.app, p.event.channel, sink);
        }
    }
}

/// The peer frame of a publish (with its number on a history channel).
pub(super) fn peer_event(
    app_id: &str,
    p: &Publish<'_>,
    position: Option<HistoryStamp>,
) -> PeerEvent {
    let ev = &p.event;
    PeerEvent {
        app: app_id.to_owned(),
        channel: ev.channel.to_string(),
        event: ev.name.to_owned(),
        data: ev.data.to_owned(),
        exclude: ev.exclude_socket.map(str::to_owned),
        user_id: ev.user_id.map(str::to_owned),
        tags: p.tags.filter(|t| !t.is_empty()).map(Tags::to_pairs),
        position,
    }
}
