//! Model layer: architectures, weight loading and the batched forward pass. Pure candle and
//! plain Rust; knows nothing of requests, HTTP or scheduling.
//!
//! The seam with the engine is [`ForwardBatch`] (a *ragged batch*: the new tokens of many
//! sequences concatenated, each with its position and KV slot) and [`Model::forward`], which
//! returns the logits of the last new token of each sequence. The model is stateless; the KV
//! cache is passed in.

pub mod attention;
pub mod config;
pub mod decoder;
pub mod details;
pub mod kv_cache;
pub mod linear;
pub mod llama_train;
pub mod lora;
pub mod quant;
mod train_ops;
pub mod vmath;
pub mod weights;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;

pub use config::{Activation, Architecture, Features, ModelConfig, RopeScaling};
pub use kv_cache::{KvCache, KvDtype};
pub use linear::Linear;
pub use lora::{LoraAdapter, Target};
pub use weights::Weights;

/// A token id.
pub type TokenId = u32;

/// Why a model could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// File or folder.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not what it claims to be (corrupt, truncated, inconsistent).
    #[error("{path}: {message}")]
    Format {
        /// File or folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The file is valid but uses something this build does not support.
    #[error("{path}: unsupported {message}")]
    Unsupported {
        /// File or folder.
        path: PathBuf,
        /// What is unsupported.
        message: String,
    },
}

impl LoadError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        LoadError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn format(path: &Path, message: impl std::fmt::Display) -> Self {
        LoadError::Format {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }
    pub(crate) fn unsupported(path: &Path, message: impl std::fmt::Display) -> Self {
        LoadError::Unsupported {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }
}

/// One sequence's part of a [`ForwardBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSpan {
    /// Number of new tokens of this sequence in the batch (consecutive rows).
    pub query_len: usize,
    /// Tokens in this sequence's KV after the step (cached + new).
    pub context_len: usize,
    /// KV block ids holding positions `0..context_len`, in order.
    pub block_table: Vec<u32>,
    /// The LoRA adapter this sequence's rows run with; `None` is the base model.
    pub adapter: Option<Arc<LoraAdapter>>,
    /// Logits for every new row of this sequence, not only its last (prompt log-probabilities).
    pub all_logits: bool,
    /// Blocks of the sliding-window pool, used as a ring of [`ForwardBatch::window_ring`]
    /// blocks: position `p` lives in `window_table[(p / block_size) % ring]`. Empty: the
    /// sliding layers index their pool with `block_table` (no ring).
    pub window_table: Vec<u32>,
}

impl SeqSpan {
    /// The slot of position `pos` in the sliding-window pool.
    pub fn window_slot(&self, pos: usize, ring: usize, block_size: usize) -> u32 {
        let (table, index) = if self.window_table.is_empty() {
            (&self.block_table, pos / block_size)
        } else {
            (&self.window_table, (pos / block_size) % ring.max(1))
        };
        table[index] * block_size as u32 + (pos % block_size) as u32
    }
}

/// The ragged batch of one step.
///
/// ```text
/// rows:      | seq 0: 5 prompt tokens | seq 1: 1 | seq 2: 1 |
/// positions:   0  1  2  3  4           37         8
/// slots:       block_table[pos / bs] * bs + pos % bs, per sequence
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardBatch {
    /// `(T,)` new tokens of all sequences, concatenated.
    pub token_ids: Vec<TokenId>,
    /// `(T,)` position of each new token within its sequence.
    pub positions: Vec<u32>,
    /// `(T,)` KV slot each new token's keys/values are written to.
    pub slots: Vec<u32>,
    /// Per sequence, in row order.
    pub seqs: Vec<SeqSpan>,
    /// Blocks in each sequence's window ring (see [`SeqSpan::window_table`]).
    pub window_ring: usize,
}

impl ForwardBatch {
    /// Adds `tokens` of one sequence whose first new token sits at position `start`.
    pub fn push_seq(
        &mut self,
        tokens: &[TokenId],
        start: usize,
        block_table: &[u32],
        block_size: usize,
    ) {
        for (i, &t) in tokens.iter().enumerate() {
            let pos = start + i;
            self.token_ids.push(t);
            self.positions.push(pos as u32);
            self.slots.push(
                block_table[pos / block_size] * block_size as u32 + (pos % block_size) as u32,
            );
        }
        self.seqs.push(SeqSpan {
            query_len: tokens.len(),
            context_len: start + tokens.len(),
            block_table: block_table.to_vec(),
            adapter: None,
            all_logits: false,
            window_table: vec![],
        });
    }

