//! Peer links: the hello exchange on a new QUIC connection (with the check
//! that the peer's certificate names the node id it claims), the
//! length-delimited frame codec, and the read and write loops of a link.
//!
//! Each side opens two uni streams: **control** (the hello, then the
//! announcement of its data stream id, control frames and data acks) and
//! **data** (numbered channel messages from the peer's buffer). Frames:
//! `[len u32][kind u8][payload]` on control, `[len u32][seq u64][payload]`
//! on data.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pushmesh_core::{FrameKind, NodeId};
use tokio::sync::mpsc;

use crate::codec::{tagged, K_ACK, K_CONTROL};
use crate::peers::PeerSlot;
use crate::{lock, tls, Cluster, ClusterEvent, PeerCounters};

mod establish;

/// Largest frame accepted from a peer.
const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Frames written before one flush of the stream.
const WRITE_BATCH: usize = 512;
/// How long the hello exchange may take.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Application close code of a node that leaves (drain): its peers forget
/// it at once instead of holding its state.
pub(crate) const CLOSE_LEAVING: u32 = 7;
/// How often unacknowledged data frames are checked for retransmission.
const RETRANSMIT_CHECK: Duration = Duration::from_millis(500);

pub(crate) fn hello(node: &NodeId, epoch: u64, cluster_id: &str) -> Bytes {
    let mut b = BytesMut::new();
    b.extend_from_slice(b"PMH1");
    b.extend_from_slice(&epoch.to_be_bytes());
    b.extend_from_slice(&(cluster_id.len() as u16).to_be_bytes());
    b.extend_from_slice(cluster_id.as_bytes());
    b.extend_from_slice(node.as_str().as_bytes());
    b.freeze()
}

pub(crate) fn parse_hello(b: &[u8]) -> Option<(NodeId, u64, String)> {
    let rest = b.strip_prefix(b"PMH1")?;
    let epoch = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let n = u16::from_be_bytes(rest.get(8..10)?.try_into().ok()?) as usize;
    let cluster = std::str::from_utf8(rest.get(10..10 + n)?).ok()?.to_owned();
    let node = std::str::from_utf8(rest.get(10 + n..)?).ok()?;
    (!node.is_empty()).then(|| (NodeId::new(node), epoch, cluster))
}

async fn write_frame(s: &mut quinn::SendStream, b: &[u8]) -> Result<(), quinn::WriteError> {
    s.write_all(&(b.len() as u32).to_be_bytes()).await?;
    s.write_all(b).await
}

async fn read_frame(r: &mut quinn::RecvStream) -> Option<Bytes> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.ok()?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return None;
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.ok()?;
    Some(Bytes::from(buf))
}

/// Reads length-prefixed frames from a stream into one reused buffer: each
/// frame is a slice of it, so receiving costs no allocation per frame.
struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
}

impl FrameReader {
    fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            buf: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// Whether a whole frame is already buffered (more without waiting).
    fn has_frame(&self) -> bool {
        self.buf.len() >= 4
            && self.buf.len()
                >= 4 + u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize
    }

    /// The next frame, its bytes (with the length prefix) counted as
    /// received from the peer.
    async fn next_counted(&mut self, counters: &PeerCounters) -> Option<Bytes> {
        let f = self.next().await?;
        counters
            .bytes_received
            .fetch_add(4 + f.len() as u64, Ordering::Relaxed);
        Some(f)
    }

    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes(self.buf[..4].try_into().ok()?) as usize;
                if len == 0 || len > MAX_FRAME {
                    return None;
                }
                if self.buf.len() >= 4 + len {
                    let _ = self.buf.split_to(4);
                    return Some(self.buf.split_to(len).freeze());
                }
                self.buf.reserve(4 + len - self.buf.len());
            } else {
                self.buf.reserve(64 * 1024);
            }
            let chunk = self.recv.read_chunk(usize::MAX, true).await.ok()??;
            self.buf.extend_from_slice(&chunk.bytes);
        }
    }
}

