//! Tunables of the state: bounds (which make memory predictable) and decay half-lives.

use serde::{Deserialize, Serialize};

use crate::session_model::SessionModelConfig;

/// Weight of each interaction type in affinities and relations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventWeights {
    pub view: f32,
    pub click: f32,
    pub cart: f32,
    pub purchase: f32,
}

impl EventWeights {
    /// The weight of an interaction of kind `action`.
    pub fn of(&self, action: crate::profile::Action) -> f32 {
        use crate::profile::Action;
        match action {
            Action::View => self.view,
            Action::Click => self.click,
            Action::Cart => self.cart,
            Action::Purchase => self.purchase,
        }
    }
}

impl Default for EventWeights {
    fn default() -> Self {
        EventWeights {
            view: 1.0,
            click: 1.0,
            cart: 3.0,
            purchase: 5.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// A session ends after this much inactivity when the tracker sends no session id.
    pub session_timeout_secs: i64,
    /// Items kept in a profile's recent-interaction list (also bounds the current session).
    pub max_recent_items: usize,
    pub max_cart_items: usize,
    pub max_purchases: usize,
    /// Categories and brands kept per profile (the strongest survive).
    pub max_affinities: usize,
    pub affinity_half_life_hours: f64,
    /// Half-life of the decayed view/cart/purchase counts (popularity).
    pub popularity_half_life_hours: f64,
    /// Half-life applied to hourly buckets when ranking trending items.
    pub trending_half_life_hours: f64,
    /// Hourly buckets kept per item for trending (the window).
    pub trending_window_hours: usize,
    /// How long (in event time) a computed trending/popular list is reused after the state changed;
    /// 0 recomputes on every change.
    pub trending_refresh_ms: u64,
    /// Co-visitation neighbours kept per item.
    pub max_covisit: usize,
    /// Bought-together neighbours kept per item.
    pub max_bought_together: usize,
    pub relation_half_life_hours: f64,
    /// How many previous session items an interaction is related to (weight 1/distance).
    pub covisit_window: usize,
    pub weights: EventWeights,
    pub session_model: SessionModelConfig,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            session_timeout_secs: 30 * 60,
            max_recent_items: 32,
            max_cart_items: 20,
            max_purchases: 20,
            max_affinities: 12,
            affinity_half_life_hours: 14.0 * 24.0,
            popularity_half_life_hours: 7.0 * 24.0,
            trending_half_life_hours: 6.0,
            trending_window_hours: 24,
            trending_refresh_ms: 1000,
            max_covisit: 40,
            max_bought_together: 20,
            relation_half_life_hours: 30.0 * 24.0,
            covisit_window: 5,
            weights: EventWeights::default(),
            session_model: SessionModelConfig::default(),
        }
    }
}

pub(crate) fn hours_ms(h: f64) -> i64 {
    (h * 3_600_000.0) as i64
}

impl StateConfig {
    pub fn affinity_half_life_ms(&self) -> i64 {
        hours_ms(self.affinity_half_life_hours)
    }
    pub fn popularity_half_life_ms(&self) -> i64 {
        hours_ms(self.popularity_half_life_hours)
    }
    pub fn trending_half_life_ms(&self) -> i64 {
        hours_ms(self.trending_half_life_hours)
    }
    pub fn relation_half_life_ms(&self) -> i64 {
        hours_ms(self.relation_half_life_hours)
    }
}

/// `[redis]` settings: the profiles kept in Redis when `state = "redis://…"`
/// (see `redis_mirror`, built with the `redis` feature).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// Prefix of every key and channel, so several deployments can share one Redis.
    pub prefix: String,
    /// Profiles not written for this long expire (0: never).
    pub profile_ttl_secs: u64,
    /// How often changed profiles are written.
    pub flush_interval_ms: u64,
    /// Profiles per pipelined round trip.
    pub batch: usize,
    /// Connect and response timeout.
    pub timeout_ms: u64,
    /// Profiles a processor replica (`kairos process`) keeps in memory at most: beyond, the
    /// least recently active ones already written to Redis are dropped, and loaded again from
    /// Redis when their next event comes.
    pub process_max_profiles: usize,
    /// With TLS to one server (`rediss://`): a PEM file of the CA that signed its certificate;
    /// empty, the system's trusted CAs (which are all a `rediss-cluster://` client can use).
    pub tls_ca_file: String,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            prefix: "kairos".into(),
            profile_ttl_secs: 30 * 86_400,
            flush_interval_ms: 10,
            batch: 500,
            timeout_ms: 2_000,
            process_max_profiles: 1_000_000,
            tls_ca_file: String::new(),
        }
    }
}
