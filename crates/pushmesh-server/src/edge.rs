//! The accept loop of every listener (plain, TLS, metrics) and the guards
//! on connections that are not established yet.
//!
//! A connection is *pending* from `accept` until its first request is
//! answered or it is upgraded to a WebSocket. While pending it holds one of
//! `max_pending_handshakes` slots and must finish within
//! `handshake_timeout_ms` (PROXY header, TLS handshake, request headers,
//! authorizer, upgrade: all phases share the one deadline); then it is
//! closed. Later requests on a keep-alive connection get the same time for
//! their headers (hyper's `header_read_timeout`), so an idle HTTP connection
//! is closed after it too. `max_connections_per_ip` caps the open
//! connections of one client address (the real one: see [`crate::proxy`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout_at, Instant};
use tower::ServiceExt;

use crate::metrics::family;
use crate::proxy::{self, Preamble, Prefixed, TrustedProxies};
use crate::Shared;

/// Open connections per client address, for `max_connections_per_ip`.
struct IpCounts {
    max: usize,
    map: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection counted against its client address; released on drop.
pub struct IpSlot {
    counts: Arc<IpCounts>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.counts.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl IpCounts {
    /// A slot for `ip`; `Ok(None)` when there is no limit, `Err` when full.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Result<Option<IpSlot>, ()> {
        if self.max == 0 {
            return Ok(None);
        }
        let ip = ip.to_canonical();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_default();
        if *n >= self.max {
            return Err(());
        }
        *n += 1;
        Ok(Some(IpSlot {
            counts: self.clone(),
            ip,
        }))
    }
}

/// Counters of the accept loops.
#[derive(Debug, Default)]
pub struct EdgeCounters {
    /// Connections closed at once: every pending slot was taken.
    pub refused_pending: AtomicU64,
    /// Connections closed at once (or WebSocket upgrades answered 429): the
    /// client address has `max_connections_per_ip` open.
    pub refused_per_ip: AtomicU64,
    /// Connections closed because they were not established in time.
    pub handshake_timeouts: AtomicU64,
    /// Connections closed for a malformed PROXY header.
    pub proxy_errors: AtomicU64,
}

/// Settings and state of the accept loops, shared by the node.
pub struct Edge {
    handshake_timeout: Duration,
    pending: Arc<Semaphore>,
    max_pending: usize,
    per_ip: Arc<IpCounts>,
    trusted: TrustedProxies,
    proxy_protocol: bool,
    /// Counters.
    pub counters: EdgeCounters,
}

impl Edge {
    /// From the node's configuration.
    pub fn new(config: &crate::Config) -> Self {
        let max_pending = match config.max_pending_handshakes {
            0 => Semaphore::MAX_PERMITS,
            n => n,
        };
        Self {
            handshake_timeout: config.handshake_timeout,
            pending: Arc::new(Semaphore::new(max_pending)),
            max_pending,
            per_ip: Arc::new(IpCounts {
                max: config.max_connections_per_ip,
                map: Mutex::new(HashMap::new()),
            }),
            trusted: config.trusted_proxies.clone(),
            proxy_protocol: config.proxy_protocol,
            counters: EdgeCounters::default(),
        }
    }

    /// Connections accepted and not established yet.
    pub fn pending(&self) -> usize {
        self.max_pending - self.pending.available_permits()
    }

