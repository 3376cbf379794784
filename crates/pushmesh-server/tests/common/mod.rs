//! Helpers shared by the edge integration tests: a node on port 0, raw
//! sockets from chosen loopback addresses, signed API requests.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use pushmesh_protocol::sign;
use pushmesh_server::config::{development_app, Config};
use pushmesh_server::{Server, Shared};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// Every wait in these tests is bounded by this (generous) limit.
pub const LIMIT: Duration = Duration::from_secs(30);

pub type RawWs = tokio_tungstenite::WebSocketStream<TcpStream>;

pub fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

pub fn ip(s: &str) -> IpAddr {
    ok(s.parse())
}

/// A running node; stops when dropped.
pub struct Node {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

pub fn config() -> Config {
    Config {
        listen: ok("127.0.0.1:0".parse()),
        apps: vec![development_app()],
        ..Config::default()
    }
}

pub async fn start(config: Config) -> Node {
    let server = ok(Server::bind(config).await);
    let addr = ok(server.local_addr());
    let shared = server.shared();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    Node {
        addr,
        shared,
        _stop: tx,
    }
}

/// A TCP connection to `to` from the loopback address `from`.
pub async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let s = ok(TcpSocket::new_v4());
    ok(s.bind(SocketAddr::new(from, 0)));
    ok(tokio::time::timeout(LIMIT, s.connect(to)).await)
        .unwrap_or_else(|e| panic!("connect from {from}: {e}"))
}

/// Sends `request` (which should say `Connection: close`) and returns the
/// whole response.
pub async fn http_from(from: IpAddr, to: SocketAddr, request: &str) -> String {
    let mut s = connect_from(from, to).await;
    ok(s.write_all(request.as_bytes()).await);
    let mut out = Vec::new();
    let _ = tokio::time::timeout(LIMIT, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn http(to: SocketAddr, request: &str) -> String {
    http_from(ip("127.0.0.1"), to, request).await
}

/// A signed `POST path` of `body` to the development app; the response.
pub async fn post(to: SocketAddr, path: &str, body: &str) -> String {
    http(to, &signed("POST", path, body, &[])).await
}

/// A health check that closes its connection.
pub const HEALTHZ: &str = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// `n` connections from `from` that each sent `bytes` and are kept open.
pub async fn holding(n: usize, from: &str, to: SocketAddr, bytes: &[u8]) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = connect_from(ip(from), to).await;
        ok(s.write_all(bytes).await);
        held.push(s);
    }
    held
}

/// A connection from `from` that sent `request` and is kept open.
pub async fn sent(from: &str, to: SocketAddr, request: &[u8]) -> TcpStream {
    let mut s = connect_from(ip(from), to).await;
    ok(s.write_all(request).await);
    s
}

/// The first 12 bytes `s` receives (`HTTP/1.1 NNN`); panics after [`LIMIT`].
pub async fn head(s: &mut TcpStream) -> [u8; 12] {
    let mut head = [0u8; 12];
    ok(ok(
        tokio::time::timeout(LIMIT, s.read_exact(&mut head)).await
    ));
    head
}

/// What `s` receives until the peer closes it, as text; panics after
/// [`LIMIT`] or on an error.
pub async fn answer(s: &mut TcpStream) -> String {
    let mut answer = String::new();
    ok(ok(tokio::time::timeout(
        LIMIT,
        s.read_to_string(&mut answer),
    )
    .await));
    answer
}

/// Waits until the peer closes `s` (EOF or reset); panics after [`LIMIT`].
pub async fn closed_by_peer(s: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(LIMIT, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("connection still open after {LIMIT:?}"),
        }
    }
}

/// The next text frame.
pub async fn next_text(ws: &mut RawWs) -> String {
    loop {
        match tokio::time::timeout(LIMIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
            Ok(Some(Ok(Message::Close(c)))) => return format!("close {c:?}"),
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// A Pusher WebSocket over `stream`, with extra request headers.
pub async fn pusher_over(stream: TcpStream, query: &str, headers: &[(&str, &str)]) -> RawWs {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = ok(format!("ws://127.0.0.1/app/app-key?{query}").into_client_request());
    for (k, v) in headers {
        req.headers_mut().insert(
            ok(axum::http::HeaderName::from_bytes(k.as_bytes())),
            ok(v.parse()),
        );
    }
    ok(tokio_tungstenite::client_async(req, stream).await).0
}

/// The socket id of a fresh connection, or the refusal it got.
pub async fn established(ws: &mut RawWs) -> Result<String, String> {
    let first = next_text(ws).await;
    if first.contains("pusher:connection_established") {
        let v: serde_json::Value = ok(serde_json::from_str(&first));
        let data: serde_json::Value = ok(serde_json::from_str(v["data"].as_str().unwrap_or("")));
        Ok(data["socket_id"].as_str().unwrap_or_default().to_string())
    } else {
        Err(first)
    }
}

/// A signed API request line + headers for the development app.
pub fn signed(method: &str, path: &str, body: &str, extra: &[(&str, &str)]) -> String {
    signed_as("app-key", "app-secret", method, path, body, extra)
}

pub fn signed_as(
    key: &str,
    secret: &str,
    method: &str,
    path: &str,
    body: &str,
    extra: &[(&str, &str)],
) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut q: Vec<(String, String)> = vec![
        ("auth_key".into(), key.into()),
        ("auth_timestamp".into(), now.to_string()),
        ("auth_version".into(), "1.0".into()),
    ];
    if !body.is_empty() {
        q.push(("body_md5".into(), sign::body_md5(body.as_bytes())));
    }
    q.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let sig = sign::sign(secret, &sign::api_string_to_sign(method, path, &q));
    let query: Vec<String> = q.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "{method} {path}?{}&auth_signature={sig} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        query.join("&"),
        body.len()
    )
}

/// The status code of a raw HTTP response.
pub fn status(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Whether a raw HTTP response has a JSON `{"error": ...}` body.
pub fn json_error(resp: &str) -> bool {
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((resp, ""));
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    head.to_ascii_lowercase()
        .contains("content-type: application/json")
        && v["error"].is_string()
}
