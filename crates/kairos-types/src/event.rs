//! The event model: Segment-compatible calls normalized into one [`Event`].
//!
//! Trackers (Segment's analytics.js, RudderStack, Snowplow bridges and our own `sdk/js`) send
//! `track`, `page`, `identify` and `alias` calls. Validation turns each raw JSON call into a
//! normalized [`Event`] or a per-event [`ApiError`]; only normalized events reach the log, so the
//! processor never has to re-validate. E-commerce events follow Segment's e-commerce spec: the item
//! an event concerns is `properties.product_id`, and a purchase lists `properties.products[]`.
//! Segment's own event names ("Product Viewed", "Order Completed", ...) are mapped to Kairos's
//! canonical names (`product_view`, `purchase`, ...) so either vocabulary works.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{ApiError, Code};
use crate::time::parse_rfc3339_ms;

/// Longest accepted id (user, anonymous, message, product, session ...), in bytes.
pub const MAX_ID_LEN: usize = 256;

/// The Segment call type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallType {
    Track,
    Page,
    Identify,
    Alias,
}

impl CallType {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "track" => Some(CallType::Track),
            "page" | "screen" => Some(CallType::Page),
            "identify" => Some(CallType::Identify),
            "alias" => Some(CallType::Alias),
            _ => None,
        }
    }
}

/// What an event means to the engine. Unknown `track` names are [`EventKind::Custom`]: they are
/// stored and counted but do not change recommendations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    PageView,
    ProductView,
    Click,
    Search,
    AddToCart,
    RemoveFromCart,
    Purchase,
    RecImpression,
    RecClick,
    Identify,
    Alias,
    Custom,
}

impl EventKind {
    /// Maps a canonical Kairos name or a Segment e-commerce spec name to a kind.
    pub fn from_name(name: &str) -> EventKind {
        match name {
            "page_view" | "Page Viewed" => EventKind::PageView,
            "product_view" | "Product Viewed" | "view_item" => EventKind::ProductView,
            "click" | "Product Clicked" | "select_item" => EventKind::Click,
            "search" | "Products Searched" => EventKind::Search,
            "add_to_cart" | "Product Added" => EventKind::AddToCart,
            "remove_from_cart" | "Product Removed" => EventKind::RemoveFromCart,
            "purchase" | "Order Completed" => EventKind::Purchase,
            "rec_impression" => EventKind::RecImpression,
            "rec_click" => EventKind::RecClick,
            "identify" => EventKind::Identify,
            "alias" => EventKind::Alias,
            _ => EventKind::Custom,
        }
    }

    pub fn canonical_name(self) -> Option<&'static str> {
        Some(match self {
            EventKind::PageView => "page_view",
            EventKind::ProductView => "product_view",
            EventKind::Click => "click",
            EventKind::Search => "search",
            EventKind::AddToCart => "add_to_cart",
            EventKind::RemoveFromCart => "remove_from_cart",
            EventKind::Purchase => "purchase",
            EventKind::RecImpression => "rec_impression",
            EventKind::RecClick => "rec_click",
            EventKind::Identify => "identify",
            EventKind::Alias => "alias",
            EventKind::Custom => return None,
        })
    }
}

/// A validated, normalized event: what the log stores and the processor applies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    #[serde(rename = "type")]
    pub call: CallType,
    /// Canonical event name (`product_view`, `purchase`, ...) or the custom name as sent.
    pub event: String,
    pub message_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Event time in epoch ms, corrected for client clock skew with `sentAt` as Segment does.
    pub timestamp: i64,
    /// Server receive time in epoch ms.
    pub received_at: i64,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub properties: Map<String, Value>,
    /// The `traits` object as sent (stored, never interpreted).
    #[serde(default, skip_serializing_if = "RawObject::is_empty")]
    pub traits: RawObject,
    /// The `context` object as sent, merged over the batch's (stored; only `sessionId` is read,
    /// at validation).
    #[serde(default, skip_serializing_if = "RawObject::is_empty")]
    pub context: RawObject,
}

