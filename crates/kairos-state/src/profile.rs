//! User profiles: what one person did, bounded so that a profile never outgrows ~1 KiB.
//!
//! Bounds (defaults from [`StateConfig`]): `max_recent_items` recent interactions (16 bytes each),
//! `max_cart_items` cart lines, `max_purchases` purchased items, `max_affinities` categories and
//! brands (8 bytes each), plus fixed counters. Anything older falls off the end.

use std::collections::VecDeque;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

use kairos_types::LearnedAction;

use crate::config::StateConfig;
use crate::decay::TopList;

/// Interaction types a profile remembers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum Action {
    View = 0,
    Click = 1,
    Cart = 2,
    Purchase = 3,
}

impl From<LearnedAction> for Action {
    fn from(a: LearnedAction) -> Action {
        match a {
            LearnedAction::View => Action::View,
            LearnedAction::Click => Action::Click,
            LearnedAction::Cart => Action::Cart,
            LearnedAction::Purchase => Action::Purchase,
        }
    }
}

impl From<Action> for LearnedAction {
    fn from(a: Action) -> LearnedAction {
        match a {
            Action::View => LearnedAction::View,
            Action::Click => LearnedAction::Click,
            Action::Cart => LearnedAction::Cart,
            Action::Purchase => LearnedAction::Purchase,
        }
    }
}

/// One remembered interaction.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    pub item: u32,
    pub action: Action,
    /// Ordinal of the profile's session this happened in (wrapping).
    pub session: u16,
    pub ts: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub events: u64,
    pub page_views: u64,
    pub product_views: u64,
    pub clicks: u64,
    pub searches: u64,
    pub add_to_carts: u64,
    pub purchases: u64,
    pub sessions: u64,
    pub rec_impressions: u64,
    pub rec_clicks: u64,
    pub revenue: f64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.events += o.events;
        self.page_views += o.page_views;
        self.product_views += o.product_views;
        self.clicks += o.clicks;
        self.searches += o.searches;
        self.add_to_carts += o.add_to_carts;
        self.purchases += o.purchases;
        self.sessions += o.sessions;
        self.rec_impressions += o.rec_impressions;
        self.rec_clicks += o.rec_clicks;
        self.revenue += o.revenue;
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub first_seen: i64,
    pub last_seen: i64,
    /// Opaque key of the current session (hash of the user key and session id or start time).
    pub session_key: u64,
    /// The tracker's session id, when it sent one.
    pub session_id: Option<Box<str>>,
    pub session_start: i64,
    /// Ordinal of the current session, matched by [`Interaction::session`].
    pub session_no: u16,
    pub recent: VecDeque<Interaction>,
    /// Cart lines `(item, quantity)`.
    pub cart: Vec<(u32, f32)>,
    pub purchased: VecDeque<u32>,
    pub categories: TopList,
    pub brands: TopList,
    pub counters: Counters,
}

