//! A small, lock-free Prometheus metrics registry.
//!
//! Kairos needs a handful of counters, gauges and latency histograms on hot paths (every event,
//! every request). Atomics make recording a few nanoseconds; rendering the text exposition format
//! happens only when `/metrics` is scraped. A full metrics framework would add many dependencies for
//! no gain here.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Latency buckets in microseconds: 10 µs to 10 s.
pub const LATENCY_BUCKETS_US: &[u64] = &[
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 10_000_000,
];

/// A histogram of microsecond values, exported in seconds.
#[derive(Debug)]
pub struct Histogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: LATENCY_BUCKETS_US
                .iter()
                .map(|_| AtomicU64::new(0))
                .collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe_us(&self, us: u64) {
        let i = LATENCY_BUCKETS_US.partition_point(|&b| b < us);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn observe(&self, d: std::time::Duration) {
        self.observe_us(d.as_micros() as u64);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

enum Metric {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
    /// A value computed at scrape time.
    Computed(Box<dyn Fn() -> f64 + Send + Sync>),
}

struct Entry {
    name: String,
    help: String,
    labels: Vec<(String, String)>,
    metric: Metric,
}

/// Holds every metric of a process and renders the Prometheus text format.
#[derive(Default)]
pub struct Registry {
    entries: Mutex<Vec<Entry>>,
}

impl Registry {
    fn register(&self, name: &str, help: &str, labels: &[(&str, &str)], metric: Metric) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Entry {
                name: name.to_owned(),
                help: help.to_owned(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                metric,
            });
    }

    pub fn counter(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Arc<Counter> {
        let c = Arc::new(Counter::default());
        self.register(name, help, labels, Metric::Counter(c.clone()));
        c
    }

    pub fn gauge(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Arc<Gauge> {
        let g = Arc::new(Gauge::default());
        self.register(name, help, labels, Metric::Gauge(g.clone()));
        g
    }

    pub fn histogram(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Arc<Histogram> {
        let h = Arc::new(Histogram::default());
        self.register(name, help, labels, Metric::Histogram(h.clone()));
        h
    }

    /// A gauge whose value is computed when scraped.
    pub fn computed(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        f: impl Fn() -> f64 + Send + Sync + 'static,
    ) {
        self.register(name, help, labels, Metric::Computed(Box::new(f)));
    }

    /// Renders the text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::with_capacity(8192);
        let mut last_name = "";
        for e in entries.iter() {
            if e.name != last_name {
                let kind = match e.metric {
                    Metric::Counter(_) => "counter",
                    Metric::Gauge(_) | Metric::Computed(_) => "gauge",
                    Metric::Histogram(_) => "histogram",
                };
                let _ = writeln!(out, "# HELP {} {}", e.name, e.help);
                let _ = writeln!(out, "# TYPE {} {}", e.name, kind);
                last_name = &e.name;
            }
            let labels = |extra: Option<(&str, String)>| {
                let mut parts: Vec<String> = e
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", v.replace('"', "\\\"")))
                    .collect();
                if let Some((k, v)) = extra {
                    parts.push(format!("{k}=\"{v}\""));
                }
                if parts.is_empty() {
                    String::new()
                } else {
                    format!("{{{}}}", parts.join(","))
                }
            };
            match &e.metric {
                Metric::Counter(c) => {
                    let _ = writeln!(out, "{}{} {}", e.name, labels(None), c.get());
                }
                Metric::Gauge(g) => {
                    let _ = writeln!(out, "{}{} {}", e.name, labels(None), g.get());
                }
                Metric::Computed(f) => {
                    let _ = writeln!(out, "{}{} {}", e.name, labels(None), f());
                }
                Metric::Histogram(h) => {
                    let mut cumulative = 0;
                    for (i, bound) in LATENCY_BUCKETS_US.iter().enumerate() {
                        cumulative += h.buckets[i].load(Ordering::Relaxed);
                        let le = format!("{}", *bound as f64 / 1e6);
                        let _ = writeln!(
                            out,
                            "{}_bucket{} {}",
                            e.name,
                            labels(Some(("le", le))),
                            cumulative
                        );
                    }
                    let count = h.count();
                    let _ = writeln!(
                        out,
                        "{}_bucket{} {}",
                        e.name,
                        labels(Some(("le", "+Inf".into()))),
                        count
                    );
                    let sum = h.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
                    let _ = writeln!(out, "{}_sum{} {}", e.name, labels(None), sum);
                    let _ = writeln!(out, "{}_count{} {}", e.name, labels(None), count);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_exposition_format() {
        let r = Registry::default();
        let c = r.counter("kairos_events_total", "Events.", &[("result", "accepted")]);
        c.add(3);
        let h = r.histogram("kairos_latency_seconds", "Latency.", &[]);
        h.observe_us(30);
        h.observe_us(20_000_000);
        r.computed("kairos_answer", "Answer.", &[], || 42.0);
        let text = r.render();
        assert!(text.contains("# TYPE kairos_events_total counter"));
        assert!(text.contains("kairos_events_total{result=\"accepted\"} 3"));
        assert!(text.contains("kairos_latency_seconds_bucket{le=\"0.00005\"} 1"));
        assert!(text.contains("kairos_latency_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("kairos_latency_seconds_count 2"));
        assert!(text.contains("kairos_answer 42"));
    }
}
