//! The identity trackers in virtual time, and two real cluster layers
//! started with the same node id.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;

const GOSSIP: Duration = Duration::from_millis(100);

fn addr(port: u16) -> SocketAddr {
    ([10, 0, 0, 1], port).into()
}

fn holder(generation: u64, port: u16, heartbeat: u64, live: bool) -> Holder {
    Holder {
        generation,
        gossip_addr: addr(port),
        heartbeat,
        live,
    }
}

#[test]
fn a_running_duplicate_is_a_conflict_once_its_heartbeat_keeps_advancing() {
    let t0 = Instant::now();
    let mut t = IdentityTracker::new("n1", GOSSIP);
    let mut logged = Vec::new();
    let mut hb = 10;
    // Checked every 200 ms, as the membership loop does.
    for i in 0..10u32 {
        hb += 3;
        let o = t.observe(
            t0 + Duration::from_millis(200) * i,
            &[holder(7, 9000, hb, true)],
        );
        logged.extend(o.to_log);
        if i < 5 {
            assert!(
                t.conflicts().is_empty(),
                "confirmed too early, at check {i}"
            );
        }
    }
    let want = IdentityConflict {
        node_id: "n1".into(),
        gossip_addr: addr(9000),
        epoch: 7,
    };
    assert_eq!(t.conflicts(), std::slice::from_ref(&want));
    // Logged once, not at every check.
    assert_eq!(logged, std::slice::from_ref(&want));
    // Logged again after RELOG_EVERY if it persists.
    let later = t0 + Duration::from_secs(2) + RELOG_EVERY;
    let o = t.observe(later, &[holder(7, 9000, hb + 100, true)]);
    assert_eq!(o.to_log, std::slice::from_ref(&want));
    // Gone from gossip: resolved.
    let o = t.observe(later + Duration::from_millis(200), &[]);
    assert_eq!(o.resolved, [want]);
    assert!(t.conflicts().is_empty());
}

#[test]
fn a_previous_incarnation_with_a_frozen_heartbeat_is_not_a_conflict() {
    let t0 = Instant::now();
    let mut t = IdentityTracker::new("n1", GOSSIP);
    // Peers lagging a round hand us two or three stale heartbeats of the
    // old incarnation, which chitchat may then call live for a while.
    let views = [100, 101, 103, 103, 103, 103, 103, 103, 103, 103, 103, 103];
    for (i, hb) in views.into_iter().enumerate() {
        let now = t0 + Duration::from_millis(200) * u32::try_from(i).unwrap_or(0);
        let o = t.observe(now, &[holder(1, 9000, hb, true)]);
        assert!(o.to_log.is_empty(), "check {i}");
        assert!(t.conflicts().is_empty(), "check {i}");
    }
}

#[test]
fn a_holder_that_is_not_live_is_not_a_conflict() {
    let t0 = Instant::now();
    let mut t = IdentityTracker::new("n1", GOSSIP);
    for i in 0..20u32 {
        t.observe(
            t0 + Duration::from_millis(200) * i,
            &[holder(1, 9000, u64::from(i) * 5, false)],
        );
    }
    assert!(t.conflicts().is_empty());
}

#[test]
fn holders_of_skips_ourselves_and_other_node_ids() {
    let me = ChitchatId::new("n1", 5, addr(1));
    let older = ChitchatId::new("n1", 4, addr(1));
    let elsewhere = ChitchatId::new("n1", 5, addr(2));
    let other = ChitchatId::new("n2", 5, addr(3));
    let known = [(&me, 1), (&older, 2), (&elsewhere, 3), (&other, 4)];
    let live = [&me, &elsewhere, &other];
    let h = holders_of(&me, known.iter().copied(), &live);
    assert_eq!(
        h,
        [holder(4, 1, 2, false), holder(5, 2, 3, true)],
        "same generation at another address counts too"
    );
}

#[test]
fn the_auth_limiter_allows_one_line_per_sender_per_ten_seconds() {
    let t0 = Instant::now();
    let mut l = PerSenderLimiter::default();
    let (a, b) = (addr(1), addr(2));
    assert_eq!(l.allow(t0, a), Some(0));
    assert_eq!(l.allow(t0, b), Some(0));
    for ms in [1, 500, 9_999] {
        assert_eq!(l.allow(t0 + Duration::from_millis(ms), a), None);
    }
    assert_eq!(l.allow(t0 + AUTH_LOG_EVERY, a), Some(3));
    assert_eq!(l.allow(t0 + AUTH_LOG_EVERY, a), None);
}