    /// Writes the accept loops' metrics (Prometheus text).
    pub fn render_metrics(&self, out: &mut String) {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        family(
            out,
            "pushmesh_pending_handshakes",
            "gauge",
            "Connections accepted and not yet established (upgraded or answered).",
        );
        let _ = writeln!(out, "pushmesh_pending_handshakes {}", self.pending());
        family(
            out,
            "pushmesh_handshake_timeouts_total",
            "counter",
            "Connections closed because they were not established within handshake_timeout_ms.",
        );
        let _ = writeln!(
            out,
            "pushmesh_handshake_timeouts_total {}",
            l(&c.handshake_timeouts)
        );
        family(
            out,
            "pushmesh_connections_refused_total",
            "counter",
            "Connections refused before any request: by reason.",
        );
        for (reason, v) in [
            ("pending_handshakes", &c.refused_pending),
            ("per_ip", &c.refused_per_ip),
            ("proxy_header", &c.proxy_errors),
        ] {
            let _ = writeln!(
                out,
                "pushmesh_connections_refused_total{{reason=\"{reason}\"}} {}",
                l(v)
            );
        }
    }
}

/// The pending state of one connection, handed to the WebSocket handlers
/// as a request extension: they call [`Ticket::established`] once the
/// upgrade is done and keep the ticket (its per-IP slot) as long as the
/// WebSocket lives.
#[derive(Clone)]
pub struct Ticket(Arc<TicketState>);

struct TicketState {
    pending: AtomicBool,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
    ip: Mutex<Option<IpSlot>>,
}

impl Ticket {
    fn new(permit: Option<OwnedSemaphorePermit>, ip: Option<IpSlot>) -> Self {
        Self(Arc::new(TicketState {
            pending: AtomicBool::new(true),
            permit: Mutex::new(permit),
            ip: Mutex::new(ip),
        }))
    }

