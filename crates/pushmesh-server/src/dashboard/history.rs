//! The status page's figures: every [`SAMPLE_EVERY`] the node asks the
//! cluster for every app's counters (`apps::stats::cluster`) and keeps
//! the last [`SAMPLES`] totals (ten minutes) and the latest per-app and
//! per-node rows. Sampled only while `dashboard_token` is set; a page that
//! opens sees the history at once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pushmesh_core::app_registry::AppStats;
use serde::Serialize;

use crate::apps::stats::{ClusterStats, NodeStats};
use crate::Shared;

/// How often the figures are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples kept: ten minutes.
pub const SAMPLES: usize = 120;

/// The cluster's totals at one moment, with rates since the sample before.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Sample {
    /// Unix ms.
    pub t: u64,
    /// Open connections over the nodes that answered.
    pub connections: u64,
    /// Events published per second.
    pub published_per_sec: f64,
    /// Frames queued to connections per second.
    pub delivered_per_sec: f64,
    /// Webhook events delivered per second.
    pub webhooks_per_sec: f64,
    /// Nodes that answered.
    pub nodes: usize,
}

/// One app's latest figures, cluster-wide.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AppRow {
    /// App id.
    pub id: String,
    /// Summed counters.
    #[serde(flatten)]
    pub stats: AppStats,
    /// Events published per second.
    pub published_per_sec: f64,
    /// Webhook events delivered per second.
    pub webhooks_per_sec: f64,
}

/// One node's latest figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeRow {
    /// Node id.
    pub node: String,
    /// Open connections; none: it did not answer in time.
    pub connections: Option<u64>,
}

#[derive(Default)]
struct State {
    samples: VecDeque<Sample>,
    apps: Vec<AppRow>,
    nodes: Vec<NodeRow>,
    /// The previous sample's cumulative counters: total and per app.
    last: Option<(u64, AppStats, HashMap<String, AppStats>)>,
}

/// The sampled figures.
#[derive(Default)]
pub struct History(Mutex<State>);

/// What the page gets.
#[derive(Debug, Serialize)]
pub struct View {
    /// Oldest first.
    pub history: Vec<Sample>,
    /// Every app with a counter, by id.
    pub apps: Vec<AppRow>,
    /// This node and every peer that answered or did not.
    pub nodes: Vec<NodeRow>,
}

fn per_sec(now: u64, then: u64, dt_ms: u64) -> f64 {
    if dt_ms == 0 {
        return 0.0;
    }
    now.saturating_sub(then) as f64 * 1000.0 / dt_ms as f64
}

fn node_connections(stats: &NodeStats) -> u64 {
    stats.iter().map(|(_, s)| s.connections).sum()
}

impl History {
    /// Takes the cluster's counters at `t` (unix ms); `silent` are the
    /// linked peers that did not answer.
    pub fn record(&self, t: u64, me: &str, stats: &ClusterStats, silent: &[String]) {
        let mut by_app: HashMap<String, AppStats> = HashMap::new();
        for node in std::iter::once(&stats.local).chain(stats.peers.iter().map(|p| &p.1)) {
            for (id, s) in node {
                by_app.entry(id.clone()).or_default().add(s);
            }
        }
        let mut total = AppStats::default();
        for s in by_app.values() {
            total.add(s);
        }
        let mut st = crate::node::lock(&self.0);
        let (sample, apps) = match &st.last {
            Some((then, before, before_apps)) => {
                let dt = t.saturating_sub(*then);
                let rate = |now: &AppStats, was: &AppStats| {
                    (
                        per_sec(now.messages_published, was.messages_published, dt),
                        per_sec(now.webhooks_sent, was.webhooks_sent, dt),
                    )
                };
                let apps = by_app
                    .iter()
                    .map(|(id, s)| {
                        let was = before_apps.get(id).copied().unwrap_or(*s);
                        let (p, w) = rate(s, &was);
                        (id.clone(), *s, p, w)
                    })
                    .collect::<Vec<_>>();
                let (p, w) = rate(&total, before);
                let d = per_sec(total.messages_delivered, before.messages_delivered, dt);
                (
                    Sample {
                        t,
                        connections: total.connections,
                        published_per_sec: p,
                        delivered_per_sec: d,
                        webhooks_per_sec: w,
                        nodes: stats.nodes(),
                    },
                    apps,
                )
            }
            None => {
                let apps = by_app
                    .iter()
                    .map(|(id, s)| (id.clone(), *s, 0.0, 0.0))
                    .collect();
                (
                    Sample {
                        t,
                        connections: total.connections,
                        nodes: stats.nodes(),
                        ..Sample::default()
                    },
                    apps,
                )
            }
        };
        let mut rows: Vec<AppRow> = apps
            .into_iter()
            .map(|(id, stats, p, w)| AppRow {
                id,
                stats,
                published_per_sec: p,
                webhooks_per_sec: w,
            })
            .collect();
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        let mut nodes = vec![NodeRow {
            node: me.to_owned(),
            connections: Some(node_connections(&stats.local)),
        }];
        nodes.extend(stats.peers.iter().map(|(n, s)| NodeRow {
            node: n.to_string(),
            connections: Some(node_connections(s)),
        }));
        nodes.extend(silent.iter().map(|n| NodeRow {
            node: n.clone(),
            connections: None,
        }));
        if st.samples.len() == SAMPLES {
            st.samples.pop_front();
        }
        st.samples.push_back(sample);
        st.apps = rows;
        st.nodes = nodes;
        st.last = Some((t, total, by_app));
    }

