//! The apps a node serves, changing at runtime: the configuration file's
//! (read again on SIGHUP) and the admin API's (an [`AppRegistry`] of
//! records replicated to every peer and kept in `data_dir`). Every change
//! ends in [`rebuild`]: one new `Apps` snapshot for the node (slots kept,
//! see `pushmesh_core::Apps`), each app's I/O settings beside it, and the
//! connections of removed (4001) and disabled (4003) apps closed.
//!
//! Changes are applied one at a time (`changing`, an async lock taken by
//! admin writes, peers' records, SIGHUP and the grace timer; never on the
//! message path).

pub mod stats;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use pushmesh_core::app_registry::{AdminApp, AppRecord, AppRegistry};
use pushmesh_core::{AppConfig, AppIdx, Apps, FrameKind, NodeId, PeerFrame};
use serde_json::{Map, Value};
use tokio::sync::{oneshot, Notify};

use crate::config::app_json::app_from_json;
use crate::config::AppIo;
use crate::Shared;
use store::Store;

/// Records per `PeerFrame::Apps` sent to a peer whose link came up.
const RECORDS_PER_FRAME: usize = 256;

/// Where an app comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The configuration file (or `--app`): read-only through the API.
    Config,
    /// The admin API.
    Admin,
}

impl Source {
    /// `config` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Admin => "admin",
        }
    }
}

/// The node's apps beyond the core's snapshot.
pub struct AppsState {
    /// The admin API's records.
    pub registry: Mutex<AppRegistry>,
    /// The configuration's apps (replaced on SIGHUP).
    config: Mutex<Vec<(AppConfig, AppIo)>>,
    /// Each slot's I/O settings and source, parallel to the node's `Apps`.
    io: ArcSwap<Vec<(Arc<AppIo>, Source)>>,
    /// `data_dir`'s store; none: the admin API refuses changes.
    pub store: Option<Store>,
    /// Events published per slot (grown under `changing`).
    published: std::sync::RwLock<Vec<AtomicU64>>,
    /// Changes one at a time.
    pub changing: tokio::sync::Mutex<()>,
    /// What each served admin app was made from (see [`rebuild`]).
    made: Mutex<HashMap<String, Made>>,
    /// Wakes the grace-period timer.
    pub changed: Notify,
    asks: Mutex<HashMap<u64, oneshot::Sender<stats::NodeStats>>>,
    next_ask: AtomicU64,
    /// Admin API requests by outcome (`admin::OUTCOMES` order).
    pub requests: [AtomicU64; 7],
}

impl AppsState {
    /// The configuration's apps; the registry of node `node`, loaded from
    /// `store`.
    pub fn new(
        node: &str,
        config: Vec<(AppConfig, AppIo)>,
        store: Option<Store>,
    ) -> Result<Self, store::StoreError> {
        let mut registry = AppRegistry::new(node);
        registry.set_config_apps(config.iter().map(|(a, _)| (a.id.as_str(), a.key.as_str())));
        if let Some(s) = &store {
            registry.merge(s.load()?);
        }
        let io = config
            .iter()
            .map(|(_, io)| (Arc::new(io.clone()), Source::Config))
            .collect();
        let published = (0..config.len()).map(|_| AtomicU64::new(0)).collect();
        Ok(Self {
            registry: Mutex::new(registry),
            config: Mutex::new(config),
            io: ArcSwap::from_pointee(io),
            store,
            published: std::sync::RwLock::new(published),
            changing: tokio::sync::Mutex::new(()),
            made: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            asks: Mutex::new(HashMap::new()),
            next_ask: AtomicU64::new(1),
            requests: Default::default(),
        })
    }

    /// An app's I/O settings and source.
    pub fn io(&self, app: AppIdx) -> (Arc<AppIo>, Source) {
        self.io
            .load()
            .get(app.0 as usize)
            .cloned()
            .unwrap_or_else(|| (Arc::new(AppIo::default()), Source::Admin))
    }