/// The JSON text of an object an event carries through untouched (`context`, `traits`).
///
/// The engine never looks inside these objects after validation, so they travel from the request
/// to the log and back as text: building a JSON tree for them on every ingest and again on every
/// replay was about a third of the cost of the event path. An empty or absent object is `{}`.
/// Equality is semantic (the same JSON value), whatever the key order or spacing of the texts.
#[derive(Clone, Debug, Default)]
pub struct RawObject(Option<Box<str>>);

impl RawObject {
    /// Wraps the text of a JSON object (the caller guarantees it is one).
    pub(crate) fn from_object_text(text: &str) -> RawObject {
        let trimmed = text.trim();
        if trimmed.len() <= 2 && trimmed.starts_with('{') {
            return RawObject(None);
        }
        RawObject(Some(trimmed.into()))
    }

    pub fn from_map(map: &Map<String, Value>) -> RawObject {
        if map.is_empty() {
            return RawObject(None);
        }
        RawObject(Some(
            serde_json::to_string(map)
                .expect("JSON maps serialize")
                .into(),
        ))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// The JSON text (`{}` when empty).
    pub fn get(&self) -> &str {
        self.0.as_deref().unwrap_or("{}")
    }

    /// The object parsed into a map.
    pub fn to_map(&self) -> Map<String, Value> {
        serde_json::from_str(self.get()).unwrap_or_default()
    }
}

impl PartialEq for RawObject {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get() || self.to_map() == other.to_map()
    }
}

impl Serialize for RawObject {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            let raw = serde_json::value::RawValue::from_string(self.get().to_owned())
                .map_err(serde::ser::Error::custom)?;
            raw.serialize(s)
        } else {
            s.serialize_str(self.get())
        }
    }
}

impl<'de> Deserialize<'de> for RawObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            // Through a JSON tree: this also works inside internally tagged enums (legacy log
            // records), where serde buffers values and raw JSON cannot be borrowed.
            match Value::deserialize(d)? {
                Value::Null => Ok(RawObject(None)),
                Value::Object(m) => Ok(RawObject::from_map(&m)),
                _ => Err(serde::de::Error::custom("expected a JSON object")),
            }
        } else {
            let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            Ok(RawObject::from_object_text(&text))
        }
    }
}

/// One product an event concerns.
#[derive(Clone, Debug, PartialEq)]
pub struct ProductRef {
    pub id: String,
    pub category: Option<String>,
    pub brand: Option<String>,
    pub price: Option<f64>,
    pub quantity: f64,
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self.call {
            CallType::Page => EventKind::PageView,
            CallType::Identify => EventKind::Identify,
            CallType::Alias => EventKind::Alias,
            CallType::Track => EventKind::from_name(&self.event),
        }
    }

    /// The key that orders this event: the user id when known, else the anonymous id. The log
    /// partitions by it, so one person's events stay in order.
    pub fn partition_key(&self) -> &str {
        self.user_id
            .as_deref()
            .or(self.anonymous_id.as_deref())
            .unwrap_or("")
    }

    /// The product the event concerns (`properties.product_id` and friends), if any.
    pub fn product(&self) -> Option<ProductRef> {
        product_from(&self.properties)
    }

    /// Products of a purchase (`properties.products[]`), or the single product of other events.
    pub fn products(&self) -> Vec<ProductRef> {
        match self.properties.get("products").and_then(Value::as_array) {
            Some(list) => list
                .iter()
                .filter_map(|p| p.as_object().and_then(product_from))
                .collect(),
            None => self.product().into_iter().collect(),
        }
    }

    pub fn str_property(&self, name: &str) -> Option<&str> {
        self.properties.get(name).and_then(Value::as_str)
    }

    pub fn num_property(&self, name: &str) -> Option<f64> {
        self.properties.get(name).and_then(as_number)
    }

    pub fn query(&self) -> Option<&str> {
        self.str_property("query")
    }

    pub fn rec_id(&self) -> Option<&str> {
        self.str_property("rec_id")
    }

    /// Order revenue: `revenue`, else `total`, else the sum of product price × quantity.
    pub fn revenue(&self) -> Option<f64> {
        self.num_property("revenue")
            .or_else(|| self.num_property("total"))
            .or_else(|| {
                let products = self.products();
                let priced: Vec<_> = products
                    .iter()
                    .filter_map(|p| Some(p.price? * p.quantity))
                    .collect();
                (!priced.is_empty()).then(|| priced.iter().sum())
            })
    }
}

fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Ids arrive as strings or numbers; both are kept as strings.
fn as_id(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() && s.len() <= MAX_ID_LEN => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn product_from(p: &Map<String, Value>) -> Option<ProductRef> {
    let id = p
        .get("product_id")
        .or_else(|| p.get("productId"))
        .or_else(|| p.get("item_id"))
        .or_else(|| p.get("sku"))
        .and_then(as_id)?;
    let text = |k: &str| p.get(k).and_then(Value::as_str).map(str::to_owned);
    Some(ProductRef {
        id,
        category: text("category"),
        brand: text("brand"),
        price: p.get("price").and_then(as_number),
        quantity: p
            .get("quantity")
            .and_then(as_number)
            .filter(|q| *q > 0.0)
            .unwrap_or(1.0),
    })
}

/// Parses an id field: absent/null is `None`; a non-id value is an error.
fn id_field(obj: &Map<String, Value>, names: &[&str]) -> Result<Option<String>, ApiError> {
    first_id(names.iter().map(|&name| (name, obj.get(name))))
}

/// The first present (non-null) candidate as an id; `None` when none is present.
fn first_id<'v>(
    candidates: impl IntoIterator<Item = (&'v str, Option<&'v Value>)>,
) -> Result<Option<String>, ApiError> {
    for (name, value) in candidates {
        match value {
            None | Some(Value::Null) => continue,
            Some(v) => {
                return as_id(v).map(Some).ok_or_else(|| {
                    ApiError::new(
                        Code::InvalidField,
                        format!(
                            "`{name}` must be a non-empty string of at most {MAX_ID_LEN} bytes"
                        ),
                    )
                })
            }
        }
    }
    Ok(None)
}

fn object_field(obj: &Map<String, Value>, name: &str) -> Result<Map<String, Value>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m.clone()),
        Some(_) => Err(ApiError::new(
            Code::InvalidField,
            format!("`{name}` must be an object"),
        )),
    }
}

fn time_field(obj: &Map<String, Value>, name: &str) -> Result<Option<i64>, ApiError> {
    let bad = || {
        ApiError::new(
            Code::InvalidTimestamp,
            format!("`{name}` must be an ISO-8601 date-time or epoch milliseconds"),
        )
    };
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_rfc3339_ms(s).map(Some).ok_or_else(bad),
        Some(Value::Number(n)) => n.as_i64().filter(|v| *v >= 0).map(Some).ok_or_else(bad),
        Some(_) => Err(bad()),
    }
}

/// Context a whole request shares: its receive time, the batch-level `sentAt` and `context`, and
/// the call type implied by a single-call endpoint (`/v1/track` ...).
#[derive(Clone, Debug, Default)]
pub struct RequestContext {
    pub received_at: i64,
    pub sent_at: Option<i64>,
    pub call: Option<CallType>,
    pub context: Map<String, Value>,
    /// Generates a message id for calls that have none (no dedup is then possible).
    pub fallback_message_id: String,
}

fn not_an_object() -> ApiError {
    ApiError::new(Code::InvalidEvent, "an event must be a JSON object")
}

