//! `pushmesh_http_request_duration_seconds{route}`: how long HTTP requests
//! take to be answered, by route pattern (bounded), as a Prometheus
//! histogram. The WebSocket upgrade routes count the handshake only.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use super::{esc, family};

/// Upper bounds of the buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// One route's histogram: counts per bucket (not cumulative), the sum and
/// the count.
#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// The histograms of every route.
#[derive(Debug, Default)]
pub struct Latencies(BTreeMap<String, Histogram>);

impl Latencies {
    /// Counts one request of `route` that took `took`.
    pub fn observe(&mut self, route: &str, took: Duration) {
        let s = took.as_secs_f64();
        let h = match self.0.get_mut(route) {
            Some(h) => h,
            None => self.0.entry(route.to_owned()).or_default(),
        };
        if let Some(i) = BUCKETS.iter().position(|b| s <= *b) {
            h.buckets[i] += 1;
        }
        h.sum += s;
        h.count += 1;
    }

    /// Writes the histogram family.
    pub fn render(&self, out: &mut String) {
        let name = "pushmesh_http_request_duration_seconds";
        family(
            out,
            name,
            "histogram",
            "Time from an HTTP request's headers to its answer, by route pattern.",
        );
        for (route, h) in &self.0 {
            let r = esc(route);
            let mut cumulative = 0;
            for (b, n) in BUCKETS.iter().zip(h.buckets) {
                cumulative += n;
                let _ = writeln!(
                    out,
                    "{name}_bucket{{route=\"{r}\",le=\"{b}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{route=\"{r}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "{name}_sum{{route=\"{r}\"}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{route=\"{r}\"}} {}", h.count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_inf_counts_all() {
        let mut l = Latencies::default();
        l.observe("/a", Duration::from_micros(300));
        l.observe("/a", Duration::from_millis(7));
        l.observe("/a", Duration::from_secs(10));
        let mut out = String::new();
        l.render(&mut out);
        assert!(out.contains("le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("le=\"0.01\"} 2\n"), "{out}");
        assert!(out.contains("le=\"2.5\"} 2\n"), "{out}");
        assert!(out.contains("le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("_count{route=\"/a\"} 3\n"), "{out}");
    }
}
