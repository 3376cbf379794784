//! The gossip socket against forgers: random bytes, real but unsealed
//! chitchat messages, messages sealed with another key and replays change
//! nothing; the same node accepts a sealed message once.

use std::net::SocketAddr;
use std::time::Duration;

use chitchat::transport::{Transport, UdpTransport};
use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};

use super::*;

const SECRET: &str = "the right cluster secret";
const LOOPBACK: &str = "127.0.0.1:0";

fn config(name: &str, seeds: Vec<String>) -> ChitchatConfig {
    let any: SocketAddr = "127.0.0.1:9".parse().unwrap_or_else(|e| panic!("{e}"));
    ChitchatConfig {
        chitchat_id: ChitchatId::new(name.to_string(), 1, any),
        cluster_id: "c".into(),
        gossip_interval: Duration::from_millis(50),
        listen_addr: LOOPBACK.parse().unwrap_or_else(|e| panic!("{e}")),
        seed_nodes: seeds,
        failure_detector_config: FailureDetectorConfig::default(),
        marked_for_deletion_grace_period: Duration::from_secs(60),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: chitchat::ProtocolVersion::V1,
    }
}

async fn node(name: &str, seeds: Vec<String>, t: &dyn Transport) -> ChitchatHandle {
    spawn_chitchat(config(name, seeds), vec![("k".into(), "v".into())], t)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

async fn known_nodes(h: &ChitchatHandle) -> Vec<String> {
    h.with_chitchat(|c| {
        c.node_states()
            .keys()
            .map(|id| id.node_id.to_string())
            .collect()
    })
    .await
}

/// Waits (at most 10 s) until `cond` holds.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let wait = async {
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        while !cond() {
            tick.tick().await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .is_err()
    {
        panic!("timed out waiting for {what}");
    }
}

/// One datagram that `seed_of` sends to a socket of ours.
async fn capture(seed_of: impl AsyncFnOnce(String) -> ChitchatHandle) -> (Vec<u8>, ChitchatHandle) {
    let trap = tokio::net::UdpSocket::bind(LOOPBACK)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = trap.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let h = seed_of(addr.to_string()).await;
    let mut buf = vec![0u8; 65_536];
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), trap.recv_from(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no datagram captured"))
        .unwrap_or_else(|e| panic!("{e}"));
    buf.truncate(n);
    (buf, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_gossip_from_a_local_process_changes_nothing() {
    let stats = Arc::new(GossipStats::default());
    let transport = SealedTransport::new(gossip_key(SECRET), stats.clone());
    let victim = node("victim", vec![], &transport).await;
    let addr = transport
        .local_addr()
        .unwrap_or_else(|| panic!("not bound"));
    let forger = tokio::net::UdpSocket::bind(LOOPBACK)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Random bytes of every interesting length.
    let mut sent = 0u64;
    for len in [0, 1, seal::OVERHEAD - 1, seal::OVERHEAD, 100, 1400, 65_507] {
        let junk: Vec<u8> = (0..len).map(|_| rand::random()).collect();
        forger
            .send_to(&junk, addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        sent += 1;
    }
    // A real chitchat message, unsealed: what a plain chitchat node sends.
    let (plain_syn, plain_node) =
        capture(async |seed| node("intruder", vec![seed], &UdpTransport).await).await;
    let mut view = plain_syn.as_slice();
    assert!(
        ChitchatEnvelope::deserialize(&mut view).is_ok(),
        "the captured datagram is a valid chitchat message"
    );
    forger
        .send_to(&plain_syn, addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sent += 1;
    // A chitchat node with another secret, gossiping at the victim directly.
    let other = SealedTransport::new(gossip_key("another cluster secret"), Arc::default());
    let wrong_key = node("wrong-key", vec![addr.to_string()], &other).await;

    until("the forged datagrams to be rejected", || {
        stats.rejected.load(Ordering::Relaxed) >= sent + 2
    })
    .await;
    assert_eq!(stats.accepted.load(Ordering::Relaxed), 0);
    assert_eq!(known_nodes(&victim).await, vec!["victim".to_string()]);

    // A sealed message captured from a node with the secret, sent twice by
    // the forger: accepted once (the victim learns the node), then refused.
    let good = SealedTransport::new(gossip_key(SECRET), Arc::default());
    let (sealed_syn, friend) = capture(async |seed| node("friend", vec![seed], &good).await).await;
    for _ in 0..2 {
        forger
            .send_to(&sealed_syn, addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    until("the replay to be refused", || {
        stats.replayed.load(Ordering::Relaxed) >= 1
    })
    .await;
    assert_eq!(stats.accepted.load(Ordering::Relaxed), 1);
    let mut known = known_nodes(&victim).await;
    known.sort();
    assert_eq!(known, vec!["friend".to_string(), "victim".to_string()]);
    for h in [plain_node, wrong_key, friend, victim] {
        let _ = h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sealed_nodes_gossip_without_any_other_socket() {
    let (sa, sb) = (
        Arc::new(GossipStats::default()),
        Arc::new(GossipStats::default()),
    );
    let ta = SealedTransport::new(gossip_key(SECRET), sa.clone());
    let a = node("a", vec![], &ta).await;
    let a_addr = ta.local_addr().unwrap_or_else(|| panic!("not bound"));
    let tb = SealedTransport::new(gossip_key(SECRET), sb.clone());
    let b = node("b", vec![a_addr.to_string()], &tb).await;
    let a_state = a.chitchat();
    until("a to learn b's key", || {
        a_state.try_lock().is_ok_and(|c| {
            c.node_states()
                .iter()
                .any(|(id, st)| &*id.node_id == "b" && st.get("k") == Some("v"))
        })
    })
    .await;
    assert_eq!(sa.rejected.load(Ordering::Relaxed), 0);
    assert_eq!(sb.send_failed.load(Ordering::Relaxed), 0);
    assert!(sa.accepted.load(Ordering::Relaxed) > 0);
    let _ = a.shutdown().await;
    let _ = b.shutdown().await;
}

/// A `MakeWriter` that keeps what is logged.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn gossip_with_a_wrong_secret_is_logged_once_per_sender_and_counted() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    // Current-thread runtime: the socket is polled on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);
    let stats = Arc::new(GossipStats::default());
    let transport = SealedTransport::new(gossip_key(SECRET), stats.clone());
    let mut socket = transport
        .open(LOOPBACK.parse().unwrap_or_else(|e| panic!("{e}")))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let to = socket.local_addr().unwrap_or_else(|e| panic!("{e:#}"));
    let mut wrong = Sealer::new(&gossip_key("a wrong secret"), 1);
    let senders = [
        tokio::net::UdpSocket::bind(LOOPBACK).await,
        tokio::net::UdpSocket::bind(LOOPBACK).await,
    ]
    .map(|s| s.unwrap_or_else(|e| panic!("{e}")));
    for (i, s) in senders.iter().enumerate() {
        for _ in 0..(5 * (i + 1)) {
            let d = wrong
                .seal(now_ms(), b"not for you")
                .unwrap_or_else(|e| panic!("{e}"));
            s.send_to(&d, to).await.unwrap_or_else(|e| panic!("{e}"));
        }
    }
    // recv() drops every one of them and keeps waiting (bounded: 10 s).
    for _ in 0..100 {
        let _ = tokio::time::timeout(Duration::from_millis(100), socket.recv()).await;
        if stats.auth_failed.load(Ordering::Relaxed) >= 15 {
            break;
        }
    }
    assert_eq!(stats.auth_failed.load(Ordering::Relaxed), 15);
    assert_eq!(stats.rejected.load(Ordering::Relaxed), 15);
    let text = String::from_utf8(logs.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .unwrap_or_else(|e| panic!("{e}"));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "one line per sender: {text}");
    for (line, s) in lines.iter().zip(&senders) {
        let from = s.local_addr().unwrap_or_else(|e| panic!("{e}"));
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains("wrong cluster secret"), "{line}");
        assert!(line.contains(&from.to_string()), "{line}");
    }
}
