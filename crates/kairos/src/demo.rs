//! Demo data: a catalogue and a replayed event stream, so a new user sees recommendations at once.
//!
//! With `kairos serve --demo` and an empty data directory, the node loads
//! `../shared/data/movielens-small` (real titles and genres) when present, else a small generated
//! shop. Everything goes through the event log like live traffic does; event times are remapped to
//! the last seven days so that decay and trending behave as they would on a live site.

use std::path::{Path, PathBuf};

use kairos_log::{AppendRecord, EventLog};
use kairos_types::{stable_hash64, CallType, Event, Item, LogEntry};
use serde_json::{json, Map};

use crate::datasets::{read_events, read_items, EventRow, ItemRow};

/// Where demo data is looked for when none is named.
pub const DEFAULT_DEMO_DIR: &str = "../shared/data/movielens-small";

/// A small deterministic generator (xorshift64*), so demo and benchmark data are reproducible
/// without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Zipf-like rank in `0..n` (exponent ~1), by inverse transform of a continuous power law.
    pub fn zipf(&mut self, n: u64) -> u64 {
        let u = self.unit();
        let r = ((n as f64 + 1.0).powf(u) - 1.0) as u64;
        r.min(n - 1)
    }
}

/// A demo price derived from the item id, stable across runs.
fn demo_price(id: &str) -> f64 {
    let h = stable_hash64(&[id.as_bytes()]);
    (5 + h % 45) as f64 + 0.99
}

fn demo_item(row: &ItemRow) -> Item {
    Item {
        id: row.item_id.clone(),
        title: row.title.clone(),
        url: Some(format!("/demo/item/{}", row.item_id)),
        image: None,
        categories: row.categories.clone(),
        brand: None,
        price: Some(demo_price(&row.item_id)),
        currency: Some("EUR".into()),
        in_stock: true,
        tags: Vec::new(),
        attributes: Map::new(),
    }
}

fn generated() -> (Vec<ItemRow>, Vec<EventRow>) {
    const CATEGORIES: [&str; 8] = [
        "Books", "Music", "Garden", "Kitchen", "Toys", "Sports", "Outdoor", "Games",
    ];
    const ADJECTIVES: [&str; 10] = [
        "Classic", "Compact", "Deluxe", "Eco", "Smart", "Vintage", "Bright", "Solid", "Travel",
        "Pro",
    ];
    let mut items = Vec::new();
    for (c, cat) in CATEGORIES.iter().enumerate() {
        for n in 0..25 {
            items.push(ItemRow {
                item_id: format!("{}", c * 100 + n + 1),
                title: Some(format!(
                    "{} {} {}",
                    ADJECTIVES[n % 10],
                    cat.trim_end_matches('s'),
                    n + 1
                )),
                categories: vec![(*cat).to_owned()],
            });
        }
    }
    let mut rng = Rng::new(42);
    let mut events = Vec::new();
    let mut ts = 1_700_000_000_000i64;
    for user in 0..300 {
        let favourite = rng.below(CATEGORIES.len() as u64) as usize;
        for session in 0..(1 + rng.below(3)) {
            for _ in 0..(2 + rng.below(8)) {
                let cat = if rng.unit() < 0.7 {
                    favourite
                } else {
                    rng.below(8) as usize
                };
                let item = &items[cat * 25 + rng.zipf(25) as usize];
                ts += 1 + rng.below(120_000) as i64;
                let event = if rng.unit() < 0.1 {
                    "purchase"
                } else {
                    "product_view"
                };
                events.push(EventRow {
                    timestamp_ms: ts,
                    user_id: Some(format!("u{user}")),
                    session_id: Some(format!("u{user}-s{session}")),
                    event: event.to_owned(),
                    item_id: item.item_id.clone(),
                });
            }
        }
    }
    (items, events)
}

