//! Tiny random models of every supported architecture saved by transformers
//! (`tests/reference/tiny/`), against the float32 logits transformers computed for them: config
//! parsing (`rope_parameters`, llama3 rope scaling, tied and untied heads, explicit `head_dim`,
//! q/k/v biases, fused projections, LayerNorm, sliding windows, soft-capping) and the forward
//! pass through the engine, without any download.

mod common;

use common::*;
use nextoken::engine::{EngineConfig, EngineHandle, GenerateRequest};
use nextoken::model::{ForwardBatch, Model};

/// One architecture's reference cases: `(input_ids, last_logits, greedy8)`.
type Cases = Vec<(Vec<u32>, Vec<f64>, Vec<u32>)>;

fn cases(name: &str) -> (std::path::PathBuf, Cases) {
    let reference = reference("tiny/tiny_models.json");
    let entry = &reference["models"][name];
    let dir = repo()
        .join("tests/reference/tiny")
        .join(entry["dir"].as_str().expect("dir"));
    let cases = entry["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|case| {
            let logits = case["last_logits"]
                .as_array()
                .expect("logits")
                .iter()
                .map(|v| v.as_f64().expect("f64"))
                .collect();
            (u32s(&case["input_ids"]), logits, u32s(&case["greedy8"]))
        })
        .collect();
    (dir, cases)
}

/// The last position's logits of `ids` in one forward pass (no engine).
fn last_logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut kv = model.new_kv_cache(ids.len().div_ceil(16), 16);
    let mut batch = ForwardBatch::default();
    let table: Vec<u32> = (0..kv.num_blocks() as u32).collect();
    batch.push_seq(ids, 0, &table, 16);
    model
        .forward(&batch, &mut kv)
        .and_then(|l| l.squeeze(0))
        .and_then(|l| l.to_vec1::<f32>())
        .expect("forward")
}

/// Greedy continuations through the engine: each case alone, then all at once (a mixed
/// batch), with a small block size and token budget so prefill is chunked and the context
/// spans several blocks.
fn check_engine(name: &str, model: Model, cases: &Cases) {
    let config = EngineConfig {
        kv_cache_bytes: 1 << 20,
        block_size: 4,
        max_batch_tokens: 7,
        ..Default::default()
    };
    let engine = EngineHandle::spawn(model, config).expect("engine");
    for (i, (ids, _, want)) in cases.iter().enumerate() {
        let out = engine
            .submit(GenerateRequest::greedy(ids.clone(), 8))
            .expect("submit")
            .blocking_collect(|_| {})
            .expect("completes");
        assert_eq!(&out.tokens, want, "{name} case {i} alone: greedy8");
    }
    let gens: Vec<_> = cases
        .iter()
        .map(|(ids, _, _)| {
            engine
                .submit(GenerateRequest::greedy(ids.clone(), 8))
                .expect("submit")
        })
        .collect();
    for (i, (g, (_, _, want))) in gens.into_iter().zip(cases).enumerate() {
        let out = g.blocking_collect(|_| {}).expect("completes");
        assert_eq!(
            &out.tokens, want,
            "{name} case {i} in a mixed batch: greedy8"
        );
    }
}

fn check_model(name: &str) {
    let (dir, cases) = cases(name);
    let (model, _) = Model::load(&dir).expect("tiny model loads");
    for (i, (ids, want, _)) in cases.iter().enumerate() {
        let ours = last_logits(&model, ids);
        assert_eq!(ours.len(), want.len());
        for (a, b) in ours.iter().zip(want) {
            assert!(
                (f64::from(*a) - b).abs() < 1e-4,
                "{name} case {i}: {a} vs {b}"
            );
        }
    }
    check_engine(name, model, &cases);
}

#[test]
fn tiny_llama_with_llama3_rope_matches_transformers() {
    check_model("llama");
}

#[test]
fn tiny_qwen2_with_qkv_biases_and_tied_head_matches_transformers() {
    check_model("qwen2");
}

#[test]
fn tiny_mistral_with_sliding_window_matches_transformers() {
    check_model("mistral");
}

#[test]
fn tiny_phi3_with_fused_projections_matches_transformers() {
    check_model("phi3");
}

#[test]
fn tiny_gemma2_with_softcapping_and_alternating_windows_matches_transformers() {
    check_model("gemma2");
}

#[test]
fn tiny_starcoder2_with_layer_norm_and_biases_matches_transformers() {
    check_model("starcoder2");
}
