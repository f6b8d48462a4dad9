//! The state: everything the recommender reads, as a pure function of the log.
//!
//! [`State::apply`] is the only way the state changes. It is deterministic: the same log entries in
//! the same order give the same state, which the golden replay and crash tests rely on. Every entry
//! carries its log position; entries at or below the state's checkpoint are skipped, which makes
//! replays after a restart (or a redelivery) idempotent.

use std::sync::Mutex;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use kairos_types::{stable_hash64, Event, EventKind, Item, LogEntry, ModelBatch, ModelOp};

use crate::config::StateConfig;
use crate::intern::Interner;
use crate::items::{Counted, ItemData, ItemFacets};
use crate::profile::{Action, Interaction, Profile, Profiles};
use crate::session_model::SessionModel;

/// Where a log entry sits in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogPosition {
    pub partition: u32,
    pub offset: u64,
    pub seq: u64,
}

/// How far the state has consumed the log: the next offset to apply per partition, and the last
/// applied global sequence number.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub offsets: Vec<u64>,
    pub seq: u64,
}

impl Checkpoint {
    pub fn covers(&self, pos: &LogPosition) -> bool {
        self.offsets
            .get(pos.partition as usize)
            .is_some_and(|&next| pos.offset < next)
    }

    fn advance(&mut self, pos: &LogPosition) {
        let p = pos.partition as usize;
        if self.offsets.len() <= p {
            self.offsets.resize(p + 1, 0);
        }
        self.offsets[p] = pos.offset + 1;
        self.seq = self.seq.max(pos.seq);
    }
}

/// Engine-wide counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StateCounters {
    pub entries_applied: u64,
    pub events_applied: u64,
    pub merges: u64,
    pub catalog_upserts: u64,
    pub catalog_deletes: u64,
}

/// A cached ranked list (trending, popular). It is reused while the state is unchanged, and after
/// a change for `trending_refresh_ms` of event time (the engine clock), never of wall-clock time:
/// recommendations stay a pure function of the log, so replays and evaluations are exact.
///
/// On a live node a maintainer (the processor, [`Caches::maintained`]) refreshes the lists after
/// it applies, and reads take whatever list is there as long as the catalogue is the same: a
/// read never scans the catalogue itself, which would stall it (and every read waiting on the
/// same list) for milliseconds.
#[derive(Clone, Debug, Default)]
pub struct CachedList {
    /// The engine clock ([`State::clock`]) when the list was computed.
    pub clock: i64,
    pub seq: u64,
    /// [`State::catalog_version`] when computed: a catalogue change always invalidates.
    pub catalog_version: u64,
    pub items: std::sync::Arc<[(u32, f32)]>,
}

/// Aggregates of everyone's interactions per category and per brand, which affinities compare a
/// profile with. Refreshed like [`CachedList`].
#[derive(Clone, Debug, Default)]
pub struct AttributeStats {
    /// The engine clock ([`State::clock`]) and the applied entries when computed.
    pub clock: i64,
    pub seq: u64,
    pub catalog_version: u64,
    /// Decayed interaction mass per category (dense by index), and its total.
    pub category_mass: Vec<f32>,
    pub category_total: f32,
    /// Decayed interaction mass per brand (dense by index), and its total.
    pub brand_mass: Vec<f32>,
    pub brand_total: f32,
    /// The most popular items of each category (dense by index), best first.
    pub category_top: Vec<Vec<(u32, f32)>>,
}

/// Caches derived from the state; never serialized, rebuilt on demand.
#[derive(Debug, Default)]
pub struct Caches {
    pub trending: Mutex<FxHashMap<Option<u32>, CachedList>>,
    pub popular: Mutex<FxHashMap<Option<u32>, CachedList>>,
    /// Population aggregates per category and brand, for affinities.
    pub attributes: Mutex<Option<std::sync::Arc<AttributeStats>>>,
    /// Lookups answered from a cached list, and lookups that recomputed it.
    pub hits: std::sync::atomic::AtomicU64,
    pub misses: std::sync::atomic::AtomicU64,
    /// Set once a maintainer refreshes the caches after applying (see [`CachedList`]); from then
    /// on reads reuse any list computed for the current catalogue.
    pub maintained: std::sync::atomic::AtomicBool,
}

