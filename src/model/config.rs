//! `ModelConfig`: the architecture hyper-parameters, read from a Hugging Face `config.json` or
//! from GGUF metadata, and written back as `config.json` by `convert`. Knows nothing of weights.

use serde_json::{json, Value};

use super::LoadError;
use std::path::Path;

/// Architectures this build can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama family: Llama 1/2/3, SmolLM, TinyLlama, Mistral (no sliding window).
    Llama,
}

impl Architecture {
    /// The `architectures` values of `config.json` that are accepted.
    pub const SUPPORTED_HF: &'static [&'static str] = &["LlamaForCausalLM", "MistralForCausalLM"];
    /// The `general.architecture` values of GGUF that are accepted.
    pub const SUPPORTED_GGUF: &'static [&'static str] = &["llama"];
}

/// Rotary position embedding frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.x: frequencies scaled by wavelength band.
    Llama3 {
        /// Overall scale factor.
        factor: f64,
        /// Wavelengths longer than `original / low_freq_factor` are scaled fully.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: usize,
    },
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// Scale factor.
        factor: f64,
    },
}

/// Hyper-parameters of a decoder-only transformer, in Hugging Face terms.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which forward pass to run.
    pub architecture: Architecture,
    /// Rows of the embedding table and the output head.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// Epsilon of the RMS norms.
    pub rms_norm_eps: f64,
    /// Base of the rotary frequencies.
    pub rope_theta: f64,
    /// Optional frequency scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// Whether the output head reuses the embedding table.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token id, if the model has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids.
    pub eos_token_ids: Vec<u32>,
    /// Padding token id, if any.
    pub pad_token_id: Option<u32>,
}

fn get_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

fn parse_rope_scaling(v: &Value, path: &Path) -> Result<Option<RopeScaling>, LoadError> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let f = |k: &str| v.get(k).and_then(Value::as_f64);
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: f("factor").unwrap_or(1.0),
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: f("factor").unwrap_or(8.0),
            low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: get_usize(v, "original_max_position_embeddings")
                .unwrap_or(8192),
        })),
        other => Err(LoadError::unsupported(
            path,
            format!("rope scaling type '{other}' (supported: default, linear, llama3)"),
        )),
    }
}

