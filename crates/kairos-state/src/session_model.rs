//! Online session-based next-item model: a hybrid of recency-sampled, position-weighted
//! session k-nearest-neighbours (V-SKNN / STAN family) and distance-weighted sequential rules (SR).
//!
//! Everything is learned one event at a time ([`SessionModel::observe`]); there is no training
//! phase, and every structure is bounded by the [`SessionModelConfig`] limits.
//!
//! # Model
//!
//! Given the items of a query session `s = s_1 .. s_n` (oldest first, repeats allowed) the score of
//! a candidate item `x` is
//!
//! ```text
//! score(x) = knn(x) / max_y knn(y)  +  sr_weight * sr(x) / max_y sr(y)  +  reminder(x)
//! ```
//!
//! (`norm_sum = true` divides by the sums instead of the maxima.)
//!
//! **Session kNN** (Ludewig & Jannach 2018, V-SKNN; Garg et al. 2019, STAN):
//!
//! 1. *Position weighting of the query* — the last occurrence of item `i` at position `p_i` gets
//!    `w1(i) = exp(-(n - p_i) / pos_decay)` (`pos_decay` in steps): the most recent clicks carry
//!    the intent of the session. With `pos_linear = true` the V-SKNN linear form `p_i / n` is used.
//! 2. *Candidate sampling by recency* — the neighbour candidates are the retained sessions that
//!    share an item with the query (via the item → sessions inverted index, each list holding the
//!    `max_sessions_per_item` sessions that most recently touched the item); only the
//!    `sample_size` most recently active candidates are kept. Recent sessions reflect current
//!    assortment and trends and this caps the scoring cost.
//! 3. *Similarity* — `sim(s, m) = Σ_{i ∈ s ∩ m} w1(i) · (1 + idf_sim_weight · idf(i)) / |m|^len_norm`,
//!    with `idf(i) = ln(N / df(i))` over the retained sessions (rare shared items are stronger
//!    evidence), multiplied by the neighbour's *recency* `exp(-ln 2 · (now - t_m) / half_life)`
//!    (STAN's λ2). The `k` most similar neighbours are kept.
//! 4. *Item weighting inside a neighbour* — an item at position `j` of neighbour `m` whose most
//!    recent shared item is at position `j*` gets `exp(-|j - j*| / item_decay)` (STAN's λ3), times
//!    `before_match_weight` when `j < j*` (items after the match are what people went on to see),
//!    times `1 / step^match_step_exp` where `step` = 1 + how far back in the query the most recent
//!    item shared with `m` is (V-SKNN's `div` score weighting), times
//!    `(1 + idf_score_weight · idf(x))` (V-SKNN IDF weighting), times the event weight of that click
//!    when `use_event_weight` is on.
//!
//! **Reminders** (Latifi, Mauro & Jannach 2021 found session-aware reminders a strong addition to
//! kNN): every item of the query gets `repeat_weight · exp(-back / repeat_decay)` added, `back`
//! being the number of steps since its last occurrence, because people return to items they
//! viewed (about a fifth of DIGINETICA's next items are already in the prefix).
//!
//! **Sequential rules** (Ludewig & Jannach 2018, SR): every time item `b` follows item `a` in a
//! session at distance `d <= sr_steps`, the rule `a → b` gains `1 / d` (times the event weight of
//! `b`). At query time `sr(x) = Σ_{r < sr_history} sr_history_decay^r · rule(s_{n-r} → x)`. Rules
//! capture strong short-range sequential patterns that also work for items whose neighbourhood is
//! thin, and they sharpen the top of the list (MRR).
//!
//! Items of the query session are *not* filtered out (people return to items they viewed).
//!
//! # Self exclusion
//!
//! When the live server scores a session it has already observed, that session must not be its
//! own neighbour. [`SessionModel::score_session`] takes the session key and excludes it exactly;
//! [`SessionModel::score`] (no key) excludes a retained session whose stored item sequence is
//! identical to the tail of the query (which is what an observed query session looks like).
//!
//! # Memory bounds
//!
//! With `S = max_sessions`, `L = max_items_per_session`, `P = max_sessions_per_item`,
//! `R = max_rules_per_item` and `I` = number of distinct items seen (dense indices, bounded by the
//! caller's catalogue):
//!
//! * sessions: at most `S` retained (a FIFO ring by first-seen order; the oldest is evicted), each
//!   a 64-byte record holding up to 4 clicks (item + event weight, 8 bytes each); a longer
//!   session's clicks (`≤ L`) move to one allocation of 8 bytes per click,
//!   plus the key → session map (`≈ 17–34·S` bytes);
//! * per item: a posting list of `≤ P` session slots (4 bytes each, 32-byte header; a session
//!   leaves every list it is in when it is evicted), a document frequency and its logarithm
//!   (8 bytes) and `≤ 1.25·R` rules (8 bytes each, 24-byte header);
//! * total `≤ S·(98 + 8L) + I·(64 + 4P + 10R)` bytes. With the defaults (`P` = 100, `R` = 64) one
//!   item's share is at most ≈ 1.1 KiB, which keeps an item with its relations and catalogue entry
//!   inside the 4 KiB per item budget (`BENCHMARKS.md`); the larger bounds the model started with
//!   (1000 and 500) cost up to 17 KiB per popular item and changed HR@20 / MRR@20 on DIGINETICA by
//!   less than 0.001. [`SessionModel::heap_bytes`] reports the live figure.
//!
//! # Complexity
//!
//! * `observe`: `O(sr_steps · R)` rule updates + `O(1)` amortised index updates (`O(L)` when the
//!   item repeats in the session, `O(L·P)` worst case on eviction of a session).
//! * `score`: `O(n + Σ_{i ∈ s} P)` posting entries accumulated straight into per-session
//!   similarities (no session record is read for that), one record read per candidate for its
//!   recency, `O(C)` selection of the sample and of the `k` neighbours, `O(k · L)` item scores and
//!   `O(sr_history · R)` rules, on per-thread dense scratch arrays (no allocation, no hashing of
//!   items). With the defaults this is typically 10–60 µs.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

/// Item index: items are interned to dense u32 by the caller (first-seen order).
pub type ItemIdx = u32;

