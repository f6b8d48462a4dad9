//! Offline evaluation / tuning harness for `kairos_state::session_model`.
//!
//! Sessions split (SR-GNN protocol, see `../shared/data/README.md`):
//!
//! ```text
//! cargo run --release -p kairos-state --example session_eval -- \
//!     --train ../shared/data/diginetica/train_sessions.csv \
//!     --test ../shared/data/diginetica/test_prefixes.csv [--mode valid|test|both] \
//!     [--valid-frac 0.1] [--set key=value]... [--grid key=v1,v2,...]... [--threads 2]
//! ```
//!
//! * `valid`: learn the first `1 - valid-frac` of the training sessions (file order = time order)
//!   and score every prefix (length >= 1) of each held-out session predicting its next item,
//!   exactly as the test prefixes were built. Tuning happens here, never on the test prefixes.
//! * `test`: learn all training sessions, score the test prefixes.
//! * `--grid` runs the cartesian product; score-time-only keys reuse the learned model.
//! * `--no-content-exclusion` scores with `score_session(None, ..)` instead of `score` (which
//!   drops a retained session identical to the query); on DIGINETICA both give the same figures.
//! * `--threads N` (default 2) splits the prefixes over N scoring threads.
//!
//! Synthetic clock (the split has no timestamps): session `s` (file index) starts at
//! `s · 60 s` and its `j`-th click is at `+ j · 1 s`; queries are scored at one minute after the
//! last learned session. DIGINETICA has ~186k training sessions over ~5 months, i.e. roughly one
//! session a minute, so time-based parameters keep a realistic meaning.
//!
//! Event stream (prequential replay through `observe`, the live-server path):
//!
//! ```text
//! ... --example session_eval -- --events ../shared/data/otto-sample/events.csv
//! ```
//!
//! Events are grouped by `session_id` (falling back to `user_id`) and replayed in timestamp
//! order; before each event of a session that already has items, the session is scored (it *has*
//! been observed, so self-exclusion matters) and the event's item is the label.

use std::collections::HashMap;
use std::time::Instant;

use kairos_state::session_model::{ItemIdx, SessionModel, SessionModelConfig};

const TOP: usize = 20;

/// A query prefix and the item that followed it.
type Case = (Vec<ItemIdx>, ItemIdx);

