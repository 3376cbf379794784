//! The `[apps.history]` table of an app and the node-wide
//! `history_max_bytes`, checked and turned into the core's settings.

use std::time::Duration;

use pushmesh_core::history::AppHistory;
use serde::Deserialize;

use super::ConfigError;

/// `[apps.history]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileHistory {
    channels: Vec<String>,
    #[serde(default)]
    max_events: Option<usize>,
    #[serde(default)]
    ttl_secs: Option<u64>,
}

/// Most events a channel may keep (`max_events`).
const MAX_EVENTS_LIMIT: usize = 100_000;

impl FileHistory {
    /// Checks the table of app `app`.
    pub(super) fn resolve(self, app: &str) -> Result<AppHistory, ConfigError> {
        let bad = |why: String| ConfigError::Invalid(format!("app {app:?}: [apps.history] {why}"));
        if self.channels.is_empty() {
            return Err(bad("channels must name at least one pattern".into()));
        }
        for p in &self.channels {
            let body = p.strip_suffix('*').unwrap_or(p);
            if body.contains('*') {
                return Err(bad(format!(
                    "channel pattern {p:?}: `*` may only end a pattern (it matches any suffix)"
                )));
            }
        }
        let max_events = self.max_events.unwrap_or(AppHistory::MAX_EVENTS);
        if max_events == 0 || max_events > MAX_EVENTS_LIMIT {
            return Err(bad(format!(
                "max_events must be 1 to {MAX_EVENTS_LIMIT}, not {max_events}"
            )));
        }
        let ttl_secs = self.ttl_secs.unwrap_or(AppHistory::TTL_SECS);
        if ttl_secs == 0 {
            return Err(bad("ttl_secs must be at least 1".into()));
        }
        Ok(AppHistory {
            channels: self.channels,
            max_events,
            ttl: Duration::from_secs(ttl_secs),
        })
    }
}
