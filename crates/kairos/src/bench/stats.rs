//! Latency samples and their percentiles.
//!
//! Runs are short (seconds to a minute) and rates modest (thousands to a few hundred thousand
//! requests per second), so every sample is kept and percentiles are exact (nearest rank) rather
//! than approximated by a histogram.

use std::time::Duration;

/// Latency samples in microseconds.
#[derive(Clone, Debug, Default)]
pub struct Latencies {
    samples: Vec<u32>,
    sorted: bool,
}

impl Latencies {
    pub fn record(&mut self, d: Duration) {
        self.samples
            .push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
        self.sorted = false;
    }

    pub fn merge(&mut self, other: Latencies) {
        self.samples.extend(other.samples);
        self.sorted = false;
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// The `p`-th percentile (0..=100) in microseconds, nearest rank; 0 without samples.
    pub fn percentile(&mut self, p: f64) -> u64 {
        if self.samples.is_empty() {
            return 0;
        }
        if !self.sorted {
            self.samples.sort_unstable();
            self.sorted = true;
        }
        let n = self.samples.len();
        // The epsilon keeps binary rounding (0.999 · 1000 = 999.0000000000001) off the next rank.
        let rank = ((p / 100.0) * n as f64 - 1e-9).ceil() as usize;
        self.samples[rank.clamp(1, n) - 1] as u64
    }

    /// p50, p99 and p99.9 in microseconds.
    pub fn summary(&mut self) -> Percentiles {
        Percentiles {
            p50_us: self.percentile(50.0),
            p99_us: self.percentile(99.0),
            p999_us: self.percentile(99.9),
            max_us: self.percentile(100.0),
            count: self.len() as u64,
        }
    }
}

/// Latency percentiles of one measurement, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Percentiles {
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub count: u64,
}

/// Formats microseconds for a human: `850 µs`, `1.25 ms`, `3.2 s`.
pub fn human_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.2} ms", us as f64 / 1e3)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

/// Formats a rate with thousands separators: `212,345`.
pub fn human_rate(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut l = Latencies::default();
        for us in 1..=1000u64 {
            l.record(Duration::from_micros(us));
        }
        assert_eq!(l.percentile(50.0), 500);
        assert_eq!(l.percentile(99.0), 990);
        assert_eq!(l.percentile(99.9), 999);
        assert_eq!(l.percentile(100.0), 1000);
        assert_eq!(l.percentile(0.0), 1);
        let s = l.summary();
        assert_eq!(
            (s.p50_us, s.p99_us, s.p999_us, s.count),
            (500, 990, 999, 1000)
        );
        assert_eq!(Latencies::default().percentile(99.0), 0);
    }

    #[test]
    fn formatting() {
        assert_eq!(human_us(850), "850 µs");
        assert_eq!(human_us(1250), "1.25 ms");
        assert_eq!(human_rate(212_345.4), "212,345");
        assert_eq!(human_rate(999.0), "999");
    }
}
