//! `GET /v1/recommendations` and `GET /v1/profiles`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};

use kairos_recommend::{
    recommend as run, recommend_for, Filters, Recommendation, Request, Scenario,
};
use kairos_state::portable::{merge_person, Person};
use kairos_state::profile::Profile;
use kairos_state::{anonymous_key, user_key, State as EngineState};
use kairos_types::Code;

use crate::error::{ApiResult, HttpError};
use crate::replica::Replica;
use crate::AppState;

fn invalid(name: &str, why: &str) -> HttpError {
    HttpError::new(Code::InvalidParameter, format!("`{name}` {why}"))
}

fn parse_bool(params: &HashMap<String, String>, name: &str) -> ApiResult<Option<bool>> {
    match params.get(name).map(String::as_str) {
        None | Some("") => Ok(None),
        Some("true" | "1" | "yes") => Ok(Some(true)),
        Some("false" | "0" | "no") => Ok(Some(false)),
        Some(_) => Err(invalid(name, "must be true or false")),
    }
}

fn parse_num<T: std::str::FromStr>(
    params: &HashMap<String, String>,
    name: &str,
) -> ApiResult<Option<T>> {
    match params.get(name).map(String::as_str) {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| invalid(name, "must be a number")),
    }
}

fn parse_list(params: &HashMap<String, String>, name: &str) -> Vec<String> {
    params
        .get(name)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn non_empty(params: &HashMap<String, String>, name: &str) -> Option<String> {
    params.get(name).filter(|v| !v.is_empty()).cloned()
}

/// Parses and validates the query string into a recommender request.
pub(crate) fn parse_request(
    params: &HashMap<String, String>,
    default_k: usize,
    max_k: usize,
) -> ApiResult<Request> {
    let scenario_name = params
        .get("scenario")
        .map(String::as_str)
        .unwrap_or("for_you");
    let scenario = Scenario::parse(scenario_name).ok_or_else(|| {
        HttpError::new(
            Code::UnknownScenario,
            format!("unknown scenario {scenario_name:?}; use for_you, similar, bought_together, trending or recently_viewed"),
        )
    })?;
    let k = parse_num::<usize>(params, "k")?.unwrap_or(default_k);
    if k == 0 || k > max_k {
        return Err(invalid("k", &format!("must be between 1 and {max_k}")));
    }
    let mut req = Request::new(scenario, k);
    req.user_id = non_empty(params, "user_id");
    req.anonymous_id = non_empty(params, "anonymous_id");
    req.item_id = non_empty(params, "item_id");
    req.category = non_empty(params, "category");
    if scenario.needs_item() && req.item_id.is_none() {
        return Err(HttpError::new(
            Code::MissingParameter,
            format!("scenario {scenario_name} needs `item_id`"),
        ));
    }
    if matches!(scenario, Scenario::RecentlyViewed)
        && req.user_id.is_none()
        && req.anonymous_id.is_none()
    {
        return Err(HttpError::new(
            Code::MissingParameter,
            "recently_viewed needs `user_id` or `anonymous_id`",
        ));
    }
    let min_price = parse_num::<f64>(params, "min_price")?;
    let max_price = parse_num::<f64>(params, "max_price")?;
    if let (Some(a), Some(b)) = (min_price, max_price) {
        if a > b {
            return Err(invalid("min_price", "must not exceed max_price"));
        }
    }
    req.filters = Filters {
        in_stock_only: parse_bool(params, "in_stock_only")?,
        exclude_purchased: parse_bool(params, "exclude_purchased")?,
        exclude_cart: parse_bool(params, "exclude_cart")?,
        exclude_viewed: parse_bool(params, "exclude_viewed")?,
        include_categories: parse_list(params, "categories"),
        exclude_categories: parse_list(params, "exclude_categories"),
        min_price,
        max_price,
        max_per_category: parse_num(params, "max_per_category")?,
        exclude_items: parse_list(params, "exclude_items"),
    };
    req.fallback = parse_bool(params, "fallback")?.unwrap_or(true);
    Ok(req)
}

/// One recommended item as the API answers it. Serialized straight from the state's strings
/// while the read guard is held, instead of building a `serde_json::Value` per item (a map and an
/// owned string per field: 4.4% of the server's time in a `for_you` profile, BENCHMARKS.md). The
/// fields are in alphabetical order, where a `Value` object puts them, so the answer's bytes are
/// unchanged.
#[derive(Serialize)]
struct ItemOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    brand: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    categories: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    currency: Option<&'a str>,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    in_stock: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    price: Option<f64>,
    /// Widened as `Value` did (an `f32` would print with fewer digits).
    score: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<&'a str>,
}

