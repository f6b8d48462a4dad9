//! The recommender: turns a request and a consistent [`State`] into a ranked list.
//!
//! Every scenario gathers candidates with scores from one or more *strategies*, applies the
//! request's filters, caps the number of items per category for diversity, and fills what is
//! missing from trending and then popular items, so a cold-start user still gets a full list. The
//! strategies that contributed are reported in `strategy`, so a client (and an A/B analysis) can see
//! why a list looks the way it does.
//!
//! - `for_you`: the session model on the current session (what people who browsed like this went
//!   on to), co-visitation neighbours of older history, both boosted by the profile's category and
//!   brand affinities.
//! - `similar`: co-visitation neighbours of `item_id`, then the session model seeded with it.
//! - `bought_together`: cart and purchase co-occurrence of `item_id`, then `similar`.
//! - `trending`: hourly windowed counts, globally or within `category`.
//! - `recently_viewed`: the profile's own recent items, newest first.
//!
//! Ties are broken by item index (first-seen order), so results are deterministic.

use std::cmp::Ordering;
use std::sync::atomic::Ordering as AtomicOrdering;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

use kairos_state::profile::Profile;
use kairos_state::state::CachedList;
use kairos_state::State;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecommendConfig {
    pub default_k: usize,
    pub max_k: usize,
    /// Weight of co-visitation neighbours of older history relative to the session model.
    pub history_weight: f32,
    /// How many older distinct items of the profile seed history neighbours.
    pub history_items: usize,
    /// Multiplier strength of category/brand affinity: score × (1 + boost × affinity share).
    pub affinity_boost: f32,
    /// Weight of popular items of the user's favourite categories (a candidate source for users
    /// with history but no session).
    pub affinity_candidates_weight: f32,
    /// Length of the cached trending/popular lists used for fallbacks.
    pub fallback_list_len: usize,
    /// Default diversity cap per category (0 = none); a request's `max_per_category` overrides it.
    pub max_per_category: usize,
}

