//! Synthetic, seeded shop traffic for `kairos bench`.
//!
//! The load must look like a real shop's tracker traffic, or the figures say nothing: a catalogue
//! whose popularity is Zipf-distributed (a few items get most views), visitors whose sessions vary
//! in length (many short bounces, a long tail of long browses), sessions that drift through related
//! items (the next product is often from the same category), and the usual mix of event types
//! (page views, product views, clicks, searches, cart changes, purchases, recommendation
//! impressions and clicks). Every event carries product and session context the way Segment's
//! analytics.js sends it, about 400 bytes of JSON.
//!
//! Everything is a function of the seed: the same seed gives the same catalogue, visitors, sessions
//! and bytes. Message ids end in a 16-digit hex field that the load generator overwrites with a
//! fresh counter on every send ([`patch_message_id`]), so a pre-generated pool of events can be
//! replayed for as long as a measurement runs without ever being deduplicated, at no generation
//! cost while measuring.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::demo::Rng;

/// Width of the per-send unique suffix of every message id, in hex digits.
pub const MESSAGE_SUFFIX_LEN: usize = 16;

/// The size of the synthetic shop.
#[derive(Clone, Debug)]
pub struct ShopSize {
    pub items: usize,
    pub users: usize,
}

/// The catalogue: per item a category, a brand and a price; items of each category ordered by
/// global popularity (item index = popularity rank).
pub struct Shop {
    pub size: ShopSize,
    brands: usize,
    item_category: Vec<u32>,
    by_category: Vec<Vec<u32>>,
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

impl Shop {
    pub fn new(size: ShopSize, seed: u64) -> Shop {
        let categories = (size.items / 100).clamp(4, 2000);
        let brands = (size.items / 40).clamp(4, 5000);
        let item_category: Vec<u32> = (0..size.items as u64)
            .map(|i| (mix(i ^ seed) % categories as u64) as u32)
            .collect();
        let mut by_category = vec![Vec::new(); categories];
        for (i, &c) in item_category.iter().enumerate() {
            by_category[c as usize].push(i as u32);
        }
        Shop {
            size,
            brands,
            item_category,
            by_category,
        }
    }

    fn brand(&self, item: u32) -> u64 {
        mix(item as u64 ^ 0x5eed) % self.brands as u64
    }

    fn price_cents(&self, item: u32) -> u64 {
        499 + mix(item as u64 ^ 0xcafe) % 20_000
    }

    /// A globally popular item (Zipf over the whole catalogue).
    fn popular_item(&self, rng: &mut Rng) -> u32 {
        rng.zipf(self.size.items as u64) as u32
    }

    /// A popular item of `category` (Zipf within the category).
    fn item_in_category(&self, category: u32, rng: &mut Rng) -> u32 {
        let list = &self.by_category[category as usize];
        if list.is_empty() {
            return self.popular_item(rng);
        }
        list[rng.zipf(list.len() as u64) as usize]
    }

    /// One catalogue entry as `PUT /v1/items` takes it.
    pub fn item_json(&self, item: u32, out: &mut String) {
        let c = self.item_category[item as usize];
        let price = self.price_cents(item);
        let _ = write!(
            out,
            r#"{{"id":"p{item}","title":"Product {item}","url":"https://shop.example.com/p/{item}","image":"https://cdn.shop.example.com/p/{item}.jpg","categories":["c{c}"],"brand":"b{}","price":{}.{:02},"currency":"EUR","in_stock":{}}}"#,
            self.brand(item),
            price / 100,
            price % 100,
            !mix(item as u64 ^ 0x57).is_multiple_of(20),
        );
    }

