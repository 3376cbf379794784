//! Frames a Pusher client sends, parsed into [`ClientMessage`].

use serde::Deserialize;
use serde_json::value::RawValue;

/// A frame from a Pusher client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    /// `pusher:subscribe`. The channel is validated by the caller, who knows the app's limits.
    Subscribe {
        /// Channel name as sent.
        channel: String,
        /// `"<key>:<signature>"` for private, encrypted and presence channels.
        auth: Option<String>,
        /// Presence member data, the exact string that was signed.
        channel_data: Option<String>,
        /// The last history position the client saw (pushmesh extension).
        position: Option<String>,
        /// The JSON text of `filter` (pushmesh extension, issue #13),
        /// checked by the session.
        filter: Option<String>,
    },
    /// `pusher:unsubscribe`.
    Unsubscribe {
        /// Channel name as sent.
        channel: String,
    },
    /// `pusher:signin`.
    Signin {
        /// `"<key>:<signature>"` of `<socket_id>::user::<user_data>`.
        auth: String,
        /// The user data string, exactly as signed.
        user_data: String,
    },
    /// `pusher:ping`.
    Ping,
    /// `pusher:pong`, the answer to a server ping.
    Pong,
    /// A `client-` event.
    ClientEvent {
        /// Event name, starting with `client-`.
        event: String,
        /// Channel name as sent.
        channel: String,
        /// The event data as the string that goes into the outgoing `data`
        /// (a string stays itself; any other JSON value is its JSON text).
        data: String,
    },
}

/// Why a client frame is refused. None of these closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not JSON, or not an object with a string `event`.
    #[error("invalid JSON frame: expected an object with a string \"event\"")]
    InvalidJson,
    /// A field is missing or has the wrong type.
    #[error("invalid {event}: {reason}")]
    InvalidData {
        /// The event.
        event: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// An event the server does not know.
    #[error("unsupported event {0:?}")]
    UnknownEvent(String),
}

#[derive(Deserialize)]
struct RawFrame<'a> {
    event: String,
    #[serde(default)]
    channel: Option<String>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct SubscribeData {
    channel: String,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    channel_data: Option<String>,
    #[serde(default)]
    position: Option<String>,
    filter: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct SigninData {
    auth: String,
    user_data: String,
}

/// `data` may be an object or a string holding the object's JSON.
fn object_data<T: for<'de> Deserialize<'de>>(
    event: &str,
    data: Option<&RawValue>,
    reason: &'static str,
) -> Result<T, ParseError> {
    let bad = || ParseError::InvalidData {
        event: event.to_owned(),
        reason,
    };
    let raw = data.ok_or_else(bad)?;
    let text = raw.get();
    if text.starts_with('"') {
        let inner: String = serde_json::from_str(text).map_err(|_| bad())?;
        serde_json::from_str(&inner).map_err(|_| bad())
    } else {
        serde_json::from_str(text).map_err(|_| bad())
    }
}

impl ClientMessage {
    /// Parses one text frame.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let frame: RawFrame<'_> =
            serde_json::from_str(text).map_err(|_| ParseError::InvalidJson)?;
        let event = frame.event;
        match event.as_str() {
            "pusher:ping" => Ok(Self::Ping),
            "pusher:pong" => Ok(Self::Pong),
            "pusher:subscribe" => {
                let d: SubscribeData =
                    object_data(&event, frame.data, "data must hold a string \"channel\"")?;
                Ok(Self::Subscribe {
                    channel: d.channel,
                    auth: d.auth,
                    channel_data: d.channel_data,
                    position: d.position,
                    filter: d.filter.map(|f| f.get().to_owned()),
                })
            }
            "pusher:unsubscribe" => {
                let d: SubscribeData =
                    object_data(&event, frame.data, "data must hold a string \"channel\"")?;
                Ok(Self::Unsubscribe { channel: d.channel })
            }
            "pusher:signin" => {
                let d: SigninData = object_data(
                    &event,
                    frame.data,
                    "data must hold strings \"auth\" and \"user_data\"",
                )?;
                Ok(Self::Signin {
                    auth: d.auth,
                    user_data: d.user_data,
                })
            }
            e if e.starts_with("client-") => {
                let channel = frame.channel.ok_or(ParseError::InvalidData {
                    event: event.clone(),
                    reason: "a client event needs a \"channel\"",
                })?;
                let data = match frame.data {
                    None => String::new(),
                    Some(raw) if raw.get().starts_with('"') => {
                        serde_json::from_str::<String>(raw.get())
                            .map_err(|_| ParseError::InvalidJson)?
                    }
                    Some(raw) => raw.get().to_owned(),
                };
                Ok(Self::ClientEvent {
                    event,
                    channel,
                    data,
                })
            }
            _ => Err(ParseError::UnknownEvent(event)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_subscribe_with_object_or_string_data() {
        let a = ClientMessage::parse(
            r#"{"event":"pusher:subscribe","data":{"channel":"x","auth":"k:s"}}"#,
        );
        let b = ClientMessage::parse(
            r#"{"event":"pusher:subscribe","data":"{\"channel\":\"x\",\"auth\":\"k:s\"}"}"#,
        );
        let want = ClientMessage::Subscribe {
            channel: "x".into(),
            auth: Some("k:s".into()),
            channel_data: None,
            position: None,
            filter: None,
        };
        assert_eq!(a, Ok(want.clone()));
        assert_eq!(b, Ok(want));
    }

    #[test]
    fn parses_the_filter_of_a_subscribe_as_its_json_text() {
        let m = ClientMessage::parse(
            r#"{"event":"pusher:subscribe","data":{"channel":"x","filter":{"zone":["eu"]}}}"#,
        );
        assert_eq!(
            m,
            Ok(ClientMessage::Subscribe {
                channel: "x".into(),
                auth: None,
                channel_data: None,
                position: None,
                filter: Some(r#"{"zone":["eu"]}"#.into()),
            })
        );
    }

    #[test]
    fn parses_client_event_data_forms() {
        let m =
            ClientMessage::parse(r#"{"event":"client-a","channel":"private-x","data":{"k":1}}"#);
        assert_eq!(
            m,
            Ok(ClientMessage::ClientEvent {
                event: "client-a".into(),
                channel: "private-x".into(),
                data: r#"{"k":1}"#.into()
            })
        );
        let m = ClientMessage::parse(r#"{"event":"client-a","channel":"private-x","data":"hi"}"#);
        assert!(matches!(m, Ok(ClientMessage::ClientEvent { data, .. }) if data == "hi"));
    }

    #[test]
    fn refuses_garbage_without_panicking() {
        assert_eq!(
            ClientMessage::parse("not json"),
            Err(ParseError::InvalidJson)
        );
        assert_eq!(ClientMessage::parse("[]"), Err(ParseError::InvalidJson));
        assert_eq!(
            ClientMessage::parse(r#"{"event":5}"#),
            Err(ParseError::InvalidJson)
        );
        assert_eq!(
            ClientMessage::parse(r#"{"event":"pusher:nope"}"#),
            Err(ParseError::UnknownEvent("pusher:nope".into()))
        );
        assert!(matches!(
            ClientMessage::parse(r#"{"event":"pusher:subscribe","data":{}}"#),
            Err(ParseError::InvalidData { .. })
        ));
        assert!(matches!(
            ClientMessage::parse(r#"{"event":"client-x","data":{}}"#),
            Err(ParseError::InvalidData { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,300}") {
            let _ = ClientMessage::parse(&s);
        }
    }
}
