//! Model updates: what a processor replica learnt from the events of its partitions, for the API
//! replicas (`kairos api`) that serve from the whole model without holding any profile.
//!
//! ## Why a stream of updates rather than the events
//! What an event teaches the model (item statistics, co-visitation, bought-together, the session
//! model) depends on the profile it lands in: the items seen earlier in the same session, the
//! session's identity, the cart. Profiles live in Redis and are applied by the replica owning
//! their partition, so only that replica can work out the update. It publishes it, item names
//! instead of its own numbering, and every API replica applies the same updates in the same
//! order per partition, so its model equals the one a single node would build from the log.
//!
//! ## Exactly once
//! Each update carries the events-topic position of the entry it came from. A replica that takes
//! a partition over re-applies it from the group's committed offset and publishes those updates
//! again; a reader skips every update at or below the last position it applied for that
//! partition (`State::apply_model` in kairos-state). The updates of one partition are published
//! in order, keyed by partition, so they stay in order on the model topic.

use serde::{Deserialize, Serialize};

/// The model updates of a run of consecutive entries of one events-topic partition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelBatch {
    /// The events-topic partition the entries are in.
    pub partition: u32,
    /// The publishing replica's event clock (newest event time applied) after these entries.
    pub clock: i64,
    /// Per entry, in offset order: its offset and the updates it made (possibly none).
    pub entries: Vec<(u64, Vec<ModelOp>)>,
}

/// How an interaction weighs in the model (the profile's action, see kairos-state).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LearnedAction {
    View,
    Click,
    Cart,
    Purchase,
}

/// One update of the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ModelOp {
    /// An interaction with `item`: its statistics, its co-visitation with `previous` (the
    /// session's earlier distinct items, most recent first) and the session model's session
    /// `session_key`. `category`, `brand` and `price` are what the event said of the item, which
    /// the model keeps until the catalogue says otherwise.
    Learn {
        item: String,
        category: Option<String>,
        brand: Option<String>,
        price: Option<f64>,
        action: LearnedAction,
        ts: i64,
        previous: Vec<String>,
        session_key: u64,
    },
    /// `item` bought (or put in the cart) together with `others`.
    Bought {
        item: String,
        others: Vec<String>,
        ts: i64,
    },
    /// A catalogue change, as its log record (`LogEntry::encode` of an upsert or a delete).
    Catalog(Vec<u8>),
}

impl ModelBatch {
    /// How many updates the batch holds.
    pub fn ops(&self) -> usize {
        self.entries.iter().map(|(_, ops)| ops.len()).sum()
    }
}
