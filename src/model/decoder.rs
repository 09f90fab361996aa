//! The decoder every supported architecture runs (Llama, Mistral, Qwen2, Phi-3, Gemma 2,
//! StarCoder2): pre-norm blocks of GQA attention with rotary embeddings and an MLP, over the
//! ragged batch and the paged KV cache. What differs between families — norm kind, biases,
//! fused projections, gated or plain MLP, sandwich norms, sliding windows, soft-capping — is
//! read from [`ModelConfig`] and the tensor names here; there is one forward pass.
//! Weights are loaded by Hugging Face names from either format (see `weights.rs`).

use candle_core::{Device, Result, Tensor};

use super::attention::{self, AttentionPlan, HeadDims, Rope};
use super::config::{Architecture, ModelConfig};
use super::kv_cache::{KvCache, KvDtype};
use super::linear::Linear;
use super::lora::{self, LoraAdapter, Target};
use super::weights::Weights;
use super::{ForwardBatch, LoadError};

type LoadResult<T> = std::result::Result<T, LoadError>;

/// RMSNorm (`x / sqrt(mean(x²) + eps) · w`) or LayerNorm (`(x - mean) / sqrt(var + eps) · w + b`)
/// of each row.
#[derive(Clone)]
struct Norm {
    /// The multiplier actually applied (Gemma's `1 + w` already added).
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    layer_norm: bool,
    eps: f32,
}

/// `Σₖ f(r, x[r·n + k])` for each of the `R` rows of `x`: per row a serial f32 chain in `k`
/// order from -0.0, what `Iterator::sum` computes for that row alone; the rows' chains run
/// interleaved so that their additions overlap instead of waiting on one another.
fn row_sums<const R: usize>(x: &[f32], n: usize, f: impl Fn(usize, f32) -> f32) -> [f32; R] {
    let rows: [&[f32]; R] = std::array::from_fn(|r| &x[r * n..(r + 1) * n]);
    let mut s = [-0.0f32; R];
    for k in 0..n {
        for (r, (s, row)) in s.iter_mut().zip(&rows).enumerate() {
            *s += f(r, row[k]);
        }
    }
    s
}

impl Norm {
    /// Loads `{name}.weight` (and `{name}.bias` when present), `c.hidden_size` wide.
    fn load(w: &mut Weights, name: &str, c: &ModelConfig) -> LoadResult<Norm> {
        Self::load_width(w, name, c, c.hidden_size)
    }

    /// [`Norm::load`] of a norm `h` wide (Qwen3's per-head q/k norms: `head_dim`).
    fn load_width(w: &mut Weights, name: &str, c: &ModelConfig, h: usize) -> LoadResult<Norm> {
        let path = w.path().to_path_buf();
        let vec = |t: Tensor| t.to_vec1::<f32>().map_err(|e| LoadError::format(&path, e));
        let mut weight = vec(w.get(&format!("{name}.weight"), &[h])?)?;
        // HF Gemma stores w and applies (1 + w); GGUF stores 1 + w (llama.cpp adds it).
        if c.architecture.unit_offset_norms() && !w.is_gguf() {
            weight.iter_mut().for_each(|x| *x += 1.0);
        }
        let bias_name = format!("{name}.bias");
        let bias = if w.contains(&bias_name) {
            Some(vec(w.get(&bias_name, &[h])?)?)
        } else {
            None
        };
        Ok(Norm {
            weight,
            bias,
            layer_norm: c.architecture.layer_norm(),
            eps: c.rms_norm_eps as f32,
        })
    }

    fn forward(&self, x: &[f32]) -> Vec<f32> {
        use rayon::prelude::*;
        let n = self.weight.len();
        let mut out = vec![0f32; x.len()];
        if n == 0 {
            return out;
        }
        // Eight rows at a time (their serial sums interleaved); a prefill's rows on every core.
        let group = |(xg, og): (&[f32], &mut [f32])| {
            if xg.len() == 8 * n {
                self.normalize::<8>(xg, og);
            } else {
                for (xr, or) in xg.chunks_exact(n).zip(og.chunks_exact_mut(n)) {
                    self.normalize::<1>(xr, or);
                }
            }
        };
        if x.len() >= 64 * n {
            x.par_chunks(8 * n)
                .zip(out.par_chunks_mut(8 * n))
                .for_each(group);
        } else {
            x.chunks(8 * n).zip(out.chunks_mut(8 * n)).for_each(group);
        }
        out
    }

