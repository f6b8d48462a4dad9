//! `kairos bench`: the benchmark suite that measures Kairos against its ceilings, on this machine.
//!
//! A throughput figure alone says little: 200,000 events/s is fast on one machine and slow on
//! another. So every figure is measured beside the ceiling that bounds it, in the same run, on the
//! same machine, through the same server stack:
//!
//! | scenario  | figure | ceiling |
//! |-----------|--------|---------|
//! | ingest    | events/s acknowledged durably (fsync on), ack latency, batches of 1, 20, 100 | `POST /v1/validate` (the same HTTP + JSON work, nothing stored); append+fdatasync of the data directory's disk |
//! | serve     | `for_you` and `similar` latency at a fixed offered rate, and maximum throughput, with ingest running in the background | `GET /healthz` (an empty handler of the same stack) |
//! | freshness | acknowledgement of an event → first recommendation that reflects it, under ingest | none: an absolute |
//! | memory    | resident bytes per user and per item after loading the population | none |
//! | recovery  | restart after a crash with the event log full (snapshot + replay), and a replay of the whole log without a snapshot | reading the log |
//!
//! The benchmark starts `kairos serve` as a child (the same binary) on a fresh data directory and
//! drives it over real HTTP on loopback with a built-in load generator ([`load`]), which shares the
//! machine's cores with the server: that is the stated setup, and the reason the client is a
//! minimal keep-alive HTTP/1.1 implementation ([`client`]). The synthetic traffic ([`workload`]) is
//! seeded: Zipf item popularity, sessions of varying length, a realistic mix of event types, about
//! 400 bytes per event.
//!
//! Order of a run: start the server; measure the disk; load the catalogue and warm-up traffic
//! (memory per item = the growth of the resident set), then one session for each of the users
//! (memory per user = the growth); ingest runs; serve runs with background ingest; freshness
//! probes; fill the log to the recovery size, kill the server with SIGKILL and time the restart,
//! then time a replay of the whole log without a snapshot; read the whole log in-process.
//! `--quick` runs everything at a small scale in well under a minute (a smoke test: CI asserts
//! nothing about speed); the full run takes a few minutes.

mod client;
mod disk;
mod load;
mod server;
mod stats;
pub mod workload;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::demo::Rng;
use client::Conn;
use load::{get_jobs, post_jobs, RunResult, Schedule, Until};
use server::{blocking_get, metric, Launch, Server};
use stats::{human_rate, human_us, Latencies};
use workload::{batches, visitor_query, Batch, Shop, ShopSize, Traffic, Visitors};

/// A part of the benchmark that can be selected with `--scenario`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Ingest,
    Serve,
    Freshness,
    Memory,
    Recovery,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::Ingest,
        Scenario::Serve,
        Scenario::Freshness,
        Scenario::Memory,
        Scenario::Recovery,
    ];

    pub fn parse(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Ingest => "ingest",
            Scenario::Serve => "serve",
            Scenario::Freshness => "freshness",
            Scenario::Memory => "memory",
            Scenario::Recovery => "recovery",
        }
    }
}

/// What `kairos bench` was asked to do.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub quick: bool,
    /// Scenarios to run; empty means all.
    pub scenarios: Vec<Scenario>,
    /// Configuration file for the `serve` child (`--config`).
    pub config: Option<PathBuf>,
    /// Parent of the scratch directory (default: the system temp directory). The disk under it is
    /// the disk measured.
    pub dir: Option<PathBuf>,
    pub seed: u64,
    /// Keep the scratch directory (data directory and the server's log) afterwards.
    pub keep: bool,
}

/// The scale and durations of a run.
#[derive(Clone, Debug)]
struct Plan {
    items: usize,
    users: usize,
    /// Warm-up events spread over the catalogue before users are loaded.
    warmup_events: usize,
    /// Distinct events in each ingest pool (cycled, with fresh message ids on every send).
    pool_events: usize,
    ingest: Duration,
    ingest_ceiling: Duration,
    /// Duration of each fixed-rate serve run.
    serve_fixed: Duration,
    /// Duration of each maximum-throughput run.
    serve_max: Duration,
    serve_rate: f64,
    serve_connections: usize,
    background_events_per_sec: f64,
    freshness_probes: usize,
    recovery_events: u64,
    disk: Duration,
}

impl Plan {
    fn quick() -> Plan {
        Plan {
            items: 5_000,
            users: 20_000,
            warmup_events: 50_000,
            pool_events: 20_000,
            ingest: Duration::from_millis(1500),
            ingest_ceiling: Duration::from_millis(1000),
            serve_fixed: Duration::from_secs(3),
            serve_max: Duration::from_millis(1500),
            serve_rate: 2000.0,
            serve_connections: 32,
            background_events_per_sec: 20_000.0,
            freshness_probes: 100,
            recovery_events: 200_000,
            disk: Duration::from_millis(600),
        }
    }

    fn full() -> Plan {
        Plan {
            items: 100_000,
            users: 1_000_000,
            warmup_events: 1_000_000,
            pool_events: 300_000,
            ingest: Duration::from_secs(8),
            ingest_ceiling: Duration::from_secs(5),
            serve_fixed: Duration::from_secs(20),
            serve_max: Duration::from_secs(8),
            serve_rate: 2000.0,
            serve_connections: 32,
            background_events_per_sec: 20_000.0,
            freshness_probes: 1000,
            recovery_events: 10_000_000,
            disk: Duration::from_secs(3),
        }
    }
}

