//! Embeddings: OpenAI's `POST /v1/embeddings`, Ollama's `POST /api/embed` and its older
//! `POST /api/embeddings`.
//!
//! An input's embedding is its last token's final hidden state (after the final norm: Hugging
//! Face's `last_hidden_state[-1]`), scaled to unit length — last-token pooling, what
//! decoder-only embedding models (gte-Qwen2, e5-mistral, …) are trained for and llama.cpp's
//! `--pooling last`. Each input is one engine request with no new tokens: inputs of a call
//! and of other clients share the running batch and the prefix cache like any prompt.

use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::error::{ApiError, AppJson};
use super::{AppState, Loaded};
use crate::engine::{Event, GenerateRequest};
use crate::model::TokenId;

/// Most inputs in one call (OpenAI's limit).
const MAX_INPUTS: usize = 2048;

/// The inputs of a body's `input` (or `param`) field as token ids: a text, a list of texts, a
/// list of token ids, or a list of those lists.
fn inputs(loaded: &Loaded, v: Option<&Value>, param: &str) -> Result<Vec<Vec<TokenId>>, ApiError> {
    let bad = || {
        ApiError::invalid(
            param,
            format!(
                "`{param}` must be a non-empty text, a list of texts, a list of token ids or a \
                 list of such lists (at most {MAX_INPUTS})"
            ),
        )
    };
    let ids = |a: &[Value]| -> Option<Vec<TokenId>> {
        a.iter()
            .map(|t| t.as_u64().and_then(|t| TokenId::try_from(t).ok()))
            .collect()
    };
    let out: Vec<Vec<TokenId>> = match v.ok_or_else(bad)? {
        Value::String(s) => vec![loaded.tokenizer.encode(s, true)?],
        Value::Array(a) if a.iter().all(Value::is_string) => a
            .iter()
            .map(|s| {
                loaded
                    .tokenizer
                    .encode(s.as_str().unwrap_or_default(), true)
            })
            .collect::<Result<_, _>>()?,
        Value::Array(a) if a.iter().all(Value::is_number) => vec![ids(a).ok_or_else(bad)?],
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_array().and_then(|x| ids(x)))
            .collect::<Option<_>>()
            .ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if out.is_empty() || out.len() > MAX_INPUTS {
        return Err(bad());
    }
    if let Some(i) = out.iter().position(Vec::is_empty) {
        return Err(ApiError::invalid(
            param,
            format!("input {i} is empty: there is nothing to embed"),
        ));
    }
    Ok(out)
}

/// Each input's embedding (unit length when `normalize`) and the token count, computed by the
/// engine together.
async fn embed(
    loaded: &Loaded,
    inputs: Vec<Vec<TokenId>>,
    adapter: Option<String>,
    normalize: bool,
    priority: i32,
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    let mut generations = Vec::with_capacity(inputs.len());
    for prompt in inputs {
        generations.push(loaded.engine.submit(GenerateRequest {
            adapter: adapter.clone(),
            priority,
            ..GenerateRequest::embedding(prompt)
        })?);
    }
    let mut out = Vec::with_capacity(generations.len());
    let mut tokens = 0;
    for mut g in generations {
        let mut embedding = None;
        loop {
            match g.next().await {
                Some(Event::Embedding(e)) => embedding = Some(e),
                Some(Event::Finished { usage, .. }) => {
                    tokens += usage.prompt_tokens;
                    break;
                }
                Some(Event::Failed(e)) => return Err(e.into()),
                Some(_) => {}
                None => return Err(crate::engine::EngineError::Stopped.into()),
            }
        }
        let mut e = embedding.ok_or_else(|| ApiError::internal("no embedding was computed"))?;
        if normalize {
            let norm = e.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                e.iter_mut().for_each(|x| *x /= norm);
            }
        }
        out.push(e);
    }
    Ok((out, tokens))
}

/// Standard base64 (with padding) of `bytes`.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= c.len() {
                s.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// `POST /v1/embeddings` (`input`, `model`, `encoding_format` `float` or `base64` — the