impl<'a> ItemOut<'a> {
    fn new(state: &'a EngineState, idx: u32, score: f32) -> ItemOut<'a> {
        let data = state.item(idx);
        let mut out = ItemOut {
            brand: None,
            categories: Vec::new(),
            currency: None,
            id: state.items.name(idx),
            image: None,
            in_stock: None,
            price: None,
            score: f64::from(score),
            title: None,
            url: None,
        };
        match &data.catalog {
            Some(c) => {
                out.brand = c.brand.as_deref();
                out.categories = c.categories.iter().map(String::as_str).collect();
                out.currency = c.currency.as_deref();
                out.image = c.image.as_deref();
                out.in_stock = Some(c.in_stock);
                out.price = c.price;
                out.title = c.title.as_deref();
                out.url = c.url.as_deref();
            }
            None => {
                out.categories = data
                    .categories
                    .iter()
                    .map(|&c| state.categories.name(c))
                    .collect();
            }
        }
        out
    }
}

/// The body of a recommendation answer (fields in alphabetical order, as in [`ItemOut`]).
#[derive(Serialize)]
struct RecommendationOut<'a> {
    items: Vec<ItemOut<'a>>,
    rec_id: String,
    scenario: &'a str,
    strategy: &'a str,
}

pub(crate) async fn recommend(
    State(app): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let req = parse_request(&params, app.recommend.default_k, app.recommend.max_k)?;
    if let Some(replica) = app.replica.get() {
        return recommend_on_replica(&app, replica, &params, &req).await;
    }
    let ids: Vec<&str> = [req.user_id.as_deref(), req.anonymous_id.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    app.wait_applied_for(&ids).await;
    let started = Instant::now();
    let body = {
        let state = app.store.read();
        let rec = run(&state, &req, &app.recommend);
        render(&app, &state, &rec)
    };
    if let Some(h) = app.metrics.rec_latency(req.scenario.as_str()) {
        h.observe(started.elapsed());
    }
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// The JSON body of an answer, with a new `rec_id`.
fn render(app: &AppState, state: &EngineState, rec: &Recommendation) -> Vec<u8> {
    let out = RecommendationOut {
        items: rec
            .items
            .iter()
            .map(|s| ItemOut::new(state, s.item, s.score))
            .collect(),
        rec_id: app.next_rec_id(),
        scenario: rec.scenario.as_str(),
        strategy: &rec.strategy,
    };
    serde_json::to_vec(&out).expect("a recommendation always serializes")
}

/// A recommendation on an API replica (see [`crate::replica`]): from the cache, or ranked over
/// the model with the person's profiles read from Redis.
async fn recommend_on_replica(
    app: &AppState,
    replica: &Replica,
    params: &HashMap<String, String>,
    req: &Request,
) -> ApiResult<Response> {
    let started = Instant::now();
    let mut query: Vec<(&String, &String)> = params.iter().collect();
    query.sort();
    let cache_key = query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let catalog_version = app.store.read().catalog_version();
    let rec = match replica.cache.get(&cache_key, catalog_version) {
        Some(rec) => rec,
        None => {
            let ticket = replica.cache.ticket();
            let person =
                read_person(replica, req.user_id.as_deref(), req.anonymous_id.as_deref()).await?;
            let profile = person_profile(app, &person);
            let (rec, catalog_version) = {
                let state = app.store.read();
                let rec = recommend_for(&state, req, profile.as_ref(), &app.recommend);
                (Arc::new(rec), state.catalog_version())
            };
            replica.cache.put(
                cache_key,
                rec.clone(),
                &person.keys,
                ticket,
                catalog_version,
            );
            rec
        }
    };
    let body = render(app, &app.store.read(), &rec);
    if let Some(h) = app.metrics.rec_latency(req.scenario.as_str()) {
        h.observe(started.elapsed());
    }
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// What Redis holds about the person named by `user_id` and/or `anonymous_id` (nothing for a
/// request that names nobody).
async fn read_person(
    replica: &Replica,
    user_id: Option<&str>,
    anonymous_id: Option<&str>,
) -> ApiResult<Person> {
    let keys: Vec<String> = user_id
        .map(user_key)
        .into_iter()
        .chain(anonymous_id.map(anonymous_key))
        .collect();
    if keys.is_empty() {
        return Ok(Person::default());
    }
    let reader = replica.reader.clone();
    tokio::task::spawn_blocking(move || {
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        reader.read(&keys)
    })
    .await
    .map_err(|e| HttpError::new(Code::StateUnavailable, format!("reading the profile: {e}")))?
    .map_err(|e| {
        HttpError::new(
            Code::StateUnavailable,
            format!("reading the profile from Redis failed: {e}"),
        )
    })
}

/// The person's profile in the replica's numbering: their profiles merged (see
/// [`merge_person`]). Names the model does not know yet are added to it.
fn person_profile(app: &AppState, person: &Person) -> Option<Profile> {
    if person.profiles.is_empty() {
        return None;
    }
    let known: Option<Vec<(String, Profile)>> = {
        let state = app.store.read();
        person
            .profiles
            .iter()
            .map(|(k, p)| p.import_known(&state).map(|p| (k.clone(), p)))
            .collect()
    };
    let profiles = match known {
        Some(profiles) => profiles,
        None => person
            .profiles
            .iter()
            .filter_map(|(k, p)| app.store.import_profile(p).map(|p| (k.clone(), p)))
            .collect(),
    };
    merge_person(profiles, person.user.as_deref(), &app.store.read().config)
}

/// A profile as JSON (for debugging, golden tests and integrations).
pub(crate) async fn profile(
    State(app): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let user_id = non_empty(&params, "user_id");
    let anonymous_id = non_empty(&params, "anonymous_id");
    if user_id.is_none() && anonymous_id.is_none() {
        return Err(HttpError::new(
            Code::MissingParameter,
            "give `user_id` or `anonymous_id`",
        ));
    }
    if let Some(replica) = app.replica.get() {
        let person = read_person(replica, user_id.as_deref(), anonymous_id.as_deref()).await?;
        let key = person.user.clone().or_else(|| person.keys.first().cloned());
        let profile = person_profile(&app, &person);
        let state = app.store.read();
        return Ok(Json(match profile {
            Some(p) => profile_json(&state, key.as_deref().unwrap_or(""), &p),
            None => json!({"key": key, "exists": false}),
        }));
    }
    let ids: Vec<&str> = [user_id.as_deref(), anonymous_id.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    app.wait_applied_for(&ids).await;
    let state = app.store.read();
    let key = state.resolve_key(user_id.as_deref(), anonymous_id.as_deref());
    let profile = state.profile(user_id.as_deref(), anonymous_id.as_deref());
    Ok(Json(match profile {
        Some(p) => profile_json(&state, key.as_deref().unwrap_or(""), p),
        None => json!({"key": key, "exists": false}),
    }))
}

/// Stable JSON rendering of a profile, with item, category and brand names resolved.
pub fn profile_json(state: &EngineState, key: &str, p: &kairos_state::profile::Profile) -> Value {
    let name = |i: u32| state.items.name(i).to_owned();
    let ah = state.config.affinity_half_life_ms();
    let round = |x: f32| (x as f64 * 1e4).round() / 1e4;
    let mut cats: Vec<(String, f64)> = p
        .categories
        .decayed(state.clock, ah)
        .map(|(c, s)| (state.categories.name(c).to_owned(), round(s)))
        .collect();
    cats.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut brands: Vec<(String, f64)> = p
        .brands
        .decayed(state.clock, ah)
        .map(|(c, s)| (state.brands.name(c).to_owned(), round(s)))
        .collect();
    brands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    json!({
        "key": key,
        "exists": true,
        "first_seen": p.first_seen,
        "last_seen": p.last_seen,
        "session_id": p.session_id,
        "session_start": p.session_start,
        "session_items": p.session_items().map(|i| name(i.item)).collect::<Vec<_>>(),
        "recent_items": p.recent.iter().rev().map(|i| json!({"item": name(i.item), "action": format!("{:?}", i.action).to_lowercase(), "ts": i.ts})).collect::<Vec<_>>(),
        "cart": p.cart.iter().map(|&(i, q)| json!({"item": name(i), "quantity": q})).collect::<Vec<_>>(),
        "purchased": p.purchased.iter().map(|&i| name(i)).collect::<Vec<_>>(),
        "categories": cats.into_iter().map(|(c, s)| json!([c, s])).collect::<Vec<_>>(),
        "brands": brands.into_iter().map(|(c, s)| json!([c, s])).collect::<Vec<_>>(),
        "counters": {
            "events": p.counters.events,
            "page_views": p.counters.page_views,
            "product_views": p.counters.product_views,
            "clicks": p.counters.clicks,
            "searches": p.counters.searches,
            "add_to_carts": p.counters.add_to_carts,
            "purchases": p.counters.purchases,
            "sessions": p.counters.sessions,
            "rec_impressions": p.counters.rec_impressions,
            "rec_clicks": p.counters.rec_clicks,
            "revenue": p.counters.revenue,
        },
    })
}
