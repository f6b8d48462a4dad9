//! The Kafka-protocol event log against a real broker (tansu): the [`EventLog`] contract the
//! processor and the API rely on, where it differs in mechanism from the embedded log, and the
//! ingest role that scales out on it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kairos_log::{
    partition_for, AppendOutcome, AppendRecord, EventLog, KafkaLog, KafkaLogConfig, LogError,
    Record,
};

use serde_json::{json, Value};

use crate::support::{free_port, http, Backend, KafkaBroker, Server, TempDir, TlsProxy};

const TIMEOUT: Duration = Duration::from_secs(10);

fn config(broker: &KafkaBroker, topic: &str) -> KafkaLogConfig {
    KafkaLogConfig {
        brokers: broker.addr.clone(),
        topic: topic.into(),
        partitions: 3,
        ..KafkaLogConfig::default()
    }
}

fn record(user: &str, n: u64, dedup_id: u64) -> AppendRecord {
    AppendRecord {
        key: user.as_bytes().to_vec(),
        timestamp_ms: 1_700_000_000_000 + n as i64,
        dedup_id,
        payload: format!("{user}:{n}").into_bytes(),
        transaction: None,
    }
}

/// Everything in `partition` from `from`, once the log has fetched it all.
fn read_all(log: &dyn EventLog, partition: u32, from: u64) -> Vec<Record> {
    let mut out = Vec::new();
    let mut offset = from;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let batch = log.read(partition, offset, 1000).unwrap();
        if batch.is_empty() {
            if log.caught_up() {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "partition {partition} never caught up"
            );
            log.wait_committed(log.committed_seq(), Duration::from_millis(20));
            continue;
        }
        offset = batch.last().unwrap().offset + 1;
        out.extend(batch);
    }
}

/// Every record of `topic`, read by a log of its own.
fn read_topic(brokers: &str, topic: &str) -> Vec<Record> {
    let log = KafkaLog::open(KafkaLogConfig {
        brokers: brokers.into(),
        topic: topic.into(),
        transactions_topic: None,
        ..KafkaLogConfig::default()
    })
    .unwrap();
    // The first read of each partition positions the reader.
    for p in 0..log.partition_count() {
        let _ = log.read(p, 0, 1).unwrap();
    }
    (0..log.partition_count())
        .flat_map(|p| read_all(&log, p, 0))
        .collect()
}

/// Acknowledged records come back in order per user, on the partition the Java client and the
/// embedded log would choose, with their timestamps and dedup ids; sequence numbers follow
/// acknowledgement, and an append's outcome carries the number a read must wait for.
#[test]
fn appends_come_back_in_order_per_user_with_their_sequence_numbers() {
    let broker = KafkaBroker::start();
    let log = KafkaLog::open(config(&broker, "contract")).unwrap();
    assert_eq!(log.partition_count(), 3);
    // The first read positions the consumer.
    for p in 0..3 {
        assert!(log.read(p, 0, 10).unwrap().is_empty());
    }
    let users = ["ada", "bob", "cy", "dee", "eve"];
    let mut outcomes = Vec::new();
    for n in 0..40u64 {
        let batch = users
            .iter()
            .enumerate()
            .map(|(i, u)| record(u, n, n * 10 + i as u64 + 1))
            .collect();
        outcomes.extend(log.append(batch).wait().unwrap());
    }
    let mut by_partition: HashMap<u32, Vec<Record>> = HashMap::new();
    for p in 0..3 {
        by_partition.insert(p, read_all(&log, p, 0));
    }
    assert_eq!(by_partition.values().map(Vec::len).sum::<usize>(), 200);
    for (i, outcome) in outcomes.iter().enumerate() {
        let AppendOutcome::Appended {
            partition,
            offset,
            seq,
        } = *outcome
        else {
            panic!("record {i} was not appended: {outcome:?}");
        };
        let user = users[i % users.len()];
        assert_eq!(partition, partition_for(user.as_bytes(), 3), "{user}");
        let r = &by_partition[&partition]
            .iter()
            .find(|r| r.offset == offset)
            .unwrap();
        assert_eq!(r.seq, seq, "the acknowledged seq is the record's");
        assert_eq!(
            r.payload,
            format!("{user}:{}", i / users.len()).into_bytes()
        );
        assert_eq!(r.timestamp_ms, 1_700_000_000_000 + (i / users.len()) as i64);
    }
    for records in by_partition.values() {
        assert!(records.windows(2).all(|w| w[0].seq < w[1].seq));
        for user in users {
            let ns: Vec<u64> = records
                .iter()
                .filter_map(|r| {
                    let text = String::from_utf8(r.payload.clone()).unwrap();
                    let (u, n) = text.split_once(':').unwrap();
                    (u == user).then(|| n.parse().unwrap())
                })
                .collect();
            assert!(ns.windows(2).all(|w| w[0] < w[1]), "{user}: {ns:?}");
        }
    }
    assert_eq!(log.committed_seq(), 200);
    log.close().unwrap();
    assert!(matches!(
        log.append(vec![record("ada", 99, 0)]).wait(),
        Err(LogError::Closed)
    ));
}

