//! The recommender: turns a request and a consistent [`State`] into a ranked list.
//!
//! Every scenario gathers candidates with scores from one or more *strategies*, applies the
//! request's filters, caps the number of items per category for diversity, and fills what is
//! missing from trending and then popular items, so a cold-start user still gets a full list. The
//! strategies that contributed are reported in `strategy`, so a client (and an A/B analysis) can see
//! why a list looks the way it does.
//!
//! - `for_you`: the session model on the current session (what people who browsed like this went
//!   on to), co-visitation neighbours of older history, and popular items of the categories the
//!   profile favours more than the population does; every candidate is scaled by that lift of its
//!   category or brand.
//! - `similar`: co-visitation neighbours of `item_id`, then the session model seeded with it.
//! - `bought_together`: cart and purchase co-occurrence of `item_id`, then `similar`.
//! - `trending`: hourly windowed counts, globally or within `category`.
//! - `recently_viewed`: the profile's own recent items, newest first.
//!
//! Ties are broken by item index (first-seen order), so results are deterministic.

use std::cmp::Ordering;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

use kairos_state::items::ItemData;
use kairos_state::profile::Profile;
use kairos_state::state::{AttributeStats, CachedList};
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
    /// Strength of category/brand affinity: every candidate's score × lift^affinity_boost, the
    /// lift being how much more than the population the user goes for the item's category or
    /// brand (0 turns the boost off).
    pub affinity_boost: f32,
    /// Pseudo-weight (in event-weight units: a view is 1) of the population's category shares in
    /// a profile's estimated shares, so that a few events do not make extreme preferences.
    pub affinity_prior_weight: f32,
    /// Weight of popular items of the categories the user prefers more than the population does
    /// (a candidate source that matters most when sessions and relations know little), scaled by
    /// that excess share.
    pub affinity_candidates_weight: f32,
    /// Length of the cached trending/popular lists used for fallbacks.
    pub fallback_list_len: usize,
    /// Default diversity cap per category (0 = none); a request's `max_per_category` overrides it.
    pub max_per_category: usize,
    /// Candidates each source of `for_you` (session model, history neighbours) passes on, its
    /// best by its own score (at least four times the `k` asked for): the boosts after it rescale
    /// scores by bounded factors, so the tail of a long list (a session's neighbours touch
    /// hundreds of items) never reaches the top, and merging, boosting and sorting it would be
    /// most of the cost of a request.
    pub candidates_per_source: usize,
}

