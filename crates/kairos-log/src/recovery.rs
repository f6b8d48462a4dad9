//! Opening a log directory: listing segments, repairing torn tails and
//! rebuilding the dedup window.
//!
//! Only the active (last) segment of each partition can hold a torn or
//! partially persisted tail, because every other segment was fsynced when it
//! was rolled. Recovery therefore verifies every checksum of the active
//! segments and truncates each at its first invalid record, trusting closed
//! segments without reading them. Closed segments are read at open only when
//! the dedup window reaches back into them.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use crate::dedup::{DedupCandidate, DedupSet};
use crate::error::LogError;
use crate::fsutil::sync_dir;
use crate::segment::{
    create_segment_file, parse_segment_file_name, scan_segment, segment_file_name, IndexBuilder,
    Segment,
};
use crate::sync::read;

/// Directory name of partition `id`.
pub(crate) fn partition_dir_name(id: u32) -> String {
    format!("p-{id:05}")
}

/// Read-side state of one partition, shared by readers and the writer.
#[derive(Debug)]
pub(crate) struct PartitionState {
    pub(crate) id: u32,
    pub(crate) dir: PathBuf,
    /// Committed end: offsets below it are acknowledged and readable.
    pub(crate) end_offset: AtomicU64,
    /// Segments sorted by base offset; the last one is the active segment.
    /// Never empty.
    pub(crate) segments: RwLock<Vec<Arc<Segment>>>,
}

/// A partition as found on disk, ready to be handed to the writer.
pub(crate) struct RecoveredPartition {
    pub(crate) state: PartitionState,
    pub(crate) active: Arc<Segment>,
    pub(crate) active_file: File,
    pub(crate) active_size: u64,
    pub(crate) active_max_timestamp_ms: Option<i64>,
    pub(crate) active_last_seq: Option<u64>,
    pub(crate) index_builder: IndexBuilder,
    pub(crate) next_offset: u64,
    /// Highest sequence number stored in the partition.
    pub(crate) last_seq: Option<u64>,
    /// Records of the active segment carrying a dedup id.
    pub(crate) tail_candidates: Vec<DedupCandidate>,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LogError + 'a {
    move |e| LogError::io(format_args!("{what} {}", path.display()), e)
}

