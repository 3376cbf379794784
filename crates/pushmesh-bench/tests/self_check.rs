//! The load generator checks itself against a deliberately faulty server.

use std::time::Duration;

use pushmesh_bench::ideal::{self, Faults};
use pushmesh_bench::load::{run_pubsub, LoadOptions, Report, Target};

async fn target(faults: Faults) -> Target {
    let addr = ideal::spawn(
        "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")),
        faults,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    Target {
        host: addr.ip().to_string(),
        port: addr.port(),
        app_id: "a".into(),
        key: "k".into(),
        secret: "s".into(),
        pid: None,
    }
}

fn opts(subscribers: usize, ts_offset_us: i64) -> LoadOptions {
    LoadOptions {
        subscribers,
        group: subscribers,
        rate: 200,
        duration: Duration::from_millis(500),
        payload: 0,
        source_addrs: 2,
        progress: false,
        ts_offset_us,
        publish_via: None,
        drain: Duration::from_secs(2),
        connect_concurrency: 4,
        filters: 0,
        compression: false,
        sse: false,
        json_order: false,
    }
}

/// `fanout` with `subscribers` (their clocks `ts_offset_us` ahead) against
/// the ideal server with `faults`.
async fn fanout(faults: Faults, subscribers: usize, ts_offset_us: i64) -> Report {
    let t = target(faults).await;
    run_pubsub("fanout", &t, &opts(subscribers, ts_offset_us))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn a_correct_server_shows_no_loss() {
    let r = fanout(Faults::default(), 4, 0).await;
    assert!(r.published > 10);
    assert_eq!(r.expected, r.published * 4);
    assert_eq!((r.lost, r.duplicated), (0, 0));
    assert_eq!(r.delivered, r.expected);
}

#[tokio::test]
async fn detects_lost_messages() {
    let r = fanout(
        Faults {
            drop_every: Some(5),
            dup_every: None,
        },
        3,
        0,
    )
    .await;
    assert_eq!(
        r.lost,
        r.published / 5,
        "every 5th message dropped for one subscriber"
    );
    assert_eq!(r.duplicated, 0);
}

#[tokio::test]
async fn detects_duplicated_messages() {
    let r = fanout(
        Faults {
            drop_every: None,
            dup_every: Some(4),
        },
        3,
        0,
    )
    .await;
    assert_eq!(r.duplicated, r.published / 4);
    assert_eq!(r.lost, 0);
}

#[tokio::test]
async fn latency_comes_from_the_embedded_timestamps() {
    // Events claim to have been sent 2 s earlier than they were: the
    // measured latency must include those 2 s, which no delay on loopback could.
    let r = fanout(Faults::default(), 2, 2_000_000).await;
    assert!(r.latency_ms.p50 >= 2000.0, "p50 {} ms", r.latency_ms.p50);
    assert!(
        r.publish_ms.p50 < 2000.0,
        "the HTTP call itself was not slow"
    );
}
