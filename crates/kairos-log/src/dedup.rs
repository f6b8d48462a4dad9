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
use std::hash::BuildHasherDefault;

/// A record seen in the log that may populate the dedup set on open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DedupCandidate {
    pub(crate) seq: u64,
    pub(crate) timestamp_ms: i64,
    pub(crate) dedup_id: u64,
}

/// One remembered insertion, in insertion order.
#[derive(Clone, Copy, Debug)]
struct Queued {
    dedup_id: u64,
    timestamp_ms: i64,
}

/// Dedup ids are already uniformly distributed 64-bit hashes, so the table hashes them with the
/// identity function rather than SipHash.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Dedup ids of recently appended records. Owned by the writer thread.
///
/// Memory matters here: with the default window every event of the last 24 hours (up to
/// `max_entries`, 10 million) is remembered, so one entry is kept small. The queue holds the id
/// and timestamp of every insertion; the table maps an id to the insertion number of its live
/// entry (insertion `n` sits at queue position `n - popped`), which also tells a live queue
/// element from a stale one left behind when an expired id was inserted again. About 32 to 64
/// bytes per remembered id.
pub(crate) struct DedupSet {
    window_ms: i64,
    max_entries: usize,
    /// Newest appended timestamp; `None` while the log is empty.
    clock_ms: Option<i64>,
    entries: HashMap<u64, u64, BuildHasherDefault<IdHasher>>,
    /// Insertion order, for eviction. May hold stale elements for ids that
    /// were re-inserted; they are skipped when popped.
    order: VecDeque<Queued>,
    /// Insertions popped from the front of `order` so far.
    popped: u64,
}

impl std::fmt::Debug for DedupSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedupSet")
            .field("window_ms", &self.window_ms)
            .field("max_entries", &self.max_entries)
            .field("clock_ms", &self.clock_ms)
            .field("entries", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl DedupSet {
    pub(crate) fn new(window_ms: i64, max_entries: usize) -> Self {
        DedupSet {
            window_ms,
            max_entries,
            clock_ms: None,
            entries: HashMap::default(),
            order: VecDeque::new(),
            popped: 0,
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
        self.entries.get(&dedup_id).is_some_and(|&n| {
            self.order
                .get((n - self.popped) as usize)
                .is_some_and(|q| q.timestamp_ms >= cutoff)
        })
    }

    /// Registers an appended record: advances the clock and remembers its id.
    pub(crate) fn record_appended(&mut self, dedup_id: u64, timestamp_ms: i64) {
        self.clock_ms = Some(self.clock_ms.map_or(timestamp_ms, |c| c.max(timestamp_ms)));
        if dedup_id == 0 || !self.enabled() {
            return;
        }
        self.insert(dedup_id, timestamp_ms);
        self.evict();
    }

    fn insert(&mut self, dedup_id: u64, timestamp_ms: i64) {
        let n = self.popped + self.order.len() as u64;
        self.entries.insert(dedup_id, n);
        self.order.push_back(Queued {
            dedup_id,
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
            let n = self.popped;
            self.popped += 1;
            if let MapEntry::Occupied(entry) = self.entries.entry(front.dedup_id) {
                if *entry.get() == n {
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
            self.insert(candidate.dedup_id, candidate.timestamp_ms);
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
        set.record_appended(7, 10_000);
        assert!(set.is_duplicate(7));
        assert!(!set.is_duplicate(0));
        set.record_appended(0, 10_500);
        assert!(set.is_duplicate(7), "still inside the window");
        set.record_appended(8, 11_001);
        assert!(!set.is_duplicate(7), "clock moved past the window");
        assert!(set.is_duplicate(8));
        set.record_appended(7, 11_002);
        assert!(set.is_duplicate(7), "re-inserted after expiry");
    }

    #[test]
    fn capacity_evicts_oldest_inserted() {
        let mut set = DedupSet::new(i64::MAX, 3);
        for id in 1..=5u64 {
            set.record_appended(id, 0);
        }
        assert_eq!(set.len(), 3);
        assert!(!set.is_duplicate(1));
        assert!(!set.is_duplicate(2));
        assert!((3..=5).all(|id| set.is_duplicate(id)));
    }

    #[test]
    fn stale_queue_element_does_not_remove_reinserted_id() {
        let mut set = DedupSet::new(100, 10);
        set.record_appended(1, 0);
        set.record_appended(2, 200);
        // id 1 expired (0 < 200 - 100) and is re-appended.
        assert!(!set.is_duplicate(1));
        set.record_appended(1, 200);
        set.record_appended(3, 250);
        assert!(set.is_duplicate(1));
    }

    #[test]
    fn disabled_when_max_entries_is_zero() {
        let mut set = DedupSet::new(1_000, 0);
        set.record_appended(1, 0);
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
