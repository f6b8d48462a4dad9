//! # kairos-log — the durable, partitioned event log
//!
//! `kairos serve` acknowledges an ingest request only once its events are in
//! this log. A processor thread reads the log in order and applies events to
//! in-memory state; after a restart, state is restored from a snapshot and the
//! log is replayed from per-partition checkpoints. [`EventLog`] is the
//! backend-neutral interface; [`EmbeddedLog`] is the on-disk implementation
//! described here, and `KafkaLog` (feature `kafka`, module `kafka`) keeps the
//! log on a Kafka-protocol broker.
//!
//! ## Model
//!
//! * A log has a fixed number of **partitions**. A record goes to
//!   [`partition_for`]`(key, partitions)` (Kafka's murmur2 partitioner), so all
//!   events of one key (user) stay in order in one partition.
//! * Each partition numbers its records with contiguous **offsets** from 0.
//! * One writer thread stamps every appended record with a **global sequence
//!   number** (`seq`, starting at 1) in append order across all partitions.
//!   Merging partitions by `seq` reproduces exactly the order in which records
//!   were appended, which makes replay deterministic.
//!
//! ## On-disk format (version 1)
//!
//! ```text
//! <dir>/
//!   log.meta                    "format=kairos-log", "version=1", "partitions=N" (text)
//!   p-00000/                    one directory per partition
//!     00000000000000000000.log  segment; name = base offset, 20 digits
//!     00000000000000052341.log  next segment: base = previous segment's end
//!   p-00001/ ...
//! ```
//!
//! A segment is a sequence of records, each framed as (little-endian):
//!
//! ```text
//! byte  size  field
//!    0     4  len           u32  bytes after this field = 36 + payload length
//!    4     4  crc           u32  CRC-32 (IEEE, crc32fast) of bytes 8 .. 4+len
//!    8     8  offset        u64  partition offset
//!   16     8  seq           u64  global sequence number
//!   24     8  timestamp_ms  i64  event time, milliseconds since the Unix epoch
//!   32     8  dedup_id      u64  producer idempotency id, 0 = none
//!   40     n  payload       opaque bytes (at most MAX_PAYLOAD_BYTES)
//! ```
//!
//! The partition key is not stored: it only chooses the partition.
//!
//! ## Invariants
//!
//! 1. Offsets are contiguous within a partition: the segments of a partition
//!    cover `start..end` without gaps, a segment's first record has the offset
//!    in its name, and each record's offset is its predecessor's plus one.
//! 2. `seq` is strictly increasing within each partition and globally unique
//!    among stored records; records with a higher `seq` were appended later.
//!    Sequence numbers may have gaps (a torn tail cut from one partition while
//!    another kept later records). After recovery, numbering continues above
//!    the highest `seq` remaining, so numbers of cut records can be reused;
//!    with [`FsyncPolicy::Always`] such records were never acknowledged nor
//!    visible to readers, so nobody has observed the reused numbers.
//! 3. Only the active (last) segment of a partition is ever written. A segment
//!    is `fdatasync`ed when it is rolled, and a new segment's directory entry
//!    is fsynced when it is created, whatever the [`FsyncPolicy`]; therefore
//!    closed segments are trusted on open and only active segments can have a
//!    torn tail.
//! 4. A record is acknowledged (its append [`Completion`] resolves `Ok`) only
//!    after it was completely written with `write(2)` and — with
//!    [`FsyncPolicy::Always`] — `fdatasync`ed. Readers never see a record
//!    before it is acknowledged: [`EventLog::read`] stops at the committed end.
//! 5. Retention deletes whole closed segments, oldest first, and only segments
//!    that lie entirely below the caller's safe offsets (the processor's
//!    checkpoints), so it never deletes a record the processor still needs.
//!
//! ## Recovery
//!
//! On open, each partition's active segment is scanned with checksum
//! verification and truncated at the first torn or corrupt record (short
//! frame, out-of-range length, checksum mismatch, broken offset contiguity or
//! non-increasing `seq`); the number of bytes cut is logged with
//! `tracing::warn!`. Everything after the first bad byte is discarded because
//! append-only writes make anything beyond it unacknowledged (or damaged)
//! data. The next `seq` is the highest one found plus one.
//!
//! ## Durability and dedup
//!
//! See [`FsyncPolicy`] for what an acknowledgement guarantees under each
//! policy. Appends use group commit: all requests that queue up while the
//! writer is busy (typically inside `fdatasync`) are written together and
//! share one fsync per dirty partition.
//!
//! Records with a non-zero `dedup_id` are deduplicated in the writer thread,
//! so two concurrent requests carrying the same id cannot both be appended.
//! The window is measured in **event time**: a record is a duplicate if an
//! earlier appended record carried the same id and has a `timestamp_ms` no
//! older than `dedup_window_ms` before the newest timestamp appended so far.
//! Using the log's own timestamps (rather than the wall clock) makes the
//! decision a function of the log contents, so the set is rebuilt exactly on
//! open by scanning the window backwards from the tail of each partition.
//! At most `dedup_max_entries` ids are remembered (oldest evicted first).
//!
//! ## Reads
//!
//! Each segment has a sparse in-memory index (an entry every 8 KiB), so a
//! read seeks near its first offset instead of scanning the partition. Read
//! handles are cached per segment and use positioned reads, so concurrent
//! readers do not contend on a file cursor. Every record returned has its
//! checksum verified.