/// Validates and normalizes one raw call given as a JSON tree.
pub fn normalize(raw: &Value, req: &RequestContext) -> Result<Event, ApiError> {
    let obj = raw.as_object().ok_or_else(not_an_object)?;
    let context = object_field(obj, "context").map(|event_context| {
        let mut merged = req.context.clone();
        merged.extend(event_context);
        let session = (
            merged.get("sessionId").cloned(),
            merged.get("session_id").cloned(),
        );
        (RawObject::from_map(&merged), session)
    });
    let parts = Parts {
        properties: object_field(obj, "properties"),
        traits: object_field(obj, "traits").map(|t| RawObject::from_map(&t)),
        context,
    };
    normalize_fields(obj, parts, req)
}

/// Validates and normalizes one raw call given as JSON text: the same rules and results as
/// [`normalize`], without ever building a tree of `context` or `traits` (the largest and never
/// interpreted parts of a tracker call), which keeps ingest cheap.
pub fn normalize_json(raw: &str, req: &RequestContext) -> Result<Event, ApiError> {
    let split: SplitCall = serde_json::from_str(raw).map_err(|e| {
        if e.is_data() {
            not_an_object()
        } else {
            ApiError::new(Code::InvalidEvent, format!("invalid event: {e}"))
        }
    })?;
    let mut obj = split.top;
    let properties = match obj.remove("properties") {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m),
        Some(_) => Err(not_object_field("properties")),
    };
    let context = match split.context {
        Some(Err(())) => Err(not_object_field("context")),
        Some(Ok(text)) if !req.context.is_empty() => {
            let mut merged = req.context.clone();
            merged.extend(RawObject::from_object_text(text).to_map());
            let session = (
                merged.get("sessionId").cloned(),
                merged.get("session_id").cloned(),
            );
            Ok((RawObject::from_map(&merged), session))
        }
        Some(Ok(text)) => session_keys(text)
            .map(|session| (RawObject::from_object_text(text), session))
            .map_err(|_| not_object_field("context")),
        None => {
            let session = (
                req.context.get("sessionId").cloned(),
                req.context.get("session_id").cloned(),
            );
            Ok((RawObject::from_map(&req.context), session))
        }
    };
    let traits = match split.traits {
        Some(Err(())) => Err(not_object_field("traits")),
        Some(Ok(text)) => Ok(RawObject::from_object_text(text)),
        None => Ok(RawObject::default()),
    };
    let parts = Parts {
        properties,
        traits,
        context,
    };
    normalize_fields(&obj, parts, req)
}

fn not_object_field(name: &str) -> ApiError {
    ApiError::new(Code::InvalidField, format!("`{name}` must be an object"))
}

/// `context.sessionId` and `context.session_id` (absent: `None`).
type ContextSession = (Option<Value>, Option<Value>);

/// The parts of a call [`normalize_fields`] takes already extracted, each with its validation
/// error (reported in the same order as the fields are checked).
struct Parts {
    properties: Result<Map<String, Value>, ApiError>,
    traits: Result<RawObject, ApiError>,
    /// The event's context merged over the batch's, and its session id fields.
    context: Result<(RawObject, ContextSession), ApiError>,
}

/// A call split into its top-level fields (as JSON values) and the raw text of `context` and
/// `traits` (`Err(())` when present but not an object or null). Duplicate keys keep the last
/// value, as a JSON tree would.
struct SplitCall<'a> {
    top: Map<String, Value>,
    context: Option<Result<&'a str, ()>>,
    traits: Option<Result<&'a str, ()>>,
}

/// Classifies the raw text of an object-typed field.
fn object_text(raw: &serde_json::value::RawValue) -> Option<Result<&str, ()>> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'{') => Some(Ok(text)),
        Some(b'n') => None,
        _ => Some(Err(())),
    }
}