    /// The connection is established: its pending slot is released and the
    /// handshake deadline no longer applies.
    pub fn established(&self) {
        self.0.pending.store(false, Ordering::Release);
        drop(
            self.0
                .permit
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
    }

    fn is_pending(&self) -> bool {
        self.0.pending.load(Ordering::Acquire)
    }

    fn ip_slot(&self) -> std::sync::MutexGuard<'_, Option<IpSlot>> {
        self.0.ip.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a listener serves.
#[derive(Clone)]
pub enum Listener {
    /// Clients: WebSockets and the API, plain or TLS, with every guard.
    Public(Option<Arc<crate::tls::Reloadable>>),
    /// `--metrics-listen`: plain HTTP, timeouts only.
    Internal,
}

/// Errors that concern one connection only; anything else (e.g. EMFILE)
/// makes the loop back off so the node keeps serving what it has.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Accepts connections until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    kind: Listener,
    st: Arc<Shared>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut stop => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    st.stats.edge.accept_errors.fetch_add(1, Ordering::Relaxed);
                    if !is_connection_error(&e) {
                        tracing::warn!(error = %e, "accept failed, backing off");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
        };
        let edge = &st.edge;
        // An untrusted peer is the client: its per-IP slot is taken before a
        // pending slot, so one address over its cap never holds any.
        let public = matches!(kind, Listener::Public(_));
        let slot = if public && !edge.trusted.contains(peer.ip()) {
            match edge.per_ip.take(peer.ip()) {
                Ok(s) => s,
                Err(()) => {
                    edge.counters.refused_per_ip.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(client = %peer.ip(), "too many connections from this address, closed");
                    continue;
                }
            }
        } else {
            None
        };
        let permit = match kind {
            Listener::Internal => None,
            Listener::Public(_) => match edge.pending.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    edge.counters
                        .refused_pending
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "too many pending handshakes, connection closed");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(connection(
            st.clone(),
            router.clone(),
            kind.clone(),
            tcp,
            peer,
            permit,
            slot,
        ));
    }
}

/// One connection: PROXY header, per-IP slot, TLS, then HTTP, all before
/// the handshake deadline.
async fn connection(
    st: Arc<Shared>,
    router: Router,
    kind: Listener,
    mut tcp: TcpStream,
    peer: SocketAddr,
    permit: Option<OwnedSemaphorePermit>,
    slot: Option<IpSlot>,
) {
    let edge = &st.edge;
    let deadline = Instant::now() + edge.handshake_timeout;
    let tls = match kind {
        Listener::Internal => {
            let ticket = Ticket::new(None, None);
            let io = Prefixed::new(Vec::new(), tcp);
            return http(st, router, io, peer, false, false, ticket, deadline).await;
        }
        Listener::Public(tls) => tls,
    };
    let peer_trusted = edge.trusted.contains(peer.ip());
    let (client, rest) = if peer_trusted && edge.proxy_protocol {
        match timeout_at(deadline, proxy::read_preamble(&mut tcp)).await {
            Ok(Ok((Preamble::Proxied(client), rest))) => (client, rest),
            Ok(Ok((Preamble::None | Preamble::Local, rest))) => (peer, rest),
            Ok(Err(e)) => {
                edge.counters.proxy_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, error = %e, "connection closed");
                return;
            }
            Err(_) => {
                edge.counters
                    .handshake_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    } else {
        (peer, Vec::new())
    };
    // A trusted proxy's own address is not limited: its clients are, once
    // a PROXY header (here) or X-Forwarded-For (see `http`) names them.
    let client_trusted = edge.trusted.contains(client.ip());
    let slot = if client_trusted || !peer_trusted {
        slot
    } else {
        match edge.per_ip.take(client.ip()) {
            Ok(s) => s,
            Err(()) => {
                edge.counters.refused_per_ip.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(client = %client.ip(), "too many connections from this address, closed");
                return;
            }
        }
    };
    let ticket = Ticket::new(permit, slot);
    let io = Prefixed::new(rest, tcp);
    match tls {
        None => {
            http(
                st,
                router,
                io,
                client,
                client_trusted,
                peer_trusted,
                ticket,
                deadline,
            )
            .await
        }
        Some(tls) => match timeout_at(deadline, tls.acceptor().accept(io)).await {
            Ok(Ok(s)) => {
                http(
                    st,
                    router,
                    s,
                    client,
                    client_trusted,
                    peer_trusted,
                    ticket,
                    deadline,
                )
                .await
            }
            Ok(Err(e)) => tracing::debug!(%client, error = %e, "tls handshake failed"),
            Err(_) => {
                st.edge
                    .counters
                    .handshake_timeouts
                    .fetch_add(1, Ordering::Relaxed);
            }
        },
    }
}

/// Whether a request asks for a WebSocket upgrade.
fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Serves HTTP on an established transport; requests see the client's
/// address as `ConnectInfo` and the connection's [`Ticket`].
#[allow(clippy::too_many_arguments)]
async fn http<I>(
    st: Arc<Shared>,
    router: Router,
    io: I,
    client: SocketAddr,
    forwarded: bool,
    peer_trusted: bool,
    ticket: Ticket,
    deadline: Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let st2 = st.clone();
    let t2 = ticket.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (st, router, ticket) = (st2.clone(), router.clone(), t2.clone());
        async move {
            let ip = if forwarded {
                st.edge.trusted.client_ip(client.ip(), req.headers())
            } else {
                client.ip()
            };
            // Behind a proxy without PROXY header, a WebSocket counts
            // against the address X-Forwarded-For names.
            let mut took_slot = false;
            if forwarded && ip != client.ip() && is_upgrade(&req) && ticket.ip_slot().is_none() {
                match st.edge.per_ip.take(ip) {
                    Ok(slot) => {
                        took_slot = slot.is_some();
                        *ticket.ip_slot() = slot;
                    }
                    Err(()) => {
                        st.edge
                            .counters
                            .refused_per_ip
                            .fetch_add(1, Ordering::Relaxed);
                        ticket.established();
                        let e = json!({ "error": "too many connections from this address" });
                        return Ok::<_, Infallible>(
                            (StatusCode::TOO_MANY_REQUESTS, Json(e)).into_response(),
                        );
                    }
                }
            }
            let mut req = req.map(Body::new);
            req.extensions_mut()
                .insert(ConnectInfo(SocketAddr::new(ip, client.port())));
            req.extensions_mut().insert(ticket.clone());
            req.extensions_mut()
                .insert(crate::identity_headers::PeerTrusted(peer_trusted));
            let resp: Response = match router.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                ticket.established();
                if took_slot {
                    ticket.ip_slot().take();
                }
            }
            Ok(resp)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(st.edge.handshake_timeout);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = tokio::time::sleep_until(deadline) => {
            if ticket.is_pending() {
                st.edge.counters.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%client, "handshake not finished in time, connection closed");
                return;
            }
            conn.await
        }
    };
    if let Err(e) = result {
        // hyper's header_read_timeout runs alongside the deadline and may
        // fire first: the same timeout.
        let timed_out = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout);
        if timed_out && ticket.is_pending() {
            st.edge
                .counters
                .handshake_timeouts
                .fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(%client, error = %e, "connection ended with an error");
    }
}