#![warn(missing_docs)]

mod completion;
mod config;
mod dedup;
mod embedded;
mod error;
mod frame;
mod fsutil;
#[cfg(feature = "kafka")]
mod kafka;
mod meta;
mod partitioner;
mod recovery;
mod segment;
mod sync;
mod syncpool;
mod writer;

use std::time::Duration;

pub use completion::{completion_pair, Completer, Completion};
pub use config::{EmbeddedLogConfig, FsyncPolicy};
pub use embedded::EmbeddedLog;
pub use error::LogError;
pub use frame::{MAX_PAYLOAD_BYTES, RECORD_HEADER_BYTES};
#[cfg(feature = "kafka")]
pub use kafka::{KafkaLog, KafkaLogConfig};
pub use partitioner::{murmur2, partition_for};

/// A durable, partitioned, append-only event log.
pub trait EventLog: Send + Sync + 'static {
    /// Number of partitions (fixed for the life of the log).
    fn partition_count(&self) -> u32;

    /// Queues records for appending, in order. The returned completion
    /// resolves once the records are durable according to the fsync policy
    /// (group commit: all requests queued while one fsync runs share the next
    /// one), with one outcome per input record in input order. It resolves to
    /// an error, never hangs, if the log is closed or its writer fails.
    fn append(
        &self,
        records: Vec<AppendRecord>,
    ) -> Completion<Result<Vec<AppendOutcome>, LogError>>;

    /// Reads committed (acknowledged) records of `partition` starting at
    /// `from_offset`, at most `max_records`. Returns an empty vector when
    /// `from_offset` equals the end offset; fails with
    /// [`LogError::OffsetOutOfRange`] below the start or beyond the end.
    fn read(
        &self,
        partition: u32,
        from_offset: u64,
        max_records: usize,
    ) -> Result<Vec<Record>, LogError>;

    /// Next offset to be written per partition (the committed end); index =
    /// partition.
    fn end_offsets(&self) -> Vec<u64>;

    /// Earliest retained offset per partition.
    fn start_offsets(&self) -> Vec<u64>;

    /// Highest global sequence number committed so far (0 = nothing yet; seqs
    /// start at 1). Every record with a lower or equal `seq` is readable.
    fn committed_seq(&self) -> u64;

    /// Blocks until `committed_seq() > after` or `timeout` elapses; returns
    /// `committed_seq()`.
    fn wait_committed(&self, after: u64, timeout: Duration) -> u64;

    /// Whether every record committed before the log was opened is readable
    /// (and [`committed_seq`](EventLog::committed_seq) counts it). Always true
    /// for a local log; a remote log is caught up once its reader has reached
    /// the end of every partition at least once.
    fn caught_up(&self) -> bool {
        true
    }

    /// Size and activity figures.
    fn stats(&self) -> LogStats;

    /// Deletes whole closed segments that lie entirely below
    /// `safe_offsets[partition]` (e.g. the processor's checkpoints) **and**
    /// are beyond a retention limit (age or size). Never touches the active
    /// segment or anything at or after a safe offset, so retention never
    /// deletes records that have not been checkpointed.
    fn enforce_retention(&self, safe_offsets: &[u64]) -> Result<RetentionReport, LogError>;

    /// Writes and fsyncs everything queued, then stops the writer thread.
    /// Further appends fail with [`LogError::Closed`]; reads keep working.
    /// Calling it again is a no-op.
    fn close(&self) -> Result<(), LogError>;

    /// The partitions whose events this process applies, when several processes share the
    /// log's partitions (a Kafka consumer group, `kairos process`); `None` when this process
    /// applies every partition.
    fn assignment(&self) -> Option<Assignment> {
        None
    }

    /// The group's committed offsets (the next offset to apply) of `partitions`, in order;
    /// `None` for a partition the group never committed.
    fn committed_offsets(&self, partitions: &[u32]) -> Result<Vec<Option<u64>>, LogError> {
        Ok(vec![None; partitions.len()])
    }

    /// Records for the group that everything of each `(partition, offset)` pair's partition
    /// below `offset` is applied and stored. A no-op outside a group.
    fn commit_offsets(&self, _offsets: &[(u32, u64)]) -> Result<(), LogError> {
        Ok(())
    }

    /// Forgets where `partition` is being read, so that the next read may start anywhere, below
    /// earlier reads too, as after a restart: a processor that takes a partition over re-reads
    /// it from the group's committed offset. The dedup window of the partition is rebuilt from
    /// the records before the new position, as after a restart.
    fn rewind(&self, partition: u32) -> Result<(), LogError> {
        Err(LogError::InvalidArgument(format!(
            "this log cannot rewind partition {partition}"
        )))
    }
}

