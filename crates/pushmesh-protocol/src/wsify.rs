//! The wsify protocol spoken on `/ws`: `join` / `leave` / `broadcast` commands.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A command from a wsify client.
#[derive(Debug, Clone)]
pub enum WsifyCommand {
    /// Join a channel.
    Join {
        /// Channel name as sent.
        channel: String,
        /// The last history position the client saw (`args.position`).
        position: Option<String>,
        /// `args.filter` as JSON text (pushmesh extension, issue #13).
        filter: Option<String>,
    },
    /// Leave a channel.
    Leave {
        /// Channel name as sent.
        channel: String,
    },
    /// Send `content` to everyone in the channel.
    Broadcast {
        /// Channel name as sent.
        channel: String,
        /// Any JSON value.
        content: Box<RawValue>,
        /// `args.tags` as JSON text (pushmesh extension, issue #13).
        tags: Option<String>,
    },
}

impl WsifyCommand {
    /// The command's name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Join { .. } => "join",
            Self::Leave { .. } => "leave",
            Self::Broadcast { .. } => "broadcast",
        }
    }

    /// The channel it concerns.
    pub fn channel(&self) -> &str {
        match self {
            Self::Join { channel, .. }
            | Self::Leave { channel }
            | Self::Broadcast { channel, .. } => channel,
        }
    }
}

/// Why a wsify frame is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsifyError {
    /// Not `{"command": str, "args": object}`.
    #[error("invalid frame: expected {{\"command\": string, \"args\": object}}")]
    Invalid,
    /// Unknown command.
    #[error("unknown command {0:?}")]
    UnknownCommand(String),
    /// `args` lacks a field.
    #[error("{command}: args need {field}")]
    MissingArg {
        /// Command.
        command: &'static str,
        /// Missing field.
        field: &'static str,
    },
}

#[derive(Deserialize)]
struct Frame<'a> {
    command: String,
    #[serde(borrow, default)]
    args: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Args {
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    content: Option<Box<RawValue>>,
    #[serde(default)]
    position: Option<String>,
    filter: Option<Box<RawValue>>,
    #[serde(default)]
    tags: Option<Box<RawValue>>,
}

impl WsifyCommand {
    /// Parses one text frame. Never reuses anything from an earlier frame.
    pub fn parse(text: &str) -> Result<Self, WsifyError> {
        let f: Frame<'_> = serde_json::from_str(text).map_err(|_| WsifyError::Invalid)?;
        let args: Args = match f.args {
            Some(a) => serde_json::from_str(a.get()).map_err(|_| WsifyError::Invalid)?,
            None => Args {
                channel: None,
                content: None,
                position: None,
                filter: None,
                tags: None,
            },
        };
        let name: &'static str = match f.command.as_str() {
            "join" => "join",
            "leave" => "leave",
            "broadcast" => "broadcast",
            _ => return Err(WsifyError::UnknownCommand(f.command)),
        };
        let channel = args
            .channel
            .filter(|c| !c.is_empty())
            .ok_or(WsifyError::MissingArg {
                command: name,
                field: "channel",
            })?;
        let cmd = match name {
            "join" => Self::Join {
                channel,
                position: args.position,
                filter: args.filter.map(|f| f.get().to_owned()),
            },
            "leave" => Self::Leave { channel },
            _ => Self::Broadcast {
                channel,
                content: args.content.ok_or(WsifyError::MissingArg {
                    command: name,
                    field: "content",
                })?,
                tags: args.tags.map(|t| t.get().to_owned()),
            },
        };
        Ok(cmd)
    }
}

/// A channel message to a wsify client: the raw content (wsify's format).
pub fn raw_frame(content: &str) -> Bytes {
    Bytes::copy_from_slice(content.as_bytes())
}

/// A channel message in envelope mode: `{"channel", "content"}`.
pub fn envelope_frame(channel: &str, content: &RawValue) -> Bytes {
    #[derive(Serialize)]
    struct E<'a> {
        channel: &'a str,
        content: &'a RawValue,
    }
    Bytes::from(serde_json::to_vec(&E { channel, content }).unwrap_or_default())
}

/// A channel message in envelope mode on a history channel: with its
/// `position`.
pub fn envelope_frame_at(channel: &str, content: &RawValue, position: &str) -> Bytes {
    #[derive(Serialize)]
    struct E<'a> {
        channel: &'a str,
        content: &'a RawValue,
        position: &'a str,
    }
    Bytes::from(
        serde_json::to_vec(&E {
            channel,
            content,
            position,
        })
        .unwrap_or_default(),
    )
}

/// An error frame in envelope mode: `{"error": {"command", "message"}}`.
pub fn error_frame(command: &str, message: &str) -> Bytes {
    #[derive(Serialize)]
    struct I<'a> {
        command: &'a str,
        message: &'a str,
    }
    #[derive(Serialize)]
    struct E<'a> {
        error: I<'a>,
    }
    Bytes::from(
        serde_json::to_vec(&E {
            error: I { command, message },
        })
        .unwrap_or_default(),
    )
}

/// The content a wsify client receives for a Pusher event's `data`: the data
/// itself when it is JSON, else the data as a JSON string.
pub fn content_of_event_data(data: &str) -> Box<RawValue> {
    match serde_json::from_str::<&RawValue>(data) {
        Ok(raw) => raw.to_owned(),
        Err(_) => match serde_json::to_string(data).map(RawValue::from_string) {
            Ok(Ok(r)) => r,
            _ => RawValue::from_string("null".into()).unwrap_or_else(|_| unreachable!()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        let c = WsifyCommand::parse(r#"{"command":"join","args":{"channel":"hello"}}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(c, WsifyCommand::Join { channel, filter: None, .. } if channel == "hello")
        );
        let c = WsifyCommand::parse(
            r#"{"command":"broadcast","args":{"channel":"h","content":{"a":[1]}}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(c, WsifyCommand::Broadcast { content, .. } if content.get() == r#"{"a":[1]}"#)
        );
        assert_eq!(WsifyCommand::parse("nope").err(), Some(WsifyError::Invalid));
        assert_eq!(
            WsifyCommand::parse(r#"{"command":"dance","args":{}}"#).err(),
            Some(WsifyError::UnknownCommand("dance".into()))
        );
        assert_eq!(
            WsifyCommand::parse(r#"{"command":"join","args":{}}"#).err(),
            Some(WsifyError::MissingArg {
                command: "join",
                field: "channel"
            })
        );
        assert_eq!(
            WsifyCommand::parse(r#"{"command":"broadcast","args":{"channel":"x"}}"#).err(),
            Some(WsifyError::MissingArg {
                command: "broadcast",
                field: "content"
            })
        );
    }

    #[test]
    fn frames() {
        let content = content_of_event_data(r#"{"x":1}"#);
        assert_eq!(content.get(), r#"{"x":1}"#);
        assert_eq!(content_of_event_data("plain text").get(), r#""plain text""#);
        assert_eq!(
            &envelope_frame("c", &content)[..],
            br#"{"channel":"c","content":{"x":1}}"#
        );
        assert_eq!(
            &error_frame("join", "no")[..],
            br#"{"error":{"command":"join","message":"no"}}"#
        );
    }
}
