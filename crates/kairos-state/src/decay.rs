//! Exponentially decayed scores that do not depend on the order of updates.
//!
//! A decayed score is `Σ wᵢ · 2^(-(t_ref - tᵢ)/h)`. We store it already decayed to a reference time
//! `t_ref` (the newest event time seen), so adding an older event decays only that event, and adding
//! a newer one first decays the stored value forward. Mathematically the result is the same for any
//! order of the same events, which matters because events of different log partitions may be
//! applied in different orders by different replicas (up to floating-point rounding).

use serde::{Deserialize, Serialize};

/// `2^(-dt/half_life)`, with `dt` clamped at 0 (an event from the future counts fully).
///
/// Below `half_life · 2^-25` the exact factor is within half an ulp of 1 and rounds to exactly
/// `1.0_f32`, so the exponential is skipped there: a busy item's lists are rebased on almost every
/// event, milliseconds apart, and this keeps those rebases free without changing any result.
#[inline]
pub fn decay_factor(dt_ms: i64, half_life_ms: i64) -> f32 {
    if dt_ms <= 0 || half_life_ms <= 0 || (dt_ms as i128) << 25 < half_life_ms as i128 {
        return 1.0;
    }
    (-(dt_ms as f64) / half_life_ms as f64).exp2() as f32
}

/// A bounded list of `(key, score)` pairs with a shared reference time, keeping the highest
/// scores. Used for item-to-item relations and profile affinities.
///
/// Bound: at most `cap` entries (8 bytes each); when full, a new key replaces the lowest entry only
/// if its score is higher, so memory never grows past `cap`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TopList {
    pub ref_ts: i64,
    pub entries: Vec<(u32, f32)>,
}

impl TopList {
    /// Adds `weight` at time `ts` to `key`.
    pub fn add(&mut self, key: u32, weight: f32, ts: i64, half_life_ms: i64, cap: usize) {
        if cap == 0 {
            return;
        }
        let w = if ts >= self.ref_ts {
            self.rebase(ts, half_life_ms);
            weight
        } else {
            weight * decay_factor(self.ref_ts - ts, half_life_ms)
        };
        if let Some(e) = self.entries.iter_mut().find(|e| e.0 == key) {
            e.1 += w;
            return;
        }
        if self.entries.len() < cap {
            self.entries.push((key, w));
            return;
        }
        if let Some((min_pos, min)) = self
            .entries
            .iter()
            .enumerate()
            .min_by(|a, b| a.1 .1.total_cmp(&b.1 .1).then(b.1 .0.cmp(&a.1 .0)))
            .map(|(i, e)| (i, e.1))
        {
            if w > min {
                self.entries[min_pos] = (key, w);
            }
        }
    }

    /// Decays every entry forward to `ts` (no-op when `ts` is not newer).
    pub fn rebase(&mut self, ts: i64, half_life_ms: i64) {
        if ts <= self.ref_ts {
            return;
        }
        if self.ref_ts != 0 {
            let f = decay_factor(ts - self.ref_ts, half_life_ms);
            if f < 1.0 {
                for e in &mut self.entries {
                    e.1 *= f;
                }
            }
        }
        self.ref_ts = ts;
    }

    /// Score of `key` decayed to `now`.
    pub fn get(&self, key: u32, now: i64, half_life_ms: i64) -> f32 {
        self.entries
            .iter()
            .find(|e| e.0 == key)
            .map(|e| e.1 * decay_factor(now - self.ref_ts, half_life_ms))
            .unwrap_or(0.0)
    }

    /// Entries with scores decayed to `now`.
    pub fn decayed(&self, now: i64, half_life_ms: i64) -> impl Iterator<Item = (u32, f32)> + '_ {
        let f = decay_factor(now - self.ref_ts, half_life_ms);
        self.entries.iter().map(move |&(k, s)| (k, s * f))
    }

    /// Merges `other` into `self` (both decayed to the later reference time), keeping the bound.
    pub fn merge(&mut self, other: &TopList, half_life_ms: i64, cap: usize) {
        for &(k, s) in &other.entries {
            self.add(k, s, other.ref_ts, half_life_ms, cap);
        }
    }

    pub fn remove(&mut self, key: u32) {
        self.entries.retain(|e| e.0 != key);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<(u32, f32)>()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tiny_intervals_decay_by_exactly_one() {
        let h = 30 * 24 * 3_600_000i64;
        for dt in [
            1,
            10,
            77,
            (h >> 25) - 1,
            h >> 25,
            (h >> 25) + 1,
            h >> 24,
            h / 7,
            h,
        ] {
            let exact = (-(dt as f64) / h as f64).exp2() as f32;
            assert_eq!(super::decay_factor(dt, h), exact, "dt {dt}");
        }
    }

    use super::*;

    const H: i64 = 1000;

    #[test]
    fn decays_by_half_life() {
        assert_eq!(decay_factor(0, H), 1.0);
        assert!((decay_factor(H, H) - 0.5).abs() < 1e-6);
        assert!((decay_factor(2 * H, H) - 0.25).abs() < 1e-6);
        assert_eq!(decay_factor(-5, H), 1.0);
    }

    #[test]
    fn order_of_updates_does_not_matter() {
        let events = [
            (1u32, 1.0f32, 100i64),
            (2, 2.0, 1500),
            (1, 3.0, 900),
            (3, 1.0, 2500),
        ];
        let mut a = TopList::default();
        for &(k, w, t) in &events {
            a.add(k, w, t, H, 10);
        }
        let mut b = TopList::default();
        for &(k, w, t) in events.iter().rev() {
            b.add(k, w, t, H, 10);
        }
        for k in 1..=3 {
            let (x, y) = (a.get(k, 3000, H), b.get(k, 3000, H));
            assert!((x - y).abs() < 1e-5, "{k}: {x} vs {y}");
        }
        // key 1: 1·2^-2.9 + 3·2^-2.1
        let expect = (-2.9f64).exp2() + 3.0 * (-2.1f64).exp2();
        assert!((a.get(1, 3000, H) as f64 - expect).abs() < 1e-5);
    }

    #[test]
    fn bounded_keeps_highest() {
        let mut l = TopList::default();
        for k in 0..10u32 {
            l.add(k, k as f32, 0, H, 4);
        }
        assert_eq!(l.len(), 4);
        let mut keys: Vec<_> = l.entries.iter().map(|e| e.0).collect();
        keys.sort();
        assert_eq!(keys, [6, 7, 8, 9]);
        l.add(1, 0.5, 0, H, 4);
        assert!(l.entries.iter().all(|e| e.0 != 1));
    }
}
