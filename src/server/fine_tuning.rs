//! OpenAI's fine-tuning API (`/v1/fine_tuning/jobs`, events as JSON or SSE, cancel) over
//! [`crate::train::TrainingJobs`] (its files: [`super::files`]), and vLLM's runtime adapter API
//! (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`). Wire shapes live here only.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, AppJson};
use super::{AppState, Loaded};
use crate::model::LoraAdapter;
use crate::train::{EventRecord, Hyperparameters, JobRecord, JobSpec, TrainingJobs};

fn training(loaded: &Loaded) -> Result<&TrainingJobs, ApiError> {
    loaded.training.as_ref().ok_or_else(|| {
        ApiError::status(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "fine-tuning is not enabled on this server",
        )
    })
}

fn hyper_json(h: &Hyperparameters) -> Value {
    let auto = |v: Option<Value>| v.unwrap_or_else(|| json!("auto"));
    json!({
        "n_epochs": auto(h.n_epochs.map(|v| json!(v))),
        "batch_size": auto(h.batch_size.map(|v| json!(v))),
        "learning_rate_multiplier": auto(h.learning_rate_multiplier.map(|v| json!(v))),
    })
}

/// The OpenAI `fine_tuning.job` object (plus the `lora` settings).
pub fn job_json(j: &JobRecord) -> Value {
    let hyper = hyper_json(&j.hyperparameters);
    json!({
        "object": "fine_tuning.job",
        "id": j.id,
        "model": j.model,
        "created_at": j.created_at,
        "finished_at": j.finished_at,
        "fine_tuned_model": j.fine_tuned_model,
        "organization_id": "nextoken",
        "result_files": [],
        "status": j.status,
        "training_file": j.training_file,
        "validation_file": j.validation_file,
        "hyperparameters": hyper,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "trained_tokens": j.trained_tokens,
        "error": j.error.as_ref().map(|e| json!({"code": e.code, "message": e.message, "param": e.param})),
        "seed": j.seed,
        "estimated_finish": j.estimated_finish,
        "integrations": [],
        "user_provided_suffix": j.suffix,
        "lora": {
            "r": j.lora.r, "alpha": j.lora.alpha, "dropout": j.lora.dropout,
            "target_modules": j.lora.target_modules,
        },
    })
}

fn event_json(e: &EventRecord) -> Value {
    json!({
        "object": "fine_tuning.job.event", "id": e.id, "created_at": e.created_at,
        "level": e.level, "message": e.message, "type": e.kind, "data": e.data,
    })
}

/// A hyper-parameter: a number, `"auto"` or absent.
fn auto_field<T: serde::de::DeserializeOwned>(
    obj: &Value,
    key: &str,
    param: &str,
) -> Result<Option<T>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|_| {
            ApiError::invalid(param, format!("`{param}` must be a number or \"auto\""))
        }),
    }
}

fn opt_field<T: serde::de::DeserializeOwned>(
    obj: &Value,
    key: &str,
    param: &str,
    what: &str,
) -> Result<Option<T>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|_| ApiError::invalid(param, format!("`{param}` must be {what}"))),
    }
}

fn parse_job(body: &Value) -> Result<JobSpec, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    let model: String = opt_field(body, "model", "model", "a string")?
        .ok_or_else(|| ApiError::invalid("model", "`model` is required"))?;
    let training_file: String = opt_field(body, "training_file", "training_file", "a file id")?
        .ok_or_else(|| ApiError::invalid("training_file", "`training_file` is required"))?;
    // `method.supervised.hyperparameters` (current API) or top-level `hyperparameters`.
    let method = body.get("method");
    if let Some(t) = method.and_then(|m| m.get("type")).and_then(Value::as_str) {
        if t != "supervised" {
            return Err(ApiError::invalid(
                "method.type",
                format!("method '{t}' is not supported; use 'supervised'"),
            ));
        }
    }
    let hyper = method
        .and_then(|m| m.get("supervised"))
        .and_then(|s| s.get("hyperparameters"))
        .or_else(|| body.get("hyperparameters"))
        .cloned()
        .unwrap_or(json!({}));
    let lora = body.get("lora").cloned().unwrap_or(json!({}));
    Ok(JobSpec {
        model,
        training_file,
        validation_file: opt_field(body, "validation_file", "validation_file", "a file id")?,
        suffix: opt_field(body, "suffix", "suffix", "a string")?,
        seed: opt_field(body, "seed", "seed", "a non-negative integer")?,
        hyperparameters: Hyperparameters {
            n_epochs: auto_field(&hyper, "n_epochs", "hyperparameters.n_epochs")?,
            batch_size: auto_field(&hyper, "batch_size", "hyperparameters.batch_size")?,
            learning_rate_multiplier: auto_field(
                &hyper,
                "learning_rate_multiplier",
                "hyperparameters.learning_rate_multiplier",
            )?,
        },
        r: opt_field(&lora, "r", "lora.r", "a positive integer")?,
        alpha: opt_field(&lora, "alpha", "lora.alpha", "a number")?,
        dropout: opt_field(&lora, "dropout", "lora.dropout", "a number")?,
        target_modules: opt_field(
            &lora,
            "target_modules",
            "lora.target_modules",
            "a list of module names",
        )?,
    })
}