    /// `R` rows of `x` normalised into `out`. Per row exactly the arithmetic of one row alone:
    /// its sums are serial chains in its own order (see [`row_sums`]).
    fn normalize<const R: usize>(&self, x: &[f32], out: &mut [f32]) {
        let n = self.weight.len();
        let nf = n as f32;
        if self.layer_norm {
            let sums = row_sums::<R>(x, n, |_, v| v);
            let mean: [f32; R] = std::array::from_fn(|r| sums[r] / nf);
            let var = row_sums::<R>(x, n, |r, v| (v - mean[r]) * (v - mean[r]));
            for (r, (xr, or)) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)).enumerate() {
                let d = (var[r] / nf + self.eps).sqrt();
                for ((o, v), w) in or.iter_mut().zip(xr).zip(&self.weight) {
                    *o = (v - mean[r]) / d * w;
                }
            }
        } else {
            let sum2 = row_sums::<R>(x, n, |_, v| v * v);
            for (r, (xr, or)) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)).enumerate() {
                let m = (sum2[r] / nf + self.eps).sqrt();
                for ((o, v), w) in or.iter_mut().zip(xr).zip(&self.weight) {
                    *o = v / m * w;
                }
            }
        }
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(n) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        }
    }

    /// The weight in HF terms (Gemma's unit offset taken back out).
    fn hf_weight(&self, arch: Architecture) -> Vec<f32> {
        if arch.unit_offset_norms() {
            self.weight.iter().map(|x| x - 1.0).collect()
        } else {
            self.weight.clone()
        }
    }

    fn named(&self, arch: Architecture, name: &str, out: &mut Vec<(String, Tensor)>) -> Result<()> {
        let w = self.hf_weight(arch);
        out.push((
            format!("{name}.weight"),
            Tensor::from_slice(&w, w.len(), &Device::Cpu)?,
        ));
        if let Some(b) = &self.bias {
            out.push((
                format!("{name}.bias"),
                Tensor::from_slice(b, b.len(), &Device::Cpu)?,
            ));
        }
        Ok(())
    }
}
/// Projections of one input, stacked into a single kernel call when their storage allows
/// (each output column is computed independently, so stacking changes no result).
#[derive(Clone)]
enum Projections {
    Stacked(Linear, Vec<usize>),
    Separate(Vec<Linear>),
}

impl Projections {
    fn new(parts: Vec<Linear>) -> Self {
        if parts.len() < 2 {
            return Projections::Separate(parts);
        }
        let refs: Vec<&Linear> = parts.iter().collect();
        match Linear::stack(&refs) {
            Some(l) => Projections::Stacked(l, parts.iter().map(|p| p.dims().0).collect()),
            None => Projections::Separate(parts),
        }
    }

    /// Each projection's `(rows, out_i)` output.
    fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<Vec<f32>>> {
        match self {
            Projections::Separate(parts) => {
                let refs: Vec<&Linear> = parts.iter().collect();
                let many = (refs.len() > 1)
                    .then(|| Linear::forward_many(&refs, x, rows))
                    .flatten();
                match many {
                    Some(outs) => Ok(outs),
                    None => parts.iter().map(|p| p.forward_vec(x, rows)).collect(),
                }
            }
            Projections::Stacked(l, widths) => l.forward_parts(x, rows, widths),
        }
    }

    /// Each projection's weight as f32 `(out_i, in)`, with its bias.
    fn parts_f32(&self) -> Result<Vec<(Tensor, Option<Tensor>)>> {
        match self {
            Projections::Separate(parts) => parts
                .iter()
                .map(|p| Ok((p.weight_f32()?, p.bias().cloned())))
                .collect(),
            Projections::Stacked(l, widths) => {
                let w = l.weight_f32()?;
                let mut at = 0;
                let mut out = Vec::new();
                for &n in widths {
                    let b = l.bias().map(|b| b.narrow(0, at, n)).transpose()?;
                    out.push((w.narrow(0, at, n)?, b));
                    at += n;
                }
                Ok(out)
            }
        }
    }

