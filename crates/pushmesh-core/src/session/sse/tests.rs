use super::*;
use crate::testing::{app, KEY, SECRET};
use crate::SessionOutput;

fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
    q.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn parse(q: &[(&str, &str)], last: Option<&str>) -> Result<SseRequest, SseRequestError> {
    SseRequest::parse(&pairs(q), last, 16, 200)
}

#[test]
fn parses_channels_once_in_order() {
    let r = parse(
        &[
            ("channel", "b"),
            ("channel", "a"),
            ("channel", "b"),
            ("x", "1"),
        ],
        None,
    )
    .expect("ok");
    let names: Vec<&str> = r.channels.iter().map(ChannelName::as_str).collect();
    assert_eq!(names, ["b", "a"]);
    assert_eq!(r.resume, None);
}

#[test]
fn refusals_are_typed() {
    assert_eq!(parse(&[], None), Err(SseRequestError::NoChannel));
    let many: Vec<(String, String)> = (0..17)
        .map(|i| ("channel".to_string(), format!("c{i}")))
        .collect();
    assert_eq!(
        SseRequest::parse(&many, None, 16, 200),
        Err(SseRequestError::TooManyChannels(16))
    );
    assert!(SseRequest::parse(&many[..16], None, 16, 200).is_ok());
    assert!(matches!(
        parse(&[("channel", "bad name")], None),
        Err(SseRequestError::BadName(..))
    ));
    assert_eq!(
        parse(&[("channel", "presence-room")], None),
        Err(SseRequestError::Presence("presence-room".into()))
    );
    assert_eq!(
        parse(&[("channel", "a"), ("token", "x"), ("token", "y")], None),
        Err(SseRequestError::Repeated("token"))
    );
    assert!(matches!(
        parse(&[("channel", "a"), ("filter", "{nope")], None),
        Err(SseRequestError::Filter(_))
    ));
    assert_eq!(
        parse(
            &[("channel", "cache-a"), ("filter", r#"{"eq":["k","v"]}"#)],
            None
        ),
        Err(SseRequestError::Filter(FilterError::CacheChannel))
    );
}

#[test]
fn header_wins_over_query_cursor() {
    let mut c = Cursor::default();
    c.set("h", "o.1");
    let r = parse(
        &[
            ("channel", "h"),
            ("channel", "p"),
            ("last_event_id", "junk"),
        ],
        Some(&c.encode()),
    )
    .expect("ok");
    assert_eq!(r.resume, Some(Ok(c.clone())));
    let (pos, resumed, cursor) = r.positions();
    assert_eq!(pos, [Some("o.1".to_string()), None]);
    assert_eq!(resumed.into_iter().collect::<Vec<_>>(), ["h"]);
    assert_eq!(cursor, c);
    // Only the query's.
    let r = parse(&[("channel", "h"), ("last_event_id", &c.encode())], None).expect("ok");
    assert_eq!(r.resume, Some(Ok(c)));
}

#[test]
fn a_bad_cursor_is_never_silent() {
    let r = parse(&[("channel", "h"), ("channel", "g")], Some("%%%")).expect("ok");
    let (pos, resumed, cursor) = r.positions();
    assert!(pos.iter().all(|p| p.as_deref() == Some("!")));
    assert_eq!(resumed.len(), 2, "every channel is told recovered:false");
    assert!(cursor.is_empty());
}

#[test]
fn who_may_stream_what() {
    let cfg = app();
    let chans = [("channel", "private-a"), ("channel", "pub")];
    let r = parse(&chans, None).expect("ok");
    assert_eq!(
        r.authorize(&cfg, None, 10),
        Err(SseAuthError::Token(TokenError::Missing))
    );
    let token = sse::sign_token(KEY, SECRET, &["pub", "private-a"], 100);
    let with = |t: &str| {
        let mut q = chans.to_vec();
        q.push(("token", t));
        parse(&q, None).expect("ok")
    };
    assert_eq!(with(&token).authorize(&cfg, None, 10), Ok(()));
    assert_eq!(
        with(&token).authorize(&cfg, None, 101),
        Err(SseAuthError::Token(TokenError::Expired))
    );
    let other = sse::sign_token(KEY, SECRET, &["private-a"], 100);
    assert_eq!(
        with(&other).authorize(&cfg, None, 10),
        Err(SseAuthError::Token(TokenError::BadSignature))
    );
    // Public and cache channels need nothing.
    let r = parse(&[("channel", "pub"), ("channel", "cache-x")], None).expect("ok");
    assert_eq!(r.authorize(&cfg, None, 10), Ok(()));
    // The balancer's user streams its own channel, not another's.
    let own = parse(&[("channel", "#server-to-user-u1")], None).expect("ok");
    assert_eq!(own.authorize(&cfg, Some("u1"), 10), Ok(()));
    assert!(own.authorize(&cfg, Some("u2"), 10).is_err());
    assert!(own.authorize(&cfg, None, 10).is_err());
    let enc = parse(&[("channel", "private-encrypted-x")], None).expect("ok");
    assert!(enc.authorize(&cfg, Some("u1"), 10).is_err());
}

#[test]
fn subscribes_like_pusher_subscribe() {
    let now = Instant::now();
    let mut s = Session::sse(now, ConnId(1), AppIdx(0), Arc::new(app()), "1.1");
    assert!(s.poll().is_none(), "no handshake frame");
    let name = ChannelName::parse("h").expect("name");
    s.sse_subscribe(&name, Some(r#"{"eq":["k","v"]}"#), Some("o.1"))
        .expect("ok");
    match s.poll() {
        Some(SessionOutput::Route(Request::Subscribe {
            channel,
            proto,
            position,
            selector,
            presence,
            ..
        })) => {
            assert_eq!(channel, name);
            assert_eq!(proto, Proto::Pusher);
            assert_eq!(position.as_deref(), Some("o.1"));
            assert!(selector.is_some());
            assert!(presence.is_none());
        }
        _ => panic!("a subscribe"),
    }
    assert_eq!(s.channels().count(), 1);
    s.disconnect();
    assert!(matches!(
        s.poll(),
        Some(SessionOutput::Route(Request::Unsubscribe { .. }))
    ));
}
