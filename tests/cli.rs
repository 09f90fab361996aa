//! The `nextoken` binary: `generate` output formats, `convert`, and clear errors (non-zero
//! exit, the file named, no panic) for every kind of bad model input.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use candle_core::quantized::gguf_file;
use common::*;
use serde_json::Value;

fn nextoken(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nextoken"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run nextoken")
}

fn generate_json(model: &Path, prompt: &str, extra: &[&str]) -> Value {
    let model = model.to_str().expect("utf-8 path");
    let mut args = vec!["generate", "--model", model, "--prompt", prompt, "--json"];
    args.extend_from_slice(extra);
    let out = nextoken(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(
        stdout.trim().lines().count(),
        1,
        "exactly one JSON object: {stdout}"
    );
    serde_json::from_str(stdout.trim()).expect("JSON")
}

/// Runs `generate` on a bad model and returns stderr, checking the failure is clean.
fn expect_load_error(model: &Path, needles: &[&str]) {
    let out = nextoken(&[
        "generate",
        "--model",
        model.to_str().expect("utf-8"),
        "--prompt",
        "hi",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(
        stderr.contains(&model.display().to_string())
            || stderr.contains(model.file_name().and_then(|n| n.to_str()).unwrap_or("?")),
        "file not named: {stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "expected {n:?} in: {stderr}");
    }
}

#[test]
fn generate_json_stops_on_eos() {
    let reference = reference("hf_f32.json");
    let p = &reference["prompts"][0];
    let v = generate_json(
        &model_path(),
        p["prompt_text"].as_str().expect("text"),
        &["--max-tokens", "64"],
    );
    let firm = firm_steps(p);
    assert!(firm >= 5);
    let want = u32s(&p["greedy"]["new_token_ids"]);
    let got = u32s(&v["output_ids"]);
    assert_eq!(u32s(&v["prompt_ids"]), u32s(&p["prompt_ids"]));
    assert_eq!(got[..firm], want[..firm]);
    assert_eq!(got.last(), Some(&2), "ends with the EOS id: {got:?}");
    assert!(got.len() < 64, "stopped on EOS before the limit");
    assert_eq!(v["finish_reason"], "stop");
    let (_, tokenizer) = gguf();
    let text = tokenizer
        .decode(&got[..got.len() - 1], false)
        .expect("decode");
    assert_eq!(v["text"], text.as_str());
    assert!(v["text"].as_str().expect("text").starts_with(" Paris."));
    assert!(v["prefill_tokens_per_s"].as_f64().expect("number") > 0.0);
    assert!(v["decode_tokens_per_s"].as_f64().expect("number") > 0.0);
}

#[test]
fn generate_ignore_eos_runs_to_length() {
    let v = generate_json(
        &model_path(),
        "The capital of France is",
        &["--max-tokens", "40", "--ignore-eos"],
    );
    let out = u32s(&v["output_ids"]);
    assert_eq!(out.len(), 40);
    assert!(out.contains(&2), "passes through EOS: {out:?}");
    assert_eq!(v["finish_reason"], "length");
}

#[test]
fn generate_seeded_sampling_is_reproducible() {
    let args = [
        "--max-tokens",
        "12",
        "--temperature",
        "0.9",
        "--top-p",
        "0.95",
        "--seed",
        "42",
        "--ignore-eos",
    ];
    let a = generate_json(
        &model_path(),
        "<|im_start|>user\nTell me a story<|im_end|>\n",
        &args,
    );
    let b = generate_json(
        &model_path(),
        "<|im_start|>user\nTell me a story<|im_end|>\n",
        &args,
    );
    assert_eq!(a["output_ids"], b["output_ids"]);
    assert_eq!(
        u32s(&a["prompt_ids"])[0],
        1,
        "<|im_start|> parsed as a special token"
    );
}

#[test]
fn generate_text_mode_streams_and_reports_speed() {
    let out = nextoken(&[
        "generate",
        "--model",
        model_path().to_str().expect("utf-8"),
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "3",
    ]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        " Paris.\n\n",
        "3 tokens then a final newline"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("prompt: 5 tokens") && stderr.contains("tok/s"),
        "{stderr}"
    );
}

#[test]
fn bench_pp_tg_mode_prints_llama_bench_figures() {
    let out = nextoken(&[
        "bench",
        "--model",
        model_path().to_str().expect("utf-8"),
        "--pp",
        "32",
        "--tg",
        "4",
        "--repetitions",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("JSON");
    assert_eq!((v["pp"].as_u64(), v["tg"].as_u64()), (Some(32), Some(4)));
    for key in ["prefill_tok_s", "decode_tok_s"] {
        let runs: Vec<f64> = v["runs"][key]
            .as_array()
            .expect("runs")
            .iter()
            .map(|x| x.as_f64().expect("f64"))
            .collect();
        assert_eq!(runs.len(), 3, "{key}");
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(v[key].as_f64(), Some(sorted[1]), "{key} is the median");
        assert!(sorted[0] > 0.0);
    }
}

/// The speculative-decoding bench on the real model: one line per built-in text, both
/// engines gave the same tokens, and the text that quotes its prompt took tokens from drafts.
#[test]
fn bench_speculative_scenario_compares_drafts_on_and_off() {
    let out = nextoken(&[
        "bench",
        "--model",
        model_path().to_str().expect("utf-8"),
        "--scenario",
        "speculative",
        "--new-tokens",
        "32",
        "--repetitions",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let names: Vec<&str> = lines.iter().filter_map(|v| v["prompt"].as_str()).collect();
    assert_eq!(names, ["code_edit", "completion", "quote", "story"]);
    for v in &lines {
        assert_eq!(v["same_tokens"], true, "{v}");
        assert!(v["spec_decode_tok_s"].as_f64().expect("rate") > 0.0, "{v}");
        assert!(v["tokens"].as_u64().expect("tokens") > 5, "{v}");
    }
    assert!(
        lines[2]["from_drafts"].as_f64().expect("share") > 0.3,
        "{}",
        lines[2]
    );
}

#[test]
fn convert_writes_gguf_from_a_folder_with_llama_cpp_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = repo().join("tests/reference/tiny/gemma2");
    let out = dir.path().join("gemma2-q8.gguf");
    let run = nextoken(&[
        "convert",
        src.to_str().expect("utf-8"),
        out.to_str().expect("utf-8"),
        "--quant",
        "q8_0",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let mut file = std::fs::File::open(&out).expect("open");
    let content = gguf_file::Content::read(&mut file).expect("GGUF");
    let md = |k: &str| content.metadata.get(k).cloned();
    assert_eq!(
        md("general.architecture").and_then(|v| v.to_string().ok().cloned()),
        Some("gemma2".to_string())
    );
    assert_eq!(
        md("gemma2.attention.sliding_window").and_then(|v| v.to_u32().ok()),
        Some(8)
    );
    assert_eq!(
        md("gemma2.final_logit_softcapping").and_then(|v| v.to_f32().ok()),
        Some(30.0)
    );
    let info = |n: &str| content.tensor_infos.get(n).map(|i| i.ggml_dtype);
    use candle_core::quantized::GgmlDType;
    assert_eq!(info("blk.1.attn_q.weight"), Some(GgmlDType::Q8_0));
    assert_eq!(info("blk.0.post_ffw_norm.weight"), Some(GgmlDType::F32));
    assert_eq!(
        info("blk.0.post_attention_norm.weight"),
        Some(GgmlDType::F32)
    );
    assert_eq!(info("output.weight"), None, "tied head: no output tensor");
    // An unknown --quant is refused by the argument parser, naming the choices.
    let bad = nextoken(&[
        "convert",
        src.to_str().expect("utf-8"),
        out.to_str().expect("utf-8"),
        "--quant",
        "iq2_xs",
    ]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("q4_1") && stderr.contains("iq4_xs"),
        "{stderr}"
    );
}

#[test]
fn convert_writes_a_loadable_hf_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("bf16");
    let status = nextoken(&[
        "convert",
        model_path().to_str().expect("utf-8"),
        out.to_str().expect("utf-8"),
        "--dtype",
        "bf16",
    ]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).expect("read"))
            .expect("json");
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["num_key_value_heads"], 3);
    assert_eq!(config["rope_theta"], 100000.0);
    assert_eq!(config["torch_dtype"], "bfloat16");
    let tok: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("tokenizer_config.json")).expect("read"),
    )
    .expect("json");
    assert_eq!(tok["add_bos_token"], false);
    assert_eq!(tok["eos_token"], "<|im_end|>");
    assert!(tok["chat_template"]
        .as_str()
        .expect("template")
        .contains("<|im_start|>"));
    let v = generate_json(&out, "The capital of France is", &["--max-tokens", "2"]);
    assert_eq!(
        u32s(&v["output_ids"])[0],
        7042,
        "bf16 folder still says Paris"
    );
    // The f32 folder gives exactly the GGUF path's tokens.
    let a = generate_json(
        converted_dir(),
        "def fibonacci(n):\n",
        &["--max-tokens", "24"],
    );
    let b = generate_json(
        &model_path(),
        "def fibonacci(n):\n",
        &["--max-tokens", "24"],
    );
    assert_eq!(a["output_ids"], b["output_ids"]);
}

#[test]
fn missing_file_is_a_clear_error() {
    expect_load_error(Path::new("/nonexistent/model.gguf"), &["no such file"]);
}

#[test]
fn non_model_file_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("notes.gguf");
    std::fs::write(
        &p,
        "these are my notes, not a model; long enough to pass the size check",
    )
    .expect("write");
    expect_load_error(&p, &["not a GGUF file"]);
    let tiny = dir.path().join("tiny.gguf");
    std::fs::write(&tiny, b"GG").expect("write");
    expect_load_error(&tiny, &["too short"]);
}

#[test]
fn truncated_gguf_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("cut.gguf");
    let data = std::fs::read(model_path()).expect("read");
    std::fs::write(&p, &data[..data.len() / 3]).expect("write");
    expect_load_error(&p, &["truncated", "ends at byte"]);
    // Cut inside the header (the vocabulary) too.
    std::fs::write(&p, &data[..200_000]).expect("write");
    expect_load_error(&p, &["corrupt GGUF header"]);
}

#[test]
fn unsupported_gguf_architecture_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("gpt2.gguf");
    let mut f = std::fs::File::create(&p).expect("create");
    let arch = gguf_file::Value::String("gpt2".into());
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[]).expect("write gguf");
    drop(f);
    expect_load_error(
        &p,
        &[
            "unsupported architecture 'gpt2'",
            "llama, qwen2, qwen3, phi3, gemma2, starcoder2",
        ],
    );
}

