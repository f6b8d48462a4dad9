//! Which acknowledged writes a read must wait for.
//!
//! Read-your-writes means a person's next recommendation reflects the events they just sent. A
//! read that waited for *everything* acknowledged before it would also wait for every other
//! visitor's events, so its latency would include the processor's lag behind all ingest (a
//! snapshot, a burst) although nothing it reads is pending. Instead every acknowledged event
//! records its sequence number under its partition key (the user id, else the anonymous id), in a
//! fixed table of buckets indexed by a hash of the key (and under the event's other ids too: the
//! anonymous id of a known user's event, an alias's previous id), and a read that names a person
//! waits only for the largest sequence number of that person's buckets. Two keys sharing a bucket only make
//! a read wait a little longer, never too little. Catalogue changes are rare and shape every
//! answer, so reads always wait for the last one. The table is about 512 KiB, whatever the
//! number of users.

use std::sync::atomic::{AtomicU64, Ordering};

use kairos_types::stable_hash64;

const BUCKETS: usize = 1 << 16;

pub struct PendingWrites {
    keys: Box<[AtomicU64]>,
    catalog: AtomicU64,
}

impl Default for PendingWrites {
    fn default() -> Self {
        PendingWrites {
            keys: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            catalog: AtomicU64::new(0),
        }
    }
}

impl PendingWrites {
    /// The bucket of a person id (user id or anonymous id).
    pub fn bucket_of(id: &str) -> usize {
        stable_hash64(&[id.as_bytes()]) as usize % BUCKETS
    }

    /// An event naming the person ids of `bucket` was acknowledged with sequence number `seq`.
    pub fn note_event(&self, bucket: usize, seq: u64) {
        self.keys[bucket].fetch_max(seq, Ordering::AcqRel);
    }

    /// A catalogue change was acknowledged with sequence number `seq`.
    pub fn note_catalog(&self, seq: u64) {
        self.catalog.fetch_max(seq, Ordering::AcqRel);
    }

    /// The sequence number a read for the person with these ids (user id, anonymous id) must
    /// see applied.
    pub fn target<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> u64 {
        ids.into_iter()
            .map(|id| self.keys[Self::bucket_of(id)].load(Ordering::Acquire))
            .fold(self.catalog.load(Ordering::Acquire), u64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_waits_for_its_own_keys_and_the_catalogue() {
        let p = PendingWrites::default();
        assert_eq!(p.target(["u1"]), 0);
        let (u1, a9) = (
            PendingWrites::bucket_of("u1"),
            PendingWrites::bucket_of("a9"),
        );
        p.note_event(u1, 7);
        p.note_event(u1, 5);
        p.note_event(a9, 11);
        assert_eq!(p.target(["u1"]), 7);
        assert_eq!(p.target(["u1", "a9"]), 11);
        p.note_catalog(9);
        assert_eq!(p.target(["u1"]), 9);
        assert_eq!(p.target([]), 9);
    }
}
