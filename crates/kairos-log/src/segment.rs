//! Segment files: naming, the sparse offset index and whole-segment scans.
//!
//! A segment is one append-only file holding a contiguous run of a
//! partition's offsets. Its name is its base offset (the offset of its first
//! record), so the segment holding an offset is found by a binary search over
//! names alone, and a closed segment's end is the next segment's base.
//!
//! Each segment keeps a sparse in-memory index of `(offset, byte position)`
//! pairs, one at least every [`INDEX_INTERVAL_BYTES`], so a read seeks close to
//! its start offset and scans at most that many bytes. The index is never
//! persisted: the active segment's index is built while recovering it and then
//! extended by the writer; a closed segment's index is built on first use by
//! one sequential header scan (no checksum work, payloads skipped in memory),
//! or while recovery already reads the segment to rebuild the dedup window.
//! Opening a large log therefore only lists directories and scans the tails.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::LogError;
use crate::frame::{FrameHeader, FrameReader, ReadError};
use crate::fsutil::sync_dir;
use crate::sync::{lock, read, write};

/// Maximum distance in bytes between consecutive sparse index entries.
pub(crate) const INDEX_INTERVAL_BYTES: u64 = 8 * 1024;
/// Read size of whole-segment scans.
pub(crate) const SCAN_CHUNK_BYTES: usize = 1024 * 1024;

const SEGMENT_SUFFIX: &str = ".log";
const SEGMENT_NAME_DIGITS: usize = 20;

/// File name of the segment whose first offset is `base_offset`.
pub(crate) fn segment_file_name(base_offset: u64) -> String {
    format!(
        "{base_offset:0width$}{SEGMENT_SUFFIX}",
        width = SEGMENT_NAME_DIGITS
    )
}

/// Base offset encoded in a segment file name, `None` for other files.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Creates an empty segment file (failing if it exists) opened for appending,
/// and makes its directory entry durable.
pub(crate) fn create_segment_file(
    dir: &Path,
    base_offset: u64,
) -> Result<(File, PathBuf), LogError> {
    let path = dir.join(segment_file_name(base_offset));
    let file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| LogError::io(format_args!("creating segment {}", path.display()), e))?;
    sync_dir(dir)
        .map_err(|e| LogError::io(format_args!("fsync directory {}", dir.display()), e))?;
    Ok((file, path))
}

/// One sparse index entry: the record with `offset` starts at byte `position`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub(crate) offset: u64,
    pub(crate) position: u64,
}

/// Decides which records get an index entry: the first one of a segment and
/// then the first one at least [`INDEX_INTERVAL_BYTES`] past the previous
/// entry.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct IndexBuilder {
    last_position: Option<u64>,
}

impl IndexBuilder {
    pub(crate) fn observe(&mut self, offset: u64, position: u64) -> Option<IndexEntry> {
        let due = self
            .last_position
            .is_none_or(|last| position - last >= INDEX_INTERVAL_BYTES);
        if due {
            self.last_position = Some(position);
            Some(IndexEntry { offset, position })
        } else {
            None
        }
    }
}

/// Where and why a scan stopped before the end of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ScanStop {
    pub(crate) position: u64,
    pub(crate) reason: &'static str,
}

/// Result of [`scan_segment`].
#[derive(Debug, Default)]
pub(crate) struct ScanOutcome {
    /// Bytes from the start of the file up to the end of the last valid record.
    pub(crate) valid_bytes: u64,
    /// Offset following the last valid record (the base offset if none).
    pub(crate) next_offset: u64,
    pub(crate) last_seq: Option<u64>,
    pub(crate) max_timestamp_ms: Option<i64>,
    pub(crate) index: Vec<IndexEntry>,
    pub(crate) index_builder: IndexBuilder,
    /// Set when invalid bytes follow the valid prefix.
    pub(crate) stop: Option<ScanStop>,
}