    /// The rows whose logits [`Model::forward`] returns, in order: each sequence's last row,
    /// or all of its rows when it asks for [`SeqSpan::all_logits`].
    pub fn output_rows(&self) -> Vec<usize> {
        let mut rows = Vec::with_capacity(self.seqs.len());
        let mut end = 0;
        for s in &self.seqs {
            let start = end;
            end += s.query_len;
            if s.all_logits {
                rows.extend(start..end);
            } else if end > start {
                rows.push(end - 1);
            }
        }
        rows
    }

    /// Checks that the batch is consistent with itself and the cache, so a bad schedule is an
    /// error rather than an out-of-bounds panic in a kernel.
    pub fn validate(&self, kv: &KvCache, vocab_size: usize) -> candle_core::Result<()> {
        let t = self.token_ids.len();
        if self.positions.len() != t || self.slots.len() != t {
            candle_core::bail!("forward batch: rows, positions and slots differ in length");
        }
        if self.seqs.iter().map(|s| s.query_len).sum::<usize>() != t {
            candle_core::bail!("forward batch: query lengths do not add up to the rows");
        }
        if let Some(&bad) = self.token_ids.iter().find(|&&id| id as usize >= vocab_size) {
            candle_core::bail!("forward batch: token id {bad} outside the vocabulary");
        }
        if self.slots.iter().any(|&s| s as usize >= kv.num_slots()) {
            candle_core::bail!("forward batch: slot outside the KV cache");
        }
        let bs = kv.block_size();
        for s in &self.seqs {
            if s.query_len == 0 || s.query_len > s.context_len {
                candle_core::bail!("forward batch: bad query/context length");
            }
            if s.block_table.len() * bs < s.context_len
                || s.block_table.iter().any(|&b| b as usize >= kv.num_blocks())
            {
                candle_core::bail!("forward batch: block table does not cover the context");
            }
            if !kv.has_windows() {
                continue;
            }
            let (table, covers) = if s.window_table.is_empty() {
                (&s.block_table, true)
            } else {
                let need = s.context_len.div_ceil(bs).min(self.window_ring);
                (
                    &s.window_table,
                    self.window_ring > 0 && s.window_table.len() >= need,
                )
            };
            if !covers || table.iter().any(|&b| b as usize >= kv.num_window_blocks()) {
                candle_core::bail!("forward batch: window table does not cover the window");
            }
        }
        Ok(())
    }
}

/// A loaded model. Every supported architecture runs the one [`decoder::Decoder`]; a family
/// that needs a different forward pass would be another variant. Cloning shares the weights
/// (the trainer reads the same base weights the engine serves).
#[derive(Clone)]
pub enum Model {
    /// Decoder-only transformer (all of [`Architecture::ALL`]).
    Decoder(decoder::Decoder),
}

/// Where a model was loaded from; the tokenizer is built from the same source.
pub enum ModelSource {
    /// A GGUF file, with its metadata (tokenizer vocabulary, chat template, ...).
    Gguf {
        /// The file.
        path: PathBuf,
        /// Metadata as JSON values.
        metadata: serde_json::Map<String, serde_json::Value>,
    },
    /// A Hugging Face folder (`config.json`, `tokenizer.json`, safetensors).
    HfDir(PathBuf),
}

