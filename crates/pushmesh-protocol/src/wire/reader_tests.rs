use super::*;
use crate::wire::deflate_message;

/// A client frame: masked, with the given first byte (FIN, RSV1-3,
/// opcode), its header written by tungstenite's encoder.
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    use tungstenite::protocol::frame::{coding::OpCode, FrameHeader};
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let header = FrameHeader {
        is_final: first & 0x80 != 0,
        rsv1: first & 0x40 != 0,
        rsv2: first & 0x20 != 0,
        rsv3: first & 0x10 != 0,
        opcode: OpCode::from(first & 0x0f),
        mask: Some(mask),
    };
    let mut out = Vec::new();
    header
        .format(payload.len() as u64, &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

fn reader(deflate: bool, max: usize) -> FrameReader {
    FrameReader::new(Role::Server, max, deflate)
}

/// The close code a reader (`deflate`, `max` bytes a message) refuses
/// `bytes` with.
fn refused(deflate: bool, max: usize, bytes: &[u8]) -> u16 {
    feed(&mut reader(deflate, max), bytes)
        .expect_err("an error")
        .close_code()
}

fn feed(r: &mut FrameReader, bytes: &[u8]) -> Result<Vec<Event>, ReadError> {
    r.buffer_mut().extend_from_slice(bytes);
    let mut out = Vec::new();
    while let Some(e) = r.next_event()? {
        out.push(e);
    }
    Ok(out)
}

#[test]
fn masked_text_byte_by_byte() {
    let mut r = reader(false, 1024);
    let f = client_frame(0x81, b"hello, world");
    let mut events = Vec::new();
    for b in &f {
        events.extend(feed(&mut r, &[*b]).expect("ok"));
    }
    assert_eq!(
        events,
        vec![Event::Text(Bytes::from_static(b"hello, world"))]
    );
}

#[test]
fn fragments_with_a_ping_between() {
    let mut r = reader(false, 1024);
    let mut bytes = client_frame(0x01, b"hel");
    bytes.extend(client_frame(0x89, b"p"));
    bytes.extend(client_frame(0x80, b"lo"));
    let events = feed(&mut r, &bytes).expect("ok");
    assert_eq!(
        events,
        vec![
            Event::Ping(Bytes::from_static(b"p")),
            Event::Text(Bytes::from_static(b"hello"))
        ]
    );
}

#[test]
fn compressed_fragments() {
    let msg =
        br#"{"event":"client-x","channel":"private-a","data":"aaaaaaaaaaaaaaaaaaaa"}"#.repeat(10);
    let z = deflate_message(&msg, 6).expect("ok");
    let (a, b) = z.split_at(z.len() / 2);
    let mut bytes = client_frame(0x41, a); // RSV1 on the first frame only
    bytes.extend(client_frame(0x80, b));
    let mut r = reader(true, 4096);
    assert_eq!(
        feed(&mut r, &bytes).expect("ok"),
        vec![Event::Text(Bytes::from(msg.clone()))]
    );
    // And the next message, with no context from the first.
    let again = client_frame(0xc1, &z);
    assert_eq!(
        feed(&mut r, &again).expect("ok"),
        vec![Event::Text(Bytes::from(msg))]
    );
}

#[test]
fn rsv1_without_negotiation_is_a_protocol_error() {
    let z = deflate_message(b"hello", 1).expect("ok");
    let e = feed(&mut reader(false, 1024), &client_frame(0xc1, &z)).expect_err("an error");
    assert_eq!(e.close_code(), 1002);
    // RSV1 on a continuation or control frame, even when negotiated.
    let mut bytes = client_frame(0x01, b"a");
    bytes.extend(client_frame(0xc0, b"b"));
    assert_eq!(refused(true, 1024, &bytes), 1002);
    assert_eq!(refused(true, 1024, &client_frame(0xc9, b"")), 1002);
}

#[test]
fn protocol_errors() {
    // Unmasked client frame.
    assert_eq!(refused(false, 64, &[0x81, 0x01, b'a']), 1002);
    // Continuation without a message, new message inside a fragmented one.
    assert_eq!(refused(false, 64, &client_frame(0x80, b"a")), 1002);
    let mut bytes = client_frame(0x01, b"a");
    bytes.extend(client_frame(0x81, b"b"));
    assert_eq!(refused(false, 64, &bytes), 1002);
    // Fragmented ping; RSV2; reserved opcode; a close code of one byte.
    assert_eq!(refused(false, 64, &client_frame(0x09, b"")), 1002);
    assert_eq!(refused(false, 64, &client_frame(0xa1, b"")), 1002);
    assert_eq!(refused(false, 64, &client_frame(0x83, b"")), 1002);
    assert_eq!(refused(false, 64, &client_frame(0x88, b"x")), 1002);
    // Not UTF-8.
    assert_eq!(refused(false, 64, &client_frame(0x81, &[0xff])), 1007);
}

#[test]
fn oversize_is_refused_before_buffering_and_drained() {
    let mut r = reader(false, 100);
    let big = client_frame(0x81, &[b'a'; 5000]);
    // Only the header is needed to refuse it.
    let e = feed(&mut r, &big[..8]).expect_err("an error");
    assert_eq!(e, ReadError::TooBig(100));
    r.drain();
    let mut rest = big[8..].to_vec();
    rest.extend(client_frame(0x81, b"ignored"));
    rest.extend(client_frame(0x88, &1000u16.to_be_bytes()));
    assert_eq!(
        feed(&mut r, &rest).expect("ok"),
        vec![Event::Close(Some((1000, String::new())))]
    );
}

#[test]
fn a_fragmented_bomb_stops_at_the_limit() {
    let z = deflate_message(&vec![b'a'; 16 << 20], 9).expect("ok");
    let mut r = reader(true, 64 << 10);
    let mut bytes = Vec::new();
    let chunks: Vec<&[u8]> = z.chunks(1000).collect();
    for (i, c) in chunks.iter().enumerate() {
        let first = match (i, i + 1 == chunks.len()) {
            (0, _) => 0x41,
            (_, true) => 0x80,
            _ => 0x00,
        };
        bytes.extend(client_frame(first, c));
    }
    assert_eq!(
        feed(&mut r, &bytes).expect_err("an error"),
        ReadError::TooBig(64 << 10)
    );
}