/// Every hyper-parameter of [`SessionModel`]. Defaults were chosen on a held-out validation split
/// of the DIGINETICA training sessions (never on its test prefixes) and favour robust,
/// literature-standard values over the last decimal (see `examples/session_eval.rs`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionModelConfig {
    /// Sessions retained (FIFO ring by first event; the oldest is evicted). Learning-time bound.
    pub max_sessions: usize,
    /// Items kept per retained session (the most recent ones). Learning-time bound; the query
    /// session is truncated to its last `max_items_per_session` items as well.
    pub max_items_per_session: usize,
    /// Length of each item's posting list (most recent sessions that touched the item).
    pub max_sessions_per_item: usize,
    /// Sequential rules kept per source item (weakest pruned when exceeded).
    pub max_rules_per_item: usize,
    /// Number of most recent candidate neighbour sessions considered.
    pub sample_size: usize,
    /// Number of nearest neighbours whose items are scored.
    pub k: usize,
    /// Query position weighting decay (in steps), `exp(-(n - p) / pos_decay)`.
    pub pos_decay: f32,
    /// Use V-SKNN linear position weights `p / n` instead of the exponential.
    pub pos_linear: bool,
    /// Exponent of the neighbour-length normalisation of the similarity (0.5 = cosine-like).
    pub len_norm: f32,
    /// Half-life (ms) of the neighbour recency decay; `0` disables it.
    pub recency_half_life_ms: f64,
    /// Decay (in steps) of a neighbour's items by distance from its most recent shared item.
    pub item_decay: f32,
    /// Extra factor for neighbour items clicked before the shared item.
    pub before_match_weight: f32,
    /// Exponent of V-SKNN's `1/step` weighting by how far back in the query the match is.
    pub match_step_exp: f32,
    /// IDF weight in the similarity: `w1 · (1 + idf_sim_weight · idf)`.
    pub idf_sim_weight: f32,
    /// IDF weight on scored items: `score · (1 + idf_score_weight · idf)`.
    pub idf_score_weight: f32,
    /// Maximum distance of sequential rules. Learning-time parameter.
    pub sr_steps: usize,
    /// Weight of the (max-normalised) sequential-rule score in the hybrid; `0` disables SR.
    pub sr_weight: f32,
    /// Number of the query's last items whose rules are used.
    pub sr_history: usize,
    /// Decay per step back for `sr_history`.
    pub sr_history_decay: f32,
    /// Use the `weight` passed to `observe` (event type weight); otherwise every event counts 1.
    pub use_event_weight: bool,
    /// Reminder component weight: items of the query get `repeat_weight · exp(-back / repeat_decay)`
    /// added (`back` = steps since their last occurrence); `0` disables it.
    pub repeat_weight: f32,
    /// Decay (in steps) of the reminder component.
    pub repeat_decay: f32,
    /// Normalise the kNN and SR components by their sums instead of their maxima.
    pub norm_sum: bool,
}

impl Default for SessionModelConfig {
    fn default() -> Self {
        Self {
            max_sessions: 1_000_000,
            max_items_per_session: 50,
            max_sessions_per_item: 100,
            max_rules_per_item: 64,
            sample_size: 1000,
            k: 200,
            pos_decay: 4.0,
            pos_linear: false,
            len_norm: 0.0,
            recency_half_life_ms: 30.0 * 86_400_000.0,
            item_decay: 3.0,
            before_match_weight: 1.0,
            match_step_exp: 1.0,
            idf_sim_weight: 0.3,
            idf_score_weight: 1.0,
            sr_steps: 10,
            sr_weight: 0.05,
            sr_history: 3,
            sr_history_decay: 0.5,
            use_event_weight: true,
            repeat_weight: 0.3,
            repeat_decay: 3.0,
            norm_sum: false,
        }
    }
}

impl SessionModelConfig {
    /// Sets one field from its textual value (`key=value` overrides on command lines / config).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        fn p<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, String> {
            v.trim()
                .parse::<T>()
                .map_err(|_| format!("invalid value {v:?} for {key}"))
        }
        match key {
            "max_sessions" => self.max_sessions = p(key, value)?,
            "max_items_per_session" => self.max_items_per_session = p(key, value)?,
            "max_sessions_per_item" => self.max_sessions_per_item = p(key, value)?,
            "max_rules_per_item" => self.max_rules_per_item = p(key, value)?,
            "sample_size" => self.sample_size = p(key, value)?,
            "k" => self.k = p(key, value)?,
            "pos_decay" => self.pos_decay = p(key, value)?,
            "pos_linear" => self.pos_linear = p(key, value)?,
            "len_norm" => self.len_norm = p(key, value)?,
            "recency_half_life_ms" => self.recency_half_life_ms = p(key, value)?,
            "item_decay" => self.item_decay = p(key, value)?,
            "before_match_weight" => self.before_match_weight = p(key, value)?,
            "match_step_exp" => self.match_step_exp = p(key, value)?,
            "idf_sim_weight" => self.idf_sim_weight = p(key, value)?,
            "idf_score_weight" => self.idf_score_weight = p(key, value)?,
            "sr_steps" => self.sr_steps = p(key, value)?,
            "sr_weight" => self.sr_weight = p(key, value)?,
            "sr_history" => self.sr_history = p(key, value)?,
            "sr_history_decay" => self.sr_history_decay = p(key, value)?,
            "use_event_weight" => self.use_event_weight = p(key, value)?,
            "repeat_weight" => self.repeat_weight = p(key, value)?,
            "repeat_decay" => self.repeat_decay = p(key, value)?,
            "norm_sum" => self.norm_sum = p(key, value)?,
            _ => return Err(format!("unknown SessionModelConfig field {key:?}")),
        }
        Ok(())
    }

    /// Whether `key` only affects scoring (can be changed on a learned model).
    pub fn is_score_time(key: &str) -> bool {
        !matches!(
            key,
            "max_sessions"
                | "max_items_per_session"
                | "max_sessions_per_item"
                | "max_rules_per_item"
                | "sr_steps"
                | "use_event_weight"
        )
    }
}

/// One click of a retained session: the item and its event weight.
type Click = (ItemIdx, f32);

