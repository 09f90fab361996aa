//! The real model against independent references (`tests/reference/`).
//!
//! nextoken computes with f32 activations on exactly dequantized weights — the arithmetic of
//! transformers in float32 — on both paths, so both the GGUF file and the converted f32 folder
//! are held to `hf_f32.json`. (`llamacpp_q4_1.json` uses llama.cpp's quantized activations; its
//! prompt ids are checked, its logits are a different arithmetic.)

mod common;

use common::engine::{engine, run};
use common::*;
use nextoken::engine::{EngineConfig, EngineHandle, FinishReason, GenerateRequest};
use nextoken::text::Tokenizer;

const F32_LOGPROB_TOL: f64 = 1e-3;
const FLIP_MARGIN: f64 = 0.01;

fn check_against_hf(engine: &EngineHandle, tokenizer: &Tokenizer, label: &str) {
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
        let mut request = GenerateRequest::greedy(ids, want.len());
        request.top_logprobs = Some(20);
        let out = run(engine, request);
        assert_eq!(out.tokens.len(), want.len(), "{label}/{name}: length");
        let steps = p["greedy"]["steps"].as_array().expect("steps");
        for (i, step) in steps.iter().enumerate() {
            let margin = step["top1_top2_logit_margin"].as_f64().expect("margin");
            if out.tokens[i] != want[i] {
                // A flip is tolerated only where the reference itself is a near-tie; after
                // it, the continuations legitimately differ.
                assert!(
                    margin < FLIP_MARGIN,
                    "{label}/{name}: step {i}: got {} want {} (margin {margin})",
                    out.tokens[i],
                    want[i]
                );
                break;
            }
            let top_ids = u32s(&step["top5_ids"]);
            let top_lp = step["top5_logprobs"].as_array().expect("logprobs");
            let ours_top = &out.logprobs[i].as_ref().expect("logprobs requested").top;
            for (id, lp) in top_ids.iter().zip(top_lp) {
                let ours = ours_top
                    .iter()
                    .find(|(t, _)| t == id)
                    .map(|(_, lp)| f64::from(*lp))
                    .unwrap_or_else(|| panic!("{label}/{name}: step {i}: {id} not in our top 20"));
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
    check_against_hf(&engine(EngineConfig::default()), &gguf().1, "gguf");
}

#[test]
fn converted_f32_folder_matches_transformers_f32() {
    let (model, tokenizer) = nextoken::load(converted_dir()).expect("converted folder loads");
    let engine = EngineHandle::spawn(model, EngineConfig::default()).expect("engine");
    check_against_hf(&engine, &tokenizer, "folder");
}

#[test]
fn gguf_written_from_the_f32_folder_matches_transformers_f32() {
    let (model, tokenizer) = nextoken::load(gguf_from_folder()).expect("GGUF from folder loads");
    let engine = EngineHandle::spawn(model, EngineConfig::default()).expect("engine");
    check_against_hf(&engine, &tokenizer, "folder → GGUF f32");
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
    let engine = engine(EngineConfig::default());
    let tokenizer = &gguf().1;
    let reference = reference("hf_f32.json");
    let p = &reference["prompts"][0];
    let eos_at = p["greedy"]["first_eos_index"]
        .as_u64()
        .expect("this prompt reaches EOS") as usize;
    let want = &u32s(&p["greedy"]["new_token_ids"])[..=eos_at];
    assert_eq!(tokenizer.eos_id(), Some(2));
    let mut request = GenerateRequest::greedy(u32s(&p["prompt_ids"]), 64);
    request.stop_token_ids = vec![2];
    let out = run(&engine, request);
    assert_eq!(out.tokens, want);
    assert_eq!(out.finish, FinishReason::StopToken(2));
    assert_eq!(out.usage.completion_tokens, want.len());
    assert_eq!(out.usage.prompt_tokens, 5);
}

#[test]
fn chunked_prefill_does_not_change_tokens() {
    let tokenizer = &gguf().1;
    let prompt = "The lighthouse keeper counted 1,234 ships in 2023; each one carried";
    let ids = tokenizer.encode(prompt, true).expect("encode");
    let go = |max_batch_tokens: usize| {
        let engine = engine(EngineConfig {
            max_batch_tokens,
            ..Default::default()
        });
        let mut request = GenerateRequest::greedy(ids.clone(), 16);
        request.top_logprobs = Some(5);
        run(&engine, request)
    };
    let whole = go(512);
    for chunk in [1, 3, 7] {
        let part = go(chunk);
        assert_eq!(part.tokens, whole.tokens, "chunk {chunk}");
        let (a, b) = (
            part.logprobs[0].as_ref().expect("lp"),
            whole.logprobs[0].as_ref().expect("lp"),
        );
        assert!(
            (a.logprob - b.logprob).abs() < 1e-3,
            "chunk {chunk}: {} vs {}",
            a.logprob,
            b.logprob
        );
    }
}
