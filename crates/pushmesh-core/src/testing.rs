//! Fixtures shared by the core's tests, simulations and benchmarks: one app
//! with every switch at its usual value and a node configuration around it.
//! Not part of the API; callers change the fields they care about.

use pushmesh_protocol::Limits;

use crate::{AppConfig, Core, CoreConfig};

/// The fixture app's key.
pub const KEY: &str = "key";
/// The fixture app's secret.
pub const SECRET: &str = "secret";

/// App `1` (key [`KEY`], secret [`SECRET`]): enabled, client events
/// allowed, no sign-in required, default limits, no webhooks, no history.
pub fn app() -> AppConfig {
    AppConfig {
        id: "1".into(),
        key: KEY.into(),
        secret: SECRET.into(),
        previous_secret: None,
        enabled: true,
        client_events: true,
        user_authentication_required: false,
        max_connections: None,
        subscription_count_events: false,
        limits: Limits::default(),
        webhooks: false,
        wsify_event: "broadcast".into(),
        history: None,
    }
}

/// Node `node_id` (epoch 1, socket ids `<socket_prefix>.<conn>`) serving
/// `apps`: `activity_timeout` 120 s, no connection quota, the default
/// history budget.
pub fn config(apps: Vec<AppConfig>, node_id: &str, socket_prefix: u32) -> CoreConfig {
    CoreConfig {
        apps,
        activity_timeout_secs: 120,
        max_connections: None,
        socket_prefix,
        node_id: node_id.into(),
        epoch: 1,
        history_max_bytes: crate::history::MAX_BYTES,
    }
}

/// A [`Core`] named `node_id` serving `app` alone, socket prefix 1,
/// started at `now`.
pub fn core(now: std::time::Instant, app: AppConfig, node_id: &str) -> Core {
    Core::new(now, config(vec![app], node_id, 1))
}