/// Clicks a session record holds without an allocation. A quarter of shop sessions are a single
/// event and most are a few; four keeps the record at 64 bytes. Measured at a million users
/// (`HOT_PATHS_USERS=1000000 HOT_PATHS_ITEMS=100000 cargo bench -p kairos --bench hot_paths --
/// recommend/`): scoring 61 → 57 µs, with no more memory.
const INLINE_CLICKS: usize = 4;

/// One retained session. Its first [`INLINE_CLICKS`] clicks are inside the record, so reading a
/// short neighbour costs one memory access, not two.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct SessionRec {
    key: u64,
    /// Global sequence number (unique, increasing with first event); `u64::MAX` = empty slot.
    seq: u64,
    last_ts: i64,
    /// Items with their event weights, oldest first: the first [`INLINE_CLICKS`] inside the
    /// record, so that most sessions are read in one place; longer sessions in one allocation.
    clicks: SmallVec<[Click; INLINE_CLICKS]>,
}

impl SessionRec {
    fn contains(&self, item: ItemIdx) -> bool {
        self.clicks.iter().any(|c| c.0 == item)
    }
}

/// The online session model (see the module documentation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionModel {
    config: SessionModelConfig,
    /// Ring of retained sessions; slot = `seq % max_sessions`.
    sessions: Vec<SessionRec>,
    next_seq: u64,
    /// Live session key → seq (only for retained sessions).
    live: FxHashMap<u64, u64>,
    /// Item → slots of the retained sessions that most recently touched it (oldest first).
    /// Exact: a session leaves every list it is in when it is evicted or its item drops out.
    postings: Vec<VecDeque<u32>>,
    /// Item → number of retained sessions containing it.
    df: Vec<u32>,
    /// Item → `ln(df)` (0 for df ≤ 1), kept with `df` so scoring needs no logarithm per item.
    ln_df: Vec<f32>,
    /// Item → (next item, rule weight), unordered, at most `1.25 · max_rules_per_item` long.
    rules: Vec<Vec<(ItemIdx, f32)>>,
    /// Number of retained sessions.
    retained: usize,
}

/// Per-thread scratch space of [`SessionModel::score_session`]: dense per-item accumulators
/// (reset through the touched list, never cleared whole) and reusable buffers, so scoring
/// allocates nothing and hashes only session slots.
#[derive(Default)]
struct Scratch {
    items: Vec<ItemScratch>,
    touched: Vec<ItemIdx>,
    /// Distinct query items, by last position.
    query: Vec<ItemIdx>,
    candidates: FxHashMap<u32, (f32, u32)>,
    ranked: Vec<Candidate>,
    item_decay: Vec<f32>,
}

#[derive(Clone, Copy, Default)]
struct ItemScratch {
    /// Query position + 1 of the item's last occurrence (0: not in the query).
    query_pos: u32,
    query_weight: f32,
    /// Whether the item is in `touched` (then `knn` and `sr` are live).
    touched: bool,
    knn: f32,
    sr: f32,
}

/// A neighbour candidate: similarity, tie-breaking seq, ring slot, query step.
#[derive(Clone, Copy)]
struct Candidate {
    last_ts: i64,
    seq: u64,
    slot: u32,
    sim: f32,
    /// Highest query position of a shared item.
    best_pos: u32,
}

impl Scratch {
    fn prepare(&mut self, items: usize) {
        if self.items.len() < items {
            self.items.resize(items, ItemScratch::default());
        }
    }

    fn touch(&mut self, item: ItemIdx) -> &mut ItemScratch {
        let s = &mut self.items[item as usize];
        if !s.touched {
            s.touched = true;
            s.knn = 0.0;
            s.sr = 0.0;
            self.touched.push(item);
        }
        &mut self.items[item as usize]
    }

