//! OpenAI's Responses API (`POST /v1/responses`, the official client's
//! `client.responses.create`): `input` (a text or a list of messages, function calls and their
//! outputs), `instructions`, `max_output_tokens`, `temperature`, `top_p`, `text.format`
//! (`text`, `json_object`, `json_schema`), function `tools` + `tool_choice`, `stream`.
//! The request is translated into a chat request and runs on the chat path; the answer is a
//! `response` object whose `output` holds a `message` (with `output_text`) or a
//! `function_call`, streamed as the API's typed events (`response.created`, …,
//! `response.output_text.delta`, …, `response.completed`).
//!
//! Responses are stored (`store`, on by default as OpenAI's) — the newest [`MAX_STORED`], in
//! memory and, when the server has a data directory, one JSON file each under
//! `responses/` so that they survive a restart (read back at start): `previous_response_id`
//! continues a stored conversation (its input and output items come before the new input;
//! `instructions` are the new request's own), and `GET`/`DELETE /v1/responses/{id}` and
//! `GET /v1/responses/{id}/input_items` read and remove them.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::completions::{chat_job, collect, start_one, Job};
use super::error::{ApiError, AppJson};
use super::stream::{TextEvent, TextEvents};
use super::tools::{wire_call, Progress, ToolPlan};
use super::AppState;
use crate::text::ReasoningSplitter;

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{:032x}", rand::random::<u128>())
}

/// Most responses kept; the oldest go first.
pub const MAX_STORED: usize = 1000;

/// A stored response: its object, and the conversation it ends (input items, then its own
/// output items; each with an `id`).
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    response: Value,
    items: Vec<Value>,
    /// How many of `items` were its input.
    inputs: usize,
    /// Its place in the order of storing (the oldest go first).
    #[serde(default)]
    seq: u64,
}

/// The responses kept for `previous_response_id` and the `GET`/`DELETE` routes.
#[derive(Default)]
pub struct ResponseStore {
    map: HashMap<String, Stored>,
    order: VecDeque<String>,
    /// Where each one is kept as `<id>.json`, if anywhere.
    dir: Option<PathBuf>,
    next_seq: u64,
}

impl ResponseStore {
    /// The store kept in `dir` (created if missing), with the responses already there: the
    /// newest [`MAX_STORED`] by the order they were stored in (older files are removed, as
    /// are unreadable ones, which are logged).
    pub fn open(dir: &Path) -> std::io::Result<ResponseStore> {
        std::fs::create_dir_all(dir)?;
        let mut found: Vec<(String, Stored)> = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.ends_with(".json.tmp") {
                // A write cut short: never read.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(id) = name.strip_suffix(".json").map(str::to_string) else {
                continue;
            };
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Stored>(&b).map_err(|e| e.to_string()))
            {
                Ok(s) => found.push((id, s)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable stored response");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        found.sort_by_key(|(_, s)| s.seq);
        let mut store = ResponseStore {
            dir: Some(dir.to_path_buf()),
            next_seq: found.last().map_or(0, |(_, s)| s.seq + 1),
            ..ResponseStore::default()
        };
        let skip = found.len().saturating_sub(MAX_STORED);
        for (i, (id, s)) in found.into_iter().enumerate() {
            if i < skip {
                store.delete_file(&id);
                continue;
            }
            store.order.push_back(id.clone());
            store.map.insert(id, s);
        }
        Ok(store)
    }

    /// How many responses are kept.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn file(&self, id: &str) -> Option<PathBuf> {
        Some(self.dir.as_ref()?.join(format!("{id}.json")))
    }

    fn delete_file(&self, id: &str) {
        if let Some(path) = self.file(id) {
            let _ = std::fs::remove_file(path);
        }
    }

    fn insert(&mut self, id: String, mut stored: Stored) {
        while self.map.len() >= MAX_STORED {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                    self.delete_file(&old);
                }
                None => break,
            }
        }
        stored.seq = self.next_seq;
        self.next_seq += 1;
        if let Some(path) = self.file(&id) {
            // Whole or not at all: written aside, then renamed into place.
            let tmp = path.with_extension("json.tmp");
            let written = serde_json::to_vec(&stored)
                .map_err(std::io::Error::other)
                .and_then(|bytes| std::fs::write(&tmp, bytes))
                .and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = written {
                tracing::warn!(path = %path.display(), error = %e, "could not keep a response on disk");
            }
        }
        self.order.push_back(id.clone());
        self.map.insert(id, stored);
    }

    fn remove(&mut self, id: &str) -> bool {
        // Only ids the store holds name files (never a path from the request as such).
        if self.map.remove(id).is_none() {
            return false;
        }
        self.order.retain(|k| k != id);
        self.delete_file(id);
        true
    }
}

