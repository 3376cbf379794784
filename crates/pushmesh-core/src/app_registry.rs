//! The apps made through the admin API: one record per app id, replicated
//! to every node and merged by last writer wins, so every node that has
//! seen the same records holds the same apps, whatever order they came in.
//!
//! A record's `stamp` is a hybrid logical clock ([`Hlc`]: wall-clock ms and
//! a counter, never behind any stamp the node has seen); the winner for an
//! id is the record with the greatest `(stamp, node)`, the writer's node id
//! breaking ties. A delete is a record too (a tombstone, kept), so a delete
//! and a change on two sides of a partition also have one winner. Two live
//! records with the same key (made on two sides of a partition) cannot both
//! serve: the one written first (least `(stamp, node)`) keeps the key, the
//! other is left out of [`AppRegistry::live`] and reported by
//! [`AppRegistry::key_conflicts`]; so is an admin app whose key or id a
//! configuration app holds.
//!
//! Sans-IO: the driver gives the wall clock, persists
//! [`AppRegistry::records`], and sends records to peers.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

/// A hybrid logical clock stamp: wall-clock ms, then a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Hlc {
    /// Unix ms (at least the greatest seen).
    pub ms: u64,
    /// Orders stamps within one ms.
    pub count: u32,
}

/// An app as the admin API made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminApp {
    /// Public key.
    pub key: String,
    /// Current secret.
    pub secret: String,
    /// The secret before the last rotation and until when (Unix ms) it is
    /// still accepted.
    pub previous_secret: Option<(String, u64)>,
    /// Every other `[[apps]]` setting, as a JSON object (the driver's
    /// type; the registry does not look inside).
    pub settings: String,
}

/// One app id's latest write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    /// App id.
    pub id: String,
    /// When it was written.
    pub stamp: Hlc,
    /// Which node wrote it (ties of `stamp`).
    pub node: String,
    /// The app; `None`: deleted.
    pub app: Option<AdminApp>,
}

impl AppRecord {
    fn order(&self) -> (Hlc, &str) {
        (self.stamp, &self.node)
    }
}

/// One node's counters of one app (the admin API sums them over the
/// cluster's live nodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AppStats {
    /// Open connections (WebSocket and SSE).
    pub connections: u64,
    /// Occupied channels.
    pub channels: u64,
    /// Subscriptions.
    pub subscriptions: u64,
    /// Events published through this node (HTTP API, broadcasts).
    pub messages_published: u64,
    /// Frames queued to this node's connections.
    pub messages_delivered: u64,
    /// Bytes written to this node's connections.
    pub bytes_sent: u64,
    /// Webhook events delivered from this node.
    pub webhooks_sent: u64,
}

impl AppStats {
    /// The sum of two nodes' counters.
    pub fn add(&mut self, o: &AppStats) {
        self.connections += o.connections;
        self.channels += o.channels;
        self.subscriptions += o.subscriptions;
        self.messages_published += o.messages_published;
        self.messages_delivered += o.messages_delivered;
        self.bytes_sent += o.bytes_sent;
        self.webhooks_sent += o.webhooks_sent;
    }
}

/// Why an admin change is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The id is taken (by a configuration app or a live admin app).
    #[error("an app with id {0:?} exists")]
    IdTaken(String),
    /// The key is taken.
    #[error("an app with key {0:?} exists")]
    KeyTaken(String),
    /// No admin app with this id.
    #[error("no app with id {0:?}")]
    NotFound(String),
}

/// The admin-made apps of the cluster as this node knows them.
#[derive(Debug, Clone, Default)]
pub struct AppRegistry {
    node: String,
    clock: Hlc,
    records: BTreeMap<String, AppRecord>,
    /// Ids and keys of the configuration apps (they win over admin apps).
    config_ids: HashSet<String>,
    config_keys: HashSet<String>,
}

