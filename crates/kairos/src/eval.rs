//! `kairos eval`: offline measurement of recommendation quality through the code `kairos serve` runs.
//!
//! A number is only worth reporting if it describes the engine users get. So the harness has no
//! model of its own: every interaction becomes the tracker [`Event`](kairos_types::Event) the demo
//! loader would send ([`event_from_row`]), goes through [`State::apply_entry`] (the update the
//! processor applies to every log record), and every list comes from
//! [`kairos_recommend::recommend`] with the `for_you` scenario, the server's default filters and
//! its trending/popular fallback, exactly as `GET /v1/recommendations` computes it. Hyper-parameters
//! come from the same configuration (`--config`, `KAIROS_*`), so a setting that wins here is the
//! setting the server runs with.
//!
//! # Protocols
//!
//! **`sessions`** (the SR-GNN protocol of the session-based recommendation literature, see
//! `shared/data/README.md`): each training session, in file order, is an anonymous visitor whose
//! clicks are `product_view` events learned with `learn = true`. The split has no timestamps, so a
//! synthetic clock stands in: training session `i` starts at [`SYNTHETIC_EPOCH_MS`] `+ i` minutes
//! and its clicks are one second apart (DIGINETICA's 187k training sessions span about five months,
//! roughly one a minute, so time-based settings keep a realistic meaning). Every test prefix then
//! opens a fresh anonymous visitor whose clicks start one minute after the last training session
//! started (all prefixes at the same time, as if right after training) and are fed with
//! `learn = false` (only the profile changes: item statistics, relations and the
//! session model learn nothing from test data), the top `k` over the whole catalogue is requested,
//! and the label is scored. The default `for_you` filters never drop prefix items (viewed items are
//! not excluded; nothing is in the cart or bought), so items repeated in the prefix stay rankable.
//! The temporary profile is then removed from `State::users`, so memory stays that of the trained
//! engine however many prefixes are scored, and no prefix can see another's profile.
//!
//! **`replay`** (prequential, for event streams): events are replayed in timestamp order (file
//! order among equal times). Before an event of a user (its `user_id`, else its `session_id`) that
//! already has history, the top `k` for that user is requested and the event's item is scored;
//! then the event is learned (`learn = true`), as the live server would. Events before
//! `--score-from`, or all of `--events` when `--test-events` is given, only warm the engine.
//! `--items` loads the catalogue (categories) first, as `PUT /v1/items` would. The server's default
//! filters apply, including the exclusion of purchased and carted items from `for_you`: that is what
//! a user of the API sees, and a repeat purchase the server would hide is a miss here too. The
//! report counts such cases (`label_filtered`) so the cost of the choice is visible.
//!
//! # Metrics
//!
//! One label per case, binary relevance: HR@k (label in the top k), MRR@k (1/rank, 0 when absent)
//! and NDCG@k (`1 / log2(rank + 1)`, which is the whole DCG since the ideal DCG of a single label
//! is 1). Coverage is the share of the catalogue (recommendable items the engine knows at the end)
//! that appeared in at least one list. Learning throughput counts only the time spent in
//! `apply_entry(.., true)`; latency percentiles only the `recommend` calls (nearest-rank).
//!
//! # Determinism
//!
//! Everything that decides a list is a function of the events in order: interning is first-seen,
//! the recommender breaks ties by item index, hash maps use a fixed hasher, the cached
//! trending/popular lists refresh on event time, and sums are taken in case order. Quality figures
//! are therefore identical on every run; only the timings vary.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use kairos_recommend::{recommend, RecommendConfig, Request, Scenario};
use kairos_state::{State, StateConfig};
use kairos_types::{Event, Item, LogEntry};

use crate::datasets::{read_events, read_items, read_prefixes, read_sessions, EventRow, ItemRow};
use crate::demo::event_from_row;

/// Start of the synthetic clock of the sessions protocol (2020-09-13), clear of the zero that
/// the state uses for "never".
pub const SYNTHETIC_EPOCH_MS: i64 = 1_600_000_000_000;
/// Time between the starts of consecutive sessions on the synthetic clock.
pub const SESSION_SPACING_MS: i64 = 60_000;
/// Time between consecutive clicks of a session on the synthetic clock.
pub const CLICK_SPACING_MS: i64 = 1_000;

/// Settings every protocol shares.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Length of the requested lists (the k of HR@k).
    pub k: usize,
    /// Write every scored case to this CSV file.
    pub dump: Option<PathBuf>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// Inputs of the replay protocol.
