//! Prometheus metrics (text format 0.0.4) and the HTTP request counter.
//!
//! Labels are a small bounded set: route patterns (never a path with ids),
//! status codes, close codes, channel kinds, peers. Never a channel name.

use std::collections::BTreeMap;
use std::fmt::{Display, Write as _};
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
    /// Open SSE streams (`/app/{key}/sse`).
    pub sse_connections: AtomicU64,
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

/// Writes a metric family with one sample without labels.
pub(crate) fn scalar(out: &mut String, name: &str, kind: &str, help: &str, v: impl Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {v}");
}

/// A metric family's name, type and help.
pub(crate) type Meta<'a> = (&'a str, &'a str, &'a str);

/// Writes a metric family with one sample per value of `label` (values
/// from a fixed set, or escaped by the caller).
pub(crate) fn labelled<V: Display>(
    out: &mut String,
    meta: Meta<'_>,
    label: &str,
    samples: impl IntoIterator<Item = (impl Display, V)>,
) {
    let samples = samples
        .into_iter()
        .map(|(l, v)| (format_args!("{label}=\"{l}\"").to_string(), v));
    with_labels(out, meta, samples);
}

/// Writes a metric family with samples whose labels are given whole
/// (`a="x",b="y"`).
pub(crate) fn with_labels<V: Display>(
    out: &mut String,
    (name, kind, help): Meta<'_>,
    samples: impl IntoIterator<Item = (String, V)>,
) {
    family(out, name, kind, help);
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {v}");
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Renders every metric.
pub fn render(st: &Shared) -> String {
    let mut out = String::with_capacity(4096);
    render_connections(st, &mut out);
    render_channels(st, &mut out);
    render_messages(st, &mut out);
    render_http(&st.stats.edge, &mut out);
    render_limits(&st.stats.edge, &mut out);
    render_identity(&mut out, &st.stats.edge.identity);
    render_webhooks(st, &mut out);
    render_authorizer(&st.stats.authorizer, &mut out);
    render_continuity(st, &mut out);
    render_history(st, &mut out);
    render_admin(st, &mut out);
    process::render(&mut out);
    out
}

/// Connections open, opened and closed (by close code).
fn render_connections(st: &Shared, out: &mut String) {
    let e = &st.stats.edge;
    scalar(
        out,
        "pushmesh_connections",
        "gauge",
        "Open client connections (WebSocket and Server-Sent Events streams).",
        st.node.registry.count(),
    );
    scalar(
        out,
        "pushmesh_connections_opened_total",
        "counter",
        "WebSocket connections accepted.",
        load(&e.connections_opened),
    );
    let closed = e
        .connections_closed
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    labelled(
        out,
        (
            "pushmesh_connections_closed_total",
            "counter",
            "WebSocket connections closed, by close code (client: closed by the client).",
        ),
        "code",
        closed.iter().map(|(code, n)| (esc(code), n)),
    );
}

/// Occupied channels and subscriptions, by channel kind.
fn render_channels(st: &Shared, out: &mut String) {
    let kinds = st.node.channel_stats();
    labelled(
        out,
        (
            "pushmesh_channels",
            "gauge",
            "Occupied channels on this node, by kind.",
        ),
        "kind",
        kinds.iter().map(|(kind, channels, _)| (kind, channels)),
    );
    labelled(
        out,
        (
            "pushmesh_subscriptions",
            "gauge",
            "Subscriptions on this node, by channel kind.",
        ),
        "kind",
        kinds.iter().map(|(kind, _, subs)| (kind, subs)),
    );
}

/// Events published and delivered, bytes both ways, compression.
fn render_messages(st: &Shared, out: &mut String) {
    let (e, links) = (&st.stats.edge, &st.node.links.stats);
    for (name, kind, help, v) in [
        (
            "pushmesh_messages_published_total",
            "counter",
            "Events accepted for publishing (HTTP API, /broadcast, wsify).",
            &st.stats.published,
        ),
        (
            "pushmesh_messages_delivered_total",
            "counter",
            "Frames queued to client connections.",
            &links.frames_queued,
        ),
        (
            "pushmesh_slow_consumer_disconnects_total",
            "counter",
            "Clients closed (4100) because their queue was full.",
            &links.slow_consumers,
        ),
        (
            "pushmesh_received_bytes_total",
            "counter",
            "WebSocket payload bytes received.",
            &e.bytes_in,
        ),
        (
            "pushmesh_sent_bytes_total",
            "counter",
            "WebSocket payload bytes sent.",
            &e.bytes_out,
        ),
        (
            "pushmesh_compression_connections",
            "gauge",
            "Open connections that negotiated permessage-deflate.",
            &e.compression_connections,
        ),
        (
            "pushmesh_sse_connections",
            "gauge",
            "Open Server-Sent Events streams (/app/{key}/sse).",
            &e.sse_connections,
        ),
    ] {
        scalar(out, name, kind, help, load(v));
    }
    labelled(
        out,
        (
            "pushmesh_compression_bytes_total",
            "counter",
            "Messages sent compressed, bytes before (plain) and after (compressed) compression.",
        ),
        "stage",
        [
            ("plain", load(&e.compression_plain)),
            ("compressed", load(&e.compression_compressed)),
        ],
    );
}

/// HTTP requests by route and status, and their durations.
fn render_http(e: &EdgeMetrics, out: &mut String) {
    family(
        out,
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
        .render(out);
}

/// Refusals by a rate limit or allow-list, accept errors.
fn render_limits(e: &EdgeMetrics, out: &mut String) {
    labelled(
        out,
        (
            "pushmesh_rate_limited_total",
            "counter",
            "Requests refused by a rate limit or allow-list.",
        ),
        "limit",
        [
            ("connections_per_ip", load(&e.ip_rate_limited)),
            ("api_requests", load(&e.api_rate_limited)),
            ("origin", load(&e.origin_refused)),
        ],
    );
    scalar(
        out,
        "pushmesh_accept_errors_total",
        "counter",
        "Errors accepting TCP connections (e.g. no file descriptors left).",
        load(&e.accept_errors),
    );
}

/// Webhook deliveries and the backup of pending webhook events.
/// The admin API's requests and the apps served, by source.
fn render_admin(st: &Shared, out: &mut String) {
    labelled(
        out,
        (
            "pushmesh_admin_requests_total",
            "counter",
            "Admin API requests by outcome.",
        ),
        "outcome",
        crate::admin::OUTCOMES
            .iter()
            .zip(&st.apps.requests)
            .map(|(o, c)| (*o, load(c))),
    );
    let (config, admin) = st.apps.counts(&st.node.apps());
    labelled(
        out,
        (
            "pushmesh_apps",
            "gauge",
            "Apps served, by where they come from (the configuration file or the admin API).",
        ),
        "source",
        [("config", config), ("admin", admin)],
    );
}

fn render_webhooks(st: &Shared, out: &mut String) {
    let w = &st.webhooks.stats;
    labelled(
        out,
        (
            "pushmesh_webhooks_total",
            "counter",
            "Webhook events by outcome.",
        ),
        "outcome",
        [
            ("sent", load(&w.sent)),
            ("retried", load(&w.retried)),
            ("dropped", load(&w.dropped)),
        ],
    );
    let (b, handed, held) = st.node.links.hook_relay.snapshot();
    labelled(
        out,
        (
            "pushmesh_webhook_backup_events",
            "gauge",
            "Webhook events handed to a backup peer and not yet confirmed (role=owner), held for peers (role=backup).",
        ),
        "role",
        [("owner", handed), ("backup", held)],
    );
    labelled(
        out,
        (
            "pushmesh_webhook_backup_total",
            "counter",
            "Webhook backup: events handed, not handed (too many outstanding), held, released (owner gone), refused (backup full), expired.",
        ),
        "outcome",
        [
            ("handed", b.handed),
            ("not_handed", b.not_handed),
            ("held", b.held),
            ("released", b.released),
            ("refused", b.refused),
            ("expired", b.expired),
        ],
    );
}

/// wsify authorizer calls by outcome.
fn render_authorizer(a: &crate::authorizer::AuthorizerStats, out: &mut String) {
    labelled(
        out,
        (
            "pushmesh_authorizer_calls_total",
            "counter",
            "wsify authorizer calls by outcome.",
        ),
        "outcome",
        [
            ("allowed", load(&a.allowed)),
            ("refused", load(&a.refused)),
            ("unavailable", load(&a.unavailable)),
            ("skipped", load(&a.notifications_skipped)),
        ],
    );
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
    scalar(
        out,
        "pushmesh_history_events",
        "gauge",
        "History events held on this node.",
        h.events,
    );
    scalar(
        out,
        "pushmesh_history_bytes",
        "gauge",
        "Bytes of history held on this node (bounded by history_max_bytes).",
        h.bytes,
    );
    labelled(
        out,
        (
            "pushmesh_history_evicted_total",
            "counter",
            "History events dropped: reason=max_events (per channel), memory (history_max_bytes), ttl (ttl_secs).",
        ),
        "reason",
        [
            ("max_events", h.evicted_max_events),
            ("memory", h.evicted_memory),
            ("ttl", h.expired),
        ],
    );
    labelled(
        out,
        (
            "pushmesh_history_recoveries_total",
            "counter",
            "Subscribes that sent a position, by whether they recovered.",
        ),
        "recovered",
        [("true", h.recovered), ("false", h.not_recovered)],
    );
    scalar(
        out,
        "pushmesh_history_unreplicated_total",
        "counter",
        "History publishes answered before any peer acknowledged the event (none did within 2 s).",
        load(&st.node.links.stats.history_unacked),
    );
}

/// Publishes refused with 503 and subscription barrier timeouts.
fn render_continuity(st: &Shared, out: &mut String) {
    let stats = &st.node.links.stats;
    labelled(
        out,
        (
            "pushmesh_publish_refused_total",
            "counter",
            "Publishes answered 503: the node could not promise delivery.",
        ),
        "reason",
        pushmesh_core::Refusal::ALL.map(|r| (r.as_str(), load(&stats.refused[r as usize]))),
    );
    scalar(
        out,
        "pushmesh_subscription_barrier_timeouts_total",
        "counter",
        "Subscriptions confirmed before every peer acknowledged the interest (barrier wait exceeded).",
        load(&stats.barrier_timeouts),
    );
}

/// The identity-header counters in Prometheus text.
fn render_identity(out: &mut String, s: &crate::identity_headers::IdentityStats) {
    scalar(
        out,
        "pushmesh_identity_headers_ignored_total",
        "counter",
        "Connections whose identity headers came from a peer outside trusted_proxies (ignored).",
        load(&s.ignored),
    );
    scalar(
        out,
        "pushmesh_identity_headers_honoured_total",
        "counter",
        "Connections that took their identity from the identity headers.",
        load(&s.honoured),
    );
}