#[derive(Serialize, Deserialize)]
pub struct State {
    #[serde(skip)]
    pub config: StateConfig,
    pub items: Interner,
    pub item_data: Vec<ItemData>,
    /// Category and brand of every item, densely (see [`ItemFacets`]); kept in step with
    /// `item_data`.
    pub facets: Vec<ItemFacets>,
    pub categories: Interner,
    pub brands: Interner,
    /// Profiles by user key: `u:<userId>` for known users, `a:<anonymousId>` for anonymous ones.
    pub users: Profiles,
    /// Anonymous ids (`a:` keys) already merged into a known user (`u:` key).
    pub links: FxHashMap<Box<str>, Box<str>>,
    pub sessions: SessionModel,
    pub checkpoint: Checkpoint,
    /// Newest event time applied: the engine's notion of "now" for decay, so replays are exact.
    pub clock: i64,
    pub counters: StateCounters,
    #[serde(skip)]
    pub caches: Caches,
    /// Set in a processor replica that shares the log's partitions with others (`kairos
    /// process`); see [`GroupView`].
    #[serde(skip)]
    pub group: Option<GroupView>,
    /// In an API replica (`kairos api`), which applies the model updates processor replicas
    /// publish: per events-topic partition, the offset after the last entry whose updates it
    /// applied (see [`State::apply_model`]).
    #[serde(skip)]
    pub model_applied: Vec<u64>,
}

/// How a state in a processor replica differs (`kairos process`, a Kafka consumer group).
///
/// Each replica applies the events of the partitions the group gives it, and its profiles live
/// in Redis, where another replica picks them up when a partition moves. For that to be exact,
/// every profile has one writer: the replica owning the partition of its key (a `u:` profile's
/// user id, an `a:` profile's anonymous id). So identities are not merged here as they are on a
/// single node, which would have one partition's replica change a profile of another's:
/// - an event carrying a user id and an anonymous id (or an alias) applies to the user's profile
///   and records the link in [`GroupView::new_links`], for Redis (the anonymous key's `l`
///   field), where readers follow and merge;
/// - an event carrying only an anonymous id applies to the anonymous profile, linked or not.
#[derive(Debug, Default)]
pub struct GroupView {
    /// Links made since the last write to Redis: (anonymous or earlier user key, user key).
    pub new_links: Vec<(Box<str>, Box<str>)>,
    /// The group assignment the checkpoint's owned partitions were last reset for.
    pub generation: u64,
    /// Bumped whenever the checkpoint of an owned partition goes back (a reassignment, or a
    /// rebuild after Redis lost the profiles): offsets taken in another epoch are not committed.
    pub epoch: u64,
    /// Per partition, the incarnation of its profiles in Redis (the value of its marker there):
    /// written with every profile, and profiles of an older one are not loaded.
    pub tokens: Vec<u64>,
    /// Profile keys the mirror has taken and is writing: not yet in Redis, though no longer
    /// marked changed.
    pub in_flight: rustc_hash::FxHashSet<Box<str>>,
    /// Whether to record the model updates of what is applied, for the API replicas (see
    /// [`kairos_types::model`]); the mirror publishes them.
    pub publish_model: bool,
    /// Which partitions the replica owns (kept by its partitioning on every reassignment):
    /// catalogue entries are applied by every replica and published by the owner of their
    /// partition only.
    pub owned: Vec<bool>,
    /// The position of the entry being applied.
    pub applying: (u32, u64),
    /// Model updates recorded and not yet taken by the mirror: position, update.
    pub model_ops: Vec<(u32, u64, ModelOp)>,
}

/// Result of applying one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    Applied,
    /// Already covered by the checkpoint (a replay or redelivery).
    Skipped,
}

pub fn user_key(user_id: &str) -> String {
    format!("u:{user_id}")
}

/// Runs `f` on the key `prefix` + `id` built in a reused per-thread buffer (no allocation).
fn with_key<R>(prefix: &str, id: &str, f: impl FnOnce(&str) -> R) -> R {
    thread_local! {
        static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    KEY.with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.clear();
        buf.push_str(prefix);
        buf.push_str(id);
        f(&buf)
    })
}

pub fn anonymous_key(anonymous_id: &str) -> String {
    format!("a:{anonymous_id}")
}

