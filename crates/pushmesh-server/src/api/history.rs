//! `GET /apps/{app_id}/channels/{channel}/history` (pushmesh extension):
//! a channel's recent events with their positions, signed like every call.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use pushmesh_core::HistoryError;
use serde_json::{json, Value};

use super::{ApiError, SignedRequest};
use crate::node::HistoryQueryError;
use crate::Shared;

/// Default and largest `limit`.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// `GET /apps/{app_id}/channels/{channel}/history?limit=&after=`.
pub async fn channel_history(
    State(st): State<Arc<Shared>>,
    Path((_, channel)): Path<(String, String)>,
    a: SignedRequest,
) -> Result<Json<Value>, ApiError> {
    let limit = match a.param("limit") {
        None => DEFAULT_LIMIT,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "limit must be an integer from 1 to {MAX_LIMIT}"
                )))
            }
        },
    };
    let after = a.param("after").map(str::to_owned);
    let page = st
        .node
        .history_page(a.app, &channel, after, limit)
        .await
        .map_err(|e| match e {
            HistoryQueryError::History(HistoryError::NotEnabled(_)) => {
                ApiError::NotFound(e.to_string())
            }
            HistoryQueryError::Stopping => ApiError::Unavailable(pushmesh_core::Refusal::Draining),
            _ => ApiError::BadRequest(e.to_string()),
        })?;
    let events: Vec<Value> = page
        .events
        .into_iter()
        .map(|e| {
            json!({
                "name": e.name,
                "data": e.data,
                "position": e.position,
                "published_at_ms": e.published_at_ms,
            })
        })
        .collect();
    Ok(Json(json!({
        "events": events,
        "position": page.position,
        "complete": page.complete,
    })))
}
