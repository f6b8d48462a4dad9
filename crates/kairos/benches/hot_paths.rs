//! Criterion micro-benchmarks of the hot paths, on the same synthetic shop traffic `kairos bench`
//! sends (Zipf item popularity, sessions of varying length, the full mix of event types).
//!
//! - `event`: what ingest does per event (parse the raw JSON and validate/normalize it), encoding
//!   the normalized event as a log record, and decoding a record in the processor;
//! - `state`: `State::apply` of one event on a loaded state (profile, item statistics, relations,
//!   session model), and one relation update (`TopList::add`);
//! - `recommend`: the session model's scoring, and `for_you` / `similar` end to end (candidates,
//!   filters, fallbacks) on a loaded state.
//!
//! `cargo bench -p kairos --bench hot_paths` runs them; `-- --quick` for a fast pass. The shop has
//! 50,000 users and 20,000 items, small enough that most of the state stays in the CPU caches;
//! `HOT_PATHS_USERS=1000000 HOT_PATHS_ITEMS=100000` measures at the scale of the full
//! `kairos bench`, where scoring waits on memory (building that state takes about a minute).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use kairos::bench::workload::{Shop, ShopSize, Traffic, Visitors};
use kairos::demo::Rng;
use kairos_recommend::{recommend, RecommendConfig, Request, Scenario};
use kairos_state::decay::TopList;
use kairos_state::{LogPosition, State, StateConfig};
use kairos_types::{normalize_json, LogEntry, RequestContext};

/// Users and items of the shop: `HOT_PATHS_USERS` / `HOT_PATHS_ITEMS`, else these.
const DEFAULT_USERS: usize = 50_000;
const DEFAULT_ITEMS: usize = 20_000;
const RECEIVED_AT: i64 = 1_750_000_000_000;
/// Events per measured batch of `state/apply`.
const APPLY_BATCH: usize = 1000;

fn size_from_env(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}")),
        Err(_) => default,
    }
}

fn shop() -> Arc<Shop> {
    Arc::new(Shop::new(
        ShopSize {
            items: size_from_env("HOT_PATHS_ITEMS", DEFAULT_ITEMS),
            users: size_from_env("HOT_PATHS_USERS", DEFAULT_USERS),
        },
        42,
    ))
}

/// `n` raw tracker events of returning visitors.
fn raw_events(shop: &Arc<Shop>, seed: u64, n: usize) -> Vec<String> {
    let visitors = Visitors::Random {
        first: 0,
        count: shop.size.users as u64,
    };
    let mut traffic = Traffic::new(shop.clone(), seed, visitors, 256, RECEIVED_AT - 3_600_000);
    (0..n)
        .map(|_| {
            let mut buf = Vec::new();
            traffic.next_event(&mut buf).expect("endless traffic");
            String::from_utf8(buf).expect("UTF-8")
        })
        .collect()
}

fn request_context(n: usize) -> RequestContext {
    RequestContext {
        received_at: RECEIVED_AT + n as i64,
        fallback_message_id: format!("fallback-{n}"),
        ..Default::default()
    }
}

fn log_entries(raw: &[String]) -> Vec<LogEntry> {
    raw.iter()
        .enumerate()
        .map(|(n, r)| LogEntry::Event(normalize_json(r, &request_context(n)).expect("valid")))
        .collect()
}

/// A state with every visitor's first session and more returning traffic applied. Each event is
/// applied as it is generated, so building a million users' state needs no more memory than the
/// state itself.
fn loaded_state(shop: &Arc<Shop>) -> (State, u64) {
    let mut state = State::new(StateConfig::default());
    let first_sessions = Visitors::EachOnce {
        first: 0,
        count: shop.size.users as u64,
        step: 1,
    };
    let returning = Visitors::Random {
        first: 0,
        count: shop.size.users as u64,
    };
    let mut first = Traffic::new(
        shop.clone(),
        7,
        first_sessions,
        256,
        RECEIVED_AT - 7_200_000,
    );
    let mut more = Traffic::new(shop.clone(), 9, returning, 256, RECEIVED_AT - 3_600_000);
    let mut more_left = shop.size.users * 2;
    let mut buf = Vec::new();
    let mut seq = 0;
    loop {
        buf.clear();
        if first.next_event(&mut buf).is_none() {
            if more_left == 0 {
                break;
            }
            more_left -= 1;
            more.next_event(&mut buf).expect("endless traffic");
        }
        let raw = std::str::from_utf8(&buf).expect("UTF-8");
        let event = normalize_json(raw, &request_context(seq as usize)).expect("valid");
        seq += 1;
        state.apply(position(seq), &LogEntry::Event(event));
    }
    (state, seq)
}

