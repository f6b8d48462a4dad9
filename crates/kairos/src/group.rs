//! `kairos process`: one of several processor replicas that share the event log's partitions as
//! a Kafka consumer group, with the profiles in Redis.
//!
//! ## Who writes what
//! The group gives each replica a set of partitions. A replica applies the events of its
//! partitions (and every partition's catalogue entries, which all replicas need) to an in-memory
//! state that holds only the profiles it has touched, and its Redis thread writes the changed
//! ones. Events are keyed by user, so every profile key has one partition, hence one writer at a
//! time; identities are linked, not merged, for that reason (see `GroupView` in the state).
//!
//! ## Exactly once across crashes and rebalances
//! - A profile in Redis carries the offset of its partition it reflects (`f`): every event of
//!   that partition below it is in the profile, none at or above it.
//! - Before applying an event whose profile it does not hold, a replica loads the profile from
//!   Redis ([`RedisPartitioning::admit`], one pipelined round trip per batch) and remembers that
//!   offset as the profile's fence; events below the fence are dropped, not applied again.
//! - The group's committed offset of a partition only moves once every profile changed below it
//!   is in Redis ([`commit_durable`]): a replica that takes a partition over re-reads it from
//!   there, and the fences drop what the previous owner had already written.
//! - A replica that gains or loses a partition forgets every profile of it: another replica
//!   may have changed them meanwhile, and Redis has the newer copy.
//! - Writes compare the partition's offset in Redis (a Lua script): a replica that lost a
//!   partition and has not noticed yet cannot put an older profile over a newer one.
//!
//! So a SIGKILL anywhere (after a Redis write and before the offset commit, or in the middle of
//! a write) leaves each event counted once: `tests/it/group.rs` kills a replica under load and
//! checks every profile's counts against the acknowledged events.
//!
//! ## Memory
//! A replica holds at most `[redis] process_max_profiles` profiles. Beyond, before a batch is
//! admitted, it drops the least recently active ones whose every change is in Redis: not changed
//! since the Redis thread's last take, and not in the write under way
//! ([`EmbeddedStore::evict_copied_profiles`]). It does so on the thread that applies, so that a
//! profile cannot go between its load and its events' apply; it is loaded again, with its fence,
//! at its next event. (Dropped while its write was still under way, a profile would come back
//! from Redis without its last events: the group test loses events that way.)
//!
//! ## Redis losing the profiles
//! Each partition has a marker in Redis holding its incarnation. A replica checks the markers of
//! its partitions every second ([`RedisPartitioning::lost`]); a missing one means Redis lost
//! them (restarted empty, flushed). The replica then rebuilds the partition: it forgets what it
//! holds, commits the start of the log as the group's offset (so a crash midway starts over),
//! starts a new incarnation and re-applies the partition from the start. Profiles written in an
//! older incarnation are neither loaded nor kept: after the loss and before the check, the
//! replica may have written profiles from memory, which are right but came without the identity
//! links Redis lost, and whose offsets would otherwise fence out the events that make them
//! again. The rebuild is exact as long as the topic still holds the partition's events.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kairos_log::EventLog;
use kairos_processor::Partitioning;
use kairos_state::portable::StoredProfile;
use kairos_state::redis_mirror::{OnDurable, RedisProfiles};
use kairos_state::{
    anonymous_key, user_key, EmbeddedStore, GroupView, LogPosition, State, StateStore,
};
use kairos_types::metrics::{Counter, Registry};
use kairos_types::{Event, LogEntry};

/// The log partition of a profile key (`u:<userId>` or `a:<anonymousId>`): the partition its
/// events are keyed to.
pub fn partition_of(key: &str, partitions: u32) -> u32 {
    let id = key.get(2..).unwrap_or(key);
    kairos_log::partition_for(id.as_bytes(), partitions)
}

