//! Pusher webhook delivery: one bounded queue and one sender task per URL.
//!
//! The targets follow the apps: [`Webhooks::update`] (called by every
//! apps rebuild: SIGHUP, the admin API, a peer's change) keeps a target
//! whose URL, event types, headers and batch are unchanged (its key and
//! secret are updated in place, so queued events are signed with the new
//! secret), starts a sender for a new one and retires a removed one: a
//! retired target takes no new events and its sender ends once it has sent
//! (or given up on) what it holds.
//!
//! Events leave the core as [`Output::Hook`](pushmesh_core::Output), pass the
//! sans-IO [`WebhookScheduler`](pushmesh_core::WebhookScheduler) (delays and
//! cancellations) and land here. Each URL's task sends its queue in order,
//! oldest first: 2xx acknowledges; anything else, a timeout or a refused
//! connection is retried with exponential backoff and jitter until the
//! oldest event of the request has waited `retry_for`, then the request's
//! events are dropped, counted and logged. A full queue drops its oldest
//! event, counted. Because a URL's requests go one at a time, in queue order,
//! events of a channel arrive in order even across retries.
//!
//! Each event carries its stable id (`"id"` in its JSON object). Once every
//! target that wanted an event has delivered it (or given up on it), the
//! id is confirmed to the node's webhook backup, which tells the peer
//! holding a copy to forget it; events still queued when a shutdown's
//! deadline passes are not confirmed, so that peer delivers them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use pushmesh_core::{AppIdx, Apps, ScheduledHook};
use pushmesh_protocol::sign;
use pushmesh_protocol::webhook::{self, IdentifiedEvent, WebhookEvent};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use tokio::sync::Notify;

use crate::config::{AppIo, Config, WebhookConfig};
use crate::node::Links;

/// Events routed and not yet finished by every target, by id; where to confirm.
#[derive(Default)]
struct Confirm {
    outstanding: Mutex<HashMap<String, usize>>,
    links: OnceLock<Arc<Links>>,
}

impl Confirm {
    /// One target finished these events (delivered, or gave up on them).
    fn finished<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut done = Vec::new();
        {
            let mut o = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
            for id in ids {
                if let Some(n) = o.get_mut(id) {
                    *n -= 1;
                    if *n == 0 {
                        o.remove(id);
                        done.push(id.to_owned());
                    }
                }
            }
        }
        if let Some(links) = self.links.get() {
            crate::node::hook_relay::delivered(links, &done);
        }
    }
}

/// Most events in one request.
const MAX_EVENTS_PER_REQUEST: usize = 100;
/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Webhook counters.
#[derive(Debug, Default)]
pub struct WebhookStats {
    /// Events delivered (acknowledged with 2xx).
    pub sent: AtomicU64,
    /// Failed attempts that were retried.
    pub retried: AtomicU64,
    /// Events given up on (retry time exhausted, queue overflow, shutdown).
    pub dropped: AtomicU64,
    /// Requests made.
    pub requests: AtomicU64,
}

struct Queued {
    seq: u64,
    id: String,
    event: WebhookEvent,
    at: Instant,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Queued>,
    next_seq: u64,
    /// The target was retired and its sender has ended: no more events.
    closed: bool,
}

/// The app's key and secret a request is signed with.
struct Signing {
    key: String,
    secret: String,
}

/// One webhook URL of one app.
pub struct Target {
    /// What it was made from (a target is kept while this is unchanged).
    spec: WebhookConfig,
    filter: Option<HashSet<String>>,
    headers: HeaderMap,
    batch: Duration,
    signing: Mutex<Arc<Signing>>,
    cap: usize,
    queue: Mutex<Queue>,
    notify: Notify,
    /// Removed from its app: its sender ends once the queue is empty.
    retired: AtomicBool,
    /// Events delivered by the app's targets (per-app stats).
    sent: Arc<AtomicU64>,
}

impl Target {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wants(&self, e: &WebhookEvent) -> bool {
        self.filter.as_ref().is_none_or(|f| f.contains(e.name()))
    }

