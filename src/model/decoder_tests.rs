//! Tiny random llama models built in code: the batched, cached forward against a naive f64
//! reference written from the paper's equations, and ragged/chunked batches against single runs.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::*;
use crate::model::{ForwardBatch, LoraAdapter, Model, ModelConfig, Target};

fn tiny_config(tied: bool) -> ModelConfig {
    ModelConfig {
        architecture: crate::model::Architecture::Llama,
        vocab_size: 97,
        hidden_size: 48,
        intermediate_size: 80,
        num_layers: 2,
        num_heads: 6,
        num_kv_heads: 2,
        head_dim: 8,
        max_position_embeddings: 256,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        tie_word_embeddings: tied,
        bos_token_id: None,
        eos_token_ids: vec![],
        pad_token_id: None,
        features: Default::default(),
    }
}

/// Deterministic pseudo-random weights (no RNG crate state shared between tests).
fn random_tensor(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let data: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5) * 2.0 * scale
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("shape")
}

fn tiny_tensors(c: &ModelConfig) -> HashMap<String, Tensor> {
    let (h, q, kv, ff) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let mut t = HashMap::new();
    let mut seed = 1;
    let mut add = |name: String, shape: &[usize], scale: f32| {
        seed += 1;
        t.insert(name, random_tensor(shape, seed, scale));
    };
    add("model.embed_tokens.weight".into(), &[c.vocab_size, h], 1.0);
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), &[h], 1.0);
        add(format!("{p}.post_attention_layernorm.weight"), &[h], 1.0);
        add(format!("{p}.self_attn.q_proj.weight"), &[q, h], 0.3);
        add(format!("{p}.self_attn.k_proj.weight"), &[kv, h], 0.3);
        add(format!("{p}.self_attn.v_proj.weight"), &[kv, h], 0.3);
        add(format!("{p}.self_attn.o_proj.weight"), &[h, q], 0.3);
        add(format!("{p}.mlp.gate_proj.weight"), &[ff, h], 0.3);
        add(format!("{p}.mlp.up_proj.weight"), &[ff, h], 0.3);
        add(format!("{p}.mlp.down_proj.weight"), &[h, ff], 0.3);
    }
    add("model.norm.weight".into(), &[h], 1.0);
    if !c.tie_word_embeddings {
        add("lm_head.weight".into(), &[c.vocab_size, h], 0.3);
    }
    t
}

fn tiny_model(tied: bool) -> (Model, HashMap<String, Tensor>) {
    model_of(tiny_config(tied))
}

fn model_of(c: ModelConfig) -> (Model, HashMap<String, Tensor>) {
    let tensors = tiny_tensors(&c);
    let mut w = Weights::from_tensors(Path::new("<tiny>"), tensors.clone());
    let m = Decoder::load(c, &mut w).expect("tiny model loads");
    (Model::Decoder(m), tensors)
}

fn mat(t: &HashMap<String, Tensor>, name: &str) -> Vec<Vec<f64>> {
    let t = &t[name];
    match t.rank() {
        1 => vec![t
            .to_vec1::<f32>()
            .expect("f32")
            .iter()
            .map(|&x| f64::from(x))
            .collect()],
        _ => t
            .to_vec2::<f32>()
            .expect("f32")
            .into_iter()
            .map(|r| r.into_iter().map(f64::from).collect())
            .collect(),
    }
}

fn matvec(w: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
    w.iter()
        .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * g).collect()
}

fn rope(x: &mut [f64], pos: usize, head_dim: usize, theta: f64) {
    let half = head_dim / 2;
    for head in x.chunks_mut(head_dim) {
        for i in 0..half {
            let f = pos as f64 / theta.powf((2 * i) as f64 / head_dim as f64);
            let (x1, x2) = (head[i], head[i + half]);
            head[i] = x1 * f.cos() - x2 * f.sin();
            head[i + half] = x2 * f.cos() + x1 * f.sin();
        }
    }
}

