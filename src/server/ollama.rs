//! Ollama's chat and model-listing API, so that Ollama clients (the `ollama` Python and
//! JavaScript libraries, Open WebUI, Continue's `ollama` provider) work against nextoken:
//! `POST /api/chat` (`messages` with `tool_calls` and `tool` results, `tools`, `format`,
//! `options`, `stream` as newline-delimited JSON, on by default), `GET /api/tags`,
//! `POST /api/show`, `GET /api/ps`, `GET /api/version`. (`/api/generate` is with the editor
//! dialects in `infill.rs`.) A chat request is translated into an OpenAI chat body and runs on
//! the chat path; errors name Ollama's fields. With `tools` the model decides whether to call
//! one (OpenAI's `tool_choice`, not an Ollama field, is accepted to decide for it).

use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::stream;
use serde_json::{json, Map, Value};

use super::completions::{chat_job, collect, start_one, Job};
use super::error::{ApiError, AppJson};
use super::infill::rfc3339;
use super::stream::TextEvent;
use super::tools::Progress;
use super::AppState;
use crate::text::ReasoningSplitter;

/// Ollama's default temperature (its other defaults, top-k 40 and top-p 0.9, too).
const DEFAULT_TEMPERATURE: f64 = 0.8;

/// The chat request an Ollama chat request amounts to.
fn chat_body(body: &Value) -> Result<Value, ApiError> {
    let Some(req) = body.as_object() else {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    };
    let Some(Value::Array(items)) = req.get("messages") else {
        return Err(ApiError::invalid("messages", "`messages` must be a list"));
    };
    let mut messages = Vec::with_capacity(items.len());
    // Calls so far, (id, name, answered), for the `tool` results that follow them.
    let mut calls: Vec<(String, String, bool)> = Vec::new();
    for (i, m) in items.iter().enumerate() {
        let field = |k: &str| format!("messages[{i}].{k}");
        let Some(m) = m.as_object() else {
            return Err(ApiError::invalid(
                &format!("messages[{i}]"),
                "a message must be an object",
            ));
        };
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid(&field("role"), "`role` must be a string"))?;
        let content = match m.get("content") {
            None | Some(Value::Null) => "",
            Some(Value::String(s)) => s,
            Some(_) => {
                return Err(ApiError::invalid(
                    &field("content"),
                    "`content` must be a string",
                ))
            }
        };
        if m.get("images")
            .is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(ApiError::invalid(
                &field("images"),
                "images are not supported: the model reads text only",
            ));
        }
        let mut out = json!({"role": role, "content": content});
        if let Some(tc) = m.get("tool_calls").filter(|v| !v.is_null()) {
            let Some(list) = tc.as_array() else {
                return Err(ApiError::invalid(
                    &field("tool_calls"),
                    "`tool_calls` must be a list",
                ));
            };
            let mut wire = Vec::with_capacity(list.len());
            for (j, c) in list.iter().enumerate() {
                let f = &c["function"];
                let Some(name) = f["name"].as_str() else {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].tool_calls[{j}].function.name"),
                        "a call needs its function's `name`",
                    ));
                };
                // Ollama's arguments are an object; OpenAI's the object's JSON text.
                let args = match &f["arguments"] {
                    Value::Null => "{}".to_owned(),
                    Value::String(s) => s.clone(),
                    v => v.to_string(),
                };
                let id = format!("call_{}", calls.len());
                calls.push((id.clone(), name.to_owned(), false));
                wire.push(json!({"id": id, "type": "function",
                                 "function": {"name": name, "arguments": args}}));
            }
            out["tool_calls"] = json!(wire);
        }
        if role == "tool" {
            // The result answers the call it names (`tool_name`), else the oldest unanswered.
            let name = m.get("tool_name").and_then(Value::as_str);
            if let Some(c) = calls
                .iter_mut()
                .find(|c| !c.2 && name.is_none_or(|n| n == c.1))
            {
                c.2 = true;
                out["tool_call_id"] = json!(c.0);
            }
        }
        messages.push(out);
    }
    let mut chat = Map::new();
    chat.insert("messages".into(), json!(messages));
    // `tool_choice` is not Ollama's; taken as an extension, as on the OpenAI routes.
    for k in ["model", "tools", "tool_choice"] {
        if let Some(v) = req.get(k).filter(|v| !v.is_null()) {
            chat.insert(k.into(), v.clone());
        }
    }
    match req.get("format") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(s)) if s == "json" => {
            chat.insert("response_format".into(), json!({"type": "json_object"}));
        }
        Some(schema @ Value::Object(_)) => {
            chat.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": {"name": "format", "schema": schema}}),
            );
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "format",
                "`format` must be \"json\" or a JSON schema object",
            ))
        }
    }
    // `think`: a thinking model's reasoning comes back apart (`message.thinking`), or none is
    // asked for (Qwen3's `enable_thinking`); left out, the text is the answer as generated.
    match req.get("think") {
        None | Some(Value::Null) => {
            chat.insert("reasoning_format".into(), json!("none"));
        }
        Some(Value::Bool(false)) => {
            chat.insert("reasoning_format".into(), json!("none"));
            chat.insert(
                "chat_template_kwargs".into(),
                json!({"enable_thinking": false}),
            );
        }
        // gpt-oss's levels (`"low"`, `"medium"`, `"high"`) think too.
        Some(Value::Bool(true) | Value::String(_)) => {
            chat.insert("reasoning_format".into(), json!("deepseek"));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "think",
                "`think` must be true, false or a level",
            ))
        }
    }
    chat.insert("temperature".into(), json!(DEFAULT_TEMPERATURE));
    let options = match req.get("options") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(_) => return Err(ApiError::invalid("options", "`options` must be an object")),
    };
    for (k, v) in options {
        // Ollama's option names → OpenAI's (and vLLM's) fields; the rest (`num_ctx`,
        // `num_thread`, `mirostat`, …) concern how Ollama runs a model and are ignored.
        let key = match k.as_str() {
            "temperature" | "top_p" | "top_k" | "min_p" | "seed" | "presence_penalty"
            | "frequency_penalty" | "stop" => k.clone(),
            "repeat_penalty" => "repetition_penalty".into(),
            "num_predict" => {
                // Ollama: -1 (and -2) mean no limit.
                if v.as_i64().is_some_and(|n| n < 0) {
                    continue;
                }
                "max_tokens".into()
            }
            _ => continue,
        };
        chat.insert(key, v);
    }
    Ok(Value::Object(chat))
}