/// Visitors of the catalogue warm-up (ids above the user population): few, with many sessions,
/// so their profiles are negligible beside the items they teach relations.
const WARMUP_VISITORS: u64 = 2000;
/// Items per `PUT /v1/items` request when loading the catalogue.
const ITEMS_PER_REQUEST: usize = 1000;
/// Events per request when loading the population.
const LOAD_BATCH: usize = 100;
/// Connections of the loading phases.
const LOAD_CONNECTIONS: usize = 8;
/// Batch sizes of the ingest runs and the connections driving each.
const INGEST_RUNS: [(usize, usize); 3] = [(1, 128), (20, 64), (100, 32)];
/// Events per request of the background ingest during the serve and freshness runs.
const BACKGROUND_BATCH: usize = 20;

/// One ingest run: a batch size, its durable throughput and the parse-and-discard ceiling.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IngestFigures {
    pub batch: usize,
    pub connections: usize,
    pub events_per_sec: f64,
    pub ceiling_events_per_sec: f64,
    pub ratio: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// Events the processor applied per second during the run.
    pub applied_events_per_sec: f64,
    /// How long after the run the processor had applied everything acknowledged.
    pub catch_up_ms: u64,
}

/// Every figure of a run. Figures of scenarios that did not run are absent (`null`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub cores: usize,
    pub cpu: String,
    pub users: usize,
    pub items: usize,
    pub state_profiles: u64,
    pub load_events: u64,
    pub load_events_per_sec: f64,
    pub mean_event_bytes: f64,
    pub disk_fdatasync_p50_us: Option<u64>,
    pub disk_fdatasync_p99_us: Option<u64>,
    pub disk_append_fsync_mb_per_sec: Option<f64>,
    pub disk_ceiling_events_per_sec: Option<f64>,
    pub ingest: Vec<IngestFigures>,
    pub ingest_events_per_sec: Option<f64>,
    pub ingest_ceiling_events_per_sec: Option<f64>,
    pub ingest_p50_us: Option<u64>,
    pub ingest_p99_us: Option<u64>,
    pub serve_rate: Option<f64>,
    pub serve_p50_us: Option<u64>,
    pub serve_p99_us: Option<u64>,
    pub serve_p999_us: Option<u64>,
    pub serve_max_rps: Option<f64>,
    pub serve_ceiling_rps: Option<f64>,
    pub similar_p50_us: Option<u64>,
    pub similar_p99_us: Option<u64>,
    pub similar_p999_us: Option<u64>,
    pub similar_max_rps: Option<f64>,
    pub background_events_per_sec: Option<f64>,
    pub freshness_p50_us: Option<u64>,
    pub freshness_p99_us: Option<u64>,
    pub freshness_max_us: Option<u64>,
    pub rss_empty_bytes: Option<u64>,
    pub rss_loaded_bytes: Option<u64>,
    pub bytes_per_user: Option<f64>,
    pub bytes_per_item: Option<f64>,
    pub recovery_events: Option<u64>,
    pub recovery_secs: Option<f64>,
    pub replay_secs: Option<f64>,
    pub replay_events_per_sec: Option<f64>,
    pub log_read_secs: Option<f64>,
    pub log_read_events_per_sec: Option<f64>,
    /// The measured windows a state snapshot overlapped (its fork pause and copy-on-write
    /// faults show in their tails), by name.
    pub snapshot_windows: Vec<String>,
    pub duration_secs: f64,
}

fn progress(started: Instant, message: impl AsRef<str>) {
    eprintln!(
        "[bench {:>6.1}s] {}",
        started.elapsed().as_secs_f64(),
        message.as_ref()
    );
}

