//! A property test of one node: every subscriber gets exactly one copy
//! of each publish, presence members match the subscribed users.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::{app, Harness};
use crate::{AppIdx, ConnId};

#[derive(Debug, Clone)]
enum Op {
    Open,
    Sub(usize, usize),
    Unsub(usize, usize),
    Join(usize, usize, usize),
    Disconnect(usize),
    Publish(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Open),
        (0..8usize, 0..3usize).prop_map(|(c, ch)| Op::Sub(c, ch)),
        (0..8usize, 0..3usize).prop_map(|(c, ch)| Op::Unsub(c, ch)),
        (0..8usize, 0..2usize, 0..3usize).prop_map(|(c, ch, u)| Op::Join(c, ch, u)),
        (0..8usize).prop_map(Op::Disconnect),
        (0..5usize).prop_map(Op::Publish),
    ]
}

proptest! {
    /// Every connection subscribed at publish time gets exactly one copy and
    /// nobody else gets any; presence members match the users with a
    /// subscribed connection; member_added/removed alternate per user.
    #[test]
    fn every_subscriber_gets_exactly_one_copy(ops in proptest::collection::vec(op(), 1..80)) {
        let channels = ["a", "b", "private-c"];
        let presence = ["presence-p", "presence-q"];
        let mut h = Harness::new(vec![app()]);
        let mut open: Vec<ConnId> = Vec::new();
        // Model: conn -> channels; conn -> presence (channel -> user).
        let mut subs: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
        let mut users: BTreeMap<(u64, String), String> = BTreeMap::new();
        let mut seq = 0;
        for op in ops {
            match op {
                Op::Open => { let c = h.open(); open.push(c); subs.insert(c.0, BTreeSet::new()); }
                Op::Sub(i, ch) if i < open.len() => {
                    let c = open[i];
                    h.subscribe(c, channels[ch]);
                    subs.entry(c.0).or_default().insert(channels[ch].into());
                }
                Op::Unsub(i, ch) if i < open.len() => {
                    let c = open[i];
                    h.frame(c, serde_json::json!({"event":"pusher:unsubscribe","data":{"channel":channels[ch]}}));
                    subs.entry(c.0).or_default().remove(channels[ch]);
                }
                Op::Join(i, ch, u) if i < open.len() => {
                    let c = open[i];
                    let key = (c.0, presence[ch].to_string());
                    if let std::collections::btree_map::Entry::Vacant(e) = users.entry(key) {
                        let user = format!("u{u}");
                        h.join(c, presence[ch], &user);
                        e.insert(user);
                    }
                }
                Op::Disconnect(i) if i < open.len() => {
                    let c = open.remove(i);
                    h.core.disconnect(h.now, c);
                    h.pump();
                    subs.remove(&c.0);
                    users.retain(|(cc, _), _| *cc != c.0);
                }
                Op::Publish(ch) => {
                    seq += 1;
                    let name = format!("ev{seq}");
                    let target = if ch < 3 { channels[ch] } else { presence[ch - 3] };
                    h.publish(&[target], &name, "{}", None).unwrap_or_else(|e| panic!("{e}"));
                    for c in &open {
                        let n = h.inbox.get(&c.0).map_or(0, |v| v.iter().filter(|f| f["event"] == name.as_str()).count());
                        let expected = if ch < 3 {
                            subs.get(&c.0).is_some_and(|s| s.contains(target))
                        } else {
                            users.contains_key(&(c.0, target.to_string()))
                        };
                        prop_assert_eq!(n, usize::from(expected), "conn {} channel {}", c.0, target);
                    }
                }
                _ => {}
            }
        }
        for p in presence {
            let mut want: Vec<String> = users.iter().filter(|((_, ch), _)| ch == p).map(|(_, u)| u.clone()).collect::<BTreeSet<_>>().into_iter().collect();
            want.sort();
            let mut got = h.core.channel_users(AppIdx(0), p).unwrap_or_default();
            got.sort();
            prop_assert_eq!(got, want);
        }
    }
}
