//! What a batch of shard or user-registry work leaves for the node: this
//! node's state changes (numbered for the peers when the batch ends),
//! connections to hold behind the subscription barrier, webhook events.
//! A driver's [`crate::Sink`] keeps one [`Batch`] and ends it with
//! [`Batch::end`]; both drivers end batches the same way.

use std::time::{Duration, Instant};

use bytes::Bytes;
use pushmesh_protocol::webhook::WebhookEvent;

use super::barrier::{Barrier, Released};
use crate::app::AppIdx;
use crate::peer_frame::{Delta, NodeId};
use crate::replication::{Effects, Replicator};

/// The collected part of a batch's effects. See the module docs.
#[derive(Debug)]
pub struct Batch<C> {
    deltas: Vec<Delta>,
    held: Vec<C>,
    hooks: Vec<(AppIdx, WebhookEvent)>,
}

impl<C> Default for Batch<C> {
    fn default() -> Self {
        Self {
            deltas: Vec::new(),
            held: Vec::new(),
            hooks: Vec::new(),
        }
    }
}

/// What ending a batch asks the driver to do, in this order.
#[derive(Debug)]
pub struct BatchEnd<C> {
    /// The numbered changes for the peers: sent before any later batch
    /// is numbered (the server sends them under the replicator's lock),
    /// so every link carries them in numbering order.
    pub control: Vec<(NodeId, Bytes)>,
    /// Held connections to let go now (every peer acknowledged, their
    /// deadline passed, or there is no cluster).
    pub released: Vec<Released<C>>,
    /// Webhook events, for the scheduler (after the changes are numbered).
    pub hooks: Vec<(AppIdx, WebhookEvent)>,
}

impl<C> Batch<C> {
    /// A change of this node's state, to number and replicate.
    pub fn replicate(&mut self, delta: Delta) {
        self.deltas.push(delta);
    }

    /// `conn` waits behind the barrier for the changes of this batch.
    pub fn hold(&mut self, conn: C) {
        self.held.push(conn);
    }

    /// A webhook event of an app.
    pub fn hook(&mut self, app: AppIdx, event: WebhookEvent) {
        self.hooks.push((app, event));
    }

    /// Whether the batch changed state or holds a connection (ending it
    /// needs the replicator then).
    pub fn needs_numbering(&self) -> bool {
        !self.deltas.is_empty() || !self.held.is_empty()
    }

    /// Ends the batch: numbers its changes with `replicator` (`None`: a
    /// node without a cluster, which has nobody to replicate to and lets
    /// held connections go at once), holds its connections in `barrier`
    /// until every peer acknowledged them or `wait` passed, and lets go
    /// those the barrier releases now.
    pub fn end(
        self,
        now: Instant,
        replicator: Option<&mut Replicator>,
        barrier: &mut Barrier<C>,
        wait: Duration,
    ) -> BatchEnd<C> {
        let Self {
            deltas,
            held,
            hooks,
        } = self;
        let mut end = BatchEnd {
            control: Vec::new(),
            released: Vec::new(),
            hooks,
        };
        let Some(r) = replicator else {
            end.released.extend(held.into_iter().map(|conn| Released {
                conn,
                timed_out: false,
            }));
            return end;
        };
        let mut fx = Effects::default();
        for d in deltas {
            r.local(d, &mut fx);
        }
        end.control = fx.send;
        let seq = r.seq();
        for conn in held {
            barrier.hold(seq, now + wait, conn);
        }
        barrier.release(now, r.acked_by_all(), &mut end.released);
        end
    }
}
