//! One SSE stream's task: what the node queued for the connection, as SSE
//! events, into the response body; a heartbeat comment; the close the
//! node asks for (4100 slow consumer, 4200 drain, 4009 terminate) ends the
//! stream after its `pusher:error`.
//!
//! The body is a bounded channel of chunks: the task takes up to 256
//! queued frames, writes them into one chunk (writes coalesced), and waits
//! for the body to take it, bounded by the write timeout and interrupted
//! by a close request, as a WebSocket write is.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use pushmesh_core::{AppIdx, Session};
use pushmesh_protocol::sse::{StreamWriter, HEARTBEAT};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;

use crate::conn::{ConnRef, Next, Outbox};
use crate::websocket::driver::{pump, CLOSE_TIMEOUT, WRITE_TIMEOUT};
use crate::Shared;

/// Most frames written into one chunk.
const WRITE_BATCH: usize = 256;

/// An admitted, subscribed stream, not started.
pub(super) struct Stream {
    pub(super) app: AppIdx,
    pub(super) h: ConnRef,
    pub(super) rx: Outbox,
    pub(super) session: Session,
    pub(super) writer: StreamWriter,
}

/// Why a stream ended (the `pushmesh_connections_closed_total` label).
enum End {
    /// The client went away (or did not take a chunk in time).
    Gone,
    /// The node closed it with this Pusher code.
    Closed(u16),
}

/// Starts the stream's task; returns the response body.
pub(super) fn spawn(st: Arc<Shared>, s: Stream) -> Body {
    let (tx, body) = mpsc::channel::<Result<Bytes, Infallible>>(2);
    let (done_tx, done) = oneshot::channel();
    tokio::spawn(run(st, s, tx, done));
    let mut body = BodyEnd {
        rx: body,
        _done: done_tx,
    };
    Body::from_stream(futures_util::stream::poll_fn(move |cx| {
        body.rx.poll_recv(cx)
    }))
}

/// The body's end of the stream. Dropped by hyper once the response is
/// written (or the client went): its `_done` tells the task, which leaves
/// the registry only then (a draining node exits once the registry is
/// empty, and the stream's last words must be written before).
struct BodyEnd {
    rx: mpsc::Receiver<Result<Bytes, Infallible>>,
    _done: oneshot::Sender<()>,
}

async fn run(
    st: Arc<Shared>,
    mut s: Stream,
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    done: oneshot::Receiver<()>,
) {
    let edge = &st.stats.edge;
    edge.sse_connections.fetch_add(1, Ordering::Relaxed);
    edge.connections_opened.fetch_add(1, Ordering::Relaxed);
    let opened = Instant::now();
    let conn = s.h.id().0;
    tracing::debug!(conn, "sse stream opened");
    let mut first = BytesMut::new();
    StreamWriter::start(&mut first);
    let mut close = pump(&st.node, &s.h, &mut s.session).await;
    let end = if send(&tx, &s.h, first.freeze(), &st).await {
        run_loop(&st, &mut s, &tx, &mut close).await
    } else {
        End::Gone
    };
    // The end of the body, then the wait until it was taken (bounded).
    drop(tx);
    let _ = timeout(CLOSE_TIMEOUT, done).await;
    s.session.disconnect();
    let _ = pump(&st.node, &s.h, &mut s.session).await;
    st.node.registry.remove(s.app, s.h.id());
    let label = match end {
        End::Gone => "client".to_string(),
        End::Closed(code) => code.to_string(),
    };
    edge.closed(&label);
    edge.sse_connections.fetch_sub(1, Ordering::Relaxed);
    tracing::debug!(
        conn,
        reason = %label,
        duration_ms = opened.elapsed().as_millis() as u64,
        "sse stream closed"
    );
}

async fn run_loop(
    st: &Shared,
    s: &mut Stream,
    tx: &mpsc::Sender<Result<Bytes, Infallible>>,
    close: &mut Option<crate::conn::CloseRequest>,
) -> End {
    let period = st.config.sse_heartbeat;
    let mut heartbeat = tokio::time::interval_at((Instant::now() + period).into(), period);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if let Some(req) = close.take() {
            return finish(st, s, tx, req.code.code()).await;
        }
        tokio::select! {
            biased;
            () = tx.closed() => return End::Gone,
            next = s.rx.recv() => match next {
                Next::Close => {
                    if let Some(req) = s.h.take_close() {
                        s.session.close(req.code, &req.reason);
                        *close = pump(&st.node, &s.h, &mut s.session).await.or(Some(req));
                    }
                }
                Next::Frame(f) => {
                    let mut chunk = BytesMut::new();
                    s.writer.write_frame(f.payload(), &mut chunk);
                    for _ in 1..WRITE_BATCH {
                        match s.rx.try_recv() {
                            Some(f) => s.writer.write_frame(f.payload(), &mut chunk),
                            None => break,
                        }
                    }
                    if !chunk.is_empty() && !send(tx, &s.h, chunk.freeze(), st).await {
                        if s.h.close_pending() {
                            continue;
                        }
                        return End::Gone;
                    }
                }
            },
            _ = heartbeat.tick() => {
                if !send(tx, &s.h, Bytes::from_static(HEARTBEAT), st).await && !s.h.close_pending() {
                    return End::Gone;
                }
            }
        }
    }
}

/// Writes what was queued before the close (its `pusher:error`), bounded
/// tighter: the client may be the slow one.
async fn finish(
    st: &Shared,
    s: &mut Stream,
    tx: &mpsc::Sender<Result<Bytes, Infallible>>,
    code: u16,
) -> End {
    let mut chunk = BytesMut::new();
    while let Some(f) = s.rx.try_recv() {
        s.writer.write_frame(f.payload(), &mut chunk);
    }
    if !chunk.is_empty() {
        let len = chunk.len() as u64;
        if let Ok(Ok(())) = timeout(CLOSE_TIMEOUT, tx.send(Ok(chunk.freeze()))).await {
            st.stats.edge.bytes_out.fetch_add(len, Ordering::Relaxed);
        }
    }
    End::Closed(code)
}

/// Hands a chunk to the body; false if the client did not take it within
/// the write timeout, went away, or a close was requested meanwhile (a
/// close for this very stream wins over a stuck write).
async fn send(
    tx: &mpsc::Sender<Result<Bytes, Infallible>>,
    h: &ConnRef,
    chunk: Bytes,
    st: &Shared,
) -> bool {
    let len = chunk.len() as u64;
    let ok = tokio::select! {
        biased;
        r = timeout(WRITE_TIMEOUT, tx.send(Ok(chunk))) => matches!(r, Ok(Ok(()))),
        () = h.close_requested() => false,
    };
    if ok {
        st.stats.edge.bytes_out.fetch_add(len, Ordering::Relaxed);
        h.wrote(len);
    }
    ok
}
