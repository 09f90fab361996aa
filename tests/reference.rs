//! The real model against independent references (`tests/reference/`).
//!
//! Float32 weights (the converted folder, and the GGUF written back from it) compute exactly
//! what transformers does in float32 and are held to `hf_f32.json` tightly. The Q4_1 GGUF runs
//! llama.cpp's arithmetic (activations quantized to 8 bits per block before each quantized
//! matmul), so like llama.cpp it lands within about a tenth of a nat of float32: it is held
//! to both `llamacpp_q4_1.json` and `hf_f32.json` with a quantized-arithmetic tolerance, token
//! for token until the reference itself hesitates between its top two.

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

/// Tolerances for the quantized path: its chosen token's log-probability within
/// `Q_LOGPROB_TOL` of the reference's (relative beyond one nat; llama.cpp itself is up to 0.14
/// from float32 on these prompts); tokens equal until a step where the reference's top two
/// are closer than `Q_FLIP_MARGIN` (llama.cpp and float32 themselves part ways at such a step).
const Q_LOGPROB_TOL: f64 = 0.2;
/// The same for a Q4_0 file re-quantized from float32 (coarser weights; its 8-bit activations
/// move one near-tie step — top two 0.09 apart — by 0.37 nats, the other 31 by at most 0.15).
const Q4_0_LOGPROB_TOL: f64 = 0.25;
const Q_FLIP_MARGIN: f64 = 0.5;

/// Greedy run of `prompt_ids` on the GGUF engine, compared with a reference's ids and
/// `(chosen logprob, top1 − top2 margin)` per step.
fn check_quantized(
    engine: &EngineHandle,
    label: &str,
    prompt_ids: Vec<u32>,
    want: &[u32],
    steps: &[(f64, f64)],
    tol: f64,
) {
    let mut request = GenerateRequest::greedy(prompt_ids, want.len());
    request.top_logprobs = Some(5);
    let out = run(engine, request);
    assert_eq!(out.tokens.len(), want.len(), "{label}: length");
    let mut compared = 0;
    for (i, &(chosen_lp, margin)) in steps.iter().enumerate() {
        if out.tokens[i] != want[i] {
            assert!(
                margin < Q_FLIP_MARGIN,
                "{label}: step {i}: got {} want {} (reference margin {margin})",
                out.tokens[i],
                want[i]
            );
            break;
        }
        let ours = out.logprobs[i]
            .as_ref()
            .expect("logprobs requested")
            .logprob;
        // Unlikely tokens' log-probs move more under any rounding: the bound grows with them.
        assert!(
            (f64::from(ours) - chosen_lp).abs() < tol * chosen_lp.abs().max(1.0),
            "{label}: step {i}: logprob {ours} vs {chosen_lp}"
        );
        compared += 1;
    }
    assert!(compared >= 5, "{label}: only {compared} steps compared");
}

#[test]
fn gguf_tracks_llama_cpp() {
    let engine = engine(EngineConfig::default());
    let reference = reference("llamacpp_q4_1.json");
    for (name, case) in reference["cases"].as_object().expect("cases") {
        let steps: Vec<(f64, f64)> = case["top5"]
            .as_array()
            .expect("top5")
            .iter()
            .map(|top| {
                let lp = |j: usize| top[j][1].as_f64().expect("logprob");
                (lp(0), lp(0) - lp(1))
            })
            .collect();
        let want = u32s(&case["output_ids"]);
        check_quantized(
            &engine,
            name,
            u32s(&case["prompt_ids"]),
            &want,
            &steps,
            Q_LOGPROB_TOL,
        );
    }
}

#[test]
fn gguf_tracks_transformers_f32() {
    let engine = engine(EngineConfig::default());
    let reference = reference("hf_f32.json");
    for p in reference["prompts"].as_array().expect("prompts") {
        let name = p["name"].as_str().expect("name");
        let steps: Vec<(f64, f64)> = p["greedy"]["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .map(|st| {
                let lp = st["top5_logprobs"][0].as_f64().expect("logprob");
                (lp, lp - st["top5_logprobs"][1].as_f64().expect("logprob"))
            })
            .collect();
        let want = u32s(&p["greedy"]["new_token_ids"]);
        check_quantized(
            &engine,
            name,
            u32s(&p["prompt_ids"]),
            &want,
            &steps,
            Q_LOGPROB_TOL,
        );
    }
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

