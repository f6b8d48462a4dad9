//! `GET /v1/items`: the catalogue page by page, for shop front-ends (the demo shop's category
//! pages and search) and for checking what Kairos knows.
//!
//! Query: `category` (items with this category), `q` (case-insensitive substring of the title or
//! the id), `sort` (`popular`, the default: decayed popularity, most first; `catalog`: the order
//! items were first upserted), `limit` (1 to 200, default 24) and `offset`. The answer has the
//! page of items (catalogue fields and `popularity`), the `total` matching, and the catalogue's
//! `categories` with their item counts, so a front-end can build its navigation from one call.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::Json;
use serde_json::{json, Value};

use kairos_types::Code;

use crate::error::{ApiResult, HttpError};
use crate::AppState;

const DEFAULT_LIMIT: usize = 24;
const MAX_LIMIT: usize = 200;

fn number(params: &HashMap<String, String>, name: &str, default: usize) -> ApiResult<usize> {
    match params.get(name).map(String::as_str) {
        None | Some("") => Ok(default),
        Some(v) => v.parse().map_err(|_| {
            HttpError::new(
                Code::InvalidParameter,
                format!("`{name}` must be a non-negative integer"),
            )
        }),
    }
}

pub(crate) async fn list(
    State(app): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let limit = number(&params, "limit", DEFAULT_LIMIT)?;
    if limit == 0 || limit > MAX_LIMIT {
        return Err(HttpError::new(
            Code::InvalidParameter,
            format!("`limit` must be between 1 and {MAX_LIMIT}"),
        ));
    }
    let offset = number(&params, "offset", 0)?;
    let popular = match params.get("sort").map(String::as_str) {
        None | Some("" | "popular") => true,
        Some("catalog") => false,
        Some(_) => {
            return Err(HttpError::new(
                Code::InvalidParameter,
                "`sort` must be popular or catalog",
            ))
        }
    };
    let category = params.get("category").filter(|c| !c.is_empty());
    let query = params
        .get("q")
        .map(|q| q.trim().to_lowercase())
        .filter(|q| !q.is_empty());

    app.wait_applied().await;
    let state = app.store.read();
    let mut categories: HashMap<&str, usize> = HashMap::new();
    let mut matching = Vec::new();
    for (idx, data) in state.item_data.iter().enumerate() {
        let Some(item) = data.catalog.as_deref().filter(|_| !data.deleted) else {
            continue;
        };
        for c in &item.categories {
            *categories.entry(c.as_str()).or_default() += 1;
        }
        if category.is_some_and(|c| !item.categories.contains(c)) {
            continue;
        }
        if let Some(q) = &query {
            let title = item.title.as_deref().unwrap_or("").to_lowercase();
            if !title.contains(q.as_str()) && !item.id.to_lowercase().contains(q.as_str()) {
                continue;
            }
        }
        let popularity = data.stats.popularity_at(state.clock, &state.config);
        matching.push((idx, item, popularity));
    }
    if popular {
        // Stable: ties keep catalogue order, so pages do not shuffle between requests.
        matching.sort_by(|a, b| b.2.total_cmp(&a.2));
    }
    let items: Vec<Value> = matching
        .iter()
        .skip(offset)
        .take(limit)
        .map(|(_, item, popularity)| {
            let mut v = serde_json::to_value(item).unwrap_or(Value::Null);
            v["popularity"] = json!(popularity);
            v
        })
        .collect();
    let mut categories: Vec<(&str, usize)> = categories.into_iter().collect();
    categories.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    Ok(Json(json!({
        "items": items,
        "total": matching.len(),
        "offset": offset,
        "limit": limit,
        "categories": categories
            .into_iter()
            .map(|(name, n)| json!({"name": name, "items": n}))
            .collect::<Vec<_>>(),
    })))
}