#[test]
fn unreadable_gguf_tensor_types_are_named() {
    // A llama.cpp file with IQ2_XS / IQ3_S tensors: candle's reader calls the header corrupt;
    // the error names the types and the first such tensor instead (IQ4_NL and IQ4_XS, which
    // nextoken reads itself, in `tests/reference.rs`).
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("iq.gguf");
    let mut f = std::fs::File::create(&p).expect("create");
    let arch = gguf_file::Value::String("llama".into());
    let t = |n: usize| {
        let x =
            candle_core::Tensor::zeros((n, 32), candle_core::DType::F32, &candle_core::Device::Cpu)
                .expect("zeros");
        candle_core::quantized::QTensor::quantize(&x, candle_core::quantized::GgmlDType::F32)
            .expect("quantize")
    };
    let (a, b, c) = (t(2), t(3), t(4));
    let names = [
        "token_embd.weight",
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
    ];
    gguf_file::write(
        &mut f,
        &[("general.architecture", &arch)],
        &[(names[0], &a), (names[1], &b), (names[2], &c)],
    )
    .expect("write gguf");
    drop(f);
    let mut data = std::fs::read(&p).expect("read");
    // Each tensor info: name, n_dims (u32), dims (2 × u64), type (u32), offset (u64).
    for (name, ty) in [(names[1], 17u32), (names[2], 21u32)] {
        let at = data
            .windows(name.len())
            .position(|w| w == name.as_bytes())
            .expect("tensor info")
            + name.len()
            + 4
            + 16;
        assert_eq!(data[at..at + 4], 0u32.to_le_bytes(), "an F32 tensor's type");
        data[at..at + 4].copy_from_slice(&ty.to_le_bytes());
    }
    std::fs::write(&p, &data).expect("write");
    expect_load_error(
        &p,
        &[
            "unsupported tensor type IQ2_XS, IQ3_S in 2 tensor(s)",
            "the first: 'blk.0.attn_q.weight', IQ2_XS",
            "IQ4_NL and IQ4_XS",
            "Q4_K_M",
        ],
    );
}

