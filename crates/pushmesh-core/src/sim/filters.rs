//! Filters across nodes (issue #13): a node gets a tagged event only if a
//! subscription there can match it; a node with a plain subscriber gets
//! everything; counts are per channel whatever the filters.

use serde_json::json;

use super::Net;
use crate::filter::Tags;
use crate::router::MAX_ADVERTISED;
use crate::{AppIdx, ConnId, PublishRequest};

impl Net {
    fn subscribe_filtered(
        &mut self,
        i: usize,
        c: ConnId,
        channel: &str,
        filter: serde_json::Value,
    ) {
        self.frame(
            i,
            c,
            json!({"event":"pusher:subscribe","data":{"channel":channel,"filter":filter}}),
        );
    }

    fn unsubscribe(&mut self, i: usize, c: ConnId, channel: &str) {
        self.frame(
            i,
            c,
            json!({"event":"pusher:unsubscribe","data":{"channel":channel}}),
        );
    }

    /// Publishes on node `i` with tags (JSON; "" for none) and returns how
    /// many data frames crossed the cluster for it.
    fn publish_tags(&mut self, i: usize, channel: &str, name: &str, tags: &str) -> usize {
        let before = self.data_frames;
        let channels = vec![channel.to_string()];
        let req = PublishRequest {
            name,
            data: "{}",
            channels: &channels,
            exclude_socket: None,
        };
        let tags =
            (!tags.is_empty()).then(|| Tags::parse_json(tags).unwrap_or_else(|e| panic!("{e}")));
        let r = self.publish(i, &req, tags.as_ref());
        assert!(r.is_ok(), "{r:?}");
        self.pump(i);
        self.settle();
        self.data_frames - before
    }
}

/// Three nodes, one connection on node 0 subscribed to `orders` with the
/// filter `{"zone":"eu"}` (not settled yet).
fn eu_subscriber() -> (Net, ConnId) {
    let mut net = Net::new();
    let eu = net.open(0);
    net.subscribe_filtered(0, eu, "orders", json!({"zone":"eu"}));
    (net, eu)
}

#[test]
fn a_node_gets_a_tagged_event_only_if_a_filter_there_can_match() {
    let (mut net, eu) = eu_subscriber();
    let us = net.open(1);
    net.subscribe_filtered(1, us, "orders", json!({"zone":["us","ca"]}));
    net.settle();
    // From node 2 (no subscriber): one frame, to node 0 only.
    assert_eq!(net.publish_tags(2, "orders", "e1", r#"{"zone":"eu"}"#), 1);
    assert_eq!(
        (net.received(0, eu, "e1"), net.received(1, us, "e1")),
        (1, 0)
    );
    assert_eq!(net.publish_tags(2, "orders", "e2", r#"{"zone":"ca"}"#), 1);
    assert_eq!(
        (net.received(0, eu, "e2"), net.received(1, us, "e2")),
        (0, 1)
    );
    // Tags nobody's filter matches, and untagged events: no frame at all.
    assert_eq!(net.publish_tags(2, "orders", "e3", r#"{"zone":"jp"}"#), 0);
    assert_eq!(net.publish_tags(2, "orders", "e4", r#"{"kind":"x"}"#), 0);
    assert_eq!(net.publish_tags(2, "orders", "e5", ""), 0);
    // Published where a filtered subscriber is: the other node only if it matches.
    assert_eq!(net.publish_tags(0, "orders", "e6", r#"{"zone":"eu"}"#), 0);
    assert_eq!(net.received(0, eu, "e6"), 1);
    // Counts stay per channel: 2 subscribers cluster-wide, seen from node 2
    // (counts are replicated on a tick).
    net.tick();
    net.settle();
    let info = net.nodes[2]
        .core
        .channel(net.now, AppIdx(0), "orders", false)
        .unwrap_or_default();
    assert!(info.occupied);
    assert_eq!(info.subscription_count, 2);
    assert_eq!(net.misrouted, 0);
}

#[test]
fn a_plain_subscriber_makes_its_node_take_everything_until_it_leaves() {
    let (mut net, eu) = eu_subscriber();
    let plain = net.open(0);
    net.settle();
    assert_eq!(net.publish_tags(2, "orders", "a", r#"{"zone":"us"}"#), 0);
    net.subscribe(0, plain, "orders");
    net.settle();
    assert_eq!(net.publish_tags(2, "orders", "b", r#"{"zone":"us"}"#), 1);
    assert_eq!(net.publish_tags(2, "orders", "c", ""), 1);
    assert_eq!(
        (net.received(0, plain, "b"), net.received(0, plain, "c")),
        (1, 1)
    );
    assert_eq!((net.received(0, eu, "b"), net.received(0, eu, "c")), (0, 0));
    net.unsubscribe(0, plain, "orders");
    net.settle();
    assert_eq!(net.publish_tags(2, "orders", "d", r#"{"zone":"us"}"#), 0);
    assert_eq!(net.publish_tags(2, "orders", "e", r#"{"zone":"eu"}"#), 1);
    // The filtered one leaves too: nothing more for node 0.
    net.unsubscribe(0, eu, "orders");
    net.settle();
    assert_eq!(net.publish_tags(2, "orders", "f", r#"{"zone":"eu"}"#), 0);
    assert_eq!(net.publish_tags(2, "orders", "g", ""), 0);
}

#[test]
fn past_the_advertised_limit_a_node_takes_every_event() {
    let mut net = Net::new();
    let n = MAX_ADVERTISED as usize + 1;
    for k in 0..n {
        let c = net.open(0);
        net.subscribe_filtered(0, c, "many", json!({"id": format!("v{k}")}));
    }
    net.settle();
    // Unmatched by any filter, but the node's interest is summarised as
    // "every event": it is sent (and dropped there: nobody matches).
    assert_eq!(net.publish_tags(1, "many", "x", r#"{"id":"none"}"#), 1);
    let c = net.nodes[0].conns[n - 1];
    assert_eq!(
        net.publish_tags(1, "many", "y", &format!(r#"{{"id":"v{}"}}"#, n - 1)),
        1
    );
    assert_eq!(net.received(0, c, "y"), 1);
}

#[test]
fn a_node_that_joins_later_learns_the_filters_in_its_sync() {
    let mut net = Net::new();
    net.cut(0, 2);
    net.cut(1, 2);
    net.settle();
    let eu = net.open(0);
    net.subscribe_filtered(0, eu, "orders", json!({"zone":"eu"}));
    net.settle();
    net.heal_all();
    net.settle();
    assert_eq!(net.publish_tags(2, "orders", "a", r#"{"zone":"us"}"#), 0);
    assert_eq!(net.publish_tags(2, "orders", "b", r#"{"zone":"eu"}"#), 1);
    assert_eq!(net.received(0, eu, "b"), 1);
}
