//! The load generator: closed-loop runs for maximum throughput, open-loop runs at a fixed offered
//! rate for latency.
//!
//! **Closed loop** (`Schedule::Closed`): each connection sends its next request as soon as the
//! previous one is answered. The completed requests per second at saturation are the maximum
//! throughput.
//!
//! **Open loop** (`Schedule::Open`): request `i` is due at `t0 + i / rate`, whatever happened to
//! earlier ones, as real users arrive independently. Latency is measured from the moment the
//! request was due when the connection was still busy with an earlier one (so a stall counts
//! against every request it delayed, avoiding coordinated omission), and from the moment it was
//! sent otherwise (tokio's millisecond timer may wake a worker a little late, and that lateness is
//! the load generator's, not the server's). Enough connections are used that a connection is
//! normally idle when its next request is due.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::client::Conn;
use super::stats::Latencies;
use super::workload::Batch;

/// When a run ends.
#[derive(Clone)]
pub enum Until {
    Deadline(Instant),
    Stopped(Arc<AtomicBool>),
    /// After this many requests in all (shared counter).
    Requests(Arc<AtomicU64>, u64),
}

impl Until {
    fn reached(&self) -> bool {
        match self {
            Until::Deadline(d) => Instant::now() >= *d,
            Until::Stopped(flag) => flag.load(Ordering::Relaxed),
            Until::Requests(count, max) => count.fetch_add(1, Ordering::Relaxed) >= *max,
        }
    }
}

/// How requests are paced.
#[derive(Clone)]
pub enum Schedule {
    Closed,
    Open {
        t0: Instant,
        interval: Duration,
        next: Arc<AtomicU64>,
    },
}

