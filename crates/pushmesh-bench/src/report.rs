//! What a load run measured, and its one-screen table.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th.
    pub p90: f64,
    /// 99th.
    pub p99: f64,
    /// 99.9th.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Self::default();
        }
        Self {
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Subscribers.
    pub subscribers: usize,
    /// Events published (accepted by the API).
    pub published: u64,
    /// Deliveries expected.
    pub expected: u64,
    /// Deliveries received (duplicates included).
    pub delivered: u64,
    /// Expected deliveries never received.
    pub lost: u64,
    /// Deliveries received more than once.
    pub duplicated: u64,
    /// Publishing time, seconds.
    pub seconds: f64,
    /// Deliveries per second over the publishing time.
    pub deliveries_per_sec: f64,
    /// Server CPU seconds during the run (with --pid).
    pub server_cpu_seconds: Option<f64>,
    /// Server CPU microseconds per delivery (with --pid).
    pub server_cpu_us_per_delivery: Option<f64>,
    /// HTTP publish call latency.
    pub publish_ms: Percentiles,
    /// Publish → receive latency, from the timestamps inside the events.
    pub latency_ms: Percentiles,
    /// Server RSS per connection, KiB (connections scenario, with --pid).
    pub rss_kib_per_connection: Option<f64>,
    /// Extra latency of the cluster hop (cluster scenario): p50, p99 in ms.
    pub hop_extra_ms: Option<(f64, f64)>,
    /// Bytes on the wire per delivery, frame headers included (all the
    /// subscribers received, connection set-up excepted, over deliveries).
    pub wire_bytes_per_delivery: Option<f64>,
}

/// A one-screen table of a report.
pub fn table(r: &Report) -> String {
    let opt = |v: Option<f64>, unit: &str| v.map_or("-".to_string(), |x| format!("{x:.2} {unit}"));
    let mut s = format!(
        "scenario            {}\nsubscribers         {}\npublished           {}\ndelivered           {} of {} expected\nlost / duplicated   {} / {}\ndeliveries/s        {:.0}\nserver CPU          {}\nserver CPU/delivery {}\npublish HTTP ms     p50 {:.2}  p99 {:.2}  max {:.2}\nlatency ms          p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n",
        r.scenario, r.subscribers, r.published, r.delivered, r.expected, r.lost, r.duplicated,
        r.deliveries_per_sec, opt(r.server_cpu_seconds, "s"), opt(r.server_cpu_us_per_delivery, "µs"),
        r.publish_ms.p50, r.publish_ms.p99, r.publish_ms.max,
        r.latency_ms.p50, r.latency_ms.p90, r.latency_ms.p99, r.latency_ms.p999, r.latency_ms.max,
    );
    if let Some(w) = r.wire_bytes_per_delivery {
        s.push_str(&format!("wire bytes/delivery {w:.0}\n"));
    }
    if let Some(k) = r.rss_kib_per_connection {
        s.push_str(&format!("RSS/connection      {k:.2} KiB\n"));
    }
    if let Some((p50, p99)) = r.hop_extra_ms {
        s.push_str(&format!(
            "cluster hop extra   p50 {p50:.3} ms  p99 {p99:.3} ms\n"
        ));
    }
    s
}
