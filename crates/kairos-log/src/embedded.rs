//! [`EmbeddedLog`]: the on-disk [`EventLog`] implementation.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::completion::{completion_pair, Completion};
use crate::config::EmbeddedLogConfig;
use crate::dedup::DedupSet;
use crate::error::LogError;
use crate::frame::{FrameReader, ReadError, MAX_PAYLOAD_BYTES};
use crate::fsutil::sync_dir;
use crate::meta;
use crate::recovery::{open_partition, rebuild_dedup, PartitionState};
use crate::segment::Segment;
use crate::sync::{lock, read, write};
use crate::writer::{AppendResult, Queue, QueueState, Request, Writer, WriterPartition};
use crate::{AppendRecord, EventLog, LogStats, Record, RetentionReport};

/// Bounds of the positioned-read size of [`EventLog::read`], which is sized
/// from `max_records` assuming about [`READ_BYTES_PER_RECORD`] per record. The
/// lower bound covers the up to 8 KiB skipped after an index entry.
const MIN_READ_CHUNK_BYTES: usize = 16 * 1024;
const MAX_READ_CHUNK_BYTES: usize = 256 * 1024;
const READ_BYTES_PER_RECORD: usize = 512;

/// Monotonic counters reported by [`EventLog::stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) fsyncs: AtomicU64,
    pub(crate) appended: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) batches: AtomicU64,
}

/// State shared between the log handle, readers and the writer thread.
pub(crate) struct Shared {
    pub(crate) partitions: Vec<PartitionState>,
    pub(crate) queue: Mutex<Queue>,
    /// Signals the writer that requests arrived or the log is closing.
    pub(crate) queue_cv: Condvar,
    /// Committed global sequence number, guarded for `wait_committed`.
    pub(crate) committed: Mutex<u64>,
    pub(crate) committed_cv: Condvar,
    /// Same value as `committed`, readable without the lock.
    pub(crate) committed_seq: AtomicU64,
    pub(crate) counters: Counters,
}

/// The embedded, durable, partitioned event log. See the [crate docs](crate)
/// for the on-disk format and guarantees.
///
/// A log directory must be opened by at most one `EmbeddedLog` (one process)
/// at a time; nothing on disk prevents a second opener.
pub struct EmbeddedLog {
    dir: PathBuf,
    config: EmbeddedLogConfig,
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<Result<(), LogError>>>>,
    /// Serialises `enforce_retention` calls.
    retention: Mutex<()>,
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .field("committed_seq", &self.committed_seq())
            .finish_non_exhaustive()
    }
}

