//! `ApiError`: every failure as an OpenAI-style body `{"error":{"message","type","param","code"}}`
//! with the right status, and `AppJson`, a JSON extractor whose rejections are `ApiError`s too.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::engine::EngineError;
use crate::text::TextError;

/// An error answered to a client.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI error type (`invalid_request_error`, ...).
    pub kind: &'static str,
    /// The request field at fault, if any.
    pub param: Option<String>,
    /// Machine-readable code, if any.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 for an invalid field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }

    /// 400 without a specific field.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    /// 404 for an unknown model.
    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model '{model}' does not exist"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    /// Any other status.
    pub fn status(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// 500; the cause is logged, not sent.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "internal error");
        ApiError::status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal error",
        )
    }

    /// The `{"error": {...}}` body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Invalid(m) => ApiError::bad_request(m),
            EngineError::Overloaded => ApiError::status(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "too many requests are waiting; retry later",
            ),
            EngineError::Stopped => ApiError::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "the engine is not running",
            ),
            EngineError::Model(m) => ApiError::internal(m),
            EngineError::UnknownAdapter(name) => ApiError::model_not_found(&name),
        }
    }
}

impl From<TextError> for ApiError {
    fn from(e: TextError) -> Self {
        match e {
            TextError::Invalid(m) => ApiError::bad_request(m),
            other => ApiError::internal(other),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        let text = rejection.body_text();
        match rejection {
            JsonRejection::JsonDataError(_) => {
                // "Failed to deserialize the JSON body into the target type: field: reason"
                let detail = text
                    .split_once("target type: ")
                    .map_or(text.as_str(), |x| x.1);
                let param = detail
                    .split_once(": ")
                    .map(|(p, _)| p.to_string())
                    .filter(|p| !p.contains(' '));
                ApiError {
                    param,
                    ..ApiError::bad_request(detail.to_string())
                }
            }
            JsonRejection::MissingJsonContentType(_) => ApiError::status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "expected Content-Type: application/json",
            ),
            _ if status == StatusCode::PAYLOAD_TOO_LARGE => ApiError::status(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "the request body is too large",
            ),
            _ => ApiError::status(StatusCode::BAD_REQUEST, "invalid_request_error", text),
        }
    }
}

/// `axum::Json` with OpenAI-shaped rejections.
pub struct AppJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for AppJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(value) = axum::Json::<T>::from_request(req, state).await?;
        Ok(AppJson(value))
    }
}
