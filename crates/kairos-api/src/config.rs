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
    /// Whether event ingest needs a write key. When false, requests without one are accepted
    /// (curl, server-side integrations); a key that is given is always checked.
    pub require_write_key: bool,
    /// The sources that send events, each with its public write key and the web origins its key
    /// may be used from (see [`crate::access`]).
    pub sources: Vec<SourceConfig>,
}

/// One source of events (a site, an app): `[[ingest.sources]]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// A name for logs and people.
    pub name: String,
    /// The public, ingest-only key its tracker sends.
    pub write_key: String,
    /// Origins whose pages may send this key: `https://shop.example`, `https://*.example.com`
    /// (any subdomain), `http://localhost:*` (any port) or `*` (any). The node's own origin is
    /// always allowed.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

impl IngestConfig {
    /// Checks the sources: non-empty unique write keys and well-formed origin patterns.
    pub fn validate(&self) -> Result<(), String> {
        let mut keys = std::collections::HashSet::new();
        for s in &self.sources {
            if s.write_key.is_empty() {
                return Err(format!("ingest.sources {:?}: write_key is empty", s.name));
            }
            if !keys.insert(s.write_key.as_str()) {
                return Err(format!(
                    "ingest.sources {:?}: write_key is used by another source",
                    s.name
                ));
            }
            for origin in &s.allowed_origins {
                crate::access::OriginPattern::parse(origin)
                    .map_err(|e| format!("ingest.sources {:?}: {e}", s.name))?;
            }
        }
        Ok(())
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_batch_events: 500,
            max_batch_bytes: 512 * 1024,
            max_event_bytes: 32 * 1024,
            max_items_per_request: 1000,
            max_items_bytes: 8 * 1024 * 1024,
            require_write_key: false,
            sources: vec![SourceConfig {
                name: "demo".into(),
                write_key: "demo".into(),
                allowed_origins: vec![
                    "http://localhost:*".into(),
                    "http://127.0.0.1:*".into(),
                    "http://[::1]:*".into(),
                ],
            }],
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// How long a read waits for the processor to apply the acknowledged events of the person it
    /// names (read-your-writes); after that it answers from the state as it is.
    pub read_your_writes_timeout_ms: u64,
    /// How long a read that names a person then waits, at most, for everything else acknowledged
    /// before it (other people's events). 0, the default, waits for nothing more: a read's
    /// latency then never includes the processor's lag behind other people's traffic (a burst of
    /// ingest, a cache refresh), which is what keeps it at a millisecond under load.
    pub read_others_writes_timeout_ms: u64,
    /// How long an API replica (`kairos api`) caches an answer; it is dropped sooner when a
    /// profile it was built from changes (see `replica`).
    pub cache_ttl_ms: u64,
    /// Answers an API replica caches at most.
    pub cache_max_entries: usize,
    /// How often API replicas save their model in Redis, taking turns (0: never), so that a
    /// replica starting later begins from the newest save instead of the model topic's first
    /// record (see `kairos_state::redis_model`).
    pub model_save_secs: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            read_your_writes_timeout_ms: 2000,
            read_others_writes_timeout_ms: 0,
            cache_ttl_ms: 2000,
            model_save_secs: 300,
            cache_max_entries: 100_000,
        }
    }
}
