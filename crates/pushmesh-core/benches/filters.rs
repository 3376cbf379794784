//! Subscriptions by filter (issue #13): CPU per publish and per delivery
//! with 10,000 subscribers of one channel, without filters and sharing 10
//! filters (one evaluation per distinct filter, then the walk).

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pushmesh_core::filter::Tags;
use pushmesh_core::{AppIdx, Core};

mod common;
use common::{core, drain, request, subscribers};

const SUBSCRIBERS: usize = 10_000;

/// A core with `SUBSCRIBERS` on "big"; `filters`: how many distinct
/// `{"zone":"zN"}` filters they share (0: none).
fn setup(filters: usize) -> Core {
    let mut core = core();
    subscribers(&mut core, Instant::now(), SUBSCRIBERS, |i| {
        if filters == 0 {
            r#"{"event":"pusher:subscribe","data":{"channel":"big"}}"#.to_string()
        } else {
            format!(
                r#"{{"event":"pusher:subscribe","data":{{"channel":"big","filter":{{"zone":"z{}"}}}}}}"#,
                i % filters
            )
        }
    });
    core
}

fn filtered_fanout(c: &mut Criterion) {
    let channels = vec!["big".to_string()];
    let req = request(&channels, r#"{"x":1}"#);
    let now = Instant::now();
    let mut g = c.benchmark_group("10k subscribers");

    let mut plain = setup(0);
    g.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    g.bench_function("no filters, untagged (10,000 deliveries)", |b| {
        b.iter(|| {
            black_box(plain.publish(now, AppIdx(0), &req).is_ok());
            drain(&mut plain)
        })
    });
    let tags = Tags::parse_json(r#"{"zone":"z3"}"#).unwrap_or_default();
    g.bench_function("no filters, tagged (10,000 deliveries)", |b| {
        b.iter(|| {
            black_box(
                plain
                    .publish_with(now, AppIdx(0), &req, Some(&tags))
                    .is_ok(),
            );
            drain(&mut plain)
        })
    });
    drop(plain);

    let mut ten = setup(10);
    assert_eq!(
        {
            let _ = ten.publish_with(now, AppIdx(0), &req, Some(&tags));
            drain(&mut ten)
        },
        SUBSCRIBERS / 10
    );
    g.throughput(Throughput::Elements((SUBSCRIBERS / 10) as u64));
    g.bench_function("10 shared filters, tagged (1,000 deliveries)", |b| {
        b.iter(|| {
            black_box(ten.publish_with(now, AppIdx(0), &req, Some(&tags)).is_ok());
            drain(&mut ten)
        })
    });
    let nobody = Tags::parse_json(r#"{"zone":"none"}"#).unwrap_or_default();
    g.throughput(Throughput::Elements(1));
    g.bench_function("10 shared filters, tagged, no match (0 deliveries)", |b| {
        b.iter(|| {
            black_box(
                ten.publish_with(now, AppIdx(0), &req, Some(&nobody))
                    .is_ok(),
            );
            drain(&mut ten)
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = filtered_fanout
}
criterion_main!(benches);
