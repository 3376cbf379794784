//! One connection's protocol state machine, owned by its connection task:
//! parsing, authorization, rate limits, sign-in. Pings, refusals and errors
//! are answered here without touching any shared state; what concerns
//! channels or users becomes a [`Request`] for the router or the user
//! registry.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use indexmap::IndexMap;
use pushmesh_protocol::client::ClientMessage;
use pushmesh_protocol::server;
use pushmesh_protocol::sign;
use pushmesh_protocol::{ChannelKind, ChannelName, ChannelNameError, CloseCode};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::app::{AppConfig, AppIdx, ConnId};

mod identity;
mod sse;
mod subscribe;

pub use identity::{Identity, IdentityError};
pub use sse::{SseAuthError, SseRequest, SseRequestError};

/// Which protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// Pusher Channels.
    Pusher,
    /// wsify, raw content or `{"channel","content"}` envelopes.
    Wsify {
        /// Envelope mode.
        envelope: bool,
    },
}

/// A presence member joining with a subscription.
#[derive(Debug, Clone)]
pub struct PresenceJoin {
    /// `user_id`.
    pub user_id: String,
    /// `user_info` JSON.
    pub info: Option<Box<RawValue>>,
    /// The history position to recover from, if the client sent one.
    pub position: Option<Box<str>>,
}

/// Work for the router (by channel) or the user registry.
#[derive(Debug, Clone)]
pub enum Request {
    /// Subscribe (authorized already).
    Subscribe {
        /// App.
        app: AppIdx,
        /// Channel.
        channel: ChannelName,
        /// Protocol of the connection.
        proto: Proto,
        /// The member, on presence channels.
        presence: Option<PresenceJoin>,
        /// The history position to recover from (non-presence channels;
        /// a presence member carries its own).
        position: Option<Box<str>>,
        /// What the subscription receives (`None`: every event; issue #13).
        selector: Option<Arc<crate::filter::Selector>>,
    },
    /// Unsubscribe (no effect if not subscribed).
    Unsubscribe {
        /// App.
        app: AppIdx,
        /// Channel.
        channel: ChannelName,
    },
    /// A `client-` event (checked against the limits already).
    ClientEvent {
        /// App.
        app: AppIdx,
        /// Channel.
        channel: ChannelName,
        /// Event name.
        event: String,
        /// Data.
        data: String,
        /// The sender's socket id.
        socket_id: Arc<str>,
    },
    /// The connection signed in (signature checked).
    SignIn {
        /// App.
        app: AppIdx,
        /// User id.
        user: String,
        /// Watched users.
        watchlist: Vec<String>,
        /// `user_data` as sent, echoed in `signin_success`.
        user_data: String,
    },
    /// A signed-in connection went away.
    SignOut {
        /// App.
        app: AppIdx,
        /// User id.
        user: String,
        /// Watched users.
        watchlist: Vec<String>,
    },
}

impl Request {
    /// The (app, channel) that picks the shard, or `None` for the user registry.
    pub fn channel(&self) -> Option<(AppIdx, &ChannelName)> {
        match self {
            Self::Subscribe { app, channel, .. }
            | Self::Unsubscribe { app, channel }
            | Self::ClientEvent { app, channel, .. } => Some((*app, channel)),
            Self::SignIn { .. } | Self::SignOut { .. } => None,
        }
    }
}

/// What a session wants done.
#[derive(Debug, Clone)]
pub enum SessionOutput {
    /// Write a frame to this connection.
    Send(Bytes),
    /// Close this connection (its `pusher:error` was queued just before).
    Close {
        /// Code.
        code: CloseCode,
        /// Reason.
        reason: String,
    },
    /// Hand to the router or the user registry.
    Route(Request),
}

struct SignedIn {
    id: String,
    watchlist: Vec<String>,
}

#[derive(Deserialize)]
struct UserData {
    id: String,
    #[serde(default)]
    watchlist: Option<Vec<String>>,
}

