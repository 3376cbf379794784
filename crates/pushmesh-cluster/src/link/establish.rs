//! A new link, step by step: the hello exchange, the checks of who the
//! peer is, the data streams' announcements, the link registered (events
//! for the node), the link's loops, and what its end means.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pushmesh_core::peer_buffer::Continuity;
use pushmesh_core::NodeId;
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;

use super::{
    hello, parse_hello, read_frame, write_control, write_data, write_frame, LinkPeer,
    CLOSE_LEAVING, HELLO_TIMEOUT,
};
use crate::codec::{tagged, K_STREAM};
use crate::peers::PeerSlot;
use crate::{lock, tls, Cluster, ClusterEvent, Link, PeerCounters};

/// What the peer said in its hello, and the control streams both ways.
struct Hello {
    control: quinn::SendStream,
    recv: quinn::RecvStream,
    peer: NodeId,
    epoch: u64,
    cluster: String,
}

/// A link whose hello and announcements are done.
struct Opened {
    control: quinn::SendStream,
    recv: quinn::RecvStream,
    data: quinn::SendStream,
    /// The peer's data stream id.
    peer_stream: u64,
}

/// The end-entity certificate the peer presented (verified against the
/// cluster CA by rustls during the handshake).
fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().cloned()
}

impl Cluster {
    /// Refuses a link: counted, logged, connection closed.
    fn refuse(&self, conn: &quinn::Connection, code: u32, why: &'static str) {
        self.inner.links_refused.fetch_add(1, Ordering::Relaxed);
        conn.close(code.into(), why.as_bytes());
    }

    /// Hello exchange, then the link runs until either side goes.
    pub(super) async fn establish(&self, conn: quinn::Connection, expect: Option<NodeId>) {
        // A node that is leaving takes no new link: its peers have already
        // forgotten it (it closed its links as leaving), and a link back to
        // this incarnation would look to both sides like a false death.
        if self.inner.stopping.load(Ordering::Relaxed) {
            conn.close(CLOSE_LEAVING.into(), b"shutdown");
            return;
        }
        let Some(hello) = self.exchange_hello(&conn).await else {
            conn.close(1u32.into(), b"hello failed");
            return;
        };
        if !self.accept_peer(&conn, &hello, expect.as_ref()) {
            return;
        }
        let (peer, epoch) = (hello.peer.clone(), hello.epoch);
        let slot = self.inner.peers.get_or_create(&peer);
        let Some(opened) = announce_streams(&conn, hello, &slot).await else {
            return;
        };
        let (id, rx) = self
            .register(&conn, &peer, epoch, &slot, opened.peer_stream)
            .await;
        let counters = self.counters(&peer);
        counters.links_up.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .inner
            .events
            .send(ClusterEvent::PeerUp {
                node: peer.clone(),
                epoch,
            })
            .await;
        self.run_link(&conn, opened, rx, &peer, &slot, &counters)
            .await;
        // A leaving peer finishes its streams, then closes with its code.
        let reason = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
        let leaving = matches!(
            reason,
            Ok(quinn::ConnectionError::ApplicationClosed(ref c)) if c.error_code == quinn::VarInt::from_u32(CLOSE_LEAVING)
        );
        conn.close(0u32.into(), b"link closed");
        self.link_ended(peer, id, &slot, leaving).await;
    }

    /// Sends this node's hello and reads the peer's, bounded in time.
    async fn exchange_hello(&self, conn: &quinn::Connection) -> Option<Hello> {
        let inner = &self.inner;
        let exchange = async {
            let mut control = conn.open_uni().await.ok()?;
            write_frame(
                &mut control,
                &hello(&inner.node, inner.epoch, &inner.cluster_id),
            )
            .await
            .ok()?;
            let mut recv = conn.accept_uni().await.ok()?;
            let h = read_frame(&mut recv).await?;
            let (peer, epoch, cluster) = parse_hello(&h)?;
            Some(Hello {
                control,
                recv,
                peer,
                epoch,
                cluster,
            })
        };
        tokio::time::timeout(HELLO_TIMEOUT, exchange)
            .await
            .ok()
            .flatten()
    }

