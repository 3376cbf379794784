//! A Server-Sent Events stream (`GET /app/{key}/sse`) as a session: the
//! request's channels, token, filter and cursor, who may stream what, and
//! its subscriptions. In the core an SSE stream is a Pusher subscriber: it
//! subscribes through the same `Request::Subscribe` (routing, barrier,
//! counts, webhooks, cache, history recovery, filters) and receives the
//! same shared frames; the server's transport writes them as SSE events.

use std::collections::BTreeSet;

use pushmesh_protocol::sse::{self, Cursor, TokenError};
use pushmesh_protocol::{ChannelKind, ChannelName, ChannelNameError};

use super::{Proto, Request, Session};
use crate::app::{AppConfig, AppIdx, ConnId};
use crate::filter::FilterError;
use std::sync::Arc;
use std::time::Instant;

/// A parsed stream request.
#[derive(Debug, Clone, PartialEq)]
pub struct SseRequest {
    /// The channels, de-duplicated, in request order.
    pub channels: Vec<ChannelName>,
    /// `token=`.
    pub token: Option<String>,
    /// `filter=` (JSON text), for every channel of the stream.
    pub filter: Option<String>,
    /// The cursor to resume from (`Last-Event-ID`, else `?last_event_id=`):
    /// `Some(Err)` when one was sent that is not a cursor.
    pub resume: Option<Result<Cursor, sse::CursorError>>,
}

