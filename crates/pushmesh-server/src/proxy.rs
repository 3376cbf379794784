//! The real client address behind a load balancer: trusted proxy ranges,
//! the PROXY protocol (v1 text and v2 binary, HAProxy's `send-proxy` /
//! `send-proxy-v2`) and `X-Forwarded-For` or `Forwarded` (see
//! [`crate::forwarded`]).
//!
//! Only peers inside `trusted_proxies` are believed. A PROXY header is read
//! from them when `proxy_protocol` is on and the connection starts with one;
//! The forwarding header (`forwarded_header`) is read when the address of the connection (after any
//! PROXY header) is trusted, and the client is the right-most untrusted
//! address of the chain.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use axum::http::HeaderMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The PROXY protocol v2 signature.
const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The PROXY protocol v1 prefix.
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// Longest v1 line, CRLF included (spec §2.1).
const V1_MAX: usize = 107;

/// An address range, `10.0.0.0/8` or `::1/128` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    /// Whether `ip` is in the range (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// A text that is not an address range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address range {0:?}: expected e.g. 10.0.0.0/8 or ::1/128")]
pub struct CidrError(pub String);

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        let bad = || CidrError(s.to_string());
        let (addr, bits) = match s.trim().split_once('/') {
            Some((a, b)) => (a, Some(b.parse::<u8>().map_err(|_| bad())?)),
            None => (s.trim(), None),
        };
        let net = addr.parse::<IpAddr>().map_err(|_| bad())?.to_canonical();
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        if bits > max {
            return Err(bad());
        }
        Ok(Self { net, bits })
    }
}

impl TryFrom<String> for Cidr {
    type Error = CidrError;
    fn try_from(s: String) -> Result<Self, CidrError> {
        s.parse()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.bits)
    }
}

/// The proxies whose PROXY headers and `X-Forwarded-For` are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(pub Vec<Cidr>);

impl TrustedProxies {
    /// Whether `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The client of a request that reached us from `peer`: the right-most
    /// address of `X-Forwarded-For` + `peer` that is not a trusted proxy
    /// (the left-most if all are trusted). An entry that is not an address
    /// ends the walk: the last trusted hop is the best we know.
    pub fn client_ip(
        &self,
        peer: IpAddr,
        headers: &HeaderMap,
        header: crate::forwarded::ForwardedHeader,
    ) -> IpAddr {
        use crate::forwarded::{forwarded_hops, node_ip, ForwardedHeader};
        if !self.contains(peer) {
            return peer;
        }
        let values = headers
            .get_all(header.name())
            .iter()
            .filter_map(|v| v.to_str().ok());
        let hops: Vec<Option<IpAddr>> = match header {
            ForwardedHeader::XForwardedFor => {
                values.flat_map(|v| v.split(',')).map(node_ip).collect()
            }
            ForwardedHeader::Forwarded => forwarded_hops(values)
                .iter()
                .map(|n| n.as_deref().and_then(node_ip))
                .collect(),
        };
        let mut client = peer;
        for hop in hops.iter().rev() {
            // `unknown`, an obfuscated name or garbage: the nearest proxy
            // that said something believable is the client.
            let Some(ip) = *hop else {
                return client;
            };
            client = ip;
            if !self.contains(ip) {
                return ip;
            }
        }
        client
    }
}

/// What a connection from a trusted proxy started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preamble {
    /// No PROXY header: plain HTTP (or TLS) from the proxy itself.
    None,
    /// The proxy's own connection (v2 `LOCAL`, v1 `UNKNOWN`, a non-IP
    /// family): e.g. a health check. The peer address stands.
    Local,
    /// A proxied connection from this client address.
    Proxied(SocketAddr),
}

/// A malformed PROXY header.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The header does not follow the specification.
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    /// The connection ended or failed before the header was complete.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
}

/// The result of looking at the first bytes of a connection.
#[derive(Debug, PartialEq, Eq)]
enum Parse {
    Incomplete,
    Done(Preamble, usize),
}

fn parse(buf: &[u8]) -> Result<Parse, ProxyError> {
    let is_prefix = |sig: &[u8]| buf[..buf.len().min(sig.len())] == sig[..buf.len().min(sig.len())];
    if buf.is_empty() {
        return Ok(Parse::Incomplete);
    }
    if is_prefix(V2_SIG) {
        return parse_v2(buf);
    }
    if is_prefix(V1_PREFIX) {
        return parse_v1(buf);
    }
    Ok(Parse::Done(Preamble::None, 0))
}

fn parse_v1(buf: &[u8]) -> Result<Parse, ProxyError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::Malformed("v1 line longer than 107 bytes"))
        } else {
            Ok(Parse::Incomplete)
        };
    };
    if end + 2 > V1_MAX {
        return Err(ProxyError::Malformed("v1 line longer than 107 bytes"));
    }
    let line = std::str::from_utf8(&buf[V1_PREFIX.len()..end])
        .map_err(|_| ProxyError::Malformed("v1 line is not ASCII"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let preamble = match parts.as_slice() {
        ["UNKNOWN", ..] => Preamble::Local,
        [fam @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| ProxyError::Malformed("v1 source address"))?;
            if ip.is_ipv4() != (*fam == "TCP4") {
                return Err(ProxyError::Malformed("v1 address family mismatch"));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| ProxyError::Malformed("v1 source port"))?;
            Preamble::Proxied(SocketAddr::new(ip, port))
        }
        _ => return Err(ProxyError::Malformed("v1 line")),
    };
    Ok(Parse::Done(preamble, end + 2))
}

