//! Stateless API replicas (`kairos api`, `crates/kairos-api/src/replica.rs`): the model built
//! from the updates a `kairos process` replica publishes, the profiles read from Redis, answers
//! cached until a profile they use changes.
//!
//! One topic with a `kairos ingest` node, a `kairos process` replica, a `kairos api` replica,
//! and beside them a `kairos serve` node reading the same topic with everything in its own
//! memory: the single-node reference. On one partition the replica's answers must equal the
//! reference's, score for score; then the cache is checked against the events that change it.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::group::{metric, wait_until};
use crate::support::{
    assert_states_equal, http, KafkaBroker, Redis, RedisCluster, RedisServer, ScaleOut, Server,
    TempDir,
};

fn get(addr: &str, path: &str) -> (u16, Value) {
    let (status, body) = http(addr, "GET", path, None, Duration::from_secs(10)).unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn post(addr: &str, path: &str, body: &Value) {
    let (status, answer) = http(
        addr,
        "POST",
        path,
        Some(&serde_json::to_vec(body).unwrap()),
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
}

/// An answer's items as (id, score rounded to 1e-5), in the order served.
fn items(answer: &Value) -> Vec<(String, i64)> {
    answer["items"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_owned(),
                (i["score"].as_f64().unwrap() * 1e5).round() as i64,
            )
        })
        .collect()
}

fn ids(answer: &Value) -> Vec<String> {
    items(answer).into_iter().map(|(id, _)| id).collect()
}

/// The requests compared between the replica and the single node.
fn probes(users: &[String], products: &[String]) -> Vec<String> {
    let mut probes = vec!["/v1/recommendations?scenario=trending&count=30".to_owned()];
    for u in users {
        for scenario in ["for_you", "recently_viewed"] {
            probes.push(format!(
                "/v1/recommendations?scenario={scenario}&user_id={u}&count=30"
            ));
        }
    }
    for p in products.iter().step_by(3) {
        for scenario in ["similar", "bought_together"] {
            probes.push(format!(
                "/v1/recommendations?scenario={scenario}&item_id={p}&count=30"
            ));
        }
    }
    probes
}

/// Deterministic traffic: a catalogue, then sessions of viewing, carting and buying.
fn traffic(users: &[String], products: &[String]) -> (Vec<Value>, Vec<Value>) {
    let catalogue: Vec<Value> = products
        .iter()
        .enumerate()
        .map(|(n, p)| json!({"id": p, "title": format!("Product {n}"), "categories": [format!("c{}", n % 4)], "price": 5.0 + n as f64}))
        .collect();
    let mut events = Vec::new();
    let mut rng = kairos::demo::Rng::new(7);
    for n in 0..600u64 {
        let user = &users[rng.below(users.len() as u64) as usize];
        let product = &products[rng.below(products.len() as u64) as usize];
        let ts = 1_700_000_000_000i64 + n as i64 * 1_000;
        let session = format!("{user}-s{}", n / 150);
        let event = match rng.below(10) {
            0..=6 => "product_view",
            7 | 8 => "add_to_cart",
            _ => "purchase",
        };
        let properties = if event == "purchase" {
            json!({"products": [{"product_id": product, "price": 10.0}], "revenue": 10.0})
        } else {
            json!({"product_id": product})
        };
        events.push(
            json!({"type": "track", "event": event, "messageId": format!("m{n}"),
            "userId": user, "timestamp": ts, "context": {"sessionId": session},
            "properties": properties}),
        );
    }
    (catalogue, events)
}

#[test]
fn an_api_replica_serves_what_a_single_node_serves_and_its_cache_follows_the_events() {
    replica_suite(Redis::Single(RedisServer::start()));
}

/// The same with the profiles in a Redis Cluster of three masters: a person's keys are read
/// across the masters, and the change channel reaches the replica from every one.
#[test]
fn an_api_replica_on_redis_cluster_serves_what_a_single_node_serves() {
    replica_suite(Redis::Cluster(RedisCluster::start()));
}