/// Base offsets of the segment files in `dir`, sorted.
fn list_segments(dir: &Path) -> Result<Vec<u64>, LogError> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let entry = entry.map_err(io_err("listing", dir))?;
        let name = entry.file_name();
        match name.to_str().and_then(parse_segment_file_name) {
            Some(base) => bases.push(base),
            None => tracing::debug!(
                file = %entry.path().display(),
                "ignoring non-segment file in partition directory"
            ),
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Opens (creating if needed) partition `id` under `root` and repairs the
/// tail of its active segment.
pub(crate) fn open_partition(
    root: &Path,
    id: u32,
    collect_dedup: bool,
) -> Result<RecoveredPartition, LogError> {
    let dir = root.join(partition_dir_name(id));
    if !dir.is_dir() {
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        sync_dir(root).map_err(io_err("fsync directory", root))?;
    }
    let mut bases = list_segments(&dir)?;
    if bases.is_empty() {
        create_segment_file(&dir, 0)?;
        bases.push(0);
    }
    let (closed_bases, active_base) = (&bases[..bases.len() - 1], bases[bases.len() - 1]);

    let mut segments = Vec::with_capacity(bases.len());
    for &base in closed_bases {
        let path = dir.join(segment_file_name(base));
        let size = fs::metadata(&path).map_err(io_err("stat", &path))?.len();
        segments.push(Arc::new(Segment::closed(base, path, size)));
    }

    let path = dir.join(segment_file_name(active_base));
    let active_file = OpenOptions::new()
        .read(true)
        .append(true)
        .open(&path)
        .map_err(io_err("opening", &path))?;
    let file_len = active_file.metadata().map_err(io_err("stat", &path))?.len();
    let mut tail_candidates = Vec::new();
    let mut scan = scan_segment(&active_file, active_base, true, |h| {
        if collect_dedup && h.dedup_id != 0 {
            tail_candidates.push(DedupCandidate {
                seq: h.seq,
                timestamp_ms: h.timestamp_ms,
                dedup_id: h.dedup_id,
            });
        }
    })
    .map_err(io_err("scanning", &path))?;
    if scan.valid_bytes < file_len {
        let (position, reason) = scan
            .stop
            .as_ref()
            .map_or((scan.valid_bytes, "unknown"), |s| (s.position, s.reason));
        tracing::warn!(
            partition = id,
            segment = %path.display(),
            position,
            reason,
            bytes_truncated = file_len - scan.valid_bytes,
            records_kept = scan.next_offset - active_base,
            "truncating torn or corrupt tail of the event log"
        );
        active_file
            .set_len(scan.valid_bytes)
            .map_err(io_err("truncating", &path))?;
        active_file.sync_all().map_err(io_err("fsync", &path))?;
    }

    let active = Arc::new(Segment::scanned(active_base, path, &mut scan));
    segments.push(Arc::clone(&active));

    // An empty active segment (rolled just before a crash, or truncated to
    // nothing) says nothing about the partition's newest sequence number, so
    // look at the closed segments before it.
    let mut last_seq = scan.last_seq;
    if last_seq.is_none() {
        for (i, segment) in segments[..segments.len() - 1].iter().enumerate().rev() {
            let info = segment.ensure_summary()?;
            if i + 2 == segments.len() && info.next_offset != active_base {
                return Err(LogError::Corrupt {
                    path: segment.path().to_owned(),
                    position: segment.size(),
                    reason: format!(
                        "segment ends at offset {} but the next segment starts at {active_base}",
                        info.next_offset
                    ),
                });
            }
            if info.last_seq.is_some() {
                last_seq = info.last_seq;
                break;
            }
        }
    }

    Ok(RecoveredPartition {
        state: PartitionState {
            id,
            dir,
            end_offset: AtomicU64::new(scan.next_offset),
            segments: RwLock::new(segments),
        },
        active,
        active_file,
        active_size: scan.valid_bytes,
        active_max_timestamp_ms: scan.max_timestamp_ms,
        active_last_seq: scan.last_seq,
        index_builder: scan.index_builder,
        next_offset: scan.next_offset,
        last_seq,
        tail_candidates,
    })
}

/// Rebuilds the dedup window from the tails of all partitions.
///
/// Each partition is read backwards segment by segment, starting with the
/// (already scanned) active segment, and stops at the first segment whose
/// newest record is older than the window, or once it has yielded
/// `max_entries` ids. This reads the whole window once — sequentially, headers
/// only — and builds the sparse indexes of the segments it reads as a side
/// effect, so they are not read again for indexing.
pub(crate) fn rebuild_dedup(set: &mut DedupSet, partitions: &mut [RecoveredPartition]) {
    let tail_clock = partitions
        .iter()
        .filter_map(|p| p.active_max_timestamp_ms)
        .max();
    let mut clock = tail_clock;
    let mut candidates: Vec<DedupCandidate> = Vec::new();
    if !set.enabled() {
        set.restore(clock, candidates);
        return;
    }
    let tail_cutoff = tail_clock.map_or(i64::MIN, |c| c.saturating_sub(set.window_ms()));
    for partition in partitions.iter_mut() {
        let mut collected = partition.tail_candidates.len();
        candidates.append(&mut partition.tail_candidates);
        let segments: Vec<Arc<Segment>> = read(&partition.state.segments).clone();
        let mut newer_in_window = partition
            .active_max_timestamp_ms
            .is_none_or(|t| t >= tail_cutoff);
        for segment in segments[..segments.len() - 1].iter().rev() {
            if !newer_in_window || collected >= set.max_entries() {
                break;
            }
            let result = segment.rescan(|h| {
                if h.dedup_id != 0 && h.timestamp_ms >= tail_cutoff {
                    candidates.push(DedupCandidate {
                        seq: h.seq,
                        timestamp_ms: h.timestamp_ms,
                        dedup_id: h.dedup_id,
                    });
                    collected += 1;
                }
            });
            match result {
                Ok(info) => {
                    newer_in_window = info.max_timestamp_ms.is_none_or(|t| t >= tail_cutoff);
                    if let Some(t) = info.max_timestamp_ms {
                        clock = Some(clock.map_or(t, |c| c.max(t)));
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        partition = partition.state.id,
                        segment = %segment.path().display(),
                        error = %e,
                        "could not read segment while rebuilding the dedup window; \
                         older dedup ids of this partition are forgotten"
                    );
                    break;
                }
            }
        }
    }
    set.restore(clock, candidates);
}