/// Scans a whole segment from byte 0, calling `visit` for every valid record,
/// and stops at the first record that is torn, fails its checksum (only with
/// `verify`), breaks offset contiguity from `base_offset`, or does not have a
/// sequence number above its predecessor's.
pub(crate) fn scan_segment(
    file: &File,
    base_offset: u64,
    verify: bool,
    mut visit: impl FnMut(&FrameHeader),
) -> std::io::Result<ScanOutcome> {
    let mut reader = FrameReader::new(file, 0, SCAN_CHUNK_BYTES, verify);
    let mut outcome = ScanOutcome {
        next_offset: base_offset,
        ..ScanOutcome::default()
    };
    loop {
        let (header, position) = match reader.next_frame() {
            Ok(Some(frame)) => (frame.header, frame.position),
            Ok(None) => break,
            Err(ReadError::Io(e)) => return Err(e),
            Err(ReadError::Invalid { position, reason }) => {
                outcome.stop = Some(ScanStop { position, reason });
                break;
            }
        };
        let reason = if header.offset != outcome.next_offset {
            Some("record offset breaks contiguity")
        } else if header.seq == 0 || outcome.last_seq.is_some_and(|last| header.seq <= last) {
            Some("record sequence number is not increasing")
        } else {
            None
        };
        if let Some(reason) = reason {
            outcome.stop = Some(ScanStop { position, reason });
            break;
        }
        if let Some(entry) = outcome.index_builder.observe(header.offset, position) {
            outcome.index.push(entry);
        }
        visit(&header);
        outcome.valid_bytes = position + header.frame_len() as u64;
        outcome.next_offset = header.offset + 1;
        outcome.last_seq = Some(header.seq);
        outcome.max_timestamp_ms = Some(
            outcome
                .max_timestamp_ms
                .map_or(header.timestamp_ms, |max| max.max(header.timestamp_ms)),
        );
    }
    Ok(outcome)
}

/// What is known about a segment's records. Either `complete` (covers every
/// record: maintained by the writer or built by a scan) or not yet built.
#[derive(Debug, Default)]
struct Summary {
    index: Vec<IndexEntry>,
    max_timestamp_ms: Option<i64>,
    last_seq: Option<u64>,
    next_offset: u64,
    complete: bool,
}

/// Summary values returned to callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SegmentInfo {
    pub(crate) max_timestamp_ms: Option<i64>,
    pub(crate) last_seq: Option<u64>,
    pub(crate) next_offset: u64,
}

/// Shared, read-side view of one segment file.
#[derive(Debug)]
pub(crate) struct Segment {
    base_offset: u64,
    path: PathBuf,
    /// Bytes written to the file (for closed segments: its length on disk).
    size: AtomicU64,
    summary: RwLock<Summary>,
    /// Cached read-only handle, opened on first read.
    reader: Mutex<Option<Arc<File>>>,
}

impl Segment {
    /// A closed segment found on disk; its summary is built on first use.
    pub(crate) fn closed(base_offset: u64, path: PathBuf, size: u64) -> Self {
        Self::with_summary(
            base_offset,
            path,
            size,
            Summary {
                next_offset: base_offset,
                ..Summary::default()
            },
        )
    }

    /// A newly created, empty segment.
    pub(crate) fn empty(base_offset: u64, path: PathBuf) -> Self {
        Self::with_summary(
            base_offset,
            path,
            0,
            Summary {
                next_offset: base_offset,
                complete: true,
                ..Summary::default()
            },
        )
    }

    /// A segment whose records were just scanned (the recovered active one).
    pub(crate) fn scanned(base_offset: u64, path: PathBuf, scan: &mut ScanOutcome) -> Self {
        Self::with_summary(
            base_offset,
            path,
            scan.valid_bytes,
            Summary {
                index: std::mem::take(&mut scan.index),
                max_timestamp_ms: scan.max_timestamp_ms,
                last_seq: scan.last_seq,
                next_offset: scan.next_offset,
                complete: true,
            },
        )
    }

    fn with_summary(base_offset: u64, path: PathBuf, size: u64, summary: Summary) -> Self {
        Segment {
            base_offset,
            path,
            size: AtomicU64::new(size),
            summary: RwLock::new(summary),
            reader: Mutex::new(None),
        }
    }

