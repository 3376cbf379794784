//! Peer links between real cluster layers on loopback: a node's id is
//! bound to its certificate.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::*;

const SECRET: &str = "a test cluster secret";

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn certs(dir: &Path, node: &str) -> TlsMaterial {
    tls::load(
        &dir.join("ca.pem"),
        &dir.join(format!("{node}.pem")),
        &dir.join(format!("{node}-key.pem")),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn config(node: &str, tls: TlsMaterial, seed: Option<SocketAddr>) -> ClusterConfig {
    let gossip: SocketAddr = ([127, 0, 0, 1], free_udp_port()).into();
    let quic: SocketAddr = ([127, 0, 0, 1], free_udp_port()).into();
    ClusterConfig {
        node_id: node.into(),
        cluster_id: "test".into(),
        epoch: 1,
        gossip_listen: gossip,
        gossip_advertise: gossip,
        quic_listen: quic,
        quic_advertise: quic,
        seeds: seed.map(|s| s.to_string()).into_iter().collect(),
        secret: SECRET.into(),
        tls,
        gossip_interval: Duration::from_millis(50),
        phi_threshold: 8.0,
        dead_node_grace: Duration::from_secs(60),
        peer_queue: 1024,
        version: "test".into(),
    }
}

/// Waits (at most 15 s) for `PeerUp` of `node`.
async fn peer_up(rx: &mut mpsc::Receiver<ClusterEvent>, node: &str) {
    let wait = async {
        while let Some(e) = rx.recv().await {
            if matches!(&e, ClusterEvent::PeerUp { node: n, .. } if n.as_str() == node) {
                return;
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(15), wait)
        .await
        .is_err()
    {
        panic!("no link to {node}");
    }
}

/// Waits (at most 15 s) until `c` has refused a link.
async fn refused(c: &Cluster) {
    let wait = async {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        while c.links_refused() == 0 {
            tick.tick().await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(15), wait)
        .await
        .is_err()
    {
        panic!("{} refused no link", c.node_id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cannot_pose_as_another_node() {
    let dir = std::env::temp_dir().join(format!("pushmesh-links-{}", rand::random::<u64>()));
    tls::init(&dir, &["n1".to_string(), "n2".to_string()]).unwrap_or_else(|e| panic!("{e}"));
    let a_cfg = config("n1", certs(&dir, "n1"), None);
    let seed = a_cfg.gossip_advertise;
    let (a, mut a_rx) = Cluster::start(a_cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (b, mut b_rx) = Cluster::start(config("n2", certs(&dir, "n2"), Some(seed)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    peer_up(&mut a_rx, "n2").await;
    peer_up(&mut b_rx, "n1").await;
    assert_eq!(a.links_refused(), 0);

    // Started normally, a node whose certificate names another node stops at once.
    let wrong = Cluster::start(config("n0", certs(&dir, "n2"), Some(seed))).await;
    assert!(matches!(
        wrong,
        Err(ClusterError::Tls(tls::TlsError::NodeMismatch { .. }))
    ));
    // A modified node that skips that check, with n2's certificate, says it
    // is n0: as the lower id it dials n1 and n2, which both refuse it.
    let (liar, mut liar_rx) = Cluster::start_unchecked(config("n0", certs(&dir, "n2"), Some(seed)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    refused(&a).await;
    refused(&b).await;
    while let Ok(e) = a_rx.try_recv() {
        assert!(
            !matches!(&e, ClusterEvent::PeerUp { node, .. } if node.as_str() == "n0"),
            "n1 linked with the impostor"
        );
    }
    assert!(!a.linked_peers().iter().any(|n| n.as_str() == "n0"));
    assert!(!b.linked_peers().iter().any(|n| n.as_str() == "n0"));
    while let Ok(e) = liar_rx.try_recv() {
        if let ClusterEvent::PeerUp { node, .. } = e {
            // The impostor may see the hello of the side that refuses it, never a frame.
            assert!(["n1", "n2"].contains(&node.as_str()));
        }
    }
    for c in [liar, a, b] {
        c.shutdown(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_nodes_link_with_per_node_certificates() {
    let dev = || tls::derive_from_secret(SECRET).unwrap_or_else(|e| panic!("{e}"));
    let a_cfg = config("dev-a", dev(), None);
    let seed = a_cfg.gossip_advertise;
    let (a, mut a_rx) = Cluster::start(a_cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (b, _b_rx) = Cluster::start(config("dev-b", dev(), Some(seed)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    peer_up(&mut a_rx, "dev-b").await;
    assert_eq!(a.links_refused() + b.links_refused(), 0);
    a.shutdown(Duration::from_millis(100)).await;
    b.shutdown(Duration::from_millis(100)).await;
}
