//! Pusher close and error codes (protocol v7, spec §4).
//!
//! 4000–4099: the client must not reconnect; 4100–4199: reconnect after a
//! back-off; 4200–4299: reconnect at once; 4300–4399: other errors.

/// A close/error code of the Pusher protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// The app only accepts TLS connections.
    SslOnly = 4000,
    /// No app has the key in the URL.
    AppNotFound = 4001,
    /// The app is disabled.
    AppDisabled = 4003,
    /// The app is over its connection quota.
    OverConnectionQuota = 4004,
    /// The path is not `/app/{key}`.
    PathNotFound = 4005,
    /// The protocol version is not a number.
    InvalidVersionFormat = 4006,
    /// The protocol version is not supported.
    UnsupportedProtocol = 4007,
    /// No protocol version was given.
    NoProtocolVersion = 4008,
    /// Sign-in missing, failed, or the user's connections were terminated.
    Unauthorized = 4009,
    /// The node is over capacity, or the client could not keep up.
    OverCapacity = 4100,
    /// Reconnect now (graceful shutdown, drain).
    ReconnectImmediately = 4200,
    /// No pong received in time.
    PongNotReceived = 4201,
    /// Closed after inactivity.
    ClosedAfterInactivity = 4202,
    /// Over the client event rate limit.
    ClientEventRateLimit = 4301,
    /// A watchlist of more than the allowed number of users.
    WatchlistLimit = 4302,
}

impl CloseCode {
    /// The numeric code sent in `pusher:error` and in the WebSocket close frame.
    pub fn code(self) -> u16 {
        self as u16
    }
}
