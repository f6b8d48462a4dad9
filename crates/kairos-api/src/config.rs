//! Limits and behaviour of the HTTP API.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Events per batch; more is rejected whole with 413 `too_many_events`.
    pub max_batch_events: usize,
    /// Bytes per request body; more is rejected whole with 413 `payload_too_large`.
    pub max_batch_bytes: usize,
    /// Bytes per event: in a batch that event alone is rejected (`event_too_large`); on a
    /// single-event endpoint the request gets 413.
    pub max_event_bytes: usize,
    /// Items per `PUT /v1/items` request.
    pub max_items_per_request: usize,
    /// Bytes per `PUT /v1/items` request.
    pub max_items_bytes: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_batch_events: 500,
            max_batch_bytes: 512 * 1024,
            max_event_bytes: 32 * 1024,
            max_items_per_request: 1000,
            max_items_bytes: 8 * 1024 * 1024,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// How long a read waits for the processor to apply everything acknowledged before it
    /// (read-your-writes); after that it answers from the state as it is.
    pub read_your_writes_timeout_ms: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            read_your_writes_timeout_ms: 2000,
        }
    }
}
