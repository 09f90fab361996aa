//! The real model against independent references (`tests/reference/`).
//!
//! nextoken computes with f32 activations on exactly dequantized weights — the arithmetic of
//! transformers in float32 — on both paths, so both the GGUF file and the converted f32 folder
//! are held to `hf_f32.json`. (`llamacpp_q4_1.json` uses llama.cpp's quantized activations; its
//! prompt ids are checked, its logits are a different arithmetic.)

mod common;

use common::*;
use nextoken::engine::{generate, GenerateOptions};
use nextoken::model::Model;
use nextoken::text::Tokenizer;

const F32_LOGPROB_TOL: f64 = 1e-3;
const FLIP_MARGIN: f64 = 0.01;

fn check_against_hf(model: &Model, tokenizer: &Tokenizer, label: &str) {
    let reference = reference("hf_f32.json");
    let prompts = reference["prompts"].as_array().expect("prompts");
    assert!(!prompts.is_empty());
    for p in prompts {
        let name = p["name"].as_str().expect("name");
        let prompt_ids = u32s(&p["prompt_ids"]);
        let ids = tokenizer
            .encode(p["prompt_text"].as_str().expect("text"), true)
            .expect("encode");
        assert_eq!(ids, prompt_ids, "{label}/{name}: prompt ids");
        let want = u32s(&p["greedy"]["new_token_ids"]);
        let opts = GenerateOptions {
            max_new_tokens: want.len(),
            ..Default::default()
        };
        let out = generate(model, &ids, &opts, true, |_| {}).expect("generate");
        assert_eq!(out.output_ids.len(), want.len(), "{label}/{name}: length");
        let steps = p["greedy"]["steps"].as_array().expect("steps");
        for (i, step) in steps.iter().enumerate() {
            let margin = step["top1_top2_logit_margin"].as_f64().expect("margin");
            if out.output_ids[i] != want[i] {
                // A flip is tolerated only where the reference itself is a near-tie; after
                // it, the continuations legitimately differ.
                assert!(
                    margin < FLIP_MARGIN,
                    "{label}/{name}: step {i}: got {} want {} (margin {margin})",
                    out.output_ids[i],
                    want[i]
                );
                break;
            }
            let top_ids = u32s(&step["top5_ids"]);
            let top_lp = step["top5_logprobs"].as_array().expect("logprobs");
            for (id, lp) in top_ids.iter().zip(top_lp) {
                let ours = f64::from(out.logprobs[i][*id as usize]);
                let theirs = lp.as_f64().expect("f64");
                assert!(
                    (ours - theirs).abs() < F32_LOGPROB_TOL,
                    "{label}/{name}: step {i} token {id}: {ours} vs {theirs}"
                );
            }
        }
    }
}

#[test]
fn gguf_matches_transformers_f32() {
    let (model, tokenizer) = gguf();
    check_against_hf(model, tokenizer, "gguf");
}

#[test]
fn converted_f32_folder_matches_transformers_f32() {
    let (model, tokenizer) = converted();
    check_against_hf(model, tokenizer, "folder");
}

#[test]
fn prompt_ids_match_llama_cpp() {
    let (_, tokenizer) = gguf();
    let reference = reference("llamacpp_q4_1.json");
    for (name, case) in reference["cases"].as_object().expect("cases") {
        let ids = tokenizer
            .encode(case["prompt"].as_str().expect("prompt"), true)
            .expect("encode");
        assert_eq!(ids, u32s(&case["prompt_ids"]), "{name}");
    }
}

#[test]
fn eos_ends_generation_with_the_eos_id() {
    let (model, tokenizer) = gguf();
    let reference = reference("hf_f32.json");
    let p = &reference["prompts"][0];
    let eos_at = p["greedy"]["first_eos_index"]
        .as_u64()
        .expect("this prompt reaches EOS") as usize;
    let want = &u32s(&p["greedy"]["new_token_ids"])[..=eos_at];
    let opts = GenerateOptions {
        max_new_tokens: 64,
        stop_token_ids: model.config().eos_token_ids.clone(),
        ..Default::default()
    };
    assert_eq!(tokenizer.eos_id(), Some(2));
    let ids = u32s(&p["prompt_ids"]);
    let out = generate(model, &ids, &opts, false, |_| {}).expect("generate");
    assert_eq!(out.output_ids, want);
    assert_eq!(out.finish_reason, nextoken::engine::FinishReason::Stop);
}

#[test]
fn chunked_prefill_and_batching_do_not_change_tokens() {
    let (model, tokenizer) = gguf();
    let prompt = "The lighthouse keeper counted 1,234 ships in 2023; each one carried";
    let ids = tokenizer.encode(prompt, true).expect("encode");
    let run = |chunk: usize| {
        let opts = GenerateOptions {
            max_new_tokens: 16,
            prefill_chunk: chunk,
            ..Default::default()
        };
        generate(model, &ids, &opts, true, |_| {}).expect("generate")
    };
    let whole = run(512);
    for chunk in [1, 3, 7] {
        let part = run(chunk);
        assert_eq!(part.output_ids, whole.output_ids, "chunk {chunk}");
        let d = part.logprobs[0]
            .iter()
            .zip(&whole.logprobs[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-3, "chunk {chunk}: logprob diff {d}");
    }
}