    /// Counts published events of `app`.
    pub fn count_published(&self, app: AppIdx, n: u64) {
        let p = self.published.read().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = p.get(app.0 as usize) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn published(&self, app: AppIdx) -> u64 {
        let p = self.published.read().unwrap_or_else(|p| p.into_inner());
        p.get(app.0 as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// How many apps serve, per source.
    pub fn counts(&self, apps: &Apps) -> (usize, usize) {
        let io = self.io.load();
        apps.iter().fold((0, 0), |(c, a), (i, _)| {
            match io.get(i.0 as usize).map(|x| x.1) {
                Some(Source::Config) => (c + 1, a),
                _ => (c, a + 1),
            }
        })
    }

    /// Replaces the configuration's apps (SIGHUP); the caller rebuilds.
    pub fn set_config(&self, config: Vec<(AppConfig, AppIo)>) {
        crate::node::lock(&self.registry)
            .set_config_apps(config.iter().map(|(a, _)| (a.id.as_str(), a.key.as_str())));
        *crate::node::lock(&self.config) = config;
    }
}

/// Unix ms now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An admin app's JSON settings with its id, key and secret: the app.
pub fn admin_app_config(id: &str, a: &AdminApp) -> Option<(AppConfig, AppIo)> {
    let mut m: Map<String, Value> = serde_json::from_str(&a.settings).ok()?;
    m.insert("id".into(), Value::from(id));
    m.insert("key".into(), Value::from(a.key.as_str()));
    m.insert("secret".into(), Value::from(a.secret.as_str()));
    app_from_json(Value::Object(m)).ok()
}

/// What an admin app's served settings were made from: its record's
/// stamp and writer, and whether a previous secret was still valid.
type Made = (pushmesh_core::app_registry::Hlc, String, bool);

/// Makes the node serve what the configuration and the registry say now.
/// Admin apps whose record has not changed since they were last served
/// are neither parsed nor compared again (`made`), so a change costs one
/// parse, not one per app. Call with `changing` held.
pub async fn rebuild(st: &Shared) {
    let now = now_ms();
    let mut apps = (*st.node.apps()).clone();
    let mut want: Vec<(AppConfig, AppIo, Source)> = crate::node::lock(&st.apps.config)
        .iter()
        .map(|(a, io)| (a.clone(), io.clone(), Source::Config))
        .collect();
    let mut keep: std::collections::HashSet<String> = want.iter().map(|w| w.0.id.clone()).collect();
    {
        let reg = crate::node::lock(&st.apps.registry);
        let mut made = crate::node::lock(&st.apps.made);
        let live = reg.live();
        let live_ids: std::collections::HashSet<&str> = live.iter().map(|(id, _)| *id).collect();
        made.retain(|id, _| live_ids.contains(id.as_str()));
        for (id, a) in live {
            let Some(r) = reg.record(id) else { continue };
            let grace = a
                .previous_secret
                .as_ref()
                .filter(|(_, until)| *until > now)
                .map(|(s, _)| s.clone());
            let version: Made = (r.stamp, r.node.clone(), grace.is_some());
            keep.insert(id.to_owned());
            if made.get(id) == Some(&version) && apps.by_id(id).is_some() {
                continue;
            }
            let Some((mut cfg, io)) = admin_app_config(id, a) else {
                tracing::warn!(app = id, "admin app with unusable settings left out");
                keep.remove(id);
                continue;
            };
            cfg.previous_secret = grace;
            made.insert(id.to_owned(), version);
            want.push((cfg, io, Source::Admin));
        }
    }
    let gone: Vec<String> = apps
        .iter()
        .filter(|(_, a)| !keep.contains(&a.id))
        .map(|(_, a)| a.id.clone())
        .collect();
    let mut changed = !gone.is_empty();
    for id in gone {
        apps.remove(&id);
    }
    let mut io: Vec<(Arc<AppIo>, Source)> = st.apps.io.load().as_ref().clone();
    for (cfg, app_io, source) in want {
        // Unchanged apps keep their `Arc`: connections see no change.
        let i = apps.by_id(&cfg.id);
        if i.is_some_and(|i| {
            **apps.get(i) == cfg && io.get(i.0 as usize).is_some_and(|x| *x.0 == app_io)
        }) {
            continue;
        }
        changed = true;
        let i = apps.upsert(cfg).0 as usize;
        if io.len() <= i {
            io.resize(i + 1, (Arc::new(AppIo::default()), Source::Admin));
        }
        io[i] = (Arc::new(app_io), source);
    }
    if !changed {
        return;
    }
    io.resize(apps.len(), (Arc::new(AppIo::default()), Source::Admin));
    {
        let mut p = st.apps.published.write().unwrap_or_else(|p| p.into_inner());
        while p.len() < apps.len() {
            p.push(AtomicU64::new(0));
        }
    }
    st.webhooks
        .update(&apps, |i| io.get(i.0 as usize).map(|x| &*x.0));
    st.set_authorizer(
        io.get(st.config.wsify_app)
            .and_then(|x| x.0.authorizer.as_ref()),
    );
    st.apps.io.store(Arc::new(io));
    st.node.set_apps(apps).await;
    st.apps.changed.notify_one();
}

/// Persists `changed` records (durably, before anyone is told): one
/// journal append; every record only when the store compacts.
pub async fn persist(st: &Shared, changed: Vec<AppRecord>) -> Result<(), store::StoreError> {
    let Some(store) = st.apps.store.clone() else {
        return Ok(());
    };
    let all = {
        let reg = crate::node::lock(&st.apps.registry);
        store
            .compacts_after(changed.len())
            .then(|| reg.records().cloned().collect())
    };
    tokio::task::spawn_blocking(move || store.append(&changed, all))
        .await
        .unwrap_or_else(|e| {
            Err(store::StoreError::Io {
                path: "apps.log".into(),
                source: std::io::Error::other(e.to_string()),
            })
        })
}

/// Sends records to every linked peer (a change).
pub fn broadcast(st: &Shared, records: Vec<AppRecord>) {
    if let Some(c) = &st.cluster {
        let frame = PeerFrame::Apps(records).encode();
        for p in c.linked_peers() {
            c.send(&p, FrameKind::Control, frame.clone());
        }
    }
}

/// A peer's link came up: it gets every record.
pub fn peer_up(st: &Shared, peer: &NodeId) {
    let Some(c) = &st.cluster else { return };
    let records: Vec<AppRecord> = crate::node::lock(&st.apps.registry)
        .records()
        .cloned()
        .collect();
    for chunk in records.chunks(RECORDS_PER_FRAME) {
        c.send(
            peer,
            FrameKind::Control,
            PeerFrame::Apps(chunk.to_vec()).encode(),
        );
    }
}

/// Frames of the admin API from a peer.
pub async fn peer_frame(st: &Shared, from: &NodeId, frame: PeerFrame) {
    match frame {
        PeerFrame::Apps(records) => {
            let _changing = st.apps.changing.lock().await;
            let won = crate::node::lock(&st.apps.registry).merge(records);
            if won.is_empty() {
                return;
            }
            for r in &won {
                tracing::info!(app = %r.id, from = %from, deleted = r.app.is_none(), "app changed by a peer");
            }
            if let Err(e) = persist(st, won.clone()).await {
                tracing::error!(error = %e, "cannot persist apps from a peer");
            }
            rebuild(st).await;
        }
        PeerFrame::AppStatsAsk { .. } | PeerFrame::AppStatsReply { .. } => {
            stats::peer_frame(st, from, frame).await;
        }
        _ => {}
    }
}

/// Ends grace periods on time: rebuilds when the earliest one ends.
pub async fn grace_timer(st: Arc<Shared>) {
    loop {
        let next = crate::node::lock(&st.apps.registry).next_expiry(now_ms());
        let wait = next.map(|until| Duration::from_millis(until.saturating_sub(now_ms()) + 1));
        match wait {
            Some(d) => {
                tokio::select! {
                    () = tokio::time::sleep(d) => {
                        let _changing = st.apps.changing.lock().await;
                        rebuild(&st).await;
                    }
                    () = st.apps.changed.notified() => {}
                }
            }
            None => st.apps.changed.notified().await,
        }
    }
}

/// SIGHUP: the configuration file's apps read again and served.
pub async fn reload_config(st: &Shared) -> Result<usize, crate::config::ConfigError> {
    let Some(path) = &st.config.apps_file else {
        return Ok(0);
    };
    let wsify = &st.config.apps[st.config.wsify_app].id;
    let apps = crate::config::app_json::reload_file_apps(
        path,
        wsify,
        st.config.authorizer_url.as_deref(),
    )?;
    if !apps.iter().any(|(a, _)| &a.id == wsify) {
        return Err(crate::config::ConfigError::Invalid(format!(
            "the wsify app {wsify:?} cannot be removed by a reload"
        )));
    }
    let n = apps.len();
    let _changing = st.apps.changing.lock().await;
    st.apps.set_config(apps);
    rebuild(st).await;
    Ok(n)
}
