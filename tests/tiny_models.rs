//! Tiny random models of every supported architecture saved by transformers
//! (`tests/reference/tiny/`), against the float32 logits transformers computed for them: config
//! parsing (`rope_parameters`, llama3 rope scaling, tied and untied heads, explicit `head_dim`,
//! q/k/v biases, fused projections, LayerNorm, sliding windows, soft-capping, Qwen3's per-head
//! q/k norms) and the forward pass through the engine, without any download.

mod common;

use common::*;
use nextoken::engine::{EngineConfig, EngineHandle, GenerateRequest};
use nextoken::model::{ForwardBatch, Model};

/// One architecture's reference cases: `(input_ids, last_logits, greedy8)`.
type Cases = Vec<(Vec<u32>, Vec<f64>, Vec<u32>)>;

fn cases(name: &str) -> (std::path::PathBuf, Cases) {
    let mut reference = reference("tiny/tiny_models.json");
    if reference["models"][name].is_null() {
        // Made here in the shared file's layout (`scripts/tiny-qwen3-reference.py`).
        reference = common::reference(&format!("tiny/{name}.json"));
    }
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

/// The logits the head gives for a final hidden state (an embedding): the head's weight (the
/// embedding table when tied) times `hidden`, soft-capped where the model caps its logits.
fn head_logits(model: &Model, hidden: &[f32]) -> Vec<f64> {
    let named = model.named_tensors().expect("weights");
    let head = ["lm_head.weight", "model.embed_tokens.weight"]
        .iter()
        .find_map(|n| named.iter().find(|(k, _)| k == n))
        .map(|(_, w)| w.to_vec2::<f32>().expect("2-d"))
        .expect("a head");
    let cap = model.config().features.final_logit_softcapping;
    head.iter()
        .map(|row| {
            let l: f64 = row
                .iter()
                .zip(hidden)
                .map(|(w, h)| f64::from(*w) * f64::from(*h))
                .sum();
            cap.map_or(l, |c| (l / c).tanh() * c)
        })
        .collect()
}

/// An embedding (the last token's final hidden state) through the engine is what the head
/// turns into transformers' last logits.
fn check_embedding(name: &str, model: &Model, hidden: &[f32], want: &[f64], what: &str) {
    assert_eq!(hidden.len(), model.config().hidden_size, "{name} {what}");
    for (a, b) in head_logits(model, hidden).iter().zip(want) {
        assert!((a - b).abs() < 1e-4, "{name} {what}: {a} vs {b}");
    }
}

/// Greedy continuations through the engine: each case alone, then all at once (a mixed
/// batch), with a small block size and token budget so prefill is chunked and the context
/// spans several blocks; embeddings the same way.
fn check_engine(name: &str, model: Model, cases: &Cases) {
    let head = model.clone();
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
    // Embeddings alone, then beside generating requests.
    let embed = |ids: &[u32]| {
        engine
            .submit(GenerateRequest::embedding(ids.to_vec()))
            .expect("submit")
    };
    for (i, (ids, logits, _)) in cases.iter().enumerate() {
        let out = embed(ids).blocking_collect(|_| {}).expect("completes");
        assert!(
            out.tokens.is_empty(),
            "{name}: an embedding generates nothing"
        );
        assert_eq!(out.usage.prompt_tokens, ids.len());
        check_embedding(
            name,
            &head,
            &out.embedding,
            logits,
            &format!("case {i} alone"),
        );
    }
    let mixed: Vec<_> = cases
        .iter()
        .flat_map(|(ids, _, _)| {
            [
                embed(ids),
                engine
                    .submit(GenerateRequest::greedy(ids.clone(), 8))
                    .expect("submit"),
            ]
        })
        .collect();
    for (i, g) in mixed.into_iter().enumerate() {
        let out = g.blocking_collect(|_| {}).expect("completes");
        let (_, logits, want) = &cases[i / 2];
        if i % 2 == 0 {
            check_embedding(name, &head, &out.embedding, logits, "in a mixed batch");
        } else {
            assert_eq!(&out.tokens, want, "{name}: greedy8 beside embeddings");
        }
    }
    let wrong = GenerateRequest {
        max_new_tokens: 1,
        ..GenerateRequest::embedding(vec![1])
    };
    assert!(
        engine.submit(wrong).is_err(),
        "{name}: embeddings generate nothing"
    );
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
fn tiny_qwen3_with_per_head_qk_norms_matches_transformers() {
    check_model("qwen3");
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

/// Largest absolute difference between two logit rows.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A copy of the GGUF `src` without the metadata keys containing `drop`.
fn strip_metadata(src: &std::path::Path, dst: &std::path::Path, drop: &str) {
    use candle_core::quantized::{gguf_file, QTensor};
    let mut f = std::fs::File::open(src).expect("open");
    let content = gguf_file::Content::read(&mut f).expect("GGUF");
    let md: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| !k.contains(drop))
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|n| {
            let t = content
                .tensor(&mut f, n, &candle_core::Device::Cpu)
                .expect("tensor");
            (n.clone(), t)
        })
        .collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = std::fs::File::create(dst).expect("create");
    gguf_file::write(&mut out, &md, &refs).expect("write");
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// `convert DIR OUT.gguf` for every tensor type: the GGUF reads back as the same architecture
/// and runs the same function — exactly in f32 (also through the engine), exactly what its own
/// f16 values say in f16 (checked by converting it back to a folder), and within quantization
/// error for q8_0/q4_0/q4_1/q5_0/q6_k/q4_k_m/q5_k_m.
fn check_gguf(name: &str) {
    use nextoken::convert::{gguf_to_hf, hf_to_gguf, ConvertDtype, GgufQuant};
    let (dir, cases) = cases(name);
    let (folder, _) = Model::load(&dir).expect("folder loads");
    let tmp = tempfile::tempdir().expect("tempdir");
    let folder_logits: Vec<Vec<f32>> = cases.iter().map(|c| last_logits(&folder, &c.0)).collect();
    // (type, max |Δlogit|, min cosine similarity) against the f32 folder; random tiny
    // models amplify weight rounding, so the 4-bit bounds are loose and the cosine says more.
    for (quant, bound, min_cos) in [
        (GgufQuant::F32, 0.0, 0.999_999),
        (GgufQuant::F16, 0.05, 0.9999),
        (GgufQuant::Q8_0, 0.5, 0.995),
        (GgufQuant::Q4_0, 5.0, 0.8),
        (GgufQuant::Q4_1, 5.0, 0.8),
        (GgufQuant::Q5_0, 2.5, 0.9),
        // The k-quants' fallbacks where rows do not split into 256 (Q8_0, Q5_0).
        (GgufQuant::Q6K, 0.5, 0.995),
        (GgufQuant::Q4KM, 2.5, 0.9),
        (GgufQuant::Q5KM, 2.5, 0.9),
    ] {
        let path = tmp.path().join(format!("{name}-{quant:?}.gguf"));
        hf_to_gguf(&dir, &path, quant).expect("convert to GGUF");
        let (gguf, _) = Model::load(&path).expect("GGUF loads");
        let (a, b) = (folder.config(), gguf.config());
        assert_eq!(a.architecture, b.architecture, "{name} {quant:?}");
        assert_eq!(a.features.sliding_layers, b.features.sliding_layers);
        assert_eq!(a.features.sliding_window, b.features.sliding_window);
        assert_eq!(
            (a.features.qkv_bias, a.features.o_bias, a.features.mlp_bias),
            (b.features.qkv_bias, b.features.o_bias, b.features.mlp_bias)
        );
        assert_eq!(a.tie_word_embeddings, b.tie_word_embeddings);
        for (i, (case, want)) in cases.iter().zip(&folder_logits).enumerate() {
            let got = last_logits(&gguf, &case.0);
            let d = max_diff(&got, want);
            let cos = cosine(&got, want);
            eprintln!("{name} {quant:?} case {i}: max |Δlogit| {d}, cosine {cos}");
            assert!(
                d <= bound,
                "{name} {quant:?} case {i}: max |Δlogit| {d} > {bound}"
            );
            assert!(
                cos >= min_cos,
                "{name} {quant:?} case {i}: cosine {cos} < {min_cos}"
            );
        }
        match quant {
            GgufQuant::F32 => {
                check_engine(&format!("{name} GGUF f32"), gguf, &cases);
                if name == "llama" {
                    // As llama.cpp's own files carry Llama 3 scaling: only `rope_freqs`.
                    let bare = tmp.path().join("llama-rope-freqs.gguf");
                    strip_metadata(&path, &bare, "rope.scaling");
                    let (m, _) = Model::load(&bare).expect("loads");
                    assert!(matches!(
                        m.config().rope_scaling,
                        Some(nextoken::model::RopeScaling::FreqFactors(_))
                    ));
                    for (i, (ids, want, _)) in cases.iter().enumerate() {
                        for (a, b) in last_logits(&m, ids).iter().zip(want) {
                            assert!(
                                (f64::from(*a) - b).abs() < 1e-4,
                                "rope_freqs {i}: {a} vs {b}"
                            );
                        }
                    }
                }
            }
            _ => {
                let back = tmp.path().join(format!("{name}-from-{quant:?}"));
                gguf_to_hf(&path, &back, ConvertDtype::F32).expect("back to a folder");
                let (again, _) = Model::load(&back).expect("folder from GGUF loads");
                for case in &cases {
                    // Quantized weights run with 8-bit activations (llama.cpp's arithmetic):
                    // equal to the dequantized weights' f32 run up to that rounding, which
                    // these tiny widths (a few 32-value blocks per row) barely average out:
                    // 1.5–4% of the largest logit here; a layout or sign error is ~100%.
                    let f32_run = last_logits(&again, &case.0);
                    let scale = f32_run.iter().fold(1f32, |m, v| m.max(v.abs()));
                    let d = max_diff(&f32_run, &last_logits(&gguf, &case.0));
                    assert!(
                        d < 0.06 * scale,
                        "{name} {quant:?}: the GGUF run is the function of its dequantized \
                         weights, off by {d}"
                    );
                }
            }
        }
    }
}

/// Every tiny model's architecture, as its folder is named.
const TINY: [&str; 7] = [
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "phi3",
    "gemma2",
    "starcoder2",
];

#[test]
fn tiny_models_convert_to_gguf_and_back() {
    for name in TINY {
        check_gguf(name);
    }
}

/// The GGUF files `convert` writes name their architecture, tensors and metadata keys as
/// llama.cpp does: checked with llama.cpp's own `gguf` package (its HF → GGUF tensor map per
/// architecture, `tests/python/gguf_names_check.py`), so that llama.cpp reads them and
/// nextoken reads llama.cpp's.
#[test]
fn tiny_models_gguf_names_are_llama_cpp_s() {
    use nextoken::convert::{hf_to_gguf, GgufQuant};
    let tmp = tempfile::tempdir().expect("tempdir");
    for name in TINY {
        let (dir, _) = cases(name);
        let path = tmp.path().join(format!("{name}.gguf"));
        hf_to_gguf(&dir, &path, GgufQuant::F32).expect("convert to GGUF");
        python_check("gguf_names_check.py", &[&path, &dir], name);
    }
}

/// Greedy tokens from plain forwards over a KV cache that keeps every position (no engine,
/// no ring): what the engine must reproduce.
fn greedy_direct(model: &Model, prompt: &[u32], new_tokens: usize) -> Vec<u32> {
    let bs = 16;
    let total = prompt.len() + new_tokens;
    let mut kv = model.new_kv_cache(total.div_ceil(bs), bs);
    let table: Vec<u32> = (0..kv.num_blocks() as u32).collect();
    let mut ids = prompt.to_vec();
    let mut start = 0;
    while ids.len() < total {
        let mut batch = ForwardBatch::default();
        batch.push_seq(&ids[start..], start, &table, bs);
        let logits = model
            .forward(&batch, &mut kv)
            .and_then(|l| l.squeeze(0))
            .and_then(|l| l.to_vec1::<f32>())
            .expect("forward");
        start = ids.len();
        let best = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
            .expect("logits");
        ids.push(best as u32);
    }
    ids.split_off(prompt.len())
}

/// Sliding-window layers keep a ring of blocks per sequence: over generations many times the
/// window long, two concurrent sequences never hold more than their rings in the window pool,
/// and their tokens are those of a cache that keeps everything.
#[test]
fn sliding_window_kv_does_not_grow_past_the_window() {
    use nextoken::engine::scheduler::WindowPool;
    for name in ["mistral", "gemma2"] {
        let (dir, cases) = cases(name);
        let (model, _) = Model::load(&dir).expect("tiny model loads");
        let window = model
            .config()
            .features
            .sliding_window
            .expect("sliding window");
        let prompts = [cases[1].0.clone(), cases[0].0.clone()];
        let want: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| greedy_direct(&model, p, 120))
            .collect();
        let (block_size, step_tokens, seqs) = (4, 7, 2);
        let config = EngineConfig {
            kv_cache_bytes: 1 << 20,
            block_size,
            max_batch_tokens: step_tokens,
            max_running_seqs: seqs,
            ..Default::default()
        };
        let engine = EngineHandle::spawn(model, config).expect("engine");
        let ring = WindowPool::ring_blocks(block_size, window, step_tokens);
        assert!(
            ring * block_size < 120,
            "the ring is far shorter than the sequences"
        );
        assert_eq!(engine.stats().kv_window_blocks_total, seqs * ring, "{name}");
        let gens: Vec<_> = prompts
            .iter()
            .map(|p| {
                engine
                    .submit(GenerateRequest::greedy(p.clone(), 120))
                    .expect("submit")
            })
            .collect();
        let mut peak = 0;
        for (i, (g, want)) in gens.into_iter().zip(&want).enumerate() {
            let out = g
                .blocking_collect(|_| peak = peak.max(engine.stats().kv_window_blocks_used))
                .expect("completes");
            assert_eq!(&out.tokens, want, "{name} sequence {i}");
        }
        assert!(peak > 0 && peak <= seqs * ring, "{name}: peak {peak}");
    }
}

/// The same checkpoints with their config written the way older transformers (4.x) wrote it
/// — `rope_theta` and `rope_scaling` at the top level (`type`, not `rope_type`), no
/// `rope_parameters`, no `layer_types` — give the same logits.
#[test]
fn older_config_layout_gives_the_same_logits() {
    for name in ["llama", "qwen2", "mistral", "gemma2"] {
        let (dir, cases) = cases(name);
        let tmp = tempfile::tempdir().expect("tempdir");
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(dir.join(f), tmp.path().join(f)).expect("copy");
        }
        let path = tmp.path().join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        let obj = v.as_object_mut().expect("object");
        let mut rope = obj.remove("rope_parameters").expect("rope_parameters");
        obj.remove("layer_types");
        let rope = rope.as_object_mut().expect("rope object");
        obj.insert(
            "rope_theta".into(),
            rope.remove("rope_theta").expect("theta"),
        );
        let kind = rope.remove("rope_type").expect("rope_type");
        if kind != "default" {
            rope.insert("type".into(), kind);
            obj.insert(
                "rope_scaling".into(),
                serde_json::Value::Object(rope.clone()),
            );
        }
        std::fs::write(&path, v.to_string()).expect("write");
        let (model, _) = Model::load(tmp.path()).expect("older layout loads");
        for (i, (ids, want, _)) in cases.iter().enumerate() {
            let ours = last_logits(&model, ids);
            for (a, b) in ours.iter().zip(want) {
                assert!(
                    (f64::from(*a) - b).abs() < 1e-4,
                    "{name} case {i}: {a} vs {b}"
                );
            }
        }
    }
}

