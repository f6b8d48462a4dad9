//! The one table of API error codes.
//!
//! Every error Kairos returns over HTTP, for a whole request or for one event of a batch, carries a
//! stable `code` from [`Code`]. The table below is the single place that maps a code to its error
//! `type` and HTTP status, so clients (the tracker's retry logic above all) can rely on them: a
//! `invalid_request` error is never worth retrying, a `system` error is.

use serde::Serialize;

/// Base of the documentation link attached to every error.
pub const ERROR_DOCS_BASE: &str = "https://github.com/kairos-rs/kairos/blob/main/docs/ERRORS.md";

/// Broad class of an error, as returned in the `type` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// The client sent something wrong; retrying the same request will fail again.
    InvalidRequest,
    /// The server failed, is not ready or is overloaded; the request may be retried later.
    System,
}

impl ErrorType {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::InvalidRequest => "invalid_request",
            ErrorType::System => "system",
        }
    }
}

macro_rules! codes {
    ($($variant:ident => $name:literal, $ty:ident, $status:literal, $doc:literal;)*) => {
        /// A stable error code. The string form (`as_str`) is part of the public API.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Code { $(#[doc = $doc] $variant,)* }

        impl Code {
            /// Every code, in table order (used by docs and tests).
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self { $(Code::$variant => $name,)* }
            }

            pub fn error_type(self) -> ErrorType {
                match self { $(Code::$variant => ErrorType::$ty,)* }
            }

            /// The HTTP status of a request that fails as a whole with this code.
            pub fn http_status(self) -> u16 {
                match self { $(Code::$variant => $status,)* }
            }

            pub fn description(self) -> &'static str {
                match self { $(Code::$variant => $doc,)* }
            }
        }
    };
}

codes! {
    // Whole-request errors.
    MalformedJson => "malformed_json", InvalidRequest, 400, "The request body is not valid JSON or not the expected shape.";
    UnsupportedMediaType => "unsupported_media_type", InvalidRequest, 415, "The request body must be JSON (`Content-Type: application/json` or `text/plain` for beacons).";
    PayloadTooLarge => "payload_too_large", InvalidRequest, 413, "The request body is larger than the configured limit (`ingest.max_batch_bytes`, default 512 KiB).";
    TooManyEvents => "too_many_events", InvalidRequest, 413, "The batch has more events than the configured limit (`ingest.max_batch_events`, default 500).";
    EmptyBatch => "empty_batch", InvalidRequest, 400, "The batch holds no events.";
    InvalidParameter => "invalid_parameter", InvalidRequest, 400, "A query parameter has an invalid value.";
    MissingParameter => "missing_parameter", InvalidRequest, 400, "A required query parameter is missing.";
    UnknownScenario => "unknown_scenario", InvalidRequest, 400, "The recommendation scenario is not one of for_you, similar, bought_together, trending, recently_viewed.";
    ItemNotFound => "item_not_found", InvalidRequest, 404, "No catalogue item has this id.";
    InvalidItem => "invalid_item", InvalidRequest, 400, "A catalogue item is invalid (missing or too long id, wrong field type).";
    TooManyItems => "too_many_items", InvalidRequest, 413, "The catalogue upsert has more items than the configured limit (`ingest.max_items_per_request`).";
    RouteNotFound => "route_not_found", InvalidRequest, 404, "No API route has this path.";
    MethodNotAllowed => "method_not_allowed", InvalidRequest, 405, "The route exists but not for this HTTP method.";
    // Per-event errors (also the whole-request error of the single-event endpoints).
    EventTooLarge => "event_too_large", InvalidRequest, 413, "One event is larger than the configured limit (`ingest.max_event_bytes`, default 32 KiB).";
    InvalidEventType => "invalid_event_type", InvalidRequest, 400, "The event `type` is not one of track, page, identify, alias.";
    MissingIdentity => "missing_identity", InvalidRequest, 400, "The event has neither `userId` nor `anonymousId`.";
    MissingEventName => "missing_event_name", InvalidRequest, 400, "A `track` event has no `event` name.";
    MissingProductId => "missing_product_id", InvalidRequest, 400, "This e-commerce event needs `properties.product_id`.";
    MissingQuery => "missing_query", InvalidRequest, 400, "A `search` event needs `properties.query`.";
    InvalidProducts => "invalid_products", InvalidRequest, 400, "A `purchase` needs `properties.products` as a non-empty array of objects with `product_id`.";
    MissingRecId => "missing_rec_id", InvalidRequest, 400, "A `rec_impression` or `rec_click` event needs `properties.rec_id`.";
    MissingUserId => "missing_user_id", InvalidRequest, 400, "An `identify` or `alias` call needs `userId`.";
    MissingPreviousId => "missing_previous_id", InvalidRequest, 400, "An `alias` call needs `previousId`.";
    InvalidTimestamp => "invalid_timestamp", InvalidRequest, 400, "`timestamp` or `sentAt` is not an ISO-8601 date-time or epoch milliseconds.";
    InvalidField => "invalid_field", InvalidRequest, 400, "A field has the wrong type or is too long (ids at most 256 characters; properties, traits and context must be objects).";
    InvalidEvent => "invalid_event", InvalidRequest, 400, "The event is not a JSON object.";
    // Access (write keys and origins, `[[ingest.sources]]`).
    InvalidWriteKey => "invalid_write_key", InvalidRequest, 401, "The write key (HTTP Basic user name, or `writeKey` in the body) is not one of `[[ingest.sources]]`, or is missing while `ingest.require_write_key` is true.";
    OriginNotAllowed => "origin_not_allowed", InvalidRequest, 403, "The page's `Origin` is not in the `allowed_origins` of the write key's source (for a CORS preflight: of any source).";
    // Server side.
    Overloaded => "overloaded", System, 429, "The event log has more data waiting for the disk than `event_log.max_pending_mib`; nothing of the request was acknowledged. Retry after the `Retry-After` seconds.";
    LogUnavailable => "log_unavailable", System, 503, "The event log could not make the events durable; nothing of the request was acknowledged. Retry.";
    NotReady => "not_ready", System, 503, "The node is starting or shutting down.";
    StateUnavailable => "state_unavailable", System, 503, "An API replica (`kairos api`) could not read the profiles from Redis. Retry.";
}

/// An error as returned over HTTP: `{"message","code","type","link"}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    pub fn status(&self) -> u16 {
        self.code.http_status()
    }

    pub fn link(&self) -> String {
        format!("{ERROR_DOCS_BASE}#{}", self.code.as_str())
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "message": self.message,
            "code": self.code.as_str(),
            "type": self.code.error_type().as_str(),
            "link": self.link(),
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code.as_str())
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for code in Code::ALL {
            let name = code.as_str();
            assert!(seen.insert(name), "duplicate code {name}");
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            assert!((400..600).contains(&code.http_status()));
            // System errors are the retryable ones: 5xx, and 429 (retry after `Retry-After`).
            let system = code.error_type() == ErrorType::System;
            let status = code.http_status();
            assert_eq!(system, status >= 500 || status == 429, "{name}");
        }
    }

    #[test]
    fn json_shape() {
        let err = ApiError::new(Code::MalformedJson, "bad");
        let v = err.to_json();
        assert_eq!(v["code"], "malformed_json");
        assert_eq!(v["type"], "invalid_request");
        assert_eq!(v["message"], "bad");
        assert!(v["link"].as_str().unwrap().ends_with("#malformed_json"));
    }
}
