//! A replicated state as sets, for diffing, snapshots and sync chunks.

use std::collections::{BTreeMap, BTreeSet};

use crate::peer_frame::{Delta, Snapshot};
use crate::routing::hash64;

type ChannelKey = (String, String);

/// A replicated state, as sets (for diffing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Mirror {
    pub(super) interest: BTreeSet<ChannelKey>,
    counts: BTreeMap<ChannelKey, usize>,
    members: BTreeMap<(String, String, String), Option<String>>,
    users: BTreeSet<ChannelKey>,
    /// Advertised filters (issue #13).
    filters: BTreeSet<(String, String, Option<String>)>,
    /// XOR of hash64(app, channel) over `interest`.
    pub(super) interest_hash: u64,
}

impl Mirror {
    pub(super) fn apply(&mut self, d: &Delta) {
        match d {
            Delta::Interest { app, channel, add } => {
                let k = (app.clone(), channel.clone());
                let changed = if *add {
                    self.interest.insert(k)
                } else {
                    self.interest.remove(&k)
                };
                if changed {
                    self.interest_hash ^= hash64(&[app, channel]);
                }
            }
            Delta::Count {
                app,
                channel,
                count,
            } => {
                let k = (app.clone(), channel.clone());
                if *count == 0 {
                    self.counts.remove(&k);
                } else {
                    self.counts.insert(k, *count);
                }
            }
            Delta::Member {
                app,
                channel,
                user,
                info,
                add,
            } => {
                let k = (app.clone(), channel.clone(), user.clone());
                if *add {
                    self.members.insert(k, info.clone());
                } else {
                    self.members.remove(&k);
                }
            }
            Delta::User { app, user, online } => {
                let k = (app.clone(), user.clone());
                if *online {
                    self.users.insert(k);
                } else {
                    self.users.remove(&k);
                }
            }
            Delta::Filter {
                app,
                channel,
                filter,
                add,
            } => {
                let k = (app.clone(), channel.clone(), filter.clone());
                if *add {
                    self.filters.insert(k);
                } else {
                    self.filters.remove(&k);
                }
            }
        }
    }

    /// The state in parts of at most `max` entries each (at least one part).
    pub(super) fn chunks(&self, max: usize) -> Vec<Snapshot> {
        let max = max.max(1);
        let mut out = vec![Snapshot::default()];
        let mut n = 0;
        let mut room = |out: &mut Vec<Snapshot>| {
            if n == max {
                out.push(Snapshot::default());
                n = 0;
            }
            n += 1;
        };
        for (a, c) in &self.interest {
            room(&mut out);
            if let Some(s) = out.last_mut() {
                s.interest.push((a.clone(), c.clone()));
            }
        }
        for ((a, c), k) in &self.counts {
            room(&mut out);
            if let Some(s) = out.last_mut() {
                s.counts.push((a.clone(), c.clone(), *k));
            }
        }
        for ((a, c, u), i) in &self.members {
            room(&mut out);
            if let Some(s) = out.last_mut() {
                s.members.push((a.clone(), c.clone(), u.clone(), i.clone()));
            }
        }
        for (a, u) in &self.users {
            room(&mut out);
            if let Some(s) = out.last_mut() {
                s.users.push((a.clone(), u.clone()));
            }
        }
        for (a, c, f) in &self.filters {
            room(&mut out);
            if let Some(s) = out.last_mut() {
                s.filters.push((a.clone(), c.clone(), f.clone()));
            }
        }
        out
    }

    /// Adds one part of a snapshot.
    pub(super) fn absorb(&mut self, s: Snapshot) {
        for (app, channel) in s.interest {
            self.apply(&Delta::Interest {
                app,
                channel,
                add: true,
            });
        }
        for (app, channel, count) in s.counts {
            self.apply(&Delta::Count {
                app,
                channel,
                count,
            });
        }
        for (app, channel, user, info) in s.members {
            self.members.insert((app, channel, user), info);
        }
        self.users.extend(s.users);
        self.filters.extend(s.filters);
    }

    /// The changes that turn `self` into `new`: removals first, then every
    /// addition of `new` (appliers are idempotent).
    pub(super) fn diff(&self, new: &Self) -> Vec<Delta> {
        let mut out = Vec::new();
        for (app, channel, user) in self.members.keys() {
            if !new
                .members
                .contains_key(&(app.clone(), channel.clone(), user.clone()))
            {
                out.push(Delta::Member {
                    app: app.clone(),
                    channel: channel.clone(),
                    user: user.clone(),
                    info: None,
                    add: false,
                });
            }
        }
        for (app, user) in self.users.difference(&new.users) {
            out.push(Delta::User {
                app: app.clone(),
                user: user.clone(),
                online: false,
            });
        }
        for (app, channel, filter) in self.filters.difference(&new.filters) {
            out.push(Delta::Filter {
                app: app.clone(),
                channel: channel.clone(),
                filter: filter.clone(),
                add: false,
            });
        }
        for (app, channel) in self.interest.difference(&new.interest) {
            out.push(Delta::Interest {
                app: app.clone(),
                channel: channel.clone(),
                add: false,
            });
        }
        for (app, channel) in self.counts.keys() {
            if !new.counts.contains_key(&(app.clone(), channel.clone())) {
                out.push(Delta::Count {
                    app: app.clone(),
                    channel: channel.clone(),
                    count: 0,
                });
            }
        }
        for (app, channel) in &new.interest {
            out.push(Delta::Interest {
                app: app.clone(),
                channel: channel.clone(),
                add: true,
            });
        }
        for (app, channel, filter) in &new.filters {
            out.push(Delta::Filter {
                app: app.clone(),
                channel: channel.clone(),
                filter: filter.clone(),
                add: true,
            });
        }
        for ((app, channel), count) in &new.counts {
            out.push(Delta::Count {
                app: app.clone(),
                channel: channel.clone(),
                count: *count,
            });
        }
        for ((app, channel, user), info) in &new.members {
            out.push(Delta::Member {
                app: app.clone(),
                channel: channel.clone(),
                user: user.clone(),
                info: info.clone(),
                add: true,
            });
        }
        for (app, user) in &new.users {
            out.push(Delta::User {
                app: app.clone(),
                user: user.clone(),
                online: true,
            });
        }
        out
    }
}
