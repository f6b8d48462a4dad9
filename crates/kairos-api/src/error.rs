//! HTTP rendering of [`ApiError`]: the status from the error-code table, the JSON body.

use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use kairos_log::LogError;
pub use kairos_types::{ApiError, Code};

/// Seconds a client is asked to wait after 429 `overloaded`. The log drains its backlog at disk
/// speed, so a short wait is enough; the tracker adds jitter so that clients do not return together.
pub const OVERLOADED_RETRY_AFTER_SECS: u64 = 1;

/// Newtype so the API can implement `IntoResponse` for the shared error type.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl HttpError {
    pub fn new(code: Code, message: impl Into<String>) -> HttpError {
        HttpError(ApiError::new(code, message))
    }

    /// The error for a failed log append of `what` (events, a catalogue change): 429 when the
    /// log is overloaded (retry soon), else 503.
    pub fn from_log(e: &LogError, what: &str) -> HttpError {
        match e {
            LogError::Overloaded { .. } => HttpError::new(
                Code::Overloaded,
                format!("the event log is overloaded and did not store the {what}: {e}"),
            ),
            _ => {
                tracing::error!(error = %e, "event log append failed");
                HttpError::new(
                    Code::LogUnavailable,
                    format!("the event log could not store the {what}: {e}"),
                )
            }
        }
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, Json(self.0.to_json())).into_response();
        if self.0.code == Code::Overloaded {
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(OVERLOADED_RETRY_AFTER_SECS));
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, HttpError>;
