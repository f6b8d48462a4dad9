//! The profiles in Redis (`state = "redis://…"`, `"redis-cluster://…"`), against real
//! `redis-server` processes of each test's own: the write script's checkpoint fence, a Redis
//! restarted empty, a node replaying its log, Redis Cluster, the TTL, the change channel and the
//! memory figure. The black-box API suite and the crash test also run with Redis (`api`, `crash`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use kairos_state::portable::{PortableProfile, StoredProfile};
use kairos_state::profile::Profile;

use kairos::node::Node;

use crate::support::{
    free_port, http, ids, test_config, Redis, RedisCluster, RedisServer, SelfSigned, Server,
    TempDir, TestNode, TlsProxy,
};

fn view(user: &str, item: &str, ts: i64, id: &str) -> Value {
    json!({"type": "track", "event": "product_view", "userId": user, "messageId": id,
           "timestamp": ts, "properties": {"product_id": item, "category": format!("cat-{}", &item[..1])}})
}

fn profile_with_events(events: u64) -> StoredProfile {
    let mut profile = Profile::default();
    profile.counters.events = events;
    StoredProfile::Profile(Box::new(PortableProfile {
        profile,
        items: vec![],
        categories: vec![],
        brands: vec![],
    }))
}

fn metric(text: &str, name: &str) -> i64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// Waits until `node` applied every event of users `u0` … `u{users-1}` (read-your-writes), and
/// Redis holds their profiles.
async fn settle(node: &TestNode, redis: &Redis, users: usize) {
    for u in 0..users {
        let (s, _) = node.get(&format!("/v1/profiles?user_id=u{u}")).await;
        assert_eq!(s, 200);
    }
    redis.assert_holds_the_profiles_of(node);
}

/// Posts `batches` batches of 100 views by `users` users, then [`settle`]s.
async fn load(node: &TestNode, redis: &Redis, users: usize, batches: usize) {
    for n in 0..batches {
        let (s, resp) = node.post("/v1/batch", &traffic(users, 100, n * 100)).await;
        assert_eq!(s, 200, "{resp}");
    }
    settle(node, redis, users).await;
}

/// A node on the embedded log with its profiles in `redis`.
fn node_on(redis: &Redis, dir: &std::path::Path, overrides: &str) -> TestNode {
    TestNode::start(dir, &format!("state = \"{}\"\n{overrides}", redis.url()))
}

/// The write script replaces a profile only with one at a checkpoint that dominates the stored
/// one: never behind on a partition, ahead on at least one.
#[test]
fn a_profile_is_replaced_only_by_a_newer_one() {
    let server = Redis::Single(RedisServer::start());
    let mut redis = server.profiles();
    let key: Box<str> = "u:fenced".into();
    let write = |redis: &mut kairos_state::redis_mirror::RedisProfiles, events, offsets: &[u64]| {
        let r = redis
            .write(&[(key.clone(), profile_with_events(events))], offsets, &[])
            .unwrap();
        assert_eq!(r.written + r.stale, 1);
        r.written == 1
    };
    let stored = |redis: &mut kairos_state::redis_mirror::RedisProfiles| redis.read(&key).unwrap();

    assert!(write(&mut redis, 5, &[5]), "nothing stored yet");
    assert!(!write(&mut redis, 3, &[3]), "older");
    assert!(!write(&mut redis, 9, &[5]), "the same checkpoint again");
    assert_eq!(stored(&mut redis), Some((profile_with_events(5), vec![5])));
    assert!(write(&mut redis, 6, &[6]), "newer");
    assert!(
        write(&mut redis, 7, &[6, 1]),
        "ahead on a partition the stored one lacks"
    );
    assert!(
        !write(&mut redis, 8, &[7, 0]),
        "ahead on one partition, behind on another"
    );
    assert!(
        !write(&mut redis, 8, &[7]),
        "missing a partition the stored one has progress on"
    );
    assert!(
        write(&mut redis, 9, &[7, 1]),
        "ahead on one, level on the other"
    );
    assert_eq!(
        stored(&mut redis),
        Some((profile_with_events(9), vec![7, 1]))
    );
}

