//! The node's read-only queries of the shards (`GET /channels`, a
//! channel's info and users): each asks the shards that hold the answer.

use std::time::Instant;

use pushmesh_core::router::QueryError;
use pushmesh_core::{AppIdx, ChannelInfo, Shard};
use pushmesh_protocol::ChannelName;
use tokio::sync::{mpsc, oneshot};

use super::{Cmd, Node, Query};
use crate::conn::ConnRef;

impl Node {
    pub(super) async fn ask<R: Send + 'static>(
        &self,
        shard: &mpsc::Sender<Cmd>,
        f: impl FnOnce(&Shard<ConnRef>, Instant) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = oneshot::channel();
        let q: Query = Box::new(move |s, now| {
            let _ = tx.send(f(s, now));
        });
        shard.send(Cmd::Query(q)).await.ok()?;
        rx.await.ok()
    }

    /// This node's occupied channels and subscriptions, by app slot.
    pub async fn occupancy(&self) -> Vec<(u64, u64)> {
        let mut total: Vec<(u64, u64)> = Vec::new();
        for s in &self.shards {
            let shard = self
                .ask(s, |sh, _| sh.occupancy())
                .await
                .unwrap_or_default();
            if total.len() < shard.len() {
                total.resize(shard.len(), (0, 0));
            }
            for (t, (c, n)) in total.iter_mut().zip(shard) {
                t.0 += c;
                t.1 += n;
            }
        }
        total
    }

    /// `GET /channels`: occupied channels, sorted, optionally by prefix.
    pub async fn channels(
        &self,
        app: AppIdx,
        prefix: Option<&str>,
        user_count: bool,
    ) -> Result<Vec<(ChannelName, ChannelInfo)>, QueryError> {
        pushmesh_core::router::check_channels_query(prefix, user_count)?;
        let mut out = Vec::new();
        for s in &self.shards {
            let prefix = prefix.map(str::to_owned);
            let part = self
                .ask(s, move |sh, now| {
                    let mut v = Vec::new();
                    sh.occupied(now, app, prefix.as_deref(), &mut v);
                    v
                })
                .await;
            out.extend(part.unwrap_or_default());
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// `GET /channels/{name}`.
    pub async fn channel(
        &self,
        app: AppIdx,
        name: &str,
        user_count: bool,
    ) -> Result<ChannelInfo, QueryError> {
        let name = pushmesh_core::router::check_channel_query(name, user_count)?;
        let shard = self.shard(app, name.as_str()).clone();
        Ok(self
            .ask(&shard, move |sh, now| sh.info(now, app, &name))
            .await
            .unwrap_or_default())
    }

    /// `GET /channels/{name}/users`.
    pub async fn channel_users(&self, app: AppIdx, name: &str) -> Result<Vec<String>, QueryError> {
        let name = pushmesh_core::router::check_users_query(name)?;
        let shard = self.shard(app, name.as_str()).clone();
        Ok(self
            .ask(&shard, move |sh, _| sh.users(app, &name))
            .await
            .unwrap_or_default())
    }
}