/// One connection's state.
pub struct Session {
    conn: ConnId,
    app: AppIdx,
    cfg: Arc<AppConfig>,
    proto: Proto,
    socket_id: Arc<str>,
    /// Channels asked for, with the presence user id where there is one.
    subs: IndexMap<ChannelName, Option<String>>,
    user: Option<SignedIn>,
    events_window: Instant,
    events_in_window: u32,
    closing: bool,
    out: VecDeque<SessionOutput>,
    /// Device and zone from the identity headers (`session/identity.rs`).
    target: Option<Box<crate::filter::Target>>,
}

impl Session {
    /// A new Pusher connection: queues `pusher:connection_established`.
    pub fn pusher(
        now: Instant,
        conn: ConnId,
        app: AppIdx,
        cfg: Arc<AppConfig>,
        socket_id: &str,
        activity_timeout_secs: u64,
    ) -> Self {
        let mut s = Self::new(now, conn, app, cfg, Proto::Pusher, socket_id);
        s.send(server::connection_established(
            socket_id,
            activity_timeout_secs,
        ));
        s
    }

    /// A new wsify connection (wsify has no handshake frame).
    pub fn wsify(
        now: Instant,
        conn: ConnId,
        app: AppIdx,
        cfg: Arc<AppConfig>,
        socket_id: &str,
        envelope: bool,
    ) -> Self {
        Self::new(now, conn, app, cfg, Proto::Wsify { envelope }, socket_id)
    }

    fn new(
        now: Instant,
        conn: ConnId,
        app: AppIdx,
        cfg: Arc<AppConfig>,
        proto: Proto,
        socket_id: &str,
    ) -> Self {
        Self {
            conn,
            app,
            cfg,
            proto,
            socket_id: Arc::from(socket_id),
            subs: IndexMap::new(),
            user: None,
            events_window: now,
            events_in_window: 0,
            closing: false,
            out: VecDeque::new(),
            target: None,
        }
    }

    /// The connection.
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// The app.
    pub fn app(&self) -> AppIdx {
        self.app
    }

    /// The app's settings changed (a new secret, limits, switches): they
    /// apply from the next frame on.
    pub fn set_config(&mut self, cfg: Arc<AppConfig>) {
        self.cfg = cfg;
    }

    /// What the app changing to `apps` means for this connection: the close
    /// code and reason when its app no longer serves ([`Apps::unserved`]),
    /// else `None` (and the app's new settings are taken).
    ///
    /// [`Apps::unserved`]: crate::app::Apps::unserved
    pub fn app_changed(&mut self, apps: &crate::app::Apps) -> Option<(CloseCode, &'static str)> {
        if let Some(why) = apps.unserved(self.app) {
            return Some(why);
        }
        let cfg = apps.get(self.app);
        if !Arc::ptr_eq(cfg, &self.cfg) {
            self.cfg = cfg.clone();
        }
        None
    }

    /// The protocol.
    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// The socket id.
    pub fn socket_id(&self) -> &str {
        &self.socket_id
    }

    /// Whether the connection has signed in.
    pub fn is_signed_in(&self) -> bool {
        self.user.is_some()
    }

    /// Whether a close was requested.
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// The channels asked for.
    pub fn channels(&self) -> impl Iterator<Item = &ChannelName> {
        self.subs.keys()
    }

    /// The next thing to do. Once drained, the queue's memory is released:
    /// a session lives as long as its connection, and most are idle.
    pub fn poll(&mut self) -> Option<SessionOutput> {
        let next = self.out.pop_front();
        if next.is_none() && self.out.capacity() > 0 {
            self.out = VecDeque::new();
        }
        next
    }

    fn send(&mut self, frame: Bytes) {
        self.out.push_back(SessionOutput::Send(frame));
    }

    fn route(&mut self, r: Request) {
        self.out.push_back(SessionOutput::Route(r));
    }

    fn error(&mut self, message: &str) {
        self.send(server::error(message, None));
    }