/// The peer a link's readers serve: who it is, its buffers, its counters.
#[derive(Clone, Copy)]
struct LinkPeer<'a> {
    peer: &'a NodeId,
    slot: &'a PeerSlot,
    counters: &'a PeerCounters,
}

impl Cluster {
    pub(crate) async fn accept_loop(self) {
        while let Some(incoming) = self.inner.endpoint.accept().await {
            let me = self.clone();
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "incoming QUIC connection failed");
                        return;
                    }
                };
                me.establish(conn, None).await;
            });
        }
    }

    /// The control stream: the peer's data stream id, control frames, acks.
    async fn read_control(&self, recv: quinn::RecvStream, link: LinkPeer<'_>) {
        let LinkPeer { peer, slot, .. } = link;
        let mut reader = FrameReader::new(recv);
        while let Some(f) = reader.next_counted(link.counters).await {
            let (kind, body) = match f.split_first() {
                Some((k, b)) => (*k, f.slice(f.len() - b.len()..)),
                None => return,
            };
            match kind {
                K_CONTROL => {
                    if !self.deliver(link, FrameKind::Control, body).await {
                        return;
                    }
                }
                K_ACK => {
                    let Ok(n) = <[u8; 8]>::try_from(&body[..]).map(u64::from_be_bytes) else {
                        tracing::warn!(peer = %peer, "bad ack from peer, closing link");
                        return;
                    };
                    lock(&slot.out).ack(n);
                    slot.acked.notify_waiters();
                }
                _ => {
                    tracing::warn!(peer = %peer, "bad frame kind from peer, closing link");
                    return;
                }
            }
        }
    }

    /// Hands a peer's frame to the node (counted by kind); false once the
    /// node no longer listens.
    async fn deliver(&self, link: LinkPeer<'_>, kind: FrameKind, frame: Bytes) -> bool {
        link.counters.received(kind).fetch_add(1, Ordering::Relaxed);
        let ev = ClusterEvent::Frame {
            from: link.peer.clone(),
            frame,
        };
        let sent = self.inner.events.send(ev).await.is_ok();
        if sent {
            self.inner.arrivals.handed();
        }
        sent
    }

    /// The data stream: numbered frames, each delivered once; an ack goes
    /// back whenever the read buffer is drained.
    async fn read_data(&self, recv: quinn::RecvStream, link: LinkPeer<'_>) {
        let LinkPeer { peer, slot, .. } = link;
        let mut reader = FrameReader::new(recv);
        while let Some(f) = reader.next_counted(link.counters).await {
            let Some(seq) = f.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
                tracing::warn!(peer = %peer, "bad data frame from peer, closing link");
                return;
            };
            let seq = u64::from_be_bytes(seq);
            let fresh = lock(&slot.inbound).accept(seq);
            if fresh && !self.deliver(link, FrameKind::Data, f.slice(8..)).await {
                return;
            }
            if !reader.has_frame() {
                let acked = lock(&slot.inbound).acked();
                let tx = lock(&slot.control).clone();
                if let Some(tx) = tx {
                    let _ = tx.try_send(tagged(K_ACK, &acked.to_be_bytes()));
                }
            }
        }
    }

    pub(crate) async fn dial(self, node: NodeId, addr: SocketAddr) {
        let conn = match self.inner.endpoint.connect(addr, tls::NODE_SERVER_NAME) {
            Ok(c) => tokio::time::timeout(HELLO_TIMEOUT, c).await,
            Err(e) => {
                tracing::debug!(peer = %node, error = %e, "cannot dial peer");
                lock(&self.inner.dialing).remove(&node);
                return;
            }
        };
        match conn {
            Ok(Ok(conn)) => {
                // Still "dialing" until the link is in place (`establish`
                // clears it then): a slow hello must not start a second
                // connection that would replace this one.
                self.establish(conn, Some(node.clone())).await;
                lock(&self.inner.dialing).remove(&node);
            }
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                tracing::debug!(peer = %node, error = %why, "dialing peer failed");
                // Back off a little before the membership loop tries again.
                tokio::time::sleep(Duration::from_millis(500)).await;
                lock(&self.inner.dialing).remove(&node);
            }
        }
    }
}

