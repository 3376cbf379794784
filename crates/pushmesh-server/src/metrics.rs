//! Prometheus metrics (text format 0.0.4) and the HTTP request counter.
//!
//! Labels are a small bounded set: route patterns (never a path with ids),
//! status codes, close codes, channel kinds, peers. Never a channel name.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::Shared;

mod latency;
mod process;
pub use process::render_node_state;

/// Counters of the edge.
#[derive(Debug, Default)]
pub struct EdgeMetrics {
    /// Connections accepted (Pusher and wsify).
    pub connections_opened: AtomicU64,
    /// Connections closed, by close code (`client` when the client left).
    pub connections_closed: Mutex<BTreeMap<String, u64>>,
    /// WebSocket payload bytes received.
    pub bytes_in: AtomicU64,
    /// WebSocket payload bytes sent (uncompressed).
    pub bytes_out: AtomicU64,
    /// Open connections that negotiated permessage-deflate.
    pub compression_connections: AtomicU64,
    /// Messages sent compressed: their bytes before compression.
    pub compression_plain: AtomicU64,
    /// Messages sent compressed: their bytes after compression.
    pub compression_compressed: AtomicU64,
    /// HTTP requests by route pattern and status.
    pub http: Mutex<BTreeMap<(String, u16), u64>>,
    /// HTTP request durations by route pattern.
    pub http_latency: Mutex<latency::Latencies>,
    /// Connections refused by the per-IP rate limit.
    pub ip_rate_limited: AtomicU64,
    /// API requests refused by the per-app rate limit.
    pub api_rate_limited: AtomicU64,
    /// Connections refused by an Origin allow-list.
    pub origin_refused: AtomicU64,
    /// Accept errors (e.g. out of file descriptors).
    pub accept_errors: AtomicU64,
    /// Identity headers honoured / ignored (`identity_headers.rs`).
    pub identity: crate::identity_headers::IdentityStats,
}

impl EdgeMetrics {
    /// Counts a closed connection.
    pub fn closed(&self, code: &str) {
        *self
            .connections_closed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(code.to_owned())
            .or_default() += 1;
    }
}

/// Middleware: counts every HTTP request by matched route and status.
pub async fn track_http(State(st): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    st.stats
        .edge
        .http_latency
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .observe(&route, started.elapsed());
    let status = resp.status().as_u16();
    *st.stats
        .edge
        .http
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry((route, status))
        .or_default() += 1;
    resp
}