impl<'de> Deserialize<'de> for SplitCall<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = SplitCall<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut call = SplitCall {
                    top: Map::new(),
                    context: None,
                    traits: None,
                };
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "context" => {
                            let raw: &'de serde_json::value::RawValue = map.next_value()?;
                            call.context = object_text(raw);
                        }
                        "traits" => {
                            let raw: &'de serde_json::value::RawValue = map.next_value()?;
                            call.traits = object_text(raw);
                        }
                        _ => {
                            let value: Value = map.next_value()?;
                            call.top.insert(key, value);
                        }
                    }
                }
                Ok(call)
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// Reads `sessionId` and `session_id` out of the JSON text of a context object, skipping
/// everything else without building or allocating it.
fn session_keys(text: &str) -> Result<ContextSession, serde_json::Error> {
    enum Key {
        Camel,
        Snake,
        Other,
    }
    impl<'de> Deserialize<'de> for Key {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl serde::de::Visitor<'_> for Visitor {
                type Value = Key;

                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a key")
                }

                fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Key, E> {
                    Ok(match key {
                        "sessionId" => Key::Camel,
                        "session_id" => Key::Snake,
                        _ => Key::Other,
                    })
                }
            }
            d.deserialize_identifier(Visitor)
        }
    }
    struct Keys(ContextSession);
    impl<'de> Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl<'de> serde::de::Visitor<'de> for Visitor {
                type Value = Keys;

                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }

                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Keys, A::Error> {
                    let mut keys = Keys((None, None));
                    while let Some(key) = map.next_key::<Key>()? {
                        match key {
                            Key::Camel => keys.0 .0 = Some(map.next_value()?),
                            Key::Snake => keys.0 .1 = Some(map.next_value()?),
                            Key::Other => {
                                map.next_value::<serde::de::IgnoredAny>()?;
                            }
                        }
                    }
                    Ok(keys)
                }
            }
            d.deserialize_map(Visitor)
        }
    }
    serde_json::from_str::<Keys>(text).map(|k| k.0)
}