/// `openai` client asks for base64 —, `dimensions` only as the model's width, `user`).
pub async fn embeddings(
    State(app): State<AppState>,
    AppJson(body): AppJson<Value>,
) -> Result<Response, ApiError> {
    let loaded = app.loaded()?;
    let adapter = loaded.resolve_model(body.get("model").and_then(Value::as_str))?;
    let base64_out = match body.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(_) => {
            return Err(ApiError::invalid(
                "encoding_format",
                "`encoding_format` must be `float` or `base64`",
            ))
        }
    };
    let width = loaded.engine.model_config().hidden_size;
    match body.get("dimensions") {
        None | Some(Value::Null) => {}
        Some(d) if d.as_u64() == Some(width as u64) => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "dimensions",
                format!("this model's embeddings have {width} dimensions and cannot be shortened"),
            ))
        }
    }
    let priority = match body.get("priority") {
        None | Some(Value::Null) => 0,
        Some(p) => super::openai::priority(Some(p.as_i64().ok_or_else(|| {
            ApiError::invalid("priority", "`priority` must be an integer of 32 bits")
        })?))?,
    };
    let inputs = inputs(loaded, body.get("input"), "input")?;
    let (vectors, tokens) = embed(loaded, inputs, adapter, true, priority).await?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let embedding = if base64_out {
                let bytes: Vec<u8> = e.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64(&bytes))
            } else {
                json!(e)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(&loaded.model_name);
    Ok(axum::Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

/// Ollama's inputs: longer than the context, cut to it when `truncate` (its default), else a
/// 400.
fn ollama_inputs(
    loaded: &Loaded,
    body: &Value,
    param: &str,
) -> Result<Vec<Vec<TokenId>>, ApiError> {
    let mut inputs = inputs(loaded, body.get(param), param)?;
    let limits = loaded.engine.limits();
    let room = limits.context_length.min(limits.kv_capacity_tokens);
    if body.get("truncate").and_then(Value::as_bool) != Some(false) {
        inputs.iter_mut().for_each(|i| i.truncate(room));
    }
    Ok(inputs)
}

/// Ollama's `model` (required, the base model or a loaded adapter).
fn ollama_model(loaded: &Loaded, body: &Value) -> Result<Option<String>, ApiError> {
    let name = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("model", "`model` is required"))?;
    loaded.resolve_model(Some(name.trim_end_matches(":latest")))
}

/// `POST /api/embed` (`model`, `input` text or texts, `truncate`): unit-length embeddings,
/// Ollama's answer shape.
pub async fn ollama_embed(
    State(app): State<AppState>,
    AppJson(body): AppJson<Value>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let loaded = app.loaded()?;
    let adapter = ollama_model(loaded, &body)?;
    let inputs = ollama_inputs(loaded, &body, "input")?;
    let (vectors, tokens) = embed(loaded, inputs, adapter, true, 0).await?;
    Ok(axum::Json(json!({
        "model": body["model"],
        "embeddings": vectors,
        "total_duration": started.elapsed().as_nanos() as u64,
        "load_duration": 0,
        "prompt_eval_count": tokens,
    }))
    .into_response())
}

/// `POST /api/embeddings` (`model`, `prompt`): Ollama's older route, one embedding as the
/// model gives it (not scaled), as Ollama answers it.
pub async fn ollama_embeddings(
    State(app): State<AppState>,
    AppJson(body): AppJson<Value>,
) -> Result<Response, ApiError> {
    let loaded = app.loaded()?;
    let adapter = ollama_model(loaded, &body)?;
    if !body.get("prompt").is_some_and(Value::is_string) {
        return Err(ApiError::invalid("prompt", "`prompt` must be a text"));
    }
    let inputs = ollama_inputs(loaded, &body, "prompt")?;
    let (mut vectors, _) = embed(loaded, inputs, adapter, false, 0).await?;
    Ok(axum::Json(json!({"embedding": vectors.pop().unwrap_or_default()})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_the_standard_alphabet_with_padding() {
        for (raw, enc) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foobar", "Zm9vYmFy"),
            (&[0xFB, 0xFF, 0xBF], "+/+/"),
        ] {
            assert_eq!(base64(raw), enc);
        }
        // 1.0f32 little-endian.
        assert_eq!(base64(&1.0f32.to_le_bytes()), "AACAPw==");
    }
}