    /// `PUT /v1/items` bodies of at most `per_request` items covering the catalogue.
    pub fn catalogue_bodies(&self, per_request: usize) -> Vec<Vec<u8>> {
        (0..self.size.items as u32)
            .collect::<Vec<_>>()
            .chunks(per_request.max(1))
            .map(|chunk| {
                let mut body = String::from("[");
                for (n, &item) in chunk.iter().enumerate() {
                    if n > 0 {
                        body.push(',');
                    }
                    self.item_json(item, &mut body);
                }
                body.push(']');
                body.into_bytes()
            })
            .collect()
    }
}

/// Whether visitor `user` is a logged-in customer (one in five): its events carry a `userId`
/// besides the `anonymousId`, as a tracker sends them after login.
pub fn is_known(user: u64) -> bool {
    mix(user ^ 0x1d).is_multiple_of(5)
}

/// The query string that identifies visitor `user` in `GET /v1/recommendations`.
pub fn visitor_query(user: u64) -> String {
    if is_known(user) {
        format!("user_id=u{user}")
    } else {
        format!("anonymous_id=a{user}")
    }
}

/// Which visitors start sessions.
#[derive(Clone, Copy, Debug)]
pub enum Visitors {
    /// Visitors `first + i * step` for `i` in `0..count`, each exactly once, in a seeded order:
    /// loading a population.
    EachOnce { first: u64, count: u64, step: u64 },
    /// Visitors drawn uniformly from `first..first + count`: returning traffic.
    Random { first: u64, count: u64 },
}

/// One visitor session in progress.
struct Session {
    user: u64,
    id: String,
    remaining: u32,
    category: u32,
    last_item: Option<u32>,
    cart: Vec<u32>,
    rec_id: Option<u64>,
}

/// An endless (or, with [`Visitors::EachOnce`], finite) stream of tracker events: a pool of
/// concurrently active sessions, one event of a random active session at a time.
pub struct Traffic {
    shop: Arc<Shop>,
    rng: Rng,
    visitors: Visitors,
    started: u64,
    active: Vec<Session>,
    concurrency: usize,
    clock_ms: i64,
    seed: u64,
}

impl Traffic {
    pub fn new(
        shop: Arc<Shop>,
        seed: u64,
        visitors: Visitors,
        concurrency: usize,
        start_ms: i64,
    ) -> Self {
        Traffic {
            shop,
            rng: Rng::new(mix(seed) | 1),
            visitors,
            started: 0,
            active: Vec::with_capacity(concurrency),
            concurrency: concurrency.max(1),
            clock_ms: start_ms,
            seed,
        }
    }

    /// Session lengths: a bounce (1 event) a quarter of the time, else geometric with mean ~6,
    /// capped at 60; about 5 events on average.
    fn session_length(&mut self) -> u32 {
        if self.rng.unit() < 0.25 {
            return 1;
        }
        let u = self.rng.unit().max(1e-12);
        (1.0 + (-u.ln() * 5.5)).min(60.0) as u32
    }

    fn next_visitor(&mut self) -> Option<u64> {
        match self.visitors {
            Visitors::EachOnce { first, count, step } => {
                if self.started >= count {
                    return None;
                }
                // A bijection of 0..count (multiplication by an odd constant modulo a power of
                // two, then cycle-walking into range) gives a seeded order without a table.
                let bits = 64 - count.saturating_sub(1).leading_zeros().min(63);
                let modulus = 1u64 << bits.max(1);
                let mut x = self.started;
                loop {
                    x = (x
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15 | 1)
                        .wrapping_add(self.seed))
                        & (modulus - 1);
                    if x < count {
                        break;
                    }
                }
                self.started += 1;
                Some(first + x * step)
            }
            Visitors::Random { first, count } => {
                self.started += 1;
                Some(first + self.rng.below(count))
            }
        }
    }

    fn start_session(&mut self) -> bool {
        let Some(user) = self.next_visitor() else {
            return false;
        };
        let remaining = self.session_length();
        let item = self.shop.popular_item(&mut self.rng);
        let session = Session {
            user,
            id: format!("s{user}-{:x}", self.rng.next_u64() & 0xffff_ffff),
            remaining,
            category: self.shop.item_category[item as usize],
            last_item: None,
            cart: Vec::new(),
            rec_id: None,
        };
        self.active.push(session);
        true
    }

