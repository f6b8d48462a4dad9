//! Tracker ingest: `POST /v1/batch` and the single-call endpoints, and `POST /v1/validate`, which
//! checks a batch the same way but stores nothing.
//!
//! A batch is validated event by event: valid events are appended even when others are rejected,
//! and the answer lists each rejected event's index and code. The request is acknowledged only
//! after the log reports its events durable; a `messageId` seen before (within the log's dedup
//! window) is accepted and dropped, so tracker retries never double count. The write key (HTTP
//! Basic auth, or `writeKey` in the body) and the page's origin are checked by [`crate::access`]
//! before any event is looked at.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::Json;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use kairos_log::{AppendOutcome, AppendRecord};
use kairos_types::event::EventKind;
use kairos_types::{
    normalize_json, stable_hash64, ApiError, CallType, Code, Event, LogEntry, RequestContext,
};

use crate::error::{ApiResult, HttpError};
use crate::pending::PendingWrites;
use crate::AppState;

/// Reads a request body up to `limit` bytes, rejecting larger ones with 413 `code`.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    code: Code,
) -> ApiResult<Bytes> {
    if let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        let ct = ct.to_ascii_lowercase();
        if !(ct.starts_with("application/json")
            || ct.starts_with("text/plain")
            || ct.contains("+json"))
        {
            return Err(HttpError::new(
                Code::UnsupportedMediaType,
                format!("content type {ct:?} is not JSON"),
            ));
        }
    }
    let too_large = || HttpError::new(code, format!("the request body exceeds {limit} bytes"));
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(too_large());
        }
    }
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large())
}

fn malformed(e: serde_json::Error) -> HttpError {
    HttpError::new(Code::MalformedJson, format!("malformed JSON: {e}"))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    #[serde(borrow)]
    batch: Vec<&'a RawValue>,
    #[serde(default)]
    sent_at: Option<Value>,
    #[serde(default)]
    context: Option<Map<String, Value>>,
    /// The source's write key, for clients that cannot set headers (`sendBeacon`).
    #[serde(default)]
    write_key: Option<String>,
}

/// The `writeKey` of a single-event body.
#[derive(Deserialize)]
struct BodyKey {
    #[serde(default, rename = "writeKey")]
    write_key: Option<String>,
}

fn request_context(received_at: i64, call: Option<CallType>) -> RequestContext {
    RequestContext {
        received_at,
        sent_at: None,
        call,
        context: Map::new(),
        fallback_message_id: String::new(),
    }
}

/// A per-request generator of message ids for events that carry none.
fn fallback_id(received_at: i64, index: usize) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("kairos-{received_at:x}-{n:x}-{index}")
}

/// The outcome of appending validated events.
struct Appended {
    accepted: usize,
    duplicates: usize,
}

async fn append_events(app: &AppState, events: Vec<(Event, bool)>) -> ApiResult<Appended> {
    if events.is_empty() {
        return Ok(Appended {
            accepted: 0,
            duplicates: 0,
        });
    }
    // The person ids of each event, for read-your-writes (see `pending`).
    let buckets: Vec<[Option<usize>; 3]> = events
        .iter()
        .map(|(e, _)| {
            [&e.user_id, &e.anonymous_id, &e.previous_id]
                .map(|id| id.as_deref().map(PendingWrites::bucket_of))
        })
        .collect();
    let records = events
        .into_iter()
        .map(|(event, client_id)| {
            let key = event.partition_key();
            // Retries carry the same messageId; generated ids are unique, nothing to dedup.
            let dedup_id = if client_id {
                stable_hash64(&[key.as_bytes(), event.message_id.as_bytes()])
            } else {
                0
            };
            // Purchases also go to the log's transactions stream, where it keeps one.
            let transaction = (event.kind() == EventKind::Purchase)
                .then(|| serde_json::to_vec(&event).expect("an event serializes"));
            AppendRecord {
                key: key.as_bytes().to_vec(),
                // Ingestion time, not the client's event time: the log's dedup window and
                // retention are about when Kairos received a record (like Kafka's LogAppendTime).
                timestamp_ms: event.received_at,
                dedup_id,
                payload: LogEntry::Event(event).encode(),
                transaction,
            }
        })
        .collect();
    let outcomes = app
        .log
        .append(records)
        .await
        .map_err(|e| HttpError::from_log(&e, "events"))?;
    for (ids, outcome) in buckets.iter().zip(&outcomes) {
        if let AppendOutcome::Appended { seq, .. } = outcome {
            for &bucket in ids.iter().flatten() {
                app.pending.note_event(bucket, *seq);
            }
        }
    }
    let duplicates = outcomes
        .iter()
        .filter(|o| matches!(o, AppendOutcome::Duplicate))
        .count();
    let accepted = outcomes.len() - duplicates;
    app.metrics.events_accepted.add(accepted as u64);
    app.metrics.events_duplicate.add(duplicates as u64);
    Ok(Appended {
        accepted,
        duplicates,
    })
}

pub(crate) async fn batch(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let started = Instant::now();
    let result = async {
        let checked = check_batch(&app, &headers, body).await?;
        for &code in &checked.rejected_codes {
            app.metrics.rejected(code);
        }
        let appended = append_events(&app, checked.valid).await?;
        Ok::<_, HttpError>(Json(json!({
            "accepted": appended.accepted,
            "duplicates": appended.duplicates,
            "rejected": checked.rejected,
        })))
    }
    .await;
    app.metrics.ingest_latency.observe(started.elapsed());
    if let Err(e) = &result {
        app.metrics.requests_failed.inc();
        app.metrics.rejected(e.0.code);
    }
    result
}

