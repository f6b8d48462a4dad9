//! Shared vocabulary of Kairos: the normalized event model, catalogue items, log entries and the
//! error-code table. Every other crate speaks these types, so this crate has no I/O.

pub mod error;
pub mod event;
pub mod item;
pub mod metrics;
pub mod model;
pub mod time;

pub use error::{ApiError, Code, ErrorType};
pub use event::{
    normalize, normalize_json, CallType, Event, EventKind, ProductRef, RawObject, RequestContext,
};
pub use item::{stable_hash64, Item, LogEntry};
pub use model::{LearnedAction, ModelBatch, ModelOp};