    /// Appends the next event's JSON to `out`; returns the offset (in `out`) of its message-id
    /// suffix, or `None` when a finite stream is exhausted.
    pub fn next_event(&mut self, out: &mut Vec<u8>) -> Option<usize> {
        while self.active.len() < self.concurrency && self.start_session() {}
        if self.active.is_empty() {
            return None;
        }
        let slot = self.rng.below(self.active.len() as u64) as usize;
        self.clock_ms += 1 + self.rng.below(20) as i64;
        let suffix = self.write_event(slot, out);
        let s = &mut self.active[slot];
        s.remaining = s.remaining.saturating_sub(1);
        if s.remaining == 0 {
            self.active.swap_remove(slot);
        }
        Some(suffix)
    }

    fn write_event(&mut self, slot: usize, out: &mut Vec<u8>) -> usize {
        let shop = Arc::clone(&self.shop);
        let shop = &*shop;
        let roll = self.rng.unit();
        let s = &self.active[slot];
        let last = s.remaining == 1;
        let first_event = s.last_item.is_none();
        let session_category = s.category;
        let has_cart = !s.cart.is_empty();
        let has_rec = s.rec_id.is_some();
        // Event type: a session opens on a page view or search, ends on a purchase when the cart
        // holds something, and in between mostly views products.
        let kind = if first_event && roll < 0.5 {
            if roll < 0.4 {
                "page_view"
            } else {
                "search"
            }
        } else if last && has_cart && roll < 0.6 {
            "purchase"
        } else if roll < 0.62 {
            "product_view"
        } else if roll < 0.72 {
            "click"
        } else if roll < 0.78 {
            "page_view"
        } else if roll < 0.82 {
            "search"
        } else if roll < 0.90 {
            "add_to_cart"
        } else if roll < 0.92 && has_cart {
            "remove_from_cart"
        } else if roll < 0.96 {
            "rec_impression"
        } else if has_rec {
            "rec_click"
        } else {
            "product_view"
        };
        // The product: often one of the same category as the previous one (sessions drift through
        // related items), else a globally popular one.
        let item = if self.rng.unit() < 0.6 {
            shop.item_in_category(session_category, &mut self.rng)
        } else {
            shop.popular_item(&mut self.rng)
        };
        let message_hi = self.rng.next_u64();
        let rec_new = self.rng.next_u64();
        let s = &mut self.active[slot];
        let user = s.user;
        let mut json = String::with_capacity(480);
        json.push('{');
        let _ = write!(
            json,
            r#""type":"{}","messageId":"{message_hi:016x}-"#,
            if kind == "page_view" { "page" } else { "track" }
        );
        let suffix_at = json.len();
        json.push_str(&"0".repeat(MESSAGE_SUFFIX_LEN));
        json.push('"');
        if kind != "page_view" {
            let _ = write!(json, r#","event":"{kind}""#);
        }
        let _ = write!(json, r#","anonymousId":"a{user}""#);
        if is_known(user) {
            let _ = write!(json, r#","userId":"u{user}""#);
        }
        let _ = write!(
            json,
            r#","timestamp":"{}""#,
            kairos_types::time::format_rfc3339_ms(self.clock_ms)
        );
        json.push_str(r#","properties":{"#);
        let category = shop.item_category[item as usize];
        let product = |json: &mut String, item: u32| {
            let _ = write!(
                json,
                r#""product_id":"p{item}","category":"c{}","brand":"b{}","price":{}.{:02}"#,
                shop.item_category[item as usize],
                shop.brand(item),
                shop.price_cents(item) / 100,
                shop.price_cents(item) % 100
            );
        };
        match kind {
            "page_view" => {
                let _ = write!(
                    json,
                    r#""path":"/c/{category}","title":"Category {category}""#
                );
            }
            "search" => {
                let _ = write!(json, r#""query":"category {category} brand {}""#, item % 50);
            }
            "purchase" => {
                let _ = write!(
                    json,
                    r#""order_id":"o{message_hi:x}","currency":"EUR","products":["#
                );
                let mut total = 0;
                for (n, &i) in s.cart.iter().enumerate() {
                    if n > 0 {
                        json.push(',');
                    }
                    json.push('{');
                    product(&mut json, i);
                    json.push_str(r#","quantity":1}"#);
                    total += shop.price_cents(i);
                }
                let _ = write!(json, r#"],"revenue":{}.{:02}"#, total / 100, total % 100);
                s.cart.clear();
            }
            "rec_impression" => {
                let _ = write!(
                    json,
                    r#""rec_id":"{rec_new:016x}","scenario":"for_you","position":0"#
                );
                s.rec_id = Some(rec_new);
            }
            "rec_click" => {
                let _ = write!(json, r#""rec_id":"{:016x}","#, s.rec_id.unwrap_or(rec_new));
                product(&mut json, item);
            }
            "remove_from_cart" => {
                let removed = s.cart.pop().unwrap_or(item);
                product(&mut json, removed);
                json.push_str(r#","quantity":1"#);
            }
            "add_to_cart" => {
                product(&mut json, item);
                json.push_str(r#","quantity":1,"currency":"EUR""#);
                s.cart.push(item);
            }
            _ => {
                product(&mut json, item);
                json.push_str(r#","currency":"EUR""#);
            }
        }
        if !matches!(kind, "page_view" | "search" | "purchase" | "rec_impression") {
            s.category = category;
            s.last_item = Some(item);
        } else if s.last_item.is_none() {
            s.last_item = Some(item);
        }
        let _ = write!(
            json,
            r#"}},"context":{{"sessionId":"{}","page":{{"url":"https://shop.example.com/p/{item}"}},"userAgent":"Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0","locale":"en-US","library":{{"name":"kairos.js","version":"0.1.0"}}}}}}"#,
            s.id
        );
        let suffix = out.len() + suffix_at;
        out.extend_from_slice(json.as_bytes());
        suffix
    }
}

/// Writes `value` as the message-id suffix at `at` (16 lowercase hex digits).
pub fn patch_message_id(buf: &mut [u8], at: usize, value: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, byte) in buf[at..at + MESSAGE_SUFFIX_LEN].iter_mut().enumerate() {
        *byte = HEX[((value >> (4 * (MESSAGE_SUFFIX_LEN - 1 - i))) & 0xf) as usize];
    }
}

/// A request body of a batch of events, with the positions of their message-id suffixes.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub body: Vec<u8>,
    pub suffixes: Vec<usize>,
}

impl Batch {
    pub fn events(&self) -> usize {
        self.suffixes.len()
    }

    /// Gives every event of the batch a fresh, unique message id.
    pub fn refresh_ids(&mut self, first_id: u64) {
        for (n, &at) in self.suffixes.iter().enumerate() {
            patch_message_id(&mut self.body, at, first_id + n as u64);
        }
    }
}

/// Builds `{"batch":[...],"sentAt":...}` bodies of `per_batch` events from `traffic`, at most
/// `max_events` in all (fewer when the stream ends).
pub fn batches(traffic: &mut Traffic, per_batch: usize, max_events: usize) -> Vec<Batch> {
    let per_batch = per_batch.max(1);
    let mut out = Vec::with_capacity(max_events / per_batch + 1);
    let mut produced = 0;
    while produced < max_events {
        let mut batch = Batch {
            body: Vec::with_capacity(per_batch * 460 + 64),
            suffixes: Vec::with_capacity(per_batch),
        };
        batch.body.extend_from_slice(b"{\"batch\":[");
        while batch.suffixes.len() < per_batch && produced < max_events {
            if !batch.suffixes.is_empty() {
                batch.body.push(b',');
            }
            match traffic.next_event(&mut batch.body) {
                Some(at) => {
                    batch.suffixes.push(at);
                    produced += 1;
                }
                None => {
                    if !batch.suffixes.is_empty() {
                        batch.body.pop();
                    }
                    produced = max_events;
                }
            }
        }
        if batch.suffixes.is_empty() {
            break;
        }
        let sent_at = kairos_types::time::format_rfc3339_ms(traffic.clock_ms);
        batch
            .body
            .extend_from_slice(format!("],\"sentAt\":\"{sent_at}\"}}").as_bytes());
        out.push(batch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shop() -> Arc<Shop> {
        Arc::new(Shop::new(
            ShopSize {
                items: 2000,
                users: 500,
            },
            7,
        ))
    }

    #[test]
    fn traffic_is_seeded_valid_json_of_realistic_size() {
        let shop = shop();
        let make = || {
            let everyone = Visitors::Random {
                first: 0,
                count: 500,
            };
            let mut t = Traffic::new(shop.clone(), 3, everyone, 50, 1_700_000_000_000);
            batches(&mut t, 20, 2000)
        };
        let (a, b) = (make(), make());
        assert_eq!(a.len(), 100);
        assert!(a.iter().zip(&b).all(|(x, y)| x.body == y.body));
        let mut kinds = std::collections::HashMap::new();
        let mut bytes = 0;
        for batch in &a {
            let v: serde_json::Value = serde_json::from_slice(&batch.body).unwrap();
            let events = v["batch"].as_array().unwrap();
            assert_eq!(events.len(), batch.events());
            for e in events {
                bytes += serde_json::to_vec(e).unwrap().len();
                let kind = e["event"].as_str().unwrap_or("page_view").to_owned();
                *kinds.entry(kind).or_insert(0) += 1;
                let req = kairos_types::RequestContext {
                    received_at: 1_700_000_000_000,
                    ..Default::default()
                };
                kairos_types::normalize(e, &req).unwrap();
            }
        }
        let mean = bytes / 2000;
        assert!((300..520).contains(&mean), "mean event size {mean}");
        assert!(kinds["product_view"] > 800, "{kinds:?}");
        for k in [
            "page_view",
            "search",
            "click",
            "add_to_cart",
            "purchase",
            "rec_impression",
        ] {
            assert!(kinds.get(k).copied().unwrap_or(0) > 0, "no {k}: {kinds:?}");
        }
    }

    #[test]
    fn each_once_visits_every_visitor_exactly_once() {
        let shop = shop();
        let mut t = Traffic::new(
            shop,
            1,
            Visitors::EachOnce {
                first: 1,
                count: 300,
                step: 2,
            },
            10,
            0,
        );
        let mut seen = std::collections::HashSet::new();
        let mut buf = Vec::new();
        while t.next_event(&mut buf).is_some() {}
        let text = String::from_utf8(buf).unwrap();
        for part in text.split("\"anonymousId\":\"a").skip(1) {
            let user: u64 = part[..part.find('"').unwrap()].parse().unwrap();
            assert_eq!(user % 2, 1);
            seen.insert(user);
        }
        assert_eq!(seen.len(), 300);
    }

    #[test]
    fn message_ids_are_patched_in_place() {
        let shop = shop();
        let mut t = Traffic::new(shop, 3, Visitors::Random { first: 0, count: 5 }, 5, 0);
        let mut batch = batches(&mut t, 3, 3).remove(0);
        batch.refresh_ids(0xabc);
        let v: serde_json::Value = serde_json::from_slice(&batch.body).unwrap();
        let id = v["batch"][1]["messageId"].as_str().unwrap();
        assert!(id.ends_with("0000000000000abd"), "{id}");
    }
}