    /// All projections as one fused f32 weight `(Σ out_i, in)` (Phi-3's layout), with bias.
    fn fused_f32(&self) -> Result<(Tensor, Option<Tensor>)> {
        match self {
            Projections::Stacked(l, _) => Ok((l.weight_f32()?, l.bias().cloned())),
            Projections::Separate(parts) if parts.len() == 1 => {
                Ok((parts[0].weight_f32()?, parts[0].bias().cloned()))
            }
            Projections::Separate(_) => {
                let parts = self.parts_f32()?;
                let ws: Vec<Tensor> = parts.iter().map(|p| p.0.clone()).collect();
                let bs: Option<Vec<Tensor>> = parts.iter().map(|p| p.1.clone()).collect();
                Ok((
                    Tensor::cat(&ws, 0)?,
                    bs.map(|b| Tensor::cat(&b, 0)).transpose()?,
                ))
            }
        }
    }

    /// All projections as one layer (outputs side by side): the stacked kernel when there is
    /// one, else the weights concatenated in f32.
    fn joined(&self) -> Result<Linear> {
        match self {
            Projections::Stacked(l, _) => Ok(l.clone()),
            Projections::Separate(parts) if parts.len() == 1 => Ok(parts[0].clone()),
            Projections::Separate(_) => {
                let (w, b) = self.fused_f32()?;
                Ok(Linear::new(w, b))
            }
        }
    }

    fn has_bias(&self) -> bool {
        match self {
            Projections::Stacked(l, _) => l.bias().is_some(),
            Projections::Separate(parts) => parts.iter().any(|p| p.bias().is_some()),
        }
    }
}

/// One layer's weights for the training graph (see [`Decoder::training_weights`]).
pub(super) struct TrainingLayer {
    pub input_norm: Vec<f32>,
    pub post_attention_norm: Vec<f32>,
    pub qkv: Linear,
    pub o: Linear,
    pub gate_up: Linear,
    pub down: Linear,
}

/// The whole model's weights for the training graph.
pub(super) struct TrainingWeights {
    pub layers: Vec<TrainingLayer>,
    pub embed: Linear,
    pub norm: Vec<f32>,
    pub head: Linear,
}

#[derive(Clone)]
struct Block {
    attn_norm: Norm,
    qkv: Projections, // q (num_heads * head_dim), k, v (num_kv_heads * head_dim)
    /// Qwen3: each head of q, and of k, RMS-normalised (`head_dim` wide) before rope.
    qk_norm: Option<(Norm, Norm)>,
    o_proj: Linear, // (hidden, num_heads * head_dim)
    /// Gemma 2: the attention output is normalised before the residual add.
    post_attn_norm: Option<Norm>,
    ffn_norm: Norm,
    /// Gated: gate, up (intermediate each). Plain: fc.
    mlp_in: Projections,
    down_proj: Linear, // (hidden, intermediate)
    /// Gemma 2: the MLP output is normalised before the residual add.
    post_ffn_norm: Option<Norm>,
}

/// HF names of one block's tensors (without `.weight`/`.bias`), per architecture.
struct BlockNames {
    attn_norm: &'static str,
    ffn_norm: &'static str,
    post_attn_norm: Option<&'static str>,
    post_ffn_norm: Option<&'static str>,
    /// One fused name, or q/k/v.
    qkv: &'static [&'static str],
    /// One fused (gate then up) or plain (fc) name, or gate/up.
    mlp_in: &'static [&'static str],
    down: &'static str,
}

impl BlockNames {
    fn of(arch: Architecture) -> Self {
        let mut n = BlockNames {
            attn_norm: "input_layernorm",
            ffn_norm: "post_attention_layernorm",
            post_attn_norm: None,
            post_ffn_norm: None,
            qkv: &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            mlp_in: &["mlp.gate_proj", "mlp.up_proj"],
            down: "mlp.down_proj",
        };
        match arch {
            Architecture::Phi3 => {
                n.qkv = &["self_attn.qkv_proj"];
                n.mlp_in = &["mlp.gate_up_proj"];
            }
            Architecture::Starcoder2 => {
                n.mlp_in = &["mlp.c_fc"];
                n.down = "mlp.c_proj";
            }
            Architecture::Gemma2 => {
                n.ffn_norm = "pre_feedforward_layernorm";
                n.post_attn_norm = Some("post_attention_layernorm");
                n.post_ffn_norm = Some("post_feedforward_layernorm");
            }
            _ => {}
        }
        n
    }
}