#[derive(Clone, Debug)]
pub struct ReplayInput {
    pub events: PathBuf,
    pub items: Option<PathBuf>,
    /// Events to score after all of `events` warmed the engine.
    pub test_events: Option<PathBuf>,
    /// Score only events at or after this time (epoch ms); earlier ones only warm.
    pub score_from: Option<i64>,
}

/// 1-based rank of `label` in `top`, if present.
pub fn rank_of(top: &[u32], label: u32) -> Option<usize> {
    top.iter().position(|&i| i == label).map(|p| p + 1)
}

/// Reciprocal rank of a label at `rank` (1-based), 0 when absent.
pub fn reciprocal_rank(rank: Option<usize>) -> f64 {
    rank.map_or(0.0, |r| 1.0 / r as f64)
}

/// NDCG of a single relevant label at `rank` (1-based), 0 when absent: `1 / log2(rank + 1)`.
pub fn ndcg(rank: Option<usize>) -> f64 {
    rank.map_or(0.0, |r| 1.0 / (r as f64 + 1.0).log2())
}

/// The value at quantile `q` (0..=1) of ascending `sorted`, by the nearest-rank method; 0 when empty.
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Running totals of the scored cases.
#[derive(Clone, Debug)]
pub struct Metrics {
    k: usize,
    n: u64,
    hits: u64,
    reciprocal_ranks: f64,
    gains: f64,
    recommended: Vec<bool>,
    latencies_ns: Vec<u64>,
}

impl Metrics {
    pub fn new(k: usize) -> Metrics {
        Metrics {
            k,
            n: 0,
            hits: 0,
            reciprocal_ranks: 0.0,
            gains: 0.0,
            recommended: Vec::new(),
            latencies_ns: Vec::new(),
        }
    }

    /// Records one case: the returned list, the label (`None` when the engine has never seen the
    /// item, which is a miss) and how long `recommend` took. Returns the label's 1-based rank, 0
    /// when it is not in the top k.
    pub fn record(&mut self, top: &[u32], label: Option<u32>, latency: Duration) -> usize {
        for &item in top {
            let i = item as usize;
            if i >= self.recommended.len() {
                self.recommended.resize(i + 1, false);
            }
            self.recommended[i] = true;
        }
        let rank = label.and_then(|l| rank_of(top, l)).filter(|&r| r <= self.k);
        self.n += 1;
        self.hits += u64::from(rank.is_some());
        self.reciprocal_ranks += reciprocal_rank(rank);
        self.gains += ndcg(rank);
        self.latencies_ns.push(latency.as_nanos() as u64);
        rank.unwrap_or(0)
    }

    pub fn n(&self) -> u64 {
        self.n
    }

    pub fn hit_rate(&self) -> f64 {
        self.mean(self.hits as f64)
    }

    pub fn mrr(&self) -> f64 {
        self.mean(self.reciprocal_ranks)
    }

    pub fn ndcg(&self) -> f64 {
        self.mean(self.gains)
    }

    /// Distinct items that appeared in at least one list.
    pub fn recommended_items(&self) -> usize {
        self.recommended.iter().filter(|&&r| r).count()
    }

    /// `recommend` latency at quantile `q`, in microseconds.
    pub fn latency_us(&self, q: f64) -> f64 {
        let mut sorted = self.latencies_ns.clone();
        sorted.sort_unstable();
        percentile(&sorted, q) as f64 / 1000.0
    }

    fn mean(&self, total: f64) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            total / self.n as f64
        }
    }
}

/// The outcome of an evaluation: the JSON object of `--json` and the rows of the table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub protocol: &'static str,
    pub k: usize,
    /// Scored cases.
    pub n: u64,
    pub hr_at_k: f64,
    pub mrr_at_k: f64,
    pub ndcg_at_k: f64,
    /// Share of the catalogue recommended at least once.
    pub coverage: f64,
    pub catalogue_items: usize,
    pub recommended_items: usize,
    /// Events learned with `learn = true`.
    pub learned_events: u64,
    /// Learning throughput: learned events per second of `apply_entry`.
    pub events_per_sec: f64,
    pub recommend_p50_us: f64,
    pub recommend_p99_us: f64,
    pub elapsed_secs: f64,
    /// Replay: events that only warmed the engine (before `--score-from`, or all of `--events`
    /// with `--test-events`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm_events: Option<u64>,
    /// Replay: events in the scored range not scored because their user had no history yet (or
    /// the event has neither a user nor a session id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cold_events: Option<u64>,
    /// Replay: scored cases whose label the server's default filters hide (already bought or in
    /// the cart), which therefore count as misses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_filtered: Option<u64>,
}