impl Model {
    /// Loads a model from a `.gguf` file or a Hugging Face folder.
    pub fn load(path: &Path) -> Result<(Model, ModelSource), LoadError> {
        crate::configure_threads(None);
        if !path.exists() {
            return Err(LoadError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ));
        }
        // A weights or config file inside an HF folder stands for the folder.
        let is_hf_file = path.is_file()
            && path
                .extension()
                .is_some_and(|e| e == "safetensors" || e == "json");
        let path = match (is_hf_file, path.parent()) {
            (true, Some(parent)) => parent,
            _ => path,
        };
        if path.is_dir() {
            let config_path = path.join("config.json");
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| LoadError::io(&config_path, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| LoadError::format(&config_path, format!("invalid JSON: {e}")))?;
            let config = ModelConfig::from_hf_json(&json, &config_path)?;
            let mut weights = Weights::open_safetensors_dir(path)?;
            let model = decoder::Decoder::load(config, &mut weights)?;
            Ok((
                Model::Decoder(model),
                ModelSource::HfDir(path.to_path_buf()),
            ))
        } else {
            let (mut weights, metadata) = Weights::open_gguf(path)?;
            let config = ModelConfig::from_gguf_metadata(
                &metadata,
                weights.contains("lm_head.weight"),
                path,
            )?;
            weights.set_gguf_architecture(&config);
            let mut config = config;
            if config.rope_scaling.is_none() && weights.contains("rope_freqs.weight") {
                let half = config.features.rotary_dim.unwrap_or(config.head_dim) / 2;
                let factors = weights
                    .get("rope_freqs.weight", &[half])?
                    .to_vec1::<f32>()
                    .map_err(|e| LoadError::format(path, e))?;
                config.rope_scaling = Some(RopeScaling::FreqFactors(factors));
            }
            let model = decoder::Decoder::load(config, &mut weights)?;
            let source = ModelSource::Gguf {
                path: path.to_path_buf(),
                metadata,
            };
            Ok((Model::Decoder(model), source))
        }
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        match self {
            Model::Decoder(m) => m.config(),
        }
    }

    /// Runs one step over a ragged batch, writing the new tokens' K/V into `kv`.
    /// Returns logits `(rows, vocab)` of each sequence's last new token, or of every new token
    /// of a sequence marked [`SeqSpan::all_logits`], in batch order
    /// ([`ForwardBatch::output_rows`]).
    pub fn forward(&self, batch: &ForwardBatch, kv: &mut KvCache) -> candle_core::Result<Tensor> {
        Ok(self.forward_with_hidden(batch, kv)?.0)
    }

    /// [`Self::forward`], with the same rows' final hidden states beside the logits:
    /// `(rows · hidden_size)` values, after the final norm — what the head multiplies, and
    /// Hugging Face's `last_hidden_state` (the embeddings of last-token pooling).
    pub fn forward_with_hidden(
        &self,
        batch: &ForwardBatch,
        kv: &mut KvCache,
    ) -> candle_core::Result<(Tensor, Vec<f32>)> {
        batch.validate(kv, self.config().vocab_size)?;
        match self {
            Model::Decoder(m) => m.forward(batch, kv),
        }
    }

    /// How the projections and the head hold their weights: counts by block format
    /// (`"Q4_K"`, ...) or `"f32"`.
    pub fn weight_formats(&self) -> std::collections::BTreeMap<&'static str, usize> {
        match self {
            Model::Decoder(m) => m.weight_formats(),
        }
    }

    /// A KV cache for this model with `num_blocks` blocks of `block_size` tokens for every
    /// layer (sliding-window layers index theirs with the block table too).
    pub fn new_kv_cache(&self, num_blocks: usize, block_size: usize) -> KvCache {
        self.new_kv_cache_windowed(num_blocks, num_blocks, block_size)
    }

    /// A KV cache whose sliding-window layers have their own pool of `num_window_blocks`.
    pub fn new_kv_cache_windowed(
        &self,
        num_blocks: usize,
        num_window_blocks: usize,
        block_size: usize,
    ) -> KvCache {
        let c = self.config();
        let sliding: Vec<bool> = (0..c.num_layers)
            .map(|i| c.layer_window(i).is_some())
            .collect();
        KvCache::with_windows(
            &sliding,
            c.kv_dim(),
            num_blocks,
            num_window_blocks,
            block_size,
            self.kv_dtype(),
        )
    }

    /// The KV cache's element type: f16 for quantized weights (llama.cpp's arithmetic, whose
    /// default cache type it is: half the memory and the bandwidth attention is bound by), f32
    /// for float weights (so they stay exactly transformers' float32).
    pub fn kv_dtype(&self) -> KvDtype {
        match self {
            Model::Decoder(m) => m.kv_dtype(),
        }
    }

    /// Every weight by its Hugging Face name, as f32 (for `convert`).
    pub fn named_tensors(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        match self {
            Model::Decoder(m) => m.named_tensors(),
        }
    }
}

/// Deterministic pseudo-random values in [-1, 1) for unit tests, one stream per seed.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2000) as f32 / 1000.0
                - 1.0
        })
        .collect()
}