fn position(seq: u64) -> LogPosition {
    LogPosition {
        partition: 0,
        offset: seq - 1,
        seq,
    }
}

fn event_benches(c: &mut Criterion) {
    let shop = shop();
    let raw = raw_events(&shop, 1, 4096);
    let entries = log_entries(&raw);
    let encoded: Vec<Vec<u8>> = entries.iter().map(LogEntry::encode).collect();
    let mut group = c.benchmark_group("event");
    group.throughput(Throughput::Elements(1));
    let mut n = 0;
    group.bench_function("normalize_json", |b| {
        b.iter(|| {
            n = (n + 1) % raw.len();
            black_box(normalize_json(&raw[n], &request_context(n)).expect("valid"))
        })
    });
    group.bench_function("encode", |b| {
        b.iter(|| {
            n = (n + 1) % entries.len();
            black_box(entries[n].encode())
        })
    });
    group.bench_function("decode", |b| {
        b.iter(|| {
            n = (n + 1) % encoded.len();
            black_box(LogEntry::decode(&encoded[n]).expect("decodes"))
        })
    });
    group.finish();
}

fn state_benches(c: &mut Criterion) {
    let shop = shop();
    let (mut state, mut seq) = loaded_state(&shop);
    // Fresh traffic for every batch (never the same events twice), so sessions and relations
    // evolve as in a live stream.
    let visitors = Visitors::Random {
        first: 0,
        count: shop.size.users as u64,
    };
    let mut traffic = Traffic::new(shop.clone(), 3, visitors, 256, RECEIVED_AT);
    let mut next_batch = move || {
        let raw: Vec<String> = (0..APPLY_BATCH)
            .map(|_| {
                let mut buf = Vec::new();
                traffic.next_event(&mut buf).expect("endless traffic");
                String::from_utf8(buf).expect("UTF-8")
            })
            .collect();
        log_entries(&raw)
    };
    let mut group = c.benchmark_group("state");
    group.throughput(Throughput::Elements(APPLY_BATCH as u64));
    group.bench_function("apply", |b| {
        b.iter_batched(
            &mut next_batch,
            |entries| {
                for entry in &entries {
                    seq += 1;
                    black_box(state.apply(position(seq), entry));
                }
                entries
            },
            BatchSize::LargeInput,
        )
    });
    group.throughput(Throughput::Elements(1));
    let mut rng = Rng::new(5);
    let mut list = TopList::default();
    let mut ts = RECEIVED_AT;
    group.bench_function("relation_add", |b| {
        b.iter(|| {
            ts += 1000;
            let key = rng.zipf(200) as u32;
            list.add(key, 1.0, ts, 30 * 24 * 3_600_000, 40);
            black_box(list.len())
        })
    });
    group.finish();
}

fn recommend_benches(c: &mut Criterion) {
    let shop = shop();
    let (state, _) = loaded_state(&shop);
    let cfg = RecommendConfig::default();
    let mut rng = Rng::new(11);
    let users: Vec<String> = (0..4096)
        .map(|_| format!("a{}", rng.below(shop.size.users as u64)))
        .collect();
    let items: Vec<String> = (0..4096)
        .map(|_| format!("p{}", rng.zipf(shop.size.items as u64)))
        .collect();
    let sessions: Vec<Vec<u32>> = users
        .iter()
        .filter_map(|u| state.profile(None, Some(u)))
        .map(|p| p.session_items().map(|i| i.item).collect())
        .filter(|s: &Vec<u32>| !s.is_empty())
        .collect();
    let mut group = c.benchmark_group("recommend");
    let mut n = 0;
    let mut out = Vec::new();
    group.bench_function("session_model_score", |b| {
        b.iter(|| {
            n = (n + 1) % sessions.len();
            out.clear();
            state
                .sessions
                .score_session(None, &sessions[n], state.clock, &mut out);
            black_box(out.len())
        })
    });
    group.bench_function("for_you", |b| {
        b.iter(|| {
            n = (n + 1) % users.len();
            let mut req = Request::new(Scenario::ForYou, 10);
            req.anonymous_id = Some(users[n].clone());
            black_box(recommend(&state, &req, &cfg))
        })
    });
    group.bench_function("similar", |b| {
        b.iter(|| {
            n = (n + 1) % items.len();
            let mut req = Request::new(Scenario::Similar, 10);
            req.item_id = Some(items[n].clone());
            black_box(recommend(&state, &req, &cfg))
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = event_benches, state_benches, recommend_benches
}
criterion_main!(benches);