/// The rules shared by [`normalize`] and [`normalize_json`]: `obj` holds the call's top-level
/// fields (whatever it holds under `properties`, `traits` and `context` is ignored: those come
/// validated in `parts`).
fn normalize_fields(
    obj: &Map<String, Value>,
    parts: Parts,
    req: &RequestContext,
) -> Result<Event, ApiError> {
    let call = match obj.get("type") {
        Some(Value::String(t)) => CallType::parse(t).ok_or_else(|| {
            ApiError::new(
                Code::InvalidEventType,
                format!("`type` must be track, page, identify or alias, not {t:?}"),
            )
        })?,
        Some(Value::Null) | None => req
            .call
            .ok_or_else(|| ApiError::new(Code::InvalidEventType, "the event has no `type`"))?,
        Some(_) => {
            return Err(ApiError::new(
                Code::InvalidEventType,
                "`type` must be a string",
            ))
        }
    };
    let user_id = id_field(obj, &["userId", "user_id"])?;
    let anonymous_id = id_field(obj, &["anonymousId", "anonymous_id"])?;
    if user_id.is_none() && anonymous_id.is_none() {
        return Err(ApiError::new(
            Code::MissingIdentity,
            "the event needs `userId` or `anonymousId`",
        ));
    }
    let message_id = match obj.get("messageId").or_else(|| obj.get("message_id")) {
        None | Some(Value::Null) => req.fallback_message_id.clone(),
        Some(v) => as_id(v).ok_or_else(|| {
            ApiError::new(
                Code::InvalidField,
                format!("`messageId` must be a non-empty string of at most {MAX_ID_LEN} bytes"),
            )
        })?,
    };
    let properties = parts.properties?;
    let traits = parts.traits?;
    let (context, (session_camel, session_snake)) = parts.context?;

    // Segment's clock-skew correction: the client's clock is off by (sentAt - receivedAt).
    let timestamp = time_field(obj, "timestamp")?.or(time_field(obj, "originalTimestamp")?);
    let sent_at = time_field(obj, "sentAt")?.or(req.sent_at);
    let timestamp = match (timestamp, sent_at) {
        (Some(ts), Some(sent)) => req.received_at - (sent - ts).max(0),
        (Some(ts), None) => ts,
        (None, _) => req.received_at,
    };

    let session_id = match id_field(obj, &["sessionId", "session_id"])? {
        Some(s) => Some(s),
        None => match first_id([
            ("sessionId", session_camel.as_ref()),
            ("session_id", session_snake.as_ref()),
        ])? {
            Some(s) => Some(s),
            None => id_field(&properties, &["session_id", "sessionId"])?,
        },
    };

    let (event, previous_id) = match call {
        CallType::Track => {
            let name = match obj.get("event") {
                Some(Value::String(s)) if !s.trim().is_empty() => s.trim(),
                _ => {
                    return Err(ApiError::new(
                        Code::MissingEventName,
                        "a track call needs an `event` name",
                    ))
                }
            };
            if name.len() > MAX_ID_LEN {
                return Err(ApiError::new(Code::InvalidField, "`event` is too long"));
            }
            let kind = EventKind::from_name(name);
            let name = kind.canonical_name().unwrap_or(name).to_owned();
            (name, None)
        }
        CallType::Page => ("page_view".to_owned(), None),
        CallType::Identify => {
            if user_id.is_none() {
                return Err(ApiError::new(
                    Code::MissingUserId,
                    "identify needs `userId`",
                ));
            }
            ("identify".to_owned(), None)
        }
        CallType::Alias => {
            if user_id.is_none() {
                return Err(ApiError::new(Code::MissingUserId, "alias needs `userId`"));
            }
            let prev = id_field(obj, &["previousId", "previous_id"])?.ok_or_else(|| {
                ApiError::new(Code::MissingPreviousId, "alias needs `previousId`")
            })?;
            ("alias".to_owned(), Some(prev))
        }
    };

    let event = Event {
        call,
        event,
        message_id,
        user_id,
        anonymous_id,
        previous_id,
        session_id,
        timestamp,
        received_at: req.received_at,
        properties,
        traits,
        context,
    };
    validate_properties(&event)?;
    Ok(event)
}