/// Name, sessions to learn, cases to score.
type Dataset = (&'static str, Vec<Vec<ItemIdx>>, Vec<Case>);

/// A learned model with its config, events/s, learning seconds and last timestamp.
type Learned = (SessionModelConfig, SessionModel, f64, f64, i64);

struct Interner(HashMap<String, ItemIdx>);

impl Interner {
    fn get(&mut self, s: &str) -> ItemIdx {
        let n = self.0.len() as ItemIdx;
        *self.0.entry(s.to_string()).or_insert(n)
    }
}

fn read_lines(path: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
        .lines()
        .skip(1)
        .map(str::to_string)
        .collect()
}

fn parse_items(s: &str, int: &mut Interner) -> Vec<ItemIdx> {
    s.split_whitespace().map(|t| int.get(t)).collect()
}

/// Rank (1-based) of `label` when `scores` are sorted by score desc, item asc; `None` if not
/// scored (ranked after every scored item: a miss at 20 unless fewer items were scored, which
/// we conservatively count as a miss too).
fn rank_of(scores: &[(ItemIdx, f32)], label: ItemIdx) -> Option<usize> {
    let ls = scores.iter().find(|x| x.0 == label)?.1;
    let better = scores
        .iter()
        .filter(|&&(it, s)| s > ls || (s == ls && it < label))
        .count();
    Some(better + 1)
}

struct EvalResult {
    hr: f64,
    mrr: f64,
    n: usize,
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
    secs: f64,
}

fn evaluate(
    model: &SessionModel,
    cases: &[(Vec<ItemIdx>, ItemIdx)],
    now: i64,
    threads: usize,
    content_exclusion: bool,
) -> EvalResult {
    let t0 = Instant::now();
    let chunk = cases.len().div_ceil(threads.max(1)).max(1);
    let parts: Vec<(f64, f64, Vec<f32>)> = std::thread::scope(|sc| {
        let hs: Vec<_> = cases
            .chunks(chunk)
            .map(|part| {
                sc.spawn(move || {
                    let mut out = Vec::new();
                    let (mut hr, mut mrr) = (0.0, 0.0);
                    let mut lat = Vec::with_capacity(part.len());
                    for (prefix, label) in part {
                        out.clear();
                        let t = Instant::now();
                        if content_exclusion {
                            model.score(prefix, now, &mut out);
                        } else {
                            model.score_session(None, prefix, now, &mut out);
                        }
                        lat.push(t.elapsed().as_secs_f32() * 1e6);
                        if let Some(r) = rank_of(&out, *label) {
                            if r <= TOP {
                                hr += 1.0;
                                mrr += 1.0 / r as f64;
                            }
                        }
                    }
                    (hr, mrr, lat)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let mut lat: Vec<f32> = Vec::new();
    let (mut hr, mut mrr) = (0.0, 0.0);
    for (h, m, l) in parts {
        hr += h;
        mrr += m;
        lat.extend(l);
    }
    lat.sort_by(f32::total_cmp);
    let q = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0) as f64
    };
    let n = cases.len().max(1);
    EvalResult {
        hr: hr / n as f64,
        mrr: mrr / n as f64,
        n: cases.len(),
        p50_us: q(0.5),
        p99_us: q(0.99),
        mean_us: lat.iter().map(|&x| x as f64).sum::<f64>() / n as f64,
        secs,
    }
}

/// Learns sessions; returns (events/s, seconds, last timestamp).
fn learn(model: &mut SessionModel, sessions: &[Vec<ItemIdx>]) -> (f64, f64, i64) {
    let t0 = Instant::now();
    let mut events = 0usize;
    let mut last = 0;
    for (s, items) in sessions.iter().enumerate() {
        for (j, &it) in items.iter().enumerate() {
            let ts = s as i64 * 60_000 + j as i64 * 1000;
            model.observe(s as u64, it, ts, 1.0);
            events += 1;
            last = ts;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    (events as f64 / secs.max(1e-9), secs, last)
}

fn prefixes_of(sessions: &[Vec<ItemIdx>]) -> Vec<(Vec<ItemIdx>, ItemIdx)> {
    let mut v = Vec::new();
    for s in sessions {
        for k in 1..s.len() {
            v.push((s[..k].to_vec(), s[k]));
        }
    }
    v
}

fn run_events(path: &str, cfg: &SessionModelConfig) {
    let mut int = Interner(HashMap::new());
    let mut ev: Vec<(i64, String, ItemIdx, f32)> = Vec::new();
    for line in read_lines(path) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 5 {
            continue;
        }
        let ts: i64 = f[0].parse().unwrap_or(0);
        let sess = if !f[2].is_empty() { f[2] } else { f[1] };
        if sess.is_empty() {
            continue;
        }
        let w = match f[3] {
            "add_to_cart" => 2.0,
            "purchase" => 3.0,
            _ => 1.0,
        };
        ev.push((ts, sess.to_string(), int.get(f[4]), w));
    }
    ev.sort_by_key(|e| e.0);
    let mut keys: HashMap<String, u64> = HashMap::new();
    let mut hist: HashMap<u64, Vec<ItemIdx>> = HashMap::new();
    let mut model = SessionModel::new(cfg.clone());
    let (mut n, mut hr, mut mrr, mut pop_hr) = (0usize, 0.0, 0.0, 0.0);
    let mut pop: HashMap<ItemIdx, u32> = HashMap::new();
    let mut out = Vec::new();
    let mut lat = Vec::new();
    for (ts, s, item, w) in &ev {
        let nk = keys.len() as u64;
        let key = *keys.entry(s.clone()).or_insert(nk);
        let h = hist.entry(key).or_default();
        if !h.is_empty() {
            out.clear();
            let t = Instant::now();
            model.score(h, *ts, &mut out);
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            n += 1;
            if let Some(r) = rank_of(&out, *item) {
                if r <= TOP {
                    hr += 1.0;
                    mrr += 1.0 / r as f64;
                }
            }
            // Popularity baseline for reference.
            let mut p: Vec<(ItemIdx, u32)> = pop.iter().map(|(&a, &b)| (a, b)).collect();
            p.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            if p.iter().take(TOP).any(|x| x.0 == *item) {
                pop_hr += 1.0;
            }
        }
        h.push(*item);
        *pop.entry(*item).or_default() += 1;
        model.observe(key, *item, *ts, *w);
    }
    lat.sort_by(f64::total_cmp);
    let nn = n.max(1) as f64;
    println!(
        "events {path}: {} events, {} sessions, {n} predictions: HR@20 {:.4} MRR@20 {:.4} (popularity HR@20 {:.4}); score p50 {:.1}us p99 {:.1}us; heap {} KB",
        ev.len(),
        keys.len(),
        hr / nn,
        mrr / nn,
        pop_hr / nn,
        lat.get(lat.len() / 2).copied().unwrap_or(0.0),
        lat.get(((lat.len() as f64 - 1.0) * 0.99) as usize).copied().unwrap_or(0.0),
        model.heap_bytes() / 1024
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut train = String::from("../shared/data/diginetica/train_sessions.csv");
    let mut test = String::from("../shared/data/diginetica/test_prefixes.csv");
    let mut mode = String::from("both");
    let mut valid_frac = 0.1f64;
    let mut threads = 2usize;
    let mut content_exclusion = true;
    let mut cfg = SessionModelConfig::default();
    let mut grid: Vec<(String, Vec<String>)> = Vec::new();
    let mut events: Vec<String> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match a {
            "--train" => train = v,
            "--test" => test = v,
            "--mode" => mode = v,
            "--valid-frac" => valid_frac = v.parse().expect("valid-frac"),
            "--threads" => threads = v.parse().expect("threads"),
            "--events" => events.push(v),
            "--no-content-exclusion" => {
                content_exclusion = false;
                i += 1;
                continue;
            }
            "--set" => {
                let (k, val) = v.split_once('=').expect("--set key=value");
                cfg.set(k, val).unwrap_or_else(|e| panic!("{e}"));
            }
            "--grid" => {
                let (k, vals) = v.split_once('=').expect("--grid key=v1,v2");
                SessionModelConfig::default()
                    .set(k, vals.split(',').next().unwrap())
                    .unwrap_or_else(|e| panic!("{e}"));
                grid.push((k.to_string(), vals.split(',').map(str::to_string).collect()));
            }
            _ => panic!("unknown argument {a}"),
        }
        i += 2;
    }
    println!("config: {cfg:?}");
    if !events.is_empty() {
        for p in &events {
            run_events(p, &cfg);
        }
        return;
    }

    let t_all = Instant::now();
    let mut int = Interner(HashMap::new());
    let sessions: Vec<Vec<ItemIdx>> = read_lines(&train)
        .iter()
        .map(|l| parse_items(l.split_once(',').map(|x| x.1).unwrap_or(""), &mut int))
        .collect();

    // Cartesian product of the grid.
    let mut combos: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for (k, vals) in &grid {
        let mut next = Vec::new();
        for c in &combos {
            for v in vals {
                let mut c2 = c.clone();
                c2.push((k.clone(), v.clone()));
                next.push(c2);
            }
        }
        combos = next;
    }

    let mut datasets: Vec<Dataset> = Vec::new();
    if mode == "valid" || mode == "both" {
        let cut = ((sessions.len() as f64) * (1.0 - valid_frac)).round() as usize;
        let cases = prefixes_of(&sessions[cut..]);
        datasets.push(("valid", sessions[..cut].to_vec(), cases));
    }
    if mode == "test" || mode == "both" {
        let cases: Vec<Case> = read_lines(&test)
            .iter()
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (parse_items(f[1], &mut int), int.get(f[2].trim()))
            })
            .collect();
        datasets.push(("test", sessions.clone(), cases));
    }

    for (name, learn_set, cases) in &datasets {
        let mut model: Option<Learned> = None;
        for combo in &combos {
            let mut c = cfg.clone();
            for (k, v) in combo {
                c.set(k, v).unwrap();
            }
            let reuse = model.as_ref().is_some_and(|(lc, ..)| {
                let mut a = lc.clone();
                let mut b = c.clone();
                // Compare learning-time fields only.
                for k in [
                    "sample_size",
                    "k",
                    "pos_decay",
                    "pos_linear",
                    "len_norm",
                    "recency_half_life_ms",
                    "item_decay",
                    "before_match_weight",
                    "match_step_exp",
                    "idf_sim_weight",
                    "idf_score_weight",
                    "sr_weight",
                    "sr_history",
                    "sr_history_decay",
                ] {
                    debug_assert!(SessionModelConfig::is_score_time(k));
                    a.set(k, "0").unwrap_or_else(|_| a.set(k, "false").unwrap());
                    b.set(k, "0").unwrap_or_else(|_| b.set(k, "false").unwrap());
                }
                a == b
            });
            if !reuse {
                let mut m = SessionModel::new(c.clone());
                let (eps, secs, last) = learn(&mut m, learn_set);
                model = Some((c.clone(), m, eps, secs, last));
            }
            let (_, m, eps, lsecs, last) = model.as_mut().unwrap();
            *m.config_mut() = c.clone();
            let r = evaluate(m, cases, *last + 60_000, threads, content_exclusion);
            let label: Vec<String> = combo.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "{name:5} {} | HR@20 {:.4} MRR@20 {:.4} | n {} | learn {:.2}s {:.0} ev/s | score {:.2}s p50 {:.1}us p99 {:.1}us mean {:.1}us | sessions {} heap {:.1} MB",
                label.join(" "),
                r.hr,
                r.mrr,
                r.n,
                lsecs,
                eps,
                r.secs,
                r.p50_us,
                r.p99_us,
                r.mean_us,
                m.num_sessions(),
                m.heap_bytes() as f64 / 1e6
            );
        }
    }
    println!("total {:.2}s", t_all.elapsed().as_secs_f64());
}