fn replica_suite(mut redis: Redis) {
    let broker = KafkaBroker::start();
    let root = TempDir::new("replica");
    let scale = ScaleOut::new(&broker, &root, 1);
    // Lists recomputed on every change, so that answers never depend on timing.
    let mut shared = scale.env.clone();
    shared.push(("KAIROS_MODEL__TRENDING_REFRESH_MS".into(), "0".into()));
    let mut with_redis = scale.with_redis(&redis);
    with_redis.extend([
        (
            "KAIROS_MODEL__TRENDING_REFRESH_MS".to_owned(),
            "0".to_owned(),
        ),
        // Only an invalidation can refresh a cached answer in this test.
        ("KAIROS_API__CACHE_TTL_MS".to_owned(), "3600000".to_owned()),
    ]);
    let dir = |name: &str| scale.dir(name);
    let ingest = Server::start("ingest", &dir("ingest"), &shared);
    let process = Server::start("process", &dir("process"), &with_redis);
    let api = Server::start("api", &dir("api"), &with_redis);
    let single = Server::start("serve", &dir("single"), &shared);
    wait_until(
        "the processor replica owns the partition",
        Duration::from_secs(60),
        || metric(&process.addr, "kairos_group_partitions_owned") == Some(1),
    );

    // 1. The same answers as the single node, score for score.
    let users: Vec<String> = (0..12).map(|n| format!("user-{n}")).collect();
    let products: Vec<String> = (0..24).map(|n| format!("p{n}")).collect();
    let (catalogue, events) = traffic(&users, &products);
    let (status, body) = http(
        &ingest.addr,
        "PUT",
        "/v1/items",
        Some(&serde_json::to_vec(&json!({"items": catalogue})).unwrap()),
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    for chunk in events.chunks(50) {
        post(&ingest.addr, "/v1/batch", &json!({"batch": chunk}));
    }
    let probes = probes(&users, &products);
    let answers = |addr: &str| -> Vec<Vec<(String, i64)>> {
        probes
            .iter()
            .map(|p| {
                let (status, answer) = get(addr, p);
                assert_eq!(status, 200, "{p}: {answer}");
                items(&answer)
            })
            .collect()
    };
    // Every event came through the ingest node: wait until the single node holds all of them
    // (24 items and 600 events), and the replica's model the updates of all of them, which the
    // processor publishes after their profiles are in Redis.
    let entries = 624;
    wait_until(
        "the single node applied every entry",
        Duration::from_secs(60),
        || metric(&single.addr, "kairos_state_applied_seq") == Some(entries),
    );
    let caught_up = |addr: &str| {
        wait_until(
            "the API replica's model reflects every entry",
            Duration::from_secs(60),
            || metric(addr, "kairos_model_entries_applied") == Some(entries),
        )
    };
    caught_up(&api.addr);
    let expected = answers(&single.addr);
    assert!(expected.iter().filter(|a| !a.is_empty()).count() > probes.len() / 2);
    let same_as_single = |addr: &str| {
        let served = answers(addr);
        for ((p, s), e) in probes.iter().zip(&served).zip(&expected) {
            assert_eq!(
                s, e,
                "{p}: the API replica (left) and the single node (right) differ"
            );
        }
    };
    same_as_single(&api.addr);
    // Events go to the ingest role: the replica says so.
    let (status, body) = http(
        &api.addr,
        "POST",
        "/v1/batch",
        Some(&serde_json::to_vec(&json!({"batch": []})).unwrap()),
        Duration::from_secs(10),
    )
    .unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, &body["code"]), (404, &json!("route_not_found")));
    assert!(
        body["message"].as_str().unwrap().contains("kairos api"),
        "{body}"
    );
    // A replica started later, with no model saved in Redis yet (the replicas above save every
    // five minutes), builds the same model from the start of the model topic.
    let late = Server::start("api", &dir("late-api"), &with_redis);
    caught_up(&late.addr);
    assert_eq!(metric(&late.addr, "kairos_model_restored_entries"), Some(0));
    same_as_single(&late.addr);
    let read_from_topic = metric(&late.addr, "kairos_processor_entries_applied_total").unwrap();
    drop(late);
    // A replica that saves its model in Redis every second, and one started after its save: it
    // loads the save, reads the model topic only from where the save ends, and serves the same.
    let mut saving = with_redis.clone();
    saving.push(("KAIROS_API__MODEL_SAVE_SECS".into(), "1".into()));
    let saver = Server::start("api", &dir("saving-api"), &saving);
    caught_up(&saver.addr);
    wait_until(
        "the model is saved in Redis",
        Duration::from_secs(30),
        || metric(&saver.addr, "kairos_model_saved_entries") == Some(entries),
    );
    let restored = Server::start("api", &dir("restored-api"), &with_redis);
    caught_up(&restored.addr);
    assert_eq!(
        metric(&restored.addr, "kairos_model_restored_entries"),
        Some(entries),
        "the replica did not start from the saved model"
    );
    let read_after_save = metric(&restored.addr, "kairos_processor_entries_applied_total").unwrap();
    assert!(
        read_after_save < read_from_topic,
        "a replica starting from the save read {read_after_save} model-topic records, one \
         building from the topic {read_from_topic}"
    );
    eprintln!(
        "model topic records read: {read_from_topic} building from the topic, \
         {read_after_save} after loading the save"
    );
    same_as_single(&restored.addr);
    drop((saver, restored));
    // Served again, from the cache now: still the same.
    let hits_before = metric(&api.addr, "kairos_api_cache_hits_total").unwrap();
    assert_eq!(answers(&api.addr), expected);
    assert_eq!(
        metric(&api.addr, "kairos_api_cache_hits_total").unwrap() - hits_before,
        probes.len() as i64,
        "every repeated request is a cache hit"
    );

    // 2. An event changes a cached answer: the answer follows (the TTL is an hour, so only the
    // invalidation can make it). Measured from the event's acknowledgement to the first answer
    // that reflects it.
    let mut latencies = Vec::new();
    for n in 0..15 {
        let user = &users[n % users.len()];
        let path = format!("/v1/recommendations?scenario=recently_viewed&user_id={user}&count=5");
        let product = &products[(n * 7 + 3) % products.len()];
        let before = get(&api.addr, &path).1;
        if ids(&before).first() == Some(product) {
            continue;
        }
        let hits = metric(&api.addr, "kairos_api_cache_hits_total").unwrap();
        assert_eq!(get(&api.addr, &path).1["items"], before["items"]);
        assert_eq!(
            metric(&api.addr, "kairos_api_cache_hits_total").unwrap(),
            hits + 1
        );
        let ts = 1_700_001_000_000i64 + n as i64 * 1_000;
        post(
            &ingest.addr,
            "/v1/track",
            &json!({"type": "track", "event": "product_view", "messageId": format!("late-{n}"),
                "userId": user, "timestamp": ts, "properties": {"product_id": product}}),
        );
        let acked = Instant::now();
        loop {
            if ids(&get(&api.addr, &path).1).first() == Some(product) {
                latencies.push(acked.elapsed());
                break;
            }
            assert!(
                acked.elapsed() < Duration::from_secs(20),
                "the cached answer of {user} never reflected the event"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    latencies.sort();
    assert!(latencies.len() >= 10);
    eprintln!(
        "api replica: acknowledged event -> changed cached answer, {} samples: p50 {:?}, max {:?}",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies.last().unwrap()
    );

    // 3. Identities linked by the processor group are merged when read: a visitor's views show
    // under the user they identify as, and the user's under the visitor.
    for (n, product) in ["p1", "p2"].into_iter().enumerate() {
        post(
            &ingest.addr,
            "/v1/track",
            &json!({"type": "track", "event": "product_view", "messageId": format!("visit-{n}"),
                "anonymousId": "visitor-9", "timestamp": 1_700_002_000_000i64 + n as i64,
                "properties": {"product_id": product}}),
        );
    }
    post(
        &ingest.addr,
        "/v1/identify",
        &json!({"type": "identify", "messageId": "who", "userId": "late-user",
            "anonymousId": "visitor-9", "timestamp": 1_700_002_000_010i64}),
    );
    post(
        &ingest.addr,
        "/v1/track",
        &json!({"type": "track", "event": "product_view", "messageId": "after", "userId": "late-user",
            "anonymousId": "visitor-9", "timestamp": 1_700_002_000_020i64,
            "properties": {"product_id": "p3"}}),
    );
    for who in ["user_id=late-user", "anonymous_id=visitor-9"] {
        let path = format!("/v1/recommendations?scenario=recently_viewed&{who}&count=10");
        wait_until(
            &format!("{who} is served the linked profiles' views"),
            Duration::from_secs(20),
            || {
                let mut seen = ids(&get(&api.addr, &path).1);
                seen.sort();
                seen == ["p1", "p2", "p3"]
            },
        );
        let (status, profile) = get(&api.addr, &format!("/v1/profiles?{who}"));
        assert_eq!(status, 200);
        assert_eq!(profile["key"], "u:late-user");
        assert_eq!(profile["counters"]["product_views"], 3, "{profile}");
    }

    // 4. A catalogue change reaches cached answers at once: a deleted item leaves them.
    let path = "/v1/recommendations?scenario=trending&count=30";
    let cached = ids(&get(&api.addr, path).1);
    let gone = cached.first().expect("trending items").clone();
    let (status, _) = http(
        &ingest.addr,
        "DELETE",
        &format!("/v1/items/{gone}"),
        None,
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(status, 200);
    wait_until(
        "the deleted item leaves the cached answer",
        Duration::from_secs(20),
        || !ids(&get(&api.addr, path).1).contains(&gone),
    );

    // 5. Without Redis, a read that needs a profile fails with a clear error.
    let Redis::Single(server) = &mut redis else {
        return;
    };
    server.kill();
    let (status, answer) = get(
        &api.addr,
        "/v1/recommendations?scenario=for_you&user_id=never-cached",
    );
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["code"], "state_unavailable");
    assert_eq!(answer["type"], "system");
    assert!(answer["message"].as_str().unwrap().contains("Redis"));
    assert!(answer["link"]
        .as_str()
        .unwrap()
        .ends_with("#state_unavailable"));
    drop((ingest, process, api, single));
}

/// A model saved in Redis in many chunks loads back whole, with the positions the snapshot
/// format leaves out; a newer save replaces it and leaves no chunk of it behind.
#[test]
fn a_model_saved_in_redis_in_chunks_loads_back_whole() {
    use kairos_state::redis_mirror::RedisProfiles;
    use kairos_state::redis_model::{load, save_in_chunks, Prepared};
    use kairos_state::{LogPosition, RedisSettings, State, StateConfig};
    use kairos_types::{normalize_json, LogEntry, RequestContext};

    let redis = RedisServer::start();
    let mut conn = RedisProfiles::new(&redis.url(), RedisSettings::default()).unwrap();
    assert!(load(&mut conn).unwrap().is_none(), "nothing saved yet");
    let mut state = State::new(StateConfig::default());
    for n in 0..200u64 {
        let raw = format!(
            r#"{{"type":"track","event":"product_view","anonymousId":"a{}","messageId":"m{n}","properties":{{"product_id":"p{}"}}}}"#,
            n % 7,
            n % 11
        );
        let req = RequestContext {
            received_at: 1_000 + n as i64,
            ..Default::default()
        };
        let pos = LogPosition {
            partition: 0,
            offset: n,
            seq: n + 1,
        };
        state.apply(pos, &LogEntry::Event(normalize_json(&raw, &req).unwrap()));
    }
    state.model_applied = vec![120, 0, 80];
    let keys = |conn: &mut redis::Connection| -> Vec<String> {
        redis::cmd("KEYS")
            .arg("kairos:model:*")
            .query(conn)
            .unwrap()
    };
    let mut raw = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let first = save_in_chunks(&mut conn, &Prepared::of(&state).unwrap(), 97).unwrap();
    assert!(first.chunks > 10, "{first:?}");
    assert_eq!(first.entries, 200);
    let loaded = load(&mut conn).unwrap().expect("a save");
    assert_eq!(loaded.bytes, first.bytes);
    assert_states_equal(&loaded.state, &state);
    assert_eq!(loaded.state.model_applied, state.model_applied);
    assert_eq!(
        keys(&mut raw).len() as u64,
        first.chunks + 1,
        "chunks and manifest"
    );
    // A newer save: the older one's chunks are gone.
    state.model_applied[1] = 5;
    let second = save_in_chunks(&mut conn, &Prepared::of(&state).unwrap(), 1000).unwrap();
    assert_eq!(keys(&mut raw).len() as u64, second.chunks + 1);
    assert_eq!(
        load(&mut conn).unwrap().unwrap().state.model_applied,
        vec![120, 5, 80]
    );
    // A corrupt save is refused, not used.
    let chunk: String = keys(&mut raw)
        .into_iter()
        .find(|k| k.ends_with(":0"))
        .unwrap();
    let _: () = redis::cmd("SETRANGE")
        .arg(&chunk)
        .arg(30)
        .arg("xx")
        .query(&mut raw)
        .unwrap();
    let refused = load(&mut conn).err().expect("a corrupt save is an error");
    assert!(refused.contains("checksum"), "{refused}");
}
