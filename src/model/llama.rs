//! Llama-family decoder (Llama 1/2/3, SmolLM, TinyLlama, Mistral without sliding window):
//! RMSNorm, GQA attention with rotary embeddings, SwiGLU MLP, tied or untied output head.
//! Weights are loaded by Hugging Face names from either format (see `weights.rs`).

use candle_core::{Device, Result, Tensor};

use super::attention::{self, AttentionPlan, HeadDims, Rope};
use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::linear::Linear;
use super::weights::Weights;
use super::{ForwardBatch, LoadError};

struct Block {
    input_norm: Tensor,          // (hidden,)
    q_proj: Linear,              // (num_heads * head_dim, hidden)
    k_proj: Linear,              // (num_kv_heads * head_dim, hidden)
    v_proj: Linear,              // (num_kv_heads * head_dim, hidden)
    o_proj: Linear,              // (hidden, num_heads * head_dim)
    post_attention_norm: Tensor, // (hidden,)
    gate_proj: Linear,           // (intermediate, hidden)
    up_proj: Linear,             // (intermediate, hidden)
    down_proj: Linear,           // (hidden, intermediate)
}

/// A llama-family model with its weights in memory.
pub struct Llama {
    config: ModelConfig,
    embed_tokens: Linear, // (vocab, hidden); also the head when tied
    blocks: Vec<Block>,
    norm: Tensor,    // (hidden,)
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
            blocks.push(Block {
                input_norm: w.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                post_attention_norm: w
                    .get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_proj,
                up_proj,
                down_proj,
            });
        }
        let norm = w.get("model.norm.weight", &[h])?;
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
        let mut x = self.embed_tokens.rows(&batch.token_ids)?; // (T, hidden)
        let rope = self.rope.tables(&batch.positions);
        let plan = AttentionPlan::new(batch, kv.block_size());
        for (i, b) in self.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &b.input_norm, eps)?;
            let mut q = b.q_proj.forward(&h)?.flatten_all()?.to_vec1::<f32>()?; // (T, q_dim)
            let mut k = b.k_proj.forward(&h)?.flatten_all()?.to_vec1::<f32>()?; // (T, kv_dim)
            let v = b.v_proj.forward(&h)?.flatten_all()?.to_vec1::<f32>()?; // (T, kv_dim)
            rope.apply(&mut q, c.num_heads);
            rope.apply(&mut k, c.num_kv_heads);
            let layer = kv.layer_mut(i);
            attention::write_kv(layer, &batch.slots, &k, &v, c.kv_dim());
            let attn = attention::attend(&q, layer, batch, &plan, dims);
            let attn = Tensor::from_vec(attn, (rows, c.q_dim()), &Device::Cpu)?;
            x = (x + b.o_proj.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &b.post_attention_norm, eps)?;
            let gate = candle_nn::ops::silu(&b.gate_proj.forward(&h)?)?;
            let mlp = b.down_proj.forward(&(gate * b.up_proj.forward(&h)?)?)?;
            x = (x + mlp)?;
        }
        // Only each sequence's last row goes through the (large) output head.
        let mut last = Vec::with_capacity(batch.seqs.len());
        let mut end = 0u32;
        for s in &batch.seqs {
            end += s.query_len as u32;
            last.push(end - 1);
        }
        let last = Tensor::from_vec(last, batch.seqs.len(), &Device::Cpu)?;
        let x = x.index_select(&last, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        self.lm_head.forward(&x)?.contiguous()
    }

    /// Every weight by its Hugging Face name, as f32; the head is omitted when tied.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.weight_f32()?,
        )];
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), b.input_norm.clone()));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                b.post_attention_norm.clone(),
            ));
            for (name, l) in [
                ("self_attn.q_proj", &b.q_proj),
                ("self_attn.k_proj", &b.k_proj),
                ("self_attn.v_proj", &b.v_proj),
                ("self_attn.o_proj", &b.o_proj),
                ("mlp.gate_proj", &b.gate_proj),
                ("mlp.up_proj", &b.up_proj),
                ("mlp.down_proj", &b.down_proj),
            ] {
                out.push((format!("{p}.{name}.weight"), l.weight_f32()?));
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if !self.config.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), self.lm_head.weight_f32()?));
        }
        Ok(out)
    }
}

#[cfg(test)]
#[path = "llama_tests.rs"]
mod tests;
