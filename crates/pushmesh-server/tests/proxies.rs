//! Real client addresses behind a balancer (PROXY protocol v2 and
//! X-Forwarded-For from trusted proxies only), and API requests as the
//! SDKs send them (socket_id checks, the Python SDK's terminate path).

mod common;

use std::net::SocketAddr;

use common::*;
use futures_util::SinkExt;
use pushmesh_protocol::sign;
use pushmesh_server::proxy::{Cidr, TrustedProxies};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn trusting(list: &[&str]) -> TrustedProxies {
    TrustedProxies(list.iter().map(|c| ok(c.parse::<Cidr>())).collect())
}

/// [`config`] behind a balancer at 127.0.0.1 that speaks PROXY protocol v2.
fn proxied() -> pushmesh_server::Config {
    pushmesh_server::Config {
        trusted_proxies: trusting(&["127.0.0.1/32"]),
        proxy_protocol: true,
        ..config()
    }
}

/// A PROXY protocol v2 header for a TCP/IPv4 client.
fn proxy_v2(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(c), SocketAddr::V4(s)) = (client, server) else {
        panic!("v4 only here")
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&c.ip().octets());
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&c.port().to_be_bytes());
    h.extend_from_slice(&s.port().to_be_bytes());
    h
}

async fn via_proxy_header(from: &str, client: &str, node: &Node) -> TcpStream {
    let mut s = connect_from(ip(from), node.addr).await;
    ok(s.write_all(&proxy_v2(ok(client.parse()), node.addr)).await);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v2_from_a_trusted_peer_names_the_client() {
    let node = start(pushmesh_server::Config {
        max_connections_per_ip: 1,
        // The untrusted peer's garbage below is closed by this deadline.
        handshake_timeout: std::time::Duration::from_secs(2),
        ..proxied()
    })
    .await;
    // Two connections of the proxy, one per client: each client is within its limit.
    let a = via_proxy_header("127.0.0.1", "203.0.113.7:40000", &node).await;
    let mut a = pusher_over(a, "protocol=7", &[]).await;
    assert!(established(&mut a).await.is_ok());
    let b = via_proxy_header("127.0.0.1", "203.0.113.8:40000", &node).await;
    let mut b = pusher_over(b, "protocol=7", &[]).await;
    assert!(
        established(&mut b).await.is_ok(),
        "another client has its own limit"
    );
    // A second connection of the first client is over max_connections_per_ip.
    let mut again = via_proxy_header("127.0.0.1", "203.0.113.7:40001", &node).await;
    closed_by_peer(&mut again).await;
    // Plain HTTP from the trusted proxy (a health check) still works.
    let health = http(node.addr, HEALTHZ).await;
    assert_eq!(status(&health), 200, "{health}");
    // An untrusted peer's PROXY header is not read: the request is garbage.
    let mut spoof = via_proxy_header("127.0.0.2", "198.51.100.1:1", &node).await;
    // The node may already have answered and closed: a failed write is fine.
    let _ = spoof.write_all(HEALTHZ.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        LIMIT,
        tokio::io::AsyncReadExt::read_to_end(&mut spoof, &mut out),
    )
    .await;
    let out = String::from_utf8_lossy(&out);
    assert!(!out.contains(" 200 "), "refused: {out}");
    // And the limit of the address in the header is unaffected by it.
    ok(
        a.send(Message::Text(r#"{"event":"pusher:ping","data":{}}"#.into()))
            .await,
    );
    assert!(next_text(&mut a).await.contains("pusher:pong"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_applies_to_the_address_in_the_proxy_header() {
    let node = start(pushmesh_server::Config {
        // One new connection per address, then 4100.
        connections_per_ip_per_sec: 0.001,
        ..proxied()
    })
    .await;
    for client in ["192.0.2.1:1000", "192.0.2.2:1000"] {
        let s = via_proxy_header("127.0.0.1", client, &node).await;
        let mut ws = pusher_over(s, "protocol=7", &[]).await;
        assert!(established(&mut ws).await.is_ok(), "{client}");
    }
    let s = via_proxy_header("127.0.0.1", "192.0.2.1:1001", &node).await;
    let mut ws = pusher_over(s, "protocol=7", &[]).await;
    let refusal = established(&mut ws).await.err().unwrap_or_default();
    assert!(refusal.contains("4100"), "{refusal}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_believed_from_trusted_proxies_only() {
    let node = start(pushmesh_server::Config {
        trusted_proxies: trusting(&["127.0.0.1/32", "10.0.0.0/8"]),
        connections_per_ip_per_sec: 0.001,
        ..config()
    })
    .await;
    let via = |from: &'static str, xff: &'static str| {
        let addr = node.addr;
        async move {
            let s = connect_from(ip(from), addr).await;
            let mut ws = pusher_over(s, "protocol=7", &[("x-forwarded-for", xff)]).await;
            established(&mut ws).await
        }
    };
    // The right-most untrusted address is the client; a forged left part is ignored.
    assert!(via("127.0.0.1", "192.0.2.1").await.is_ok());
    assert!(
        via("127.0.0.1", "192.0.2.2, 10.1.2.3").await.is_ok(),
        "another client"
    );
    let refusal = via("127.0.0.1", "198.51.100.9, 192.0.2.1, 10.9.9.9").await;
    assert!(
        refusal.is_err_and(|r| r.contains("4100")),
        "192.0.2.1 again"
    );
    // From an untrusted peer the header is ignored: both count as 127.0.0.2.
    assert!(via("127.0.0.2", "192.0.2.50").await.is_ok());
    let refusal = via("127.0.0.2", "192.0.2.51").await;
    assert!(
        refusal.is_err_and(|r| r.contains("4100")),
        "keyed by the peer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_clients_are_held_to_max_connections_per_ip() {
    let node = start(pushmesh_server::Config {
        trusted_proxies: trusting(&["127.0.0.1/32"]),
        max_connections_per_ip: 1,
        ..config()
    })
    .await;
    let upgrade = |xff: &str| {
        format!(
            "GET /app/app-key?protocol=7 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Forwarded-For: {xff}\r\n\r\n"
        )
    };
    let mut first = sent("127.0.0.1", node.addr, upgrade("192.0.2.1").as_bytes()).await;
    assert_eq!(&head(&mut first).await, b"HTTP/1.1 101");
    let resp = http(node.addr, &upgrade("192.0.2.1")).await;
    assert_eq!(status(&resp), 429, "{resp}");
    assert!(json_error(&resp), "{resp}");
    let mut other = sent("127.0.0.1", node.addr, upgrade("192.0.2.2").as_bytes()).await;
    assert_eq!(
        &head(&mut other).await,
        b"HTTP/1.1 101",
        "the proxy itself is not limited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_with_a_malformed_socket_id_are_refused() {
    let node = start(config()).await;
    for bad in ["abc", "1.", ".1", "1.2.3", "", "1,2", " 1.2"] {
        let body = serde_json::json!({"name": "e", "channel": "c", "data": "{}", "socket_id": bad})
            .to_string();
        let resp = post(node.addr, "/apps/app-id/events", &body).await;
        assert_eq!(status(&resp), 400, "{bad:?}: {resp}");
        assert!(json_error(&resp) && resp.contains("socket_id"), "{resp}");
        let batch = serde_json::json!({"batch": [
            {"name": "e", "channel": "c", "data": "{}"},
            {"name": "e", "channel": "c", "data": "{}", "socket_id": bad},
        ]})
        .to_string();
        let resp = post(node.addr, "/apps/app-id/batch_events", &batch).await;
        assert_eq!(status(&resp), 400, "batch {bad:?}: {resp}");
    }
    let body = r#"{"name":"e","channel":"c","data":"{}","socket_id":"123.456"}"#;
    let resp = post(node.addr, "/apps/app-id/events", body).await;
    assert_eq!(status(&resp), 200, "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_connections_without_the_app_prefix() {
    let node = start(config()).await;
    let s = connect_from(ip("127.0.0.1"), node.addr).await;
    let mut ws = pusher_over(s, "protocol=7", &[]).await;
    let socket_id = ok(established(&mut ws).await);
    let user_data = r#"{"id":"u1"}"#;
    let auth = format!(
        "app-key:{}",
        sign::sign("app-secret", &sign::signin_string(&socket_id, user_data))
    );
    let signin = serde_json::json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}});
    ok(ws.send(Message::Text(signin.to_string().into())).await);
    let ok_frame = next_text(&mut ws).await;
    assert!(ok_frame.contains("signin_success"), "{ok_frame}");

    let path = "/users/u1/terminate_connections";
    let wrong = http(
        node.addr,
        &signed_as("app-key", "wrong", "POST", path, "{}", &[]),
    )
    .await;
    assert_eq!(status(&wrong), 401, "{wrong}");
    let unknown = http(
        node.addr,
        &signed_as("nope", "app-secret", "POST", path, "{}", &[]),
    )
    .await;
    assert_eq!(status(&unknown), 401, "{unknown}");
    assert!(json_error(&unknown), "{unknown}");
    let resp = post(node.addr, path, "{}").await;
    assert_eq!(status(&resp), 200, "{resp}");
    // next_text gives up after LIMIT: the 4009 must come.
    let mut closing = next_text(&mut ws).await;
    while !closing.contains("4009") {
        closing = next_text(&mut ws).await;
    }
}