    /// Whether the peer is who a link may be with: this cluster, the node
    /// dialed (if any) and not this one, named by its certificate, and no
    /// other incarnation with a live link. A refusal closes the connection.
    fn accept_peer(&self, conn: &quinn::Connection, h: &Hello, expect: Option<&NodeId>) -> bool {
        let inner = &self.inner;
        let (peer, epoch) = (&h.peer, h.epoch);
        let remote = conn.remote_address();
        if h.cluster != inner.cluster_id || expect.is_some_and(|e| e != peer) || *peer == inner.node
        {
            tracing::warn!(peer = %peer, cluster = %h.cluster, %remote, "peer link refused: wrong cluster or node");
            self.refuse(conn, 2, "wrong peer");
            return false;
        }
        // The node id in the hello must be one the peer's certificate names:
        // a node holding a cluster certificate cannot pose as another node.
        let names = peer_certificate(conn).map(|c| tls::certificate_node_names(&c));
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
            self.refuse(conn, 5, "node id not in certificate");
            return false;
        }
        // Another incarnation with this node id while a link to the current
        // one is alive: a second process started with the same `node_id`
        // (or a restart whose old link has not timed out yet, ≤ 3 s). The
        // live link wins; letting them alternate would make this node see
        // its peer restart again and again.
        let live_other = lock(&inner.links)
            .get(peer)
            .is_some_and(|l| l.epoch != epoch && l.conn.close_reason().is_none());
        if live_other {
            tracing::warn!(peer = %peer, epoch, %remote, "peer link refused: another incarnation of this node id has a live link (duplicate node_id, or a restart racing its old link)");
            self.refuse(conn, 6, "node id has a live link");
            return false;
        }
        true
    }

    /// Puts the link in place: continuity of the peer's data stream, the
    /// link table, the control queue; tells the node about a replaced link
    /// and a broken continuity. Returns the link's id and control queue.
    async fn register(
        &self,
        conn: &quinn::Connection,
        peer: &NodeId,
        epoch: u64,
        slot: &PeerSlot,
        peer_stream: u64,
    ) -> (u64, mpsc::Receiver<bytes::Bytes>) {
        let inner = &self.inner;
        let mut continuity = lock(&slot.inbound).link_up(peer_stream);
        if lock(&inner.forgotten).remove(peer) == Some(epoch) {
            // This node declared that incarnation dead while it was alive.
            continuity = Continuity::Broken;
        }
        let id = inner.next_link.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(inner.peer_queue);
        let link = Link {
            id,
            epoch,
            conn: conn.clone(),
        };
        let old = lock(&inner.links).insert(peer.clone(), link);
        lock(&inner.epochs).insert(peer.clone(), epoch);
        lock(&inner.dialing).remove(peer);
        *lock(&slot.control) = Some(tx);
        if let Some(old) = old {
            old.conn.close(3u32.into(), b"replaced");
            let _ = inner
                .events
                .send(ClusterEvent::PeerDown { node: peer.clone() })
                .await;
        }
        tracing::info!(peer = %peer, epoch, remote = %conn.remote_address(), "peer link up");
        if continuity == Continuity::Broken {
            tracing::warn!(peer = %peer, "this node and the peer were declared dead to each other while alive: messages for local subscribers may be lost");
            let ev = ClusterEvent::ContinuityBroken { node: peer.clone() };
            let _ = inner.events.send(ev).await;
        }
        (id, rx)
    }

    /// The link's writers and readers, until a reader ends.
    async fn run_link(
        &self,
        conn: &quinn::Connection,
        opened: Opened,
        rx: mpsc::Receiver<bytes::Bytes>,
        peer: &NodeId,
        slot: &Arc<PeerSlot>,
        counters: &Arc<PeerCounters>,
    ) {
        let link = LinkPeer {
            peer,
            slot,
            counters,
        };
        let control_writer = tokio::spawn(write_control(opened.control, rx, counters.clone()));
        let data_writer = tokio::spawn(write_data(opened.data, slot.clone(), counters.clone()));
        let data_in = async {
            let Ok(s) = conn.accept_uni().await else {
                return;
            };
            self.read_data(s, link).await;
        };
        tokio::select! {
            () = self.read_control(opened.recv, link) => {}
            () = data_in => {}
        }
        control_writer.abort();
        data_writer.abort();
    }

    /// After the link `id` closed: if it is still the peer's link, the peer
    /// is down, or gone when it left.
    async fn link_ended(&self, peer: NodeId, id: u64, slot: &PeerSlot, leaving: bool) {
        let inner = &self.inner;
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
        if !mine {
            return;
        }
        lock(&slot.control).take();
        lock(&slot.out).link_down();
        let ev = if leaving {
            tracing::info!(peer = %peer, "peer left");
            lock(&inner.epochs).remove(&peer);
            self.forget(&peer);
            ClusterEvent::PeerGone { node: peer }
        } else {
            tracing::info!(peer = %peer, "peer link down");
            ClusterEvent::PeerDown { node: peer }
        };
        let _ = inner.events.send(ev).await;
    }
}

/// Announces this side's data stream, opens it, and reads the peer's
/// announcement (before any of its data frames is read).
async fn announce_streams(
    conn: &quinn::Connection,
    hello: Hello,
    slot: &PeerSlot,
) -> Option<Opened> {
    let Hello {
        mut control,
        mut recv,
        epoch,
        ..
    } = hello;
    let stream = {
        let mut out = lock(&slot.out);
        out.link_up(epoch);
        out.stream()
    };
    // Announce this side's data stream first, then open it.
    let Ok(()) = write_frame(&mut control, &tagged(K_STREAM, &stream.to_be_bytes())[4..]).await
    else {
        conn.close(1u32.into(), b"announce failed");
        return None;
    };
    let Ok(data) = conn.open_uni().await else {
        conn.close(1u32.into(), b"data stream failed");
        return None;
    };
    let announced = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut recv))
        .await
        .ok()
        .flatten()
        .and_then(|f| match f.split_first() {
            Some((&K_STREAM, b)) => <[u8; 8]>::try_from(b).ok().map(u64::from_be_bytes),
            _ => None,
        });
    let Some(peer_stream) = announced else {
        conn.close(1u32.into(), b"no stream announcement");
        return None;
    };
    Some(Opened {
        control,
        recv,
        data,
        peer_stream,
    })
}