/// Logits at the last position, computed naively over the full sequence in f64.
fn reference_logits(c: &ModelConfig, t: &HashMap<String, Tensor>, ids: &[u32]) -> Vec<f64> {
    let embed = mat(t, "model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> = ids.iter().map(|&i| embed[i as usize].clone()).collect();
    let hd = c.head_dim;
    let group = c.num_heads / c.num_kv_heads;
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let g = |n: &str| mat(t, &format!("{p}.{n}.weight"));
        let (wq, wk, wv, wo) = (
            g("self_attn.q_proj"),
            g("self_attn.k_proj"),
            g("self_attn.v_proj"),
            g("self_attn.o_proj"),
        );
        let (n1, n2) = (
            g("input_layernorm")[0].clone(),
            g("post_attention_layernorm")[0].clone(),
        );
        let (wg, wu, wd) = (g("mlp.gate_proj"), g("mlp.up_proj"), g("mlp.down_proj"));
        let mut qs = vec![];
        let mut ks = vec![];
        let mut vs = vec![];
        for (pos, x) in xs.iter().enumerate() {
            let h = rms_norm(x, &n1, c.rms_norm_eps);
            let mut q = matvec(&wq, &h);
            let mut k = matvec(&wk, &h);
            rope(&mut q, pos, hd, c.rope_theta);
            rope(&mut k, pos, hd, c.rope_theta);
            qs.push(q);
            ks.push(k);
            vs.push(matvec(&wv, &h));
        }
        for (pos, x) in xs.iter_mut().enumerate() {
            let mut attn = vec![0.0; c.q_dim()];
            for head in 0..c.num_heads {
                let kvh = head / group;
                let q = &qs[pos][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=pos)
                    .map(|j| {
                        let k = &ks[j][kvh * hd..(kvh + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    for d in 0..hd {
                        attn[head * hd + d] += w / z * vs[j][kvh * hd + d];
                    }
                }
            }
            let o = matvec(&wo, &attn);
            x.iter_mut().zip(o).for_each(|(a, b)| *a += b);
            let h = rms_norm(x, &n2, c.rms_norm_eps);
            let gate = matvec(&wg, &h);
            let up = matvec(&wu, &h);
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = matvec(&wd, &act);
            x.iter_mut().zip(d).for_each(|(a, b)| *a += b);
        }
    }
    let last = rms_norm(
        xs.last().expect("non-empty"),
        &mat(t, "model.norm.weight")[0],
        c.rms_norm_eps,
    );
    let head = if c.tie_word_embeddings {
        embed
    } else {
        mat(t, "lm_head.weight")
    };
    matvec(&head, &last)
}

fn run_alone(model: &Model, ids: &[u32], chunk: usize) -> Vec<f32> {
    let bs = 4;
    let blocks = ids.len().div_ceil(bs);
    let mut kv = model.new_kv_cache(blocks + 3, bs);
    // A non-trivial block table: blocks in reverse order, offset by 3.
    let table: Vec<u32> = (0..blocks as u32).rev().map(|b| b + 3).collect();
    let mut logits = None;
    let mut pos = 0;
    for part in ids.chunks(chunk) {
        let mut b = ForwardBatch::default();
        b.push_seq(part, pos, &table, bs);
        pos += part.len();
        logits = Some(model.forward(&b, &mut kv).expect("forward"));
    }
    logits
        .expect("ran")
        .squeeze(0)
        .expect("one row")
        .to_vec1::<f32>()
        .expect("f32")
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn forward_matches_naive_reference_gqa_tied_and_untied() {
    for tied in [true, false] {
        let (model, tensors) = tiny_model(tied);
        let c = tiny_config(tied);
        let ids: Vec<u32> = vec![3, 17, 42, 5, 96, 0, 11, 64, 64, 2, 33];
        let ours = run_alone(&model, &ids, 512);
        let want = reference_logits(&c, &tensors, &ids);
        assert_eq!(ours.len(), c.vocab_size);
        for (a, b) in ours.iter().zip(&want) {
            assert!((f64::from(*a) - b).abs() < 1e-4, "tied={tied}: {a} vs {b}");
        }
    }
}

/// Heads wider than `hidden / heads` (Gemma-style `head_dim`): q/o are not square.
#[test]
fn forward_matches_naive_reference_with_head_dim_not_hidden_over_heads() {
    let mut c = tiny_config(false);
    c.head_dim = 12; // 6 heads × 12 = 72 ≠ hidden 48
    let (model, tensors) = model_of(c.clone());
    let ids: Vec<u32> = vec![3, 17, 42, 5, 96, 0, 11, 64, 64, 2, 33];
    let ours = run_alone(&model, &ids, 4);
    let want = reference_logits(&c, &tensors, &ids);
    for (a, b) in ours.iter().zip(&want) {
        assert!((f64::from(*a) - b).abs() < 1e-4, "{a} vs {b}");
    }
}

#[test]
fn chunked_prefill_equals_one_pass() {
    let (model, _) = tiny_model(true);
    let ids: Vec<u32> = (0..37).map(|i| (i * 7 + 3) % 97).collect();
    let one = run_alone(&model, &ids, 512);
    for chunk in [1, 5, 16] {
        let d = max_diff(&one, &run_alone(&model, &ids, chunk));
        assert!(d < 1e-4, "chunk {chunk}: {d}");
    }
}

#[test]
fn ragged_batch_equals_each_sequence_alone() {
    let (model, _) = tiny_model(false);
    let bs = 4;
    let seqs: Vec<Vec<u32>> = vec![
        (0..9).map(|i| (i * 5 + 1) % 97).collect(),
        vec![7],
        (0..14).map(|i| (i * 11 + 2) % 97).collect(),
    ];
    let alone: Vec<Vec<f32>> = seqs.iter().map(|s| run_alone(&model, s, 512)).collect();
    // Sequence 2 has its first 10 tokens cached already; the batch mixes a prefill, a
    // one-token prompt and a 4-token continuation.
    let mut kv = model.new_kv_cache(32, bs);
    let tables: Vec<Vec<u32>> = vec![vec![0, 1, 2], vec![3], vec![10, 4, 20, 5]];
    let mut warm = ForwardBatch::default();
    warm.push_seq(&seqs[2][..10], 0, &tables[2], bs);
    model.forward(&warm, &mut kv).expect("warm-up");
    let mut batch = ForwardBatch::default();
    batch.push_seq(&seqs[0], 0, &tables[0], bs);
    batch.push_seq(&seqs[1], 0, &tables[1], bs);
    batch.push_seq(&seqs[2][10..], 10, &tables[2], bs);
    let logits = model.forward(&batch, &mut kv).expect("forward");
    assert_eq!(logits.dims(), &[3, 97]);
    let rows = logits.to_vec2::<f32>().expect("f32");
    for (i, (row, want)) in rows.iter().zip(&alone).enumerate() {
        let d = max_diff(row, want);
        assert!(d < 1e-4, "sequence {i}: {d}");
    }
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let (model, _) = tiny_model(true);
    let mut kv = model.new_kv_cache(2, 4);
    let mut b = ForwardBatch::default();
    b.push_seq(&[1, 2, 3], 0, &[0], 4);
    b.token_ids[1] = 1000; // outside the vocabulary
    assert!(model.forward(&b, &mut kv).is_err());
    let mut b = ForwardBatch::default();
    b.push_seq(&[1, 2, 3, 4, 5], 0, &[0, 1], 4);
    b.seqs[0].block_table = vec![0]; // does not cover the context
    assert!(model.forward(&b, &mut kv).is_err());
}

#[test]
fn shape_mismatch_is_reported_with_the_tensor_name() {
    let c = tiny_config(true);
    let mut tensors = tiny_tensors(&c);
    tensors.insert(
        "model.layers.1.mlp.up_proj.weight".into(),
        random_tensor(&[81, c.hidden_size], 9, 0.1),
    );
    let mut w = Weights::from_tensors(Path::new("tiny.safetensors"), tensors);
    let err = Decoder::load(c, &mut w)
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("tiny.safetensors"), "{err}");
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("[80, 48]"),
        "{err}"
    );
}

/// `a` as the engine holds it for serving.
fn served(model: &Model, a: &LoraAdapter) -> std::sync::Arc<LoraAdapter> {
    std::sync::Arc::new(
        LoraAdapter::new(
            model.config(),
            a.rank(),
            a.scale() * a.rank() as f64,
            false,
            a.targets()
                .iter()
                .flat_map(|&t| (0..model.config().num_layers).map(move |l| ((l, t), a.get(l, t))))
                .filter_map(|(k, p)| p.map(|p| (k, p.clone())))
                .collect(),
        )
        .expect("adapter fits"),
    )
}

/// Every position's logits from the serving forward, one token per step, with an adapter.
fn serve_positions(model: &Model, ids: &[u32], adapter: Option<&LoraAdapter>) -> Vec<Vec<f32>> {
    let bs = 4;
    let blocks = ids.len().div_ceil(bs);
    let mut kv = model.new_kv_cache(blocks, bs);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let adapter = adapter.map(|a| served(model, a));
    (0..ids.len())
        .map(|p| {
            let mut b = ForwardBatch::default();
            b.push_seq(&ids[p..p + 1], p, &table, bs);
            b.seqs[0].adapter = adapter.clone();
            model
                .forward(&b, &mut kv)
                .expect("forward")
                .squeeze(0)
                .expect("one row")
                .to_vec1::<f32>()
                .expect("f32")
        })
        .collect()
}

/// LoRA variables with a non-zero B (fresh ones start exactly at the base model).
fn perturbed_lora(c: &ModelConfig, targets: &[Target]) -> crate::model::llama_train::LoraVars {
    let lora = crate::model::llama_train::LoraVars::init(c, 4, 8.0, 0.0, targets, 7).expect("init");
    for (i, v) in lora.all_vars().iter().enumerate() {
        if v.dims()[0] != 4 {
            v.set(&random_tensor(v.dims(), 100 + i as u64, 0.2))
                .expect("set");
        }
    }
    lora
}

#[test]
fn training_graph_equals_serving_forward_with_and_without_an_adapter() {
    let (model, _) = tiny_model(false);
    let c = model.config().clone();
    let frozen = model.frozen().expect("frozen");
    let ids = [3u32, 17, 42, 5, 88, 1, 60, 33, 9];
    for targets in [&Target::ALL[..], &[Target::Q, Target::V][..]] {
        let lora = perturbed_lora(&c, targets);
        let adapter = lora.to_adapter(&c).expect("adapter");
        let train = frozen.logits(&ids, &lora).expect("train logits");
        let train = train.to_vec2::<f32>().expect("2d");
        let served = serve_positions(&model, &ids, Some(&adapter));
        let base = serve_positions(&model, &ids, None);
        assert_eq!(train.len(), ids.len() - 1);
        for p in 0..ids.len() - 1 {
            let d = max_diff(&train[p], &served[p]);
            assert!(d < 2e-4, "position {p}: training vs serving differ by {d}");
            assert!(
                max_diff(&served[p], &base[p]) > 1e-2,
                "the adapter changes the logits"
            );
        }
    }
}

/// Three sequences `(tokens, with the adapter, all rows' logits)` as one ragged batch over
/// scattered blocks on a tiny model with a perturbed adapter: the model, the adapter, the
/// batch (for its output rows) and the logits rows it gives.
fn ragged_with_adapter(
    seqs: &[(Vec<u32>, bool, bool); 3],
) -> (Model, LoraAdapter, ForwardBatch, Vec<Vec<f32>>) {
    let (model, _) = tiny_model(false);
    let c = model.config().clone();
    let adapter = perturbed_lora(&c, &Target::ALL)
        .to_adapter(&c)
        .expect("adapter");
    let bs = 4;
    let mut kv = model.new_kv_cache(8, bs);
    let tables: [Vec<u32>; 3] = [vec![5, 0], vec![7], vec![2, 6]];
    let mut batch = ForwardBatch::default();
    for ((ids, with, all), table) in seqs.iter().zip(&tables) {
        batch.push_seq(ids, 0, table, bs);
        let span = batch.seqs.last_mut().expect("pushed");
        span.all_logits = *all;
        if *with {
            span.adapter = Some(served(&model, &adapter));
        }
    }
    let rows = model
        .forward(&batch, &mut kv)
        .expect("forward")
        .to_vec2::<f32>()
        .expect("2d");
    (model, adapter, batch, rows)
}

/// Multi-row sequences (the last layer runs only their last rows) with and without an
/// adapter, next to a one-row sequence, give each sequence's logits of one token per step.
#[test]
fn last_rows_only_in_the_last_layer_keep_every_sequence_and_adapter() {
    let seqs: [(Vec<u32>, bool, bool); 3] = [
        (vec![3, 17, 42, 5, 88, 1, 60], true, false),
        (vec![9], true, false),
        (vec![33, 2, 71, 4, 4, 50], false, false),
    ];
    let (model, adapter, _, rows) = ragged_with_adapter(&seqs);
    for (i, (ids, with, _)) in seqs.iter().enumerate() {
        let one = serve_positions(&model, ids, with.then_some(&adapter));
        let d = max_diff(&rows[i], &one[ids.len() - 1]);
        assert!(d < 1e-4, "sequence {i}: {d}");
    }
}

/// Sequences asking for every row's logits (prompt log-probabilities) get one per row, in
/// batch order, each that position's logits of one token per step; the others keep their last.
#[test]
fn all_logits_sequences_get_every_row_with_and_without_an_adapter() {
    // (tokens, adapter, all rows)
    let seqs: [(Vec<u32>, bool, bool); 3] = [
        (vec![3, 17, 42, 5, 88, 1, 60], true, true),
        (vec![9, 14, 27], false, false),
        (vec![33, 2, 71, 4, 4, 50], false, true),
    ];
    let (model, adapter, batch, rows) = ragged_with_adapter(&seqs);
    let wanted: Vec<usize> = (0..7).chain([9]).chain(10..16).collect();
    assert_eq!(batch.output_rows(), wanted);
    assert_eq!(rows.len(), 14);
    let mut at = 0;
    for (i, (ids, with, all)) in seqs.iter().enumerate() {
        let one = serve_positions(&model, ids, with.then_some(&adapter));
        let positions: Vec<usize> = if *all {
            (0..ids.len()).collect()
        } else {
            vec![ids.len() - 1]
        };
        for p in positions {
            let d = max_diff(&rows[at], &one[p]);
            assert!(d < 1e-4, "sequence {i} position {p}: {d}");
            at += 1;
        }
    }
}

#[test]
fn every_lora_parameter_receives_a_gradient() {
    let (model, _) = tiny_model(true);
    let c = model.config().clone();
    let frozen = model.frozen().expect("frozen");
    let lora = perturbed_lora(&c, &Target::ALL);
    let seqs: [&[u32]; 2] = [&[1, 2, 3, 4, 5, 6], &[9, 8, 7]];
    let masks: [&[bool]; 2] = [
        &[false, false, true, true, true, true],
        &[false, true, true],
    ];
    let batch = crate::model::llama_train::TrainBatch {
        tokens: &seqs,
        targets: &masks,
    };
    let (loss, n) = frozen.loss_sum(&batch, &lora, Some(1)).expect("loss");
    assert_eq!(n, 6);
    let grads = loss.backward().expect("backward");
    let vars = lora.all_vars();
    assert_eq!(vars.len(), c.num_layers * 7 * 2);
    for v in &vars {
        let g = grads
            .get(v.as_tensor())
            .expect("every LoRA factor has a gradient");
        let norm = g
            .sqr()
            .expect("sqr")
            .sum_all()
            .expect("sum")
            .to_scalar::<f32>()
            .expect("f32");
        assert!(norm > 0.0, "zero gradient for a {:?} factor", v.dims());
    }
}

#[test]
fn lora_adapter_round_trips_through_peft_files() {
    let (model, _) = tiny_model(true);
    let c = model.config().clone();
    let adapter = perturbed_lora(&c, &[Target::Q, Target::Down])
        .to_adapter(&c)
        .expect("adapter");
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("my-adapter");
    adapter.save_peft(&path, "tiny").expect("save");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(path.join("adapter_config.json")).expect("config"),
    )
    .expect("json");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "down_proj"])
    );
    let names =
        candle_core::safetensors::load(path.join("adapter_model.safetensors"), &Device::Cpu)
            .expect("safetensors");
    assert!(names.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
    assert_eq!(names.len(), c.num_layers * 2 * 2);
    let back = LoraAdapter::load_peft(&path, &c).expect("load");
    let ids = [5u32, 6, 7, 8];
    assert_eq!(
        serve_positions(&model, &ids, Some(&adapter)),
        serve_positions(&model, &ids, Some(&back))
    );
    // A base model of another shape is refused with the reason.
    let mut other = c.clone();
    other.hidden_size = 64;
    let err = LoraAdapter::load_peft(&path, &other).expect_err("shape mismatch");
    assert!(
        err.to_string().contains("do not fit the base model"),
        "{err}"
    );
}

