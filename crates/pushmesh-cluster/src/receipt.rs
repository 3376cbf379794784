//! Data frames whose acknowledgement a caller waits for: a publish is
//! answered once every peer with subscribers for it acknowledged it (order
//! through the balancer, docs/cluster.md), and on a history channel once
//! at least one peer holds the event, so the history survives the loss of
//! the node that took it (docs/history.md).

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use pushmesh_core::NodeId;
use tokio::time::Instant;

use crate::peers::PeerSlot;
use crate::{lock, Cluster};

/// A data frame held for a peer: acknowledged or not yet.
pub struct Receipt {
    slot: Arc<PeerSlot>,
    seq: u64,
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receipt").field("seq", &self.seq).finish()
    }
}

impl Receipt {
    /// Whether the peer acknowledged the frame.
    pub fn acked(&self) -> bool {
        lock(&self.slot.out).acked_through() >= self.seq
    }
}

impl Cluster {
    /// Sends a data frame as [`Cluster::send`] does, and returns a receipt
    /// to wait for its acknowledgement (`None` if it was not taken).
    pub fn send_with_receipt(&self, to: &NodeId, frame: Bytes) -> Option<Receipt> {
        let slot = self.inner.peers.get(to)?;
        let seq = lock(&slot.out).push(frame).ok()?;
        slot.data_ready.notify_one();
        Some(Receipt { slot, seq })
    }
}

/// Waits until one of `receipts` is acknowledged (true), or until
/// `deadline` (false). No receipt: true at once.
pub async fn first_ack(receipts: &[Receipt], deadline: Instant) -> bool {
    acked_by(receipts, deadline, |r| r.iter().any(Receipt::acked)).await
}

/// Waits until every one of `receipts` is acknowledged (true), or until
/// `deadline` (false). No receipt: true at once.
pub async fn all_acked(receipts: &[Receipt], deadline: Instant) -> bool {
    acked_by(receipts, deadline, |r| r.iter().all(Receipt::acked)).await
}

/// Waits until `done(receipts)` or `deadline`; whether it is done.
async fn acked_by(
    receipts: &[Receipt],
    deadline: Instant,
    done: impl Fn(&[Receipt]) -> bool,
) -> bool {
    if receipts.is_empty() {
        return true;
    }
    loop {
        // Registered before the check, so no acknowledgement is missed.
        let mut waits: Vec<_> = receipts
            .iter()
            .map(|r| Box::pin(r.slot.acked.notified()))
            .collect();
        for w in &mut waits {
            w.as_mut().enable();
        }
        if done(receipts) {
            return true;
        }
        let any = std::future::poll_fn(|cx| {
            for w in &mut waits {
                if w.as_mut().poll(cx).is_ready() {
                    return std::task::Poll::Ready(());
                }
            }
            std::task::Poll::Pending
        });
        tokio::select! {
            () = any => {}
            () = tokio::time::sleep_until(deadline) => return done(receipts),
        }
    }
}