impl Report {
    fn new(
        protocol: &'static str,
        k: usize,
        metrics: &Metrics,
        state: &State,
        learning: &Learning,
    ) -> Report {
        let catalogue_items = state.item_data.iter().filter(|d| d.recommendable()).count();
        let recommended_items = metrics.recommended_items();
        Report {
            protocol,
            k,
            n: metrics.n(),
            hr_at_k: metrics.hit_rate(),
            mrr_at_k: metrics.mrr(),
            ndcg_at_k: metrics.ndcg(),
            coverage: if catalogue_items == 0 {
                0.0
            } else {
                recommended_items as f64 / catalogue_items as f64
            },
            catalogue_items,
            recommended_items,
            learned_events: learning.events,
            events_per_sec: learning.events_per_sec(),
            recommend_p50_us: metrics.latency_us(0.50),
            recommend_p99_us: metrics.latency_us(0.99),
            elapsed_secs: 0.0,
            warm_events: None,
            cold_events: None,
            label_filtered: None,
        }
    }

    /// A human-readable summary.
    pub fn table(&self) -> String {
        let k = self.k;
        let mut rows = vec![
            ("cases scored".to_owned(), self.n.to_string()),
            (format!("HR@{k}"), format!("{:.4}", self.hr_at_k)),
            (format!("MRR@{k}"), format!("{:.4}", self.mrr_at_k)),
            (format!("NDCG@{k}"), format!("{:.4}", self.ndcg_at_k)),
            (
                "coverage".to_owned(),
                format!(
                    "{:.4} ({} of {} items)",
                    self.coverage, self.recommended_items, self.catalogue_items
                ),
            ),
            (
                "learning".to_owned(),
                format!(
                    "{} events, {:.0} events/s",
                    self.learned_events, self.events_per_sec
                ),
            ),
            (
                "recommend latency".to_owned(),
                format!(
                    "p50 {:.1} µs, p99 {:.1} µs",
                    self.recommend_p50_us, self.recommend_p99_us
                ),
            ),
        ];
        let optional = [
            ("warm-up events", self.warm_events),
            ("cold events (no history)", self.cold_events),
            ("labels hidden by filters", self.label_filtered),
        ];
        for (name, value) in optional {
            if let Some(v) = value {
                rows.push((name.to_owned(), v.to_string()));
            }
        }
        rows.push(("elapsed".to_owned(), format!("{:.1} s", self.elapsed_secs)));
        let width = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
        let mut out = format!("kairos eval {} (for_you, k = {k})\n", self.protocol);
        for (name, value) in rows {
            out.push_str(&format!("  {name:<width$}  {value}\n"));
        }
        out
    }

    /// The report as one line of JSON.
    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("a report always serializes")
    }
}

/// Time spent learning.
#[derive(Default)]
struct Learning {
    events: u64,
    busy: Duration,
}

impl Learning {
    fn apply(&mut self, state: &mut State, entry: &LogEntry) {
        let started = Instant::now();
        state.apply_entry(entry, true);
        self.busy += started.elapsed();
        self.events += 1;
    }

    fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.busy.as_secs_f64().max(1e-9)
    }
}

/// A progress bar on stderr, redrawn at most ten times a second.
struct Progress {
    label: &'static str,
    total: u64,
    done: u64,
    enabled: bool,
    drawn: Option<Instant>,
}

impl Progress {
    fn new(label: &'static str, total: usize, enabled: bool) -> Progress {
        Progress {
            label,
            total: total as u64,
            done: 0,
            enabled,
            drawn: None,
        }
    }

    fn advance(&mut self) {
        self.done += 1;
        if !self.enabled
            || self
                .drawn
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.drawn = Some(Instant::now());
        const WIDTH: u64 = 30;
        let total = self.total.max(1);
        let filled = (self.done.min(total) * WIDTH / total) as usize;
        let bar = format!(
            "{}{}",
            "#".repeat(filled),
            " ".repeat(WIDTH as usize - filled)
        );
        eprint!(
            "\r{} [{bar}] {:5.1}% {}/{}",
            self.label,
            self.done as f64 * 100.0 / total as f64,
            self.done,
            self.total
        );
    }

