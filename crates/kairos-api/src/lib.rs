//! The HTTP API: tracker ingest, catalogue, recommendations, health and metrics.
//!
//! Handlers are thin: ingest validates and normalizes events (`kairos-types`), appends them to the
//! [`EventLog`] and answers only once the log made them durable; reads wait until the processor has
//! applied everything acknowledged before them (read-your-writes), then query the [`StateStore`]
//! through the recommender. Every error is JSON `{"message","code","type","link"}` from the one
//! error-code table.
//!
//! Browsers are served too: [`access`] checks write keys and page origins and answers CORS, and
//! [`assets`] serves the tracker bundles (and, with `--demo`, the demo shop) compiled into the
//! binary.

pub mod access;
pub mod assets;
mod catalog;
pub mod config;
pub mod error;
mod ingest;
mod items;
mod pending;
mod recommendations;
pub mod replica;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};

use kairos_log::EventLog;
use kairos_processor::Watermark;
use kairos_recommend::RecommendConfig;
use kairos_state::StateStore;
use kairos_types::metrics::{Counter, Histogram, Registry};

pub use assets::with_demo_shop;
pub use config::{ApiConfig, IngestConfig, SourceConfig};
pub use error::{ApiResult, HttpError};
use kairos_types::Code;

/// API metrics.
pub struct ApiMetrics {
    pub events_accepted: Arc<Counter>,
    pub events_duplicate: Arc<Counter>,
    rejected: Vec<(Code, Arc<Counter>)>,
    pub ingest_latency: Arc<Histogram>,
    rec_latency: Vec<(&'static str, Arc<Histogram>)>,
    pub read_wait: Arc<Histogram>,
    pub requests_failed: Arc<Counter>,
}

impl ApiMetrics {
    pub fn new(registry: &Registry) -> ApiMetrics {
        let rejected = Code::ALL
            .iter()
            .filter(|c| c.error_type() == kairos_types::ErrorType::InvalidRequest)
            .map(|&c| {
                (
                    c,
                    registry.counter(
                        "kairos_events_rejected_total",
                        "Events rejected, by error code.",
                        &[("code", c.as_str())],
                    ),
                )
            })
            .collect();
        let rec_latency = [
            "for_you",
            "similar",
            "bought_together",
            "trending",
            "recently_viewed",
        ]
        .into_iter()
        .map(|s| {
            (
                s,
                registry.histogram(
                    "kairos_recommendation_duration_seconds",
                    "Time to compute a recommendation (after read-your-writes waiting).",
                    &[("scenario", s)],
                ),
            )
        })
        .collect();
        ApiMetrics {
            events_accepted: registry.counter(
                "kairos_events_accepted_total",
                "Events durably appended to the log.",
                &[],
            ),
            events_duplicate: registry.counter(
                "kairos_events_duplicate_total",
                "Events dropped as duplicates of an earlier messageId.",
                &[],
            ),
            rejected,
            ingest_latency: registry.histogram(
                "kairos_ingest_duration_seconds",
                "Time from receiving an ingest request to acknowledging it (durable).",
                &[],
            ),
            rec_latency,
            read_wait: registry.histogram(
                "kairos_read_wait_seconds",
                "Time a read waited for the processor to apply acknowledged writes it must see (read-your-writes).",
                &[],
            ),
            requests_failed: registry.counter(
                "kairos_requests_failed_total",
                "Requests answered with an error status.",
                &[],
            ),
        }
    }

    pub fn rejected(&self, code: Code) {
        if let Some((_, c)) = self.rejected.iter().find(|(k, _)| *k == code) {
            c.inc();
        }
    }