/// `POST /v1/fine_tuning/jobs`.
pub async fn create_job(
    State(app): State<AppState>,
    AppJson(body): AppJson<Value>,
) -> Result<Response, ApiError> {
    let jobs = training(app.loaded()?)?.clone();
    let spec = parse_job(&body)?;
    let rec = tokio::task::spawn_blocking(move || jobs.create_job(spec))
        .await
        .map_err(ApiError::internal)??;
    Ok(axum::Json(job_json(&rec)).into_response())
}

/// Cursor pagination of OpenAI lists.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
    #[serde(default)]
    stream: bool,
}

/// Items after `after` (by id), at most `limit`; and whether more remain.
fn page<T>(items: Vec<T>, id: impl Fn(&T) -> &str, q: &ListQuery) -> (Vec<T>, bool) {
    let start = match &q.after {
        Some(a) => items
            .iter()
            .position(|x| id(x) == a)
            .map_or(items.len(), |i| i + 1),
        None => 0,
    };
    let limit = q.limit.unwrap_or(20).clamp(1, 1000);
    let rest: Vec<T> = items.into_iter().skip(start).collect();
    let more = rest.len() > limit;
    (rest.into_iter().take(limit).collect(), more)
}

/// `GET /v1/fine_tuning/jobs?after&limit`, newest first.
pub async fn list_jobs(
    State(app): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let jobs = training(app.loaded()?)?;
    let (items, more) = page(jobs.jobs(), |j| &j.id, &q);
    let data: Vec<Value> = items.iter().map(job_json).collect();
    Ok(axum::Json(json!({"object": "list", "data": data, "has_more": more})).into_response())
}

/// `GET /v1/fine_tuning/jobs/{id}`.
pub async fn get_job(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let jobs = training(app.loaded()?)?;
    Ok(axum::Json(job_json(&jobs.job(&id)?)).into_response())
}

/// `POST /v1/fine_tuning/jobs/{id}/cancel`.
pub async fn cancel_job(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let jobs = training(app.loaded()?)?.clone();
    let rec = tokio::task::spawn_blocking(move || jobs.cancel(&id))
        .await
        .map_err(ApiError::internal)??;
    Ok(axum::Json(job_json(&rec)).into_response())
}

/// `GET /v1/fine_tuning/jobs/{id}/events?after&limit` (newest first, as OpenAI lists them), or
/// with `stream=true` an SSE stream of every event oldest first, live, that ends with the job.
pub async fn job_events(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let jobs = training(app.loaded()?)?.clone();
    if q.stream {
        // Subscribe before the snapshot, so no event falls between them.
        let live = jobs.subscribe();
        let past = jobs.events(&id)?;
        return Ok(event_stream(jobs, id, past, live));
    }
    let mut events = jobs.events(&id)?;
    events.reverse();
    let (items, more) = page(events, |e| &e.id, &q);
    let data: Vec<Value> = items.iter().map(event_json).collect();
    Ok(axum::Json(json!({"object": "list", "data": data, "has_more": more})).into_response())
}