/// The store shared by the handlers.
pub type SharedStore = Arc<Mutex<ResponseStore>>;

fn not_found(id: &str) -> ApiError {
    ApiError::status(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("Response with id '{id}' not found."),
    )
}

/// The request's input as items (a text is one user message), with an `id` each.
fn input_items(body: &Value) -> Option<Vec<Value>> {
    let items = match body.get("input")? {
        Value::String(s) => vec![json!({"type": "message", "role": "user", "content": s})],
        Value::Array(a) => a.clone(),
        _ => return None,
    };
    Some(
        items
            .into_iter()
            .map(|mut item| {
                if item.is_object() && item.get("id").is_none_or(Value::is_null) {
                    item["id"] = json!(new_id("msg"));
                }
                item
            })
            .collect(),
    )
}

/// A request that continues `previous_response_id`: its body with the stored conversation's
/// items before its own input, and those items. Without one, the body as it is.
fn with_history(store: &SharedStore, body: &Value) -> Result<(Value, Vec<Value>), ApiError> {
    let mut items = input_items(body).unwrap_or_default();
    let Some(prev) = body.get("previous_response_id").filter(|v| !v.is_null()) else {
        return Ok((body.clone(), items));
    };
    let id = prev.as_str().ok_or_else(|| {
        ApiError::invalid(
            "previous_response_id",
            "`previous_response_id` must be a string",
        )
    })?;
    let history = {
        let store = store.lock().map_err(ApiError::internal)?;
        let stored = store.map.get(id).ok_or_else(|| {
            ApiError::invalid(
                "previous_response_id",
                format!("Previous response with id '{id}' not found."),
            )
        })?;
        stored.items.clone()
    };
    if input_items(body).is_none() {
        // Let the chat translation name what is wrong with `input`.
        return Ok((body.clone(), items));
    }
    items.splice(0..0, history);
    let mut body = body.clone();
    body["input"] = Value::Array(items.clone());
    Ok((body, items))
}

/// The chat request a Responses request amounts to. Errors name the Responses fields.
fn chat_body(body: &Value) -> Result<Value, ApiError> {
    let Some(req) = body.as_object() else {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    };
    let mut messages = Vec::new();
    if let Some(i) = req.get("instructions").filter(|v| !v.is_null()) {
        let text = i
            .as_str()
            .ok_or_else(|| ApiError::invalid("instructions", "`instructions` must be a string"))?;
        messages.push(json!({"role": "system", "content": text}));
    }
    match req.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let Some(m) = input_item(item, i)? else {
                    continue;
                };
                // Calls one after another are one assistant turn's (parallel calls), and so
                // are an assistant's text and the calls after it.
                let calls = m.get("tool_calls").and_then(Value::as_array);
                if let (Some(calls), Some(prev)) = (calls, messages.last_mut()) {
                    if let Some(prev_calls) =
                        prev.get_mut("tool_calls").and_then(Value::as_array_mut)
                    {
                        prev_calls.extend(calls.iter().cloned());
                        continue;
                    }
                    if prev.get("role").and_then(Value::as_str) == Some("assistant") {
                        prev["tool_calls"] = Value::Array(calls.clone());
                        continue;
                    }
                }
                messages.push(m);
            }
        }
        None => return Err(ApiError::invalid("input", "`input` is required")),
        Some(_) => {
            return Err(ApiError::invalid(
                "input",
                "`input` must be a text or a list of items",
            ))
        }
    }
    let mut chat = Map::new();
    chat.insert("messages".into(), Value::Array(messages));
    // (`reasoning_format` and `chat_template_kwargs`: llama.cpp's and vLLM's extensions.)
    for key in [
        "model",
        "temperature",
        "top_p",
        "stream",
        "parallel_tool_calls",
        "seed",
        "user",
        "reasoning_format",
        "chat_template_kwargs",
        "priority",
    ] {
        if let Some(v) = req.get(key) {
            chat.insert(key.into(), v.clone());
        }
    }
    if let Some(v) = req.get("max_output_tokens").filter(|v| !v.is_null()) {
        chat.insert("max_completion_tokens".into(), v.clone());
    }
    if let Some(f) = req.get("text").and_then(|t| t.get("format")) {
        let format = match f.get("type").and_then(Value::as_str) {
            Some("json_schema") => json!({"type": "json_schema", "json_schema": {
                "name": f.get("name"), "schema": f.get("schema"), "strict": f.get("strict")}}),
            _ => f.clone(),
        };
        chat.insert("response_format".into(), format);
    }
    if let Some(tools) = req.get("tools").filter(|v| !v.is_null()) {
        let Some(tools) = tools.as_array() else {
            return Err(ApiError::invalid("tools", "`tools` must be an array"));
        };
        let mut out = Vec::new();
        for (i, t) in tools.iter().enumerate() {
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(ApiError::invalid(
                    &format!("tools[{i}].type"),
                    "only tools of type `function` are supported",
                ));
            }
            let mut f = Map::new();
            for key in ["name", "description", "parameters"] {
                if let Some(v) = t.get(key) {
                    f.insert(key.into(), v.clone());
                }
            }
            out.push(json!({"type": "function", "function": f}));
        }
        chat.insert("tools".into(), Value::Array(out));
    }
    if let Some(c) = req.get("tool_choice").filter(|v| !v.is_null()) {
        let c = match c.get("name") {
            Some(name) if c.get("type").and_then(Value::as_str) == Some("function") => {
                json!({"type": "function", "function": {"name": name}})
            }
            _ => c.clone(),
        };
        chat.insert("tool_choice".into(), c);
    }
    Ok(Value::Object(chat))
}

