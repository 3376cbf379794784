//! Signed requests: an HTTP API query string split and percent-decoded the
//! way the server does (`crates/pushmesh-server/src/api.rs`, `parse_query`),
//! then verified; and a client `auth` value.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pushmesh_protocol::sign;

#[derive(Debug, Arbitrary)]
struct Request<'a> {
    method: &'a str,
    path: &'a str,
    query: &'a str,
    body: &'a [u8],
    now: i64,
    auth: &'a str,
    signed: &'a str,
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fuzz_target!(|r: Request<'_>| {
    let query = parse_query(r.query);
    let _ = sign::api_string_to_sign(r.method, r.path, &query);
    let _ = sign::verify_api_request(r.method, r.path, &query, r.body, "key", "secret", r.now);
    let _ = sign::verify_client_auth("key", "secret", r.auth, r.signed);
});