/// The profile key an event applies to in a group (identities are not followed; see the module
/// docs).
fn profile_key(e: &Event) -> Option<String> {
    match (&e.user_id, &e.anonymous_id) {
        (Some(u), _) => Some(user_key(u)),
        (None, Some(a)) => Some(anonymous_key(a)),
        (None, None) => None,
    }
}

/// The [`Partitioning`] of `kairos process`: profiles loaded from Redis on first use and fenced
/// by the partition offset stored with them.
pub struct RedisPartitioning {
    store: Arc<EmbeddedStore>,
    log: Arc<dyn EventLog>,
    redis: RedisProfiles,
    /// Shared with [`commit_durable`].
    commit_lock: Arc<Mutex<()>>,
    last_marker_check: Option<Instant>,
    partitions: u32,
    /// Per profile loaded from Redis, the offset of its partition below which its events are in
    /// the stored profile (only where that is above 0).
    fences: HashMap<Box<str>, u64>,
    stop: Arc<AtomicBool>,
    loaded: Arc<Counter>,
    fenced: Arc<Counter>,
    admitted: Arc<Counter>,
    rebuilds: Arc<Counter>,
    evicted: Arc<Counter>,
    /// Profiles held in memory at most (`[redis] process_max_profiles`).
    max_profiles: usize,
    misplaced_reported: bool,
}

/// How often a replica checks that Redis still has its partitions' markers.
const MARKER_CHECK_INTERVAL: Duration = Duration::from_secs(1);

impl RedisPartitioning {
    /// Puts `store` in group mode (see `GroupView`) and reads profiles with `redis`; `log` is
    /// the group's.
    pub fn new(
        store: Arc<EmbeddedStore>,
        log: Arc<dyn EventLog>,
        redis: RedisProfiles,
        commit_lock: Arc<Mutex<()>>,
        max_profiles: usize,
        stop: Arc<AtomicBool>,
        registry: &Registry,
    ) -> RedisPartitioning {
        store.write().group = Some(GroupView::default());
        let partitions = log.partition_count();
        RedisPartitioning {
            store,
            log,
            redis,
            commit_lock,
            last_marker_check: None,
            partitions,
            fences: HashMap::new(),
            stop,
            loaded: registry.counter(
                "kairos_group_profiles_loaded_total",
                "Profiles a processor replica read from Redis before applying their events.",
                &[],
            ),
            fenced: registry.counter(
                "kairos_group_events_fenced_total",
                "Events a processor replica dropped because the profile in Redis already had them (re-read after a takeover).",
                &[],
            ),
            admitted: registry.counter(
                "kairos_group_events_applied_total",
                "Events of its own partitions a processor replica applied (catalogue entries, which every replica applies, not included).",
                &[],
            ),
            max_profiles,
            misplaced_reported: false,
            evicted: registry.counter(
                "kairos_group_profiles_evicted_total",
                "Profiles a processor replica dropped from memory, already in Redis, to hold at most process_max_profiles.",
                &[],
            ),
            rebuilds: registry.counter(
                "kairos_group_partition_rebuilds_total",
                "Partitions a processor replica rebuilt from the start of the log because Redis had lost their profiles.",
                &[],
            ),
        }
    }

    /// Loads the stored profiles of `keys` into the state. Redis errors are retried with
    /// backoff until it answers (events wait; none is applied without its profile), or the
    /// node stops.
    fn load(&mut self, keys: &[String]) -> Result<(), String> {
        let partitions = self.partitions;
        let of = move |k: &str| partition_of(k, partitions);
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let tokens = self
            .store
            .read()
            .group
            .as_ref()
            .map(|g| g.tokens.clone())
            .unwrap_or_default();
        let redis = &mut self.redis;
        let found = until_answered(&self.stop, "reading profiles from Redis", || {
            redis.load(&refs, &of, &tokens)
        })?;
        let mut state = self.store.write();
        for (key, found) in keys.iter().zip(found) {
            tracing::debug!(key, found = ?found.as_ref().map(|(p, o)| (matches!(p, StoredProfile::Profile(_)), o)), "profile loaded");
            let Some((stored, offset)) = found else {
                continue;
            };
            let StoredProfile::Profile(portable) = stored else {
                continue;
            };
            match portable.import(&mut state) {
                Some(profile) => state.users.load(key, profile),
                None => {
                    return Err(format!(
                        "the profile of {key:?} in Redis refers past its own tables"
                    ))
                }
            }
            self.loaded.inc();
            if offset > 0 {
                self.fences.insert(key.as_str().into(), offset);
            }
        }
        Ok(())
    }
}