/// One `input` item as a chat message (`None` for a reasoning item: earlier turns'
/// reasoning is not shown to the model again, as thinking models' templates drop it).
fn input_item(item: &Value, i: usize) -> Result<Option<Value>, ApiError> {
    let param = format!("input[{i}]");
    let field = |k: &str| item.get(k).and_then(Value::as_str).unwrap_or_default();
    match item.get("type").and_then(Value::as_str) {
        None | Some("message") => {
            let content = match item.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match p.get("type").and_then(Value::as_str) {
                            Some("input_text" | "output_text" | "text") => text.push_str(
                                p.get("text").and_then(Value::as_str).unwrap_or_default(),
                            ),
                            other => {
                                return Err(ApiError::invalid(
                                    &format!("{param}.content"),
                                    format!(
                                        "content type {} is not supported (text only)",
                                        other.unwrap_or("(none)")
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
                _ => {
                    return Err(ApiError::invalid(
                        &format!("{param}.content"),
                        "`content` must be a text or a list of text parts",
                    ))
                }
            };
            Ok(Some(json!({"role": field("role"), "content": content})))
        }
        Some("function_call") => Ok(Some(json!({"role": "assistant", "content": null,
            "tool_calls": [{"id": field("call_id"), "type": "function",
                            "function": {"name": field("name"), "arguments": field("arguments")}}]}))),
        Some("function_call_output") => Ok(Some(json!({"role": "tool",
            "tool_call_id": field("call_id"), "content": field("output")}))),
        Some("reasoning") => Ok(None),
        Some(other) => Err(ApiError::invalid(
            &format!("{param}.type"),
            format!("input items of type `{other}` are not supported"),
        )),
    }
}

/// The chat path's field names in an error, as this API spells them.
fn rename_param(mut e: ApiError) -> ApiError {
    if let Some(p) = e.param.take() {
        let p = if p == "messages" || p.starts_with("messages[") {
            p.replacen("messages", "input", 1)
        } else if p == "max_completion_tokens" {
            "max_output_tokens".into()
        } else if p == "response_format" {
            "text.format".into()
        } else {
            p.replace(".function.", ".")
        };
        e.param = Some(p);
    }
    e
}

/// What the request said, echoed in every `response` object; where the finished one is kept.
struct Echo {
    id: String,
    created_at: u64,
    model: String,
    request: Map<String, Value>,
    /// The store, when `store` is on; and the conversation's input items.
    store: Option<SharedStore>,
    items: Vec<Value>,
}

impl Echo {
    /// Keeps a finished response (when asked to) with its conversation.
    fn keep(&self, response: &Value) {
        let Some(store) = &self.store else { return };
        let mut items = self.items.clone();
        let inputs = items.len();
        items.extend(response["output"].as_array().cloned().unwrap_or_default());
        if let Ok(mut s) = store.lock() {
            s.insert(
                self.id.clone(),
                Stored {
                    response: response.clone(),
                    items,
                    inputs,
                    seq: 0,
                },
            );
        }
    }

    /// A `response` object.
    fn response(&self, status: &str, output: Vec<Value>, usage: Option<Value>) -> Value {
        let r = &self.request;
        let get = |k: &str, default: Value| r.get(k).cloned().unwrap_or(default);
        json!({
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "error": null,
            "incomplete_details": if status == "incomplete" {
                json!({"reason": "max_output_tokens"})
            } else {
                Value::Null
            },
            "instructions": get("instructions", Value::Null),
            "max_output_tokens": get("max_output_tokens", Value::Null),
            "model": self.model, "output": output,
            "parallel_tool_calls": get("parallel_tool_calls", json!(true)),
            "previous_response_id": get("previous_response_id", Value::Null),
            "temperature": get("temperature", json!(1.0)),
            "top_p": get("top_p", json!(1.0)),
            "tool_choice": get("tool_choice", json!("auto")),
            "tools": get("tools", json!([])),
            "text": get("text", json!({"format": {"type": "text"}})),
            "truncation": "disabled", "store": self.store.is_some(),
            "metadata": get("metadata", json!({})),
            "usage": usage,
        })
    }
}

fn usage(job: &Job, output_tokens: usize, cached: usize, reasoning: usize) -> Value {
    let input = job.prompt_tokens();
    json!({"input_tokens": input, "input_tokens_details": {"cached_tokens": cached},
           "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning},
           "total_tokens": input + output_tokens})
}

/// The output items of a finished answer: its function calls (after a message of the text
/// before them, if any), or a message.
fn output_items(job: &Job, text: &str, complete: bool) -> Vec<Value> {
    let plan = job.tools.as_ref();
    match plan.and_then(|t| t.finished_calls(text)) {
        Some((calls, whole)) => {
            // Text the model wrote before its calls (Hermes, "auto") is a message first.
            let before = plan.map_or("", |t| t.text_before_calls(text));
            let message = (!before.is_empty()).then(|| message_item(&new_id("msg"), before, true));
            message
                .into_iter()
                .chain(calls.iter().map(|(name, args)| {
                    let mut item = function_call_item(name, args);
                    if !whole {
                        // Cut short: as the streamed item closes.
                        item["status"] = json!("incomplete");
                    }
                    item
                }))
                .collect()
        }
        None => vec![message_item(&new_id("msg"), text, complete)],
    }
}

fn function_call_item(name: &str, args: &str) -> Value {
    let call = wire_call(name, args);
    json!({"type": "function_call", "id": new_id("fc"), "call_id": call["id"], "name": name,
           "arguments": args, "status": "completed"})
}

/// A thinking model's reasoning (`reasoning_text` content, as open-weight models' reasoning
/// comes back from vLLM and Ollama; OpenAI's own models give summaries).
fn reasoning_item(id: &str, text: &str, status: &str) -> Value {
    let content = if text.is_empty() {
        json!([])
    } else {
        json!([{"type": "reasoning_text", "text": text}])
    };
    json!({"type": "reasoning", "id": id, "summary": [], "content": content, "status": status})
}

fn message_item(id: &str, text: &str, complete: bool) -> Value {
    let status = if complete { "completed" } else { "incomplete" };
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

/// `POST /v1/responses`.
pub async fn responses(
    State(app): State<AppState>,
    AppJson(body): AppJson<Value>,
) -> Result<Response, ApiError> {
    let store = app.responses();
    let (full, items) = with_history(&store, &body)?;
    let chat = chat_body(&full).map_err(rename_param)?;
    let loaded = app.loaded()?;
    let keep = match body.get("store") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("store", "`store` must be a boolean")),
    };
    let job = chat_job(loaded, &chat).map_err(rename_param)?;
    let events = start_one(loaded, &app, &job)?;
    let echo = Echo {
        id: new_id("resp"),
        created_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: job.model.clone(),
        request: body.as_object().cloned().unwrap_or_default(),
        store: keep.then_some(store),
        items,
    };
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return Ok(respond_sse(job, echo, events));
    }
    let r = collect(events).await?;
    let complete = r.finish != "length";
    let u = usage(
        &job,
        r.completion_tokens,
        r.cached_tokens,
        job.reasoning_tokens(&r),
    );
    let (reasoning, text) = job.split_answer(r.text);
    let mut output = Vec::new();
    if !reasoning.is_empty() {
        output.push(reasoning_item(&new_id("rs"), &reasoning, "completed"));
    }
    output.extend(output_items(&job, &text, complete));
    let status = if complete { "completed" } else { "incomplete" };
    let response = echo.response(status, output, Some(u));
    echo.keep(&response);
    Ok(axum::Json(response).into_response())
}

/// `GET /v1/responses/{id}`: a stored response.
pub async fn get_response(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let response = with_stored(&app, &id, |s| s.response.clone())?;
    Ok(axum::Json(response).into_response())
}

/// `f` of the stored response `id` (404 when there is none).
fn with_stored<T>(app: &AppState, id: &str, f: impl FnOnce(&Stored) -> T) -> Result<T, ApiError> {
    let store = app.responses();
    let s = store.lock().map_err(ApiError::internal)?;
    s.map.get(id).map(f).ok_or_else(|| not_found(id))
}

/// `DELETE /v1/responses/{id}`.
pub async fn delete_response(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let store = app.responses();
    let removed = store.lock().map_err(ApiError::internal)?.remove(&id);
    if !removed {
        return Err(not_found(&id));
    }
    Ok(axum::Json(json!({"id": id, "object": "response", "deleted": true})).into_response())
}

/// `order` of `GET /v1/responses/{id}/input_items` (`desc`, the newest first, by default).
#[derive(Debug, serde::Deserialize)]
pub struct ItemsQuery {
    order: Option<String>,
}

/// `GET /v1/responses/{id}/input_items`: the items the response was generated from (the
/// conversation before it, `previous_response_id`'s included).
pub async fn input_items_list(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<ItemsQuery>,
) -> Result<Response, ApiError> {
    let mut data = with_stored(&app, &id, |s| s.items[..s.inputs].to_vec())?;
    match q.order.as_deref() {
        None | Some("desc") => data.reverse(),
        Some("asc") => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "order",
                "`order` must be `asc` or `desc`",
            ))
        }
    }
    let first = data.first().map(|i| i["id"].clone());
    let last = data.last().map(|i| i["id"].clone());
    Ok(
        axum::Json(json!({"object": "list", "data": data, "first_id": first,
                         "last_id": last, "has_more": false}))
        .into_response(),
    )
}