/// Why a stream request is refused with 400.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SseRequestError {
    /// No `channel=`.
    #[error("at least one channel= is required")]
    NoChannel,
    /// More than `sse_max_channels`.
    #[error("at most {0} channels per stream")]
    TooManyChannels(usize),
    /// A name that does not parse.
    #[error("invalid channel name {0:?}: {1}")]
    BadName(String, ChannelNameError),
    /// Presence channels need member data a one-way stream cannot give.
    #[error("presence channels cannot be streamed over SSE ({0:?})")]
    Presence(String),
    /// A query parameter given twice (other than `channel`).
    #[error("{0}= given more than once")]
    Repeated(&'static str),
    /// `filter=` is refused.
    #[error(transparent)]
    Filter(#[from] FilterError),
}

/// Why a stream is refused with 403.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseAuthError {
    /// The token is missing, malformed, of another key, expired or wrong.
    #[error(transparent)]
    Token(#[from] TokenError),
}

impl SseRequest {
    /// Parses the query pairs and the `Last-Event-ID` header.
    pub fn parse(
        pairs: &[(String, String)],
        last_event_id: Option<&str>,
        max_channels: usize,
        max_name_length: usize,
    ) -> Result<Self, SseRequestError> {
        let mut channels: Vec<ChannelName> = Vec::new();
        let (mut token, mut filter, mut query_id) = (None, None, None);
        let once = |slot: &mut Option<String>, v: &str, name| {
            if slot.replace(v.to_owned()).is_some() {
                return Err(SseRequestError::Repeated(name));
            }
            Ok(())
        };
        for (k, v) in pairs {
            match k.as_str() {
                "channel" => {
                    let name = ChannelName::parse_with_limit(v, max_name_length)
                        .map_err(|e| SseRequestError::BadName(v.clone(), e))?;
                    if name.kind() == ChannelKind::Presence {
                        return Err(SseRequestError::Presence(v.clone()));
                    }
                    if !channels.contains(&name) {
                        if channels.len() == max_channels {
                            return Err(SseRequestError::TooManyChannels(max_channels));
                        }
                        channels.push(name);
                    }
                }
                "token" => once(&mut token, v, "token")?,
                "filter" => once(&mut filter, v, "filter")?,
                "last_event_id" => once(&mut query_id, v, "last_event_id")?,
                // Anything else (cache busters, the app's own) is ignored.
                _ => {}
            }
        }
        if channels.is_empty() {
            return Err(SseRequestError::NoChannel);
        }
        if let Some(f) = filter.as_deref() {
            crate::filter::Filter::parse(f)?;
            if channels.iter().any(ChannelName::is_cache) {
                return Err(FilterError::CacheChannel.into());
            }
        }
        let resume = last_event_id
            .or(query_id.as_deref())
            .filter(|id| !id.is_empty())
            .map(Cursor::decode);
        Ok(Self {
            channels,
            token,
            filter,
            resume,
        })
    }

    /// Whether a channel needs the token (or, for `#server-to-user-<id>`,
    /// the identity of that user).
    fn needs_token(name: &ChannelName) -> bool {
        matches!(
            name.kind(),
            ChannelKind::Private | ChannelKind::PrivateEncrypted | ChannelKind::ServerToUser
        )
    }

    /// Who may stream these channels: public and cache channels anyone; a
    /// token signed over every channel of the stream authorizes all of
    /// them; without one, only `#server-to-user-<id>` of the user the
    /// trusted balancer signed in (`identity_user`). A token, when given,
    /// must be valid.
    pub fn authorize(
        &self,
        cfg: &AppConfig,
        identity_user: Option<&str>,
        now_unix: u64,
    ) -> Result<(), SseAuthError> {
        if let Some(token) = &self.token {
            let names: Vec<&str> = self.channels.iter().map(ChannelName::as_str).collect();
            return Ok(cfg.verify_with(|secret| {
                sse::verify_token(&cfg.key, secret, token, &names, now_unix)
            })?);
        }
        let own = |n: &ChannelName| {
            n.kind() == ChannelKind::ServerToUser
                && identity_user.is_some_and(|u| n.server_to_user_id() == Some(u))
        };
        if self
            .channels
            .iter()
            .any(|n| Self::needs_token(n) && !own(n))
        {
            return Err(TokenError::Missing.into());
        }
        Ok(())
    }

    /// The position to subscribe each channel with, and the channels whose
    /// recovery is announced: a cursor's position where it has one; a
    /// `Last-Event-ID` that is not a cursor makes every channel ask with a
    /// position no node has (`recovered: false` on every history channel).
    pub fn positions(&self) -> (Vec<Option<String>>, BTreeSet<String>, Cursor) {
        match &self.resume {
            None => (
                vec![None; self.channels.len()],
                BTreeSet::new(),
                Cursor::default(),
            ),
            Some(Ok(c)) => {
                let pos: Vec<Option<String>> = self
                    .channels
                    .iter()
                    .map(|n| c.position(n.as_str()).map(str::to_owned))
                    .collect();
                let resumed = self
                    .channels
                    .iter()
                    .zip(&pos)
                    .filter(|(_, p)| p.is_some())
                    .map(|(n, _)| n.to_string())
                    .collect();
                (pos, resumed, c.clone())
            }
            Some(Err(_)) => (
                vec![Some(String::from("!")); self.channels.len()],
                self.channels.iter().map(ToString::to_string).collect(),
                Cursor::default(),
            ),
        }
    }
}

impl Session {
    /// A new SSE stream: a Pusher session without a handshake frame.
    pub fn sse(
        now: Instant,
        conn: ConnId,
        app: AppIdx,
        cfg: Arc<AppConfig>,
        socket_id: &str,
    ) -> Self {
        Self::new(now, conn, app, cfg, Proto::Pusher, socket_id)
    }

    /// Subscribes a channel the SSE endpoint authorized
    /// ([`SseRequest::authorize`]), with the stream's filter and the
    /// position to recover from.
    pub fn sse_subscribe(
        &mut self,
        name: &ChannelName,
        filter: Option<&str>,
        position: Option<&str>,
    ) -> Result<(), FilterError> {
        let selector = self.selector(name, filter)?;
        self.subs.insert(name.clone(), None);
        self.route(Request::Subscribe {
            app: self.app,
            channel: name.clone(),
            proto: self.proto,
            presence: None,
            selector,
            position: position.map(Into::into),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests;