/// Escapes a Prometheus label value.
pub(crate) fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes the HELP and TYPE lines of a metric family.
pub(crate) fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Renders every metric.
pub fn render(st: &Shared) -> String {
    let mut out = String::with_capacity(4096);
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (connections, kinds) = (st.node.registry.count(), st.node.channel_stats());
    let e = &st.stats.edge;
    family(
        &mut out,
        "pushmesh_connections",
        "gauge",
        "Open WebSocket connections.",
    );
    let _ = writeln!(out, "pushmesh_connections {connections}");
    family(
        &mut out,
        "pushmesh_connections_opened_total",
        "counter",
        "WebSocket connections accepted.",
    );
    let _ = writeln!(
        out,
        "pushmesh_connections_opened_total {}",
        l(&e.connections_opened)
    );
    family(
        &mut out,
        "pushmesh_connections_closed_total",
        "counter",
        "WebSocket connections closed, by close code (client: closed by the client).",
    );
    for (code, n) in e
        .connections_closed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        let _ = writeln!(
            out,
            "pushmesh_connections_closed_total{{code=\"{}\"}} {n}",
            esc(code)
        );
    }
    family(
        &mut out,
        "pushmesh_channels",
        "gauge",
        "Occupied channels on this node, by kind.",
    );
    for (kind, channels, _) in &kinds {
        let _ = writeln!(out, "pushmesh_channels{{kind=\"{kind}\"}} {channels}");
    }
    family(
        &mut out,
        "pushmesh_subscriptions",
        "gauge",
        "Subscriptions on this node, by channel kind.",
    );
    for (kind, _, subs) in &kinds {
        let _ = writeln!(out, "pushmesh_subscriptions{{kind=\"{kind}\"}} {subs}");
    }
    family(
        &mut out,
        "pushmesh_messages_published_total",
        "counter",
        "Events accepted for publishing (HTTP API, /broadcast, wsify).",
    );
    let _ = writeln!(
        out,
        "pushmesh_messages_published_total {}",
        l(&st.stats.published)
    );
    family(
        &mut out,
        "pushmesh_messages_delivered_total",
        "counter",
        "Frames queued to client connections.",
    );
    let _ = writeln!(
        out,
        "pushmesh_messages_delivered_total {}",
        l(&st.node.links.stats.frames_queued)
    );
    family(
        &mut out,
        "pushmesh_slow_consumer_disconnects_total",
        "counter",
        "Clients closed (4100) because their queue was full.",
    );
    let _ = writeln!(
        out,
        "pushmesh_slow_consumer_disconnects_total {}",
        l(&st.node.links.stats.slow_consumers)
    );
    family(
        &mut out,
        "pushmesh_received_bytes_total",
        "counter",
        "WebSocket payload bytes received.",
    );
    let _ = writeln!(out, "pushmesh_received_bytes_total {}", l(&e.bytes_in));
    family(
        &mut out,
        "pushmesh_sent_bytes_total",
        "counter",
        "WebSocket payload bytes sent.",
    );
    let _ = writeln!(out, "pushmesh_sent_bytes_total {}", l(&e.bytes_out));
    family(
        &mut out,
        "pushmesh_compression_connections",
        "gauge",
        "Open connections that negotiated permessage-deflate.",
    );
    let _ = writeln!(
        out,
        "pushmesh_compression_connections {}",
        l(&e.compression_connections)
    );
    family(
        &mut out,
        "pushmesh_compression_bytes_total",
        "counter",
        "Messages sent compressed, bytes before (plain) and after (compressed) compression.",
    );
    let _ = writeln!(
        out,
        "pushmesh_compression_bytes_total{{stage=\"plain\"}} {}",
        l(&e.compression_plain)
    );
    let _ = writeln!(
        out,
        "pushmesh_compression_bytes_total{{stage=\"compressed\"}} {}",
        l(&e.compression_compressed)
    );
    family(
        &mut out,
        "pushmesh_http_requests_total",
        "counter",
        "HTTP requests by route pattern and status.",
    );
    for ((route, status), n) in e.http.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(
            out,
            "pushmesh_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
            esc(route)
        );
    }
    e.http_latency
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .render(&mut out);
    family(
        &mut out,
        "pushmesh_rate_limited_total",
        "counter",
        "Requests refused by a rate limit or allow-list.",
    );
    let _ = writeln!(
        out,
        "pushmesh_rate_limited_total{{limit=\"connections_per_ip\"}} {}",
        l(&e.ip_rate_limited)
    );
    let _ = writeln!(
        out,
        "pushmesh_rate_limited_total{{limit=\"api_requests\"}} {}",
        l(&e.api_rate_limited)
    );
    let _ = writeln!(
        out,
        "pushmesh_rate_limited_total{{limit=\"origin\"}} {}",
        l(&e.origin_refused)
    );
    family(
        &mut out,
        "pushmesh_accept_errors_total",
        "counter",
        "Errors accepting TCP connections (e.g. no file descriptors left).",
    );
    let _ = writeln!(out, "pushmesh_accept_errors_total {}", l(&e.accept_errors));
    render_identity(&mut out, &e.identity);
    let w = &st.webhooks.stats;
    family(
        &mut out,
        "pushmesh_webhooks_total",
        "counter",
        "Webhook events by outcome.",
    );
    for (o, v) in [
        ("sent", l(&w.sent)),
        ("retried", l(&w.retried)),
        ("dropped", l(&w.dropped)),
    ] {
        let _ = writeln!(out, "pushmesh_webhooks_total{{outcome=\"{o}\"}} {v}");
    }
    let (b, handed, held) = st.node.links.hook_relay.snapshot();
    family(
        &mut out,
        "pushmesh_webhook_backup_events",
        "gauge",
        "Webhook events handed to a backup peer and not yet confirmed (role=owner), held for peers (role=backup).",
    );
    let _ = writeln!(
        out,
        "pushmesh_webhook_backup_events{{role=\"owner\"}} {handed}"
    );
    let _ = writeln!(
        out,
        "pushmesh_webhook_backup_events{{role=\"backup\"}} {held}"
    );
    family(
        &mut out,
        "pushmesh_webhook_backup_total",
        "counter",
        "Webhook backup: events handed, not handed (too many outstanding), held, released (owner gone), refused (backup full), expired.",
    );
    for (o, v) in [
        ("handed", b.handed),
        ("not_handed", b.not_handed),
        ("held", b.held),
        ("released", b.released),
        ("refused", b.refused),
        ("expired", b.expired),
    ] {
        let _ = writeln!(out, "pushmesh_webhook_backup_total{{outcome=\"{o}\"}} {v}");
    }
    let a = &st.stats.authorizer;
    family(
        &mut out,
        "pushmesh_authorizer_calls_total",
        "counter",
        "wsify authorizer calls by outcome.",
    );
    for (o, v) in [
        ("allowed", l(&a.allowed)),
        ("refused", l(&a.refused)),
        ("unavailable", l(&a.unavailable)),
        ("skipped", l(&a.notifications_skipped)),
    ] {
        let _ = writeln!(
            out,
            "pushmesh_authorizer_calls_total{{outcome=\"{o}\"}} {v}"
        );
    }
    render_continuity(st, &mut out);
    render_history(st, &mut out);
    process::render(&mut out);
    out
}