fn traffic(users: usize, events: usize, from: usize) -> Value {
    let batch: Vec<Value> = (from..from + events)
        .map(|i| {
            let item = format!("{}{}", ["a", "b", "c"][i % 3], i % 7);
            view(
                &format!("u{}", i % users),
                &item,
                1_000 + i as i64,
                &format!("m{i}"),
            )
        })
        .collect();
    json!({ "batch": batch })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_is_refilled_from_the_state() {
    let mut redis = Redis::Single(RedisServer::start());
    let dir = TempDir::new("redis-restart");
    let node = node_on(&redis, dir.path(), "");
    let (s, resp) = node.post("/v1/batch", &traffic(12, 60, 0)).await;
    assert_eq!(s, 200, "{resp}");
    settle(&node, &redis, 12).await;
    let read_all = |redis: &Redis| -> Vec<_> {
        let mut client = redis.profiles();
        (0..12)
            .map(|u| client.read(&format!("u:u{u}")).unwrap())
            .collect()
    };
    let before = read_all(&redis);
    let (_, rec_before) = node.get("/v1/recommendations?user_id=u3&k=5").await;

    let Redis::Single(server) = &mut redis else {
        unreachable!()
    };
    server.restart_empty();
    assert_eq!(server.cli(&["DBSIZE"]).trim(), "0");
    redis.assert_holds_the_profiles_of(&node);
    assert_eq!(
        before,
        read_all(&redis),
        "the same profiles at the same checkpoint"
    );
    let (_, rec_after) = node.get("/v1/recommendations?user_id=u3&k=5").await;
    assert!(!ids(&rec_after).is_empty());
    assert_eq!(ids(&rec_before), ids(&rec_after));
    let (_, metrics) = node.get("/metrics").await;
    let metrics = metrics.as_str().unwrap();
    assert_eq!(
        metric(metrics, "kairos_redis_resyncs_total"),
        2,
        "{metrics}"
    );
    assert_eq!(metric(metrics, "kairos_redis_up"), 1);
    node.shutdown();
}

/// While Redis does not answer, the node keeps acknowledging and applying events; the profiles
/// changed meanwhile are written once Redis answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_changed_while_redis_hangs_are_written_when_it_answers() {
    let redis = Redis::Single(RedisServer::start());
    let dir = TempDir::new("redis-hang");
    let node = node_on(&redis, dir.path(), "[redis]\ntimeout_ms = 200\n");
    load(&node, &redis, 8, 1).await;
    let Redis::Single(server) = &redis else {
        unreachable!()
    };
    server.freeze(true);
    let (s, resp) = node.post("/v1/batch", &traffic(8, 100, 100)).await;
    assert_eq!(s, 200, "ingest does not wait for Redis: {resp}");
    for u in 0..8 {
        let (s, _) = node.get(&format!("/v1/profiles?user_id=u{u}")).await;
        assert_eq!(s, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = node.get("/metrics").await;
        let metrics = metrics.as_str().unwrap().to_owned();
        if metric(&metrics, "kairos_redis_up") == 0 {
            assert!(metric(&metrics, "kairos_redis_errors_total") > 0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hang was not noticed: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.freeze(false);
    redis.assert_holds_the_profiles_of(&node);
    // The writes a frozen Redis ran when it woke up may have done it: the node notices that
    // Redis answers again on its next round trip, after its backoff.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (_, metrics) = node.get("/metrics").await;
        let metrics = metrics.as_str().unwrap().to_owned();
        if metric(&metrics, "kairos_redis_up") == 1 {
            break metrics;
        }
        assert!(Instant::now() < deadline, "Redis never counted as up again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Redis kept its data: no profile needed a full rewrite.
    assert_eq!(metric(&metrics, "kairos_redis_resyncs_total"), 1);
    node.shutdown();
}

/// Redis (durable) is down when the node stops, so the node's last changes never reach it. The
/// next start writes every profile, and Redis, back with its old data, is current again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_missed_redis_at_shutdown_are_written_at_the_next_start() {
    let mut redis = Redis::Single(RedisServer::start_durable());
    let dir = TempDir::new("redis-down-at-stop");
    let node = node_on(&redis, dir.path(), "[redis]\ntimeout_ms = 200\n");
    load(&node, &redis, 6, 1).await;
    let Redis::Single(server) = &mut redis else {
        unreachable!()
    };
    // The marker that Redis holds every profile follows the first full pass (it is checked every
    // second): killed before it, Redis would come back without it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.cli(&["EXISTS", "kairos:meta"]).trim() != "1" {
        assert!(Instant::now() < deadline, "the node never set the marker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill();
    let (s, _) = node.post("/v1/batch", &traffic(6, 100, 100)).await;
    assert_eq!(s, 200);
    for u in 0..6 {
        let (s, _) = node.get(&format!("/v1/profiles?user_id=u{u}")).await;
        assert_eq!(s, 200);
    }
    node.shutdown();
    server.start_again();
    assert!(
        server.cli(&["EXISTS", "kairos:meta"]).trim() == "1",
        "Redis came back with its data"
    );
    let node = node_on(&redis, dir.path(), "[redis]\ntimeout_ms = 200\n");
    redis.assert_holds_the_profiles_of(&node);
    node.shutdown();
    // Stopped cleanly with Redis up: the next start has nothing to catch up on.
    let node = node_on(&redis, dir.path(), "");
    let (_, metrics) = node.get("/metrics").await;
    let metrics = metrics.as_str().unwrap();
    assert_eq!(
        metric(metrics, "kairos_redis_profiles_written_total"),
        0,
        "{metrics}"
    );
    node.shutdown();
}

/// A node that lost its snapshots replays its whole log: on the way it holds older versions of
/// the profiles, and Redis (which has the newer ones) refuses them; at the end both agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaying_node_never_puts_older_profiles_over_newer_ones() {
    let redis = Redis::Single(RedisServer::start());
    let dir = TempDir::new("redis-replay");
    let node = node_on(&redis, dir.path(), "");
    load(&node, &redis, 5, 20).await;
    let before = redis
        .profiles()
        .read("u:u1")
        .unwrap()
        .expect("u1 is in Redis");
    node.shutdown();

    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    // Watch u1 in Redis while the node restarts and replays: it must never go back.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, mut client) = (stop.clone(), redis.profiles());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Acquire) {
                seen.push(client.read("u:u1").unwrap().expect("u1 stays in Redis"));
                std::thread::sleep(Duration::from_millis(1));
            }
            seen
        })
    };
    // Flush often and in small pipelines, so that writes happen while the log replays.
    let node = node_on(
        &redis,
        dir.path(),
        "[redis]\nflush_interval_ms = 1\nbatch = 1\n",
    );
    redis.assert_holds_the_profiles_of(&node);
    stop.store(true, Ordering::Release);
    let seen = watcher.join().unwrap();
    assert!(seen.len() > 1);
    if let Some(other) = seen.iter().find(|s| **s != before) {
        panic!("Redis went back to an older u1:\n{other:?}\ninstead of\n{before:?}");
    }
    // Redis held the same profiles before the node wrote anything, so the refusals may come
    // after the check above returned: wait for them.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, metrics) = node.get("/metrics").await;
        let metrics = metrics.as_str().unwrap();
        if metric(metrics, "kairos_redis_profiles_stale_total") >= 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "every replayed profile was refused, Redis holding it at the same checkpoint: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.shutdown();
}

