//! Deterministic tests of the core: no sockets, no clock, no runtime.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pushmesh_protocol::sign;
use pushmesh_protocol::webhook::WebhookEvent;
use pushmesh_protocol::CloseCode;
use serde_json::Value;

use crate::{AppConfig, AppIdx, ConnId, Core, OpenError, Output, PublishError, PublishRequest};

use crate::testing::{self, app, KEY, SECRET};

struct Harness {
    core: Core,
    now: Instant,
    next: u64,
    /// Everything each connection received, decoded.
    inbox: BTreeMap<u64, Vec<Value>>,
    closed: BTreeMap<u64, CloseCode>,
    hooks: Vec<WebhookEvent>,
}

fn decode(frame: &[u8]) -> Value {
    let mut v: Value = serde_json::from_slice(frame).unwrap_or(Value::Null);
    if let Some(Value::String(s)) = v.get("data").cloned() {
        if let Ok(inner) = serde_json::from_str::<Value>(&s) {
            v["data"] = inner;
        }
    }
    v
}

impl Harness {
    fn new(apps: Vec<AppConfig>) -> Self {
        Self {
            core: Core::new(Instant::now(), testing::config(apps, "n1", 7)),
            now: Instant::now(),
            next: 1,
            inbox: BTreeMap::new(),
            closed: BTreeMap::new(),
            hooks: Vec::new(),
        }
    }

    /// A node serving the fixture app as `change` leaves it.
    fn with(change: impl FnOnce(&mut AppConfig)) -> Self {
        let mut cfg = app();
        change(&mut cfg);
        Self::new(vec![cfg])
    }

    fn pump(&mut self) {
        while let Some(o) = self.core.poll_output() {
            match o {
                Output::Send { conn, frame } => {
                    self.inbox.entry(conn.0).or_default().push(decode(&frame))
                }
                Output::Close { conn, code, .. } => {
                    self.closed.insert(conn.0, code);
                }
                Output::Hook { event, .. } => self.hooks.push(event),
                Output::HookReleased { .. } => {}
                Output::Peer { .. } => {}
            }
        }
    }

    fn open(&mut self) -> ConnId {
        let c = ConnId(self.next);
        self.next += 1;
        self.core
            .open(self.now, AppIdx(0), c)
            .unwrap_or_else(|e| panic!("{e}"));
        self.pump();
        c
    }

    /// `N` connections, opened in turn.
    fn opens<const N: usize>(&mut self) -> [ConnId; N] {
        std::array::from_fn(|_| self.open())
    }

    fn socket(&self, c: ConnId) -> String {
        format!("7.{}", c.0)
    }

    fn frame(&mut self, c: ConnId, v: Value) {
        self.core.handle_frame(self.now, c, &v.to_string());
        self.pump();
    }

    fn subscribe(&mut self, c: ConnId, channel: &str) {
        let auth = format!(
            "{KEY}:{}",
            sign::sign(SECRET, &sign::channel_string(&self.socket(c), channel))
        );
        self.frame(
            c,
            serde_json::json!({"event":"pusher:subscribe","data":{"channel":channel,"auth":auth}}),
        );
    }

    fn join(&mut self, c: ConnId, channel: &str, user: &str) {
        let data = serde_json::json!({"user_id": user, "user_info": {"n": user}}).to_string();
        let sig = sign::sign(
            SECRET,
            &sign::presence_string(&self.socket(c), channel, &data),
        );
        self.frame(
            c,
            serde_json::json!({"event":"pusher:subscribe","data":{"channel":channel,"auth":format!("{KEY}:{sig}"),"channel_data":data}}),
        );
    }

    fn take(&mut self, c: ConnId) -> Vec<Value> {
        self.inbox.remove(&c.0).unwrap_or_default()
    }

    fn events(&mut self, c: ConnId, name: &str) -> Vec<Value> {
        self.take(c)
            .into_iter()
            .filter(|v| v["event"] == name)
            .collect()
    }

    fn publish(
        &mut self,
        channels: &[&str],
        name: &str,
        data: &str,
        exclude: Option<&str>,
    ) -> Result<(), PublishError> {
        let channels: Vec<String> = channels.iter().map(|s| s.to_string()).collect();
        let r = self.core.publish(
            self.now,
            AppIdx(0),
            &PublishRequest {
                name,
                data,
                channels: &channels,
                exclude_socket: exclude,
            },
        );
        self.pump();
        r.map(|_| ())
    }
}

#[test]
fn open_sends_connection_established() {
    let mut h = Harness::new(vec![app()]);
    let c = h.open();
    let got = h.take(c);
    assert_eq!(got[0]["event"], "pusher:connection_established");
    assert_eq!(got[0]["data"]["socket_id"], "7.1");
    assert_eq!(got[0]["data"]["activity_timeout"], 120);
}

