//! OpenAI's Batch API on the real model (router `oneshot`, batches running in the background):
//! a file of chat requests comes back as an output file whose answers equal the same requests
//! sent live, refused requests in the error file, usage added up; invalid files and requests
//! get OpenAI's errors; cancelling stops a batch; a batch a crash left half done goes on from
//! its results after a restart, and one past its window ends expired.

mod common;

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use common::*;
use http_body_util::BodyExt;
use nextoken::engine::{EngineConfig, EngineHandle};
use nextoken::files::FileStore;
use nextoken::server::{self, AppState, Loaded, ServerConfig};
use serde_json::{json, Value};
use tower::ServiceExt;

fn loaded() -> Arc<Loaded> {
    static CELL: OnceLock<Arc<Loaded>> = OnceLock::new();
    CELL.get_or_init(|| {
        let (model, tokenizer) = nextoken::load(&model_path()).expect("model loads");
        let eos = model.config().eos_token_ids.clone();
        let engine = EngineHandle::spawn(model, EngineConfig::default()).expect("engine");
        Arc::new(
            Loaded::new(engine, tokenizer, "smollm2".into(), eos, Default::default())
                .expect("loaded"),
        )
    })
    .clone()
}

/// A server over `dir` whose batches run `concurrency` requests at a time.
fn app_in(dir: &Path, concurrency: usize) -> Router {
    app_over(loaded(), dir, concurrency)
}

fn app_over(loaded: Arc<Loaded>, dir: &Path, concurrency: usize) -> Router {
    let state = AppState::new(ServerConfig::default());
    state.set_files(FileStore::open(dir).expect("file store"));
    state.set_loaded(loaded);
    state.open_batches(dir, concurrency).expect("batches");
    server::router(state)
}

async fn upload(app: &Router, purpose: &str, content: &str) -> String {
    let req = file_upload("in.jsonl", purpose, content);
    let resp = app.clone().oneshot(req).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let v: Value = serde_json::from_slice(&bytes).expect("json");
    v["id"].as_str().expect("file id").to_string()
}

fn jsonl(lines: &[Value]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

fn chat_line(id: &str, body: Value) -> Value {
    json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": body})
}

fn question(q: &str, max_tokens: u32) -> Value {
    json!({"model": "smollm2", "messages": [{"role": "user", "content": q}],
           "max_tokens": max_tokens, "temperature": 0})
}

async fn create(app: &Router, file: &str, endpoint: &str) -> (StatusCode, Value) {
    call(
        app,
        "POST",
        "/v1/batches",
        Some(
            json!({"input_file_id": file, "endpoint": endpoint, "completion_window": "24h",
                    "metadata": {"purpose": "test"}}),
        ),
    )
    .await
}

/// Polls a batch until it stops changing status (terminal) or `done` says so.
async fn wait_for(app: &Router, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, b) = call(app, "GET", &format!("/v1/batches/{id}"), None).await;
        assert_eq!(status, StatusCode::OK, "{b}");
        if done(&b) {
            return b;
        }
        assert!(Instant::now() < deadline, "batch never got there: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn terminal(b: &Value) -> bool {
    ["completed", "failed", "expired", "cancelled"].contains(&b["status"].as_str().unwrap_or(""))
}

async fn content_lines(app: &Router, file: &Value) -> Vec<Value> {
    let file = file.as_str().expect("a file id");
    let req = Request::get(format!("/v1/files/{file}/content"))
        .body(Body::empty())
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    std::str::from_utf8(&bytes)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("line JSON"))
        .collect()
}

