//! Shared helpers for integration tests: the default model (tests fail, never skip, when it is
//! missing), reference data, and a float32 HF folder converted from the GGUF once per process.
#![allow(dead_code)]

pub mod engine;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use nextoken::model::Model;
use nextoken::text::Tokenizer;
use serde_json::Value;

/// Repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The default GGUF; panics with the fix when it is missing.
pub fn model_path() -> PathBuf {
    let p = repo().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "default model missing at {} — run models/fetch-default.sh",
        p.display()
    );
    p
}

/// `method path` with a JSON body (or none) through `app`: the status and the JSON answer
/// (a text that is not JSON as a JSON string).
pub async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (axum::http::StatusCode, Value) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let req = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(body.map_or_else(axum::body::Body::empty, |b| {
            axum::body::Body::from(b.to_string())
        }))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, v)
}

/// `POST /v1/files` with `content` as the multipart upload `name` of `purpose`.
pub fn file_upload(
    name: &str,
    purpose: &str,
    content: &str,
) -> axum::http::Request<axum::body::Body> {
    let b = "nextoken-boundary";
    let body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
         --{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{content}\r\n--{b}--\r\n"
    );
    axum::http::Request::post("/v1/files")
        .header(
            axum::http::header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={b}"),
        )
        .body(axum::body::Body::from(body))
        .expect("request")
}

/// A JSON file from `tests/reference/`.
pub fn reference(name: &str) -> Value {
    let p = repo().join("tests/reference").join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).expect("reference JSON")
}

/// The GGUF model and tokenizer, loaded once.
pub fn gguf() -> &'static (Model, Tokenizer) {
    static CELL: OnceLock<(Model, Tokenizer)> = OnceLock::new();
    CELL.get_or_init(|| nextoken::load(&model_path()).expect("default model loads"))
}

/// This test process's folder for artifacts shared by its tests. Statics are never dropped, so
/// a `TempDir` held in one would leak (half a gigabyte per converted model, per test binary,
/// which once filled CI's disk): instead each process writes under
/// `$CARGO_TARGET_TMPDIR/fixtures/pid-N`, and removes the folders of processes that have exited.
pub fn process_dir() -> &'static Path {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    CELL.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
        std::fs::create_dir_all(&root).expect("fixtures dir");
        let proc_fs = Path::new("/proc/self").exists();
        for entry in std::fs::read_dir(&root)
            .expect("read fixtures dir")
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix("pid-") else {
                continue;
            };
            if proc_fs && !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = root.join(format!("pid-{}", std::process::id()));
        // A leftover from an exited process that had this pid is stale too.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("process fixtures dir");
        dir
    })
}

/// A float32 HF folder made by `convert` from the default GGUF, once per process.
pub fn converted_dir() -> &'static Path {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    CELL.get_or_init(|| {
        let dir = process_dir().join("converted");
        nextoken::convert::gguf_to_hf(&model_path(), &dir, nextoken::convert::ConvertDtype::F32)
            .expect("convert");
        dir
    })
}

/// A GGUF file (f32) written by `convert` from the converted folder: the round trip
/// GGUF → folder → GGUF, made once per test binary.
pub fn gguf_from_folder() -> &'static Path {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    CELL.get_or_init(|| {
        let path = process_dir().join("smollm2-f32.gguf");
        nextoken::convert::hf_to_gguf(converted_dir(), &path, nextoken::convert::GgufQuant::F32)
            .expect("convert folder to GGUF");
        path
    })
}

/// The converted folder's model and tokenizer, loaded once.
pub fn converted() -> &'static (Model, Tokenizer) {
    static CELL: OnceLock<(Model, Tokenizer)> = OnceLock::new();
    CELL.get_or_init(|| nextoken::load(converted_dir()).expect("converted folder loads"))
}

/// Integers of a JSON array.
pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("integer") as u32)
        .collect()
}

/// Leading steps of an `hf_f32.json` prompt's greedy run where float32's top two are at least
/// half a nat apart: the quantized GGUF path follows float32 there token for token, and may
/// take the other branch at the first closer call (see tests/reference.rs).
pub fn firm_steps(prompt: &Value) -> usize {
    prompt["greedy"]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .take_while(|s| s["top1_top2_logit_margin"].as_f64().expect("margin") >= 0.5)
        .count()
}

/// A venv with the official `openai` and `ollama` clients (and `httpx`) and llama.cpp's `gguf`
/// package, created once under target/ (tests run in parallel: only one creates it).
pub fn python() -> PathBuf {
    static VENV: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    VENV.get_or_init(create_venv).clone()
}

/// The tests' Python: see [`python`].
fn create_venv() -> PathBuf {
    let venv = repo().join("target/py-venv");
    let py = venv.join("bin/python");
    let ok = |py: &PathBuf| {
        Command::new(py)
            .args(["-c", "import openai, httpx, ollama, gguf"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ok(&py) {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv");
        assert!(status.success(), "creating the venv failed");
        let status = Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "openai>=1.40,<3",
                "httpx",
                "ollama>=0.4,<1",
                "gguf>=0.17,<1",
            ])
            .status()
            .expect("pip install");
        assert!(
            status.success(),
            "pip install (openai, ollama, gguf) failed"
        );
    }
    assert!(ok(&py), "the venv cannot import openai, ollama or gguf");
    py
}

/// Runs `tests/python/{script}` with the tests' venv on `args`; fails with its output unless
/// it succeeds. `what` names the run in the failure.
pub fn python_check(script: &str, args: &[&Path], what: &str) {
    let out = Command::new(python())
        .arg(repo().join("tests/python").join(script))
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{what}: {script}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A word-level tokenizer: words split on whitespace, `specials` as special added tokens.
pub fn word_tokenizer(dir: &Path, words: &[&str], specials: &[&str]) -> Tokenizer {
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), serde_json::json!(0));
    for (i, w) in words.iter().chain(specials).enumerate() {
        vocab.insert((*w).to_string(), serde_json::json!(i + 1));
    }
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": words.len() + i + 1, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let doc = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), doc.to_string()).expect("write");
    Tokenizer::from_hf_dir(dir).expect("tokenizer")
}
