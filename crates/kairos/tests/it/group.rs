//! Processor replicas in a consumer group (`kairos process`, `crates/kairos/src/group.rs`): two
//! replicas split a four-partition topic fed by a `kairos ingest` node; one is killed with
//! SIGKILL under load and the other takes its partitions over. Afterwards every profile in Redis
//! counts each acknowledged event of its key exactly once, and every identity link is there.
//!
//! A `kairos api` replica follows the model updates the processor replicas publish all along:
//! afterwards its model counts each acknowledged interaction of every item exactly once too
//! (updates published again after a takeover are skipped), and it serves each user's profile
//! merged with every profile linked to it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use kairos::demo::Rng;
use kairos_state::portable::StoredProfile;
use kairos_state::redis_mirror::RedisProfiles;

use crate::support::{
    http, KafkaBroker, Redis, RedisCluster, RedisServer, ScaleOut, Server, TempDir,
};

/// What the acknowledged events should have made of one profile key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Expected {
    events: u64,
    product_views: u64,
    purchases: u64,
}

/// The value of an unlabelled metric in a `/metrics` page.
pub fn metric(addr: &str, name: &str) -> Option<i64> {
    let (status, body) = http(addr, "GET", "/metrics", None, Duration::from_secs(2)).ok()?;
    if status != 200 {
        return None;
    }
    String::from_utf8_lossy(&body).lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse::<f64>().ok().map(|v| v as i64))?
    })
}

fn owned(addr: &str) -> i64 {
    metric(addr, "kairos_group_partitions_owned").unwrap_or(-1)
}

/// Waits until `check` holds, for at most `limit`.
pub fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One request's events, with what each should do to its profile key, and the identity links
/// they make (linked key, user key).
struct Batch {
    events: Vec<Value>,
    effects: Vec<(String, Expected)>,
    links: Vec<(String, String)>,
}

/// Waits until `owner` owns every partition, then starts a replica on `data_dir` and waits until
/// the group has split the partitions between the two.
fn join_replica(owner: &Server, data_dir: &Path, env: &[(String, String)]) -> Server {
    wait_until(
        "one replica owns every partition",
        Duration::from_secs(60),
        || owned(&owner.addr) == 4,
    );
    let joined = Server::start("process", data_dir, env);
    wait_until(
        "the replicas split the partitions",
        Duration::from_secs(60),
        || {
            let (a, b) = (owned(&owner.addr), owned(&joined.addr));
            a > 0 && b > 0 && a + b == 4
        },
    );
    joined
}

/// Batch `n` of client `c`: views, purchases and page views of logged-in users, anonymous
/// visitors browsing, and identifications linking a visitor to a user (mostly on another
/// partition).
fn batch(c: u64, n: u64, rng: &mut Rng) -> Batch {
    let mut events = Vec::new();
    let mut effects = Vec::new();
    let mut links = Vec::new();
    for i in 0..20u64 {
        let id = format!("c{c}-b{n}-e{i}");
        let ts = 1_700_000_000_000i64 + (n * 20 + i) as i64;
        let product = format!("p{}", rng.below(60));
        let user = format!("user-{}", rng.below(80));
        let visitor = format!("visitor-{}", rng.below(120));
        match rng.below(10) {
            0..=3 => {
                events.push(
                    json!({"type": "track", "event": "product_view", "messageId": id,
                    "userId": user, "anonymousId": format!("{user}-device"), "timestamp": ts,
                    "properties": {"product_id": product, "category": "books"}}),
                );
                effects.push((
                    format!("u:{user}"),
                    Expected {
                        events: 1,
                        product_views: 1,
                        purchases: 0,
                    },
                ));
                links.push((format!("a:{user}-device"), format!("u:{user}")));
            }
            4 => {
                events.push(json!({"type": "track", "event": "purchase", "messageId": id,
                    "userId": user, "timestamp": ts,
                    "properties": {"products": [{"product_id": product, "price": 10.0}], "revenue": 10.0}}));
                effects.push((
                    format!("u:{user}"),
                    Expected {
                        events: 1,
                        product_views: 0,
                        purchases: 1,
                    },
                ));
            }
            5..=7 => {
                events.push(
                    json!({"type": "track", "event": "product_view", "messageId": id,
                    "anonymousId": visitor, "timestamp": ts,
                    "properties": {"product_id": product}}),
                );
                effects.push((
                    format!("a:{visitor}"),
                    Expected {
                        events: 1,
                        product_views: 1,
                        purchases: 0,
                    },
                ));
            }
            8 => {
                events.push(json!({"type": "page", "name": "home", "messageId": id,
                    "anonymousId": visitor, "timestamp": ts}));
                effects.push((
                    format!("a:{visitor}"),
                    Expected {
                        events: 1,
                        product_views: 0,
                        purchases: 0,
                    },
                ));
            }
            _ => {
                // An identify counts no event, but makes the user's profile and the link. A
                // visitor always turns out to be the same user.
                let k = rng.below(120);
                let (visitor, user) = (format!("visitor-{k}"), format!("user-{}", k % 80));
                events.push(json!({"type": "identify", "messageId": id,
                    "userId": user, "anonymousId": visitor, "timestamp": ts}));
                effects.push((format!("u:{user}"), Expected::default()));
                links.push((format!("a:{visitor}"), format!("u:{user}")));
            }
        }
    }
    Batch {
        events,
        effects,
        links,
    }
}

