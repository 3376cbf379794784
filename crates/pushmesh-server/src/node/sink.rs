//! The driver's [`Sink`]: the effects of one batch of shard or user work,
//! done as they come (frames into connection queues, peer frames into the
//! cluster links), with state changes numbered and webhook events and
//! barrier holds registered when the batch ends.

use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use pushmesh_core::machine::{Barrier, Batch, ShardSink};
use pushmesh_core::{AckFor, AppIdx, ChannelInfo, Delta, FrameKind, NodeId, PublishRefused, Sink};
use pushmesh_protocol::webhook::WebhookEvent;
use pushmesh_protocol::wire::Outbound;
use pushmesh_protocol::CloseCode;

use super::{hook_relay, lock, Accepted, Links, Receipts, Reply};
use crate::conn::ConnRef;

/// The effects of one batch of work, done as they come.
pub struct DriverSink<'a> {
    links: &'a Links,
    last: Option<(Bytes, Outbound)>,
    queued: u64,
    batch: Batch<ConnRef>,
    /// Receipts of the current publish's data frames.
    receipts: Receipts,
}

impl<'a> DriverSink<'a> {
    pub(super) fn new(links: &'a Links) -> Self {
        Self {
            links,
            last: None,
            queued: 0,
            batch: Batch::default(),
            receipts: Receipts::default(),
        }
    }

    /// The shared frame for `frame`: consecutive sends of one publish carry
    /// the same bytes, so it is checked (UTF-8) and framed once per publish,
    /// and compressed at most once.
    fn text(&mut self, frame: &Bytes) -> Option<Outbound> {
        if let Some((b, t)) = &self.last {
            if b.as_ptr() == frame.as_ptr() && b.len() == frame.len() {
                return Some(t.clone());
            }
        }
        std::str::from_utf8(frame).ok()?;
        let t = Outbound::text(frame);
        self.last = Some((frame.clone(), t.clone()));
        Some(t)
    }

    /// Ends the batch ([`Batch::end`]): state changes numbered and sent
    /// to the peers under the replicator's lock (so every link carries
    /// them in numbering order), holds registered with the barrier,
    /// webhook events handed to the scheduler.
    pub(super) fn finish(self) {
        let links = self.links;
        links
            .stats
            .frames_queued
            .fetch_add(self.queued, Ordering::Relaxed);
        let now = Instant::now();
        // A node without a cluster has nobody to replicate to.
        let end = if self.batch.needs_numbering() && links.cluster.is_some() {
            let mut r = lock(&links.replicator);
            let mut barrier = lock(&links.waiters);
            let mut end = self
                .batch
                .end(now, Some(&mut r), &mut barrier, links.barrier_wait);
            drop(barrier);
            send_control(links, std::mem::take(&mut end.control));
            drop(r);
            end
        } else {
            let mut none = Barrier::default();
            self.batch.end(now, None, &mut none, links.barrier_wait)
        };
        links.released(end.released);
        if !end.hooks.is_empty() {
            let mut h = lock(&links.hooks);
            let mut scheduled = Vec::with_capacity(end.hooks.len());
            for (app, event) in end.hooks {
                if let Some(id) = h.push(now, app, event.clone()) {
                    scheduled.push((id, app, event));
                }
            }
            let cancelled = h.take_cancelled();
            // Handed before the pump can deliver (and confirm) them.
            hook_relay::scheduled(links, scheduled, cancelled);
            drop(h);
            links.hook_ready.notify_one();
        }
    }
}

pub(super) fn send_control(links: &Links, frames: Vec<(NodeId, Bytes)>) {
    if let Some(c) = &links.cluster {
        for (to, frame) in frames {
            c.send(&to, FrameKind::Control, frame);
        }
    }
}

impl Sink<ConnRef> for DriverSink<'_> {
    fn send(&mut self, to: &ConnRef, frame: &Bytes) {
        let Some(text) = self.text(frame) else {
            return;
        };
        if to.try_send(text) {
            self.queued += 1;
        } else if to.request_close(
            CloseCode::OverCapacity,
            "client too slow: outbound queue full",
        ) {
            self.links
                .stats
                .slow_consumers
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(conn = to.0.id().0, "slow consumer, closing with 4100");
        }
    }

    fn send_state(&mut self, to: &ConnRef, frame: &Bytes) -> bool {
        let Some(text) = self.text(frame) else {
            return true;
        };
        let queued = to.try_send_state(text);
        self.queued += u64::from(queued);
        queued
    }

    fn close(&mut self, to: &ConnRef, code: CloseCode, reason: &str) {
        to.request_close(code, reason);
    }

    fn peer(&mut self, to: &NodeId, kind: FrameKind, frame: &Bytes) {
        if let Some(c) = &self.links.cluster {
            c.send(to, kind, frame.clone());
        }
    }

    fn peer_durable(&mut self, to: &NodeId, frame: &Bytes, why: AckFor) {
        if let Some(c) = &self.links.cluster {
            match c.send_with_receipt(to, frame.clone()) {
                Some(r) => match why {
                    AckFor::Order => self.receipts.ordered.push(r),
                    AckFor::Copy => self.receipts.copies.push(r),
                },
                None => {
                    c.send(to, FrameKind::Data, frame.clone());
                }
            }
        }
    }

    fn peer_has_room(&mut self, to: &NodeId) -> bool {
        self.links.cluster.as_ref().is_none_or(|c| c.has_room(to))
    }

    fn hold(&mut self, to: &ConnRef) {
        to.hold();
        self.batch.hold(to.clone());
    }

    fn hook(&mut self, app: AppIdx, event: WebhookEvent) {
        self.batch.hook(app, event);
    }

    fn replicate(&mut self, delta: Delta) {
        self.batch.replicate(delta);
    }
}

impl ShardSink<ConnRef> for DriverSink<'_> {
    type Reply = Reply;

    /// Answers with the receipts of the data frames this publish sent
    /// (the HTTP answer waits for them: [`Receipts::wait`]).
    fn answer(&mut self, reply: Reply, outcome: Result<ChannelInfo, PublishRefused>) {
        let receipts = std::mem::take(&mut self.receipts);
        let _ = reply.send(outcome.map(|info| Accepted { info, receipts }));
    }
}