impl State {
    pub fn new(config: StateConfig) -> State {
        State {
            sessions: SessionModel::new(config.session_model.clone()),
            config,
            items: Interner::default(),
            item_data: Vec::new(),
            facets: Vec::new(),
            categories: Interner::default(),
            brands: Interner::default(),
            users: Profiles::default(),
            links: FxHashMap::default(),
            checkpoint: Checkpoint::default(),
            clock: 0,
            counters: StateCounters::default(),
            caches: Caches::default(),
            group: None,
            model_applied: Vec::new(),
        }
    }

    /// Applies one log entry at `pos`, unless the checkpoint already covers it.
    pub fn apply(&mut self, pos: LogPosition, entry: &LogEntry) -> Applied {
        if self.checkpoint.covers(&pos) {
            return Applied::Skipped;
        }
        if let Some(group) = self.group.as_mut().filter(|g| g.publish_model) {
            group.applying = (pos.partition, pos.offset);
            let owned = group.owned.get(pos.partition as usize) == Some(&true);
            if owned && matches!(entry, LogEntry::ItemUpsert(_) | LogEntry::ItemDelete { .. }) {
                self.publish(ModelOp::Catalog(entry.encode()));
            }
        }
        self.apply_entry(entry, true);
        self.checkpoint.advance(&pos);
        Applied::Applied
    }

    /// Whether what is applied is recorded as model updates (see [`GroupView::publish_model`]).
    fn publishing(&self) -> bool {
        self.group.as_ref().is_some_and(|g| g.publish_model)
    }

    fn publish(&mut self, op: ModelOp) {
        if let Some(group) = &mut self.group {
            let (partition, offset) = group.applying;
            group.model_ops.push((partition, offset, op));
        }
    }

    /// Takes this node's settings over those a snapshot was written with.
    pub fn adopt_config(&mut self, config: &StateConfig) {
        *self.sessions.config_mut() = config.session_model.clone();
        self.config = config.clone();
    }

    /// Events-topic entries whose model updates this state applied (an API replica's), summed
    /// over the partitions.
    pub fn model_entries(&self) -> u64 {
        self.model_applied.iter().sum()
    }

    /// Applies model updates a processor replica published (an API replica's state, which holds
    /// the model and no profile). Entries at or below the last one applied of their partition
    /// are skipped: a replica that took a partition over publishes them again.
    pub fn apply_model(&mut self, batch: &ModelBatch) {
        let p = batch.partition as usize;
        if self.model_applied.len() <= p {
            self.model_applied.resize(p + 1, 0);
        }
        for (offset, ops) in &batch.entries {
            if *offset < self.model_applied[p] {
                continue;
            }
            for op in ops {
                self.apply_model_op(op);
            }
            self.model_applied[p] = offset + 1;
        }
        self.clock = self.clock.max(batch.clock);
    }

