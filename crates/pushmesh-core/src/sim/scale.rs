//! The cost of the cluster in N, measured on the shipped composition
//! (`Core`) in virtual time: frames and bytes per subscribe, and the frames
//! and ticks a restarted node needs to converge (leave, then join with a
//! new epoch). Small by default (10 nodes); `PUSHMESH_SIM_SCALE_NODES`
//! sets N, and the `#[ignore]`d test runs 100 nodes
//! (`cargo test -p pushmesh-core --release sim::scale -- --ignored --nocapture`).
//! See docs/scaling.md for the model these figures check.

use bytes::Bytes;

use super::*;

/// What one run measured.
#[derive(Debug)]
struct ScaleFigures {
    nodes: usize,
    /// Control bytes the subscribing node sent, per subscribe (all peers).
    bytes_per_subscribe: f64,
    /// Frames delivered in the whole network per subscribe (deltas, acks).
    frames_per_subscribe: f64,
    /// Frames delivered from a restarted node's links coming up to quiet.
    frames_to_converge: usize,
    /// Ticks (250 ms of virtual time each) until it was joined again.
    ticks_to_join: usize,
}

/// Delivers everything in flight; returns how many frames that was.
fn settle_counting(net: &mut Net) -> usize {
    let mut frames = 0;
    while net.step() {
        frames += 1;
        assert!(frames < 50_000_000, "network did not settle");
    }
    frames
}

fn control_bytes_from(net: &Net, i: usize) -> usize {
    net.links
        .iter()
        .filter(|((a, _), _)| *a == i)
        .map(|(_, w)| w.control.iter().map(Bytes::len).sum::<usize>())
        .sum()
}

fn subscribe_public(net: &mut Net, i: usize, c: ConnId, channel: &str) {
    let now = net.now;
    net.nodes[i].core.handle_frame(
        now,
        c,
        &format!(r#"{{"event":"pusher:subscribe","data":{{"channel":"{channel}"}}}}"#),
    );
    net.pump(i);
}

fn run(nodes: usize, channels_per_node: usize, subscribes: usize) -> ScaleFigures {
    let mut net = Net::with(nodes, 11, Faults::default());
    // Standing interest: each node holds its own channels.
    for i in 0..nodes {
        let c = net.open(i);
        for k in 0..channels_per_node {
            subscribe_public(&mut net, i, c, &format!("held-{i}-{k}"));
        }
    }
    net.settle();
    // Subscribes on node 0, one after another, each settled.
    let c = net.open(0);
    let (mut bytes, mut frames) = (0, 0);
    for k in 0..subscribes {
        subscribe_public(&mut net, 0, c, &format!("fresh-{k}"));
        bytes += control_bytes_from(&net, 0);
        frames += settle_counting(&mut net);
    }
    assert_eq!(
        net.received(0, c, "pusher_internal:subscription_succeeded"),
        subscribes,
        "every subscribe answered"
    );
    for j in 1..nodes {
        let seen = net.nodes[j]
            .core
            .channels(net.now, AppIdx(0), Some("fresh-"), false)
            .map(|v| v.len())
            .unwrap_or(0);
        assert_eq!(seen, subscribes, "node {j} knows every fresh channel");
    }
    // Leave and join: the last node restarts (new epoch, its state lost).
    let last = nodes - 1;
    net.restart(last);
    let frames_to_converge = settle_counting(&mut net);
    let mut ticks_to_join = 0;
    while !net.check_joined(last) {
        ticks_to_join += 1;
        assert!(ticks_to_join < 400, "restarted node never joined");
        net.tick();
        net.settle();
    }
    let held = net.nodes[last]
        .core
        .channels(net.now, AppIdx(0), Some("held-0-"), false)
        .map(|v| v.len())
        .unwrap_or(0);
    assert_eq!(
        held, channels_per_node,
        "the joined node learned node 0's interest"
    );
    ScaleFigures {
        nodes,
        bytes_per_subscribe: bytes as f64 / subscribes as f64,
        frames_per_subscribe: frames as f64 / subscribes as f64,
        frames_to_converge,
        ticks_to_join,
    }
}

#[test]
fn subscribe_cost_is_linear_in_peers_and_a_restarted_node_converges() {
    let nodes: usize = std::env::var("PUSHMESH_SIM_SCALE_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .max(3);
    let small = run(3, 50, 20);
    let big = run(nodes, 50, 20);
    println!("sim scale: {small:?}");
    println!("sim scale: {big:?}");
    // One interest delta per peer: bytes per subscribe per peer stay flat.
    let per_peer = |f: &ScaleFigures| f.bytes_per_subscribe / (f.nodes - 1) as f64;
    assert!(
        per_peer(&big) <= per_peer(&small) * 1.5,
        "bytes per subscribe per peer grew with N: {small:?} vs {big:?}"
    );
    // At least a delta out and an ack back per peer.
    assert!(big.frames_per_subscribe >= 2.0 * (nodes - 1) as f64);
    // A restart re-links N-1 peers: at least their state comes in.
    assert!(big.frames_to_converge >= nodes - 1, "{big:?}");
    assert!(big.ticks_to_join < 400, "{big:?}");
}

#[test]
#[ignore = "100 nodes: minutes; run with --ignored --nocapture"]
fn hundred_nodes() {
    let f = run(100, 200, 20);
    println!("sim scale: {f:?}");
    assert!(f.frames_per_subscribe >= 2.0 * 99.0);
}
