//! The ideal reference server: the least work a server could do for
//! `fanout`. It accepts WebSocket connections (answering the handshake and
//! any subscribe without checking anything), and on each publish
//! (`POST /apps/{id}/events`, unsigned, unchecked) frames the event once and
//! writes the same bytes to every connection. No per-channel routing, no
//! JSON beyond the minimum, no signatures.
//!
//! For the bench tool's own tests it can also misbehave on purpose:
//! drop or duplicate messages to the first connection.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Deliberate faults, for testing the load generator.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Drop every n-th publish for the first connection.
    pub drop_every: Option<u64>,
    /// Send every n-th publish twice to the first connection.
    pub dup_every: Option<u64>,
}

#[derive(Default)]
struct State {
    conns: Vec<mpsc::UnboundedSender<Bytes>>,
    publishes: u64,
}

/// A server text frame (unmasked) around `payload`.
pub fn ws_text_frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 10);
    b.put_u8(0x81);
    match payload.len() {
        n if n < 126 => b.put_u8(n as u8),
        n if n <= u16::MAX as usize => {
            b.put_u8(126);
            b.put_u16(n as u16);
        }
        n => {
            b.put_u8(127);
            b.put_u64(n as u64);
        }
    }
    b.put_slice(payload);
    b.freeze()
}

/// Serves until the task is dropped; returns the bound address at once.
pub async fn spawn(addr: SocketAddr, faults: Faults) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let state = Arc::new(Mutex::new(State::default()));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(handle(stream, state.clone(), faults));
        }
    });
    Ok(local)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn handle(mut s: TcpStream, state: Arc<Mutex<State>>, faults: Faults) {
    let mut buf = Vec::with_capacity(4096);
    let mut tmp = [0u8; 4096];
    loop {
        // One request head.
        let end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        if let Some(key) = header(&head, "sec-websocket-key") {
            let accept = derive_accept_key(key.as_bytes());
            let resp = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
            if s.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
            return websocket(s, buf, state).await;
        }
        let len: usize = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < len {
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..len).collect();
        publish(&body, &state, faults);
        if s.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
        )
        .await
        .is_err()
        {
            return;
        }
    }
}

fn publish(body: &[u8], state: &Mutex<State>, faults: Faults) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    let frame = serde_json::json!({"event": v["name"], "channel": v["channel"], "data": v["data"]});
    let wire = ws_text_frame(frame.to_string().as_bytes());
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    st.publishes += 1;
    let n = st.publishes;
    st.conns.retain(|c| !c.is_closed());
    for (i, c) in st.conns.iter().enumerate() {
        if i == 0 && faults.drop_every.is_some_and(|k| n.is_multiple_of(k)) {
            continue;
        }
        let _ = c.send(wire.clone());
        if i == 0 && faults.dup_every.is_some_and(|k| n.is_multiple_of(k)) {
            let _ = c.send(wire.clone());
        }
    }
}

/// Reads one masked client frame's payload from `buf` (which may need more bytes).
fn client_frame(buf: &[u8]) -> Option<(usize, Vec<u8>)> {
    if buf.len() < 2 {
        return None;
    }
    let mut len = (buf[1] & 0x7f) as usize;
    let mut at = 2;
    if len == 126 {
        len = u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize;
        at = 4;
    } else if len == 127 {
        len = u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize;
        at = 10;
    }
    let mask: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
    let data = buf.get(at + 4..at + 4 + len)?;
    Some((
        at + 4 + len,
        data.iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect(),
    ))
}

async fn websocket(s: TcpStream, mut buf: Vec<u8>, state: Arc<Mutex<State>>) {
    let (mut r, mut w) = s.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let _ = tx.send(ws_text_frame(br#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"1.1\",\"activity_timeout\":120}"}"#));
    let writer = tokio::spawn(async move {
        let mut out = BytesMut::new();
        while let Some(f) = rx.recv().await {
            out.extend_from_slice(&f);
            while let Ok(f) = rx.try_recv() {
                out.extend_from_slice(&f);
            }
            if w.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    });
    let mut tmp = [0u8; 4096];
    let mut registered = false;
    loop {
        while let Some((used, payload)) = client_frame(&buf) {
            buf.drain(..used);
            let text = String::from_utf8_lossy(&payload);
            if let Some(i) = text.find("\"channel\":\"") {
                let rest = &text[i + 11..];
                let ch = &rest[..rest.find('"').unwrap_or(rest.len())];
                let ok = format!(
                    r#"{{"event":"pusher_internal:subscription_succeeded","channel":"{ch}","data":"{{}}"}}"#
                );
                let _ = tx.send(ws_text_frame(ok.as_bytes()));
                if !registered {
                    registered = true;
                    state
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .conns
                        .push(tx.clone());
                }
            }
        }
        match r.read(&mut tmp).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
    drop(tx);
    writer.abort();
}
