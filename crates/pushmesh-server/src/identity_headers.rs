//! Identity set by the load balancer (issue #13): user, device and zone
//! read from HTTP headers named in `[identity_headers]`, believed only on
//! connections whose peer (the TCP peer, before any PROXY header or
//! `X-Forwarded-For`) is in `trusted_proxies`. From anyone else they are
//! ignored and counted. Values are never logged.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{HeaderMap, HeaderName};
use pushmesh_core::session::Identity;
use serde::Deserialize;

/// `[identity_headers]`: the header that carries each attribute.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityHeaders {
    /// The user id (the connection is signed in as this user).
    #[serde(default)]
    pub user: Option<String>,
    /// The device.
    #[serde(default)]
    pub device: Option<String>,
    /// The zone.
    #[serde(default)]
    pub zone: Option<String>,
}

/// Why `[identity_headers]` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityHeadersError {
    /// A configured name is not a valid HTTP header name.
    #[error("identity_headers: {0:?} is not a header name")]
    NotAHeaderName(String),
    /// Headers are configured but no proxy is trusted to set them.
    #[error("identity_headers needs trusted_proxies: the headers are believed only from them")]
    NoTrustedProxies,
}

/// Request extension set by the edge: whether the TCP peer of the
/// connection is a trusted proxy.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerTrusted(pub bool);

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct IdentityStats {
    /// Connections that got an identity from the headers.
    pub honoured: AtomicU64,
    /// Connections whose identity headers came from an untrusted peer.
    pub ignored: AtomicU64,
}

impl IdentityHeaders {
    /// Whether any header is configured.
    pub fn is_on(&self) -> bool {
        self.user.is_some() || self.device.is_some() || self.zone.is_some()
    }

    /// Checks the configuration: valid header names, and trusted proxies to
    /// believe them from.
    pub fn check(&self, trusted_proxies: bool) -> Result<(), IdentityHeadersError> {
        for h in [&self.user, &self.device, &self.zone].into_iter().flatten() {
            if HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(IdentityHeadersError::NotAHeaderName(h.clone()));
            }
        }
        if self.is_on() && !trusted_proxies {
            return Err(IdentityHeadersError::NoTrustedProxies);
        }
        Ok(())
    }

    /// Whether `name` is one of the configured identity headers (any case).
    /// Such a header from an untrusted peer is a client's claim, not the
    /// balancer's: it is not passed on (e.g. to a wsify authorizer).
    pub fn names(&self, name: &str) -> bool {
        [&self.user, &self.device, &self.zone]
            .into_iter()
            .flatten()
            .any(|h| h.eq_ignore_ascii_case(name))
    }

    /// The identity of a connection from its upgrade request's headers;
    /// `None` without identity headers, or from an untrusted peer (counted).
    pub fn read(
        &self,
        trusted: bool,
        headers: &HeaderMap,
        stats: &IdentityStats,
    ) -> Option<Identity> {
        if !self.is_on() {
            return None;
        }
        let get = |name: &Option<String>| -> Option<String> {
            let v = headers.get(name.as_deref()?)?;
            // Not visible ASCII: taken as absent.
            v.to_str()
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        let id = Identity {
            user: get(&self.user),
            device: get(&self.device),
            zone: get(&self.zone),
        };
        if id == Identity::default() {
            return None;
        }
        if !trusted {
            stats.ignored.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("identity headers from an untrusted peer ignored");
            return None;
        }
        stats.honoured.fetch_add(1, Ordering::Relaxed);
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn cfg() -> IdentityHeaders {
        IdentityHeaders {
            user: Some("X-User-Id".into()),
            device: Some("X-Device".into()),
            zone: None,
        }
    }

    #[test]
    fn headers_are_believed_from_trusted_peers_only() {
        let mut h = HeaderMap::new();
        h.insert("x-user-id", HeaderValue::from_static("u1"));
        h.insert("x-device", HeaderValue::from_static("phone"));
        let stats = IdentityStats::default();
        let id = cfg().read(true, &h, &stats);
        assert_eq!(
            id,
            Some(Identity {
                user: Some("u1".into()),
                device: Some("phone".into()),
                zone: None
            })
        );
        assert_eq!(cfg().read(false, &h, &stats), None);
        assert_eq!(stats.ignored.load(Ordering::Relaxed), 1);
        assert_eq!(stats.honoured.load(Ordering::Relaxed), 1);
        // No header at all: nothing to count.
        assert_eq!(cfg().read(false, &HeaderMap::new(), &stats), None);
        assert_eq!(stats.ignored.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn configured_names_are_recognised_in_any_case() {
        assert!(cfg().names("x-user-id"));
        assert!(cfg().names("X-DEVICE"));
        assert!(!cfg().names("x-zone"));
        assert!(!cfg().names("cookie"));
        assert!(!IdentityHeaders::default().names("x-user-id"));
    }

    #[test]
    fn the_configuration_is_checked() {
        assert!(cfg().check(true).is_ok());
        assert!(cfg().check(false).is_err());
        let bad = IdentityHeaders {
            user: Some("X User".into()),
            ..IdentityHeaders::default()
        };
        assert!(bad.check(true).is_err());
        assert!(IdentityHeaders::default().check(false).is_ok());
    }
}
