//! [`Core`]'s part of the webhook backup (see `hook_backup.rs`): the
//! driver names the events it delivers; frames and released events come
//! out as [`Output`]s.

use pushmesh_protocol::webhook::WebhookEvent;

use super::{Core, Output};
use crate::app::AppIdx;
use crate::hook_backup::{HookBackup, Released};
use crate::peer_frame::{NodeId, PeerFrame};

impl Core {
    /// Hands a webhook event this node emitted (an [`Output::Hook`]) to its
    /// channel's backup, under the stable `id` the driver gave it.
    pub fn hand_hook(&mut self, id: &str, app: AppIdx, event: &WebhookEvent) {
        let mut out = Vec::new();
        let app_id = self.apps.get(app).id.clone();
        let peers = self.replicator.peers();
        self.hook_backup.hand(id, &app_id, event, &peers, &mut out);
        self.push_backup_frames(out);
    }

    /// Webhook events delivered (or cancelled): their backups forget them.
    pub fn hooks_delivered(&mut self, ids: &[&str]) {
        let mut out = Vec::new();
        self.hook_backup.done(ids.iter().copied(), &mut out);
        self.push_backup_frames(out);
    }

    /// `peer` is gone for good: the webhook events held for it are
    /// released, and those it held for this node go to another backup.
    pub fn peer_gone(&mut self, peer: &NodeId) {
        let mut out = Vec::new();
        let mut peers = self.replicator.peers();
        peers.remove(peer);
        let released = self.hook_backup.peer_gone(peer, &peers, &mut out);
        self.push_backup_frames(out);
        self.push_released(released);
    }

    /// The webhook backup's state.
    pub fn hook_backup(&self) -> &HookBackup {
        &self.hook_backup
    }

    pub(super) fn backup_peer_up(&mut self, peer: &NodeId, epoch: u64) {
        let mut out = Vec::new();
        let mut peers = self.replicator.peers();
        peers.insert(peer.clone());
        let released = self.hook_backup.peer_up(peer, epoch, &peers, &mut out);
        self.push_backup_frames(out);
        self.push_released(released);
    }

    fn push_backup_frames(&mut self, frames: Vec<(NodeId, PeerFrame)>) {
        for (to, f) in frames {
            self.out.push_back(Output::Peer {
                to,
                kind: f.kind(),
                frame: f.encode(),
            });
        }
    }

