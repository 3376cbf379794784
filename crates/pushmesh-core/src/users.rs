//! Signed-in users of a node: their connections (for `terminate_connections`),
//! watchlists and online/offline events, and who is signed in on peers.
//! Not on the per-message path: only sign-in, sign-out and user deltas.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use indexmap::IndexMap;
use pushmesh_protocol::server::{self, WatchlistEvent};
use pushmesh_protocol::CloseCode;

use crate::app::{AppIdx, Apps, ConnId};
use crate::peer_frame::{Delta, FrameKind, NodeId, PeerFrame};
use crate::per_app::PerApp;
use crate::sink::{Handle, Sink};

struct User<H> {
    conns: IndexMap<ConnId, H>,
    watchers: IndexMap<ConnId, H>,
}

impl<H> Default for User<H> {
    fn default() -> Self {
        Self {
            conns: IndexMap::new(),
            watchers: IndexMap::new(),
        }
    }
}

struct Table<H> {
    users: HashMap<String, User<H>>,
    /// Users signed in on other nodes.
    remote: HashMap<String, BTreeSet<NodeId>>,
}

impl<H> Default for Table<H> {
    fn default() -> Self {
        Self {
            users: HashMap::new(),
            remote: HashMap::new(),
        }
    }
}

/// The user registry of a node.
pub struct Users<H> {
    apps: Arc<Apps>,
    tables: PerApp<Table<H>>,
    peers: BTreeSet<NodeId>,
}

impl<H: Handle> Users<H> {
    /// An empty registry.
    pub fn new(apps: Arc<Apps>) -> Self {
        Self {
            tables: PerApp::new(apps.len(), Table::default),
            apps,
            peers: BTreeSet::new(),
        }
    }

    /// A new snapshot of the node's apps (tables for new slots).
    pub fn set_apps(&mut self, apps: Arc<Apps>) {
        self.tables.grow(apps.len(), Table::default);
        self.apps = apps;
    }

    /// The peers with a link up changed.
    pub fn set_peers(&mut self, peers: BTreeSet<NodeId>) {
        self.peers = peers;
    }

    fn remote_online(&self, app: AppIdx, user: &str) -> bool {
        self.tables[app]
            .remote
            .get(user)
            .is_some_and(|n| !n.is_empty())
    }

    /// A connection signed in (checked by its session): `signin_success`,
    /// the initial watchlist state, and `online` to the user's watchers.
    pub fn signin(
        &mut self,
        h: &H,
        app: AppIdx,
        user_id: &str,
        watchlist: &[String],
        user_data: &str,
        sink: &mut impl Sink<H>,
    ) {
        let conn = h.conn();
        let remote_online: Vec<bool> = watchlist
            .iter()
            .map(|w| self.remote_online(app, w))
            .collect();
        let was_online_elsewhere = self.remote_online(app, user_id);
        let t = &mut self.tables[app];
        let user = t.users.entry(user_id.to_owned()).or_default();
        let came_online = user.conns.is_empty();
        user.conns.insert(conn, h.clone());
        for w in watchlist {
            t.users
                .entry(w.clone())
                .or_default()
                .watchers
                .insert(conn, h.clone());
        }
        let online: Vec<&str> = watchlist
            .iter()
            .zip(&remote_online)
            .filter(|(w, remote)| {
                **remote || t.users.get(w.as_str()).is_some_and(|u| !u.conns.is_empty())
            })
            .map(|(w, _)| w.as_str())
            .collect();
        let initial = (!watchlist.is_empty()).then(|| {
            server::watchlist_events(&[WatchlistEvent {
                name: "online",
                user_ids: online,
            }])
        });
        if came_online {
            sink.replicate(Delta::User {
                app: self.apps.get(app).id.clone(),
                user: user_id.to_owned(),
                online: true,
            });
            if !was_online_elsewhere {
                self.watchlist_event(app, user_id, true, sink);
            }
        }
        // Empty for a wsify connection signed in by its identity headers.
        if !user_data.is_empty() {
            sink.send(h, &server::signin_success(user_data));
        }
        if let Some(f) = initial {
            sink.send(h, &f);
        }
    }