/// What goes wrong while the events come in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// One replica is killed with SIGKILL; once the other has taken its partitions over, a third
    /// replica joins and takes some of them (a rebalance without a crash).
    KillThenJoin,
    /// Redis is killed and restarted empty: the replicas rebuild their partitions from the
    /// start of the log.
    RedisRestartedEmpty,
}

/// With room for 40 of the 200 profiles in each replica's memory: profiles are dropped and
/// loaded again all along.
#[test]
fn a_replica_killed_under_load_hands_its_partitions_over_and_nothing_counts_twice() {
    replicas_under(
        Fault::KillThenJoin,
        Redis::Single(RedisServer::start()),
        Some(40),
    );
}

/// The same against a Redis Cluster of three masters: a batch's profiles are loaded, and its
/// links written, in pipelines that span the masters.
#[test]
fn replicas_share_partitions_exactly_once_on_redis_cluster() {
    replicas_under(
        Fault::KillThenJoin,
        Redis::Cluster(RedisCluster::start()),
        None,
    );
}

#[test]
fn replicas_rebuild_what_redis_lost_from_the_log() {
    replicas_under(
        Fault::RedisRestartedEmpty,
        Redis::Single(RedisServer::start()),
        None,
    );
}

/// `max_profiles`: the replicas' `process_max_profiles`.
fn replicas_under(fault: Fault, mut redis: Redis, max_profiles: Option<usize>) {
    let broker = KafkaBroker::start();
    let root = TempDir::new("group");
    let scale = ScaleOut::new(&broker, &root, 4);
    let topic = scale.topic.clone();
    let mut env = scale.with_redis(&redis);
    env.extend(max_profiles.map(|n| {
        (
            "KAIROS_REDIS__PROCESS_MAX_PROFILES".to_owned(),
            n.to_string(),
        )
    }));
    let dir = |name: &str| scale.dir(name);
    let ingest = Server::start("ingest", &dir("ingest"), &env);
    // The catalogue, so that the API replica answers for every item.
    let catalogue: Vec<Value> = (0..60)
        .map(|n| json!({"id": format!("p{n}"), "title": format!("Product {n}")}))
        .collect();
    let (status, _) = http(
        &ingest.addr,
        "PUT",
        "/v1/items",
        Some(&serde_json::to_vec(&json!({ "items": catalogue })).unwrap()),
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(status, 200);
    let api = Server::start("api", &dir("api"), &env);
    let first = Server::start("process", &dir("a"), &env);
    let second = join_replica(&first, &dir("b"), &env);

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("group test seed {seed}");
    let expected: Arc<Mutex<BTreeMap<String, Expected>>> = Arc::default();
    let links: Arc<Mutex<BTreeSet<(String, String)>>> = Arc::default();
    // Per item, the interactions with it acknowledged (views, and purchases of it).
    let item_events: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..2u64)
        .map(|c| {
            let (addr, expected, links, item_events, stop) = (
                ingest.addr.clone(),
                expected.clone(),
                links.clone(),
                item_events.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed ^ (c + 1));
                let mut n = 0;
                while !stop.load(Ordering::Acquire) {
                    let Batch {
                        events,
                        effects,
                        links: new_links,
                    } = batch(c, n, &mut rng);
                    let body = serde_json::to_vec(&json!({ "batch": events })).unwrap();
                    // Retried with the same messageIds until acknowledged, as the tracker does.
                    loop {
                        if let Ok((200, resp)) = http(
                            &addr,
                            "POST",
                            "/v1/batch",
                            Some(&body),
                            Duration::from_secs(10),
                        ) {
                            let resp: Value = serde_json::from_slice(&resp).unwrap();
                            assert_eq!(resp["rejected"], json!([]));
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    let mut expected = expected.lock().unwrap();
                    for (key, e) in effects {
                        let x = expected.entry(key).or_default();
                        x.events += e.events;
                        x.product_views += e.product_views;
                        x.purchases += e.purchases;
                    }
                    links.lock().unwrap().extend(new_links);
                    let mut item_events = item_events.lock().unwrap();
                    for e in &events {
                        let products = match e["event"].as_str() {
                            Some("product_view") => vec![&e["properties"]["product_id"]],
                            Some("purchase") => e["properties"]["products"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|p| &p["product_id"])
                                .collect(),
                            _ => Vec::new(),
                        };
                        for p in products {
                            *item_events
                                .entry(p.as_str().unwrap().to_owned())
                                .or_default() += 1;
                        }
                    }
                    n += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();

    let mut rng = Rng::new(seed);
    std::thread::sleep(Duration::from_millis(1500 + rng.below(1500)));
    let replicas = match fault {
        Fault::KillThenJoin => {
            let (mut doomed, survivor) = (first, second);
            doomed.child.kill().unwrap(); // SIGKILL: no last flush, no offset commit, no leaving
            doomed.child.wait().unwrap();
            eprintln!(
                "killed a replica with {} profile keys touched",
                expected.lock().unwrap().len()
            );
            // Under load all along: the survivor takes the dead replica's partitions over once
            // the group's session timeout passes, then gives some to a newcomer (a rebalance
            // without a crash: the survivor may still be writing profiles of partitions it just
            // lost).
            let newcomer = join_replica(&survivor, &dir("c"), &env);
            vec![survivor, newcomer]
        }
        Fault::RedisRestartedEmpty => {
            let Redis::Single(server) = &mut redis else {
                unreachable!("restarted on a single server")
            };
            server.restart_empty();
            eprintln!(
                "restarted Redis empty with {} profile keys touched",
                expected.lock().unwrap().len()
            );
            std::thread::sleep(Duration::from_millis(2000));
            vec![first, second]
        }
    };
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Release);
    for c in clients {
        c.join().unwrap();
    }

    let expected = expected.lock().unwrap().clone();
    let links = links.lock().unwrap().clone();
    let mut stored = redis.profiles_under(&topic);
    // The first profile that differs, and whether it counts more than was acknowledged: an
    // event counted twice never goes away, so that fails at once, while a count still short
    // waits for the survivor to apply the rest.
    let mismatch = |stored: &mut RedisProfiles| -> Option<(String, bool)> {
        expected.iter().find_map(|(key, want)| {
            let got = match stored.read(key).unwrap() {
                Some((StoredProfile::Profile(p), _)) => {
                    let c = &p.profile.counters;
                    Expected {
                        events: c.events,
                        product_views: c.product_views,
                        purchases: c.purchases,
                    }
                }
                other => return Some((format!("{key}: Redis holds {other:?}"), false)),
            };
            let over = got.events > want.events
                || got.product_views > want.product_views
                || got.purchases > want.purchases;
            (&got != want).then(|| {
                let m = format!("{key}: Redis counts {got:?}, the acknowledged events {want:?}");
                (m, over)
            })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some((m, over)) = mismatch(&mut stored) {
        if over || Instant::now() > deadline {
            for server in &replicas {
                let (_, page) = http(
                    &server.addr,
                    "GET",
                    "/metrics",
                    None,
                    Duration::from_secs(2),
                )
                .unwrap();
                let page = String::from_utf8_lossy(&page).into_owned();
                let lines: Vec<&str> = page
                    .lines()
                    .filter(|l| {
                        !l.starts_with('#')
                            && (l.starts_with("kairos_group")
                                || l.starts_with("kairos_processor")
                                || l.starts_with("kairos_redis"))
                    })
                    .collect();
                eprintln!("{}: {lines:?}", server.addr);
            }
            let key = m.split(':').take(2).collect::<Vec<_>>().join(":");
            eprintln!(
                "{key} is in partition {}; Redis holds it at {:?}",
                kairos::group::partition_of(&key, 4),
                stored.read(&key).unwrap().map(|(_, f)| f)
            );
            panic!("{m}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(expected.len() > 100, "too little traffic to mean anything");
    for (from, to) in &links {
        assert_eq!(
            stored.link_of(from).unwrap().as_deref(),
            Some(to.as_str()),
            "link of {from}"
        );
    }
    let total = |name: &str| -> i64 {
        replicas
            .iter()
            .map(|s| metric(&s.addr, name).unwrap_or(0))
            .sum()
    };
    let fenced = total("kairos_group_events_fenced_total");
    if max_profiles.is_some() {
        let evicted = total("kairos_group_profiles_evicted_total");
        assert!(evicted > 0, "no profile was dropped from memory");
        eprintln!("{evicted} profiles dropped from memory and loaded again");
    }
    if fault == Fault::RedisRestartedEmpty {
        let rebuilt = total("kairos_group_partition_rebuilds_total");
        assert!(rebuilt >= 4, "only {rebuilt} partitions rebuilt");
    }
    eprintln!(
        "{} acknowledged events in {} profiles and {} links, each counted once; {fenced} events re-read after a takeover were already in Redis",
        expected.values().map(|e| e.events).sum::<u64>(),
        expected.len(),
        links.len()
    );
    api_replica_counts_once(&api.addr, &item_events.lock().unwrap(), &expected, &links);
    drop((replicas, ingest, api));
}

/// The API replica's model counts every acknowledged interaction of each item once
/// (`item_events`), and it serves each user's profile with the profiles linked to it merged in,
/// counting the events of all of them (`expected`, by profile key).
fn api_replica_counts_once(
    addr: &str,
    item_events: &BTreeMap<String, u64>,
    expected: &BTreeMap<String, Expected>,
    links: &BTreeSet<(String, String)>,
) {
    let counted = |item: &str| -> u64 {
        let (status, body) = http(
            addr,
            "GET",
            &format!("/v1/items/{item}"),
            None,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let body: Value = serde_json::from_slice(&body).unwrap();
        body["stats"]["events"].as_u64().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    for (item, &want) in item_events {
        loop {
            let got = counted(item);
            assert!(
                got <= want,
                "{item}: the API replica's model counts {got} interactions, {want} were acknowledged"
            );
            if got == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{item}: the API replica's model counts {got} interactions, {want} were acknowledged"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let mut merged: BTreeMap<&str, u64> = BTreeMap::new();
    for (key, e) in expected {
        let person = links
            .iter()
            .find(|(from, _)| from == key)
            .map_or(key.as_str(), |(_, to)| to.as_str());
        if person.starts_with("u:") {
            *merged.entry(person).or_default() += e.events;
        }
    }
    for (user, events) in &merged {
        let (status, body) = http(
            addr,
            "GET",
            &format!("/v1/profiles?user_id={}", &user[2..]),
            None,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(status, 200);
        let profile: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            profile["counters"]["events"].as_u64(),
            Some(*events),
            "{user}, merged with its linked profiles: {profile}"
        );
    }
    eprintln!(
        "the API replica counts {} interactions with {} items once, and serves {} users' merged profiles",
        item_events.values().sum::<u64>(),
        item_events.len(),
        merged.len()
    );
}