impl Default for RecommendConfig {
    fn default() -> Self {
        RecommendConfig {
            default_k: 10,
            max_k: 100,
            history_weight: 0.5,
            history_items: 10,
            affinity_boost: 0.3,
            affinity_candidates_weight: 0.2,
            fallback_list_len: 500,
            max_per_category: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    ForYou,
    Similar,
    BoughtTogether,
    Trending,
    RecentlyViewed,
}

impl Scenario {
    pub fn parse(s: &str) -> Option<Scenario> {
        Some(match s {
            "for_you" => Scenario::ForYou,
            "similar" => Scenario::Similar,
            "bought_together" => Scenario::BoughtTogether,
            "trending" => Scenario::Trending,
            "recently_viewed" => Scenario::RecentlyViewed,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::ForYou => "for_you",
            Scenario::Similar => "similar",
            Scenario::BoughtTogether => "bought_together",
            Scenario::Trending => "trending",
            Scenario::RecentlyViewed => "recently_viewed",
        }
    }

    /// Does the scenario need `item_id`?
    pub fn needs_item(self) -> bool {
        matches!(self, Scenario::Similar | Scenario::BoughtTogether)
    }
}

/// Filters a request may switch. `None` means the scenario's default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filters {
    pub in_stock_only: Option<bool>,
    pub exclude_purchased: Option<bool>,
    pub exclude_cart: Option<bool>,
    pub exclude_viewed: Option<bool>,
    pub include_categories: Vec<String>,
    pub exclude_categories: Vec<String>,
    pub min_price: Option<f64>,
    pub max_price: Option<f64>,
    pub max_per_category: Option<usize>,
    pub exclude_items: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub scenario: Scenario,
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub item_id: Option<String>,
    pub category: Option<String>,
    pub k: usize,
    pub filters: Filters,
    /// Fill short lists from trending/popular (on by default; the evaluation turns it off to
    /// measure a strategy alone).
    pub fallback: bool,
}

impl Request {
    pub fn new(scenario: Scenario, k: usize) -> Request {
        Request {
            scenario,
            user_id: None,
            anonymous_id: None,
            item_id: None,
            category: None,
            k,
            filters: Filters::default(),
            fallback: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    pub item: u32,
    pub score: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Recommendation {
    pub scenario: Scenario,
    /// Strategies that contributed, joined by `+` (e.g. `session_knn+affinity+trending`).
    pub strategy: String,
    pub items: Vec<Scored>,
}

/// Candidate scores gathered from strategies.
#[derive(Default)]
struct Candidates {
    scores: FxHashMap<u32, f32>,
    strategies: Vec<&'static str>,
}

impl Candidates {
    /// Adds a strategy's scores, normalized so its best item scores `weight`.
    fn add_normalized(&mut self, name: &'static str, list: &[(u32, f32)], weight: f32) {
        let max = list.iter().map(|e| e.1).fold(0.0f32, f32::max);
        if max <= 0.0 || weight <= 0.0 {
            return;
        }
        for &(item, s) in list {
            if s > 0.0 {
                *self.scores.entry(item).or_insert(0.0) += weight * s / max;
            }
        }
        if !self.strategies.contains(&name) {
            self.strategies.push(name);
        }
    }
}

fn by_score_then_index(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Items the request must not return, and the other filters, resolved to indices.
struct ResolvedFilters<'a> {
    state: &'a State,
    excluded: FxHashSet<u32>,
    in_stock_only: bool,
    include_categories: Option<FxHashSet<u32>>,
    exclude_categories: FxHashSet<u32>,
    min_price: Option<f64>,
    max_price: Option<f64>,
    max_per_category: usize,
}

impl<'a> ResolvedFilters<'a> {
    fn new(
        state: &'a State,
        req: &Request,
        profile: Option<&Profile>,
        cfg: &RecommendConfig,
    ) -> Self {
        let f = &req.filters;
        let mut excluded = FxHashSet::default();
        let by_default = |v: Option<bool>, d: bool| v.unwrap_or(d);
        let similar_like = req.scenario.needs_item();
        if let Some(p) = profile {
            if by_default(
                f.exclude_purchased,
                req.scenario != Scenario::RecentlyViewed,
            ) {
                excluded.extend(p.purchased.iter().copied());
            }
            if by_default(
                f.exclude_cart,
                matches!(req.scenario, Scenario::ForYou | Scenario::BoughtTogether),
            ) {
                excluded.extend(p.cart.iter().map(|l| l.0));
            }
            if by_default(f.exclude_viewed, false) && req.scenario != Scenario::RecentlyViewed {
                excluded.extend(p.recent.iter().map(|i| i.item));
            }
        }
        if similar_like {
            if let Some(i) = req.item_id.as_deref().and_then(|id| state.item_index(id)) {
                excluded.insert(i);
            }
        }
        excluded.extend(f.exclude_items.iter().filter_map(|id| state.item_index(id)));
        let cats = |names: &[String]| -> FxHashSet<u32> {
            names
                .iter()
                .filter_map(|c| state.categories.get(c))
                .collect()
        };
        ResolvedFilters {
            state,
            excluded,
            in_stock_only: by_default(f.in_stock_only, true),
            include_categories: (!f.include_categories.is_empty())
                .then(|| cats(&f.include_categories)),
            exclude_categories: cats(&f.exclude_categories),
            min_price: f.min_price,
            max_price: f.max_price,
            max_per_category: f.max_per_category.unwrap_or(cfg.max_per_category),
        }
    }

    fn allows(&self, item: u32) -> bool {
        if self.excluded.contains(&item) {
            return false;
        }
        let data = self.state.item(item);
        if !data.recommendable() || (self.in_stock_only && !data.in_stock()) {
            return false;
        }
        if let Some(include) = &self.include_categories {
            if !data.categories.iter().any(|c| include.contains(c)) {
                return false;
            }
        }
        if data
            .categories
            .iter()
            .any(|c| self.exclude_categories.contains(c))
        {
            return false;
        }
        if self.min_price.is_some() || self.max_price.is_some() {
            let Some(price) = data.price.map(|p| p as f64) else {
                return false;
            };
            if self.min_price.is_some_and(|m| price < m)
                || self.max_price.is_some_and(|m| price > m)
            {
                return false;
            }
        }
        true
    }
}

/// Picks the top `k` of `ranked` (already sorted) that pass the filters and the diversity cap.
fn select(
    ranked: impl Iterator<Item = (u32, f32)>,
    filters: &ResolvedFilters,
    k: usize,
    out: &mut Vec<Scored>,
    per_category: &mut FxHashMap<u32, usize>,
) {
    for (item, score) in ranked {
        if out.len() >= k {
            return;
        }
        if out.iter().any(|s| s.item == item) || !filters.allows(item) {
            continue;
        }
        if filters.max_per_category > 0 {
            if let Some(&c) = filters.state.item(item).categories.first() {
                let n = per_category.entry(c).or_insert(0);
                if *n >= filters.max_per_category {
                    continue;
                }
                *n += 1;
            }
        }
        out.push(Scored { item, score });
    }
}

/// Recommends for `req` over `state`.
pub fn recommend(state: &State, req: &Request, cfg: &RecommendConfig) -> Recommendation {
    let k = req.k.clamp(1, cfg.max_k.max(1));
    let profile = state.profile(req.user_id.as_deref(), req.anonymous_id.as_deref());
    let item = req.item_id.as_deref().and_then(|id| state.item_index(id));
    let category = req
        .category
        .as_deref()
        .and_then(|c| state.categories.get(c));
    let mut cands = Candidates::default();

    match req.scenario {
        Scenario::ForYou => {
            if let Some(p) = profile {
                for_you(state, p, cfg, &mut cands);
            }
        }
        Scenario::Similar => {
            if let Some(i) = item {
                similar(state, i, &mut cands);
            }
        }
        Scenario::BoughtTogether => {
            if let Some(i) = item {
                let list: Vec<_> = state
                    .item(i)
                    .bought_together
                    .decayed(state.clock, state.config.relation_half_life_ms())
                    .collect();
                cands.add_normalized("bought_together", &list, 1.0);
                if cands.scores.len() < k {
                    let mut sim = Candidates::default();
                    similar(state, i, &mut sim);
                    let list: Vec<_> = sim.scores.into_iter().collect();
                    cands.add_normalized("similar", &list, 0.5);
                }
            }
        }
        Scenario::Trending => {
            let list = ranked_list(state, category, ListKind::Trending, cfg);
            cands.add_normalized("trending", &list, 1.0);
        }
        Scenario::RecentlyViewed => {
            if let Some(p) = profile {
                let mut seen = FxHashSet::default();
                let list: Vec<(u32, f32)> = p
                    .recent
                    .iter()
                    .rev()
                    .filter(|i| seen.insert(i.item))
                    .enumerate()
                    .map(|(rank, i)| (i.item, 1.0 / (rank + 1) as f32))
                    .collect();
                cands.add_normalized("recently_viewed", &list, 1.0);
            }
        }
    }

    let filters = ResolvedFilters::new(state, req, profile, cfg);
    let mut ranked: Vec<(u32, f32)> = cands.scores.into_iter().collect();
    ranked.sort_unstable_by(by_score_then_index);
    let mut out = Vec::with_capacity(k);
    let mut per_category = FxHashMap::default();
    select(ranked.into_iter(), &filters, k, &mut out, &mut per_category);
    let mut strategies = cands.strategies;

    // Cold start and short lists: trending (in the requested category when given), then popular.
    if req.fallback && out.len() < k && req.scenario != Scenario::RecentlyViewed {
        let fallback_category = match req.scenario {
            Scenario::Trending => category,
            Scenario::Similar | Scenario::BoughtTogether => {
                item.and_then(|i| state.item(i).categories.first().copied())
            }
            _ => None,
        };
        for (kind, name) in [
            (ListKind::Trending, "trending"),
            (ListKind::Popular, "popular"),
        ] {
            let mut sources = vec![fallback_category];
            if fallback_category.is_some() && req.scenario != Scenario::Trending {
                sources.push(None);
            }
            for source in sources {
                if out.len() >= k {
                    break;
                }
                let before = out.len();
                let list = ranked_list(state, source, kind, cfg);
                // Fallback scores stay below every strategy score of this response.
                let floor = out.last().map_or(1.0, |s| s.score).min(1.0) * 0.5;
                let max = list.first().map_or(1.0, |e| e.1).max(f32::MIN_POSITIVE);
                let scaled = list.iter().map(|&(i, s)| (i, floor * s / max));
                select(scaled, &filters, k, &mut out, &mut per_category);
                if out.len() > before && !strategies.contains(&name) {
                    strategies.push(name);
                }
            }
        }
    }
    let strategy = if strategies.is_empty() {
        "none".to_owned()
    } else {
        strategies.join("+")
    };
    Recommendation {
        scenario: req.scenario,
        strategy,
        items: out,
    }
}

fn for_you(state: &State, p: &Profile, cfg: &RecommendConfig, cands: &mut Candidates) {
    let session: Vec<u32> = p.session_items().map(|i| i.item).collect();
    if !session.is_empty() {
        let mut scores = Vec::new();
        state
            .sessions
            .score_session(Some(p.session_key), &session, state.clock, &mut scores);
        cands.add_normalized("session_knn", &scores, 1.0);
    }
    // Older history: co-visitation neighbours of the most recent distinct items outside the session.
    let mut seen = FxHashSet::default();
    let history: Vec<u32> = p
        .recent
        .iter()
        .rev()
        .filter(|i| i.session != p.session_no)
        .map(|i| i.item)
        .filter(|i| seen.insert(*i))
        .take(cfg.history_items)
        .collect();
    if !history.is_empty() {
        let h = state.config.relation_half_life_ms();
        let mut acc: FxHashMap<u32, f32> = FxHashMap::default();
        for (rank, &i) in history.iter().enumerate() {
            let recency = 1.0 / (rank + 1) as f32;
            for (other, s) in state.item(i).covisit.decayed(state.clock, h) {
                *acc.entry(other).or_insert(0.0) += recency * s;
            }
        }
        let list: Vec<_> = acc.into_iter().collect();
        let weight = if session.is_empty() {
            1.0
        } else {
            cfg.history_weight
        };
        cands.add_normalized("covisitation", &list, weight);
    }
    // Affinities: boost candidates of favourite categories/brands, and add popular items of the
    // favourite categories as candidates.
    let ah = state.config.affinity_half_life_ms();
    let cats: Vec<(u32, f32)> = p.categories.decayed(state.clock, ah).collect();
    let brands: Vec<(u32, f32)> = p.brands.decayed(state.clock, ah).collect();
    let cat_total: f32 = cats.iter().map(|c| c.1).sum();
    let brand_total: f32 = brands.iter().map(|c| c.1).sum();
    if cat_total <= 0.0 && brand_total <= 0.0 {
        return;
    }
    let share = |list: &[(u32, f32)], total: f32, key: u32| -> f32 {
        if total <= 0.0 {
            return 0.0;
        }
        list.iter()
            .find(|c| c.0 == key)
            .map_or(0.0, |c| c.1 / total)
    };
    let mut top_cats = cats.clone();
    top_cats.sort_unstable_by(by_score_then_index);
    for &(c, s) in top_cats.iter().take(3) {
        let list = ranked_list(state, Some(c), ListKind::Popular, cfg);
        let weight = cfg.affinity_candidates_weight * s / cat_total;
        let head: Vec<_> = list.into_iter().take(50).collect();
        cands.add_normalized("affinity", &head, weight);
    }
    if cfg.affinity_boost > 0.0 {
        let mut boosted = false;
        for (&item, score) in cands.scores.iter_mut() {
            let data = state.item(item);
            let c = data
                .categories
                .iter()
                .map(|&c| share(&cats, cat_total, c))
                .fold(0.0, f32::max);
            let b = data.brand.map_or(0.0, |b| share(&brands, brand_total, b));
            let a = c.max(b);
            if a > 0.0 {
                *score *= 1.0 + cfg.affinity_boost * a;
                boosted = true;
            }
        }
        if boosted && !cands.strategies.contains(&"affinity") {
            cands.strategies.push("affinity");
        }
    }
}

fn similar(state: &State, item: u32, cands: &mut Candidates) {
    let list: Vec<_> = state
        .item(item)
        .covisit
        .decayed(state.clock, state.config.relation_half_life_ms())
        .collect();
    cands.add_normalized("covisitation", &list, 1.0);
    let mut scores = Vec::new();
    state
        .sessions
        .score_session(None, &[item], state.clock, &mut scores);
    scores.retain(|e| e.0 != item);
    cands.add_normalized("session_knn", &scores, 0.5);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ListKind {
    Trending,
    Popular,
}

/// The cached trending or popular list, globally or within one category.
fn ranked_list(
    state: &State,
    category: Option<u32>,
    kind: ListKind,
    cfg: &RecommendConfig,
) -> Vec<(u32, f32)> {
    let cache = match kind {
        ListKind::Trending => &state.caches.trending,
        ListKind::Popular => &state.caches.popular,
    };
    // Freshness is judged on event time, so the same log always gives the same lists.
    let refresh_ms = i64::try_from(state.config.trending_refresh_ms).unwrap_or(i64::MAX);
    let seq = state.counters.entries_applied;
    {
        let guard = cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = guard.get(&category) {
            let fresh = c.seq == seq || state.clock.saturating_sub(c.clock) < refresh_ms;
            if fresh {
                state.caches.hits.fetch_add(1, AtomicOrdering::Relaxed);
                return c.items.clone();
            }
        }
    }
    state.caches.misses.fetch_add(1, AtomicOrdering::Relaxed);
    let mut list: Vec<(u32, f32)> = state
        .item_data
        .iter()
        .enumerate()
        .filter(|(_, d)| d.recommendable())
        .filter(|(_, d)| category.is_none_or(|c| d.categories.contains(&c)))
        .map(|(i, d)| {
            let s = match kind {
                ListKind::Trending => d.stats.trending(state.clock, &state.config),
                // A catalogue item nobody interacted with yet still ranks, after every item with
                // behaviour (in first-seen order), so a brand-new shop serves its catalogue.
                ListKind::Popular => {
                    d.stats.popularity_at(state.clock, &state.config)
                        + if d.catalog.is_some() {
                            f32::MIN_POSITIVE
                        } else {
                            0.0
                        }
                }
            };
            (i as u32, s)
        })
        .filter(|e| e.1 > 0.0)
        .collect();
    let n = cfg.fallback_list_len.min(list.len());
    if n > 0 && n < list.len() {
        list.select_nth_unstable_by(n - 1, by_score_then_index);
        list.truncate(n);
    }
    list.sort_unstable_by(by_score_then_index);
    let mut guard = cache.lock().unwrap_or_else(|p| p.into_inner());
    guard.insert(
        category,
        CachedList {
            clock: state.clock,
            seq,
            items: list.clone(),
        },
    );
    list
}
