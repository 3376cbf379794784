//! The client-address header of a trusted proxy: `X-Forwarded-For` or the
//! RFC 7239 `Forwarded` header, one of the two (`forwarded_header`).
//!
//! Only one is read because a client can send either itself: a proxy that
//! appends to `X-Forwarded-For` passes a client's own `Forwarded` through
//! untouched (and the other way round), so reading the header the proxy
//! does not write would let any client name its own address.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use serde::Deserialize;

/// Which header names the client behind a trusted proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, …` (HAProxy `option forwardfor`,
    /// nginx `$proxy_add_x_forwarded_for`).
    #[default]
    XForwardedFor,
    /// `Forwarded: for=client;proto=…, for=proxy1` (RFC 7239; HAProxy
    /// `option forwarded`).
    Forwarded,
}

impl ForwardedHeader {
    /// The header's name, lower case.
    pub fn name(self) -> &'static str {
        match self {
            Self::XForwardedFor => "x-forwarded-for",
            Self::Forwarded => "forwarded",
        }
    }
}

/// The hops of every `Forwarded` field value, in order: the `for=` node of
/// each element, `None` for an element without one. Each is as written
/// (quotes and escapes removed): an address, `unknown` or an obfuscated
/// identifier such as `_hidden`.
pub fn forwarded_hops<'a>(values: impl Iterator<Item = &'a str>) -> Vec<Option<String>> {
    let mut hops = Vec::new();
    for value in values {
        for element in split_outside_quotes(value, ',') {
            if element.trim().is_empty() {
                continue;
            }
            let node = split_outside_quotes(element, ';').find_map(|pair| {
                let (name, v) = pair.split_once('=')?;
                name.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| unquote(v.trim()))
            });
            hops.push(node);
        }
    }
    hops
}

/// Splits at `sep` where it is not inside a quoted string.
fn split_outside_quotes(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            parts.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    parts.push(&s[start..]);
    parts.into_iter()
}

/// A token or a quoted-string (RFC 7230 §3.2.6) without its quoting.
fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        None => v.to_owned(),
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        out.push(n);
                    }
                } else {
                    out.push(c);
                }
            }
            out
        }
    }
}

/// A node as an address: `192.0.2.43`, `192.0.2.43:47011`, `[2001:db8::1]`,
/// `[2001:db8::1]:4711` (and, from `X-Forwarded-For`, a bare `2001:db8::1`).
/// `unknown` and obfuscated identifiers are not addresses.
pub fn node_ip(node: &str) -> Option<IpAddr> {
    let node = node.trim();
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = node.parse::<SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    node.strip_prefix('[')
        .and_then(|h| h.split_once(']'))
        .filter(|(_, port)| port.is_empty() || port.starts_with(':'))
        .and_then(|(h, _)| h.parse::<Ipv6Addr>().ok())
        .map(|ip| IpAddr::V6(ip).to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hops(values: &[&str]) -> Vec<Option<String>> {
        forwarded_hops(values.iter().copied())
    }

    #[test]
    fn rfc_7239_examples() {
        // §4: the examples of the `Forwarded` header.
        assert_eq!(hops(&["for=\"_gazonk\""]), vec![Some("_gazonk".to_owned())]);
        assert_eq!(
            hops(&["For=\"[2001:db8:cafe::17]:4711\""]),
            vec![Some("[2001:db8:cafe::17]:4711".to_owned())]
        );
        assert_eq!(
            hops(&["for=192.0.2.60;proto=http;by=203.0.113.43"]),
            vec![Some("192.0.2.60".to_owned())]
        );
        assert_eq!(
            hops(&["for=192.0.2.43, for=198.51.100.17"]),
            vec![
                Some("192.0.2.43".to_owned()),
                Some("198.51.100.17".to_owned())
            ]
        );
        // §7.1: several fields are one list, in order.
        assert_eq!(
            hops(&["for=192.0.2.43", "for=\"[2001:db8:cafe::17]\", for=unknown"]),
            vec![
                Some("192.0.2.43".to_owned()),
                Some("[2001:db8:cafe::17]".to_owned()),
                Some("unknown".to_owned())
            ]
        );
        // An element without `for` is a hop whose client is not said.
        assert_eq!(
            hops(&["proto=https;by=10.0.0.1, for=192.0.2.1"]),
            vec![None, Some("192.0.2.1".to_owned())]
        );
        // Separators and escapes inside a quoted string are text.
        assert_eq!(
            hops(&["for=\"_a,b;c\\\"d\";by=x"]),
            vec![Some("_a,b;c\"d".to_owned())]
        );
    }

    #[test]
    fn nodes_as_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().ok();
        assert_eq!(node_ip("192.0.2.43"), ip("192.0.2.43"));
        assert_eq!(node_ip("192.0.2.43:47011"), ip("192.0.2.43"));
        assert_eq!(node_ip("[2001:db8:cafe::17]:4711"), ip("2001:db8:cafe::17"));
        assert_eq!(node_ip("[2001:db8:cafe::17]"), ip("2001:db8:cafe::17"));
        assert_eq!(
            node_ip("[2001:db8:cafe::17]:_port"),
            ip("2001:db8:cafe::17")
        );
        assert_eq!(node_ip("[::ffff:192.0.2.1]"), ip("192.0.2.1"));
        assert_eq!(node_ip("unknown"), None);
        assert_eq!(node_ip("_gazonk"), None);
        assert_eq!(node_ip("[2001:db8::1]junk"), None);
        assert_eq!(node_ip(""), None);
    }
}