fn parse_v2(buf: &[u8]) -> Result<Parse, ProxyError> {
    if buf.len() < 16 {
        return Ok(Parse::Incomplete);
    }
    let (ver_cmd, fam) = (buf[12], buf[13]);
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Malformed("v2 version"));
    }
    if buf.len() < 16 + len {
        return Ok(Parse::Incomplete);
    }
    let body = &buf[16..16 + len];
    let preamble = match (ver_cmd & 0xf, fam >> 4) {
        (0, _) => Preamble::Local,
        (1, 1) if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let port = u16::from_be_bytes([body[8], body[9]]);
            Preamble::Proxied(SocketAddr::new(IpAddr::V4(ip), port))
        }
        (1, 2) if body.len() >= 36 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&body[..16]);
            let port = u16::from_be_bytes([body[32], body[33]]);
            Preamble::Proxied(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port))
        }
        (1, 1 | 2) => return Err(ProxyError::Malformed("v2 address block too short")),
        // UNSPEC or UNIX: nothing we can use, the peer address stands.
        (1, _) => Preamble::Local,
        _ => return Err(ProxyError::Malformed("v2 command")),
    };
    Ok(Parse::Done(preamble, 16 + len))
}

/// Reads a PROXY header if the stream starts with one; returns it and the
/// bytes read past it (to be replayed with [`Prefixed`]).
pub async fn read_preamble<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(Preamble, Vec<u8>), ProxyError> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        if let Parse::Done(p, used) = parse(&buf)? {
            buf.drain(..used);
            return Ok((p, buf));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(ProxyError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A stream whose first bytes were already read: they are read again first.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `prefix`, then the rest of `inner`.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forwarded::ForwardedHeader;

    fn cidrs(list: &[&str]) -> TrustedProxies {
        TrustedProxies(
            list.iter()
                .map(|s| s.parse().unwrap_or_else(|e| panic!("{e}")))
                .collect(),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    const XFF: ForwardedHeader = ForwardedHeader::XForwardedFor;

    fn headers(name: &'static str, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(name, v.parse().unwrap_or_else(|e| panic!("{e}")));
        }
        h
    }

    #[test]
    fn forwarded_takes_the_rightmost_untrusted() {
        let t = cidrs(&["10.0.0.0/8", "2001:db8:aaaa::/48"]);
        let fwd = ForwardedHeader::Forwarded;
        let h = headers(
            "forwarded",
            &[
                "for=6.6.6.6, for=192.0.2.60;proto=http;by=203.0.113.43",
                "for=10.0.0.9",
            ],
        );
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h, fwd), ip("192.0.2.60"));
        assert_eq!(
            t.client_ip(ip("9.9.9.9"), &h, fwd),
            ip("9.9.9.9"),
            "untrusted peer: header ignored"
        );
        assert_eq!(
            t.client_ip(ip("10.0.0.1"), &h, XFF),
            ip("10.0.0.1"),
            "not the configured header: ignored"
        );
        let h = headers("forwarded", &["For=\"[2001:db8:cafe::17]:4711\""]);
        assert_eq!(
            t.client_ip(ip("10.0.0.1"), &h, fwd),
            ip("2001:db8:cafe::17")
        );
        let h = headers(
            "forwarded",
            &["for=\"[2001:db8:cafe::17]\", for=\"[2001:db8:aaaa::1]:80\""],
        );
        assert_eq!(
            t.client_ip(ip("10.0.0.1"), &h, fwd),
            ip("2001:db8:cafe::17"),
            "a trusted IPv6 hop is skipped"
        );
        // An obfuscated or unknown client: the nearest proxy is the client.
        let h = headers("forwarded", &["for=\"_gazonk\", for=10.0.0.7"]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h, fwd), ip("10.0.0.7"));
        let h = headers("forwarded", &["for=unknown"]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h, fwd), ip("10.0.0.1"));
        let h = headers("forwarded", &["proto=https"]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h, fwd), ip("10.0.0.1"));
        let h = headers("x-forwarded-for", &["1.2.3.4"]);
        assert_eq!(
            t.client_ip(ip("10.0.0.1"), &h, fwd),
            ip("10.0.0.1"),
            "X-Forwarded-For is not read when Forwarded is the header"
        );
    }

    #[test]
    fn ranges() {
        let t = cidrs(&["10.0.0.0/8", "127.0.0.1", "fd00::/8"]);
        assert!(t.contains(ip("10.200.1.2")));
        assert!(!t.contains(ip("11.0.0.1")));
        assert!(t.contains(ip("127.0.0.1")) && !t.contains(ip("127.0.0.2")));
        assert!(t.contains(ip("::ffff:10.1.1.1")), "mapped v4 counts as v4");
        assert!(t.contains(ip("fd12::1")) && !t.contains(ip("fe80::1")));
        assert!("0.0.0.0/0"
            .parse::<Cidr>()
            .is_ok_and(|c| c.contains(ip("8.8.8.8"))));
        for bad in ["10.0.0.0/33", "nope", "10.0.0/8", "::/129", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_takes_the_rightmost_untrusted() {
        let t = cidrs(&["10.0.0.0/8"]);
        let spoofed = headers("x-forwarded-for", &["6.6.6.6, 1.2.3.4", "10.0.0.9"]);
        let garbage = headers("x-forwarded-for", &["[2001:db8::1]:443, garbage, 10.1.1.1"]);
        let v6 = headers("x-forwarded-for", &["[2001:db8::1]:443"]);
        let none = HeaderMap::new();
        for (peer, h, want, why) in [
            ("10.0.0.1", &spoofed, "1.2.3.4", "spoofed left part ignored"),
            (
                "9.9.9.9",
                &spoofed,
                "9.9.9.9",
                "untrusted peer: header ignored",
            ),
            ("10.0.0.1", &garbage, "10.1.1.1", "stops at garbage"),
            ("10.0.0.1", &v6, "2001:db8::1", "bracketed IPv6 with a port"),
            ("10.0.0.1", &none, "10.0.0.1", "no header: the peer"),
        ] {
            assert_eq!(t.client_ip(ip(peer), h, XFF), ip(want), "{why}");
        }
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut v = V2_SIG.to_vec();
        v.extend_from_slice(&[0x20 | cmd, fam]);
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn v2_headers() {
        let mut b = v2(1, 0x11, &[1, 2, 3, 4, 10, 0, 0, 1, 0x30, 0x39, 0, 80]);
        let n = b.len();
        b.extend_from_slice(b"GET /");
        let Ok(Parse::Done(p, used)) = parse(&b) else {
            panic!("not parsed")
        };
        assert_eq!(
            p,
            Preamble::Proxied("1.2.3.4:12345".parse().unwrap_or_else(|e| panic!("{e}")))
        );
        assert_eq!(used, n);
        assert!(matches!(parse(&b[..15]), Ok(Parse::Incomplete)));
        assert!(matches!(parse(&b[..n - 1]), Ok(Parse::Incomplete)));
        let mut six = vec![0u8; 36];
        six[15] = 1;
        six[32..34].copy_from_slice(&443u16.to_be_bytes());
        assert!(
            matches!(parse(&v2(1, 0x21, &six)), Ok(Parse::Done(Preamble::Proxied(a), 52)) if a.to_string() == "[::1]:443")
        );
        assert!(matches!(
            parse(&v2(0, 0, &[])),
            Ok(Parse::Done(Preamble::Local, 16))
        ));
        assert!(parse(&v2(1, 0x11, &[1, 2, 3])).is_err());
        let mut bad = v2(1, 0x11, &[0; 12]);
        bad[12] = 0x11;
        assert!(parse(&bad).is_err());
    }

    #[test]
    fn v1_headers_and_plain_http() {
        let b = b"PROXY TCP4 192.0.2.7 10.0.0.1 5000 6001\r\nGET / HTTP/1.1\r\n";
        let Ok(Parse::Done(p, used)) = parse(b) else {
            panic!("not parsed")
        };
        assert_eq!(
            p,
            Preamble::Proxied("192.0.2.7:5000".parse().unwrap_or_else(|e| panic!("{e}")))
        );
        assert_eq!(&b[used..], b"GET / HTTP/1.1\r\n");
        assert!(matches!(
            parse(b"PROXY UNKNOWN\r\n"),
            Ok(Parse::Done(Preamble::Local, 15))
        ));
        assert!(matches!(parse(b"PROXY TCP4 1.2"), Ok(Parse::Incomplete)));
        assert!(parse(b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n").is_err());
        assert!(parse(&[b'P'; 200]).is_ok_and(|p| p == Parse::Done(Preamble::None, 0)));
        assert!(parse(&[b"PROXY ".as_slice(), &[b'x'; 200]].concat()).is_err());
        assert_eq!(
            parse(b"GET / HTTP/1.1").ok(),
            Some(Parse::Done(Preamble::None, 0))
        );
        assert_eq!(
            parse(b"\x16\x03\x01").ok(),
            Some(Parse::Done(Preamble::None, 0)),
            "TLS"
        );
    }

    #[tokio::test]
    async fn reads_and_replays() {
        let mut input = v2(1, 0x11, &[1, 2, 3, 4, 10, 0, 0, 1, 0, 1, 0, 2]);
        input.extend_from_slice(b"hello");
        let mut r = &input[..];
        let (p, rest) = read_preamble(&mut r)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(p, Preamble::Proxied(a) if a.ip() == ip("1.2.3.4")));
        let mut out = String::new();
        Prefixed::new(rest, r)
            .read_to_string(&mut out)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out, "hello");
        let mut short = &b"PROXY TCP4"[..];
        assert!(
            read_preamble(&mut short).await.is_err(),
            "eof inside a header"
        );
    }
}
