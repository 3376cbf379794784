//! The webhook backup between owners and backups, frames moved by hand.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pushmesh_protocol::webhook::WebhookEvent;

use super::*;

fn n(s: &str) -> NodeId {
    NodeId::new(s)
}

fn set(nodes: &[&str]) -> BTreeSet<NodeId> {
    nodes.iter().map(|s| n(s)).collect()
}

fn vacated(c: &str) -> WebhookEvent {
    WebhookEvent::ChannelVacated { channel: c.into() }
}

/// A channel of app `app` whose owner among `nodes` is `owner`.
fn channel_owned_by(owner: &str, nodes: &[&str]) -> String {
    (0..)
        .map(|i| format!("ch-{i}"))
        .find(|c| {
            let me = n(owner);
            let others: BTreeSet<NodeId> = set(nodes).into_iter().filter(|p| *p != me).collect();
            crate::routing::is_owner(&me, &others, "app", c)
        })
        .unwrap_or_default()
}

/// Now, a channel owned by `a` among `a`, `b` and `c`, and `a`'s backup
/// state (epoch 1).
fn owner_a() -> (Instant, String, HookBackup) {
    let ch = channel_owned_by("a", &["a", "b", "c"]);
    (Instant::now(), ch, HookBackup::new(n("a"), 1))
}

/// Delivers `out` to the node named by each frame's recipient.
fn deliver(
    now: Instant,
    from: &str,
    out: &mut Vec<(NodeId, PeerFrame)>,
    nodes: &mut [(&str, &mut HookBackup)],
) -> Vec<(String, Released)> {
    let mut released = Vec::new();
    for (to, frame) in out.drain(..) {
        // Through the codec, as on a link.
        let frame = PeerFrame::decode(&frame.encode()).unwrap_or_else(|e| panic!("{e}"));
        if let Some((name, b)) = nodes.iter_mut().find(|(name, _)| n(name) == to) {
            for r in b.handle(now, &n(from), frame) {
                released.push((name.to_string(), r));
            }
        }
    }
    released
}

#[test]
fn the_backup_is_the_next_owner_in_rendezvous_order() {
    let nodes = ["a", "b", "c", "d", "e"];
    for i in 0..200 {
        let ch = format!("c{i}");
        let all = set(&nodes);
        let owner = all
            .iter()
            .find(|p| {
                let others: BTreeSet<NodeId> = all.iter().filter(|q| q != p).cloned().collect();
                crate::routing::is_owner(p, &others, "app", &ch)
            })
            .cloned()
            .unwrap_or_else(|| panic!("no owner"));
        let peers: BTreeSet<NodeId> = all.iter().filter(|p| **p != owner).cloned().collect();
        let backup = backup_for(&owner, &peers, "app", &ch).unwrap_or_else(|| panic!("none"));
        // Once the owner is gone, its backup owns the channel.
        let rest: BTreeSet<NodeId> = peers.iter().filter(|p| **p != backup).cloned().collect();
        assert!(crate::routing::is_owner(&backup, &rest, "app", &ch), "{ch}");
    }
    assert_eq!(backup_for(&n("a"), &BTreeSet::new(), "app", "x"), None);
}

#[test]
fn a_crashed_owner_events_are_released_by_the_backup_with_their_ids() {
    let (t0, ch, mut a) = owner_a();
    let mut b = HookBackup::new(n("b"), 1);
    let mut c = HookBackup::new(n("c"), 1);
    let backup = backup_for(&n("a"), &set(&["b", "c"]), "app", &ch).unwrap_or_else(|| panic!());
    let mut out = Vec::new();
    for i in 0..30 {
        a.hand(
            &format!("a:1:{i}"),
            "app",
            &vacated(&ch),
            &set(&["b", "c"]),
            &mut out,
        );
    }
    assert_eq!(out.len(), 30);
    assert!(out
        .iter()
        .all(|(to, f)| *to == backup && f.kind() == crate::FrameKind::Control));
    let r = deliver(t0, "a", &mut out, &mut [("b", &mut b), ("c", &mut c)]);
    assert!(r.is_empty());
    // The owner delivers the first ten and says so.
    let ids: Vec<String> = (0..10).map(|i| format!("a:1:{i}")).collect();
    a.done(ids.iter().map(String::as_str), &mut out);
    assert_eq!(out.len(), 1, "one HookDone per backup");
    deliver(t0, "a", &mut out, &mut [("b", &mut b), ("c", &mut c)]);
    let holder = if backup == n("b") { &mut b } else { &mut c };
    assert_eq!(holder.held_count(), 20);
    // kill -9 of a: the backup releases the other twenty, in order, ids kept.
    let rest = set(&["b", "c"])
        .into_iter()
        .filter(|p| *p != backup)
        .collect();
    let released = holder.peer_gone(&n("a"), &rest, &mut out);
    assert_eq!(
        released.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        (10..30).map(|i| format!("a:1:{i}")).collect::<Vec<_>>()
    );
    assert!(released
        .iter()
        .all(|r| r.app == "app" && r.event == vacated(&ch)));
    assert_eq!(holder.held_count(), 0);
    assert_eq!(holder.stats().released, 20);
    // Nothing twice.
    assert!(holder
        .peer_gone(&n("a"), &BTreeSet::new(), &mut out)
        .is_empty());
}

