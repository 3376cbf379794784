use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;

use super::*;

fn frame(i: u64) -> Bytes {
    Bytes::from(i.to_string())
}

/// A buffer of `room` frames whose link is up (epoch 1), holding `frames`.
fn linked(room: usize, frames: std::ops::RangeInclusive<u64>) -> Outbound {
    let mut o = Outbound::new(stream_id(1, 0), room, 1 << 20);
    o.link_up(1);
    for i in frames {
        o.push(frame(i)).expect("room");
    }
    o
}

#[test]
fn acked_frames_leave_the_buffer_and_the_rest_is_replayed_on_the_same_epoch() {
    let now = Instant::now();
    let mut o = Outbound::new(stream_id(1, 0), 100, 1 << 20);
    o.link_up(7);
    for i in 1..=5 {
        assert_eq!(o.push(frame(i)), Ok(i));
    }
    let mut w = Vec::new();
    o.take(now, 10, &mut w);
    assert_eq!(w.len(), 5);
    o.ack(3);
    assert_eq!(o.len(), 2);
    o.link_down();
    w.clear();
    o.take(now, 10, &mut w);
    assert!(w.is_empty(), "nothing is written while the link is down");
    o.link_up(7);
    o.take(now, 10, &mut w);
    assert_eq!(w.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![4, 5]);
    assert_eq!(o.stats().replayed, 2);
}

#[test]
fn a_restarted_peer_gets_a_fresh_numbering_and_no_replay() {
    let now = Instant::now();
    let mut o = linked(100, 1..=2);
    o.link_down();
    o.link_up(2);
    let mut w = Vec::new();
    o.take(now, 10, &mut w);
    assert!(w.is_empty());
    assert_eq!(o.stats().discarded, 2);
    assert_eq!(o.push(frame(3)), Ok(1));
    assert_eq!(
        o.stream(),
        stream_id(1, 1),
        "a new stream for the new incarnation"
    );
}

#[test]
fn room_is_the_soft_limit_and_push_refuses_past_the_slack() {
    let mut o = Outbound::new(stream_id(1, 0), 2, 1 << 20);
    assert!(o.has_room());
    o.push(frame(1)).expect("room");
    o.push(frame(2)).expect("room");
    assert!(!o.has_room());
    for i in 0..SLACK {
        o.push(frame(i as u64)).expect("room");
    }
    assert_eq!(o.push(frame(0)), Err(BufferFull));
    o.ack(u64::MAX);
    assert!(o.has_room());
}

#[test]
fn unacknowledged_frames_are_sent_again_after_the_timeout() {
    let t0 = Instant::now();
    let mut o = linked(10, 1..=1);
    let mut w = Vec::new();
    o.take(t0, 10, &mut w);
    assert!(!o.retransmit_due(t0 + Duration::from_millis(100)));
    assert!(o.retransmit_due(t0 + RETRANSMIT_AFTER));
    w.clear();
    o.take(t0, 10, &mut w);
    assert_eq!(w.len(), 1);
}

#[test]
fn inbound_delivers_each_sequence_number_once_per_incarnation() {
    let mut i = Inbound::default();
    assert_eq!(i.link_up(stream_id(1, 0)), Continuity::Continues);
    assert!(i.accept(1));
    assert!(!i.accept(1), "duplicate");
    assert!(!i.accept(3), "gap");
    assert!(i.accept(2));
    assert_eq!(i.acked(), 2);
    assert_eq!(i.link_up(stream_id(1, 0)), Continuity::Continues);
    assert!(i.accept(3), "the same stream continues after a link flap");
    assert_eq!(i.link_up(stream_id(2, 0)), Continuity::Continues);
    assert!(i.accept(1), "a restarted sender starts over");
    assert_eq!(
        i.link_up(stream_id(2, 1)),
        Continuity::Broken,
        "the same sender started a new stream: it forgot us"
    );
    assert!(i.accept(1));
}

#[derive(Debug, Clone)]
enum Step {
    Push,
    Write,
    Deliver { dup: bool, drop: bool, swap: bool },
    Ack,
    Flap,
    Advance,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => Just(Step::Push),
        3 => Just(Step::Write),
        4 => (any::<bool>(), prop::bool::weighted(0.2), prop::bool::weighted(0.2))
            .prop_map(|(dup, drop, swap)| Step::Deliver { dup, drop, swap }),
        2 => Just(Step::Ack),
        1 => Just(Step::Flap),
        1 => Just(Step::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Over a link that drops, duplicates and reorders frames and goes down
    /// and up again, everything pushed is delivered exactly once, in order.
    #[test]
    fn exactly_once_in_order_over_a_bad_link(steps in prop::collection::vec(step(), 1..200)) {
        let mut now = Instant::now();
        let mut o = Outbound::new(stream_id(1, 0), 64, 1 << 20);
        let mut inb = Inbound::default();
        let mut wire: Vec<(u64, Bytes)> = Vec::new();
        let mut delivered: Vec<Bytes> = Vec::new();
        let mut pushed: Vec<Bytes> = Vec::new();
        o.link_up(9);
        let mut n = 0u64;
        for s in steps {
            match s {
                Step::Push => {
                    if o.has_room() {
                        n += 1;
                        o.push(frame(n)).expect("room");
                        pushed.push(frame(n));
                    }
                }
                Step::Write => o.take(now, 8, &mut wire),
                Step::Deliver { dup, drop, swap } => {
                    if swap && wire.len() >= 2 {
                        wire.swap(0, 1);
                    }
                    if !wire.is_empty() {
                        let (seq, f) = wire.remove(0);
                        if dup {
                            wire.insert(0, (seq, f.clone()));
                        }
                        if !drop && inb.accept(seq) {
                            delivered.push(f);
                        }
                    }
                }
                Step::Ack => o.ack(inb.acked()),
                Step::Flap => {
                    wire.clear();
                    o.link_down();
                    o.link_up(9);
                }
                Step::Advance => {
                    now += RETRANSMIT_AFTER;
                    o.retransmit_due(now);
                }
            }
            prop_assert!(pushed.starts_with(&delivered), "delivered out of order or twice");
        }
        // Heal: a clean link until everything is acknowledged.
        for _ in 0..10_000 {
            if o.is_empty() {
                break;
            }
            now += RETRANSMIT_AFTER;
            o.retransmit_due(now);
            wire.clear();
            o.take(now, 64, &mut wire);
            for (seq, f) in wire.drain(..) {
                if inb.accept(seq) {
                    delivered.push(f);
                }
            }
            o.ack(inb.acked());
        }
        prop_assert_eq!(delivered, pushed);
    }
}
