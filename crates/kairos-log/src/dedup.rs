//! The deduplication window.
//!
//! Semantics (chosen so the decision is a pure function of the log's own
//! contents, which is what makes it rebuildable after a restart and identical
//! on every replay):
//!
//! * Time is **event time**: the dedup clock is the newest `timestamp_ms`
//!   among appended records (a high-water mark that never moves backwards).
//!   Wall-clock time is not used, so a restart, a clock step or a replay
//!   cannot change which records count as duplicates.
//! * A record with `dedup_id != 0` is a duplicate if a record with the same id
//!   was appended earlier (including earlier in the same append call) and that
//!   record's `timestamp_ms >= clock - window_ms`. Duplicates are not appended
//!   and do not move the clock.
//! * At most `max_entries` ids are remembered; beyond that the oldest-inserted
//!   entries are forgotten first. `max_entries == 0` disables deduplication.
//!
//! Consequences worth knowing: a retry of an event whose timestamp is already
//! older than the window (relative to the newest event) is not deduplicated,
//! and ingest should reject wildly future timestamps, since one would advance
//! the clock and expire every entry.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, VecDeque};

/// A record seen in the log that may populate the dedup set on open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DedupCandidate {
    pub(crate) seq: u64,
    pub(crate) timestamp_ms: i64,
    pub(crate) dedup_id: u64,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    timestamp_ms: i64,
    /// Sequence number of the record that inserted the entry; tells a live
    /// entry from a stale queue element after an id was re-inserted.
    seq: u64,
}

#[derive(Clone, Copy, Debug)]
struct Queued {
    dedup_id: u64,
    seq: u64,
    timestamp_ms: i64,
}

/// Dedup ids of recently appended records. Owned by the writer thread.
#[derive(Debug)]
pub(crate) struct DedupSet {
    window_ms: i64,
    max_entries: usize,
    /// Newest appended timestamp; `None` while the log is empty.
    clock_ms: Option<i64>,
    entries: HashMap<u64, Entry>,
    /// Insertion order, for eviction. May hold stale elements for ids that
    /// were re-inserted; they are skipped when popped.
    order: VecDeque<Queued>,
}