/// A process's share of the partitions in a consumer group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Increases with every change of the assignment.
    pub generation: u64,
    /// The partitions owned, ascending.
    pub partitions: Vec<u32>,
}

/// A record to append.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppendRecord {
    /// Partition key (e.g. the user id); chooses the partition, not stored.
    pub key: Vec<u8>,
    /// Event time in milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Producer idempotency id; 0 = no deduplication.
    pub dedup_id: u64,
    /// Opaque event bytes.
    pub payload: Vec<u8>,
    /// For a purchase, its JSON form for a log that publishes purchases on a stream of their own
    /// for other systems (the Kafka log's transactions topic); the embedded log ignores it.
    pub transaction: Option<Vec<u8>>,
}

/// What happened to one appended record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AppendOutcome {
    /// The record was appended at `offset` of `partition` with global `seq`.
    Appended {
        /// Partition the record went to.
        partition: u32,
        /// Offset within that partition.
        offset: u64,
        /// Global sequence number.
        seq: u64,
    },
    /// A record with the same `dedup_id` is already in the dedup window; this
    /// one was not appended.
    Duplicate,
}

/// A record read back from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Partition the record is in.
    pub partition: u32,
    /// Offset within the partition.
    pub offset: u64,
    /// Global sequence number (append order across partitions).
    pub seq: u64,
    /// Event time in milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Producer idempotency id; 0 = none.
    pub dedup_id: u64,
    /// Opaque event bytes.
    pub payload: Vec<u8>,
}

/// Figures reported by [`EventLog::stats`]. Backends fill what they can and
/// leave the rest zero.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Bytes of all segment files.
    pub total_bytes: u64,
    /// Number of segment files.
    pub segment_count: usize,
    /// Retained records per partition (`end - start`).
    pub partition_records: Vec<u64>,
    /// `fdatasync`/`fsync` calls since open (segment and directory syncs).
    pub fsyncs: u64,
    /// Records appended since open.
    pub appended_records: u64,
    /// Records dropped as duplicates since open.
    pub duplicate_records: u64,
    /// Write batches (group commits) since open.
    pub write_batches: u64,
    /// Same as [`EventLog::committed_seq`].
    pub committed_seq: u64,
}

/// Result of [`EventLog::enforce_retention`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Segments deleted.
    pub deleted_segments: usize,
    /// Bytes deleted.
    pub deleted_bytes: u64,
    /// Records deleted.
    pub deleted_records: u64,
    /// Start offsets per partition after the deletion.
    pub start_offsets: Vec<u64>,
}

#[cfg(test)]
mod tests;