    pub fn rec_latency(&self, scenario: &str) -> Option<&Histogram> {
        self.rec_latency
            .iter()
            .find(|(s, _)| *s == scenario)
            .map(|(_, h)| h.as_ref())
    }
}

/// Everything a handler needs.
pub struct AppState {
    pub log: Arc<dyn EventLog>,
    pub store: Arc<dyn StateStore>,
    pub watermark: Watermark,
    pub ingest: IngestConfig,
    pub api: ApiConfig,
    pub recommend: RecommendConfig,
    pub registry: Arc<Registry>,
    pub metrics: ApiMetrics,
    /// Write keys and allowed origins, from `ingest.sources`.
    pub access: access::Access,
    /// What reads must wait for (read-your-writes per person).
    pub pending: pending::PendingWrites,
    /// False until the processor has replayed the log after start, and again during shutdown.
    pub ready: AtomicBool,
    /// Set on an ingest node (`kairos ingest`), which has no state to check requests against.
    pub ingest_only: AtomicBool,
    /// Set on an API replica (`kairos api`): profiles come from Redis, answers from a cache.
    pub replica: std::sync::OnceLock<replica::Replica>,
    rec_counter: AtomicU64,
    rec_prefix: u64,
}

impl AppState {
    pub fn new(
        log: Arc<dyn EventLog>,
        store: Arc<dyn StateStore>,
        watermark: Watermark,
        ingest: IngestConfig,
        api: ApiConfig,
        recommend: RecommendConfig,
        registry: Arc<Registry>,
    ) -> Arc<AppState> {
        let metrics = ApiMetrics::new(&registry);
        let access = access::Access::new(&ingest);
        let rec_prefix = kairos_types::stable_hash64(&[
            &std::process::id().to_le_bytes(),
            &kairos_types::time::now_ms().to_le_bytes(),
        ]);
        Arc::new(AppState {
            log,
            store,
            watermark,
            ingest,
            api,
            recommend,
            registry,
            metrics,
            access,
            pending: pending::PendingWrites::default(),
            ready: AtomicBool::new(false),
            replica: std::sync::OnceLock::new(),
            ingest_only: AtomicBool::new(false),
            rec_counter: AtomicU64::new(0),
            rec_prefix,
        })
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// A unique id for a served list, echoed back by `rec_impression`/`rec_click` events.
    pub fn next_rec_id(&self) -> String {
        let n = self.rec_counter.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}{:08x}", (self.rec_prefix >> 32) as u32, n as u32)
    }

    /// Read-your-writes: wait until the state reflects everything acknowledged so far.
    pub async fn wait_applied(&self) {
        self.wait_for(self.log.committed_seq()).await;
    }

    /// Read-your-writes for a recommendation read (`ids`: the user id and/or anonymous id it
    /// names, if any): wait until the state reflects that person's acknowledged events and every
    /// catalogue change (see [`pending`]), then at most `read_others_writes_timeout_ms` for
    /// everything else acknowledged before the read. A read that names nobody (`similar` on an
    /// item page) has no writes of its own to wait for: making it wait for everyone's would put
    /// the processor's lag behind all traffic into its latency.
    pub async fn wait_applied_for(&self, ids: &[&str]) {
        let started = std::time::Instant::now();
        let everything = self.log.committed_seq();
        self.wait_for(self.pending.target(ids.iter().copied()))
            .await;
        if self.api.read_others_writes_timeout_ms > 0 {
            let others = Duration::from_millis(self.api.read_others_writes_timeout_ms);
            self.watermark.wait_for(everything, others).await;
        }
        self.metrics.read_wait.observe(started.elapsed());
    }

    async fn wait_for(&self, target: u64) {
        let timeout = Duration::from_millis(self.api.read_your_writes_timeout_ms);
        if !self.watermark.wait_for(target, timeout).await {
            tracing::warn!(
                target,
                applied = self.watermark.get(),
                "read-your-writes wait timed out"
            );
        }
    }
}

/// The full router (the demo shop is added by [`with_demo_shop`]).
pub fn router(state: Arc<AppState>) -> Router {
    let routes = tracker_routes()
        .route("/v1/items", put(items::upsert).get(catalog::list))
        .route(
            "/v1/items/{id}",
            get(items::get_item).delete(items::delete_item),
        )
        .route("/v1/recommendations", get(recommendations::recommend))
        .route("/v1/profiles", get(recommendations::profile))
        .fallback(not_found);
    with_common_routes(routes, state)
}

/// The router of an ingest-only node (`kairos ingest`): the tracker endpoints, catalogue writes,
/// health and metrics. It has no state to read, so reads get a `route_not_found` that says where
/// they belong.
pub fn ingest_router(state: Arc<AppState>) -> Router {
    let routes = tracker_routes()
        .route(
            "/v1/items",
            put(items::upsert).get(not_found_on_ingest_node),
        )
        .route(
            "/v1/items/{id}",
            delete(items::delete_item).get(not_found_on_ingest_node),
        )
        .fallback(not_found_on_ingest_node);
    with_common_routes(routes, state)
}

/// The router of an API replica (`kairos api`): recommendations, profiles and catalogue reads
/// from the model the processor replicas publish and the profiles in Redis (see [`replica`]).
/// Events and catalogue writes go to `kairos ingest`, and every other path says so.
pub fn api_router(state: Arc<AppState>) -> Router {
    let routes = Router::new()
        .route("/v1/items", get(catalog::list))
        .route("/v1/items/{id}", get(items::get_item))
        .route("/v1/recommendations", get(recommendations::recommend))
        .route("/v1/profiles", get(recommendations::profile))
        .fallback(not_found_on_api_node);
    with_common_routes(routes, state)
}

async fn not_found_on_api_node(method: axum::http::Method, uri: axum::http::Uri) -> HttpError {
    HttpError::new(
        Code::RouteNotFound,
        format!(
            "no route for {method} {} on this node: it runs the API role only (`kairos api`), which serves reads; events and catalogue changes go to `kairos ingest` or `kairos serve`",
            uri.path()
        ),
    )
}

/// The router of a processor replica (`kairos process`): health, readiness and metrics only. It
/// neither takes events nor serves reads, and every other path says so.
pub fn process_router(state: Arc<AppState>) -> Router {
    with_common_routes(Router::new().fallback(not_found_on_process_node), state)
}

async fn not_found_on_process_node(method: axum::http::Method, uri: axum::http::Uri) -> HttpError {
    HttpError::new(
        Code::RouteNotFound,
        format!(
            "no route for {method} {} on this node: it runs the processor role only (`kairos process`); events go to `kairos ingest` or `kairos serve`, reads to `kairos api` or `kairos serve`",
            uri.path()
        ),
    )
}

/// The tracker's endpoints, which the serve and ingest roles serve.
fn tracker_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/batch", post(ingest::batch))
        .route("/v1/validate", post(ingest::validate))
        .route("/v1/track", post(ingest::track))
        .route("/v1/page", post(ingest::page))
        .route("/v1/identify", post(ingest::identify))
        .route("/v1/alias", post(ingest::alias))
}