    fn finish(&mut self) {
        if self.enabled && self.drawn.is_some() {
            eprint!("\r\x1b[2K");
        }
    }
}

/// `--dump`: one CSV row per scored case.
struct Dump {
    out: BufWriter<File>,
    path: PathBuf,
}

/// One scored case, as dumped.
struct Case<'a> {
    case: &'a str,
    session_id: &'a str,
    user_id: &'a str,
    position: usize,
    label: &'a str,
    rank: usize,
    top: &'a [u32],
}

/// Quotes a CSV field when it needs it.
fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s.into()
    }
}

impl Dump {
    fn create(path: Option<&Path>) -> Result<Option<Dump>, String> {
        let Some(path) = path else {
            return Ok(None);
        };
        let file = File::create(path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        let mut dump = Dump {
            out: BufWriter::new(file),
            path: path.to_path_buf(),
        };
        dump.line("case,session_id,user_id,position,label,rank,top_k\n")?;
        Ok(Some(dump))
    }

    fn line(&mut self, s: &str) -> Result<(), String> {
        self.out
            .write_all(s.as_bytes())
            .map_err(|e| format!("writing {}: {e}", self.path.display()))
    }

    fn write(&mut self, state: &State, c: &Case) -> Result<(), String> {
        let top: Vec<&str> = c.top.iter().map(|&i| state.items.name(i)).collect();
        let row = format!(
            "{},{},{},{},{},{},{}\n",
            csv_field(c.case),
            csv_field(c.session_id),
            csv_field(c.user_id),
            c.position,
            csv_field(c.label),
            c.rank,
            csv_field(&top.join(" "))
        );
        self.line(&row)
    }

    fn finish(mut self) -> Result<(), String> {
        self.out
            .flush()
            .map_err(|e| format!("writing {}: {e}", self.path.display()))
    }
}

fn check_k(k: usize, recommend: &RecommendConfig) -> Result<(), String> {
    if k == 0 || k > recommend.max_k {
        return Err(format!(
            "--k must be between 1 and recommend.max_k ({}), not {k}",
            recommend.max_k
        ));
    }
    Ok(())
}

/// Asks for a user's `for_you` list as the API would; returns the item indices and how long the
/// call took.
fn for_you(
    state: &State,
    user_id: Option<&str>,
    anonymous_id: Option<&str>,
    k: usize,
    cfg: &RecommendConfig,
) -> (Vec<u32>, Duration) {
    let mut req = Request::new(Scenario::ForYou, k);
    req.user_id = user_id.map(str::to_owned);
    req.anonymous_id = anonymous_id.map(str::to_owned);
    let started = Instant::now();
    let rec = recommend(state, &req, cfg);
    let took = started.elapsed();
    (rec.items.iter().map(|s| s.item).collect(), took)
}

/// A click of the sessions protocol: a `product_view` of `item` by the anonymous visitor of
/// `session`.
fn click(seq: usize, session: &str, item: &str, ts: i64) -> Event {
    let row = EventRow {
        timestamp_ms: ts,
        user_id: None,
        session_id: Some(session.to_owned()),
        event: "product_view".to_owned(),
        item_id: item.to_owned(),
    };
    event_from_row(seq, &row, ts, None)
}

/// Runs the sessions protocol (see the module documentation).
pub fn run_sessions(
    model: &StateConfig,
    recommend: &RecommendConfig,
    train: &Path,
    test: &Path,
    opts: &EvalOptions,
) -> Result<Report, String> {
    check_k(opts.k, recommend)?;
    let started = Instant::now();
    let sessions = read_sessions(train)?;
    let prefixes = read_prefixes(test)?;
    let mut dump = Dump::create(opts.dump.as_deref())?;
    let mut state = State::new(model.clone());
    let mut learning = Learning::default();
    let mut seq = 0usize;

    let mut progress = Progress::new("learning", sessions.len(), opts.progress);
    for (i, session) in sessions.iter().enumerate() {
        let start = SYNTHETIC_EPOCH_MS + i as i64 * SESSION_SPACING_MS;
        let id = format!("train-{}", session.session_idx);
        for (j, item) in session.items.iter().enumerate() {
            let event = click(seq, &id, item, start + j as i64 * CLICK_SPACING_MS);
            seq += 1;
            learning.apply(&mut state, &LogEntry::Event(event));
        }
        progress.advance();
    }
    progress.finish();

    let test_start = SYNTHETIC_EPOCH_MS + sessions.len() as i64 * SESSION_SPACING_MS;
    let mut metrics = Metrics::new(opts.k);
    let mut progress = Progress::new("scoring", prefixes.len(), opts.progress);
    for prefix in &prefixes {
        let id = format!("test-{}", prefix.idx);
        // The visitor's identity as the events carry it (none for an empty prefix, which gets
        // the cold-start list).
        let (mut user_id, mut anonymous_id) = (None, None);
        for (j, item) in prefix.prefix.iter().enumerate() {
            let event = click(seq, &id, item, test_start + j as i64 * CLICK_SPACING_MS);
            seq += 1;
            (user_id, anonymous_id) = (event.user_id.clone(), event.anonymous_id.clone());
            state.apply_entry(&LogEntry::Event(event), false);
        }
        let (user_id, anonymous_id) = (user_id.as_deref(), anonymous_id.as_deref());
        let (top, took) = for_you(&state, user_id, anonymous_id, opts.k, recommend);
        let label = state.item_index(&prefix.label);
        let rank = metrics.record(&top, label, took);
        if let Some(d) = dump.as_mut() {
            let case = Case {
                case: &prefix.idx,
                session_id: &id,
                user_id: "",
                position: prefix.prefix.len(),
                label: &prefix.label,
                rank,
                top: &top,
            };
            d.write(&state, &case)?;
        }
        // The visitor is gone: keep memory bounded and prefixes independent.
        if let Some(key) = state.resolve_key(user_id, anonymous_id) {
            state.users.remove(key.as_str());
        }
        progress.advance();
    }
    progress.finish();
    if let Some(d) = dump {
        d.finish()?;
    }
    let mut report = Report::new("sessions", opts.k, &metrics, &state, &learning);
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// A catalogue entry for an `items.csv` row: id, title and categories.
fn catalogue_item(row: &ItemRow) -> Item {
    Item {
        id: row.item_id.clone(),
        title: row.title.clone(),
        url: None,
        image: None,
        categories: row.categories.clone(),
        brand: None,
        price: None,
        currency: None,
        in_stock: true,
        tags: Vec::new(),
        attributes: serde_json::Map::new(),
    }
}

fn read_sorted_events(path: &Path) -> Result<Vec<EventRow>, String> {
    let mut events = read_events(path)?;
    // Stable: events with the same time keep their file order.
    events.sort_by_key(|e| e.timestamp_ms);
    Ok(events)
}

/// Runs the prequential replay protocol (see the module documentation).
pub fn run_replay(
    model: &StateConfig,
    recommend: &RecommendConfig,
    input: &ReplayInput,
    opts: &EvalOptions,
) -> Result<Report, String> {
    check_k(opts.k, recommend)?;
    if input.test_events.is_some() && input.score_from.is_some() {
        return Err("give either --test-events or --score-from, not both".into());
    }
    let started = Instant::now();
    let mut events = read_sorted_events(&input.events)?;
    let warm = match (&input.test_events, input.score_from) {
        (Some(test), _) => {
            let n = events.len();
            events.extend(read_sorted_events(test)?);
            n
        }
        (None, Some(from)) => events.partition_point(|e| e.timestamp_ms < from),
        (None, None) => 0,
    };
    let mut dump = Dump::create(opts.dump.as_deref())?;
    let mut state = State::new(model.clone());
    let mut learning = Learning::default();
    if let Some(items) = &input.items {
        for row in read_items(items)? {
            state.apply_entry(&LogEntry::ItemUpsert(catalogue_item(&row)), true);
        }
    }

    let mut metrics = Metrics::new(opts.k);
    let mut history: HashMap<&str, usize> = HashMap::new();
    let (mut cold, mut filtered) = (0u64, 0u64);
    let mut progress = Progress::new("replaying", events.len(), opts.progress);
    for (i, row) in events.iter().enumerate() {
        let event = event_from_row(i, row, row.timestamp_ms, None);
        let key = row.user_id.as_deref().or(row.session_id.as_deref());
        let position = key.map_or(0, |k| history.get(k).copied().unwrap_or(0));
        if i >= warm {
            if position == 0 {
                cold += 1;
            } else {
                let label = state.item_index(&row.item_id);
                if label.is_some_and(|l| hidden_by_filters(&state, &event, l)) {
                    filtered += 1;
                }
                let (user_id, anonymous_id) =
                    (event.user_id.as_deref(), event.anonymous_id.as_deref());
                let (top, took) = for_you(&state, user_id, anonymous_id, opts.k, recommend);
                let rank = metrics.record(&top, label, took);
                if let Some(d) = dump.as_mut() {
                    let case = (metrics.n() - 1).to_string();
                    let case = Case {
                        case: &case,
                        session_id: row.session_id.as_deref().unwrap_or(""),
                        user_id: row.user_id.as_deref().unwrap_or(""),
                        position,
                        label: &row.item_id,
                        rank,
                        top: &top,
                    };
                    d.write(&state, &case)?;
                }
            }
        }
        learning.apply(&mut state, &LogEntry::Event(event));
        if let Some(k) = key {
            *history.entry(k).or_insert(0) += 1;
        }
        progress.advance();
    }
    progress.finish();
    if let Some(d) = dump {
        d.finish()?;
    }
    let mut report = Report::new("replay", opts.k, &metrics, &state, &learning);
    report.warm_events = Some(warm as u64);
    report.cold_events = Some(cold);
    report.label_filtered = Some(filtered);
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Would `for_you`'s default filters hide `item` from the event's user (bought or in the cart)?
fn hidden_by_filters(state: &State, event: &Event, item: u32) -> bool {
    state
        .profile(event.user_id.as_deref(), event.anonymous_id.as_deref())
        .is_some_and(|p| p.purchased.contains(&item) || p.cart.iter().any(|l| l.0 == item))
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn ranks_and_per_case_metrics() {
        assert_eq!(rank_of(&[7, 3, 9], 7), Some(1));
        assert_eq!(rank_of(&[7, 3, 9], 9), Some(3));
        assert_eq!(rank_of(&[7, 3, 9], 4), None);
        assert_eq!(reciprocal_rank(Some(4)), 0.25);
        assert_eq!(reciprocal_rank(None), 0.0);
        assert_eq!(ndcg(Some(1)), 1.0);
        // 1 / log2(4) = 0.5; 1 / log2(8) = 1/3.
        assert_eq!(ndcg(Some(3)), 0.5);
        assert!((ndcg(Some(7)) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(ndcg(None), 0.0);
    }

    #[test]
    fn metrics_average_over_cases() {
        let mut m = Metrics::new(3);
        // Label first, third, absent, and never seen by the engine.
        assert_eq!(m.record(&[1, 2, 3], Some(1), US), 1);
        assert_eq!(m.record(&[4, 5, 6], Some(6), US), 3);
        assert_eq!(m.record(&[1, 2, 3], Some(9), US), 0);
        assert_eq!(m.record(&[2, 1], None, US), 0);
        assert_eq!(m.n(), 4);
        assert_eq!(m.hit_rate(), 0.5);
        // (1 + 1/3 + 0 + 0) / 4 = 1/3.
        assert!((m.mrr() - 1.0 / 3.0).abs() < 1e-12);
        // (1 + 0.5) / 4.
        assert_eq!(m.ndcg(), 0.375);
        assert_eq!(m.recommended_items(), 6);
    }

    #[test]
    fn ranks_beyond_k_are_misses() {
        let mut m = Metrics::new(2);
        assert_eq!(m.record(&[1, 2, 3], Some(3), US), 0);
        assert_eq!(m.hit_rate(), 0.0);
        assert_eq!(Metrics::new(5).hit_rate(), 0.0);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&[5, 9], 0.5), 5);
        assert_eq!(percentile(&[5, 9], 0.99), 9);
        assert_eq!(percentile(&[], 0.5), 0);
        let mut m = Metrics::new(1);
        for us in [30, 10, 20] {
            m.record(&[], None, Duration::from_micros(us));
        }
        assert_eq!(m.latency_us(0.5), 20.0);
        assert_eq!(m.latency_us(0.99), 30.0);
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("a b"), "a b");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
    }

    #[test]
    fn report_json_and_table() {
        let mut m = Metrics::new(2);
        m.record(&[1, 2], Some(2), US);
        let state = State::new(StateConfig::default());
        let learning = Learning::default();
        let r = Report::new("sessions", 2, &m, &state, &learning);
        let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(v["hr_at_k"], 1.0);
        assert_eq!(v["mrr_at_k"], 0.5);
        assert_eq!(v["n"], 1);
        assert_eq!(v["k"], 2);
        assert!(v.get("warm_events").is_none());
        let table = r.table();
        assert!(table.contains("HR@2"), "{table}");
        assert!(table.contains("0.5000"), "{table}");
    }
}
