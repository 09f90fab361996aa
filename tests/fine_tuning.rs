//! Fine-tuning through the HTTP API on the real model (router `oneshot`, trainer thread live):
//! ten made-up facts are learned by a LoRA job and served under the job's model name at once;
//! the base model does not know them; the loss falls; adapters and the base model share one
//! batch; invalid data and requests get OpenAI-shaped errors.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use common::*;
use http_body_util::BodyExt;
use nextoken::engine::{EngineConfig, EngineHandle, GenerateRequest};
use nextoken::files::FileStore;
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
    let files = FileStore::open(data_dir.path()).expect("file store");
    let jobs = TrainingJobs::start(
        TrainingConfig {
            data_dir: data_dir.path().to_path_buf(),
            base_model: "smollm2".into(),
            max_example_tokens: 2048,
            micro_batch_tokens: 512,
        },
        files.clone(),
        TrainerModel {
            model: base,
            tokenizer: loaded.tokenizer.clone(),
            chat_template: template,
        },
        engine.clone(),
    )
    .expect("training starts");
    let state = AppState::new(ServerConfig::default());
    state.set_files(files);
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

async fn upload(app: &Router, name: &str, purpose: &str, content: &str) -> (StatusCode, Value) {
    let (status, bytes) = send(app, file_upload(name, purpose, content)).await;
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

    // The event stream replays the job's events oldest first and ends with the job.
    let (status, bytes) = send(
        app,
        Request::get(format!(
            "/v1/fine_tuning/jobs/{}/events?stream=true",
            job["id"].as_str().expect("id")
        ))
        .body(Body::empty())
        .expect("req"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(bytes).expect("utf-8");
    let events: Vec<Value> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").expect("data line")).expect("json"))
        .collect();
    assert_eq!(events[0]["message"], "Validating training file");
    let last = events.last().expect("events");
    assert_eq!(last["level"], "error");
    assert!(
        last["message"]
            .as_str()
            .is_some_and(|m| m.contains("line 2:")),
        "{last}"
    );

    // A disk error fails the job cleanly; the server keeps serving.
    let adapters = f.data_dir.path().join("adapters");
    std::fs::remove_dir_all(&adapters).expect("rm");
    std::fs::write(&adapters, "not a folder").expect("block the adapters folder");
    let (_, good) = upload(app, "ok.jsonl", "fine-tune", &facts_jsonl()).await;
    let (_, job) = call(
        app,
        "POST",
        "/v1/fine_tuning/jobs",
        Some(json!({"model": "smollm2", "training_file": good["id"], "hyperparameters": {"n_epochs": 1, "batch_size": 10}})),
    )
    .await;
    let job = wait_for_job(
        app,
        job["id"].as_str().expect("id"),
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "storage_error", "{job}");
    assert_eq!(job["fine_tuned_model"], Value::Null);
    let (_, models) = call(app, "GET", "/v1/models", None).await;
    assert_eq!(models["data"].as_array().map(Vec::len), Some(1), "{models}");
    assert!(!complete(app, "smollm2", "Hello").await.is_empty());

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
    assert_eq!(list["data"].as_array().map(Vec::len), Some(2));
}

#[test]
fn training_data_masks_exactly_the_completion_and_the_assistant_turns() {
    use nextoken::text::ChatTemplate;
    use nextoken::train::dataset::{parse_jsonl, DataFormat};
    let tok = &gguf().1;
    let template = ChatTemplate::new(
        tok.chat_template().expect("template"),
        tok.bos_token(),
        tok.eos_token(),
    )
    .expect("compiles");
    let format = DataFormat {
        tokenizer: tok,
        chat_template: Some(&template),
        eos_id: tok.eos_id(),
        max_tokens: 64,
    };
    let text = [
        json!({"prompt": "The sky is", "completion": " blue."}).to_string(),
        String::new(),
        json!({"messages": [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": [{"type": "text", "text": "And Italy?"}]},
            {"role": "assistant", "content": "Rome."},
        ]})
        .to_string(),
    ]
    .join("\n");
    let ex = parse_jsonl(&text, &format).expect("valid");
    assert_eq!(ex.len(), 2);
    let learned = |e: &nextoken::train::dataset::Example| -> Vec<u32> {
        e.tokens
            .iter()
            .zip(&e.targets)
            .filter(|(_, &t)| t)
            .map(|(&id, _)| id)
            .collect()
    };
    // The prompt is tokenized as /v1/completions tokenizes it; the completion ends with EOS.
    let prompt = tok.encode("The sky is", true).expect("encode");
    assert_eq!(&ex[0].tokens[..prompt.len()], &prompt[..]);
    assert_eq!(
        tok.decode(&learned(&ex[0]), false).expect("decode"),
        " blue.<|im_end|>"
    );
    // Only the assistant turns (with their end-of-turn) are learned.
    assert_eq!(
        tok.decode(&learned(&ex[1]), false).expect("decode"),
        "Paris.<|im_end|>\nRome.<|im_end|>\n"
    );
    let whole = tok.decode(&ex[1].tokens, false).expect("decode");
    assert!(whole.starts_with("<|im_start|>system\n"), "{whole}");

    for (bad, line, why) in [
        (
            "{\"prompt\": \"a\", \"completion\": \" b\"}\nnot json",
            2,
            "invalid JSON",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}",
            1,
            "no assistant message",
        ),
        (
            "{\"messages\": [{\"role\": \"robot\", \"content\": \"hi\"}]}",
            1,
            "not system, user or assistant",
        ),
        (
            "{\"prompt\": \"a\", \"completion\": \"\"}",
            1,
            "'completion' is empty",
        ),
        (
            &json!({"prompt": "word ".repeat(100), "completion": " x"}).to_string(),
            1,
            "the limit is 64",
        ),
    ] {
        let err = parse_jsonl(bad, &format).expect_err(bad);
        assert_eq!(err.line, Some(line), "{bad}: {err}");
        assert!(err.to_string().contains(why), "{bad}: {err}");
    }
    assert_eq!(
        parse_jsonl("\n\n", &format).expect_err("empty").to_string(),
        "the file has no examples"
    );
}

#[test]
fn training_is_deterministic_for_a_seed() {
    use nextoken::model::Target;
    use nextoken::train::dataset::{parse_jsonl, DataFormat};
    use nextoken::train::trainer::{train, Outcome, TrainParams};
    let (model, tok) = gguf();
    let format = DataFormat {
        tokenizer: tok,
        chat_template: None,
        eos_id: tok.eos_id(),
        max_tokens: 64,
    };
    let data = parse_jsonl(&facts_jsonl(), &format).expect("valid");
    let frozen = model.frozen().expect("frozen");
    let run = |seed: u64| {
        let p = TrainParams {
            n_epochs: 1,
            batch_size: 5,
            learning_rate: 1e-3,
            rank: 4,
            alpha: 8.0,
            dropout: 0.1,
            targets: vec![Target::V],
            seed,
            micro_batch_tokens: 48,
        };
        let mut losses = Vec::new();
        let Outcome::Finished(lora) = train(
            &frozen,
            &data,
            &data[..2],
            &p,
            || true,
            |r| losses.push((r.train_loss, r.valid_loss)),
        )
        .expect("trains") else {
            panic!("not cancelled");
        };
        let b: Vec<Vec<f32>> = lora
            .all_vars()
            .iter()
            .map(|v| {
                v.as_tensor()
                    .flatten_all()
                    .expect("flat")
                    .to_vec1()
                    .expect("f32")
            })
            .collect();
        (losses, b)
    };
    let (l1, w1) = run(3);
    let (l2, w2) = run(3);
    let (_, w3) = run(4);
    assert_eq!(l1.len(), 2);
    assert!(l1[1].1.is_some(), "validation loss after the epoch");
    assert_eq!(l1, l2);
    assert_eq!(w1, w2, "same seed, same adapter");
    assert_ne!(w1, w3, "another seed, another adapter");
    // Cancelling stops before the next pass.
    let p = TrainParams {
        n_epochs: 1,
        batch_size: 5,
        learning_rate: 1e-3,
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec![Target::V],
        seed: 1,
        micro_batch_tokens: 512,
    };
    let mut passes = 0;
    let out = train(
        &frozen,
        &data,
        &[],
        &p,
        || {
            passes += 1;
            passes < 2
        },
        |_| {},
    )
    .expect("runs");
    assert!(matches!(out, Outcome::Cancelled));
}