fn tiny_llama_copy(dir: &Path) -> std::path::PathBuf {
    let src = repo().join("tests/reference/tiny/llama");
    let dst = dir.join("tiny-llama");
    std::fs::create_dir_all(&dst).expect("mkdir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).expect("copy");
    }
    dst
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let p = dir.join("config.json");
    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(&p).expect("read")).expect("json");
    edit(&mut v);
    std::fs::write(&p, v.to_string()).expect("write");
}

#[test]
fn unsupported_hf_architecture_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = tiny_llama_copy(dir.path());
    edit_config(&m, |v| {
        v["architectures"] = serde_json::json!(["GPT2LMHeadModel"])
    });
    expect_load_error(
        &m,
        &[
            "unsupported architecture 'GPT2LMHeadModel'",
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "Qwen2ForCausalLM",
            "Phi3ForCausalLM",
            "Gemma2ForCausalLM",
            "Starcoder2ForCausalLM",
        ],
    );
}

#[test]
fn shape_mismatch_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = tiny_llama_copy(dir.path());
    edit_config(&m, |v| v["intermediate_size"] = serde_json::json!(96));
    expect_load_error(
        &m,
        &[
            "shape mismatch",
            "mlp.gate_proj.weight",
            "[96, 64]",
            "[128, 64]",
        ],
    );
}