#[tokio::test]
async fn a_batch_answers_as_live_requests_do() {
    let dir = tempfile::tempdir().expect("tmp");
    let app = app_in(dir.path(), 3);
    let questions = [
        "What is the capital of France?",
        "Name a colour.",
        "Say hello.",
        "What is 2 + 2?",
        "Name a fruit.",
    ];
    let mut lines: Vec<Value> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| chat_line(&format!("q{i}"), question(q, 12)))
        .collect();
    // Refused by the route itself: it goes to the error file with the route's answer.
    let refused = json!({"model": "smollm2", "messages": [], "max_tokens": 4});
    lines.insert(2, chat_line("refused", refused.clone()));
    let file = upload(&app, "batch", &jsonl(&lines)).await;
    let (status, batch) = create(&app, &file, "/v1/chat/completions").await;
    assert_eq!(status, StatusCode::OK, "{batch}");
    assert_eq!(batch["object"], "batch");
    assert_eq!(batch["status"], "validating");
    assert_eq!(batch["metadata"], json!({"purpose": "test"}));
    let created = batch["created_at"].as_u64().expect("created_at");
    assert_eq!(batch["expires_at"].as_u64(), Some(created + 86_400));
    let id = batch["id"].as_str().expect("id").to_string();
    assert!(id.starts_with("batch_"), "{id}");

    let done = wait_for(&app, &id, terminal).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 6, "completed": 5, "failed": 1})
    );
    for stamp in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert!(done[stamp].as_u64().is_some_and(|t| t >= created), "{done}");
    }
    assert_eq!(done["failed_at"], Value::Null);

    // The output file: the five answers in input order, each equal to the live answer.
    let out = content_lines(&app, &done["output_file_id"]).await;
    let ids: Vec<&str> = out.iter().filter_map(|l| l["custom_id"].as_str()).collect();
    assert_eq!(ids, ["q0", "q1", "q2", "q3", "q4"]);
    let (mut prompt, mut completion) = (0, 0);
    for (line, q) in out.iter().zip(questions) {
        assert_eq!(line["error"], Value::Null, "{line}");
        assert!(line["id"].as_str().is_some_and(|s| !s.is_empty()));
        let response = &line["response"];
        assert_eq!(response["status_code"], 200, "{line}");
        assert!(response["request_id"].is_string(), "{line}");
        let body = &response["body"];
        assert_eq!(body["object"], "chat.completion", "{line}");
        let (status, live) =
            call(&app, "POST", "/v1/chat/completions", Some(question(q, 12))).await;
        assert_eq!(status, StatusCode::OK, "{live}");
        assert_eq!(body["choices"], live["choices"], "{q}");
        assert_eq!(
            body["usage"]["prompt_tokens"],
            live["usage"]["prompt_tokens"]
        );
        assert_eq!(
            body["usage"]["completion_tokens"],
            live["usage"]["completion_tokens"]
        );
        prompt += live["usage"]["prompt_tokens"].as_u64().expect("usage");
        completion += live["usage"]["completion_tokens"].as_u64().expect("usage");
    }
    assert_eq!(done["usage"]["input_tokens"], prompt, "{done}");
    assert_eq!(done["usage"]["output_tokens"], completion, "{done}");
    assert_eq!(done["usage"]["total_tokens"], prompt + completion, "{done}");

    // The error file: the refused request with the route's own status and error body.
    let errors = content_lines(&app, &done["error_file_id"]).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    let (status, live) = call(&app, "POST", "/v1/chat/completions", Some(refused)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(errors[0]["custom_id"], "refused");
    assert_eq!(errors[0]["response"]["status_code"], 400);
    assert_eq!(errors[0]["response"]["body"], live);

    // The result files are listed with purpose batch_output.
    let (_, files) = call(&app, "GET", "/v1/files?purpose=batch_output", None).await;
    let listed: Vec<&Value> = files["data"].as_array().expect("list").iter().collect();
    assert_eq!(listed.len(), 2, "{files}");
    assert!(listed.iter().any(|f| f["id"] == done["output_file_id"]));

    // A finished batch cannot be cancelled.
    let (status, v) = call(&app, "POST", &format!("/v1/batches/{id}/cancel"), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("completed")));
}

