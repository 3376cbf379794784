//! [`Upgrading`]: what the edge knows about a WebSocket upgrade request,
//! taken by `/app/{key}` and `/ws` alike.

use std::future::Future;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use pushmesh_core::session::Identity;

use super::socket::Limits;
use super::{WsSocket, WsUpgrade};
use crate::edge::Ticket;
use crate::identity_headers::PeerTrusted;
use crate::Shared;

/// The client's address, its connection's [`Ticket`], whether the TCP peer
/// is a trusted proxy, and the request's headers.
pub struct Upgrading {
    /// The client (after a PROXY header or forwarding header, if believed).
    pub peer: SocketAddr,
    ticket: Option<Ticket>,
    /// Whether the TCP peer is a trusted proxy (identity headers believed).
    pub trusted: bool,
    /// The request's headers.
    pub headers: HeaderMap,
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrading {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        let ConnectInfo(peer) = ConnectInfo::<SocketAddr>::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Self {
            peer,
            ticket: parts.extensions.get::<Ticket>().cloned(),
            trusted: parts.extensions.get::<PeerTrusted>().is_some_and(|t| t.0),
            headers: parts.headers.clone(),
        })
    }
}

impl Upgrading {
    /// The identity its headers carry, if believed (see `identity_headers`).
    pub fn identity(&self, st: &Shared) -> Option<Identity> {
        st.config
            .identity_headers
            .read(self.trusted, &self.headers, &st.stats.edge.identity)
    }

    /// Answers 101 and runs `task` on the socket with the node's
    /// compression and message limit.
    pub fn upgrade<F, Fut>(self, st: &Shared, ws: WsUpgrade, task: F) -> Response
    where
        F: FnOnce(WsSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let limits = Limits {
            max_message: st.config.max_message_bytes,
        };
        let ticket = self.ticket;
        ws.on_upgrade(st.config.compression, limits, move |socket| async move {
            // Established: the pending slot goes; the per-IP slot stays
            // with the connection.
            let _ticket = ticket.inspect(|t| t.established());
            task(socket).await;
        })
    }
}