impl Profile {
    /// Items of the current session, oldest first (repeats kept).
    pub fn session_items(&self) -> impl DoubleEndedIterator<Item = &Interaction> + '_ {
        let no = self.session_no;
        let start = self
            .recent
            .iter()
            .rposition(|i| i.session != no)
            .map_or(0, |p| p + 1);
        self.recent.range(start..)
    }

    pub fn remember(&mut self, interaction: Interaction, cfg: &StateConfig) {
        if cfg.max_recent_items == 0 {
            return;
        }
        while self.recent.len() >= cfg.max_recent_items {
            self.recent.pop_front();
        }
        self.recent.push_back(interaction);
    }

    pub fn cart_add(&mut self, item: u32, qty: f32, cfg: &StateConfig) {
        if let Some(line) = self.cart.iter_mut().find(|l| l.0 == item) {
            line.1 += qty;
            return;
        }
        if self.cart.len() >= cfg.max_cart_items {
            if cfg.max_cart_items == 0 {
                return;
            }
            self.cart.remove(0);
        }
        self.cart.push((item, qty));
    }

    pub fn cart_remove(&mut self, item: u32, qty: Option<f32>) {
        if let Some(pos) = self.cart.iter().position(|l| l.0 == item) {
            match qty {
                Some(q) if self.cart[pos].1 > q => self.cart[pos].1 -= q,
                _ => {
                    self.cart.remove(pos);
                }
            }
        }
    }

    pub fn purchase(&mut self, item: u32, cfg: &StateConfig) {
        self.cart_remove(item, None);
        if let Some(pos) = self.purchased.iter().position(|&p| p == item) {
            self.purchased.remove(pos);
        }
        if cfg.max_purchases == 0 {
            return;
        }
        while self.purchased.len() >= cfg.max_purchases {
            self.purchased.pop_front();
        }
        self.purchased.push_back(item);
    }

    /// Merges another profile of the same person (an anonymous one being identified) into this one.
    ///
    /// Counters add up; lists are merged by time and re-bounded; affinities add (decayed to the later
    /// reference time); the more recent session becomes the current one.
    pub fn merge_from(&mut self, other: &Profile, cfg: &StateConfig) {
        if other.counters.events == 0 && other.recent.is_empty() && other.first_seen == 0 {
            return;
        }
        let other_is_current = other.last_seen > self.last_seen;
        // Renumber sessions so that the current session of the winner keeps its ordinal and the
        // other profile's interactions never look like part of it.
        let (keep_no, mut merged): (u16, Vec<Interaction>) = if other_is_current {
            let shift = other.session_no;
            let mine = self.recent.iter().map(|i| Interaction {
                session: shift.wrapping_sub(1),
                ..*i
            });
            (
                other.session_no,
                mine.chain(other.recent.iter().copied()).collect(),
            )
        } else {
            let shift = self.session_no;
            let theirs = other.recent.iter().map(|i| Interaction {
                session: shift.wrapping_sub(1),
                ..*i
            });
            (
                self.session_no,
                self.recent.iter().copied().chain(theirs).collect(),
            )
        };
        merged.sort_by_key(|i| i.ts);
        if merged.len() > cfg.max_recent_items {
            merged.drain(..merged.len() - cfg.max_recent_items);
        }
        self.recent = merged.into();
        if other_is_current {
            self.session_key = other.session_key;
            self.session_id = other.session_id.clone();
            self.session_start = other.session_start;
        }
        self.session_no = keep_no;
        for &(item, qty) in &other.cart {
            self.cart_add(item, qty, cfg);
        }
        for &item in &other.purchased {
            if !self.purchased.contains(&item) {
                self.purchase(item, cfg);
            }
        }
        self.categories.merge(
            &other.categories,
            cfg.affinity_half_life_ms(),
            cfg.max_affinities,
        );
        self.brands.merge(
            &other.brands,
            cfg.affinity_half_life_ms(),
            cfg.max_affinities,
        );
        self.counters.add(&other.counters);
        self.first_seen = match (self.first_seen, other.first_seen) {
            (0, o) => o,
            (s, 0) => s,
            (s, o) => s.min(o),
        };
        self.last_seen = self.last_seen.max(other.last_seen);
    }

    /// Approximate heap bytes (for the documented per-user bound and metrics).
    pub fn heap_bytes(&self) -> usize {
        self.recent.capacity() * std::mem::size_of::<Interaction>()
            + self.cart.capacity() * 8
            + self.purchased.capacity() * 4
            + self.categories.heap_bytes()
            + self.brands.heap_bytes()
            + self.session_id.as_ref().map_or(0, |s| s.len())
    }
}

/// All profiles, by profile key (`u:<userId>` or `a:<anonymousId>`).
///
/// A map with the API of a `HashMap<str, Profile>`, but laid out for memory: the profiles live in
/// one dense vector and the hash table holds only the key and a 4-byte slot. A `Profile` is about
/// 300 bytes; stored inline in a hash table that doubles as it grows (and runs at a load factor
/// between 44% and 87%) it cost up to twice that per user, which is most of the per-user budget.
/// Removed profiles (merged into a known user) leave a free slot for the next new profile.
///
/// With [`Profiles::track_changes`] on, every key written since the last
/// [`Profiles::take_changes`] is remembered, so that a store mirroring the profiles elsewhere
/// (Redis) writes only what changed. Off by default: the embedded store has nowhere to send them.
#[derive(Clone, Debug, Default)]
pub struct Profiles {
    index: FxHashMap<Box<str>, u32>,
    slots: Vec<Profile>,
    free: Vec<u32>,
    changed: Option<FxHashSet<Box<str>>>,
}

impl Profiles {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&Profile> {
        self.index.get(key).map(|&i| &self.slots[i as usize])
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Profile> {
        let &i = self.index.get(key)?;
        self.mark_changed(key);
        Some(&mut self.slots[i as usize])
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// The profile of `key`, created empty if there is none (the key is copied only then).
    pub fn get_or_insert(&mut self, key: &str) -> &mut Profile {
        let slot = self.slot_of(key);
        self.mark_changed(key);
        &mut self.slots[slot as usize]
    }

    /// The slot of `key`, given an empty one if it has none.
    fn slot_of(&mut self, key: &str) -> u32 {
        if let Some(&i) = self.index.get(key) {
            return i;
        }
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Profile::default());
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(key.into(), i);
        i
    }