/// What an append resolves to when the writer drops it unanswered.
fn abandoned() -> AppendResult {
    Err(LogError::WriterFailed(
        "the event log writer stopped before completing the request".to_owned(),
    ))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl EmbeddedLog {
    /// The partition count of the log in `dir`, if there is one: it is fixed when the log is
    /// created, and [`EmbeddedLog::open`] refuses any other.
    pub fn stored_partitions(dir: &Path) -> Result<Option<u32>, LogError> {
        Ok(crate::meta::read_meta(dir)?.map(|meta| meta.partitions))
    }

    /// Opens the log in `dir`, creating it if it does not exist, recovering
    /// torn tails, rebuilding the dedup window and starting the writer thread.
    pub fn open(dir: &Path, config: EmbeddedLogConfig) -> Result<Self, LogError> {
        config.validate()?;
        let started = Instant::now();
        if !dir.is_dir() {
            fs::create_dir_all(dir)
                .map_err(|e| LogError::io(format_args!("creating {}", dir.display()), e))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent).map_err(|e| {
                    LogError::io(format_args!("fsync directory {}", parent.display()), e)
                })?;
            }
        }
        meta::load_or_create(dir, config.partitions)?;

        let mut dedup = DedupSet::new(config.dedup_window_ms, config.dedup_max_entries);
        let mut recovered = Vec::with_capacity(config.partitions as usize);
        for id in 0..config.partitions {
            recovered.push(open_partition(dir, id, dedup.enabled())?);
        }
        rebuild_dedup(&mut dedup, &mut recovered);
        let last_seq = recovered
            .iter()
            .filter_map(|p| p.last_seq)
            .max()
            .unwrap_or(0);
        let (states, writer_parts): (Vec<_>, Vec<_>) =
            recovered.into_iter().map(WriterPartition::split).unzip();

        let shared = Arc::new(Shared {
            partitions: states,
            queue: Mutex::new(Queue {
                requests: Vec::new(),
                pending_bytes: 0,
                state: QueueState::Open,
            }),
            queue_cv: Condvar::new(),
            committed: Mutex::new(last_seq),
            committed_cv: Condvar::new(),
            committed_seq: AtomicU64::new(last_seq),
            counters: Counters::default(),
        });
        let handle = Writer::new(
            Arc::clone(&shared),
            writer_parts,
            dedup,
            last_seq + 1,
            config.fsync,
            config.segment_bytes,
        )
        .spawn()?;

        let log = EmbeddedLog {
            dir: dir.to_owned(),
            config,
            shared,
            writer: Mutex::new(Some(handle)),
            retention: Mutex::new(()),
        };
        tracing::info!(
            dir = %log.dir.display(),
            partitions = log.config.partitions,
            committed_seq = last_seq,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "opened event log"
        );
        Ok(log)
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration the log was opened with.
    pub fn config(&self) -> &EmbeddedLogConfig {
        &self.config
    }

    fn partition(&self, partition: u32) -> Result<&PartitionState, LogError> {
        self.shared
            .partitions
            .get(partition as usize)
            .ok_or(LogError::InvalidPartition {
                partition,
                partitions: self.config.partitions,
            })
    }

    /// Deletes the retention-eligible prefix of one partition's closed
    /// segments.
    fn retain_partition(
        &self,
        state: &PartitionState,
        safe_offset: u64,
        now_ms: i64,
        report: &mut RetentionReport,
    ) -> Result<(), LogError> {
        let snapshot: Vec<Arc<Segment>> = read(&state.segments).clone();
        let mut remaining: u64 = snapshot.iter().map(|s| s.size()).sum();
        let mut doomed = 0;
        // Only a prefix is ever deleted, so the retained offsets stay
        // contiguous; the last (active) segment is never a candidate.
        for pair in snapshot.windows(2) {
            let (segment, next) = (&pair[0], &pair[1]);
            if next.base_offset() > safe_offset {
                break;
            }
            let size = segment.size();
            let over_size = self
                .config
                .retention_bytes
                .is_some_and(|limit| remaining.saturating_sub(size) >= limit);
            let expired = match self.config.retention_ms {
                Some(max_age) => segment
                    .ensure_summary()?
                    .max_timestamp_ms
                    .is_none_or(|newest| newest < now_ms.saturating_sub(max_age)),
                None => false,
            };
            if !(over_size || expired) {
                break;
            }
            remaining -= size;
            doomed += 1;
        }
        if doomed == 0 {
            return Ok(());
        }
        let removed: Vec<Arc<Segment>> = {
            let mut segments = write(&state.segments);
            debug_assert!(segments
                .iter()
                .zip(&snapshot[..doomed])
                .all(|(a, b)| Arc::ptr_eq(a, b)));
            segments.drain(..doomed).collect()
        };
        let new_start = snapshot[doomed].base_offset();
        for segment in &removed {
            match fs::remove_file(segment.path()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(LogError::io(
                        format_args!("deleting {}", segment.path().display()),
                        e,
                    ))
                }
            }
            report.deleted_segments += 1;
            report.deleted_bytes += segment.size();
        }
        report.deleted_records += new_start - removed[0].base_offset();
        sync_dir(&state.dir).map_err(|e| {
            LogError::io(format_args!("fsync directory {}", state.dir.display()), e)
        })?;
        tracing::info!(
            partition = state.id,
            segments = removed.len(),
            start_offset = new_start,
            "retention deleted event log segments"
        );
        Ok(())
    }
}

impl EventLog for EmbeddedLog {
    fn partition_count(&self) -> u32 {
        self.config.partitions
    }

