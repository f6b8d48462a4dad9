//! Catalogue items and the log entries that carry events and catalogue changes.
//!
//! Catalogue changes travel through the event log like events do, so the state (catalogue
//! included) is always a function of the log: a snapshot plus replay restores it, and the Kafka
//! backend gets the same durability for free.
//!
//! ## Log record format
//!
//! [`LogEntry::encode`] writes one byte `0xB1` followed by a [postcard] encoding of the entry in
//! which every JSON object (an event's `properties`, `traits` and `context`, a catalogue item) is
//! embedded as JSON text. Ingest encodes every event once and the processor decodes it on every
//! apply and every replay, so the format is chosen for that: decoding reads the fixed fields in
//! place and parses only `properties` (the one object the engine interprets); `context` and
//! `traits`, the bulk of a tracker call, stay text. [`LogEntry::decode`] also reads the first
//! format, one JSON object per record (`{"entry": "event", ...}`), which older logs hold; a JSON
//! record always starts with `{`, never with `0xB1`.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{ApiError, Code};
use crate::event::{CallType, Event, RawObject, MAX_ID_LEN};
use crate::model::ModelBatch;

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
    ItemDelete {
        id: String,
        timestamp: i64,
    },
    /// Model updates a processor replica published (the model topic; see [`crate::model`]).
    Model(ModelBatch),
}

impl LogEntry {
    /// The key the log partitions by.
    pub fn partition_key(&self) -> &str {
        match self {
            LogEntry::Event(e) => e.partition_key(),
            LogEntry::ItemUpsert(item) => &item.id,
            LogEntry::ItemDelete { id, .. } => id,
            LogEntry::Model(_) => "model",
        }
    }

    /// The record bytes (see the module docs for the format).
    pub fn encode(&self) -> Vec<u8> {
        let wire = match self {
            LogEntry::Event(e) => {
                let properties = if e.properties.is_empty() {
                    String::new()
                } else {
                    serde_json::to_string(&e.properties).expect("JSON maps serialize")
                };
                let event = WireEvent {
                    call: e.call,
                    event: e.event.as_str().into(),
                    message_id: e.message_id.as_str().into(),
                    user_id: e.user_id.as_deref(),
                    anonymous_id: e.anonymous_id.as_deref(),
                    previous_id: e.previous_id.as_deref(),
                    session_id: e.session_id.as_deref(),
                    timestamp: e.timestamp,
                    received_at: e.received_at,
                    properties: properties.as_str().into(),
                    traits: e.traits.get().into(),
                    context: e.context.get().into(),
                };
                return encode_wire(&Wire::Event(event));
            }
            LogEntry::ItemUpsert(item) => {
                Wire::ItemUpsert(serde_json::to_string(item).expect("items serialize").into())
            }
            LogEntry::ItemDelete { id, timestamp } => Wire::ItemDelete {
                id: id.as_str().into(),
                timestamp: *timestamp,
            },
            LogEntry::Model(batch) => Wire::Model(Cow::Borrowed(batch)),
        };
        encode_wire(&wire)
    }

    /// The record bytes of `LogEntry::Model(batch)`, without a copy of the batch.
    pub fn encode_model(batch: &ModelBatch) -> Vec<u8> {
        encode_wire(&Wire::Model(Cow::Borrowed(batch)))
    }

    /// Whether `bytes` (a record written by [`encode`](Self::encode)) holds an event, read from
    /// its first two bytes without decoding it: a processor that applies only some partitions'
    /// events skips the others' undecoded. `false` for the first (JSON) format, which is
    /// decoded to tell.
    pub fn is_encoded_event(bytes: &[u8]) -> bool {
        // postcard writes the variant index first, as a varint: `Wire::Event` is 0.
        bytes.len() >= 2 && bytes[0] == BINARY_V1 && bytes[1] == 0
    }

    /// Reads a record written by [`encode`](Self::encode), or by the first (JSON) format.
    pub fn decode(bytes: &[u8]) -> Result<LogEntry, DecodeError> {
        let Some(body) = bytes.strip_prefix(&[BINARY_V1]) else {
            return serde_json::from_slice(bytes).map_err(|e| DecodeError(e.to_string()));
        };
        let wire: Wire = postcard::from_bytes(body).map_err(|e| DecodeError(e.to_string()))?;
        let object = |text: &str| -> Result<Map<String, Value>, DecodeError> {
            if text.is_empty() {
                return Ok(Map::new());
            }
            serde_json::from_str(text).map_err(|e| DecodeError(e.to_string()))
        };
        Ok(match wire {
            Wire::Event(e) => LogEntry::Event(Event {
                call: e.call,
                event: e.event.into_owned(),
                message_id: e.message_id.into_owned(),
                user_id: e.user_id.map(str::to_owned),
                anonymous_id: e.anonymous_id.map(str::to_owned),
                previous_id: e.previous_id.map(str::to_owned),
                session_id: e.session_id.map(str::to_owned),
                timestamp: e.timestamp,
                received_at: e.received_at,
                properties: object(&e.properties)?,
                traits: RawObject::from_object_text(&e.traits),
                context: RawObject::from_object_text(&e.context),
            }),
            Wire::ItemUpsert(text) => LogEntry::ItemUpsert(
                serde_json::from_str(&text).map_err(|e| DecodeError(e.to_string()))?,
            ),
            Wire::ItemDelete { id, timestamp } => LogEntry::ItemDelete {
                id: id.into_owned(),
                timestamp,
            },
            Wire::Model(batch) => LogEntry::Model(batch.into_owned()),
        })
    }
}

/// The first byte of a binary (version 1) log record.
const BINARY_V1: u8 = 0xB1;