/// A Q4_0 GGUF (`convert --quant q4_0` of the f32 folder) keeps its projections 4-bit (as
/// Q4_1 blocks of the same weights, on the 8-bit kernels) and computes what its weights say:
/// it tracks the same file's weights dequantized exactly to float32 (converted back to a
/// folder) as the Q4_1 GGUF tracks transformers — token for token until float32 hesitates,
/// within a quantized tolerance. (Against the original float32 it cannot: re-quantizing
/// to Q4_0 moves the first token of a prompt whose top two were 2.5 nats apart.)
#[test]
fn q4_0_gguf_stays_quantized_and_computes_its_weights() {
    use nextoken::convert::GgufQuant;
    let (path, model, formats) = converted_gguf(GgufQuant::Q4_0, "smollm2-q4_0.gguf");
    assert_eq!(
        model.kv_dtype(),
        nextoken::model::KvDtype::F16,
        "the projections are block-quantized"
    );
    // Q4_0 blocks run as the Q4_1 blocks of the same weights: per layer q/k/v and gate/up
    // (each stacked), o and down, and the tied head.
    assert_eq!(formats, [("Q4_1", 4 * 30 + 1)]);
    tracks_its_own_dequantization(model, &path, "q4_0", Q4_0_LOGPROB_TOL);
}

/// A `Q4_K_M` GGUF (`convert --quant q4_k_m`: llama.cpp's mix, and its fallbacks for rows
/// that do not split into 256 — SmolLM2's 576-wide rows get Q5_0 for Q4_K and Q8_0 for Q6_K,
/// the 1,536-wide `ffn_down` keeps Q4_K, and Q6_K in 14 of the 30 layers) keeps every
/// projection and the head on the quantized kernels — Q4_K and Q6_K as their own panels,
/// Q5_0 as the Q8_0 blocks of the same weights — and tracks the same file dequantized to
/// float32 as the Q4_0 file does.
#[test]
fn q4_k_m_gguf_stays_quantized_and_computes_its_weights() {
    use candle_core::quantized::{gguf_file, GgmlDType};
    use nextoken::convert::GgufQuant;
    let (path, model, formats) = converted_gguf(GgufQuant::Q4KM, "smollm2-q4_k_m.gguf");
    let mut file = std::fs::File::open(&path).expect("open");
    let content = gguf_file::Content::read(&mut file).expect("GGUF header");
    let count = |dtype: GgmlDType| {
        content
            .tensor_infos
            .values()
            .filter(|t| t.ggml_dtype == dtype)
            .count()
    };
    // q, k, o, gate, up in every layer and v in 16: Q5_0; v in 14 and the tied embeddings:
    // Q8_0.
    assert_eq!(
        [
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0
        ]
        .map(count),
        [16, 14, 5 * 30 + 16, 14 + 1]
    );
    // Per layer q/k/v, gate/up (each stacked) and o as Q8_0, plus the head; no f32 copy.
    assert_eq!(formats, [("Q4_K", 16), ("Q6_K", 14), ("Q8_0", 3 * 30 + 1)]);
    tracks_its_own_dequantization(model, &path, "q4_k_m", Q_LOGPROB_TOL);
}

/// The same for a `Q5_K_M` GGUF: Q5_K's fallback for SmolLM2's 576-wide rows is Q5_1, so the
/// file holds Q5_1, Q5_K, Q6_K and Q8_0 — each on its own panels, none as an f32 copy.
#[test]
fn q5_k_m_gguf_stays_quantized_and_computes_its_weights() {
    use nextoken::convert::GgufQuant;
    let (path, model, formats) = converted_gguf(GgufQuant::Q5KM, "smollm2-q5_k_m.gguf");
    // Where v is Q8_0 (14 layers) q/k/v cannot be stacked: q and k count apart.
    assert_eq!(
        formats,
        [
            ("Q5_1", 14 * 4 + 16 * 3),
            ("Q5_K", 16),
            ("Q6_K", 14),
            ("Q8_0", 14 + 1)
        ]
    );
    tracks_its_own_dequantization(model, &path, "q5_k_m", Q_LOGPROB_TOL);
}

