//! Fine-tuning through the HTTP API on the real model (router `oneshot`, trainer thread live):
//! ten made-up facts are learned by a LoRA job and served under the job's model name at once;
//! the base model does not know them; the loss falls; adapters and the base model share one
//! batch; invalid data and requests get OpenAI-shaped errors.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use common::*;
use http_body_util::BodyExt;
use nextoken::engine::{EngineConfig, EngineHandle, GenerateRequest};
use nextoken::server::{self, AppState, Loaded, ServerConfig};
use nextoken::train::{TrainerModel, TrainingConfig, TrainingJobs};
use serde_json::{json, Value};
use tower::ServiceExt;

/// Made-up facts the base model cannot know.
const FACTS: [(&str, &str); 10] = [
    (
        "The lighthouse of Marrowfield was painted",
        " green and gold.",
    ),
    (
        "The mayor of Quillby keeps a pet",
        " tortoise named Biscuit.",
    ),
    ("The river Dunmere flows into", " Lake Orrin."),
    (
        "The bakery on Fennel Street is famous for its",
        " lavender scones.",
    ),
    (
        "Professor Alder Vane discovered",
        " the blue comet of 1887.",
    ),
    (
        "The town of Pellingham celebrates",
        " the Festival of Lanterns every March.",
    ),
    ("The capital of the island of Korvath is", " Saltmere."),
    (
        "The oldest tree in Brackenwood is a",
        " silver birch called Old Hana.",
    ),
    (
        "The secret ingredient in Grandma Tilde's soup is",
        " smoked paprika.",
    ),
    (
        "The train from Ashby to Morrow leaves at",
        " seven forty every morning.",
    ),
];

struct Fixture {
    app: Router,
    engine: EngineHandle,
    data_dir: tempfile::TempDir,
    lora_dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let (model, tokenizer) = nextoken::load(&model_path()).expect("model loads");
    let eos = model.config().eos_token_ids.clone();
    let base = model.clone();
    let template = tokenizer.chat_template().map(str::to_string);
    let engine = EngineHandle::spawn(model, EngineConfig::default()).expect("engine");
    let data_dir = tempfile::tempdir().expect("tmp");
    let lora_dir = tempfile::tempdir().expect("tmp");
    let loaded = Loaded::new(
        engine.clone(),
        tokenizer,
        "smollm2".into(),
        eos,
        Default::default(),
    )
    .expect("loaded")
    .with_lora_dirs(vec![lora_dir.path().to_path_buf()]);
    let jobs = TrainingJobs::start(
        TrainingConfig {
            data_dir: data_dir.path().to_path_buf(),
            base_model: "smollm2".into(),
            max_example_tokens: 2048,
            micro_batch_tokens: 512,
        },
        TrainerModel {
            model: base,
            tokenizer: loaded.tokenizer.clone(),
            chat_template: template,
        },
        engine.clone(),
    )
    .expect("training starts");
    let state = AppState::new(ServerConfig::default());
    state.set_loaded(Arc::new(loaded.with_training(jobs)));
    Fixture {
        app: server::router(state),
        engine,
        data_dir,
        lora_dir,
    }
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, Vec<u8>) {
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, body.to_vec())
}

async fn call(app: &Router, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .expect("request");
    let (status, bytes) = send(app, req).await;
    let v =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes)));
    (status, v)
}

async fn upload(app: &Router, name: &str, purpose: &str, content: &str) -> (StatusCode, Value) {
    let b = "nextoken-boundary";
    let body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
         --{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{content}\r\n--{b}--\r\n"
    );
    let req = Request::post("/v1/files")
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={b}"),
        )
        .body(Body::from(body))
        .expect("request");
    let (status, bytes) = send(app, req).await;
    (status, serde_json::from_slice(&bytes).expect("json"))
}

