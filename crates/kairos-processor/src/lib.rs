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
use kairos_types::metrics::{Counter, Gauge, Histogram, Registry};
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
    /// 1 while a snapshot is being written: with `snapshots`, tells whether one overlapped a
    /// time window (a benchmark's measurement, a latency spike on a dashboard).
    pub snapshot_running: Arc<Gauge>,
    /// Partitions this processor owns in its consumer group (`kairos process`).
    pub partitions_owned: Arc<Gauge>,
    pub rebalances: Arc<Counter>,
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
            snapshot_running: registry.gauge(
                "kairos_snapshot_running",
                "1 while a state snapshot is being written, else 0.",
                &[],
            ),
            partitions_owned: registry.gauge(
                "kairos_group_partitions_owned",
                "Partitions this processor applies in its consumer group (kairos process; 0 elsewhere).",
                &[],
            ),
            rebalances: registry.counter(
                "kairos_group_rebalances_total",
                "Changes of this processor's partitions taken up (kairos process).",
                &[],
            ),
        }
    }
}

/// Entries applied per acquisition of the state's write lock: at a million users an entry takes up
/// to ~20 µs, so a read waits at most a few hundred µs for a chunk.
const APPLY_CHUNK: usize = 16;

/// Batches of at least this many records are decoded on a second thread while applied
/// ([`Processor::decode_and_apply_pipelined`]); smaller ones, the live case, are not worth a thread.
const PIPELINE_MIN_RECORDS: usize = 1024;
/// Records the decoding thread hands over at a time.
const PIPELINE_DECODE_CHUNK: usize = 256;

/// Decodes log records into entries; an undecodable record is counted, logged and skipped.
/// Decodes `records` into `out`, except (with `owned`, in a group) the events of partitions this
/// processor does not own: it would drop them decoded (see [`Partitioning::admit`]), and a
/// replica of four reads four times what it applies.
fn decode_records(
    records: &[Record],
    out: &mut Vec<(LogPosition, LogEntry)>,
    metrics: &ProcessorMetrics,
    owned: Option<&[bool]>,
) {
    for r in records {
        if owned.is_some_and(|o| !o.get(r.partition as usize).copied().unwrap_or(false))
            && LogEntry::is_encoded_event(&r.payload)
        {
            continue;
        }
        let pos = LogPosition {
            partition: r.partition,
            offset: r.offset,
            seq: r.seq,
        };
        match LogEntry::decode(&r.payload) {
            Ok(entry) => out.push((pos, entry)),
            Err(e) => {
                metrics.undecodable.inc();
                tracing::error!(partition = r.partition, offset = r.offset, error = %e, "skipping undecodable log record");
            }
        }
    }
}

/// Work the processor does on the state after applying (under a read lock, so reads go on):
/// refreshing derived caches off the request path.
pub type Maintenance = Box<dyn Fn(&kairos_state::State) + Send>;

/// What a processor that shares the log's partitions with other processors (a consumer group,
/// `kairos process`) needs beside the log: which events to apply, and what to forget when the
/// group moves partitions. Its state is not its own: profiles live in a store every processor
/// reads (Redis), fenced by log position, so the processor takes no snapshots.
pub trait Partitioning: Send {
    /// Removes from `entries` (decoded, in log order) the events this processor must not
    /// apply: those of partitions it does not own (`owned[partition]` is false), and those the
    /// stored state already reflects. Catalogue entries are applied by every processor. May
    /// load stored profiles into the state first.
    fn admit(
        &mut self,
        entries: &mut Vec<(LogPosition, LogEntry)>,
        owned: &[bool],
    ) -> Result<(), String>;

    /// The group moved partitions (assignment `generation`): the processor now also owns
    /// `gained` (partition, offset it resumes from) and no longer owns `released`. Profiles held
    /// for either may have changed elsewhere meanwhile, and the state's checkpoint of each gained
    /// partition goes back to where it resumes.
    fn reassigned(
        &mut self,
        generation: u64,
        gained: &[(u32, u64)],
        released: &[u32],
    ) -> Result<(), String>;