#[test]
fn corrupt_safetensors_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = tiny_llama_copy(dir.path());
    let p = m.join("model.safetensors");
    let data = std::fs::read(&p).expect("read");
    std::fs::write(&p, &data[..data.len() / 2]).expect("write");
    expect_load_error(
        &p.parent().expect("dir").join("model.safetensors"),
        &["corrupt safetensors"],
    );
    std::fs::remove_file(&p).expect("rm");
    expect_load_error(&m, &["no model.safetensors"]);
}

#[test]
fn unsupported_tensor_dtype_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = tiny_llama_copy(dir.path());
    let p = m.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&p, &candle_core::Device::Cpu).expect("load");
    let name = "model.norm.weight".to_string();
    let as_int = tensors[&name]
        .to_dtype(candle_core::DType::I64)
        .expect("cast");
    tensors.insert(name, as_int);
    candle_core::safetensors::save(&tensors, &p).expect("save");
    expect_load_error(&m, &["unsupported", "model.norm.weight", "I64"]);
}

/// The README's configuration reference is checked against `--help`: every `serve` flag and
/// every `NEXTOKEN_*` variable it accepts is documented, and the README names none that do not
/// exist.
#[test]
fn readme_documents_every_serve_flag_and_variable() {
    let out = nextoken(&["serve", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README");
    let words = |text: &str, prefix: &str| -> std::collections::BTreeSet<String> {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .filter(|w| w.starts_with(prefix) && w.len() > prefix.len())
            .map(str::to_string)
            .collect()
    };
    let flags: Vec<String> = words(&help, "--")
        .into_iter()
        .filter(|f| f != "--help" && f != "--version")
        .collect();
    assert!(flags.len() >= 15, "{flags:?}");
    for f in &flags {
        assert!(readme.contains(f.as_str()), "README does not document {f}");
    }
    let vars = words(&help, "NEXTOKEN_");
    assert!(vars.len() >= 15, "{vars:?}");
    for v in &vars {
        assert!(readme.contains(v.as_str()), "README does not document {v}");
    }
    for v in words(&readme, "NEXTOKEN_") {
        assert!(
            vars.contains(&v),
            "README names {v}, which `serve --help` does not accept"
        );
    }
}