impl AppRegistry {
    /// An empty registry of node `node`.
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            ..Self::default()
        }
    }

    /// The configuration apps' ids and keys (reserved for them).
    pub fn set_config_apps<'a>(&mut self, apps: impl IntoIterator<Item = (&'a str, &'a str)>) {
        self.config_ids.clear();
        self.config_keys.clear();
        for (id, key) in apps {
            self.config_ids.insert(id.to_owned());
            self.config_keys.insert(key.to_owned());
        }
    }

    /// A stamp after every stamp seen, at wall-clock `now_ms`.
    fn tick(&mut self, now_ms: u64) -> Hlc {
        self.clock = if now_ms > self.clock.ms {
            Hlc {
                ms: now_ms,
                count: 0,
            }
        } else {
            Hlc {
                ms: self.clock.ms,
                count: self.clock.count.saturating_add(1),
            }
        };
        self.clock
    }

    /// Merges records (from a peer, or the disk); returns those that won
    /// (changed this registry).
    pub fn merge(&mut self, incoming: Vec<AppRecord>) -> Vec<AppRecord> {
        let mut won = Vec::new();
        for r in incoming {
            self.clock = self.clock.max(r.stamp);
            let newer = self
                .records
                .get(&r.id)
                .is_none_or(|old| r.order() > old.order());
            if newer {
                self.records.insert(r.id.clone(), r.clone());
                won.push(r);
            }
        }
        won
    }

    /// Writes `app` for `id` (a create, a change or a rotation: the caller
    /// built it from [`AppRegistry::get`]); `None` deletes. Returns the
    /// record to persist and send to every peer.
    pub fn write(&mut self, now_ms: u64, id: &str, app: Option<AdminApp>) -> AppRecord {
        let record = AppRecord {
            id: id.to_owned(),
            stamp: self.tick(now_ms),
            node: self.node.clone(),
            app,
        };
        self.records.insert(id.to_owned(), record.clone());
        record
    }

    /// Checks that a new app may take `id` and `key`.
    pub fn check_new(&self, id: &str, key: &str) -> Result<(), RegistryError> {
        if self.config_ids.contains(id) || self.get(id).is_some() {
            return Err(RegistryError::IdTaken(id.to_owned()));
        }
        self.check_key(id, key)
    }

    /// Checks that app `id` may take `key` (no other app holds it).
    pub fn check_key(&self, id: &str, key: &str) -> Result<(), RegistryError> {
        let other = self
            .records
            .values()
            .any(|r| r.id != id && r.app.as_ref().is_some_and(|a| a.key == key));
        if self.config_keys.contains(key) || other {
            return Err(RegistryError::KeyTaken(key.to_owned()));
        }
        Ok(())
    }

    /// The live admin app with this id (even one left out for a conflict).
    pub fn get(&self, id: &str) -> Option<&AdminApp> {
        self.records.get(id).and_then(|r| r.app.as_ref())
    }

    /// The record of this id, tombstone or not.
    pub fn record(&self, id: &str) -> Option<&AppRecord> {
        self.records.get(id)
    }

    /// Every record, tombstones included, by id: what the disk and a new
    /// peer get.
    pub fn records(&self) -> impl Iterator<Item = &AppRecord> {
        self.records.values()
    }

    /// The apps that serve, by id: live, with an id and a key no
    /// configuration app holds, and a key no earlier-written admin app
    /// holds.
    pub fn live(&self) -> Vec<(&str, &AdminApp)> {
        self.partition().0
    }

    /// Live admin apps left out because another app holds their id or key.
    pub fn key_conflicts(&self) -> Vec<&str> {
        self.partition().1
    }

    fn partition(&self) -> (Vec<(&str, &AdminApp)>, Vec<&str>) {
        let mut live: Vec<&AppRecord> = self.records.values().filter(|r| r.app.is_some()).collect();
        live.sort_by(|a, b| a.order().cmp(&b.order()));
        let mut keys: HashSet<&str> = HashSet::new();
        let (mut serve, mut conflicts) = (Vec::new(), Vec::new());
        for r in live {
            let Some(app) = &r.app else { continue };
            let taken = self.config_ids.contains(&r.id)
                || self.config_keys.contains(&app.key)
                || !keys.insert(&app.key);
            if taken {
                conflicts.push(r.id.as_str());
            } else {
                serve.push((r.id.as_str(), app));
            }
        }
        serve.sort_by(|a, b| a.0.cmp(b.0));
        (serve, conflicts)
    }

    /// The earliest end of a grace period still running at `now_ms`.
    pub fn next_expiry(&self, now_ms: u64) -> Option<u64> {
        self.records
            .values()
            .filter_map(|r| r.app.as_ref()?.previous_secret.as_ref().map(|p| p.1))
            .filter(|&until| until > now_ms)
            .min()
    }
}

#[cfg(test)]
mod tests;
