//! The accept loop of every listener (plain, TLS, metrics) and the guards
//! on connections that are not established yet.
//!
//! A connection is *pending* from `accept` until its first request is
//! answered or it is upgraded to a WebSocket. While pending it holds one of
//! the node's `max_pending_handshakes` slots and one of its address's
//! `max_pending_handshakes_per_ip`. When every node slot is taken the loop
//! stops accepting: new connections wait in the kernel's listen backlog
//! ([`LISTEN_BACKLOG`]) until a slot frees, and none is accepted only to be
//! reset. An address over its own cap (pending, or `max_connections_per_ip`
//! open) is answered HTTP 429 with `Retry-After` and a JSON body at once
//! (see [`crate::refusal`]), so one address cannot take the node's slots
//! and everyone else, `/healthz` and the API included, is still served.
//! A pending connection must finish within
//! `handshake_timeout_ms` (PROXY header, TLS handshake, request headers,
//! authorizer, upgrade: all phases share the one deadline); then it is
//! closed. Later requests on a keep-alive connection get the same time for
//! their headers (hyper's `header_read_timeout`), so an idle HTTP connection
//! is closed after it too, and `request_body_timeout_ms` for their bodies
//! (see [`crate::request_guard`], which also refuses upgrades while
//! draining). `max_connections_per_ip` caps the open
//! connections of one client address (the real one: see [`crate::proxy`]).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout_at, Instant};
use tower::ServiceExt;

pub use crate::admission::Ticket;
use crate::admission::{IpCounts, IpSlot, PendingSlots};
use crate::metrics::family;
use crate::proxy::{self, Preamble, Prefixed, TrustedProxies};
use crate::refusal::{self, Refusal};
use crate::request_guard::{self, is_upgrade, GuardCounters};
use crate::Shared;

/// The listen backlog asked for (the kernel caps it at
/// `net.core.somaxconn`, 4096 by default since Linux 5.4): room for the
/// connections that wait while every pending slot is taken.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a TCP listener with [`LISTEN_BACKLOG`].
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The answer to an address over `max_pending_handshakes_per_ip`.
const PENDING_PER_IP: Refusal = Refusal {
    status: StatusCode::TOO_MANY_REQUESTS,
    retry_after: 1,
    reason: "pending_per_ip",
    message: "too many connections from this address are being established, retry later",
};

/// The answer to an address over `max_connections_per_ip`.
const OPEN_PER_IP: Refusal = Refusal {
    status: StatusCode::TOO_MANY_REQUESTS,
    retry_after: 5,
    reason: "per_ip",
    message: "too many connections from this address",
};

/// Counters of the accept loops.
#[derive(Debug, Default)]
pub struct EdgeCounters {
    /// Times the public accept loop waited: every pending slot was taken.
    pub accept_paused: AtomicU64,
    /// Connections (or WebSocket upgrades) answered 429: the client address
    /// has `max_connections_per_ip` open.
    pub refused_per_ip: AtomicU64,
    /// Connections answered 429: the client address has
    /// `max_pending_handshakes_per_ip` pending.
    pub refused_pending_per_ip: AtomicU64,
    /// Refused connections closed without an answer: no refusal slot
    /// freed before their handshake deadline.
    pub refused_unanswered: AtomicU64,
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
    pending_per_ip: Arc<IpCounts>,
    /// Refusals being answered (each holds a socket for up to
    /// [`refusal::LINGER`]), at most four times as many as pending slots;
    /// more wait for one until their handshake deadline.
    refusing: Arc<Semaphore>,
    per_ip: Arc<IpCounts>,
    pub(crate) trusted: TrustedProxies,
    proxy_protocol: bool,
    forwarded_header: crate::forwarded::ForwardedHeader,
    /// Counters.
    pub counters: EdgeCounters,
    /// Counters of the request checks (drain, body deadline).
    pub guard: GuardCounters,
}

