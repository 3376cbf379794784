//! Channel names: a [`ChannelName`] can only hold a valid name.

use std::fmt;
use std::sync::Arc;

/// Prefix of the per-user server channel joined after sign-in.
pub const SERVER_TO_USER_PREFIX: &str = "#server-to-user-";

/// What a channel's prefix makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    /// No prefix: anyone may subscribe.
    Public,
    /// `private-`: needs a signature.
    Private,
    /// `private-encrypted-`: needs a signature; the server relays ciphertext only.
    PrivateEncrypted,
    /// `presence-`: needs a signature and member data.
    Presence,
    /// `#server-to-user-<id>`: only the signed-in user `<id>` may join.
    ServerToUser,
}

/// Why a channel name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelNameError {
    /// Empty name.
    #[error("channel name is empty")]
    Empty,
    /// Longer than allowed.
    #[error("channel name is longer than {max} characters")]
    TooLong {
        /// The limit.
        max: usize,
    },
    /// A character outside `[A-Za-z0-9_\-=@,.;]`.
    #[error("channel name contains an invalid character {0:?}")]
    InvalidCharacter(char),
}

/// A valid channel name, cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

fn valid_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '=' | '@' | ',' | '.' | ';')
}

impl ChannelName {
    /// Parses a channel name with the default length limit (164).
    pub fn parse(name: &str) -> Result<Self, ChannelNameError> {
        Self::parse_with_limit(name, 164)
    }

    /// Parses a channel name, at most `max_len` bytes long.
    pub fn parse_with_limit(name: &str, max_len: usize) -> Result<Self, ChannelNameError> {
        if name.is_empty() {
            return Err(ChannelNameError::Empty);
        }
        if name.len() > max_len {
            return Err(ChannelNameError::TooLong { max: max_len });
        }
        let body = match name.strip_prefix(SERVER_TO_USER_PREFIX) {
            // User ids are free-form but must be printable and non-empty.
            Some(id) => {
                if id.is_empty() {
                    return Err(ChannelNameError::Empty);
                }
                if let Some(c) = id.chars().find(|c| c.is_control() || c.is_whitespace()) {
                    return Err(ChannelNameError::InvalidCharacter(c));
                }
                ""
            }
            None => name,
        };
        if let Some(c) = body.chars().find(|c| !valid_char(*c)) {
            return Err(ChannelNameError::InvalidCharacter(c));
        }
        Ok(Self(Arc::from(name)))
    }

    /// The per-user server channel of `user_id`.
    pub fn server_to_user(user_id: &str) -> Result<Self, ChannelNameError> {
        Self::parse_with_limit(&format!("{SERVER_TO_USER_PREFIX}{user_id}"), usize::MAX)
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What the prefix makes this channel.
    pub fn kind(&self) -> ChannelKind {
        let n = self.as_str();
        if n.starts_with(SERVER_TO_USER_PREFIX) {
            ChannelKind::ServerToUser
        } else if n.starts_with("private-encrypted-") {
            ChannelKind::PrivateEncrypted
        } else if n.starts_with("private-") {
            ChannelKind::Private
        } else if n.starts_with("presence-") {
            ChannelKind::Presence
        } else {
            ChannelKind::Public
        }
    }

    /// Cache channels keep their last event for late subscribers.
    pub fn is_cache(&self) -> bool {
        let n = self.as_str();
        n.starts_with("cache-")
            || n.starts_with("private-cache-")
            || n.starts_with("private-encrypted-cache-")
            || n.starts_with("presence-cache-")
    }

    /// The user id of a `#server-to-user-<id>` channel.
    pub fn server_to_user_id(&self) -> Option<&str> {
        self.as_str().strip_prefix(SERVER_TO_USER_PREFIX)
    }

    /// Whether subscribing needs an `auth` signature.
    pub fn needs_auth(&self) -> bool {
        matches!(
            self.kind(),
            ChannelKind::Private | ChannelKind::PrivateEncrypted | ChannelKind::Presence
        )
    }

    /// Whether clients may send `client-` events on this channel.
    pub fn allows_client_events(&self) -> bool {
        matches!(self.kind(), ChannelKind::Private | ChannelKind::Presence)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for ChannelName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_prefixes() {
        let k = |n: &str| ChannelName::parse(n).map(|c| (c.kind(), c.is_cache()));
        assert_eq!(k("hello"), Ok((ChannelKind::Public, false)));
        assert_eq!(k("cache-x"), Ok((ChannelKind::Public, true)));
        assert_eq!(k("private-x"), Ok((ChannelKind::Private, false)));
        assert_eq!(k("private-cache-x"), Ok((ChannelKind::Private, true)));
        assert_eq!(
            k("private-encrypted-x"),
            Ok((ChannelKind::PrivateEncrypted, false))
        );
        assert_eq!(
            k("private-encrypted-cache-x"),
            Ok((ChannelKind::PrivateEncrypted, true))
        );
        assert_eq!(k("presence-x"), Ok((ChannelKind::Presence, false)));
        assert_eq!(k("presence-cache-x"), Ok((ChannelKind::Presence, true)));
        assert_eq!(
            k("#server-to-user-42"),
            Ok((ChannelKind::ServerToUser, false))
        );
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(ChannelName::parse(""), Err(ChannelNameError::Empty));
        assert_eq!(
            ChannelName::parse("a b"),
            Err(ChannelNameError::InvalidCharacter(' '))
        );
        assert_eq!(
            ChannelName::parse("#other"),
            Err(ChannelNameError::InvalidCharacter('#'))
        );
        assert!(ChannelName::parse(&"a".repeat(164)).is_ok());
        assert_eq!(
            ChannelName::parse(&"a".repeat(165)),
            Err(ChannelNameError::TooLong { max: 164 })
        );
        assert_eq!(
            ChannelName::parse("#server-to-user-"),
            Err(ChannelNameError::Empty)
        );
        assert!(ChannelName::parse("private-a_b-c=d@e,f.g;h").is_ok());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_and_accepts_only_valid(s in "\\PC{0,200}") {
            if let Ok(c) = ChannelName::parse(&s) {
                proptest::prop_assert_eq!(c.as_str(), s.as_str());
                proptest::prop_assert!(s.len() <= 164);
            }
        }
    }
}
