//! The stream processor: log in, state out.
//!
//! One processor thread reads every partition of the log from the state's checkpoint, merges the
//! partitions by the log's global sequence number (so the state sees events in exactly the order
//! they were acknowledged, live and in a replay alike), decodes each record and applies it to the
//! [`StateStore`]. After each batch it publishes the applied sequence number on a [`Watermark`],
//! which the API waits on for read-your-writes.
//!
//! Checkpoints live inside the state (the next offset per partition), so a snapshot and its
//! checkpoint can never disagree. Snapshots are taken every `snapshot_interval_secs` (or
//! `snapshot_every_entries`) in the background ([`StateStore::begin_snapshot`]), so that applying
//! never stops for one, and synchronously on shutdown; after each one the log may drop segments
//! the snapshot covers (retention).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use kairos_log::{EventLog, Record};
use kairos_state::{LogPosition, SnapshotInfo, SnapshotJob, StateStore};
use kairos_types::metrics::{Counter, Histogram, Registry};
use kairos_types::LogEntry;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessorConfig {
    /// Records read from one partition per round.
    pub max_batch: usize,
    /// Seconds between snapshots (0 = only on shutdown).
    pub snapshot_interval_secs: u64,
    /// Take a snapshot early once this many entries were applied since the last one (0 = never).
    pub snapshot_every_entries: u64,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            max_batch: 1024,
            snapshot_interval_secs: 300,
            snapshot_every_entries: 5_000_000,
        }
    }
}

/// The sequence number up to which the state reflects the log.
#[derive(Clone)]
pub struct Watermark {
    tx: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Watermark {
    pub fn new(initial: u64) -> Watermark {
        Watermark {
            tx: Arc::new(tokio::sync::watch::channel(initial).0),
        }
    }

    pub fn get(&self) -> u64 {
        *self.tx.borrow()
    }

    fn publish(&self, seq: u64) {
        self.tx.send_if_modified(|v| {
            let changed = seq > *v;
            *v = (*v).max(seq);
            changed
        });
    }

    /// Waits until the state reflects at least `seq`, or `timeout` passes. Returns whether it does.
    pub async fn wait_for(&self, seq: u64, timeout: Duration) -> bool {
        if self.get() >= seq {
            return true;
        }
        let mut rx = self.tx.subscribe();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|v| *v >= seq))
            .await
            .is_ok_and(|r| r.is_ok());
        reached
    }

    /// Blocking variant for threads outside the async runtime.
    pub fn wait_for_blocking(&self, seq: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.get() < seq {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }
}

/// Processor metrics.
pub struct ProcessorMetrics {
    pub entries_applied: Arc<Counter>,
    pub undecodable: Arc<Counter>,
    pub event_to_state: Arc<Histogram>,
    pub snapshots: Arc<Counter>,
    pub snapshot_duration: Arc<Histogram>,
}

impl ProcessorMetrics {
    pub fn new(registry: &Registry) -> ProcessorMetrics {
        ProcessorMetrics {
            entries_applied: registry.counter(
                "kairos_processor_entries_applied_total",
                "Log entries applied to the state.",
                &[],
            ),
            undecodable: registry.counter(
                "kairos_processor_undecodable_total",
                "Log records that could not be decoded and were skipped.",
                &[],
            ),
            event_to_state: registry.histogram(
                "kairos_event_to_state_seconds",
                "Time from an event's receipt by the API to its application to the state.",
                &[],
            ),
            snapshots: registry.counter("kairos_snapshots_total", "State snapshots written.", &[]),
            snapshot_duration: registry.histogram(
                "kairos_snapshot_duration_seconds",
                "Time to write one state snapshot.",
                &[],
            ),
        }
    }
}

/// Entries applied per acquisition of the state's write lock: at a million users an entry takes up
/// to ~20 µs, so a read waits at most a few hundred µs for a chunk.
const APPLY_CHUNK: usize = 16;

/// Work the processor does on the state after applying (under a read lock, so reads go on):
/// refreshing derived caches off the request path.
pub type Maintenance = Box<dyn Fn(&kairos_state::State) + Send>;

