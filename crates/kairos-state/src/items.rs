//! Per-item state: catalogue fields, decayed statistics, trending buckets and bounded relations.
//!
//! Bound per item (defaults): `max_covisit` (40) + `max_bought_together` (20) relations at 8 bytes,
//! `trending_window_hours` (24) hourly counters at 4 bytes, a few decayed counters, and the catalogue
//! entry as upserted. About 1 KiB without the catalogue strings.

use serde::{Deserialize, Serialize};

use crate::config::StateConfig;
use crate::decay::{decay_factor, TopList};
use kairos_types::Item;

const HOUR_MS: i64 = 3_600_000;

/// Decayed counters plus an hourly ring of counts for trending.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ItemStats {
    pub ref_ts: i64,
    pub views: f32,
    pub carts: f32,
    pub purchases: f32,
    /// Weighted sum of all interactions (the popularity score), decayed to `ref_ts`.
    pub popularity: f32,
    /// Hour number (epoch hours) of the newest bucket.
    pub hour: i64,
    /// `buckets[hour % len]` counts weighted interactions in that hour.
    pub buckets: Vec<f32>,
    pub total_events: u64,
}

impl ItemStats {
    pub fn record(&mut self, kind: Counted, weight: f32, ts: i64, cfg: &StateConfig) {
        let h = cfg.popularity_half_life_ms();
        let w = if ts >= self.ref_ts {
            if self.ref_ts != 0 {
                let f = decay_factor(ts - self.ref_ts, h);
                self.views *= f;
                self.carts *= f;
                self.purchases *= f;
                self.popularity *= f;
            }
            self.ref_ts = ts;
            1.0
        } else {
            decay_factor(self.ref_ts - ts, h)
        };
        match kind {
            Counted::View => self.views += w,
            Counted::Cart => self.carts += w,
            Counted::Purchase => self.purchases += w,
        }
        self.popularity += w * weight;
        self.total_events += 1;
        self.bucket_add(ts, weight, cfg.trending_window_hours);
    }

    fn bucket_add(&mut self, ts: i64, weight: f32, window: usize) {
        if window == 0 {
            return;
        }
        if self.buckets.len() != window {
            self.buckets = vec![0.0; window];
        }
        let hour = ts.div_euclid(HOUR_MS);
        if hour > self.hour {
            let gap = (hour - self.hour).min(window as i64);
            for step in 1..=gap {
                let slot = (self.hour + step).rem_euclid(window as i64) as usize;
                self.buckets[slot] = 0.0;
            }
            self.hour = hour;
        } else if self.hour - hour >= window as i64 {
            return; // older than the window
        }
        let slot = hour.rem_euclid(window as i64) as usize;
        self.buckets[slot] += weight;
    }

    /// Trending score at `now`: hourly counts inside the window, each decayed by its age.
    pub fn trending(&self, now: i64, cfg: &StateConfig) -> f32 {
        self.trending_with(now, &[], cfg)
    }

    /// [`trending`](Self::trending) with the decay factors by age in hours precomputed
    /// ([`trending_factors`]): the same value, without an exponential per bucket when scoring a
    /// whole catalogue at one instant.
    pub fn trending_with(&self, now: i64, factors: &[f32], cfg: &StateConfig) -> f32 {
        let window = self.buckets.len() as i64;
        if window == 0 {
            return 0.0;
        }
        let now_hour = now.div_euclid(HOUR_MS);
        let mut score = 0.0;
        for age in 0..window {
            let hour = self.hour - age;
            let age_now = now_hour - hour;
            if age_now >= window || age_now < 0 {
                continue;
            }
            let v = self.buckets[hour.rem_euclid(window) as usize];
            if v > 0.0 {
                let factor = factors.get(age_now as usize).copied().unwrap_or_else(|| {
                    decay_factor(age_now * HOUR_MS, cfg.trending_half_life_ms())
                });
                score += v * factor;
            }
        }
        score
    }

    /// Popularity decayed to `now`.
    pub fn popularity_at(&self, now: i64, cfg: &StateConfig) -> f32 {
        self.popularity * decay_factor(now - self.ref_ts, cfg.popularity_half_life_ms())
    }
}

/// The trending decay factor of a bucket by its age in hours, for [`ItemStats::trending_with`].
pub fn trending_factors(cfg: &StateConfig) -> Vec<f32> {
    (0..cfg.trending_window_hours as i64)
        .map(|age| decay_factor(age * HOUR_MS, cfg.trending_half_life_ms()))
        .collect()
}

/// Which decayed counter an interaction feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    View,
    Cart,
    Purchase,
}

/// The attributes scoring reads of every candidate item (its category and brand), packed in one
/// dense array for the whole catalogue (`State::facets`). A recommendation weighs a thousand
/// candidates or more; reading each one's category through its [`ItemData`] (a few hundred bytes
/// among millions) and that item's category vector cost two cache misses per candidate, which at
/// a hundred thousand items was the largest part of serving `for_you`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemFacets {
    category: u32,
    brand: u32,
    several_categories: bool,
}

const NO_FACET: u32 = u32::MAX;

