//! Llama-family decoder (Llama 1/2/3, SmolLM, TinyLlama, Mistral without sliding window):
//! RMSNorm, GQA attention with rotary embeddings, SwiGLU MLP, tied or untied output head.
//! Weights are loaded by Hugging Face names from either format (see `weights.rs`).

use candle_core::{Device, Result, Tensor};

use super::attention::{self, AttentionPlan, HeadDims, Rope};
use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::linear::Linear;
use super::lora::{self, LoraAdapter, Target};
use super::weights::Weights;
use super::{ForwardBatch, LoadError};

#[derive(Clone)]
struct Block {
    input_norm: Vec<f32>,          // (hidden,)
    qkv: Projections,              // q (num_heads * head_dim), k, v (num_kv_heads * head_dim)
    o_proj: Linear,                // (hidden, num_heads * head_dim)
    post_attention_norm: Vec<f32>, // (hidden,)
    gate_up: Projections,          // gate, up (intermediate each)
    down_proj: Linear,             // (hidden, intermediate)
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
        let refs: Vec<&Linear> = parts.iter().collect();
        match Linear::stack(&refs) {
            Some(l) => Projections::Stacked(l, parts.iter().map(|p| p.dims().0).collect()),
            None => Projections::Separate(parts),
        }
    }

    /// Each projection's `(rows, out_i)` output.
    fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<Vec<f32>>> {
        match self {
            Projections::Separate(parts) => parts.iter().map(|p| p.forward_vec(x, rows)).collect(),
            Projections::Stacked(l, widths) => {
                let y = l.forward_vec(x, rows)?;
                let total: usize = widths.iter().sum();
                let mut outs: Vec<Vec<f32>> = widths
                    .iter()
                    .map(|w| Vec::with_capacity(w * rows))
                    .collect();
                for row in y.chunks_exact(total) {
                    let mut at = 0;
                    for (o, w) in outs.iter_mut().zip(widths) {
                        o.extend_from_slice(&row[at..at + w]);
                        at += w;
                    }
                }
                Ok(outs)
            }
        }
    }

    /// Each projection's weight as f32 `(out_i, in)`.
    fn weights_f32(&self) -> Result<Vec<Tensor>> {
        match self {
            Projections::Separate(parts) => parts.iter().map(|p| p.weight_f32()).collect(),
            Projections::Stacked(l, widths) => {
                let w = l.weight_f32()?;
                let mut at = 0;
                let mut out = Vec::new();
                for &n in widths {
                    out.push(w.narrow(0, at, n)?);
                    at += n;
                }
                Ok(out)
            }
        }
    }
}

/// RMSNorm of each row (candle's arithmetic: `x / sqrt(mean(x²) + eps) · w`).
fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(w.len()) {
        let sum2: f32 = row.iter().map(|v| v * v).sum();
        let m = (sum2 / w.len() as f32 + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(v, wi)| v / m * wi));
    }
    out
}

/// A llama-family model with its weights in memory. Cloning shares the (immutable) weights.
#[derive(Clone)]
pub struct Llama {
    config: ModelConfig,
    embed_tokens: Linear, // (vocab, hidden); also the head when tied
    blocks: Vec<Block>,
    norm: Vec<f32>,  // (hidden,)
    lm_head: Linear, // (vocab, hidden); shares storage with embed_tokens when tied
    rope: Rope,
}