#[test]
fn publish_shares_one_frame_and_honours_exclusion() {
    let mut h = Harness::new(vec![app()]);
    let conns: Vec<ConnId> = (0..3).map(|_| h.open()).collect();
    for c in &conns {
        h.subscribe(*c, "news");
        h.take(*c);
    }
    let exclude = h.socket(conns[0]);
    let channels = vec!["news".to_string()];
    h.core
        .publish(
            h.now,
            AppIdx(0),
            &PublishRequest {
                name: "e",
                data: "{}",
                channels: &channels,
                exclude_socket: Some(&exclude),
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let mut frames = Vec::new();
    while let Some(Output::Send { conn, frame }) = h.core.poll_output() {
        frames.push((conn, frame));
    }
    assert_eq!(frames.len(), 2, "the excluded socket gets nothing");
    assert!(frames.iter().all(|(c, _)| *c != conns[0]));
    assert_eq!(
        frames[0].1.as_ptr(),
        frames[1].1.as_ptr(),
        "one encoding shared by every recipient"
    );
}

#[test]
fn double_subscribe_does_not_duplicate() {
    let mut h = Harness::new(vec![app()]);
    let c = h.open();
    h.subscribe(c, "a");
    h.subscribe(c, "a");
    h.take(c);
    h.publish(&["a"], "e", "x", None)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(h.events(c, "e").len(), 1);
    // Leaving a channel never joined is harmless.
    h.frame(
        c,
        serde_json::json!({"event":"pusher:unsubscribe","data":{"channel":"never"}}),
    );
    assert!(h.take(c).is_empty());
}

#[test]
fn presence_member_events_once_per_user() {
    let mut h = Harness::new(vec![app()]);
    let [a, b1, b2] = h.opens();
    h.join(a, "presence-r", "alice");
    h.take(a);
    h.join(b1, "presence-r", "bob");
    let ok = h.events(b1, "pusher_internal:subscription_succeeded");
    assert_eq!(ok[0]["data"]["presence"]["count"], 2);
    h.join(b2, "presence-r", "bob");
    let added = h.events(a, "pusher_internal:member_added");
    assert_eq!(added.len(), 1, "one member_added for two tabs");
    assert_eq!(added[0]["data"]["user_id"], "bob");
    h.core.disconnect(h.now, b1);
    h.pump();
    assert!(h.events(a, "pusher_internal:member_removed").is_empty());
    h.core.disconnect(h.now, b2);
    h.pump();
    let removed = h.events(a, "pusher_internal:member_removed");
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0]["data"]["user_id"], "bob");
    assert_eq!(
        h.core.channel_users(AppIdx(0), "presence-r"),
        Ok(vec!["alice".to_string()])
    );
}

#[test]
fn presence_limit_and_bad_channel_data() {
    let mut h = Harness::with(|cfg| cfg.limits.max_presence_members = 1);
    let [a, b] = h.opens();
    h.join(a, "presence-x", "1");
    h.join(b, "presence-x", "2");
    let err = h.events(b, "pusher:subscription_error");
    assert_eq!(err[0]["data"]["status"], 403);
    // A signed but malformed channel_data is refused, not a panic.
    let data = "not json";
    let sig = sign::sign(
        SECRET,
        &sign::presence_string(&h.socket(b), "presence-y", data),
    );
    h.frame(b, serde_json::json!({"event":"pusher:subscribe","data":{"channel":"presence-y","auth":format!("{KEY}:{sig}"),"channel_data":data}}));
    assert_eq!(
        h.events(b, "pusher:subscription_error")[0]["data"]["status"],
        400
    );
}

#[test]
fn client_event_rules() {
    let mut h = Harness::new(vec![app()]);
    let [a, b] = h.opens();
    for c in [a, b] {
        h.subscribe(c, "private-p");
        h.subscribe(c, "pub");
        h.take(c);
    }
    let ev = |ch: &str| serde_json::json!({"event":"client-x","channel":ch,"data":{"k":1}});
    h.frame(a, ev("private-p"));
    assert!(h.take(a).is_empty(), "not echoed");
    let got = h.events(b, "client-x");
    assert_eq!(got[0]["data"]["k"], 1);
    h.frame(a, ev("pub"));
    assert_eq!(h.events(a, "pusher:error").len(), 1);
    assert!(h.take(b).is_empty());
    // Rate limit: 10 per second, counting the two above.
    for _ in 0..8 {
        h.frame(a, ev("private-p"));
    }
    assert!(!h.closed.contains_key(&a.0));
    h.frame(a, ev("private-p"));
    assert_eq!(h.closed.get(&a.0), Some(&CloseCode::ClientEventRateLimit));
    // A new second starts a new window.
    h.now += Duration::from_secs(1);
    h.frame(b, ev("private-p"));
    assert!(!h.closed.contains_key(&b.0));
}

