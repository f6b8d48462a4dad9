//! The read path of an API replica (`kairos api`): stateless, any number side by side.
//!
//! A replica holds the model (catalogue, item statistics, relations, the session model), which
//! it builds from the model updates the processor replicas publish, and no profile: each request
//! reads the person's profiles from Redis through a [`ProfileReader`] (one to three pipelined
//! round trips), merges them, and ranks over the model with that profile.
//!
//! ## The answer cache
//! Answers are cached for `api.cache_ttl_ms`, keyed by the whole query. A cached answer is
//! dropped as soon as a profile it was built from changes: every profile write to Redis publishes
//! the profile's key, and the node's subscriber calls [`RecCache::invalidate`]. So an answer never
//! lags its person's own events by more than the time the invalidation takes to arrive; changes of
//! the model (other people's events) show within the TTL, and catalogue changes at once (an answer
//! cached for an older catalogue is not served).
//!
//! Invariants:
//! - An answer built from a read that an invalidation of one of its profiles overtook is not
//!   cached: every invalidation is numbered, and [`RecCache::put`] refuses an answer read before
//!   the last invalidation of any of its profiles.
//! - While the subscriber is not connected, nothing is cached (it could not be invalidated); when
//!   it reconnects, everything cached before is dropped ([`RecCache::clear`]), since
//!   invalidations may have been missed meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kairos_recommend::Recommendation;
use kairos_state::portable::Person;
use kairos_types::metrics::{Counter, Registry};

/// Where an API replica reads profiles.
pub trait ProfileReader: Send + Sync + 'static {
    /// What the store holds about the person named by `keys` (`u:<userId>` and/or
    /// `a:<anonymousId>`), following identity links. Blocking.
    fn read(&self, keys: &[&str]) -> Result<Person, String>;
}

/// An API replica's profile store and answer cache.
pub struct Replica {
    pub reader: Arc<dyn ProfileReader>,
    pub cache: Arc<RecCache>,
}

/// Cached recommendation answers (see the module docs).
pub struct RecCache {
    ttl: Duration,
    max_entries: usize,
    live: AtomicBool,
    inner: Mutex<CacheInner>,
    hits: Arc<Counter>,
    misses: Arc<Counter>,
    invalidations: Arc<Counter>,
}

#[derive(Default)]
struct CacheInner {
    entries: HashMap<String, Cached>,
    /// Profile key → cache keys of the answers built from it.
    by_profile: HashMap<String, Vec<String>>,
    /// Numbers invalidations; a read records it before it starts.
    seq: u64,
    /// Per profile key, the number and time of its last invalidation. Entries older than
    /// [`INVALIDATION_MEMORY`] are dropped: no read takes that long.
    invalidated: HashMap<String, (u64, Instant)>,
    /// The number of the last [`RecCache::clear`].
    cleared: u64,
}

struct Cached {
    rec: Arc<Recommendation>,
    at: Instant,
    catalog_version: u64,
}

/// How long an invalidation is remembered against reads still under way.
const INVALIDATION_MEMORY: Duration = Duration::from_secs(30);

/// Where a read stands against invalidations: taken before it starts (see [`RecCache::put`]).
#[derive(Clone, Copy, Debug)]
pub struct ReadTicket(u64);