    fn append(&self, records: Vec<AppendRecord>) -> Completion<AppendResult> {
        if records.is_empty() {
            return Completion::ready(Ok(Vec::new()));
        }
        let mut bytes = 0u64;
        for record in &records {
            if record.payload.len() > MAX_PAYLOAD_BYTES {
                return Completion::ready(Err(LogError::RecordTooLarge {
                    size: record.payload.len(),
                    max: MAX_PAYLOAD_BYTES,
                }));
            }
            bytes += (record.key.len() + record.payload.len()) as u64;
        }
        let completion = {
            let mut queue = lock(&self.shared.queue);
            match &queue.state {
                QueueState::Open => {}
                QueueState::Closing => return Completion::ready(Err(LogError::Closed)),
                QueueState::Failed(message) => {
                    return Completion::ready(Err(LogError::WriterFailed(message.clone())))
                }
            }
            let limit = self.config.max_pending_bytes;
            if queue.pending_bytes > 0 && queue.pending_bytes + bytes > limit {
                return Completion::ready(Err(LogError::Overloaded {
                    pending_bytes: queue.pending_bytes,
                    limit,
                }));
            }
            let (completer, completion) = completion_pair(abandoned);
            queue.pending_bytes += bytes;
            queue.requests.push(Request { records, completer });
            completion
        };
        self.shared.queue_cv.notify_one();
        completion
    }