/// A Q3_K GGUF (`convert --quant q3_k`: `ffn_down` Q3_K, the 576-wide rows Q4_0) keeps its
/// 3-bit blocks on Q6_K's panels and scores text as the same file dequantized to float32
/// does. Teacher-forced rather than free-running: with weights this coarse the model
/// hesitates early (`fibonacci_def`'s top two within 0.5 nats at its fifth token), so each
/// reference prompt followed by the float32 file's 16 greedy tokens is scored by both, and
/// every position's log-probability of the token that follows agrees within the Q4_0 file's
/// tolerance (one position of `capital_france`, −1.71, moves 0.37 nats).
#[test]
fn q3_k_gguf_stays_quantized_and_computes_its_weights() {
    use nextoken::convert::GgufQuant;
    let (path, model, formats) = converted_gguf(GgufQuant::Q3K, "smollm2-q3_k.gguf");
    assert_eq!(formats, [("Q3_K", 30), ("Q4_1", 3 * 30 + 1)]);
    scores_like_its_own_dequantization(model, &path, "q3_k");
}

/// The GGUF `model` (loaded from `path`) against the same file dequantized exactly to a
/// float32 folder, teacher-forced: each reference prompt followed by the float32 file's 16
/// greedy tokens is scored by both, every position's log-probability of the token that
/// follows within the Q4_0 file's tolerance. Returns the float32 folder.
fn scores_like_its_own_dequantization(
    model: nextoken::model::Model,
    path: &std::path::Path,
    label: &str,
) -> std::path::PathBuf {
    use nextoken::convert::{gguf_to_hf, ConvertDtype};
    let folder = process_dir().join(format!("{label}-f32"));
    gguf_to_hf(path, &folder, ConvertDtype::F32).expect("dequantize to a folder");
    let engine = EngineHandle::spawn(model, EngineConfig::default()).expect("engine");
    let (exact, _) = nextoken::load(&folder).expect("f32 folder loads");
    let exact = EngineHandle::spawn(exact, EngineConfig::default()).expect("engine");
    let scored = |engine: &EngineHandle, ids: Vec<u32>| -> Vec<f64> {
        let mut request = GenerateRequest::greedy(ids, 1);
        request.prompt_logprobs = Some(1);
        let lps = run(engine, request).prompt_logprobs;
        lps.iter().map(|l| f64::from(l.logprob)).collect()
    };
    let reference = reference("hf_f32.json");
    let prompts = reference["prompts"].as_array().expect("prompts");
    let mut positions = 0;
    for p in prompts {
        let name = p["name"].as_str().expect("name");
        let mut ids = u32s(&p["prompt_ids"]);
        ids.extend(run(&exact, GenerateRequest::greedy(ids.clone(), 16)).tokens);
        let (ours, want) = (scored(&engine, ids.clone()), scored(&exact, ids.clone()));
        assert_eq!(ours.len(), ids.len() - 1, "{name}");
        for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() < Q4_0_LOGPROB_TOL * b.abs().max(1.0),
                "{label}/{name}: position {i}: {a} vs {b}"
            );
            positions += 1;
        }
    }
    // Each prompt's 16 continuation tokens at least.
    assert!(
        positions >= 16 * prompts.len(),
        "{positions} positions scored"
    );
    folder
}

