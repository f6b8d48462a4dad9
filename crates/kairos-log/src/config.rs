//! Configuration of the embedded log.

use crate::error::LogError;

/// When appended data is flushed to stable storage, and therefore what an
/// acknowledgement (a resolved append [`Completion`](crate::Completion))
/// guarantees.
///
/// Whatever the policy, a segment is fsynced when it is closed (rolled) and
/// every file is fsynced by [`close`](crate::EventLog::close), so only the
/// tail of the active segment is ever at risk and recovery only needs to
/// check the tails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// `fdatasync(2)` every file written by a batch before acknowledging it.
    /// An acknowledged record survives a process crash, a kernel crash and a
    /// power loss. Group commit amortises the cost: all requests queued while
    /// one fsync runs are written together and share the next fsync.
    #[default]
    Always,
    /// Acknowledge after `write(2)` (the data is in the OS page cache) and
    /// `fdatasync` dirty files at most every `N` milliseconds (also when idle).
    /// Survives a process crash; a power loss or kernel crash may lose up to
    /// about `N` ms of acknowledged records.
    IntervalMs(u64),
    /// Acknowledge after `write(2)` and never fsync the active segment except
    /// on roll and close: the OS decides when data reaches disk. Survives a
    /// process crash only.
    Never,
}

/// Settings of [`EmbeddedLog`](crate::EmbeddedLog). Only `partitions` is fixed
/// at creation; everything else may change between opens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbeddedLogConfig {
    /// Number of partitions (default 1). Fixed when the log is created.
    pub partitions: u32,
    /// A segment is rolled when the next record would take it past this size
    /// (default 128 MiB). A single record larger than this gets a segment of
    /// its own.
    pub segment_bytes: u64,
    /// Per-partition size bound for retention, `None` = unbounded. Retention
    /// deletes the oldest closed segments while the newer data alone is at
    /// least this large (so at least this many bytes are kept).
    pub retention_bytes: Option<u64>,
    /// Age bound for retention, `None` = unbounded: a closed segment whose
    /// newest record timestamp is older than `now - retention_ms` may be
    /// deleted.
    pub retention_ms: Option<i64>,
    /// Durability of acknowledgements.
    pub fsync: FsyncPolicy,
    /// Dedup window in event-time milliseconds (default 24 h); see the crate
    /// docs for the exact rule.
    pub dedup_window_ms: i64,
    /// Maximum remembered dedup ids (default 10 000 000; 0 disables dedup).
    pub dedup_max_entries: usize,
    /// Appends are refused with [`LogError::Overloaded`] while more than this
    /// many payload bytes wait for the writer (default 256 MiB). This bounds
    /// memory when producers outrun the disk.
    pub max_pending_bytes: u64,
}

/// Smallest accepted `segment_bytes`.
pub(crate) const MIN_SEGMENT_BYTES: u64 = 128;
/// Largest accepted partition count (directory names have five digits).
pub(crate) const MAX_PARTITIONS: u32 = 100_000;

impl Default for EmbeddedLogConfig {
    fn default() -> Self {
        EmbeddedLogConfig {
            partitions: 1,
            segment_bytes: 128 * 1024 * 1024,
            retention_bytes: None,
            retention_ms: None,
            fsync: FsyncPolicy::Always,
            dedup_window_ms: 24 * 60 * 60 * 1000,
            dedup_max_entries: 10_000_000,
            max_pending_bytes: 256 * 1024 * 1024,
        }
    }
}

impl EmbeddedLogConfig {
    pub(crate) fn validate(&self) -> Result<(), LogError> {
        let invalid = |m: String| Err(LogError::InvalidConfig(m));
        if self.partitions == 0 || self.partitions > MAX_PARTITIONS {
            return invalid(format!(
                "partitions must be between 1 and {MAX_PARTITIONS}, got {}",
                self.partitions
            ));
        }
        if self.segment_bytes < MIN_SEGMENT_BYTES {
            return invalid(format!(
                "segment_bytes must be at least {MIN_SEGMENT_BYTES}, got {}",
                self.segment_bytes
            ));
        }
        if self.dedup_window_ms < 0 {
            return invalid(format!(
                "dedup_window_ms must not be negative, got {}",
                self.dedup_window_ms
            ));
        }
        if let Some(ms) = self.retention_ms {
            if ms < 0 {
                return invalid(format!("retention_ms must not be negative, got {ms}"));
            }
        }
        if self.fsync == FsyncPolicy::IntervalMs(0) {
            return invalid("FsyncPolicy::IntervalMs needs a positive interval".to_owned());
        }
        if self.max_pending_bytes == 0 {
            return invalid("max_pending_bytes must be positive".to_owned());
        }
        Ok(())
    }
}