impl Partitioning for RedisPartitioning {
    fn admit(
        &mut self,
        entries: &mut Vec<(LogPosition, LogEntry)>,
        owned: &[bool],
    ) -> Result<(), String> {
        // Here, on the thread that applies: a profile dropped between its load below and its
        // events' apply would start again empty.
        let evicted = self.store.evict_copied_profiles(self.max_profiles);
        for key in &evicted {
            self.fences.remove(key);
        }
        self.evicted.add(evicted.len() as u64);
        // The profile key of each event of an owned partition (`None` for the rest), worked out
        // once for the loads and the fences below.
        let keys: Vec<Option<String>> = entries
            .iter()
            .map(|(pos, entry)| match entry {
                LogEntry::Event(e) if owned.get(pos.partition as usize) == Some(&true) => {
                    profile_key(e)
                }
                _ => None,
            })
            .collect();
        let missing: Vec<String> = {
            let state = self.store.read();
            let mut seen = HashSet::new();
            keys.iter()
                .flatten()
                .filter(|key| !state.users.contains_key(key) && seen.insert(*key))
                .cloned()
                .collect()
        };
        if !missing.is_empty() {
            self.load(&missing)?;
        }
        let (mut fenced, mut admitted) = (0, 0);
        let mut keys = keys.into_iter();
        entries.retain(|(pos, entry)| {
            let key = keys.next().flatten();
            let LogEntry::Event(_) = entry else {
                return true;
            };
            if owned.get(pos.partition as usize) != Some(&true) {
                return false;
            }
            let Some(key) = key else {
                return true;
            };
            if partition_of(&key, self.partitions) != pos.partition && !self.misplaced_reported {
                // Produced by a client with another partitioner: its profile gets two writers,
                // and the fences no longer make a takeover exact. Said once, not per event.
                tracing::error!(
                    key,
                    partition = pos.partition,
                    "an event is not in the partition of its profile key: events must be produced keyed by user id (else anonymous id) with the murmur2 partitioner"
                );
                self.misplaced_reported = true;
            }
            let stored = self
                .fences
                .get(key.as_str())
                .is_some_and(|&f| pos.offset < f);
            fenced += u64::from(stored);
            admitted += u64::from(!stored);
            !stored
        });
        self.fenced.add(fenced);
        self.admitted.add(admitted);
        Ok(())
    }

    fn reassigned(
        &mut self,
        generation: u64,
        gained: &[(u32, u64)],
        released: &[u32],
    ) -> Result<(), String> {
        let commit_lock = self.commit_lock.clone();
        let _commits = lock(&commit_lock);
        let forgotten = self.forget(gained, released);
        {
            let mut state = self.store.write();
            let group = group_view(&mut state, self.partitions);
            group.generation = generation;
            // Learnt from the partitions' markers by the next `lost`, which runs at once.
            for &(p, _) in gained {
                group.tokens[p as usize] = 0;
                group.owned[p as usize] = true;
            }
            for &p in released {
                group.owned[p as usize] = false;
            }
        }
        self.last_marker_check = None;
        tracing::info!(
            profiles_forgotten = forgotten,
            "profiles of reassigned partitions forgotten"
        );
        Ok(())
    }