    fn apply_model_op(&mut self, op: &ModelOp) {
        match op {
            ModelOp::Learn {
                item,
                category,
                brand,
                price,
                action,
                ts,
                previous,
                session_key,
            } => {
                let item = self.intern_item(item);
                self.learn_facts(item, category.as_deref(), brand.as_deref(), *price);
                let previous: Vec<u32> = previous.iter().map(|n| self.intern_item(n)).collect();
                self.counters.events_applied += 1;
                self.learn(item, Action::from(*action), *ts, &previous, *session_key);
            }
            ModelOp::Bought { item, others, ts } => {
                let item = self.intern_item(item);
                let others: Vec<u32> = others.iter().map(|n| self.intern_item(n)).collect();
                self.relate_bought(item, &others, *ts);
            }
            ModelOp::Catalog(record) => match LogEntry::decode(record) {
                Ok(entry @ (LogEntry::ItemUpsert(_) | LogEntry::ItemDelete { .. })) => {
                    self.apply_entry(&entry, true)
                }
                Ok(_) => tracing::warn!("a model update's catalogue change holds another entry"),
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable catalogue change in a model update")
                }
            },
        }
    }

    /// Applies an entry without a log position. With `learn == false` only the profile changes:
    /// global structures (item statistics, relations, the session model) are left alone, which is
    /// how the evaluation feeds test sessions without learning from them.
    pub fn apply_entry(&mut self, entry: &LogEntry, learn: bool) {
        self.counters.entries_applied += 1;
        match entry {
            LogEntry::Event(e) => self.apply_event(e, learn),
            LogEntry::ItemUpsert(item) => self.upsert_item(item),
            LogEntry::ItemDelete { id, .. } => {
                if let Some(i) = self.items.get(id) {
                    let data = &mut self.item_data[i as usize];
                    data.catalog = None;
                    data.deleted = true;
                    self.counters.catalog_deletes += 1;
                }
            }
            LogEntry::Model(batch) => self.apply_model(batch),
        }
    }

    /// The profile key an event's activity belongs to (after identity resolution).
    pub fn resolve_key(&self, user_id: Option<&str>, anonymous_id: Option<&str>) -> Option<String> {
        if let Some(u) = user_id {
            return Some(user_key(u));
        }
        let a = anonymous_key(anonymous_id?);
        if self.group.is_some() {
            return Some(a);
        }
        Some(match self.links.get(a.as_str()) {
            Some(u) => u.to_string(),
            None => a,
        })
    }

    pub fn profile(&self, user_id: Option<&str>, anonymous_id: Option<&str>) -> Option<&Profile> {
        let key = self.resolve_key(user_id, anonymous_id)?;
        self.users.get(key.as_str())
    }

    pub fn item_index(&self, id: &str) -> Option<u32> {
        self.items.get(id)
    }

    pub fn item(&self, idx: u32) -> &ItemData {
        &self.item_data[idx as usize]
    }

    /// The category and brand of item `idx`, from the dense array (see [`ItemFacets`]).
    pub fn facets(&self, idx: u32) -> ItemFacets {
        self.facets[idx as usize]
    }

    pub(crate) fn intern_item(&mut self, id: &str) -> u32 {
        let idx = self.items.intern(id);
        if idx as usize >= self.item_data.len() {
            self.item_data
                .resize_with(idx as usize + 1, ItemData::default);
            self.facets.resize(idx as usize + 1, ItemFacets::default());
        }
        idx
    }

    fn upsert_item(&mut self, item: &Item) {
        let idx = self.intern_item(&item.id);
        let categories: Vec<u32> = item
            .categories
            .iter()
            .map(|c| self.categories.intern(c))
            .collect();
        let brand = item.brand.as_deref().map(|b| self.brands.intern(b));
        let data = &mut self.item_data[idx as usize];
        if !categories.is_empty() {
            data.categories = categories;
        }
        if brand.is_some() {
            data.brand = brand;
        }
        if let Some(p) = item.price {
            data.price = Some(p as f32);
        }
        data.catalog = Some(Box::new(item.clone()));
        data.deleted = false;
        self.facets[idx as usize] = ItemFacets::of(data);
        self.counters.catalog_upserts += 1;
    }

    /// Merges the anonymous profile `anon` (an `a:` key) into `user` (a `u:` key), once.
    fn link(&mut self, anon: String, user: &str) {
        if anon == user || self.links.contains_key(anon.as_str()) {
            return;
        }
        if let Some(group) = &mut self.group {
            group.new_links.push((anon.as_str().into(), user.into()));
            self.links.insert(anon.into(), user.into());
            return;
        }
        self.links.insert(anon.clone().into(), user.into());
        // The key now resolves elsewhere, whether or not it had a profile.
        self.users.mark_changed(&anon);
        if let Some(other) = self.users.remove(anon.as_str()) {
            let cfg = &self.config;
            let target = self.users.get_or_insert(user);
            target.merge_from(&other, cfg);
            self.counters.merges += 1;
        }
    }

    fn apply_event(&mut self, e: &Event, learn: bool) {
        self.counters.events_applied += 1;
        self.clock = self.clock.max(e.timestamp);
        let kind = e.kind();

        // The profile key. With a user id it is the user's whatever the links say, so resolving
        // it before the links below change gives the same key as after.
        let Some(key) = self.resolve_key(e.user_id.as_deref(), e.anonymous_id.as_deref()) else {
            return;
        };
        // Identity: any event that carries both ids, and every identify/alias, stitches them.
        if e.user_id.is_some() {
            let ukey = key.as_str();
            if let Some(anon) = e.anonymous_id.as_deref() {
                // Every event of a known user carries both ids: check the link without allocating.
                if !with_key("a:", anon, |a| self.links.contains_key(a)) {
                    self.link(anonymous_key(anon), ukey);
                }
            }
            if let Some(prev) = e.previous_id.as_deref() {
                self.link(anonymous_key(prev), ukey);
                let prev_user = user_key(prev);
                if prev_user != ukey && self.users.contains_key(prev_user.as_str()) {
                    self.link(prev_user, ukey);
                }
            }
        }
        if matches!(kind, EventKind::Identify | EventKind::Alias) {
            let p = self.users.get_or_insert(&key);
            if p.first_seen == 0 {
                p.first_seen = e.timestamp;
            }
            p.last_seen = p.last_seen.max(e.timestamp);
            return;
        }

        let session_timeout_ms = self.config.session_timeout_secs * 1000;
        let profile = self.users.get_or_insert(&key);
        if profile.first_seen == 0 {
            profile.first_seen = e.timestamp;
        }
        // Sessions: the tracker's id wins; otherwise a gap longer than the timeout starts one.
        let new_session = match e.session_id.as_deref() {
            Some(sid) => profile.session_id.as_deref() != Some(sid),
            None => {
                profile.counters.events == 0
                    || profile.session_id.is_some()
                    || e.timestamp - profile.last_seen > session_timeout_ms
            }
        };
        if new_session {
            profile.session_no = profile.session_no.wrapping_add(1);
            profile.session_start = e.timestamp;
            profile.session_id = e.session_id.as_deref().map(Into::into);
            let start = e.timestamp.to_le_bytes();
            profile.session_key = match e.session_id.as_deref() {
                Some(sid) => stable_hash64(&[key.as_bytes(), sid.as_bytes()]),
                None => stable_hash64(&[key.as_bytes(), &start]),
            };
            profile.counters.sessions += 1;
        }
        profile.last_seen = profile.last_seen.max(e.timestamp);
        profile.counters.events += 1;

        match kind {
            EventKind::PageView => profile.counters.page_views += 1,
            EventKind::Search => profile.counters.searches += 1,
            EventKind::RecImpression => profile.counters.rec_impressions += 1,
            EventKind::ProductView | EventKind::Click | EventKind::RecClick => {
                match kind {
                    EventKind::ProductView => profile.counters.product_views += 1,
                    EventKind::RecClick => profile.counters.rec_clicks += 1,
                    _ => profile.counters.clicks += 1,
                }
                if let Some(p) = e.product() {
                    let action = if kind == EventKind::ProductView {
                        Action::View
                    } else {
                        Action::Click
                    };
                    self.interact(&key, &p, action, e.timestamp, learn);
                }
            }
            EventKind::AddToCart => {
                profile.counters.add_to_carts += 1;
                if let Some(p) = e.product() {
                    let item = self.interact(&key, &p, Action::Cart, e.timestamp, learn);
                    let cfg = &self.config;
                    let profile = self.users.get_mut(key.as_str()).expect("profile exists");
                    let others: Vec<u32> = profile
                        .cart
                        .iter()
                        .map(|l| l.0)
                        .filter(|&o| o != item)
                        .collect();
                    profile.cart_add(item, p.quantity as f32, cfg);
                    if learn {
                        self.relate_bought(item, &others, e.timestamp);
                    }
                }
            }
            EventKind::RemoveFromCart => {
                if let Some(p) = e.product() {
                    if let Some(item) = self.items.get(&p.id) {
                        let qty = e.num_property("quantity").map(|q| q as f32);
                        profile.cart_remove(item, qty);
                    }
                }
            }
            EventKind::Purchase => {
                profile.counters.purchases += 1;
                profile.counters.revenue += e.revenue().unwrap_or(0.0);
                let products = e.products();
                let mut bought = Vec::with_capacity(products.len());
                for p in &products {
                    let item = self.interact(&key, p, Action::Purchase, e.timestamp, learn);
                    let cfg = &self.config;
                    let profile = self.users.get_mut(key.as_str()).expect("profile exists");
                    profile.purchase(item, cfg);
                    bought.push(item);
                }
                if learn {
                    for (i, &a) in bought.iter().enumerate() {
                        let others: Vec<u32> = bought
                            .iter()
                            .enumerate()
                            .filter(|&(j, _)| j != i)
                            .map(|(_, &b)| b)
                            .collect();
                        self.relate_bought(a, &others, e.timestamp);
                    }
                }
            }
            EventKind::Identify | EventKind::Alias | EventKind::Custom => {}
        }
    }

    /// Relates `item` and each of `others` as bought (or carted) together.
    fn relate_bought(&mut self, item: u32, others: &[u32], ts: i64) {
        if self.publishing() {
            self.publish(ModelOp::Bought {
                item: self.items.name(item).to_owned(),
                others: others
                    .iter()
                    .map(|&o| self.items.name(o).to_owned())
                    .collect(),
                ts,
            });
        }
        let weight = 1.0;
        let (h, cap) = (
            self.config.relation_half_life_ms(),
            self.config.max_bought_together,
        );
        for &o in others {
            self.item_data[item as usize]
                .bought_together
                .add(o, weight, ts, h, cap);
            self.item_data[o as usize]
                .bought_together
                .add(item, weight, ts, h, cap);
        }
    }

    /// Records an interaction of profile `key` with product `p`; returns the item index.
    fn interact(
        &mut self,
        key: &str,
        p: &kairos_types::ProductRef,
        action: Action,
        ts: i64,
        learn: bool,
    ) -> u32 {
        let item = self.intern_item(&p.id);
        self.learn_facts(item, p.category.as_deref(), p.brand.as_deref(), p.price);
        let cfg = &self.config;
        let w = cfg.weights.of(action);
        let data = &self.item_data[item as usize];
        let profile = self.users.get_mut(key).expect("profile exists");
        let session = profile.session_no;
        let session_key = profile.session_key;
        // Previous distinct items of this session, most recent first, for co-visitation.
        let mut previous: Vec<u32> = Vec::with_capacity(cfg.covisit_window);
        for i in profile.session_items().rev() {
            if previous.len() >= cfg.covisit_window {
                break;
            }
            if i.item != item && !previous.contains(&i.item) {
                previous.push(i.item);
            }
        }
        let ah = cfg.affinity_half_life_ms();
        for &c in &data.categories {
            profile.categories.add(c, w, ts, ah, cfg.max_affinities);
        }
        if let Some(b) = data.brand {
            profile.brands.add(b, w, ts, ah, cfg.max_affinities);
        }
        profile.remember(
            Interaction {
                item,
                action,
                session,
                ts,
            },
            cfg,
        );
        if !learn {
            return item;
        }
        if self.publishing() {
            self.publish(ModelOp::Learn {
                item: p.id.clone(),
                category: p.category.clone(),
                brand: p.brand.clone(),
                price: p.price,
                action: action.into(),
                ts,
                previous: previous
                    .iter()
                    .map(|&i| self.items.name(i).to_owned())
                    .collect(),
                session_key,
            });
        }
        self.learn(item, action, ts, &previous, session_key);
        item
    }

    /// Behaviour teaches an item's category, brand and price until the catalogue says otherwise.
    fn learn_facts(
        &mut self,
        item: u32,
        category: Option<&str>,
        brand: Option<&str>,
        price: Option<f64>,
    ) {
        let category = category.map(|c| self.categories.intern(c));
        let brand = brand.map(|b| self.brands.intern(b));
        let data = &mut self.item_data[item as usize];
        if data.catalog.is_some() {
            return;
        }
        if let Some(c) = category {
            if !data.categories.contains(&c) {
                data.categories = vec![c];
            }
        }
        if brand.is_some() {
            data.brand = brand;
        }
        if let Some(price) = price {
            data.price = Some(price as f32);
        }
        self.facets[item as usize] = ItemFacets::of(data);
    }

    /// What an interaction teaches the model: the item's statistics, its co-visitation with the
    /// session's `previous` items (most recent first), and the session model.
    fn learn(&mut self, item: u32, action: Action, ts: i64, previous: &[u32], session_key: u64) {
        let cfg = &self.config;
        let w = cfg.weights.of(action);
        let counted = match action {
            Action::View | Action::Click => Counted::View,
            Action::Cart => Counted::Cart,
            Action::Purchase => Counted::Purchase,
        };
        let (rh, cap) = (cfg.relation_half_life_ms(), cfg.max_covisit);
        self.item_data[item as usize]
            .stats
            .record(counted, w, ts, cfg);
        for (d, &prev) in previous.iter().enumerate() {
            let weight = w / (d + 1) as f32;
            self.item_data[prev as usize]
                .covisit
                .add(item, weight, ts, rh, cap);
            self.item_data[item as usize]
                .covisit
                .add(prev, weight * 0.5, ts, rh, cap);
        }
        self.sessions.observe(session_key, item, ts, w);
    }

    /// Changes whenever the catalogue changes (an upsert or a delete), so cached lists that are
    /// otherwise refreshed on event time never hide a catalogue change on a quiet server.
    pub fn catalog_version(&self) -> u64 {
        self.counters.catalog_upserts + self.counters.catalog_deletes
    }

    /// Approximate heap bytes of the profiles and of the items (catalogue, stats, relations).
    pub fn memory(&self) -> StateMemory {
        let profiles = self.users.heap_bytes();
        let items: usize = self
            .item_data
            .iter()
            .map(|d| std::mem::size_of::<ItemData>() + d.heap_bytes())
            .sum::<usize>()
            + self.facets.capacity() * std::mem::size_of::<ItemFacets>()
            + self.items.heap_bytes();
        StateMemory {
            users: self.users.len(),
            items: self.item_data.len(),
            profile_bytes: profiles,
            item_bytes: items,
            session_model_bytes: self.sessions.heap_bytes(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StateMemory {
    pub users: usize,
    pub items: usize,
    pub profile_bytes: usize,
    pub item_bytes: usize,
    pub session_model_bytes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_types::CallType;
    use proptest::prelude::*;
    use serde_json::{json, Map};

    fn event(
        call: CallType,
        name: &str,
        user: Option<&str>,
        anon: Option<&str>,
        item: &str,
        ts: i64,
    ) -> LogEntry {
        let mut properties = Map::new();
        properties.insert("product_id".into(), json!(item));
        LogEntry::Event(Event {
            call,
            event: name.into(),
            message_id: format!("m{ts}"),
            user_id: user.map(Into::into),
            anonymous_id: anon.map(Into::into),
            previous_id: None,
            session_id: None,
            timestamp: ts,
            received_at: ts,
            properties,
            traits: Default::default(),
            context: Default::default(),
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Views by an anonymous id and by the user, with identify calls (possibly repeated) at
        /// random points: the merged profile counts every view exactly once.
        #[test]
        fn identify_merges_exactly_once(ops in proptest::collection::vec(0u8..4, 1..60)) {
            let mut s = State::new(StateConfig::default());
            let mut views = 0u64;
            for (n, op) in ops.iter().enumerate() {
                let ts = 1_000 + n as i64 * 1000;
                let entry = match op {
                    0 => { views += 1; event(CallType::Track, "product_view", None, Some("anon"), "i1", ts) }
                    1 => { views += 1; event(CallType::Track, "product_view", Some("u"), None, "i2", ts) }
                    2 => { views += 1; event(CallType::Track, "product_view", Some("u"), Some("anon"), "i3", ts) }
                    _ => event(CallType::Identify, "identify", Some("u"), Some("anon"), "", ts),
                };
                let pos = LogPosition { partition: 0, offset: n as u64, seq: n as u64 + 1 };
                prop_assert_eq!(s.apply(pos, &entry), Applied::Applied);
                // Applying the same position again is a no-op (replay / redelivery).
                prop_assert_eq!(s.apply(pos, &entry), Applied::Skipped);
            }
            let total: u64 = s.users.values().map(|p| p.counters.product_views).sum();
            prop_assert_eq!(total, views);
            let linked = ops.iter().any(|&o| o >= 2);
            if linked {
                prop_assert!(!s.users.contains_key("a:anon"));
                prop_assert_eq!(s.users.get("u:u").map(|p| p.counters.product_views), Some(views));
                prop_assert!(s.counters.merges <= 1);
            }
        }
    }

    /// The model parts of a state (what an API replica holds), in a comparable form.
    fn model_of(s: &State) -> Vec<Vec<u8>> {
        vec![
            postcard::to_allocvec(&s.items).unwrap(),
            postcard::to_allocvec(&s.item_data).unwrap(),
            postcard::to_allocvec(&s.facets).unwrap(),
            postcard::to_allocvec(&s.categories).unwrap(),
            postcard::to_allocvec(&s.brands).unwrap(),
            postcard::to_allocvec(&s.sessions).unwrap(),
            postcard::to_allocvec(&s.clock).unwrap(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// A processor replica owning every partition records model updates as it applies; a
        /// state fed only those updates (an API replica) holds the same model, also when every
        /// batch arrives twice and when a takeover publishes a stretch again.
        #[test]
        fn published_model_updates_rebuild_the_same_model(
            ops in proptest::collection::vec((0u8..7, 0u8..4, 0u8..6, 0u32..2), 1..80),
            replay_from in 0usize..80,
        ) {
            let mut group = State::new(StateConfig::default());
            group.group = Some(GroupView {
                publish_model: true,
                owned: vec![true, true],
                ..GroupView::default()
            });
            let mut offsets = [0u64; 2];
            let mut recorded = Vec::new();
            for (n, &(kind, user, item, partition)) in ops.iter().enumerate() {
                let ts = 1_000_000 + n as i64 * 60_000;
                let (u, i) = (format!("u{user}"), format!("i{item}"));
                let entry = match kind {
                    0 | 1 => event(CallType::Track, "product_view", Some(&u), None, &i, ts),
                    2 => event(CallType::Track, "add_to_cart", Some(&u), None, &i, ts),
                    3 => event(CallType::Track, "purchase", Some(&u), None, &i, ts),
                    4 => event(CallType::Track, "click", None, Some(&u), &i, ts),
                    5 => LogEntry::ItemUpsert(Item::from_json(&json!({
                        "id": i, "categories": [format!("c{user}")], "brand": "b", "price": 3.0
                    })).unwrap()),
                    _ => LogEntry::ItemDelete { id: i, timestamp: ts },
                };
                let p = partition as usize;
                let pos = LogPosition { partition, offset: offsets[p], seq: n as u64 + 1 };
                offsets[p] += 1;
                group.apply(pos, &entry);
                recorded.push(crate::store::take_model(&mut group));
            }
            let batches: Vec<ModelBatch> = recorded.iter().flatten().cloned().collect();
            let mut api = State::new(StateConfig::default());
            for batch in &batches {
                api.apply_model(batch);
                api.apply_model(batch);
            }
            // A takeover: everything from some point on is published again.
            for batch in recorded.iter().skip(replay_from).flatten() {
                api.apply_model(batch);
            }
            prop_assert_eq!(model_of(&api), model_of(&group));
        }
    }

    #[test]
    fn learn_false_changes_only_the_profile() {
        let mut s = State::new(StateConfig::default());
        s.apply_entry(
            &event(CallType::Track, "product_view", None, Some("a"), "x", 10),
            false,
        );
        s.apply_entry(
            &event(CallType::Track, "product_view", None, Some("a"), "y", 20),
            false,
        );
        assert_eq!(s.users["a:a"].recent.len(), 2);
        let x = s.item_index("x").unwrap();
        assert_eq!(s.item(x).stats.total_events, 0);
        assert!(s.item(x).covisit.is_empty());
        assert_eq!(s.sessions.num_sessions(), 0);
    }

    #[test]
    fn sessions_split_on_inactivity_and_covisitation_is_learned() {
        let mut s = State::new(StateConfig::default());
        let gap = 31 * 60 * 1000;
        for (n, (item, ts)) in [("a", 0), ("b", 1000), ("c", 1000 + gap)]
            .into_iter()
            .enumerate()
        {
            let pos = LogPosition {
                partition: 0,
                offset: n as u64,
                seq: n as u64 + 1,
            };
            s.apply(
                pos,
                &event(
                    CallType::Track,
                    "product_view",
                    Some("u"),
                    None,
                    item,
                    1_000_000 + ts,
                ),
            );
        }
        let p = &s.users["u:u"];
        assert_eq!(p.counters.sessions, 2);
        let session: Vec<&str> = p.session_items().map(|i| s.items.name(i.item)).collect();
        assert_eq!(session, ["c"]);
        let (a, b, c) = (
            s.item_index("a").unwrap(),
            s.item_index("b").unwrap(),
            s.item_index("c").unwrap(),
        );
        assert!(s.item(a).covisit.get(b, s.clock, 1 << 40) > 0.0);
        assert_eq!(
            s.item(b).covisit.get(c, s.clock, 1 << 40),
            0.0,
            "no relation across sessions"
        );
    }
}
