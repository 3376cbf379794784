//! Frames the server sends. Each is encoded once into [`Bytes`] that every
//! recipient shares.

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

fn encode<T: Serialize>(v: &T) -> Bytes {
    // Serializing these plain structs of strings and numbers cannot fail.
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

#[derive(Serialize)]
struct Frame<'a, D: Serialize> {
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    data: D,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
}

fn frame<D: Serialize>(event: &str, channel: Option<&str>, data: D) -> Bytes {
    encode(&Frame {
        event,
        channel,
        data,
        user_id: None,
    })
}

/// `data` as a JSON string holding the JSON of `v` (the double encoding).
fn stringified<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// `pusher:connection_established`.
pub fn connection_established(socket_id: &str, activity_timeout: u64) -> Bytes {
    #[derive(Serialize)]
    struct D<'a> {
        socket_id: &'a str,
        activity_timeout: u64,
    }
    frame(
        "pusher:connection_established",
        None,
        stringified(&D {
            socket_id,
            activity_timeout,
        }),
    )
}

/// `pusher:error` (data is an object).
pub fn error(message: &str, code: Option<u16>) -> Bytes {
    #[derive(Serialize)]
    struct D<'a> {
        message: &'a str,
        code: Option<u16>,
    }
    frame("pusher:error", None, D { message, code })
}

/// `pusher:pong`.
pub fn pong() -> Bytes {
    Bytes::from_static(br#"{"event":"pusher:pong","data":{}}"#)
}

/// `pusher:ping`, sent to an idle client.
pub fn ping() -> Bytes {
    Bytes::from_static(br#"{"event":"pusher:ping","data":{}}"#)
}

/// `pusher_internal:subscription_succeeded` for a non-presence channel.
pub fn subscription_succeeded(channel: &str) -> Bytes {
    frame(
        "pusher_internal:subscription_succeeded",
        Some(channel),
        "{}",
    )
}

/// What `subscription_succeeded` says on a history channel: the current
/// `position`, and, when the client asked for one, whether it `recovered`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Recovery<'a> {
    /// Whether every event after the asked position follows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    /// The channel's position on this node.
    pub position: &'a str,
}

/// `pusher_internal:subscription_succeeded` on a history channel.
pub fn subscription_succeeded_at(channel: &str, recovery: Recovery<'_>) -> Bytes {
    frame(
        "pusher_internal:subscription_succeeded",
        Some(channel),
        stringified(&recovery),
    )
}

/// A presence member as listed in `subscription_succeeded`.
pub struct MemberRef<'a> {
    /// User id.
    pub id: &'a str,
    /// `user_info` JSON, if any.
    pub info: Option<&'a RawValue>,
}

/// `pusher_internal:subscription_succeeded` for a presence channel, listing every member.
pub fn presence_subscription_succeeded<'a>(
    channel: &str,
    members: impl ExactSizeIterator<Item = MemberRef<'a>> + Clone,
    recovery: Option<Recovery<'a>>,
) -> Bytes {
    #[derive(Serialize)]
    struct Presence<'a> {
        ids: Vec<&'a str>,
        hash: serde_json::Map<String, serde_json::Value>,
        count: usize,
    }
    #[derive(Serialize)]
    struct D<'a> {
        presence: Presence<'a>,
        #[serde(flatten, skip_serializing_if = "Option::is_none")]
        recovery: Option<Recovery<'a>>,
    }
    let count = members.len();
    let ids = members.clone().map(|m| m.id).collect();
    let hash = members
        .map(|m| {
            let info = m
                .info
                .and_then(|r| serde_json::from_str(r.get()).ok())
                .unwrap_or(serde_json::Value::Null);
            (m.id.to_owned(), info)
        })
        .collect();
    frame(
        "pusher_internal:subscription_succeeded",
        Some(channel),
        stringified(&D {
            presence: Presence { ids, hash, count },
            recovery,
        }),
    )
}

/// `pusher:subscription_error` (data is an object).
pub fn subscription_error(channel: &str, kind: &str, error: &str, status: u16) -> Bytes {
    #[derive(Serialize)]
    struct D<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        error: &'a str,
        status: u16,
    }
    frame(
        "pusher:subscription_error",
        Some(channel),
        D {
            kind,
            error,
            status,
        },
    )
}