/// A retry is dropped by the producer that delivered the original; a retry through another
/// process (or after a restart) is dropped by the reader, also when the original lies before
/// where the reader resumed.
#[test]
fn retries_are_applied_once_across_processes_and_restarts() {
    let broker = KafkaBroker::start();
    let cfg = KafkaLogConfig {
        partitions: 1,
        ..config(&broker, "dedup")
    };
    let first = KafkaLog::open(cfg.clone()).unwrap();
    let _ = first.read(0, 0, 1).unwrap();
    let originals: Vec<_> = (0..10).map(|n| record("ada", n, 1000 + n)).collect();
    first.append(originals.clone()).wait().unwrap();
    let again = first.append(originals[..3].to_vec()).wait().unwrap();
    assert_eq!(again, vec![AppendOutcome::Duplicate; 3], "same producer");
    let mut records = read_all(&first, 0, 0);
    assert_eq!(records.len(), 10);

    // Another process sends copies of three of them: they reach the topic, and the reader
    // drops them.
    let other = KafkaLog::open(KafkaLogConfig {
        consume: false,
        ..cfg.clone()
    })
    .unwrap();
    let copies = other.append(originals[7..].to_vec()).wait().unwrap();
    assert!(copies
        .iter()
        .all(|o| matches!(o, AppendOutcome::Appended { seq: 0, .. })));
    other.close().unwrap();
    let fresh = first.append(vec![record("ada", 10, 1010)]).wait().unwrap();
    assert!(matches!(fresh[0], AppendOutcome::Appended { .. }));
    records.extend(read_all(&first, 0, records.last().unwrap().offset + 1));
    let payloads: Vec<_> = records.iter().map(|r| r.payload.clone()).collect();
    assert_eq!(payloads.len(), 11, "copies were dropped");
    assert_eq!(payloads[10], b"ada:10");
    assert!(
        matches!(first.read(0, 0, 1), Err(LogError::InvalidArgument(_))),
        "a reader does not go back"
    );
    first.close().unwrap();

    // A restarted reader resuming after the originals still recognises retries of them.
    let resumed = KafkaLog::open(KafkaLogConfig {
        start_seq: 11,
        ..cfg
    })
    .unwrap();
    let resume_at = records.last().unwrap().offset + 1;
    let _ = resumed.read(0, resume_at, 1).unwrap();
    let retried = resumed
        .append(vec![record("ada", 4, 1004), record("ada", 11, 1011)])
        .wait()
        .unwrap();
    assert_eq!(retried[0], AppendOutcome::Duplicate);
    let after = read_all(&resumed, 0, resume_at);
    assert_eq!(after.len(), 1, "only the new record: {after:?}");
    assert_eq!(after[0].payload, b"ada:11");
    assert_eq!(after[0].seq, 12, "numbering continues from the checkpoint");
    resumed.close().unwrap();
}

/// A purchase is acknowledged once it is on both topics; the transactions topic gets it once,
/// with its dedup id, and gets nothing else.
#[test]
fn purchases_are_published_once_on_the_transactions_topic() {
    let broker = KafkaBroker::start();
    let log = KafkaLog::open(KafkaLogConfig {
        transactions_topic: Some("orders".into()),
        ..config(&broker, "shop")
    })
    .unwrap();
    let purchase = AppendRecord {
        transaction: Some(br#"{"event":"purchase","messageId":"o-1"}"#.to_vec()),
        ..record("ada", 1, 77)
    };
    let outcomes = log
        .append(vec![record("ada", 0, 76), purchase.clone()])
        .wait()
        .unwrap();
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, AppendOutcome::Appended { .. })));
    let retry = log.append(vec![purchase]).wait().unwrap();
    assert_eq!(retry, vec![AppendOutcome::Duplicate]);
    log.close().unwrap();

    let published = read_topic(&broker.addr, "orders");
    assert_eq!(published.len(), 1, "{published:?}");
    assert_eq!(
        published[0].payload,
        br#"{"event":"purchase","messageId":"o-1"}"#
    );
    assert_eq!(published[0].dedup_id, 77);
}

