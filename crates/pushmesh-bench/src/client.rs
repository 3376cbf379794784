//! A subscriber's connection: tungstenite's WebSocket client, or
//! (`--compression`) a small client of its own that offers
//! permessage-deflate and inflates what it gets (tungstenite has no
//! permessage-deflate), or (`--sse`) a Server-Sent Events stream
//! (`GET /app/{key}/sse`, HTTP/1.1 chunked). All count the bytes that
//! arrived on the wire.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use pushmesh_protocol::wire::{Event, FrameReader, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

type Plain = tokio_tungstenite::WebSocketStream<TcpStream>;

/// The offer a compressing subscriber makes (Chromium's).
const OFFER: &str = "permessage-deflate; client_max_window_bits";

enum Inner {
    Plain(Box<Plain>),
    Deflate {
        io: TcpStream,
        reader: Box<FrameReader>,
        mask: u32,
    },
    Sse {
        io: TcpStream,
        /// Bytes read and not yet de-chunked.
        raw: bytes::BytesMut,
        /// The stream's text, de-chunked, not yet split into events.
        text: bytes::BytesMut,
    },
}

/// One subscriber's connection.
pub struct Client {
    inner: Inner,
    /// Bytes received on the wire (frames, headers included).
    pub wire_bytes: u64,
}

/// Header bytes of an unmasked frame with `n` payload bytes.
fn header_len(n: usize) -> u64 {
    match n {
        0..126 => 2,
        126..65536 => 4,
        _ => 10,
    }
}

impl Client {
    /// Upgrades `stream` to a WebSocket at `path`; with `compression`, the
    /// server must agree to permessage-deflate.
    pub async fn connect(
        mut stream: TcpStream,
        addr: SocketAddr,
        path: &str,
        compression: bool,
    ) -> anyhow::Result<Self> {
        if !compression {
            let url = format!("ws://{addr}{path}");
            let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
            return Ok(Self {
                inner: Inner::Plain(Box::new(ws)),
                wire_bytes: 0,
            });
        }
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: {OFFER}\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut reader = Box::new(FrameReader::new(Role::Client, 16 << 20, true));
        let head = loop {
            let buf = reader.buffer_mut();
            if stream.read_buf(buf).await? == 0 {
                bail!("connection closed during the handshake");
            }
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = buf.split_to(i + 4);
                break String::from_utf8_lossy(&head).into_owned();
            }
            if buf.len() > 16 << 10 {
                bail!("handshake response too long");
            }
        };
        if !head.starts_with("HTTP/1.1 101") {
            bail!("upgrade refused: {}", head.lines().next().unwrap_or(""));
        }
        if !head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions: permessage-deflate")
        {
            bail!("the server did not agree to permessage-deflate");
        }
        Ok(Self {
            inner: Inner::Deflate {
                io: stream,
                reader,
                mask: 0x5a17_c3e1,
            },
            wire_bytes: 0,
        })
    }

    /// Opens a Server-Sent Events stream at `path` (the server must answer
    /// 200 `text/event-stream`, chunked).
    pub async fn sse(mut stream: TcpStream, addr: SocketAddr, path: &str) -> anyhow::Result<Self> {
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut raw = bytes::BytesMut::with_capacity(4096);
        let head = loop {
            if stream.read_buf(&mut raw).await? == 0 {
                bail!("connection closed before the response");
            }
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = raw.split_to(i + 4);
                break String::from_utf8_lossy(&head).to_ascii_lowercase();
            }
            if raw.len() > 16 << 10 {
                bail!("response head too long");
            }
        };
        if !head.starts_with("http/1.1 200") {
            bail!("stream refused: {}", head.lines().next().unwrap_or(""));
        }
        if !head.contains("transfer-encoding: chunked") {
            bail!("the stream is not chunked");
        }
        Ok(Self {
            wire_bytes: raw.len() as u64,
            inner: Inner::Sse {
                io: stream,
                raw,
                text: bytes::BytesMut::new(),
            },
        })
    }

    /// The next text message (an SSE event's `data`); `None` when the
    /// connection ends. Pings are answered. Cancel-safe between messages.
    pub async fn next_text(&mut self) -> anyhow::Result<Option<String>> {
        match &mut self.inner {
            Inner::Plain(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        self.wire_bytes += header_len(t.len()) + t.len() as u64;
                        return Ok(Some(t.to_string()));
                    }
                    Some(Ok(Message::Ping(p))) => ws.send(Message::Pong(p)).await?,
                    Some(Ok(Message::Close(_))) | None => return Ok(None),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => bail!("websocket error: {e}"),
                }
            },
            Inner::Deflate { io, reader, mask } => loop {
                match reader.next_event().context("bad frame from the server")? {
                    Some(Event::Text(t)) => {
                        return Ok(Some(String::from_utf8_lossy(&t).into_owned()))
                    }
                    Some(Event::Ping(p)) => {
                        let f = masked(0x8a, &p, *mask);
                        io.write_all(&f).await?;
                    }
                    Some(Event::Close(_)) => return Ok(None),
                    Some(_) => {}
                    None => {
                        let n = io.read_buf(reader.buffer_mut()).await?;
                        if n == 0 {
                            return Ok(None);
                        }
                        self.wire_bytes += n as u64;
                    }
                }
            },
            Inner::Sse { io, raw, text } => loop {
                if let Some(data) = sse_event(text) {
                    return Ok(Some(data));
                }
                match dechunk(raw, text)? {
                    Chunks::More => {}
                    Chunks::End => return Ok(None),
                    Chunks::Need => {
                        let n = io.read_buf(raw).await?;
                        if n == 0 {
                            return Ok(None);
                        }
                        self.wire_bytes += n as u64;
                    }
                }
            },
        }
    }

    /// Sends a text message (uncompressed: the server inflates only what
    /// is marked compressed).
    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        match &mut self.inner {
            Inner::Plain(ws) => ws.send(Message::Text(text.into())).await?,
            Inner::Deflate { io, mask, .. } => {
                io.write_all(&masked(0x81, text.as_bytes(), *mask)).await?
            }
            Inner::Sse { .. } => bail!("an SSE stream is one-way"),
        }
        Ok(())
    }

    /// Closes the connection (best effort).
    pub async fn close(&mut self) {
        match &mut self.inner {
            Inner::Plain(ws) => {
                let _ = Plain::close(ws, None).await;
            }
            Inner::Deflate { io, mask, .. } => {
                let _ = io
                    .write_all(&masked(0x88, &1000u16.to_be_bytes(), *mask))
                    .await;
                let _ = io.shutdown().await;
            }
            Inner::Sse { io, .. } => {
                let _ = io.shutdown().await;
            }
        }
    }
}