/// `pusher_internal:member_added`.
pub fn member_added(channel: &str, user_id: &str, user_info: Option<&RawValue>) -> Bytes {
    #[derive(Serialize)]
    struct D<'a> {
        user_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        user_info: Option<&'a RawValue>,
    }
    frame(
        "pusher_internal:member_added",
        Some(channel),
        stringified(&D { user_id, user_info }),
    )
}

/// `pusher_internal:member_removed`.
pub fn member_removed(channel: &str, user_id: &str) -> Bytes {
    #[derive(Serialize)]
    struct D<'a> {
        user_id: &'a str,
    }
    frame(
        "pusher_internal:member_removed",
        Some(channel),
        stringified(&D { user_id }),
    )
}

/// `pusher_internal:subscription_count`.
pub fn subscription_count(channel: &str, count: usize) -> Bytes {
    #[derive(Serialize)]
    struct D {
        subscription_count: usize,
    }
    frame(
        "pusher_internal:subscription_count",
        Some(channel),
        stringified(&D {
            subscription_count: count,
        }),
    )
}

/// `pusher:cache_miss`.
pub fn cache_miss(channel: &str) -> Bytes {
    frame("pusher:cache_miss", Some(channel), "{}")
}

/// `pusher:signin_success` (data is an object).
pub fn signin_success(user_data: &str) -> Bytes {
    #[derive(Serialize)]
    struct D<'a> {
        user_data: &'a str,
    }
    frame("pusher:signin_success", None, D { user_data })
}

/// One watchlist event: users that came online or went offline.
#[derive(Serialize)]
pub struct WatchlistEvent<'a> {
    /// `online` or `offline`.
    pub name: &'a str,
    /// The users concerned.
    pub user_ids: Vec<&'a str>,
}

/// `pusher_internal:watchlist_events` (data is an object).
pub fn watchlist_events(events: &[WatchlistEvent<'_>]) -> Bytes {
    #[derive(Serialize)]
    struct D<'a, 'b> {
        events: &'b [WatchlistEvent<'a>],
    }
    frame("pusher_internal:watchlist_events", None, D { events })
}

/// A channel event on a history channel: with its `position`.
pub fn channel_event_at(
    event: &str,
    channel: &str,
    data: &str,
    user_id: Option<&str>,
    position: &str,
) -> Bytes {
    #[derive(Serialize)]
    struct F<'a> {
        event: &'a str,
        channel: &'a str,
        data: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        user_id: Option<&'a str>,
        position: &'a str,
    }
    encode(&F {
        event,
        channel,
        data,
        user_id,
        position,
    })
}

/// A channel event; `data` is sent as a JSON string.
pub fn channel_event(event: &str, channel: &str, data: &str, user_id: Option<&str>) -> Bytes {
    encode(&Frame {
        event,
        channel: Some(channel),
        data,
        user_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_established_is_double_encoded() {
        let b = connection_established("1.2", 120);
        assert_eq!(
            &b[..],
            br#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"1.2\",\"activity_timeout\":120}"}"#
        );
    }

    #[test]
    fn error_data_is_an_object() {
        assert_eq!(
            &error("no", Some(4001))[..],
            br#"{"event":"pusher:error","data":{"message":"no","code":4001}}"#
        );
        assert_eq!(
            &error("no", None)[..],
            br#"{"event":"pusher:error","data":{"message":"no","code":null}}"#
        );
    }

    #[test]
    fn channel_event_escapes() {
        let b = channel_event("e", "c", "{\"a\":\"\\u0000\"}", Some("7"));
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
        assert_eq!(v["data"], "{\"a\":\"\\u0000\"}");
        assert_eq!(v["user_id"], "7");
    }

    #[test]
    fn presence_lists_members() {
        let info = RawValue::from_string(r#"{"name":"a"}"#.into()).ok();
        let members = [
            MemberRef {
                id: "1",
                info: info.as_deref(),
            },
            MemberRef {
                id: "2",
                info: None,
            },
        ];
        let b = presence_subscription_succeeded(
            "presence-x",
            members.iter().map(|m| MemberRef {
                id: m.id,
                info: m.info,
            }),
            None,
        );
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
        let d: serde_json::Value =
            serde_json::from_str(v["data"].as_str().unwrap_or("")).unwrap_or_default();
        assert_eq!(d["presence"]["count"], 2);
        assert_eq!(d["presence"]["ids"][1], "2");
        assert_eq!(d["presence"]["hash"]["1"]["name"], "a");
    }
}
