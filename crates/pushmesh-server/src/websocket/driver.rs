//! The connection loop shared by `/app/{key}` (Pusher, `ws.rs`) and `/ws`
//! (wsify, `wsify.rs`): one task per connection that writes what the node
//! queued for it, reads the client's frames, keeps it alive and closes it.
//! What a text or binary message means, how the keepalive ping looks and
//! which close codes apply is the [`Protocol`]'s.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pushmesh_core::SessionOutput;
use pushmesh_core::{AppConfig, AppIdx, ConnId, Keepalive, KeepaliveAction, OpenError, Session};
use pushmesh_protocol::wire::{Event, Outbound, ReadError};
use pushmesh_protocol::CloseCode;
use tokio::time::{sleep_until, timeout};

use super::socket::{ReadEnd, Written};
use super::WsSocket;
use crate::conn::{CloseRequest, ConnRef, Next, Outbox};
use crate::metrics::EdgeMetrics;
use crate::node::Node;
use crate::Shared;

/// How long one batch of writes may take before the client counts as dead.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the client's close frame after sending ours.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Most frames taken from the queue for one flush.
const WRITE_BATCH: usize = 256;

/// Why the connection loop ended.
pub(crate) enum End {
    /// The client went away or the socket failed.
    Gone,
    /// The client sent a close frame (its code, if any): it is echoed
    /// (RFC 6455 §5.5.1) before the socket goes.
    ClientClosed(Option<u16>),
    /// The server closes.
    Close(Close),
}

/// A close the server sends.
pub(crate) struct Close {
    /// The WebSocket close code.
    pub code: u16,
    /// Its reason.
    pub reason: String,
    /// Whether the frames queued before it go first (a close the session
    /// or the node asked for, e.g. after its `pusher:error`); a close for a
    /// broken WebSocket protocol goes at once.
    pub after_queued: bool,
}

impl End {
    /// A close after the frames queued before it.
    pub(crate) fn close(code: u16, reason: impl Into<String>) -> Self {
        Self::Close(Close {
            code,
            reason: reason.into(),
            after_queued: true,
        })
    }
}

/// What the loop does next after a protocol handled an event.
pub(crate) enum Flow {
    /// Go on reading and writing.
    Continue,
    /// Stop, for this reason.
    End(End),
}

/// The protocol-specific half of a connection. Futures are `Send`: the
/// connection runs on a spawned task.
pub(crate) trait Protocol: Send {
    /// The connection's session (sign-in, channels, closing).
    fn session(&mut self) -> &mut Session;

    /// The node asked to close this connection (a full queue, a terminate,
    /// a drain).
    fn close_requested(&mut self, req: CloseRequest) -> impl Future<Output = Flow> + Send;

    /// A text message (already checked to be UTF-8).
    fn text(
        &mut self,
        socket: &mut WsSocket,
        text: &str,
        now: Instant,
    ) -> impl Future<Output = Flow> + Send;

    /// A binary message.
    fn binary(&mut self, socket: &mut WsSocket) -> impl Future<Output = Flow> + Send;

    /// A message that breaks the WebSocket protocol or the size limit.
    fn invalid(&mut self, socket: &mut WsSocket, e: ReadError) -> impl Future<Output = End> + Send;

    /// Sends the keepalive ping; false if the socket failed.
    fn ping(&mut self, socket: &mut WsSocket) -> impl Future<Output = bool> + Send;

    /// The close for a client that did not answer the ping.
    fn pong_timeout(&self) -> End;

    /// A deadline of the protocol's own (Pusher: sign-in), checked once.
    fn deadline(&self) -> Option<Instant> {
        None
    }

    /// The deadline passed.
    fn deadline_passed(&mut self) -> impl Future<Output = Flow> + Send {
        async { Flow::Continue }
    }
}

/// One open connection: its socket, its queue and where it is registered.
pub(crate) struct Connection<'a> {
    pub(crate) st: &'a Shared,
    pub(crate) socket: WsSocket,
    rx: Outbox,
    pub(crate) h: ConnRef,
    pub(crate) conn: ConnId,
    app: AppIdx,
    pub(crate) opened: Instant,
}

