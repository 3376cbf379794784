//! Subscriptions by filter, tags and identity on one node (issue #13).

use serde_json::{json, Value};

use super::{app, Harness, KEY, SECRET};
use crate::filter::Tags;
use crate::session::Identity;
use crate::{AppIdx, ConnId, PublishRequest};
use pushmesh_protocol::sign;

fn tags(json: &str) -> Tags {
    Tags::parse_json(json).unwrap_or_else(|e| panic!("{e}"))
}

impl Harness {
    fn subscribe_filtered(&mut self, c: ConnId, channel: &str, filter: Value) {
        self.frame(
            c,
            json!({"event":"pusher:subscribe","data":{"channel":channel,"filter":filter}}),
        );
    }

    fn publish_with_tags(&mut self, channel: &str, name: &str, t: &str) {
        let channels = vec![channel.to_string()];
        let r = self.core.publish_with(
            self.now,
            AppIdx(0),
            &PublishRequest {
                name,
                data: "{}",
                channels: &channels,
                exclude_socket: None,
            },
            Some(&tags(t)),
        );
        assert!(r.is_ok(), "{r:?}");
        self.pump();
    }

    /// How many `name` events `c` received (its inbox is kept).
    fn got(&self, c: ConnId, name: &str) -> usize {
        self.inbox
            .get(&c.0)
            .map_or(0, |v| v.iter().filter(|f| f["event"] == name).count())
    }
}