/// LoRA on the other architectures: serving with an adapter equals serving the base weights
/// with the adapter merged in (`W + scale · B·A`), on the tiny transformers checkpoints.
#[test]
fn lora_on_other_architectures_equals_merged_weights() {
    let targets = [Target::Q, Target::V, Target::O];
    for name in ["qwen2", "qwen3", "mistral", "gemma2", "starcoder2"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/reference/tiny")
            .join(name);
        let (model, _) = Model::load(&dir).expect("tiny model loads");
        let c = model.config().clone();
        let adapter = perturbed_lora(&c, &targets)
            .to_adapter(&c)
            .expect("adapter");
        let mut tensors: HashMap<String, Tensor> = model
            .named_tensors()
            .expect("tensors")
            .into_iter()
            .collect();
        for layer in 0..c.num_layers {
            for t in targets {
                let pair = adapter.get(layer, t).expect("pair");
                let name = format!("model.layers.{layer}.{}.weight", t.module_path());
                let w = &tensors[&name];
                let delta = pair
                    .b
                    .matmul(&pair.a)
                    .and_then(|d| d.affine(adapter.scale(), 0.0))
                    .expect("delta");
                let merged = (w + delta).expect("merge");
                tensors.insert(name, merged);
            }
        }
        let mut w = Weights::from_tensors(Path::new("<merged>"), tensors);
        let merged = Model::Decoder(Decoder::load(c.clone(), &mut w).expect("merged loads"));
        let ids = [1u32, 17, 42, 99, 5, 200, 3, 77, 31, 250, 12, 64];
        let served = serve_positions(&model, &ids, Some(&adapter));
        let want = serve_positions(&merged, &ids, None);
        let base = serve_positions(&model, &ids, None);
        for p in 0..ids.len() {
            let d = max_diff(&served[p], &want[p]);
            assert!(
                d < 2e-4,
                "{name} position {p}: adapter vs merged differ by {d}"
            );
            assert!(
                max_diff(&served[p], &base[p]) > 1e-3,
                "{name}: the adapter matters"
            );
        }
    }
}