impl Edge {
    /// Handshakes pending from `ip` now (counted when
    /// `max_pending_handshakes_per_ip` is set).
    pub fn pending_handshakes_from(&self, ip: std::net::IpAddr) -> usize {
        self.pending_per_ip.count(ip)
    }

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
            pending_per_ip: IpCounts::new(config.max_pending_handshakes_per_ip),
            refusing: Arc::new(Semaphore::new(max_pending.saturating_mul(4).min(65_536))),
            per_ip: IpCounts::new(config.max_connections_per_ip),
            trusted: config.trusted_proxies.clone(),
            proxy_protocol: config.proxy_protocol,
            forwarded_header: config.forwarded_header,
            counters: EdgeCounters::default(),
            guard: GuardCounters::default(),
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
            "pushmesh_accept_paused_total",
            "counter",
            "Times the client listener stopped accepting because every max_pending_handshakes slot was taken.",
        );
        let _ = writeln!(out, "pushmesh_accept_paused_total {}", l(&c.accept_paused));
        family(
            out,
            "pushmesh_connections_refused_total",
            "counter",
            "Connections refused before any request, by reason (per_ip, pending_per_ip: HTTP 429; proxy_header, unanswered: closed).",
        );
        for (reason, v) in [
            ("per_ip", &c.refused_per_ip),
            ("pending_per_ip", &c.refused_pending_per_ip),
            ("proxy_header", &c.proxy_errors),
            ("unanswered", &c.refused_unanswered),
        ] {
            let _ = writeln!(
                out,
                "pushmesh_connections_refused_total{{reason=\"{reason}\"}} {}",
                l(v)
            );
        }
        family(
            out,
            "pushmesh_upgrades_refused_total",
            "counter",
            "WebSocket upgrades answered HTTP 503 with Retry-After before any handler, by reason.",
        );
        for (reason, v) in [
            ("draining", &self.guard.upgrades_refused_draining),
            ("joining", &self.guard.upgrades_refused_joining),
        ] {
            let _ = writeln!(
                out,
                "pushmesh_upgrades_refused_total{{reason=\"{reason}\"}} {}",
                l(v)
            );
        }
        family(
            out,
            "pushmesh_request_body_timeouts_total",
            "counter",
            "Requests answered 408: the body was not complete within request_body_timeout_ms.",
        );
        let _ = writeln!(
            out,
            "pushmesh_request_body_timeouts_total {}",
            l(&self.guard.body_timeouts)
        );
    }

    /// Answers a refused connection once a refusal slot is free, or closes
    /// it unanswered if none frees before `deadline`.
    async fn refuse<S>(&self, io: S, refusal: Refusal, counter: &AtomicU64, deadline: Instant)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        counter.fetch_add(1, Ordering::Relaxed);
        match timeout_at(deadline, self.refusing.clone().acquire_owned()).await {
            Ok(Ok(permit)) => {
                let linger = refusal::LINGER.min(self.handshake_timeout);
                refusal::answer(io, refusal, linger).await;
                drop(permit);
            }
            _ => {
                self.counters
                    .refused_unanswered
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
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

/// Accepts connections until `stop` resolves. The public listener takes a
/// pending slot before each accept: while there is none, it waits.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    kind: Listener,
    st: Arc<Shared>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let permit = match kind {
            Listener::Internal => None,
            Listener::Public(_) => match st.edge.pending.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    st.edge
                        .counters
                        .accept_paused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("every pending slot taken: not accepting until one frees");
                    tokio::select! {
                        () = &mut stop => return,
                        p = st.edge.pending.clone().acquire_owned() => p.ok(),
                    }
                }
            },
        };
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
        let _ = tcp.set_nodelay(true);
        tokio::spawn(connection(
            st.clone(),
            router.clone(),
            kind.clone(),
            tcp,
            peer,
            permit,
        ));
    }
}

/// What a refused connection is answered, and the counter it goes to.
type Refused<'a> = (Refusal, &'a AtomicU64);

/// The slots a connection from `client` takes, or its refusal.
fn admit(
    edge: &Edge,
    client: SocketAddr,
    node: Option<OwnedSemaphorePermit>,
) -> Result<(PendingSlots, Option<IpSlot>), Refused<'_>> {
    let open = edge
        .per_ip
        .take(client.ip())
        .map_err(|_| (OPEN_PER_IP, &edge.counters.refused_per_ip))?;
    let pending = edge
        .pending_per_ip
        .take(client.ip())
        .map_err(|_| (PENDING_PER_IP, &edge.counters.refused_pending_per_ip))?;
    Ok((PendingSlots { node, ip: pending }, open))
}

