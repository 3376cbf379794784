//! Connections before they are established: half-open floods, handshake
//! timeouts, the pending and per-IP caps, `Sec-WebSocket-Key`, protocol
//! versions, JSON bodies on framework-made 4xx.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

const HALF_OPEN: &[u8] = b"GET /app/app-key?protocol=7 HTTP/1.1\r\nHost: x\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_flood_from_one_ip_is_capped_and_timed_out() {
    const FLOOD: usize = 2000;
    const PER_IP: usize = 100;
    let node = start(pushmesh_server::Config {
        handshake_timeout: Duration::from_millis(1500),
        max_connections_per_ip: PER_IP,
        ..config()
    })
    .await;
    let addr = node.addr;
    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD / 100 {
        let batch = futures_util::future::join_all((0..100).map(|_| async move {
            let mut s = connect_from(ip("127.0.0.1"), addr).await;
            // A refused socket may already be closed: a failed write is fine.
            let _ = s.write_all(HALF_OPEN).await;
            s
        }))
        .await;
        flood.extend(batch);
    }

    // Another address is served while the flood is on.
    let health = http_from(ip("127.0.0.2"), addr, HEALTHZ).await;
    assert_eq!(status(&health), 200, "{health}");
    let mut ws = pusher_over(connect_from(ip("127.0.0.2"), addr).await, "protocol=7", &[]).await;
    assert!(established(&mut ws).await.is_ok());

    // Every half-open socket is closed: at once over the per-IP cap, after
    // the handshake timeout below it.
    for s in &mut flood {
        closed_by_peer(s).await;
    }
    let c = &node.shared.edge.counters;
    let (timeouts, per_ip) = (
        c.handshake_timeouts.load(Ordering::Relaxed),
        c.refused_per_ip.load(Ordering::Relaxed),
    );
    assert!(timeouts >= PER_IP as u64, "{timeouts} timeouts");
    assert_eq!(timeouts + per_ip, FLOOD as u64, "each one closed once");

    // The established connection was not subject to the handshake deadline.
    ok(ws
        .send(Message::Text(r#"{"event":"pusher:ping","data":{}}"#.into()))
        .await);
    let pong = next_text(&mut ws).await;
    assert!(pong.contains("pusher:pong"), "{pong}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_pending_handshakes_the_listener_waits_instead_of_resetting() {
    let node = start(pushmesh_server::Config {
        handshake_timeout: Duration::from_secs(60),
        max_pending_handshakes: 10,
        max_pending_handshakes_per_ip: 0,
        ..config()
    })
    .await;
    let mut held = holding(10, "127.0.0.1", node.addr, HALF_OPEN).await;
    // The 11th is not accepted, nor reset: it waits in the listen backlog.
    let mut extra = sent("127.0.0.2", node.addr, HEALTHZ.as_bytes()).await;
    let counters = &node.shared.edge.counters;
    let end = Instant::now() + LIMIT;
    while counters.accept_paused.load(Ordering::Relaxed) == 0 || node.shared.edge.pending() < 10 {
        assert!(Instant::now() < end, "the accept loop never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(node.shared.edge.pending(), 10);
    // An answered request frees its slot; the waiting connection is then
    // accepted and answered.
    ok(held[0].write_all(b"\r\n").await);
    let first = head(&mut held[0]).await;
    assert_eq!(
        &first, b"HTTP/1.1 400",
        "a request without upgrade headers is refused"
    );
    let answer = answer(&mut extra).await;
    assert_eq!(status(&answer), 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_pending_handshakes_per_ip_an_address_gets_429() {
    let node = start(pushmesh_server::Config {
        handshake_timeout: Duration::from_secs(60),
        max_pending_handshakes_per_ip: 5,
        ..config()
    })
    .await;
    let _held = holding(5, "127.0.0.1", node.addr, HALF_OPEN).await;
    // The kernel completes a connect before the node accepts it: the sixth
    // goes only once the node counts the five (else it could be one of them).
    let counted = async {
        while node.shared.edge.pending_handshakes_from(ip("127.0.0.1")) < 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    ok(tokio::time::timeout(LIMIT, counted).await);
    let mut extra = connect_from(ip("127.0.0.1"), node.addr).await;
    let answer = answer(&mut extra).await;
    assert_eq!(status(&answer), 429, "{answer}");
    assert!(answer.contains("retry-after: 1\r\n"), "{answer}");
    assert!(json_error(&answer), "{answer}");
    let refused = &node.shared.edge.counters.refused_pending_per_ip;
    assert_eq!(refused.load(Ordering::Relaxed), 1);
    let health = http_from(ip("127.0.0.2"), node.addr, HEALTHZ).await;
    assert_eq!(status(&health), 200, "another address is served: {health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_after_the_timeout() {
    let node = start(pushmesh_server::Config {
        handshake_timeout: Duration::from_millis(1000),
        ..config()
    })
    .await;
    let mut s = sent(
        "127.0.0.1",
        node.addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    let head = head(&mut s).await;
    assert_eq!(&head, b"HTTP/1.1 200");
    closed_by_peer(&mut s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_keys_are_checked() {
    let node = start(config()).await;
    let upgrade = |key: &str| {
        format!(
            "GET /app/app-key?protocol=7 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        )
    };
    for bad in ["", "not-base64!", "AAAA", "dGhlIHNhbXBsZSBub25jZQ"] {
        let resp = http(node.addr, &upgrade(bad)).await;
        assert_eq!(status(&resp), 400, "{bad:?}: {resp}");
        assert!(json_error(&resp), "{resp}");
    }
    let ws = upgrade("dGhlIHNhbXBsZSBub25jZQ==").replace("/app/app-key?protocol=7", "/ws");
    let resp = http(node.addr, &ws.replace("Key: dGhl", "Key: xdGhl")).await;
    assert_eq!(status(&resp), 400, "/ws too: {resp}");
    let mut s = sent(
        "127.0.0.1",
        node.addr,
        upgrade("dGhlIHNhbXBsZSBub25jZQ==").as_bytes(),
    )
    .await;
    let head = head(&mut s).await;
    assert_eq!(&head, b"HTTP/1.1 101", "a good key upgrades");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framework_refusals_have_json_bodies() {
    let node = start(config()).await;
    let get = |path: &str, method: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    let cases = [
        (get("/apps/app-id/events", "GET"), 405),
        (get("/healthz", "POST"), 405),
        (get("/app/app-key", "POST"), 405),
        (get("/apps/%FF/events", "POST"), 400),
        (get("/apps/app-id/channels/%C3%28", "GET"), 400),
        (get("/app/app-key?protocol=7", "GET"), 400),
        (get("/nowhere", "GET"), 404),
    ];
    for (req, want) in cases {
        let resp = http(node.addr, &req).await;
        assert_eq!(status(&resp), want, "{req}: {resp}");
        assert!(json_error(&resp), "{req}: {resp}");
    }
    let resp = http(node.addr, &get("/apps/app-id/events", "GET")).await;
    assert!(
        resp.to_ascii_lowercase().contains("allow: post"),
        "Allow kept: {resp}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_versions_4_to_7_are_spoken() {
    let node = start(config()).await;
    for v in 4..=7 {
        let s = connect_from(ip("127.0.0.1"), node.addr).await;
        let mut ws = pusher_over(s, &format!("protocol={v}"), &[]).await;
        assert!(established(&mut ws).await.is_ok(), "protocol {v}");
    }
    for v in [3, 8] {
        let s = connect_from(ip("127.0.0.1"), node.addr).await;
        let mut ws = pusher_over(s, &format!("protocol={v}"), &[]).await;
        let refusal = established(&mut ws).await.err().unwrap_or_default();
        assert!(refusal.contains("4007"), "protocol {v}: {refusal}");
    }
}
