//! Golden replay: a fixed event stream gives saved profiles and recommendations, straight through
//! and with a restart in the middle (from a snapshot, and from the log alone).
//!
//! The expected output is `golden/replay.json`. After an intended behaviour change, regenerate it
//! with `KAIROS_UPDATE_GOLDEN=1 cargo test --test it golden` and review the diff.

use std::path::PathBuf;

use axum::http::StatusCode;
use serde_json::{json, Map, Value};

use kairos::demo::Rng;

use crate::support::{Backend, TempDir, TestNode};

const CATEGORIES: [&str; 4] = ["books", "music", "garden", "toys"];

fn golden_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/golden/replay.json")
}

/// The fixed stream: catalogue upserts, then batches of behaviour with identities stitched midway.
fn stream() -> (Value, Vec<Value>) {
    let items: Vec<Value> = (0..40)
        .map(|i| {
            json!({"id": format!("p{i}"), "title": format!("Product {i}"), "categories": [CATEGORIES[i % 4]],
                   "brand": format!("brand{}", i % 3), "price": 5.0 + i as f64, "in_stock": i != 7})
        })
        .collect();
    let mut rng = Rng::new(2024);
    let mut events = Vec::new();
    let mut ts = 1_700_000_000_000i64;
    for n in 0..1200 {
        let user = rng.below(60);
        let anon = format!("anon-{user}");
        ts += 1 + rng.below(90_000) as i64;
        let favourite = (user % 4) as usize;
        let cat = if rng.unit() < 0.75 {
            favourite
        } else {
            rng.below(4) as usize
        };
        let item = format!("p{}", cat + 4 * rng.zipf(10) as usize);
        let r = rng.unit();
        let mut e = if r < 0.70 {
            json!({"type": "track", "event": "product_view", "properties": {"product_id": item, "category": CATEGORIES[cat]}})
        } else if r < 0.82 {
            json!({"type": "track", "event": "add_to_cart", "properties": {"product_id": item, "quantity": 1}})
        } else if r < 0.86 {
            json!({"type": "track", "event": "purchase", "properties": {"order_id": format!("o{n}"), "products": [{"product_id": item, "price": 9.5}]}})
        } else if r < 0.90 {
            json!({"type": "track", "event": "remove_from_cart", "properties": {"product_id": item}})
        } else if r < 0.94 {
            json!({"type": "track", "event": "search", "properties": {"query": "q"}})
        } else if r < 0.97 {
            json!({"type": "page"})
        } else {
            json!({"type": "identify", "userId": format!("user-{user}")})
        };
        e["anonymousId"] = json!(anon);
        e["timestamp"] = json!(ts);
        e["messageId"] = json!(format!("g{n}"));
        if user.is_multiple_of(5) && e["type"] != "identify" {
            e["context"] = json!({"sessionId": format!("s{user}-{}", n / 300)});
        }
        events.push(e);
    }
    events.push(json!({"type": "alias", "previousId": "anon-1", "userId": "user-2", "messageId": "alias-1", "timestamp": ts + 1}));
    (json!(items), events)
}

async fn feed(node: &TestNode, events: &[Value]) {
    for chunk in events.chunks(100) {
        let (s, body) = node.post("/v1/batch", &json!({ "batch": chunk })).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(body["rejected"], json!([]), "{body}");
    }
}