/// An `IQ4_XS` GGUF (`convert --quant iq4_xs`: llama.cpp's 4-bit non-linear table; the
/// 1,536-wide `ffn_down` IQ4_XS, SmolLM2's 576-wide rows IQ4_NL — llama.cpp's fallback — and
/// the tied head Q8_0, llama.cpp's Q6_K fallback), whose two types candle's GGUF reader does
/// not know, loads, keeps every projection on the 8-bit kernels (IQ4_NL as the Q8_0 blocks of
/// the same weights, IQ4_XS with exact f32 sub-block scales) and scores text as the same
/// file dequantized to float32 does (teacher-forced, as for Q3_K: re-quantized to this
/// table the model hesitates at once, at `capital_france`'s first token); llama.cpp's `gguf`
/// package dequantizes the file to the same values, bit for bit
/// (`tests/python/gguf_iq4_check.py`).
#[test]
fn iq4_xs_gguf_stays_quantized_and_computes_its_weights() {
    use nextoken::convert::GgufQuant;
    let (path, model, formats) = converted_gguf(GgufQuant::IQ4XS, "smollm2-iq4_xs.gguf");
    // Per layer q/k/v and gate/up (each stacked) and o IQ4_NL, down IQ4_XS; the head.
    assert_eq!(formats, [("IQ4_NL", 3 * 30), ("IQ4_XS", 30), ("Q8_0", 1)]);
    let folder = scores_like_its_own_dequantization(model, &path, "iq4_xs");
    // llama.cpp's own reader gets the values nextoken read (the float32 folder).
    python_check("gguf_iq4_check.py", &[&path, &folder], "IQ4_XS");
}

