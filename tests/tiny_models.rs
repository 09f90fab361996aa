//! Tiny random models saved by transformers (`tests/reference/tiny/`), against the float32
//! logits transformers computed for them: config parsing (`rope_parameters`, llama3 rope
//! scaling, untied head, explicit `head_dim`) and the forward pass, without any download.

mod common;

use common::*;
use nextoken::engine::{EngineConfig, EngineHandle, GenerateRequest};
use nextoken::model::{ForwardBatch, Model};

fn check_model(name: &str) {
    let reference = reference("tiny/tiny_models.json");
    let entry = &reference["models"][name];
    let dir = repo()
        .join("tests/reference/tiny")
        .join(entry["dir"].as_str().expect("dir"));
    let (model, _) = Model::load(&dir).expect("tiny model loads");
    let mut greedy = Vec::new();
    for (i, case) in entry["cases"].as_array().expect("cases").iter().enumerate() {
        let ids = u32s(&case["input_ids"]);
        let mut kv = model.new_kv_cache(ids.len().div_ceil(16), 16);
        let mut batch = ForwardBatch::default();
        let table: Vec<u32> = (0..kv.num_blocks() as u32).collect();
        batch.push_seq(&ids, 0, &table, 16);
        let logits = model.forward(&batch, &mut kv).expect("forward");
        let ours = logits
            .squeeze(0)
            .expect("row")
            .to_vec1::<f32>()
            .expect("f32");
        let want = case["last_logits"].as_array().expect("logits");
        assert_eq!(ours.len(), want.len());
        for (a, b) in ours.iter().zip(want) {
            let b = b.as_f64().expect("f64");
            assert!(
                (f64::from(*a) - b).abs() < 1e-4,
                "{name} case {i}: {a} vs {b}"
            );
        }
        greedy.push((ids, u32s(&case["greedy8"])));
    }
    let config = EngineConfig {
        kv_cache_bytes: 1 << 20,
        ..Default::default()
    };
    let engine = EngineHandle::spawn(model, config).expect("engine");
    // All cases at once through the engine: a mixed batch.
    let gens: Vec<_> = greedy
        .iter()
        .map(|(ids, _)| {
            engine
                .submit(GenerateRequest::greedy(ids.clone(), 8))
                .expect("submit")
        })
        .collect();
    for (i, (g, (_, want))) in gens.into_iter().zip(&greedy).enumerate() {
        let out = g.blocking_collect(|_| {}).expect("completes");
        assert_eq!(&out.tokens, want, "{name} case {i}: greedy8");
    }
}

#[test]
fn tiny_llama_with_llama3_rope_matches_transformers() {
    check_model("llama");
}
