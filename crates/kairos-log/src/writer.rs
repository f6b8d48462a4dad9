//! The writer thread: the log's single point of serialization.
//!
//! Every append goes through one thread, which makes ordering trivial: it
//! takes all queued requests at once, checks dedup ids, assigns partitions,
//! offsets and global sequence numbers in queue order, encodes the records
//! into one reusable buffer per partition, writes each buffer with a single
//! `write(2)`, fsyncs per [`FsyncPolicy`], publishes the new committed
//! offsets and only then completes the requests.
//!
//! Group commit falls out of this loop: while the thread waits in
//! `fdatasync`, new requests accumulate in the queue, and the next iteration
//! writes all of them and covers them with one more `fdatasync` per dirty
//! partition (issued concurrently by a small helper pool, so commit latency
//! does not grow with the partition count). The busier the log, the larger
//! the batches and the fewer the fsyncs per record.
//!
//! On an I/O error the thread fails the whole batch, marks the log failed
//! (further appends get [`LogError::WriterFailed`]) and exits: after a failed
//! `write` or `fdatasync` the kernel's view of the file is uncertain, so the
//! only safe continuation is to reopen and let recovery validate the tail.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::completion::Completer;
use crate::config::FsyncPolicy;
use crate::dedup::DedupSet;
use crate::embedded::Shared;
use crate::error::LogError;
use crate::frame::{self, frame_len};
use crate::partitioner::partition_for;
use crate::recovery::{PartitionState, RecoveredPartition};
use crate::segment::{create_segment_file, IndexBuilder, IndexEntry, Segment};
use crate::sync::{lock, write};
use crate::syncpool::SyncPool;
use crate::{AppendOutcome, AppendRecord};

/// What an append request resolves to.
pub(crate) type AppendResult = Result<Vec<AppendOutcome>, LogError>;

/// A partition buffer is written out early once it holds this many bytes, to
/// bound memory for very large batches.
const FLUSH_THRESHOLD_BYTES: usize = 1024 * 1024;

/// One append call waiting for the writer.
pub(crate) struct Request {
    pub(crate) records: Vec<AppendRecord>,
    pub(crate) completer: Completer<AppendResult>,
}

/// Lifecycle of the request queue.
#[derive(Debug)]
pub(crate) enum QueueState {
    Open,
    /// `close()` was called: queued requests are still written, new ones are
    /// refused.
    Closing,
    /// The writer stopped after an error (message) or panic.
    Failed(String),
}

/// Requests handed from appenders to the writer.
pub(crate) struct Queue {
    pub(crate) requests: Vec<Request>,
    /// Key and payload bytes in `requests`, for back-pressure.
    pub(crate) pending_bytes: u64,
    pub(crate) state: QueueState,
}

/// Writer-owned state of one partition.
struct PartitionWriter {
    id: u32,
    dir: PathBuf,
    /// The active segment, opened for appending; shared with the fsync
    /// helpers.
    file: Arc<File>,
    segment: Arc<Segment>,
    /// Bytes in the active segment, including bytes still in `buf`.
    size: u64,
    next_offset: u64,
    /// Value last stored into the partition's committed end offset.
    published_offset: u64,
    index: IndexBuilder,
    /// Index entries for records still in `buf`.
    pending_index: Vec<IndexEntry>,
    max_timestamp_ms: Option<i64>,
    last_seq: Option<u64>,
    /// Encoded records not yet written; reused across batches.
    buf: Vec<u8>,
    /// Written since the last fsync.
    unsynced: bool,
}

impl PartitionWriter {
    /// Encodes `record` into the buffer, rolling the segment first if the
    /// record does not fit. Returns the record's offset.
    fn append(
        &mut self,
        record: &AppendRecord,
        seq: u64,
        segment_bytes: u64,
        shared: &Shared,
    ) -> Result<u64, LogError> {
        let len = frame_len(record.payload.len()) as u64;
        if self.size > 0 && self.size + len > segment_bytes {
            self.roll(shared)?;
        }
        let offset = self.next_offset;
        if let Some(entry) = self.index.observe(offset, self.size) {
            self.pending_index.push(entry);
        }
        frame::encode(
            &mut self.buf,
            offset,
            seq,
            record.timestamp_ms,
            record.dedup_id,
            &record.payload,
        );
        self.size += len;
        self.next_offset += 1;
        self.last_seq = Some(seq);
        self.max_timestamp_ms = Some(
            self.max_timestamp_ms
                .map_or(record.timestamp_ms, |max| max.max(record.timestamp_ms)),
        );
        self.unsynced = true;
        if self.buf.len() >= FLUSH_THRESHOLD_BYTES {
            self.flush()?;
        }
        Ok(offset)
    }

