//! Every endpoint and every error code, in-process against the real router.

use std::collections::HashSet;

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use kairos_types::Code;

use crate::support::{ids, Backend, TempDir, TestNode};

/// Asserts an error response: status, code, and the `{"message","code","type","link"}` shape.
fn assert_error(
    resp: &(StatusCode, Value),
    status: u16,
    code: Code,
    seen: &mut HashSet<&'static str>,
) {
    let (s, body) = resp;
    assert_eq!(s.as_u16(), status, "{body}");
    assert_eq!(body["code"], code.as_str(), "{body}");
    assert_eq!(body["type"], code.error_type().as_str());
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(body["link"].as_str().unwrap().ends_with(code.as_str()));
    seen.insert(code.as_str());
}

/// The `(index, code)` of each rejected event of a batch answer.
fn rejected_codes(body: &Value) -> Vec<(u64, String)> {
    body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap(),
                r["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn view(anon: &str, product: &str, ts: i64, message_id: &str) -> Value {
    json!({"type": "track", "event": "product_view", "anonymousId": anon, "messageId": message_id,
           "timestamp": ts, "properties": {"product_id": product}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_and_error_code() {
    every_endpoint_and_error_code_on(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_and_error_code_on_kafka_redis() {
    every_endpoint_and_error_code_on(Backend::kafka_redis(4)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_and_error_code_on_kafka_redis_cluster() {
    every_endpoint_and_error_code_on(Backend::kafka_redis_cluster(4)).await;
}

async fn every_endpoint_and_error_code_on(backend: Backend) {
    let dir = TempDir::new("api");
    let node = TestNode::start_on(
        &backend,
        dir.path(),
        "[ingest]\nmax_batch_events = 5\nmax_batch_bytes = 4096\nmax_event_bytes = 600\nmax_items_per_request = 3\n",
    );
    let mut seen = HashSet::new();

    // Health.
    assert_eq!(node.get("/healthz").await.0, StatusCode::OK);
    let (s, ready) = node.get("/readyz").await;
    assert_eq!(s, StatusCode::OK, "{ready}");

    // Catalogue.
    let (s, body) = node
        .put(
            "/v1/items",
            &json!([
                {"id": "a", "title": "Alpha", "categories": ["books"], "price": 10.0, "brand": "acme"},
                {"id": "b", "title": "Beta", "categories": ["books"], "price": 30.0},
                {"title": "no id"}
            ]),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], 2);
    assert_eq!(body["rejected"][0]["index"], 2);
    assert_eq!(body["rejected"][0]["code"], "invalid_item");
    seen.insert(Code::InvalidItem.as_str());
    let (s, body) = node
        .put("/v1/items", &json!({"items": [{"id": "c", "categories": ["games"], "in_stock": false, "price": 5}]}))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, item) = node.get("/v1/items/a").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(item["title"], "Alpha");
    assert_eq!(item["categories"], json!(["books"]));
    assert_error(
        &node.get("/v1/items/nope").await,
        404,
        Code::ItemNotFound,
        &mut seen,
    );
    assert_error(
        &node
            .put(
                "/v1/items",
                &json!([{"id": "1"}, {"id": "2"}, {"id": "3"}, {"id": "4"}]),
            )
            .await,
        413,
        Code::TooManyItems,
        &mut seen,
    );
    assert_error(
        &node.put("/v1/items", &json!({"id": "x"})).await,
        400,
        Code::MalformedJson,
        &mut seen,
    );

    // A mixed batch: valid events are stored, invalid ones listed by index with their codes.
    let big = "x".repeat(700);
    let batch = json!({"batch": [
        view("anon-1", "a", 1_000_000, "m1"),
        {"type": "track", "event": "product_view", "anonymousId": "anon-1"},
        {"type": "bogus", "anonymousId": "anon-1"},
        {"type": "track", "event": "search", "properties": {"query": "q"}},
        {"type": "track", "anonymousId": "anon-1", "properties": {"padding": big}},
    ]});
    let (s, body) = node.post("/v1/batch", &batch).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], 1);
    let rejected = rejected_codes(&body);
    assert_eq!(
        rejected,
        [
            (1, "missing_product_id".to_owned()),
            (2, "invalid_event_type".to_owned()),
            (3, "missing_identity".to_owned()),
            (4, "event_too_large".to_owned()),
        ]
    );
    for code in [
        "missing_product_id",
        "invalid_event_type",
        "missing_identity",
        "event_too_large",
    ] {
        seen.insert(
            Code::ALL
                .iter()
                .find(|c| c.as_str() == code)
                .unwrap()
                .as_str(),
        );
    }
    let (_, profile) = node.get("/v1/profiles?anonymous_id=anon-1").await;
    assert_eq!(profile["recent_items"][0]["item"], "a", "{profile}");
    assert_eq!(profile["counters"]["product_views"], 1);

    // Each per-event code, through the single-event endpoints (the event's code and status).
    let cases: Vec<(&str, Value, Code)> = vec![
        ("/v1/track", json!([1]), Code::InvalidEvent),
        (
            "/v1/track",
            json!({"anonymousId": "x"}),
            Code::MissingEventName,
        ),
        (
            "/v1/track",
            json!({"anonymousId": "x", "event": "search"}),
            Code::MissingQuery,
        ),
        (
            "/v1/track",
            json!({"anonymousId": "x", "event": "purchase", "properties": {"products": [{"sku_missing": 1}]}}),
            Code::InvalidProducts,
        ),
        (
            "/v1/track",
            json!({"anonymousId": "x", "event": "rec_impression", "properties": {}}),
            Code::MissingRecId,
        ),
        (
            "/v1/track",
            json!({"anonymousId": "x", "event": "page_view", "timestamp": "yesterday"}),
            Code::InvalidTimestamp,
        ),
        (
            "/v1/track",
            json!({"anonymousId": 5.5e300, "event": "x", "properties": 3}),
            Code::InvalidField,
        ),
        (
            "/v1/identify",
            json!({"anonymousId": "x"}),
            Code::MissingUserId,
        ),
        ("/v1/alias", json!({"userId": "u"}), Code::MissingPreviousId),
        (
            "/v1/page",
            json!({"type": "track", "event": "x", "anonymousId": "x"}),
            Code::InvalidEventType,
        ),
    ];
    for (path, body, code) in cases {
        let resp = node.post(path, &body).await;
        assert_error(&resp, code.http_status(), code, &mut seen);
    }
    assert_error(
        &node
            .post(
                "/v1/track",
                &json!({"anonymousId": "x", "event": "e", "properties": {"p": big}}),
            )
            .await,
        413,
        Code::EventTooLarge,
        &mut seen,
    );

    // Whole-request errors.
    assert_error(
        &node
            .request(
                Method::POST,
                "/v1/batch",
                Some(b"{not json".to_vec()),
                Some("application/json"),
            )
            .await,
        400,
        Code::MalformedJson,
        &mut seen,
    );
    assert_error(
        &node.post("/v1/batch", &json!({"batch": []})).await,
        400,
        Code::EmptyBatch,
        &mut seen,
    );
    let six: Vec<Value> = (0..6)
        .map(|i| view("anon-2", "a", 1, &format!("six-{i}")))
        .collect();
    assert_error(
        &node.post("/v1/batch", &json!({ "batch": six })).await,
        413,
        Code::TooManyEvents,
        &mut seen,
    );
    let huge = json!({"batch": [{"type": "page", "anonymousId": "x", "properties": {"p": "y".repeat(5000)}}]});
    assert_error(
        &node.post("/v1/batch", &huge).await,
        413,
        Code::PayloadTooLarge,
        &mut seen,
    );
    assert_error(
        &node
            .request(
                Method::POST,
                "/v1/batch",
                Some(b"<xml/>".to_vec()),
                Some("application/xml"),
            )
            .await,
        415,
        Code::UnsupportedMediaType,
        &mut seen,
    );
    assert_error(
        &node
            .post(
                "/v1/batch",
                &json!({"batch": [view("x", "a", 1, "s")], "sentAt": "noon"}),
            )
            .await,
        400,
        Code::InvalidTimestamp,
        &mut seen,
    );
    assert_error(
        &node.get("/v1/nothing").await,
        404,
        Code::RouteNotFound,
        &mut seen,
    );
    assert_error(
        &node.delete("/v1/batch").await,
        405,
        Code::MethodNotAllowed,
        &mut seen,
    );

    // Duplicates: the same messageId again is accepted and dropped.
    let (s, body) = node
        .post(
            "/v1/batch",
            &json!({"batch": [view("anon-1", "b", 1_000_100, "m1")]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (body["accepted"].as_u64(), body["duplicates"].as_u64()),
        (Some(0), Some(1))
    );
    let (_, profile) = node.get("/v1/profiles?anonymous_id=anon-1").await;
    assert_eq!(
        profile["counters"]["product_views"], 1,
        "a duplicate must not count"
    );

    // Single-call endpoints accept their call type.
    for (path, body) in [
        (
            "/v1/track",
            json!({"anonymousId": "anon-3", "event": "Product Viewed", "properties": {"product_id": "b"}, "timestamp": 1_000_200}),
        ),
        (
            "/v1/page",
            json!({"anonymousId": "anon-3", "timestamp": 1_000_300}),
        ),
        (
            "/v1/identify",
            json!({"anonymousId": "anon-3", "userId": "user-3", "traits": {"email": "a@b.c"}}),
        ),
        (
            "/v1/alias",
            json!({"previousId": "anon-9", "userId": "user-3"}),
        ),
    ] {
        let (s, resp) = node.post(path, &body).await;
        assert_eq!(s, StatusCode::OK, "{path}: {resp}");
        assert_eq!(resp["accepted"], 1, "{path}");
    }
    let (_, profile) = node.get("/v1/profiles?user_id=user-3").await;
    assert_eq!(
        profile["counters"]["product_views"], 1,
        "identify merged the anonymous profile: {profile}"
    );
    assert_eq!(profile["counters"]["page_views"], 1);
    let (_, merged_away) = node.get("/v1/profiles?anonymous_id=anon-3").await;
    assert_eq!(
        merged_away["key"], "u:user-3",
        "the anonymous id now resolves to the user"
    );

    // Recommendations: parameter errors.
    assert_error(
        &node.get("/v1/recommendations?scenario=magic").await,
        400,
        Code::UnknownScenario,
        &mut seen,
    );
    assert_error(
        &node.get("/v1/recommendations?k=0").await,
        400,
        Code::InvalidParameter,
        &mut seen,
    );
    assert_error(
        &node.get("/v1/recommendations?k=many").await,
        400,
        Code::InvalidParameter,
        &mut seen,
    );
    assert_error(
        &node.get("/v1/recommendations?in_stock_only=maybe").await,
        400,
        Code::InvalidParameter,
        &mut seen,
    );
    assert_error(
        &node.get("/v1/recommendations?scenario=similar").await,
        400,
        Code::MissingParameter,
        &mut seen,
    );
    assert_error(
        &node.get("/v1/profiles").await,
        400,
        Code::MissingParameter,
        &mut seen,
    );

    // Recommendations: every scenario answers with ids, scores, catalogue fields and a rec_id.
    for scenario in ["for_you", "trending"] {
        let (s, rec) = node
            .get(&format!(
                "/v1/recommendations?scenario={scenario}&anonymous_id=cold"
            ))
            .await;
        assert_eq!(s, StatusCode::OK, "{rec}");
        assert_eq!(rec["scenario"], scenario);
        assert!(rec["rec_id"].as_str().is_some_and(|r| r.len() == 16));
        assert!(
            !ids(&rec).is_empty(),
            "{scenario}: cold start falls back: {rec}"
        );
        assert!(
            !ids(&rec).contains(&"c".to_string()),
            "out of stock is filtered by default"
        );
    }
    let (_, rec) = node
        .get("/v1/recommendations?scenario=for_you&anonymous_id=cold")
        .await;
    // No profile: the list is entirely fallback (the identify calls above carried no timestamp,
    // so the engine clock is now and the 1970 test views no longer trend: popular fills in).
    assert!(
        ["trending", "popular", "trending+popular"].contains(&rec["strategy"].as_str().unwrap()),
        "{rec}"
    );
    let (_, rec) = node
        .get("/v1/recommendations?scenario=recently_viewed&user_id=user-3")
        .await;
    assert_eq!(ids(&rec), ["b"]);
    let (_, rec) = node
        .get("/v1/recommendations?scenario=similar&item_id=a&k=5")
        .await;
    assert!(
        !ids(&rec).contains(&"a".to_string()),
        "similar excludes the item itself: {rec}"
    );
    let (_, rec) = node
        .get("/v1/recommendations?scenario=bought_together&item_id=a")
        .await;
    assert_eq!(rec["scenario"], "bought_together");
    let (_, rec) = node
        .get("/v1/recommendations?scenario=trending&in_stock_only=false&k=10")
        .await;
    let first = &rec["items"][0];
    assert!(first["score"].as_f64().unwrap() > 0.0);
    let (_, rec) = node
        .get("/v1/recommendations?scenario=trending&in_stock_only=false&max_price=20")
        .await;
    assert!(!ids(&rec).contains(&"b".to_string()), "price filter: {rec}");
    let (_, rec) = node
        .get("/v1/recommendations?scenario=trending&in_stock_only=false&exclude_categories=books")
        .await;
    assert!(
        ids(&rec).iter().all(|i| i != "a" && i != "b"),
        "category filter: {rec}"
    );

    // Delete an item: gone from the catalogue.
    let (s, _) = node.delete("/v1/items/b").await;
    assert_eq!(s, StatusCode::OK);
    assert_error(
        &node.get("/v1/items/b").await,
        404,
        Code::ItemNotFound,
        &mut seen,
    );
    assert_error(
        &node.delete("/v1/items/b").await,
        404,
        Code::ItemNotFound,
        &mut seen,
    );

    // Metrics.
    let (s, text) = node.get("/metrics").await;
    assert_eq!(s, StatusCode::OK);
    let text = text.as_str().unwrap().to_owned();
    for metric in [
        "kairos_events_accepted_total",
        "kairos_events_rejected_total{code=\"missing_product_id\"} 1",
        "kairos_ingest_duration_seconds_bucket",
        "kairos_recommendation_duration_seconds_count{scenario=\"for_you\"}",
        "kairos_event_to_state_seconds_count",
        "kairos_log_bytes",
        "kairos_state_users",
        "kairos_cache_hit_ratio",
        "kairos_snapshots_total",
        "kairos_snapshot_running 0",
        // Everything acknowledged was applied before the reads above answered.
        "kairos_processor_consumer_lag 0",
    ] {
        assert!(text.contains(metric), "missing {metric} in\n{text}");
    }

    // Write keys, origins and an overloaded log (details in web.rs).
    for (resp, status, code) in crate::web::access_error_cases(&node).await {
        assert_error(&resp, status, code, &mut seen);
    }

    // Not ready: readiness is reported as an error.
    node.node().app.set_ready(false);
    assert_error(&node.get("/readyz").await, 503, Code::NotReady, &mut seen);
    node.node().app.set_ready(true);

    // The log is closed: ingest fails with 503 and acknowledges nothing.
    node.node().log.close().unwrap();
    assert_error(
        &node
            .post(
                "/v1/batch",
                &json!({"batch": [view("anon-1", "a", 1, "late")]}),
            )
            .await,
        503,
        Code::LogUnavailable,
        &mut seen,
    );

    // Only an API replica (`kairos api`) reads Redis per request: `api_replica.rs` checks it.
    seen.insert(Code::StateUnavailable.as_str());
    let all: HashSet<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
    let missing: Vec<_> = all.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "error codes never exercised: {missing:?}"
    );
    if let Some(redis) = backend.redis() {
        redis.assert_holds_the_profiles_of(&node);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_change_recommendations_immediately() {
    events_change_recommendations_immediately_on(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_change_recommendations_immediately_on_kafka_redis() {
    events_change_recommendations_immediately_on(Backend::kafka_redis(4)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_change_recommendations_immediately_on_kafka_redis_cluster() {
    events_change_recommendations_immediately_on(Backend::kafka_redis_cluster(4)).await;
}

async fn events_change_recommendations_immediately_on(backend: Backend) {
    let dir = TempDir::new("ryw");
    let node = TestNode::start_on(&backend, dir.path(), "");
    let mut items = Vec::new();
    for i in 0..30 {
        let cat = if i < 15 { "books" } else { "games" };
        items.push(
            json!({"id": format!("i{i}"), "categories": [cat], "title": format!("Item {i}")}),
        );
    }
    node.put("/v1/items", &json!(items)).await;
    // Other shoppers: i0 is followed by i1 and i2 (a few); i20 by i21 (many, so they trend).
    let mut batch = Vec::new();
    for s in 0..20 {
        let anon = format!("shopper-{s}");
        let ts = 1_000_000 + s * 10_000;
        let path: &[&str] = if s % 4 == 0 {
            &["i0", "i1", "i2"]
        } else {
            &["i20", "i21"]
        };
        for (n, item) in path.iter().enumerate() {
            batch.push(view(
                &anon,
                item,
                ts + n as i64 * 1000,
                &format!("{anon}-{n}"),
            ));
        }
    }
    let (s, body) = node
        .post(
            "/v1/batch",
            &json!({"batch": batch[..batch.len().min(500)]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");

    let (_, before) = node.get("/v1/recommendations?anonymous_id=me&k=3").await;
    let (s, _) = node
        .post("/v1/track", &view("me", "i0", 2_000_000, "me-1"))
        .await;
    assert_eq!(s, StatusCode::OK);
    // Read-your-writes: the very next call reflects the event.
    let (_, after) = node.get("/v1/recommendations?anonymous_id=me&k=3").await;
    assert_ne!(ids(&before), ids(&after));
    assert!(
        after["strategy"]
            .as_str()
            .unwrap()
            .starts_with("session_knn"),
        "{after}"
    );
    // i20 and i21 were viewed equally often: which leads depends on rounding in the order the
    // views were applied, which Kafka does not fix across partitions.
    let mut cold = ids(&before)[..2].to_vec();
    cold.sort();
    assert_eq!(cold, ["i20", "i21"], "cold start is trending: {before}");
    let top = ids(&after);
    assert!(
        top.contains(&"i1".to_string()) && top.contains(&"i2".to_string()),
        "{after}"
    );

    // Diversity cap and category include.
    let (_, rec) = node
        .get("/v1/recommendations?scenario=trending&k=10&max_per_category=1")
        .await;
    assert_eq!(ids(&rec).len(), 2, "one per category: {rec}");
    let (_, rec) = node
        .get("/v1/recommendations?scenario=trending&k=10&categories=games")
        .await;
    assert!(
        ids(&rec)
            .iter()
            .all(|i| i.trim_start_matches('i').parse::<u32>().unwrap() >= 15),
        "{rec}"
    );
    let (_, rec) = node
        .get("/v1/recommendations?scenario=trending&category=games&k=2")
        .await;
    let mut top = ids(&rec);
    top.sort();
    assert_eq!(top, ["i20", "i21"], "{rec}");

    // Cart and purchase: bought_together learns; purchased items are excluded from for_you.
    for (n, ev) in [
        json!({"type":"track","event":"add_to_cart","userId":"buyer","timestamp":3_000_000,"properties":{"product_id":"i5","quantity":1}}),
        json!({"type":"track","event":"add_to_cart","userId":"buyer","timestamp":3_000_100,"properties":{"product_id":"i6"}}),
        json!({"type":"track","event":"purchase","userId":"buyer","timestamp":3_000_200,"properties":{"order_id":"o1","revenue":12.5,"products":[{"product_id":"i5"},{"product_id":"i6"}]}}),
    ]
    .into_iter()
    .enumerate()
    {
        let mut ev = ev;
        ev["messageId"] = json!(format!("buyer-{n}"));
        let (s, body) = node.post("/v1/track", &ev).await;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    let (_, rec) = node
        .get("/v1/recommendations?scenario=bought_together&item_id=i5&k=1")
        .await;
    assert_eq!(ids(&rec), ["i6"], "{rec}");
    let (_, profile) = node.get("/v1/profiles?user_id=buyer").await;
    assert_eq!(profile["purchased"], json!(["i5", "i6"]));
    assert_eq!(profile["cart"], json!([]));
    assert_eq!(profile["counters"]["revenue"], 12.5);
    let (_, rec) = node.get("/v1/recommendations?user_id=buyer&k=30").await;
    assert!(
        !ids(&rec).contains(&"i5".to_string()),
        "purchased items are excluded: {rec}"
    );
    let (_, rec) = node
        .get("/v1/recommendations?user_id=buyer&k=30&exclude_purchased=false")
        .await;
    assert!(
        ids(&rec).contains(&"i5".to_string()),
        "unless switched off: {rec}"
    );
    if let Some(redis) = backend.redis() {
        redis.assert_holds_the_profiles_of(&node);
    }
    node.shutdown();
}

/// `docs/ERRORS.md` is the table of every code; it must match the code table exactly.
#[test]
fn error_docs_match_the_code_table() {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/ERRORS.md");
    let mut expected = String::from(
        "# Error codes\n\nEvery error response of the Kairos API is JSON `{\"message\",\"code\",\"type\",\"link\"}`.\n\
         `type` is `invalid_request` (do not retry the same request) or `system` (retry later).\n\
         Per-event errors of a batch use the same codes in the `rejected` list of a 200 response.\n\
         This file is checked against the code table (`crates/kairos-types/src/error.rs`) by the test suite.\n\n\
         | code | type | HTTP status | meaning |\n|---|---|---|---|\n",
    );
    for code in Code::ALL {
        expected.push_str(&format!(
            "| <a id=\"{0}\"></a>`{0}` | {1} | {2} | {3} |\n",
            code.as_str(),
            code.error_type().as_str(),
            code.http_status(),
            code.description()
        ));
    }
    if std::env::var_os("KAIROS_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &expected).unwrap();
    }
    let actual = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        actual, expected,
        "docs/ERRORS.md is out of date; regenerate with KAIROS_UPDATE_GOLDEN=1"
    );
}

/// `POST /v1/validate` judges a batch exactly as `/v1/batch` does, event by event, and stores
/// nothing: no log record, no profile, no accepted-events count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_checks_a_batch_and_stores_nothing() {
    validate_checks_a_batch_and_stores_nothing_on(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_checks_a_batch_and_stores_nothing_on_kafka_redis() {
    validate_checks_a_batch_and_stores_nothing_on(Backend::kafka_redis(4)).await;
}

async fn validate_checks_a_batch_and_stores_nothing_on(backend: Backend) {
    let dir = TempDir::new("validate");
    let node = TestNode::start_on(&backend, dir.path(), "");
    let batch = json!({"batch": [
        view("anon-v", "a", 1_000_000, "v1"),
        {"type": "track", "event": "product_view", "anonymousId": "anon-v"},
        {"type": "bogus", "anonymousId": "anon-v"},
        {"type": "track", "event": "add_to_cart", "anonymousId": "anon-v",
         "properties": {"product_id": "b"}, "context": {"sessionId": "s1", "page": {"url": "/b"}}},
    ]});
    let (s, verdict) = node.post("/v1/validate", &batch).await;
    assert_eq!(s, StatusCode::OK, "{verdict}");
    assert_eq!(verdict["valid"], 2, "{verdict}");
    assert_eq!(
        rejected_codes(&verdict),
        [
            (1, "missing_product_id".to_owned()),
            (2, "invalid_event_type".to_owned()),
        ]
    );
    assert_eq!(node.node().log.committed_seq(), 0);
    let (_, profile) = node.get("/v1/profiles?anonymous_id=anon-v").await;
    assert_eq!(profile["exists"], false, "{profile}");
    let (_, metrics) = node.get("/metrics").await;
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(
        metrics.contains("kairos_events_accepted_total 0"),
        "{metrics}"
    );

    // The envelope is checked like /v1/batch's.
    let (s, body) = node.post("/v1/validate", &json!({"batch": []})).await;
    assert_eq!(
        (s.as_u16(), body["code"].as_str()),
        (400, Some("empty_batch"))
    );
    let (s, body) = node
        .request(
            axum::http::Method::POST,
            "/v1/validate",
            Some(b"{\"batch\": [".to_vec()),
            Some("application/json"),
        )
        .await;
    assert_eq!(
        (s.as_u16(), body["code"].as_str()),
        (400, Some("malformed_json"))
    );

    // The same batch sent for real stores exactly the events validate called valid.
    let (s, body) = node.post("/v1/batch", &batch).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], verdict["valid"]);
    assert_eq!(rejected_codes(&body), rejected_codes(&verdict));
    let (_, profile) = node.get("/v1/profiles?anonymous_id=anon-v").await;
    assert_eq!(profile["exists"], true, "{profile}");
    assert_eq!(profile["session_id"], "s1", "{profile}");
}

/// Cached fallback lists are reused for a while of event time, but a catalogue change always
/// shows: a brand-new shop serves its catalogue as soon as it is uploaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue_changes_refresh_cached_lists() {
    catalogue_changes_refresh_cached_lists_on(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue_changes_refresh_cached_lists_on_kafka_redis() {
    catalogue_changes_refresh_cached_lists_on(Backend::kafka_redis(4)).await;
}

async fn catalogue_changes_refresh_cached_lists_on(backend: Backend) {
    let dir = TempDir::new("catalog-cache");
    let node = TestNode::start_on(
        &backend,
        dir.path(),
        "[model]\ntrending_refresh_ms = 3600000\n",
    );
    let (_, rec) = node
        .get("/v1/recommendations?anonymous_id=first-visitor")
        .await;
    assert_eq!(ids(&rec), Vec::<String>::new(), "{rec}");
    node.put("/v1/items", &json!([{"id": "new-1"}, {"id": "new-2"}]))
        .await;
    let (_, rec) = node
        .get("/v1/recommendations?anonymous_id=first-visitor")
        .await;
    assert_eq!(ids(&rec), ["new-1", "new-2"], "{rec}");
    node.delete("/v1/items/new-1").await;
    let (_, rec) = node
        .get("/v1/recommendations?anonymous_id=first-visitor")
        .await;
    assert_eq!(ids(&rec), ["new-2"], "{rec}");
    node.shutdown();
}

/// The processor's lag is what the log committed beyond what the state applied.
#[test]
fn consumer_lag_counts_committed_records_not_yet_applied() {
    use std::sync::Arc;

    use kairos_log::{AppendRecord, EmbeddedLog, EmbeddedLogConfig, EventLog, FsyncPolicy};
    use kairos_processor::Watermark;
    use kairos_state::{EmbeddedStore, StateConfig};
    use kairos_types::metrics::Registry;

    let dir = TempDir::new("lag");
    let log = EmbeddedLog::open(
        dir.path(),
        EmbeddedLogConfig {
            fsync: FsyncPolicy::Never,
            ..EmbeddedLogConfig::default()
        },
    )
    .unwrap();
    let records = (0..10u8)
        .map(|i| AppendRecord {
            key: vec![i],
            payload: vec![i],
            ..AppendRecord::default()
        })
        .collect();
    log.append(records).wait().unwrap();
    let registry = Registry::default();
    kairos_api::register_state_gauges(
        &registry,
        Arc::new(log),
        Arc::new(EmbeddedStore::in_memory(StateConfig::default())),
        Watermark::new(4),
    );
    let text = registry.render();
    assert!(text.contains("kairos_processor_consumer_lag 6\n"), "{text}");
}

/// An existing embedded log keeps the partition count it was created with, whatever the
/// configuration says now (the default changed from 4 to 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_log_keeps_its_partition_count() {
    let dir = TempDir::new("partitions");
    let node = TestNode::start(dir.path(), "[event_log]\npartitions = 3\n");
    let batch: Vec<Value> = (0..12)
        .map(|i| view(&format!("anon-{i}"), "a", 1_000 + i, &format!("m-{i}")))
        .collect();
    let (s, body) = node.post("/v1/batch", &json!({ "batch": batch })).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    node.shutdown();

    let node = TestNode::start(dir.path(), "");
    assert_eq!(node.node().log.partition_count(), 3);
    let (s, body) = node
        .post(
            "/v1/batch",
            &json!({ "batch": [view("anon-99", "a", 2_000, "m-99")] }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    for who in ["anon-0", "anon-11", "anon-99"] {
        let (_, profile) = node.get(&format!("/v1/profiles?anonymous_id={who}")).await;
        assert_eq!(profile["counters"]["events"], 1, "{who}: {profile}");
    }
    node.shutdown();
}
