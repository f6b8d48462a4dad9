//! What browsers see: write keys and allowed origins, CORS, 429 with `Retry-After`, the tracker
//! bundles and demo shop compiled into the binary, and the catalogue listing the shop browses.
//!
//! The tracker itself is tested in `sdk/js` (node unit tests, and Playwright end to end against a
//! real `kairos serve`); these tests pin the server's side of that contract.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use serde_json::{json, Value};
use tower::ServiceExt;

use kairos_log::{AppendOutcome, AppendRecord, Completion, EventLog, LogError, LogStats, Record};
use kairos_types::Code;

use crate::support::{TempDir, TestNode};

/// A request with headers to `router`; returns status, headers and the body (JSON, else text).
pub async fn send(
    router: &axum::Router,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (StatusCode, HeaderMap, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(
            body.map(|b| Body::from(b.to_owned()))
                .unwrap_or_else(Body::empty),
        )
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, headers, value)
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn batch(anon: &str, message_id: &str, write_key: Option<&str>) -> String {
    let mut body = json!({"batch": [{"type": "track", "event": "product_view", "anonymousId": anon,
        "messageId": message_id, "properties": {"product_id": "p1"}}]});
    if let Some(k) = write_key {
        body["writeKey"] = json!(k);
    }
    body.to_string()
}

const SOURCES: &str = r#"
[[ingest.sources]]
name = "shop"
write_key = "shop-key"
allowed_origins = ["https://shop.example", "https://*.brand.example"]

[[ingest.sources]]
name = "app"
write_key = "app-key"
"#;

/// An event log that refuses every append as overloaded (and reads from a real one).
struct OverloadedLog(Arc<dyn EventLog>);

impl EventLog for OverloadedLog {
    fn partition_count(&self) -> u32 {
        self.0.partition_count()
    }
    fn append(&self, _: Vec<AppendRecord>) -> Completion<Result<Vec<AppendOutcome>, LogError>> {
        Completion::ready(Err(LogError::Overloaded {
            pending_bytes: 2 << 20,
            limit: 1 << 20,
        }))
    }
    fn read(&self, partition: u32, from: u64, max: usize) -> Result<Vec<Record>, LogError> {
        self.0.read(partition, from, max)
    }
    fn end_offsets(&self) -> Vec<u64> {
        self.0.end_offsets()
    }
    fn start_offsets(&self) -> Vec<u64> {
        self.0.start_offsets()
    }
    fn committed_seq(&self) -> u64 {
        self.0.committed_seq()
    }
    fn wait_committed(&self, after: u64, timeout: Duration) -> u64 {
        self.0.wait_committed(after, timeout)
    }
    fn stats(&self) -> LogStats {
        self.0.stats()
    }
    fn enforce_retention(
        &self,
        safe_offsets: &[u64],
    ) -> Result<kairos_log::RetentionReport, LogError> {
        self.0.enforce_retention(safe_offsets)
    }
    fn close(&self) -> Result<(), LogError> {
        Ok(())
    }
}

/// The router of `node` in front of a log that is overloaded.
fn overloaded_router(node: &TestNode) -> axum::Router {
    let app = &node.node().app;
    let state = kairos_api::AppState::new(
        Arc::new(OverloadedLog(node.node().log.clone())),
        node.node().store.clone(),
        app.watermark.clone(),
        app.ingest.clone(),
        app.api.clone(),
        app.recommend.clone(),
        app.registry.clone(),
    );
    state.set_ready(true);
    kairos_api::router(state)
}

/// The access and overload errors, for `api::every_endpoint_and_error_code` (which checks that
/// every code is exercised): `(response, expected status, expected code)` on a default node.
pub async fn access_error_cases(node: &TestNode) -> Vec<((StatusCode, Value), u16, Code)> {
    let r = &node.router;
    let mut out = Vec::new();
    let (s, _, v) = send(
        r,
        Method::POST,
        "/v1/batch",
        &[("content-type", "text/plain")],
        Some(&batch("a", "k1", Some("no-such-key"))),
    )
    .await;
    out.push(((s, v), 401, Code::InvalidWriteKey));
    let (s, _, v) = send(
        r,
        Method::POST,
        "/v1/batch",
        &[
            ("content-type", "text/plain"),
            ("origin", "https://evil.example"),
        ],
        Some(&batch("a", "k2", Some("demo"))),
    )
    .await;
    out.push(((s, v), 403, Code::OriginNotAllowed));
    let (s, h, v) = send(
        &overloaded_router(node),
        Method::POST,
        "/v1/batch",
        &[("content-type", "application/json")],
        Some(&batch("a", "k3", None)),
    )
    .await;
    assert_eq!(
        header(&h, "retry-after"),
        Some("1"),
        "429 says when to retry"
    );
    out.push(((s, v), 429, Code::Overloaded));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_keys_and_origins() {
    let dir = TempDir::new("keys");
    let node = TestNode::start(dir.path(), SOURCES);
    let names: Vec<&str> = node
        .config
        .ingest
        .sources
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(
        names,
        ["shop", "app"],
        "the configured sources replace the demo source"
    );
    let r = &node.router;
    let post = |headers: Vec<(&'static str, &'static str)>, body: String| async move {
        let mut all = vec![("content-type", "text/plain")];
        all.extend(headers);
        send(r, Method::POST, "/v1/batch", &all, Some(&body)).await
    };

    // Keys are optional by default (curl, servers); one that is given is checked.
    let (s, _, v) = post(vec![], batch("a", "m1", None)).await;
    assert_eq!(
        (s, v["accepted"].as_u64()),
        (StatusCode::OK, Some(1)),
        "{v}"
    );
    let (s, _, v) = post(vec![], batch("a", "m2", Some("wrong"))).await;
    assert_eq!(
        (s.as_u16(), v["code"].as_str()),
        (401, Some("invalid_write_key"))
    );
    // The body key (what sendBeacon and the tracker send), from an allowed page.
    let (s, h, v) = post(
        vec![("origin", "https://shop.example")],
        batch("a", "m3", Some("shop-key")),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        header(&h, "access-control-allow-origin"),
        Some("https://shop.example")
    );
    assert_eq!(
        header(&h, "access-control-expose-headers"),
        Some("Retry-After")
    );
    // A wildcard subdomain; the same key from another site is refused.
    let (s, _, _) = post(
        vec![("origin", "https://www.brand.example")],
        batch("a", "m4", Some("shop-key")),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, h, v) = post(
        vec![("origin", "https://evil.example")],
        batch("a", "m5", Some("shop-key")),
    )
    .await;
    assert_eq!(
        (s.as_u16(), v["code"].as_str()),
        (403, Some("origin_not_allowed"))
    );
    assert_eq!(header(&h, "access-control-allow-origin"), None);
    // A key allowed nowhere in browsers still works from servers (no Origin)...
    let basic = "Basic YXBwLWtleTo="; // base64("app-key:")
    let (s, _, _) = post(vec![("authorization", basic)], batch("a", "m6", None)).await;
    assert_eq!(s, StatusCode::OK);
    // ...and from the node's own pages (Origin equals Host), but not from other sites.
    let (s, _, _) = post(
        vec![
            ("authorization", basic),
            ("host", "kairos.example:7080"),
            ("origin", "http://kairos.example:7080"),
        ],
        batch("a", "m7", None),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = post(
        vec![("authorization", basic), ("origin", "https://shop.example")],
        batch("a", "m8", None),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "the key's own list counts, not any source's"
    );
    // The header wins over the body; a malformed header is refused.
    let (s, _, _) = post(
        vec![("authorization", basic)],
        batch("a", "m9", Some("wrong")),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = post(vec![("authorization", "Basic !!")], batch("a", "m10", None)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Single-event endpoints take `writeKey` in the event.
    let (s, _, v) = send(
        r,
        Method::POST,
        "/v1/track",
        &[("content-type", "application/json")],
        Some(r#"{"writeKey": "nope", "anonymousId": "a", "event": "x"}"#),
    )
    .await;
    assert_eq!(
        (s.as_u16(), v["code"].as_str()),
        (401, Some("invalid_write_key"))
    );
    let (_, _, profile) = send(r, Method::GET, "/v1/profiles?anonymous_id=a", &[], None).await;
    assert_eq!(
        profile["counters"]["product_views"], 6,
        "exactly the accepted requests were stored: {profile}"
    );
    node.shutdown();

    // With require_write_key, a request without a key is refused.
    let dir = TempDir::new("keys-required");
    let node = TestNode::start(
        dir.path(),
        &format!("[ingest]\nrequire_write_key = true\n{SOURCES}"),
    );
    let (s, _, v) = send(
        &node.router,
        Method::POST,
        "/v1/batch",
        &[("content-type", "application/json")],
        Some(&batch("a", "m1", None)),
    )
    .await;
    assert_eq!(
        (s.as_u16(), v["code"].as_str()),
        (401, Some("invalid_write_key"))
    );
    let (s, _, _) = send(
        &node.router,
        Method::POST,
        "/v1/batch",
        &[("content-type", "application/json")],
        Some(&batch("a", "m1", Some("app-key"))),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    node.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_and_read_routes() {
    let dir = TempDir::new("cors");
    let node = TestNode::start(dir.path(), SOURCES);
    let r = &node.router;
    let preflight = |path: &'static str, origin: &'static str| async move {
        let headers = [
            ("origin", origin),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization, content-type",
            ),
        ];
        send(r, Method::OPTIONS, path, &headers, None).await
    };
    let (s, h, _) = preflight("/v1/batch", "https://shop.example").await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(
        header(&h, "access-control-allow-origin"),
        Some("https://shop.example")
    );
    assert_eq!(
        header(&h, "access-control-allow-methods"),
        Some("POST, OPTIONS")
    );
    assert_eq!(
        header(&h, "access-control-allow-headers"),
        Some("Authorization, Content-Type")
    );
    assert!(header(&h, "access-control-max-age").is_some());
    assert!(header(&h, "vary").is_some_and(|v| v.contains("Origin")));
    let (s, h, v) = preflight("/v1/track", "https://evil.example").await;
    assert_eq!(
        (s.as_u16(), v["code"].as_str()),
        (403, Some("origin_not_allowed"))
    );
    assert_eq!(header(&h, "access-control-allow-origin"), None);
    let (s, h, _) = preflight("/v1/recommendations", "https://x.brand.example").await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(
        header(&h, "access-control-allow-methods"),
        Some("GET, OPTIONS")
    );

    // The widget's reads: allowed origins get the header, others do not.
    for (path, origin, allowed) in [
        (
            "/v1/recommendations?scenario=trending",
            "https://shop.example",
            true,
        ),
        (
            "/v1/recommendations?scenario=trending",
            "https://evil.example",
            false,
        ),
        ("/v1/items?limit=1", "https://shop.example", true),
    ] {
        let (s, h, _) = send(r, Method::GET, path, &[("origin", origin)], None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            header(&h, "access-control-allow-origin").is_some(),
            allowed,
            "{path} from {origin}"
        );
    }
    // Profiles are not for browsers of other sites.
    let (_, h, _) = send(
        r,
        Method::GET,
        "/v1/profiles?anonymous_id=a",
        &[("origin", "https://shop.example")],
        None,
    )
    .await;
    assert_eq!(header(&h, "access-control-allow-origin"), None);
    node.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracker_bundles_and_demo_shop_are_served() {
    let dir = TempDir::new("assets");
    let node = TestNode::start(dir.path(), "");
    let sdk = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../sdk/js");
    for (path, file) in [
        ("/sdk/kairos.js", "dist/kairos.js"),
        ("/sdk/kairos.mjs", "dist/kairos.mjs"),
    ] {
        let (s, h, body) = send(&node.router, Method::GET, path, &[], None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            header(&h, "content-type"),
            Some("text/javascript; charset=utf-8")
        );
        assert_eq!(header(&h, "access-control-allow-origin"), Some("*"));
        let on_disk = std::fs::read_to_string(sdk.join(file)).unwrap();
        assert_eq!(body.as_str(), Some(on_disk.as_str()), "{path} is {file}");
    }
    // The demo shop exists only with --demo.
    let (s, _, v) = send(&node.router, Method::GET, "/demo", &[], None).await;
    assert_eq!(
        (s.as_u16(), v["code"].as_str()),
        (404, Some("route_not_found"))
    );
    let demo = kairos_api::with_demo_shop(node.router.clone());
    for (path, content_type, needle) in [
        ("/demo", "text/html", "/sdk/kairos.js"),
        ("/demo/", "text/html", "data-kairos-slot"),
        ("/demo/item/42", "text/html", "/demo/shop.js"),
        ("/demo/checkout", "text/html", "<main"),
        ("/demo/shop.js", "text/javascript", "kairos.init"),
        ("/demo/shop.css", "text/css", ".poster"),
    ] {
        let (s, h, body) = send(&demo, Method::GET, path, &[], None).await;
        assert_eq!(s, StatusCode::OK, "{path}");
        assert!(header(&h, "content-type")
            .unwrap()
            .starts_with(content_type));
        assert!(body.as_str().unwrap().contains(needle), "{path}");
    }
    node.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue_listing() {
    let dir = TempDir::new("catalog");
    let node = TestNode::start(dir.path(), "");
    let items: Vec<Value> = (0..30)
        .map(|i| {
            let cat = if i % 3 == 0 { "games" } else { "books" };
            json!({"id": format!("i{i}"), "title": format!("Item number {i}"), "categories": [cat]})
        })
        .collect();
    node.put("/v1/items", &json!(items)).await;
    node.delete("/v1/items/i1").await;
    let views: Vec<Value> = (0..3)
        .map(|n| {
            json!({"type": "track", "event": "product_view", "anonymousId": "v",
                        "messageId": format!("v{n}"), "properties": {"product_id": "i27"}})
        })
        .collect();
    node.post("/v1/batch", &json!({ "batch": views })).await;

    let (s, page) = node.get("/v1/items").await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert_eq!(page["total"], 29, "deleted items are not listed");
    assert_eq!(page["limit"], 24);
    assert_eq!(page["items"].as_array().unwrap().len(), 24);
    assert_eq!(page["items"][0]["id"], "i27", "most popular first: {page}");
    assert_eq!(
        page["categories"],
        json!([{"name": "books", "items": 19}, {"name": "games", "items": 10}])
    );
    let (_, page) = node
        .get("/v1/items?category=games&sort=catalog&limit=3&offset=1")
        .await;
    let ids: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["i3", "i6", "i9"]);
    assert_eq!(page["total"], 10);
    let (_, page) = node.get("/v1/items?q=NUMBER%202").await;
    assert_eq!(
        page["total"], 11,
        "i2 and i20 to i29, case-insensitively: {page}"
    );
    for bad in ["limit=0", "limit=201", "offset=-1", "sort=random"] {
        let (s, v) = node.get(&format!("/v1/items?{bad}")).await;
        assert_eq!(
            (s.as_u16(), v["code"].as_str()),
            (400, Some("invalid_parameter")),
            "{bad}"
        );
    }
    node.shutdown();
}
