//! A router shard's task: a thin loop around its [`ShardMachine`]. It
//! takes commands from its bounded queue (in batches), hands each to the
//! machine, sleeps until the machine's `poll_timeout`, and ends each batch
//! through its sink. What a command does is the machine's business.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use pushmesh_core::machine::{ShardInput, ShardMachine};
use tokio::sync::mpsc;

use super::{Cmd, DriverSink, KindSlots, Links, BATCH};
use crate::conn::ConnRef;

fn run_cmd(machine: &mut ShardMachine<ConnRef>, now: Instant, cmd: Cmd, sink: &mut DriverSink<'_>) {
    match cmd {
        Cmd::Input(ShardInput::Request(h, req)) => {
            let conn = h.clone();
            machine.handle(now, ShardInput::Request(h, req), sink);
            // Its answer is queued: the connection may read its next request.
            conn.handled();
        }
        Cmd::Input(input) => machine.handle(now, input, sink),
        Cmd::Query(q) => q(machine.shard(), now),
    }
}

/// A batch of peer changes is a lot of work: others get the CPU after it.
fn heavy(cmd: &Cmd) -> bool {
    matches!(cmd, Cmd::Input(ShardInput::Apply(_)))
}

pub(super) async fn run_shard(
    mut machine: ShardMachine<ConnRef>,
    mut rx: mpsc::Receiver<Cmd>,
    links: Arc<Links>,
    slots: Arc<KindSlots>,
) {
    // One timer, moved when the machine's next deadline changes.
    let far = || tokio::time::Instant::now() + std::time::Duration::from_secs(86_400);
    let timer = tokio::time::sleep_until(far());
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    loop {
        let due = machine.poll_timeout();
        if due != armed {
            armed = due;
            timer
                .as_mut()
                .reset(due.map_or_else(far, tokio::time::Instant::from_std));
        }
        let mut sink = DriverSink::new(&links);
        tokio::select! {
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { break };
                let now = Instant::now();
                let mut busy = heavy(&cmd);
                run_cmd(&mut machine, now, cmd, &mut sink);
                for _ in 1..BATCH {
                    if busy {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(cmd) => {
                            busy = heavy(&cmd);
                            run_cmd(&mut machine, now, cmd, &mut sink);
                        }
                        Err(_) => break,
                    }
                }
                if busy {
                    sink.finish();
                    tokio::task::yield_now().await;
                    continue;
                }
            }
            _ = &mut timer, if armed.is_some() => {
                // The timer says the deadline came (it may round it down).
                let now = armed.map_or_else(Instant::now, |due| due.max(Instant::now()));
                machine.handle_timeout(now, &mut sink);
            }
        }
        sink.finish();
        let shard = machine.shard();
        for (slot, k) in slots.0.iter().zip(shard.stats()) {
            slot[0].store(k.channels, Ordering::Relaxed);
            slot[1].store(k.subscriptions, Ordering::Relaxed);
        }
        slots.1.store(shard.history_stats());
    }
}
