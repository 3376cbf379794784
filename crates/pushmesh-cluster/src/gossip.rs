//! Authenticated gossip: chitchat envelopes serialized by chitchat's own
//! codec (made public by the vendored patch, see docs/cluster.md), sealed
//! with ChaCha20-Poly1305 under a key derived from the cluster secret and
//! sent from the one gossip socket. There is no other socket: a datagram
//! that does not open (wrong key, tampered, replayed, too old, unsealed) is
//! dropped and counted, so a host or a local process without the secret can
//! neither join nor inject state.

pub mod seal;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::ChitchatEnvelope;
use hkdf::Hkdf;
use sha2::Sha256;

use crate::identity::PerSenderLimiter;
use seal::{OpenError, Opener, Sealer};

/// A send that takes longer than this is abandoned (counted, reported to chitchat).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Gossip counters.
#[derive(Debug, Default)]
pub struct GossipStats {
    /// Datagrams dropped: not authentic, replayed, too old or new, malformed.
    pub rejected: AtomicU64,
    /// Of `rejected`: authentic but replayed.
    pub replayed: AtomicU64,
    /// Of `rejected`: authentic but with a timestamp too far from our clock.
    pub skewed: AtomicU64,
    /// Datagrams accepted.
    pub accepted: AtomicU64,
    /// Envelopes not sent: too large once sealed, send error or timeout.
    pub send_failed: AtomicU64,
    /// Of `rejected`: failed authentication (wrong cluster secret, tampered).
    pub auth_failed: AtomicU64,
}

/// The gossip key for a cluster secret.
pub fn gossip_key(secret: &str) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(b"pushmesh cluster v1"), secret.as_bytes());
    let mut k = [0u8; 32];
    // 32 bytes is always a valid HKDF-SHA256 output length.
    let _ = hk.expand(b"gossip aead v2", &mut k);
    k
}

/// Milliseconds since the Unix epoch by the system clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A chitchat transport that seals every datagram.
pub struct SealedTransport {
    key: [u8; 32],
    stats: Arc<GossipStats>,
    bound: OnceLock<SocketAddr>,
}

impl SealedTransport {
    /// A transport sealing with `key` and counting into `stats`.
    pub fn new(key: [u8; 32], stats: Arc<GossipStats>) -> Self {
        Self {
            key,
            stats,
            bound: OnceLock::new(),
        }
    }

    /// The address the gossip socket was bound to, once opened.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.bound.get().copied()
    }
}

#[async_trait::async_trait]
impl Transport for SealedTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = tokio::net::UdpSocket::bind(listen_addr)
            .await
            .with_context(|| format!("failed to bind gossip socket {listen_addr}"))?;
        let _ = self.bound.set(socket.local_addr()?);
        Ok(Box::new(SealedSocket {
            socket,
            sealer: Sealer::new(&self.key, rand::random()),
            opener: Opener::new(&self.key),
            buf: vec![0u8; 65_536].into_boxed_slice(),
            plain: Vec::with_capacity(seal::MAX_PLAINTEXT),
            stats: self.stats.clone(),
            auth_log: PerSenderLimiter::default(),
        }))
    }
}

struct SealedSocket {
    socket: tokio::net::UdpSocket,
    sealer: Sealer,
    opener: Opener,
    buf: Box<[u8]>,
    plain: Vec<u8>,
    stats: Arc<GossipStats>,
    auth_log: PerSenderLimiter,
}

impl SealedSocket {
    fn failed(&self) {
        self.stats.send_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts and logs a refused datagram.
    fn refused(&mut self, from: SocketAddr, e: OpenError) {
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        match e {
            OpenError::Replay => {
                self.stats.replayed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%from, "replayed gossip datagram dropped");
            }
            OpenError::TooOld { .. } | OpenError::TooNew { .. } => {
                self.stats.skewed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%from, error = %e, "authentic gossip datagram dropped: check the clocks of the nodes");
            }
            OpenError::TooManySenders => {
                tracing::warn!(%from, error = %e, "gossip datagram dropped");
            }
            OpenError::Auth => {
                self.stats.auth_failed.fetch_add(1, Ordering::Relaxed);
                // At most one line per sender address per 10 s.
                if let Some(suppressed) = self.auth_log.allow(std::time::Instant::now(), from) {
                    tracing::warn!(%from, suppressed, "gossip datagram from {from} failed authentication: wrong cluster secret (or tampered), dropped");
                }
            }
            OpenError::Short | OpenError::Version(_) => {
                tracing::debug!(%from, error = %e, "gossip datagram failed authentication, dropped");
            }
        }
    }
}

#[async_trait::async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        self.plain.clear();
        envelope.serialize(&mut self.plain);
        let sealed = match self.sealer.seal(now_ms(), &self.plain) {
            Ok(d) => d,
            Err(e) => {
                self.failed();
                tracing::warn!(%to, error = %e, "gossip message not sent");
                return Err(e.into());
            }
        };
        match tokio::time::timeout(SEND_TIMEOUT, self.socket.send_to(&sealed, to)).await {
            Ok(Ok(num_bytes_sent)) => Ok(SendOutcome { num_bytes_sent }),
            Ok(Err(e)) => {
                self.failed();
                Err(anyhow::Error::new(e).context(format!("gossip send to {to} failed")))
            }
            Err(_) => {
                self.failed();
                anyhow::bail!("gossip send to {to} timed out after {SEND_TIMEOUT:?}")
            }
        }
    }

    /// Cancel-safe: nothing is awaited once a datagram has been received.
    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let (n, from) = match self.socket.recv_from(&mut self.buf).await {
                Ok(r) => r,
                // ICMP errors of earlier sends surface here; not fatal.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::OutOfMemory
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(anyhow::Error::new(e).context("gossip receive failed")),
            };
            let plain = match self.opener.open(now_ms(), &self.buf[..n]) {
                Ok(p) => p,
                Err(e) => {
                    self.refused(from, e);
                    continue;
                }
            };
            match ChitchatEnvelope::deserialize(&mut plain.as_slice()) {
                Ok(envelope) => {
                    self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    return Ok(RecvOutcome {
                        from_addr: from,
                        envelope,
                        num_bytes_received: n,
                    });
                }
                Err(e) => {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%from, error = %e, "authentic gossip datagram is not a chitchat message, dropped");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
