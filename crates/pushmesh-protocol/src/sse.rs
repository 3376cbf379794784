//! Server-Sent Events (`GET /app/{key}/sse`): the stream token, the
//! stream's cursor (its `id:`), and the translation of the frames a Pusher
//! client receives into SSE events (sans-I/O).
//!
//! An SSE stream is, in the core, a Pusher subscriber: the frames queued
//! for it are the shared Pusher frames. [`StreamWriter`] turns each into
//! `id:` (the stream's cursor, on history channels), `event:` (the frame's
//! event name) and `data:` (the frame itself, one line of JSON).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::{BufMut, BytesMut};
use serde::Deserialize;

use crate::sign;

/// The comment written every `sse_heartbeat_secs`.
pub const HEARTBEAT: &[u8] = b": ping\n\n";

/// The reconnection delay announced once at the start of a stream (ms).
pub const RETRY_MS: u32 = 1000;

/// Longest `Last-Event-ID` / `last_event_id` taken (a cursor of 16
/// channels with long vector positions stays far below it).
pub const MAX_CURSOR_BYTES: usize = 16 * 1024;

/// The event announcing, per history channel, whether a resumed stream
/// recovered what it missed.
pub const RECOVERED_EVENT: &str = "pushmesh:recovered";

/// The string a stream token signs: `sse:<channels sorted by byte value,
/// de-duplicated, joined with ",">:<expires>`.
pub fn token_string<S: AsRef<str>>(channels: &[S], expires: u64) -> String {
    let mut sorted: Vec<&str> = channels.iter().map(AsRef::as_ref).collect();
    sorted.sort_unstable();
    sorted.dedup();
    format!("sse:{}:{expires}", sorted.join(","))
}

/// A stream token, `<key>:<expires>:<hex>`, as an app server makes it.
pub fn sign_token<S: AsRef<str>>(key: &str, secret: &str, channels: &[S], expires: u64) -> String {
    let sig = sign::sign(secret, &token_string(channels, expires));
    format!("{key}:{expires}:{sig}")
}

/// Why a stream token is refused (403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token, and a channel of the stream needs one.
    #[error("token required: private-, private-encrypted- and #server-to-user- channels need token=<key>:<expires>:<signature>")]
    Missing,
    /// Not `<key>:<expires>:<hex>`.
    #[error("token must be of the form <key>:<expires>:<signature>")]
    Malformed,
    /// Another app's key.
    #[error("token key does not match the app key")]
    WrongKey,
    /// `expires` is in the past.
    #[error("token expired")]
    Expired,
    /// The signature does not verify for these channels.
    #[error("invalid token signature")]
    BadSignature,
}

/// Checks a stream token for `channels` at `now_unix` (seconds).
pub fn verify_token<S: AsRef<str>>(
    key: &str,
    secret: &str,
    token: &str,
    channels: &[S],
    now_unix: u64,
) -> Result<(), TokenError> {
    let mut parts = token.splitn(3, ':');
    let (Some(k), Some(expires), Some(sig)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(TokenError::Malformed);
    };
    let expires: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
    if !sign::constant_time_eq(k.as_bytes(), key.as_bytes()) {
        return Err(TokenError::WrongKey);
    }
    if expires < now_unix {
        return Err(TokenError::Expired);
    }
    let message = token_string(channels, expires);
    if sign::verify(secret, message.as_bytes(), sig) {
        Ok(())
    } else {
        Err(TokenError::BadSignature)
    }
}

/// Why a `Last-Event-ID` is not a cursor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    /// Longer than [`MAX_CURSOR_BYTES`].
    #[error("cursor longer than {MAX_CURSOR_BYTES} bytes")]
    TooLong,
    /// Not base64url of a JSON object of strings.
    #[error("not a cursor of this server")]
    Invalid,
}

/// A stream's positions on its history channels: what its `id:` carries
/// (base64url, no padding, of a JSON object channel → position). Opaque to
/// clients; its format may change between versions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor(BTreeMap<String, String>);

impl Cursor {
    /// The text form (the `id:` value).
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(&self.0).unwrap_or_default();
        URL_SAFE_NO_PAD.encode(json)
    }

    /// Parses a cursor sent back as `Last-Event-ID`.
    pub fn decode(text: &str) -> Result<Self, CursorError> {
        if text.len() > MAX_CURSOR_BYTES {
            return Err(CursorError::TooLong);
        }
        let json = URL_SAFE_NO_PAD
            .decode(text.trim())
            .map_err(|_| CursorError::Invalid)?;
        serde_json::from_slice(&json)
            .map(Self)
            .map_err(|_| CursorError::Invalid)
    }

    /// The position on `channel`, if the stream had one.
    pub fn position(&self, channel: &str) -> Option<&str> {
        self.0.get(channel).map(String::as_str)
    }

    /// Sets the position on `channel`; whether it changed.
    pub fn set(&mut self, channel: &str, position: &str) -> bool {
        match self.0.get_mut(channel) {
            Some(p) if p == position => false,
            Some(p) => {
                position.clone_into(p);
                true
            }
            None => {
                self.0.insert(channel.to_owned(), position.to_owned());
                true
            }
        }
    }

    /// Whether no history channel has a position yet.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The parts of a Pusher frame an SSE stream needs.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(default, borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    position: Option<Cow<'a, str>>,
    /// A string on channel events, an object on `pusher:error`.
    #[serde(default, borrow)]
    data: Option<&'a serde_json::value::RawValue>,
}

