//! Targets following the apps: kept, re-signed, started, retired.

use std::sync::Arc;

use pushmesh_core::{AppIdx, Apps};

use super::Webhooks;
use crate::config::{development_app, AppIo, Config, WebhookConfig};

fn hook(url: &str) -> WebhookConfig {
    WebhookConfig {
        url: url.into(),
        event_types: None,
        headers: Default::default(),
        batch_ms: 0,
    }
}

fn io(urls: &[&str]) -> AppIo {
    AppIo {
        webhooks: urls.iter().map(|u| hook(u)).collect(),
        ..AppIo::default()
    }
}

fn webhooks(urls: &[&str]) -> Webhooks {
    let config = Config {
        app_io: vec![io(urls)],
        ..Config::default()
    };
    Webhooks::new(&config, reqwest::Client::new())
}

fn targets(w: &Webhooks, slot: usize) -> Vec<Arc<super::Target>> {
    w.slots
        .load()
        .targets
        .get(slot)
        .cloned()
        .unwrap_or_default()
}

#[test]
fn an_unchanged_url_keeps_its_target_and_takes_the_new_secret() {
    let w = webhooks(&["http://a/", "http://b/"]);
    let before = targets(&w, 0);
    assert_eq!(before.len(), 2);
    let mut app = development_app();
    app.secret = "rotated".into();
    let apps = Apps::new(vec![app]);
    let next = io(&["http://b/", "http://c/"]);
    w.update(&apps, |_| Some(&next));
    let after = targets(&w, 0);
    assert_eq!(after.len(), 2);
    assert!(Arc::ptr_eq(&after[0], &before[1]), "b kept");
    assert_eq!(after[0].signing().secret, "rotated");
    assert_eq!(after[1].url(), "http://c/");
    assert!(
        before[0].retired.load(std::sync::atomic::Ordering::Relaxed),
        "a retired"
    );
    assert!(!after[0].retired.load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(crate::node::lock(&w.retired).len(), 1);
}

#[test]
fn a_removed_app_retires_its_targets_and_keeps_its_count() {
    let w = webhooks(&["http://a/"]);
    let before = targets(&w, 0);
    w.slots.load().sent[0].store(7, std::sync::atomic::Ordering::Relaxed);
    let mut apps = Apps::new(vec![development_app()]);
    apps.remove(&development_app().id);
    let none = AppIo::default();
    w.update(&apps, |_| Some(&none));
    assert!(targets(&w, 0).is_empty());
    assert!(before[0].retired.load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(
        w.app_sent(AppIdx(0)),
        7,
        "the app's delivered count survives"
    );
}

#[test]
fn a_closed_target_takes_no_event() {
    let w = webhooks(&["http://a/"]);
    let t = targets(&w, 0).remove(0);
    t.lock().closed = true;
    let event = pushmesh_protocol::webhook::WebhookEvent::ChannelOccupied {
        channel: "c".into(),
    };
    assert!(!t.enqueue("1".into(), event, &w.stats, &w.confirm));
    assert!(t.is_empty());
}