/// Errors about the chat body's fields, renamed to Ollama's.
fn rename_param(mut e: ApiError) -> ApiError {
    if let Some(p) = e.param.take() {
        e.param = Some(match p.as_str() {
            "response_format" => "format".to_owned(),
            "max_tokens" => "options.num_predict".to_owned(),
            "repetition_penalty" => "options.repeat_penalty".to_owned(),
            "temperature" | "top_p" | "top_k" | "min_p" | "seed" | "presence_penalty"
            | "frequency_penalty" | "stop" => format!("options.{p}"),
            _ => p,
        });
    }
    e
}

/// One line of a newline-delimited JSON stream.
fn ndjson(v: &Value) -> Result<String, Infallible> {
    Ok(format!("{v}\n"))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The closing object's counts and durations.
struct Totals {
    submitted: Instant,
    first: Option<Instant>,
    prompt_tokens: usize,
    tokens: usize,
    reason: &'static str,
}

impl Totals {
    /// The streamed answer's last object: empty content, counts and durations.
    fn closing(&self, model: &str) -> Value {
        let mut v = json!({"model": model, "created_at": rfc3339(SystemTime::now()),
                           "message": {"role": "assistant", "content": ""}});
        self.fill(&mut v);
        v
    }

    fn fill(&self, v: &mut Value) {
        let now = Instant::now();
        let first = self.first.unwrap_or(now);
        v["done"] = json!(true);
        v["done_reason"] = json!(if self.reason == "length" {
            "length"
        } else {
            "stop"
        });
        v["total_duration"] = json!(nanos(now - self.submitted));
        v["load_duration"] = json!(0);
        v["prompt_eval_count"] = json!(self.prompt_tokens);
        v["prompt_eval_duration"] = json!(nanos(first - self.submitted));
        v["eval_count"] = json!(self.tokens);
        v["eval_duration"] = json!(nanos(now - first));
    }
}

/// The assistant message of a finished answer: a tool call (arguments as an object, as
/// Ollama gives them) or text.
fn message(job: &Job, text: &str) -> Value {
    match job.tools.as_ref().and_then(|t| t.finished_calls(text)) {
        Some((calls, _)) => {
            let calls: Vec<Value> = calls
                .into_iter()
                .map(|(name, args)| {
                    let args: Value = serde_json::from_str(&args).unwrap_or_else(|_| json!({}));
                    json!({"function": {"name": name, "arguments": args}})
                })
                .collect();
            let before = job.tools.as_ref().map_or("", |t| t.text_before_calls(text));
            json!({"role": "assistant", "content": before, "tool_calls": calls})
        }
        None => json!({"role": "assistant", "content": text}),
    }
}

/// `POST /api/chat`.
pub async fn chat(
    State(app): State<AppState>,
    AppJson(body): AppJson<Value>,
) -> Result<Response, ApiError> {
    let chat = chat_body(&body).map_err(rename_param)?;
    let loaded = app.loaded()?;
    let job = chat_job(loaded, &chat).map_err(rename_param)?;
    let submitted = Instant::now();
    let events = start_one(loaded, &app, &job)?;
    let model = job.model.clone();
    let mut totals = Totals {
        submitted,
        first: None,
        prompt_tokens: job.prompt_tokens(),
        tokens: 0,
        reason: "stop",
    };
    if body.get("stream").and_then(Value::as_bool) == Some(false) {
        let r = collect(events).await?;
        totals.tokens = r.completion_tokens;
        totals.reason = r.finish;
        totals.first = r.first_token;
        let (thinking, text) = job.split_answer(r.text);
        let mut m = message(&job, &text);
        if !thinking.is_empty() {
            m["thinking"] = json!(thinking);
        }
        let mut v = json!({"model": model, "created_at": rfc3339(SystemTime::now()),
                           "message": m});
        totals.fill(&mut v);
        return Ok(axum::Json(v).into_response());
    }
    // Streamed: text as it comes; an answer that is a tool call goes out whole once done
    // (as Ollama sends calls), then the closing object.
    struct St {
        events: Option<super::stream::TextEvents>,
        job: Job,
        totals: Totals,
        text: String,
        model: String,
        /// Text held back while the answer may still be a call.
        held: bool,
        /// With `think`: the reasoning split off as it streams (`message.thinking`).
        splitter: Option<ReasoningSplitter>,
        /// The closing object is still to be sent.
        closing: bool,
    }
    let st = St {
        events: Some(events),
        held: job.tools.is_some(),
        splitter: job.reasoning.clone(),
        job,
        totals,
        text: String::new(),
        model,
        closing: true,
    };
    let s = stream::unfold(st, move |mut st| async move {
        let Some(ev) = st.events.as_mut() else {
            // After the answer's last piece: the closing object, once.
            if !st.closing {
                return None;
            }
            st.closing = false;
            let v = st.totals.closing(&st.model);
            return Some((ndjson(&v), st));
        };
        loop {
            let chunk = |st: &St, m: Value| {
                json!({"model": st.model, "created_at": rfc3339(SystemTime::now()),
                       "message": m, "done": false})
            };
            match ev.next().await {
                Some(TextEvent::PromptLogprobs(_)) => {}
                Some(TextEvent::Delta { text, tokens }) => {
                    if st.totals.first.is_none() && !tokens.is_empty() {
                        st.totals.first = Some(Instant::now());
                    }
                    let text = match st.splitter.as_mut() {
                        Some(s) => {
                            let split = s.push(&text);
                            if !split.reasoning.is_empty() {
                                // Reasoning goes out as `message.thinking`; an answer's first
                                // piece in the same delta with it, unless it is held back.
                                let content = if st.held {
                                    st.text.push_str(&split.content);
                                    String::new()
                                } else {
                                    split.content
                                };
                                let v = chunk(
                                    &st,
                                    json!({"role": "assistant", "content": content,
                                           "thinking": split.reasoning}),
                                );
                                return Some((ndjson(&v), st));
                            }
                            split.content
                        }
                        None => text,
                    };
                    st.text.push_str(&text);
                    if st.held {
                        let upto = match st.job.tools.as_ref().map(|t| t.progress(&st.text)) {
                            Some(Progress::Text) => {
                                st.held = false;
                                let all = std::mem::take(&mut st.text);
                                let v = chunk(&st, json!({"role": "assistant", "content": all}));
                                return Some((ndjson(&v), st));
                            }
                            Some(Progress::TextUpTo(n) | Progress::CallsFrom(n)) => n,
                            None => 0,
                        };
                        if upto == 0 {
                            continue;
                        }
                        // Text before what may be a call goes out; the rest stays held.
                        let rest = st.text.split_off(upto);
                        let before = std::mem::replace(&mut st.text, rest);
                        let v = chunk(&st, json!({"role": "assistant", "content": before}));
                        return Some((ndjson(&v), st));
                    }
                    if text.is_empty() {
                        continue;
                    }
                    st.text.clear();
                    let v = chunk(&st, json!({"role": "assistant", "content": text}));
                    return Some((ndjson(&v), st));
                }
                Some(TextEvent::Finished {
                    reason,
                    completion_tokens,
                    ..
                }) => {
                    st.totals.reason = reason;
                    st.totals.tokens = completion_tokens;
                }
                Some(TextEvent::Failed(e)) => {
                    st.events = None;
                    st.closing = false;
                    let v = json!({"error": ApiError::from(e).message});
                    return Some((ndjson(&v), st));
                }
                None => {
                    st.events = None;
                    // What the splitter held back at the end, then (held) a call or text.
                    let thinking = match st.splitter.as_mut().map(ReasoningSplitter::finish) {
                        Some(split) => {
                            st.text.push_str(&split.content);
                            split.reasoning
                        }
                        None => String::new(),
                    };
                    if st.text.is_empty() && thinking.is_empty() {
                        st.closing = false;
                        let v = st.totals.closing(&st.model);
                        return Some((ndjson(&v), st));
                    }
                    // A call goes out as Ollama sends one: whole, in a piece of its own.
                    let text = std::mem::take(&mut st.text);
                    let mut m = if st.held {
                        message(&st.job, &text)
                    } else {
                        json!({"role": "assistant", "content": text})
                    };
                    if !thinking.is_empty() {
                        m["thinking"] = json!(thinking);
                    }
                    let v = chunk(&st, m);
                    return Some((ndjson(&v), st));
                }
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(s),
    )
        .into_response())
}

/// The architecture's name, lower-case (`llama`): Ollama's model family and GGUF's key prefix.
fn family(loaded: &super::Loaded) -> String {
    format!("{:?}", loaded.engine.model_config().architecture).to_lowercase()
}

/// A parameter count as Ollama writes it: `134.52M`, `1.54B`.
fn parameter_size(n: u64) -> String {
    let (value, unit) = match n {
        n if n >= 1_000_000_000 => (n as f64 / 1e9, "B"),
        n if n >= 1_000_000 => (n as f64 / 1e6, "M"),
        n => (n as f64 / 1e3, "K"),
    };
    let text = format!("{value:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}{unit}")
}

/// One model as `/api/tags` and `/api/ps` list it.
fn model_entry(loaded: &super::Loaded, name: &str) -> Value {
    let family = family(loaded);
    let d = loaded.details.as_ref();
    json!({
        "name": name,
        "model": name,
        "modified_at": rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(loaded.created)),
        "size": d.map_or(0, |d| d.size),
        "digest": "",
        "details": {
            "parent_model": if name == loaded.model_name { "" } else { &loaded.model_name },
            "format": d.map_or("", |d| d.format),
            "family": family,
            "families": [family],
            "parameter_size": d.map_or_else(String::new, |d| {
                parameter_size(d.parameters)
            }),
            "quantization_level": d.map_or("", |d| d.quantization.as_str()),
        },
    })
}

fn model_names(loaded: &super::Loaded) -> Vec<String> {
    let mut names = vec![loaded.model_name.clone()];
    names.extend(loaded.engine.adapter_names());
    names
}

/// `GET /api/tags`: the served model and its adapters.
pub async fn tags(State(app): State<AppState>) -> Result<Response, ApiError> {
    let loaded = app.loaded()?;
    let models: Vec<Value> = model_names(loaded)
        .iter()
        .map(|n| model_entry(loaded, n))
        .collect();
    Ok(axum::Json(json!({"models": models})).into_response())
}

/// `GET /api/ps`: the same models, all loaded (kept loaded: no expiry).
pub async fn ps(State(app): State<AppState>) -> Result<Response, ApiError> {
    let loaded = app.loaded()?;
    let models: Vec<Value> = model_names(loaded)
        .iter()
        .map(|n| {
            let mut m = model_entry(loaded, n);
            m["expires_at"] = json!("9999-12-31T23:59:59Z");
            m["size_vram"] = json!(0);
            m
        })
        .collect();
    Ok(axum::Json(json!({"models": models})).into_response())
}

/// `POST /api/show` (`{"model"}`): details, the architecture's numbers in `model_info`
/// (GGUF key names: Continue reads the context length there), the chat template and what the
/// model can do.
pub async fn show(
    State(app): State<AppState>,
    AppJson(body): AppJson<Value>,
) -> Result<Response, ApiError> {
    let loaded = app.loaded()?;
    let name = body
        .get("model")
        .or_else(|| body.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("model", "`model` is required"))?;
    if !model_names(loaded).iter().any(|n| n == name) {
        return Err(ApiError::model_not_found(name));
    }
    let c = loaded.engine.model_config();
    let arch = family(loaded);
    let mut info = Map::new();
    info.insert("general.architecture".into(), json!(arch));
    for (k, v) in [
        ("context_length", c.max_position_embeddings),
        ("embedding_length", c.hidden_size),
        ("feed_forward_length", c.intermediate_size),
        ("block_count", c.num_layers),
        ("attention.head_count", c.num_heads),
        ("attention.head_count_kv", c.num_kv_heads),
        ("vocab_size", c.vocab_size),
    ] {
        info.insert(format!("{arch}.{k}"), json!(v));
    }
    let mut capabilities = vec!["completion", "insert"];
    if loaded.chat_template.is_some() {
        capabilities.push("tools");
    }
    // Ollama's flag for models that take `think` (clients show a toggle for it).
    if loaded.reasoning {
        capabilities.push("thinking");
    }
    let entry = model_entry(loaded, name);
    Ok(axum::Json(json!({
        "modelfile": "",
        "parameters": "",
        // The template chats are rendered with (`--chat-template-file`'s, if given).
        "template": loaded.chat_template.as_ref().map_or("", |t| t.source()),
        "details": entry["details"],
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": entry["modified_at"],
    }))
    .into_response())
}

/// `GET /api/version`: nextoken's version (Ollama clients only check that it answers).
pub async fn version() -> Response {
    axum::Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_sizes_read_as_ollama_writes_them() {
        assert_eq!(parameter_size(134_515_008), "134.52M");
        assert_eq!(parameter_size(1_543_714_304), "1.54B");
        assert_eq!(parameter_size(7_000_000_000), "7B");
        assert_eq!(parameter_size(1_500), "1.5K");
    }

    /// `think`: reasoning apart (`deepseek`, as `message.thinking`), none asked for
    /// (`enable_thinking: false`), or, left out, the text as generated.
    #[test]
    fn think_becomes_a_reasoning_format() {
        let with = |think: Value| {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
            if !think.is_null() {
                body["think"] = think;
            }
            chat_body(&body)
        };
        let chat = with(Value::Null).expect("valid");
        assert_eq!(chat["reasoning_format"], "none");
        assert!(chat.get("chat_template_kwargs").is_none());
        for on in [json!(true), json!("high")] {
            let chat = with(on).expect("valid");
            assert_eq!(chat["reasoning_format"], "deepseek");
            assert!(chat.get("chat_template_kwargs").is_none());
        }
        let chat = with(json!(false)).expect("valid");
        assert_eq!(chat["reasoning_format"], "none");
        assert_eq!(
            chat["chat_template_kwargs"],
            json!({"enable_thinking": false})
        );
        let e = with(json!(5)).expect_err("not a bool or a level");
        assert_eq!(e.param.as_deref(), Some("think"));
    }

    #[test]
    fn ollama_chat_bodies_become_openai_chat_bodies() {
        let body = json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "31 C", "tool_name": "get_weather"}],
            "format": "json",
            "options": {"temperature": 0, "num_predict": 12, "repeat_penalty": 1.1,
                        "num_ctx": 4096, "stop": ["\n"]},
            "stream": false});
        let chat = chat_body(&body).expect("valid");
        assert_eq!(chat["model"], "m");
        assert_eq!(chat["temperature"], 0);
        assert_eq!(chat["max_tokens"], 12);
        assert_eq!(chat["repetition_penalty"], 1.1);
        assert_eq!(chat["stop"], json!(["\n"]));
        assert!(chat.get("num_ctx").is_none() && chat.get("stream").is_none());
        assert_eq!(chat["response_format"], json!({"type": "json_object"}));
        let m = &chat["messages"];
        assert_eq!(
            m[1]["tool_calls"],
            json!([{"id": "call_0", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}])
        );
        assert_eq!(m[2]["tool_call_id"], "call_0");
        // Defaults: Ollama's temperature; no limit for num_predict -1.
        let chat =
            chat_body(&json!({"messages": [], "options": {"num_predict": -1}})).expect("valid");
        assert_eq!(chat["temperature"], DEFAULT_TEMPERATURE);
        assert!(chat.get("max_tokens").is_none());
        // A schema as `format`.
        let chat =
            chat_body(&json!({"messages": [], "format": {"type": "object"}})).expect("valid");
        assert_eq!(
            chat["response_format"]["json_schema"]["schema"]["type"],
            "object"
        );
    }

    #[test]
    fn bad_ollama_chat_bodies_name_their_field() {
        for (body, param) in [
            (json!({"messages": "hi"}), "messages"),
            (json!({"messages": [{"content": "hi"}]}), "messages[0].role"),
            (
                json!({"messages": [{"role": "user", "content": 1}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}),
                "messages[0].images",
            ),
            (json!({"messages": [], "format": 3}), "format"),
            (json!({"messages": [], "options": []}), "options"),
        ] {
            let e = chat_body(&body).expect_err("invalid");
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
    }
}
