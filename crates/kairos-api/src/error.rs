//! HTTP rendering of [`ApiError`]: the status from the error-code table, the JSON body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

pub use kairos_types::{ApiError, Code};

/// Newtype so the API can implement `IntoResponse` for the shared error type.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl HttpError {
    pub fn new(code: Code, message: impl Into<String>) -> HttpError {
        HttpError(ApiError::new(code, message))
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
        (status, Json(self.0.to_json())).into_response()
    }
}

pub type ApiResult<T> = Result<T, HttpError>;
