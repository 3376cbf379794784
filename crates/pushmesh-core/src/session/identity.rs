//! A session's extensions from issue #13: the identity its load balancer
//! set (user, device, zone), and the selector of each subscription (the
//! client's `filter`, and on `#server-to-user-<id>` the connection's device
//! and zone).

use std::sync::Arc;

use pushmesh_protocol::{server, ChannelKind, ChannelName};

use super::{Request, Session, SignedIn, WsifyJoinError};
use crate::filter::{Filter, FilterError, Selector, Target, MAX_VALUE_BYTES};

/// Who a connection is, as its trusted load balancer said (identity headers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// User id: the connection is signed in as this user from the start.
    pub user: Option<String>,
    /// Device.
    pub device: Option<String>,
    /// Zone.
    pub zone: Option<String>,
}

/// Why an identity from the load balancer is refused (the connection is
/// closed: the balancer is misconfigured).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The user id is empty or too long.
    #[error("the user id from the identity header must be 1 to {0} characters")]
    User(usize),
    /// A device or zone is empty or too long.
    #[error("device and zone from the identity headers must be 1 to {MAX_VALUE_BYTES} bytes")]
    Attribute,
}

impl Identity {
    /// Checks the identity against an app's `max_user_id_length` and the
    /// tag value limit (device, zone).
    pub fn check(&self, max_user_id_length: usize) -> Result<(), IdentityError> {
        let max = max_user_id_length;
        if self
            .user
            .as_ref()
            .is_some_and(|u| u.is_empty() || u.len() > max)
        {
            return Err(IdentityError::User(max));
        }
        let bad = |a: &Option<String>| {
            a.as_ref()
                .is_some_and(|a| a.is_empty() || a.len() > MAX_VALUE_BYTES)
        };
        if bad(&self.device) || bad(&self.zone) {
            return Err(IdentityError::Attribute);
        }
        Ok(())
    }
}

impl Session {
    /// Takes the identity set by a trusted load balancer, before any frame
    /// of the client: with a user, the connection is signed in as after
    /// `pusher:signin` (Pusher clients get `pusher:signin_success` with
    /// `{"id":…}`; wsify clients get no frame).
    pub fn set_identity(&mut self, id: Identity) -> Result<(), IdentityError> {
        id.check(self.cfg.limits.max_user_id_length)?;
        self.target = Some(Box::new(Target {
            device: id.device.map(String::into_boxed_str),
            zone: id.zone.map(String::into_boxed_str),
        }));
        let Some(user) = id.user else {
            return Ok(());
        };
        if self.user.is_some() {
            return Ok(());
        }
        let user_data = match self.proto {
            super::Proto::Pusher => serde_json::json!({ "id": user }).to_string(),
            // No `signin_success` frame for a wsify client.
            super::Proto::Wsify { .. } => String::new(),
        };
        self.user = Some(SignedIn {
            id: user.clone(),
            watchlist: Vec::new(),
        });
        self.route(Request::SignIn {
            app: self.app,
            user,
            watchlist: Vec::new(),
            user_data,
        });
        Ok(())
    }

    /// The selector of a subscription to `name` with the client's `filter`
    /// (JSON text): `None` takes every event.
    pub(super) fn selector(
        &self,
        name: &ChannelName,
        filter: Option<&str>,
    ) -> Result<Option<Arc<Selector>>, FilterError> {
        let filter = match filter {
            None | Some("null") => None,
            Some(text) => Filter::parse(text)?,
        };
        if filter.is_some() && name.is_cache() {
            return Err(FilterError::CacheChannel);
        }
        let target = (name.kind() == ChannelKind::ServerToUser)
            .then(|| self.target.as_deref().cloned().unwrap_or_default());
        if filter.is_none() && target.is_none() {
            return Ok(None);
        }
        Ok(Some(Arc::new(Selector { filter, target })))
    }

    /// Refuses a subscription whose filter is invalid; the connection stays.
    pub(super) fn refuse_filter(&mut self, name: &ChannelName, e: &FilterError) {
        tracing::debug!(conn = self.conn.0, channel = %name, error = %e, "filter refused");
        self.send(server::subscription_error(
            name.as_str(),
            "InvalidFilter",
            &e.to_string(),
            400,
        ));
    }

    /// wsify `join` with `args.filter` (JSON text).
    pub fn wsify_join_filtered(
        &mut self,
        channel: &str,
        filter: Option<&str>,
        position: Option<&str>,
    ) -> Result<(), WsifyJoinError> {
        let name = self.wsify_channel(channel)?;
        let selector = self.selector(&name, filter)?;
        self.subs.insert(name.clone(), None);
        self.route(Request::Subscribe {
            app: self.app,
            channel: name,
            proto: self.proto,
            presence: None,
            selector,
            position: position.map(Into::into),
        });
        Ok(())
    }
}
