//! permessage-deflate negotiation (RFC 7692 §5, §7.1).
//!
//! The server answers at most one offer: the first acceptable one, in the
//! order the client listed them. An offer is declined (and the next one
//! considered) when it has an unknown parameter, a parameter twice, or a
//! bad value (§7: "MUST decline"); and when it asks for
//! `server_max_window_bits` below 15, because compressed frames are built
//! once per publish and shared by every compressing socket, with one window
//! size. The answer always carries `server_no_context_takeover` (each
//! message compressed on its own, so it is the same bytes for everyone) and
//! `client_no_context_takeover` (§7.1.1.2 lets the server add it unasked:
//! an idle connection then keeps no inflate window).

/// What was agreed with a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreed {
    /// The `Sec-WebSocket-Extensions` response value.
    pub response: String,
}

/// One parameter of an offer: name and optional value (quotes removed).
type Param<'a> = (&'a str, Option<&'a str>);

/// Window bits as RFC 7692 §7.1.2 allows them: 8 to 15, no leading zero.
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.len() > 2 || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Splits one extension (`name; a; b=1; c="2"`) into its name and params;
/// `None` if it is not well formed.
fn parse_extension(ext: &str) -> Option<(&str, Vec<Param<'_>>)> {
    let mut parts = ext.split(';').map(str::trim);
    let name = parts.next().filter(|n| is_token(n))?;
    let mut params = Vec::new();
    for p in parts {
        let (k, v) = match p.split_once('=') {
            Some((k, v)) => {
                let v = v.trim();
                let v = match v.strip_prefix('"') {
                    Some(q) => q.strip_suffix('"')?,
                    None => v,
                };
                if !is_token(v) {
                    return None;
                }
                (k.trim(), Some(v))
            }
            None => (p, None),
        };
        if !is_token(k) {
            return None;
        }
        params.push((k, v));
    }
    Some((name, params))
}

/// The answer to one permessage-deflate offer, or `None` to decline it.
fn accept(params: &[Param<'_>]) -> Option<Agreed> {
    let mut seen: Vec<&str> = Vec::new();
    for (k, v) in params {
        let k = k.to_ascii_lowercase();
        if seen.iter().any(|s| s.eq_ignore_ascii_case(&k)) {
            return None;
        }
        let ok = match k.as_str() {
            "server_no_context_takeover" | "client_no_context_takeover" => v.is_none(),
            // Shared frames have one window: 15 only.
            "server_max_window_bits" => v.and_then(window_bits) == Some(15),
            "client_max_window_bits" => v.is_none_or(|v| window_bits(v).is_some()),
            _ => false,
        };
        if !ok {
            return None;
        }
        seen.push(match k.as_str() {
            "server_no_context_takeover" => "server_no_context_takeover",
            "client_no_context_takeover" => "client_no_context_takeover",
            "server_max_window_bits" => "server_max_window_bits",
            _ => "client_max_window_bits",
        });
    }
    let mut response =
        String::from("permessage-deflate; server_no_context_takeover; client_no_context_takeover");
    if seen.contains(&"server_max_window_bits") {
        response.push_str("; server_max_window_bits=15");
    }
    Some(Agreed { response })
}

/// Negotiates permessage-deflate from the `Sec-WebSocket-Extensions` header
/// values of a request (the header may appear several times).
pub fn negotiate<'a>(headers: impl IntoIterator<Item = &'a str>) -> Option<Agreed> {
    headers
        .into_iter()
        .flat_map(|h| h.split(','))
        .filter_map(|ext| parse_extension(ext.trim()))
        .filter(|(name, _)| name.eq_ignore_ascii_case("permessage-deflate"))
        .find_map(|(_, params)| accept(&params))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str =
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    fn answer(h: &str) -> Option<String> {
        negotiate([h]).map(|a| a.response)
    }

    #[test]
    fn browsers_and_clients_offers() {
        // Chromium, `ws` and Python websockets.
        assert_eq!(
            answer("permessage-deflate; client_max_window_bits").as_deref(),
            Some(ANSWER)
        );
        assert_eq!(answer("permessage-deflate").as_deref(), Some(ANSWER));
        assert_eq!(
            answer("permessage-deflate; client_max_window_bits=12; server_no_context_takeover")
                .as_deref(),
            Some(ANSWER)
        );
        assert_eq!(
            answer(r#"permessage-deflate; server_max_window_bits="15""#).as_deref(),
            Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15")
        );
    }

    #[test]
    fn no_offer_no_answer() {
        assert_eq!(answer(""), None);
        assert_eq!(answer("x-webkit-deflate-frame"), None);
        assert_eq!(negotiate(std::iter::empty()), None);
    }

    #[test]
    fn malformed_offers_are_declined() {
        for bad in [
            "permessage-deflate; foo",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=010",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits; CLIENT_MAX_WINDOW_BITS=10",
            "permessage-deflate; client_max_window_bits=\"12",
            "permessage-deflate;;",
        ] {
            assert_eq!(answer(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_smaller_server_window_is_declined() {
        assert_eq!(
            answer("permessage-deflate; server_max_window_bits=10"),
            None
        );
    }

    #[test]
    fn the_first_acceptable_offer_wins() {
        let h = "permessage-deflate; server_max_window_bits=10, permessage-deflate; client_max_window_bits";
        assert_eq!(answer(h).as_deref(), Some(ANSWER));
        // Over several header lines, and after another extension.
        let a = negotiate(["foo, permessage-deflate; bogus", "permessage-deflate"]);
        assert_eq!(a.map(|a| a.response).as_deref(), Some(ANSWER));
    }
}