/// The tracker event a row of `events.csv` stands for, at time `ts` (`i` makes the message id
/// unique): a `product_view`/`add_to_cart` with `properties.product_id` (and `category` when given),
/// or a `purchase` with `properties.products[]`. Rows without a user id become anonymous events of
/// `anon-<session_id>`. The demo loader and `kairos eval replay` share this mapping.
pub fn event_from_row(i: usize, row: &EventRow, ts: i64, category: Option<&str>) -> Event {
    let mut props = Map::new();
    if row.event == "purchase" {
        props.insert(
            "products".into(),
            json!([{ "product_id": row.item_id, "quantity": 1 }]),
        );
        props.insert("order_id".into(), json!(format!("demo-order-{i}")));
    } else {
        props.insert("product_id".into(), json!(row.item_id));
        if let Some(c) = category {
            props.insert("category".into(), json!(c));
        }
    }
    let (user_id, anonymous_id) = match (&row.user_id, &row.session_id) {
        (Some(u), _) => (Some(u.clone()), None),
        (None, Some(s)) => (None, Some(format!("anon-{s}"))),
        (None, None) => (None, Some("anon".to_owned())),
    };
    Event {
        call: CallType::Track,
        event: row.event.clone(),
        message_id: format!("demo-{i}"),
        user_id,
        anonymous_id,
        previous_id: None,
        session_id: row.session_id.clone(),
        timestamp: ts,
        received_at: ts,
        properties: props,
        traits: Default::default(),
        context: Default::default(),
    }
}

fn append_all(log: &dyn EventLog, entries: Vec<LogEntry>) -> Result<(), String> {
    for chunk in entries.chunks(1000) {
        let records = chunk
            .iter()
            .map(|e| AppendRecord {
                key: e.partition_key().as_bytes().to_vec(),
                timestamp_ms: kairos_types::time::now_ms(),
                dedup_id: 0,
                payload: e.encode(),
                transaction: None,
            })
            .collect();
        log.append(records)
            .wait()
            .map_err(|e| format!("appending demo data: {e}"))?;
    }
    Ok(())
}

/// Loads demo data into an empty log. Returns a description of what was loaded, or `None` when
/// the log already holds data.
pub fn load(log: &dyn EventLog, dir: Option<&Path>) -> Result<Option<String>, String> {
    if log.committed_seq() > 0 {
        return Ok(None);
    }
    let dir: PathBuf = dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| DEFAULT_DEMO_DIR.into());
    let (items, events, source) = if dir.join("events.csv").exists() {
        let items = if dir.join("items.csv").exists() {
            read_items(&dir.join("items.csv"))?
        } else {
            Vec::new()
        };
        (
            items,
            read_events(&dir.join("events.csv"))?,
            dir.display().to_string(),
        )
    } else {
        let (items, events) = generated();
        (items, events, "a generated shop".to_owned())
    };
    let categories: std::collections::HashMap<&str, &str> = items
        .iter()
        .filter_map(|i| Some((i.item_id.as_str(), i.categories.first()?.as_str())))
        .collect();
    let mut entries: Vec<LogEntry> = items
        .iter()
        .map(|r| LogEntry::ItemUpsert(demo_item(r)))
        .collect();
    // Remap event times onto the last seven days, keeping their order and relative spacing.
    let now = kairos_types::time::now_ms() - 60_000;
    let span = 7 * 86_400_000i64;
    let (min, max) = events.iter().fold((i64::MAX, i64::MIN), |(lo, hi), e| {
        (lo.min(e.timestamp_ms), hi.max(e.timestamp_ms))
    });
    let scale = if max > min {
        span as f64 / (max - min) as f64
    } else {
        0.0
    };
    for (i, row) in events.iter().enumerate() {
        let ts = now - span + ((row.timestamp_ms - min) as f64 * scale) as i64;
        let cat = categories.get(row.item_id.as_str()).copied();
        entries.push(LogEntry::Event(event_from_row(i, row, ts, cat)));
    }
    let summary = format!(
        "{} items and {} events from {source}",
        items.len(),
        events.len()
    );
    append_all(log, entries)?;
    Ok(Some(summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_zipf_skewed() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        assert_eq!(a.next_u64(), b.next_u64());
        let mut counts = [0u32; 10];
        for _ in 0..10_000 {
            counts[a.zipf(10) as usize] += 1;
        }
        assert!(counts[0] > counts[9] * 3, "{counts:?}");
    }

    #[test]
    fn generated_shop_is_consistent() {
        let (items, events) = generated();
        assert_eq!(items.len(), 200);
        assert!(events.len() > 500);
        let ids: std::collections::HashSet<_> = items.iter().map(|i| &i.item_id).collect();
        assert!(events.iter().all(|e| ids.contains(&e.item_id)));
    }
}