    pub(super) fn push_released(&mut self, released: Vec<Released>) {
        for r in released {
            if let Some(app) = self.apps.by_id(&r.app) {
                self.out.push_back(Output::HookReleased {
                    id: r.id,
                    app,
                    event: r.event,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Three [`Core`]s linked by hand: the owner of a channel's webhooks is
    //! killed with events outstanding; its backup delivers them, ids kept.

    use std::collections::BTreeMap;
    use std::time::Instant;

    use crate::{testing, AppConfig, ConnId, Core, NodeId, Output, WebhookScheduler};

    fn core(name: &str) -> Core {
        testing::core(
            std::time::Instant::now(),
            AppConfig {
                webhooks: true,
                ..testing::app()
            },
            name,
        )
    }

    /// Nodes, their outputs moved between them; what each delivered.
    struct Net {
        nodes: Vec<(String, Core, WebhookScheduler)>,
        delivered: BTreeMap<String, Vec<(String, String)>>,
        /// Delivered by the driver but not yet confirmed to the core.
        unconfirmed: BTreeMap<String, Vec<String>>,
    }

    impl Net {
        fn pump(&mut self, now: Instant) {
            loop {
                let mut frames = Vec::new();
                for (name, core, sched) in &mut self.nodes {
                    while let Some(o) = core.poll_output() {
                        match o {
                            Output::Peer { to, frame, .. } => {
                                frames.push((name.clone(), to, frame))
                            }
                            Output::Hook { app, event } => {
                                if let Some(id) = sched.push(now, app, event.clone()) {
                                    core.hand_hook(&id, app, &event);
                                }
                            }
                            Output::HookReleased { id, app, event } => {
                                sched.push_held(id, app, event);
                            }
                            _ => {}
                        }
                    }
                    for h in sched.poll(now) {
                        self.delivered
                            .entry(name.clone())
                            .or_default()
                            .push((h.id.clone(), h.event.name().to_string()));
                        self.unconfirmed.entry(name.clone()).or_default().push(h.id);
                    }
                }
                if frames.is_empty() {
                    return;
                }
                for (from, to, frame) in frames {
                    if let Some((_, c, _)) = self.nodes.iter_mut().find(|(n, ..)| *n == to.as_str())
                    {
                        let _ = c.handle_peer_frame(now, &NodeId::new(&from), &frame);
                    }
                }
            }
        }

        fn core(&mut self, name: &str) -> &mut Core {
            match self.nodes.iter_mut().find(|(n, ..)| n == name) {
                Some((_, c, _)) => c,
                None => panic!("no node {name}"),
            }
        }
    }

    #[test]
    fn a_killed_owner_pending_webhooks_are_delivered_by_its_backup() {
        let t0 = Instant::now();
        let names = ["a", "b", "c"];
        let mut net = Net {
            nodes: names
                .iter()
                .map(|n| {
                    let mut s = WebhookScheduler::new(std::time::Duration::from_secs(3));
                    s.set_origin(n, 1);
                    (n.to_string(), core(n), s)
                })
                .collect(),
            delivered: BTreeMap::new(),
            unconfirmed: BTreeMap::new(),
        };
        for (name, core, _) in &mut net.nodes {
            for other in names.iter().filter(|o| **o != name.as_str()) {
                core.peer_up(t0, NodeId::new(other), 1);
            }
        }
        net.pump(t0);
        // Thirty channels owned by a: occupied, then vacated (delayed 3 s).
        let app = crate::AppIdx(0);
        let mut owned = Vec::new();
        let peers: std::collections::BTreeSet<NodeId> =
            ["b", "c"].iter().map(|n| NodeId::new(n)).collect();
        for i in 0.. {
            let ch = format!("ch-{i}");
            if crate::routing::is_owner(&NodeId::new("a"), &peers, "1", &ch) {
                owned.push(ch);
            }
            if owned.len() == 30 {
                break;
            }
        }
        let a = net.core("a");
        for (k, ch) in owned.iter().enumerate() {
            let conn = ConnId(k as u64 + 1);
            a.open(t0, app, conn).unwrap_or_else(|e| panic!("{e:?}"));
            a.handle_frame(
                t0,
                conn,
                &format!(r#"{{"event":"pusher:subscribe","data":{{"channel":"{ch}"}}}}"#),
            );
        }
        net.pump(t0);
        // a delivers the thirty channel_occupied and confirms them.
        let ids = net.unconfirmed.remove("a").unwrap_or_default();
        assert_eq!(ids.len(), 30);
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        net.core("a").hooks_delivered(&ids);
        net.pump(t0);
        let a = net.core("a");
        for k in 0..30 {
            a.disconnect(t0, ConnId(k + 1));
        }
        net.pump(t0);
        let held: usize = net
            .nodes
            .iter()
            .map(|(_, c, _)| c.hook_backup().held_count())
            .sum();
        assert_eq!(
            held, 30,
            "the thirty delayed channel_vacated are held by backups"
        );
        // kill -9 of a before the delay is over: b and c see it go.
        net.nodes.retain(|(n, ..)| n != "a");
        for n in ["b", "c"] {
            net.core(n).peer_down(t0, &NodeId::new("a"));
        }
        net.pump(t0);
        let vacated: Vec<&(String, String)> = net
            .delivered
            .iter()
            .filter(|(n, _)| n.as_str() != "a")
            .flat_map(|(_, v)| v)
            .filter(|(_, name)| name == "channel_vacated")
            .collect();
        assert_eq!(vacated.len(), 30, "{:?}", net.delivered);
        assert!(
            vacated.iter().all(|(id, _)| id.starts_with("a:1:")),
            "ids kept"
        );
        let mut ids: Vec<&String> = vacated.iter().map(|(id, _)| id).collect();
        ids.dedup();
        assert_eq!(ids.len(), 30);
    }
}