    pub(crate) fn base_offset(&self) -> u64 {
        self.base_offset
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Called by the writer after a successful `write(2)` to this (active)
    /// segment: publishes the new size and extends the summary.
    pub(crate) fn record_written(
        &self,
        size: u64,
        entries: &[IndexEntry],
        max_timestamp_ms: Option<i64>,
        last_seq: Option<u64>,
        next_offset: u64,
    ) {
        let mut summary = write(&self.summary);
        summary.index.extend_from_slice(entries);
        summary.max_timestamp_ms = max_timestamp_ms;
        summary.last_seq = last_seq;
        summary.next_offset = next_offset;
        drop(summary);
        self.size.store(size, Ordering::Release);
    }

    /// The cached read handle, opening the file on first use.
    pub(crate) fn reader(&self) -> Result<Arc<File>, LogError> {
        let mut cached = lock(&self.reader);
        if let Some(file) = cached.as_ref() {
            return Ok(Arc::clone(file));
        }
        let file = File::open(&self.path).map_err(|e| {
            LogError::io(format_args!("opening segment {}", self.path.display()), e)
        })?;
        let file = Arc::new(file);
        *cached = Some(Arc::clone(&file));
        Ok(file)
    }

    /// Builds the summary of a closed segment if it is not built yet.
    pub(crate) fn ensure_summary(&self) -> Result<SegmentInfo, LogError> {
        {
            let summary = read(&self.summary);
            if summary.complete {
                return Ok(info(&summary));
            }
        }
        self.rescan(|_| {})
    }

    /// Scans a closed segment's records, calling `visit` for each, and stores
    /// the resulting summary. Must not be called on the active segment, whose
    /// summary the writer maintains. Closed segments are trusted (they were
    /// fsynced when rolled), so checksums are not verified here; readers verify
    /// every record they return. A closed segment that nevertheless stops early
    /// is reported with a warning and summarised up to the damage.
    pub(crate) fn rescan(&self, visit: impl FnMut(&FrameHeader)) -> Result<SegmentInfo, LogError> {
        let file = self.reader()?;
        let scan = scan_segment(&file, self.base_offset, false, visit).map_err(|e| {
            LogError::io(format_args!("scanning segment {}", self.path.display()), e)
        })?;
        if let Some(stop) = &scan.stop {
            tracing::warn!(
                segment = %self.path.display(),
                position = stop.position,
                reason = stop.reason,
                "closed log segment is damaged; records after this position are unreadable"
            );
        }
        let mut summary = write(&self.summary);
        *summary = Summary {
            index: scan.index,
            max_timestamp_ms: scan.max_timestamp_ms,
            last_seq: scan.last_seq,
            next_offset: scan.next_offset,
            complete: true,
        };
        Ok(info(&summary))
    }

    /// Byte position from which to scan to find `offset`: the position of the
    /// last indexed record at or before it.
    pub(crate) fn position_for(&self, offset: u64) -> Result<u64, LogError> {
        self.ensure_summary()?;
        let summary = read(&self.summary);
        let after = summary
            .index
            .partition_point(|entry| entry.offset <= offset);
        Ok(after
            .checked_sub(1)
            .map_or(0, |i| summary.index[i].position))
    }
}

fn info(summary: &Summary) -> SegmentInfo {
    SegmentInfo {
        max_timestamp_ms: summary.max_timestamp_ms,
        last_seq: summary.last_seq,
        next_offset: summary.next_offset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(segment_file_name(0), "00000000000000000000.log");
        assert_eq!(segment_file_name(1234), "00000000000000001234.log");
        for base in [0, 1, 1234, u64::MAX] {
            assert_eq!(
                parse_segment_file_name(&segment_file_name(base)),
                Some(base)
            );
        }
        assert_eq!(parse_segment_file_name("0000000000000000001.log"), None);
        assert_eq!(parse_segment_file_name("00000000000000000001.tmp"), None);
        assert_eq!(parse_segment_file_name("0000000000000000000x.log"), None);
    }

    #[test]
    fn index_builder_spaces_entries() {
        let mut builder = IndexBuilder::default();
        assert!(builder.observe(0, 0).is_some());
        assert!(builder.observe(1, INDEX_INTERVAL_BYTES - 1).is_none());
        assert_eq!(
            builder.observe(2, INDEX_INTERVAL_BYTES),
            Some(IndexEntry {
                offset: 2,
                position: INDEX_INTERVAL_BYTES
            })
        );
    }
}