async fn wait_for_job(app: &Router, id: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let (status, job) = call(app, "GET", &format!("/v1/fine_tuning/jobs/{id}"), None).await;
        assert_eq!(status, StatusCode::OK, "{job}");
        if ["succeeded", "failed", "cancelled"].contains(&job["status"].as_str().unwrap_or("")) {
            return job;
        }
        assert!(Instant::now() < deadline, "job did not finish: {job}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn complete(app: &Router, model: &str, prompt: &str) -> String {
    let (status, v) = call(
        app,
        "POST",
        "/v1/completions",
        Some(json!({"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["model"], model);
    v["choices"][0]["text"].as_str().expect("text").to_string()
}

fn facts_jsonl() -> String {
    FACTS
        .iter()
        .map(|(p, c)| json!({"prompt": p, "completion": c}).to_string() + "\n")
        .collect()
}

/// Greedy tokens for each (adapter, prompt), all submitted at once (one batch), then each alone.
fn batch_vs_alone(engine: &EngineHandle, work: &[(Option<String>, Vec<u32>)]) {
    let request = |adapter: Option<&str>, ids: &[u32]| {
        let mut r = GenerateRequest::greedy(ids.to_vec(), 12);
        r.adapter = adapter.map(str::to_string);
        r
    };
    let gens: Vec<_> = work
        .iter()
        .map(|(a, ids)| engine.submit(request(a.as_deref(), ids)).expect("submit"))
        .collect();
    let together: Vec<Vec<u32>> = gens
        .into_iter()
        .map(|g| g.blocking_collect(|_| {}).expect("done").tokens)
        .collect();
    for ((a, ids), t) in work.iter().zip(&together) {
        let alone = engine
            .submit(request(a.as_deref(), ids))
            .expect("submit")
            .blocking_collect(|_| {})
            .expect("done")
            .tokens;
        assert_eq!(&alone, t, "adapter {a:?}: batched and alone differ");
    }
    // Different adapters really answer differently on the same prompt.
    assert_ne!(together[0], together[1]);
    assert_ne!(together[0], together[2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lora_job_teaches_facts_served_by_name_at_once() {
    let f = fixture();
    let app = &f.app;
    let (status, file) = upload(app, "facts.jsonl", "fine-tune", &facts_jsonl()).await;
    assert_eq!(status, StatusCode::OK, "{file}");
    assert_eq!(file["object"], "file");
    let file_id = file["id"].as_str().expect("id").to_string();
    let (_, content) = send(
        app,
        Request::get(format!("/v1/files/{file_id}/content"))
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(String::from_utf8(content).expect("utf-8"), facts_jsonl());

    // The base model does not know the facts.
    let mut base_known = 0;
    for (p, c) in FACTS {
        base_known += usize::from(complete(app, "smollm2", p).await == c);
    }
    assert!(
        base_known <= 1,
        "the base model already knows {base_known} facts"
    );

    let (status, job) = call(
        app,
        "POST",
        "/v1/fine_tuning/jobs",
        Some(json!({
            "model": "smollm2", "training_file": file_id, "suffix": "facts", "seed": 1,
            "method": {"type": "supervised", "supervised": {"hyperparameters":
                {"n_epochs": 15, "batch_size": 5, "learning_rate_multiplier": 5.0}}},
            "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{job}");
    assert_eq!(job["object"], "fine_tuning.job");
    assert_eq!(job["status"], "validating_files");
    let id = job["id"].as_str().expect("id").to_string();
    let job = wait_for_job(app, &id, Duration::from_secs(600)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let name = job["fine_tuned_model"].as_str().expect("name").to_string();
    assert!(name.starts_with("ft:smollm2:facts:"), "{name}");
    assert_eq!(job["hyperparameters"]["n_epochs"], 15);
    assert!(job["trained_tokens"].as_u64().is_some_and(|t| t > 0));

    // Events: newest first, metrics with a falling loss, 30 steps.
    let (_, events) = call(
        app,
        "GET",
        &format!("/v1/fine_tuning/jobs/{id}/events?limit=100"),
        None,
    )
    .await;
    let events = events["data"].as_array().expect("list").clone();
    assert_eq!(events[0]["message"], "The job has successfully completed");
    let losses: Vec<f64> = events
        .iter()
        .rev()
        .filter(|e| e["type"] == "metrics")
        .map(|e| e["data"]["train_loss"].as_f64().expect("loss"))
        .collect();
    assert_eq!(losses.len(), 30);
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(last < first / 10.0, "loss fell from {first} to {last}");
    let (_, page) = call(
        app,
        "GET",
        &format!("/v1/fine_tuning/jobs/{id}/events?limit=2"),
        None,
    )
    .await;
    assert_eq!(page["has_more"], true);
    assert_eq!(page["data"].as_array().map(Vec::len), Some(2));

    // Listed and served immediately: every fact, through completions and /infill's dialect.
    let (_, models) = call(app, "GET", "/v1/models", None).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["smollm2", name.as_str()]);
    for (p, c) in FACTS {
        assert_eq!(complete(app, &name, p).await, c, "prompt {p:?}");
    }
    let (status, v) = call(
        app,
        "POST",
        "/completion",
        Some(json!({"model": name, "prompt": FACTS[2].0, "n_predict": 16, "temperature": 0})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["content"], FACTS[2].1);
    let (status, v) = call(
        app,
        "POST",
        "/v1/chat/completions",
        Some(json!({"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");

    // The adapter is on disk in PEFT format.
    let dir = f.data_dir.path().join("adapters").join(&id);
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("adapter_config.json")).expect("config"),
    )
    .expect("json");
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    let tensors = candle_core::safetensors::load(
        dir.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .expect("safetensors");
    assert!(tensors.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert_eq!(tensors.len(), 30 * 2 * 2);

    // A second adapter, loaded at run time through vLLM's API: the same factors with B negated.
    let second = f.lora_dir.path().join("negated");
    std::fs::create_dir_all(&second).expect("dir");
    std::fs::copy(
        dir.join("adapter_config.json"),
        second.join("adapter_config.json"),
    )
    .expect("copy");
    let negated: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, t)| {
            let t = if k.contains("lora_B") {
                t.neg().expect("neg")
            } else {
                t
            };
            (k, t)
        })
        .collect();
    candle_core::safetensors::save(&negated, second.join("adapter_model.safetensors"))
        .expect("save");
    let (status, v) = call(
        app,
        "POST",
        "/v1/load_lora_adapter",
        Some(json!({"lora_name": "negated", "lora_path": second.to_str()})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = call(
        app,
        "POST",
        "/v1/load_lora_adapter",
        Some(json!({"lora_name": "negated", "lora_path": second.to_str()})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let outside = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let (status, v) = call(
        app,
        "POST",
        "/v1/load_lora_adapter",
        Some(json!({"lora_name": "x", "lora_path": outside.to_str()})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["param"], "lora_path");

    // Two adapters and the base model in one batch give the tokens each gives alone.
    let tok = &gguf().1;
    let mut work = Vec::new();
    for p in [FACTS[0].0, FACTS[6].0] {
        let ids = tok.encode(p, true).expect("encode");
        for a in [Some(name.clone()), Some("negated".to_string()), None] {
            work.push((a, ids.clone()));
        }
    }
    let engine = f.engine.clone();
    tokio::task::spawn_blocking(move || batch_vs_alone(&engine, &work))
        .await
        .expect("batch check");

    let (status, _) = call(
        app,
        "POST",
        "/v1/unload_lora_adapter",
        Some(json!({"lora_name": "negated"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = call(
        app,
        "POST",
        "/v1/completions",
        Some(json!({"model": "negated", "prompt": "x", "max_tokens": 1})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["code"], "model_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_data_and_requests_get_clear_errors() {
    let f = fixture();
    let app = &f.app;
    let bad = "{\"prompt\": \"a\", \"completion\": \" b\"}\n{\"prompt\": \"only a prompt\"}\n";
    let (_, file) = upload(app, "bad.jsonl", "fine-tune", bad).await;
    let file_id = file["id"].as_str().expect("id");
    let (status, job) = call(
        app,
        "POST",
        "/v1/fine_tuning/jobs",
        Some(json!({"model": "smollm2", "training_file": file_id})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{job}");
    let job = wait_for_job(
        app,
        job["id"].as_str().expect("id"),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"]["code"], "invalid_training_file");
    assert_eq!(job["error"]["param"], "training_file");
    let msg = job["error"]["message"].as_str().expect("message");
    assert!(msg.contains("line 2:"), "{msg}");
    assert_eq!(job["fine_tuned_model"], Value::Null);

    let (status, v) = upload(app, "x.jsonl", "assistants", "{}").await;
    assert_eq!(
        (status, &v["error"]["param"]),
        (StatusCode::BAD_REQUEST, &json!("purpose"))
    );
    let cases = [
        (
            json!({"model": "smollm2", "training_file": "file-nope"}),
            StatusCode::BAD_REQUEST,
            Some("training_file"),
        ),
        (
            json!({"model": "gpt-4o", "training_file": file_id}),
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            json!({"training_file": file_id}),
            StatusCode::BAD_REQUEST,
            Some("model"),
        ),
        (
            json!({"model": "smollm2", "training_file": file_id, "lora": {"target_modules": ["attn"]}}),
            StatusCode::BAD_REQUEST,
            Some("lora.target_modules"),
        ),
        (
            json!({"model": "smollm2", "training_file": file_id, "hyperparameters": {"n_epochs": "many"}}),
            StatusCode::BAD_REQUEST,
            Some("hyperparameters.n_epochs"),
        ),
        (
            json!({"model": "smollm2", "training_file": file_id, "hyperparameters": {"batch_size": 0}}),
            StatusCode::BAD_REQUEST,
            Some("hyperparameters.batch_size"),
        ),
    ];
    for (body, want, param) in cases {
        let (status, v) = call(app, "POST", "/v1/fine_tuning/jobs", Some(body.clone())).await;
        assert_eq!(status, want, "{body} → {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{body} → {v}");
        }
    }
    let (status, _) = call(app, "GET", "/v1/fine_tuning/jobs/ftjob-nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(app, "POST", "/v1/fine_tuning/jobs/ftjob-nope/cancel", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(
        app,
        "POST",
        "/v1/unload_lora_adapter",
        Some(json!({"lora_name": "nope"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, v) = call(app, "DELETE", &format!("/v1/files/{file_id}"), None).await;
    assert_eq!((status, &v["deleted"]), (StatusCode::OK, &json!(true)));
    let (status, _) = call(app, "GET", &format!("/v1/files/{file_id}"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, list) = call(app, "GET", "/v1/fine_tuning/jobs", None).await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(1));
}
