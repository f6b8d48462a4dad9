//! Crash test: a child `kairos serve` receives concurrent batches and is killed with SIGKILL at
//! random moments, several times. Clients retry unacknowledged batches as a tracker would. After
//! the last restart every acknowledged event is in the log exactly once, and the state the node
//! persisted equals a clean replay of the log. It runs on the embedded log and on a Kafka topic
//! (where the broker outlives the node, and "in the log once" means once as the log's reader
//! delivers it, after dropping the retries' duplicate copies).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use kairos::demo::Rng;
use kairos_log::{EmbeddedLog, EventLog, KafkaLog, KafkaLogConfig};
use kairos_state::{EmbeddedStore, LogPosition, State, StateStore};
use kairos_types::LogEntry;

use crate::support::{assert_states_equal, http, test_config, Backend, Server, TempDir};

fn terminate(mut server: Server) {
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = server.child.wait().unwrap();
    assert!(status.success(), "graceful shutdown failed: {status}");
}

/// Every record of the log, in sequence order.
fn read_log(backend: &Backend, dir: &Path) -> Vec<(LogPosition, LogEntry)> {
    let log: Box<dyn EventLog> = match backend {
        Backend::Embedded => {
            let config = test_config(dir, "").embedded_log_config().unwrap();
            Box::new(EmbeddedLog::open(&dir.join("log"), config).unwrap())
        }
        Backend::Kafka { broker, .. } => Box::new(
            KafkaLog::open(KafkaLogConfig {
                brokers: broker.addr.clone(),
                topic: Backend::topic(dir),
                ..KafkaLogConfig::default()
            })
            .unwrap(),
        ),
    };
    let mut out = Vec::new();
    for p in 0..log.partition_count() {
        let mut offset = log.start_offsets()[p as usize];
        // A Kafka log fetches in the background: the first read positions it.
        let _ = log.read(p, offset, 1).unwrap();
        loop {
            let batch = log.read(p, offset, 4096).unwrap();
            if batch.is_empty() {
                if log.caught_up() {
                    break;
                }
                log.wait_committed(log.committed_seq(), Duration::from_millis(20));
                continue;
            }
            for r in batch {
                offset = r.offset + 1;
                let pos = LogPosition {
                    partition: r.partition,
                    offset: r.offset,
                    seq: r.seq,
                };
                out.push((pos, LogEntry::decode(&r.payload).unwrap()));
            }
        }
    }
    out.sort_by_key(|(pos, _)| pos.seq);
    log.close().unwrap();
    out
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_event() {
    crash_test(&Backend::Embedded);
}

/// One partition, so that a clean replay applies the records in the order the node did. The
/// profiles are in Redis too: after the crashes Redis holds exactly the clean replay's.
#[test]
fn sigkill_under_load_loses_no_acknowledged_event_on_kafka_redis() {
    crash_test(&Backend::kafka_redis(1));
}

fn crash_test(backend: &Backend) {
    let dir = TempDir::new("crash");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("crash test seed {seed}");
    let mut rng = Rng::new(seed);

    let server = Server::start("serve", dir.path(), &backend.env(dir.path()));
    let addr = Arc::new(Mutex::new(Some(server.addr.clone())));
    let mut server = Some(server);
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let sent: Arc<Mutex<HashSet<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));

    let clients: Vec<_> = (0..3)
        .map(|c| {
            let (addr, acked, sent, stop) = (addr.clone(), acked.clone(), sent.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let ids: Vec<String> = (0..20).map(|i| format!("c{c}-b{n}-e{i}")).collect();
                    let batch: Vec<_> = ids
                        .iter()
                        .enumerate()
                        .map(|(i, id)| {
                            json!({"type": "track", "event": "product_view", "messageId": id,
                                   "anonymousId": format!("user-{}", (n as usize * 7 + i) % 50),
                                   "timestamp": 1_700_000_000_000i64 + (n * 20 + i as u64) as i64,
                                   "properties": {"product_id": format!("p{}", (n as usize + i * 3) % 40)}})
                        })
                        .collect();
                    let body = serde_json::to_vec(&json!({ "batch": batch })).unwrap();
                    sent.lock().unwrap().extend(ids.iter().cloned());
                    // Retry the same batch until acknowledged, across crashes and restarts.
                    loop {
                        let target = addr.lock().unwrap().clone();
                        if let Some(a) = target {
                            if let Ok((200, resp)) = http(&a, "POST", "/v1/batch", Some(&body), Duration::from_secs(5)) {
                                let resp: serde_json::Value = serde_json::from_slice(&resp).unwrap();
                                assert_eq!(resp["rejected"], json!([]));
                                acked.lock().unwrap().extend(ids.iter().cloned());
                                break;
                            }
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    n += 1;
                }
            })
        })
        .collect();

    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(300 + rng.below(900)));
        let mut s = server.take().unwrap();
        *addr.lock().unwrap() = None;
        s.child.kill().unwrap(); // SIGKILL
        s.child.wait().unwrap();
        eprintln!(
            "round {round}: killed with {} events acknowledged",
            acked.lock().unwrap().len()
        );
        let s = Server::start("serve", dir.path(), &backend.env(dir.path()));
        *addr.lock().unwrap() = Some(s.addr.clone());
        server = Some(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Release);
    for c in clients {
        c.join().unwrap();
    }
    terminate(server.take().unwrap());

    let entries = read_log(backend, dir.path());
    let mut counts: HashMap<String, usize> = HashMap::new();
    for (_, e) in &entries {
        if let LogEntry::Event(ev) = e {
            *counts.entry(ev.message_id.clone()).or_default() += 1;
        }
    }
    let acked = acked.lock().unwrap();
    assert!(
        acked.len() >= 200,
        "too little traffic to mean anything: {}",
        acked.len()
    );
    for id in acked.iter() {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "acknowledged event {id} must be in the log exactly once"
        );
    }
    let sent = sent.lock().unwrap();
    for (id, n) in &counts {
        assert_eq!(*n, 1, "{id} duplicated");
        assert!(sent.contains(id));
    }

    // The state the node persisted at shutdown equals a clean replay of the log.
    let model = test_config(dir.path(), "").model;
    let persisted = EmbeddedStore::open(&dir.path().join("state"), model.clone()).unwrap();
    let mut clean = State::new(model);
    for (pos, entry) in &entries {
        clean.apply(*pos, entry);
    }
    assert_states_equal(&persisted.read(), &clean);
    if let Some(redis) = backend.redis() {
        redis.assert_holds(&clean, &Backend::topic(dir.path()));
    }
}