/// Removes the scratch directory when the run ends, however it ends.
struct Scratch {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("[bench] kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The server's metrics (a few gauges the benchmark needs).
struct Gauges {
    committed_seq: f64,
    applied_seq: f64,
    users: f64,
    log_bytes: f64,
    snapshot: SnapshotMark,
}

/// The server's snapshot activity at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
struct SnapshotMark {
    written: f64,
    running: bool,
}

impl SnapshotMark {
    /// Whether a snapshot was being written at any time between this mark and `later`: one was
    /// running at either end, or one finished in between (which also covers a snapshot that
    /// started and finished in between).
    fn overlaps(self, later: SnapshotMark) -> bool {
        self.running || later.running || later.written != self.written
    }
}

/// Runs one measured window and records in `report` whether a state snapshot overlapped it.
fn window<T>(
    ctx: &RunContext,
    report: &mut Report,
    name: &str,
    measure: impl FnOnce() -> T,
) -> Result<T, String> {
    let before = gauges(ctx.addr)?.snapshot;
    let out = measure();
    note_snapshot(ctx, report, name, before, gauges(ctx.addr)?.snapshot);
    Ok(out)
}

/// Records the window `name` in `report` if a snapshot overlapped it.
fn note_snapshot(
    ctx: &RunContext,
    report: &mut Report,
    name: &str,
    before: SnapshotMark,
    after: SnapshotMark,
) {
    if before.overlaps(after) {
        progress(
            ctx.started,
            format!("a state snapshot was written during {name}"),
        );
        report.snapshot_windows.push(name.to_owned());
    }
}

fn gauges(addr: SocketAddr) -> Result<Gauges, String> {
    let (status, text) =
        blocking_get(addr, "/metrics").map_err(|e| format!("reading /metrics: {e}"))?;
    if status != 200 {
        return Err(format!("/metrics answered {status}"));
    }
    let get = |name: &str| metric(&text, name).ok_or_else(|| format!("no {name} in /metrics"));
    Ok(Gauges {
        committed_seq: get("kairos_log_committed_seq")?,
        applied_seq: get("kairos_state_applied_seq")?,
        users: get("kairos_state_users")?,
        log_bytes: get("kairos_log_bytes")?,
        snapshot: SnapshotMark {
            written: get("kairos_snapshots_total")?,
            running: get("kairos_snapshot_running")? > 0.0,
        },
    })
}

/// Waits until the processor has applied everything committed; returns how long that took.
fn wait_applied(addr: SocketAddr, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let g = gauges(addr)?;
        if g.applied_seq >= g.committed_seq {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "the processor did not catch up within {timeout:?} (applied {} of {})",
                g.applied_seq, g.committed_seq
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Streams generated traffic to `/v1/batch` on `workers` connections, each generating its own
/// share on the fly (`visitors(w)` names worker `w`'s visitors), at most `max_events` per worker.
async fn stream_traffic(
    addr: SocketAddr,
    shop: Arc<Shop>,
    visitors: impl Fn(u64) -> Visitors,
    workers: usize,
    max_events: usize,
    seed: u64,
    ids: &Arc<AtomicU64>,
) -> RunResult {
    let started = Instant::now();
    let start_ms = kairos_types::time::now_ms();
    let handles: Vec<_> = (0..workers as u64)
        .map(|w| {
            let mut traffic =
                Traffic::new(shop.clone(), seed ^ (w << 32), visitors(w), 64, start_ms);
            let ids = Arc::clone(ids);
            tokio::spawn(async move {
                let mut result = RunResult::default();
                let mut conn = match Conn::connect(addr).await {
                    Ok(c) => c,
                    Err(e) => {
                        result.errors += 1;
                        result.first_error = Some(e.to_string());
                        return result;
                    }
                };
                let mut sent = 0;
                while sent < max_events {
                    let n = LOAD_BATCH.min(max_events - sent);
                    let Some(mut batch) = batches(&mut traffic, n, n).pop() else {
                        break;
                    };
                    sent += batch.events();
                    batch.refresh_ids(ids.fetch_add(batch.events() as u64, Ordering::Relaxed));
                    let t = Instant::now();
                    match conn.post("/v1/batch", &batch.body).await {
                        Ok(r) if r.status == 200 => {
                            result.ok += 1;
                            result.events += batch.events() as u64;
                            result.latencies.record(t.elapsed());
                        }
                        Ok(r) => {
                            result.errors += 1;
                            result.first_error.get_or_insert(format!(
                                "HTTP {}: {}",
                                r.status,
                                String::from_utf8_lossy(r.body)
                            ));
                        }
                        Err(e) => {
                            result.errors += 1;
                            result.first_error.get_or_insert(e.to_string());
                            break;
                        }
                    }
                }
                result
            })
        })
        .collect();
    let mut total = RunResult::default();
    for h in handles {
        if let Ok(r) = h.await {
            total.ok += r.ok;
            total.errors += r.errors;
            total.events += r.events;
            if total.first_error.is_none() {
                total.first_error = r.first_error;
            }
        }
    }
    total.elapsed = started.elapsed();
    total
}

/// A pool of ingest batches of returning visitors' traffic.
fn ingest_pool(shop: &Arc<Shop>, seed: u64, per_batch: usize, events: usize) -> Vec<Batch> {
    let visitors = Visitors::Random {
        first: 0,
        count: shop.size.users as u64,
    };
    let mut traffic = Traffic::new(
        shop.clone(),
        seed,
        visitors,
        256,
        kairos_types::time::now_ms(),
    );
    batches(&mut traffic, per_batch, events)
}

fn mean_event_bytes(pool: &[Batch]) -> f64 {
    let bytes: usize = pool.iter().map(|b| b.body.len()).sum();
    let events: usize = pool.iter().map(Batch::events).sum();
    // The envelope (`{"batch":[`, `],"sentAt":...}`) is about 50 bytes per request.
    (bytes.saturating_sub(50 * pool.len())) as f64 / events.max(1) as f64
}

/// Runs the benchmark.
pub fn run(opts: &BenchOptions) -> Result<Report, String> {
    let started = Instant::now();
    let plan = if opts.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    let wants = |s: Scenario| opts.scenarios.is_empty() || opts.scenarios.contains(&s);
    let mut report = Report {
        mode: if opts.quick { "quick" } else { "full" },
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu: cpu_model(),
        users: plan.users,
        items: plan.items,
        ..Report::default()
    };

    let parent = opts.dir.clone().unwrap_or_else(std::env::temp_dir);
    let scratch = Scratch {
        dir: parent.join(format!("kairos-bench-{}", std::process::id())),
        keep: opts.keep,
    };
    let _ = std::fs::remove_dir_all(&scratch.dir);
    let data_dir = scratch.dir.join("data");
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| format!("creating {}: {e}", data_dir.display()))?;
    let server_log = scratch.dir.join("serve.log");
    let launch = Launch {
        exe: std::env::current_exe().map_err(|e| format!("locating the kairos binary: {e}"))?,
        config: opts.config.clone(),
        env: Vec::new(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kairos-bench")
        .enable_all()
        .build()
        .map_err(|e| format!("starting the load generator runtime: {e}"))?;
    let ids = Arc::new(AtomicU64::new(opts.seed.rotate_left(32)));

    progress(
        started,
        format!(
            "{} run: {} users, {} items; data directory {}; server log {}",
            report.mode,
            plan.users,
            plan.items,
            data_dir.display(),
            server_log.display()
        ),
    );
    let mut server = Server::start(&launch, &data_dir, &server_log)?;
    server.wait_ready(Duration::from_secs(60))?;
    let addr = server.addr;
    let rss_empty = server.rss_bytes()?;

    if wants(Scenario::Ingest) {
        let disk = disk::append_fsync(&data_dir, plan.disk)
            .map_err(|e| format!("measuring the disk: {e}"))?;
        report.disk_fdatasync_p50_us = Some(disk.fdatasync_p50_us);
        report.disk_fdatasync_p99_us = Some(disk.fdatasync_p99_us);
        report.disk_append_fsync_mb_per_sec = Some(disk.append_fsync_bytes_per_sec / 1e6);
        progress(
            started,
            format!(
                "disk: fdatasync p50 {} p99 {}, append+fdatasync {:.0} MB/s",
                human_us(disk.fdatasync_p50_us),
                human_us(disk.fdatasync_p99_us),
                disk.append_fsync_bytes_per_sec / 1e6
            ),
        );
    }

    // Loading: the catalogue and warm-up traffic (memory per item), then the users.
    let shop = Arc::new(Shop::new(
        ShopSize {
            items: plan.items,
            users: plan.users,
        },
        opts.seed,
    ));
    let load_started = Instant::now();
    runtime.block_on(async {
        let mut conn = Conn::connect(addr)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        for body in shop.catalogue_bodies(ITEMS_PER_REQUEST) {
            let r = conn
                .put("/v1/items", &body)
                .await
                .map_err(|e| format!("loading the catalogue: {e}"))?;
            if r.status != 200 {
                return Err(format!(
                    "loading the catalogue: HTTP {}: {}",
                    r.status,
                    String::from_utf8_lossy(r.body)
                ));
            }
        }
        Ok::<(), String>(())
    })?;
    let users = plan.users as u64;
    let warmup = runtime.block_on(stream_traffic(
        addr,
        shop.clone(),
        |_| Visitors::Random {
            first: users,
            count: WARMUP_VISITORS,
        },
        LOAD_CONNECTIONS,
        plan.warmup_events / LOAD_CONNECTIONS,
        opts.seed ^ 0x77,
        &ids,
    ));
    warmup.check("catalogue warm-up")?;
    wait_applied(addr, Duration::from_secs(300))?;
    let rss_items = server.rss_bytes()?;
    progress(
        started,
        format!(
            "catalogue of {} items and {} warm-up events loaded ({}/s)",
            plan.items,
            warmup.events,
            human_rate(warmup.events_per_sec())
        ),
    );
    let workers = LOAD_CONNECTIONS as u64;
    let population = runtime.block_on(stream_traffic(
        addr,
        shop.clone(),
        |w| Visitors::EachOnce {
            first: w,
            count: users / workers + u64::from(w < users % workers),
            step: workers,
        },
        LOAD_CONNECTIONS,
        usize::MAX,
        opts.seed ^ 0x99,
        &ids,
    ));
    population.check("loading users")?;
    wait_applied(addr, Duration::from_secs(600))?;
    let rss_loaded = server.rss_bytes()?;
    let g = gauges(addr)?;
    report.state_profiles = g.users as u64;
    report.load_events = warmup.events + population.events;
    report.load_events_per_sec =
        report.load_events as f64 / load_started.elapsed().as_secs_f64().max(1e-9);
    progress(
        started,
        format!(
            "{} users loaded with {} events ({}/s); {} profiles; RSS {} MiB",
            plan.users,
            population.events,
            human_rate(population.events_per_sec()),
            report.state_profiles,
            rss_loaded >> 20
        ),
    );
    if wants(Scenario::Memory) {
        report.rss_empty_bytes = Some(rss_empty);
        report.rss_loaded_bytes = Some(rss_loaded);
        report.bytes_per_item =
            Some(rss_items.saturating_sub(rss_empty) as f64 / plan.items as f64);
        report.bytes_per_user =
            Some(rss_loaded.saturating_sub(rss_items) as f64 / plan.users as f64);
    }

    // What the ingest, serve and freshness scenarios share (recovery restarts the server, so it
    // takes its pieces one by one).
    let ctx = RunContext {
        runtime: &runtime,
        addr,
        shop: &shop,
        plan: &plan,
        seed: opts.seed,
        ids: &ids,
        started,
    };
    if wants(Scenario::Ingest) {
        ingest_runs(&ctx, &mut report)?;
    }

    if wants(Scenario::Serve) || wants(Scenario::Freshness) {
        let stop = Arc::new(AtomicBool::new(false));
        let pool = ingest_pool(
            &shop,
            opts.seed ^ 0xb6,
            BACKGROUND_BATCH,
            plan.pool_events / 4,
        );
        let background = runtime.spawn(load::run(
            addr,
            post_jobs("/v1/batch", &pool, 8, &ids),
            Schedule::open(plan.background_events_per_sec / BACKGROUND_BATCH as f64),
            Until::Stopped(Arc::clone(&stop)),
        ));
        std::thread::sleep(Duration::from_millis(500));
        if wants(Scenario::Serve) {
            serve_runs(&ctx, &mut report)?;
        }
        if wants(Scenario::Freshness) {
            freshness(&ctx, &mut report)?;
        }
        stop.store(true, Ordering::Relaxed);
        let background = runtime
            .block_on(background)
            .map_err(|e| format!("background ingest: {e}"))?;
        background.check("background ingest")?;
        report.background_events_per_sec = Some(background.events_per_sec());
        wait_applied(addr, Duration::from_secs(300))?;
    }

    if wants(Scenario::Recovery) {
        server = recovery(
            &runtime,
            server,
            &launch,
            &data_dir,
            &server_log,
            &shop,
            &plan,
            opts,
            &ids,
            &mut report,
            started,
        )?;
    }
    server.terminate()?;

    if wants(Scenario::Recovery) {
        let config =
            crate::config::load(opts.config.as_deref(), std::env::vars(), toml::Table::new())?
                .embedded_log_config()?;
        let read = disk::read_log(&data_dir.join("log"), config, 1024)?;
        report.log_read_secs = Some(read.elapsed.as_secs_f64());
        report.log_read_events_per_sec = Some(read.records_per_sec());
        progress(
            started,
            format!(
                "log read: {} records in {:.2} s ({}/s)",
                read.records,
                read.elapsed.as_secs_f64(),
                human_rate(read.records_per_sec())
            ),
        );
    }
    report.duration_secs = started.elapsed().as_secs_f64();
    progress(started, "done");
    Ok(report)
}

/// The server under test and the traffic the scenarios draw from.
#[derive(Clone, Copy)]
struct RunContext<'a> {
    runtime: &'a tokio::runtime::Runtime,
    addr: SocketAddr,
    shop: &'a Arc<Shop>,
    plan: &'a Plan,
    seed: u64,
    ids: &'a Arc<AtomicU64>,
    started: Instant,
}

fn ingest_runs(ctx: &RunContext, report: &mut Report) -> Result<(), String> {
    let RunContext {
        runtime,
        addr,
        shop,
        plan,
        seed,
        ids,
        started,
    } = *ctx;
    for (batch, connections) in INGEST_RUNS {
        let pool = ingest_pool(shop, seed ^ batch as u64, batch, plan.pool_events);
        report.mean_event_bytes = mean_event_bytes(&pool);
        let ceiling = runtime.block_on(load::run(
            addr,
            post_jobs("/v1/validate", &pool, connections, ids),
            Schedule::Closed,
            Until::Deadline(Instant::now() + plan.ingest_ceiling),
        ));
        ceiling.check("ingest ceiling (/v1/validate)")?;
        let before = gauges(addr)?;
        let mut run = runtime.block_on(load::run(
            addr,
            post_jobs("/v1/batch", &pool, connections, ids),
            Schedule::Closed,
            Until::Deadline(Instant::now() + plan.ingest),
        ));
        let after = gauges(addr)?;
        run.check("ingest")?;
        let name = format!("durable ingest at batch {batch}");
        note_snapshot(ctx, report, &name, before.snapshot, after.snapshot);
        let catch_up = wait_applied(addr, Duration::from_secs(600))?;
        let lat = run.latencies.summary();
        let figures = IngestFigures {
            batch,
            connections,
            events_per_sec: run.events_per_sec(),
            ceiling_events_per_sec: ceiling.events_per_sec(),
            ratio: run.events_per_sec() / ceiling.events_per_sec().max(1e-9),
            p50_us: lat.p50_us,
            p99_us: lat.p99_us,
            applied_events_per_sec: (after.applied_seq - before.applied_seq)
                / run.elapsed.as_secs_f64().max(1e-9),
            catch_up_ms: catch_up.as_millis() as u64,
        };
        progress(
            started,
            format!(
                "ingest batch {batch:>3}: {} events/s durable (p50 {}, p99 {}), ceiling {} events/s ({:.0}%), processor {} events/s, caught up {} ms after",
                human_rate(figures.events_per_sec),
                human_us(figures.p50_us),
                human_us(figures.p99_us),
                human_rate(figures.ceiling_events_per_sec),
                figures.ratio * 100.0,
                human_rate(figures.applied_events_per_sec),
                figures.catch_up_ms
            ),
        );
        if batch == 100 {
            report.ingest_events_per_sec = Some(figures.events_per_sec);
            report.ingest_ceiling_events_per_sec = Some(figures.ceiling_events_per_sec);
            report.ingest_p50_us = Some(figures.p50_us);
            report.ingest_p99_us = Some(figures.p99_us);
            let g = gauges(addr)?;
            let record_bytes = g.log_bytes / g.committed_seq.max(1.0);
            if let Some(mb) = report.disk_append_fsync_mb_per_sec {
                report.disk_ceiling_events_per_sec = Some(mb * 1e6 / record_bytes.max(1.0));
            }
        }
        report.ingest.push(figures);
    }
    Ok(())
}

fn serve_runs(ctx: &RunContext, report: &mut Report) -> Result<(), String> {
    let RunContext {
        runtime,
        addr,
        shop,
        plan,
        seed,
        started,
        ..
    } = *ctx;
    let mut rng = Rng::new(seed ^ 0x5e);
    let for_you: Arc<Vec<String>> = Arc::new(
        (0..50_000)
            .map(|_| {
                let user = rng.below(shop.size.users as u64);
                format!(
                    "/v1/recommendations?scenario=for_you&{}&k=10",
                    visitor_query(user)
                )
            })
            .collect(),
    );
    let similar: Arc<Vec<String>> = Arc::new(
        (0..50_000)
            .map(|_| {
                let item = rng.zipf(shop.size.items as u64);
                format!("/v1/recommendations?scenario=similar&item_id=p{item}&k=10")
            })
            .collect(),
    );
    let connections = plan.serve_connections;
    let fixed = |paths: &Arc<Vec<String>>| {
        runtime.block_on(load::run(
            addr,
            get_jobs(paths, connections),
            Schedule::open(plan.serve_rate),
            Until::Deadline(Instant::now() + plan.serve_fixed),
        ))
    };
    let max = |paths: &Arc<Vec<String>>| {
        runtime.block_on(load::run(
            addr,
            get_jobs(paths, connections),
            Schedule::Closed,
            Until::Deadline(Instant::now() + plan.serve_max),
        ))
    };
    let healthz = Arc::new(vec!["/healthz".to_owned()]);

    let mut run = window(ctx, report, "for_you at a fixed rate", || fixed(&for_you))?;
    run.check("for_you at a fixed rate")?;
    let l = run.latencies.summary();
    report.serve_rate = Some(plan.serve_rate);
    report.serve_p50_us = Some(l.p50_us);
    report.serve_p99_us = Some(l.p99_us);
    report.serve_p999_us = Some(l.p999_us);
    progress(
        started,
        format!(
            "for_you at {} req/s: p50 {}, p99 {}, p99.9 {} ({} requests)",
            plan.serve_rate,
            human_us(l.p50_us),
            human_us(l.p99_us),
            human_us(l.p999_us),
            l.count
        ),
    );
    let run = window(ctx, report, "for_you at maximum throughput", || {
        max(&for_you)
    })?;
    run.check("for_you at maximum throughput")?;
    report.serve_max_rps = Some(run.requests_per_sec());

    let mut run = window(ctx, report, "similar at a fixed rate", || fixed(&similar))?;
    run.check("similar at a fixed rate")?;
    let l = run.latencies.summary();
    report.similar_p50_us = Some(l.p50_us);
    report.similar_p99_us = Some(l.p99_us);
    report.similar_p999_us = Some(l.p999_us);
    let run = window(ctx, report, "similar at maximum throughput", || {
        max(&similar)
    })?;
    run.check("similar at maximum throughput")?;
    report.similar_max_rps = Some(run.requests_per_sec());
    progress(
        started,
        format!(
            "similar at {} req/s: p50 {}, p99 {}, p99.9 {}",
            plan.serve_rate,
            human_us(l.p50_us),
            human_us(l.p99_us),
            human_us(l.p999_us),
        ),
    );

    let run = window(
        ctx,
        report,
        "the empty handler at maximum throughput",
        || max(&healthz),
    )?;
    run.check("empty handler at maximum throughput")?;
    report.serve_ceiling_rps = Some(run.requests_per_sec());
    progress(
        started,
        format!(
            "max throughput: for_you {} req/s, similar {} req/s, empty handler {} req/s",
            human_rate(report.serve_max_rps.unwrap_or(0.0)),
            human_rate(report.similar_max_rps.unwrap_or(0.0)),
            human_rate(run.requests_per_sec())
        ),
    );
    Ok(())
}

/// Freshness probes: a new visitor views a product; from the acknowledgement, `for_you` is asked
/// until its answer reflects the view (the session strategy appears instead of the cold-start
/// fallback). Background ingest keeps running meanwhile.
fn freshness(ctx: &RunContext, report: &mut Report) -> Result<(), String> {
    let mut lat = window(ctx, report, "the freshness probes", || {
        ctx.runtime.block_on(freshness_probes(ctx))
    })??;
    let l = lat.summary();
    report.freshness_p50_us = Some(l.p50_us);
    report.freshness_p99_us = Some(l.p99_us);
    report.freshness_max_us = Some(l.max_us);
    progress(
        ctx.started,
        format!(
            "freshness under ingest: p50 {}, p99 {}, max {} ({} probes)",
            human_us(l.p50_us),
            human_us(l.p99_us),
            human_us(l.max_us),
            l.count
        ),
    );
    Ok(())
}

/// The probes of [`freshness`]: the time from each view's acknowledgement to the first `for_you`
/// that reflects it.
async fn freshness_probes(ctx: &RunContext<'_>) -> Result<Latencies, String> {
    let RunContext {
        addr,
        shop,
        plan,
        seed,
        ids,
        ..
    } = *ctx;
    let mut rng = Rng::new(seed ^ 0xf7);
    let mut conn = Conn::connect(addr)
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let mut lat = Latencies::default();
    for n in 0..plan.freshness_probes {
        let visitor = format!("fresh-{seed:x}-{n}");
        let item = rng.zipf(shop.size.items as u64);
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let body = format!(
            r#"{{"batch":[{{"type":"track","event":"product_view","anonymousId":"{visitor}","messageId":"probe-{id:x}","properties":{{"product_id":"p{item}"}},"context":{{"sessionId":"{visitor}-1"}}}}]}}"#
        );
        let r = conn
            .post("/v1/batch", body.as_bytes())
            .await
            .map_err(|e| format!("freshness probe: {e}"))?;
        if r.status != 200 {
            return Err(format!("freshness probe: HTTP {}", r.status));
        }
        let acked = Instant::now();
        let path = format!("/v1/recommendations?anonymous_id={visitor}&k=10");
        loop {
            let r = conn
                .get(&path)
                .await
                .map_err(|e| format!("freshness probe: {e}"))?;
            let v: serde_json::Value = serde_json::from_slice(r.body)
                .map_err(|e| format!("freshness probe answer: {e}"))?;
            let reflected = v["strategy"]
                .as_str()
                .is_some_and(|s| s.starts_with("session_knn"));
            if reflected {
                lat.record(acked.elapsed());
                break;
            }
            if acked.elapsed() > Duration::from_secs(10) {
                return Err(format!(
                    "freshness probe: the view of {visitor} was not reflected after 10 s"
                ));
            }
        }
        // Spread the probes over time so they sample the processor in every phase.
        tokio::time::sleep(Duration::from_micros(rng.below(5000))).await;
    }
    Ok(lat)
}

/// Fills the log to the recovery size, kills the server (SIGKILL) and times the restart; then
/// times a restart without any snapshot (a replay of the whole log). Returns the running server.
#[allow(clippy::too_many_arguments)]
fn recovery(
    runtime: &tokio::runtime::Runtime,
    server: Server,
    launch: &Launch,
    data_dir: &Path,
    server_log: &Path,
    shop: &Arc<Shop>,
    plan: &Plan,
    opts: &BenchOptions,
    ids: &Arc<AtomicU64>,
    report: &mut Report,
    started: Instant,
) -> Result<Server, String> {
    let addr = server.addr;
    let committed = gauges(addr)?.committed_seq as u64;
    if committed < plan.recovery_events {
        let missing = plan.recovery_events - committed;
        progress(
            started,
            format!("filling the log with {missing} more events for the recovery test"),
        );
        let pool = ingest_pool(shop, opts.seed ^ 0x4ec, 100, plan.pool_events);
        let run = runtime.block_on(load::run(
            addr,
            post_jobs("/v1/batch", &pool, 32, ids),
            Schedule::Closed,
            Until::Requests(Arc::new(AtomicU64::new(0)), missing.div_ceil(100)),
        ));
        run.check("filling the log")?;
    }
    wait_applied(addr, Duration::from_secs(600))?;
    let events = gauges(addr)?.committed_seq as u64;
    report.recovery_events = Some(events);

    server.kill();
    let t = Instant::now();
    let mut server = Server::start(launch, data_dir, server_log)?;
    server.wait_ready(Duration::from_secs(900))?;
    let recovery = t.elapsed();
    report.recovery_secs = Some(recovery.as_secs_f64());
    progress(
        started,
        format!(
            "restart after SIGKILL with {events} events in the log: ready in {:.2} s",
            recovery.as_secs_f64()
        ),
    );

    server.kill();
    let state = data_dir.join("state");
    std::fs::rename(&state, data_dir.join("state-before-replay"))
        .map_err(|e| format!("moving {} aside: {e}", state.display()))?;
    let t = Instant::now();
    let mut server = Server::start(launch, data_dir, server_log)?;
    server.wait_ready(Duration::from_secs(900))?;
    let replay = t.elapsed();
    report.replay_secs = Some(replay.as_secs_f64());
    report.replay_events_per_sec = Some(events as f64 / replay.as_secs_f64().max(1e-9));
    progress(
        started,
        format!(
            "restart without a snapshot (replay of all {events} events): ready in {:.2} s ({}/s)",
            replay.as_secs_f64(),
            human_rate(events as f64 / replay.as_secs_f64().max(1e-9))
        ),
    );
    Ok(server)
}

/// GET `paths` (round robin) at `addr` for `duration` over `connections` connections, at `rate`
/// requests/s (open loop) or as fast as answered (closed loop): the figures as one JSON object.
/// Fails if any request fails.
pub fn drive(
    addr: std::net::SocketAddr,
    paths: Vec<String>,
    rate: Option<f64>,
    duration: Duration,
    connections: usize,
) -> Result<String, String> {
    if paths.is_empty() {
        return Err("no request paths to send".into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting runtime: {e}"))?;
    let paths = Arc::new(paths);
    let schedule = rate.map_or(Schedule::Closed, Schedule::open);
    let mut run = runtime.block_on(load::run(
        addr,
        get_jobs(&paths, connections),
        schedule,
        Until::Deadline(Instant::now() + duration),
    ));
    run.check("the load run")?;
    let l = run.latencies.summary();
    Ok(serde_json::json!({
        "requests": run.ok,
        "requests_per_sec": run.requests_per_sec(),
        "p50_us": l.p50_us,
        "p99_us": l.p99_us,
        "p999_us": l.p999_us,
        "max_us": l.max_us,
    })
    .to_string())
}

fn opt_rate(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_owned(), human_rate)
}

fn opt_us(x: Option<u64>) -> String {
    x.map_or_else(|| "-".to_owned(), human_us)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.0}%", 100.0 * a / b),
        _ => "-".to_owned(),
    }
}

impl Report {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut rows: Vec<[String; 4]> = Vec::new();
        for f in &self.ingest {
            rows.push([
                format!("ingest, batch {}", f.batch),
                format!(
                    "{} events/s durable; ack p50 {} p99 {}",
                    human_rate(f.events_per_sec),
                    human_us(f.p50_us),
                    human_us(f.p99_us)
                ),
                format!(
                    "{} events/s parse-and-discard",
                    human_rate(f.ceiling_events_per_sec)
                ),
                format!("{:.0}%", 100.0 * f.ratio),
            ]);
        }
        if self.disk_append_fsync_mb_per_sec.is_some() {
            rows.push([
                "disk".to_owned(),
                format!(
                    "fdatasync p50 {} p99 {}",
                    opt_us(self.disk_fdatasync_p50_us),
                    opt_us(self.disk_fdatasync_p99_us)
                ),
                format!(
                    "{:.0} MB/s append+fdatasync = {} events/s",
                    self.disk_append_fsync_mb_per_sec.unwrap_or(0.0),
                    opt_rate(self.disk_ceiling_events_per_sec)
                ),
                ratio(self.ingest_events_per_sec, self.disk_ceiling_events_per_sec),
            ]);
        }
        if self.serve_p99_us.is_some() {
            rows.push([
                format!("for_you at {} req/s", opt_rate(self.serve_rate)),
                format!(
                    "p50 {} p99 {} p99.9 {}",
                    opt_us(self.serve_p50_us),
                    opt_us(self.serve_p99_us),
                    opt_us(self.serve_p999_us)
                ),
                String::new(),
                String::new(),
            ]);
            rows.push([
                "for_you max".to_owned(),
                format!("{} req/s", opt_rate(self.serve_max_rps)),
                format!("{} req/s empty handler", opt_rate(self.serve_ceiling_rps)),
                ratio(self.serve_max_rps, self.serve_ceiling_rps),
            ]);
            rows.push([
                format!("similar at {} req/s", opt_rate(self.serve_rate)),
                format!(
                    "p50 {} p99 {} p99.9 {}",
                    opt_us(self.similar_p50_us),
                    opt_us(self.similar_p99_us),
                    opt_us(self.similar_p999_us)
                ),
                String::new(),
                String::new(),
            ]);
            rows.push([
                "similar max".to_owned(),
                format!("{} req/s", opt_rate(self.similar_max_rps)),
                format!("{} req/s empty handler", opt_rate(self.serve_ceiling_rps)),
                ratio(self.similar_max_rps, self.serve_ceiling_rps),
            ]);
        }
        if self.freshness_p99_us.is_some() {
            rows.push([
                "freshness".to_owned(),
                format!(
                    "ack -> reflected p50 {} p99 {}",
                    opt_us(self.freshness_p50_us),
                    opt_us(self.freshness_p99_us)
                ),
                String::new(),
                String::new(),
            ]);
        }
        if let (Some(u), Some(i)) = (self.bytes_per_user, self.bytes_per_item) {
            rows.push([
                "memory".to_owned(),
                format!("{u:.0} B per user, {i:.0} B per item"),
                format!(
                    "RSS {} MiB loaded",
                    self.rss_loaded_bytes.unwrap_or(0) >> 20
                ),
                String::new(),
            ]);
        }
        if let (Some(events), Some(rec), Some(rep)) =
            (self.recovery_events, self.recovery_secs, self.replay_secs)
        {
            rows.push([
                format!("recovery, {} events", human_rate(events as f64)),
                format!("restart {rec:.1} s; full replay {rep:.1} s"),
                format!(
                    "log read {} events/s ({:.1} s)",
                    opt_rate(self.log_read_events_per_sec),
                    self.log_read_secs.unwrap_or(0.0)
                ),
                ratio(self.replay_events_per_sec, self.log_read_events_per_sec),
            ]);
        }
        let widths: Vec<usize> = (0..4)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = format!(
            "Kairos bench ({}): {} cores ({}), {} users / {} items of state, {:.0} B per event, {:.0} s\n",
            self.mode,
            self.cores,
            self.cpu,
            human_rate(self.users as f64),
            human_rate(self.items as f64),
            self.mean_event_bytes,
            self.duration_secs
        );
        let header = ["scenario", "figure", "ceiling (same run)", "ratio"];
        for (c, h) in header.iter().enumerate() {
            out.push_str(&format!("{h:<w$}  ", w = widths[c].max(h.len())));
        }
        out.push('\n');
        for r in &rows {
            for (c, cell) in r.iter().enumerate() {
                let w = widths[c].max(header[c].len());
                out.push_str(cell);
                out.push_str(&" ".repeat(w - cell.chars().count() + 2));
            }
            out.push('\n');
        }
        if !self.snapshot_windows.is_empty() {
            out.push_str(&format!(
                "a state snapshot was written during: {}\n",
                self.snapshot_windows.join("; ")
            ));
        }
        out
    }

    /// The report as one JSON object (one line).
    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("the report serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_parse() {
        for s in Scenario::ALL {
            assert_eq!(Scenario::parse(s.as_str()), Some(s));
        }
        assert_eq!(Scenario::parse("nope"), None);
    }

    #[test]
    fn a_snapshot_overlaps_a_window_if_it_ran_at_either_end_or_finished_in_between() {
        let mark = |written: f64, running: bool| SnapshotMark { written, running };
        assert!(!mark(3.0, false).overlaps(mark(3.0, false)));
        assert!(
            mark(3.0, true).overlaps(mark(4.0, false)),
            "ran before, finished in"
        );
        assert!(
            mark(3.0, false).overlaps(mark(3.0, true)),
            "started in, still running"
        );
        assert!(
            mark(3.0, false).overlaps(mark(4.0, false)),
            "started and finished in"
        );
        assert!(mark(3.0, true).overlaps(mark(3.0, true)), "ran all along");
    }

    #[test]
    fn report_has_the_required_json_keys() {
        let report = Report {
            ingest_events_per_sec: Some(1.0),
            ..Report::default()
        };
        let v: serde_json::Value = serde_json::from_str(&report.json()).unwrap();
        for key in [
            "ingest_events_per_sec",
            "ingest_ceiling_events_per_sec",
            "serve_p99_us",
            "serve_max_rps",
            "serve_ceiling_rps",
            "freshness_p99_us",
            "bytes_per_user",
            "bytes_per_item",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
        assert!(report.table().contains("scenario"));
    }
}
