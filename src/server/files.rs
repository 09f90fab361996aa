//! OpenAI's Files API (`/v1/files`: upload, list, get, content, delete) over the server's
//! [`FileStore`]: training data for fine-tuning, batch input, and the files batches write.

use axum::extract::{Multipart, Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::files::{FileError, FileRecord, FileStore};

impl From<FileError> for ApiError {
    fn from(e: FileError) -> Self {
        match e {
            FileError::NotFound(m) => {
                ApiError::status(StatusCode::NOT_FOUND, "invalid_request_error", m)
            }
            FileError::Invalid { param, message } => ApiError::invalid(&param, message),
            FileError::Io(m) => {
                tracing::error!(error = %m, "data dir storage error");
                ApiError::status(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "server_error",
                    format!("the server could not store the data: {m}"),
                )
            }
        }
    }
}

/// The server's file store, or 404 on a server without a data dir.
pub(super) fn store(app: &AppState) -> Result<&FileStore, ApiError> {
    app.files().ok_or_else(|| {
        ApiError::status(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "files are not enabled on this server (it has no data dir)",
        )
    })
}

/// A file as the API shows it.
pub(super) fn file_json(f: &FileRecord) -> Value {
    json!({
        "id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at,
        "filename": f.filename, "purpose": f.purpose, "status": "processed",
        "status_details": null,
    })
}

/// `POST /v1/files` (multipart: `file`, `purpose`).
pub async fn upload_file(
    State(app): State<AppState>,
    mut form: Multipart,
) -> Result<Response, ApiError> {
    let files = store(&app)?.clone();
    let mut purpose = None;
    let mut file: Option<(String, Vec<u8>)> = None;
    let bad = |e: axum::extract::multipart::MultipartError| {
        ApiError::status(e.status(), "invalid_request_error", e.body_text())
    };
    while let Some(field) = form.next_field().await.map_err(bad)? {
        match field.name() {
            Some("purpose") => purpose = Some(field.text().await.map_err(bad)?),
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                file = Some((name, field.bytes().await.map_err(bad)?.to_vec()));
            }
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| ApiError::invalid("purpose", "`purpose` is required"))?;
    let (name, data) = file.ok_or_else(|| ApiError::invalid("file", "`file` is required"))?;
    let rec = tokio::task::spawn_blocking(move || files.upload(&name, &purpose, &data))
        .await
        .map_err(ApiError::internal)??;
    Ok(axum::Json(file_json(&rec)).into_response())
}

/// `GET /v1/files` query: OpenAI's `purpose` filter.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    purpose: Option<String>,
}

/// `GET /v1/files` (`?purpose=` keeps those of one purpose).
pub async fn list_files(
    State(app): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let data: Vec<Value> = store(&app)?
        .list()
        .iter()
        .filter(|f| q.purpose.as_ref().is_none_or(|p| *p == f.purpose))
        .map(file_json)
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data, "has_more": false})).into_response())
}

/// `GET /v1/files/{id}`.
pub async fn get_file(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(file_json(&store(&app)?.get(&id)?)).into_response())
}

/// `GET /v1/files/{id}/content`.
pub async fn file_content(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let data = store(&app)?.content(&id)?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

/// `DELETE /v1/files/{id}`.
pub async fn delete_file(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    store(&app)?.delete(&id)?;
    Ok(axum::Json(json!({"id": id, "object": "file", "deleted": true})).into_response())
}