    /// Resets everything the last call left behind.
    fn reset(&mut self) {
        for &it in &self.touched {
            self.items[it as usize].touched = false;
        }
        for &it in &self.query {
            self.items[it as usize].query_pos = 0;
        }
        self.touched.clear();
        self.query.clear();
        self.candidates.clear();
        self.ranked.clear();
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Starts loading the cache line at `p` without waiting for it; nothing on targets without a
/// prefetch instruction here.
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint: it never faults and changes nothing observable,
    // whatever address it is given.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Pushes onto `list`, growing its capacity by doubling but never past `cap`, so bounded lists
/// never carry the slack of a power-of-two growth step beyond their bound.
fn push_bounded<T>(list: &mut Vec<T>, value: T, cap: usize) {
    if list.len() == list.capacity() && list.len() < cap {
        let grow = (list.len().max(2) * 2).min(cap) - list.len();
        list.reserve_exact(grow.max(1));
    }
    list.push(value);
}

impl SessionModel {
    /// Creates an empty model.
    pub fn new(config: SessionModelConfig) -> Self {
        let mut config = config;
        config.max_sessions = config.max_sessions.clamp(1, u32::MAX as usize);
        config.max_items_per_session = config.max_items_per_session.max(1);
        config.max_sessions_per_item = config.max_sessions_per_item.max(1);
        config.max_rules_per_item = config.max_rules_per_item.max(1);
        Self {
            config,
            sessions: Vec::new(),
            next_seq: 0,
            live: FxHashMap::default(),
            postings: Vec::new(),
            df: Vec::new(),
            ln_df: Vec::new(),
            rules: Vec::new(),
            retained: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SessionModelConfig {
        &self.config
    }

    /// Mutable configuration. Only fields for which [`SessionModelConfig::is_score_time`] is true
    /// may be changed on a model that has already learned (the bounds are learning-time).
    pub fn config_mut(&mut self) -> &mut SessionModelConfig {
        &mut self.config
    }

    /// Number of retained sessions.
    pub fn num_sessions(&self) -> usize {
        self.retained
    }

    fn slot(&self, seq: u64) -> usize {
        (seq % self.config.max_sessions as u64) as usize
    }

    fn ensure_item(&mut self, item: ItemIdx) {
        let n = item as usize + 1;
        if self.postings.len() < n {
            self.postings.resize_with(n, VecDeque::new);
            self.df.resize(n, 0);
            self.ln_df.resize(n, 0.0);
            self.rules.resize_with(n, Vec::new);
        }
    }

    fn set_df(&mut self, item: ItemIdx, df: u32) {
        self.df[item as usize] = df;
        self.ln_df[item as usize] = (df.max(1) as f32).ln();
    }

    /// Removes `slot` from the posting list of `item` (searching from the back).
    fn unpost(&mut self, item: ItemIdx, slot: u32) {
        let list = &mut self.postings[item as usize];
        if let Some(pos) = list.iter().rposition(|&s| s == slot) {
            list.remove(pos);
        }
    }

    /// Evicts the session in `slot` (if any).
    fn evict(&mut self, slot: usize) {
        let rec = std::mem::take(&mut self.sessions[slot]);
        self.sessions[slot].seq = u64::MAX;
        if rec.seq == u64::MAX {
            return;
        }
        if self.live.get(&rec.key) == Some(&rec.seq) {
            self.live.remove(&rec.key);
        }
        self.retained = self.retained.saturating_sub(1);
        for (j, &(it, _)) in rec.clicks.iter().enumerate() {
            if rec.clicks[..j].iter().all(|c| c.0 != it) {
                self.set_df(it, self.df[it as usize].saturating_sub(1));
                self.unpost(it, slot as u32);
            }
        }
    }

    /// Learns one event: `item` was interacted with in `session` at `ts_ms`.
    ///
    /// `weight` (event-type weight, e.g. 1 for a view, more for cart/purchase) scales the rule
    /// increments towards `item` and this click's contribution when the session is used as a
    /// neighbour, if `use_event_weight` is on; non-finite or non-positive weights count as 1.
    pub fn observe(&mut self, session: u64, item: ItemIdx, ts_ms: i64, weight: f32) {
        let weight = if self.config.use_event_weight && weight.is_finite() && weight > 0.0 {
            weight
        } else {
            1.0
        };
        self.ensure_item(item);
        let seq = match self.live.get(&session) {
            Some(&seq) => seq,
            None => {
                let seq = self.next_seq;
                self.next_seq += 1;
                let slot = self.slot(seq);
                if slot < self.sessions.len() {
                    self.evict(slot);
                } else {
                    self.sessions.push(SessionRec {
                        seq: u64::MAX,
                        ..Default::default()
                    });
                }
                let rec = &mut self.sessions[slot];
                rec.key = session;
                rec.seq = seq;
                rec.last_ts = 0;
                rec.clicks.clear();
                self.live.insert(session, seq);
                self.retained += 1;
                seq
            }
        };
        let slot = self.slot(seq);

        // Sequential rules from the previous items of the session.
        {
            let rec = &self.sessions[slot];
            let n = rec.clicks.len();
            let steps = self.config.sr_steps.min(n);
            let max_rules = self.config.max_rules_per_item;
            let limit = max_rules + max_rules / 4;
            for d in 1..=steps {
                let a = rec.clicks[n - d].0;
                if a == item {
                    continue;
                }
                let rules = &mut self.rules[a as usize];
                let add = weight / d as f32;
                match rules.iter_mut().find(|r| r.0 == item) {
                    Some(r) => r.1 += add,
                    None => {
                        if rules.len() >= limit {
                            prune_rules(rules, max_rules);
                        }
                        push_bounded(rules, (item, add), limit);
                    }
                }
            }
        }

        // Session record, document frequency and posting list.
        let max_items = self.config.max_items_per_session;
        let rec = &mut self.sessions[slot];
        rec.last_ts = rec.last_ts.max(ts_ms);
        let already = rec.contains(item);
        rec.clicks.push((item, weight));
        let mut dropped = None;
        if rec.clicks.len() > max_items {
            let old = rec.clicks.remove(0).0;
            if !rec.contains(old) {
                dropped = Some(old);
            }
        }
        let slot = slot as u32;
        if let Some(old) = dropped {
            self.set_df(old, self.df[old as usize].saturating_sub(1));
            self.unpost(old, slot);
        }
        let cap = self.config.max_sessions_per_item;
        let list = &mut self.postings[item as usize];
        if list.back() != Some(&slot) {
            // Move the session to the most recent end of the item's posting list. It may be
            // missing from the list although it holds the item: a full list drops its oldest
            // sessions, which keep their clicks. Then it comes back as a newcomer, within the cap.
            let listed = already
                && list
                    .iter()
                    .rposition(|&s| s == slot)
                    .map(|pos| list.remove(pos))
                    .is_some();
            if !listed {
                while list.len() >= cap {
                    list.pop_front();
                }
                if list.len() == list.capacity() {
                    let grow = (list.len().max(2) * 2).min(cap) - list.len();
                    list.reserve_exact(grow.max(1));
                }
            }
            list.push_back(slot);
        }
        if !already {
            self.set_df(item, self.df[item as usize] + 1);
        }
    }

    /// Scores candidate next items for a query session (see the module documentation). A
    /// retained session whose stored items equal the tail of `session_items` is treated as the
    /// query session itself and excluded from the neighbours.
    pub fn score(&self, session_items: &[ItemIdx], now_ms: i64, out: &mut Vec<(ItemIdx, f32)>) {
        self.score_inner(None, true, session_items, now_ms, out);
    }

    /// Like [`score`](Self::score) but excludes exactly the retained session with key `session`
    /// (if any) instead of matching by content; `None` excludes nothing.
    pub fn score_session(
        &self,
        session: Option<u64>,
        session_items: &[ItemIdx],
        now_ms: i64,
        out: &mut Vec<(ItemIdx, f32)>,
    ) {
        self.score_inner(session, false, session_items, now_ms, out);
    }

    fn score_inner(
        &self,
        exclude_key: Option<u64>,
        exclude_identical: bool,
        session_items: &[ItemIdx],
        now_ms: i64,
        out: &mut Vec<(ItemIdx, f32)>,
    ) {
        let cfg = &self.config;
        let q = if session_items.len() > cfg.max_items_per_session {
            &session_items[session_items.len() - cfg.max_items_per_session..]
        } else {
            session_items
        };
        if q.is_empty() {
            return;
        }
        let items = q
            .iter()
            .map(|&i| i as usize + 1)
            .max()
            .unwrap_or(0)
            .max(self.postings.len());
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.prepare(items);
            self.score_with(&mut scratch, exclude_key, exclude_identical, q, now_ms, out);
            scratch.reset();
        });
    }

    fn idf(&self, ln_sessions: f32, item: ItemIdx) -> f32 {
        let ln_df = self.ln_df.get(item as usize).copied().unwrap_or(0.0);
        (ln_sessions - ln_df).max(0.0)
    }

    fn score_with(
        &self,
        s: &mut Scratch,
        exclude_key: Option<u64>,
        exclude_identical: bool,
        q: &[ItemIdx],
        now_ms: i64,
        out: &mut Vec<(ItemIdx, f32)>,
    ) {
        let cfg = &self.config;
        let n = q.len();
        let exclude_slot = exclude_key
            .and_then(|k| self.live.get(&k))
            .map(|&seq| self.slot(seq) as u32);
        let ln_sessions = (self.retained.max(1) as f32).ln();

        // Query items: position weight (with IDF) of each item's last occurrence.
        for (p, &it) in q.iter().enumerate() {
            let w = if cfg.pos_linear {
                (p + 1) as f32 / n as f32
            } else {
                (-((n - 1 - p) as f32) / cfg.pos_decay.max(1e-6)).exp()
            };
            let w = if cfg.idf_sim_weight != 0.0 {
                w * (1.0 + cfg.idf_sim_weight * self.idf(ln_sessions, it))
            } else {
                w
            };
            let e = &mut s.items[it as usize];
            if e.query_pos == 0 {
                s.query.push(it);
            }
            e.query_pos = p as u32 + 1;
            e.query_weight = w;
        }
        s.query
            .sort_unstable_by_key(|&it| s.items[it as usize].query_pos);

        // 1. Candidates: every retained session sharing an item with the query, with its
        //    similarity accumulated straight from the posting lists (no session is read).
        for &it in &s.query {
            let Some(list) = self.postings.get(it as usize) else {
                continue;
            };
            let e = s.items[it as usize];
            let (w, pos) = (e.query_weight, e.query_pos - 1);
            for &slot in list {
                if Some(slot) == exclude_slot {
                    continue;
                }
                let c = s.candidates.entry(slot).or_insert((0.0, 0));
                c.0 += w;
                c.1 = c.1.max(pos);
            }
        }
        for (&slot, &(sim, best_pos)) in &s.candidates {
            let rec = &self.sessions[slot as usize];
            s.ranked.push(Candidate {
                last_ts: rec.last_ts,
                seq: rec.seq,
                slot,
                sim,
                best_pos,
            });
        }
        // 2. Keep the most recent `sample_size`.
        let by_recency = |a: &Candidate, b: &Candidate| (b.last_ts, b.seq).cmp(&(a.last_ts, a.seq));
        if s.ranked.len() > cfg.sample_size && cfg.sample_size > 0 {
            s.ranked
                .select_nth_unstable_by(cfg.sample_size - 1, by_recency);
            s.ranked.truncate(cfg.sample_size);
        }

        // 3. Similarities: length normalisation and neighbour recency.
        let half_life = cfg.recency_half_life_ms;
        s.ranked.retain_mut(|c| {
            if exclude_identical || cfg.len_norm != 0.0 {
                let rec = &self.sessions[c.slot as usize];
                let len = rec.clicks.len();
                if exclude_identical
                    && len <= n
                    && rec
                        .clicks
                        .iter()
                        .map(|c| c.0)
                        .eq(q[n - len..].iter().copied())
                {
                    return false;
                }
                if c.sim > 0.0 && cfg.len_norm != 0.0 {
                    c.sim /= (len as f32).powf(cfg.len_norm);
                }
            }
            if c.sim <= 0.0 {
                return false;
            }
            if half_life > 0.0 {
                let age = (now_ms.saturating_sub(c.last_ts)).max(0) as f64;
                c.sim *= (-(std::f64::consts::LN_2) * age / half_life).exp() as f32;
            }
            true
        });
        // 4. Top-k neighbours (ties by seq, most recent first, for determinism).
        let by_sim = |a: &Candidate, b: &Candidate| b.sim.total_cmp(&a.sim).then(b.seq.cmp(&a.seq));
        if s.ranked.len() > cfg.k && cfg.k > 0 {
            s.ranked.select_nth_unstable_by(cfg.k - 1, by_sim);
            s.ranked.truncate(cfg.k);
        }
        // Deterministic accumulation order.
        s.ranked.sort_unstable_by(by_sim);

        // 5. Items of the neighbours, weighted by their distance from the last shared item.
        //    The neighbours are anywhere in a ring of up to a million sessions, and a long
        //    session's clicks behind a pointer: reading them one after the other waited on memory
        //    for each in turn (40% of this function at a million users). Announcing them all
        //    first lets the loads overlap (scoring 84 → 61 µs at a million users).
        let inv_item_decay = 1.0 / cfg.item_decay.max(1e-6);
        let mut ranked = std::mem::take(&mut s.ranked);
        for c in &ranked {
            prefetch(self.sessions[c.slot as usize].clicks.as_ptr());
        }
        for c in &ranked {
            let rec = &self.sessions[c.slot as usize];
            while s.item_decay.len() < rec.clicks.len() {
                let d = s.item_decay.len();
                s.item_decay.push((-(d as f32) * inv_item_decay).exp());
            }
            let last_match = rec
                .clicks
                .iter()
                .rposition(|cl| s.items[cl.0 as usize].query_pos != 0)
                .unwrap_or(0);
            let step = (n - c.best_pos as usize) as u32;
            let base = if cfg.match_step_exp != 0.0 {
                c.sim / (step as f32).powf(cfg.match_step_exp)
            } else {
                c.sim
            };
            for (j, &(it, w)) in rec.clicks.iter().enumerate() {
                let d = j as i64 - last_match as i64;
                let mut score = base * s.item_decay[d.unsigned_abs() as usize] * w;
                if d < 0 {
                    score *= cfg.before_match_weight;
                }
                s.touch(it).knn += score;
            }
        }
        ranked.clear();
        s.ranked = ranked;
        s.item_decay.clear();
        if cfg.idf_score_weight != 0.0 {
            for &it in &s.touched {
                let idf = self.idf(ln_sessions, it);
                s.items[it as usize].knn *= 1.0 + cfg.idf_score_weight * idf;
            }
        }

        // Sequential rules.
        if cfg.sr_weight > 0.0 {
            let mut f = 1.0f32;
            for &a in q.iter().rev().take(cfg.sr_history.max(1)) {
                if let Some(rules) = self.rules.get(a as usize) {
                    for &(b, w) in rules {
                        s.touch(b).sr += f * w;
                    }
                }
                f *= cfg.sr_history_decay;
            }
        }

        let (mut max_knn, mut max_sr) = (0.0f32, 0.0f32);
        for &it in &s.touched {
            let e = &s.items[it as usize];
            if cfg.norm_sum {
                max_knn += e.knn;
                max_sr += e.sr;
            } else {
                max_knn = max_knn.max(e.knn);
                max_sr = max_sr.max(e.sr);
            }
        }
        let inv_knn = if max_knn > 0.0 { 1.0 / max_knn } else { 0.0 };
        let f_sr = if max_sr > 0.0 {
            cfg.sr_weight / max_sr
        } else {
            0.0
        };
        // Reminders: every query item, by the steps since its last occurrence.
        let remind = cfg.repeat_weight > 0.0;
        if remind {
            for i in 0..s.query.len() {
                let it = s.query[i];
                s.touch(it);
            }
        }
        let inv_repeat_decay = 1.0 / cfg.repeat_decay.max(1e-6);
        out.reserve(s.touched.len());
        for &it in &s.touched {
            let e = &s.items[it as usize];
            let mut score = e.knn * inv_knn + e.sr * f_sr;
            if remind && e.query_pos != 0 {
                let back = (n - e.query_pos as usize) as f32;
                score += cfg.repeat_weight * (-back * inv_repeat_decay).exp();
            }
            if score > 0.0 && score.is_finite() {
                out.push((it, score));
            }
        }
    }

    /// Approximate heap bytes used.
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        let mut b = self.sessions.capacity() * size_of::<SessionRec>();
        for s in &self.sessions {
            if s.clicks.spilled() {
                b += s.clicks.capacity() * size_of::<Click>();
            }
        }
        // hashbrown: (K,V) + 1 control byte per bucket.
        b += self.live.capacity() * (size_of::<(u64, u64)>() + 1);
        b += self.postings.capacity() * size_of::<VecDeque<u32>>();
        b += self
            .postings
            .iter()
            .map(|p| p.capacity() * size_of::<u32>())
            .sum::<usize>();
        b += self.df.capacity() * 4 + self.ln_df.capacity() * 4;
        b += self.rules.capacity() * size_of::<Vec<(ItemIdx, f32)>>();
        b += self
            .rules
            .iter()
            .map(|r| r.capacity() * size_of::<(ItemIdx, f32)>())
            .sum::<usize>();
        b
    }
}

/// Keeps the `keep` strongest rules (ties broken by item index for determinism).
fn prune_rules(rules: &mut Vec<(ItemIdx, f32)>, keep: usize) {
    rules.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    rules.truncate(keep);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rustc_hash::FxHashSet;

    fn rule(m: &SessionModel, a: ItemIdx, b: ItemIdx) -> Option<f32> {
        m.rules[a as usize].iter().find(|r| r.0 == b).map(|r| r.1)
    }

    /// A configuration with only the kNN core switched on (no SR, reminder, IDF or recency).
    fn knn_only() -> SessionModelConfig {
        SessionModelConfig {
            sr_weight: 0.0,
            repeat_weight: 0.0,
            idf_sim_weight: 0.0,
            idf_score_weight: 0.0,
            recency_half_life_ms: 0.0,
            ..Default::default()
        }
    }

    fn learn(m: &mut SessionModel, sessions: &[(u64, &[ItemIdx])]) {
        for (s, items) in sessions {
            for (j, &it) in items.iter().enumerate() {
                m.observe(*s, it, (*s as i64) * 1000 + j as i64, 1.0);
            }
        }
    }

    fn scores(m: &SessionModel, q: &[ItemIdx]) -> FxHashMap<ItemIdx, f32> {
        let mut out = Vec::new();
        m.score(q, 1_000_000, &mut out);
        out.into_iter().collect()
    }

    fn get(s: &FxHashMap<ItemIdx, f32>, it: ItemIdx) -> f32 {
        s.get(&it).copied().unwrap_or(0.0)
    }

    #[test]
    fn neighbour_sharing_more_items_scores_higher() {
        let mut m = SessionModel::new(knn_only());
        learn(&mut m, &[(1, &[1, 2, 10]), (2, &[1, 11])]);
        let s = scores(&m, &[1, 2]);
        assert!(get(&s, 10) > get(&s, 11), "{s:?}");
        assert!(get(&s, 11) > 0.0);
    }

    #[test]
    fn position_weighting_favours_last_item() {
        let cfg = SessionModelConfig {
            match_step_exp: 0.0,
            ..knn_only()
        };
        let mut m = SessionModel::new(cfg.clone());
        learn(&mut m, &[(1, &[1, 10]), (2, &[2, 11])]);
        let s = scores(&m, &[1, 2]);
        // sim(B) = w1(2) = 1, sim(A) = w1(1) = exp(-1/4).
        let ratio = get(&s, 10) / get(&s, 11);
        assert!((ratio - (-0.25f32).exp()).abs() < 1e-5, "{s:?}");
        // Linear V-SKNN weights: 1/2 vs 2/2.
        let mut m = SessionModel::new(SessionModelConfig {
            pos_linear: true,
            ..cfg
        });
        learn(&mut m, &[(1, &[1, 10]), (2, &[2, 11])]);
        let s = scores(&m, &[1, 2]);
        assert!((get(&s, 10) / get(&s, 11) - 0.5).abs() < 1e-5, "{s:?}");
    }

    #[test]
    fn match_step_weighting_favours_recent_match() {
        let cfg = SessionModelConfig {
            pos_linear: true,
            pos_decay: 1e9,
            ..knn_only()
        };
        let mut m = SessionModel::new(cfg);
        learn(&mut m, &[(1, &[1, 10]), (2, &[2, 11])]);
        let s = scores(&m, &[1, 2]);
        // sims 1/2 and 1; steps 2 and 1 → 1/4 vs 1.
        assert!((get(&s, 10) / get(&s, 11) - 0.25).abs() < 1e-5, "{s:?}");
    }

    #[test]
    fn neighbour_recency_decay() {
        let mut m = SessionModel::new(knn_only());
        m.observe(1, 1, 0, 1.0);
        m.observe(1, 10, 0, 1.0);
        m.observe(2, 1, 86_400_000, 1.0);
        m.observe(2, 11, 86_400_000, 1.0);
        let mut out = Vec::new();
        m.score(&[1], 86_400_000, &mut out);
        let s: FxHashMap<_, _> = out.drain(..).collect();
        assert_eq!(get(&s, 10), get(&s, 11));
        m.config_mut().recency_half_life_ms = 86_400_000.0;
        m.score(&[1], 86_400_000, &mut out);
        let s: FxHashMap<_, _> = out.drain(..).collect();
        // One half-life older → half the weight.
        assert!((get(&s, 10) / get(&s, 11) - 0.5).abs() < 1e-5, "{s:?}");
    }

    #[test]
    fn neighbour_items_decay_with_distance_from_match() {
        let cfg = SessionModelConfig {
            before_match_weight: 0.5,
            ..knn_only()
        };
        let mut m = SessionModel::new(cfg);
        learn(&mut m, &[(1, &[9, 1, 10, 11, 12])]);
        let s = scores(&m, &[1]);
        assert!(get(&s, 1) > get(&s, 10));
        assert!(get(&s, 10) > get(&s, 11));
        assert!(get(&s, 11) > get(&s, 12));
        let r = get(&s, 11) / get(&s, 10);
        assert!((r - (-1.0f32 / 3.0).exp()).abs() < 1e-5);
        // Item before the match: same distance as 10 but halved.
        assert!((get(&s, 9) / get(&s, 10) - 0.5).abs() < 1e-5);
    }

    #[test]
    fn idf_weighting_favours_rare_items() {
        let cfg = SessionModelConfig {
            idf_score_weight: 1.0,
            ..knn_only()
        };
        let mut m = SessionModel::new(cfg);
        // 10 is everywhere, 11 is rare; both co-occur with 1 once.
        learn(
            &mut m,
            &[(1, &[1, 10]), (2, &[1, 11]), (3, &[10, 5]), (4, &[10, 6])],
        );
        let s = scores(&m, &[1]);
        assert!(get(&s, 11) > get(&s, 10), "{s:?}");
    }

    #[test]
    fn sequential_rules_weighted_by_distance() {
        let cfg = SessionModelConfig {
            sr_steps: 2,
            ..Default::default()
        };
        let mut m = SessionModel::new(cfg);
        learn(&mut m, &[(1, &[1, 2, 3, 4])]);
        assert_eq!(rule(&m, 1, 2), Some(1.0));
        assert_eq!(rule(&m, 1, 3), Some(0.5));
        assert_eq!(rule(&m, 1, 4), None); // beyond sr_steps
        assert_eq!(rule(&m, 2, 1), None); // rules are directed
                                          // Event weights scale the rule towards the weighted item.
        m.observe(2, 7, 0, 1.0);
        m.observe(2, 8, 1, 3.0);
        assert_eq!(rule(&m, 7, 8), Some(3.0));
        // In the hybrid, SR adds to what follows the last item: 2 and 4 are symmetric around 3
        // for the kNN part, the rule 3 → 4 breaks the tie.
        let mut cfg = knn_only();
        cfg.sr_history = 1;
        let mut m = SessionModel::new(cfg);
        learn(&mut m, &[(1, &[1, 2, 3, 4])]);
        let s = scores(&m, &[3]);
        assert_eq!(get(&s, 4), get(&s, 2), "{s:?}");
        m.config_mut().sr_weight = 0.5;
        let s = scores(&m, &[3]);
        assert!((get(&s, 4) - get(&s, 2) - 0.5).abs() < 1e-5, "{s:?}");
    }

    #[test]
    fn reminder_component_scores_query_items() {
        let cfg = SessionModelConfig {
            repeat_weight: 0.3,
            ..knn_only()
        };
        let m = SessionModel::new(cfg);
        let mut out = Vec::new();
        m.score(&[5, 6], 0, &mut out);
        out.sort_by_key(|x| x.0);
        assert_eq!(out.len(), 2);
        assert!(out[1].1 > out[0].1); // the most recent item is the strongest reminder
    }

    #[test]
    fn query_session_excludes_itself() {
        let mut m = SessionModel::new(knn_only());
        learn(&mut m, &[(7, &[1, 2])]);
        let mut out = Vec::new();
        m.score(&[1, 2], 0, &mut out);
        assert!(out.is_empty(), "{out:?}");
        m.score_session(Some(7), &[1, 2], 0, &mut out);
        assert!(out.is_empty(), "{out:?}");
        m.score_session(None, &[1, 2], 0, &mut out);
        assert!(!out.is_empty());
        learn(&mut m, &[(8, &[1, 3])]);
        let s = scores(&m, &[1, 2]);
        assert!(get(&s, 3) > 0.0);
        assert_eq!(get(&s, 2), 0.0, "{s:?}");
        // A different query with the same prefix still sees session 7.
        let s = scores(&m, &[1, 2, 4]);
        assert!(get(&s, 2) > 0.0);
    }

    #[test]
    fn sessions_are_bounded_and_oldest_evicted() {
        let cfg = SessionModelConfig {
            max_sessions: 3,
            ..knn_only()
        };
        let mut m = SessionModel::new(cfg);
        learn(&mut m, &[(0, &[100, 101])]);
        assert!(get(&scores(&m, &[100]), 101) > 0.0);
        for s in 1..10u64 {
            learn(&mut m, &[(s, &[1, 2, 3])]);
        }
        assert_eq!(m.num_sessions(), 3);
        assert_eq!(m.sessions.len(), 3);
        assert_eq!(m.live.len(), 3);
        assert!(m.postings[100].is_empty());
        assert_eq!(m.df[100], 0);
        assert_eq!(m.df[1], 3);
        assert!(m.postings[1].len() <= 3);
        assert!(scores(&m, &[100]).is_empty());
        // Memory does not grow with the number of sessions observed.
        let h1 = m.heap_bytes();
        for s in 10..1000u64 {
            learn(&mut m, &[(s, &[1, 2, 3])]);
        }
        assert!(m.heap_bytes() <= h1 + 64, "{} > {h1}", m.heap_bytes());
    }

    #[test]
    fn per_item_per_session_and_rule_bounds() {
        let cfg = SessionModelConfig {
            max_sessions_per_item: 4,
            max_items_per_session: 3,
            max_rules_per_item: 8,
            ..Default::default()
        };
        let mut m = SessionModel::new(cfg);
        for s in 0..20u64 {
            learn(&mut m, &[(s, &[1, 2])]);
        }
        assert_eq!(m.postings[1].len(), 4);
        learn(&mut m, &[(100, &[5, 6, 7, 8, 9])]);
        let rec = &m.sessions[m.slot(m.live[&100])];
        let items: Vec<ItemIdx> = rec.clicks.iter().map(|c| c.0).collect();
        assert_eq!(items, vec![7, 8, 9]);
        assert_eq!(m.df[5], 0);
        assert!(m.postings[5].is_empty());
        for b in 0..100u32 {
            learn(&mut m, &[(1000 + b as u64, &[50, 200 + b])]);
        }
        assert!(m.rules[50].len() <= 8 + 8 / 4);
    }

    #[test]
    fn repeated_item_moves_session_to_most_recent() {
        let mut m = SessionModel::new(knn_only());
        m.observe(1, 5, 0, 1.0);
        m.observe(2, 5, 1, 1.0);
        m.observe(1, 5, 2, 1.0);
        assert_eq!(
            m.postings[5].iter().copied().collect::<Vec<_>>(),
            vec![1, 0]
        );
        assert_eq!(m.df[5], 2);
    }

    #[test]
    fn deterministic_and_serde_round_trip() {
        let sessions: Vec<(u64, Vec<ItemIdx>)> = (0..200u64)
            .map(|s| {
                (
                    s,
                    (0..5).map(|j| ((s * 7 + j * 13) % 37) as ItemIdx).collect(),
                )
            })
            .collect();
        let build = || {
            let mut m = SessionModel::new(SessionModelConfig::default());
            for (s, items) in &sessions {
                learn(&mut m, &[(*s, items)]);
            }
            m
        };
        let (a, b) = (build(), build());
        let q = [3, 17, 3, 22];
        let (mut oa, mut ob) = (Vec::new(), Vec::new());
        a.score(&q, 10_000_000, &mut oa);
        b.score(&q, 10_000_000, &mut ob);
        assert!(!oa.is_empty());
        assert_eq!(oa, ob);
        ob.clear();
        a.score(&q, 10_000_000, &mut ob);
        assert_eq!(oa, ob);
        let bytes = postcard::to_stdvec(&a).unwrap();
        let c: SessionModel = postcard::from_bytes(&bytes).unwrap();
        ob.clear();
        c.score(&q, 10_000_000, &mut ob);
        assert_eq!(oa, ob);
    }

    #[test]
    fn a_session_record_with_its_first_clicks_is_64_bytes() {
        assert_eq!(std::mem::size_of::<SessionRec>(), 64);
        let mut m = SessionModel::new(knn_only());
        m.observe(1, 7, 1_000, 1.0);
        m.observe(1, 8, 2_000, 1.0);
        assert!(!m.sessions[m.slot(m.live[&1])].clicks.spilled());
    }

    #[test]
    fn config_set_parses_and_rejects() {
        let mut c = SessionModelConfig::default();
        c.set("k", "7").unwrap();
        c.set("pos_linear", "true").unwrap();
        c.set("sr_weight", "0.25").unwrap();
        assert_eq!((c.k, c.pos_linear, c.sr_weight), (7, true, 0.25));
        assert!(c.set("nope", "1").is_err());
        assert!(c.set("k", "x").is_err());
        assert!(SessionModelConfig::is_score_time("k"));
        assert!(!SessionModelConfig::is_score_time("max_sessions"));
    }

    #[test]
    fn empty_and_unknown_queries() {
        let mut m = SessionModel::new(SessionModelConfig::default());
        let mut out = Vec::new();
        m.score(&[], 0, &mut out);
        assert!(out.is_empty());
        learn(&mut m, &[(1, &[1, 2])]);
        m.score(&[], 0, &mut out);
        assert!(out.is_empty());
        m.score(&[12345], 0, &mut out); // never observed: only the reminder
        assert!(out.iter().all(|x| x.0 == 12345));
    }

    proptest! {
        #[test]
        fn invariants_hold_on_random_streams(
            events in proptest::collection::vec((0u64..30, 0u32..40, 0f32..4.0), 0..400),
            q in proptest::collection::vec(0u32..45, 0..8),
        ) {
            let cfg = SessionModelConfig {
                max_sessions: 8,
                max_items_per_session: 4,
                max_sessions_per_item: 3,
                max_rules_per_item: 4,
                ..Default::default()
            };
            let mut m = SessionModel::new(cfg);
            for (t, &(s, it, w)) in events.iter().enumerate() {
                m.observe(s, it, t as i64, w);
                prop_assert!(m.num_sessions() <= 8);
            }
            prop_assert_eq!(m.live.len(), m.num_sessions());
            for (it, p) in m.postings.iter().enumerate() {
                prop_assert!(p.len() <= 3);
                let live = p.iter().filter(|&&s| m.sessions[s as usize].seq != u64::MAX).count();
                prop_assert_eq!(live, p.len());
                let contains = m.sessions.iter()
                    .filter(|r| r.seq != u64::MAX && r.contains(it as ItemIdx))
                    .count();
                prop_assert_eq!(m.df[it] as usize, contains);
            }
            for r in &m.rules {
                prop_assert!(r.len() <= 5);
            }
            let mut out = Vec::new();
            m.score(&q, events.len() as i64, &mut out);
            let mut seen = FxHashSet::default();
            for &(it, s) in &out {
                prop_assert!(s > 0.0 && s.is_finite());
                prop_assert!(seen.insert(it));
            }
        }
    }
}
