//! What the core's benchmarks share: the node they measure, a drain of its
//! outputs, subscribers by the thousand and the publish they time.

use std::hint::black_box;
use std::time::Instant;

use pushmesh_core::{testing, AppIdx, ConnId, Core, Output, PublishRequest};

/// The fixture app alone on node `bench`.
pub fn core() -> Core {
    testing::core(std::time::Instant::now(), testing::app(), "bench")
}

/// Takes every output; how many frames were sent (each one `black_box`ed).
pub fn drain(c: &mut Core) -> usize {
    let mut n = 0;
    while let Some(o) = c.poll_output() {
        if let Output::Send { frame, .. } = o {
            black_box(frame);
            n += 1;
        }
    }
    n
}

/// Opens connections 1 to `n`; connection `i + 1` sends the frame
/// `subscribe(i)`. Drains what that produced.
pub fn subscribers(core: &mut Core, now: Instant, n: usize, subscribe: impl Fn(usize) -> String) {
    for i in 0..n {
        let conn = ConnId(i as u64 + 1);
        let _ = core.open(now, AppIdx(0), conn);
        core.handle_frame(now, conn, &subscribe(i));
    }
    drain(core);
}

/// Event `e` with `data` on `channels`, nobody left out.
pub fn request<'a>(channels: &'a [String], data: &'a str) -> PublishRequest<'a> {
    PublishRequest {
        name: "e",
        data,
        channels,
        exclude_socket: None,
    }
}