#[test]
fn signin_server_to_user_and_watchlist() {
    let mut h = Harness::new(vec![app()]);
    let [w, u] = h.opens();
    h.take(w);
    let signin = |h: &mut Harness, c: ConnId, data: &str| {
        let sig = sign::sign(SECRET, &sign::signin_string(&h.socket(c), data));
        h.frame(c, serde_json::json!({"event":"pusher:signin","data":{"auth":format!("{KEY}:{sig}"),"user_data":data}}));
    };
    signin(&mut h, w, r#"{"id":"w","watchlist":["u"]}"#);
    let got = h.take(w);
    assert_eq!(got[0]["event"], "pusher:signin_success");
    assert_eq!(got[1]["data"]["events"][0]["name"], "online");
    assert_eq!(
        got[1]["data"]["events"][0]["user_ids"],
        serde_json::json!([])
    );
    signin(&mut h, u, r#"{"id":"u"}"#);
    let got = h.events(w, "pusher_internal:watchlist_events");
    assert_eq!(
        got[0]["data"]["events"][0]["user_ids"],
        serde_json::json!(["u"])
    );
    h.take(u);
    h.frame(
        u,
        serde_json::json!({"event":"pusher:subscribe","data":{"channel":"#server-to-user-u"}}),
    );
    assert_eq!(
        h.events(u, "pusher_internal:subscription_succeeded").len(),
        1
    );
    h.frame(
        w,
        serde_json::json!({"event":"pusher:subscribe","data":{"channel":"#server-to-user-u"}}),
    );
    assert_eq!(h.events(w, "pusher:subscription_error").len(), 1);
    assert_eq!(h.core.terminate_user(AppIdx(0), "u"), 1);
    h.pump();
    assert_eq!(h.closed.get(&u.0), Some(&CloseCode::Unauthorized));
    h.core.disconnect(h.now, u);
    h.pump();
    let got = h.events(w, "pusher_internal:watchlist_events");
    assert_eq!(got[0]["data"]["events"][0]["name"], "offline");
    // A bad signature closes with 4009.
    let x = h.open();
    h.frame(x, serde_json::json!({"event":"pusher:signin","data":{"auth":"key:00","user_data":"{\"id\":\"x\"}"}}));
    assert_eq!(h.closed.get(&x.0), Some(&CloseCode::Unauthorized));
}

#[test]
fn cache_channels_and_expiry() {
    let mut h = Harness::new(vec![app()]);
    h.publish(&["cache-c"], "e", "1", None)
        .unwrap_or_else(|e| panic!("{e}"));
    let c = h.open();
    h.subscribe(c, "cache-c");
    let got = h.take(c);
    assert_eq!(got[2]["event"], "e");
    h.subscribe(c, "cache-empty");
    assert_eq!(h.events(c, "pusher:cache_miss").len(), 1);
    h.now += crate::CACHE_TTL;
    let d = h.open();
    h.subscribe(d, "cache-c");
    assert_eq!(
        h.events(d, "pusher:cache_miss").len(),
        1,
        "expired after the TTL"
    );
}

#[test]
fn quotas_and_validation() {
    let mut cfg = app();
    cfg.max_connections = Some(1);
    let mut disabled = app();
    disabled.id = "2".into();
    disabled.key = "k2".into();
    disabled.enabled = false;
    let mut h = Harness::new(vec![cfg, disabled]);
    h.open();
    assert_eq!(
        h.core.open(h.now, AppIdx(0), ConnId(99)),
        Err(OpenError::AppOverQuota)
    );
    assert_eq!(
        h.core.open(h.now, AppIdx(1), ConnId(98)),
        Err(OpenError::AppDisabled)
    );
    assert_eq!(h.publish(&[], "e", "", None), Err(PublishError::NoChannels));
    assert_eq!(
        h.publish(&["a"], "", "", None),
        Err(PublishError::EventName(200))
    );
    let big = "x".repeat(10 * 1024 + 1);
    assert_eq!(
        h.publish(&["a"], "e", &big, None),
        Err(PublishError::DataTooLarge(10 * 1024))
    );
    assert_eq!(
        h.publish(&["private-encrypted-a", "b"], "e", "", None),
        Err(PublishError::EncryptedMulti)
    );
    let many: Vec<String> = (0..101).map(|i| format!("c{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(
        h.publish(&many, "e", "", None),
        Err(PublishError::TooManyChannels(100))
    );
    assert!(matches!(
        h.publish(&["bad name"], "e", "", None),
        Err(PublishError::InvalidChannel { .. })
    ));
}

#[test]
fn subscription_count_on_tick() {
    let mut h = Harness::with(|cfg| cfg.subscription_count_events = true);
    let [a, b] = h.opens();
    h.subscribe(a, "c");
    h.subscribe(b, "c");
    h.take(a);
    h.now += crate::machine::TICK;
    h.core.tick(h.now);
    h.pump();
    let got = h.events(a, "pusher_internal:subscription_count");
    assert_eq!(got.len(), 1, "changes are coalesced until the tick");
    assert_eq!(got[0]["data"]["subscription_count"], 2);
}

#[test]
fn wsify_and_pusher_share_channels() {
    let mut h = Harness::new(vec![app()]);
    let p = h.open();
    h.subscribe(p, "hello");
    h.take(p);
    let raw = ConnId(100);
    let env = ConnId(101);
    h.core
        .open_wsify(h.now, AppIdx(0), raw, false)
        .unwrap_or_else(|e| panic!("{e}"));
    h.core
        .open_wsify(h.now, AppIdx(0), env, true)
        .unwrap_or_else(|e| panic!("{e}"));
    h.pump();
    assert!(h.take(raw).is_empty(), "wsify has no handshake frame");
    assert_eq!(h.core.wsify_join(raw, "hello", None), Ok(()));
    assert_eq!(
        h.core.wsify_join(raw, "hello", None),
        Ok(()),
        "joining twice is harmless"
    );
    assert_eq!(h.core.wsify_join(env, "hello", None), Ok(()));
    assert!(h.core.wsify_join(env, "private-x", None).is_err());
    h.core.wsify_leave(env, "never-joined");
    // A Pusher publish reaches wsify clients once, as raw content or envelope.
    h.publish(&["hello"], "greet", r#"{"a":1}"#, None)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(h.take(raw), vec![serde_json::json!({"a":1})]);
    assert_eq!(
        h.take(env),
        vec![serde_json::json!({"channel":"hello","content":{"a":1}})]
    );
    h.take(p);
    // A wsify broadcast reaches Pusher clients as the configured event.
    let content = serde_json::value::RawValue::from_string(r#"[1,"two"]"#.into())
        .unwrap_or_else(|e| panic!("{e}"));
    h.core
        .wsify_broadcast(h.now, AppIdx(0), "hello", &content)
        .unwrap_or_else(|e| panic!("{e}"));
    h.pump();
    let got = h.take(p);
    assert_eq!(got[0]["event"], "broadcast");
    assert_eq!(got[0]["data"], serde_json::json!([1, "two"]));
    assert_eq!(
        h.take(raw),
        vec![serde_json::json!([1, "two"])],
        "the sender gets it too, as in wsify"
    );
    let info = h
        .core
        .channel(h.now, AppIdx(0), "hello", false)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(info.subscription_count, 3);
    h.core.disconnect(h.now, raw);
    h.core.disconnect(h.now, env);
    h.pump();
    let info = h
        .core
        .channel(h.now, AppIdx(0), "hello", false)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(info.subscription_count, 1);
}

#[test]
fn hooks_for_channel_and_member_lifecycle() {
    let mut h = Harness::with(|cfg| cfg.webhooks = true);
    let [a, b] = h.opens();
    h.join(a, "presence-h", "u1");
    h.join(b, "presence-h", "u1");
    h.subscribe(a, "cache-h");
    let sig = sign::sign(SECRET, &sign::channel_string(&h.socket(a), "private-h"));
    h.frame(a, serde_json::json!({"event":"pusher:subscribe","data":{"channel":"private-h","auth":format!("{KEY}:{sig}")}}));
    h.frame(
        a,
        serde_json::json!({"event":"client-e","channel":"private-h","data":"d"}),
    );
    h.core.disconnect(h.now, a);
    h.core.disconnect(h.now, b);
    h.pump();
    h.now += crate::machine::TICK;
    h.core.tick(h.now);
    h.pump();
    let names: Vec<&str> = h.hooks.iter().map(|e| e.name()).collect();
    assert_eq!(
        names[..6],
        [
            "channel_occupied",
            "member_added",
            "channel_occupied",
            "cache_miss",
            "channel_occupied",
            "client_event"
        ]
    );
    // Disconnects leave channels in no particular order; count what they produced.
    let mut rest: Vec<&str> = names[6..].to_vec();
    rest.sort_unstable();
    assert_eq!(
        rest,
        [
            "channel_vacated",
            "channel_vacated",
            "channel_vacated",
            "member_removed",
            "subscription_count",
            "subscription_count"
        ]
    );
    assert!(
        matches!(&h.hooks[5], WebhookEvent::ClientEvent { socket_id, data, .. } if socket_id == "7.1" && data == "d")
    );
}

mod filters;
mod property;