/// An append is acknowledged only by the broker: with the broker gone it fails (the caller
/// retries) instead of resolving Ok.
#[test]
fn no_acknowledgement_without_the_broker() {
    let broker = KafkaBroker::start();
    let log = KafkaLog::open(KafkaLogConfig {
        ack_timeout: Duration::from_millis(1500),
        ..config(&broker, "gone")
    })
    .unwrap();
    let _ = log.read(0, 0, 1).unwrap();
    log.append(vec![record("ada", 0, 1)]).wait().unwrap();
    drop(broker);
    let result = log.append(vec![record("ada", 1, 2)]).wait();
    assert!(matches!(result, Err(LogError::Broker(_))), "{result:?}");
}

/// Scale-out ingest: a stateless `kairos ingest` appends to the topic that a `kairos serve`
/// processes; what one acknowledges, the other serves. The ingest node has no reads.
#[test]
fn an_ingest_node_feeds_a_serving_node_through_the_topic() {
    let backend = Backend::kafka(4);
    let (ingest_dir, serve_dir) = (TempDir::new("ingest-role"), TempDir::new("serve-role"));
    let env = backend.env(serve_dir.path());
    // The ingest role has no state: a configuration shared with roles that do (here a Redis
    // state at an address nobody answers, which serve would refuse) starts it all the same.
    let mut ingest_env = env.clone();
    ingest_env.push(("KAIROS_STATE".into(), "redis://127.0.0.1:1".into()));
    let ingest = Server::start("ingest", ingest_dir.path(), &ingest_env);
    let serve = Server::start("serve", serve_dir.path(), &env);

    let mut events: Vec<Value> = (0..29)
        .map(|i| {
            json!({
                "type": "track", "event": "product_view", "userId": format!("u{}", i % 3),
                "messageId": format!("m{i}"), "timestamp": 1_700_000_000_000i64 + i,
                "properties": {"product_id": format!("p{}", i % 7)}
            })
        })
        .collect();
    events.push(json!({
        "type": "track", "event": "purchase", "userId": "u2", "messageId": "order-1",
        "timestamp": 1_700_000_000_100i64,
        "properties": {"order_id": "o1", "revenue": 25.0, "products": [{"product_id": "p1", "price": 25.0}]}
    }));
    let batch = json!({ "batch": events });
    let body = serde_json::to_vec(&batch).unwrap();
    let (status, resp) = http(&ingest.addr, "POST", "/v1/batch", Some(&body), TIMEOUT).unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    let resp: Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(resp["accepted"], 30);
    // A retry through the ingest node is a duplicate.
    let (_, resp) = http(&ingest.addr, "POST", "/v1/batch", Some(&body), TIMEOUT).unwrap();
    let resp: Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(resp["duplicates"], 30, "{resp}");

    // The serving node applies them once (it follows the topic, not the ingest node's acks).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, profile) =
            http(&serve.addr, "GET", "/v1/profiles?user_id=u0", None, TIMEOUT).unwrap();
        assert_eq!(status, 200);
        let profile: Value = serde_json::from_slice(&profile).unwrap();
        if profile["counters"]["events"] == 10 {
            break;
        }
        assert!(
            profile["counters"]["events"].as_u64().unwrap_or(0) < 10,
            "{profile}"
        );
        assert!(Instant::now() < deadline, "never applied: {profile}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The purchase was also published, once and as JSON, on the transactions topic.
    let Backend::Kafka { broker, .. } = &backend else {
        unreachable!()
    };
    let published = read_topic(&broker.addr, "kairos.transactions");
    assert_eq!(published.len(), 1, "{published:?}");
    let purchase: Value = serde_json::from_slice(&published[0].payload).unwrap();
    assert_eq!(purchase["messageId"], "order-1", "{purchase}");
    assert_eq!(purchase["properties"]["revenue"], 25.0, "{purchase}");

    // Reads belong to the serving node; the ingest node says so.
    let (status, resp) = http(
        &ingest.addr,
        "GET",
        "/v1/recommendations?user_id=u0",
        None,
        TIMEOUT,
    )
    .unwrap();
    assert_eq!(status, 404);
    let resp: Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(resp["code"], "route_not_found");
    assert!(
        resp["message"].as_str().unwrap().contains("ingest role"),
        "{resp}"
    );
}

/// A broker restart loses no acknowledged event, where the broker keeps what it acknowledged.
///
/// The broker is tansu on its SQLite storage engine (a build of its own, by
/// `scripts/fetch-tansu.sh --durable`): it commits each produce request, records and producer
/// state in one transaction, before it answers. It is killed with SIGKILL mid-stream and started
/// again on the same database while the ingest node's client keeps posting and retrying.
///
/// Pointed at `memory://tansu/` (`KAIROS_TEST_DURABLE_BROKER`), the test fails: that restart
/// loses what was acknowledged. tansu's S3 engine fails it too, against an S3 server that honours
/// conditional writes: it records a producer's sequence number before it writes the batch, so a
/// batch whose produce request the kill cut between the two is answered as a duplicate, that is
/// as written, after the restart, and is gone (docs/SCALING.md, "The broker must be durable").
#[test]
fn a_broker_restart_loses_no_acknowledged_event() {
    let root = TempDir::new("broker-restart");
    let mut broker = KafkaBroker::start_durable(root.path());
    let env: Vec<(String, String)> = vec![
        ("KAIROS_LOG".into(), format!("kafka://{}", broker.addr)),
        ("KAIROS_KAFKA__TOPIC".into(), "restart".into()),
        ("KAIROS_KAFKA__PARTITIONS".into(), "2".into()),
        // Appends the broker cannot take fail fast, and the client retries them.
        ("KAIROS_KAFKA__ACK_TIMEOUT_MS".into(), "3000".into()),
    ];
    let dir = |name: &str| {
        let d = root.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let ingest = Server::start("ingest", &dir("ingest"), &env);
    // Four clients, each posting batches of 10 views for its own 20 users, one request at a
    // time, so that requests are in flight whenever the broker is killed.
    const CLIENTS: u64 = 4;
    let stop = Arc::new(AtomicBool::new(false));
    let acked_total = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (addr, stop, acked_total, refused, in_flight) = (
                ingest.addr.clone(),
                stop.clone(),
                acked_total.clone(),
                refused.clone(),
                in_flight.clone(),
            );
            std::thread::spawn(move || {
                // Acknowledged product views per user.
                let mut acked: HashMap<String, u64> = HashMap::new();
                let user = |n: u64| format!("u{}-{}", client, n % 20);
                let mut n = 0u64;
                'batches: while !stop.load(Ordering::Acquire) {
                    let events: Vec<Value> = (n..n + 10)
                        .map(|m| {
                            json!({"type": "track", "event": "product_view", "userId": user(m),
                                "messageId": format!("c{client}-m{m}"),
                                "timestamp": 1_700_000_000_000i64 + m as i64,
                                "properties": {"product_id": format!("p{}", m % 7)}})
                        })
                        .collect();
                    let body = serde_json::to_vec(&json!({ "batch": events })).unwrap();
                    // Retried with the same messageIds until acknowledged, as the tracker does.
                    loop {
                        in_flight.fetch_add(1, Ordering::AcqRel);
                        let answer = http(&addr, "POST", "/v1/batch", Some(&body), TIMEOUT);
                        in_flight.fetch_sub(1, Ordering::AcqRel);
                        if let Ok((200, _)) = answer {
                            break;
                        }
                        refused.fetch_add(1, Ordering::Relaxed);
                        if stop.load(Ordering::Acquire) {
                            break 'batches;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    for m in n..n + 10 {
                        *acked.entry(user(m)).or_default() += 1;
                    }
                    acked_total.fetch_add(10, Ordering::Release);
                    n += 10;
                }
                acked
            })
        })
        .collect();
    let acked_at_least = |n: u64, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked_total.load(Ordering::Acquire) < n {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    // Three restarts, each with acknowledged events before and after it, and requests in flight
    // when it is killed. (Not an outage longer than `ack_timeout_ms`: librdkafka then times the
    // records out and resets its producer state, and tansu 0.6's SQLite engine panics in its
    // idempotence check and refuses every produce request until restarted; docs/SCALING.md,
    // "The broker must be durable".)
    let mut at_restarts = Vec::new();
    let mut in_flight_at_kills = Vec::new();
    acked_at_least(
        400,
        "the ingest node acknowledged too little before the restart",
    );
    for _ in 0..3 {
        in_flight_at_kills.push(in_flight.load(Ordering::Acquire));
        broker.restart();
        let at_restart = acked_total.load(Ordering::Acquire);
        at_restarts.push(at_restart);
        acked_at_least(
            at_restart + 400,
            "the ingest node acknowledged too little after the broker restarted",
        );
    }
    stop.store(true, Ordering::Release);
    let mut acked: HashMap<String, u64> = HashMap::new();
    for writer in writers {
        acked.extend(writer.join().unwrap());
    }
    eprintln!(
        "broker restarts after {at_restarts:?} acknowledged events, with {in_flight_at_kills:?} \
         requests in flight; {} acknowledged in all, {} requests refused and retried",
        acked.values().sum::<u64>(),
        refused.load(Ordering::Relaxed)
    );
    assert!(
        in_flight_at_kills.iter().any(|&n| n > 0),
        "no request was in flight when the broker was killed"
    );
    // A node that rebuilds its state from the topic counts every acknowledged view once. Its
    // start-up replay ends at the high watermark the broker reports, which can be a little low,
    // so the last events may arrive just after: a count below the acknowledged one is read again
    // until a deadline, a count above it fails at once.
    let serve = Server::start("serve", &dir("serve"), &env);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut short = Vec::new();
        for (user, want) in &acked {
            let (status, body) = http(
                &serve.addr,
                "GET",
                &format!("/v1/profiles?user_id={user}"),
                None,
                TIMEOUT,
            )
            .unwrap();
            assert_eq!(status, 200);
            let profile: Value = serde_json::from_slice(&body).unwrap();
            let have = profile["counters"]["product_views"].as_u64().unwrap_or(0);
            assert!(
                have <= *want,
                "{user}: {have} views counted against {want} acknowledged: counted twice"
            );
            if have < *want {
                short.push(format!("{user}: {have} of {want}"));
            }
        }
        if short.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acknowledged events missing from the topic after the broker restart: {short:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Appends 20 records of one user to `log` and reads them back, in order.
fn round_trip(log: &KafkaLog) {
    for p in 0..log.partition_count() {
        assert!(log.read(p, 0, 10).unwrap().is_empty());
    }
    let records = (0..20u64).map(|n| record("ada", n, n + 1)).collect();
    assert_eq!(log.append(records).wait().unwrap().len(), 20);
    let payloads: Vec<String> = (0..log.partition_count())
        .flat_map(|p| read_all(log, p, 0))
        .map(|r| String::from_utf8(r.payload).unwrap())
        .collect();
    assert_eq!(
        payloads,
        (0..20).map(|n| format!("ada:{n}")).collect::<Vec<_>>()
    );
}

/// A Kafka log on the brokers at `brokers` with these client `properties`.
fn secured(brokers: String, topic: &str, properties: &[(&str, &str)]) -> KafkaLogConfig {
    KafkaLogConfig {
        brokers,
        topic: topic.into(),
        partitions: 2,
        properties: properties
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..KafkaLogConfig::default()
    }
}

/// The Kafka log over TLS, as managed brokers require: librdkafka is built with OpenSSL, and
/// `[kafka] client` passes `security.protocol` and the CA through. The broker's TLS is a proxy's
/// (see [`TlsProxy`]) the broker advertises. Records go out and come back; a client that trusts
/// another CA does not connect, and says why.
#[test]
fn the_kafka_log_works_over_tls() {
    let port = free_port();
    let broker = KafkaBroker::start_advertising(port);
    let proxy = TlsProxy::start(port, &broker.addr);
    let tls = |ca: &std::path::Path| {
        let ca = ca.display().to_string();
        secured(
            format!("127.0.0.1:{}", proxy.port),
            "tls",
            &[("security.protocol", "ssl"), ("ssl.ca.location", &ca)],
        )
    };
    round_trip(&KafkaLog::open(tls(&proxy.ca)).unwrap());
    // Another CA: the proxy's certificate does not verify.
    let other = TlsProxy::start(free_port(), &broker.addr);
    let Err(refused) = KafkaLog::open(tls(&other.ca)) else {
        panic!("a client trusting another CA opened the log");
    };
    assert!(
        refused.to_string().contains("certificate verify failed"),
        "{refused}"
    );
}

/// SASL over TLS (`SASL_SSL`, SCRAM-SHA-512), the setting of Confluent Cloud and MSK with
/// SCRAM: a broker that requires it takes the log's records, and refuses a wrong password with
/// the reason in the error.
#[test]
fn the_kafka_log_authenticates_with_sasl_scram_over_tls() {
    let dir = TempDir::new("kafka-sasl");
    let port = free_port();
    let broker = KafkaBroker::start_sasl(dir.path(), port, "kairos", "s3cret");
    let proxy = TlsProxy::start(port, &broker.addr);
    let ca = proxy.ca.display().to_string();
    let sasl = |password: &str| {
        secured(
            format!("127.0.0.1:{}", proxy.port),
            "sasl",
            &[
                ("security.protocol", "sasl_ssl"),
                ("ssl.ca.location", &ca),
                ("sasl.mechanisms", "SCRAM-SHA-512"),
                ("sasl.username", "kairos"),
                ("sasl.password", password),
            ],
        )
    };
    round_trip(&KafkaLog::open(sasl("s3cret")).unwrap());
    let Err(refused) = KafkaLog::open(sasl("wrong")) else {
        panic!("a wrong password opened the log");
    };
    assert!(
        refused.to_string().contains("SASL authentication error"),
        "{refused}"
    );
}

/// A broker that restarts without its data (tansu's memory storage) contradicts the ingest
/// node's idempotent producer, which then stops for good. The node makes a new producer, and
/// appends are acknowledged again without restarting it.
#[test]
fn an_ingest_node_makes_a_new_producer_after_a_fatal_error() {
    let mut broker = KafkaBroker::start();
    let dir = TempDir::new("fatal-producer");
    let env: Vec<(String, String)> = vec![
        ("KAIROS_LOG".into(), format!("kafka://{}", broker.addr)),
        ("KAIROS_KAFKA__TOPIC".into(), "fatal".into()),
        ("KAIROS_KAFKA__ACK_TIMEOUT_MS".into(), "3000".into()),
    ];
    let ingest = Server::start("ingest", dir.path(), &env);
    let post = |n: u64| {
        let body = serde_json::to_vec(&json!({"batch": [{"type": "track", "event": "product_view",
            "userId": "u", "messageId": format!("m{n}"), "timestamp": 1_700_000_000_000i64,
            "properties": {"product_id": "p"}}]}))
        .unwrap();
        http(&ingest.addr, "POST", "/v1/batch", Some(&body), TIMEOUT)
            .map(|(status, _)| status)
            .unwrap_or(0)
    };
    assert_eq!(post(0), 200);
    broker.restart();
    // The topic went with the broker's data: made again, as an operator would.
    drop(KafkaLog::open(config(&broker, "fatal")).unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 1;
    while post(n) != 200 {
        assert!(
            Instant::now() < deadline,
            "the ingest node never acknowledged again after the broker restarted"
        );
        n += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(n > 1, "the restart made no append fail: nothing was tested");
    for m in n + 1..n + 5 {
        assert_eq!(post(m), 200);
    }
}

/// Runs `kairos <args> --listen 127.0.0.1:0 --data-dir <fresh>`, which must stop with an error;
/// returns what it printed on stderr.
fn refused(args: &[&str]) -> String {
    let dir = TempDir::new("refused");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kairos"))
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "kairos {args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A Redis that does not answer at start-up is a configuration error, said at once (later
/// outages are retried: `redis_state`).
#[test]
fn serve_refuses_a_redis_it_cannot_reach() {
    let err = refused(&["serve", "--state", "redis://127.0.0.1:1"]);
    assert!(
        err.contains("cannot reach Redis at \"redis://127.0.0.1:1\""),
        "{err}"
    );
}

/// `kairos ingest` needs a log other nodes can read.
#[test]
fn the_ingest_role_refuses_the_embedded_log() {
    let err = refused(&["ingest"]);
    assert!(err.contains("kafka://"), "{err}");
}