impl Default for ItemFacets {
    fn default() -> Self {
        ItemFacets {
            category: NO_FACET,
            brand: NO_FACET,
            several_categories: false,
        }
    }
}

impl ItemFacets {
    pub fn of(data: &ItemData) -> ItemFacets {
        ItemFacets {
            category: data.categories.first().copied().unwrap_or(NO_FACET),
            brand: data.brand.unwrap_or(NO_FACET),
            several_categories: data.categories.len() > 1,
        }
    }

    /// The item's category (`Some(None)`: it has none), or `None` when it has several: then
    /// they are in [`ItemData::categories`].
    pub fn category(&self) -> Option<Option<u32>> {
        (!self.several_categories).then_some((self.category != NO_FACET).then_some(self.category))
    }

    pub fn brand(&self) -> Option<u32> {
        (self.brand != NO_FACET).then_some(self.brand)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ItemData {
    /// Catalogue entry, when the item was upserted.
    #[serde(with = "catalog_as_json")]
    pub catalog: Option<Box<Item>>,
    /// Removed from the catalogue with `DELETE /v1/items/{id}`: never recommended again (until
    /// upserted again).
    pub deleted: bool,
    /// Category indices (from the catalogue, else from event properties).
    pub categories: Vec<u32>,
    pub brand: Option<u32>,
    /// Price from the catalogue, else the last price seen in an event.
    pub price: Option<f32>,
    pub stats: ItemStats,
    /// Items viewed near this one in sessions (co-visitation).
    pub covisit: TopList,
    /// Items carted or bought together with this one.
    pub bought_together: TopList,
}

impl ItemData {
    pub fn in_stock(&self) -> bool {
        self.catalog.as_ref().is_none_or(|c| c.in_stock)
    }

    /// May this item appear in recommendations at all?
    pub fn recommendable(&self) -> bool {
        !self.deleted
    }

    pub fn heap_bytes(&self) -> usize {
        let catalog = self.catalog.as_ref().map_or(0, |c| {
            std::mem::size_of::<Item>()
                + c.title.as_ref().map_or(0, String::len)
                + c.url.as_ref().map_or(0, String::len)
                + c.image.as_ref().map_or(0, String::len)
                + c.categories.iter().map(|s| s.len() + 24).sum::<usize>()
                + c.tags.iter().map(|s| s.len() + 24).sum::<usize>()
                + c.brand.as_ref().map_or(0, String::len)
                + c.attributes.len() * 64
        });
        catalog
            + self.categories.capacity() * 4
            + self.stats.buckets.capacity() * 4
            + self.covisit.heap_bytes()
            + self.bought_together.heap_bytes()
    }
}

/// Catalogue entries hold free-form JSON attributes and optional fields, which a compact binary
/// snapshot format cannot describe; they are stored as JSON text inside the snapshot.
mod catalog_as_json {
    use kairos_types::Item;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(item: &Option<Box<Item>>, s: S) -> Result<S::Ok, S::Error> {
        item.as_ref()
            .map(|i| serde_json::to_string(i).expect("items serialize"))
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<Item>>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| {
            serde_json::from_str(&t)
                .map(Box::new)
                .map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trending_counts_only_the_window() {
        let cfg = StateConfig {
            trending_window_hours: 3,
            trending_half_life_hours: 1.0,
            ..Default::default()
        };
        let mut s = ItemStats::default();
        s.record(Counted::View, 1.0, 0, &cfg);
        s.record(Counted::View, 1.0, HOUR_MS, &cfg);
        s.record(Counted::View, 1.0, HOUR_MS + 5, &cfg);
        // At hour 1: hour-1 bucket (2, age 0) + hour-0 bucket (1, age 1 -> 0.5).
        assert!((s.trending(HOUR_MS, &cfg) - 2.5).abs() < 1e-5);
        // At hour 3 the hour-0 bucket has left the 3-hour window.
        assert!((s.trending(3 * HOUR_MS, &cfg) - 2.0 * 0.25).abs() < 1e-5);
        // A jump far ahead clears the ring.
        s.record(Counted::View, 1.0, 10 * HOUR_MS, &cfg);
        assert!((s.trending(10 * HOUR_MS, &cfg) - 1.0).abs() < 1e-5);
        assert_eq!(s.total_events, 4);
        // Precomputed factors give exactly the same scores.
        let factors = trending_factors(&cfg);
        for now in [10 * HOUR_MS, 11 * HOUR_MS + 7, 12 * HOUR_MS, 40 * HOUR_MS] {
            assert_eq!(s.trending_with(now, &factors, &cfg), s.trending(now, &cfg));
        }
    }

    #[test]
    fn popularity_decays() {
        let cfg = StateConfig {
            popularity_half_life_hours: 1.0,
            ..Default::default()
        };
        let mut s = ItemStats::default();
        s.record(Counted::Purchase, 5.0, HOUR_MS, &cfg);
        assert!((s.popularity_at(2 * HOUR_MS, &cfg) - 2.5).abs() < 1e-4);
        assert!((s.purchases - 1.0).abs() < 1e-6);
    }
}