/// One connection: PROXY header, per-IP slots, TLS, then HTTP, all before
/// the handshake deadline.
async fn connection(
    st: Arc<Shared>,
    router: Router,
    kind: Listener,
    mut tcp: TcpStream,
    peer: SocketAddr,
    permit: Option<OwnedSemaphorePermit>,
) {
    let edge = &st.edge;
    let deadline = Instant::now() + edge.handshake_timeout;
    let tls = match kind {
        Listener::Internal => {
            let ticket = Ticket::new(PendingSlots::default(), None);
            let io = Prefixed::new(Vec::new(), tcp);
            let conn = Accepted {
                client: peer,
                forwarded: false,
                peer_trusted: false,
                ticket,
                deadline,
            };
            return http(st, router, io, conn).await;
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
    // a PROXY header (here) or the forwarding header (see `http`) names them.
    let client_trusted = edge.trusted.contains(client.ip());
    let io = Prefixed::new(rest, tcp);
    let admitted = if client_trusted {
        Ok((
            PendingSlots {
                node: permit,
                ip: None,
            },
            None,
        ))
    } else {
        admit(edge, client, permit)
    };
    let (slots, open) = match admitted {
        Ok(x) => x,
        Err((refusal, counter)) => {
            tracing::debug!(client = %client.ip(), reason = refusal.reason, "connection refused with 429");
            match tls {
                None => edge.refuse(io, refusal, counter, deadline).await,
                // The answer needs the TLS session; its handshake has the
                // usual deadline.
                Some(tls) => match timeout_at(deadline, tls.acceptor().accept(io)).await {
                    Ok(Ok(s)) => edge.refuse(s, refusal, counter, deadline).await,
                    _ => {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                },
            }
            return;
        }
    };
    let conn = Accepted {
        client,
        forwarded: client_trusted,
        peer_trusted,
        ticket: Ticket::new(slots, open),
        deadline,
    };
    match tls {
        None => http(st, router, io, conn).await,
        Some(tls) => match timeout_at(deadline, tls.acceptor().accept(io)).await {
            Ok(Ok(s)) => http(st, router, s, conn).await,
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

/// What the accept loop learned about a connection before HTTP starts on it.
struct Accepted {
    /// The client: the TCP peer, or the one its PROXY header names.
    client: SocketAddr,
    /// Whether the client is a trusted proxy (its forwarding header names
    /// the real client).
    forwarded: bool,
    /// Whether the TCP peer is a trusted proxy (identity headers believed).
    peer_trusted: bool,
    /// The connection's slots.
    ticket: Ticket,
    /// When the handshake must be over.
    deadline: Instant,
}

/// Serves HTTP on an established transport; requests see the client's
/// address as `ConnectInfo` and the connection's [`Ticket`].
async fn http<I>(st: Arc<Shared>, router: Router, io: I, conn: Accepted)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Accepted {
        client,
        forwarded,
        peer_trusted,
        ticket,
        deadline,
    } = conn;
    let st2 = st.clone();
    let t2 = ticket.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (st, router, ticket) = (st2.clone(), router.clone(), t2.clone());
        async move {
            let ip = if forwarded {
                st.edge
                    .trusted
                    .client_ip(client.ip(), req.headers(), st.edge.forwarded_header)
            } else {
                client.ip()
            };
            // Behind a proxy without PROXY header, a WebSocket counts
            // against the address the forwarding header names.
            let mut took_slot = false;
            if forwarded && ip != client.ip() && is_upgrade(&req) && ticket.ip_slot().is_none() {
                match st.edge.per_ip.take(ip) {
                    Ok(slot) => {
                        took_slot = slot.is_some();
                        *ticket.ip_slot() = slot;
                    }
                    Err(_) => {
                        st.edge
                            .counters
                            .refused_per_ip
                            .fetch_add(1, Ordering::Relaxed);
                        ticket.established();
                        let e =
                            json!({ "error": OPEN_PER_IP.message, "reason": OPEN_PER_IP.reason });
                        let retry = [(
                            axum::http::header::RETRY_AFTER,
                            OPEN_PER_IP.retry_after.to_string(),
                        )];
                        return Ok::<_, Infallible>(
                            (StatusCode::TOO_MANY_REQUESTS, retry, Json(e)).into_response(),
                        );
                    }
                }
            }
            let mut req = match request_guard::check(&st, req).await {
                Ok(req) => req,
                Err(answer) => {
                    ticket.established();
                    if took_slot {
                        ticket.ip_slot().take();
                    }
                    return Ok(answer);
                }
            };
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
