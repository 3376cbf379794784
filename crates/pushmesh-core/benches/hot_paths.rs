//! Micro-benchmarks of the hot paths: frame encoding, fan-out to N local
//! connections, interest lookup with many channels, signature checks.

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pushmesh_core::{AppIdx, NodeId};
use pushmesh_protocol::{server, sign};

mod common;
use common::{core, drain, request, subscribers};

fn frame_encoding(c: &mut Criterion) {
    let data = r#"{"seq":12345,"ts":1700000000000000,"msg":"hello world"}"#;
    c.bench_function("encode channel_event (60 B data)", |b| {
        b.iter(|| {
            server::channel_event(
                black_box("bench"),
                black_box("my-channel"),
                black_box(data),
                None,
            )
        })
    });
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout to local connections");
    for n in [1usize, 100, 1000, 10_000] {
        let mut core = core();
        let now = Instant::now();
        subscribers(&mut core, now, n, |_| {
            r#"{"event":"pusher:subscribe","data":{"channel":"fan"}}"#.to_string()
        });
        let channels = vec!["fan".to_string()];
        let req = request(&channels, r#"{"x":1}"#);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                black_box(core.publish(now, AppIdx(0), &req).is_ok());
                drain(&mut core)
            })
        });
    }
    g.finish();
}

fn interest_lookup(c: &mut Criterion) {
    // A node whose peers hold interest in 100k channels: routing one publish.
    let mut core = core();
    let now = Instant::now();
    for p in 0..3 {
        core.peer_up(now, NodeId::new(&format!("peer-{p}")), 1);
    }
    drain(&mut core);
    // Feed interest the way peers do: one sync per peer with 100k channels
    // (one part here; the chunk bound is the sender's choice).
    for p in 0..3 {
        let interest: Vec<(String, String)> = (0..100_000)
            .map(|k| ("1".to_string(), format!("ch-{p}-{k}")))
            .collect();
        let frame = pushmesh_core::PeerFrame::SyncChunk {
            epoch: 1,
            seq: 1,
            index: 0,
            last: true,
            state: pushmesh_core::cluster::Snapshot {
                interest,
                ..Default::default()
            },
        };
        let _ = core.handle_peer_frame(now, &NodeId::new(&format!("peer-{p}")), &frame.encode());
    }
    drain(&mut core);
    let hit = vec!["ch-1-54321".to_string()];
    let miss = vec!["nobody-here".to_string()];
    let (hit, miss) = (request(&hit, "{}"), request(&miss, "{}"));
    c.bench_function(
        "route publish, 300k remote channels, interested peer",
        |b| {
            b.iter(|| {
                let _ = core.publish(now, AppIdx(0), &hit);
                drain(&mut core)
            })
        },
    );
    c.bench_function("route publish, 300k remote channels, no interest", |b| {
        b.iter(|| {
            let _ = core.publish(now, AppIdx(0), &miss);
            drain(&mut core)
        })
    });
}

fn signatures(c: &mut Criterion) {
    let body = r#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
    let ts = "1353088179";
    let mut q = vec![
        ("auth_key".to_string(), "278d425bdf160c739803".to_string()),
        ("auth_timestamp".to_string(), ts.to_string()),
        ("auth_version".to_string(), "1.0".to_string()),
        ("body_md5".to_string(), sign::body_md5(body.as_bytes())),
    ];
    let s = sign::sign(
        "7ad3773142a6692b25b8",
        &sign::api_string_to_sign("POST", "/apps/3/events", &q),
    );
    q.push(("auth_signature".to_string(), s));
    c.bench_function("verify signed HTTP API request", |b| {
        b.iter(|| {
            sign::verify_api_request(
                "POST",
                "/apps/3/events",
                black_box(&q),
                body.as_bytes(),
                "278d425bdf160c739803",
                "7ad3773142a6692b25b8",
                1353088179,
            )
        })
    });
    let auth = format!(
        "278d425bdf160c739803:{}",
        sign::sign("7ad3773142a6692b25b8", "1234.1234:private-foobar")
    );
    c.bench_function("verify private channel auth", |b| {
        b.iter(|| {
            sign::verify_client_auth(
                "278d425bdf160c739803",
                "7ad3773142a6692b25b8",
                black_box(&auth),
                "1234.1234:private-foobar",
            )
        })
    });
}

criterion_group!(benches, frame_encoding, fanout, interest_lookup, signatures);
criterion_main!(benches);