/// Speculative decoding on a tiny random llama (as Q4_1 GGUF: the kernels compute each row
/// the same way whatever the batch), whose continuations fall into loops so that many drafts
/// are confirmed: every sampling setting gives exactly the tokens and log-probabilities of
/// plain decoding — penalties counting the tokens confirmed earlier in the same step, seeded
/// sampling drawing once per kept token — with drafts crossing KV blocks and cut by the
/// step's token budget.
#[test]
fn speculative_decoding_changes_no_token_of_a_tiny_model() {
    use nextoken::convert::{hf_to_gguf, GgufQuant};
    use nextoken::engine::SamplingParams;
    let (folder, cases) = cases("llama");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("llama-q4_1.gguf");
    hf_to_gguf(&folder, &dir, GgufQuant::Q4_1).expect("convert to GGUF");
    let config = EngineConfig {
        kv_cache_bytes: 1 << 20,
        block_size: 4,
        max_batch_tokens: 7,
        ..Default::default()
    };
    let plain =
        EngineHandle::spawn(Model::load(&dir).expect("loads").0, config.clone()).expect("engine");
    let spec = EngineHandle::spawn(
        Model::load(&dir).expect("loads").0,
        EngineConfig {
            speculative_tokens: 5,
            ..config
        },
    )
    .expect("engine");
    let settings = [
        SamplingParams::greedy(),
        SamplingParams {
            frequency_penalty: 0.4,
            ..SamplingParams::greedy()
        },
        SamplingParams {
            presence_penalty: 0.7,
            repetition_penalty: 1.2,
            ..SamplingParams::greedy()
        },
        SamplingParams {
            temperature: 0.8,
            seed: Some(3),
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.5,
            top_k: 5,
            frequency_penalty: 0.3,
            seed: Some(11),
            ..Default::default()
        },
    ];
    let (mut confirmed, mut tokens) = (0, 0);
    for (s, sampling) in settings.iter().enumerate() {
        for (c, (ids, _, _)) in cases.iter().enumerate() {
            let request = GenerateRequest {
                sampling: sampling.clone(),
                top_logprobs: Some(2),
                ..GenerateRequest::greedy(ids.clone(), 200)
            };
            let run = |engine: &EngineHandle| {
                engine
                    .submit(request.clone())
                    .expect("submit")
                    .blocking_collect(|_| {})
                    .expect("completes")
            };
            let want = run(&plain);
            let before = spec.stats().spec_accepted_tokens_total;
            let got = run(&spec);
            assert_eq!(got.tokens, want.tokens, "setting {s}, case {c}");
            assert_eq!(got.logprobs, want.logprobs, "setting {s}, case {c}");
            tokens += want.tokens.len();
            // Published after the step that ended the request, or the one before.
            std::thread::sleep(std::time::Duration::from_millis(20));
            confirmed += spec.stats().spec_accepted_tokens_total - before;
        }
    }
    // Random weights copy little (80 of 3,000 here), enough to cover multi-token steps.
    assert!(
        confirmed >= 40,
        "{confirmed} of {tokens} tokens came from confirmed drafts"
    );
}
