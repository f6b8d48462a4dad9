//! Files compiled into the binary: the browser tracker under `/sdk/` and the demo shop under
//! `/demo`.
//!
//! Compiling them in keeps Kairos one self-contained binary: a site loads the tracker from its
//! Kairos node, and `kairos serve --demo` needs nothing on disk. The bundles are built from
//! `sdk/js/src` and committed in `sdk/js/dist/`, so building Kairos needs no Node.js; the test
//! suite rebuilds them and fails when the committed ones are stale.
//!
//! The tracker files are public and carry `Access-Control-Allow-Origin: *`, because a page loading
//! `kairos.mjs` from another origin fetches it as a CORS module script. The demo shop is one HTML
//! page for every `/demo/...` path; its script renders the home, category, product, cart and
//! checkout views from `location.pathname`, and every view is a real page load, as on a classic
//! shop, so the tracker's page-lifecycle flushes are exercised on every click.

use std::sync::Arc;

use axum::http::header::{ACCESS_CONTROL_ALLOW_ORIGIN, CACHE_CONTROL, CONTENT_TYPE};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::AppState;

/// The classic-script tracker (the async snippet loads it).
pub const TRACKER_JS: &str = include_str!("../../../sdk/js/dist/kairos.js");
/// The ES-module tracker.
pub const TRACKER_MJS: &str = include_str!("../../../sdk/js/dist/kairos.mjs");
const DEMO_HTML: &str = include_str!("../../../sdk/js/demo/index.html");
const DEMO_JS: &str = include_str!("../../../sdk/js/demo/shop.js");
const DEMO_CSS: &str = include_str!("../../../sdk/js/demo/shop.css");

const JS: &str = "text/javascript; charset=utf-8";

fn tracker(body: &'static str) -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, JS),
            (CACHE_CONTROL, "public, max-age=300"),
            (ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        body,
    )
}

fn demo_file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, content_type), (CACHE_CONTROL, "no-cache")],
        body,
    )
}

/// `/sdk/kairos.js` and `/sdk/kairos.mjs`, served by every node.
pub(crate) fn sdk_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/sdk/kairos.js", get(|| async { tracker(TRACKER_JS) }))
        .route("/sdk/kairos.mjs", get(|| async { tracker(TRACKER_MJS) }))
}

/// Adds the demo shop under `/demo` (`kairos serve --demo`).
pub fn with_demo_shop(router: Router) -> Router {
    let page = || async { demo_file("text/html; charset=utf-8", DEMO_HTML) };
    router.merge(
        Router::new()
            .route("/demo", get(page))
            .route("/demo/", get(page))
            .route("/demo/{*view}", get(page))
            .route("/demo/shop.js", get(|| async { demo_file(JS, DEMO_JS) }))
            .route(
                "/demo/shop.css",
                get(|| async { demo_file("text/css; charset=utf-8", DEMO_CSS) }),
            ),
    )
}