/// What de-chunking found.
enum Chunks {
    /// Some text was added.
    More,
    /// More bytes must be read.
    Need,
    /// The last chunk: the stream ended.
    End,
}

/// Moves complete chunks of `raw` (HTTP/1.1 chunked coding) to `text`.
fn dechunk(raw: &mut bytes::BytesMut, text: &mut bytes::BytesMut) -> anyhow::Result<Chunks> {
    let mut added = false;
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size_line = std::str::from_utf8(&raw[..eol]).context("chunk size")?;
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).context("chunk size")?;
        if size == 0 {
            return Ok(Chunks::End);
        }
        if raw.len() < eol + 2 + size + 2 {
            break;
        }
        let _ = raw.split_to(eol + 2);
        text.extend_from_slice(&raw.split_to(size));
        let _ = raw.split_to(2);
        added = true;
    }
    Ok(if added { Chunks::More } else { Chunks::Need })
}

/// The `data` of the next complete event in `text` (comments, `id:`-only
/// and `retry:` blocks are skipped), if one is complete.
fn sse_event(text: &mut bytes::BytesMut) -> Option<String> {
    while let Some(end) = text.windows(2).position(|w| w == b"\n\n") {
        let block = text.split_to(end + 2);
        let data: Vec<&str> = std::str::from_utf8(&block)
            .unwrap_or("")
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        if !data.is_empty() {
            return Some(data.join("\n"));
        }
    }
    None
}

/// A masked client frame with first byte `first`.
fn masked(first: u8, payload: &[u8], mask: u32) -> Vec<u8> {
    let m = mask.to_be_bytes();
    let mut out = vec![first];
    match payload.len() {
        n @ 0..126 => out.push(0x80 | n as u8),
        n @ 126..65536 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&m);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
    out
}