impl DedupSet {
    pub(crate) fn new(window_ms: i64, max_entries: usize) -> Self {
        DedupSet {
            window_ms,
            max_entries,
            clock_ms: None,
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.max_entries > 0
    }

    pub(crate) fn window_ms(&self) -> i64 {
        self.window_ms
    }

    pub(crate) fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// Oldest timestamp still inside the window.
    fn cutoff(&self) -> i64 {
        self.clock_ms
            .map_or(i64::MIN, |clock| clock.saturating_sub(self.window_ms))
    }

    /// Number of live and stale entries held (bounded by `max_entries`).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether a record with `dedup_id` must be dropped as a duplicate.
    pub(crate) fn is_duplicate(&self, dedup_id: u64) -> bool {
        if dedup_id == 0 || !self.enabled() {
            return false;
        }
        let cutoff = self.cutoff();
        self.entries
            .get(&dedup_id)
            .is_some_and(|entry| entry.timestamp_ms >= cutoff)
    }

    /// Registers an appended record: advances the clock and remembers its id.
    pub(crate) fn record_appended(&mut self, dedup_id: u64, timestamp_ms: i64, seq: u64) {
        self.clock_ms = Some(self.clock_ms.map_or(timestamp_ms, |c| c.max(timestamp_ms)));
        if dedup_id == 0 || !self.enabled() {
            return;
        }
        self.insert(dedup_id, timestamp_ms, seq);
        self.evict();
    }

    fn insert(&mut self, dedup_id: u64, timestamp_ms: i64, seq: u64) {
        self.entries.insert(dedup_id, Entry { timestamp_ms, seq });
        self.order.push_back(Queued {
            dedup_id,
            seq,
            timestamp_ms,
        });
    }

    /// Pops queue elements that are over capacity or expired. Expired entries
    /// behind a live one stay until they reach the front, but lookups already
    /// treat them as absent.
    fn evict(&mut self) {
        let cutoff = self.cutoff();
        while let Some(front) = self.order.front().copied() {
            if self.order.len() <= self.max_entries && front.timestamp_ms >= cutoff {
                break;
            }
            self.order.pop_front();
            if let MapEntry::Occupied(entry) = self.entries.entry(front.dedup_id) {
                if entry.get().seq == front.seq {
                    entry.remove();
                }
            }
        }
    }

    /// Rebuilds the set on open from records found in the log. `clock_ms` is
    /// the newest timestamp in the log; `candidates` need not be sorted.
    pub(crate) fn restore(&mut self, clock_ms: Option<i64>, mut candidates: Vec<DedupCandidate>) {
        self.clock_ms = clock_ms;
        if !self.enabled() {
            return;
        }
        let cutoff = self.cutoff();
        candidates.retain(|c| c.dedup_id != 0 && c.timestamp_ms >= cutoff);
        candidates.sort_unstable_by_key(|c| c.seq);
        let skip = candidates.len().saturating_sub(self.max_entries);
        for candidate in &candidates[skip..] {
            self.insert(candidate.dedup_id, candidate.timestamp_ms, candidate.seq);
        }
        self.evict();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_inside_window_only() {
        let mut set = DedupSet::new(1_000, 100);
        assert!(!set.is_duplicate(7));
        set.record_appended(7, 10_000, 1);
        assert!(set.is_duplicate(7));
        assert!(!set.is_duplicate(0));
        set.record_appended(0, 10_500, 2);
        assert!(set.is_duplicate(7), "still inside the window");
        set.record_appended(8, 11_001, 3);
        assert!(!set.is_duplicate(7), "clock moved past the window");
        assert!(set.is_duplicate(8));
        set.record_appended(7, 11_002, 4);
        assert!(set.is_duplicate(7), "re-inserted after expiry");
    }

    #[test]
    fn capacity_evicts_oldest_inserted() {
        let mut set = DedupSet::new(i64::MAX, 3);
        for id in 1..=5u64 {
            set.record_appended(id, 0, id);
        }
        assert_eq!(set.len(), 3);
        assert!(!set.is_duplicate(1));
        assert!(!set.is_duplicate(2));
        assert!((3..=5).all(|id| set.is_duplicate(id)));
    }

    #[test]
    fn stale_queue_element_does_not_remove_reinserted_id() {
        let mut set = DedupSet::new(100, 10);
        set.record_appended(1, 0, 1);
        set.record_appended(2, 200, 2);
        // id 1 expired (0 < 200 - 100) and is re-appended.
        assert!(!set.is_duplicate(1));
        set.record_appended(1, 200, 3);
        set.record_appended(3, 250, 4);
        assert!(set.is_duplicate(1));
    }

    #[test]
    fn disabled_when_max_entries_is_zero() {
        let mut set = DedupSet::new(1_000, 0);
        set.record_appended(1, 0, 1);
        assert!(!set.is_duplicate(1));
    }

    #[test]
    fn restore_keeps_newest_candidates_inside_window() {
        let mut set = DedupSet::new(100, 2);
        let candidates = vec![
            DedupCandidate {
                seq: 3,
                timestamp_ms: 950,
                dedup_id: 30,
            },
            DedupCandidate {
                seq: 1,
                timestamp_ms: 500,
                dedup_id: 10,
            },
            DedupCandidate {
                seq: 2,
                timestamp_ms: 990,
                dedup_id: 20,
            },
            DedupCandidate {
                seq: 4,
                timestamp_ms: 1_000,
                dedup_id: 40,
            },
        ];
        set.restore(Some(1_000), candidates);
        assert!(!set.is_duplicate(10), "outside the window");
        assert!(!set.is_duplicate(20), "evicted by capacity");
        assert!(set.is_duplicate(30));
        assert!(set.is_duplicate(40));
    }
}