impl Schedule {
    pub fn open(rate_per_sec: f64) -> Schedule {
        Schedule::Open {
            t0: Instant::now(),
            interval: Duration::from_secs_f64(1.0 / rate_per_sec.max(1e-3)),
            next: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// What each connection sends.
pub enum Job {
    /// `GET` of the paths, round robin from a per-worker start.
    Get { paths: Arc<Vec<String>> },
    /// `POST` of this worker's batches (cycled), each with fresh message ids from `ids`.
    Post {
        path: &'static str,
        batches: Vec<Batch>,
        ids: Arc<AtomicU64>,
    },
}

/// The outcome of a run (or of one connection's part of it).
#[derive(Debug, Default)]
pub struct RunResult {
    /// Requests answered with a 2xx status.
    pub ok: u64,
    /// Requests that failed: transport errors and non-2xx answers.
    pub errors: u64,
    /// Ingest answers that rejected some events.
    pub rejected: u64,
    /// Events in the acknowledged ingest requests.
    pub events: u64,
    pub latencies: Latencies,
    pub elapsed: Duration,
    /// First error message, for the report.
    pub first_error: Option<String>,
}

impl RunResult {
    pub fn requests_per_sec(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn merge(&mut self, other: RunResult) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.rejected += other.rejected;
        self.events += other.events;
        self.latencies.merge(other.latencies);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// An error if any request failed (the figures of a failing server are meaningless).
    pub fn check(&self, what: &str) -> Result<(), String> {
        if self.errors > 0 || self.rejected > 0 {
            return Err(format!(
                "{what}: {} failed requests, {} with rejected events (first error: {})",
                self.errors,
                self.rejected,
                self.first_error.as_deref().unwrap_or("none")
            ));
        }
        if self.ok == 0 {
            return Err(format!("{what}: no request completed"));
        }
        Ok(())
    }
}

/// Runs `jobs` (one connection each) against `addr` until `until`, paced by `schedule`.
pub async fn run(addr: SocketAddr, jobs: Vec<Job>, schedule: Schedule, until: Until) -> RunResult {
    let started = Instant::now();
    let workers = jobs.len();
    let handles: Vec<_> = jobs
        .into_iter()
        .enumerate()
        .map(|(w, job)| {
            let (schedule, until) = (schedule.clone(), until.clone());
            tokio::spawn(async move { worker(addr, w, workers, job, schedule, until).await })
        })
        .collect();
    let mut total = RunResult::default();
    for h in handles {
        match h.await {
            Ok(r) => total.merge(r),
            Err(e) => {
                total.errors += 1;
                total
                    .first_error
                    .get_or_insert(format!("worker failed: {e}"));
            }
        }
    }
    total.elapsed = started.elapsed();
    total
}

async fn connect(addr: SocketAddr) -> Result<Conn, String> {
    let mut last = String::new();
    for _ in 0..50 {
        match Conn::connect(addr).await {
            Ok(c) => return Ok(c),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("connecting to {addr}: {last}"))
}

async fn worker(
    addr: SocketAddr,
    w: usize,
    workers: usize,
    mut job: Job,
    schedule: Schedule,
    until: Until,
) -> RunResult {
    let mut result = RunResult::default();
    let mut conn = match connect(addr).await {
        Ok(c) => Some(c),
        Err(e) => {
            result.errors += 1;
            result.first_error = Some(e);
            return result;
        }
    };
    let mut n: usize = w;
    loop {
        let reference = match &schedule {
            Schedule::Closed => Instant::now(),
            Schedule::Open { t0, interval, next } => {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let due = *t0 + interval.mul_f64(i as f64);
                let now = Instant::now();
                if let Until::Deadline(end) = &until {
                    if due >= *end {
                        break;
                    }
                }
                if due > now {
                    tokio::time::sleep_until(due.into()).await;
                    Instant::now()
                } else {
                    due
                }
            }
        };
        if until.reached() {
            break;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match connect(addr).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    result.errors += 1;
                    result.first_error.get_or_insert(e);
                    break;
                }
            },
        };
        let outcome = match &mut job {
            Job::Get { paths } => {
                let path = &paths[n % paths.len()];
                c.get(path).await.map(|r| (r.status, 0, false))
            }
            Job::Post { path, batches, ids } => {
                let slot = (n / workers) % batches.len();
                let batch = &mut batches[slot];
                let events = batch.events();
                batch.refresh_ids(ids.fetch_add(events as u64, Ordering::Relaxed));
                c.post(path, &batch.body).await.map(|r| {
                    let rejected = !contains(r.body, b"\"rejected\":[]");
                    (r.status, events, rejected)
                })
            }
        };
        n += workers;
        match outcome {
            Ok((status, events, rejected)) if (200..300).contains(&status) => {
                result.ok += 1;
                result.events += events as u64;
                result.latencies.record(reference.elapsed());
                if rejected {
                    result.rejected += 1;
                }
            }
            Ok((status, _, _)) => {
                result.errors += 1;
                result
                    .first_error
                    .get_or_insert(format!("HTTP status {status}"));
            }
            Err(e) => {
                result.errors += 1;
                result.first_error.get_or_insert(e.to_string());
                conn = None;
            }
        }
    }
    result
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Deals `batches` round robin to `workers` POST jobs.
pub fn post_jobs(
    path: &'static str,
    batches: &[Batch],
    workers: usize,
    ids: &Arc<AtomicU64>,
) -> Vec<Job> {
    let workers = workers.clamp(1, batches.len().max(1));
    let mut per: Vec<Vec<Batch>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, b) in batches.iter().enumerate() {
        per[i % workers].push(b.clone());
    }
    per.into_iter()
        .map(|batches| Job::Post {
            path,
            batches,
            ids: Arc::clone(ids),
        })
        .collect()
}

/// `workers` GET jobs over the same paths.
pub fn get_jobs(paths: &Arc<Vec<String>>, workers: usize) -> Vec<Job> {
    (0..workers.max(1))
        .map(|_| Job::Get {
            paths: Arc::clone(paths),
        })
        .collect()
}