/// A model of any supported architecture with its weights in memory. Cloning shares the
/// (immutable) weights.
#[derive(Clone)]
pub struct Decoder {
    config: ModelConfig,
    embed_tokens: Linear, // (vocab, hidden); also the head when tied
    blocks: Vec<Block>,
    norm: Norm,
    lm_head: Linear, // (vocab, hidden); shares storage with embed_tokens when tied
    rope: Rope,
}

/// Loads `{name}.weight` `(out, inp)` and `{name}.bias` when the file has one.
fn linear(w: &mut Weights, name: &str, out: usize, inp: usize) -> LoadResult<Linear> {
    let l = w.get_linear(&format!("{name}.weight"), [out, inp])?;
    let bias_name = format!("{name}.bias");
    if w.contains(&bias_name) {
        let b = w.get(&bias_name, &[out])?;
        return Ok(l.with_bias(b));
    }
    Ok(l)
}

impl Decoder {
    /// Loads every tensor the config implies, checking shapes.
    pub fn load(config: ModelConfig, w: &mut Weights) -> LoadResult<Self> {
        let c = &config;
        let arch = c.architecture;
        let (h, q, kv, ff) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let rotary = c.features.rotary_dim.unwrap_or(c.head_dim);
        if !rotary.is_multiple_of(2) || rotary > c.head_dim {
            return Err(LoadError::format(
                w.path(),
                "the rotary dimensions must be even and fit in head_dim",
            ));
        }
        let names = BlockNames::of(arch);
        let embed_tokens = w.get_linear("model.embed_tokens.weight", [c.vocab_size, h])?;
        let mut blocks = Vec::with_capacity(c.num_layers);
        let mut biases = (false, false, false);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let qkv = match names.qkv {
                [fused] => {
                    let l = linear(w, &format!("{p}.{fused}"), q + 2 * kv, h)?;
                    Projections::Stacked(l, vec![q, kv, kv])
                }
                parts => {
                    let mut ls = Vec::new();
                    for (name, out) in parts.iter().zip([q, kv, kv]) {
                        ls.push(linear(w, &format!("{p}.{name}"), out, h)?);
                    }
                    Projections::new(ls)
                }
            };
            let mlp_in = match (names.mlp_in, arch.gated_mlp()) {
                ([fused], true) => {
                    let l = linear(w, &format!("{p}.{fused}"), 2 * ff, h)?;
                    Projections::Stacked(l, vec![ff, ff])
                }
                ([plain], false) => {
                    Projections::Separate(vec![linear(w, &format!("{p}.{plain}"), ff, h)?])
                }
                (parts, _) => {
                    let mut ls = Vec::new();
                    for name in parts {
                        ls.push(linear(w, &format!("{p}.{name}"), ff, h)?);
                    }
                    Projections::new(ls)
                }
            };
            let o_proj = linear(w, &format!("{p}.self_attn.o_proj"), h, q)?;
            let down_proj = linear(w, &format!("{p}.{}", names.down), h, ff)?;
            biases = (
                qkv.has_bias(),
                o_proj.bias().is_some(),
                down_proj.bias().is_some(),
            );
            let qk_norm = if arch.qk_norm() {
                let mut head_norm =
                    |n: &str| Norm::load_width(w, &format!("{p}.self_attn.{n}"), c, c.head_dim);
                Some((head_norm("q_norm")?, head_norm("k_norm")?))
            } else {
                None
            };
            let mut norm = |n: &str| Norm::load(w, &format!("{p}.{n}"), c);
            blocks.push(Block {
                qk_norm,
                attn_norm: norm(names.attn_norm)?,
                ffn_norm: norm(names.ffn_norm)?,
                post_attn_norm: names.post_attn_norm.map(&mut norm).transpose()?,
                post_ffn_norm: names.post_ffn_norm.map(&mut norm).transpose()?,
                qkv,
                o_proj,
                mlp_in,
                down_proj,
            });
        }
        let norm = Norm::load(w, "model.norm", c)?;
        let tied = c.tie_word_embeddings || !w.contains("lm_head.weight");
        let lm_head = if tied {
            embed_tokens.clone()
        } else {
            w.get_linear("lm_head.weight", [c.vocab_size, h])?
        };
        let mut config = config;
        config.tie_word_embeddings = tied;
        // What the file holds is what runs (and what `convert` writes back).
        (
            config.features.qkv_bias,
            config.features.o_bias,
            config.features.mlp_bias,
        ) = biases;
        let rope = Rope::new(&config);
        Ok(Decoder {
            config,
            embed_tokens,
            blocks,
            norm,
            lm_head,
            rope,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// f16 KV when the projections are block-quantized (see `Model::kv_dtype`), else f32.
    pub fn kv_dtype(&self) -> KvDtype {
        let quantized = self.blocks.first().is_some_and(|b| b.o_proj.is_quantized());
        if quantized {
            KvDtype::F16
        } else {
            KvDtype::F32
        }
    }

    /// One step over a ragged batch; see [`super::Model::forward_with_hidden`].
    pub fn forward(&self, batch: &ForwardBatch, kv: &mut KvCache) -> Result<(Tensor, Vec<f32>)> {
        let c = &self.config;
        let rows = batch.token_ids.len();
        let mut x = self
            .embed_tokens
            .rows(&batch.token_ids)?
            .flatten_all()?
            .to_vec1::<f32>()?; // (T, hidden)
        if c.architecture == Architecture::Gemma2 {
            let normalizer = (c.hidden_size as f64).sqrt() as f32;
            x.iter_mut().for_each(|v| *v *= normalizer);
        }
        let rope = self.rope.tables(&batch.positions);
        let plan = AttentionPlan::new(batch, kv.block_size(), c.features.sliding_window);
        // Each row's adapter, only when some sequence has one (the base-only path stays bare).
        let row_adapters: Option<Vec<Option<&LoraAdapter>>> =
            batch.seqs.iter().any(|s| s.adapter.is_some()).then(|| {
                batch
                    .seqs
                    .iter()
                    .flat_map(|s| std::iter::repeat_n(s.adapter.as_deref(), s.query_len))
                    .collect()
            });
        let lora = |ra: &Option<Vec<Option<&LoraAdapter>>>,
                    y: &mut [f32],
                    x: &[f32],
                    layer: usize,
                    t: Target| match ra {
            Some(ra) => lora::add_deltas(y, x, ra, layer, t),
            None => Ok(()),
        };
        // Only the output rows (each sequence's last, unless it asks for all) reach the head:
        // in the last layer the other rows stop once their keys and values are written
        // (llama.cpp selects its output rows the same way), sparing a prefill step one layer's
        // attention and most of one layer's matmuls. A kept row's arithmetic is the same as in
        // the full batch (rows are independent).
        let outputs = batch.output_rows();
        let tail = (rows > outputs.len()).then(|| {
            let b = output_batch(batch, &outputs);
            let plan = AttentionPlan::new(&b, kv.block_size(), c.features.sliding_window);
            let adapters: Option<Vec<Option<&LoraAdapter>>> = row_adapters.as_ref().map(|_| {
                batch
                    .seqs
                    .iter()
                    .zip(outputs_per_seq(batch))
                    .flat_map(|(s, n)| std::iter::repeat_n(s.adapter.as_deref(), n))
                    .collect()
            });
            (b, plan, adapters)
        });
        let act = c.features.hidden_act;
        let hidden = c.hidden_size;
        let mut narrowed = false;
        for (i, b) in self.blocks.iter().enumerate() {
            let h = b.attn_norm.forward(&x);
            let mut qkv = b.qkv.forward(&h, rows)?.into_iter();
            let (Some(mut q), Some(mut k), Some(mut v)) = (qkv.next(), qkv.next(), qkv.next())
            else {
                candle_core::bail!("q/k/v projections missing");
            };
            lora(&row_adapters, &mut q, &h, i, Target::Q)?;
            lora(&row_adapters, &mut k, &h, i, Target::K)?;
            lora(&row_adapters, &mut v, &h, i, Target::V)?;
            if let Some((qn, kn)) = &b.qk_norm {
                // Rows of `head_dim`: every head of every token on its own.
                q = qn.forward(&q);
                k = kn.forward(&k);
            }
            rope.apply(&mut q, c.num_heads);
            rope.apply(&mut k, c.num_kv_heads);
            let window = c.layer_window(i);
            let layer = kv.layer_mut(i);
            let slots = plan.write_slots(batch, window.is_some());
            attention::write_kv(layer, slots, &k, &v, c.kv_dim());
            let (batch, plan, row_adapters, rows) = match &tail {
                Some((tb, tp, ta)) if i + 1 == self.blocks.len() => {
                    q = gather_rows(&q, &outputs, q.len() / rows);
                    x = gather_rows(&x, &outputs, hidden);
                    narrowed = true;
                    (tb, tp, ta, outputs.len())
                }
                _ => (batch, &plan, &row_adapters, rows),
            };
            let dims = HeadDims {
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
                scale: c.attention_scale(),
                softcap: c.features.attn_logit_softcapping.map(|s| s as f32),
                window,
            };
            let attn = attention::attend(&q, layer, batch, plan, dims);
            let mut o = b.o_proj.forward_vec(&attn, rows)?;
            lora(row_adapters, &mut o, &attn, i, Target::O)?;
            if let Some(n) = &b.post_attn_norm {
                o = n.forward(&o);
            }
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let h = b.ffn_norm.forward(&x);
            let mut parts = b.mlp_in.forward(&h, rows)?.into_iter();
            let Some(mut gate) = parts.next() else {
                candle_core::bail!("MLP input projection missing");
            };
            if let Some(mut up) = parts.next() {
                lora(row_adapters, &mut gate, &h, i, Target::Gate)?;
                lora(row_adapters, &mut up, &h, i, Target::Up)?;
                act.apply_gated(&mut gate, &up);
            } else {
                lora(row_adapters, &mut gate, &h, i, Target::Up)?;
                act.apply(&mut gate);
            }
            let mut mlp = b.down_proj.forward_vec(&gate, rows)?;
            lora(row_adapters, &mut mlp, &gate, i, Target::Down)?;
            if let Some(n) = &b.post_ffn_norm {
                mlp = n.forward(&mlp);
            }
            x.iter_mut().zip(&mlp).for_each(|(a, b)| *a += b);
        }
        // Only the output rows go through the (large) output head (`x` holds just those once
        // the last layer was narrowed).
        let last = if narrowed || outputs.len() == rows {
            x
        } else {
            gather_rows(&x, &outputs, hidden)
        };
        let x = self.norm.forward(&last);
        let mut logits = self.lm_head.forward_vec(&x, outputs.len())?;
        if let Some(cap) = c.features.final_logit_softcapping {
            let cap = cap as f32;
            logits.iter_mut().for_each(|l| *l = (*l / cap).tanh() * cap);
        }
        let logits = Tensor::from_vec(logits, (outputs.len(), c.vocab_size), &Device::Cpu)?;
        Ok((logits, x))
    }

    /// The weights the training graph runs, shared with this model (no copies): per layer
    /// the norms' multipliers, q/k/v stacked in that order, o, gate/up stacked, down; then the
    /// embedding table, the final norm and the head.
    pub(super) fn training_weights(&self) -> Result<TrainingWeights> {
        let layers = self
            .blocks
            .iter()
            .map(|b| {
                Ok(TrainingLayer {
                    input_norm: b.attn_norm.weight.clone(),
                    post_attention_norm: b.ffn_norm.weight.clone(),
                    qkv: b.qkv.joined()?,
                    o: b.o_proj.clone(),
                    gate_up: b.mlp_in.joined()?,
                    down: b.down_proj.clone(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(TrainingWeights {
            layers,
            embed: self.embed_tokens.clone(),
            norm: self.norm.weight.clone(),
            head: self.lm_head.clone(),
        })
    }

    /// How the projections and the head hold their weights: counts by format (`"Q4_K"`, ...,
    /// `"f32"`; stacked q/k/v or gate/up count once).
    pub fn weight_formats(&self) -> std::collections::BTreeMap<&'static str, usize> {
        let mut counts = std::collections::BTreeMap::new();
        let projections = |p: &Projections| -> Vec<&'static str> {
            match p {
                Projections::Stacked(l, _) => vec![l.format_name()],
                Projections::Separate(parts) => parts.iter().map(Linear::format_name).collect(),
            }
        };
        for b in &self.blocks {
            let mut names = projections(&b.qkv);
            names.extend(projections(&b.mlp_in));
            names.extend([b.o_proj.format_name(), b.down_proj.format_name()]);
            for n in names {
                *counts.entry(n).or_insert(0) += 1;
            }
        }
        *counts.entry(self.lm_head.format_name()).or_insert(0) += 1;
        counts
    }

    /// Every weight by its Hugging Face name (this architecture's names), as f32; the head is
    /// omitted when tied.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let arch = self.config.architecture;
        let names = BlockNames::of(arch);
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.weight_f32()?,
        )];
        let push_linear =
            |out: &mut Vec<(String, Tensor)>, name: String, w: Tensor, b: Option<Tensor>| {
                out.push((format!("{name}.weight"), w));
                if let Some(b) = b {
                    out.push((format!("{name}.bias"), b));
                }
            };
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{i}");
            b.attn_norm
                .named(arch, &format!("{p}.{}", names.attn_norm), &mut out)?;
            b.ffn_norm
                .named(arch, &format!("{p}.{}", names.ffn_norm), &mut out)?;
            if let (Some(n), Some(name)) = (&b.post_attn_norm, names.post_attn_norm) {
                n.named(arch, &format!("{p}.{name}"), &mut out)?;
            }
            if let (Some(n), Some(name)) = (&b.post_ffn_norm, names.post_ffn_norm) {
                n.named(arch, &format!("{p}.{name}"), &mut out)?;
            }
            if let Some((qn, kn)) = &b.qk_norm {
                qn.named(arch, &format!("{p}.self_attn.q_norm"), &mut out)?;
                kn.named(arch, &format!("{p}.self_attn.k_norm"), &mut out)?;
            }
            for (proj, list) in [(&b.qkv, names.qkv), (&b.mlp_in, names.mlp_in)] {
                let parts = if list.len() == 1 {
                    vec![proj.fused_f32()?]
                } else {
                    proj.parts_f32()?
                };
                for (name, (w, bias)) in list.iter().zip(parts) {
                    push_linear(&mut out, format!("{p}.{name}"), w, bias);
                }
            }
            push_linear(
                &mut out,
                format!("{p}.self_attn.o_proj"),
                b.o_proj.weight_f32()?,
                b.o_proj.bias().cloned(),
            );
            push_linear(
                &mut out,
                format!("{p}.{}", names.down),
                b.down_proj.weight_f32()?,
                b.down_proj.bias().cloned(),
            );
        }
        self.norm.named(arch, "model.norm", &mut out)?;
        if !self.config.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), self.lm_head.weight_f32()?));
        }
        Ok(out)
    }
}