    /// Puts `profile` under `key` as read from a store elsewhere (Redis): not a change to copy
    /// back there.
    pub fn load(&mut self, key: &str, profile: Profile) {
        let slot = self.slot_of(key);
        self.slots[slot as usize] = profile;
    }

    /// Drops the profile of `key` from memory, changes not yet copied included: it lives on in
    /// a store elsewhere (a processor that no longer owns the key's partition).
    pub fn forget(&mut self, key: &str) {
        if let Some(i) = self.index.remove(key) {
            self.free.push(i);
            self.slots[i as usize] = Profile::default();
        }
        if let Some(changed) = &mut self.changed {
            changed.remove(key);
        }
    }

    /// Removes and returns the profile of `key`.
    pub fn remove(&mut self, key: &str) -> Option<Profile> {
        let i = self.index.remove(key)?;
        self.free.push(i);
        self.mark_changed(key);
        Some(std::mem::take(&mut self.slots[i as usize]))
    }

    /// Starts (or stops) remembering which keys are written or removed.
    pub fn track_changes(&mut self, on: bool) {
        self.changed = on.then(|| self.changed.take().unwrap_or_default());
    }

    /// The keys written or removed since the last call (empty when tracking is off). A removed
    /// key is among them, and no longer has a profile.
    pub fn take_changes(&mut self) -> FxHashSet<Box<str>> {
        match &mut self.changed {
            Some(changed) => std::mem::take(changed),
            None => FxHashSet::default(),
        }
    }

    /// Marks `keys` as changed again (a write that failed is retried with what the profiles
    /// hold by then).
    pub fn mark_changed_again(&mut self, keys: impl IntoIterator<Item = Box<str>>) {
        if let Some(changed) = &mut self.changed {
            changed.extend(keys);
        }
    }

    /// Whether `key` changed since the last [`Profiles::take_changes`] (`false` when tracking
    /// is off).
    pub fn is_changed(&self, key: &str) -> bool {
        self.changed.as_ref().is_some_and(|c| c.contains(key))
    }

    /// Marks every key as changed (the mirror lost its copy).
    pub fn mark_all_changed(&mut self) {
        if let Some(changed) = &mut self.changed {
            changed.extend(self.index.keys().cloned());
        }
    }

    /// Marks `key` as changed (when tracking): its profile, or what it links to, changed.
    pub fn mark_changed(&mut self, key: &str) {
        if let Some(changed) = &mut self.changed {
            if !changed.contains(key) {
                changed.insert(key.into());
            }
        }
    }

    /// Profiles with their keys (in no particular order).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Profile)> + '_ {
        self.index
            .iter()
            .map(|(k, &i)| (k.as_ref(), &self.slots[i as usize]))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.index.keys().map(AsRef::as_ref)
    }

    pub fn values(&self) -> impl Iterator<Item = &Profile> + '_ {
        self.index.values().map(|&i| &self.slots[i as usize])
    }

    /// Approximate heap bytes: the table (key pointer, slot, control byte per bucket), the keys,
    /// the slots and every profile's own heap.
    pub fn heap_bytes(&self) -> usize {
        let table = self.index.capacity() * (std::mem::size_of::<(Box<str>, u32)>() + 1);
        let keys: usize = self.index.keys().map(|k| k.len()).sum();
        let slots =
            self.slots.capacity() * std::mem::size_of::<Profile>() + self.free.capacity() * 4;
        let heap: usize = self.values().map(Profile::heap_bytes).sum();
        table + keys + slots + heap
    }
}

impl std::ops::Index<&str> for Profiles {
    type Output = Profile;

    fn index(&self, key: &str) -> &Profile {
        self.get(key).expect("no profile for this key")
    }
}

impl<'a> IntoIterator for &'a Profiles {
    type Item = (&'a str, &'a Profile);
    type IntoIter = Box<dyn Iterator<Item = (&'a str, &'a Profile)> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

/// Two sets of profiles are equal when they hold the same profile under every key (slot order
/// and free slots do not matter).
impl PartialEq for Profiles {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(k, p)| other.get(k) == Some(p))
    }
}

