//! A router shard's task: it takes commands from its bounded queue (in
//! batches), runs them on its `Shard`, and hands the batch's effects on.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use pushmesh_core::sink::Sink;
use pushmesh_core::{
    ChannelInfo, ClientEvent, Event, FrameKind, Publish, Request, Shard, Subscribe,
};
use tokio::sync::mpsc;

use super::{Accepted, Cmd, DriverSink, KindSlots, Links, BATCH, TICK};
use crate::conn::ConnRef;

pub(super) fn run_cmd(
    shard: &mut Shard<ConnRef>,
    now: Instant,
    cmd: Cmd,
    sink: &mut DriverSink<'_>,
) {
    match cmd {
        Cmd::Req(h, req) => match req {
            Request::Subscribe {
                app,
                channel,
                proto,
                presence,
                position,
                selector,
            } => {
                let s = Subscribe {
                    conn: h,
                    app,
                    channel,
                    proto,
                    presence,
                    selector,
                    position,
                };
                shard.subscribe(now, s, sink)
            }
            Request::Unsubscribe { app, channel } => {
                shard.unsubscribe(h.0.id(), app, &channel, sink)
            }
            Request::ClientEvent {
                app,
                channel,
                event,
                data,
                socket_id,
            } => {
                let e = ClientEvent {
                    app,
                    channel: &channel,
                    event: &event,
                    data: &data,
                    socket_id: &socket_id,
                };
                shard.client_event(now, &h, e, sink)
            }
            Request::SignIn { .. } | Request::SignOut { .. } => {}
        },
        Cmd::Publish(p) => {
            let ev = Event {
                app: p.app,
                channel: &p.channel,
                name: &p.event,
                data: &p.data,
                content: p.content.as_deref(),
                exclude_socket: p.exclude.as_deref(),
                user_id: None,
            };
            let publish = Publish {
                event: ev,
                tags: p.tags.as_deref(),
            };
            // Answered once it is handed to the peers (it cannot fail
            // after that), before the local fan-out; with `info`, after.
            match shard.hand_to_peers(now, &publish, sink) {
                Err(e) => {
                    let _ = p.reply.send(Err(e));
                }
                Ok(()) if !p.info => {
                    let receipts = sink.take_receipts();
                    let info = ChannelInfo::default();
                    let _ = p.reply.send(Ok(Accepted { info, receipts }));
                    shard.deliver_local(now, &publish, sink);
                }
                Ok(()) => {
                    let receipts = sink.take_receipts();
                    shard.deliver_local(now, &publish, sink);
                    let info = shard.info(now, p.app, &p.channel);
                    let _ = p.reply.send(Ok(Accepted { info, receipts }));
                }
            }
        }
        Cmd::Remote(frame) => shard.handle_channel_frame(now, frame, sink),
        Cmd::Apply(changes) => {
            for (peer, delta) in changes {
                shard.apply_remote(&peer, delta, sink);
            }
        }
        Cmd::Peers(p, origins) => {
            shard.set_peers(p);
            shard.set_live_origins(origins);
            shard.presence_peers_changed(now, sink);
        }
        Cmd::SendCache(peer, epoch, done) => {
            shard.send_cache(now, &peer, sink);
            shard.send_history(now, &peer, epoch, sink);
            sink.peer(&peer, FrameKind::Data, &done);
        }
        Cmd::ShareOrigin(o) => shard.share_origin(now, o, sink),
        Cmd::Query(q) => q(shard, now),
    }
}

pub(super) async fn run_shard(
    mut shard: Shard<ConnRef>,
    mut rx: mpsc::Receiver<Cmd>,
    links: Arc<Links>,
    slots: Arc<KindSlots>,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut sink = DriverSink::new(&links);
        tokio::select! {
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { break };
                let now = Instant::now();
                let mut heavy = matches!(cmd, Cmd::Apply(_));
                run_cmd(&mut shard, now, cmd, &mut sink);
                for _ in 1..BATCH {
                    // A batch of peer changes is a lot of work: others get
                    // the CPU in between.
                    if heavy {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(cmd) => {
                            heavy = matches!(cmd, Cmd::Apply(_));
                            run_cmd(&mut shard, now, cmd, &mut sink);
                        }
                        Err(_) => break,
                    }
                }
                if heavy {
                    sink.finish();
                    tokio::task::yield_now().await;
                    continue;
                }
            }
            _ = tick.tick() => shard.tick(Instant::now(), &mut sink),
        }
        sink.finish();
        for (slot, k) in slots.0.iter().zip(shard.stats()) {
            slot[0].store(k.channels, Ordering::Relaxed);
            slot[1].store(k.subscriptions, Ordering::Relaxed);
        }
        slots.1.store(shard.history_stats());
    }
}