#[test]
fn a_restarted_owner_releases_what_its_previous_incarnation_left() {
    let t0 = Instant::now();
    let mut a = HookBackup::new(n("a"), 1);
    let mut b = HookBackup::new(n("b"), 1);
    let mut out = Vec::new();
    a.hand("a:1:0", "app", &vacated("x"), &set(&["b"]), &mut out);
    deliver(t0, "a", &mut out, &mut [("b", &mut b)]);
    // Same epoch up again (a link flap): nothing released.
    assert!(b.peer_up(&n("a"), 1, &set(&["a"]), &mut out).is_empty());
    // a restarted (epoch 2) before b saw it go: released on peer_up...
    let r = b.peer_up(&n("a"), 2, &set(&["a"]), &mut out);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].id, "a:1:0");
    // ...or on its first hold, whichever comes first.
    let mut a1 = HookBackup::new(n("a"), 3);
    a1.hand("a:3:0", "app", &vacated("y"), &set(&["b"]), &mut out);
    a.hand("a:1:1", "app", &vacated("x"), &set(&["b"]), &mut out);
    let mut first = out.split_off(1);
    deliver(t0, "a", &mut first, &mut [("b", &mut b)]);
    let r = deliver(t0, "a", &mut out, &mut [("b", &mut b)]);
    assert_eq!(
        r.len(),
        1,
        "the epoch-1 hold is released by the epoch-3 one"
    );
    assert_eq!(r[0].1.id, "a:1:1");
    assert_eq!(b.held_count(), 1);
}

#[test]
fn when_the_backup_goes_the_owner_hands_its_events_to_the_next() {
    let (t0, ch, mut a) = owner_a();
    let mut out = Vec::new();
    a.hand("a:1:0", "app", &vacated(&ch), &set(&["b", "c"]), &mut out);
    let first = out[0].0.clone();
    out.clear();
    let rest: BTreeSet<NodeId> = set(&["b", "c"])
        .into_iter()
        .filter(|p| *p != first)
        .collect();
    assert!(a.peer_gone(&first, &rest, &mut out).is_empty());
    assert_eq!(out.len(), 1);
    assert_ne!(out[0].0, first);
    // A peer coming up gets the events it backs up again (it may have restarted).
    let second = out[0].0.clone();
    out.clear();
    a.peer_up(&second, 5, &rest, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, second);
    // Alone, then a peer: it becomes the backup.
    let mut solo = HookBackup::new(n("a"), 1);
    solo.hand("a:1:0", "app", &vacated(&ch), &BTreeSet::new(), &mut out);
    out.clear();
    solo.peer_up(&n("b"), 1, &set(&["b"]), &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, n("b"));
    let _ = t0;
}

#[test]
fn holding_is_bounded_and_expires() {
    let t0 = Instant::now();
    let mut b = HookBackup::new(n("b"), 1);
    let hold = |i: usize| PeerFrame::HookHold {
        epoch: 1,
        id: format!("a:1:{i}"),
        app: "app".into(),
        channel: "x".into(),
        event: r#"{"name":"channel_vacated","channel":"x"}"#.into(),
    };
    for i in 0..MAX_HELD + 10 {
        b.handle(t0, &n("a"), hold(i));
    }
    assert_eq!(b.held_count(), MAX_HELD);
    assert_eq!(b.stats().refused, 10);
    // A repeated hold is not held twice.
    b.handle(t0, &n("a"), hold(0));
    assert_eq!(b.held_count(), MAX_HELD);
    // Never confirmed: forgotten after HELD_TTL, on the next hold.
    b.handle(t0 + HELD_TTL + Duration::from_secs(1), &n("c"), hold(0));
    assert_eq!(b.held_count(), 1);
    assert_eq!(b.stats().expired, MAX_HELD as u64);
    // An owner's hand-offs are bounded too.
    let mut a = HookBackup::new(n("a"), 1);
    let mut out = Vec::new();
    for i in 0..MAX_HANDED + 3 {
        a.hand(
            &format!("a:1:{i}"),
            "app",
            &vacated("x"),
            &set(&["b"]),
            &mut out,
        );
    }
    assert_eq!(a.handed_count(), MAX_HANDED);
    assert_eq!(a.stats().not_handed, 3);
}

#[test]
fn an_unreadable_held_event_is_counted_not_fatal() {
    let t0 = Instant::now();
    let mut b = HookBackup::new(n("b"), 1);
    b.handle(
        t0,
        &n("a"),
        PeerFrame::HookHold {
            epoch: 1,
            id: "a:1:0".into(),
            app: "app".into(),
            channel: "x".into(),
            event: "not json".into(),
        },
    );
    assert!(b
        .peer_gone(&n("a"), &BTreeSet::new(), &mut Vec::new())
        .is_empty());
    assert_eq!(b.stats().refused, 1);
}