    /// The history and the latest rows.
    pub fn view(&self) -> View {
        let st = crate::node::lock(&self.0);
        View {
            history: st.samples.iter().copied().collect(),
            apps: st.apps.clone(),
            nodes: st.nodes.clone(),
        }
    }
}

/// Samples every [`SAMPLE_EVERY`], the first at once.
pub async fn sample(st: Arc<Shared>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let stats = crate::apps::stats::cluster(&st, None).await;
        let silent: Vec<String> = match &st.cluster {
            Some(c) => c
                .linked_peers()
                .iter()
                .filter(|p| !stats.peers.iter().any(|(n, _)| n == *p))
                .map(|p| p.to_string())
                .collect(),
            None => Vec::new(),
        };
        st.dashboard
            .record(crate::apps::now_ms(), &st.config.node_id, &stats, &silent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushmesh_core::NodeId;

    fn app(id: &str, connections: u64, published: u64) -> (String, AppStats) {
        let s = AppStats {
            connections,
            messages_published: published,
            ..AppStats::default()
        };
        (id.to_owned(), s)
    }

    #[test]
    fn sums_nodes_computes_rates_and_keeps_the_last_120_samples() {
        let h = History::default();
        let stats = |p: u64| ClusterStats {
            local: vec![app("a", 2, p), app("b", 0, 0)],
            peers: vec![(NodeId::new("n2"), vec![app("a", 3, p)])],
        };
        h.record(1_000, "n1", &stats(10), &["n3".into()]);
        h.record(6_000, "n1", &stats(60), &[]);
        let v = h.view();
        assert_eq!(v.history.len(), 2);
        assert_eq!(v.history[1].connections, 5);
        // (120 - 20) published in 5 s over both nodes.
        assert_eq!(v.history[1].published_per_sec, 20.0);
        let a = &v.apps[0];
        assert_eq!(
            (a.id.as_str(), a.stats.connections, a.published_per_sec),
            ("a", 5, 20.0)
        );
        assert_eq!(
            v.nodes,
            vec![
                NodeRow {
                    node: "n1".into(),
                    connections: Some(2)
                },
                NodeRow {
                    node: "n2".into(),
                    connections: Some(3)
                },
            ]
        );
        for k in 0..200 {
            h.record(11_000 + k * 5_000, "n1", &stats(60), &[]);
        }
        let v = h.view();
        assert_eq!(v.history.len(), SAMPLES);
        assert_eq!(v.history[SAMPLES - 1].published_per_sec, 0.0);
    }

    #[test]
    fn a_node_that_stops_answering_gives_no_negative_rate() {
        let h = History::default();
        let both = ClusterStats {
            local: vec![app("a", 1, 100)],
            peers: vec![(NodeId::new("n2"), vec![app("a", 1, 500)])],
        };
        h.record(0, "n1", &both, &[]);
        let alone = ClusterStats {
            local: vec![app("a", 1, 100)],
            peers: vec![],
        };
        h.record(5_000, "n1", &alone, &["n2".into()]);
        let v = h.view();
        assert_eq!(v.history[1].published_per_sec, 0.0);
        assert_eq!(
            v.nodes[1],
            NodeRow {
                node: "n2".into(),
                connections: None
            }
        );
    }
}