/// Sends the API's typed events, numbered.
struct Emitter {
    tx: mpsc::Sender<SseEvent>,
    seq: u64,
}

impl Emitter {
    /// `false` once the client is gone.
    async fn send(&mut self, kind: &str, mut data: Value) -> bool {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        let ev = SseEvent::default().event(kind).data(data.to_string());
        self.tx.send(ev).await.is_ok()
    }
}

fn respond_sse(job: Job, echo: Echo, events: TextEvents) -> Response {
    let (tx, rx) = mpsc::channel(64);
    // Dropping `events` (the client left: a send fails) cancels the generation.
    tokio::spawn(stream_events(job, echo, events, Emitter { tx, seq: 0 }));
    let body = stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// A function call being streamed: its item, and how far its arguments have been sent.
struct CallOut {
    item: Value,
    start: usize,
    sent: usize,
}

async fn stream_events(job: Job, echo: Echo, mut events: TextEvents, mut out: Emitter) {
    let in_progress = echo.response("in_progress", Vec::new(), None);
    if !out
        .send("response.created", json!({"response": in_progress}))
        .await
        || !out
            .send("response.in_progress", json!({"response": in_progress}))
            .await
    {
        return;
    }
    let msg_id = new_id("msg");
    // A thinking model's reasoning first, as an item of its own; the answer's item follows.
    let mut splitter = job.reasoning.clone();
    let mut thought = Thought {
        id: new_id("rs"),
        text: String::new(),
        open: false,
    };
    // With tools the text is held until it is known not to be a call (as on the chat path);
    // a call goes out as soon as its name is written, then its arguments piece by piece.
    // Text before a call (Hermes, "auto") is a message item of its own, closed when the first
    // call's item opens.
    let mut text = String::new();
    let mut out_text = OutText {
        id: msg_id,
        shown: 0,
        opened: false,
        closed: false,
    };
    let mut calls: Vec<CallOut> = Vec::new();
    let mut finish = ("length", 0, 0);
    loop {
        // A client that left is noticed while the text is held back too.
        let ev = tokio::select! {
            ev = events.next() => ev,
            _ = out.tx.closed() => return,
        };
        let Some(ev) = ev else { break };
        match ev {
            TextEvent::Delta {
                text: piece,
                tokens,
            } => {
                let piece = match splitter.as_mut() {
                    Some(s) => {
                        let split = s.push_tokens(&piece, tokens.len());
                        if !reasoning_delta(&mut out, &mut thought, &split.reasoning).await {
                            return;
                        }
                        // The answer's item waits for the answer's first piece.
                        if split.content.is_empty() {
                            continue;
                        }
                        if !reasoning_done(&mut out, &mut thought).await {
                            return;
                        }
                        split.content
                    }
                    None => piece,
                };
                let index = usize::from(!thought.text.is_empty());
                text.push_str(&piece);
                if !answer_progress(
                    &mut out,
                    &mut out_text,
                    &mut calls,
                    &job,
                    &text,
                    false,
                    index,
                )
                .await
                {
                    return;
                }
            }
            TextEvent::Finished {
                reason,
                completion_tokens,
                cached_tokens,
            } => finish = (reason, completion_tokens, cached_tokens),
            TextEvent::PromptLogprobs(_) => {}
            TextEvent::Failed(e) => {
                let e = ApiError::from(e);
                let failed = json!({"code": e.code, "message": e.message});
                let mut r = echo.response("failed", Vec::new(), None);
                r["error"] = failed;
                let _ = out.send("response.failed", json!({"response": r})).await;
                return;
            }
        }
    }
    let complete = finish.0 != "length";
    // What the splitter held back, and the reasoning's end.
    let last = splitter
        .as_mut()
        .map(ReasoningSplitter::finish)
        .unwrap_or_default();
    if !reasoning_delta(&mut out, &mut thought, &last.reasoning).await
        || !reasoning_done(&mut out, &mut thought).await
    {
        return;
    }
    let index = usize::from(!thought.text.is_empty());
    text.push_str(&last.content);
    if !answer_progress(
        &mut out,
        &mut out_text,
        &mut calls,
        &job,
        &text,
        true,
        index,
    )
    .await
    {
        return;
    }
    let mut items = Vec::new();
    if !calls.is_empty() {
        // The last call's arguments as parsed, or (cut short) as far as they were sent.
        let parsed = job.tools.as_ref().and_then(|t| t.parse_calls(&text));
        let at = index + usize::from(out_text.opened) + calls.len() - 1;
        let Some(c) = calls.last_mut() else { return };
        let args = parsed
            .and_then(|p| p.last().map(|(_, a)| a.clone()))
            .unwrap_or_else(|| text[c.start..c.sent].to_owned());
        if !close_call(&mut out, c, args, complete, at).await {
            return;
        }
        if out_text.opened {
            items.push(message_item(&out_text.id, &text[..out_text.shown], true));
        }
        items.extend(calls.into_iter().map(|c| c.item));
    } else {
        // No call after all (or none asked for): all of the text is the message.
        if !out_text.show(&mut out, &text, text.len(), index).await
            || !out_text.close(&mut out, &text, complete, index).await
        {
            return;
        }
        items.push(message_item(&out_text.id, &text, complete));
    }
    let status = if complete { "completed" } else { "incomplete" };
    let thought_tokens = splitter
        .as_ref()
        .map_or(0, ReasoningSplitter::reasoning_tokens);
    let u = usage(&job, finish.1, finish.2, thought_tokens);
    let mut output = Vec::new();
    if !thought.text.is_empty() {
        output.push(reasoning_item(&thought.id, &thought.text, "completed"));
    }
    output.extend(items);
    let r = echo.response(status, output, Some(u));
    echo.keep(&r);
    let _ = out
        .send(&format!("response.{status}"), json!({"response": r}))
        .await;
}

/// The message item of a streamed answer's text.
struct OutText {
    id: String,
    /// Bytes of the answer's text sent.
    shown: usize,
    opened: bool,
    closed: bool,
}

impl OutText {
    /// Opens the item, unless it is open. `false` once the client is gone.
    async fn open(&mut self, out: &mut Emitter, index: usize) -> bool {
        if self.opened {
            return true;
        }
        self.opened = true;
        open_message(out, &self.id, index).await
    }

    /// Sends the text up to `end`, opening the item first. `false` once the client is gone.
    async fn show(&mut self, out: &mut Emitter, text: &str, end: usize, index: usize) -> bool {
        if end <= self.shown {
            return true;
        }
        if !self.open(out, index).await {
            return false;
        }
        let sent = text_delta(out, &self.id, &text[self.shown..end], index).await;
        self.shown = end;
        sent
    }

    /// Closes the item (its `.done` events) with the text sent, opening it first if it never
    /// was. `false` once the client is gone.
    async fn close(&mut self, out: &mut Emitter, text: &str, complete: bool, index: usize) -> bool {
        if !self.open(out, index).await {
            return false;
        }
        self.closed = true;
        let text = &text[..self.shown];
        let part = json!({"type": "output_text", "text": text, "annotations": []});
        let item = message_item(&self.id, text, complete);
        out.send(
            "response.output_text.done",
            json!({"item_id": self.id, "output_index": index, "content_index": 0,
                   "text": text}),
        )
        .await
            && out
                .send(
                    "response.content_part.done",
                    json!({"item_id": self.id, "output_index": index, "content_index": 0,
                           "part": part}),
                )
                .await
            && out
                .send(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                )
                .await
    }
}

/// Sends what is new of a streamed answer (`last`: the text is complete; its first item at
/// `index`): its text as a message item, then its calls (the message closed when the first
/// call's item opens); text that may begin a call is held back. `false` once the client is
/// gone.
async fn answer_progress(
    out: &mut Emitter,
    t: &mut OutText,
    calls: &mut Vec<CallOut>,
    job: &Job,
    text: &str,
    last: bool,
    index: usize,
) -> bool {
    let plan = job.tools.as_deref();
    let (text_end, from) = match plan.map_or(Progress::Text, |p| p.progress(text)) {
        Progress::Text => (text.len(), None),
        Progress::TextUpTo(n) => (if last { text.len() } else { n }, None),
        Progress::CallsFrom(n) => (n, Some(n)),
    };
    if !t.show(out, text, text_end, index).await {
        return false;
    }
    let (Some(from), Some(plan)) = (from, plan) else {
        return true;
    };
    if t.opened
        && !t.closed
        && !plan.calls_so_far(&text[from..], last).is_empty()
        && !t.close(out, text, true, index).await
    {
        return false;
    }
    call_progress(
        out,
        calls,
        plan,
        text,
        from,
        last,
        index + usize::from(t.opened),
    )
    .await
}

/// Sends what is new of the calls being written from byte `from` of `text` (`last`: the
/// text is complete; the first call's item at `index`, the next ones after it): each call's
/// item once its name is known, then argument pieces; a call is closed (its `.done` events)
/// when the next one begins. `false` once the client is gone.
async fn call_progress(
    out: &mut Emitter,
    calls: &mut Vec<CallOut>,
    plan: &ToolPlan,
    text: &str,
    from: usize,
    last: bool,
    index: usize,
) -> bool {
    for (k, mut span) in plan
        .calls_so_far(&text[from..], last)
        .into_iter()
        .enumerate()
    {
        span.start += from;
        span.end += from;
        if k == calls.len() {
            if let Some(prev) = calls.last_mut() {
                let args = text[prev.start..prev.sent].to_owned();
                if !close_call(out, prev, args, true, index + k - 1).await {
                    return false;
                }
            }
            let item = function_call_item(&span.name, "");
            let mut added = item.clone();
            added["status"] = json!("in_progress");
            if !out
                .send(
                    "response.output_item.added",
                    json!({"output_index": index + k, "item": added}),
                )
                .await
            {
                return false;
            }
            calls.push(CallOut {
                item,
                start: span.start,
                sent: span.start,
            });
        }
        let Some(c) = calls.get_mut(k) else {
            return true;
        };
        if span.end <= c.sent {
            continue;
        }
        let delta = json!({"item_id": c.item["id"], "output_index": index + k,
                           "delta": &text[c.sent..span.end]});
        c.sent = span.end;
        if !out
            .send("response.function_call_arguments.delta", delta)
            .await
        {
            return false;
        }
    }
    true
}

/// A call's last events (`.function_call_arguments.done`, `.output_item.done`) with its whole
/// `args`; its item is then final.
async fn close_call(
    out: &mut Emitter,
    c: &mut CallOut,
    args: String,
    complete: bool,
    index: usize,
) -> bool {
    c.item["arguments"] = json!(args);
    c.item["status"] = json!(if complete { "completed" } else { "incomplete" });
    let done = json!({"item_id": c.item["id"], "output_index": index, "arguments": args});
    out.send("response.function_call_arguments.done", done)
        .await
        && out
            .send(
                "response.output_item.done",
                json!({"output_index": index, "item": c.item}),
            )
            .await
}

async fn open_message(out: &mut Emitter, id: &str, index: usize) -> bool {
    let item = json!({"type": "message", "id": id, "status": "in_progress", "role": "assistant",
                      "content": []});
    let part = json!({"type": "output_text", "text": "", "annotations": []});
    out.send(
        "response.output_item.added",
        json!({"output_index": index, "item": item}),
    )
    .await
        && out
            .send(
                "response.content_part.added",
                json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
            )
            .await
}

async fn text_delta(out: &mut Emitter, id: &str, delta: &str, index: usize) -> bool {
    out.send(
        "response.output_text.delta",
        json!({"item_id": id, "output_index": index, "content_index": 0, "delta": delta}),
    )
    .await
}

/// A thinking model's reasoning as it streams: its item (output 0) opened with the first
/// piece, each piece a `response.reasoning_text.delta`. `false` once the client is gone.
async fn reasoning_delta(out: &mut Emitter, r: &mut Thought, delta: &str) -> bool {
    if delta.is_empty() {
        return true;
    }
    if !r.open {
        r.open = true;
        let item = reasoning_item(&r.id, "", "in_progress");
        if !out
            .send(
                "response.output_item.added",
                json!({"output_index": 0, "item": item}),
            )
            .await
        {
            return false;
        }
    }
    r.text.push_str(delta);
    out.send(
        "response.reasoning_text.delta",
        json!({"item_id": r.id, "output_index": 0, "content_index": 0, "delta": delta}),
    )
    .await
}

/// Closes an open reasoning item (the answer's item then comes at output 1).
async fn reasoning_done(out: &mut Emitter, r: &mut Thought) -> bool {
    if !r.open {
        return true;
    }
    r.open = false;
    out.send(
        "response.reasoning_text.done",
        json!({"item_id": r.id, "output_index": 0, "content_index": 0, "text": r.text}),
    )
    .await
        && out
            .send(
                "response.output_item.done",
                json!({"output_index": 0, "item": reasoning_item(&r.id, &r.text, "completed")}),
            )
            .await
}

/// The reasoning item of a streamed answer.
struct Thought {
    id: String,
    text: String,
    open: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(n: usize) -> Stored {
        Stored {
            response: json!({"id": format!("resp_{n}"), "output": []}),
            items: vec![json!({"type": "message", "role": "user", "content": format!("{n}")})],
            inputs: 1,
            seq: 0,
        }
    }

    #[test]
    fn stored_responses_survive_a_restart_in_order_and_within_the_limit() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("responses");
        let mut s = ResponseStore::open(&path).expect("open");
        for n in 0..MAX_STORED + 5 {
            s.insert(format!("resp_{n}"), stored(n));
        }
        assert_eq!(s.len(), MAX_STORED);
        assert!(s.remove("resp_7"));
        assert!(!s.remove("resp_7"));
        assert!(!s.remove("../responses"), "only held ids name files");
        // A write cut short and a damaged file are dropped at the next start.
        std::fs::write(path.join("resp_x.json.tmp"), b"{").expect("write");
        std::fs::write(path.join("resp_y.json"), b"{\"response\":").expect("write");
        drop(s);

        let mut s = ResponseStore::open(&path).expect("reopen");
        assert_eq!(s.len(), MAX_STORED - 1);
        let files = std::fs::read_dir(&path).expect("list").count();
        assert_eq!(
            files,
            MAX_STORED - 1,
            "evicted, deleted and damaged files are gone"
        );
        assert!(!s.map.contains_key("resp_4"), "the oldest went first");
        assert!(!s.map.contains_key("resp_7"));
        assert_eq!(s.map["resp_5"].items[0]["content"], "5");
        assert_eq!(s.order.front().map(String::as_str), Some("resp_5"));
        assert_eq!(s.order.back().map(String::as_str), Some("resp_1004"));
        // New ones come after the ones read back.
        s.insert("resp_new0".into(), stored(0));
        assert_eq!(s.order.front().map(String::as_str), Some("resp_5"));
        s.insert("resp_new".into(), stored(0));
        assert_eq!(s.order.front().map(String::as_str), Some("resp_6"));
        assert!(!path.join("resp_5.json").exists());
        drop(s);
        let s = ResponseStore::open(&path).expect("reopen");
        assert_eq!(s.order.back().map(String::as_str), Some("resp_new"));
        assert_eq!(s.len(), MAX_STORED);
    }
}