    /// Closes with `code`: a Pusher connection gets the `pusher:error` with
    /// the same code first. A second close does nothing.
    pub fn close(&mut self, code: CloseCode, reason: &str) {
        if self.closing {
            return;
        }
        self.closing = true;
        if self.proto == Proto::Pusher {
            self.send(server::error(reason, Some(code.code())));
        }
        self.out.push_back(SessionOutput::Close {
            code,
            reason: reason.to_owned(),
        });
    }

    /// The sign-in deadline passed: closes unless signed in.
    pub fn signin_deadline(&mut self) {
        if self.user.is_none() {
            self.close(
                CloseCode::Unauthorized,
                "sign-in required: not signed in in time",
            );
        }
    }

    /// A binary frame, which the protocol does not use.
    pub fn handle_binary(&mut self) {
        self.error("binary frames are not supported; send JSON text frames");
    }

    /// A text frame from the client.
    pub fn handle_frame(&mut self, now: Instant, text: &str) {
        if self.closing {
            return;
        }
        let msg = match ClientMessage::parse(text) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(conn = self.conn.0, error = %e, "refused client frame");
                self.error(&e.to_string());
                return;
            }
        };
        match msg {
            ClientMessage::Ping => self.send(server::pong()),
            ClientMessage::Pong => {}
            ClientMessage::Subscribe {
                channel,
                auth,
                channel_data,
                position,
                filter,
            } => self.subscribe(
                &channel,
                auth.as_deref(),
                channel_data.as_deref(),
                position.map(String::into_boxed_str),
                filter.as_deref(),
            ),
            ClientMessage::Unsubscribe { channel } => {
                if let Ok(name) = ChannelName::parse_with_limit(&channel, usize::MAX) {
                    self.unsubscribe(name);
                }
            }
            ClientMessage::Signin { auth, user_data } => self.signin(&auth, &user_data),
            ClientMessage::ClientEvent {
                event,
                channel,
                data,
            } => self.client_event(now, event, &channel, data),
        }
    }

    fn unsubscribe(&mut self, name: ChannelName) {
        if self.subs.shift_remove(&name).is_some() {
            self.route(Request::Unsubscribe {
                app: self.app,
                channel: name,
            });
        }
    }

    fn signin(&mut self, auth: &str, user_data: &str) {
        let cfg = self.cfg.clone();
        let limits = &cfg.limits;
        let signed = sign::signin_string(&self.socket_id, user_data);
        if let Err(e) =
            cfg.verify_with(|secret| sign::verify_client_auth(&cfg.key, secret, auth, &signed))
        {
            tracing::debug!(conn = self.conn.0, error = %e, "sign-in refused");
            self.close(CloseCode::Unauthorized, &format!("sign-in failed: {e}"));
            return;
        }
        let Ok(data) = serde_json::from_str::<UserData>(user_data) else {
            self.close(
                CloseCode::Unauthorized,
                "sign-in failed: user_data must be a JSON object with a string id",
            );
            return;
        };
        if data.id.is_empty() || data.id.len() > limits.max_user_id_length {
            let m = format!(
                "sign-in failed: id must be 1 to {} characters",
                limits.max_user_id_length
            );
            self.close(CloseCode::Unauthorized, &m);
            return;
        }
        let watchlist = data.watchlist.unwrap_or_default();
        if watchlist.len() > limits.max_watchlist_size {
            let m = format!(
                "watchlist is longer than {} users",
                limits.max_watchlist_size
            );
            self.close(CloseCode::WatchlistLimit, &m);
            return;
        }
        match &self.user {
            Some(u) if u.id == data.id => {
                self.send(server::signin_success(user_data));
                return;
            }
            Some(_) => {
                self.error("already signed in as another user");
                return;
            }
            None => {}
        }
        self.user = Some(SignedIn {
            id: data.id.clone(),
            watchlist: watchlist.clone(),
        });
        self.route(Request::SignIn {
            app: self.app,
            user: data.id,
            watchlist,
            user_data: user_data.to_owned(),
        });
    }

    fn client_event(&mut self, now: Instant, event: String, channel: &str, data: String) {
        let cfg = self.cfg.clone();
        let limits = &cfg.limits;
        if now.saturating_duration_since(self.events_window) >= Duration::from_secs(1) {
            self.events_window = now;
            self.events_in_window = 0;
        }
        self.events_in_window += 1;
        if self.events_in_window > limits.client_events_per_second {
            let m = format!(
                "client event rate limit exceeded: at most {} per second",
                limits.client_events_per_second
            );
            self.close(CloseCode::ClientEventRateLimit, &m);
            return;
        }
        let refusal = if !cfg.client_events {
            Some("client events are not enabled for this app".to_owned())
        } else if event.len() > limits.max_event_name_length {
            Some(format!(
                "event name is longer than {} characters",
                limits.max_event_name_length
            ))
        } else if data.len() > limits.max_event_payload_bytes {
            Some(format!(
                "event data is larger than {} bytes",
                limits.max_event_payload_bytes
            ))
        } else {
            None
        };
        if let Some(m) = refusal {
            self.error(&m);
            return;
        }
        let Some(name) = self.subs.get_key_value(channel).map(|(n, _)| n.clone()) else {
            self.error(&not_subscribed(channel));
            return;
        };
        if !name.allows_client_events() {
            self.error("client events are only allowed on private and presence channels");
            return;
        }
        self.route(Request::ClientEvent {
            app: self.app,
            channel: name,
            event,
            data,
            socket_id: self.socket_id.clone(),
        });
    }

    /// Checks a channel a wsify client may use: public channels only
    /// (private, presence and encrypted channels need Pusher signatures).
    pub fn wsify_channel(&self, channel: &str) -> Result<ChannelName, WsifyJoinError> {
        let max = self.cfg.limits.max_channel_name_length;
        let name = ChannelName::parse_with_limit(channel, max)?;
        if name.kind() != ChannelKind::Public {
            return Err(WsifyJoinError::NeedsAuthorization(channel.to_owned()));
        }
        Ok(name)
    }

    /// wsify `join`: idempotent (joining twice delivers once).
    pub fn wsify_join(
        &mut self,
        channel: &str,
        position: Option<&str>,
    ) -> Result<(), WsifyJoinError> {
        self.wsify_join_filtered(channel, None, position)
    }

    /// wsify `leave`: leaving a channel never joined does nothing.
    pub fn wsify_leave(&mut self, channel: &str) {
        if let Ok(name) = ChannelName::parse_with_limit(channel, usize::MAX) {
            self.unsubscribe(name);
        }
    }

    /// The connection is gone: leave every channel and sign out.
    pub fn disconnect(&mut self) {
        self.closing = true;
        let subs = std::mem::take(&mut self.subs);
        for name in subs.into_keys() {
            self.route(Request::Unsubscribe {
                app: self.app,
                channel: name,
            });
        }
        if let Some(u) = self.user.take() {
            self.route(Request::SignOut {
                app: self.app,
                user: u.id,
                watchlist: u.watchlist,
            });
        }
    }
}

/// Why a wsify client may not join a channel; the text is the one its
/// error frame carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsifyJoinError {
    /// The name does not parse (or is too long).
    #[error(transparent)]
    BadName(#[from] ChannelNameError),
    /// Not a public channel.
    #[error(
        "channel {0:?} needs Pusher authorization; wsify clients may join public channels only"
    )]
    NeedsAuthorization(String),
    /// `args.filter` is refused.
    #[error(transparent)]
    Filter(#[from] crate::filter::FilterError),
    /// No such connection (the test driver's `Core`).
    #[error("no such connection")]
    NoConnection,
}

/// The error for a client event on a channel the connection is not in.
pub fn not_subscribed(channel: &str) -> String {
    format!("client event on {channel:?}, which this connection has not subscribed to")
}