    fn lost(&mut self, owned: &[u32]) -> Result<Vec<u32>, String> {
        if owned.is_empty()
            || self
                .last_marker_check
                .is_some_and(|t| t.elapsed() < MARKER_CHECK_INTERVAL)
        {
            return Ok(Vec::new());
        }
        self.last_marker_check = Some(Instant::now());
        let found = match self.redis.partition_tokens(owned) {
            Ok(found) => found,
            Err(e) => {
                // Redis down: nothing to decide until it answers (writes and loads retry).
                tracing::warn!(error = %e, "reading the partitions' markers from Redis failed");
                return Ok(Vec::new());
            }
        };
        let mut state = self.store.write();
        let group = group_view(&mut state, self.partitions);
        let mut lost = Vec::new();
        for (&p, found) in owned.iter().zip(found) {
            let mine = &mut group.tokens[p as usize];
            match found {
                // Gone: Redis lost the profiles (or never had them).
                None => lost.push(p),
                Some(t) if *mine == 0 => *mine = t,
                // Rebuilt by another replica that owned it meanwhile: what this one holds
                // belongs to an older incarnation. The rebuild's will be newer than both.
                Some(t) if t != *mine => {
                    *mine = (*mine).max(t);
                    lost.push(p);
                }
                Some(_) => {}
            }
        }
        Ok(lost)
    }

    fn rebuild(&mut self, partitions: &[(u32, u64)]) -> Result<(), String> {
        // Missing where the group never committed an offset either: a first start, not a loss.
        let ids: Vec<u32> = partitions.iter().map(|&(p, _)| p).collect();
        let first_start = self
            .log
            .committed_offsets(&ids)
            .is_ok_and(|committed| committed.iter().all(Option::is_none));
        let commit_lock = self.commit_lock.clone();
        let commits = lock(&commit_lock);
        let forgotten = self.forget(partitions, &[]);
        // A new incarnation: newer than any this partition had, so that its profiles replace
        // whatever Redis holds of older ones.
        let now = u64::try_from(kairos_types::time::now_ms()).unwrap_or(0);
        let tokens: Vec<(u32, u64)> = {
            let mut state = self.store.write();
            let group = group_view(&mut state, self.partitions);
            partitions
                .iter()
                .map(|&(p, _)| {
                    let token = now.max(group.tokens[p as usize] + 1);
                    group.tokens[p as usize] = token;
                    (p, token)
                })
                .collect()
        };
        // The group resumes from the start too if this replica stops before it is done.
        self.log
            .commit_offsets(partitions)
            .map_err(|e| format!("committing the rebuild's start: {e}"))?;
        drop(commits);
        for (p, token) in tokens {
            let redis = &mut self.redis;
            until_answered(
                &self.stop,
                &format!("marking partition {p} in Redis"),
                || redis.set_partition_token(p, token),
            )?;
        }
        if first_start {
            tracing::info!(partitions = ?partitions, "profiles of these partitions start in Redis");
        } else {
            tracing::warn!(
                partitions = ?partitions,
                profiles_forgotten = forgotten,
                "Redis lost the profiles of these partitions: rebuilding them from the start of the log"
            );
            self.rebuilds.add(partitions.len() as u64);
        }
        Ok(())
    }
}

impl RedisPartitioning {
    /// Forgets every profile, fence and pending link of the partitions in `resume` (which the
    /// state's checkpoint then resumes from) and `released`, and starts a new epoch: offsets
    /// taken before are not committed. Returns how many profiles were forgotten.
    fn forget(&mut self, resume: &[(u32, u64)], released: &[u32]) -> usize {
        let moved: HashSet<u32> = resume
            .iter()
            .map(|&(p, _)| p)
            .chain(released.iter().copied())
            .collect();
        let partitions = self.partitions;
        let mut state = self.store.write();
        let state = &mut *state;
        let forget: Vec<Box<str>> = state
            .users
            .keys()
            .filter(|k| moved.contains(&partition_of(k, partitions)))
            .map(Into::into)
            .collect();
        for key in &forget {
            state.users.forget(key);
        }
        state
            .links
            .retain(|_, user| !moved.contains(&partition_of(user, partitions)));
        self.fences
            .retain(|k, _| !moved.contains(&partition_of(k, partitions)));
        for &(p, from) in resume {
            let offsets = &mut state.checkpoint.offsets;
            if offsets.len() <= p as usize {
                offsets.resize(p as usize + 1, 0);
            }
            offsets[p as usize] = from;
        }
        let group = group_view(state, partitions);
        group.epoch += 1;
        // Links of these partitions are made again by whoever applies their events.
        group
            .new_links
            .retain(|(_, user)| !moved.contains(&partition_of(user, partitions)));
        forget.len()
    }
}