fn event_stream(
    jobs: TrainingJobs,
    id: String,
    past: Vec<EventRecord>,
    live: tokio::sync::broadcast::Receiver<(String, EventRecord)>,
) -> Response {
    let last_seen = past.last().map(|e| e.id.clone());
    let done = |jobs: &TrainingJobs, id: &str| jobs.job(id).is_ok_and(|j| j.status.is_terminal());
    let first: Vec<Result<SseEvent, Infallible>> = past
        .iter()
        .map(|e| Ok(SseEvent::default().data(event_json(e).to_string())))
        .collect();
    let finished_already = done(&jobs, &id);
    let live = futures::stream::unfold(
        (live, jobs, id, last_seen, finished_already),
        move |(mut rx, jobs, id, seen, finished)| async move {
            if finished {
                return None;
            }
            loop {
                let next = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await;
                match next {
                    Ok(Ok((job, ev))) if job == id => {
                        if seen.as_ref().is_some_and(|s| ev.id <= *s) {
                            continue;
                        }
                        let end = done(&jobs, &id);
                        let seen = Some(ev.id.clone());
                        let sse = SseEvent::default().data(event_json(&ev).to_string());
                        return Some((Ok(sse), (rx, jobs, id, seen, end)));
                    }
                    Ok(Ok(_)) => continue,
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => continue,
                    Ok(Err(_)) => return None,
                    // Quiet: end if the job finished meanwhile, else keep waiting.
                    Err(_) if done(&jobs, &id) => return None,
                    Err(_) => continue,
                }
            }
        },
    );
    let stream = futures::stream::iter(first).chain(live);
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// `POST /v1/load_lora_adapter` body (vLLM's).
#[derive(Debug, Deserialize)]
pub struct LoadAdapter {
    lora_name: String,
    #[serde(default)]
    lora_path: Option<String>,
}

/// The adapter folder, if it lies inside one of the allowed folders.
fn confined(path: &Path, allowed: &[PathBuf]) -> Result<PathBuf, ApiError> {
    let real = path.canonicalize().map_err(|e| {
        ApiError::invalid(
            "lora_path",
            format!("cannot open '{}': {e}", path.display()),
        )
    })?;
    if allowed
        .iter()
        .filter_map(|d| d.canonicalize().ok())
        .any(|d| real.starts_with(&d))
    {
        Ok(real)
    } else {
        Err(ApiError {
            status: StatusCode::FORBIDDEN,
            ..ApiError::invalid(
                "lora_path",
                format!(
                    "'{}' is outside the folders adapters may be loaded from (--lora-dir)",
                    path.display()
                ),
            )
        })
    }
}

/// `POST /v1/load_lora_adapter {"lora_name", "lora_path"}`: loads a PEFT adapter while serving.
pub async fn load_lora_adapter(
    State(app): State<AppState>,
    AppJson(body): AppJson<LoadAdapter>,
) -> Result<Response, ApiError> {
    let loaded = app.loaded()?;
    let name = body.lora_name.trim().to_string();
    if name.is_empty() {
        return Err(ApiError::invalid("lora_name", "`lora_name` is required"));
    }
    if loaded.serves(&name) || loaded.engine.has_adapter(&name) {
        return Err(ApiError::invalid(
            "lora_name",
            format!("the adapter '{name}' has already been loaded"),
        ));
    }
    let path = body
        .lora_path
        .ok_or_else(|| ApiError::invalid("lora_path", "`lora_path` is required"))?;
    let mut allowed = loaded.lora_dirs.clone();
    if let Some(t) = &loaded.training {
        allowed.push(t.adapters_dir());
    }
    let dir = confined(Path::new(&path), &allowed)?;
    let engine = loaded.engine.clone();
    let adapter = tokio::task::spawn_blocking(move || {
        LoraAdapter::load_peft(&dir, engine.model_config()).map(|a| (a, engine))
    })
    .await
    .map_err(ApiError::internal)?;
    let (adapter, engine) = adapter.map_err(|e| ApiError::invalid("lora_path", e.to_string()))?;
    engine.load_adapter(&name, adapter);
    Ok(format!("Success: LoRA adapter '{name}' added successfully.").into_response())
}

/// `POST /v1/unload_lora_adapter {"lora_name"}`.
pub async fn unload_lora_adapter(
    State(app): State<AppState>,
    AppJson(body): AppJson<LoadAdapter>,
) -> Result<Response, ApiError> {
    let loaded = app.loaded()?;
    if !loaded.engine.unload_adapter(&body.lora_name) {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            ..ApiError::invalid(
                "lora_name",
                format!("no adapter named '{}' is loaded", body.lora_name),
            )
        });
    }
    Ok(format!(
        "Success: LoRA adapter '{}' removed successfully.",
        body.lora_name
    )
    .into_response())
}
