//! A connection's `pusher:subscribe`: the channel name, its
//! authorization (signatures, the signed-in user), the presence member,
//! the filter and the history position, then the request to the router.

use pushmesh_protocol::server;
use pushmesh_protocol::sign::{self, AuthError};
use pushmesh_protocol::{ChannelKind, ChannelName};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{PresenceJoin, Request, Session};

#[derive(Deserialize)]
struct ChannelData {
    user_id: serde_json::Value,
    #[serde(default)]
    user_info: Option<Box<RawValue>>,
}

/// Why a subscribe's authorization is refused (`AuthError`, 401); the
/// text is the one its `subscription_error` carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum SubscribeAuthError {
    /// A `#server-to-user-` channel of another user (or before sign-in).
    #[error("only the signed-in user may subscribe to this channel")]
    NotTheUser,
    /// No `auth`.
    #[error("missing auth")]
    MissingAuth,
    /// A presence subscribe without `channel_data`.
    #[error("missing channel_data")]
    MissingChannelData,
    /// The signature does not verify.
    #[error(transparent)]
    Signature(#[from] AuthError),
}

impl Session {
    pub(super) fn subscribe(
        &mut self,
        channel: &str,
        auth: Option<&str>,
        channel_data: Option<&str>,
        position: Option<Box<str>>,
        filter: Option<&str>,
    ) {
        let cfg = self.cfg.clone();
        let name = match ChannelName::parse_with_limit(channel, cfg.limits.max_channel_name_length)
        {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(conn = self.conn.0, error = %e, "refused subscribe");
                self.error(&format!("invalid channel name {channel:?}: {e}"));
                return;
            }
        };
        let auth_result: Result<(), SubscribeAuthError> = match name.kind() {
            ChannelKind::Public => Ok(()),
            ChannelKind::ServerToUser => match (&self.user, name.server_to_user_id()) {
                (Some(u), Some(id)) if u.id == id => Ok(()),
                _ => Err(SubscribeAuthError::NotTheUser),
            },
            ChannelKind::Private | ChannelKind::PrivateEncrypted => match auth {
                None => Err(SubscribeAuthError::MissingAuth),
                Some(a) => {
                    let signed = sign::channel_string(&self.socket_id, name.as_str());
                    cfg.verify_with(|secret| sign::verify_client_auth(&cfg.key, secret, a, &signed))
                        .map_err(SubscribeAuthError::from)
                }
            },
            ChannelKind::Presence => match (auth, channel_data) {
                (None, _) => Err(SubscribeAuthError::MissingAuth),
                (_, None) => Err(SubscribeAuthError::MissingChannelData),
                (Some(a), Some(d)) => {
                    let signed = sign::presence_string(&self.socket_id, name.as_str(), d);
                    cfg.verify_with(|secret| sign::verify_client_auth(&cfg.key, secret, a, &signed))
                        .map_err(SubscribeAuthError::from)
                }
            },
        };
        if let Err(e) = auth_result {
            tracing::debug!(conn = self.conn.0, channel = %name, error = %e, "subscription refused");
            self.send(server::subscription_error(
                name.as_str(),
                "AuthError",
                &e.to_string(),
                401,
            ));
            return;
        }
        let selector = match self.selector(&name, filter) {
            Ok(s) => s,
            Err(e) => return self.refuse_filter(&name, &e),
        };
        let (presence, position) = if name.kind() == ChannelKind::Presence {
            match self.presence_join(&name, channel_data.unwrap_or_default()) {
                Some(p) => (Some(PresenceJoin { position, ..p }), None),
                None => return,
            }
        } else {
            (None, position)
        };
        self.subs
            .insert(name.clone(), presence.as_ref().map(|p| p.user_id.clone()));
        self.route(Request::Subscribe {
            app: self.app,
            channel: name,
            proto: self.proto,
            presence,
            position,
            selector,
        });
    }

    fn presence_join(&mut self, name: &ChannelName, data: &str) -> Option<PresenceJoin> {
        let limits = &self.cfg.limits;
        let Ok(parsed) = serde_json::from_str::<ChannelData>(data) else {
            self.send(server::subscription_error(
                name.as_str(),
                "AuthError",
                "channel_data must be a JSON object with user_id",
                400,
            ));
            return None;
        };
        let user_id = match parsed.user_id {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            _ => String::new(),
        };
        let info_len = parsed.user_info.as_ref().map_or(0, |i| i.get().len());
        let problem = if user_id.is_empty() {
            Some("user_id must be a non-empty string or number")
        } else if user_id.len() > limits.max_user_id_length {
            Some("user_id is too long")
        } else if info_len > limits.max_presence_user_info_bytes {
            Some("user_info is too large")
        } else {
            None
        };
        if let Some(p) = problem {
            self.send(server::subscription_error(
                name.as_str(),
                "AuthError",
                p,
                400,
            ));
            return None;
        }
        Some(PresenceJoin {
            user_id,
            info: parsed.user_info,
            position: None,
        })
    }
}