/// Serialized as a map from key to profile (slots are an in-memory detail).
impl Serialize for Profiles {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Profiles {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Profiles;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of profiles")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Profiles, A::Error> {
                let mut profiles = Profiles::default();
                if let Some(n) = map.size_hint() {
                    profiles.index.reserve(n);
                    profiles.slots.reserve_exact(n);
                }
                while let Some((key, profile)) = map.next_entry::<Box<str>, Profile>()? {
                    *profiles.get_or_insert(&key) = profile;
                }
                Ok(profiles)
            }
        }
        d.deserialize_map(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> StateConfig {
        StateConfig {
            max_recent_items: 8,
            max_cart_items: 4,
            max_purchases: 4,
            max_affinities: 3,
            ..StateConfig::default()
        }
    }

    /// A profile built from a random sequence of interactions.
    fn arb_profile() -> impl Strategy<Value = Profile> {
        proptest::collection::vec((0u32..20, 0u8..4, 0i64..1_000_000, 0u32..6), 0..30).prop_map(
            |ops| {
                let cfg = cfg();
                let mut p = Profile::default();
                let mut ops = ops;
                ops.sort_by_key(|o| o.2);
                for (item, action, ts, cat) in ops {
                    let action = [Action::View, Action::Click, Action::Cart, Action::Purchase]
                        [action as usize];
                    if p.first_seen == 0 {
                        p.first_seen = ts.max(1);
                    }
                    p.last_seen = p.last_seen.max(ts);
                    p.counters.events += 1;
                    p.counters.product_views += 1;
                    p.remember(
                        Interaction {
                            item,
                            action,
                            session: p.session_no,
                            ts,
                        },
                        &cfg,
                    );
                    p.categories.add(
                        cat,
                        1.0,
                        ts,
                        cfg.affinity_half_life_ms(),
                        cfg.max_affinities,
                    );
                    match action {
                        Action::Cart => p.cart_add(item, 1.0, &cfg),
                        Action::Purchase => p.purchase(item, &cfg),
                        _ => {}
                    }
                }
                p
            },
        )
    }

    fn bounded(p: &Profile, cfg: &StateConfig) -> bool {
        p.recent.len() <= cfg.max_recent_items
            && p.cart.len() <= cfg.max_cart_items
            && p.purchased.len() <= cfg.max_purchases
            && p.categories.len() <= cfg.max_affinities
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn merge_adds_counters_and_keeps_bounds(a in arb_profile(), b in arb_profile()) {
            let cfg = cfg();
            let mut m = a.clone();
            m.merge_from(&b, &cfg);
            prop_assert!(bounded(&m, &cfg));
            prop_assert_eq!(m.counters.events, a.counters.events + b.counters.events);
            prop_assert_eq!(m.last_seen, a.last_seen.max(b.last_seen));
            // Recent items are the newest of both, in time order.
            prop_assert!(m.recent.iter().zip(m.recent.iter().skip(1)).all(|(x, y)| x.ts <= y.ts));
            let mut all: Vec<i64> = a.recent.iter().chain(b.recent.iter()).map(|i| i.ts).collect();
            all.sort();
            let newest: Vec<i64> = all[all.len().saturating_sub(cfg.max_recent_items)..].to_vec();
            let got: Vec<i64> = m.recent.iter().map(|i| i.ts).collect();
            prop_assert_eq!(got, newest);
            // Everything bought by either is remembered as bought (within the bound).
            for item in a.purchased.iter().chain(b.purchased.iter()) {
                prop_assert!(m.purchased.contains(item) || m.purchased.len() == cfg.max_purchases);
            }
        }

        #[test]
        fn merging_an_empty_profile_changes_nothing(a in arb_profile()) {
            let cfg = cfg();
            let mut m = a.clone();
            m.merge_from(&Profile::default(), &cfg);
            prop_assert_eq!(&m, &a);
        }

        #[test]
        fn merged_session_is_the_most_recent_one(a in arb_profile(), b in arb_profile()) {
            let cfg = cfg();
            let mut m = a.clone();
            m.merge_from(&b, &cfg);
            let winner = if b.last_seen > a.last_seen { &b } else { &a };
            if winner.counters.events > 0 {
                let got: Vec<u32> = m.session_items().map(|i| i.item).collect();
                let want: Vec<u32> = winner.session_items().map(|i| i.item).collect();
                // The winner's session items survive unless the bound cut older ones.
                prop_assert!(want.ends_with(&got) || got.len() == cfg.max_recent_items);
            }
        }
    }
}
