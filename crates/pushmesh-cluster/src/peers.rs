//! Per-peer state that outlives a link: the buffer of data frames not yet
//! acknowledged (replayed when a link to the same incarnation comes back),
//! what was received from the peer (duplicates dropped), and the control
//! queue of the current link.
//!
//! The table of peers is read on every send without a lock (`ArcSwap`); it
//! changes only when a peer is first linked or forgotten. Each peer's
//! buffer has its own small lock.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use pushmesh_core::peer_buffer::{stream_id, Inbound, Outbound};
use pushmesh_core::{FrameKind, NodeId};
use tokio::sync::{mpsc, Notify};

use crate::{codec, lock, Cluster};

/// Bytes held per peer at most (beside the frame bound, `peer_queue`).
pub const PEER_BUFFER_BYTES: usize = 256 * 1024 * 1024;

/// One peer, across its links.
pub(crate) struct PeerSlot {
    /// Data frames held for the peer.
    pub out: Mutex<Outbound>,
    /// Wakes the data writer of the current link.
    pub data_ready: Notify,
    /// Wakes whoever waits for an acknowledgement (`receipt.rs`).
    pub acked: Notify,
    /// What was received from the peer.
    pub inbound: Mutex<Inbound>,
    /// The control queue of the current link, if one is up.
    pub control: Mutex<Option<mpsc::Sender<Bytes>>>,
}

/// The table of peers.
pub(crate) struct Peers {
    table: ArcSwap<HashMap<NodeId, Arc<PeerSlot>>>,
    /// Changes of the table (rare) are serialised by this lock.
    write: Mutex<()>,
    epoch: u64,
    streams: AtomicU64,
    max_frames: usize,
}

impl Peers {
    pub fn new(epoch: u64, max_frames: usize) -> Self {
        Self {
            table: ArcSwap::from_pointee(HashMap::new()),
            write: Mutex::new(()),
            epoch,
            streams: AtomicU64::new(0),
            max_frames,
        }
    }

    /// The slot of a peer, if it was ever linked (a forgotten peer has a
    /// fresh one: empty buffer, new stream).
    pub fn get(&self, node: &NodeId) -> Option<Arc<PeerSlot>> {
        self.table.load().get(node).cloned()
    }

    /// The slot of a peer, made on its first link.
    pub fn get_or_create(&self, node: &NodeId) -> Arc<PeerSlot> {
        if let Some(s) = self.get(node) {
            return s;
        }
        let _w = lock(&self.write);
        if let Some(s) = self.get(node) {
            return s;
        }
        let slot = self.new_slot(Inbound::default());
        let mut t = HashMap::clone(&self.table.load());
        t.insert(node.clone(), slot.clone());
        self.table.store(Arc::new(t));
        slot
    }

    /// Forgets a peer (declared dead, or left): its held frames go, and a
    /// later link starts a new stream (so the peer can tell). What was
    /// received from it is kept, to recognise its stream if it comes back.
    pub fn forget(&self, node: &NodeId) -> Option<Arc<PeerSlot>> {
        let _w = lock(&self.write);
        let mut t = HashMap::clone(&self.table.load());
        let old = t.remove(node);
        if let Some(o) = &old {
            // Keep the receiving side: a new slot inherits it.
            let inbound = std::mem::take(&mut *lock(&o.inbound));
            t.insert(node.clone(), self.new_slot(inbound));
        }
        self.table.store(Arc::new(t));
        old
    }

    /// A slot with an empty buffer numbered in a new stream.
    fn new_slot(&self, inbound: Inbound) -> Arc<PeerSlot> {
        let n = self.streams.fetch_add(1, Ordering::Relaxed) * 1024;
        Arc::new(PeerSlot {
            out: Mutex::new(Outbound::new(
                stream_id(self.epoch, n),
                self.max_frames,
                PEER_BUFFER_BYTES,
            )),
            data_ready: Notify::new(),
            acked: Notify::new(),
            inbound: Mutex::new(inbound),
            control: Mutex::new(None),
        })
    }

    /// Every slot.
    pub fn all(&self) -> Vec<(NodeId, Arc<PeerSlot>)> {
        self.table
            .load()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl Cluster {
    /// Sends a frame to a peer; never waits. Data frames are held until the
    /// peer acknowledges them (replayed over the next link to the same
    /// incarnation); control frames go on the current link only. Returns
    /// false (and counts it) when the frame could not be taken: no link
    /// for control, a full buffer (or a peer never linked) for data.
    pub fn send(&self, to: &NodeId, kind: FrameKind, frame: Bytes) -> bool {
        let slot = self.inner.peers.get(to);
        let ok = match (kind, slot) {
            (FrameKind::Data, Some(slot)) => {
                let pushed = lock(&slot.out).push(frame).is_ok();
                if pushed {
                    slot.data_ready.notify_one();
                }
                pushed
            }
            (FrameKind::Control, Some(slot)) => lock(&slot.control)
                .as_ref()
                .is_some_and(|tx| tx.try_send(codec::control_frame(&frame)).is_ok()),
            (_, None) => false,
        };
        if !ok {
            let c = self.counters(to);
            match kind {
                FrameKind::Data => {
                    let n = c.dropped.fetch_add(1, Ordering::Relaxed);
                    if n.is_power_of_two() {
                        tracing::warn!(peer = %to, dropped = n + 1, "peer buffer full or peer unknown, data frames dropped");
                    }
                }
                // No link now: the next one starts with a full state sync,
                // so nothing is lost (a drain or a restart does this).
                FrameKind::Control => {
                    let n = c.control_unsent.fetch_add(1, Ordering::Relaxed);
                    if n.is_power_of_two() {
                        tracing::debug!(peer = %to, unsent = n + 1, "no link to the peer, control frames left for the next sync");
                    }
                }
            }
        }
        ok
    }

    /// Whether a data frame for `to` can be held now (asked before a
    /// publish is delivered anywhere).
    pub fn has_room(&self, to: &NodeId) -> bool {
        self.inner
            .peers
            .get(to)
            .is_some_and(|s| lock(&s.out).has_room())
    }

    /// Forgets a peer that is gone: its held frames are dropped (its
    /// connections are gone too) and the link, if any, is closed.
    pub fn forget(&self, node: &NodeId) {
        if let Some(slot) = self.inner.peers.forget(node) {
            let n = lock(&slot.out).len();
            if n > 0 {
                tracing::info!(peer = %node, frames = n, "peer gone, its held frames dropped");
            }
        }
        let conn = lock(&self.inner.links).get(node).map(|l| l.conn.clone());
        if let Some(c) = conn {
            c.close(4u32.into(), b"declared dead");
        }
    }

    /// Per peer: frames held, frames replayed so far.
    pub fn buffers(&self) -> Vec<(NodeId, usize, u64)> {
        self.inner
            .peers
            .all()
            .into_iter()
            .map(|(n, s)| {
                let o = lock(&s.out);
                (n, o.len(), o.stats().replayed)
            })
            .collect()
    }

    /// Waits (up to `deadline`) until every peer with a link up has
    /// acknowledged every data frame held for it.
    pub async fn flush(&self, deadline: tokio::time::Instant) {
        loop {
            let linked: HashSet<NodeId> = lock(&self.inner.links).keys().cloned().collect();
            let pending = self
                .inner
                .peers
                .all()
                .into_iter()
                .any(|(n, s)| linked.contains(&n) && !lock(&s.out).is_empty());
            if !pending || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
