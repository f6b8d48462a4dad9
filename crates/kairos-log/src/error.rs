//! Error type shared by every [`EventLog`](crate::EventLog) backend.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Errors returned by the event log.
///
/// I/O errors carry a short description of what was being done (for example
/// `"fsync p-00001/00000000000000000000.log"`) folded into the message while
/// the original [`io::ErrorKind`] is preserved, so callers can still branch on
/// the kind.
#[derive(Debug)]
#[non_exhaustive]
pub enum LogError {
    /// An operating-system I/O error.
    Io(io::Error),
    /// The log was closed; no further appends are accepted.
    Closed,
    /// The writer thread stopped after an unrecoverable error (for example a
    /// failed `write(2)` or `fdatasync(2)`). The log must be reopened, which
    /// runs recovery. Records of requests that failed this way may or may not
    /// be in the log after reopening: they were never acknowledged, so
    /// producers should retry them with the same `dedup_id`.
    WriterFailed(String),
    /// A Kafka-protocol broker could not be reached, or refused or did not
    /// acknowledge a record in time. Records of an append that failed this
    /// way may or may not be in the topic: retry with the same `dedup_id`.
    Broker(String),
    /// On-disk data is not in the expected format.
    Corrupt {
        /// File in which the problem was found.
        path: PathBuf,
        /// Byte position within that file.
        position: u64,
        /// What was wrong.
        reason: String,
    },
    /// The log directory was created with a different partition count.
    PartitionCountMismatch {
        /// Partition count recorded in the log's metadata file.
        stored: u32,
        /// Partition count requested by the caller.
        requested: u32,
    },
    /// The log directory was written by an incompatible format version.
    UnsupportedVersion {
        /// Version found on disk.
        found: u32,
        /// Highest version this build understands.
        supported: u32,
    },
    /// The configuration is invalid.
    InvalidConfig(String),
    /// A partition number outside `0..partition_count()`.
    InvalidPartition {
        /// Requested partition.
        partition: u32,
        /// Number of partitions of the log.
        partitions: u32,
    },
    /// A read asked for an offset that is not retained (below the start
    /// offset, i.e. deleted by retention) or not yet written (beyond the end).
    OffsetOutOfRange {
        /// Partition read.
        partition: u32,
        /// Requested offset.
        offset: u64,
        /// Earliest retained offset.
        start: u64,
        /// Committed end offset (next offset to be written).
        end: u64,
    },
    /// A record payload exceeds [`MAX_PAYLOAD_BYTES`](crate::MAX_PAYLOAD_BYTES).
    RecordTooLarge {
        /// Payload size in bytes.
        size: usize,
        /// Maximum payload size in bytes.
        max: usize,
    },
    /// Too many bytes are queued for the writer; the caller should back off
    /// and retry (HTTP ingest maps this to 429 `overloaded` with `Retry-After`).
    Overloaded {
        /// Bytes queued when the request was refused.
        pending_bytes: u64,
        /// Configured limit.
        limit: u64,
    },
    /// An argument was invalid (for example a `safe_offsets` slice of the
    /// wrong length).
    InvalidArgument(String),
}

impl LogError {
    /// Wraps an I/O error, prefixing its message with `context` while keeping
    /// its kind.
    pub(crate) fn io(context: impl fmt::Display, err: io::Error) -> Self {
        LogError::Io(io::Error::new(err.kind(), format!("{context}: {err}")))
    }

    /// Makes an equivalent error for another waiter: one failed write batch is
    /// reported to every request in it, and `io::Error` is not `Clone`.
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            LogError::Io(e) => LogError::Io(io::Error::new(e.kind(), e.to_string())),
            LogError::Closed => LogError::Closed,
            LogError::WriterFailed(m) => LogError::WriterFailed(m.clone()),
            LogError::Broker(m) => LogError::Broker(m.clone()),
            LogError::Corrupt {
                path,
                position,
                reason,
            } => LogError::Corrupt {
                path: path.clone(),
                position: *position,
                reason: reason.clone(),
            },
            LogError::PartitionCountMismatch { stored, requested } => {
                LogError::PartitionCountMismatch {
                    stored: *stored,
                    requested: *requested,
                }
            }
            LogError::UnsupportedVersion { found, supported } => LogError::UnsupportedVersion {
                found: *found,
                supported: *supported,
            },
            LogError::InvalidConfig(m) => LogError::InvalidConfig(m.clone()),
            LogError::InvalidPartition {
                partition,
                partitions,
            } => LogError::InvalidPartition {
                partition: *partition,
                partitions: *partitions,
            },
            LogError::OffsetOutOfRange {
                partition,
                offset,
                start,
                end,
            } => LogError::OffsetOutOfRange {
                partition: *partition,
                offset: *offset,
                start: *start,
                end: *end,
            },
            LogError::RecordTooLarge { size, max } => LogError::RecordTooLarge {
                size: *size,
                max: *max,
            },
            LogError::Overloaded {
                pending_bytes,
                limit,
            } => LogError::Overloaded {
                pending_bytes: *pending_bytes,
                limit: *limit,
            },
            LogError::InvalidArgument(m) => LogError::InvalidArgument(m.clone()),
        }
    }
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogError::Io(e) => write!(f, "event log I/O error: {e}"),
            LogError::Closed => f.write_str("event log is closed"),
            LogError::WriterFailed(m) => write!(f, "event log writer failed: {m}"),
            LogError::Broker(m) => write!(f, "Kafka broker: {m}"),
            LogError::Corrupt {
                path,
                position,
                reason,
            } => write!(
                f,
                "event log data is corrupt in {} at byte {position}: {reason}",
                path.display()
            ),
            LogError::PartitionCountMismatch { stored, requested } => write!(
                f,
                "event log was created with {stored} partitions but {requested} were requested; \
                 the partition count cannot change"
            ),
            LogError::UnsupportedVersion { found, supported } => write!(
                f,
                "event log format version {found} is not supported (this build reads up to {supported})"
            ),
            LogError::InvalidConfig(m) => write!(f, "invalid event log configuration: {m}"),
            LogError::InvalidPartition {
                partition,
                partitions,
            } => write!(
                f,
                "partition {partition} does not exist (the log has {partitions})"
            ),
            LogError::OffsetOutOfRange {
                partition,
                offset,
                start,
                end,
            } => write!(
                f,
                "offset {offset} of partition {partition} is outside the retained range {start}..{end}"
            ),
            LogError::RecordTooLarge { size, max } => {
                write!(f, "record payload of {size} bytes exceeds the maximum of {max}")
            }
            LogError::Overloaded {
                pending_bytes,
                limit,
            } => write!(
                f,
                "event log is overloaded: {pending_bytes} bytes queued (limit {limit})"
            ),
            LogError::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
        }
    }
}

impl std::error::Error for LogError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LogError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for LogError {
    fn from(err: io::Error) -> Self {
        LogError::Io(err)
    }
}
