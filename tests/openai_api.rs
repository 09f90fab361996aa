//! The HTTP API through the router (`oneshot`, no sockets), on the real model: every endpoint,
//! the exact SSE framing, stop strings across tokens, logprobs, cancellation, and the status and
//! OpenAI-shaped body of every error.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use common::*;
use http_body_util::BodyExt;
use nextoken::engine::{EngineConfig, EngineHandle};
use nextoken::server::{self, AppState, Loaded, ServerConfig};
use serde_json::{json, Value};
use tower::ServiceExt;

fn loaded_with(config: EngineConfig) -> Arc<Loaded> {
    let details = nextoken::model::details::file_details(&model_path()).expect("details");
    Arc::new(new_loaded(config).with_details(details))
}

/// The default model behind an engine of its own.
fn new_loaded(config: EngineConfig) -> Loaded {
    let (model, tokenizer) = nextoken::load(&model_path()).expect("model loads");
    let eos = model.config().eos_token_ids.clone();
    let engine = EngineHandle::spawn(model, config).expect("engine");
    Loaded::new(engine, tokenizer, "smollm2".into(), eos, Default::default()).expect("loaded")
}

fn shared_loaded() -> Arc<Loaded> {
    static CELL: OnceLock<Arc<Loaded>> = OnceLock::new();
    CELL.get_or_init(|| loaded_with(EngineConfig::default()))
        .clone()
}

fn app_with(config: ServerConfig, loaded: Option<Arc<Loaded>>) -> (Router, AppState) {
    let state = AppState::new(config);
    if let Some(l) = loaded {
        state.set_loaded(l);
    }
    (server::router(state.clone()), state)
}

fn app() -> Router {
    app_with(ServerConfig::default(), Some(shared_loaded())).0
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

fn post(path: &str, body: Value) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("request")
}

/// The objects of a newline-delimited JSON body (Ollama's streams).
fn ndjson_lines(bytes: &[u8]) -> Vec<Value> {
    std::str::from_utf8(bytes)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("line JSON"))
        .collect()
}

async fn post_json(app: &Router, path: &str, body: Value) -> (StatusCode, Value) {
    let (status, _, bytes) = send(app, post(path, body)).await;
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)));
    (status, v)
}

/// Asserts an OpenAI error body with the status and (optionally) the param.
fn assert_error(status: StatusCode, v: &Value, want: StatusCode, param: Option<&str>) {
    assert_eq!(status, want, "{v}");
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{v}");
    }
}

/// Splits an SSE body into its `data:` payloads, checking the framing byte by byte.
fn sse_payloads(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8(bytes.to_vec()).expect("utf-8");
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "ends with [DONE]: {text:?}"
    );
    sse_events(bytes)
}

/// The content pieces of a streamed chat answer (choice 0), in order.
fn chat_stream_pieces(bytes: &[u8]) -> Vec<String> {
    sse_payloads(bytes)
        .iter()
        .filter(|p| *p != "[DONE]")
        .map(|p| serde_json::from_str::<Value>(p).expect("chunk"))
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

/// The `data:` payloads of an SSE body (llama.cpp's dialect sends no `[DONE]`).
fn sse_events(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8(bytes.to_vec()).expect("utf-8");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            assert!(
                e.starts_with("data: "),
                "every event is one data line: {e:?}"
            );
            assert!(!e[6..].contains('\n'), "single-line payload: {e:?}");
            e[6..].to_string()
        })
        .collect()
}

