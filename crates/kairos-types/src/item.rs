//! Catalogue items and the log entries that carry events and catalogue changes.
//!
//! Catalogue changes travel through the event log like events do, so the state (catalogue
//! included) is always a function of the log: a snapshot plus replay restores it, and the Kafka
//! backend gets the same durability for free.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{ApiError, Code};
use crate::event::{Event, MAX_ID_LEN};

/// A catalogue item as upserted with `PUT /v1/items`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brand: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// Absent means in stock.
    #[serde(default = "default_true")]
    pub in_stock: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub attributes: Map<String, Value>,
}

fn default_true() -> bool {
    true
}

impl Item {
    /// Parses and validates one item of an upsert request.
    pub fn from_json(v: &Value) -> Result<Item, ApiError> {
        let mut v = v.clone();
        // Accept a numeric id as a string, as events do.
        if let Some(Value::Number(n)) = v.get("id") {
            let s = n.to_string();
            v["id"] = Value::String(s);
        }
        let item: Item = serde_json::from_value(v)
            .map_err(|e| ApiError::new(Code::InvalidItem, format!("invalid item: {e}")))?;
        if item.id.is_empty() || item.id.len() > MAX_ID_LEN {
            return Err(ApiError::new(
                Code::InvalidItem,
                format!("item `id` must be 1 to {MAX_ID_LEN} bytes"),
            ));
        }
        if item.price.is_some_and(|p| !p.is_finite() || p < 0.0) {
            return Err(ApiError::new(
                Code::InvalidItem,
                "item `price` must be >= 0",
            ));
        }
        Ok(item)
    }
}

/// One record of the event log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "snake_case")]
pub enum LogEntry {
    Event(Event),
    ItemUpsert(Item),
    ItemDelete { id: String, timestamp: i64 },
}

impl LogEntry {
    /// The key the log partitions by.
    pub fn partition_key(&self) -> &str {
        match self {
            LogEntry::Event(e) => e.partition_key(),
            LogEntry::ItemUpsert(item) => &item.id,
            LogEntry::ItemDelete { id, .. } => id,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("log entries always serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<LogEntry, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// Stable 64-bit FNV-1a hash, used for dedup ids: the value is stored on disk, so the algorithm
/// must never change (std's hashers are randomized or unspecified).
pub fn stable_hash64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separator so ("ab","c") and ("a","bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn item_validation() {
        let item = Item::from_json(&json!({"id": 7, "title": "T", "categories": ["a"]})).unwrap();
        assert_eq!(item.id, "7");
        assert!(item.in_stock);
        assert_eq!(
            Item::from_json(&json!({"id": ""})).unwrap_err().code,
            Code::InvalidItem
        );
        assert_eq!(
            Item::from_json(&json!({"id": "x", "price": "cheap"}))
                .unwrap_err()
                .code,
            Code::InvalidItem
        );
        assert_eq!(
            Item::from_json(&json!({"title": "no id"}))
                .unwrap_err()
                .code,
            Code::InvalidItem
        );
    }

    #[test]
    fn log_entry_round_trip() {
        let entry = LogEntry::ItemDelete {
            id: "i".into(),
            timestamp: 5,
        };
        assert_eq!(LogEntry::decode(&entry.encode()).unwrap(), entry);
    }

    #[test]
    fn stable_hash_is_stable() {
        assert_eq!(stable_hash64(&[b"a", b"bc"]), stable_hash64(&[b"a", b"bc"]));
        assert_ne!(stable_hash64(&[b"ab", b"c"]), stable_hash64(&[b"a", b"bc"]));
        assert_eq!(stable_hash64(&[]), 0xcbf2_9ce4_8422_2325);
    }
}
