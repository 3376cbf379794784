//! What the I/O side needs per app beside the core's `AppConfig`: the
//! wsify authorizer, webhook URLs and allowed origins (`[[apps]]` tables).

use serde::Deserialize;

/// The wsify authorizer webhook of an app.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizerConfig {
    /// Where to POST.
    pub url: String,
    /// Per-call timeout; no answer in time counts as "down" (5xx).
    #[serde(default = "default_authorizer_timeout")]
    pub timeout_ms: u64,
    /// Calls in flight at once; beyond, a call waits (within its timeout).
    #[serde(default = "default_authorizer_concurrency")]
    pub max_concurrent: usize,
    /// Which commands are sent: `connect`, `join`, `leave`, `broadcast`.
    #[serde(default = "all_commands")]
    pub commands: Vec<String>,
}

fn default_authorizer_timeout() -> u64 {
    2000
}
fn default_authorizer_concurrency() -> usize {
    64
}
pub(super) fn all_commands() -> Vec<String> {
    ["connect", "join", "leave", "broadcast"]
        .map(String::from)
        .to_vec()
}

impl AuthorizerConfig {
    /// An authorizer at `url` with the defaults.
    pub fn with_url(url: String) -> Self {
        Self {
            url,
            timeout_ms: default_authorizer_timeout(),
            max_concurrent: default_authorizer_concurrency(),
            commands: all_commands(),
        }
    }
}

/// One webhook URL of an app.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where to POST.
    pub url: String,
    /// Which events to send; default all.
    #[serde(default)]
    pub event_types: Option<Vec<String>>,
    /// Extra request headers.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Gather events this long into one request; 0 sends as soon as possible
    /// (events that queued up meanwhile still share a request).
    #[serde(default)]
    pub batch_ms: u64,
}

/// What the I/O side needs per app, beside the core's [`AppConfig`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppIo {
    /// wsify authorizer.
    pub authorizer: Option<AuthorizerConfig>,
    /// Pusher webhooks.
    pub webhooks: Vec<WebhookConfig>,
    /// Allowed `Origin` header values; empty allows every origin.
    pub allowed_origins: Vec<String>,
}

impl AppIo {
    /// The top-level `authorizer_url` (or its flag) over the app's
    /// `[apps.authorizer]` URL, at start and on every reload.
    pub fn set_authorizer_url(&mut self, url: String) {
        match &mut self.authorizer {
            Some(a) => a.url = url,
            None => self.authorizer = Some(AuthorizerConfig::with_url(url)),
        }
    }
}