/// Three masters: the profiles spread over the slots (each key tagged by its profile key) and
/// every one reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_spread_over_a_redis_cluster() {
    let redis = Redis::Cluster(RedisCluster::start());
    let dir = TempDir::new("redis-cluster");
    let node = node_on(&redis, dir.path(), "");
    load(&node, &redis, 150, 4).await;
    let Redis::Cluster(cluster) = &redis else {
        unreachable!()
    };
    let sizes: Vec<u64> = cluster
        .nodes
        .iter()
        .map(|n| n.cli(&["DBSIZE"]).trim().parse().unwrap())
        .collect();
    assert!(
        sizes.iter().all(|&n| n > 10),
        "keys on every master: {sizes:?}"
    );
    // The hash tag is the profile key.
    let slot = |key: &str| cluster.nodes[0].cli(&["CLUSTER", "KEYSLOT", key]);
    assert_eq!(slot("kairos:{u:u7}"), slot("u:u7"));
    node.shutdown();
}

/// TTL, the change channel, and Redis memory per profile in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn written_profiles_expire_are_announced_and_measured() {
    let server = RedisServer::start();
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let mut pubsub = conn.as_pubsub();
    pubsub.subscribe("kairos:changed").unwrap();
    pubsub
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let redis = Redis::Single(server);
    let dir = TempDir::new("redis-ttl");
    let node = node_on(&redis, dir.path(), "[redis]\nprofile_ttl_secs = 1234\n");
    let (s, _) = node
        .post(
            "/v1/batch",
            &json!({"batch": [view("watched", "a1", 5, "w1")]}),
        )
        .await;
    assert_eq!(s, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let message = pubsub.get_message().expect("a change is announced");
        if message.get_payload::<String>().unwrap() == "kairos:{u:watched}" {
            break;
        }
        assert!(Instant::now() < deadline);
    }
    let Redis::Single(server) = &redis else {
        unreachable!()
    };
    let ttl: u64 = server
        .cli(&["TTL", "kairos:{u:watched}"])
        .trim()
        .parse()
        .unwrap();
    assert!((1200..=1234).contains(&ttl), "ttl {ttl}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = node.get("/metrics").await;
        let bytes = metric(metrics.as_str().unwrap(), "kairos_redis_profile_bytes");
        if bytes > 0 {
            assert!(bytes < 4096, "{bytes} bytes for a one-event profile");
            break;
        }
        assert!(Instant::now() < deadline, "no memory figure");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.shutdown();
}

