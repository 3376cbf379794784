use std::time::{Duration, Instant};

use pushmesh_protocol::ChannelName;

use super::*;

const A: Origin = Origin(0xa);
const B: Origin = Origin(0xb);

fn name(s: &str) -> ChannelName {
    ChannelName::parse_with_limit(s, 200).expect("valid")
}

fn ev(store: &mut HistoryStore, o: Origin, seq: u64, at: Instant) -> Stored {
    store.event(NewEvent {
        origin: o,
        seq,
        at,
        at_ms: 0,
        event: "e",
        data: &format!("{o:?}-{seq}"),
        user_id: None,
        tags: Default::default(),
    })
}

fn store(budget: usize) -> (HistoryStore, Instant) {
    let t0 = Instant::now();
    (HistoryStore::new(A, budget, (t0, 1_000)), t0)
}

/// A store to which `events` (origin, seq) were appended on `chat-1`, all
/// at `t0`, with at most `max_events` kept.
fn chat(
    events: impl IntoIterator<Item = (Origin, u64)>,
    max_events: usize,
) -> (HistoryStore, Instant, ChannelName) {
    let (mut s, t0) = store(MAX_BYTES);
    let ch = name("chat-1");
    for (o, seq) in events {
        let e = ev(&mut s, o, seq, t0);
        s.append(AppIdx(0), &ch, e, max_events);
    }
    (s, t0, ch)
}

fn seqs(log: &ChannelLog) -> Vec<(u64, u64)> {
    log.events().map(|e| (e.origin.0, e.seq)).collect()
}

fn pos(entries: &[(Origin, u64)]) -> Position {
    let mut p = Position::default();
    for (o, s) in entries {
        p.raise(*o, *s);
    }
    p
}

#[test]
fn appends_number_per_origin_and_drop_duplicates() {
    let (mut s, t0) = store(MAX_BYTES);
    let ch = name("chat-1");
    for seq in 1..=3 {
        let e = ev(&mut s, A, seq, t0);
        assert_eq!(
            s.append(AppIdx(0), &ch, e, 100),
            Appended::Stored { gap: false }
        );
    }
    let dup = ev(&mut s, A, 2, t0);
    assert_eq!(s.append(AppIdx(0), &ch, dup, 100), Appended::Duplicate);
    let b1 = ev(&mut s, B, 1, t0);
    s.append(AppIdx(0), &ch, b1, 100);
    let log = s.log(AppIdx(0), &ch).expect("log");
    assert_eq!(log.head().to_string(), "a.3-b.1");
    assert_eq!(s.next_own_seq(AppIdx(0), &ch), 4);
    assert_eq!(s.stats.events, 4);
    assert!(log.complete());
}

#[test]
fn recovery_replays_exactly_what_is_after_a_position() {
    let (s, _, ch) = chat([(A, 1), (B, 1), (A, 2), (B, 2), (A, 3)], 100);
    let log = s.log(AppIdx(0), &ch).expect("log");
    let p = pos(&[(A, 1), (B, 2)]);
    assert_eq!(log.check(&p, |_| true), Check::Continuous);
    let after: Vec<(u64, String)> = log
        .after(&p)
        .map(|(e, at)| (e.seq, at.to_string()))
        .collect();
    // A2 then A3, each position raised over the client's.
    assert_eq!(after, vec![(2, "a.2-b.2".into()), (3, "a.3-b.2".into())]);
    // Ahead of this node for a live origin: wait; for a dead one: lost.
    let ahead = pos(&[(A, 3), (B, 5)]);
    assert_eq!(log.check(&ahead, |_| true), Check::Ahead);
    assert_eq!(log.check(&ahead, |o| o != B), Check::Lost);
    // An origin the client never saw: everything of it is replayed.
    let none = pos(&[(A, 3)]);
    assert_eq!(log.after(&none).count(), 2);
}

#[test]
fn eviction_by_count_makes_older_positions_lost() {
    let (s, _, ch) = chat((1..=10).map(|seq| (A, seq)), 4);
    let log = s.log(AppIdx(0), &ch).expect("log");
    assert_eq!(log.len(), 4);
    assert_eq!(s.stats.evicted_max_events, 6);
    assert!(!log.complete());
    assert_eq!(log.check(&pos(&[(A, 5)]), |_| true), Check::Lost);
    assert_eq!(log.check(&pos(&[(A, 6)]), |_| true), Check::Continuous);
    assert_eq!(log.check(&Position::default(), |_| true), Check::Lost);
}

#[test]
fn expiry_drops_old_events_in_arrival_order() {
    let (mut s, t0) = store(MAX_BYTES);
    let (c1, c2) = (name("chat-1"), name("chat-2"));
    let e = ev(&mut s, A, 1, t0);
    s.append(AppIdx(0), &c1, e, 100);
    let e = ev(&mut s, A, 1, t0 + Duration::from_secs(5));
    s.append(AppIdx(0), &c2, e, 100);
    let ttl = |_| Some(Duration::from_secs(10));
    s.expire(t0 + Duration::from_secs(9), ttl);
    assert_eq!(s.stats.events, 2);
    s.expire(t0 + Duration::from_secs(11), ttl);
    assert!(s.log(AppIdx(0), &c1).is_none(), "an emptied log goes");
    assert_eq!(s.stats.expired, 1);
    assert_eq!(s.log(AppIdx(0), &c2).map(ChannelLog::len), Some(1));
}