    /// Writes the buffer to the active segment with one `write_all`.
    fn flush(&mut self) -> Result<(), LogError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        (&*self.file).write_all(&self.buf).map_err(|e| {
            LogError::io(format_args!("writing {}", self.segment.path().display()), e)
        })?;
        self.buf.clear();
        self.segment.record_written(
            self.size,
            &self.pending_index,
            self.max_timestamp_ms,
            self.last_seq,
            self.next_offset,
        );
        self.pending_index.clear();
        Ok(())
    }

    fn sync(&mut self, shared: &Shared) -> Result<(), LogError> {
        if !self.unsynced {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| {
            LogError::io(format_args!("fsync {}", self.segment.path().display()), e)
        })?;
        shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.unsynced = false;
        Ok(())
    }

    /// Closes the active segment (write + fsync) and starts a new one at the
    /// next offset (create + fsync of the directory), then makes it visible
    /// to readers. Readers still see only committed offsets, so publishing
    /// the empty segment early is harmless.
    fn roll(&mut self, shared: &Shared) -> Result<(), LogError> {
        self.flush()?;
        self.sync(shared)?;
        let (file, path) = create_segment_file(&self.dir, self.next_offset)?;
        shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        let segment = Arc::new(Segment::empty(self.next_offset, path));
        let state: &PartitionState = &shared.partitions[self.id as usize];
        write(&state.segments).push(Arc::clone(&segment));
        tracing::debug!(
            partition = self.id,
            base_offset = self.next_offset,
            "rolled event log segment"
        );
        self.file = Arc::new(file);
        self.segment = segment;
        self.size = 0;
        self.index = IndexBuilder::default();
        self.max_timestamp_ms = None;
        self.last_seq = None;
        Ok(())
    }
}

/// The writer thread's state.
pub(crate) struct Writer {
    shared: Arc<Shared>,
    partitions: Vec<PartitionWriter>,
    dedup: DedupSet,
    next_seq: u64,
    policy: FsyncPolicy,
    segment_bytes: u64,
    last_sync: Instant,
    sync_pool: SyncPool,
}

/// Writer-side parts of a recovered partition.
pub(crate) struct WriterPartition {
    id: u32,
    dir: PathBuf,
    file: File,
    segment: Arc<Segment>,
    size: u64,
    next_offset: u64,
    index: IndexBuilder,
    max_timestamp_ms: Option<i64>,
    last_seq: Option<u64>,
}

impl WriterPartition {
    /// Splits a recovered partition into its shared state and the part the
    /// writer owns.
    pub(crate) fn split(recovered: RecoveredPartition) -> (PartitionState, WriterPartition) {
        let writer = WriterPartition {
            id: recovered.state.id,
            dir: recovered.state.dir.clone(),
            file: recovered.active_file,
            segment: recovered.active,
            size: recovered.active_size,
            next_offset: recovered.next_offset,
            index: recovered.index_builder,
            max_timestamp_ms: recovered.active_max_timestamp_ms,
            last_seq: recovered.active_last_seq,
        };
        (recovered.state, writer)
    }
}

