//! Authenticated gossip: chitchat's datagrams sealed with ChaCha20-Poly1305
//! under a key derived from the cluster secret. A datagram that does not
//! open (wrong key, tampered, replayed garbage) is dropped and counted, so a
//! host without the secret can neither join nor inject state.
//!
//! chitchat 0.13 serializes its messages only inside its own UDP socket, so
//! [`SealedTransport`] keeps one such socket on loopback as a codec: a
//! message to send is written by it to a private loopback socket, sealed and
//! sent from the public one; an opened datagram is handed to it through
//! loopback to be parsed.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket};
use chitchat::ChitchatEnvelope;
use hkdf::Hkdf;
use sha2::Sha256;

/// Largest datagram.
const MAX_DATAGRAM: usize = 65_507;
/// Nonce length.
const NONCE: usize = 12;

/// Gossip counters.
#[derive(Debug, Default)]
pub struct GossipStats {
    /// Datagrams dropped because they did not authenticate.
    pub rejected: AtomicU64,
    /// Datagrams accepted.
    pub accepted: AtomicU64,
}

/// The gossip key for a cluster secret.
pub fn gossip_key(secret: &str) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(b"pushmesh cluster v1"), secret.as_bytes());
    let mut k = [0u8; 32];
    let _ = hk.expand(b"gossip aead", &mut k);
    k
}

/// A chitchat transport that seals every datagram.
pub struct SealedTransport {
    key: [u8; 32],
    stats: Arc<GossipStats>,
}

impl SealedTransport {
    /// A transport sealing with `key` and counting into `stats`.
    pub fn new(key: [u8; 32], stats: Arc<GossipStats>) -> Self {
        Self { key, stats }
    }
}

#[async_trait::async_trait]
impl Transport for SealedTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let outer = tokio::net::UdpSocket::bind(listen_addr)
            .await
            .with_context(|| format!("failed to bind gossip socket {listen_addr}"))?;
        let lo = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let codec = UdpSocket::open(lo).await?;
        let codec_addr = codec.local_addr()?;
        let relay = tokio::net::UdpSocket::bind(lo)
            .await
            .context("failed to bind gossip loopback relay")?;
        let relay_addr = relay.local_addr()?;
        Ok(Box::new(SealedSocket {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&self.key)),
            outer,
            codec: Box::new(codec),
            codec_addr,
            relay,
            relay_addr,
            pending_from: VecDeque::new(),
            buf: vec![0u8; MAX_DATAGRAM],
            stats: self.stats.clone(),
        }))
    }
}

struct SealedSocket {
    cipher: ChaCha20Poly1305,
    outer: tokio::net::UdpSocket,
    codec: Box<dyn Socket>,
    codec_addr: SocketAddr,
    relay: tokio::net::UdpSocket,
    relay_addr: SocketAddr,
    /// Senders of plaintexts handed to the codec, in order.
    pending_from: VecDeque<SocketAddr>,
    buf: Vec<u8>,
    stats: Arc<GossipStats>,
}

#[async_trait::async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.outer.local_addr()?)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        self.codec.send(self.relay_addr, envelope).await?;
        let n = loop {
            let (n, from) = self.relay.recv_from(&mut self.buf).await?;
            if from == self.codec_addr {
                break n;
            }
        };
        let nonce: [u8; NONCE] = rand::random();
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), &self.buf[..n])
            .map_err(|_| anyhow::anyhow!("gossip seal failed"))?;
        let mut out = Vec::with_capacity(NONCE + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        let num_bytes_sent = self.outer.send_to(&out, to).await?;
        Ok(SendOutcome { num_bytes_sent })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            if self.pending_from.is_empty() {
                let (n, from) = match self.outer.recv_from(&mut self.buf).await {
                    Ok(r) => r,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => return Err(e.into()),
                };
                let plain = if n > NONCE {
                    self.cipher
                        .decrypt(Nonce::from_slice(&self.buf[..NONCE]), &self.buf[NONCE..n])
                        .ok()
                } else {
                    None
                };
                let Some(plain) = plain else {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%from, "gossip datagram failed authentication, dropped");
                    continue;
                };
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                self.relay.send_to(&plain, self.codec_addr).await?;
                self.pending_from.push_back(from);
            }
            // The codec parses what was handed to it; bounded in case it
            // silently dropped an unparsable datagram.
            match tokio::time::timeout(Duration::from_millis(200), self.codec.recv()).await {
                Ok(Ok(mut outcome)) => {
                    if let Some(from) = self.pending_from.pop_front() {
                        outcome.from_addr = from;
                        return Ok(outcome);
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    self.pending_from.pop_front();
                }
            }
        }
    }
}