#[tokio::test]
async fn bad_batches_get_openai_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let app = app_in(dir.path(), 2);
    let good = jsonl(&[chat_line("a", question("Hi", 2))]);
    let batch_file = upload(&app, "batch", &good).await;
    let tune_file = upload(&app, "fine-tune", &good).await;
    let cases = [
        (
            json!({"input_file_id": batch_file, "endpoint": "/v1/images", "completion_window": "24h"}),
            StatusCode::BAD_REQUEST,
            "endpoint",
        ),
        (
            json!({"input_file_id": batch_file, "endpoint": "/v1/completions", "completion_window": "1h"}),
            StatusCode::BAD_REQUEST,
            "completion_window",
        ),
        (
            json!({"input_file_id": "file-nope", "endpoint": "/v1/completions", "completion_window": "24h"}),
            StatusCode::BAD_REQUEST,
            "input_file_id",
        ),
        (
            json!({"input_file_id": tune_file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
            StatusCode::BAD_REQUEST,
            "input_file_id",
        ),
        (
            json!({"input_file_id": batch_file, "endpoint": "/v1/completions", "completion_window": "24h",
                   "metadata": {"k": 5}}),
            StatusCode::BAD_REQUEST,
            "metadata",
        ),
    ];
    for (body, want, param) in cases {
        let (status, v) = call(&app, "POST", "/v1/batches", Some(body.clone())).await;
        assert_eq!(
            (status, &v["error"]["param"]),
            (want, &json!(param)),
            "{body} → {v}"
        );
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    let (status, v) = call(&app, "GET", "/v1/batches/batch_nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");

    // A file whose second line names another route fails validation, line by line.
    let mixed = jsonl(&[
        chat_line("a", question("Hi", 2)),
        json!({"custom_id": "b", "method": "POST", "url": "/v1/completions",
               "body": {"prompt": "Hi"}}),
        chat_line("a", question("Hi", 2)),
    ]);
    let file = upload(&app, "batch", &mixed).await;
    let (_, batch) = create(&app, &file, "/v1/chat/completions").await;
    let done = wait_for(&app, batch["id"].as_str().expect("id"), terminal).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(done["failed_at"].is_u64(), "{done}");
    assert_eq!(done["output_file_id"], Value::Null);
    let errors = done["errors"]["data"].as_array().expect("errors");
    let got: Vec<(&Value, &Value)> = errors.iter().map(|e| (&e["code"], &e["line"])).collect();
    assert_eq!(
        got,
        [
            (&json!("invalid_url"), &json!(2)),
            (&json!("duplicate_custom_id"), &json!(3))
        ]
    );
}

#[tokio::test]
async fn cancelling_stops_a_batch_and_keeps_what_was_answered() {
    let dir = tempfile::tempdir().expect("tmp");
    let app = app_in(dir.path(), 1);
    let lines: Vec<Value> = (0..12)
        .map(|i| {
            json!({"custom_id": format!("c{i}"), "method": "POST", "url": "/v1/completions",
                   "body": {"model": "smollm2", "prompt": format!("Story number {i}:"),
                            "max_tokens": 48, "ignore_eos": true, "temperature": 0}})
        })
        .collect();
    let file = upload(&app, "batch", &jsonl(&lines)).await;
    let (_, batch) = create(&app, &file, "/v1/completions").await;
    let id = batch["id"].as_str().expect("id").to_string();
    wait_for(&app, &id, |b| {
        b["request_counts"]["completed"].as_u64() >= Some(1)
    })
    .await;
    let (status, v) = call(&app, "POST", &format!("/v1/batches/{id}/cancel"), None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(
        ["cancelling", "cancelled"].contains(&v["status"].as_str().unwrap_or("")),
        "{v}"
    );
    assert!(v["cancelling_at"].is_u64(), "{v}");
    let done = wait_for(&app, &id, terminal).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    let answered = done["request_counts"]["completed"].as_u64().expect("count");
    assert!((1..12).contains(&answered), "{done}");
    assert_eq!(done["request_counts"]["failed"], 0, "{done}");
    let out = content_lines(&app, &done["output_file_id"]).await;
    assert_eq!(out.len() as u64, answered);
    for line in &out {
        assert_eq!(
            line["response"]["body"]["usage"]["completion_tokens"], 48,
            "{line}"
        );
    }
    // Cancelling again answers the batch as it is.
    let (status, again) = call(&app, "POST", &format!("/v1/batches/{id}/cancel"), None).await;
    assert_eq!(
        (status, &again["status"]),
        (StatusCode::OK, &json!("cancelled"))
    );
    // The engine is free again: nothing of the cancelled batch is left running.
    let deadline = Instant::now() + Duration::from_secs(10);
    while loaded().engine.stats().num_running > 0 {
        assert!(Instant::now() < deadline, "requests left running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a crash leaves: the batch record in `status` and the results of the requests answered
/// before it (here one, with a made-up answer that a re-run could not produce).
fn crashed_batch(dir: &Path, file: &str, id: &str, status: &str, expires_at: u64) {
    let batches = dir.join("batches");
    std::fs::create_dir_all(&batches).expect("dir");
    let record = json!({
        "id": id, "endpoint": "/v1/completions", "input_file_id": file,
        "completion_window": "24h", "status": status, "output_file_id": null,
        "error_file_id": null, "errors": null, "created_at": 1, "expires_at": expires_at,
        "in_progress_at": 2, "finalizing_at": null, "completed_at": null, "failed_at": null,
        "expired_at": null, "cancelling_at": null, "cancelled_at": null,
        "request_counts": {"total": 3, "completed": 0, "failed": 0},
        "usage": {"input_tokens": 0, "cached_tokens": 0, "output_tokens": 0,
                  "reasoning_tokens": 0},
        "metadata": null,
    });
    std::fs::write(batches.join(format!("{id}.json")), record.to_string()).expect("record");
    let answered = json!({"line": 1, "custom_id": "r0", "status_code": 200,
                          "body": {"marker": "answered before the crash"}});
    std::fs::write(
        batches.join(format!("{id}.results.jsonl")),
        format!("{answered}\n{{\"line\": 2, \"cust"),
    )
    .expect("results");
}

#[tokio::test]
async fn batches_go_on_after_a_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let lines: Vec<Value> = (0..3)
        .map(|i| {
            json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/v1/completions",
                   "body": {"model": "smollm2", "prompt": format!("Count to {i}:"),
                            "max_tokens": 6, "temperature": 0}})
        })
        .collect();
    let file = {
        let files = FileStore::open(dir.path()).expect("files");
        files
            .upload("in.jsonl", "batch", jsonl(&lines).as_bytes())
            .expect("upload")
            .id
    };
    let far = 4_000_000_000;
    crashed_batch(dir.path(), &file, "batch_running", "in_progress", far);
    crashed_batch(dir.path(), &file, "batch_cancelling", "cancelling", far);
    crashed_batch(dir.path(), &file, "batch_late", "in_progress", 3);
    // Finalizing when the server stopped, every request answered, the window since passed.
    crashed_batch(dir.path(), &file, "batch_answered", "finalizing", 3);
    let all: String = (1..=3)
        .map(|n| {
            format!(
                "{}\n",
                json!({"line": n, "custom_id": format!("r{}", n - 1),
                                         "status_code": 200, "body": {"n": n}})
            )
        })
        .collect();
    std::fs::write(dir.path().join("batches/batch_answered.results.jsonl"), all).expect("results");

    let app = app_in(dir.path(), 2);
    // Running: the answered request is kept as it was, the torn one and the rest run now.
    let done = wait_for(&app, "batch_running", terminal).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 3, "completed": 3, "failed": 0})
    );
    let out = content_lines(&app, &done["output_file_id"]).await;
    let ids: Vec<&str> = out.iter().filter_map(|l| l["custom_id"].as_str()).collect();
    assert_eq!(ids, ["r0", "r1", "r2"]);
    assert_eq!(
        out[0]["response"]["body"]["marker"],
        "answered before the crash"
    );
    for (line, body) in out.iter().zip(&lines).skip(1) {
        let (_, live) = call(&app, "POST", "/v1/completions", Some(body["body"].clone())).await;
        assert_eq!(
            line["response"]["body"]["choices"], live["choices"],
            "{line}"
        );
    }
    assert!(!dir
        .path()
        .join("batches/batch_running.results.jsonl")
        .exists());

    // Cancelling: ends cancelled with what was answered; nothing more runs.
    let done = wait_for(&app, "batch_cancelling", terminal).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(done["request_counts"]["completed"], 1, "{done}");

    // Past its window: expired, the unrun requests in the error file as batch_expired.
    let done = wait_for(&app, "batch_late", terminal).await;
    assert_eq!(done["status"], "expired", "{done}");
    assert!(done["expired_at"].is_u64(), "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 3, "completed": 1, "failed": 2})
    );
    let errors = content_lines(&app, &done["error_file_id"]).await;
    let got: Vec<(&Value, &Value)> = errors
        .iter()
        .map(|e| (&e["custom_id"], &e["error"]["code"]))
        .collect();
    assert_eq!(
        got,
        [
            (&json!("r1"), &json!("batch_expired")),
            (&json!("r2"), &json!("batch_expired"))
        ]
    );
    assert_eq!(errors[0]["response"], Value::Null);

    // Late, but nothing was left to run: completed.
    let done = wait_for(&app, "batch_answered", terminal).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["error_file_id"], Value::Null, "{done}");
    let out = content_lines(&app, &done["output_file_id"]).await;
    let ns: Vec<&Value> = out.iter().map(|l| &l["response"]["body"]["n"]).collect();
    assert_eq!(ns, [&json!(1), &json!(2), &json!(3)]);

    // Listing: newest first (ids sort by creation), pages by `after`.
    let (_, page) = call(&app, "GET", "/v1/batches?limit=2", None).await;
    let ids: Vec<&str> = page["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|b| b["id"].as_str())
        .collect();
    assert_eq!(ids, ["batch_running", "batch_late"], "{page}");
    assert_eq!(page["has_more"], true);
    let (_, rest) = call(&app, "GET", "/v1/batches?after=batch_late", None).await;
    let ids: Vec<&str> = rest["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|b| b["id"].as_str())
        .collect();
    assert_eq!(ids, ["batch_cancelling", "batch_answered"], "{rest}");
    assert_eq!(rest["has_more"], false);
}

/// An engine that admits two requests (one running, one waiting) and a batch that runs four
/// at a time: the refused ones (429) wait their turn instead of failing.
#[tokio::test]
async fn a_full_queue_is_waited_out() {
    let (model, tokenizer) = nextoken::load(&model_path()).expect("model loads");
    let eos = model.config().eos_token_ids.clone();
    let config = EngineConfig {
        max_running_seqs: 1,
        max_waiting: 1,
        ..EngineConfig::default()
    };
    let engine = EngineHandle::spawn(model, config).expect("engine");
    let small = Arc::new(
        Loaded::new(engine, tokenizer, "smollm2".into(), eos, Default::default()).expect("loaded"),
    );
    let dir = tempfile::tempdir().expect("tmp");
    let app = app_over(small, dir.path(), 4);
    let lines: Vec<Value> = (0..6)
        .map(|i| chat_line(&format!("w{i}"), question(&format!("Count to {i}."), 6)))
        .collect();
    let file = upload(&app, "batch", &jsonl(&lines)).await;
    let (_, batch) = create(&app, &file, "/v1/chat/completions").await;
    let done = wait_for(&app, batch["id"].as_str().expect("id"), terminal).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 6, "completed": 6, "failed": 0})
    );
    assert_eq!(done["error_file_id"], Value::Null, "{done}");
    // Live requests to the same full engine get the 429 the batch waited out.
    let busy: Vec<_> = (0..4)
        .map(|_| {
            call(
                &app,
                "POST",
                "/v1/chat/completions",
                Some(question("Hi", 16)),
            )
        })
        .collect();
    let statuses: Vec<StatusCode> = futures::future::join_all(busy)
        .await
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
}
