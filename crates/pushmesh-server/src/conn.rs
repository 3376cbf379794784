//! A connection as the router sees it: its bounded outbound queue and a
//! close signal; and the registry of open connections (touched on open and
//! close only, never per message).
//!
//! The outbound queue is a `VecDeque` behind the connection's own small
//! lock, with a `Notify` to wake its task: it costs nothing until frames are
//! queued (a tokio `mpsc` allocates a 32-slot block per channel up front),
//! and the task takes everything queued in one swap. What is queued is an
//! [`Outbound`]: a message framed once for every connection it goes to.
//!
//! A connection can be **held** (the subscription barrier): frames queued
//! after [`Conn::hold`] wait until every hold is released, so a
//! `subscription_succeeded` that waits for the peers' acknowledgement keeps
//! its place before the events that follow it.
//!
//! **Backpressure on the client's own requests** (a burst of subscribes):
//! the connection task stops reading the socket while the connection's
//! requests in flight at the shards plus its queued frames reach
//! `read_pause` (a quarter of the queue), and reads again once they drop
//! below. So a client's own answers take at most about that many places,
//! and the frames a barrier holds never count as slow consumption: only
//! deliverable frames count against the queue's bound (`outbound_queue`);
//! held ones have a bound of their own, as large.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use pushmesh_core::{AppConfig, AppIdx, Apps, ConnId, Handle, OpenError};
use pushmesh_protocol::wire::Outbound;
use pushmesh_protocol::CloseCode;

/// Why a connection task is asked to close.
#[derive(Debug, Clone)]
pub struct CloseRequest {
    /// Pusher close code.
    pub code: CloseCode,
    /// Reason, sent in the close frame.
    pub reason: String,
}

/// Queued frames and the barrier holds on them.
#[derive(Default)]
struct Queue {
    frames: VecDeque<Outbound>,
    /// Holds not yet released.
    holds: u32,
    /// While held: frames queued before the first hold (deliverable).
    before_gate: usize,
    /// Frames queued over the connection's life (per-app stats).
    queued: u64,
}

/// The shared side of one connection.
pub struct Conn {
    id: ConnId,
    queue: Mutex<Queue>,
    cap: usize,
    /// Set (under the queue's lock) when frames are queued: the task looks
    /// at the queue without locking it when there is nothing.
    has_frames: AtomicBool,
    /// The connection task, woken when frames are queued or a close is
    /// requested (lock-free, unlike a `Notify`).
    waker: AtomicWaker,
    /// Set when the connection task is gone: frames are dropped.
    gone: AtomicBool,
    close: Mutex<Option<CloseRequest>>,
    closing: AtomicBool,
    /// A close request waits in `close`.
    close_pending: AtomicBool,
    /// Bytes written to the client (per-app stats).
    bytes_sent: AtomicU64,
    /// Requests routed to a shard and not yet handled there.
    in_flight: AtomicUsize,
    /// The task stopped reading: wake it when requests are handled.
    read_paused: AtomicBool,
    /// In flight plus queued at which the task stops reading.
    read_pause: usize,
    /// `queue.frames.len()`, as last set under the queue's lock (read
    /// without it by the connection task before each read).
    queued_len: AtomicUsize,
}

impl Conn {
    /// The connection's id.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// Queues a frame; `false` if the queue is full (the client is too slow).
    /// Frames for a connection whose task is gone are dropped.
    pub fn try_send(&self, frame: Outbound) -> bool {
        if self.gone.load(Ordering::Relaxed) {
            return true;
        }
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        // Held frames (the barrier's) are not the client's slowness: only
        // deliverable ones count against the bound; held ones have their own.
        let held = if q.holds > 0 {
            q.frames.len() - q.before_gate
        } else {
            0
        };
        if q.frames.len() - held >= self.cap || held >= self.cap {
            return false;
        }
        let was_empty = q.frames.is_empty();
        q.frames.push_back(frame);
        q.queued += 1;
        self.queued_len.store(q.frames.len(), Ordering::Relaxed);
        if q.holds > 0 {
            return true;
        }
        self.has_frames.store(true, Ordering::Release);
        drop(q);
        if was_empty {
            self.waker.wake();
        }
        true
    }