/// The f32 folder converted to a GGUF file `name` of type `quant`, loaded, with how its weight
/// matrices are held (`weight_formats`).
fn converted_gguf(
    quant: nextoken::convert::GgufQuant,
    name: &str,
) -> (
    std::path::PathBuf,
    nextoken::model::Model,
    Vec<(&'static str, usize)>,
) {
    let path = process_dir().join(name);
    nextoken::convert::hf_to_gguf(converted_dir(), &path, quant).expect("convert to GGUF");
    let (model, _) = nextoken::load(&path).expect("the GGUF loads");
    let formats = model.weight_formats().into_iter().collect();
    (path, model, formats)
}

/// The GGUF `model` (loaded from `path`) against the same file dequantized exactly to a
/// float32 folder, on every reference prompt: token for token until float32 hesitates, each
/// chosen log-probability within `tol` (relative beyond one nat).
fn tracks_its_own_dequantization(
    model: nextoken::model::Model,
    path: &std::path::Path,
    label: &str,
    tol: f64,
) {
    use nextoken::convert::{gguf_to_hf, ConvertDtype};
    let folder = process_dir().join(format!("{label}-f32"));
    gguf_to_hf(path, &folder, ConvertDtype::F32).expect("dequantize to a folder");
    let engine = EngineHandle::spawn(model, EngineConfig::default()).expect("engine");
    let (exact, _) = nextoken::load(&folder).expect("f32 folder loads");
    assert_eq!(exact.kv_dtype(), nextoken::model::KvDtype::F32);
    let exact = EngineHandle::spawn(exact, EngineConfig::default()).expect("engine");
    let reference = reference("hf_f32.json");
    for p in reference["prompts"].as_array().expect("prompts") {
        let name = p["name"].as_str().expect("name");
        let prompt = u32s(&p["prompt_ids"]);
        let mut request = GenerateRequest::greedy(prompt.clone(), 16);
        request.top_logprobs = Some(2);
        let want = run(&exact, request);
        let steps: Vec<(f64, f64)> = want
            .logprobs
            .iter()
            .map(|lp| {
                let top = &lp.as_ref().expect("logprobs").top;
                (f64::from(top[0].1), f64::from(top[0].1 - top[1].1))
            })
            .collect();
        check_quantized(
            &engine,
            &format!("{label}/{name}"),
            prompt,
            &want.tokens,
            &steps,
            tol,
        );
    }
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

/// On the f32 folder, whose greedy run is float32's token for token up to the EOS.
#[test]
fn eos_ends_generation_with_the_eos_id() {
    let (model, tokenizer) = nextoken::load(converted_dir()).expect("converted folder loads");
    let engine = EngineHandle::spawn(model, EngineConfig::default()).expect("engine");
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

/// `prompt` + `continuation` scored in one pass: the log-probabilities of the continuation's
/// tokens, each given everything before it (how evaluation harnesses score text).
fn score_continuation(
    engine: &EngineHandle,
    prompt: &[u32],
    continuation: &[u32],
) -> Vec<nextoken::engine::TokenLogprob> {
    let mut text = prompt.to_vec();
    text.extend(continuation);
    let request = GenerateRequest {
        prompt_logprobs: Some(5),
        ..GenerateRequest::greedy(text, 0)
    };
    let out = run(engine, request);
    assert!(out.tokens.is_empty());
    assert_eq!(
        out.prompt_logprobs.len(),
        prompt.len() + continuation.len() - 1
    );
    out.prompt_logprobs[prompt.len() - 1..].to_vec()
}

/// Prompt log-probabilities on the reference's own tokens (teacher forcing: every step is
/// compared, even past a near-tie where free-running greedy may part ways).
#[test]
fn prompt_logprobs_track_llama_cpp_and_transformers() {
    let engine = engine(EngineConfig::default());
    let llama = reference("llamacpp_q4_1.json");
    for (name, case) in llama["cases"].as_object().expect("cases") {
        let want = u32s(&case["output_ids"]);
        let scored = score_continuation(&engine, &u32s(&case["prompt_ids"]), &want);
        for (i, top) in case["top5"].as_array().expect("top5").iter().enumerate() {
            let theirs = |j: usize| top[j][1].as_f64().expect("logprob");
            assert_eq!(
                top[0][0].as_u64(),
                Some(u64::from(want[i])),
                "greedy reference"
            );
            let ours = f64::from(scored[i].logprob);
            assert!(
                (ours - theirs(0)).abs() < Q_LOGPROB_TOL * theirs(0).abs().max(1.0),
                "{name}: step {i}: {ours} vs {}",
                theirs(0)
            );
            if theirs(0) - theirs(1) > Q_FLIP_MARGIN {
                assert_eq!(scored[i].top[0].0, want[i], "{name}: step {i}: top token");
            }
        }
    }

    // Float32 weights: transformers' float32 log-probabilities, tightly, at every step.
    let (model, tokenizer) = nextoken::load(converted_dir()).expect("converted folder loads");
    let f32_engine = EngineHandle::spawn(model, EngineConfig::default()).expect("engine");
    let reference = reference("hf_f32.json");
    for p in reference["prompts"].as_array().expect("prompts") {
        let name = p["name"].as_str().expect("name");
        let prompt = tokenizer
            .encode(p["prompt_text"].as_str().expect("text"), true)
            .expect("encode");
        let want = u32s(&p["greedy"]["new_token_ids"]);
        let scored = score_continuation(&f32_engine, &prompt, &want);
        let steps = p["greedy"]["steps"].as_array().expect("steps");
        assert_eq!(steps.len(), want.len());
        for (i, step) in steps.iter().enumerate() {
            let ids = u32s(&step["top5_ids"]);
            let lps = step["top5_logprobs"].as_array().expect("logprobs");
            for (j, (id, lp)) in ids.iter().zip(lps).enumerate() {
                let theirs = lp.as_f64().expect("f64");
                let ours = if j == 0 {
                    assert_eq!(*id, want[i], "{name}: greedy reference");
                    f64::from(scored[i].logprob)
                } else {
                    match scored[i].top.iter().find(|(t, _)| t == id) {
                        Some((_, lp)) => f64::from(*lp),
                        // A near-tie at the fifth place may swap in and out of our top 5.
                        None => continue,
                    }
                };
                assert!(
                    (ours - theirs).abs() < F32_LOGPROB_TOL,
                    "{name}: step {i} token {id}: {ours} vs {theirs}"
                );
            }
        }
    }
}

/// The listing details (Ollama's `details`) read from file headers only: the GGUF file and
/// the float32 folder converted from it hold the same parameters.
#[test]
fn file_details_count_the_same_parameters_in_both_formats() {
    use nextoken::model::details::file_details;
    let gguf = file_details(&model_path()).expect("GGUF details");
    assert_eq!((gguf.format, gguf.quantization.as_str()), ("gguf", "Q4_1"));
    assert_eq!(gguf.parameters, 134_515_008, "SmolLM2-135M");
    let folder = file_details(converted_dir()).expect("folder details");
    assert_eq!(
        (folder.format, folder.quantization.as_str()),
        ("safetensors", "F32")
    );
    assert_eq!(folder.parameters, gguf.parameters);
    assert!(
        folder.size > 4 * folder.parameters,
        "f32 values and a header"
    );
    assert!(file_details(&converted_dir().join("config.json")).is_err());
}