fn validate_properties(event: &Event) -> Result<(), ApiError> {
    let props = &event.properties;
    let has_product = || {
        props
            .get("product_id")
            .or_else(|| props.get("productId"))
            .is_some()
    };
    let need_product = || {
        if event.product().is_some() {
            Ok(())
        } else if has_product() {
            Err(ApiError::new(
                Code::InvalidField,
                "`properties.product_id` must be a non-empty string or a number",
            ))
        } else {
            Err(ApiError::new(
                Code::MissingProductId,
                format!("`{}` needs `properties.product_id`", event.event),
            ))
        }
    };
    match event.kind() {
        EventKind::ProductView | EventKind::AddToCart | EventKind::RemoveFromCart => need_product(),
        EventKind::Click if has_product() => need_product(),
        EventKind::Search => match props.get("query") {
            Some(Value::String(q)) if !q.trim().is_empty() => Ok(()),
            _ => Err(ApiError::new(
                Code::MissingQuery,
                "`search` needs a non-empty `properties.query`",
            )),
        },
        EventKind::Purchase => {
            let ok = match props.get("products") {
                Some(Value::Array(list)) => {
                    !list.is_empty()
                        && list
                            .iter()
                            .all(|p| p.as_object().and_then(product_from).is_some())
                }
                None => event.product().is_some(),
                Some(_) => false,
            };
            if ok {
                Ok(())
            } else {
                Err(ApiError::new(
                    Code::InvalidProducts,
                    "`purchase` needs `properties.products` as a non-empty array of objects with `product_id`",
                ))
            }
        }
        EventKind::RecImpression | EventKind::RecClick => {
            if event.rec_id().is_none() {
                return Err(ApiError::new(
                    Code::MissingRecId,
                    format!("`{}` needs `properties.rec_id`", event.event),
                ));
            }
            if event.kind() == EventKind::RecClick {
                need_product()
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req() -> RequestContext {
        RequestContext {
            received_at: 1_000_000,
            fallback_message_id: "gen-1".into(),
            ..Default::default()
        }
    }

    fn code_of(v: Value) -> Code {
        normalize(&v, &req()).unwrap_err().code
    }

    #[test]
    fn normalizes_track_with_segment_names() {
        let e = normalize(
            &json!({"type":"track","event":"Product Viewed","anonymousId":"a1","messageId":"m1",
                    "properties":{"product_id": 42, "price": "9.5"}}),
            &req(),
        )
        .unwrap();
        assert_eq!(e.event, "product_view");
        assert_eq!(e.kind(), EventKind::ProductView);
        let p = e.product().unwrap();
        assert_eq!(p.id, "42");
        assert_eq!(p.price, Some(9.5));
        assert_eq!(e.timestamp, 1_000_000);
        assert_eq!(e.partition_key(), "a1");
    }

    #[test]
    fn clock_skew_is_corrected_with_sent_at() {
        let e = normalize(
            &json!({"type":"page","userId":"u","timestamp":5000,"sentAt":9000}),
            &req(),
        )
        .unwrap();
        assert_eq!(e.timestamp, 1_000_000 - 4000);
        assert_eq!(e.message_id, "gen-1");
    }

    #[test]
    fn rejects_each_invalid_shape_with_its_code() {
        assert_eq!(code_of(json!([1])), Code::InvalidEvent);
        assert_eq!(
            code_of(json!({"type":"bogus","userId":"u"})),
            Code::InvalidEventType
        );
        assert_eq!(
            code_of(json!({"type":"track","event":"x"})),
            Code::MissingIdentity
        );
        assert_eq!(
            code_of(json!({"type":"track","userId":"u"})),
            Code::MissingEventName
        );
        assert_eq!(
            code_of(json!({"type":"track","event":"add_to_cart","userId":"u"})),
            Code::MissingProductId
        );
        assert_eq!(
            code_of(json!({"type":"track","event":"search","userId":"u","properties":{}})),
            Code::MissingQuery
        );
        assert_eq!(
            code_of(
                json!({"type":"track","event":"purchase","userId":"u","properties":{"products":[]}})
            ),
            Code::InvalidProducts
        );
        assert_eq!(
            code_of(
                json!({"type":"track","event":"rec_click","userId":"u","properties":{"product_id":"p"}})
            ),
            Code::MissingRecId
        );
        assert_eq!(
            code_of(json!({"type":"identify","anonymousId":"a"})),
            Code::MissingUserId
        );
        assert_eq!(
            code_of(json!({"type":"alias","userId":"u"})),
            Code::MissingPreviousId
        );
        assert_eq!(
            code_of(json!({"type":"page","userId":"u","timestamp":"soon"})),
            Code::InvalidTimestamp
        );
        assert_eq!(
            code_of(json!({"type":"page","userId":"u","properties":[1]})),
            Code::InvalidField
        );
        assert_eq!(
            code_of(json!({"type":"page","userId":{"a":1}})),
            Code::InvalidField
        );
    }

    #[test]
    fn purchase_products_and_revenue() {
        let e = normalize(
            &json!({"type":"track","event":"Order Completed","userId":"u","properties":{
                "order_id":"o1","products":[{"product_id":"a","price":2.0,"quantity":3},{"product_id":"b","price":1.5}]}}),
            &req(),
        )
        .unwrap();
        assert_eq!(e.kind(), EventKind::Purchase);
        let ids: Vec<_> = e.products().into_iter().map(|p| p.id).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(e.revenue(), Some(7.5));
    }

    #[test]
    fn session_id_from_context() {
        let e = normalize(
            &json!({"type":"page","anonymousId":"a","context":{"sessionId":"s9"}}),
            &req(),
        )
        .unwrap();
        assert_eq!(e.session_id.as_deref(), Some("s9"));
    }

    #[test]
    fn event_round_trips_through_json() {
        let e = normalize(
            &json!({"type":"alias","userId":"u","previousId":"a","messageId":"m"}),
            &req(),
        )
        .unwrap();
        let back: Event = serde_json::from_slice(&serde_json::to_vec(&e).unwrap()).unwrap();
        assert_eq!(back, e);
    }
}

/// Robustness of the parser of untrusted input: any JSON value, and any bytes as a timestamp,
/// give an event or a coded error, never a panic.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            "[a-zA-Z_ ]{0,12}".prop_map(Value::String),
            prop_oneof![
                Just("track"),
                Just("page"),
                Just("identify"),
                Just("alias"),
                Just("product_view"),
                Just("purchase"),
                Just("add_to_cart"),
                Just("search"),
                Just("rec_click"),
                Just("2024-01-01T00:00:00Z")
            ]
            .prop_map(|s| Value::String(s.to_owned())),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec(
                    (
                        prop_oneof![
                            Just("type"),
                            Just("event"),
                            Just("userId"),
                            Just("anonymousId"),
                            Just("messageId"),
                            Just("timestamp"),
                            Just("sentAt"),
                            Just("properties"),
                            Just("product_id"),
                            Just("products"),
                            Just("previousId"),
                            Just("context"),
                            Just("query"),
                            Just("rec_id"),
                            Just("quantity"),
                            Just("price")
                        ],
                        inner
                    ),
                    0..8
                )
                .prop_map(|kv| Value::Object(
                    kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                )),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn normalize_never_panics(v in arb_json()) {
            let req = RequestContext { received_at: 1_000, fallback_message_id: "f".into(), ..Default::default() };
            match normalize(&v, &req) {
                Ok(e) => {
                    // A normalized event always has an identity and survives the log encoding.
                    prop_assert!(!e.partition_key().is_empty());
                    let bytes = serde_json::to_vec(&e).unwrap();
                    let back: Event = serde_json::from_slice(&bytes).unwrap();
                    prop_assert_eq!(back, e);
                }
                Err(err) => prop_assert!(!err.message.is_empty()),
            }
        }

        /// The text fast path gives exactly what the tree path gives, errors included, with and
        /// without a batch-level context.
        #[test]
        fn normalize_json_agrees_with_normalize(v in arb_json(), batch_context in any::<bool>()) {
            let mut req = RequestContext { received_at: 1_000, fallback_message_id: "f".into(), ..Default::default() };
            if batch_context {
                req.context.insert("sessionId".into(), Value::from("batch-session"));
                req.context.insert("locale".into(), Value::from("de-DE"));
            }
            let text = serde_json::to_string(&v).unwrap();
            match (normalize(&v, &req), normalize_json(&text, &req)) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(a), Err(b)) => prop_assert_eq!(a.code, b.code),
                (a, b) => prop_assert!(false, "tree {:?} vs text {:?}", a, b),
            }
        }

        /// Every normalized event survives the binary log encoding.
        #[test]
        fn log_encoding_round_trips(v in arb_json()) {
            let req = RequestContext { received_at: 1_000, fallback_message_id: "f".into(), ..Default::default() };
            if let Ok(e) = normalize(&v, &req) {
                let entry = crate::LogEntry::Event(e);
                prop_assert_eq!(crate::LogEntry::decode(&entry.encode()).unwrap(), entry);
            }
        }

        #[test]
        fn timestamp_parser_never_panics(s in "\\PC{0,40}") {
            let _ = crate::time::parse_rfc3339_ms(&s);
        }

        #[test]
        fn timestamp_parser_round_trips(ms in -50_000_000_000_000i64..50_000_000_000_000) {
            prop_assert_eq!(crate::time::parse_rfc3339_ms(&crate::time::format_rfc3339_ms(ms)), Some(ms));
        }
    }
}
