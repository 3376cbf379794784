use super::*;

const SIG: &str = "a5d9d304c076a0362a7ab6967517f3fe7b7b03cf09c5fc82baa7802dcbbff847";

#[test]
fn token_vector() {
    // HMAC-SHA256("secret", "sse:chat,private-orders:1800000000"), computed
    // independently (Python's hmac).
    assert_eq!(
        token_string(&["private-orders", "chat", "chat"], 1_800_000_000),
        "sse:chat,private-orders:1800000000"
    );
    let t = sign_token("key", "secret", &["private-orders", "chat"], 1_800_000_000);
    assert_eq!(t, format!("key:1800000000:{SIG}"));
    let chans = ["chat", "private-orders"];
    assert_eq!(
        verify_token("key", "secret", &t, &chans, 1_700_000_000),
        Ok(())
    );
    // Order of the request does not matter.
    let rev = ["private-orders", "chat"];
    assert_eq!(
        verify_token("key", "secret", &t, &rev, 1_800_000_000),
        Ok(())
    );
}

#[test]
fn token_refusals() {
    let chans = ["chat", "private-orders"];
    let t = sign_token("key", "secret", &chans, 100);
    let v = |tok: &str, chans: &[&str], now| verify_token("key", "secret", tok, chans, now);
    assert_eq!(v(&t, &chans, 101), Err(TokenError::Expired));
    assert_eq!(v(&t, &["chat"], 50), Err(TokenError::BadSignature));
    assert_eq!(
        v(&t, &["chat", "private-orders", "x"], 50),
        Err(TokenError::BadSignature)
    );
    let other = sign_token("other", "secret", &chans, 100);
    assert_eq!(v(&other, &chans, 50), Err(TokenError::WrongKey));
    let wrong_secret = sign_token("key", "nope", &chans, 100);
    assert_eq!(v(&wrong_secret, &chans, 50), Err(TokenError::BadSignature));
    for bad in ["", "key", "key:100", "key:soon:abc", "key:-1:abc"] {
        assert_eq!(v(bad, &chans, 50), Err(TokenError::Malformed), "{bad:?}");
    }
    assert_eq!(v("key:100:zz", &chans, 50), Err(TokenError::BadSignature));
}

#[test]
fn cursor_round_trip() {
    let mut c = Cursor::default();
    assert!(c.is_empty());
    assert!(c.set("chat", "abc.3"));
    assert!(!c.set("chat", "abc.3"));
    assert!(c.set("chat-2", "abc.1+def.9"));
    let text = c.encode();
    assert!(text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    let back = Cursor::decode(&text).expect("decodes");
    assert_eq!(back, c);
    assert_eq!(back.position("chat"), Some("abc.3"));
    assert_eq!(back.position("nope"), None);
    assert_eq!(Cursor::decode(""), Err(CursorError::Invalid));
    assert_eq!(Cursor::decode("!!!"), Err(CursorError::Invalid));
    let not_object = URL_SAFE_NO_PAD.encode(b"[1,2]");
    assert_eq!(Cursor::decode(&not_object), Err(CursorError::Invalid));
    let long = "a".repeat(MAX_CURSOR_BYTES + 1);
    assert_eq!(Cursor::decode(&long), Err(CursorError::TooLong));
}

fn text(out: &BytesMut) -> &str {
    std::str::from_utf8(out).expect("utf-8")
}

#[test]
fn events_by_name_with_the_frame_as_data() {
    let mut w = StreamWriter::default();
    let mut out = BytesMut::new();
    w.write_frame(
        br#"{"event":"pusher:connection_established","data":"{}"}"#,
        &mut out,
    );
    assert!(out.is_empty(), "dropped");
    let frame = br#"{"event":"order","channel":"chat","data":"{\"a\":1}"}"#;
    w.write_frame(frame, &mut out);
    assert_eq!(
        text(&out),
        "event: order\ndata: {\"event\":\"order\",\"channel\":\"chat\",\"data\":\"{\\\"a\\\":1}\"}\n\n"
    );
    out.clear();
    let error = br#"{"event":"pusher:error","data":{"message":"draining","code":4200}}"#;
    w.write_frame(error, &mut out);
    assert!(
        text(&out).starts_with("event: pusher:error\ndata: {"),
        "an object as data"
    );
    out.clear();
    w.write_frame(b"not json", &mut out);
    assert!(out.is_empty());
}

#[test]
fn history_events_carry_the_cursor() {
    let mut w = StreamWriter::default();
    let mut out = BytesMut::new();
    let ok = br#"{"event":"pusher_internal:subscription_succeeded","channel":"h","data":"{\"position\":\"o.0\"}"}"#;
    w.write_frame(ok, &mut out);
    let mut c = Cursor::default();
    c.set("h", "o.0");
    assert_eq!(text(&out), format!("id: {}\n\n", c.encode()), "id only");
    out.clear();
    w.write_frame(
        br#"{"event":"m","channel":"h","data":"1","position":"o.1"}"#,
        &mut out,
    );
    c.set("h", "o.1");
    assert!(text(&out).starts_with(&format!("id: {}\nevent: m\ndata: ", c.encode())));
    assert_eq!(w.cursor(), &c);
}

#[test]
fn resumed_channels_are_told_and_keep_their_position() {
    let mut c = Cursor::default();
    c.set("h", "o.1");
    c.set("g", "o.7");
    let resumed = ["h".to_string(), "g".to_string()].into_iter().collect();
    let mut w = StreamWriter::new(c.clone(), resumed);
    let mut out = BytesMut::new();
    w.write_frame(
        br#"{"event":"pusher_internal:subscription_succeeded","channel":"h","data":"{\"recovered\":true,\"position\":\"o.5\"}"}"#,
        &mut out,
    );
    assert_eq!(w.cursor(), &c, "the replay brings the positions");
    assert_eq!(
        text(&out),
        format!(
            "id: {}\nevent: pushmesh:recovered\ndata: {{\"channel\":\"h\",\"recovered\":true}}\n\n",
            c.encode()
        )
    );
    out.clear();
    w.write_frame(
        br#"{"event":"pusher_internal:subscription_succeeded","channel":"g","data":"{\"recovered\":false,\"position\":\"o.9\"}"}"#,
        &mut out,
    );
    assert_eq!(
        w.cursor().position("g"),
        Some("o.9"),
        "a gap: live from here"
    );
    assert!(text(&out).contains("data: {\"channel\":\"g\",\"recovered\":false}\n\n"));
    // Non-history answers say nothing.
    out.clear();
    w.write_frame(
        br#"{"event":"pusher_internal:subscription_succeeded","channel":"p","data":"{}"}"#,
        &mut out,
    );
    assert!(out.is_empty());
}

#[test]
fn names_and_data_cannot_break_lines() {
    let mut out = BytesMut::new();
    write_event(&mut out, None, "a\nid: x", b"one\r\ntwo");
    assert_eq!(text(&out), "event: a id: x\ndata: one\ndata: two\n\n");
    out.clear();
    StreamWriter::start(&mut out);
    assert_eq!(text(&out), format!("retry: {RETRY_MS}\n\n"));
}
