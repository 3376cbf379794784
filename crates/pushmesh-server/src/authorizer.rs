//! The wsify authorizer webhook: one pooled HTTP client, a timeout per call
//! and a bound on calls in flight.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Semaphore;

use crate::config::AuthorizerConfig;

/// What the authorizer decided.
#[derive(Debug)]
pub enum Verdict {
    /// 200.
    Allowed,
    /// Any other non-5xx status.
    Refused(u16),
    /// 5xx, no answer in time, or unreachable: the client should reconnect later.
    Unavailable(Unavailable),
}

/// Why the authorizer gave no verdict.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// The authorizer is shutting down.
    #[error("authorizer closed")]
    Closed,
    /// The request failed (unreachable, reset).
    #[error(transparent)]
    Request(#[from] reqwest::Error),
    /// No answer within the timeout (in ms).
    #[error("no answer within {0} ms")]
    Timeout(u128),
    /// A 5xx status.
    #[error("status {0}")]
    Status(u16),
}

/// Authorizer counters.
#[derive(Debug, Default)]
pub struct AuthorizerStats {
    /// Calls answered 200.
    pub allowed: AtomicU64,
    /// Calls refused.
    pub refused: AtomicU64,
    /// Calls that failed (5xx, timeout, unreachable).
    pub unavailable: AtomicU64,
    /// Fire-and-forget notifications skipped because too many calls were in flight.
    pub notifications_skipped: AtomicU64,
}

/// One app's authorizer.
pub struct Authorizer {
    /// What it was made from.
    config: AuthorizerConfig,
    client: reqwest::Client,
    url: String,
    timeout: Duration,
    in_flight: Arc<Semaphore>,
    commands: HashSet<String>,
    stats: Arc<AuthorizerStats>,
}

impl Authorizer {
    /// An authorizer from its configuration, sharing `client`'s pool.
    pub fn new(
        cfg: &AuthorizerConfig,
        client: reqwest::Client,
        stats: Arc<AuthorizerStats>,
    ) -> Self {
        Self {
            config: cfg.clone(),
            client,
            url: cfg.url.clone(),
            timeout: Duration::from_millis(cfg.timeout_ms),
            in_flight: Arc::new(Semaphore::new(cfg.max_concurrent.max(1))),
            commands: cfg.commands.iter().cloned().collect(),
            stats,
        }
    }

    /// What it was made from.
    pub fn config(&self) -> &AuthorizerConfig {
        &self.config
    }

    /// Whether `command` is sent to the authorizer.
    pub fn wants(&self, command: &str) -> bool {
        self.commands.contains(command)
    }

    /// Asks; the whole call (waiting for a slot included) is bounded by the timeout.
    pub async fn ask(&self, body: &Value) -> Verdict {
        let call = async {
            let _permit = self
                .in_flight
                .acquire()
                .await
                .map_err(|_| Unavailable::Closed)?;
            let r = self.client.post(&self.url).json(body).send().await?;
            Ok::<u16, Unavailable>(r.status().as_u16())
        };
        let verdict = match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Verdict::Unavailable(Unavailable::Timeout(self.timeout.as_millis())),
            Ok(Err(e)) => Verdict::Unavailable(e),
            Ok(Ok(200)) => Verdict::Allowed,
            Ok(Ok(s)) if s >= 500 => Verdict::Unavailable(Unavailable::Status(s)),
            Ok(Ok(s)) => Verdict::Refused(s),
        };
        let counter = match verdict {
            Verdict::Allowed => &self.stats.allowed,
            Verdict::Refused(_) => &self.stats.refused,
            Verdict::Unavailable(_) => &self.stats.unavailable,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        verdict
    }

    /// Fire-and-forget (`disconnect`, implied `leave`): never waits for a
    /// slot; when all are busy the notification is skipped and counted.
    pub fn notify(self: &Arc<Self>, body: Value) {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            self.stats
                .notifications_skipped
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let send = this.client.post(&this.url).json(&body).send();
            let _ = tokio::time::timeout(this.timeout, send).await;
        });
    }
}