/// `POST /v1/validate`: checks a batch exactly as `/v1/batch` does (limits, envelope, every event)
/// and answers with the same per-event verdicts, but stores nothing. Tracker integrations use it
/// to test their events; `kairos bench` uses it as the HTTP + JSON ceiling of ingest.
pub(crate) async fn validate(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let checked = check_batch(&app, &headers, body).await?;
    Ok(Json(json!({
        "valid": checked.valid.len(),
        "rejected": checked.rejected,
    })))
}

/// A batch after validation: the valid events (with whether the client sent the message id) and
/// the verdicts (and codes, for the metrics) of the rejected ones.
struct CheckedBatch {
    valid: Vec<(Event, bool)>,
    rejected: Vec<Value>,
    rejected_codes: Vec<Code>,
}

async fn check_batch(app: &AppState, headers: &HeaderMap, body: Body) -> ApiResult<CheckedBatch> {
    let limits = &app.ingest;
    let bytes = read_body(headers, body, limits.max_batch_bytes, Code::PayloadTooLarge).await?;
    let received_at = kairos_types::time::now_ms();
    // A bare array is accepted as well as Segment's `{"batch": [...]}`.
    let envelope: Envelope = if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        Envelope {
            batch: serde_json::from_slice(&bytes).map_err(malformed)?,
            sent_at: None,
            context: None,
            write_key: None,
        }
    } else {
        serde_json::from_slice(&bytes).map_err(malformed)?
    };
    app.access
        .authorize(headers, envelope.write_key.as_deref())?;
    if envelope.batch.is_empty() {
        return Err(HttpError::new(
            Code::EmptyBatch,
            "the batch holds no events",
        ));
    }
    if envelope.batch.len() > limits.max_batch_events {
        return Err(HttpError::new(
            Code::TooManyEvents,
            format!(
                "the batch has {} events; the limit is {}",
                envelope.batch.len(),
                limits.max_batch_events
            ),
        ));
    }
    let mut ctx = request_context(received_at, None);
    match &envelope.sent_at {
        None | Some(Value::Null) => {}
        Some(sent) => {
            ctx.sent_at = Some(parse_time(sent).ok_or_else(|| {
                HttpError::new(
                    Code::InvalidTimestamp,
                    "`sentAt` must be an ISO-8601 date-time or epoch milliseconds",
                )
            })?);
        }
    }
    if let Some(c) = envelope.context {
        ctx.context = c;
    }
    let mut rejected = Vec::new();
    let mut rejected_codes = Vec::new();
    let mut valid = Vec::with_capacity(envelope.batch.len());
    for (index, raw) in envelope.batch.iter().enumerate() {
        match validate_one(raw, &mut ctx, limits.max_event_bytes, index) {
            Ok(ok) => valid.push(ok),
            Err(e) => {
                rejected_codes.push(e.code);
                rejected
                    .push(json!({"index": index, "code": e.code.as_str(), "message": e.message}));
            }
        }
    }
    Ok(CheckedBatch {
        valid,
        rejected,
        rejected_codes,
    })
}

fn parse_time(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => kairos_types::time::parse_rfc3339_ms(s),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// Validates one raw event; returns it with whether the client supplied its messageId.
fn validate_one(
    raw: &RawValue,
    ctx: &mut RequestContext,
    max_bytes: usize,
    index: usize,
) -> Result<(Event, bool), ApiError> {
    if raw.get().len() > max_bytes {
        return Err(ApiError::new(
            Code::EventTooLarge,
            format!(
                "the event is {} bytes; the limit is {max_bytes}",
                raw.get().len()
            ),
        ));
    }
    ctx.fallback_message_id = fallback_id(ctx.received_at, index);
    let event = normalize_json(raw.get(), ctx)?;
    let client_id = event.message_id != ctx.fallback_message_id;
    Ok((event, client_id))
}

async fn single(
    app: Arc<AppState>,
    headers: HeaderMap,
    body: Body,
    call: CallType,
) -> ApiResult<Json<Value>> {
    let started = Instant::now();
    let result = async {
        let max = app.ingest.max_event_bytes;
        let bytes = read_body(&headers, body, max, Code::EventTooLarge).await?;
        let raw: &RawValue = serde_json::from_slice(&bytes).map_err(malformed)?;
        let body_key = serde_json::from_str::<BodyKey>(raw.get())
            .ok()
            .and_then(|k| k.write_key);
        app.access.authorize(&headers, body_key.as_deref())?;
        let mut ctx = request_context(kairos_types::time::now_ms(), Some(call));
        let (event, client_id) = validate_one(raw, &mut ctx, max, 0)?;
        if event.call != call {
            return Err(HttpError::new(
                Code::InvalidEventType,
                format!("this endpoint takes {call:?} calls, not {:?}", event.call).to_lowercase(),
            ));
        }
        let appended = append_events(&app, vec![(event, client_id)]).await?;
        Ok(Json(json!({
            "accepted": appended.accepted,
            "duplicates": appended.duplicates,
            "rejected": [],
        })))
    }
    .await;
    app.metrics.ingest_latency.observe(started.elapsed());
    if let Err(e) = &result {
        app.metrics.requests_failed.inc();
        app.metrics.rejected(e.0.code);
    }
    result
}

pub(crate) async fn track(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    single(app, headers, body, CallType::Track).await
}

pub(crate) async fn page(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    single(app, headers, body, CallType::Page).await
}

pub(crate) async fn identify(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    single(app, headers, body, CallType::Identify).await
}

pub(crate) async fn alias(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    single(app, headers, body, CallType::Alias).await
}