/// Health, readiness, metrics and the tracker bundles, with CORS, around a role's `routes`.
fn with_common_routes(routes: Router<Arc<AppState>>, state: Arc<AppState>) -> Router {
    routes
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(assets::sdk_routes())
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access::cors,
        ))
        .with_state(state)
}

async fn not_found_on_ingest_node(method: axum::http::Method, uri: axum::http::Uri) -> HttpError {
    HttpError::new(
        Code::RouteNotFound,
        format!(
            "no route for {method} {} on this node: it runs the ingest role only; recommendations, profiles and catalogue reads are served by `kairos api` or `kairos serve`",
            uri.path()
        ),
    )
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(app): State<Arc<AppState>>) -> Response {
    if app.ready.load(Ordering::Acquire) {
        Json(serde_json::json!({"status": "ready", "applied_seq": app.watermark.get()}))
            .into_response()
    } else {
        HttpError::new(
            Code::NotReady,
            "the node is replaying its log or shutting down",
        )
        .into_response()
    }
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.registry.render(),
    )
        .into_response()
}

async fn not_found(uri: axum::http::Uri) -> HttpError {
    HttpError::new(Code::RouteNotFound, format!("no route for {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> HttpError {
    HttpError::new(
        Code::MethodNotAllowed,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// Registers gauges computed from the log and the state at scrape time.
pub fn register_state_gauges(
    registry: &Registry,
    log: Arc<dyn EventLog>,
    store: Arc<dyn StateStore>,
    watermark: Watermark,
) {
    let l = log.clone();
    registry.computed(
        "kairos_log_bytes",
        "Bytes of the event log on disk.",
        &[],
        move || l.stats().total_bytes as f64,
    );
    let l = log.clone();
    registry.computed(
        "kairos_log_committed_seq",
        "Last committed log sequence number.",
        &[],
        move || l.committed_seq() as f64,
    );
    let l = log.clone();
    registry.computed(
        "kairos_processor_consumer_lag",
        "Log records committed (on Kafka: fetched) but not yet applied to the state.",
        &[],
        move || l.committed_seq().saturating_sub(watermark.get()) as f64,
    );
    let s = store.clone();
    registry.computed(
        "kairos_state_users",
        "Profiles in the state.",
        &[],
        move || s.read().users.len() as f64,
    );
    let s = store.clone();
    registry.computed(
        "kairos_state_items",
        "Items in the state.",
        &[],
        move || s.read().item_data.len() as f64,
    );
    for (name, help, hits) in [
        (
            "kairos_cache_hits_total",
            "Trending/popular list lookups answered from the cache.",
            true,
        ),
        (
            "kairos_cache_misses_total",
            "Trending/popular list lookups that recomputed the list.",
            false,
        ),
    ] {
        let s = store.clone();
        registry.computed(name, help, &[], move || {
            let state = s.read();
            let c = if hits {
                &state.caches.hits
            } else {
                &state.caches.misses
            };
            c.load(Ordering::Relaxed) as f64
        });
    }
    let s = store.clone();
    registry.computed(
        "kairos_cache_hit_ratio",
        "Share of trending/popular lookups answered from the cache.",
        &[],
        move || {
            let state = s.read();
            let hits = state.caches.hits.load(Ordering::Relaxed) as f64;
            let misses = state.caches.misses.load(Ordering::Relaxed) as f64;
            if hits + misses > 0.0 {
                hits / (hits + misses)
            } else {
                0.0
            }
        },
    );
    let s = store;
    registry.computed(
        "kairos_state_applied_seq",
        "Last log sequence number applied to the state.",
        &[],
        move || s.read().checkpoint.seq as f64,
    );
}