fn encode_wire(wire: &Wire) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(BINARY_V1);
    postcard::to_io(wire, &mut out).expect("writing to a vector cannot fail");
    out
}

/// A log record that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "undecodable log record: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

/// A log record as encoded: strings borrowed from the record, JSON objects as text.
#[derive(Serialize, Deserialize)]
enum Wire<'a> {
    Event(#[serde(borrow)] WireEvent<'a>),
    ItemUpsert(#[serde(borrow)] Cow<'a, str>),
    ItemDelete {
        #[serde(borrow)]
        id: Cow<'a, str>,
        timestamp: i64,
    },
    Model(Cow<'a, ModelBatch>),
}

#[derive(Serialize, Deserialize)]
struct WireEvent<'a> {
    call: CallType,
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    message_id: Cow<'a, str>,
    user_id: Option<&'a str>,
    anonymous_id: Option<&'a str>,
    previous_id: Option<&'a str>,
    session_id: Option<&'a str>,
    timestamp: i64,
    received_at: i64,
    /// JSON text; empty for no properties.
    #[serde(borrow)]
    properties: Cow<'a, str>,
    #[serde(borrow)]
    traits: Cow<'a, str>,
    #[serde(borrow)]
    context: Cow<'a, str>,
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
    fn a_model_batch_round_trips_as_a_log_record() {
        use crate::model::{LearnedAction, ModelOp};
        let delete = LogEntry::ItemDelete {
            id: "gone".into(),
            timestamp: 9,
        };
        let entry = LogEntry::Model(ModelBatch {
            partition: 3,
            clock: 1_000,
            entries: vec![
                (
                    41,
                    vec![ModelOp::Learn {
                        item: "p1".into(),
                        category: Some("shoes".into()),
                        brand: None,
                        price: Some(9.5),
                        action: LearnedAction::Cart,
                        ts: 1_000,
                        previous: vec!["p0".into()],
                        session_key: 77,
                    }],
                ),
                (42, Vec::new()),
                (
                    43,
                    vec![
                        ModelOp::Bought {
                            item: "p1".into(),
                            others: vec!["p2".into()],
                            ts: 1_000,
                        },
                        ModelOp::Catalog(delete.encode()),
                    ],
                ),
            ],
        });
        let bytes = entry.encode();
        assert!(!LogEntry::is_encoded_event(&bytes));
        assert_eq!(LogEntry::decode(&bytes).unwrap(), entry);
    }

    #[test]
    fn log_entry_round_trip() {
        let entry = LogEntry::ItemDelete {
            id: "i".into(),
            timestamp: 5,
        };
        assert_eq!(LogEntry::decode(&entry.encode()).unwrap(), entry);
        assert!(!LogEntry::is_encoded_event(&entry.encode()));
        let item = Item::from_json(&json!({"id": "x", "title": "T", "attributes": {"a": [1, 2]}}))
            .unwrap();
        let entry = LogEntry::ItemUpsert(item);
        assert_eq!(LogEntry::decode(&entry.encode()).unwrap(), entry);
        assert!(!LogEntry::is_encoded_event(&entry.encode()));
        let req = crate::RequestContext {
            received_at: 7,
            ..Default::default()
        };
        let raw = r#"{"type":"track","event":"product_view","userId":"u","messageId":"m",
            "properties":{"product_id":"p","price":2.5},"traits":{"plan":"pro"},
            "context":{"sessionId":"s","page":{"url":"https://x"}}}"#;
        let event = crate::normalize_json(raw, &req).unwrap();
        assert_eq!(event.session_id.as_deref(), Some("s"));
        let entry = LogEntry::Event(event);
        let bytes = entry.encode();
        assert_eq!(bytes[0], BINARY_V1);
        assert!(LogEntry::is_encoded_event(&bytes));
        assert!(!LogEntry::is_encoded_event(raw.as_bytes()));
        let back = LogEntry::decode(&bytes).unwrap();
        assert_eq!(back, entry);
        let LogEntry::Event(e) = back else {
            panic!("an event")
        };
        assert_eq!(e.context.to_map()["page"]["url"], "https://x");
        assert_eq!(e.traits.get(), r#"{"plan":"pro"}"#);
        assert!(LogEntry::decode(&[BINARY_V1, 9, 9]).is_err());
    }

    /// Logs written before the binary format hold one JSON object per record.
    #[test]
    fn decodes_json_records() {
        let legacy = br#"{"entry":"event","type":"track","event":"add_to_cart","messageId":"m1",
            "anonymousId":"a","timestamp":5,"receivedAt":6,"properties":{"product_id":"p"},
            "context":{"ip":"1.2.3.4"}}"#;
        let LogEntry::Event(e) = LogEntry::decode(legacy).unwrap() else {
            panic!("an event")
        };
        assert_eq!(
            (e.event.as_str(), e.timestamp, e.received_at),
            ("add_to_cart", 5, 6)
        );
        assert_eq!(e.product().unwrap().id, "p");
        assert_eq!(e.context.to_map()["ip"], "1.2.3.4");
        let legacy = br#"{"entry":"item_delete","id":"i","timestamp":3}"#;
        assert_eq!(
            LogEntry::decode(legacy).unwrap(),
            LogEntry::ItemDelete {
                id: "i".into(),
                timestamp: 3
            }
        );
    }

    #[test]
    fn stable_hash_is_stable() {
        assert_eq!(stable_hash64(&[b"a", b"bc"]), stable_hash64(&[b"a", b"bc"]));
        assert_ne!(stable_hash64(&[b"ab", b"c"]), stable_hash64(&[b"a", b"bc"]));
        assert_eq!(stable_hash64(&[]), 0xcbf2_9ce4_8422_2325);
    }
}