impl<'a> Connection<'a> {
    /// A new connection of `app` with its own id and queue, not admitted yet.
    pub(crate) fn new(st: &'a Shared, socket: WsSocket, app: AppIdx) -> Self {
        let conn = ConnId(st.next_conn.fetch_add(1, Ordering::Relaxed));
        let (h, rx) = ConnRef::new(conn, st.config.outbound_queue);
        Self {
            st,
            socket,
            rx,
            h,
            conn,
            app,
            opened: Instant::now(),
        }
    }

    /// Registers it (quotas); returns the app's config to start a session.
    pub(crate) fn admit(&self) -> Result<Arc<AppConfig>, OpenError> {
        let cfg = self.st.node.apps().get(self.app).clone();
        self.st.node.registry.admit(self.app, &cfg, &self.h)?;
        Ok(cfg)
    }

    /// Counts it as opened.
    pub(crate) fn opened(&self) {
        self.st
            .stats
            .edge
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Does what the session asks (see [`pump`]). `&mut`: a shared
    /// reference to the socket is not `Send`.
    pub(crate) async fn pump(&mut self, session: &mut Session) -> Option<CloseRequest> {
        pump(&self.st.node, &self.h, session).await
    }

    /// Runs until the connection ends: writes what is queued, reads
    /// messages, keeps the client alive.
    pub(crate) async fn run<P: Protocol>(&mut self, p: &mut P) -> End {
        let st = self.st;
        let mut keepalive = Keepalive::new(
            self.opened,
            st.config.activity_timeout,
            st.config.pong_timeout,
        );
        // One timer each for keepalive and the protocol's deadline, reset
        // only when their deadline moves (not re-armed for every message).
        let mut ka_deadline = keepalive.deadline();
        let ka_sleep = sleep_until(ka_deadline.into());
        tokio::pin!(ka_sleep);
        // Only protocols (apps) with a deadline pay for this timer.
        let mut extra = p.deadline().map(|d| Box::pin(sleep_until(d.into())));
        let mut extra_passed = false;
        // Taken at the first frame: the apps may have changed since admission.
        let mut apps_seen = u64::MAX;
        loop {
            if keepalive.deadline() != ka_deadline {
                ka_deadline = keepalive.deadline();
                ka_sleep.as_mut().reset(ka_deadline.into());
            }
            // Backpressure on the client's own requests (see `conn`).
            let paused = self.rx.read_paused();
            let taken = self.rx.taken();
            let flow = tokio::select! {
                biased;
                next = self.rx.recv() => match next {
                    Next::Close => self.close_requested(p).await,
                    Next::Frame(first) => {
                        // A close request (e.g. 4100 for this very connection)
                        // wins over a write stuck on a client that does not read.
                        let (ok, closing) = write_or_close(&mut self.socket, &mut self.rx, &self.h, first, &st.stats.edge).await;
                        if closing {
                            self.close_requested(p).await
                        } else if !ok {
                            Flow::End(End::Gone)
                        } else {
                            Flow::Continue
                        }
                    }
                },
                () = self.h.read_resumed(taken), if paused => Flow::Continue,
                msg = self.socket.recv(), if !paused => {
                    let now = Instant::now();
                    keepalive.on_activity(now);
                    match msg {
                        Ok(Event::Text(t)) => {
                            st.stats.edge.bytes_in.fetch_add(t.len() as u64, Ordering::Relaxed);
                            // The apps changed (a rotated secret, new limits): the
                            // session takes its app's new settings before this frame.
                            let generation = st.node.apps_generation();
                            if generation != apps_seen {
                                apps_seen = generation;
                                let _ = p.session().app_changed(&st.node.apps());
                            }
                            // The reader checked it is UTF-8.
                            let text = std::str::from_utf8(&t).unwrap_or_default();
                            p.text(&mut self.socket, text, now).await
                        }
                        Ok(Event::Binary(_)) => p.binary(&mut self.socket).await,
                        Ok(Event::Ping(data)) => {
                            if Box::pin(timeout(WRITE_TIMEOUT, self.socket.pong(&data))).await.map_or(true, |r| r.is_err()) {
                                Flow::End(End::Gone)
                            } else {
                                Flow::Continue
                            }
                        }
                        Ok(Event::Pong(_)) => Flow::Continue,
                        Ok(Event::Close(c)) => Flow::End(End::ClientClosed(echo_code(c))),
                        Err(ReadEnd::Gone) => Flow::End(End::Gone),
                        Err(ReadEnd::Invalid(e)) => Flow::End(p.invalid(&mut self.socket, e).await),
                    }
                }
                () = &mut ka_sleep => match keepalive.poll(Instant::now()) {
                    KeepaliveAction::Wait => {
                        ka_sleep.as_mut().reset(keepalive.deadline().into());
                        Flow::Continue
                    }
                    KeepaliveAction::SendPing => {
                        if p.ping(&mut self.socket).await {
                            Flow::Continue
                        } else {
                            Flow::End(End::Gone)
                        }
                    }
                    KeepaliveAction::Close => Flow::End(p.pong_timeout()),
                },
                () = async { if let Some(s) = extra.as_mut() { s.await } }, if extra.is_some() && !extra_passed => {
                    extra_passed = true;
                    p.deadline_passed().await
                }
            };
            if let Flow::End(end) = flow {
                return end;
            }
        }
    }

    async fn close_requested<P: Protocol>(&mut self, p: &mut P) -> Flow {
        match self.h.take_close() {
            Some(req) => p.close_requested(req).await,
            None => Flow::Continue,
        }
    }

    /// Leaves the router first, so nothing more is queued for it, then the
    /// registry.
    pub(crate) async fn leave(&mut self, session: &mut Session) {
        session.disconnect();
        let _ = self.pump(session).await;
        self.st.node.registry.remove(self.app, self.conn);
    }

    /// Ends it: counts the close, writes what is queued and the close
    /// frame, and waits (bounded) for the client's. Returns the reason as
    /// logged. Boxed by the caller: only closing pays for it.
    pub(crate) async fn finish(&mut self, end: End) -> String {
        let label = match &end {
            End::Gone | End::ClientClosed(_) => "client".to_string(),
            End::Close(c) => c.code.to_string(),
        };
        self.st.stats.edge.closed(&label);
        let socket = &mut self.socket;
        match end {
            End::Gone => "client went away".to_string(),
            End::ClientClosed(code) => {
                echo_close(socket, code).await;
                "client closed".to_string()
            }
            End::Close(c) => {
                let limit = if c.after_queued {
                    // Frames queued before the close (e.g. the pusher:error) go first.
                    let _ = flush_queued(socket, &mut self.rx, &self.st.stats.edge, &self.h).await;
                    CLOSE_TIMEOUT
                } else {
                    WRITE_TIMEOUT
                };
                let _ = timeout(limit, socket.send_close(c.code, &c.reason)).await;
                await_close(socket).await;
                format!("{} {}", c.code, c.reason)
            }
        }
    }
}

/// The close for a client that did not answer the ping, in Pusher codes.
pub(crate) fn pong_not_received(code: impl FnOnce(CloseCode) -> u16) -> End {
    End::close(
        code(CloseCode::PongNotReceived),
        "pong not received in time",
    )
}

/// Completes the closing handshake: reads (and drops) what the client still
/// sends until its close frame, bounded in time. Closing the TCP socket with
/// unread input would reset it and the client could lose the close frame.
pub(crate) async fn await_close(socket: &mut WsSocket) {
    let _ = timeout(CLOSE_TIMEOUT, socket.await_close()).await;
}

/// The close code a client's close frame is echoed with.
fn echo_code(close: Option<(u16, String)>) -> Option<u16> {
    close.map(|(code, _)| code)
}

/// Echoes a client's close frame (an empty one if it had no code).
async fn echo_close(socket: &mut WsSocket, code: Option<u16>) {
    let frame = match code {
        Some(c) => pushmesh_protocol::wire::frame::close(c, ""),
        None => pushmesh_protocol::wire::frame::close_empty(),
    };
    let _ = timeout(CLOSE_TIMEOUT, socket.send_frame(frame)).await;
}

/// Counts a connection that negotiated compression while it is open.
pub(crate) struct CompressionGauge<'a>(Option<&'a Shared>);