/// Reads the log in global order and applies it to the state.
pub struct Processor {
    log: Arc<dyn EventLog>,
    store: Arc<dyn StateStore>,
    config: ProcessorConfig,
    watermark: Watermark,
    metrics: Arc<ProcessorMetrics>,
    offsets: Vec<u64>,
    since_snapshot: u64,
    last_snapshot: Instant,
    /// Buffers of `step`, reused so that a busy processor does not allocate (and glibc does not
    /// consolidate) a megabyte of batch per round.
    records: Vec<Record>,
    entries: Vec<(LogPosition, LogEntry)>,
    /// The snapshot being written in the background, and when it was started.
    snapshot_job: Option<(SnapshotJob, Instant)>,
    maintenance: Option<Maintenance>,
}

impl Processor {
    pub fn new(
        log: Arc<dyn EventLog>,
        store: Arc<dyn StateStore>,
        config: ProcessorConfig,
        watermark: Watermark,
        metrics: Arc<ProcessorMetrics>,
    ) -> Self {
        let mut offsets = store.checkpoint().offsets;
        let starts = log.start_offsets();
        offsets.resize(log.partition_count() as usize, 0);
        for (o, s) in offsets.iter_mut().zip(starts) {
            if *o < s {
                tracing::warn!(
                    offset = *o,
                    start = s,
                    "log retention passed the checkpoint; resuming at the earliest retained record"
                );
                *o = s;
            }
        }
        watermark.publish(store.checkpoint().seq);
        Processor {
            log,
            store,
            config,
            watermark,
            metrics,
            offsets,
            since_snapshot: 0,
            last_snapshot: Instant::now(),
            records: Vec::new(),
            entries: Vec::new(),
            snapshot_job: None,
            maintenance: None,
        }
    }

    /// Runs `work` on the state after every round that applied something, once live (not while
    /// replaying the log at start; see [`Maintenance`]).
    pub fn set_maintenance(&mut self, work: Maintenance) {
        self.maintenance = Some(work);
    }

    /// Applies every record committed so far. Returns how many entries were applied.
    pub fn catch_up(&mut self) -> Result<u64, String> {
        let mut total = 0;
        loop {
            let n = self.step()?;
            total += n;
            if n == 0 && self.watermark.get() >= self.log.committed_seq() {
                return Ok(total);
            }
        }
    }

    /// One round: reads what is committed, applies it in sequence order. Returns entries applied.
    pub fn step(&mut self) -> Result<u64, String> {
        let committed = self.log.committed_seq();
        let mut records = std::mem::take(&mut self.records);
        let mut entries = std::mem::take(&mut self.entries);
        records.clear();
        entries.clear();
        // Records beyond `limit` may be preceded by unread records of a partition whose read was
        // cut at max_batch; they wait for the next round so the global order holds.
        let mut limit = committed;
        for p in 0..self.log.partition_count() {
            let batch = self
                .log
                .read(p, self.offsets[p as usize], self.config.max_batch)
                .map_err(|e| format!("reading partition {p}: {e}"))?;
            if batch.len() >= self.config.max_batch {
                if let Some(last) = batch.last() {
                    limit = limit.min(last.seq);
                }
            }
            records.extend(batch);
        }
        records.retain(|r| r.seq <= limit);
        if records.is_empty() {
            self.records = records;
            self.entries = entries;
            return Ok(0);
        }
        records.sort_unstable_by_key(|r| r.seq);
        for r in &records {
            let pos = LogPosition {
                partition: r.partition,
                offset: r.offset,
                seq: r.seq,
            };
            match LogEntry::decode(&r.payload) {
                Ok(entry) => entries.push((pos, entry)),
                Err(e) => {
                    self.metrics.undecodable.inc();
                    tracing::error!(partition = r.partition, offset = r.offset, error = %e, "skipping undecodable log record");
                }
            }
        }
        // Apply in chunks: each takes the state's write lock once, so reads wait at most one
        // chunk, and the watermark advances chunk by chunk for the reads waiting on it.
        let mut applied = 0;
        for chunk in entries.chunks(APPLY_CHUNK) {
            applied += self.store.apply(chunk).applied;
            if let Some((pos, _)) = chunk.last() {
                self.watermark.publish(pos.seq);
            }
        }
        let now = kairos_types::time::now_ms();
        for (_, entry) in &entries {
            if let LogEntry::Event(e) = entry {
                self.metrics
                    .event_to_state
                    .observe_us(((now - e.received_at).max(0) as u64) * 1000);
            }
        }
        for r in &records {
            self.offsets[r.partition as usize] = r.offset + 1;
        }
        let last_seq = records.last().map_or(0, |r| r.seq);
        let read = records.len() as u64;
        self.metrics.entries_applied.add(applied as u64);
        self.since_snapshot += applied as u64;
        self.watermark.publish(last_seq);
        records.clear();
        entries.clear();
        self.records = records;
        self.entries = entries;
        Ok(read)
    }