#[tokio::test]
async fn completion_greedy_with_a_stop_string_split_across_tokens() {
    let app = app();
    // Greedy text is " Paris.\n\nThe answer is…": " Paris" "." "\n" "\n" are separate tokens.
    let (status, v) = post_json(
        &app,
        "/v1/completions",
        json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 20,
               "temperature": 0, "stop": ["is.\n\nThe"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "smollm2");
    assert!(v["id"].as_str().is_some_and(|id| id.starts_with("cmpl-")));
    assert_eq!(v["choices"][0]["text"], " Par");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(
        v["usage"]["completion_tokens"], 5,
        "stopped as soon as the stop string completed"
    );
    assert_eq!(v["usage"]["total_tokens"], 10);
}

#[tokio::test]
async fn completion_matches_the_reference_and_stops_on_eos() {
    let app = app();
    let reference = reference("hf_f32.json");
    let p = &reference["prompts"][0];
    let (status, v) = post_json(
        &app,
        "/v1/completions",
        json!({"prompt": u32s(&p["prompt_ids"]), "max_tokens": 64, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let firm = firm_steps(p);
    let want = &u32s(&p["greedy"]["new_token_ids"])[..firm];
    let prefix = gguf().1.decode(want, false).expect("decode");
    let text = v["choices"][0]["text"].as_str().expect("text");
    assert!(text.starts_with(&prefix), "{text:?} vs {prefix:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let n = v["usage"]["completion_tokens"].as_u64().expect("count") as usize;
    assert!(n > firm && n < 64, "stopped on EOS: {n} tokens");
    assert!(!text.contains("<|im_end|>"), "EOS counts, is not shown");
}

#[tokio::test]
async fn streaming_completion_bytes_and_usage() {
    let app = app();
    let body = json!({"prompt": "def fibonacci(n):\n", "max_tokens": 12, "temperature": 0,
                      "stream": true, "stream_options": {"include_usage": true}});
    let (status, headers, bytes) = send(&app, post("/v1/completions", body.clone())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
    let payloads = sse_payloads(&bytes);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).expect("chunk JSON"))
        .collect();
    let usage = chunks.last().expect("usage chunk");
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let streamed: String = chunks[..chunks.len() - 1]
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().expect("text"))
        .collect();
    assert!(chunks.len() > 5, "streamed token by token");
    let ids: std::collections::HashSet<&str> = chunks
        .iter()
        .map(|c| c["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids.len(), 1, "one id for the whole stream");
    let mut plain = body;
    plain["stream"] = json!(false);
    let (_, v) = post_json(&app, "/v1/completions", plain).await;
    assert_eq!(v["choices"][0]["text"].as_str(), Some(streamed.as_str()));
}

#[tokio::test]
async fn completion_logprobs_and_echo() {
    let app = app();
    let (status, v) = post_json(
        &app,
        "/v1/completions",
        json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
               "logprobs": 3, "echo": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let c = &v["choices"][0];
    assert!(c["text"]
        .as_str()
        .expect("text")
        .starts_with("The capital of France is Paris"));
    // With `echo`, the prompt's tokens come first (as OpenAI's legacy completions and vLLM
    // report them): the first without a log-probability, the others each given the ones
    // before it; then the 4 generated.
    let lp = &c["logprobs"];
    let tokens = lp["tokens"].as_array().expect("tokens");
    assert_eq!(
        tokens[..6],
        [
            json!("The"),
            json!(" capital"),
            json!(" of"),
            json!(" France"),
            json!(" is"),
            json!(" Paris")
        ]
    );
    assert_eq!(tokens.len(), 5 + 4);
    let token_lps = lp["token_logprobs"].as_array().expect("lps");
    let tops = lp["top_logprobs"].as_array().expect("tops");
    assert_eq!((&token_lps[0], &tops[0]), (&Value::Null, &Value::Null));
    // References: log p(" Paris") = -0.25808 (transformers f32), -0.2589 (llama.cpp); the
    // quantized path lands within its tolerance of both (tests/reference.rs), the runner-up
    // token 2.5 nats lower.
    let paris = token_lps[5].as_f64().expect("f64");
    assert!((paris + 0.25808).abs() < 0.1, "{paris}");
    for (i, top) in tops.iter().enumerate().skip(1) {
        let top = top.as_object().expect("dict");
        assert!(!top.is_empty() && top.len() <= 3);
        let best = top
            .values()
            .map(|x| x.as_f64().expect("f64"))
            .fold(f64::MIN, f64::max);
        let chosen = token_lps[i].as_f64().expect("f64");
        assert!(
            chosen < 0.0 && best >= chosen - 1e-6,
            "{i}: {chosen} vs top {best}"
        );
        if i >= 5 {
            assert!((best - chosen).abs() < 1e-6, "greedy picks the top");
        }
    }
    // " of" after "The capital" is near certain; " capital" after "The" is not.
    let of = token_lps[2].as_f64().expect("f64");
    let capital = token_lps[1].as_f64().expect("f64");
    assert!(of > -1.0 && capital < -5.0, "{of} {capital}");
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .expect("offsets")
        .iter()
        .map(|x| x.as_u64().expect("u64"))
        .collect();
    assert_eq!(offsets[..6], [0, 3, 11, 14, 21, 24]);
    assert!(offsets.windows(2).all(|w| w[0] < w[1]));
}

/// Scoring as evaluation harnesses do it (lm-evaluation-harness's `local-completions`):
/// `echo` + `logprobs` + `max_tokens: 0`, streamed and not.
#[tokio::test]
async fn echo_with_max_tokens_0_scores_the_prompt() {
    let app = app();
    let prompt = "The capital of France is Paris";
    let body = json!({"prompt": prompt, "max_tokens": 0, "logprobs": 1, "echo": true});
    let (status, v) = post_json(&app, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["text"], prompt);
    assert_eq!(c["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 0);
    assert_eq!(v["usage"]["prompt_tokens"], 6);
    let lp = &c["logprobs"];
    assert_eq!(lp["tokens"].as_array().map(Vec::len), Some(6));
    let lps = lp["token_logprobs"].as_array().expect("lps");
    assert_eq!(lps[0], Value::Null);
    // log p(" Paris" | "The capital of France is"): what generating it reports, above.
    let paris = lps[5].as_f64().expect("f64");
    assert!((paris + 0.25808).abs() < 0.1, "{paris}");
    assert_eq!(lp["top_logprobs"][5], json!({" Paris": paris}));

    // Streamed: the echo and its log-probabilities in the first chunk, then the finish.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (status, _, bytes) = send(&app, post("/v1/completions", streamed)).await;
    assert_eq!(status, StatusCode::OK);
    let payloads = sse_payloads(&bytes);
    assert_eq!(payloads.len(), 3, "{payloads:?}");
    let first: Value = serde_json::from_str(&payloads[0]).expect("JSON");
    assert_eq!(first["choices"][0]["text"], prompt);
    assert_eq!(first["choices"][0]["logprobs"], *lp);
    let last: Value = serde_json::from_str(&payloads[1]).expect("JSON");
    assert_eq!(last["choices"][0]["finish_reason"], "length");

    // Without `echo` nothing is generated and nothing scored; chat needs a token.
    let (status, v) = post_json(
        &app,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 0, "logprobs": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["text"], "");
    assert_eq!(v["choices"][0]["logprobs"]["tokens"], json!([]));
    let (status, v) = post_json(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
    )
    .await;
    assert_error(status, &v, StatusCode::BAD_REQUEST, Some("max_tokens"));
}

#[tokio::test]
async fn chat_completion_and_streaming_chat() {
    let app = app();
    let messages = json!([{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}]);
    let (status, v) = post_json(
        &app,
        "/v1/chat/completions",
        json!({"messages": messages, "max_tokens": 16, "temperature": 0, "logprobs": true, "top_logprobs": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion");
    let c = &v["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    let content = c["message"]["content"].as_str().expect("content");
    assert!(content.contains('4'), "{content}");
    // SmolLM2's template adds its default system prompt: 37 tokens in all.
    assert_eq!(v["usage"]["prompt_tokens"], 37);
    let entries = c["logprobs"]["content"].as_array().expect("logprobs");
    assert_eq!(
        entries.len() as u64,
        v["usage"]["completion_tokens"].as_u64().expect("n")
    );
    assert_eq!(entries[0]["top_logprobs"].as_array().expect("top").len(), 2);

    let (_, _, bytes) = send(
        &app,
        post("/v1/chat/completions", json!({"messages": messages, "max_tokens": 16, "temperature": 0,
                                             "stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    let payloads = sse_payloads(&bytes);
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).expect("json"))
        .collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let streamed: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"]
                .get(0)
                .and_then(|ch| ch["delta"]["content"].as_str())
        })
        .collect();
    assert_eq!(streamed, content);
    assert_eq!(chunks.last().expect("usage")["usage"]["prompt_tokens"], 37);

    // `chat_template_kwargs` (vLLM's, llama.cpp's): variables SmolLM2's template does not
    // read change nothing, and the render's own variables are not overridden.
    let (status, again) = post_json(
        &app,
        "/v1/chat/completions",
        json!({"messages": messages, "max_tokens": 16, "temperature": 0,
               "chat_template_kwargs": {"enable_thinking": false, "messages": []}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["choices"][0]["message"]["content"], content);
    assert_eq!(again["usage"]["prompt_tokens"], 37);
    let (status, v) = post_json(
        &app,
        "/v1/chat/completions",
        json!({"messages": messages, "chat_template_kwargs": "enable_thinking"}),
    )
    .await;
    assert_error(
        status,
        &v,
        StatusCode::BAD_REQUEST,
        Some("chat_template_kwargs"),
    );
}

/// The first choice of each chunk of `body` streamed from `path` (`stream: true` added),
/// the stream checked to end with `[DONE]`.
async fn streamed_choices(app: &Router, path: &str, body: &Value) -> Vec<Value> {
    let (_, _, bytes) = send(app, post(path, with_fields(body, json!({"stream": true})))).await;
    let payloads = sse_payloads(&bytes);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str::<Value>(p).expect("json")["choices"][0].clone())
        .collect()
}

/// `base` (an object) with the fields of `extra` added.
fn with_fields(base: &Value, extra: Value) -> Value {
    let mut b = base.clone();
    if let (Some(b), Value::Object(e)) = (b.as_object_mut(), extra) {
        b.extend(e);
    }
    b
}

/// Two turns whose answers think in `<think>…</think>` first, then a question: SmolLM2
/// answers the same way (greedy), as a thinking model writes.
fn thinking_turns() -> Value {
    json!([
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>One and one.</think> 2"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>Two and two.</think> 4"},
        {"role": "user", "content": "3+3?"}])
}

/// `(reasoning, answer)` of a thinking model's raw text, trimmed.
/// Tokens of a generation up to the one that completes `</think>` (OpenAI's
/// `reasoning_tokens`), from a chat answer's `logprobs.content` (each token's bytes).
fn tokens_through_thought(logprobs: &Value) -> usize {
    let mut bytes = Vec::new();
    let tokens = logprobs["content"].as_array().expect("logprobs");
    for (i, t) in tokens.iter().enumerate() {
        let b = t["bytes"].as_array().expect("bytes");
        bytes.extend(b.iter().map(|b| b.as_u64().expect("byte") as u8));
        if bytes.windows(8).any(|w| w == b"</think>") {
            return i + 1;
        }
    }
    panic!("no </think> in {logprobs}")
}

fn split_thought(raw: &str) -> (String, String) {
    let (thought, answer) = raw
        .strip_prefix("<think>")
        .and_then(|r| r.split_once("</think>"))
        .unwrap_or_else(|| panic!("SmolLM2 did not follow the turns: {raw:?}"));
    (thought.trim().to_owned(), answer.trim().to_owned())
}

/// A thinking model's `<think>…</think>` goes to `reasoning_content` (llama.cpp's
/// `reasoning_format: "deepseek"`; the default for vocabularies with both tags as tokens,
/// which SmolLM2's lacks, so here the request asks for it): whole, and streamed as
/// `delta.reasoning_content` chunks before the answer's. SmolLM2 is led to write a thinking
/// model's text by two earlier turns that do; by default the text is the answer as written.
#[tokio::test]
async fn reasoning_is_split_from_the_answer() {
    let app = app();
    let base = json!({"messages": thinking_turns(), "temperature": 0, "max_tokens": 60});
    let body = |extra: Value| with_fields(&base, extra);
    let (status, v) = post_json(
        &app,
        "/v1/chat/completions",
        body(json!({"logprobs": true})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let raw = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();
    assert!(v["choices"][0]["message"]
        .get("reasoning_content")
        .is_none());
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        0
    );
    let (thought, answer) = split_thought(&raw);
    // `usage.completion_tokens_details.reasoning_tokens`: the tokens through `</think>`.
    let thought_tokens = tokens_through_thought(&v["choices"][0]["logprobs"]);
    assert!(
        thought_tokens < v["usage"]["completion_tokens"].as_u64().expect("n") as usize,
        "{v}"
    );
    assert!(!thought.is_empty() && !answer.is_empty(), "{raw:?}");
    let (status, v) = post_json(
        &app,
        "/v1/chat/completions",
        body(json!({"reasoning_format": "deepseek"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        v["choices"][0]["message"],
        json!({"role": "assistant", "content": answer, "reasoning_content": thought})
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        thought_tokens
    );
    // Streamed, in the usage chunk.
    let (_, _, bytes) = send(
        &app,
        post(
            "/v1/chat/completions",
            body(json!({"reasoning_format": "deepseek", "stream": true,
                        "stream_options": {"include_usage": true}})),
        ),
    )
    .await;
    let payloads = sse_payloads(&bytes);
    let usage: Value = serde_json::from_str(&payloads[payloads.len() - 2]).expect("usage");
    assert_eq!(
        usage["usage"]["completion_tokens_details"]["reasoning_tokens"], thought_tokens,
        "{usage}"
    );

    let deltas: Vec<Value> = streamed_choices(
        &app,
        "/v1/chat/completions",
        &body(json!({"reasoning_format": "deepseek"})),
    )
    .await
    .into_iter()
    .map(|c| c["delta"].clone())
    .collect();
    let text = |key: &str| -> String { deltas.iter().filter_map(|d| d[key].as_str()).collect() };
    assert_eq!(text("reasoning_content"), thought);
    assert_eq!(text("content"), answer);
    let first_answer = deltas
        .iter()
        .position(|d| d["content"].as_str().is_some_and(|c| !c.is_empty()))
        .expect("answer");
    let last_thought = deltas
        .iter()
        .rposition(|d| d.get("reasoning_content").is_some())
        .expect("reasoning");
    assert!(last_thought < first_answer, "{deltas:?}");

    let (status, v) = post_json(
        &app,
        "/v1/chat/completions",
        body(json!({"reasoning_format": "r1"})),
    )
    .await;
    assert_error(
        status,
        &v,
        StatusCode::BAD_REQUEST,
        Some("reasoning_format"),
    );
}

/// A thinking model reasons before an answer held to a grammar: the constraint lets the
/// `<think>…</think>` text through untouched and holds the answer after it (llama.cpp's
/// lazy grammars do the same). SmolLM2, led by two earlier turns that think, reasons freely —
/// the same reasoning as with no schema — then answers to the schema; with `tool_choice:
/// "required"` it reasons, then calls, whole and streamed alike.
#[tokio::test]
async fn thinking_comes_before_a_constrained_answer() {
    let app = app();
    let base = json!({"messages": thinking_turns(), "reasoning_format": "deepseek",
                      "temperature": 0, "max_tokens": 60});
    let (status, free) = post_json(&app, "/v1/chat/completions", base.clone()).await;
    assert_eq!(status, StatusCode::OK, "{free}");
    let thought = free["choices"][0]["message"]["reasoning_content"].clone();
    assert!(thought.as_str().is_some_and(|t| !t.is_empty()), "{free}");
    let schema = json!({"type": "object", "properties": {"answer": {"type": "integer"}},
                        "required": ["answer"], "additionalProperties": false});
    let (status, v) = post_json(
        &app,
        "/v1/chat/completions",
        with_fields(
            &base,
            json!({"response_format": {"type": "json_schema",
                   "json_schema": {"name": "sum", "schema": schema}}}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let message = &v["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], thought, "{v}");
    let answer: Value =
        serde_json::from_str(message["content"].as_str().expect("content")).expect("JSON");
    assert!(answer["answer"].is_i64(), "{answer}");
    assert_eq!(answer.as_object().map(|o| o.len()), Some(1), "{answer}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    let mut messages = thinking_turns();
    messages[4]["content"] = json!("What is the weather like in Paris?");
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]);
    let call = with_fields(
        &base,
        json!({"messages": messages, "tools": tools, "tool_choice": "required",
               "max_tokens": 120}),
    );
    let (status, v) = post_json(&app, "/v1/chat/completions", call.clone()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let message = &v["choices"][0]["message"];
    let thought = message["reasoning_content"].as_str().expect("reasoning");
    assert!(!thought.is_empty() && !thought.contains("think>"), "{v}");
    let function = &message["tool_calls"][0]["function"];
    assert_eq!(function["name"], "get_weather");
    let args = function["arguments"].as_str().expect("arguments");
    let parsed: Value = serde_json::from_str(args).expect("arguments are JSON");
    assert!(parsed["city"].is_string(), "{parsed}");

    let choices = streamed_choices(&app, "/v1/chat/completions", &call).await;
    let streamed: String = choices
        .iter()
        .filter_map(|c| c["delta"]["reasoning_content"].as_str())
        .collect();
    assert_eq!(streamed, thought);
    let streamed_args: String = choices
        .iter()
        .filter_map(|c| c["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(streamed_args, args);
    let last_thought = choices
        .iter()
        .rposition(|c| c["delta"].get("reasoning_content").is_some());
    let first_call = choices
        .iter()
        .position(|c| c["delta"].get("tool_calls").is_some());
    assert!(last_thought < first_call, "{choices:?}");
    assert_eq!(
        choices.last().map(|c| c["finish_reason"].clone()),
        Some(json!("tool_calls"))
    );
}

/// SmolLM2 served with a template of `tests/reference/templates/` (`--chat-template-file`),
/// loaded once into `cell`.
fn template_app(cell: &'static OnceLock<Arc<Loaded>>, template: &str) -> Router {
    let loaded = cell.get_or_init(|| {
        let source =
            std::fs::read_to_string(repo().join("tests/reference/templates").join(template))
                .expect("template");
        Arc::new(
            new_loaded(EngineConfig::default())
                .with_chat_template(&source)
                .expect("template compiles"),
        )
    });
    app_with(ServerConfig::default(), Some(loaded.clone())).0
}

fn hermes_app() -> Router {
    static CELL: OnceLock<Arc<Loaded>> = OnceLock::new();
    template_app(&CELL, "Qwen3-0.6B.jinja")
}

/// SmolLM2 asked "What is the weather like in Paris?" with `get_weather` required (`extra`
/// fields added): one call with a city, whole; streamed, the pieces of call 0 add up to its
/// arguments, no text, finish `tool_calls`; through the Responses API the same call. Returns
/// the chat request, its whole answer and the call's arguments.
async fn required_weather_call(app: &Router, extra: Value) -> (Value, Value, String) {
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]);
    let base = with_fields(
        &json!({"messages": [{"role": "user", "content": "What is the weather like in Paris?"}],
                "tools": tools, "tool_choice": "required", "temperature": 0, "max_tokens": 60}),
        extra,
    );
    let (status, v) = post_json(app, "/v1/chat/completions", base.clone()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let message = &v["choices"][0]["message"];
    assert_eq!(message["content"], Value::Null);
    let calls = message["tool_calls"].as_array().expect("calls");
    assert_eq!(calls.len(), 1, "{v}");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args = calls[0]["function"]["arguments"]
        .as_str()
        .expect("arguments")
        .to_owned();
    let parsed: Value = serde_json::from_str(&args).expect("arguments are JSON");
    assert!(parsed["city"].is_string(), "{parsed}");

    let choices = streamed_choices(app, "/v1/chat/completions", &base).await;
    let streamed: Vec<&Value> = choices
        .iter()
        .filter_map(|c| c["delta"]["tool_calls"].get(0))
        .collect();
    assert!(streamed.len() > 2, "{choices:?}");
    assert_eq!(streamed[0]["function"]["name"], "get_weather");
    assert!(streamed.iter().all(|c| c["index"] == 0), "{choices:?}");
    let pieces: String = streamed
        .iter()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .collect();
    assert_eq!(pieces, args);
    assert!(choices
        .iter()
        .all(|c| c["delta"]["content"].as_str().is_none_or(str::is_empty)));
    assert_eq!(
        choices.last().map(|c| c["finish_reason"].clone()),
        Some(json!("tool_calls"))
    );

    let (status, r) = post_json(
        app,
        "/v1/responses",
        json!({"input": "What is the weather like in Paris?", "temperature": 0,
               "tools": [{"type": "function", "name": "get_weather",
                          "parameters": tools[0]["function"]["parameters"]}],
               "tool_choice": "required", "store": false}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["output"][0]["type"], "function_call", "{r}");
    assert_eq!(r["output"][0]["name"], "get_weather");
    assert_eq!(r["output"][0]["arguments"], json!(args));
    (base, v, args)
}

fn llama_app() -> Router {
    static CELL: OnceLock<Arc<Loaded>> = OnceLock::new();
    template_app(&CELL, "Llama-3.2-3B-Instruct.jinja")
}

/// `/apply-template` gives, for each conversation of a fixture (its `tools` and `kwargs` as the
/// request's `tools` and `chat_template_kwargs`), the prompt transformers rendered — after
/// `ours` puts in the BOS and EOS texts of the model served (SmolLM2's).
async fn renders_as_transformers(app: &Router, file: &str, ours: impl Fn(&str) -> String) {
    for (name, case) in tool_render_cases(file) {
        let mut body = json!({"messages": case["messages"], "tools": case["tools"]});
        if case["kwargs"].is_object() {
            body["chat_template_kwargs"] = case["kwargs"].clone();
        }
        let (status, v) = post_json(app, "/apply-template", body).await;
        assert_eq!(status, StatusCode::OK, "{name}: {v}");
        let rendered = case["rendered"].as_str().expect("rendered");
        assert_eq!(v["prompt"], ours(rendered), "{name}");
    }
}

/// A fixture of transformers' renders (`scripts/tool-renders.py`), the calls' `arguments`
/// turned into JSON text as OpenAI clients send them.
fn tool_render_cases(file: &str) -> Vec<(String, Value)> {
    let cases: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/reference/templates").join(file))
            .expect("renders"),
    )
    .expect("JSON");
    let mut out = Vec::new();
    for (name, case) in cases.as_object().expect("cases") {
        let mut case = case.clone();
        for m in case["messages"].as_array_mut().expect("messages") {
            for c in m["tool_calls"].as_array_mut().into_iter().flatten() {
                let args = &mut c["function"]["arguments"];
                if !args.is_string() {
                    *args = json!(args.to_string());
                }
            }
        }
        out.push((name.clone(), case));
    }
    out
}

/// With a template that writes calls itself (Hermes' `<tool_call>` format), the request's
/// tools, earlier calls and results reach the template as they are: `/apply-template` gives
/// exactly the prompt transformers renders for the same conversation
/// (`tests/reference/templates/qwen3_tool_renders.json`), the calls sent the OpenAI way
/// (`arguments` as JSON text).
#[tokio::test]
async fn tools_reach_a_template_that_knows_them_as_they_are() {
    renders_as_transformers(&hermes_app(), "qwen3_tool_renders.json", str::to_owned).await;
}

/// Llama 3.x's JSON calls: with Llama 3.2's template (which asks for
/// `{"name": function name, "parameters": …}`) the tools, earlier calls and results reach the
/// template as they are (`/apply-template` equals transformers' render), and SmolLM2 with
/// `tool_choice: "required"` writes `{"name": "get_weather", "parameters": {…}}` (held to
/// it), which comes back as `tool_calls` — whole, streamed (pieces adding up), and as a
/// Responses `function_call`; one call per turn, as the template takes.
#[tokio::test]
async fn llama_json_calls_come_back_as_tool_calls() {
    let app = llama_app();
    // The template writes the model's BOS: SmolLM2's, where Llama's was rendered.
    renders_as_transformers(&app, "llama32_tool_renders.json", |r| {
        r.replacen("<|begin_of_text|>", "<|im_start|>", 1)
    })
    .await;
    let (base, _, _) = required_weather_call(&app, json!({})).await;
    // With "auto" SmolLM2 answers in text here.
    let (status, v) = post_json(
        &app,
        "/v1/chat/completions",
        with_fields(&base, json!({"tool_choice": "auto"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    assert!(content.contains("Paris") && !content.contains('{'), "{v}");
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
    // Two calls in one earlier turn: the template refuses them, a 400 with its words.
    let call = json!({"id": "c1", "type": "function",
                      "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}});
    let messages = json!([{"role": "user", "content": "Rome twice?"},
                          {"role": "assistant", "content": "", "tool_calls": [call, call]},
                          {"role": "user", "content": "Thanks"}]);
    let (status, v) = post_json(
        &app,
        "/v1/chat/completions",
        with_fields(&base, json!({"messages": messages})),
    )
    .await;
    assert_error(status, &v, StatusCode::BAD_REQUEST, Some("messages"));
    let message = v["error"]["message"].as_str().expect("message");
    assert!(message.contains("single tool-calls"), "{message}");
}

fn mistral_app() -> Router {
    static CELL: OnceLock<Arc<Loaded>> = OnceLock::new();
    template_app(&CELL, "Mistral-v3.jinja")
}

/// Mistral's calls: with Mistral's 'v3' template the tools, earlier calls and results reach
/// the template as they are (`/apply-template` equals transformers' render); OpenAI-style call
/// ids, which the template refuses, reach it as 9 letters and digits, a call's and its
/// result's alike; SmolLM2 with `tool_choice: "required"` writes
/// `[TOOL_CALLS] [{"name": "get_weather", "arguments": {…}}]` (held to it), which comes back as
/// `tool_calls` — whole, streamed, as a Responses `function_call` — and the answer sent back
/// with the call's result is answered in text.
#[tokio::test]
async fn mistral_calls_come_back_as_tool_calls() {
    let app = mistral_app();
    // The template writes the model's BOS and EOS: SmolLM2's, where Mistral's were.
    renders_as_transformers(&app, "mistral_tool_renders.json", |r| {
        r.replacen("<s>", "<|im_start|>", 1)
            .replace("</s>", "<|im_end|>")
    })
    .await;
    let (base, v, args) = required_weather_call(&app, json!({})).await;
    let message = &v["choices"][0]["message"];
    let id = message["tool_calls"][0]["id"].as_str().expect("id");
    assert!(id.starts_with("call_"), "{id}");
    let mut messages = base["messages"].as_array().expect("messages").clone();
    messages.push(json!({"role": "assistant", "content": null,
                         "tool_calls": message["tool_calls"]}));
    messages.push(json!({"role": "tool", "tool_call_id": id, "content": "sunny, 24 C"}));
    let follow = with_fields(
        &base,
        json!({"messages": messages, "tool_choice": "auto", "max_tokens": 24}),
    );
    let (status, p) = post_json(&app, "/apply-template", follow.clone()).await;
    assert_eq!(status, StatusCode::OK, "{p}");
    let prompt = p["prompt"].as_str().expect("prompt");
    let short = &id[id.len() - 9..];
    // The arguments as the template writes them (Python's separators).
    let city = serde_json::from_str::<Value>(&args).expect("JSON")["city"].to_string();
    assert!(
        prompt.contains(&format!(
            "[TOOL_CALLS] [{{\"name\": \"get_weather\", \"arguments\": {{\"city\": {city}}}, \"id\": \"{short}\"}}]<|im_end|>"
        )),
        "{prompt}"
    );
    assert!(
        prompt.contains(&format!(
            "[TOOL_RESULTS] {{\"content\": sunny, 24 C, \"call_id\": \"{short}\"}}[/TOOL_RESULTS]"
        )),
        "{prompt}"
    );
    let (status, v) = post_json(&app, "/v1/chat/completions", follow).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    // Ids that are not 9 letters and digits at all: 9 of their hash, the call's and the
    // result's alike.
    let call = json!({"id": "c1", "type": "function",
                      "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}});
    let messages = json!([{"role": "user", "content": "Rome?"},
                          {"role": "assistant", "content": "", "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": "c1", "content": "rain"}]);
    let (status, p) = post_json(
        &app,
        "/apply-template",
        with_fields(&base, json!({"messages": messages})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{p}");
    let prompt = p["prompt"].as_str().expect("prompt");
    let ids: Vec<&str> = ["\"id\": \"", "\"call_id\": \""]
        .iter()
        .map(|k| {
            let at = prompt.find(k).expect("an id") + k.len();
            &prompt[at..at + 9]
        })
        .collect();
    assert_eq!(ids[0], ids[1], "{prompt}");
    assert!(
        ids[0].bytes().all(|b| b.is_ascii_alphanumeric()),
        "{prompt}"
    );
}

/// Calls in the Hermes format: SmolLM2 with Qwen3's template and `tool_choice: "required"`
/// writes `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>` (held to it), which
/// comes back as OpenAI's `tool_calls` — whole, streamed piece by piece (the pieces add up to
/// the whole), and as a Responses `function_call`; with `"auto"` it answers in text.
#[tokio::test]
async fn hermes_calls_come_back_as_tool_calls() {
    let app = hermes_app();
    let (base, v, args) = required_weather_call(&app, json!({"parallel_tool_calls": false})).await;
    assert!(!args.contains("tool_call"), "{args}");

    // Cut short by `max_tokens` inside the call: the call as far as it got, with
    // `finish_reason: "length"` (as OpenAI returns it), whole as streamed.
    let n = v["usage"]["completion_tokens"].as_u64().expect("n");
    let cut = with_fields(&base, json!({"max_tokens": n - 3}));
    let (status, v) = post_json(&app, "/v1/chat/completions", cut.clone()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    let function = &v["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(function["name"], "get_weather", "{v}");
    let part = function["arguments"].as_str().expect("arguments");
    assert!(
        args.starts_with(part) && part.len() < args.len(),
        "{part:?}"
    );
    let choices = streamed_choices(&app, "/v1/chat/completions", &cut).await;
    let streamed: String = choices
        .iter()
        .filter_map(|c| c["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(streamed, part);
    assert_eq!(
        choices.last().map(|c| c["finish_reason"].clone()),
        Some(json!("length"))
    );

    let (status, v) = post_json(
        &app,
        "/v1/chat/completions",
        with_fields(&base, json!({"tool_choice": "auto"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    assert!(
        !content.is_empty() && !content.contains("<tool_call>"),
        "{v}"
    );
    assert!(
        v["choices"][0]["message"].get("tool_calls").is_none(),
        "{v}"
    );
}

/// `GET /props`, llama.cpp's server properties: the context size, slots, model, the template
/// in use and what it can do with tools — SmolLM2's own (no tools), Qwen3's (Hermes, parallel
/// calls) and Llama 3.2's (one call).
#[tokio::test]
async fn props_say_what_llama_cpp_clients_read() {
    let get = |app: Router| async move {
        let (status, _, body) = send(
            &app,
            Request::get("/props").body(Body::empty()).expect("req"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        serde_json::from_slice::<Value>(&body).expect("json")
    };
    let v = get(app()).await;
    assert_eq!(v["default_generation_settings"]["n_ctx"], 8192, "{v}");
    assert_eq!(v["total_slots"], 64);
    assert_eq!(v["model_path"], "smollm2");
    assert!(v["chat_template"]
        .as_str()
        .is_some_and(|t| t.contains("<|im_start|>")));
    assert_eq!(v["eos_token"], "<|im_end|>");
    let caps = |v: &Value| {
        let c = &v["chat_template_caps"];
        [
            c["supports_tools"].clone(),
            c["supports_tool_calls"].clone(),
            c["supports_parallel_tool_calls"].clone(),
        ]
    };
    assert_eq!(caps(&v), [json!(false), json!(false), json!(false)]);
    let v = get(hermes_app()).await;
    assert!(v["chat_template"]
        .as_str()
        .is_some_and(|t| t.contains("<tool_call>")));
    assert_eq!(caps(&v), [json!(true), json!(true), json!(true)]);
    assert_eq!(
        caps(&get(llama_app()).await),
        [json!(true), json!(true), json!(false)]
    );
    assert_eq!(
        caps(&get(mistral_app()).await),
        [json!(true), json!(true), json!(true)]
    );
}

/// Text, then a call (Hermes, `tool_choice: "auto"`): led by an earlier turn that said a few
/// words before its call, SmolLM2 with Qwen3's template does the same; the grammar, free until
/// `<tool_call>`, holds the call from there. The text comes back as `content` beside
/// `tool_calls` — whole, streamed (text chunks, then the call's), as a Responses message item
/// before the `function_call` (whole and streamed), and in Ollama's chat (whole and streamed).
#[tokio::test]
async fn text_before_a_hermes_call_comes_back_with_it() {
    let app = hermes_app();
    let call = |id: &str, city: &str| {
        json!({"id": id, "type": "function", "function": {"name": "get_weather",
               "arguments": json!({"city": city}).to_string()}})
    };
    let messages = json!([
        {"role": "user", "content": "Weather in Berlin?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call("c1", "Berlin")]},
        {"role": "user", "content": "Weather in Madrid?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call("c2", "Madrid")]},
        {"role": "user", "content": "Weather in Paris?"}]);
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]);
    let body = json!({"messages": messages, "tools": tools, "temperature": 0, "max_tokens": 80});
    let (status, v) = post_json(&app, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let message = &v["choices"][0]["message"];
    let content = message["content"].as_str().expect("text before the call");
    assert!(!content.is_empty() && !content.contains('<'), "{v}");
    let calls = message["tool_calls"].as_array().expect("calls");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args = calls[0]["function"]["arguments"].as_str().expect("args");
    let parsed: Value = serde_json::from_str(args).expect("JSON arguments");
    assert!(parsed["city"].is_string(), "{parsed}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");

    let choices = streamed_choices(&app, "/v1/chat/completions", &body).await;
    let text: String = choices
        .iter()
        .filter_map(|c| c["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, content);
    let first_call = choices
        .iter()
        .position(|c| c["delta"].get("tool_calls").is_some())
        .expect("a call");
    let last_text = choices
        .iter()
        .rposition(|c| {
            c["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .expect("text");
    assert!(last_text < first_call, "{choices:?}");
    let streamed: String = choices
        .iter()
        .filter_map(|c| c["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(streamed, args);

    // The same conversation as Responses items: an assistant's text, then its call.
    let said = |role: &str, text: &str| json!({"type": "message", "role": role, "content": text});
    let called = |id: &str, city: &str| {
        json!({"type": "function_call", "call_id": id, "name": "get_weather",
               "arguments": json!({"city": city}).to_string()})
    };
    let input = json!([
        said("user", "Weather in Berlin?"),
        said("assistant", "Let me check."),
        called("c1", "Berlin"),
        said("user", "Weather in Madrid?"),
        said("assistant", "Let me check."),
        called("c2", "Madrid"),
        said("user", "Weather in Paris?")
    ]);
    let responses = json!({"input": input, "tools": [{"type": "function", "name": "get_weather",
                            "parameters": tools[0]["function"]["parameters"]}],
                           "temperature": 0, "max_output_tokens": 80, "store": false});
    let (status, r) = post_json(&app, "/v1/responses", responses.clone()).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let kinds: Vec<&str> = r["output"]
        .as_array()
        .expect("output")
        .iter()
        .map(|o| o["type"].as_str().expect("type"))
        .collect();
    assert_eq!(kinds, ["message", "function_call"], "{r}");
    // The text and the call after it are one assistant turn: the same prompt as the chat's.
    assert_eq!(r["usage"]["input_tokens"], v["usage"]["prompt_tokens"]);
    assert_eq!(r["output"][0]["content"][0]["text"], content);
    assert_eq!(r["output"][1]["arguments"], args);
    let mut streaming = responses;
    streaming["stream"] = json!(true);
    let (status, _, bytes) = send(&app, post("/v1/responses", streaming)).await;
    assert_eq!(status, StatusCode::OK);
    let events = named_sse_events(&bytes);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let text_done = names
        .iter()
        .position(|n| *n == "response.output_text.done")
        .expect("text done");
    let call_added = names
        .iter()
        .rposition(|n| *n == "response.output_item.added")
        .expect("call item");
    assert!(text_done < call_added, "{names:?}");
    let done = &events.last().expect("events").1["response"];
    assert_eq!(done["output"][0]["content"][0]["text"], content);
    assert_eq!(done["output"][1]["type"], "function_call");
    assert_eq!(done["output"][1]["arguments"], args);

    // Ollama's chat (earlier calls with object arguments): the text, then the call whole.
    let mut ollama = json!({"model": "smollm2", "messages": messages, "tools": tools,
                            "options": {"temperature": 0, "num_predict": 80}});
    for m in ollama["messages"].as_array_mut().expect("messages") {
        for c in m["tool_calls"].as_array_mut().into_iter().flatten() {
            let text = c["function"]["arguments"]
                .as_str()
                .expect("text")
                .to_owned();
            c["function"]["arguments"] = serde_json::from_str(&text).expect("object");
        }
    }
    let mut whole = ollama.clone();
    whole["stream"] = json!(false);
    let (status, o) = post_json(&app, "/api/chat", whole).await;
    assert_eq!(status, StatusCode::OK, "{o}");
    assert_eq!(o["message"]["content"], content, "{o}");
    assert_eq!(
        o["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    assert_eq!(
        o["message"]["tool_calls"][0]["function"]["arguments"],
        parsed
    );
    let (status, _, bytes) = send(&app, post("/api/chat", ollama)).await;
    assert_eq!(status, StatusCode::OK);
    let lines = ndjson_lines(&bytes);
    let text: String = lines
        .iter()
        .filter_map(|l| l["message"]["content"].as_str())
        .collect();
    assert_eq!(text, content, "{lines:?}");
    let call = lines
        .iter()
        .position(|l| l["message"].get("tool_calls").is_some())
        .expect("a call");
    assert!(lines[..call].iter().any(|l| l["message"]["content"]
        .as_str()
        .is_some_and(|t| !t.is_empty())));
}

/// Parallel Hermes calls: led by an earlier turn that made two calls at once, SmolLM2 with
/// Qwen3's template writes several `<tool_call>` blocks (a newline apart, at most 8), which
/// come back as that many `tool_calls` — whole, streamed by `index` (each call's pieces add up
/// to its arguments), and as Responses `function_call` items (the earlier calls given as
/// consecutive items: one turn); `parallel_tool_calls: false` allows one.
#[tokio::test]
async fn parallel_hermes_calls_come_back_as_several_tool_calls() {
    let app = hermes_app();
    let call = |id: &str, city: &str| {
        json!({"id": id, "type": "function", "function": {"name": "get_weather",
               "arguments": json!({"city": city}).to_string()}})
    };
    let body = json!({"messages": [
            {"role": "user", "content": "Weather in Berlin and in Madrid?"},
            {"role": "assistant", "content": "",
             "tool_calls": [call("c1", "Berlin"), call("c2", "Madrid")]},
            {"role": "tool", "tool_call_id": "c1", "content": "rain"},
            {"role": "tool", "tool_call_id": "c2", "content": "sun"},
            {"role": "assistant", "content": "Rain in Berlin, sun in Madrid."},
            {"role": "user", "content": "Weather in Paris and in Rome?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}}],
        "tool_choice": "required", "temperature": 0, "max_tokens": 300});
    let (status, v) = post_json(&app, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let calls = v["choices"][0]["message"]["tool_calls"]
        .as_array()
        .expect("calls")
        .clone();
    assert!((2..=8).contains(&calls.len()), "{v}");
    let args: Vec<String> = calls
        .iter()
        .map(|c| {
            assert_eq!(c["function"]["name"], "get_weather");
            let a = c["function"]["arguments"].as_str().expect("arguments");
            let parsed: Value = serde_json::from_str(a).expect("JSON");
            assert!(parsed["city"].is_string(), "{a}");
            a.to_owned()
        })
        .collect();

    let mut streamed = vec![String::new(); args.len()];
    for choice in streamed_choices(&app, "/v1/chat/completions", &body).await {
        for d in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let k = d["index"].as_u64().expect("index") as usize;
            streamed[k].push_str(d["function"]["arguments"].as_str().expect("arguments"));
        }
    }
    assert_eq!(streamed, args);

    let single = with_fields(&body, json!({"parallel_tool_calls": false}));
    let (_, v) = post_json(&app, "/v1/chat/completions", single).await;
    let one = v["choices"][0]["message"]["tool_calls"]
        .as_array()
        .expect("calls");
    assert_eq!(one.len(), 1, "{v}");
    assert_eq!(one[0]["function"]["arguments"], json!(args[0]));

    // The same conversation as Responses items.
    let item = |id: &str, city: &str| {
        json!({"type": "function_call", "call_id": id, "name": "get_weather",
               "arguments": json!({"city": city}).to_string()})
    };
    let responses = json!({"input": [
            {"role": "user", "content": "Weather in Berlin and in Madrid?"},
            item("c1", "Berlin"), item("c2", "Madrid"),
            {"type": "function_call_output", "call_id": "c1", "output": "rain"},
            {"type": "function_call_output", "call_id": "c2", "output": "sun"},
            {"role": "assistant", "content": "Rain in Berlin, sun in Madrid."},
            {"role": "user", "content": "Weather in Paris and in Rome?"}],
        "tools": [{"type": "function", "name": "get_weather",
                   "parameters": body["tools"][0]["function"]["parameters"]}],
        "tool_choice": "required", "temperature": 0, "max_output_tokens": 300, "store": false});
    let (status, v) = post_json(&app, "/v1/responses", responses.clone()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let items: Vec<String> = v["output"]
        .as_array()
        .expect("output")
        .iter()
        .map(|o| {
            assert_eq!(o["type"], "function_call", "{o}");
            o["arguments"].as_str().expect("arguments").to_owned()
        })
        .collect();
    assert_eq!(items, args);
    let (_, _, bytes) = send(
        &app,
        post(
            "/v1/responses",
            with_fields(&responses, json!({"stream": true})),
        ),
    )
    .await;
    let events = named_sse_events(&bytes);
    let mut streamed = vec![String::new(); args.len()];
    let mut done = Vec::new();
    for (name, e) in &events {
        let k = e["output_index"].as_u64().unwrap_or(0) as usize;
        match name.as_str() {
            "response.function_call_arguments.delta" => {
                streamed[k].push_str(e["delta"].as_str().expect("delta"))
            }
            "response.function_call_arguments.done" => {
                assert_eq!(e["arguments"].as_str(), Some(streamed[k].as_str()));
                done.push(k);
            }
            _ => {}
        }
    }
    assert_eq!(streamed, args);
    assert_eq!(done, (0..args.len()).collect::<Vec<_>>());
    let (_, last) = events.last().expect("events");
    assert_eq!(
        last["response"]["output"].as_array().map(Vec::len),
        Some(args.len())
    );
}

/// Ollama's `think: true`: the reasoning comes back as `message.thinking`, whole and as the
/// streamed pieces; without `think` the text is the answer as generated. SmolLM2 is led to
/// write `<think>…</think>` by two earlier turns that do.
#[tokio::test]
async fn ollama_think_returns_the_thinking_apart() {
    let app = app();
    let body = json!({"model": "smollm2", "options": {"temperature": 0, "num_predict": 30},
                      "messages": thinking_turns()});
    let with = |extra: Value| with_fields(&body, extra);
    let (status, raw) = post_json(&app, "/api/chat", with(json!({"stream": false}))).await;
    assert_eq!(status, StatusCode::OK, "{raw}");
    let (thought, answer) = split_thought(raw["message"]["content"].as_str().expect("content"));
    let (status, v) = post_json(
        &app,
        "/api/chat",
        with(json!({"stream": false, "think": true})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        v["message"],
        json!({"role": "assistant", "content": answer, "thinking": thought})
    );
    let (status, _, bytes) = send(&app, post("/api/chat", with(json!({"think": true})))).await;
    assert_eq!(status, StatusCode::OK);
    let lines = ndjson_lines(&bytes);
    let text = |key: &str| -> String {
        lines
            .iter()
            .filter_map(|l| l["message"][key].as_str())
            .collect()
    };
    assert_eq!(text("thinking"), thought);
    assert_eq!(text("content"), answer);
    assert_eq!(lines.last().expect("closing")["done"], true);
}

/// The Responses API with a thinking model's text: a `reasoning` item (`reasoning_text`) before
/// the message, whole and streamed (its item at output 0 with `response.reasoning_text.delta`
/// events, the message at output 1), and a reasoning item given back as input is skipped.
/// SmolLM2 is led to write `<think>…</think>` by earlier turns that do; `reasoning_format`
/// (llama.cpp's field) turns the split on for its vocabulary.
#[tokio::test]
async fn responses_api_returns_reasoning_items() {
    let app = app();
    let input = thinking_turns();
    let body = json!({"input": input, "temperature": 0, "max_output_tokens": 30, "store": false});
    let (status, raw) = post_json(&app, "/v1/responses", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{raw}");
    let raw = raw["output"][0]["content"][0]["text"]
        .as_str()
        .expect("text")
        .to_owned();
    let (thought, answer) = split_thought(&raw);
    let mut thinking = body.clone();
    thinking["reasoning_format"] = json!("deepseek");
    let (status, r) = post_json(&app, "/v1/responses", thinking.clone()).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let output = r["output"].as_array().expect("output");
    assert_eq!(output.len(), 2, "{r}");
    assert_eq!(output[0]["type"], "reasoning");
    assert_eq!(
        output[0]["content"],
        json!([{"type": "reasoning_text", "text": thought}])
    );
    assert_eq!(output[1]["type"], "message");
    assert_eq!(output[1]["content"][0]["text"], answer);
    // The same generation through chat, for its tokens: those through `</think>` are the
    // reasoning's.
    let chat = json!({"messages": input, "temperature": 0, "max_tokens": 30, "logprobs": true});
    let (status, chat) = post_json(&app, "/v1/chat/completions", chat).await;
    assert_eq!(status, StatusCode::OK, "{chat}");
    assert_eq!(chat["choices"][0]["message"]["content"], raw);
    let thought_tokens = tokens_through_thought(&chat["choices"][0]["logprobs"]);
    assert_eq!(
        r["usage"]["output_tokens_details"]["reasoning_tokens"],
        thought_tokens
    );

    thinking["stream"] = json!(true);
    let (status, _, bytes) = send(&app, post("/v1/responses", thinking)).await;
    assert_eq!(status, StatusCode::OK);
    let events = named_sse_events(&bytes);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let count = |name: &str| names.iter().filter(|n| **n == name).count();
    let (reasoning_deltas, text_deltas) = (
        count("response.reasoning_text.delta"),
        count("response.output_text.delta"),
    );
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
    ];
    expected.extend(std::iter::repeat_n(
        "response.reasoning_text.delta",
        reasoning_deltas,
    ));
    expected.extend([
        "response.reasoning_text.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
    ]);
    expected.extend(std::iter::repeat_n(
        "response.output_text.delta",
        text_deltas,
    ));
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(names, expected);
    let joined = |name: &str| -> String {
        events
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, d)| d["delta"].as_str().expect("delta").to_string())
            .collect()
    };
    assert_eq!(joined("response.reasoning_text.delta"), thought);
    assert_eq!(joined("response.output_text.delta"), answer);
    for (name, data) in &events {
        let index = match name.as_str() {
            "response.reasoning_text.delta" | "response.reasoning_text.done" => 0,
            "response.output_text.delta" | "response.content_part.added" => 1,
            _ => continue,
        };
        assert_eq!(data["output_index"], index, "{name}");
    }
    let done = &events.last().expect("events").1["response"];
    assert_eq!(done["output"][0]["content"][0]["text"], thought);
    assert_eq!(done["output"][1]["content"][0]["text"], answer);
    assert_eq!(
        done["usage"]["output_tokens_details"]["reasoning_tokens"],
        thought_tokens
    );

    // The reasoning item given back (as a client replays a conversation) is skipped.
    let mut again = body;
    let mut items = input.as_array().expect("items").clone();
    items.insert(4, output[0].clone());
    again["input"] = json!(items);
    let (status, r) = post_json(&app, "/v1/responses", again).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["output"][0]["content"][0]["text"], raw);
}

#[tokio::test]
async fn n_choices_and_seeded_sampling() {
    let app = app();
    let body = json!({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 3});
    let (status, a) = post_json(&app, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{a}");
    let (_, b) = post_json(&app, "/v1/completions", body).await;
    assert_eq!(a["choices"], b["choices"], "same seed, same choices");
    let choices = a["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3);
    assert_eq!(a["usage"]["completion_tokens"], 24);
    let indices: Vec<u64> = choices
        .iter()
        .map(|c| c["index"].as_u64().expect("index"))
        .collect();
    assert_eq!(indices, vec![0, 1, 2]);
}

#[tokio::test]
async fn tokenize_detokenize_models_health_metrics() {
    let app = app();
    let (status, v) = post_json(&app, "/tokenize", json!({"content": "Hello, world!"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["tokens"], json!([19556, 28, 905, 17]));
    let (_, v) = post_json(
        &app,
        "/tokenize",
        json!({"content": "Hi 42", "with_pieces": true}),
    )
    .await;
    assert_eq!(v["tokens"][2], json!({"id": 36, "piece": "4"}));
    let (_, v) = post_json(&app, "/detokenize", json!({"tokens": [19556, 28, 905, 17]})).await;
    assert_eq!(v["content"], "Hello, world!");
    let (status, _, body) = send(
        &app,
        Request::get("/v1/models").body(Body::empty()).expect("req"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["data"][0]["id"], "smollm2");
    assert_eq!(v["data"][0]["object"], "model");
    // One model by id (the OpenAI client's `models.retrieve`), or an OpenAI 404.
    let (status, _, body) = send(
        &app,
        Request::get("/v1/models/smollm2")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let one: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(one, v["data"][0]);
    let (status, _, body) = send(
        &app,
        Request::get("/v1/models/gpt-4")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    let e: Value = serde_json::from_slice(&body).expect("json");
    assert_error(status, &e, StatusCode::NOT_FOUND, None);
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("gpt-4")),
        "{e}"
    );
    let (status, _, _) = send(
        &app,
        Request::get("/health").body(Body::empty()).expect("req"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, headers, body) = send(
        &app,
        Request::get("/metrics").body(Body::empty()).expect("req"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE]
        .to_str()
        .expect("ct")
        .starts_with("text/plain"));
    let text = String::from_utf8(body).expect("utf-8");
    for name in [
        "nextoken:num_requests_running",
        "nextoken:num_requests_waiting",
        "nextoken:kv_cache_usage_perc",
        "nextoken:prompt_tokens_total",
        "nextoken:generation_tokens_total",
        "nextoken:time_to_first_token_seconds_bucket",
        "nextoken:inter_token_latency_seconds_bucket",
        "nextoken:e2e_request_latency_seconds_count",
        "nextoken:http_requests_total{endpoint=\"/tokenize\",status=\"200\"}",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
}

#[tokio::test]
async fn invalid_requests_get_openai_errors() {
    let app = app();
    let cases = [
        (json!({"prompt": "hi", "temperature": -1}), "temperature"),
        (json!({"prompt": "hi", "temperature": "hot"}), "temperature"),
        (json!({"prompt": "hi", "top_p": 0}), "top_p"),
        (json!({"prompt": "hi", "max_tokens": 9000}), "max_tokens"),
        (json!({"prompt": "hi", "n": 0}), "n"),
        (json!({"prompt": "hi", "logprobs": 21}), "logprobs"),
        (
            json!({"prompt": "hi", "logit_bias": {"abc": 1}}),
            "logit_bias",
        ),
        (json!({"prompt": "hi", "stop": [""]}), "stop"),
        (json!({"prompt": ""}), "prompt"),
        (json!({"prompt": [999999]}), "prompt"),
        (json!({"prompt": {"a": 1}}), "prompt"),
        (json!({"max_tokens": 3}), "prompt"),
        (
            json!({"prompt": "hi", "priority": 4_294_967_296_i64}),
            "priority",
        ),
        (json!({"prompt": "hi", "priority": "high"}), "priority"),
    ];
    for (body, param) in cases {
        let (status, v) = post_json(&app, "/v1/completions", body.clone()).await;
        assert_error(status, &v, StatusCode::BAD_REQUEST, Some(param));
    }
    for (path, body) in [
        ("/v1/embeddings", json!({"input": "x", "priority": 1.5})),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "priority": -4_294_967_296_i64}),
        ),
        ("/v1/responses", json!({"input": "x", "priority": "low"})),
    ] {
        let (status, v) = post_json(&app, path, body).await;
        assert_error(status, &v, StatusCode::BAD_REQUEST, Some("priority"));
    }
    let (status, v) = post_json(&app, "/v1/chat/completions", json!({"messages": []})).await;
    assert_error(status, &v, StatusCode::BAD_REQUEST, Some("messages"));
    let (status, v) = post_json(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "wizard", "content": "x"}]}),
    )
    .await;
    assert_error(
        status,
        &v,
        StatusCode::BAD_REQUEST,
        Some("messages[0].role"),
    );
    let (status, v) = post_json(
        &app,
        "/v1/completions",
        json!({"model": "gpt-4", "prompt": "hi"}),
    )
    .await;
    assert_error(status, &v, StatusCode::NOT_FOUND, Some("model"));
    assert_eq!(v["error"]["code"], "model_not_found");

    let malformed = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"prompt\": "))
        .expect("req");
    let (status, _, body) = send(&app, malformed).await;
    assert_error(
        status,
        &serde_json::from_slice(&body).expect("json"),
        StatusCode::BAD_REQUEST,
        None,
    );
    let no_ct = Request::post("/v1/completions")
        .body(Body::from("{}"))
        .expect("req");
    let (status, _, body) = send(&app, no_ct).await;
    assert_error(
        status,
        &serde_json::from_slice(&body).expect("json"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        None,
    );
    let (status, _, body) = send(
        &app,
        Request::get("/v1/nothing")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_error(
        status,
        &serde_json::from_slice(&body).expect("json"),
        StatusCode::NOT_FOUND,
        None,
    );
    let (status, _, body) = send(
        &app,
        Request::get("/v1/completions")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_error(
        status,
        &serde_json::from_slice(&body).expect("json"),
        StatusCode::METHOD_NOT_ALLOWED,
        None,
    );
}

#[tokio::test]
async fn body_limit_auth_loading_and_overload() {
    let small = ServerConfig {
        max_body_bytes: 1024,
        ..Default::default()
    };
    let (app, _) = app_with(small, Some(shared_loaded()));
    let (status, v) = post_json(&app, "/v1/completions", json!({"prompt": "x".repeat(4000)})).await;
    assert_error(status, &v, StatusCode::PAYLOAD_TOO_LARGE, None);

    let keyed = ServerConfig {
        api_keys: vec!["k1".into(), "k2".into()],
        ..Default::default()
    };
    let (app, _) = app_with(keyed, Some(shared_loaded()));
    let (status, v) = post_json(&app, "/tokenize", json!({"content": "a"})).await;
    assert_error(status, &v, StatusCode::UNAUTHORIZED, None);
    let wrong = Request::post("/tokenize")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, "Bearer nope")
        .body(Body::from(json!({"content": "a"}).to_string()))
        .expect("req");
    assert_eq!(send(&app, wrong).await.0, StatusCode::UNAUTHORIZED);
    let right = Request::post("/tokenize")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, "Bearer k2")
        .body(Body::from(json!({"content": "a"}).to_string()))
        .expect("req");
    assert_eq!(send(&app, right).await.0, StatusCode::OK);
    for open in ["/health", "/props", "/metrics"] {
        let (status, _, _) = send(&app, Request::get(open).body(Body::empty()).expect("req")).await;
        assert_eq!(status, StatusCode::OK, "{open} needs no key");
    }

    let (loading, _) = app_with(ServerConfig::default(), None);
    let (status, _, body) = send(
        &loading,
        Request::get("/health").body(Body::empty()).expect("req"),
    )
    .await;
    assert_error(
        status,
        &serde_json::from_slice(&body).expect("json"),
        StatusCode::SERVICE_UNAVAILABLE,
        None,
    );
    let (status, v) = post_json(&loading, "/v1/completions", json!({"prompt": "hi"})).await;
    assert_error(status, &v, StatusCode::SERVICE_UNAVAILABLE, None);

    // One request in flight at most: a second one is refused with 429 and Retry-After.
    let tight = loaded_with(EngineConfig {
        max_running_seqs: 1,
        max_waiting: 0,
        ..Default::default()
    });
    let (app, _) = app_with(ServerConfig::default(), Some(tight));
    let long = post(
        "/v1/completions",
        json!({"prompt": "hi", "max_tokens": 200, "ignore_eos": true, "stream": true}),
    );
    let resp = app.clone().oneshot(long).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    let (status, headers, body) = send(
        &app,
        post("/v1/completions", json!({"prompt": "hi", "max_tokens": 2})),
    )
    .await;
    assert_error(
        status,
        &serde_json::from_slice(&body).expect("json"),
        StatusCode::TOO_MANY_REQUESTS,
        None,
    );
    assert_eq!(headers[header::RETRY_AFTER], "1");
    drop(resp); // cancels the stream; capacity comes back
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = post_json(
            &app,
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": 2}),
        )
        .await;
        if status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "capacity never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn dropping_a_stream_cancels_the_request() {
    let loaded = loaded_with(EngineConfig::default());
    let (app, _) = app_with(ServerConfig::default(), Some(loaded.clone()));
    let req = post(
        "/v1/completions",
        json!({"prompt": "Tell me a long story", "max_tokens": 500,
                                             "ignore_eos": true, "stream": true}),
    );
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let mut body = resp.into_body();
    let mut chunks = 0;
    while chunks < 3 {
        let frame = body.frame().await.expect("frame").expect("ok");
        if frame.data_ref().is_some_and(|d| d.starts_with(b"data: {")) {
            chunks += 1;
        }
    }
    assert_eq!(loaded.engine.stats().num_running, 1);
    drop(body);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = loaded.engine.stats();
        if s.num_running == 0 && s.kv_blocks_used == 0 {
            assert_eq!(s.num_cancelled, 1);
            assert!(s.generation_tokens_total < 100, "stopped early: {s:?}");
            break;
        }
        assert!(Instant::now() < deadline, "not cancelled: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn request_timeout_ends_generation_with_what_it_has() {
    let config = ServerConfig {
        request_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let (app, _) = app_with(config, Some(shared_loaded()));
    let started = Instant::now();
    let (status, v) = post_json(
        &app,
        "/v1/completions",
        json!({"prompt": "Tell me everything", "max_tokens": 2000, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let n = v["usage"]["completion_tokens"].as_u64().expect("n");
    assert!(n < 2000, "{n}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn multibyte_characters_split_across_tokens_stream_whole() {
    let app = app();
    // Byte-level BPE spells each emoji with several tokens that each hold part of its UTF-8.
    let body = json!({"prompt": "Emojis: 😀😃😄😁😆😅", "max_tokens": 15, "temperature": 0,
                      "logprobs": 0, "stream": true});
    let (status, _, bytes) = send(&app, post("/v1/completions", body.clone())).await;
    assert_eq!(status, StatusCode::OK);
    let payloads = sse_payloads(&bytes);
    let mut streamed = String::new();
    let mut max_tokens_per_chunk = 0;
    for p in &payloads[..payloads.len() - 1] {
        let chunk: Value = serde_json::from_str(p).expect("json");
        let choice = &chunk["choices"][0];
        let text = choice["text"].as_str().expect("text");
        assert!(
            !text.contains('\u{FFFD}'),
            "a chunk split a character: {text:?}"
        );
        streamed.push_str(text);
        let n = choice["logprobs"]["tokens"].as_array().map_or(0, Vec::len);
        max_tokens_per_chunk = max_tokens_per_chunk.max(n);
    }
    assert!(
        streamed.chars().filter(|c| (*c as u32) > 0xFFFF).count() >= 3,
        "{streamed:?}"
    );
    assert!(
        max_tokens_per_chunk >= 2,
        "bytes were held until the character was complete"
    );
    let mut plain = body;
    plain["stream"] = json!(false);
    let (_, v) = post_json(&app, "/v1/completions", plain).await;
    assert_eq!(v["choices"][0]["text"].as_str(), Some(streamed.as_str()));
}

/// What llama.vim sends to `/infill` (its field set), greedy.
fn llama_vim_body(stream: bool) -> Value {
    json!({
        "input_prefix": "import math\n\ndef circle_area(radius):\n",
        "input_suffix": "\n\nprint(circle_area(2.0))\n",
        "input_extra": [{"filename": "util.py", "text": "def square(x):\n    return x * x\n"}],
        "prompt": "    ",
        "n_predict": 24,
        "n_indent": 4,
        "top_k": 40,
        "top_p": 0.99,
        "temperature": 0,
        "stream": stream,
        "samplers": ["top_k", "top_p", "infill"],
        "cache_prompt": true,
        "t_max_predict_ms": 5000,
        "id_slot": -1,
    })
}

#[tokio::test]
async fn infill_serves_llama_vim_with_the_prefix_fallback_and_the_cache() {
    let app = app();
    let (status, first) = post_json(&app, "/infill", llama_vim_body(false)).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let content = first["content"].as_str().expect("content");
    assert_eq!(first["fim_mode"], "prefix", "SmolLM2 has no FIM tokens");
    assert!(
        !content.contains("print(circle_area(2.0))"),
        "cut where the completion repeats the suffix: {content:?}"
    );
    let n = first["tokens_predicted"].as_u64().expect("n");
    assert!((1..=24).contains(&n));
    assert_eq!(first["timings"]["predicted_n"], n);
    assert!(first["timings"]["prompt_ms"].as_f64().expect("ms") > 0.0);
    assert!(["eos", "limit", "word"].contains(&first["stop_type"].as_str().expect("type")));
    assert_eq!(first["stop"], true);
    let evaluated = first["tokens_evaluated"].as_u64().expect("evaluated");
    assert!(
        evaluated > 20,
        "extra file + prefix + typed text: {evaluated}"
    );

    // The same request again: the context comes from the prefix cache, the tokens do not change.
    let (_, again) = post_json(&app, "/infill", llama_vim_body(false)).await;
    assert_eq!(again["content"], first["content"]);
    let cached = again["tokens_cached"].as_u64().expect("cached");
    assert_eq!(cached, (evaluated - 1) / 16 * 16);
    assert_eq!(again["timings"]["prompt_n"], evaluated - cached);

    // Streaming: llama.cpp's SSE events, text pieces then a final object with the timings.
    let (status, headers, bytes) = send(&app, post("/infill", llama_vim_body(true))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
    let events: Vec<Value> = sse_events(&bytes)
        .iter()
        .map(|p| serde_json::from_str(p).expect("event JSON"))
        .collect();
    let (last, pieces) = events.split_last().expect("events");
    assert_eq!(last["stop"], true);
    assert_eq!(last["tokens_predicted"], n);
    assert!(pieces.iter().all(|e| e["stop"] == false));
    let streamed: String = pieces
        .iter()
        .map(|e| e["content"].as_str().expect("piece"))
        .collect();
    assert_eq!(streamed, content);
}

/// llama.vim's ring buffer: chunks of recently seen files sent with `n_predict: 0` and nothing
/// else, so that they are cached before the next completion that carries them.
#[tokio::test]
async fn infill_with_n_predict_0_warms_the_cache_for_the_next_completion() {
    let app = app();
    let extra = json!([
        {"filename": "geometry.py", "text": "def rectangle_area(w, h):\n    return w * h\n\n\ndef triangle_area(b, h):\n    return b * h / 2\n"},
        {"filename": "units.py", "text": "CM_PER_INCH = 2.54\n\n\ndef to_cm(inches):\n    return inches * CM_PER_INCH\n"},
    ]);
    let ring = json!({"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": extra,
                      "prompt": "", "n_predict": 0, "temperature": 0.0, "samplers": [],
                      "stream": false, "cache_prompt": true, "t_max_prompt_ms": 1,
                      "t_max_predict_ms": 1, "response_fields": [""]});
    let (status, warm) = post_json(&app, "/infill", ring).await;
    assert_eq!(status, StatusCode::OK, "{warm}");
    assert_eq!(warm["content"], "");
    assert_eq!(warm["tokens_predicted"], 0);
    assert_eq!(warm["stop"], true);
    let ring_tokens = warm["tokens_evaluated"].as_u64().expect("evaluated");
    assert!(ring_tokens > 32, "{warm}");

    let mut body = llama_vim_body(false);
    body["input_extra"] = extra;
    let (status, v) = post_json(&app, "/infill", body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        v["tokens_cached"],
        ring_tokens / 16 * 16,
        "the ring's full blocks came from the cache"
    );
    assert!(v["tokens_predicted"].as_u64().expect("n") > 0);
}

#[tokio::test]
async fn suffix_completion_native_completion_and_ollama_generate_share_the_path() {
    let app = app();
    let prefix = "def add(a, b):\n";
    let suffix = "\n\nresult = add(1, 2)\n";
    let (status, v) = post_json(
        &app,
        "/v1/completions",
        json!({"prompt": prefix, "suffix": suffix, "max_tokens": 16, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["fim_mode"], "prefix");
    let text = v["choices"][0]["text"].as_str().expect("text").to_string();
    assert!(v["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());

    let (status, infill) = post_json(
        &app,
        "/infill",
        json!({"input_prefix": prefix, "input_suffix": suffix, "n_predict": 16,
               "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(infill["content"], text.as_str(), "one FIM path");

    let (status, native) = post_json(
        &app,
        "/completion",
        json!({"prompt": prefix, "n_predict": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, oai) = post_json(
        &app,
        "/v1/completions",
        json!({"prompt": prefix, "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(native["content"], oai["choices"][0]["text"]);
    assert_eq!(native["tokens_predicted"], 8);
    assert_eq!(native["stop_type"], "limit");

    let (status, ollama) = post_json(
        &app,
        "/api/generate",
        json!({"model": "smollm2", "prompt": prefix, "suffix": suffix, "stream": false,
               "options": {"temperature": 0, "num_predict": 16}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{ollama}");
    assert_eq!(ollama["response"], text.as_str());
    assert_eq!(ollama["done"], true);

    // Streaming Ollama: newline-delimited JSON, the last line `done`.
    let (status, headers, bytes) = send(
        &app,
        post(
            "/api/generate",
            json!({"prompt": prefix, "suffix": suffix,
                   "options": {"temperature": 0, "num_predict": 16}}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/x-ndjson");
    let lines = ndjson_lines(&bytes);
    let (last, pieces) = lines.split_last().expect("lines");
    assert_eq!(last["done"], true);
    assert!(last["eval_count"].as_u64().expect("count") >= 1);
    let streamed: String = pieces
        .iter()
        .map(|l| l["response"].as_str().expect("piece"))
        .collect();
    assert_eq!(streamed, text);

    // `t_max_predict_ms` ends generation that long after the first token.
    let (status, timed) = post_json(
        &app,
        "/infill",
        json!({"input_prefix": prefix, "n_predict": 400, "t_max_predict_ms": 1,
               "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(timed["stop_type"], "limit");
    assert!(
        timed["tokens_predicted"].as_u64().expect("n") < 100,
        "{timed}"
    );

    // Errors stay OpenAI-shaped.
    let (status, e) = post_json(
        &app,
        "/infill",
        json!({"input_prefix": "x", "temperature": -1}),
    )
    .await;
    assert_error(status, &e, StatusCode::BAD_REQUEST, Some("temperature"));
    let (status, e) = post_json(&app, "/api/generate", json!({"suffix": "x"})).await;
    assert_error(status, &e, StatusCode::BAD_REQUEST, Some("prompt"));
    let (status, e) = post_json(
        &app,
        "/v1/completions",
        json!({"prompt": [1, 2], "suffix": "x"}),
    )
    .await;
    assert_error(status, &e, StatusCode::BAD_REQUEST, Some("suffix"));
}

/// A batch of prompts (text or token ids) in one completions request: `n` choices per
/// prompt, prompt by prompt, each what that prompt gives alone; streamed the same.
#[tokio::test]
async fn batched_prompts_get_n_choices_each_in_order() {
    let app = app();
    let prompts = ["The capital of France is", "def fibonacci(n):\n"];
    let mut alone = Vec::new();
    for p in prompts {
        let (status, v) = post_json(
            &app,
            "/v1/completions",
            json!({"prompt": p, "max_tokens": 5, "temperature": 0}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        alone.push(v["choices"][0]["text"].as_str().expect("text").to_string());
    }
    let body = json!({"prompt": prompts, "n": 2, "max_tokens": 5, "temperature": 0, "echo": true});
    let (status, v) = post_json(&app, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(
            c["text"],
            format!("{}{}", prompts[i / 2], alone[i / 2]),
            "choice {i}"
        );
    }
    let tokenizer = &gguf().1;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tokenizer.encode(p, true).expect("encode"))
        .collect();
    let prompt_tokens = ids[0].len() + ids[1].len();
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(v["usage"]["completion_tokens"], 4 * 5);

    // Streamed: each choice's chunks add up to its text; token-id batches are the same.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, _, bytes) = send(&app, post("/v1/completions", streamed)).await;
    assert_eq!(status, StatusCode::OK);
    let mut texts = vec![String::new(); 4];
    let mut usage = Value::Null;
    for p in sse_payloads(&bytes).iter().filter(|p| *p != "[DONE]") {
        let chunk: Value = serde_json::from_str(p).expect("JSON");
        if let Some(c) = chunk["choices"].as_array().and_then(|c| c.first()) {
            let i = c["index"].as_u64().expect("index") as usize;
            texts[i].push_str(c["text"].as_str().expect("text"));
        } else {
            usage = chunk["usage"].clone();
        }
    }
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(t, &choices[i]["text"], "streamed choice {i}");
    }
    assert_eq!(usage["prompt_tokens"], prompt_tokens);
    let mut by_ids = body;
    by_ids["prompt"] = json!(ids);
    let (_, w) = post_json(&app, "/v1/completions", by_ids).await;
    assert_eq!(w["choices"], v["choices"]);

    // The bad prompt of a batch is named; too many completions are refused.
    let (status, e) = post_json(
        &app,
        "/v1/completions",
        json!({"prompt": [[1, 2], [], [3]], "max_tokens": 2}),
    )
    .await;
    assert_error(status, &e, StatusCode::BAD_REQUEST, Some("prompt[1]"));
    let (status, e) = post_json(
        &app,
        "/v1/completions",
        json!({"prompt": vec!["x"; 200], "n": 2, "max_tokens": 2}),
    )
    .await;
    assert_error(status, &e, StatusCode::BAD_REQUEST, Some("prompt"));
}

/// llama.cpp's `n_probs` on `/completion`: `completion_probabilities` per generated token,
/// in the final object and, streamed, in each piece.
#[tokio::test]
async fn native_completion_reports_n_probs() {
    let app = app();
    let body = json!({"prompt": "The capital of France is", "n_predict": 3, "temperature": 0,
                      "n_probs": 3});
    let (status, v) = post_json(&app, "/completion", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let probs = v["completion_probabilities"]
        .as_array()
        .expect("probabilities");
    assert_eq!(probs.len(), 3);
    let first = &probs[0];
    assert_eq!(first["token"], " Paris");
    assert_eq!(first["bytes"], json!(" Paris".as_bytes()));
    // log p(" Paris"): -0.258 in float32, -0.259 in llama.cpp (tests/reference.rs).
    let lp = first["logprob"].as_f64().expect("logprob");
    assert!((lp + 0.258).abs() < 0.1, "{lp}");
    let top = first["top_logprobs"].as_array().expect("top");
    assert_eq!(top.len(), 3);
    assert_eq!(
        (&top[0]["id"], &top[0]["logprob"]),
        (&first["id"], &first["logprob"])
    );
    assert!(top
        .windows(2)
        .all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()));
    let text: String = probs
        .iter()
        .map(|p| p["token"].as_str().expect("token"))
        .collect();
    assert_eq!(v["content"], text.as_str());

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (status, _, bytes) = send(&app, post("/completion", streamed)).await;
    assert_eq!(status, StatusCode::OK);
    let events: Vec<Value> = sse_events(&bytes)
        .iter()
        .map(|p| serde_json::from_str(p).expect("event JSON"))
        .collect();
    let pieces: Vec<Value> = events
        .iter()
        .filter(|e| e["stop"] == false)
        .flat_map(|e| {
            e["completion_probabilities"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(&pieces, probs);

    let (status, e) = post_json(
        &app,
        "/completion",
        json!({"prompt": "hi", "n_predict": 1, "n_probs": 21}),
    )
    .await;
    assert_error(status, &e, StatusCode::BAD_REQUEST, Some("n_probs"));
}

/// JSON mode (`response_format: {"type": "json_object"}`): the text is one JSON object,
/// greedy or sampled, streamed or not; unconstrained, the same request is prose.
#[tokio::test]
async fn json_mode_gives_one_json_object() {
    let app = app();
    let messages = json!([{"role": "user",
        "content": "Describe three animals as a JSON list of objects with many fields."}]);
    let free = json!({"messages": messages, "max_tokens": 40, "temperature": 0});
    let (status, v) = post_json(&app, "/v1/chat/completions", free).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let prose = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert!(serde_json::from_str::<Value>(prose).is_err(), "{prose:?}");

    let body = json!({"messages": messages, "max_tokens": 300, "temperature": 0,
                      "response_format": {"type": "json_object"}});
    let (status, v) = post_json(&app, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "stop", "{v}");
    let text = c["message"]["content"].as_str().expect("content");
    let object: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert!(object.as_object().is_some_and(|o| !o.is_empty()), "{text}");

    // Sampled, three seeds; streamed pieces add up to JSON too.
    let mut sampled = body.clone();
    sampled["temperature"] = json!(1.0);
    sampled["seed"] = json!(11);
    sampled["n"] = json!(3);
    let (status, v) = post_json(&app, "/v1/chat/completions", sampled).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    for c in v["choices"].as_array().expect("choices") {
        assert_eq!(c["finish_reason"], "stop", "{c}");
        let t = c["message"]["content"].as_str().expect("content");
        assert!(
            serde_json::from_str::<Value>(t).is_ok_and(|o| o.is_object()),
            "{t:?}"
        );
    }
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (_, _, bytes) = send(&app, post("/v1/chat/completions", streamed)).await;
    assert_eq!(chat_stream_pieces(&bytes).concat(), text);

    // Ollama's `format: "json"` takes the same path.
    let (status, v) = post_json(
        &app,
        "/api/generate",
        json!({"prompt": "Q: What is the capital of France? Answer in JSON.", "stream": false,
               "raw": true, "format": "json",
               "options": {"temperature": 0, "num_predict": 200}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let t = v["response"].as_str().expect("response");
    assert_eq!(
        serde_json::from_str::<Value>(t).ok(),
        Some(json!({"city": "Paris"})),
        "{t:?}"
    );
    let (status, e) = post_json(&app, "/api/generate", json!({"prompt": "x", "format": 1})).await;
    assert_error(status, &e, StatusCode::BAD_REQUEST, Some("format"));

    // Completions too; an unknown type is refused.
    let (status, v) = post_json(
        &app,
        "/v1/completions",
        json!({"prompt": "Q: What is the capital of France? Answer in JSON.", "max_tokens": 200,
               "temperature": 0, "response_format": {"type": "json_object"}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let t = v["choices"][0]["text"].as_str().expect("text");
    assert_eq!(
        serde_json::from_str::<Value>(t).ok(),
        Some(json!({"city": "Paris"})),
        "{t:?}"
    );
    for format in [
        json!({"type": "json_schema"}),
        json!({"type": "yaml"}),
        json!("json"),
    ] {
        let (status, e) = post_json(
            &app,
            "/v1/chat/completions",
            json!({"messages": messages, "response_format": format}),
        )
        .await;
        assert_error(status, &e, StatusCode::BAD_REQUEST, Some("response_format"));
    }
}

/// A small JSON Schema check, written apart from the server's compiler: the keywords the
/// tests below use (`type`, `properties` + `required` + closed objects, `items`,
/// `minItems`/`maxItems`, `enum`, `anyOf`, `minLength`/`maxLength`, `minimum`/`maximum` and
/// the exclusive forms, local `$ref`).
fn conforms(v: &Value, s: &Value, root: &Value) -> Result<(), String> {
    if let Some(r) = s["$ref"].as_str() {
        let target = root.pointer(r.trim_start_matches('#')).ok_or("bad ref")?;
        return conforms(v, target, root);
    }
    if let Some(alts) = s["anyOf"].as_array() {
        return alts
            .iter()
            .find(|a| conforms(v, a, root).is_ok())
            .map(|_| ())
            .ok_or_else(|| format!("{v} matches no alternative of {s}"));
    }
    if let Some(e) = s["enum"].as_array() {
        if !e.contains(v) {
            return Err(format!("{v} not in {s}"));
        }
    }
    let ok = match s["type"].as_str() {
        None => true,
        Some("object") => {
            let o = v.as_object().ok_or(format!("{v}: not an object"))?;
            let props = s["properties"].as_object().cloned().unwrap_or_default();
            for r in s["required"].as_array().into_iter().flatten() {
                if !o.contains_key(r.as_str().unwrap_or_default()) {
                    return Err(format!("{v}: no {r}"));
                }
            }
            for (k, x) in o {
                let p = props.get(k).ok_or(format!("{v}: extra key {k}"))?;
                conforms(x, p, root)?;
            }
            true
        }
        Some("array") => {
            let a = v.as_array().ok_or(format!("{v}: not an array"))?;
            let n = a.len() as u64;
            if s["minItems"].as_u64().is_some_and(|m| n < m)
                || s["maxItems"].as_u64().is_some_and(|m| n > m)
            {
                return Err(format!("{v}: {n} items"));
            }
            for x in a {
                conforms(x, &s["items"], root)?;
            }
            true
        }
        Some("string") => v.as_str().is_some_and(|t| {
            let n = t.chars().count() as u64;
            s["minLength"].as_u64().is_none_or(|m| n >= m)
                && s["maxLength"].as_u64().is_none_or(|m| n <= m)
        }),
        Some("integer" | "number") => {
            let x = v.as_f64().ok_or(format!("{v}: not a number"))?;
            let bound = |k: &str| s[k].as_f64();
            (s["type"] == "number" || v.is_i64() || v.is_u64())
                && bound("minimum").is_none_or(|m| x >= m)
                && bound("maximum").is_none_or(|m| x <= m)
                && bound("exclusiveMinimum").is_none_or(|m| x > m)
                && bound("exclusiveMaximum").is_none_or(|m| x < m)
        }
        Some("boolean") => v.is_boolean(),
        Some("null") => v.is_null(),
        Some(t) => return Err(format!("unknown type {t}")),
    };
    ok.then_some(()).ok_or_else(|| format!("{v} is not {s}"))
}

/// `response_format: json_schema` (and the same schema through llama.cpp's `json_schema` and
/// Ollama's `format`): every answer is an instance of the schema, its keys in the schema's
/// order, greedy, sampled or streamed; unconstrained, the same request is not.
#[tokio::test]
async fn json_schema_answers_are_instances_of_the_schema() {
    let app = app();
    let schema: Value = serde_json::from_str(
        r##"{"type": "object", "additionalProperties": false,
            "properties": {
              "name": {"type": "string", "maxLength": 40},
              "age": {"type": "integer"},
              "city": {"type": "string"},
              "languages": {"type": "array", "minItems": 1, "maxItems": 3,
                            "items": {"$ref": "#/$defs/Language"}},
              "employer": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
            "required": ["name", "age", "city", "languages", "employer"],
            "$defs": {"Language": {"enum": ["English", "French", "German", "Spanish"]}}}"##,
    )
    .expect("schema");
    let keys = ["name", "age", "city", "languages", "employer"];
    let messages = json!([{"role": "user", "content":
        "Marie is a 34-year-old engineer from Lyon who speaks French and English. \
         Give her details."}]);
    let format = json!({"type": "json_schema",
                        "json_schema": {"name": "person", "strict": true, "schema": schema}});
    let check = |text: &str| {
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        conforms(&v, &schema, &schema).unwrap_or_else(|e| panic!("{e}: {text}"));
        // The keys come in the schema's order (a map that sorted them would give "age" first).
        let order: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(order, keys, "{text}");
        v
    };

    let free = json!({"messages": messages, "max_tokens": 60, "temperature": 0});
    let (status, v) = post_json(&app, "/v1/chat/completions", free).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let prose = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert!(
        serde_json::from_str::<Value>(prose)
            .map_or(true, |p| conforms(&p, &schema, &schema).is_err()),
        "{prose:?}"
    );

    let body = json!({"messages": messages, "max_tokens": 200, "temperature": 0,
                      "response_format": format});
    let (status, v) = post_json(&app, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "stop", "{v}");
    let text = c["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    let greedy = check(&text);
    eprintln!("greedy: {text}");
    assert_eq!(greedy["city"], "Lyon", "{text}");

    let mut sampled = body.clone();
    sampled["temperature"] = json!(1.0);
    sampled["seed"] = json!(5);
    sampled["n"] = json!(4);
    let (status, v) = post_json(&app, "/v1/chat/completions", sampled).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    for c in v["choices"].as_array().expect("choices") {
        assert_eq!(c["finish_reason"], "stop", "{c}");
        let t = c["message"]["content"].as_str().expect("content");
        eprintln!("sampled: {t}");
        check(t);
    }

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (_, _, bytes) = send(&app, post("/v1/chat/completions", streamed)).await;
    assert_eq!(chat_stream_pieces(&bytes).concat(), text);

    // The other dialects: the same schema, the same path.
    let prompt = "Marie is a 34-year-old engineer from Lyon who speaks French and English.\n\
                  Her details as JSON:";
    let (status, v) = post_json(
        &app,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 200, "temperature": 0,
               "response_format": format}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let completions = v["choices"][0]["text"].as_str().expect("text").to_string();
    check(&completions);
    let (status, v) = post_json(
        &app,
        "/completion",
        json!({"prompt": prompt, "n_predict": 200, "temperature": 0, "json_schema": schema}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["content"], completions.as_str(), "{v}");
    let (status, v) = post_json(
        &app,
        "/api/generate",
        json!({"prompt": prompt, "stream": false, "format": schema, "raw": true,
               "options": {"temperature": 0, "num_predict": 200}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    check(v["response"].as_str().expect("response"));

    // What cannot be followed is refused, naming where.
    for (path, body, param) in [
        (
            "/v1/chat/completions",
            json!({"messages": messages, "response_format": {"type": "json_schema", "json_schema":
               {"name": "x", "schema": {"type": "string", "pattern": "^(?=[a-z])"}}}}),
            "response_format",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": messages, "response_format": {"type": "json_schema",
               "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/Nope"}}}}),
            "response_format",
        ),
        (
            "/completion",
            json!({"prompt": "x", "json_schema": {"multipleOf": 2, "type": "integer", "maximum": 1, "minimum": 1}}),
            "json_schema",
        ),
        (
            "/completion",
            json!({"prompt": "x", "grammar": "root ::= root? \"]\""}),
            "grammar",
        ),
        (
            "/api/generate",
            json!({"prompt": "x", "format": {"type": "nope"}}),
            "format",
        ),
    ] {
        let (status, e) = post_json(&app, path, body.clone()).await;
        assert_error(status, &e, StatusCode::BAD_REQUEST, Some(param));
        eprintln!("{path}: {}", e["error"]["message"]);
    }
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather",
         "description": "The current weather in a city",
         "parameters": {"type": "object", "properties": {
             "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
             "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time",
         "description": "The current time in a time zone",
         "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                        "required": ["timezone"]}}}
    ])
}

/// Tool calling: with `tool_choice` required or named the answer is a call of a declared
/// function with arguments that follow its schema, as OpenAI's `tool_calls` (streamed too);
/// with `auto` the model may answer in text; earlier calls and results are understood.
#[tokio::test]
async fn tool_calls_follow_the_declared_functions() {
    let app = app();
    let tools = weather_tools();
    let messages = json!([{"role": "user", "content": "What is the weather like in Paris?"}]);
    let check_call = |v: &Value, want: &str| {
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{v}");
        assert_eq!(c["message"]["content"], Value::Null, "{v}");
        let calls = c["message"]["tool_calls"].as_array().expect("tool_calls");
        assert_eq!(calls.len(), 1, "{v}");
        let call = &calls[0];
        assert!(
            call["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("call_")),
            "{v}"
        );
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], want, "{v}");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().expect("args"))
                .expect("arguments are JSON");
        let i = usize::from(want == "get_time");
        let schema = &tools[i]["function"]["parameters"];
        conforms(&args, schema, schema).unwrap_or_else(|e| panic!("{e}: {v}"));
        eprintln!("{want}: {args}");
        call["function"]["arguments"]
            .as_str()
            .expect("args")
            .to_string()
    };

    let body = json!({"messages": messages, "tools": tools, "tool_choice": "required",
                      "max_tokens": 60, "temperature": 0});
    let (status, v) = post_json(&app, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let args = check_call(&v, "get_weather");
    let parsed: Value = serde_json::from_str(&args).expect("JSON");
    assert_eq!(parsed["city"], "Paris", "{v}");

    let mut named = body.clone();
    named["tool_choice"] = json!({"type": "function", "function": {"name": "get_time"}});
    let (status, v) = post_json(&app, "/v1/chat/completions", named).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    check_call(&v, "get_time");

    // Streamed: the role; the call's id and name as soon as the name is written, then its
    // arguments piece by piece (adding up to the same text); the finish reason; [DONE].
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (_, _, bytes) = send(&app, post("/v1/chat/completions", streamed)).await;
    let chunks: Vec<Value> = sse_payloads(&bytes)
        .iter()
        .filter(|p| *p != "[DONE]")
        .map(|p| serde_json::from_str(p).expect("chunk"))
        .collect();
    let n = chunks.len();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let first = &chunks[1]["choices"][0]["delta"]["tool_calls"][0];
    assert!(
        first["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_")),
        "{first}"
    );
    assert_eq!(first["type"], "function");
    assert_eq!(first["function"]["name"], "get_weather");
    let pieces: Vec<&Value> = chunks[1..n - 1]
        .iter()
        .map(|c| &c["choices"][0]["delta"]["tool_calls"][0])
        .collect();
    assert!(pieces.len() > 2, "arguments stream in pieces: {chunks:?}");
    for p in &pieces[1..] {
        assert_eq!(p["index"], 0);
        assert!(
            p.get("id").is_none() && p["function"].get("name").is_none(),
            "{p}"
        );
    }
    let streamed_args: String = pieces
        .iter()
        .map(|p| {
            p["function"]["arguments"]
                .as_str()
                .expect("arguments piece")
        })
        .collect();
    assert_eq!(streamed_args, args);
    assert_eq!(chunks[n - 1]["choices"][0]["finish_reason"], "tool_calls");

    // `auto`: a greeting is answered in text, streamed as text.
    let hello = json!({"messages": [{"role": "user", "content": "Hello! Who are you?"}],
                       "tools": tools, "max_tokens": 30, "temperature": 0});
    let (status, v) = post_json(&app, "/v1/chat/completions", hello.clone()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    eprintln!("auto: {v}");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    assert!(
        !text.trim_start().starts_with('{') && !text.is_empty(),
        "{v}"
    );
    assert!(
        v["choices"][0]["message"].get("tool_calls").is_none(),
        "{v}"
    );
    let mut hello_stream = hello;
    hello_stream["stream"] = json!(true);
    let (_, _, bytes) = send(&app, post("/v1/chat/completions", hello_stream)).await;
    let pieces = chat_stream_pieces(&bytes);
    assert!(pieces.len() > 3, "text streams piece by piece: {pieces:?}");
    assert_eq!(pieces.concat(), text);

    // A conversation with a call and its result: the answer uses the result.
    let (status, v) = post_json(
        &app,
        "/v1/chat/completions",
        json!({"messages": [
            {"role": "user", "content": "What is the weather like in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 31, \"sky\": \"sunny\"}"}],
         "tools": tools, "max_tokens": 40, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    eprintln!("after the result: {v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let answer = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    assert!(
        !answer.starts_with('{') && answer.to_lowercase().contains("sunny"),
        "{v}"
    );

    for (body, param) in [
        (
            json!({"messages": messages, "tools": tools,
                "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (
            json!({"messages": messages, "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"messages": messages, "tools": tools, "tool_choice": "always"}),
            "tool_choice",
        ),
        (
            json!({"messages": messages, "tools": [{"type": "function", "function": {"name": "a b"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"messages": messages, "tools": [{"type": "retrieval"}]}),
            "tools[0].type",
        ),
        (
            json!({"messages": messages, "tools": [{"type": "function", "function":
                {"name": "f", "parameters": {"type": "object", "properties": {"x": {"pattern": "a"}}}}}]}),
            "tools[0].function.parameters",
        ),
        (
            json!({"messages": messages, "tools": tools, "response_format": {"type": "json_object"}}),
            "response_format",
        ),
    ] {
        let (status, e) = post_json(&app, "/v1/chat/completions", body.clone()).await;
        assert_error(status, &e, StatusCode::BAD_REQUEST, Some(param));
    }
}

/// Numbers keep to `minimum`/`maximum` (pydantic's `ge`/`le`/`gt`/`lt`): greedy and sampled
/// at a high temperature, every value lies inside its bounds; without them, some do not.
#[tokio::test]
async fn json_schema_numbers_keep_to_their_bounds() {
    let app = app();
    let bounded = json!({"type": "object", "additionalProperties": false,
        "properties": {
            "rating": {"type": "integer", "minimum": 1, "maximum": 5},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "year": {"type": "integer", "exclusiveMinimum": 1899, "exclusiveMaximum": 2031}},
        "required": ["rating", "confidence", "year"]});
    let mut free = bounded.clone();
    for p in ["rating", "confidence", "year"] {
        free["properties"][p] = json!({"type": bounded["properties"][p]["type"]});
    }
    let ask = "Rate the movie Titanic (1997) out of ten, say how sure you are, and give its year.";
    for v in hot_answers(&app, ask, &bounded, 60).await {
        eprintln!("bounded: {v}");
        conforms(&v, &bounded, &bounded).unwrap_or_else(|e| panic!("{e}"));
    }
    let unbounded = hot_answers(&app, ask, &free, 60).await;
    for v in &unbounded {
        eprintln!("free: {v}");
        conforms(v, &free, &free).unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(
        unbounded
            .iter()
            .any(|v| conforms(v, &bounded, &bounded).is_err()),
        "the bounds were never needed: {unbounded:?}"
    );
}

/// The chat answers to `ask` under `response_format: json_schema` with `schema`: greedy, then
/// four seeds at temperature 1.3 (sampling far from the model's habits).
async fn hot_answers(app: &Router, ask: &str, schema: &Value, max_tokens: u32) -> Vec<Value> {
    let mut out = Vec::new();
    for (temperature, seed) in [(0.0, 0), (1.3, 1), (1.3, 2), (1.3, 3), (1.3, 4)] {
        let body = json!({"messages": [{"role": "user", "content": ask}],
            "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
            "response_format": {"type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema}}});
        let (status, v) = post_json(app, "/v1/chat/completions", body).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .expect("text");
        out.push(serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}")));
    }
    out
}

/// Whether `t` is a calendar date `YYYY-MM-DD` (checked by hand, not by a pattern).
fn is_date(t: &str) -> bool {
    let parts: Vec<&str> = t.split('-').collect();
    let num = |s: &str, n: usize| {
        (s.len() == n && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u32>().ok())
            .flatten()
    };
    match parts[..] {
        [y, m, d] => {
            num(y, 4).is_some()
                && num(m, 2).is_some_and(|m| (1..=12).contains(&m))
                && num(d, 2).is_some_and(|d| (1..=31).contains(&d))
        }
        _ => false,
    }
}

/// Whether `t` is a UUID: 8-4-4-4-12 hex digits.
fn is_uuid(t: &str) -> bool {
    let groups: Vec<&str> = t.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// String `pattern`s and `format`s: hot-sampled answers keep to them; without them the same
/// requests do not.
#[tokio::test]
async fn json_schema_strings_keep_to_patterns_and_formats() {
    let app = app();
    let schema = json!({"type": "object", "additionalProperties": false,
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Z][a-z]+ [A-Z][a-z]+$"},
            "phone": {"type": "string", "pattern": "^\\+1-\\d{3}-\\d{3}-\\d{4}$"},
            "birthday": {"type": "string", "format": "date"},
            "id": {"type": "string", "format": "uuid"}},
        "required": ["name", "phone", "birthday", "id"]});
    let ask = "Invent a customer: full name, phone number, birthday and customer id.";
    let fits = |v: &Value| {
        let name = regex::Regex::new("^[A-Z][a-z]+ [A-Z][a-z]+$").expect("regex");
        let phone = regex::Regex::new(r"^\+1-\d{3}-\d{3}-\d{4}$").expect("regex");
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        name.is_match(&s("name"))
            && phone.is_match(&s("phone"))
            && is_date(&s("birthday"))
            && is_uuid(&s("id"))
    };
    for v in hot_answers(&app, ask, &schema, 400).await {
        eprintln!("pattern: {v}");
        assert!(fits(&v), "{v}");
    }
    let mut free = schema.clone();
    for p in ["name", "phone", "birthday", "id"] {
        // Bounded, so that a free string cannot run past `max_tokens`.
        free["properties"][p] = json!({"type": "string", "maxLength": 40});
    }
    let unconstrained = hot_answers(&app, ask, &free, 400).await;
    eprintln!("free: {unconstrained:?}");
    assert!(
        unconstrained.iter().any(|v| !fits(v)),
        "the patterns were never needed: {unconstrained:?}"
    );
}

/// Unions whose alternatives start alike — pydantic's discriminated `Cat | Dog` (two
/// objects: `oneOf` with a `discriminator`, as the `openai` client sends it) and `int | float`
/// — are followed until the text tells the alternatives apart: every hot-sampled answer is
/// exactly one of them, and both objects come up.
#[tokio::test]
async fn json_schema_unions_of_objects_and_numbers() {
    let app = app();
    let schema = json!({
        "$defs": {
            "Cat": {"type": "object", "additionalProperties": false,
                "properties": {"kind": {"const": "cat", "type": "string"},
                    "name": {"type": "string", "maxLength": 20},
                    "lives": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["kind", "name", "lives"]},
            "Dog": {"type": "object", "additionalProperties": false,
                "properties": {"kind": {"const": "dog", "type": "string"},
                    "name": {"type": "string", "maxLength": 20},
                    "good_boy": {"type": "boolean"}},
                "required": ["kind", "name", "good_boy"]}},
        "type": "object", "additionalProperties": false,
        "properties": {
            "pets": {"type": "array", "minItems": 2, "maxItems": 3, "items": {
                "discriminator": {"propertyName": "kind",
                    "mapping": {"cat": "#/$defs/Cat", "dog": "#/$defs/Dog"}},
                "oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}]}},
            "weight_kg": {"anyOf": [{"type": "integer"}, {"type": "number"}]}},
        "required": ["pets", "weight_kg"]});
    let ask = "Our family has a cat called Tom and a dog called Rex. List our pets, and \
               give their total weight in kilograms.";
    let keys = |v: &Value| -> Vec<String> {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let mut kinds = std::collections::BTreeSet::new();
    for v in hot_answers(&app, ask, &schema, 300).await {
        eprintln!("union: {v}");
        assert_eq!(keys(&v), ["pets", "weight_kg"], "{v}");
        assert!(v["weight_kg"].is_number(), "{v}");
        let pets = v["pets"].as_array().expect("pets");
        assert!((2..=3).contains(&pets.len()), "{v}");
        for p in pets {
            match p["kind"].as_str() {
                Some("cat") => {
                    assert_eq!(keys(p), ["kind", "name", "lives"], "{v}");
                    assert!(
                        (1..=9).contains(&p["lives"].as_i64().expect("lives")),
                        "{v}"
                    );
                }
                Some("dog") => {
                    assert_eq!(keys(p), ["kind", "name", "good_boy"], "{v}");
                    assert!(p["good_boy"].is_boolean(), "{v}");
                }
                _ => panic!("neither a cat nor a dog: {v}"),
            }
            assert!(p["name"].as_str().is_some_and(|n| n.chars().count() <= 20));
            kinds.insert(p["kind"].as_str().unwrap_or_default().to_string());
        }
    }
    assert_eq!(
        kinds.len(),
        2,
        "both alternatives can be generated: {kinds:?}"
    );
}

/// vLLM's `guided_regex` and `structured_outputs: {"regex"}`: the raw answer matches the
/// expression as a whole, and ends where nothing more could follow.
#[tokio::test]
async fn vllm_guided_regex() {
    let app = app();
    let year = " (1[89]|20)[0-9]{2}\\.";
    for (seed, temperature) in [(0, 0.0), (1, 1.3), (2, 1.3)] {
        let (status, v) = post_json(
            &app,
            "/v1/completions",
            json!({"prompt": "The Titanic sank in the year", "guided_regex": year,
                   "max_tokens": 12, "temperature": temperature, "seed": seed}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let t = v["choices"][0]["text"].as_str().expect("text");
        eprintln!("year: {t:?}");
        let whole = format!("^(?:{year})$");
        assert!(
            regex::Regex::new(&whole).expect("regex").is_match(t),
            "{t:?}"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    }
    let (status, v) = post_json(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Is Paris in France? Answer and explain."}],
               "structured_outputs": {"regex": "(Yes|No), [a-z ,]{3,40}\\."},
               "max_tokens": 30, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let t = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    eprintln!("chat: {t:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert!(
        regex::Regex::new("^(Yes|No), [a-z ,]{3,40}\\.$")
            .expect("regex")
            .is_match(t),
        "{t:?}"
    );
    for (body, param) in [
        (json!({"prompt": "x", "guided_regex": 3}), "guided_regex"),
        (
            json!({"prompt": "x", "guided_regex": "(?=a)b"}),
            "guided_regex",
        ),
        (
            json!({"prompt": "x", "structured_outputs": {"regex": "(a)\\1"}}),
            "structured_outputs",
        ),
        (
            json!({"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}),
            "guided_regex",
        ),
    ] {
        let (status, e) = post_json(&app, "/v1/completions", body).await;
        assert_error(status, &e, StatusCode::BAD_REQUEST, Some(param));
    }
}

/// vLLM's guided decoding fields (`guided_choice`, `guided_json`, and their newer
/// `structured_outputs` spelling): one of the texts exactly, or an instance of the schema.
#[tokio::test]
async fn vllm_guided_choice_and_json() {
    let app = app();
    let review = "Review: \"A wonderful film, I loved every minute.\" Is this review positive or \
                  negative?";
    let choices = json!(["negative", "positive", "neutral"]);
    for body in [
        json!({"messages": [{"role": "user", "content": review}], "guided_choice": choices,
               "temperature": 0, "max_tokens": 10}),
        json!({"messages": [{"role": "user", "content": review}],
               "structured_outputs": {"choice": choices}, "temperature": 1.0, "seed": 3,
               "n": 3, "max_tokens": 10}),
    ] {
        let (status, v) = post_json(&app, "/v1/chat/completions", body).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        for c in v["choices"].as_array().expect("choices") {
            eprintln!("choice: {}", c["message"]["content"]);
            assert!(
                choices
                    .as_array()
                    .is_some_and(|a| a.contains(&c["message"]["content"])),
                "{v}"
            );
            assert_eq!(c["finish_reason"], "stop", "{v}");
        }
    }
    let schema = json!({"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative"]},
                        "stars": {"type": "integer"}}, "required": ["sentiment", "stars"]});
    for key in ["guided_json", "structured_outputs"] {
        let field = if key == "guided_json" {
            schema.clone()
        } else {
            json!({"json": schema})
        };
        let (status, v) = post_json(
            &app,
            "/v1/completions",
            json!({"prompt": format!("{review}\nAnswer as JSON:"), key: field,
                   "temperature": 0, "max_tokens": 40}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let t = v["choices"][0]["text"].as_str().expect("text");
        let o: Value = serde_json::from_str(t).unwrap_or_else(|e| panic!("{e}: {t}"));
        conforms(&o, &schema, &schema).unwrap_or_else(|e| panic!("{e}: {t}"));
    }
    for (body, param) in [
        (json!({"prompt": "x", "guided_choice": []}), "guided_choice"),
        (
            json!({"prompt": "x", "guided_choice": ["a", ""]}),
            "guided_choice",
        ),
        (
            json!({"prompt": "x", "guided_json": {"type": "string", "pattern": "(?=a)"}}),
            "guided_json",
        ),
        (
            json!({"prompt": "x", "guided_choice": ["a"], "response_format": {"type": "json_object"}}),
            "guided_choice",
        ),
    ] {
        let (status, e) = post_json(&app, "/v1/completions", body).await;
        assert_error(status, &e, StatusCode::BAD_REQUEST, Some(param));
    }
}

/// A typed SSE body (`event: NAME` then one `data:` line per event): (name, payload) pairs.
fn named_sse_events(bytes: &[u8]) -> Vec<(String, Value)> {
    let text = String::from_utf8(bytes.to_vec()).expect("utf-8");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, data) = e
                .split_once('\n')
                .unwrap_or_else(|| panic!("two lines: {e:?}"));
            let name = name
                .strip_prefix("event: ")
                .unwrap_or_else(|| panic!("event line: {e:?}"));
            let data = data
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("data line: {e:?}"));
            assert!(!data.contains('\n'), "single-line payload: {e:?}");
            (
                name.to_string(),
                serde_json::from_str(data).expect("JSON payload"),
            )
        })
        .collect()
}

/// OpenAI's Responses API: the same generation as the chat path (instructions as the system
/// message), `status`/`usage` mapped, the typed event stream in order, `text.format`, function
/// tools with their outputs, and errors that name the Responses fields.
#[tokio::test]
async fn responses_api_text_stream_format_and_tools() {
    let app = app();
    let question = "Which planet is known as the red planet?";
    let (status, chat) = post_json(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "system", "content": "Answer briefly."},
                            {"role": "user", "content": question}],
               "max_tokens": 24, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{chat}");
    let want = chat["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    let body = json!({"model": "smollm2", "instructions": "Answer briefly.", "input": question,
                      "max_output_tokens": 24, "temperature": 0, "metadata": {"k": "v"}});
    let (status, r) = post_json(&app, "/v1/responses", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["object"], "response");
    assert!(
        r["id"].as_str().is_some_and(|id| id.starts_with("resp_")),
        "{r}"
    );
    let complete = chat["choices"][0]["finish_reason"] == "stop";
    assert_eq!(
        r["status"],
        if complete { "completed" } else { "incomplete" },
        "{r}"
    );
    if !complete {
        assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
    }
    assert_eq!(r["metadata"], json!({"k": "v"}));
    assert_eq!(r["store"], true);
    let item = &r["output"][0];
    assert_eq!(item["type"], "message");
    assert_eq!(item["role"], "assistant");
    assert_eq!(item["content"][0]["type"], "output_text");
    assert_eq!(item["content"][0]["text"], want, "{r}");
    assert_eq!(r["usage"]["input_tokens"], chat["usage"]["prompt_tokens"]);
    assert_eq!(
        r["usage"]["output_tokens"],
        chat["usage"]["completion_tokens"]
    );
    assert_eq!(
        r["usage"]["total_tokens"], chat["usage"]["total_tokens"],
        "{r}"
    );

    // Streamed: the typed events in order, numbered, the deltas adding up to the text.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (status, headers, bytes) = send(&app, post("/v1/responses", streamed)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE]
        .to_str()
        .is_ok_and(|c| c.starts_with("text/event-stream")));
    let events = named_sse_events(&bytes);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let deltas = names
        .iter()
        .filter(|n| **n == "response.output_text.delta")
        .count();
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    expected.extend(std::iter::repeat_n("response.output_text.delta", deltas));
    let last = if complete {
        "response.completed"
    } else {
        "response.incomplete"
    };
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        last,
    ]);
    assert_eq!(names, expected);
    assert!(deltas > 3, "{names:?}");
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], name.as_str());
        assert_eq!(data["sequence_number"], i);
    }
    let text: String = events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().expect("delta").to_string())
        .collect();
    assert_eq!(text, want);
    let done = &events.last().expect("events").1["response"];
    assert_eq!(done["output"][0]["content"][0]["text"], want);
    assert_eq!(done["usage"], r["usage"]);

    // `text.format` with a schema.
    let schema = json!({"type": "object", "properties": {"planet": {"type": "string"},
                        "moons": {"type": "integer"}}, "required": ["planet", "moons"]});
    let (status, r) = post_json(
        &app,
        "/v1/responses",
        json!({"input": question, "temperature": 0, "max_output_tokens": 60,
               "text": {"format": {"type": "json_schema", "name": "answer", "schema": schema,
                                   "strict": true}}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let t = r["output"][0]["content"][0]["text"].as_str().expect("text");
    let v: Value = serde_json::from_str(t).unwrap_or_else(|e| panic!("{e}: {t}"));
    conforms(&v, &schema, &schema).unwrap_or_else(|e| panic!("{e}: {t}"));

    // Function tools (flat, as this API declares them), a call, and its output back.
    let tools: Vec<Value> = weather_tools()
        .as_array()
        .expect("tools")
        .iter()
        .map(|t| {
            let mut f = t["function"].clone();
            f["type"] = json!("function");
            f
        })
        .collect();
    let ask = "What is the weather like in Paris?";
    let (status, r) = post_json(
        &app,
        "/v1/responses",
        json!({"input": ask, "tools": tools, "tool_choice": "required", "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let call = r["output"][0].clone();
    assert_eq!(call["type"], "function_call", "{r}");
    assert_eq!(call["name"], "get_weather", "{r}");
    assert!(call["call_id"]
        .as_str()
        .is_some_and(|c| c.starts_with("call_")));
    let args: Value =
        serde_json::from_str(call["arguments"].as_str().expect("args")).expect("JSON");
    assert_eq!(args["city"], "Paris", "{r}");
    // Streamed: the call item as soon as its name is written, its arguments piece by piece.
    let (_, _, bytes) = send(
        &app,
        post(
            "/v1/responses",
            json!({"input": ask, "tools": tools, "tool_choice": "required", "temperature": 0,
                   "stream": true}),
        ),
    )
    .await;
    let events = named_sse_events(&bytes);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let k = names
        .iter()
        .filter(|n| **n == "response.function_call_arguments.delta")
        .count();
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
    ];
    expected.extend(std::iter::repeat_n(
        "response.function_call_arguments.delta",
        k,
    ));
    expected.extend([
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(names, expected);
    assert!(k > 1, "{names:?}");
    assert_eq!(events[2].1["item"]["name"], "get_weather");
    assert_eq!(events[2].1["item"]["arguments"], "");
    let pieces: String = events
        .iter()
        .filter(|(n, _)| n == "response.function_call_arguments.delta")
        .map(|(_, d)| d["delta"].as_str().expect("delta").to_string())
        .collect();
    assert_eq!(pieces, call["arguments"].as_str().expect("args"));
    let done = &events[names.len() - 2].1["item"];
    assert_eq!(done["arguments"], call["arguments"]);
    assert_eq!(done["status"], "completed");
    let (status, r) = post_json(
        &app,
        "/v1/responses",
        json!({"input": [{"role": "user", "content": ask}, call,
                         {"type": "function_call_output", "call_id": call["call_id"],
                          "output": "{\"temperature\": 31, \"sky\": \"sunny\"}"}],
               "tools": tools, "temperature": 0, "max_output_tokens": 40}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let answer = r["output"][0]["content"][0]["text"].as_str().expect("text");
    assert!(answer.to_lowercase().contains("sunny"), "{r}");

    for (body, param) in [
        (
            json!({"input": "x", "previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (json!({"instructions": "x"}), "input"),
        (
            json!({"input": "x", "max_output_tokens": 0}),
            "max_output_tokens",
        ),
        (
            json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "x",
                "schema": {"type": "string", "pattern": "(a)\\1"}}}}),
            "text.format",
        ),
        (
            json!({"input": "x", "tools": [{"type": "web_search"}]}),
            "tools[0].type",
        ),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
            "input[0].content",
        ),
        (
            json!({"input": "x", "tools": [{"type": "function", "name": "a b"}]}),
            "tools[0].name",
        ),
    ] {
        let (status, e) = post_json(&app, "/v1/responses", body.clone()).await;
        assert_error(status, &e, StatusCode::BAD_REQUEST, Some(param));
    }
}

/// Ollama's chat API: the same greedy text as the OpenAI chat route, streamed as
/// newline-delimited JSON (the pieces add up, the last line carries the counts), `format`,
/// tool calls with object arguments and their results, and the model-listing routes
/// Ollama clients call first.
#[tokio::test]
async fn ollama_chat_and_model_routes() {
    let app = app();
    let messages = json!([{"role": "user", "content": "Name three colours."}]);
    let (status, oai) = post_json(
        &app,
        "/v1/chat/completions",
        json!({"messages": messages, "max_tokens": 24, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{oai}");
    let want = oai["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    let body = json!({"model": "smollm2", "messages": messages,
                      "options": {"temperature": 0, "num_predict": 24}});
    let mut whole = body.clone();
    whole["stream"] = json!(false);
    let (status, v) = post_json(&app, "/api/chat", whole).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["message"], json!({"role": "assistant", "content": want}));
    assert_eq!(v["done"], true);
    assert_eq!(v["done_reason"], "length");
    assert_eq!(v["eval_count"], 24);
    assert_eq!(v["prompt_eval_count"], oai["usage"]["prompt_tokens"], "{v}");
    assert!(v["total_duration"].as_u64().expect("ns") > 0);
    // The prompt's time and the generation's, apart (tokens/s as Ollama clients show it).
    assert!(v["prompt_eval_duration"].as_u64().expect("ns") > 0, "{v}");
    assert!(v["eval_duration"].as_u64().expect("ns") > 0, "{v}");

    // Streamed by default.
    let (status, headers, bytes) = send(&app, post("/api/chat", body)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/x-ndjson");
    let lines = ndjson_lines(&bytes);
    let (last, pieces) = lines.split_last().expect("lines");
    assert!(pieces.len() > 3, "{lines:?}");
    assert!(pieces.iter().all(|p| p["done"] == false));
    let streamed: String = pieces
        .iter()
        .map(|l| l["message"]["content"].as_str().expect("piece"))
        .collect();
    assert_eq!(streamed, want);
    assert_eq!(last["done"], true);
    assert_eq!(last["message"]["content"], "");
    assert_eq!(last["eval_count"], 24);

    // `/api/generate` formats its prompt as the user's turn too, unless `raw`.
    let generate = json!({"prompt": "Name three colours.", "stream": false,
                          "options": {"temperature": 0, "num_predict": 24}});
    let (status, g) = post_json(&app, "/api/generate", generate.clone()).await;
    assert_eq!(status, StatusCode::OK, "{g}");
    assert_eq!(g["response"], want, "{g}");
    let mut raw = generate;
    raw["raw"] = json!(true);
    let (_, g) = post_json(&app, "/api/generate", raw).await;
    assert_ne!(g["response"], want, "{g}");

    // `format: "json"`.
    let (status, v) = post_json(
        &app,
        "/api/chat",
        json!({"messages": [{"role": "user", "content": "Give a person's name and age."}],
               "format": "json", "stream": false,
               "options": {"temperature": 0, "num_predict": 60}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let text = v["message"]["content"].as_str().expect("text");
    assert!(
        serde_json::from_str::<Value>(text).is_ok_and(|j| j.is_object()),
        "{text}"
    );

    // Tools (the call made sure with the `tool_choice` extension: this small model prefers
    // to talk): the call comes back with its arguments as an object, streamed whole; its
    // result goes back as a `tool` message.
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]);
    let ask = json!([{"role": "user", "content": "What is the weather like in Paris?"}]);
    let (status, v) = post_json(
        &app,
        "/api/chat",
        json!({"messages": ask, "tools": tools, "stream": false, "tool_choice": "required",
               "options": {"temperature": 0, "num_predict": 60}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let call = &v["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "get_weather", "{v}");
    assert_eq!(call["arguments"]["city"], "Paris", "{v}");
    assert_eq!(v["message"]["content"], "");
    let (_, _, bytes) = send(
        &app,
        post(
            "/api/chat",
            json!({"messages": ask, "tools": tools, "tool_choice": "required",
                   "options": {"temperature": 0, "num_predict": 60}}),
        ),
    )
    .await;
    let lines = ndjson_lines(&bytes);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(
        lines[0]["message"]["tool_calls"],
        v["message"]["tool_calls"]
    );
    assert_eq!(lines[1]["done"], true);
    // Left to choose, it talks: the text streams piece by piece once it shows it is text.
    let auto = json!({"messages": ask, "tools": tools, "options": {"temperature": 0,
                      "num_predict": 20}});
    let mut whole = auto.clone();
    whole["stream"] = json!(false);
    let (_, v_auto) = post_json(&app, "/api/chat", whole).await;
    let said = v_auto["message"]["content"].as_str().expect("text");
    assert!(
        !said.is_empty() && v_auto["message"].get("tool_calls").is_none(),
        "{v_auto}"
    );
    let (_, _, bytes) = send(&app, post("/api/chat", auto)).await;
    let lines = ndjson_lines(&bytes);
    assert!(lines.len() > 3, "{lines:?}");
    let streamed: String = lines
        .iter()
        .map(|l| l["message"]["content"].as_str().expect("piece"))
        .collect();
    assert_eq!(streamed, said);
    let mut turn = ask.as_array().expect("list").clone();
    turn.push(v["message"].clone());
    turn.push(
        json!({"role": "tool", "content": "{\"temperature\": 31, \"sky\": \"sunny\"}",
                     "tool_name": "get_weather"}),
    );
    let (status, v) = post_json(
        &app,
        "/api/chat",
        json!({"messages": turn, "tools": tools, "stream": false,
               "options": {"temperature": 0, "num_predict": 40}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let answer = v["message"]["content"].as_str().expect("text");
    eprintln!("after the result: {answer}");
    assert!(
        answer.to_lowercase().contains("sunny") || answer.contains("31"),
        "{v}"
    );

    // What Ollama clients ask first.
    let get = |path: &str| Request::get(path).body(Body::empty()).expect("request");
    let (status, _, bytes) = send(&app, get("/api/tags")).await;
    assert_eq!(status, StatusCode::OK);
    let tags: Value = serde_json::from_slice(&bytes).expect("JSON");
    assert_eq!(tags["models"][0]["name"], "smollm2", "{tags}");
    assert_eq!(tags["models"][0]["details"]["family"], "llama");
    // The file's own numbers: llama.cpp's file type, every tensor's values, its bytes.
    let details = &tags["models"][0]["details"];
    assert_eq!(details["format"], "gguf", "{tags}");
    assert_eq!(details["quantization_level"], "Q4_1", "{tags}");
    assert_eq!(details["parameter_size"], "134.52M", "{tags}");
    let size = std::fs::metadata(model_path()).expect("model file").len();
    assert_eq!(tags["models"][0]["size"], size, "{tags}");
    let (status, _, bytes) = send(&app, get("/api/ps")).await;
    assert_eq!(status, StatusCode::OK);
    let ps: Value = serde_json::from_slice(&bytes).expect("JSON");
    assert_eq!(ps["models"][0]["name"], "smollm2");
    let (status, _, bytes) = send(&app, get("/api/version")).await;
    assert_eq!(status, StatusCode::OK);
    let version: Value = serde_json::from_slice(&bytes).expect("JSON");
    assert!(version["version"].is_string());
    let (status, show) = post_json(&app, "/api/show", json!({"model": "smollm2"})).await;
    assert_eq!(status, StatusCode::OK, "{show}");
    assert_eq!(show["model_info"]["llama.context_length"], 8192, "{show}");
    assert_eq!(show["model_info"]["general.architecture"], "llama");
    assert!(show["template"]
        .as_str()
        .is_some_and(|t| t.contains("im_start")));
    assert_eq!(
        show["capabilities"],
        json!(["completion", "insert", "tools"])
    );
    // A thinking model (reasoning split) has Ollama's `thinking` capability.
    let mut thinking = new_loaded(EngineConfig::default());
    thinking.reasoning = true;
    let (app2, _) = app_with(ServerConfig::default(), Some(Arc::new(thinking)));
    let (_, show) = post_json(&app2, "/api/show", json!({"model": "smollm2"})).await;
    assert_eq!(
        show["capabilities"],
        json!(["completion", "insert", "tools", "thinking"])
    );
    // Served with another template: that one is shown.
    let (status, show) = post_json(&hermes_app(), "/api/show", json!({"model": "smollm2"})).await;
    assert_eq!(status, StatusCode::OK, "{show}");
    assert!(show["template"]
        .as_str()
        .is_some_and(|t| t.contains("<tool_call>")));

    // Errors: OpenAI-shaped, naming Ollama's fields.
    let (status, e) = post_json(&app, "/api/show", json!({"model": "nope"})).await;
    assert_error(status, &e, StatusCode::NOT_FOUND, Some("model"));
    for (body, param) in [
        (
            json!({"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}),
            "messages[0].images",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}],
                   "options": {"temperature": -1}}),
            "options.temperature",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "format": "yaml"}),
            "format",
        ),
        (json!({"messages": []}), "messages"),
        (
            json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
            "model",
        ),
    ] {
        let (status, e) = post_json(&app, "/api/chat", body.clone()).await;
        assert!(status.is_client_error(), "{body}: {status}");
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
    }
}

/// The tied head (`token_embd.weight`) of the default model, dequantized by candle's own GGUF
/// reader: `(vocab, hidden)` rows.
fn gguf_head() -> Vec<Vec<f32>> {
    use candle_core::quantized::gguf_file;
    let path = model_path();
    let mut f = std::fs::File::open(&path).expect("model file");
    let content = gguf_file::Content::read(&mut f).expect("gguf");
    content
        .tensor(&mut f, "token_embd.weight", &candle_core::Device::Cpu)
        .and_then(|t| t.dequantize(&candle_core::Device::Cpu))
        .and_then(|t| t.to_vec2::<f32>())
        .expect("token_embd.weight")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `/v1/embeddings`, Ollama's `/api/embed` and `/api/embeddings`: last-token embeddings that
/// the head turns into llama.cpp's next-token log-probabilities; unit length, the same alone
/// or together, from text or token ids, as floats or base64.
#[tokio::test]
async fn embeddings_openai_and_ollama() {
    let app = app();
    let llama = reference("llamacpp_q4_1.json");
    let capital = &llama["cases"]["capital"];
    let texts = [
        capital["prompt"].as_str().expect("prompt"),
        "The cat sat on the mat.",
        "A cat is sitting on a rug.",
        "Stock markets fell sharply today.",
    ];
    let (status, v) = post_json(&app, "/v1/embeddings", json!({"input": texts})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), texts.len());
    let vectors: Vec<Vec<f32>> = data
        .iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(
                (d["object"].as_str(), d["index"].as_u64()),
                (Some("embedding"), Some(i as u64))
            );
            floats(&d["embedding"])
        })
        .collect();
    for e in &vectors {
        assert_eq!(e.len(), 576);
        assert!((dot(e, e) - 1.0).abs() < 1e-4, "unit length");
    }
    let mut tokens = 0;
    for t in texts {
        let (_, ids) = post_json(&app, "/tokenize", json!({"content": t})).await;
        tokens += ids["tokens"].as_array().expect("tokens").len();
    }
    assert_eq!(v["usage"]["prompt_tokens"], tokens, "{v}");
    assert_eq!(v["usage"]["total_tokens"], tokens, "{v}");
    // Similar sentences lie closer than unrelated ones.
    assert!(dot(&vectors[1], &vectors[2]) > dot(&vectors[1], &vectors[3]));
    // Alone, from token ids, as base64: the same vector.
    for (body, what) in [
        (json!({"input": texts[0]}), "alone"),
        (json!({"input": u32s(&capital["prompt_ids"])}), "token ids"),
        (
            json!({"input": [u32s(&capital["prompt_ids"])], "model": "smollm2"}),
            "id lists",
        ),
    ] {
        let (status, one) = post_json(&app, "/v1/embeddings", body).await;
        assert_eq!(status, StatusCode::OK, "{one}");
        assert_eq!(floats(&one["data"][0]["embedding"]), vectors[0], "{what}");
    }
    let (_, b64) = post_json(
        &app,
        "/v1/embeddings",
        json!({"input": texts[0], "encoding_format": "base64"}),
    )
    .await;
    let text = b64["data"][0]["embedding"].as_str().expect("base64 text");
    let bytes = decode_base64(text);
    let from_b64: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(from_b64, vectors[0]);

    // The raw state (Ollama's older route) through the head: the first-step log-probabilities
    // of a completion of the prompt (and llama.cpp's, to its arithmetic's tolerance).
    let (status, raw) = post_json(
        &app,
        "/api/embeddings",
        json!({"model": "smollm2", "prompt": texts[0]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{raw}");
    let h = floats(&raw["embedding"]);
    let norm = dot(&h, &h).sqrt();
    for (a, b) in h.iter().zip(&vectors[0]) {
        assert!((a / norm - b).abs() < 1e-6);
    }
    // llama.cpp multiplies its Q8_0 head by the state quantized to 8 bits per 32 values
    // (q = round(x · 127 / max|x|), scale max|x| / 127 rounded to f16): the same here.
    let hq: Vec<f32> = h
        .chunks(32)
        .flat_map(|b| {
            let max = b.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = half::f16::from_f32(max / 127.0).to_f32();
            b.iter().map(move |x| {
                if max == 0.0 {
                    0.0
                } else {
                    (x * 127.0 / max).round_ties_even() * d
                }
            })
        })
        .collect();
    let logits: Vec<f32> = gguf_head().iter().map(|w| dot(w, &hq)).collect();
    let max = logits.iter().copied().fold(f32::MIN, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let (_, completion) = post_json(
        &app,
        "/v1/completions",
        json!({"prompt": texts[0], "max_tokens": 1, "temperature": 0, "logprobs": 5}),
    )
    .await;
    let served = &completion["choices"][0]["logprobs"]["top_logprobs"][0];
    let top = &capital["top5"][0];
    let mut compared = 0;
    for pair in top.as_array().expect("top5") {
        let id = pair[0].as_u64().expect("id") as usize;
        let want = pair[1].as_f64().expect("logprob") as f32;
        let ours = logits[id] - lse;
        let piece = &decode_ids(&app, &[id as u32]).await;
        eprintln!(
            "token {id} {piece:?}: {ours} (completion {}, llama.cpp {want})",
            served[piece]
        );
        // The last two of llama.cpp's five are 0.04 apart: ours may rank them otherwise.
        if let Some(lp) = served[piece].as_f64() {
            assert!(
                (ours - lp as f32).abs() < 1e-3,
                "token {id}: {ours} vs {lp}"
            );
            compared += 1;
        }
        assert!(
            (ours - want).abs() < 0.2 * want.abs().max(1.0),
            "token {id}: {ours} vs {want}"
        );
    }
    assert!(compared >= 3, "{served}");
    let argmax = (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .expect("vocabulary");
    assert_eq!(argmax as u64, top[0][0].as_u64().expect("id"));

    // Ollama's /api/embed: the same unit vectors.
    let (status, o) = post_json(
        &app,
        "/api/embed",
        json!({"model": "smollm2", "input": [texts[1], texts[2]]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{o}");
    let embs = o["embeddings"].as_array().expect("embeddings");
    assert_eq!(floats(&embs[0]), vectors[1]);
    assert_eq!(floats(&embs[1]), vectors[2]);
    assert!(
        o["prompt_eval_count"].as_u64().is_some_and(|n| n > 0),
        "{o}"
    );

    for (path, body, want, param) in [
        (
            "/v1/embeddings",
            json!({"input": ""}),
            StatusCode::BAD_REQUEST,
            Some("input"),
        ),
        (
            "/v1/embeddings",
            json!({"input": []}),
            StatusCode::BAD_REQUEST,
            Some("input"),
        ),
        (
            "/v1/embeddings",
            json!({}),
            StatusCode::BAD_REQUEST,
            Some("input"),
        ),
        (
            "/v1/embeddings",
            json!({"input": [1, "a"]}),
            StatusCode::BAD_REQUEST,
            Some("input"),
        ),
        (
            "/v1/embeddings",
            json!({"input": [99999999]}),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "/v1/embeddings",
            json!({"input": "a", "encoding_format": "int8"}),
            StatusCode::BAD_REQUEST,
            Some("encoding_format"),
        ),
        (
            "/v1/embeddings",
            json!({"input": "a", "dimensions": 64}),
            StatusCode::BAD_REQUEST,
            Some("dimensions"),
        ),
        (
            "/v1/embeddings",
            json!({"input": "a", "model": "nope"}),
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            "/api/embed",
            json!({"input": "a"}),
            StatusCode::BAD_REQUEST,
            Some("model"),
        ),
        (
            "/api/embeddings",
            json!({"model": "smollm2", "prompt": 3}),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
        ),
    ] {
        let (status, e) = post_json(&app, path, body.clone()).await;
        assert_error(status, &e, want, param);
        eprintln!("{path} {body}: {}", e["error"]["message"]);
    }
}

/// Standard base64 (the test's own decoder).
fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    for chunk in text.as_bytes().chunks(4) {
        let data: Vec<u8> = chunk.iter().copied().filter(|&c| c != b'=').collect();
        let n = data
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &c)| n | u32::from(value(c)) << (18 - 6 * i));
        for i in 0..data.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// The text of `ids` (`/detokenize`).
async fn decode_ids(app: &Router, ids: &[u32]) -> String {
    let (status, v) = post_json(app, "/detokenize", json!({"tokens": ids})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["content"].as_str().expect("content").to_string()
}

/// A body-less request (`GET`, `DELETE`) and its JSON answer.
async fn call(app: &Router, method: &str, path: &str) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .body(Body::empty())
        .expect("request");
    let (status, _, bytes) = send(app, req).await;
    (status, serde_json::from_slice(&bytes).expect("JSON"))
}

/// Stored responses: `previous_response_id` continues a conversation with exactly the tokens
/// of the whole conversation sent at once; `GET`, `input_items`, `DELETE`; `store: false`
/// keeps nothing; a streamed response is kept as its `response.completed` says.
#[tokio::test]
async fn responses_are_stored_and_continued() {
    let app = app();
    let first = json!({"instructions": "Answer briefly.", "input": "My name is Ada. What is 2+2?",
                       "max_output_tokens": 20, "temperature": 0});
    let (status, r1) = post_json(&app, "/v1/responses", first.clone()).await;
    assert_eq!(status, StatusCode::OK, "{r1}");
    assert_eq!(r1["store"], true);
    let id1 = r1["id"].as_str().expect("id").to_string();
    let answer1 = r1["output"][0]["content"][0]["text"]
        .as_str()
        .expect("text");
    let (status, r2) = post_json(
        &app,
        "/v1/responses",
        json!({"instructions": "Answer briefly.", "input": "What is my name?",
               "previous_response_id": id1, "max_output_tokens": 20, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{r2}");
    assert_eq!(r2["previous_response_id"], id1.as_str());
    let (_, chat) = post_json(
        &app,
        "/v1/chat/completions",
        json!({"messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "My name is Ada. What is 2+2?"},
            {"role": "assistant", "content": answer1},
            {"role": "user", "content": "What is my name?"}],
            "max_tokens": 20, "temperature": 0}),
    )
    .await;
    eprintln!("second answer: {}", r2["output"][0]["content"][0]["text"]);
    assert_eq!(
        r2["output"][0]["content"][0]["text"], chat["choices"][0]["message"]["content"],
        "{r2}"
    );
    assert_eq!(r2["usage"]["input_tokens"], chat["usage"]["prompt_tokens"]);

    let (status, got) = call(&app, "GET", &format!("/v1/responses/{id1}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got, r1);
    let id2 = r2["id"].as_str().expect("id");
    let (_, items) = call(
        &app,
        "GET",
        &format!("/v1/responses/{id2}/input_items?order=asc"),
    )
    .await;
    let data = items["data"].as_array().expect("data");
    assert_eq!(data.len(), 3, "{items}");
    assert_eq!(data[0]["content"], "My name is Ada. What is 2+2?");
    assert_eq!(data[1], r1["output"][0]);
    assert_eq!(data[2]["content"], "What is my name?");
    assert_eq!(items["first_id"], data[0]["id"]);
    let (_, desc) = call(&app, "GET", &format!("/v1/responses/{id2}/input_items")).await;
    assert_eq!(desc["data"][0], data[2], "newest first by default");

    // Deleted: gone, but the conversation continued from it keeps its own copy.
    let (status, d) = call(&app, "DELETE", &format!("/v1/responses/{id1}")).await;
    assert_eq!(status, StatusCode::OK, "{d}");
    assert_eq!(d, json!({"id": id1, "object": "response", "deleted": true}));
    for (method, path) in [("GET", &id1), ("DELETE", &id1)] {
        let (status, e) = call(&app, method, &format!("/v1/responses/{path}")).await;
        assert_error(status, &e, StatusCode::NOT_FOUND, None);
    }
    let (status, r3) = post_json(
        &app,
        "/v1/responses",
        json!({"input": "Thanks.", "previous_response_id": id2, "max_output_tokens": 4}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{r3}");

    // Not stored: nothing to read or continue.
    let mut unstored = first.clone();
    unstored["store"] = json!(false);
    let (_, r) = post_json(&app, "/v1/responses", unstored).await;
    assert_eq!(r["store"], false);
    let id = r["id"].as_str().expect("id");
    let (status, e) = call(&app, "GET", &format!("/v1/responses/{id}")).await;
    assert_error(status, &e, StatusCode::NOT_FOUND, None);
    let (status, e) = post_json(
        &app,
        "/v1/responses",
        json!({"input": "x", "previous_response_id": id}),
    )
    .await;
    assert_error(
        status,
        &e,
        StatusCode::BAD_REQUEST,
        Some("previous_response_id"),
    );
    let (status, e) = post_json(&app, "/v1/responses", json!({"input": "x", "store": "yes"})).await;
    assert_error(status, &e, StatusCode::BAD_REQUEST, Some("store"));

    // Streamed, then read back.
    let mut streamed = first;
    streamed["stream"] = json!(true);
    let (_, _, bytes) = send(&app, post("/v1/responses", streamed)).await;
    let events = named_sse_events(&bytes);
    let (_, done) = events.last().expect("events");
    let id = done["response"]["id"].as_str().expect("id");
    let (status, got) = call(&app, "GET", &format!("/v1/responses/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got, done["response"]);
}

/// With a data directory, stored responses survive a restart: a new server on the same
/// directory reads them back, continues them and deletes them for good.
#[tokio::test]
async fn stored_responses_survive_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let server = || {
        let (app, state) = app_with(ServerConfig::default(), Some(shared_loaded()));
        state
            .keep_responses_in(&dir.path().join("responses"))
            .expect("store");
        app
    };
    let before = server();
    let (status, r1) = post_json(
        &before,
        "/v1/responses",
        json!({"input": "My name is Ada. What is 2+2?", "max_output_tokens": 12,
               "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{r1}");
    let id1 = r1["id"].as_str().expect("id").to_string();
    let follow = json!({"input": "What is my name?", "previous_response_id": id1,
                        "max_output_tokens": 12, "temperature": 0});
    let (_, expected) = post_json(&before, "/v1/responses", follow.clone()).await;
    drop(before);

    let after = server();
    let (status, got) = call(&after, "GET", &format!("/v1/responses/{id1}")).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got, r1);
    let (status, r2) = post_json(&after, "/v1/responses", follow).await;
    assert_eq!(status, StatusCode::OK, "{r2}");
    assert_eq!(r2["output"][0]["content"], expected["output"][0]["content"]);
    let (status, _) = call(&after, "DELETE", &format!("/v1/responses/{id1}")).await;
    assert_eq!(status, StatusCode::OK);
    drop(after);

    let again = server();
    let (status, e) = call(&again, "GET", &format!("/v1/responses/{id1}")).await;
    assert_error(status, &e, StatusCode::NOT_FOUND, None);
}

/// llama.cpp's `json.gbnf`, a recursive grammar.
const JSON_GBNF: &str = include_str!("grammars/json.gbnf");

/// Whether `t` is an arithmetic expression of the grammar below (numbers, `+ - * /`,
/// parentheses), checked by hand.
fn is_expression(t: &str) -> bool {
    fn expr(b: &[u8], i: &mut usize) -> bool {
        loop {
            if !factor(b, i) {
                return false;
            }
            match b.get(*i) {
                Some(b'+' | b'-' | b'*' | b'/') => *i += 1,
                _ => return true,
            }
        }
    }
    fn factor(b: &[u8], i: &mut usize) -> bool {
        if b.get(*i) == Some(&b'(') {
            *i += 1;
            if !expr(b, i) || b.get(*i) != Some(&b')') {
                return false;
            }
            *i += 1;
            return true;
        }
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    }
    let mut i = 0;
    expr(t.as_bytes(), &mut i) && i == t.len()
}

/// Recursive GBNF (llama.cpp's `json.gbnf`, an arithmetic grammar): the answers are what
/// the grammars allow, greedy and sampled, and end there.
#[tokio::test]
async fn recursive_gbnf_grammars_shape_the_answer() {
    let app = app();
    let ask = "Ada Lovelace was born in 1815 in London. Give her name, birth year and city \
               as JSON.";
    for (seed, temperature) in [(0, 0.0), (1, 0.8), (3, 0.8), (4, 0.8)] {
        let (status, v) = post_json(
            &app,
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": ask}], "grammar": JSON_GBNF,
                   "max_tokens": 200, "temperature": temperature, "seed": seed}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let t = v["choices"][0]["message"]["content"]
            .as_str()
            .expect("text");
        eprintln!("json.gbnf: {t:?}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        let parsed: Value = serde_json::from_str(t).unwrap_or_else(|e| panic!("{e}: {t:?}"));
        assert!(parsed.is_object(), "{t:?}");
    }
    let arithmetic = "root ::= expr \" = \" [0-9]+\nexpr ::= term ((\"+\" | \"-\") term)*\n\
                      term ::= factor ((\"*\" | \"/\") factor)*\n\
                      factor ::= [0-9]+ | \"(\" expr \")\"\n";
    let (status, v) = post_json(
        &app,
        "/completion",
        json!({"prompt": "2+3 = 5\n4*(1+2) = 12\n7*(12+5) = 119\n(8-3)*(2+2) = 20\n",
               "grammar": arithmetic, "n_predict": 32, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let t = v["content"].as_str().expect("content");
    eprintln!("arithmetic: {t:?}");
    let (expression, value) = t.split_once(" = ").expect("` = `");
    assert!(is_expression(expression), "{t:?}");
    assert!(value.bytes().all(|b| b.is_ascii_digit()), "{t:?}");
    assert_eq!(v["stop_type"], "eos", "{v}");
    assert!(!is_expression("(1+2") && !is_expression("1+") && is_expression("7*(12+5)"));
}

/// GBNF grammars (llama.cpp's `grammar` on `/completion`, and on the OpenAI routes with vLLM's
/// `guided_grammar`): the answer is what the grammar allows, whole; left-recursive ones are a
/// 400.
#[tokio::test]
async fn gbnf_grammars_shape_the_answer() {
    let app = app();
    let grammar = "root ::= answer \", because \" reason \".\"\n\
                   answer ::= \"yes\" | \"no\"\n\
                   reason ::= [a-z ]{3,60}";
    let whole = regex::Regex::new("^(yes|no), because [a-z ]{3,60}\\.$").expect("regex");
    let question = "Is the sky blue? Answer yes or no and say why.";
    let (status, v) = post_json(
        &app,
        "/completion",
        json!({"prompt": question, "grammar": grammar, "n_predict": 40, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let t = v["content"].as_str().expect("content");
    eprintln!("/completion: {t:?}");
    assert!(whole.is_match(t), "{t:?}");
    assert_eq!(v["stop_type"], "eos", "{v}");
    for (seed, temperature) in [(0, 0.0), (1, 1.2), (2, 1.2)] {
        let (status, v) = post_json(
            &app,
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": question}],
                   "guided_grammar": grammar, "max_tokens": 40,
                   "temperature": temperature, "seed": seed}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let t = v["choices"][0]["message"]["content"]
            .as_str()
            .expect("text");
        eprintln!("chat: {t:?}");
        assert!(whole.is_match(t), "{t:?}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    }
    let (status, v) = post_json(
        &app,
        "/v1/completions",
        json!({"prompt": "Three fruits:\n", "grammar": "root ::= (\"- \" [A-Za-z]+ \"\\n\"){3}",
               "max_tokens": 30, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let t = v["choices"][0]["text"].as_str().expect("text");
    eprintln!("list: {t:?}");
    assert!(
        regex::Regex::new("^(- [A-Za-z]+\n){3}$")
            .expect("regex")
            .is_match(t),
        "{t:?}"
    );
    for (path, body, param) in [
        (
            "/v1/completions",
            json!({"prompt": "x", "grammar": "root ::= root \"a\" | \"b\""}),
            "grammar",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "guided_grammar": 1}),
            "guided_grammar",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "grammar": "root ::= \"a\"", "guided_regex": "a"}),
            "grammar",
        ),
        (
            "/completion",
            json!({"prompt": "x", "grammar": "root ::= missing"}),
            "grammar",
        ),
        (
            "/completion",
            json!({"prompt": "x", "grammar": "root ::= \"a\"", "json_schema": {}}),
            "grammar",
        ),
    ] {
        let (status, e) = post_json(&app, path, body.clone()).await;
        eprintln!("{path} {body}: {}", e["error"]["message"]);
        assert_error(status, &e, StatusCode::BAD_REQUEST, Some(param));
    }
}