/// Redis over TLS (`rediss://` and `[redis] tls_ca_file`): a node writes every profile through a
/// TLS endpoint (see `TlsProxy`) to the Redis behind it, and one that trusts another CA refuses
/// to start, naming the certificate it could not verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_reach_redis_over_tls() {
    let redis = Redis::Single(RedisServer::start());
    let Redis::Single(server) = &redis else {
        unreachable!()
    };
    let proxy = TlsProxy::start(free_port(), &format!("127.0.0.1:{}", server.port));
    let tls = |ca: &std::path::Path| {
        format!(
            "state = \"rediss://127.0.0.1:{}\"\n[redis]\ntls_ca_file = \"{}\"\n",
            proxy.port,
            ca.display()
        )
    };
    let dir = TempDir::new("redis-tls");
    let node = TestNode::start(dir.path(), &tls(&proxy.ca));
    load(&node, &redis, 6, 2).await;
    redis.assert_holds_the_profiles_of(&node);
    node.shutdown();

    let other = TlsProxy::start(free_port(), &format!("127.0.0.1:{}", server.port));
    let dir = TempDir::new("redis-tls-other-ca");
    let refused = match Node::start(&test_config(dir.path(), &tls(&other.ca))) {
        Ok(_) => panic!("a node trusting another CA started"),
        Err(e) => e,
    };
    assert!(refused.contains("certificate verify failed"), "{refused}");
}

/// Redis Cluster over TLS (`rediss-cluster://`): its client trusts the system's CAs, here the
/// test's own through OpenSSL's `SSL_CERT_FILE`, given to a `kairos serve` child so that nothing
/// else in the test process changes. Every user's views reach the cluster, which tells a TLS
/// client its nodes' TLS ports.
#[test]
fn profiles_reach_a_redis_cluster_over_tls() {
    let cert = SelfSigned::new();
    let cluster = RedisCluster::start_tls(&cert);
    let dir = TempDir::new("redis-cluster-tls");
    let env = vec![
        ("KAIROS_STATE".to_string(), cluster.tls_url()),
        ("SSL_CERT_FILE".to_string(), cert.cert.display().to_string()),
    ];
    let node = Server::start("serve", dir.path(), &env);
    // User u<n> views a product n + 1 times.
    let events: Vec<Value> = (0..6u64)
        .flat_map(|u| {
            (0..=u).map(move |n| {
                json!({"type": "track", "event": "product_view", "userId": format!("u{u}"),
                    "messageId": format!("m{u}-{n}"), "properties": {"product_id": "p1"}})
            })
        })
        .collect();
    let body = serde_json::to_vec(&json!({ "batch": events })).unwrap();
    let (status, answer) = http(
        &node.addr,
        "POST",
        "/v1/batch",
        Some(&body),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    // Read back in plaintext, which the nodes serve too.
    let redis = Redis::Cluster(cluster);
    let mut client = redis.profiles();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts: Vec<u64> = (0..6)
            .map(|u| match client.read(&format!("u:u{u}")).unwrap() {
                Some((StoredProfile::Profile(p), _)) => p.profile.counters.events,
                _ => 0,
            })
            .collect();
        if counts == (1..=6).collect::<Vec<u64>>() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the profiles in the cluster count {counts:?} events"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