impl Llama {
    /// Loads every tensor the config implies, checking shapes.
    pub fn load(config: ModelConfig, w: &mut Weights) -> std::result::Result<Self, LoadError> {
        let c = &config;
        let (h, q, kv, ff) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        if !c.head_dim.is_multiple_of(2) {
            return Err(LoadError::format(
                w.path(),
                "head_dim must be even for rotary embedding",
            ));
        }
        let embed_tokens = w.get_linear("model.embed_tokens.weight", [c.vocab_size, h])?;
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let mut lin =
                |name: &str, out: usize, inp: usize| -> std::result::Result<Linear, LoadError> {
                    w.get_linear(&format!("{p}.{name}.weight"), [out, inp])
                };
            let q_proj = lin("self_attn.q_proj", q, h)?;
            let k_proj = lin("self_attn.k_proj", kv, h)?;
            let v_proj = lin("self_attn.v_proj", kv, h)?;
            let o_proj = lin("self_attn.o_proj", h, q)?;
            let gate_proj = lin("mlp.gate_proj", ff, h)?;
            let up_proj = lin("mlp.up_proj", ff, h)?;
            let down_proj = lin("mlp.down_proj", h, ff)?;
            let path = w.path().to_path_buf();
            let vec = |t: Tensor| t.to_vec1::<f32>().map_err(|e| LoadError::format(&path, e));
            blocks.push(Block {
                input_norm: vec(w.get(&format!("{p}.input_layernorm.weight"), &[h])?)?,
                qkv: Projections::new(vec![q_proj, k_proj, v_proj]),
                o_proj,
                post_attention_norm: vec(
                    w.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?
                )?,
                gate_up: Projections::new(vec![gate_proj, up_proj]),
                down_proj,
            });
        }
        let norm = w
            .get("model.norm.weight", &[h])?
            .to_vec1::<f32>()
            .map_err(|e| LoadError::format(w.path(), e))?;
        let lm_head = if c.tie_word_embeddings || !w.contains("lm_head.weight") {
            embed_tokens.clone()
        } else {
            w.get_linear("lm_head.weight", [c.vocab_size, h])?
        };
        let tied = c.tie_word_embeddings || !w.contains("lm_head.weight");
        let mut config = config;
        config.tie_word_embeddings = tied;
        let rope = Rope::new(&config);
        Ok(Llama {
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

    /// One step over a ragged batch; see [`super::Model::forward`].
    pub fn forward(&self, batch: &ForwardBatch, kv: &mut KvCache) -> Result<Tensor> {
        let c = &self.config;
        let rows = batch.token_ids.len();
        let eps = c.rms_norm_eps as f32;
        let dims = HeadDims {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        let mut x = self
            .embed_tokens
            .rows(&batch.token_ids)?
            .flatten_all()?
            .to_vec1::<f32>()?; // (T, hidden)
        let rope = self.rope.tables(&batch.positions);
        let plan = AttentionPlan::new(batch, kv.block_size());
        // Each row's adapter, only when some sequence has one (the base-only path stays bare).
        let row_adapters: Option<Vec<Option<&LoraAdapter>>> =
            batch.seqs.iter().any(|s| s.adapter.is_some()).then(|| {
                batch
                    .seqs
                    .iter()
                    .flat_map(|s| std::iter::repeat_n(s.adapter.as_deref(), s.query_len))
                    .collect()
            });
        let lora = |y: &mut [f32], x: &[f32], layer: usize, t: Target| match &row_adapters {
            Some(ra) => lora::add_deltas(y, x, ra, layer, t),
            None => Ok(()),
        };
        for (i, b) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &b.input_norm, eps);
            let mut qkv = b.qkv.forward(&h, rows)?.into_iter();
            let (Some(mut q), Some(mut k), Some(mut v)) = (qkv.next(), qkv.next(), qkv.next())
            else {
                candle_core::bail!("q/k/v projections missing");
            };
            lora(&mut q, &h, i, Target::Q)?;
            lora(&mut k, &h, i, Target::K)?;
            lora(&mut v, &h, i, Target::V)?;
            rope.apply(&mut q, c.num_heads);
            rope.apply(&mut k, c.num_kv_heads);
            let layer = kv.layer_mut(i);
            attention::write_kv(layer, &batch.slots, &k, &v, c.kv_dim());
            let attn = attention::attend(&q, layer, batch, &plan, dims);
            let mut o = b.o_proj.forward_vec(&attn, rows)?;
            lora(&mut o, &attn, i, Target::O)?;
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let h = rms_norm(&x, &b.post_attention_norm, eps);
            let mut gu = b.gate_up.forward(&h, rows)?.into_iter();
            let (Some(mut gate), Some(mut up)) = (gu.next(), gu.next()) else {
                candle_core::bail!("gate/up projections missing");
            };
            lora(&mut gate, &h, i, Target::Gate)?;
            lora(&mut up, &h, i, Target::Up)?;
            // SiLU(gate) · up, candle's arithmetic for SiLU.
            for (g, u) in gate.iter_mut().zip(&up) {
                *g = *g / ((-*g).exp() + 1.0) * u;
            }
            let mut mlp = b.down_proj.forward_vec(&gate, rows)?;
            lora(&mut mlp, &gate, i, Target::Down)?;
            x.iter_mut().zip(&mlp).for_each(|(a, b)| *a += b);
        }
        // Only each sequence's last row goes through the (large) output head.
        let hidden = c.hidden_size;
        let mut last = Vec::with_capacity(batch.seqs.len() * hidden);
        let mut end = 0;
        for s in &batch.seqs {
            end += s.query_len;
            last.extend_from_slice(&x[(end - 1) * hidden..end * hidden]);
        }
        let x = rms_norm(&last, &self.norm, eps);
        let logits = self.lm_head.forward_vec(&x, batch.seqs.len())?;
        Tensor::from_vec(logits, (batch.seqs.len(), c.vocab_size), &Device::Cpu)
    }

    /// Every weight by its Hugging Face name, as f32; the head is omitted when tied.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.weight_f32()?,
        )];
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let norm = |v: &Vec<f32>| Tensor::from_slice(v, v.len(), &Device::Cpu);
            out.push((format!("{p}.input_layernorm.weight"), norm(&b.input_norm)?));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                norm(&b.post_attention_norm)?,
            ));
            let qkv = b.qkv.weights_f32()?;
            let gate_up = b.gate_up.weights_f32()?;
            for (name, w) in [
                ("self_attn.q_proj", qkv[0].clone()),
                ("self_attn.k_proj", qkv[1].clone()),
                ("self_attn.v_proj", qkv[2].clone()),
                ("self_attn.o_proj", b.o_proj.weight_f32()?),
                ("mlp.gate_proj", gate_up[0].clone()),
                ("mlp.up_proj", gate_up[1].clone()),
                ("mlp.down_proj", b.down_proj.weight_f32()?),
            ] {
                out.push((format!("{p}.{name}.weight"), w));
            }
        }
        out.push((
            "model.norm.weight".to_string(),
            Tensor::from_slice(&self.norm, self.norm.len(), &Device::Cpu)?,
        ));
        if !self.config.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), self.lm_head.weight_f32()?));
        }
        Ok(out)
    }
}

#[cfg(test)]
#[path = "llama_tests.rs"]
mod tests;