#[test]
fn a_filter_selects_tagged_events_and_plain_subscribers_get_everything() {
    let mut h = Harness::new(vec![app()]);
    let [eu, us, any, kinds] = h.opens();
    h.subscribe_filtered(eu, "orders", json!({"zone":"eu"}));
    h.subscribe_filtered(us, "orders", json!({"zone":"us"}));
    h.subscribe(any, "orders");
    h.subscribe_filtered(
        kinds,
        "orders",
        json!({"zone":"eu","kind":["order","refund"]}),
    );
    for c in [eu, us, any, kinds] {
        assert_eq!(h.got(c, "pusher_internal:subscription_succeeded"), 1);
    }
    h.publish_with_tags("orders", "e1", r#"{"zone":"eu","kind":"refund"}"#);
    assert_eq!(h.got(eu, "e1"), 1);
    assert_eq!(h.got(us, "e1"), 0);
    assert_eq!(h.got(any, "e1"), 1);
    assert_eq!(h.got(kinds, "e1"), 1);
    // A tag the filter does not list; a missing tag.
    h.publish_with_tags("orders", "e2", r#"{"zone":"eu","kind":"quote"}"#);
    h.publish_with_tags("orders", "e3", r#"{"kind":"order"}"#);
    assert_eq!(h.got(eu, "e2"), 1);
    assert_eq!(h.got(kinds, "e2"), 0);
    assert_eq!(h.got(eu, "e3") + h.got(us, "e3") + h.got(kinds, "e3"), 0);
    assert_eq!(h.got(any, "e2") + h.got(any, "e3"), 2);
    // Untagged: plain subscribers only.
    assert!(h.publish(&["orders"], "e4", "{}", None).is_ok());
    assert_eq!(h.got(any, "e4"), 1);
    assert_eq!(h.got(eu, "e4") + h.got(us, "e4") + h.got(kinds, "e4"), 0);
    // Tags are not in the frame clients receive.
    h.publish_with_tags("orders", "e5", r#"{"zone":"us"}"#);
    let f = h.events(us, "e5");
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].get("tags"), None);
    assert_eq!(f[0]["channel"], "orders");
}

#[test]
fn resubscribing_replaces_the_filter_and_counts_stay_per_channel() {
    let mut h = Harness::new(vec![app()]);
    let [c, d] = h.opens();
    h.subscribe_filtered(c, "news", json!({"zone":"eu"}));
    h.subscribe_filtered(d, "news", json!({"zone":"eu"}));
    h.subscribe_filtered(c, "news", json!({"zone":["us"]}));
    h.take(c);
    h.publish_with_tags("news", "eu", r#"{"zone":"eu"}"#);
    h.publish_with_tags("news", "us", r#"{"zone":"us"}"#);
    let got: Vec<String> = h
        .take(c)
        .iter()
        .filter_map(|v| v["event"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(got, vec!["us".to_string()]);
    assert_eq!(h.got(d, "eu"), 1);
    assert_eq!(h.got(d, "us"), 0);
    // One subscription per connection: the channel counts two.
    let info = h
        .core
        .channel(h.now, AppIdx(0), "news", false)
        .unwrap_or_default();
    assert_eq!(info.subscription_count, 2);
    // Without a filter again: every event.
    h.subscribe(c, "news");
    h.take(c);
    assert!(h.publish(&["news"], "plain", "{}", None).is_ok());
    assert_eq!(h.got(c, "plain"), 1);
    assert_eq!(h.got(d, "plain"), 0);
}

#[test]
fn an_invalid_filter_is_refused_and_the_connection_stays_usable() {
    let mut h = Harness::new(vec![app()]);
    let c = h.open();
    h.take(c);
    for bad in [
        json!("zone"),
        json!({"zone": 1}),
        json!({"zone": []}),
        json!({"": "x"}),
    ] {
        h.subscribe_filtered(c, "news", bad.clone());
        let errs = h.events(c, "pusher:subscription_error");
        assert_eq!(errs.len(), 1, "{bad}");
        assert_eq!(errs[0]["data"]["type"], "InvalidFilter");
        assert_eq!(errs[0]["data"]["status"], 400);
        assert!(errs[0]["data"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()));
    }
    // Refused on cache channels (the cached event has no tags).
    h.subscribe_filtered(c, "cache-news", json!({"zone":"eu"}));
    assert_eq!(h.got(c, "pusher:subscription_error"), 1);
    assert!(h.closed.is_empty());
    h.subscribe_filtered(c, "news", json!({"zone":"eu"}));
    assert_eq!(h.got(c, "pusher_internal:subscription_succeeded"), 1);
    h.publish_with_tags("news", "ok", r#"{"zone":"eu"}"#);
    assert_eq!(h.got(c, "ok"), 1);
}

#[test]
fn client_events_carry_no_tags_and_reach_plain_subscribers_only() {
    let mut h = Harness::new(vec![app()]);
    let [a, plain, filtered] = h.opens();
    h.subscribe(a, "private-room");
    h.subscribe(plain, "private-room");
    let auth = format!(
        "{KEY}:{}",
        sign::sign(
            SECRET,
            &sign::channel_string(&h.socket(filtered), "private-room")
        )
    );
    h.frame(
        filtered,
        json!({"event":"pusher:subscribe","data":{"channel":"private-room","auth":auth,"filter":{"zone":"eu"}}}),
    );
    assert_eq!(h.got(filtered, "pusher_internal:subscription_succeeded"), 1);
    h.frame(
        a,
        json!({"event":"client-hi","channel":"private-room","data":{}}),
    );
    assert_eq!(h.got(plain, "client-hi"), 1);
    assert_eq!(h.got(filtered, "client-hi"), 0);
    assert_eq!(h.got(a, "client-hi"), 0);
}

#[test]
fn identity_signs_in_and_device_tags_target_one_connection_of_a_user() {
    let mut h = Harness::new(vec![app()]);
    let [phone, laptop, other] = h.opens();
    let id = |device: &str, zone: &str| Identity {
        user: Some("u1".into()),
        device: Some(device.into()),
        zone: Some(zone.into()),
    };
    assert!(h.core.set_identity(phone, id("phone", "eu")).is_ok());
    assert!(h.core.set_identity(laptop, id("laptop", "us")).is_ok());
    h.pump();
    let ok = h.events(phone, "pusher:signin_success");
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0]["data"]["user_data"], r#"{"id":"u1"}"#);
    // Signed in: the user's own channel is allowed, like after pusher:signin.
    for c in [phone, laptop] {
        h.subscribe_filtered(c, "#server-to-user-u1", Value::Null);
        assert_eq!(h.got(c, "pusher_internal:subscription_succeeded"), 1);
    }
    h.subscribe(other, "#server-to-user-u1");
    assert_eq!(h.got(other, "pusher:subscription_error"), 1);
    h.take(laptop);
    h.publish_with_tags("#server-to-user-u1", "d", r#"{"device":"phone"}"#);
    assert_eq!((h.got(phone, "d"), h.got(laptop, "d")), (1, 0));
    h.publish_with_tags("#server-to-user-u1", "z", r#"{"zone":"us"}"#);
    assert_eq!((h.got(phone, "z"), h.got(laptop, "z")), (0, 1));
    h.publish_with_tags(
        "#server-to-user-u1",
        "dz",
        r#"{"device":"phone","zone":"us"}"#,
    );
    assert_eq!((h.got(phone, "dz"), h.got(laptop, "dz")), (0, 0));
    // Without device or zone tags: every connection of the user.
    h.publish_with_tags("#server-to-user-u1", "all", r#"{"other":"x"}"#);
    assert!(h
        .publish(&["#server-to-user-u1"], "all2", "{}", None)
        .is_ok());
    assert_eq!(h.got(phone, "all") + h.got(phone, "all2"), 2);
    assert_eq!(h.got(laptop, "all") + h.got(laptop, "all2"), 2);
    // terminate_connections reaches the identity's user.
    assert_eq!(h.core.terminate_user(AppIdx(0), "u1"), 2);
    h.pump();
    assert!(h.closed.contains_key(&phone.0) && h.closed.contains_key(&laptop.0));
}

#[test]
fn an_identity_with_a_bad_user_is_refused() {
    let mut h = Harness::new(vec![app()]);
    let c = h.open();
    let r = h.core.set_identity(
        c,
        Identity {
            user: Some(String::new()),
            ..Identity::default()
        },
    );
    assert!(r.is_err());
    let long = "d".repeat(crate::filter::MAX_VALUE_BYTES + 1);
    let r = h.core.set_identity(
        c,
        Identity {
            user: Some("u".into()),
            device: Some(long),
            zone: None,
        },
    );
    assert!(r.is_err());
    assert_eq!(h.got(c, "pusher:signin_success"), 0);
}

#[test]
fn a_thousand_subscribers_sharing_ten_filters_each_get_their_zone_only() {
    let mut h = Harness::new(vec![app()]);
    let mut conns = Vec::new();
    for i in 0..1000u32 {
        let c = h.open();
        h.subscribe_filtered(c, "big", json!({"zone": format!("z{}", i % 10)}));
        conns.push(c);
    }
    h.inbox.clear();
    h.publish_with_tags("big", "e", r#"{"zone":"z3"}"#);
    let reached: Vec<usize> = conns
        .iter()
        .enumerate()
        .filter(|(_, c)| h.inbox.get(&c.0).is_some_and(|v| !v.is_empty()))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(reached.len(), 100);
    assert!(reached.iter().all(|i| i % 10 == 3));
}