/// Writes control frames (already framed) in batches.
async fn write_control(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<Bytes>,
    counters: Arc<PeerCounters>,
) {
    let mut chunks: Vec<Bytes> = Vec::with_capacity(WRITE_BATCH);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(f) = next.take() {
            if f.get(4) == Some(&K_CONTROL) {
                counters
                    .sent(FrameKind::Control)
                    .fetch_add(1, Ordering::Relaxed);
            }
            counters
                .bytes_sent
                .fetch_add(f.len() as u64, Ordering::Relaxed);
            chunks.push(f);
            if chunks.len() < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        let r = send.write_all_chunks(&mut chunks).await;
        chunks.clear();
        if r.is_err() {
            return;
        }
    }
    // Sender dropped (shutdown): finish the stream so the peer reads everything.
    let _ = send.finish();
    let _ = send.stopped().await;
}

/// Writes the peer's held data frames as they come, and again what waited
/// too long for its ack.
async fn write_data(mut send: quinn::SendStream, slot: Arc<PeerSlot>, counters: Arc<PeerCounters>) {
    let mut batch: Vec<(u64, Bytes)> = Vec::with_capacity(WRITE_BATCH);
    let mut chunks: Vec<Bytes> = Vec::with_capacity(WRITE_BATCH * 2);
    let mut heads = BytesMut::with_capacity(WRITE_BATCH * 12);
    let mut check = tokio::time::interval(RETRANSMIT_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        {
            let now = std::time::Instant::now();
            let mut out = lock(&slot.out);
            out.take(now, WRITE_BATCH, &mut batch);
        }
        if batch.is_empty() {
            tokio::select! {
                () = slot.data_ready.notified() => {}
                _ = check.tick() => {
                    lock(&slot.out).retransmit_due(std::time::Instant::now());
                }
            }
            continue;
        }
        for (seq, f) in batch.drain(..) {
            heads.reserve(12);
            heads.extend_from_slice(&((f.len() + 8) as u32).to_be_bytes());
            heads.extend_from_slice(&seq.to_be_bytes());
            chunks.push(heads.split().freeze());
            chunks.push(f);
        }
        counters
            .sent(FrameKind::Data)
            .fetch_add((chunks.len() / 2) as u64, Ordering::Relaxed);
        let bytes: usize = chunks.iter().map(Bytes::len).sum();
        counters
            .bytes_sent
            .fetch_add(bytes as u64, Ordering::Relaxed);
        let r = send.write_all_chunks(&mut chunks).await;
        chunks.clear();
        if r.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trip() {
        let h = hello(&NodeId::new("node-a"), 42, "c1");
        assert_eq!(
            parse_hello(&h),
            Some((NodeId::new("node-a"), 42, "c1".to_string()))
        );
        assert_eq!(parse_hello(b"nope"), None);
        assert_eq!(parse_hello(b"PMH1"), None);
    }

    /// Found by `scripts/fuzz` (target `peer_frame`, fuzz/corpus/peer_frame/
    /// regression-huge-string-length): a 44-byte frame declaring a string of
    /// about 2^48 bytes made bincode allocate it, aborting the node. Decoding
    /// is now limited to 16 MiB (`PeerFrame::decode`, pushmesh-core).
    #[test]
    fn peer_frame_declaring_a_huge_string_is_refused() {
        const FRAME: &[u8] = &[
            0x01, 0x01, 0x05, 0x0a, 0x01, 0x03, 0x20, 0x01, 0x05, 0xfd, 0x61, 0x70, 0x01, 0x01,
            0x00, 0x00, 0x01, 0x00, 0x0c, 0x40, 0x00, 0x00, 0x00, 0x00, 0xfa, 0xff, 0xff, 0xff,
            0xff, 0xff, 0x9c, 0xfc, 0x01, 0x0d, 0x70, 0x72, 0x65, 0x73, 0x75, 0x01, 0xf5, 0x2a,
            0x00, 0xfe,
        ];
        assert!(pushmesh_core::PeerFrame::decode(FRAME).is_err());
    }
}
