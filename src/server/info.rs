//! `/v1/models`, `/health`, `/props`, `/tokenize`, `/detokenize` (llama.cpp field names),
//! `/metrics`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::error::{ApiError, AppJson};
use super::AppState;
use crate::text::chat_template::ToolSyntax;

/// `GET /v1/models`.
pub async fn models(State(app): State<AppState>) -> Result<Response, ApiError> {
    let data = model_objects(app.loaded()?);
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

/// `GET /v1/models/{id}` (the OpenAI client's `models.retrieve`): that model, or a 404.
pub async fn model(
    State(app): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let found = model_objects(app.loaded()?)
        .into_iter()
        .find(|m| m["id"] == id.as_str())
        .ok_or_else(|| ApiError::model_not_found(&id))?;
    Ok(axum::Json(found).into_response())
}

/// The base model and every loaded adapter, as OpenAI model objects.
fn model_objects(loaded: &super::Loaded) -> Vec<serde_json::Value> {
    let context = loaded.engine.limits().context_length;
    let mut data = vec![json!({
        "id": loaded.model_name,
        "object": "model",
        "created": loaded.created,
        "owned_by": "nextoken",
        "root": loaded.model_name,
        "parent": null,
        "max_model_len": context,
    })];
    for name in loaded.engine.adapter_names() {
        data.push(json!({
            "id": name,
            "object": "model",
            "created": loaded.created,
            "owned_by": "nextoken",
            "root": loaded.model_name,
            "parent": loaded.model_name,
            "max_model_len": context,
        }));
    }
    data
}

/// `GET /props`: llama.cpp's server properties, which its clients read for the context size
/// (`default_generation_settings.n_ctx`), the slots (`total_slots`), the model and its chat
/// template (with what it can do with tools: `chat_template_caps`).
pub async fn props(State(app): State<AppState>) -> Result<Response, ApiError> {
    let loaded = app.loaded()?;
    let limits = loaded.engine.limits();
    let stats = loaded.engine.stats();
    let d = &loaded.defaults;
    let template = loaded.chat_template.as_ref();
    let syntax = template.and_then(|t| t.tool_syntax());
    let (bos, eos) = template.map_or(("", ""), |t| t.special_tokens());
    let params = json!({
        "n_predict": -1,
        "temperature": d.temperature.unwrap_or(1.0),
        "top_k": d.top_k.unwrap_or(0),
        "top_p": d.top_p.unwrap_or(1.0),
        "min_p": 0.0,
        "repeat_penalty": d.repetition_penalty.unwrap_or(1.0),
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "stop": [],
    });
    Ok(axum::Json(json!({
        "default_generation_settings": {
            "n_ctx": limits.context_length,
            "is_processing": stats.num_running + stats.num_waiting > 0,
            "params": params,
        },
        "total_slots": limits.max_running_seqs,
        "model_alias": loaded.model_name,
        "model_path": loaded.model_name,
        "chat_template": template.map_or("", |t| t.source()),
        "chat_template_caps": {
            "supports_tools": syntax.is_some(),
            "supports_tool_calls": syntax.is_some(),
            "supports_parallel_tool_calls": matches!(
                syntax,
                Some(ToolSyntax::Hermes | ToolSyntax::MistralJson { .. })
            ),
            "supports_system_role": true,
        },
        "bos_token": bos,
        "eos_token": eos,
        "modalities": {"vision": false, "audio": false},
        "build_info": format!("nextoken {}", env!("CARGO_PKG_VERSION")),
        "endpoint_props": false,
        "is_sleeping": false,
    }))
    .into_response())
}

/// `GET /health`: 200 when the model is loaded, 503 while loading.
pub async fn health(State(app): State<AppState>) -> Response {
    match app.loaded() {
        Ok(_) => (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /tokenize` body.
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    /// Text to tokenize.
    pub content: String,
    /// Add BOS/EOS as the model's tokenizer config says (default false).
    #[serde(default)]
    pub add_special: bool,
    /// Return `{id, piece}` pairs instead of ids.
    #[serde(default)]
    pub with_pieces: bool,
}

/// `POST /tokenize`.
pub async fn tokenize(
    State(app): State<AppState>,
    AppJson(req): AppJson<TokenizeRequest>,
) -> Result<Response, ApiError> {
    let loaded = app.loaded()?;
    let ids = loaded.tokenizer.encode(&req.content, req.add_special)?;
    let tokens: Vec<serde_json::Value> = if req.with_pieces {
        ids.iter()
            .map(|&id| {
                let piece = loaded.tokenizer.decode(&[id], false).unwrap_or_default();
                json!({"id": id, "piece": piece})
            })
            .collect()
    } else {
        ids.iter().map(|&id| json!(id)).collect()
    };
    Ok(axum::Json(json!({ "tokens": tokens })).into_response())
}

/// `POST /detokenize` body.
#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    /// Token ids.
    pub tokens: Vec<u32>,
}

/// `POST /detokenize`.
pub async fn detokenize(
    State(app): State<AppState>,
    AppJson(req): AppJson<DetokenizeRequest>,
) -> Result<Response, ApiError> {
    let loaded = app.loaded()?;
    if let Some(&bad) = req
        .tokens
        .iter()
        .find(|&&t| t as usize >= loaded.vocab_size())
    {
        return Err(ApiError::invalid(
            "tokens",
            format!("token id {bad} is outside the vocabulary"),
        ));
    }
    let content = loaded.tokenizer.decode(&req.tokens, false)?;
    Ok(axum::Json(json!({ "content": content })).into_response())
}

/// `GET /metrics` (Prometheus text format).
pub async fn metrics(State(app): State<AppState>) -> Response {
    let stats = app.loaded().ok().map(|l| l.engine.stats());
    let body = app.metrics().render(stats.as_ref());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// `GET /`: the playground page (compiled into the binary, so it is there wherever the binary
/// is; no key needed to load it — its API calls send the key the user enters).
pub async fn playground() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("../../static/index.html"))
}