/// The state's group view, with an incarnation and an ownership slot for each of the log's
/// `partitions`.
fn group_view(state: &mut State, partitions: u32) -> &mut GroupView {
    let group = state.group.get_or_insert_with(GroupView::default);
    group.tokens.resize(partitions as usize, 0);
    group.owned.resize(partitions as usize, false);
    group
}

/// Runs `op` until Redis answers, with backoff, unless `stop` is set first. Events wait
/// meanwhile: none is applied without what Redis holds for it.
fn until_answered<T, E: std::fmt::Display>(
    stop: &AtomicBool,
    what: &str,
    mut op: impl FnMut() -> Result<T, E>,
) -> Result<T, String> {
    let mut backoff = Duration::from_millis(50);
    loop {
        match op() {
            Ok(v) => return Ok(v),
            Err(e) if stop.load(Ordering::Acquire) => return Err(format!("{what}: {e}")),
            Err(e) => {
                tracing::warn!(error = %e, "{what} failed; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The mirror's [`OnDurable`] for a group: commits the offsets of the partitions this replica
/// owns, at most every `interval` and after the last flush, and only from a checkpoint taken in
/// the current epoch under the current assignment. A checkpoint from before a reassignment may be
/// ahead of what was applied of a partition gained since (catalogue entries move it while the
/// partition's events are skipped), and one from before a rebuild covers profiles Redis lost.
/// `commit_lock` orders these commits with a rebuild's own.
pub fn commit_durable(
    log: Arc<dyn EventLog>,
    store: Arc<EmbeddedStore>,
    commit_lock: Arc<Mutex<()>>,
    interval: Duration,
) -> OnDurable {
    let mut last_time: Option<Instant> = None;
    let mut last_offsets: HashMap<u32, u64> = HashMap::new();
    Box::new(move |epoch, offsets, last_flush| {
        if !last_flush && last_time.is_some_and(|t| t.elapsed() < interval) {
            return;
        }
        let _commits = lock(&commit_lock);
        let Some(generation) = store
            .read()
            .group
            .as_ref()
            .filter(|g| g.epoch == epoch)
            .map(|g| g.generation)
        else {
            return;
        };
        let Some(assignment) = log.assignment() else {
            return;
        };
        if assignment.generation != generation || generation == 0 {
            return;
        }
        let commits: Vec<(u32, u64)> = assignment
            .partitions
            .iter()
            .filter_map(|&p| Some((p, *offsets.get(p as usize)?)))
            .filter(|(p, o)| last_offsets.get(p) != Some(o))
            .collect();
        last_time = Some(Instant::now());
        if commits.is_empty() {
            return;
        }
        match log.commit_offsets(&commits) {
            Ok(()) => last_offsets.extend(commits),
            Err(e) => tracing::warn!(error = %e, "committing the group's offsets failed"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_key_has_the_partition_of_its_id() {
        for id in ["alice", "bob", "visitor-17", ""] {
            for n in [1, 4, 12] {
                let p = kairos_log::partition_for(id.as_bytes(), n);
                assert_eq!(partition_of(&user_key(id), n), p);
                assert_eq!(partition_of(&anonymous_key(id), n), p);
            }
        }
    }
}
