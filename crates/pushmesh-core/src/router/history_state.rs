//! The history state a shard owns: its store, the origins that may still
//! send events, the subscribes waiting for events their position names,
//! and which peers got the shard's copy. Its methods touch only this
//! state; `history.rs` and `history_sync.rs` compose it with the channel
//! tables and the sink.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use pushmesh_protocol::ChannelName;

use super::history::{Answer, RECOVERY_WAIT};
use super::Joining;
use crate::app::{AppIdx, ConnId};
use crate::filter::Selector;
use crate::history::{Check, HistoryStats, HistoryStore, Origin, Position};
use crate::peer_frame::NodeId;
use crate::session::Proto;
use crate::sink::Handle;

/// A subscribe waiting for the events its position names.
pub(super) struct Pending<H> {
    pub(super) j: Joining<H>,
    pub(super) proto: Proto,
    from: Position,
    until: Instant,
    pub(super) selector: Option<Arc<Selector>>,
}

impl<H: Handle> Pending<H> {
    fn is(&self, conn: ConnId, app: AppIdx, name: &ChannelName) -> bool {
        self.j.h.conn() == conn && self.j.app == app && self.j.name == *name
    }
}

/// A shard's history state.
pub(super) struct ShardHistory<H> {
    /// None if no app keeps history.
    store: Option<Box<HistoryStore>>,
    /// Peers' incarnations that may still send history events.
    live_origins: Vec<Origin>,
    /// Subscribes waiting for history events their position names.
    pending: Vec<Pending<H>>,
    /// The incarnation of each peer this shard sent its history to.
    sent: HashMap<NodeId, u64>,
}

impl<H> Default for ShardHistory<H> {
    fn default() -> Self {
        Self {
            store: None,
            live_origins: Vec::new(),
            pending: Vec::new(),
            sent: HashMap::new(),
        }
    }
}

impl<H: Handle> ShardHistory<H> {
    pub(super) fn set_store(&mut self, store: HistoryStore) {
        self.store = Some(Box::new(store));
    }

    pub(super) fn set_live_origins(&mut self, origins: Vec<Origin>) {
        self.live_origins = origins;
    }

    pub(super) fn store(&self) -> Option<&HistoryStore> {
        self.store.as_deref()
    }

    pub(super) fn store_mut(&mut self) -> Option<&mut HistoryStore> {
        self.store.as_deref_mut()
    }

    /// Whether the tick has work: history to expire, recoveries waiting.
    pub(super) fn needs_tick(&self) -> bool {
        !self.pending.is_empty() || self.store.as_ref().is_some_and(|h| h.stats.bytes > 0)
    }

    pub(super) fn stats(&self) -> HistoryStats {
        self.store.as_ref().map(|h| h.stats).unwrap_or_default()
    }

    /// The channel's position here (`0` before any event).
    pub(super) fn head(&self, app: AppIdx, name: &ChannelName) -> String {
        self.store()
            .and_then(|s| s.log(app, name))
            .map_or_else(|| "0".to_owned(), |l| l.head().to_string())
    }

    /// How to answer a subscribe asking for `position`; `None`: wait.
    pub(super) fn answer(
        &self,
        app: AppIdx,
        name: &ChannelName,
        position: Option<&str>,
    ) -> Option<Answer> {
        let Some(text) = position else {
            return Some(Answer::Fresh);
        };
        let Ok(p) = Position::parse(text) else {
            return Some(Answer::Lost);
        };
        let own = self.store().map(|s| s.origin());
        let live = |o: Origin| Some(o) != own && self.live_origins.contains(&o);
        let check = match self.store().and_then(|s| s.log(app, name)) {
            Some(log) => log.check(&p, live),
            None if p.entries().next().is_none() => Check::Continuous,
            None if p.entries().any(|(o, _)| live(o)) => Check::Ahead,
            None => Check::Lost,
        };
        match check {
            Check::Continuous => Some(Answer::Recovered(p)),
            Check::Ahead => None,
            Check::Lost => Some(Answer::Lost),
        }
    }

    /// Counts an answer given; its `recovered` field.
    pub(super) fn count(&mut self, a: &Answer) -> Option<bool> {
        let recovered = match a {
            Answer::Fresh => None,
            Answer::Recovered(_) => Some(true),
            Answer::Lost => Some(false),
        };
        if let Some(s) = self.store_mut() {
            match recovered {
                Some(true) => s.stats.recovered += 1,
                Some(false) => s.stats.not_recovered += 1,
                None => {}
            }
        }
        recovered
    }

    /// Parks a subscribe until the events its position names arrive (or
    /// [`RECOVERY_WAIT`] passed); replaces one of the same connection.
    pub(super) fn park(
        &mut self,
        now: Instant,
        j: Joining<H>,
        proto: Proto,
        position: &str,
        selector: Option<Arc<Selector>>,
    ) {
        let from = Position::parse(position).unwrap_or_default();
        self.pending.retain(|p| !p.is(j.h.conn(), j.app, &j.name));
        self.pending.push(Pending {
            j,
            proto,
            from,
            until: now + RECOVERY_WAIT,
            selector,
        });
    }

    /// Forgets a parked subscribe (the connection unsubscribed).
    pub(super) fn unpark(&mut self, conn: ConnId, app: AppIdx, name: &ChannelName) {
        if !self.pending.is_empty() {
            self.pending.retain(|p| !p.is(conn, app, name));
        }
    }

    /// Takes the parked subscribes of a channel that can be answered now.
    pub(super) fn take_answerable(
        &mut self,
        app: AppIdx,
        name: &ChannelName,
    ) -> Vec<(Pending<H>, Answer)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.pending.len() {
            let p = &self.pending[i];
            if p.j.app != app || p.j.name != *name {
                i += 1;
                continue;
            }
            let text = p.from.to_string();
            match self.answer(app, name, Some(&text)) {
                None => i += 1,
                Some(a) => out.push((self.pending.swap_remove(i), a)),
            }
        }
        out
    }

    pub(super) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Takes the parked subscribes that waited too long.
    pub(super) fn take_late(&mut self, now: Instant) -> Vec<Pending<H>> {
        if !self.pending.iter().any(|p| p.until <= now) {
            return Vec::new();
        }
        let (late, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.until <= now);
        self.pending = wait;
        late
    }

    /// Records that `to`'s incarnation `epoch` gets the copy; false if it
    /// got it already (or there is no store).
    pub(super) fn send_to(&mut self, to: &NodeId, epoch: u64) -> bool {
        if self.store.is_none() || self.sent.get(to) == Some(&epoch) {
            return false;
        }
        self.sent.insert(to.clone(), epoch);
        true
    }

    /// Forgets the copies sent to peers that are gone (they get the whole
    /// history again if they link again).
    pub(super) fn keep_peers(&mut self, peers: &BTreeSet<NodeId>) {
        self.sent.retain(|p, _| peers.contains(p));
    }
}
