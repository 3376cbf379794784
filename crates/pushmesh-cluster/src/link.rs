//! Peer links: the hello exchange on a new QUIC connection (with the check
//! that the peer's certificate names the node id it claims), the
//! length-delimited frame codec, and the read and write loops of a link.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pushmesh_core::{FrameKind, NodeId};
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;

use crate::{lock, tls, Cluster, ClusterEvent, Link, PeerCounters};

/// Largest frame accepted from a peer.
const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Frames written before one flush of the stream.
const WRITE_BATCH: usize = 512;
/// How long the hello exchange may take.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

fn kind_byte(k: FrameKind) -> u8 {
    match k {
        FrameKind::Data => 0,
        FrameKind::Control => 1,
    }
}

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

/// The end-entity certificate the peer presented (verified against the
/// cluster CA by rustls during the handshake).
fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().cloned()
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

    /// Refuses a link: counted, logged, connection closed.
    fn refuse(&self, conn: &quinn::Connection, code: u32, why: &'static str) {
        self.inner.links_refused.fetch_add(1, Ordering::Relaxed);
        conn.close(code.into(), why.as_bytes());
    }

    /// Hello exchange, then the link runs until either side goes.
    async fn establish(&self, conn: quinn::Connection, expect: Option<NodeId>) {
        let inner = &self.inner;
        let exchange = async {
            let mut send = conn.open_uni().await.ok()?;
            write_frame(
                &mut send,
                &hello(&inner.node, inner.epoch, &inner.cluster_id),
            )
            .await
            .ok()?;
            let mut recv = conn.accept_uni().await.ok()?;
            let h = read_frame(&mut recv).await?;
            Some((send, recv, parse_hello(&h)?))
        };
        let Ok(Some((send, recv, (peer, epoch, cluster)))) =
            tokio::time::timeout(HELLO_TIMEOUT, exchange).await
        else {
            conn.close(1u32.into(), b"hello failed");
            return;
        };
        let remote = conn.remote_address();
        if cluster != inner.cluster_id
            || expect.as_ref().is_some_and(|e| *e != peer)
            || peer == inner.node
        {
            tracing::warn!(peer = %peer, cluster = %cluster, %remote, "peer link refused: wrong cluster or node");
            self.refuse(&conn, 2, "wrong peer");
            return;
        }
        // The node id in the hello must be one the peer's certificate names:
        // a node holding a cluster certificate cannot pose as another node.
        let names = peer_certificate(&conn).map(|c| tls::certificate_node_names(&c));
        if !names
            .as_ref()
            .is_some_and(|n| tls::names_node(n, peer.as_str()))
        {
            tracing::warn!(
                peer = %peer,
                %remote,
                certificate_names = ?names.unwrap_or_default(),
                "peer link refused: its certificate does not name the node id of its hello"
            );
            self.refuse(&conn, 5, "node id not in certificate");
            return;
        }
        let id = inner.next_link.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(inner.peer_queue);
        let old = lock(&inner.links).insert(
            peer.clone(),
            Link {
                id,
                tx,
                conn: conn.clone(),
            },
        );
        if let Some(old) = old {
            old.conn.close(3u32.into(), b"replaced");
            let _ = inner
                .events
                .send(ClusterEvent::PeerDown { node: peer.clone() })
                .await;
        }
        tracing::info!(peer = %peer, epoch, %remote, "peer link up");
        let _ = inner
            .events
            .send(ClusterEvent::PeerUp {
                node: peer.clone(),
                epoch,
            })
            .await;
        let counters = self.counters(&peer);
        let writer = tokio::spawn(write_loop(send, rx, counters.clone()));
        self.read_loop(recv, &peer, &counters).await;
        writer.abort();
        conn.close(0u32.into(), b"link closed");
        let mine = {
            let mut links = lock(&inner.links);
            match links.get(&peer) {
                Some(l) if l.id == id => {
                    links.remove(&peer);
                    true
                }
                _ => false,
            }
        };
        if mine {
            tracing::info!(peer = %peer, "peer link down");
            let _ = inner
                .events
                .send(ClusterEvent::PeerDown { node: peer })
                .await;
        }
    }

    async fn read_loop(&self, recv: quinn::RecvStream, peer: &NodeId, counters: &PeerCounters) {
        let mut reader = FrameReader::new(recv);
        while let Some(f) = reader.next().await {
            let kind = match f.first() {
                Some(0) => FrameKind::Data,
                Some(1) => FrameKind::Control,
                _ => {
                    tracing::warn!(peer = %peer, "bad frame kind from peer, closing link");
                    return;
                }
            };
            counters.received(kind).fetch_add(1, Ordering::Relaxed);
            let frame = f.slice(1..);
            if self
                .inner
                .events
                .send(ClusterEvent::Frame {
                    from: peer.clone(),
                    frame,
                })
                .await
                .is_err()
            {
                return;
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
                lock(&self.inner.dialing).remove(&node);
                self.establish(conn, Some(node)).await;
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

async fn write_loop(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<(FrameKind, Bytes)>,
    counters: Arc<PeerCounters>,
) {
    let mut chunks: Vec<Bytes> = Vec::with_capacity(WRITE_BATCH * 2);
    let mut heads = BytesMut::with_capacity(WRITE_BATCH * 5);
    while let Some(first) = rx.recv().await {
        // Headers go into one reused buffer; the frames themselves are
        // handed to QUIC as they are (shared `Bytes`, never copied here).
        let mut next = Some(first);
        let mut n = 0;
        while let Some((k, f)) = next.take() {
            heads.reserve(5);
            heads.extend_from_slice(&((f.len() + 1) as u32).to_be_bytes());
            heads.extend_from_slice(&[kind_byte(k)]);
            chunks.push(heads.split().freeze());
            chunks.push(f);
            counters.sent(k).fetch_add(1, Ordering::Relaxed);
            n += 1;
            if n < WRITE_BATCH {
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