impl Writer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        partitions: Vec<WriterPartition>,
        dedup: DedupSet,
        next_seq: u64,
        policy: FsyncPolicy,
        segment_bytes: u64,
    ) -> Self {
        let partition_count = partitions.len();
        let partitions = partitions
            .into_iter()
            .map(|p| PartitionWriter {
                id: p.id,
                dir: p.dir,
                file: Arc::new(p.file),
                segment: p.segment,
                size: p.size,
                next_offset: p.next_offset,
                published_offset: p.next_offset,
                index: p.index,
                pending_index: Vec::new(),
                max_timestamp_ms: p.max_timestamp_ms,
                last_seq: p.last_seq,
                buf: Vec::new(),
                unsynced: false,
            })
            .collect();
        Writer {
            shared,
            partitions,
            dedup,
            next_seq,
            policy,
            segment_bytes,
            last_sync: Instant::now(),
            sync_pool: SyncPool::new(partition_count),
        }
    }

    /// Starts the writer thread. Its result is that of the final fsync at
    /// close, or the error that stopped it.
    pub(crate) fn spawn(self) -> Result<JoinHandle<Result<(), LogError>>, LogError> {
        thread::Builder::new()
            .name("kairos-log-writer".to_owned())
            .spawn(move || self.run())
            .map_err(|e| LogError::io("spawning the event log writer thread", e))
    }

    fn run(mut self) -> Result<(), LogError> {
        let mut guard = ExitGuard {
            shared: Arc::clone(&self.shared),
            failure: Some("the event log writer thread panicked".to_owned()),
        };
        let result = self.run_loop();
        guard.failure = result.as_ref().err().map(ToString::to_string);
        result
    }

    fn run_loop(&mut self) -> Result<(), LogError> {
        let mut batch = Vec::new();
        loop {
            let closing = self.take_batch(&mut batch);
            if !batch.is_empty() {
                self.process_batch(&mut batch)?;
            } else if closing {
                break;
            }
            self.sync_if_due()?;
        }
        // Whatever the policy, close leaves every record on stable storage.
        self.sync_all()
    }

    /// Waits for requests and moves all of them into `batch` (which is empty
    /// and gives its capacity back to the queue). Returns whether the log is
    /// closing. With [`FsyncPolicy::IntervalMs`] the wait is bounded so that
    /// an idle log still syncs on time.
    fn take_batch(&self, batch: &mut Vec<Request>) -> bool {
        let mut queue = lock(&self.shared.queue);
        loop {
            let open = matches!(queue.state, QueueState::Open);
            if !queue.requests.is_empty() {
                std::mem::swap(&mut queue.requests, batch);
                queue.pending_bytes = 0;
                return !open;
            }
            if !open {
                return true;
            }
            queue = match self.sync_deadline() {
                None => self
                    .shared
                    .queue_cv
                    .wait(queue)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                Some(deadline) => {
                    let Some(timeout) = deadline
                        .checked_duration_since(Instant::now())
                        .filter(|t| !t.is_zero())
                    else {
                        return false;
                    };
                    self.shared
                        .queue_cv
                        .wait_timeout(queue, timeout)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    fn process_batch(&mut self, batch: &mut Vec<Request>) -> Result<(), LogError> {
        let partition_count = self.partitions.len() as u32;
        let mut done: Vec<(Completer<AppendResult>, Vec<AppendOutcome>)> =
            Vec::with_capacity(batch.len());
        let mut failure = None;
        let mut appended = 0u64;
        let mut duplicates = 0u64;
        for Request { records, completer } in batch.drain(..) {
            if failure.is_some() {
                done.push((completer, Vec::new()));
                continue;
            }
            let mut outcomes = Vec::with_capacity(records.len());
            for record in &records {
                if self.dedup.is_duplicate(record.dedup_id) {
                    outcomes.push(AppendOutcome::Duplicate);
                    duplicates += 1;
                    continue;
                }
                let seq = self.next_seq;
                let partition = partition_for(&record.key, partition_count);
                let writer = &mut self.partitions[partition as usize];
                match writer.append(record, seq, self.segment_bytes, &self.shared) {
                    Ok(offset) => {
                        self.next_seq += 1;
                        self.dedup
                            .record_appended(record.dedup_id, record.timestamp_ms);
                        outcomes.push(AppendOutcome::Appended {
                            partition,
                            offset,
                            seq,
                        });
                        appended += 1;
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            done.push((completer, outcomes));
        }

        if failure.is_none() {
            failure = self.flush_all().err();
        }
        if failure.is_none() && self.policy == FsyncPolicy::Always {
            failure = self.sync_all().err();
        }
        if let Some(err) = failure {
            for (completer, _) in done {
                completer.complete(Err(err.duplicate()));
            }
            return Err(err);
        }

        if appended > 0 {
            self.publish();
        }
        let counters = &self.shared.counters;
        counters.appended.fetch_add(appended, Ordering::Relaxed);
        counters.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        counters.batches.fetch_add(1, Ordering::Relaxed);
        for (completer, outcomes) in done {
            completer.complete(Ok(outcomes));
        }
        Ok(())
    }

    fn flush_all(&mut self) -> Result<(), LogError> {
        self.partitions
            .iter_mut()
            .try_for_each(PartitionWriter::flush)
    }

    /// Writes out all buffers and fdatasyncs every dirty partition,
    /// concurrently (see [`SyncPool`]).
    fn sync_all(&mut self) -> Result<(), LogError> {
        self.flush_all()?;
        let dirty: Vec<usize> = (0..self.partitions.len())
            .filter(|&i| self.partitions[i].unsynced)
            .collect();
        let files: Vec<Arc<File>> = dirty
            .iter()
            .map(|&i| Arc::clone(&self.partitions[i].file))
            .collect();
        let results = self.sync_pool.sync_all(&files);
        let mut first_error = None;
        for (&i, result) in dirty.iter().zip(results) {
            let partition = &mut self.partitions[i];
            match result {
                Ok(()) => {
                    partition.unsynced = false;
                    self.shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    first_error.get_or_insert_with(|| {
                        LogError::io(
                            format_args!("fsync {}", partition.segment.path().display()),
                            e,
                        )
                    });
                }
            }
        }
        if let Some(err) = first_error {
            return Err(err);
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// When the next interval fsync is due, if one is pending.
    fn sync_deadline(&self) -> Option<Instant> {
        match self.policy {
            FsyncPolicy::IntervalMs(ms) if self.partitions.iter().any(|p| p.unsynced) => {
                Some(self.last_sync + Duration::from_millis(ms))
            }
            _ => None,
        }
    }

    fn sync_if_due(&mut self) -> Result<(), LogError> {
        match self.sync_deadline() {
            Some(deadline) if deadline <= Instant::now() => self.sync_all(),
            _ => Ok(()),
        }
    }

    /// Makes the batch visible: committed end offsets first, then the global
    /// sequence number (so a reader that observes `committed_seq() == s` finds
    /// every record with `seq <= s`), then wakes `wait_committed` callers.
    fn publish(&mut self) {
        for (partition, state) in self.partitions.iter_mut().zip(&self.shared.partitions) {
            if partition.published_offset != partition.next_offset {
                state
                    .end_offset
                    .store(partition.next_offset, Ordering::Release);
                partition.published_offset = partition.next_offset;
            }
        }
        let seq = self.next_seq - 1;
        {
            let mut committed = lock(&self.shared.committed);
            *committed = seq;
            self.shared.committed_seq.store(seq, Ordering::Release);
        }
        self.shared.committed_cv.notify_all();
    }
}

/// Runs when the writer thread exits, normally or by panic. On failure it
/// marks the queue failed and resolves every queued request with the error,
/// so no caller waits forever.
struct ExitGuard {
    shared: Arc<Shared>,
    failure: Option<String>,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let Some(message) = self.failure.take() else {
            return;
        };
        tracing::error!(
            error = %message,
            "event log writer stopped; appends fail until the log is reopened"
        );
        let pending = {
            let mut queue = lock(&self.shared.queue);
            queue.state = QueueState::Failed(message.clone());
            queue.pending_bytes = 0;
            std::mem::take(&mut queue.requests)
        };
        for request in pending {
            request
                .completer
                .complete(Err(LogError::WriterFailed(message.clone())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::completion::completion_pair;
    use crate::embedded::Counters;
    use std::sync::atomic::AtomicU64;
    use std::sync::{Condvar, Mutex};

    #[test]
    fn exit_guard_fails_queued_requests_and_the_queue() {
        let shared = Arc::new(Shared {
            partitions: Vec::new(),
            queue: Mutex::new(Queue {
                requests: Vec::new(),
                pending_bytes: 0,
                state: QueueState::Open,
            }),
            queue_cv: Condvar::new(),
            committed: Mutex::new(0),
            committed_cv: Condvar::new(),
            committed_seq: AtomicU64::new(0),
            counters: Counters::default(),
        });
        let (completer, completion) = completion_pair(|| Ok(Vec::new()));
        lock(&shared.queue).requests.push(Request {
            records: vec![AppendRecord::default()],
            completer,
        });
        drop(ExitGuard {
            shared: Arc::clone(&shared),
            failure: Some("disk on fire".to_owned()),
        });
        assert!(matches!(completion.wait(), Err(LogError::WriterFailed(m)) if m == "disk on fire"));
        assert!(matches!(
            &lock(&shared.queue).state,
            QueueState::Failed(m) if m == "disk on fire"
        ));
    }
}