impl RecCache {
    pub fn new(ttl: Duration, max_entries: usize, registry: &Registry) -> Arc<RecCache> {
        let cache = Arc::new(RecCache {
            ttl,
            max_entries: max_entries.max(1),
            live: AtomicBool::new(false),
            inner: Mutex::new(CacheInner::default()),
            hits: registry.counter(
                "kairos_api_cache_hits_total",
                "Recommendation requests an API replica answered from its cache.",
                &[],
            ),
            misses: registry.counter(
                "kairos_api_cache_misses_total",
                "Recommendation requests an API replica computed (profile read from Redis).",
                &[],
            ),
            invalidations: registry.counter(
                "kairos_api_cache_invalidations_total",
                "Profile changes an API replica was told of (each drops the answers built from that profile).",
                &[],
            ),
        });
        let c = cache.clone();
        registry.computed(
            "kairos_api_cache_entries",
            "Answers in an API replica's cache.",
            &[],
            move || c.lock().entries.len() as f64,
        );
        let (hits, misses) = (cache.hits.clone(), cache.misses.clone());
        registry.computed(
            "kairos_api_cache_hit_ratio",
            "Share of an API replica's recommendation requests answered from its cache.",
            &[],
            move || {
                let (h, m) = (hits.get() as f64, misses.get() as f64);
                if h + m > 0.0 {
                    h / (h + m)
                } else {
                    0.0
                }
            },
        );
        cache
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached answer for `key`, if it is younger than the TTL and was built on the catalogue
    /// `catalog_version`. Counts a hit or a miss.
    pub fn get(&self, key: &str, catalog_version: u64) -> Option<Arc<Recommendation>> {
        let found = {
            let mut inner = self.lock();
            match inner.entries.get(key) {
                Some(c) if c.at.elapsed() < self.ttl && c.catalog_version == catalog_version => {
                    Some(c.rec.clone())
                }
                Some(_) => {
                    inner.entries.remove(key);
                    None
                }
                None => None,
            }
        };
        match &found {
            Some(_) => self.hits.inc(),
            None => self.misses.inc(),
        }
        found
    }

    /// To take before reading the profiles an answer is built from.
    pub fn ticket(&self) -> ReadTicket {
        ReadTicket(self.lock().seq)
    }

    /// Caches `rec` as the answer for `key`, built from the profiles of `deps` read after
    /// `ticket` was taken, unless one of them was invalidated since (or the cache cleared), or
    /// invalidations are not being received.
    pub fn put(
        &self,
        key: String,
        rec: Arc<Recommendation>,
        deps: &[String],
        ticket: ReadTicket,
        catalog_version: u64,
    ) {
        if !self.live.load(Ordering::Acquire) {
            return;
        }
        let mut inner = self.lock();
        let overtaken = inner.cleared > ticket.0
            || deps.iter().any(|d| {
                inner
                    .invalidated
                    .get(d)
                    .is_some_and(|&(seq, _)| seq > ticket.0)
            });
        if overtaken {
            return;
        }
        if inner.entries.len() >= self.max_entries || inner.by_profile.len() >= 2 * self.max_entries
        {
            // Full: start over rather than track recency per entry; a cache that fills within
            // one TTL is too small for the traffic anyway.
            inner.entries.clear();
            inner.by_profile.clear();
        }
        for d in deps {
            inner
                .by_profile
                .entry(d.clone())
                .or_default()
                .push(key.clone());
        }
        inner.entries.insert(
            key,
            Cached {
                rec,
                at: Instant::now(),
                catalog_version,
            },
        );
    }

    /// Drops every answer built from profile `key` (a `u:`/`a:` key).
    pub fn invalidate(&self, key: &str) {
        self.invalidations.inc();
        let mut inner = self.lock();
        inner.seq += 1;
        let seq = inner.seq;
        let now = Instant::now();
        if inner.invalidated.len() >= 100_000 {
            inner
                .invalidated
                .retain(|_, (_, at)| now.duration_since(*at) < INVALIDATION_MEMORY);
        }
        inner.invalidated.insert(key.to_owned(), (seq, now));
        if let Some(keys) = inner.by_profile.remove(key) {
            for k in keys {
                inner.entries.remove(&k);
            }
        }
    }

    /// Drops everything, and refuses answers read before.
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.seq += 1;
        inner.cleared = inner.seq;
        inner.entries.clear();
        inner.by_profile.clear();
    }

    /// Whether invalidations are being received (the subscriber is connected). Going live
    /// clears the cache: invalidations may have been missed while it was not.
    pub fn set_live(&self, live: bool) {
        if live {
            self.clear();
        }
        self.live.store(live, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_recommend::Scenario;

    fn rec() -> Arc<Recommendation> {
        Arc::new(Recommendation {
            scenario: Scenario::ForYou,
            strategy: "test".into(),
            items: Vec::new(),
        })
    }

    fn cache(ttl_ms: u64) -> Arc<RecCache> {
        let c = RecCache::new(Duration::from_millis(ttl_ms), 100, &Registry::default());
        c.set_live(true);
        c
    }

    #[test]
    fn an_invalidation_drops_the_answers_of_that_profile_only() {
        let c = cache(60_000);
        let t = c.ticket();
        c.put("q1".into(), rec(), &["u:a".into()], t, 0);
        c.put("q2".into(), rec(), &["u:b".into(), "a:x".into()], t, 0);
        assert!(c.get("q1", 0).is_some());
        c.invalidate("a:x");
        assert!(c.get("q1", 0).is_some());
        assert!(c.get("q2", 0).is_none());
        assert_eq!((c.hits.get(), c.misses.get()), (2, 1));
    }

    #[test]
    fn an_answer_read_before_an_invalidation_of_its_profile_is_not_cached() {
        let c = cache(60_000);
        let before = c.ticket();
        c.invalidate("u:a");
        c.put("q".into(), rec(), &["u:a".into()], before, 0);
        assert!(c.get("q", 0).is_none());
        // Another profile's invalidation does not matter.
        let t = c.ticket();
        c.invalidate("u:other");
        c.put("q".into(), rec(), &["u:a".into()], t, 0);
        assert!(c.get("q", 0).is_some());
    }

    #[test]
    fn nothing_is_cached_while_not_live_and_going_live_clears() {
        let c = cache(60_000);
        c.put("q".into(), rec(), &[], c.ticket(), 0);
        c.set_live(false);
        c.put("r".into(), rec(), &[], c.ticket(), 0);
        assert!(c.get("r", 0).is_none());
        let before = c.ticket();
        c.set_live(true);
        assert!(c.get("q", 0).is_none(), "cleared when going live");
        c.put("s".into(), rec(), &[], before, 0);
        assert!(c.get("s", 0).is_none(), "read before the clear");
    }

    #[test]
    fn an_answer_expires_and_a_catalogue_change_hides_it() {
        let c = cache(60_000);
        c.put("q".into(), rec(), &[], c.ticket(), 7);
        assert!(c.get("q", 8).is_none());
        c.put("q".into(), rec(), &[], c.ticket(), 7);
        assert!(c.get("q", 7).is_some());
        let short = cache(1);
        short.put("q".into(), rec(), &[], short.ticket(), 7);
        std::thread::sleep(Duration::from_millis(5));
        assert!(short.get("q", 7).is_none());
    }
}
