//! Pusher webhook delivery: one bounded queue and one sender task per URL.
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pushmesh_core::ScheduledHook;
use pushmesh_protocol::sign;
use pushmesh_protocol::webhook::{self, IdentifiedEvent, WebhookEvent};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use tokio::sync::Notify;

use crate::config::Config;
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
}

/// One webhook URL of one app.
pub struct Target {
    url: String,
    filter: Option<HashSet<String>>,
    headers: HeaderMap,
    batch: Duration,
    key: String,
    secret: String,
    cap: usize,
    queue: Mutex<Queue>,
    notify: Notify,
    /// Events delivered to this URL (per-app stats).
    sent: AtomicU64,
}

impl Target {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wants(&self, e: &WebhookEvent) -> bool {
        self.filter.as_ref().is_none_or(|f| f.contains(e.name()))
    }

    fn enqueue(&self, id: String, event: WebhookEvent, stats: &WebhookStats, confirm: &Confirm) {
        let mut dropped = None;
        {
            let mut q = self.lock();
            if q.items.len() >= self.cap {
                if let Some(old) = q.items.pop_front() {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(url = %self.url, event = old.event.name(), channel = old.event.channel(),
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
    }

    fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }
}

/// Every app's webhook targets and their counters.
pub struct Webhooks {
    targets: Vec<Vec<Arc<Target>>>,
    /// Counters.
    pub stats: Arc<WebhookStats>,
    client: reqwest::Client,
    timeout: Duration,
    retry_for: Duration,
    backoff: Duration,
    confirm: Arc<Confirm>,
}

impl Webhooks {
    /// Targets from the configuration; no task runs until [`Webhooks::start`].
    pub fn new(config: &Config, client: reqwest::Client) -> Self {
        let targets = config
            .apps
            .iter()
            .zip(&config.app_io)
            .map(|(app, io)| {
                io.webhooks
                    .iter()
                    .map(|w| {
                        let mut headers = HeaderMap::new();
                        for (k, v) in &w.headers {
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
                        Arc::new(Target {
                            url: w.url.clone(),
                            filter: w.event_types.as_ref().map(|t| t.iter().cloned().collect()),
                            headers,
                            batch: Duration::from_millis(w.batch_ms),
                            key: app.key.clone(),
                            secret: app.secret.clone(),
                            cap: config.webhook_queue.max(1),
                            queue: Mutex::new(Queue::default()),
                            notify: Notify::new(),
                            sent: AtomicU64::new(0),
                        })
                    })
                    .collect()
            })
            .collect();
        Self {
            targets,
            stats: Arc::new(WebhookStats::default()),
            client,
            timeout: config.webhook_timeout,
            retry_for: config.webhook_retry_for,
            backoff: config.webhook_backoff,
            confirm: Arc::default(),
        }
    }

    /// Where deliveries are confirmed (the node's webhook backup); set once.
    pub fn confirm_to(&self, links: Arc<Links>) {
        let _ = self.confirm.links.set(links);
    }

    /// Starts one sender task per target.
    pub fn start(&self) -> Vec<tokio::task::JoinHandle<()>> {
        self.targets
            .iter()
            .flatten()
            .map(|t| {
                let sender = Sender {
                    target: t.clone(),
                    client: self.client.clone(),
                    stats: self.stats.clone(),
                    timeout: self.timeout,
                    retry_for: self.retry_for,
                    backoff: self.backoff,
                    confirm: self.confirm.clone(),
                };
                tokio::spawn(sender.run())
            })
            .collect()
    }

    /// Queues events for every target of their app that wants them.
    pub fn route(&self, events: Vec<ScheduledHook>) {
        let mut unwanted = Vec::new();
        for ScheduledHook { id, app, event } in events {
            let targets: Vec<&Arc<Target>> = self
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
                t.enqueue(id.clone(), event.clone(), &self.stats, &self.confirm);
            }
        }
        if let Some(links) = self.confirm.links.get() {
            crate::node::hook_relay::delivered(links, &unwanted);
        }
    }

    /// Webhook events of `app` delivered from this node.
    pub fn app_sent(&self, app: pushmesh_core::AppIdx) -> u64 {
        self.targets.get(app.0 as usize).map_or(0, |t| {
            t.iter().map(|t| t.sent.load(Ordering::Relaxed)).sum()
        })
    }

    /// Whether every queue is empty.
    pub fn idle(&self) -> bool {
        self.targets.iter().flatten().all(|t| t.is_empty())
    }

    /// Counts what is still queued as dropped (at the end of a shutdown).
    pub fn abandon(&self) {
        for t in self.targets.iter().flatten() {
            let n = std::mem::take(&mut t.lock().items).len();
            if n > 0 {
                self.stats.dropped.fetch_add(n as u64, Ordering::Relaxed);
                tracing::warn!(url = %t.url, events = n, "shutdown deadline: webhook events dropped");
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
                tracing::warn!(url = %self.target.url, events = n,
                    "webhook retried for too long, events dropped");
            }
        }
    }

    /// Sends one request until acknowledged or out of time.
    async fn deliver(&self, events: &[IdentifiedEvent], oldest: Instant) -> bool {
        let body = webhook::body(now_ms(), events);
        let signature = sign::sign(&self.target.secret, &String::from_utf8_lossy(&body));
        let mut delay = self.backoff;
        loop {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let r = self
                .client
                .post(&self.target.url)
                .headers(self.target.headers.clone())
                .header(CONTENT_TYPE, "application/json")
                .header("X-Pusher-Key", &self.target.key)
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
                tracing::warn!(url = %self.target.url, error = %failure, "webhook failed, giving up");
                return false;
            }
            self.stats.retried.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(url = %self.target.url, error = %failure, retry_in_ms = delay.as_millis() as u64, "webhook failed, retrying");
            // Full jitter around the current step: [delay/2, delay].
            let jittered = delay / 2 + delay.mul_f64(rand::random::<f64>() / 2.0);
            tokio::time::sleep(jittered).await;
            delay = (delay * 2).min(MAX_BACKOFF);
        }
    }
}