#[test]
fn memory_budget_evicts_the_oldest_across_channels() {
    let (mut s, t0) = store(MAX_BYTES);
    let one = ev(&mut s, A, 1, t0).bytes();
    let (mut s, _) = store(one * 5);
    for i in 0..10u64 {
        let ch = name(&format!("chat-{}", i % 3));
        let seq = i / 3 + 1;
        let e = ev(&mut s, A, seq, t0);
        s.append(AppIdx(0), &ch, e, 100);
        assert!(s.stats.bytes <= one * 5 + 64, "bounded: {}", s.stats.bytes);
    }
    assert_eq!(s.stats.events, 5);
    assert_eq!(s.stats.evicted_memory, 5);
    // The five newest are held: chat-0 seq 3,4? (i = 5..9).
    let held: usize = (0..3)
        .filter_map(|c| s.log(AppIdx(0), &name(&format!("chat-{c}"))))
        .map(ChannelLog::len)
        .sum();
    assert_eq!(held, 5);
}

#[test]
fn stale_order_entries_stay_bounded() {
    let (s, _, _) = chat((1..=10_000).map(|seq| (A, seq)), 10);
    assert_eq!(s.stats.events, 10);
    assert!(
        s.order.len() <= 2 * 10 + 65,
        "order holds {}",
        s.order.len()
    );
}

#[test]
fn a_gap_drops_what_came_before_it_for_that_origin() {
    let (mut s, t0, ch) = chat([(A, 1), (B, 1), (A, 2)], 100);
    let e = ev(&mut s, A, 5, t0);
    assert_eq!(
        s.append(AppIdx(0), &ch, e, 100),
        Appended::Stored { gap: true }
    );
    let log = s.log(AppIdx(0), &ch).expect("log");
    assert_eq!(seqs(log), vec![(0xb, 1), (0xa, 5)]);
    assert_eq!(log.base().to_string(), "a.4");
    assert_eq!(log.check(&pos(&[(A, 2)]), |_| true), Check::Lost);
    assert_eq!(log.check(&pos(&[(A, 4)]), |_| true), Check::Continuous);
    assert_eq!(s.stats.events, 2);
}

#[test]
fn merge_fills_in_older_events_and_extends_only_without_subscribers() {
    let (peer, t0, ch) = chat([(A, 1), (B, 1), (A, 2), (B, 2), (A, 3)], 100);
    let copy: Vec<Stored> = peer
        .log(AppIdx(0), &ch)
        .expect("log")
        .events()
        .cloned()
        .collect();
    // A joiner that already got B3 live (a gap: base b.2).
    let (mut me, _) = store(MAX_BYTES);
    let e = ev(&mut me, B, 3, t0);
    me.append(AppIdx(0), &ch, e, 100);
    // With subscribers: only the older events of B fill in.
    let n = me.merge(
        AppIdx(0),
        &ch,
        copy.clone(),
        &Position::default(),
        false,
        100,
    );
    assert_eq!(n, 2);
    let log = me.log(AppIdx(0), &ch).expect("log");
    assert_eq!(seqs(log), vec![(0xb, 1), (0xb, 2), (0xb, 3)]);
    assert_eq!(log.head().to_string(), "b.3");
    // Without: A is adopted too, behind.
    let n = me.merge(AppIdx(0), &ch, copy, &Position::default(), true, 100);
    assert_eq!(n, 3);
    let log = me.log(AppIdx(0), &ch).expect("log");
    assert_eq!(log.head().to_string(), "a.3-b.3");
    assert!(log.complete());
    assert_eq!(
        log.check(&pos(&[(A, 1), (B, 1)]), |_| true),
        Check::Continuous
    );
    let order: Vec<u64> = log.events().map(|e| e.id).collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "ids renumbered in log order"
    );
    assert_eq!(me.stats.events, 6);
    // Merging the same again takes nothing.
    let again: Vec<Stored> = log.events().cloned().collect();
    assert_eq!(
        me.merge(AppIdx(0), &ch, again, &Position::default(), true, 100),
        0
    );
}

#[test]
fn patterns_match_exactly_or_by_prefix() {
    let h = AppHistory {
        channels: vec!["chat-*".into(), "exact".into(), "private-orders-*".into()],
        max_events: 10,
        ttl: Duration::from_secs(1),
    };
    assert!(h.matches("chat-1"));
    assert!(h.matches("chat-"));
    assert!(h.matches("exact"));
    assert!(!h.matches("exact2"));
    assert!(h.matches("private-orders-9"));
    assert!(!h.matches("private-chat-1"));
    let all = AppHistory {
        channels: vec!["*".into()],
        ..h
    };
    assert!(all.matches("anything"));
}

#[test]
fn wall_clock_follows_instants() {
    let (s, t0) = store(MAX_BYTES);
    assert_eq!(s.wall_ms(t0 + Duration::from_millis(250)), 1_250);
}