#[test]
fn the_auth_limiter_is_bounded() {
    let t0 = Instant::now();
    let mut l = PerSenderLimiter::default();
    for i in 0..MAX_TRACKED_SENDERS {
        let a = SocketAddr::from(([10, 1, (i / 256) as u8, (i % 256) as u8], 1));
        assert!(l.allow(t0, a).is_some());
    }
    // Full of recent senders: a new one is not logged (and not remembered).
    assert_eq!(l.allow(t0, addr(9)), None);
    assert_eq!(l.last.len(), MAX_TRACKED_SENDERS);
    // Once they are quiet for 10 s, there is room again.
    assert_eq!(l.allow(t0 + AUTH_LOG_EVERY, addr(9)), Some(0));
    assert_eq!(l.last.len(), 1);
}

mod live {
    //! Two processes' cluster layers with one node id, on loopback.

    use std::time::Duration;

    use crate::tls;
    use crate::{Cluster, ClusterConfig, IdentityConflict};

    fn free_udp_port() -> u16 {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn config(node: &str, epoch: u64, seed: Option<std::net::SocketAddr>) -> ClusterConfig {
        let gossip: std::net::SocketAddr = ([127, 0, 0, 1], free_udp_port()).into();
        let quic: std::net::SocketAddr = ([127, 0, 0, 1], free_udp_port()).into();
        ClusterConfig {
            node_id: node.into(),
            cluster_id: "test".into(),
            epoch,
            gossip_listen: gossip,
            gossip_advertise: gossip,
            quic_listen: quic,
            quic_advertise: quic,
            seeds: seed.map(|s| s.to_string()).into_iter().collect(),
            secret: "identity test secret".into(),
            tls: tls::derive_from_secret("identity test secret").unwrap_or_else(|e| panic!("{e}")),
            gossip_interval: Duration::from_millis(50),
            phi_threshold: 8.0,
            dead_node_grace: Duration::from_secs(60),
            peer_queue: 1024,
            version: "test".into(),
        }
    }

    async fn conflicts_of(c: &Cluster) -> Vec<IdentityConflict> {
        let wait = async {
            loop {
                let v = c.identity_conflicts();
                if !v.is_empty() {
                    return v;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(15), wait)
            .await
            .unwrap_or_else(|_| panic!("{} saw no identity conflict", c.node_id()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_live_nodes_with_one_node_id_each_see_the_other() {
        let a_cfg = config("dup", 1, None);
        let (a_addr, seed) = (a_cfg.gossip_advertise, a_cfg.gossip_advertise);
        let (a, _a_rx) = Cluster::start(a_cfg)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let b_cfg = config("dup", 2, Some(seed));
        let b_addr = b_cfg.gossip_advertise;
        let (b, _b_rx) = Cluster::start(b_cfg)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let on_a = conflicts_of(&a).await;
        let on_b = conflicts_of(&b).await;
        assert_eq!(
            on_a,
            [IdentityConflict {
                node_id: "dup".into(),
                gossip_addr: b_addr,
                epoch: 2
            }]
        );
        assert_eq!(
            on_b,
            [IdentityConflict {
                node_id: "dup".into(),
                gossip_addr: a_addr,
                epoch: 1
            }]
        );
        a.shutdown(Duration::from_millis(50)).await;
        b.shutdown(Duration::from_millis(50)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn distinct_node_ids_are_no_conflict() {
        let a_cfg = config("one", 1, None);
        let seed = a_cfg.gossip_advertise;
        let (a, mut a_rx) = Cluster::start(a_cfg)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let (b, _b_rx) = Cluster::start(config("two", 2, Some(seed)))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let up = async {
            while let Some(e) = a_rx.recv().await {
                if matches!(e, crate::ClusterEvent::PeerUp { .. }) {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(15), up)
            .await
            .unwrap_or_else(|_| panic!("no link"));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(a.identity_conflicts().is_empty());
        assert!(b.identity_conflicts().is_empty());
        a.shutdown(Duration::from_millis(50)).await;
        b.shutdown(Duration::from_millis(50)).await;
    }
}