    /// A target for `spec` of the app with `key` and `secret`.
    fn new(
        spec: &WebhookConfig,
        key: &str,
        secret: &str,
        cap: usize,
        sent: Arc<AtomicU64>,
    ) -> Self {
        let mut headers = HeaderMap::new();
        for (k, v) in &spec.headers {
            match (
                HeaderName::try_from(k.as_str()),
                HeaderValue::try_from(v.as_str()),
            ) {
                (Ok(k), Ok(v)) => {
                    headers.insert(k, v);
                }
                _ => tracing::warn!(header = %k, "ignoring invalid webhook header"),
            }
        }
        Self {
            spec: spec.clone(),
            filter: spec
                .event_types
                .as_ref()
                .map(|t| t.iter().cloned().collect()),
            headers,
            batch: Duration::from_millis(spec.batch_ms),
            signing: Mutex::new(Arc::new(Signing {
                key: key.to_owned(),
                secret: secret.to_owned(),
            })),
            cap,
            queue: Mutex::new(Queue::default()),
            notify: Notify::new(),
            retired: AtomicBool::new(false),
            sent,
        }
    }

    fn signing(&self) -> Arc<Signing> {
        self.signing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_signing(&self, key: &str, secret: &str) {
        let mut s = self.signing.lock().unwrap_or_else(|p| p.into_inner());
        if s.key != key || s.secret != secret {
            *s = Arc::new(Signing {
                key: key.to_owned(),
                secret: secret.to_owned(),
            });
        }
    }

    fn url(&self) -> &str {
        &self.spec.url
    }

    /// Queues an event; false when the target is closed (retired and its
    /// sender gone: the event is not for it any more).
    fn enqueue(
        &self,
        id: String,
        event: WebhookEvent,
        stats: &WebhookStats,
        confirm: &Confirm,
    ) -> bool {
        let mut dropped = None;
        {
            let mut q = self.lock();
            if q.closed {
                return false;
            }
            if q.items.len() >= self.cap {
                if let Some(old) = q.items.pop_front() {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(url = %self.url(), event = old.event.name(), channel = old.event.channel(),
                        "webhook queue full, dropped the oldest event");
                    dropped = Some(old.id);
                }
            }
            let seq = q.next_seq;
            q.next_seq += 1;
            q.items.push_back(Queued {
                seq,
                id,
                event,
                at: Instant::now(),
            });
        }
        if let Some(id) = dropped {
            confirm.finished([id.as_str()]);
        }
        self.notify.notify_one();
        true
    }

    /// Takes no new events; the sender ends once the queue is empty.
    fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.notify.notify_one();
    }

    fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }
}

/// Each slot's targets and delivered-events counter (parallel to the
/// node's `Apps`).
#[derive(Default)]
struct Slots {
    targets: Vec<Vec<Arc<Target>>>,
    sent: Vec<Arc<AtomicU64>>,
}

/// Every app's webhook targets and their counters.
pub struct Webhooks {
    slots: ArcSwap<Slots>,
    /// Removed targets whose senders still deliver what they hold.
    retired: Mutex<Vec<Arc<Target>>>,
    /// Sender tasks, once started.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    started: AtomicBool,
    /// Counters.
    pub stats: Arc<WebhookStats>,
    client: reqwest::Client,
    timeout: Duration,
    retry_for: Duration,
    backoff: Duration,
    cap: usize,
    confirm: Arc<Confirm>,
}

impl Webhooks {
    /// Targets of the configuration's apps; no task runs until
    /// [`Webhooks::start`].
    pub fn new(config: &Config, client: reqwest::Client) -> Self {
        let w = Self {
            slots: ArcSwap::from_pointee(Slots::default()),
            retired: Mutex::new(Vec::new()),
            tasks: Mutex::new(Vec::new()),
            started: AtomicBool::new(false),
            stats: Arc::new(WebhookStats::default()),
            client,
            timeout: config.webhook_timeout,
            retry_for: config.webhook_retry_for,
            backoff: config.webhook_backoff,
            cap: config.webhook_queue.max(1),
            confirm: Arc::default(),
        };
        let apps = Apps::new(config.apps.clone());
        let io: Vec<AppIo> = config.app_io.clone();
        w.update(&apps, |i| io.get(i.0 as usize));
        w
    }

