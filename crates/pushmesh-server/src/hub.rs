//! The driver around [`Core`]: per-connection queues and output dispatch.
//!
//! The hub lives behind a `std::sync::Mutex` that is never held across an
//! `.await`: callers lock, feed the core, [`Hub::dispatch`], unlock.
//! Dispatch only `try_send`s into bounded per-connection queues; a
//! connection whose queue is full is closed with 4100 and slows nobody.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use pushmesh_core::{ConnId, Core, Output, WebhookScheduler};
use pushmesh_protocol::CloseCode;
use tokio::sync::{mpsc, oneshot, Notify};

/// Why the hub asks a connection task to close.
#[derive(Debug, Clone)]
pub struct CloseRequest {
    /// Pusher close code.
    pub code: CloseCode,
    /// Reason, sent in the close frame.
    pub reason: String,
}

/// The dispatch side of one connection.
pub struct ConnHandle {
    tx: mpsc::Sender<Utf8Bytes>,
    close: Option<oneshot::Sender<CloseRequest>>,
}

impl ConnHandle {
    /// A handle and what its connection task receives.
    pub fn new(
        queue: usize,
    ) -> (
        Self,
        mpsc::Receiver<Utf8Bytes>,
        oneshot::Receiver<CloseRequest>,
    ) {
        let (tx, rx) = mpsc::channel(queue);
        let (ctx, crx) = oneshot::channel();
        (
            Self {
                tx,
                close: Some(ctx),
            },
            rx,
            crx,
        )
    }

    fn request_close(&mut self, code: CloseCode, reason: String) {
        if let Some(c) = self.close.take() {
            let _ = c.send(CloseRequest { code, reason });
        }
    }
}

/// Counters kept by the hub.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Frames queued to connections.
    pub frames_queued: AtomicU64,
    /// Connections closed because their queue was full.
    pub slow_consumers: AtomicU64,
}

/// The core and the connections it talks to.
pub struct Hub {
    /// The state machine.
    pub core: Core,
    conns: HashMap<ConnId, ConnHandle>,
    last: Option<(Bytes, Utf8Bytes)>,
    /// Webhook events waiting for their delay (vacate, member removed) or for the sender.
    pub webhooks: WebhookScheduler,
    /// Wakes the webhook pump when events were scheduled.
    pub hook_ready: Arc<Notify>,
    /// The cluster layer, when clustering is on.
    pub cluster: Option<pushmesh_cluster::Cluster>,
}

impl Hub {
    /// A hub around `core`.
    pub fn new(core: Core, webhooks: WebhookScheduler) -> Self {
        Self {
            core,
            conns: HashMap::new(),
            last: None,
            webhooks,
            hook_ready: Arc::new(Notify::new()),
            cluster: None,
        }
    }

    /// Registers a connection's handle.
    pub fn attach(&mut self, conn: ConnId, handle: ConnHandle) {
        self.conns.insert(conn, handle);
    }

    /// Forgets a connection's handle.
    pub fn detach(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
    }

    /// Connections attached.
    pub fn attached(&self) -> usize {
        self.conns.len()
    }

    /// The shared text frame for `frame`: consecutive outputs of one publish
    /// carry the same bytes, so UTF-8 is checked once per publish, not per recipient.
    fn text(&mut self, frame: Bytes) -> Option<Utf8Bytes> {
        if let Some((b, t)) = &self.last {
            if b.as_ptr() == frame.as_ptr() && b.len() == frame.len() {
                return Some(t.clone());
            }
        }
        let t = Utf8Bytes::try_from(frame.clone()).ok()?;
        self.last = Some((frame, t.clone()));
        Some(t)
    }

    /// Moves everything the core wants done into the connection queues.
    pub fn dispatch(&mut self, stats: &HubStats) {
        let mut queued = 0u64;
        let mut hooked = false;
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Send { conn, frame } => {
                    let Some(text) = self.text(frame) else {
                        continue;
                    };
                    let Some(h) = self.conns.get_mut(&conn) else {
                        continue;
                    };
                    match h.tx.try_send(text) {
                        Ok(()) => queued += 1,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            if h.close.is_some() {
                                stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(conn = conn.0, "slow consumer, closing with 4100");
                            }
                            h.request_close(
                                CloseCode::OverCapacity,
                                "client too slow: outbound queue full".into(),
                            );
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {}
                    }
                }
                Output::Close { conn, code, reason } => {
                    if let Some(h) = self.conns.get_mut(&conn) {
                        h.request_close(code, reason);
                    }
                }
                Output::Peer { to, kind, frame } => {
                    if let Some(c) = &self.cluster {
                        c.send(&to, kind, frame);
                    }
                }
                Output::Hook { app, event } => {
                    self.webhooks.push(Instant::now(), app, event);
                    hooked = true;
                }
            }
        }
        self.last = None;
        stats.frames_queued.fetch_add(queued, Ordering::Relaxed);
        if hooked {
            self.hook_ready.notify_one();
        }
    }
}