impl ModelConfig {
    /// Parses a Hugging Face `config.json` document.
    pub fn from_hf_json(v: &Value, path: &Path) -> Result<Self, LoadError> {
        let archs: Vec<&str> = v
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let arch_name = archs.first().copied().unwrap_or("<missing>");
        if !Architecture::SUPPORTED_HF.contains(&arch_name) {
            return Err(LoadError::unsupported(
                path,
                format!(
                    "architecture '{arch_name}' (supported: {})",
                    Architecture::SUPPORTED_HF.join(", ")
                ),
            ));
        }
        let req = |k: &str| {
            get_usize(v, k)
                .ok_or_else(|| LoadError::format(path, format!("config field '{k}' is missing")))
        };
        let hidden_size = req("hidden_size")?;
        let num_heads = req("num_attention_heads")?;
        if num_heads == 0 || hidden_size % num_heads != 0 && get_usize(v, "head_dim").is_none() {
            return Err(LoadError::format(
                path,
                "num_attention_heads must divide hidden_size",
            ));
        }
        let num_kv_heads = get_usize(v, "num_key_value_heads").unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(LoadError::format(
                path,
                "num_key_value_heads must divide num_attention_heads",
            ));
        }
        let mut max_position_embeddings = get_usize(v, "max_position_embeddings").unwrap_or(2048);
        // Sliding-window attention is exact as long as no sequence is longer than the window.
        if let Some(window) = get_usize(v, "sliding_window") {
            if window < max_position_embeddings {
                tracing::warn!(window, "sliding window: context limited to the window");
                max_position_embeddings = window;
            }
        }
        let rope_params = v.get("rope_parameters");
        let rope_theta = v
            .get("rope_theta")
            .or_else(|| rope_params.and_then(|p| p.get("rope_theta")))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let rope_scaling = match v
            .get("rope_scaling")
            .filter(|s| !s.is_null())
            .or(rope_params)
        {
            Some(s) => parse_rope_scaling(s, path)?,
            None => None,
        };
        if v.get("hidden_act")
            .and_then(Value::as_str)
            .is_some_and(|a| a != "silu")
        {
            return Err(LoadError::unsupported(path, "hidden_act other than silu"));
        }
        for flag in ["attention_bias", "mlp_bias"] {
            if v.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(LoadError::unsupported(
                    path,
                    format!("{flag} = true for llama"),
                ));
            }
        }
        Ok(ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_layers: req("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim: get_usize(v, "head_dim").unwrap_or(hidden_size / num_heads),
            max_position_embeddings,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: ids(v.get("eos_token_id")),
            pad_token_id: ids(v.get("pad_token_id")).first().copied(),
        })
    }

    /// Builds the config from GGUF metadata (already turned into JSON values by the reader).
    /// `has_output_tensor` tells whether the file has its own output head.
    pub fn from_gguf_metadata(
        md: &serde_json::Map<String, Value>,
        has_output_tensor: bool,
        path: &Path,
    ) -> Result<Self, LoadError> {
        let arch = md
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| LoadError::format(path, "GGUF metadata lacks general.architecture"))?;
        if !Architecture::SUPPORTED_GGUF.contains(&arch) {
            return Err(LoadError::unsupported(
                path,
                format!(
                    "architecture '{arch}' (supported: {})",
                    Architecture::SUPPORTED_GGUF.join(", ")
                ),
            ));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let num = |k: &str| md.get(&key(k)).and_then(Value::as_u64).map(|x| x as usize);
        let req = |k: &str| {
            num(k).ok_or_else(|| LoadError::format(path, format!("GGUF metadata lacks {arch}.{k}")))
        };
        let hidden_size = req("embedding_length")?;
        let num_heads = req("attention.head_count")?;
        if num_heads == 0 {
            return Err(LoadError::format(path, "attention.head_count is 0"));
        }
        let num_kv_heads = num("attention.head_count_kv").unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(LoadError::format(
                path,
                "head_count_kv must divide head_count",
            ));
        }
        let vocab_size = match num("vocab_size") {
            Some(n) => n,
            None => md
                .get("tokenizer.ggml.tokens")
                .and_then(Value::as_array)
                .map(Vec::len)
                .ok_or_else(|| LoadError::format(path, "GGUF metadata lacks the vocabulary"))?,
        };
        let tok = |k: &str| md.get(k).and_then(Value::as_u64).map(|x| x as u32);
        let f = |k: &str| md.get(&key(k)).and_then(Value::as_f64);
        let rope_scaling = match md.get(&key("rope.scaling.type")).and_then(Value::as_str) {
            Some("linear") => Some(RopeScaling::Linear {
                factor: f("rope.scaling.factor").unwrap_or(1.0),
            }),
            Some("none") | None => None,
            Some(other) => {
                return Err(LoadError::unsupported(
                    path,
                    format!("rope scaling '{other}'"),
                ))
            }
        };
        Ok(ModelConfig {
            architecture: Architecture::Llama,
            vocab_size,
            hidden_size,
            intermediate_size: req("feed_forward_length")?,
            num_layers: req("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim: num("attention.key_length")
                .or(num("rope.dimension_count"))
                .unwrap_or(hidden_size / num_heads),
            max_position_embeddings: num("context_length").unwrap_or(2048),
            rms_norm_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: f("rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
            tie_word_embeddings: !has_output_tensor,
            bos_token_id: tok("tokenizer.ggml.bos_token_id"),
            eos_token_ids: tok("tokenizer.ggml.eos_token_id").into_iter().collect(),
            pad_token_id: tok("tokenizer.ggml.padding_token_id"),
        })
    }

    /// The Hugging Face `config.json` for this model, with weights stored as `dtype`.
    pub fn to_hf_json(&self, dtype: &str) -> Value {
        let rope_scaling = match &self.rope_scaling {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        };
        let eos: Value = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": true,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype,
            "dtype": dtype,
        })
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}