/// Norms over many rows (eight interleaved, a prefill's split over cores) give each row the
/// bits of the textbook one-row form: `Iterator::sum` chains, then the elementwise steps.
#[test]
fn norm_rows_match_one_row_at_a_time() {
    let n = 40;
    let weight = crate::model::test_values(n, 7);
    let bias = crate::model::test_values(n, 9);
    for layer_norm in [false, true] {
        for with_bias in [false, true] {
            let norm = Norm {
                weight: weight.clone(),
                bias: with_bias.then(|| bias.clone()),
                layer_norm,
                eps: 1e-5,
            };
            for rows in [1, 3, 8, 9, 17, 64, 70] {
                let x = crate::model::test_values(rows * n, rows as u32);
                let got = norm.forward(&x);
                for (r, row) in x.chunks_exact(n).enumerate() {
                    let want: Vec<f32> = if layer_norm {
                        let mean = row.iter().sum::<f32>() / n as f32;
                        let var =
                            row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
                        let d = (var + 1e-5f32).sqrt();
                        row.iter()
                            .zip(&weight)
                            .map(|(v, w)| (v - mean) / d * w)
                            .collect()
                    } else {
                        let sum2: f32 = row.iter().map(|v| v * v).sum();
                        let m = (sum2 / n as f32 + 1e-5f32).sqrt();
                        row.iter().zip(&weight).map(|(v, w)| v / m * w).collect()
                    };
                    let want: Vec<f32> = want
                        .iter()
                        .zip(&bias)
                        .map(|(v, b)| if with_bias { v + b } else { *v })
                        .collect();
                    let same = got[r * n..(r + 1) * n]
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "layer_norm {layer_norm} bias {with_bias} rows {rows} row {r}"
                    );
                }
            }
        }
    }
}