    /// Writes a snapshot and lets the log drop what it covers.
    pub fn snapshot(&mut self) -> Result<(), String> {
        let started = Instant::now();
        self.since_snapshot = 0;
        self.last_snapshot = Instant::now();
        let info = self.store.snapshot().map_err(|e| e.to_string())?;
        self.snapshot_written(info, started);
        Ok(())
    }

    /// Starts a background snapshot (see [`StateStore::begin_snapshot`]).
    fn begin_snapshot(&mut self) {
        let started = Instant::now();
        self.since_snapshot = 0;
        self.last_snapshot = Instant::now();
        match self.store.begin_snapshot() {
            Ok(job) => self.snapshot_job = Some((job, started)),
            Err(e) => tracing::error!(error = %e, "snapshot failed"),
        }
    }

    /// Completes the background snapshot if it is done (or, with `block`, once it is).
    fn finish_snapshot(&mut self, block: bool) {
        let Some((mut job, started)) = self.snapshot_job.take() else {
            return;
        };
        let result = if block { Some(job.wait()) } else { job.poll() };
        match result {
            None => self.snapshot_job = Some((job, started)),
            Some(Ok(info)) => self.snapshot_written(info, started),
            Some(Err(e)) => tracing::error!(error = %e, "snapshot failed"),
        }
    }

    /// Records a written snapshot and lets the log drop the segments it covers.
    fn snapshot_written(&mut self, info: SnapshotInfo, started: Instant) {
        self.metrics.snapshots.inc();
        self.metrics.snapshot_duration.observe(started.elapsed());
        tracing::info!(
            seq = info.checkpoint.seq,
            bytes = info.bytes,
            ms = started.elapsed().as_millis() as u64,
            "snapshot written"
        );
        match self.log.enforce_retention(&info.checkpoint.offsets) {
            Ok(report) => tracing::debug!(?report, "retention enforced"),
            Err(e) => tracing::warn!(error = %e, "retention failed"),
        }
    }

    fn snapshot_due(&self) -> bool {
        if self.since_snapshot == 0 || self.snapshot_job.is_some() {
            return false;
        }
        let by_time = self.config.snapshot_interval_secs > 0
            && self.last_snapshot.elapsed()
                >= Duration::from_secs(self.config.snapshot_interval_secs);
        let by_count = self.config.snapshot_every_entries > 0
            && self.since_snapshot >= self.config.snapshot_every_entries;
        by_time || by_count
    }

    /// Runs until `stop` is set, then applies what is committed and snapshots.
    pub fn run(mut self, stop: Arc<AtomicBool>) -> Result<(), String> {
        while !stop.load(Ordering::Acquire) {
            let applied = self.step()?;
            // Live only: while replaying at start nobody reads, and event time runs fast.
            if applied > 0 {
                if let Some(work) = &self.maintenance {
                    work(&self.store.read());
                }
            }
            self.finish_snapshot(false);
            if self.snapshot_due() {
                self.begin_snapshot();
            }
            if applied == 0 {
                self.log
                    .wait_committed(self.watermark.get(), Duration::from_millis(50));
            }
        }
        self.finish_snapshot(true);
        self.catch_up()?;
        if self.since_snapshot > 0 {
            self.snapshot()?;
        }
        Ok(())
    }

    pub fn watermark(&self) -> &Watermark {
        &self.watermark
    }
}