/// `GET /metrics`.
pub async fn metrics(State(st): State<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(&st),
    )
        .into_response()
}

/// Message history: what the node holds, what left it and why, and how
/// subscribes that asked for a position were answered.
fn render_history(st: &Shared, out: &mut String) {
    let h = st.node.history_stats();
    let _ = writeln!(out, "# HELP pushmesh_history_events History events held on this node.\n# TYPE pushmesh_history_events gauge\npushmesh_history_events {}", h.events);
    let _ = writeln!(out, "# HELP pushmesh_history_bytes Bytes of history held on this node (bounded by history_max_bytes).\n# TYPE pushmesh_history_bytes gauge\npushmesh_history_bytes {}", h.bytes);
    let _ = writeln!(out, "# HELP pushmesh_history_evicted_total History events dropped: reason=max_events (per channel), memory (history_max_bytes), ttl (ttl_secs).\n# TYPE pushmesh_history_evicted_total counter");
    for (r, v) in [
        ("max_events", h.evicted_max_events),
        ("memory", h.evicted_memory),
        ("ttl", h.expired),
    ] {
        let _ = writeln!(out, "pushmesh_history_evicted_total{{reason=\"{r}\"}} {v}");
    }
    let _ = writeln!(out, "# HELP pushmesh_history_recoveries_total Subscribes that sent a position, by whether they recovered.\n# TYPE pushmesh_history_recoveries_total counter");
    let _ = writeln!(
        out,
        "pushmesh_history_recoveries_total{{recovered=\"true\"}} {}",
        h.recovered
    );
    let _ = writeln!(
        out,
        "pushmesh_history_recoveries_total{{recovered=\"false\"}} {}",
        h.not_recovered
    );
    let _ = writeln!(out, "# HELP pushmesh_history_unreplicated_total History publishes answered before any peer acknowledged the event (none did within 2 s).\n# TYPE pushmesh_history_unreplicated_total counter\npushmesh_history_unreplicated_total {}", st.node.links.stats.history_unacked.load(Ordering::Relaxed));
}

/// Publishes refused with 503 and subscription barrier timeouts.
fn render_continuity(st: &Shared, out: &mut String) {
    let stats = &st.node.links.stats;
    let _ = writeln!(out, "# HELP pushmesh_publish_refused_total Publishes answered 503: the node could not promise delivery.\n# TYPE pushmesh_publish_refused_total counter");
    for r in crate::node::Refusal::ALL {
        let _ = writeln!(
            out,
            "pushmesh_publish_refused_total{{reason=\"{}\"}} {}",
            r.as_str(),
            stats.refused[r as usize].load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(out, "# HELP pushmesh_subscription_barrier_timeouts_total Subscriptions confirmed before every peer acknowledged the interest (barrier wait exceeded).\n# TYPE pushmesh_subscription_barrier_timeouts_total counter\npushmesh_subscription_barrier_timeouts_total {}", stats.barrier_timeouts.load(Ordering::Relaxed));
}

/// The identity-header counters in Prometheus text.
fn render_identity(out: &mut String, s: &crate::identity_headers::IdentityStats) {
    family(
        out,
        "pushmesh_identity_headers_ignored_total",
        "counter",
        "Connections whose identity headers came from a peer outside trusted_proxies (ignored).",
    );
    let _ = writeln!(
        out,
        "pushmesh_identity_headers_ignored_total {}",
        s.ignored.load(Ordering::Relaxed)
    );
    family(
        out,
        "pushmesh_identity_headers_honoured_total",
        "counter",
        "Connections that took their identity from the identity headers.",
    );
    let _ = writeln!(
        out,
        "pushmesh_identity_headers_honoured_total {}",
        s.honoured.load(Ordering::Relaxed)
    );
}