/// What `subscription_succeeded` says on a history channel.
#[derive(Deserialize)]
struct Recovery {
    #[serde(default)]
    recovered: Option<bool>,
    #[serde(default)]
    position: Option<String>,
}

/// Pusher frames that mean nothing on a one-way stream.
const DROPPED: [&str; 3] = [
    "pusher:connection_established",
    "pusher:signin_success",
    "pusher:pong",
];

/// One stream's translation of Pusher frames into SSE, with its cursor.
#[derive(Debug, Default)]
pub struct StreamWriter {
    cursor: Cursor,
    /// Channels whose recovery is announced: the stream resumed with a
    /// position on them.
    resumed: BTreeSet<String>,
}

impl StreamWriter {
    /// A stream resuming from `cursor` (empty for a new stream) that asked
    /// for a position on `resumed` (each gets a `pushmesh:recovered`).
    pub fn new(cursor: Cursor, resumed: BTreeSet<String>) -> Self {
        Self { cursor, resumed }
    }

    /// The stream's cursor.
    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// The stream's first bytes: the `retry:` field.
    pub fn start(out: &mut BytesMut) {
        out.put_slice(format!("retry: {RETRY_MS}\n\n").as_bytes());
    }

    /// Appends the SSE form of one Pusher frame (`payload`, one line of
    /// JSON) to `out`; frames without meaning on a one-way stream (and
    /// anything that is not a frame) append nothing.
    pub fn write_frame(&mut self, payload: &[u8], out: &mut BytesMut) {
        let Ok(head) = serde_json::from_slice::<Head<'_>>(payload) else {
            return;
        };
        if DROPPED.contains(&head.event.as_ref()) {
            return;
        }
        let channel = head.channel.as_deref().unwrap_or_default();
        if head.event == "pusher_internal:subscription_succeeded" {
            let data = head
                .data
                .and_then(|d| serde_json::from_str::<String>(d.get()).ok())
                .unwrap_or_default();
            self.subscribed(channel, &data, out);
            return;
        }
        let id = match &head.position {
            Some(p) if !channel.is_empty() => {
                self.cursor.set(channel, p);
                Some(self.cursor.encode())
            }
            _ => None,
        };
        write_event(out, id.as_deref(), &head.event, payload);
    }

    /// A subscription's answer: on a history channel, its position goes
    /// into the cursor (unless the stream recovered there: the replayed
    /// events bring theirs, so a stream cut in the middle of the replay
    /// resumes where the replay was), and a resumed stream is told whether
    /// it recovered.
    fn subscribed(&mut self, channel: &str, data: &str, out: &mut BytesMut) {
        let Ok(r) = serde_json::from_str::<Recovery>(data) else {
            return;
        };
        let Some(position) = r.position else {
            return;
        };
        let recovered = r.recovered.unwrap_or(false);
        if !recovered {
            self.cursor.set(channel, &position);
        }
        let id = self.cursor.encode();
        if self.resumed.remove(channel) {
            let data =
                serde_json::json!({ "channel": channel, "recovered": recovered }).to_string();
            write_event(out, Some(&id), RECOVERED_EVENT, data.as_bytes());
        } else {
            // An event with an id and no data sets the client's last
            // event id without dispatching anything.
            write_id(out, &id);
            out.put_u8(b'\n');
        }
    }
}

fn write_id(out: &mut BytesMut, id: &str) {
    out.put_slice(b"id: ");
    out.put_slice(id.as_bytes());
    out.put_u8(b'\n');
}

/// Appends one SSE event: `id:` if given, `event:`, `data:` (one line per
/// line of `data`: a Pusher frame is one line), and the blank line.
pub fn write_event(out: &mut BytesMut, id: Option<&str>, event: &str, data: &[u8]) {
    out.reserve(data.len() + event.len() + 24 + id.map_or(0, |i| i.len() + 5));
    if let Some(id) = id {
        write_id(out, id);
    }
    out.put_slice(b"event: ");
    // A line break in a name would start another field.
    for b in event.bytes() {
        out.put_u8(if b == b'\n' || b == b'\r' { b' ' } else { b });
    }
    out.put_u8(b'\n');
    for line in data.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        out.put_slice(b"data: ");
        out.put_slice(line);
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
}

#[cfg(test)]
mod tests;