    fn read(
        &self,
        partition: u32,
        from_offset: u64,
        max_records: usize,
    ) -> Result<Vec<Record>, LogError> {
        let state = self.partition(partition)?;
        // Load the committed end before taking the segment list: every
        // segment holding an offset below `end` was added before `end` was
        // published, so the snapshot below contains all of them.
        let end = state.end_offset.load(Ordering::Acquire);
        // The writer publishes end offsets before the global sequence number (so that a reader
        // that sees `committed_seq() == s` finds every record up to `s`). Loaded after `end`, this
        // bounds the other direction: no record is returned before its sequence number is
        // committed; the newest batch of a publish still in progress shows on the next read.
        let committed = self.shared.committed_seq.load(Ordering::Acquire);
        let segments: Vec<Arc<Segment>> = {
            let segments = read(&state.segments);
            let start = segments.first().map_or(end, |s| s.base_offset());
            if from_offset < start || from_offset > end {
                return Err(LogError::OffsetOutOfRange {
                    partition,
                    offset: from_offset,
                    start,
                    end,
                });
            }
            if from_offset == end || max_records == 0 {
                return Ok(Vec::new());
            }
            let first = segments
                .partition_point(|s| s.base_offset() <= from_offset)
                .saturating_sub(1);
            segments[first..].to_vec()
        };

        let wanted = usize::try_from(end - from_offset).map_or(max_records, |n| n.min(max_records));
        let mut records = Vec::with_capacity(wanted.min(8192));
        let chunk = wanted
            .saturating_mul(READ_BYTES_PER_RECORD)
            .clamp(MIN_READ_CHUNK_BYTES, MAX_READ_CHUNK_BYTES);
        let mut next = from_offset;
        let mut publishing = false;
        'segments: for segment in &segments {
            let corrupt = |position: u64, reason: String| LogError::Corrupt {
                path: segment.path().to_owned(),
                position,
                reason,
            };
            if segment.base_offset() > next {
                return Err(corrupt(
                    0,
                    format!("offset {next} is missing: the segment starts at a later offset"),
                ));
            }
            let position = segment.position_for(next)?;
            let file = segment.reader()?;
            let mut reader = FrameReader::new(&file, position, chunk, true);
            loop {
                let frame = match reader.next_frame() {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(ReadError::Io(e)) => {
                        return Err(LogError::io(
                            format_args!("reading {}", segment.path().display()),
                            e,
                        ))
                    }
                    Err(ReadError::Invalid { position, reason }) => {
                        return Err(corrupt(position, reason.to_owned()))
                    }
                };
                let header = frame.header;
                if header.offset < next {
                    continue;
                }
                if header.offset != next {
                    return Err(corrupt(
                        frame.position,
                        format!("expected offset {next}, found {}", header.offset),
                    ));
                }
                if header.seq > committed {
                    publishing = true;
                    break 'segments;
                }
                records.push(Record {
                    partition,
                    offset: header.offset,
                    seq: header.seq,
                    timestamp_ms: header.timestamp_ms,
                    dedup_id: header.dedup_id,
                    payload: frame.payload.to_vec(),
                });
                next += 1;
                if next >= end || records.len() >= max_records {
                    break 'segments;
                }
            }
        }
        if records.len() < wanted && !publishing {
            let last = segments
                .last()
                .map(|s| s.path().to_owned())
                .unwrap_or_default();
            return Err(LogError::Corrupt {
                path: last,
                position: 0,
                reason: format!("committed offsets {next}..{end} are missing from the segments"),
            });
        }
        Ok(records)
    }

    fn end_offsets(&self) -> Vec<u64> {
        self.shared
            .partitions
            .iter()
            .map(|p| p.end_offset.load(Ordering::Acquire))
            .collect()
    }

    fn start_offsets(&self) -> Vec<u64> {
        self.shared
            .partitions
            .iter()
            .map(|p| read(&p.segments).first().map_or(0, |s| s.base_offset()))
            .collect()
    }

    fn committed_seq(&self) -> u64 {
        self.shared.committed_seq.load(Ordering::Acquire)
    }

    fn wait_committed(&self, after: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now().checked_add(timeout);
        let mut committed = lock(&self.shared.committed);
        while *committed <= after {
            committed = match deadline {
                None => self
                    .shared
                    .committed_cv
                    .wait(committed)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                Some(deadline) => {
                    let Some(remaining) = deadline
                        .checked_duration_since(Instant::now())
                        .filter(|d| !d.is_zero())
                    else {
                        break;
                    };
                    self.shared
                        .committed_cv
                        .wait_timeout(committed, remaining)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0
                }
            };
        }
        *committed
    }

    fn stats(&self) -> LogStats {
        let mut total_bytes = 0;
        let mut segment_count = 0;
        let mut partition_records = Vec::with_capacity(self.shared.partitions.len());
        for partition in &self.shared.partitions {
            let end = partition.end_offset.load(Ordering::Acquire);
            let segments = read(&partition.segments);
            segment_count += segments.len();
            total_bytes += segments.iter().map(|s| s.size()).sum::<u64>();
            let start = segments.first().map_or(end, |s| s.base_offset());
            partition_records.push(end.saturating_sub(start));
        }
        let counters = &self.shared.counters;
        LogStats {
            total_bytes,
            segment_count,
            partition_records,
            fsyncs: counters.fsyncs.load(Ordering::Relaxed),
            appended_records: counters.appended.load(Ordering::Relaxed),
            duplicate_records: counters.duplicates.load(Ordering::Relaxed),
            write_batches: counters.batches.load(Ordering::Relaxed),
            committed_seq: self.committed_seq(),
        }
    }

    fn enforce_retention(&self, safe_offsets: &[u64]) -> Result<RetentionReport, LogError> {
        if safe_offsets.len() != self.shared.partitions.len() {
            return Err(LogError::InvalidArgument(format!(
                "enforce_retention needs one safe offset per partition ({}), got {}",
                self.shared.partitions.len(),
                safe_offsets.len()
            )));
        }
        let _serialised = lock(&self.retention);
        let mut report = RetentionReport::default();
        if self.config.retention_bytes.is_some() || self.config.retention_ms.is_some() {
            let now = now_ms();
            for (state, &safe) in self.shared.partitions.iter().zip(safe_offsets) {
                self.retain_partition(state, safe, now, &mut report)?;
            }
        }
        report.start_offsets = self.start_offsets();
        Ok(report)
    }

    fn close(&self) -> Result<(), LogError> {
        {
            let mut queue = lock(&self.shared.queue);
            if matches!(queue.state, QueueState::Open) {
                queue.state = QueueState::Closing;
            }
        }
        self.shared.queue_cv.notify_all();
        // Hold the lock while joining so that a concurrent close() returns
        // only after the final fsync too.
        let mut writer = lock(&self.writer);
        match writer.take() {
            None => Ok(()),
            Some(handle) => handle.join().unwrap_or_else(|_| {
                Err(LogError::WriterFailed(
                    "the event log writer thread panicked".to_owned(),
                ))
            }),
        }
    }
}

impl Drop for EmbeddedLog {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(error = %e, dir = %self.dir.display(), "closing the event log failed");
        }
    }
}