    /// Makes the targets what `apps` and their I/O settings (`io`, by
    /// slot) say: unchanged targets kept (key and secret updated), new
    /// ones started, removed ones retired. Called with the apps' change
    /// lock held (one update at a time).
    pub fn update<'a>(&self, apps: &Apps, io: impl Fn(AppIdx) -> Option<&'a AppIo>) {
        let old = self.slots.load_full();
        let mut next = Slots {
            targets: vec![Vec::new(); apps.len()],
            sent: (0..apps.len())
                .map(|i| {
                    old.sent
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(AtomicU64::new(0)))
                })
                .collect(),
        };
        let mut started = Vec::new();
        for (i, app) in apps.iter() {
            let slot = i.0 as usize;
            let Some(io) = io(i) else { continue };
            let mut before: Vec<Arc<Target>> = old.targets.get(slot).cloned().unwrap_or_default();
            for spec in &io.webhooks {
                let t = match before.iter().position(|t| &t.spec == spec) {
                    Some(k) => {
                        let t = before.swap_remove(k);
                        t.set_signing(&app.key, &app.secret);
                        t
                    }
                    None => {
                        let t = Arc::new(Target::new(
                            spec,
                            &app.key,
                            &app.secret,
                            self.cap,
                            next.sent[slot].clone(),
                        ));
                        started.push(t.clone());
                        t
                    }
                };
                next.targets[slot].push(t);
            }
            Self::retire_all(&self.retired, before);
        }
        // Slots of removed apps.
        for (slot, targets) in old.targets.iter().enumerate() {
            if apps.is_removed(AppIdx(slot as u32)) {
                Self::retire_all(&self.retired, targets.clone());
            }
        }
        self.slots.store(Arc::new(next));
        if self.started.load(Ordering::Acquire) {
            for t in started {
                self.spawn(t);
            }
        }
        crate::node::lock(&self.retired).retain(|t| !t.lock().closed);
    }

    fn retire_all(retired: &Mutex<Vec<Arc<Target>>>, targets: Vec<Arc<Target>>) {
        if targets.is_empty() {
            return;
        }
        for t in &targets {
            tracing::info!(url = %t.url(), "webhook target removed; its queue is still sent");
            t.retire();
        }
        crate::node::lock(retired).extend(targets);
    }

    fn spawn(&self, target: Arc<Target>) {
        let sender = Sender {
            target,
            client: self.client.clone(),
            stats: self.stats.clone(),
            timeout: self.timeout,
            retry_for: self.retry_for,
            backoff: self.backoff,
            confirm: self.confirm.clone(),
        };
        let mut tasks = crate::node::lock(&self.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(tokio::spawn(sender.run()));
    }

    /// Where deliveries are confirmed (the node's webhook backup); set once.
    pub fn confirm_to(&self, links: Arc<Links>) {
        let _ = self.confirm.links.set(links);
    }

    /// Starts one sender task per target (and, from now on, one for each
    /// target an update adds).
    pub fn start(&self) {
        self.started.store(true, Ordering::Release);
        for t in self.slots.load().targets.iter().flatten() {
            self.spawn(t.clone());
        }
    }

    /// Ends every sender task (the end of a shutdown).
    pub fn stop(&self) {
        for t in crate::node::lock(&self.tasks).drain(..) {
            t.abort();
        }
    }

    /// Queues events for every target of their app that wants them.
    pub fn route(&self, events: Vec<ScheduledHook>) {
        let mut unwanted = Vec::new();
        let slots = self.slots.load();
        for ScheduledHook { id, app, event } in events {
            let targets: Vec<&Arc<Target>> = slots
                .targets
                .get(app.0 as usize)
                .map(|t| t.iter().filter(|t| t.wants(&event)).collect())
                .unwrap_or_default();
            if targets.is_empty() {
                unwanted.push(id);
                continue;
            }
            *self
                .confirm
                .outstanding
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(id.clone())
                .or_default() += targets.len();
            for t in targets {
                if !t.enqueue(id.clone(), event.clone(), &self.stats, &self.confirm) {
                    self.confirm.finished([id.as_str()]);
                }
            }
        }
        if let Some(links) = self.confirm.links.get() {
            crate::node::hook_relay::delivered(links, &unwanted);
        }
    }

    /// Webhook events of `app` delivered from this node.
    pub fn app_sent(&self, app: AppIdx) -> u64 {
        self.slots
            .load()
            .sent
            .get(app.0 as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Every target, retired ones included.
    fn all(&self) -> Vec<Arc<Target>> {
        let mut all: Vec<Arc<Target>> = self
            .slots
            .load()
            .targets
            .iter()
            .flatten()
            .cloned()
            .collect();
        all.extend(crate::node::lock(&self.retired).iter().cloned());
        all
    }

    /// Whether every queue is empty.
    pub fn idle(&self) -> bool {
        self.all().iter().all(|t| t.is_empty())
    }

    /// Counts what is still queued as dropped (at the end of a shutdown).
    pub fn abandon(&self) {
        for t in self.all() {
            let n = std::mem::take(&mut t.lock().items).len();
            if n > 0 {
                self.stats.dropped.fetch_add(n as u64, Ordering::Relaxed);
                tracing::warn!(url = %t.url(), events = n, "shutdown deadline: webhook events dropped");
            }
        }
    }
}

struct Sender {
    target: Arc<Target>,
    client: reqwest::Client,
    stats: Arc<WebhookStats>,
    timeout: Duration,
    retry_for: Duration,
    backoff: Duration,
    confirm: Arc<Confirm>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Sender {
    async fn run(self) {
        loop {
            {
                let mut q = self.target.lock();
                if q.items.is_empty() && self.target.retired.load(Ordering::Relaxed) {
                    q.closed = true;
                    return;
                }
            }
            if self.target.is_empty() {
                self.target.notify.notified().await;
                continue;
            }
            if !self.target.batch.is_zero() {
                tokio::time::sleep(self.target.batch).await;
            }
            let (events, last_seq, oldest) = {
                let q = self.target.lock();
                let items: Vec<&Queued> = q.items.iter().take(MAX_EVENTS_PER_REQUEST).collect();
                let Some(last) = items.last() else { continue };
                (
                    items
                        .iter()
                        .map(|i| IdentifiedEvent {
                            event: i.event.clone(),
                            id: i.id.clone(),
                        })
                        .collect::<Vec<_>>(),
                    last.seq,
                    items[0].at,
                )
            };
            let delivered = self.deliver(&events, oldest).await;
            let mut q = self.target.lock();
            let mut finished = Vec::new();
            while q.items.front().is_some_and(|i| i.seq <= last_seq) {
                if let Some(i) = q.items.pop_front() {
                    finished.push(i.id);
                }
            }
            drop(q);
            let n = finished.len() as u64;
            self.confirm.finished(finished.iter().map(String::as_str));
            if delivered {
                self.stats.sent.fetch_add(n, Ordering::Relaxed);
                self.target.sent.fetch_add(n, Ordering::Relaxed);
            } else {
                self.stats.dropped.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(url = %self.target.url(), events = n,
                    "webhook retried for too long, events dropped");
            }
        }
    }

    /// Sends one request until acknowledged or out of time.
    async fn deliver(&self, events: &[IdentifiedEvent], oldest: Instant) -> bool {
        let body = webhook::body(now_ms(), events);
        let signing = self.target.signing();
        let signature = sign::sign(&signing.secret, &String::from_utf8_lossy(&body));
        let mut delay = self.backoff;
        loop {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let r = self
                .client
                .post(self.target.url())
                .headers(self.target.headers.clone())
                .header(CONTENT_TYPE, "application/json")
                .header("X-Pusher-Key", &signing.key)
                .header("X-Pusher-Signature", &signature)
                .timeout(self.timeout)
                .body(body.clone())
                .send()
                .await;
            let failure = match r {
                Ok(resp) if resp.status().is_success() => return true,
                Ok(resp) => format!("status {}", resp.status().as_u16()),
                Err(e) => e.to_string(),
            };
            if oldest.elapsed() + delay > self.retry_for {
                tracing::warn!(url = %self.target.url(), error = %failure, "webhook failed, giving up");
                return false;
            }
            self.stats.retried.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(url = %self.target.url(), error = %failure, retry_in_ms = delay.as_millis() as u64, "webhook failed, retrying");
            // Full jitter around the current step: [delay/2, delay].
            let jittered = delay / 2 + delay.mul_f64(rand::random::<f64>() / 2.0);
            tokio::time::sleep(jittered).await;
            delay = (delay * 2).min(MAX_BACKOFF);
        }
    }
}

#[cfg(test)]
mod tests;