    /// Of the `owned` partitions, those whose stored state is gone (Redis restarted empty): they
    /// must be applied again from the start of the log. Called every round; may answer from a
    /// periodic check.
    fn lost(&mut self, owned: &[u32]) -> Result<Vec<u32>, String>;

    /// The processor re-reads `partitions` from the given offsets (the start of the log) to
    /// rebuild their lost state: forget what is held for them, as for a reassignment.
    fn rebuild(&mut self, partitions: &[(u32, u64)]) -> Result<(), String>;
}

/// Has the processor read each partition of `resume` again from its offset: the log forgets
/// where it was read (see [`EventLog::rewind`]), and `offsets`, the processor's read positions,
/// go back.
fn rewind(log: &dyn EventLog, offsets: &mut [u64], resume: &[(u32, u64)]) -> Result<(), String> {
    for &(p, from) in resume {
        log.rewind(p)
            .map_err(|e| format!("rewinding partition {p}: {e}"))?;
        offsets[p as usize] = from;
    }
    Ok(())
}

/// A processor's share of the partitions (see [`Partitioning`]).
struct Share {
    partitioning: std::sync::Mutex<Box<dyn Partitioning>>,
    /// Owned partitions, by index.
    owned: Vec<bool>,
    /// The assignment generation `owned` reflects.
    generation: u64,
}

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
    share: Option<Share>,
    /// False for a state kept nowhere but in memory (a processor replica's, whose profiles are in
    /// Redis; an API replica's, rebuilt from the model topic at every start).
    snapshots: bool,
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
            share: None,
            snapshots: true,
        }
    }

    /// Makes this processor one of a group sharing the log's partitions (see [`Partitioning`]).
    /// It owns nothing until the log reports an assignment.
    pub fn set_partitioning(&mut self, partitioning: Box<dyn Partitioning>) {
        self.snapshots = false;
        self.share = Some(Share {
            partitioning: std::sync::Mutex::new(partitioning),
            owned: vec![false; self.log.partition_count() as usize],
            generation: 0,
        });
    }

    /// Never snapshots the state: for a state kept only in memory (an API replica's).
    pub fn without_snapshots(&mut self) {
        self.snapshots = false;
    }

    /// Takes up a change of the group's assignment: partitions gained are re-read from the
    /// group's committed offsets (or the start of the partition), whatever this processor read
    /// of them while another owned them.
    fn follow_assignment(&mut self) -> Result<(), String> {
        let Some(share) = &mut self.share else {
            return Ok(());
        };
        let Some(assignment) = self.log.assignment() else {
            return Ok(());
        };
        if assignment.generation == share.generation {
            return self.rebuild_lost();
        }
        let mut owned = vec![false; share.owned.len()];
        for &p in &assignment.partitions {
            if let Some(o) = owned.get_mut(p as usize) {
                *o = true;
            }
        }
        let gained: Vec<u32> = (0..owned.len() as u32)
            .filter(|&p| owned[p as usize] && !share.owned[p as usize])
            .collect();
        let released: Vec<u32> = (0..owned.len() as u32)
            .filter(|&p| !owned[p as usize] && share.owned[p as usize])
            .collect();
        let committed = match self.log.committed_offsets(&gained) {
            Ok(committed) => committed,
            Err(e) => {
                // A group in the middle of a rebalance may not answer: keep the partitions as
                // they were (applying one another replica now owns as well only repeats its
                // writes, which the fences make harmless) and try again next round.
                tracing::warn!(error = %e, "reading the group's committed offsets failed; retrying");
                return Ok(());
            }
        };
        let starts = self.log.start_offsets();
        let resume: Vec<(u32, u64)> = gained
            .iter()
            .zip(committed)
            .map(|(&p, committed)| (p, committed.unwrap_or(0).max(starts[p as usize])))
            .collect();
        rewind(self.log.as_ref(), &mut self.offsets, &resume)?;
        share
            .partitioning
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reassigned(assignment.generation, &resume, &released)?;
        tracing::info!(generation = assignment.generation, gained = ?resume, released = ?released, "partitions reassigned");
        share.owned = owned;
        share.generation = assignment.generation;
        self.metrics
            .partitions_owned
            .set(assignment.partitions.len() as i64);
        self.metrics.rebalances.inc();
        // Before anything of a gained partition is applied: its profiles in Redis may be gone.
        self.rebuild_lost()
    }

    /// Re-reads from the start of the log the owned partitions whose stored state was lost.
    fn rebuild_lost(&mut self) -> Result<(), String> {
        let Some(share) = &mut self.share else {
            return Ok(());
        };
        let owned: Vec<u32> = (0..share.owned.len() as u32)
            .filter(|&p| share.owned[p as usize])
            .collect();
        let mut partitioning = share.partitioning.lock().unwrap_or_else(|e| e.into_inner());
        let lost = partitioning.lost(&owned)?;
        if lost.is_empty() {
            return Ok(());
        }
        let starts = self.log.start_offsets();
        let resume: Vec<(u32, u64)> = lost.iter().map(|&p| (p, starts[p as usize])).collect();
        rewind(self.log.as_ref(), &mut self.offsets, &resume)?;
        partitioning.rebuild(&resume)
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
            if n == 0 {
                let committed = self.log.committed_seq();
                if self.watermark.get() >= committed && self.log.caught_up() {
                    return Ok(total);
                }
                // A remote log still fetching what was there before it opened.
                self.log
                    .wait_committed(committed, Duration::from_millis(10));
            }
        }
    }

    /// One round: reads what is committed, applies it in sequence order. Returns entries applied.
    pub fn step(&mut self) -> Result<u64, String> {
        self.follow_assignment()?;
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
        let pipelined = if records.len() >= PIPELINE_MIN_RECORDS {
            self.decode_and_apply_pipelined(&records)
        } else {
            None
        };
        let applied = match pipelined {
            Some(applied) => applied?,
            None => {
                let owned = self.share.as_ref().map(|s| s.owned.as_slice());
                decode_records(&records, &mut entries, &self.metrics, owned);
                self.apply_decoded(&mut entries)?
            }
        };
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

    /// Applies decoded entries in chunks: each takes the state's write lock once, so reads wait
    /// at most one chunk, and the watermark advances chunk by chunk for the reads waiting on it.
    fn apply_decoded(&self, entries: &mut Vec<(LogPosition, LogEntry)>) -> Result<usize, String> {
        if let Some(share) = &self.share {
            share
                .partitioning
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .admit(entries, &share.owned)?;
        }
        let mut applied = 0;
        for chunk in entries.chunks(APPLY_CHUNK) {
            applied += self.store.apply(chunk).applied;
            if let Some((pos, _)) = chunk.last() {
                self.watermark.publish(pos.seq);
            }
        }
        let now = kairos_types::time::now_ms();
        for (_, entry) in entries {
            if let LogEntry::Event(e) = entry {
                self.metrics
                    .event_to_state
                    .observe_us(((now - e.received_at).max(0) as u64) * 1000);
            }
        }
        Ok(applied)
    }

    /// Decodes `records` on a second thread while this one applies what is already decoded, in
    /// order: a large batch (replay, catching up after a burst) then costs about the longer of
    /// decoding and applying instead of their sum, on the machine's second core. Applied entries
    /// go back to the decoding thread to be freed there, where they were allocated: freeing is a
    /// good part of decoding's cost, and glibc frees fastest into the allocating thread's arena.
    /// `None` (nothing decoded or applied) when no thread could be started.
    fn decode_and_apply_pipelined(&self, records: &[Record]) -> Option<Result<usize, String>> {
        type Decoded = Vec<(LogPosition, LogEntry)>;
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Decoded>(4);
            // Unbounded: the decoding thread drains it only between chunks, and a bound could
            // leave each thread waiting on the other.
            let (back_tx, back_rx) = std::sync::mpsc::channel::<Decoded>();
            let metrics = &self.metrics;
            let owned = self.share.as_ref().map(|s| s.owned.as_slice());
            let decoder = std::thread::Builder::new()
                .name("kairos-decode".into())
                .spawn_scoped(scope, move || {
                    for part in records.chunks(PIPELINE_DECODE_CHUNK) {
                        let mut decoded = match back_rx.try_recv() {
                            Ok(mut used) => {
                                used.clear();
                                used
                            }
                            Err(_) => Vec::with_capacity(part.len()),
                        };
                        decode_records(part, &mut decoded, metrics, owned);
                        if tx.send(decoded).is_err() {
                            return;
                        }
                    }
                    drop(tx);
                    // Until the applying side is done with the last chunks.
                    back_rx.iter().for_each(drop);
                });
            match decoder {
                Ok(_) => {
                    let mut applied = 0;
                    for mut decoded in rx {
                        match self.apply_decoded(&mut decoded) {
                            Ok(n) => applied += n,
                            // Dropping the receiver stops the decoding thread.
                            Err(e) => return Some(Err(e)),
                        }
                        // The decoding thread outlives this loop: a failed send only means it
                        // panicked, and then the entries are freed here.
                        let _ = back_tx.send(decoded);
                    }
                    drop(back_tx);
                    Some(Ok(applied))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no thread to decode on: decoding on the processor thread");
                    None
                }
            }
        })
    }

    /// Writes a snapshot and lets the log drop what it covers.
    pub fn snapshot(&mut self) -> Result<(), String> {
        let started = Instant::now();
        self.since_snapshot = 0;
        self.last_snapshot = Instant::now();
        self.metrics.snapshot_running.set(1);
        let written = self.store.snapshot();
        self.metrics.snapshot_running.set(0);
        self.snapshot_written(written.map_err(|e| e.to_string())?, started);
        Ok(())
    }

    /// Starts a background snapshot (see [`StateStore::begin_snapshot`]).
    fn begin_snapshot(&mut self) {
        let started = Instant::now();
        self.since_snapshot = 0;
        self.last_snapshot = Instant::now();
        self.metrics.snapshot_running.set(1);
        match self.store.begin_snapshot() {
            Ok(job) => self.snapshot_job = Some((job, started)),
            Err(e) => {
                self.metrics.snapshot_running.set(0);
                tracing::error!(error = %e, "snapshot failed");
            }
        }
    }

    /// Completes the background snapshot if it is done (or, with `block`, once it is).
    fn finish_snapshot(&mut self, block: bool) {
        let Some((mut job, started)) = self.snapshot_job.take() else {
            return;
        };
        let result = if block { Some(job.wait()) } else { job.poll() };
        if result.is_some() {
            self.metrics.snapshot_running.set(0);
        }
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
        if self.since_snapshot == 0 || self.snapshot_job.is_some() || !self.snapshots {
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
        if self.since_snapshot > 0 && self.snapshots {
            self.snapshot()?;
        }
        Ok(())
    }

    pub fn watermark(&self) -> &Watermark {
        &self.watermark
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_log::{AppendRecord, EmbeddedLog, EmbeddedLogConfig, FsyncPolicy};
    use kairos_state::store::EmbeddedStore;
    use kairos_state::{State, StateConfig};
    use kairos_types::event::{normalize_json, RequestContext};

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let path = std::env::temp_dir().join(format!(
                "kairos-processor-{name}-{}-{}",
                std::process::id(),
                kairos_types::time::now_ms()
            ));
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// `n` events of 97 visitors over 31 products: sessions, carts and purchases.
    fn entries(n: usize) -> Vec<LogEntry> {
        (0..n)
            .map(|i| {
                let user = i % 97;
                let product = (i * 7 + user) % 31;
                let event = match i % 10 {
                    7 => "add_to_cart",
                    9 => "purchase",
                    _ => "product_view",
                };
                let props = if event == "purchase" {
                    format!(r#"{{"products":[{{"product_id":"p{product}","price":3.5,"quantity":1}}]}}"#)
                } else {
                    format!(r#"{{"product_id":"p{product}","category":"c{}"}}"#, product % 5)
                };
                let raw = format!(
                    r#"{{"type":"track","event":"{event}","anonymousId":"a{user}","messageId":"m{i}","timestamp":{},"properties":{props}}}"#,
                    1_750_000_000_000i64 + i as i64 * 1000
                );
                let ctx = RequestContext {
                    received_at: 1_750_000_000_000 + i as i64 * 1000,
                    fallback_message_id: format!("f{i}"),
                    ..Default::default()
                };
                LogEntry::Event(normalize_json(&raw, &ctx).unwrap())
            })
            .collect()
    }

    /// A batch large enough to be decoded on a second thread gives exactly the state that
    /// applying the same entries one by one gives, and advances the watermark to the end.
    #[test]
    fn pipelined_catch_up_equals_applying_in_order() {
        let n = 3 * PIPELINE_MIN_RECORDS + 17;
        let entries = entries(n);
        let dir = TempDir::new("pipeline");
        let log = EmbeddedLog::open(
            &dir.0,
            EmbeddedLogConfig {
                partitions: 3,
                fsync: FsyncPolicy::Never,
                ..EmbeddedLogConfig::default()
            },
        )
        .unwrap();
        let records = entries
            .iter()
            .enumerate()
            .map(|(i, e)| AppendRecord {
                key: e.partition_key().as_bytes().to_vec(),
                timestamp_ms: 0,
                dedup_id: i as u64 + 1,
                payload: e.encode(),
                transaction: None,
            })
            .collect();
        log.append(records).wait().unwrap();
        let log: Arc<dyn EventLog> = Arc::new(log);
        let store = Arc::new(EmbeddedStore::in_memory(StateConfig::default()));
        let registry = kairos_types::metrics::Registry::default();
        let mut processor = Processor::new(
            log.clone(),
            store.clone(),
            ProcessorConfig {
                max_batch: 4096,
                ..ProcessorConfig::default()
            },
            Watermark::new(0),
            Arc::new(ProcessorMetrics::new(&registry)),
        );
        assert_eq!(processor.catch_up().unwrap(), n as u64);
        assert_eq!(processor.watermark().get(), n as u64);

        // The same entries in global (sequence) order, one by one.
        let mut by_seq = Vec::new();
        for p in 0..log.partition_count() {
            by_seq.extend(log.read(p, 0, n).unwrap());
        }
        by_seq.sort_unstable_by_key(|r| r.seq);
        let mut expected = State::new(StateConfig::default());
        for r in &by_seq {
            let pos = LogPosition {
                partition: r.partition,
                offset: r.offset,
                seq: r.seq,
            };
            expected.apply(pos, &LogEntry::decode(&r.payload).unwrap());
        }
        let got = serde_json::to_value(&*store.read()).unwrap();
        assert_eq!(got, serde_json::to_value(&expected).unwrap());
        assert_eq!(store.read().counters.entries_applied, n as u64);
    }

    /// `kairos_snapshot_running` is 1 exactly while a snapshot is being written, in the
    /// background (forked) and synchronously, and `kairos_snapshots_total` counts each one.
    #[test]
    fn the_running_gauge_covers_each_snapshot() {
        let dir = TempDir::new("snapshot-gauge");
        let log = EmbeddedLog::open(&dir.0.join("log"), EmbeddedLogConfig::default()).unwrap();
        let store =
            Arc::new(EmbeddedStore::open(&dir.0.join("state"), StateConfig::default()).unwrap());
        let registry = kairos_types::metrics::Registry::default();
        let metrics = Arc::new(ProcessorMetrics::new(&registry));
        let mut processor = Processor::new(
            Arc::new(log),
            store,
            ProcessorConfig::default(),
            Watermark::new(0),
            metrics.clone(),
        );
        assert_eq!(metrics.snapshot_running.get(), 0);
        processor.begin_snapshot();
        assert_eq!(metrics.snapshot_running.get(), 1);
        processor.finish_snapshot(true);
        assert_eq!(metrics.snapshot_running.get(), 0);
        assert_eq!(metrics.snapshots.get(), 1);
        processor.snapshot().unwrap();
        assert_eq!(metrics.snapshot_running.get(), 0);
        assert_eq!(metrics.snapshots.get(), 2);
    }
}