    /// A signed-in connection went away.
    pub fn signout(
        &mut self,
        conn: ConnId,
        app: AppIdx,
        user_id: &str,
        watchlist: &[String],
        sink: &mut impl Sink<H>,
    ) {
        let t = &mut self.tables[app];
        for w in watchlist {
            if let Some(u) = t.users.get_mut(w) {
                u.watchers.swap_remove(&conn);
                if u.conns.is_empty() && u.watchers.is_empty() {
                    t.users.remove(w);
                }
            }
        }
        let Some(u) = t.users.get_mut(user_id) else {
            return;
        };
        u.conns.swap_remove(&conn);
        if !u.conns.is_empty() {
            return;
        }
        sink.replicate(Delta::User {
            app: self.apps.get(app).id.clone(),
            user: user_id.to_owned(),
            online: false,
        });
        if !self.remote_online(app, user_id) {
            self.watchlist_event(app, user_id, false, sink);
        }
        let t = &mut self.tables[app];
        if t.users
            .get(user_id)
            .is_some_and(|u| u.watchers.is_empty() && u.conns.is_empty())
        {
            t.users.remove(user_id);
        }
    }

    /// Tells local watchers of `user` that it came online / went offline cluster-wide.
    fn watchlist_event(&self, app: AppIdx, user: &str, online: bool, sink: &mut impl Sink<H>) {
        let Some(u) = self.tables[app].users.get(user) else {
            return;
        };
        if u.watchers.is_empty() {
            return;
        }
        let f = server::watchlist_events(&[WatchlistEvent {
            name: if online { "online" } else { "offline" },
            user_ids: vec![user],
        }]);
        for h in u.watchers.values() {
            sink.send(h, &f);
        }
    }

    /// A peer's user went online / offline (idempotent).
    pub fn apply_remote(&mut self, peer: &NodeId, delta: &Delta, sink: &mut impl Sink<H>) {
        let Delta::User { app, user, online } = delta else {
            return;
        };
        let Some(app) = self.apps.by_id(app) else {
            return;
        };
        let t = &mut self.tables[app];
        let local = t.users.get(user).is_some_and(|u| !u.conns.is_empty());
        let nodes = t.remote.entry(user.clone()).or_default();
        let was = !nodes.is_empty();
        let changed = if *online {
            nodes.insert(peer.clone())
        } else {
            nodes.remove(peer)
        };
        let now_online = !nodes.is_empty();
        if nodes.is_empty() {
            t.remote.remove(user);
        }
        if changed && !local && was != now_online {
            self.watchlist_event(app, user, now_online, sink);
        }
    }

    /// Closes this node's connections of a user; returns how many.
    pub fn terminate_local(&mut self, app: AppIdx, user: &str, sink: &mut impl Sink<H>) -> usize {
        let Some(u) = self.tables[app].users.get(user) else {
            return 0;
        };
        for h in u.conns.values() {
            sink.close(
                h,
                CloseCode::Unauthorized,
                "connection terminated by the server",
            );
        }
        u.conns.len()
    }

    /// `terminate_connections`: closes the user's connections here and asks
    /// every peer to do the same.
    pub fn terminate(&mut self, app: AppIdx, user: &str, sink: &mut impl Sink<H>) -> usize {
        if !self.peers.is_empty() {
            let frame = PeerFrame::Terminate {
                app: self.apps.get(app).id.clone(),
                user: user.to_owned(),
            }
            .encode();
            for p in &self.peers {
                sink.peer(p, FrameKind::Control, &frame);
            }
        }
        self.terminate_local(app, user, sink)
    }

    /// Users signed in on this node, per app (for replication snapshots and stats).
    pub fn online_count(&self) -> usize {
        self.tables
            .iter()
            .map(|(_, t)| t.users.values().filter(|u| !u.conns.is_empty()).count())
            .sum()
    }
}