impl<'a> CompressionGauge<'a> {
    pub(crate) fn new(st: &'a Shared, compressing: bool) -> Self {
        if compressing {
            st.stats
                .edge
                .compression_connections
                .fetch_add(1, Ordering::Relaxed);
        }
        Self(compressing.then_some(st))
    }
}

impl Drop for CompressionGauge<'_> {
    fn drop(&mut self) {
        if let Some(st) = self.0 {
            st.stats
                .edge
                .compression_connections
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Does what a session asks: frames into the connection's own queue,
/// requests to the router; returns the close it asked for, if any.
/// Routing (rare: subscribe, client events) runs in a boxed future, so the
/// connection task's own future stays small (memory per connection).
pub(crate) async fn pump(node: &Node, h: &ConnRef, session: &mut Session) -> Option<CloseRequest> {
    let mut close = None;
    let mut routes = Vec::new();
    while let Some(out) = session.poll() {
        match out {
            SessionOutput::Send(frame) => node.send_to(h, frame),
            SessionOutput::Close { code, reason } => close = Some(CloseRequest { code, reason }),
            SessionOutput::Route(req) => routes.push(req),
        }
    }
    if !routes.is_empty() {
        Box::pin(async move {
            for req in routes {
                node.route(h, req).await;
            }
        })
        .await;
    }
    close
}

/// Writes a batch unless a close is requested meanwhile (e.g. 4100 for this
/// very connection, which must win over a write stuck on a client that does
/// not read). Returns (write succeeded, close requested).
async fn write_or_close(
    socket: &mut WsSocket,
    rx: &mut Outbox,
    h: &ConnRef,
    first: Outbound,
    stats: &EdgeMetrics,
) -> (bool, bool) {
    let write = write_batch(socket, rx, first, WRITE_TIMEOUT, stats, h);
    tokio::pin!(write);
    let close = h.close_requested();
    tokio::pin!(close);
    // The write first: when it completes at once (the usual case) the close
    // waiter is never even registered.
    tokio::select! {
        biased;
        ok = &mut write => (ok, false),
        () = &mut close => (true, true),
    }
}

/// Writes `first` and whatever else is queued: the shared frames as they
/// are (compressed ones for a compressing connection), several per
/// `writev(2)`, then flushes once.
async fn write_batch(
    socket: &mut WsSocket,
    rx: &mut Outbox,
    first: Outbound,
    limit: Duration,
    stats: &EdgeMetrics,
    h: &ConnRef,
) -> bool {
    let mut w = Written::default();
    socket.queue(&first, &mut w);
    let mut n = 1;
    while n < WRITE_BATCH {
        match rx.try_recv() {
            Some(m) => socket.queue(&m, &mut w),
            None => break,
        }
        n += 1;
    }
    stats.bytes_out.fetch_add(w.payload, Ordering::Relaxed);
    h.wrote(w.payload);
    if w.deflate_plain > 0 {
        stats
            .compression_plain
            .fetch_add(w.deflate_plain, Ordering::Relaxed);
        stats
            .compression_compressed
            .fetch_add(w.deflate_compressed, Ordering::Relaxed);
    }
    flush_within(socket, limit).await
}

/// Flushes, bounded by `limit`; the timer is only armed when the socket
/// cannot take everything at once (the flush is cancel-safe: what it did
/// not write stays queued for the second try).
async fn flush_within(socket: &mut WsSocket, limit: Duration) -> bool {
    use futures_util::FutureExt;
    match socket.flush().now_or_never() {
        Some(r) => r.is_ok(),
        None => matches!(timeout(limit, socket.flush()).await, Ok(Ok(()))),
    }
}

async fn flush_queued(
    socket: &mut WsSocket,
    rx: &mut Outbox,
    stats: &EdgeMetrics,
    h: &ConnRef,
) -> bool {
    match rx.try_recv() {
        // On the way out: bounded tighter, the client may be the slow one.
        Some(first) => write_batch(socket, rx, first, CLOSE_TIMEOUT, stats, h).await,
        // What an interrupted write left.
        None => matches!(timeout(CLOSE_TIMEOUT, socket.flush()).await, Ok(Ok(()))),
    }
}