fn round_scores(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("rec_id");
            for (k, x) in m.iter_mut() {
                if k == "score" {
                    if let Some(f) = x.as_f64() {
                        *x = json!(format!("{f:.5e}"));
                    }
                } else {
                    round_scores(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(round_scores),
        _ => {}
    }
}

/// Profiles and recommendations that the golden file pins.
async fn observe(node: &TestNode) -> Value {
    let mut profiles = Map::new();
    for who in [
        "anonymous_id=anon-3",
        "anonymous_id=anon-10",
        "user_id=user-2",
        "user_id=user-5",
        "anonymous_id=anon-1",
        "anonymous_id=anon-44",
    ] {
        let (s, p) = node.get(&format!("/v1/profiles?{who}")).await;
        assert_eq!(s, StatusCode::OK);
        profiles.insert(who.to_owned(), p);
    }
    let mut recs = Map::new();
    for q in [
        "scenario=for_you&anonymous_id=anon-3",
        "scenario=for_you&anonymous_id=anon-10&k=5",
        "scenario=for_you&user_id=user-2",
        "scenario=for_you&anonymous_id=never-seen",
        "scenario=similar&item_id=p0",
        "scenario=similar&item_id=p13&k=4",
        "scenario=bought_together&item_id=p1",
        "scenario=trending",
        "scenario=trending&category=garden&k=4",
        "scenario=recently_viewed&anonymous_id=anon-3",
        "scenario=for_you&anonymous_id=anon-3&max_per_category=1&min_price=8",
    ] {
        let (s, mut r) = node.get(&format!("/v1/recommendations?{q}")).await;
        assert_eq!(s, StatusCode::OK, "{q}: {r}");
        round_scores(&mut r);
        recs.insert(q.to_owned(), r);
    }
    json!({"profiles": profiles, "recommendations": recs})
}

fn compare_with_golden(actual: &Value) {
    let path = golden_path();
    let pretty = serde_json::to_string_pretty(actual).unwrap() + "\n";
    if std::env::var_os("KAIROS_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &pretty).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "{} is missing; create it with KAIROS_UPDATE_GOLDEN=1",
            path.display()
        )
    });
    let expected: Value = serde_json::from_str(&expected).unwrap();
    assert!(
        &expected == actual,
        "golden replay differs from {}:\n{pretty}",
        path.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_replay_straight_and_with_restarts() {
    golden_replay(Backend::Embedded).await;
}

/// The same stream through a Kafka-protocol broker, with the profiles in Redis, gives the same
/// saved state, and Redis holds every profile of it. One partition:
/// Kafka orders nothing across partitions, and the item statistics and the session model depend
/// (through decay and bounded neighbour lists) on the order in which different people's events
/// are applied; per-person state does not
/// (`profiles_do_not_depend_on_the_interleaving_of_partitions`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_replay_on_kafka_redis() {
    golden_replay(Backend::kafka_redis(1)).await;
}

/// On four partitions Kafka interleaves different people's events differently from the order
/// they were sent in, but each person's own events stay in order: every profile comes out as in
/// the golden file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_do_not_depend_on_the_interleaving_of_partitions() {
    let backend = Backend::kafka(4);
    let (items, events) = stream();
    let dir = TempDir::new("golden-partitions");
    let node = TestNode::start_on(&backend, dir.path(), "");
    node.put("/v1/items", &items).await;
    feed(&node, &events).await;
    let actual = observe(&node).await;
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(golden_path()).unwrap()).unwrap();
    assert_eq!(actual["profiles"], expected["profiles"]);
    node.shutdown();
}

async fn golden_replay(backend: Backend) {
    let (items, events) = stream();
    let half = events.len() / 2;

    // Straight through.
    let dir = TempDir::new("golden-a");
    let node = TestNode::start_on(&backend, dir.path(), "");
    node.put("/v1/items", &items).await;
    feed(&node, &events).await;
    let straight = observe(&node).await;
    compare_with_golden(&straight);
    if let Some(redis) = backend.redis() {
        redis.assert_holds_the_profiles_of(&node);
    }
    // The same node after a restart from its final snapshot.
    node.shutdown();
    let node = TestNode::start_on(&backend, dir.path(), "");
    assert_eq!(
        observe(&node).await,
        straight,
        "restart from a snapshot changed the state"
    );
    node.shutdown();

    // A restart in the middle, resuming from the snapshot written at shutdown.
    let dir = TempDir::new("golden-b");
    let node = TestNode::start_on(&backend, dir.path(), "");
    node.put("/v1/items", &items).await;
    feed(&node, &events[..half]).await;
    node.shutdown();
    let node = TestNode::start_on(&backend, dir.path(), "");
    feed(&node, &events[half..]).await;
    assert_eq!(
        observe(&node).await,
        straight,
        "restart midway (snapshot) differs"
    );
    node.shutdown();

    // A restart in the middle with the snapshots lost: the state is rebuilt from the log alone.
    let dir = TempDir::new("golden-c");
    let node = TestNode::start_on(&backend, dir.path(), "");
    node.put("/v1/items", &items).await;
    feed(&node, &events[..half]).await;
    node.shutdown();
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    let node = TestNode::start_on(&backend, dir.path(), "");
    feed(&node, &events[half..]).await;
    assert_eq!(
        observe(&node).await,
        straight,
        "restart midway (log replay) differs"
    );
    if let Some(redis) = backend.redis() {
        redis.assert_holds_the_profiles_of(&node);
    }
    // Replaying the same batches again changes nothing: every messageId is a duplicate.
    feed(&node, &events[..200]).await;
    assert_eq!(
        observe(&node).await,
        straight,
        "retried batches were counted twice"
    );
    node.shutdown();
}