/// How many output rows each sequence of `batch` has (see [`ForwardBatch::output_rows`]).
fn outputs_per_seq(batch: &ForwardBatch) -> impl Iterator<Item = usize> + '_ {
    batch
        .seqs
        .iter()
        .map(|s| if s.all_logits { s.query_len } else { 1 })
}

/// Rows `indices` of the `width`-wide rows of `x`.
fn gather_rows(x: &[f32], indices: &[usize], width: usize) -> Vec<f32> {
    indices
        .iter()
        .flat_map(|&r| &x[r * width..(r + 1) * width])
        .copied()
        .collect()
}

/// The batch of the output rows only (`rows`: [`ForwardBatch::output_rows`]): same contexts,
/// each sequence's queries narrowed to its output rows (the last, or all).
fn output_batch(batch: &ForwardBatch, rows: &[usize]) -> ForwardBatch {
    ForwardBatch {
        token_ids: rows.iter().map(|&r| batch.token_ids[r]).collect(),
        positions: rows.iter().map(|&r| batch.positions[r]).collect(),
        slots: rows.iter().map(|&r| batch.slots[r]).collect(),
        seqs: batch
            .seqs
            .iter()
            .zip(outputs_per_seq(batch))
            .map(|(s, n)| super::SeqSpan {
                query_len: n,
                ..s.clone()
            })
            .collect(),
        window_ring: batch.window_ring,
    }
}

#[cfg(test)]
#[path = "decoder_tests.rs"]
mod tests;