    /// Queues a state frame (a `subscription_count`, superseded by the
    /// next) only while the queue is less than half full; `false`: not
    /// queued, send the then current state later (never a slow consumer).
    pub fn try_send_state(&self, frame: Outbound) -> bool {
        if self.gone.load(Ordering::Relaxed) {
            return true;
        }
        if self.queued_len.load(Ordering::Relaxed) >= self.cap / 2 {
            return false;
        }
        self.try_send(frame)
    }

    /// A request of this connection was handed to a shard.
    pub fn routed(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    /// A shard handled one of this connection's requests (its answer, if
    /// any, is queued): a paused task may read again.
    pub fn handled(&self) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if self.read_paused.load(Ordering::Acquire) {
            self.waker.wake();
        }
    }

    /// Whether the task should stop reading the client: its requests in
    /// flight, `taken` frames of its own and the frames queued (held ones
    /// included) reach the bound.
    fn must_pause(&self, taken: usize) -> bool {
        self.in_flight.load(Ordering::Acquire) + taken + self.queued_len.load(Ordering::Relaxed)
            >= self.read_pause
    }

    /// Resolves when a paused task may read again (requests handled,
    /// frames released); `taken` as in [`Outbox::read_paused`]. Cancel-safe.
    pub async fn read_resumed(&self, taken: usize) {
        std::future::poll_fn(|cx| {
            if !self.must_pause(taken) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.must_pause(taken) {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        self.read_paused.store(false, Ordering::Release);
    }

    /// Counts bytes written to the client.
    pub fn wrote(&self, bytes: u64) {
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Frames queued and bytes written so far.
    pub fn traffic(&self) -> (u64, u64) {
        let queued = self.queue.lock().unwrap_or_else(|p| p.into_inner()).queued;
        (queued, self.bytes_sent.load(Ordering::Relaxed))
    }

    /// Holds the frames queued from now on until [`Conn::release`].
    pub fn hold(&self) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.holds == 0 {
            q.before_gate = q.frames.len();
        }
        q.holds += 1;
    }

    /// Releases one hold; the last one lets the held frames go.
    pub fn release(&self) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.holds = q.holds.saturating_sub(1);
        if q.holds == 0 && !q.frames.is_empty() {
            self.has_frames.store(true, Ordering::Release);
            drop(q);
            self.waker.wake();
        }
    }

    /// Asks the connection task to close; the first request wins. Returns
    /// whether this request was the first.
    pub fn request_close(&self, code: CloseCode, reason: &str) -> bool {
        if self.closing.swap(true, Ordering::AcqRel) {
            return false;
        }
        *self.close.lock().unwrap_or_else(|p| p.into_inner()) = Some(CloseRequest {
            code,
            reason: reason.to_owned(),
        });
        self.close_pending.store(true, Ordering::Release);
        self.waker.wake();
        true
    }

    /// Resolves when a close is requested (to interrupt a stuck write).
    pub async fn close_requested(&self) {
        std::future::poll_fn(|cx| {
            if self.close_pending.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.close_pending.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            Poll::Pending
        })
        .await;
    }

    /// Whether a close request waits to be taken.
    pub fn close_pending(&self) -> bool {
        self.close_pending.load(Ordering::Acquire)
    }

    /// The pending close request, if any.
    pub fn take_close(&self) -> Option<CloseRequest> {
        self.close_pending.store(false, Ordering::Release);
        self.close.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// A connection handle stored by the router's shards and the user registry.
#[derive(Clone)]
pub struct ConnRef(pub Arc<Conn>);

impl ConnRef {
    /// A new connection and the receiving end of its outbound queue.
    pub fn new(id: ConnId, queue: usize) -> (Self, Outbox) {
        let c = Arc::new(Conn {
            id,
            queue: Mutex::new(Queue::default()),
            cap: queue.max(1),
            has_frames: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            gone: AtomicBool::new(false),
            close: Mutex::new(None),
            closing: AtomicBool::new(false),
            close_pending: AtomicBool::new(false),
            bytes_sent: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            read_paused: AtomicBool::new(false),
            read_pause: (queue / 4).max(1),
            queued_len: AtomicUsize::new(0),
        });
        (
            Self(c.clone()),
            Outbox {
                conn: c,
                taken: VecDeque::new(),
            },
        )
    }
}

/// The connection task's end of its outbound queue.
pub struct Outbox {
    conn: Arc<Conn>,
    /// Frames taken from the queue in one swap, not yet written.
    taken: VecDeque<Outbound>,
}

/// What wakes a connection task.
pub enum Next {
    /// A frame to write.
    Frame(Outbound),
    /// A close was requested (take it with [`Conn::take_close`]).
    Close,
}

impl Outbox {
    /// The next frame or close request, waiting for one. A close request
    /// comes first. Cancel-safe: nothing is lost if the future is dropped.
    pub async fn recv(&mut self) -> Next {
        std::future::poll_fn(|cx| {
            if let Some(n) = self.poll_next() {
                return Poll::Ready(n);
            }
            self.conn.waker.register(cx.waker());
            // Again: a frame queued before the registration woke nobody.
            match self.poll_next() {
                Some(n) => Poll::Ready(n),
                None => Poll::Pending,
            }
        })
        .await
    }

    fn poll_next(&mut self) -> Option<Next> {
        if self.conn.close_pending.load(Ordering::Acquire) {
            return Some(Next::Close);
        }
        self.try_recv().map(Next::Frame)
    }

    /// Whether reading is paused now; marks the connection so that a
    /// handled request wakes its task.
    pub fn read_paused(&self) -> bool {
        let paused = self.conn.must_pause(self.taken.len());
        self.conn.read_paused.store(paused, Ordering::Release);
        paused
    }

    /// Frames taken from the queue and not yet written.
    pub fn taken(&self) -> usize {
        self.taken.len()
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        if let Some(f) = self.taken.pop_front() {
            return Some(f);
        }
        if !self.conn.has_frames.load(Ordering::Acquire) {
            return None;
        }
        let mut q = self.conn.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.holds == 0 {
            std::mem::swap(&mut q.frames, &mut self.taken);
        } else {
            let n = std::mem::take(&mut q.before_gate);
            self.taken.extend(q.frames.drain(..n));
        }
        self.conn
            .queued_len
            .store(q.frames.len(), Ordering::Relaxed);
        self.conn.has_frames.store(false, Ordering::Release);
        drop(q);
        self.taken.pop_front()
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.conn.gone.store(true, Ordering::Relaxed);
        self.conn
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .frames
            .clear();
    }
}

impl std::ops::Deref for ConnRef {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.0
    }
}

impl Handle for ConnRef {
    fn conn(&self) -> ConnId {
        self.0.id
    }
}

/// Open connections of the node, for quotas, drain and counts.
pub struct Registry {
    inner: Mutex<Open>,
    total: AtomicUsize,
    max_connections: Option<usize>,
}

/// The open connections with their apps, and how many each app has.
/// One app's connections and what was written to them, on this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppTraffic {
    /// Open connections.
    pub connections: u64,
    /// Frames queued.
    pub queued: u64,
    /// Bytes written.
    pub bytes: u64,
}

struct Open {
    conns: HashMap<ConnId, (AppIdx, ConnRef)>,
    per_app: Vec<usize>,
    /// Frames queued and bytes written by each app's closed connections.
    closed: Vec<(u64, u64)>,
}

impl Registry {
    /// An empty registry for `apps` apps.
    pub fn new(apps: usize, max_connections: Option<usize>) -> Self {
        Self {
            inner: Mutex::new(Open {
                conns: HashMap::new(),
                per_app: vec![0; apps],
                closed: vec![(0, 0); apps],
            }),
            total: AtomicUsize::new(0),
            max_connections,
        }
    }

    fn open(&self) -> std::sync::MutexGuard<'_, Open> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Room for `apps` app slots (apps added at runtime).
    pub fn grow(&self, apps: usize) {
        let mut open = self.open();
        if open.per_app.len() < apps {
            open.per_app.resize(apps, 0);
            open.closed.resize(apps, (0, 0));
        }
    }

    /// Admits a connection of `app` (quotas), or says why not.
    pub fn admit(&self, app: AppIdx, cfg: &AppConfig, h: &ConnRef) -> Result<(), OpenError> {
        if !cfg.enabled {
            return Err(OpenError::AppDisabled);
        }
        let mut open = self.open();
        if self.max_connections.is_some_and(|m| open.conns.len() >= m) {
            return Err(OpenError::NodeOverCapacity);
        }
        let i = app.0 as usize;
        if open.per_app.len() <= i {
            open.per_app.resize(i + 1, 0);
            open.closed.resize(i + 1, (0, 0));
        }
        if cfg.max_connections.is_some_and(|m| open.per_app[i] >= m) {
            return Err(OpenError::AppOverQuota);
        }
        open.per_app[i] += 1;
        open.conns.insert(h.conn(), (app, h.clone()));
        self.total.store(open.conns.len(), Ordering::Relaxed);
        Ok(())
    }

    /// Forgets a connection.
    pub fn remove(&self, app: AppIdx, conn: ConnId) {
        let mut open = self.open();
        if let Some((_, h)) = open.conns.remove(&conn) {
            let i = app.0 as usize;
            if let Some(n) = open.per_app.get_mut(i) {
                *n = n.saturating_sub(1);
            }
            let (queued, bytes) = h.traffic();
            if let Some(t) = open.closed.get_mut(i) {
                t.0 += queued;
                t.1 += bytes;
            }
        }
        self.total.store(open.conns.len(), Ordering::Relaxed);
    }

    /// Open connections.
    pub fn count(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Open connections, frames queued and bytes written (by open and
    /// closed connections) on this node, by app slot: one walk over the
    /// open connections, for the admin API and the status page, not the
    /// message path.
    pub fn traffic(&self) -> Vec<AppTraffic> {
        let open = self.open();
        let mut t: Vec<AppTraffic> = open
            .per_app
            .iter()
            .zip(&open.closed)
            .map(|(n, (q, b))| AppTraffic {
                connections: *n as u64,
                queued: *q,
                bytes: *b,
            })
            .collect();
        for (a, h) in open.conns.values() {
            if let Some(t) = t.get_mut(a.0 as usize) {
                let (q, b) = h.traffic();
                t.queued += q;
                t.bytes += b;
            }
        }
        t
    }

    /// Asks every connection whose app no longer serves in `apps` to close
    /// ([`Apps::unserved`]: 4001 removed, 4003 disabled), in one pass over
    /// the open connections.
    pub fn close_unserved(&self, apps: &Apps) {
        let unserved: Vec<(ConnRef, (CloseCode, &'static str))> = self
            .open()
            .conns
            .values()
            .filter_map(|(a, c)| apps.unserved(*a).map(|why| (c.clone(), why)))
            .collect();
        for (c, (code, reason)) in unserved {
            c.request_close(code, reason);
        }
    }

    /// Asks every connection to close (drain: 4200).
    pub fn close_all(&self, code: CloseCode, reason: &str) {
        let all: Vec<ConnRef> = self.open().conns.values().map(|(_, c)| c.clone()).collect();
        for c in all {
            c.request_close(code, reason);
        }
    }
}
