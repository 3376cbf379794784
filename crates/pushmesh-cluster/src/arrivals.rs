//! Peer frames handed to the node and those it has handled. A peer
//! acknowledges a data frame once it is handed to the node's one queue of
//! peer frames; a publish taken by this node afterwards must not overtake
//! it on its way to the channel's shard (order through the balancer,
//! docs/cluster.md). So a publish first waits ([`Cluster::caught_up`])
//! until the node has handled every frame handed before it, which is at
//! once when that queue is empty (the usual case: one atomic load).

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::Cluster;

/// Counters of frames handed to the node and handled by it.
#[derive(Default)]
pub(crate) struct Arrivals {
    handed: AtomicU64,
    handled: AtomicU64,
    notify: Notify,
}

impl Arrivals {
    /// A frame was handed to the node (before its acknowledgement).
    pub(crate) fn handed(&self) {
        self.handed.fetch_add(1, Ordering::AcqRel);
    }
}

impl Cluster {
    /// The node handled one frame of [`crate::ClusterEvent::Frame`] (it is
    /// on its shard's queue, or done): call once per such event.
    pub fn frame_handled(&self) {
        let a = &self.inner.arrivals;
        a.handled.fetch_add(1, Ordering::AcqRel);
        a.notify.notify_waiters();
    }

    /// Waits until every frame handed to the node so far is handled, or
    /// until `deadline`; whether it caught up.
    pub async fn caught_up(&self, deadline: Instant) -> bool {
        let a = &self.inner.arrivals;
        let target = a.handed.load(Ordering::Acquire);
        loop {
            let wait = a.notify.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            if a.handled.load(Ordering::Acquire) >= target {
                return true;
            }
            tokio::select! {
                () = &mut wait => {}
                () = tokio::time::sleep_until(deadline) => {
                    return a.handled.load(Ordering::Acquire) >= target;
                }
            }
        }
    }
}
