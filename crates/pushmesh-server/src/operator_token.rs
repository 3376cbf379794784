//! Operators' tokens (the admin API's and the status page's): read from
//! `Authorization: Bearer`, compared in constant time, and wrong ones
//! limited per client address (`Shared::admin_failures`: after 10
//! failures, one attempt a second).

use std::net::IpAddr;
use std::time::Instant;

use axum::http::{header, HeaderMap};
use pushmesh_protocol::sign;

use crate::limits::RateLimiter;

/// What a presented token turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// The right one.
    Accepted,
    /// None was presented (not counted as a failure).
    Missing,
    /// A wrong one (counted).
    Wrong,
    /// The address failed too often; the token was not looked at.
    Limited,
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Checks `given` against `expected` for a client at `ip`.
pub fn check(
    failures: &RateLimiter<IpAddr>,
    ip: IpAddr,
    given: Option<&str>,
    expected: &str,
) -> Checked {
    let now = Instant::now();
    if !failures.has_token(&ip, now) {
        return Checked::Limited;
    }
    match given {
        None => Checked::Missing,
        Some(g) if sign::constant_time_eq(g.as_bytes(), expected.as_bytes()) => Checked::Accepted,
        Some(_) => {
            failures.allow(&ip, now);
            Checked::Wrong
        }
    }
}