impl Default for RecommendConfig {
    fn default() -> Self {
        RecommendConfig {
            default_k: 10,
            max_k: 100,
            history_weight: 0.5,
            history_items: 10,
            affinity_boost: 1.0,
            affinity_prior_weight: 5.0,
            affinity_candidates_weight: 0.2,
            fallback_list_len: 500,
            max_per_category: 0,
            candidates_per_source: 100,
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
    let profile = state.profile(req.user_id.as_deref(), req.anonymous_id.as_deref());
    recommend_for(state, req, profile, cfg)
}

/// Recommends for `req` over the model of `state`, for the person whose profile is `profile`
/// (an API replica reads it from Redis; its state holds no profiles).
pub fn recommend_for(
    state: &State,
    req: &Request,
    profile: Option<&Profile>,
    cfg: &RecommendConfig,
) -> Recommendation {
    let k = req.k.clamp(1, cfg.max_k.max(1));
    let item = req.item_id.as_deref().and_then(|id| state.item_index(id));
    let category = req
        .category
        .as_deref()
        .and_then(|c| state.categories.get(c));
    let mut cands = Candidates::default();

    match req.scenario {
        Scenario::ForYou => {
            if let Some(p) = profile {
                for_you(state, p, cfg, k, &mut cands);
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
            let list = ranked_list(state, category, ListKind::Trending, cfg, Asker::Read);
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
                let list = ranked_list(state, source, kind, cfg, Asker::Read);
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

/// Keeps the `n` best of `list` (by score, then index), in no particular order.
fn keep_best(list: &mut Vec<(u32, f32)>, n: usize) {
    keep_best_by(list, n, by_score_then_index);
}

/// Keeps the `n` entries of `list` that `cmp` orders first, leaving them unordered.
fn keep_best_by(
    list: &mut Vec<(u32, f32)>,
    n: usize,
    cmp: impl FnMut(&(u32, f32), &(u32, f32)) -> Ordering,
) {
    if n > 0 && list.len() > n {
        list.select_nth_unstable_by(n - 1, cmp);
        list.truncate(n);
    }
}

fn for_you(state: &State, p: &Profile, cfg: &RecommendConfig, k: usize, cands: &mut Candidates) {
    let per_source = cfg.candidates_per_source.max(4 * k);
    let session: Vec<u32> = p.session_items().map(|i| i.item).collect();
    if !session.is_empty() {
        let mut scores = Vec::new();
        state
            .sessions
            .score_session(Some(p.session_key), &session, state.clock, &mut scores);
        keep_best(&mut scores, per_source);
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
        let mut list: Vec<_> = acc.into_iter().collect();
        keep_best(&mut list, per_source);
        let weight = if session.is_empty() {
            1.0
        } else {
            cfg.history_weight
        };
        cands.add_normalized("covisitation", &list, weight);
    }
    affinities(state, p, cfg, cands);
}

/// A profile's preference for categories (or brands) relative to everyone's.
///
/// With `w_c` the profile's decayed weight on `c`, `W` its total, `P(c)` the population's share of
/// interaction mass on `c` and `m` = `affinity_prior_weight`, the profile's share is estimated as
/// `p_u(c) = (w_c + m·P(c)) / (W + m)`: a profile with little evidence looks like the population.
/// `lift(c) = p_u(c) / P(c)` says how much more (or less) than everyone the user goes for `c`, and
/// `excess(c) = max(0, p_u(c) - P(c))` is the share of attention popularity alone does not explain.
struct Preference<'a> {
    weights: &'a [(u32, f32)],
    total: f32,
    /// The population's mass by key, and its total.
    mass: &'a [f32],
    mass_total: f32,
    prior: f32,
}

impl<'a> Preference<'a> {
    fn new(weights: &'a [(u32, f32)], mass: &'a [f32], mass_total: f32, prior: f32) -> Self {
        Preference {
            weights,
            total: weights.iter().map(|e| e.1).sum(),
            mass,
            mass_total,
            prior,
        }
    }

    fn population(&self, key: u32) -> f32 {
        let m = self.mass.get(key as usize).copied().unwrap_or(0.0);
        if self.mass_total > 0.0 {
            m / self.mass_total
        } else {
            0.0
        }
    }

    fn share(&self, key: u32, population: f32) -> f32 {
        let w = self
            .weights
            .iter()
            .find(|e| e.0 == key)
            .map_or(0.0, |e| e.1);
        let denominator = self.total + self.prior;
        if denominator > 0.0 {
            (w + self.prior * population) / denominator
        } else {
            population
        }
    }

    /// `None` when nobody's recent interactions touched `key` (no baseline to compare with).
    fn lift(&self, key: u32) -> Option<f32> {
        let population = self.population(key);
        (population > 0.0).then(|| self.share(key, population) / population)
    }

    fn excess(&self, key: u32) -> f32 {
        let population = self.population(key);
        (self.share(key, population) - population).max(0.0)
    }
}

/// Affinities: popular items of the categories the user prefers more than the population does
/// become candidates, and every candidate is scaled by the user's lift for its category or brand
/// (`score × lift^affinity_boost`, the stronger of the two).
///
/// Comparing with the population is what makes affinities personal: on a site where everyone
/// mostly buys from the same big categories, "the user likes Drama" says nothing that popularity
/// does not already say, while a share well above everyone's is real information. Without the
/// comparison the boost favours broad categories for everyone and the candidates duplicate the
/// popular fallback.
fn affinities(state: &State, p: &Profile, cfg: &RecommendConfig, cands: &mut Candidates) {
    let ah = state.config.affinity_half_life_ms();
    let cats: Vec<(u32, f32)> = p.categories.decayed(state.clock, ah).collect();
    let brands: Vec<(u32, f32)> = p.brands.decayed(state.clock, ah).collect();
    if cats.is_empty() && brands.is_empty() {
        return;
    }
    let stats = attribute_stats(state, Asker::Read);
    let prior = cfg.affinity_prior_weight;
    let cat_pref = Preference::new(&cats, &stats.category_mass, stats.category_total, prior);
    let brand_pref = Preference::new(&brands, &stats.brand_mass, stats.brand_total, prior);

    if cfg.affinity_candidates_weight > 0.0 {
        let mut excess: Vec<(u32, f32)> = cats
            .iter()
            .map(|&(c, _)| (c, cat_pref.excess(c)))
            .filter(|e| e.1 > 0.0)
            .collect();
        excess.sort_unstable_by(by_score_then_index);
        for &(c, x) in excess.iter().take(AFFINITY_CATEGORIES) {
            if let Some(top) = stats.category_top.get(c as usize) {
                cands.add_normalized("affinity", top, cfg.affinity_candidates_weight * x);
            }
        }
    }
    if cfg.affinity_boost > 0.0 {
        let mut boosted = false;
        for (&item, score) in cands.scores.iter_mut() {
            let facets = state.facets(item);
            let brand_lift = facets.brand().and_then(|b| brand_pref.lift(b));
            let lift = match facets.category() {
                Some(category) => category
                    .and_then(|c| cat_pref.lift(c))
                    .into_iter()
                    .chain(brand_lift)
                    .reduce(f32::max),
                None => state
                    .item(item)
                    .categories
                    .iter()
                    .filter_map(|&c| cat_pref.lift(c))
                    .chain(brand_lift)
                    .reduce(f32::max),
            };
            if let Some(lift) = lift {
                *score *= if cfg.affinity_boost == 1.0 {
                    lift
                } else {
                    lift.powf(cfg.affinity_boost)
                };
                boosted = true;
            }
        }
        if boosted && !cands.strategies.contains(&"affinity") {
            cands.strategies.push("affinity");
        }
    }
}

/// Favourite categories whose popular items become candidates.
const AFFINITY_CATEGORIES: usize = 3;
/// Popular items taken from each of them.
const AFFINITY_CANDIDATES: usize = 50;

/// Who is asking for a cached value: a request, or the maintainer refreshing after it applied.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Asker {
    Read,
    Maintainer,
}

/// Whether a cached value computed at engine clock `clock`, after `seq` applied entries, for
/// catalogue `catalog_version`, may answer `asker` now (see [`CachedList`]).
fn reusable(state: &State, asker: Asker, clock: i64, seq: u64, catalog_version: u64) -> bool {
    if seq == state.counters.entries_applied {
        return true;
    }
    if catalog_version != state.catalog_version() {
        return false;
    }
    let refresh_ms = i64::try_from(state.config.trending_refresh_ms).unwrap_or(i64::MAX);
    let maintained = refresh_ms > 0 && state.caches.maintained.load(AtomicOrdering::Relaxed);
    (asker == Asker::Read && maintained) || state.clock.saturating_sub(clock) < refresh_ms
}

/// The population's aggregates per category and brand (see [`AttributeStats`]), from one pass
/// over the items: each item's popularity adds to the mass of its categories and brand, and
/// competes for its categories' top lists. Cached and refreshed like the ranked lists.
fn attribute_stats(state: &State, asker: Asker) -> std::sync::Arc<AttributeStats> {
    let cache = &state.caches.attributes;
    if let Some(stats) = cache.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        if reusable(state, asker, stats.clock, stats.seq, stats.catalog_version) {
            return stats.clone();
        }
    }
    // Computed without holding the cache's lock: reads keep using the previous value meanwhile.
    let mut stats = AttributeStats {
        clock: state.clock,
        seq: state.counters.entries_applied,
        catalog_version: state.catalog_version(),
        category_mass: vec![0.0; state.categories.len()],
        brand_mass: vec![0.0; state.brands.len()],
        category_top: vec![Vec::new(); state.categories.len()],
        ..AttributeStats::default()
    };
    for (i, d) in state.item_data.iter().enumerate() {
        if !d.recommendable() {
            continue;
        }
        let score = popularity_score(state, d);
        if score <= 0.0 {
            continue;
        }
        for (j, &c) in d.categories.iter().enumerate() {
            if d.categories[..j].contains(&c) {
                continue;
            }
            stats.category_mass[c as usize] += score;
            stats.category_total += score;
            stats.category_top[c as usize].push((i as u32, score));
        }
        if let Some(b) = d.brand {
            stats.brand_mass[b as usize] += score;
            stats.brand_total += score;
        }
    }
    for top in &mut stats.category_top {
        keep_best(top, AFFINITY_CANDIDATES);
        top.sort_unstable_by(by_score_then_index);
    }
    let stats = std::sync::Arc::new(stats);
    *cache.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats.clone());
    stats
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

/// An item's score in popular lists: its decayed popularity. A catalogue item nobody interacted
/// with yet still ranks, after every item with behaviour (in first-seen order), so a brand-new
/// shop serves its catalogue.
fn popularity_score(state: &State, d: &ItemData) -> f32 {
    d.stats.popularity_at(state.clock, &state.config)
        + if d.catalog.is_some() {
            f32::MIN_POSITIVE
        } else {
            0.0
        }
}

/// The cached trending or popular list, globally or within one category.
fn ranked_list(
    state: &State,
    category: Option<u32>,
    kind: ListKind,
    cfg: &RecommendConfig,
    asker: Asker,
) -> Arc<[(u32, f32)]> {
    let cache = match kind {
        ListKind::Trending => &state.caches.trending,
        ListKind::Popular => &state.caches.popular,
    };
    // Freshness is judged on event time, so the same log always gives the same lists.
    {
        let guard = cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = guard.get(&category) {
            if reusable(state, asker, c.clock, c.seq, c.catalog_version) {
                state.caches.hits.fetch_add(1, AtomicOrdering::Relaxed);
                return c.items.clone();
            }
        }
    }
    state.caches.misses.fetch_add(1, AtomicOrdering::Relaxed);
    // Computed without holding the cache's lock, so reads that can reuse the previous lists are
    // not held up by a scan of the catalogue.
    let lists = all_ranked_lists(state, kind, cfg);
    let mut wanted: Arc<[(u32, f32)]> = Arc::new([]);
    let mut guard = cache.lock().unwrap_or_else(|p| p.into_inner());
    for (key, items) in lists {
        let items: Arc<[(u32, f32)]> = items.into();
        if key == category {
            wanted = items.clone();
        }
        let list = CachedList {
            clock: state.clock,
            seq: state.counters.entries_applied,
            catalog_version: state.catalog_version(),
            items,
        };
        guard.insert(key, list);
    }
    wanted
}

/// Brings the cached lists reads depend on (trending and popular, globally and per category, and
/// the population's category and brand mass) up to date if they are stale. The processor calls
/// it after applying, so that the catalogue scans behind these lists run on its thread, not
/// inside a request holding the state's read lock, which would hold up the processor's next
/// write and every read queued behind it. From the first call on, reads reuse whatever lists
/// there are for the current catalogue instead of recomputing stale ones ([`CachedList`]).
pub fn refresh_caches(state: &State, cfg: &RecommendConfig) {
    attribute_stats(state, Asker::Maintainer);
    ranked_list(state, None, ListKind::Trending, cfg, Asker::Maintainer);
    ranked_list(state, None, ListKind::Popular, cfg, Asker::Maintainer);
    state.caches.maintained.store(true, AtomicOrdering::Relaxed);
}

/// A ranked list and its category (`None`: global).
type KeyedList = (Option<u32>, Vec<(u32, f32)>);

/// Every list of one kind at once, the global one and one per category, in a single pass over
/// the catalogue. A stale per-category list used to be recomputed on its own, each a pass over
/// every item: with a thousand categories asked for in turn (the fallback of `similar` is the
/// item's category) that was hundreds of catalogue scans a second under the state's read lock,
/// which the processor's writes queue behind, and every read behind them.
///
/// Equal scores are ordered by item id. They are common here: every catalogue item nobody has
/// touched yet ties, so a new shop's fallback lists are those items in id order. The internal
/// index would order them by arrival instead, which on a partitioned log depends on how the
/// partitions interleave, and the same data would give different answers on different backends.
fn all_ranked_lists(state: &State, kind: ListKind, cfg: &RecommendConfig) -> Vec<KeyedList> {
    let factors = match kind {
        ListKind::Trending => kairos_state::items::trending_factors(&state.config),
        ListKind::Popular => Vec::new(),
    };
    let mut global = Vec::new();
    let mut per_category: Vec<Vec<(u32, f32)>> = vec![Vec::new(); state.categories.len()];
    for (i, d) in state.item_data.iter().enumerate() {
        if !d.recommendable() {
            continue;
        }
        let s = match kind {
            ListKind::Trending => d.stats.trending_with(state.clock, &factors, &state.config),
            ListKind::Popular => popularity_score(state, d),
        };
        // `> 0.0` also leaves out NaN.
        if s.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            continue;
        }
        global.push((i as u32, s));
        for (n, &c) in d.categories.iter().enumerate() {
            if !d.categories[..n].contains(&c) {
                if let Some(list) = per_category.get_mut(c as usize) {
                    list.push((i as u32, s));
                }
            }
        }
    }
    let by_score_then_id = |a: &(u32, f32), b: &(u32, f32)| {
        b.1.total_cmp(&a.1)
            .then_with(|| state.items.name(a.0).cmp(state.items.name(b.0)))
    };
    let top = |mut list: Vec<(u32, f32)>| {
        keep_best_by(&mut list, cfg.fallback_list_len, by_score_then_id);
        list.sort_unstable_by(by_score_then_id);
        list
    };
    let mut lists = Vec::with_capacity(per_category.len() + 1);
    lists.push((None, top(global)));
    for (c, list) in per_category.into_iter().enumerate() {
        lists.push((Some(c as u32), top(list)));
    }
    lists
}

#[cfg(test)]
mod affinity_tests {
    use super::*;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-5
    }

    /// Population shares 0.25, 0.25, 0.5 over categories 0, 1, 2; category 3 never interacted.
    const MASS: [f32; 4] = [50.0, 50.0, 100.0, 0.0];
    const MASS_TOTAL: f32 = 200.0;

    #[test]
    fn lift_compares_smoothed_share_with_population() {
        let weights = [(0, 8.0), (1, 2.0)];
        let p = Preference::new(&weights, &MASS, MASS_TOTAL, 5.0);
        // p_u(0) = (8 + 5 * 0.25) / (10 + 5) = 0.61667: 2.4667 times the population's 0.25.
        assert!(close(p.lift(0).unwrap(), 9.25 / 15.0 / 0.25));
        assert!(close(p.excess(0), 9.25 / 15.0 - 0.25));
        // p_u(1) = 3.25 / 15 is below the population's share: a lift under 1, no excess.
        assert!(close(p.lift(1).unwrap(), 3.25 / 15.0 / 0.25));
        assert_eq!(p.excess(1), 0.0);
        // Never touched by the user: only the prior's share, 2.5 / 15 against 0.5.
        assert!(close(p.lift(2).unwrap(), 1.0 / 3.0));
        // Nobody interacted with category 3 (or it is unknown): no baseline, no lift.
        assert_eq!(p.lift(3), None);
        assert_eq!(p.lift(9), None);
        assert_eq!(p.excess(3), 0.0);
    }

    #[test]
    fn without_evidence_a_profile_looks_like_the_population() {
        let p = Preference::new(&[], &MASS, MASS_TOTAL, 5.0);
        for c in 0..3 {
            assert!(close(p.lift(c).unwrap(), 1.0));
            assert_eq!(p.excess(c), 0.0);
        }
        // No prior and no evidence: still the population share, never a division by zero.
        let p = Preference { prior: 0.0, ..p };
        assert!(close(p.lift(2).unwrap(), 1.0));
    }

    #[test]
    fn more_evidence_moves_the_estimate_towards_the_profile() {
        let lift = |w: f32| {
            let weights = [(0, w)];
            Preference::new(&weights, &MASS, MASS_TOTAL, 5.0)
                .lift(0)
                .unwrap()
        };
        // All of the profile's weight on a category with a quarter of the population's: the lift
        // grows towards 4 as evidence accumulates.
        assert!(close(lift(1.0), (1.0 + 1.25) / 6.0 / 0.25));
        assert!(lift(1.0) < lift(5.0) && lift(5.0) < lift(100.0) && lift(100.0) < 4.0);
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;
    use kairos_state::state::LogPosition;
    use kairos_state::StateConfig;
    use kairos_types::item::{Item, LogEntry};

    fn upsert(state: &mut State, seq: u64, id: &str) {
        let item = Item::from_json(&serde_json::json!({"id": id})).unwrap();
        let pos = LogPosition {
            partition: 0,
            offset: seq - 1,
            seq,
        };
        state.apply(pos, &LogEntry::ItemUpsert(item));
    }

    fn popular_ids(state: &State) -> Vec<&str> {
        let cfg = RecommendConfig::default();
        ranked_list(state, None, ListKind::Popular, &cfg, Asker::Read)
            .iter()
            .map(|&(i, _)| state.items.name(i))
            .collect()
    }

    fn misses(state: &State) -> u64 {
        state.caches.misses.load(AtomicOrdering::Relaxed)
    }

    /// Once the processor maintains the lists, a read reuses a list of the current catalogue
    /// however stale (it never scans the catalogue inside a request), the maintainer refreshes it,
    /// and a catalogue change still shows at once.
    #[test]
    fn reads_reuse_maintained_lists_until_the_catalogue_changes() {
        let mut state = State::new(StateConfig {
            trending_refresh_ms: 1000,
            ..StateConfig::default()
        });
        let cfg = RecommendConfig::default();
        upsert(&mut state, 1, "a");
        refresh_caches(&state, &cfg);
        let computed = misses(&state);
        assert!(computed > 0);

        // Applied entries and an hour of event time later, without a catalogue change.
        state.counters.entries_applied += 10;
        state.clock += 3_600_000;
        assert_eq!(popular_ids(&state), ["a"]);
        assert_eq!(
            misses(&state),
            computed,
            "a read recomputed a maintained list"
        );

        refresh_caches(&state, &cfg);
        assert!(
            misses(&state) > computed,
            "the maintainer did not refresh a stale list"
        );
        let refreshed = misses(&state);

        upsert(&mut state, 2, "b");
        let mut ids = popular_ids(&state);
        ids.sort_unstable();
        assert_eq!(ids, ["a", "b"]);
        assert!(misses(&state) > refreshed);
    }

    /// Untouched catalogue items tie; they are listed by id, whatever order they arrived in
    /// (on a partitioned log, the order the partitions happened to interleave), also where the
    /// list is cut to its length.
    #[test]
    fn tied_items_are_listed_by_id_not_by_arrival() {
        let mut state = State::new(StateConfig::default());
        for (seq, id) in ["d", "b", "e", "a", "c"].into_iter().enumerate() {
            upsert(&mut state, seq as u64 + 1, id);
        }
        assert_eq!(popular_ids(&state), ["a", "b", "c", "d", "e"]);
        let cfg = RecommendConfig {
            fallback_list_len: 2,
            ..RecommendConfig::default()
        };
        let lists = all_ranked_lists(&state, ListKind::Popular, &cfg);
        let global: Vec<&str> = lists[0]
            .1
            .iter()
            .map(|&(i, _)| state.items.name(i))
            .collect();
        assert_eq!(global, ["a", "b"]);
    }

    /// Without a maintainer (evaluations, tests), stale lists are recomputed by the read.
    #[test]
    fn unmaintained_lists_are_recomputed_when_stale() {
        let mut state = State::new(StateConfig {
            trending_refresh_ms: 1000,
            ..StateConfig::default()
        });
        upsert(&mut state, 1, "a");
        assert_eq!(popular_ids(&state), ["a"]);
        let computed = misses(&state);
        state.counters.entries_applied += 1;
        state.clock += 500;
        assert_eq!(popular_ids(&state), ["a"]);
        assert_eq!(misses(&state), computed, "fresh for trending_refresh_ms");
        state.clock += 1000;
        assert_eq!(popular_ids(&state), ["a"]);
        assert!(misses(&state) > computed, "a stale list was reused");
    }
}
