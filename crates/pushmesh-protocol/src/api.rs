//! Bodies of the Pusher HTTP API (spec §7).

use serde::Deserialize;
use serde_json::value::RawValue;

/// `data` of a trigger: SDKs send a string; any other JSON value is taken as its JSON text.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct EventData(Box<RawValue>);

impl EventData {
    /// The data as the string that goes into the event's `data`.
    pub fn into_string(self) -> Result<String, serde_json::Error> {
        let raw = self.0.get();
        if raw.starts_with('"') {
            serde_json::from_str(raw)
        } else {
            Ok(raw.to_owned())
        }
    }
}

/// `POST /apps/{id}/events`.
#[derive(Debug, Deserialize)]
pub struct TriggerRequest {
    /// Event name.
    pub name: String,
    /// Event data.
    pub data: EventData,
    /// Target channels.
    #[serde(default)]
    pub channels: Option<Vec<String>>,
    /// A single target channel.
    #[serde(default)]
    pub channel: Option<String>,
    /// The socket to leave out.
    #[serde(default)]
    pub socket_id: Option<String>,
    /// Comma-separated attributes to return per channel.
    #[serde(default)]
    pub info: Option<String>,
    /// Tags for subscription filters (pushmesh extension, issue #13),
    /// checked by the server.
    #[serde(default)]
    pub tags: Option<Box<RawValue>>,
}

/// One event of `POST /apps/{id}/batch_events`.
#[derive(Debug, Deserialize)]
pub struct BatchEvent {
    /// Event name.
    pub name: String,
    /// Event data.
    pub data: EventData,
    /// Target channel.
    pub channel: String,
    /// The socket to leave out.
    #[serde(default)]
    pub socket_id: Option<String>,
    /// Comma-separated attributes to return.
    #[serde(default)]
    pub info: Option<String>,
    /// Tags for subscription filters (pushmesh extension, issue #13).
    #[serde(default)]
    pub tags: Option<Box<RawValue>>,
}

/// `POST /apps/{id}/batch_events`.
#[derive(Debug, Deserialize)]
pub struct BatchRequest {
    /// The events.
    pub batch: Vec<BatchEvent>,
}

/// Attributes a caller may ask for in `info`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InfoFlags {
    /// `user_count` (presence channels only).
    pub user_count: bool,
    /// `subscription_count`.
    pub subscription_count: bool,
    /// `cache` (cache channels).
    pub cache: bool,
}

impl InfoFlags {
    /// Parses a comma-separated `info` value; unknown attributes are ignored.
    pub fn parse(info: Option<&str>) -> Self {
        let mut f = Self::default();
        for part in info.unwrap_or("").split(',').map(str::trim) {
            match part {
                "user_count" => f.user_count = true,
                "subscription_count" => f.subscription_count = true,
                "cache" => f.cache = true,
                _ => {}
            }
        }
        f
    }

    /// Whether any attribute was asked for.
    pub fn any(self) -> bool {
        self.user_count || self.subscription_count || self.cache
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_data_string_or_object() {
        let t: TriggerRequest =
            serde_json::from_str(r#"{"name":"a","channel":"c","data":"{\"x\":1}"}"#)
                .map_err(|e| e.to_string())
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.data.into_string().ok().as_deref(), Some(r#"{"x":1}"#));
        let t: TriggerRequest =
            serde_json::from_str(r#"{"name":"a","channel":"c","data":{"x":1}}"#)
                .map_err(|e| e.to_string())
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.data.into_string().ok().as_deref(), Some(r#"{"x":1}"#));
    }

    #[test]
    fn info_flags() {
        let f = InfoFlags::parse(Some("user_count, subscription_count,bogus"));
        assert!(f.user_count && f.subscription_count && !f.cache);
        assert!(!InfoFlags::parse(None).any());
    }
}
