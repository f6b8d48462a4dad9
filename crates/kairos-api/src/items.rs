//! The catalogue: `PUT /v1/items`, `GET`/`DELETE /v1/items/{id}`.
//!
//! Catalogue changes are log entries like events, so they are durable when acknowledged and the
//! state (catalogue included) is always a function of the log.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};

use kairos_log::{AppendOutcome, AppendRecord};
use kairos_types::{Code, Item, LogEntry};

use crate::error::{ApiResult, HttpError};
use crate::ingest::read_body;
use crate::AppState;

async fn append_entries(app: &AppState, entries: Vec<LogEntry>) -> ApiResult<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let now = kairos_types::time::now_ms();
    let records = entries
        .into_iter()
        .map(|e| AppendRecord {
            key: e.partition_key().as_bytes().to_vec(),
            timestamp_ms: now,
            dedup_id: 0,
            payload: e.encode(),
            transaction: None,
        })
        .collect();
    let outcomes = app
        .log
        .append(records)
        .await
        .map_err(|e| HttpError::from_log(&e, "catalogue change"))?;
    for outcome in outcomes {
        if let AppendOutcome::Appended { seq, .. } = outcome {
            app.pending.note_catalog(seq);
        }
    }
    Ok(())
}

pub(crate) async fn upsert(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let bytes = read_body(
        &headers,
        body,
        app.ingest.max_items_bytes,
        Code::PayloadTooLarge,
    )
    .await?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| HttpError::new(Code::MalformedJson, format!("malformed JSON: {e}")))?;
    let list = match value {
        Value::Array(list) => list,
        Value::Object(mut obj) => match obj.remove("items") {
            Some(Value::Array(list)) => list,
            _ => {
                return Err(HttpError::new(
                    Code::MalformedJson,
                    "expected an array of items or {\"items\": [...]}",
                ))
            }
        },
        _ => {
            return Err(HttpError::new(
                Code::MalformedJson,
                "expected an array of items or {\"items\": [...]}",
            ))
        }
    };
    if list.is_empty() {
        return Err(HttpError::new(Code::EmptyBatch, "no items to upsert"));
    }
    if list.len() > app.ingest.max_items_per_request {
        return Err(HttpError::new(
            Code::TooManyItems,
            format!(
                "{} items in one request; the limit is {}",
                list.len(),
                app.ingest.max_items_per_request
            ),
        ));
    }
    let mut entries = Vec::with_capacity(list.len());
    let mut rejected = Vec::new();
    for (index, raw) in list.iter().enumerate() {
        match Item::from_json(raw) {
            Ok(item) => entries.push(LogEntry::ItemUpsert(item)),
            Err(e) => rejected
                .push(json!({"index": index, "code": e.code.as_str(), "message": e.message})),
        }
    }
    let accepted = entries.len();
    append_entries(&app, entries).await?;
    Ok(Json(json!({"accepted": accepted, "rejected": rejected})))
}

/// The catalogue entry of `id` as JSON, with behavioural statistics.
pub(crate) async fn get_item(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    app.wait_applied().await;
    let state = app.store.read();
    let not_found = || HttpError::new(Code::ItemNotFound, format!("no catalogue item {id:?}"));
    let idx = state.item_index(&id).ok_or_else(not_found)?;
    let data = state.item(idx);
    let catalog = data
        .catalog
        .as_ref()
        .filter(|_| !data.deleted)
        .ok_or_else(not_found)?;
    let mut out = serde_json::to_value(catalog.as_ref()).unwrap_or(Value::Null);
    out["stats"] = json!({
        "views": data.stats.views,
        "carts": data.stats.carts,
        "purchases": data.stats.purchases,
        "popularity": data.stats.popularity_at(state.clock, &state.config),
        "trending": data.stats.trending(state.clock, &state.config),
        "events": data.stats.total_events,
    });
    Ok(Json(out))
}

pub(crate) async fn delete_item(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    // An ingest node has no catalogue to look in: it passes the delete on, and deleting an
    // item nobody has is a no-op for whoever applies it.
    let ingest_only = app.ingest_only.load(std::sync::atomic::Ordering::Relaxed);
    app.wait_applied().await;
    let exists = ingest_only || {
        let state = app.store.read();
        state
            .item_index(&id)
            .map(|i| state.item(i))
            .is_some_and(|d| d.catalog.is_some() && !d.deleted)
    };
    if !exists {
        return Err(HttpError::new(
            Code::ItemNotFound,
            format!("no catalogue item {id:?}"),
        ));
    }
    let timestamp = kairos_types::time::now_ms();
    append_entries(
        &app,
        vec![LogEntry::ItemDelete {
            id: id.clone(),
            timestamp,
        }],
    )
    .await?;
    Ok(Json(json!({"deleted": id})))
}
