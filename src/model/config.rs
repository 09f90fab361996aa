//! `ModelConfig`: the architecture hyper-parameters, read from a Hugging Face `config.json` or
//! from GGUF metadata, and written back as `config.json` (by `convert` to HF) or as GGUF
//! metadata (by `convert` to GGUF). Knows nothing of weights.

use candle_core::quantized::gguf_file::Value as GgufValue;
use serde_json::{json, Value};

use super::LoadError;
use std::path::Path;

/// Architectures this build can run. They share one decoder (`decoder.rs`); what sets each
/// apart is spelled out by [`Features`] and the tensor names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 1/2/3, SmolLM, TinyLlama.
    Llama,
    /// Mistral: llama with sliding-window attention.
    Mistral,
    /// Qwen2 / Qwen2.5 (incl. Coder): q/k/v biases.
    Qwen2,
    /// Qwen3 (dense): no biases, an RMSNorm over each head of q and of k before rope.
    Qwen3,
    /// Phi-3: fused qkv and gate/up projections, partial rotary.
    Phi3,
    /// Gemma 2: sandwich norms, (1 + w) RMS norms, soft-capping, scaled embeddings,
    /// alternating sliding/full layers.
    Gemma2,
    /// StarCoder2: LayerNorm, biases everywhere, plain GELU MLP.
    Starcoder2,
}

impl Architecture {
    /// Every architecture, in the order they are listed to users.
    pub const ALL: [Architecture; 7] = [
        Architecture::Llama,
        Architecture::Mistral,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Phi3,
        Architecture::Gemma2,
        Architecture::Starcoder2,
    ];

    /// The `architectures` value of `config.json`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Phi3 => "Phi3ForCausalLM",
            Architecture::Gemma2 => "Gemma2ForCausalLM",
            Architecture::Starcoder2 => "Starcoder2ForCausalLM",
        }
    }

    /// The `model_type` value of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Phi3 => "phi3",
            Architecture::Gemma2 => "gemma2",
            Architecture::Starcoder2 => "starcoder2",
        }
    }

    /// The `general.architecture` value of GGUF (llama.cpp writes Mistral as `llama`, with a
    /// sliding-window key).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Architecture::Llama | Architecture::Mistral => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Phi3 => "phi3",
            Architecture::Gemma2 => "gemma2",
            Architecture::Starcoder2 => "starcoder2",
        }
    }

    /// The architectures accepted, as users name them in `config.json`.
    pub fn supported_hf() -> String {
        Self::ALL.map(Self::hf_name).join(", ")
    }

    /// The GGUF architectures accepted.
    pub fn supported_gguf() -> String {
        let mut names: Vec<&str> = Self::ALL.iter().map(|a| a.gguf_name()).collect();
        names.dedup();
        names.join(", ")
    }

    fn from_hf(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.hf_name() == name)
    }

    /// Whether the decoder layer uses LayerNorm (with bias) rather than RMSNorm.
    pub fn layer_norm(self) -> bool {
        self == Architecture::Starcoder2
    }

    /// Whether the MLP is gated (`act(gate) · up`) rather than plain (`act(fc)`).
    pub fn gated_mlp(self) -> bool {
        self != Architecture::Starcoder2
    }

    /// Whether attention and MLP outputs are normalised again before the residual add.
    pub fn sandwich_norms(self) -> bool {
        self == Architecture::Gemma2
    }

    /// Whether HF RMSNorm weights are stored as `w` with `(1 + w)` applied.
    pub fn unit_offset_norms(self) -> bool {
        self == Architecture::Gemma2
    }

    /// Whether each head of q and of k is RMS-normalised (its own weights, `head_dim` wide)
    /// after the projection and before rope.
    pub fn qk_norm(self) -> bool {
        self == Architecture::Qwen3
    }

    /// Whether q/k/v (and gate/up) are one fused tensor each.
    pub fn fused_projections(self) -> bool {
        self == Architecture::Phi3
    }
}

/// MLP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// `x · sigmoid(x)`.
    #[default]
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
    /// GELU with the exact error function.
    Gelu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Activation::Silu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Some(Activation::GeluTanh),
            "gelu" => Some(Activation::Gelu),
            _ => None,
        }
    }

    /// The transformers name.
    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
            Activation::Gelu => "gelu",
        }
    }

    /// Applies the activation in place, in float32 (SiLU through a vectorised `exp` within a few
    /// ulp of libm's, the deviation of any vectorised float32 implementation).
    pub fn apply(self, xs: &mut [f32]) {
        // Elementwise: prefill-sized inputs are split across cores (no value changes).
        const CHUNK: usize = 16 * 1024;
        if xs.len() > 2 * CHUNK {
            use rayon::prelude::*;
            xs.par_chunks_mut(CHUNK).for_each(|c| self.apply_serial(c));
        } else {
            self.apply_serial(xs);
        }
    }

    /// `act(gate) · up` into `gate` (a gated MLP's hidden layer), in one pass: the same two
    /// roundings per element as [`Activation::apply`] followed by the product.
    pub fn apply_gated(self, gate: &mut [f32], up: &[f32]) {
        const CHUNK: usize = 16 * 1024;
        let one = |g: &mut [f32], u: &[f32]| match self {
            Activation::Silu => super::vmath::silu_mul(g, u),
            _ => {
                self.apply_serial(g);
                g.iter_mut().zip(u).for_each(|(g, u)| *g *= u);
            }
        };
        if gate.len() > 2 * CHUNK {
            use rayon::prelude::*;
            gate.par_chunks_mut(CHUNK)
                .zip(up.par_chunks(CHUNK))
                .for_each(|(g, u)| one(g, u));
        } else {
            one(gate, up);
        }
    }

    fn apply_serial(self, xs: &mut [f32]) {
        match self {
            Activation::Silu => super::vmath::silu_in_place(xs),
            Activation::GeluTanh => {
                const C: f32 = 0.797_884_6; // sqrt(2 / pi)
                xs.iter_mut().for_each(|x| {
                    let v = *x;
                    *x = 0.5 * v * (1.0 + (C * (v + 0.044_715 * v * v * v)).tanh());
                })
            }
            Activation::Gelu => xs.iter_mut().for_each(|x| {
                let v = *x;
                *x = 0.5 * v * (1.0 + candle_core::cpu::erf::erf_f32(v / std::f32::consts::SQRT_2));
            }),
        }
    }
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
    /// Per-frequency divisors, as llama.cpp stores them in a `rope_freqs.weight` tensor
    /// (its Llama 3 GGUFs carry the scaling this way).
    FreqFactors(Vec<f32>),
    /// YaRN: interpolation blended with extrapolation by frequency band, and cos/sin scaled.
    Yarn {
        /// Scale factor.
        factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: usize,
        /// Rotations at which interpolation stops (high frequencies kept).
        beta_fast: f64,
        /// Rotations at which extrapolation stops.
        beta_slow: f64,
        /// Multiplier of cos and sin.
        attention_factor: f64,
        /// Whether the correction range is rounded outwards to whole dimensions.
        truncate: bool,
    },
}

/// What sets an architecture apart from plain llama. `Default` is llama.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Features {
    /// MLP activation.
    pub hidden_act: Activation,
    /// Whether q/k/v projections have biases.
    pub qkv_bias: bool,
    /// Whether the attention output projection has a bias.
    pub o_bias: bool,
    /// Whether the MLP projections have biases.
    pub mlp_bias: bool,
    /// Attention window of the sliding layers, in tokens (the query itself included).
    pub sliding_window: Option<usize>,
    /// Per layer: whether it attends only within `sliding_window` (empty: none does).
    pub sliding_layers: Vec<bool>,
    /// `cap · tanh(score / cap)` on attention scores (Gemma 2).
    pub attn_logit_softcapping: Option<f64>,
    /// `cap · tanh(logit / cap)` on the output logits (Gemma 2).
    pub final_logit_softcapping: Option<f64>,
    /// Attention scores are scaled by `1/sqrt(this)` instead of `1/sqrt(head_dim)`.
    pub query_pre_attn_scalar: Option<f64>,
    /// Leading dimensions of each head that are rotated (None: all).
    pub rotary_dim: Option<usize>,
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
    /// Epsilon of the norms (RMS or layer norm).
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
    /// Architecture-specific switches.
    pub features: Features,
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

/// transformers' YaRN `get_mscale`: `0.1 · mscale · ln(factor) + 1` above factor 1.
fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

fn parse_rope_scaling(
    v: &Value,
    max_position_embeddings: usize,
    path: &Path,
) -> Result<Option<RopeScaling>, LoadError> {
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
        "yarn" => {
            let factor = f("factor").unwrap_or(1.0);
            let mscale = |m: f64| yarn_mscale(factor, m);
            let attention_factor = match (f("attention_factor"), f("mscale"), f("mscale_all_dim")) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(m) / mscale(all),
                _ => mscale(1.0),
            };
            Ok(Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: get_usize(v, "original_max_position_embeddings")
                    .unwrap_or(max_position_embeddings),
                beta_fast: f("beta_fast").unwrap_or(32.0),
                beta_slow: f("beta_slow").unwrap_or(1.0),
                attention_factor,
                truncate: v.get("truncate").and_then(Value::as_bool).unwrap_or(true),
            }))
        }
        other => Err(LoadError::unsupported(
            path,
            format!("rope scaling type '{other}' (supported: default, linear, llama3, yarn)"),
        )),
    }
}

/// Which layers slide: `layer_types` when given, else the architecture's rule.
fn sliding_layers(
    v: &Value,
    arch: Architecture,
    num_layers: usize,
    window: Option<usize>,
    path: &Path,
) -> Result<Vec<bool>, LoadError> {
    if window.is_none() {
        return Ok(vec![]);
    }
    if let Some(types) = v.get("layer_types").and_then(Value::as_array) {
        if types.len() != num_layers {
            return Err(LoadError::format(path, "layer_types must list every layer"));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                other => Err(LoadError::unsupported(
                    path,
                    format!("layer type {other:?} (supported: sliding_attention, full_attention)"),
                )),
            })
            .collect();
    }
    Ok(match arch {
        Architecture::Gemma2 => (0..num_layers).map(|i| i % 2 == 0).collect(),
        Architecture::Qwen2 | Architecture::Qwen3 => {
            let on = v.get("use_sliding_window").and_then(Value::as_bool) == Some(true);
            let from = get_usize(v, "max_window_layers").unwrap_or(num_layers);
            (0..num_layers).map(|i| on && i >= from).collect()
        }
        _ => vec![true; num_layers],
    })
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
        let Some(arch) = Architecture::from_hf(arch_name) else {
            return Err(LoadError::unsupported(
                path,
                format!(
                    "architecture '{arch_name}' (supported: {})",
                    Architecture::supported_hf()
                ),
            ));
        };
        let req = |k: &str| {
            get_usize(v, k)
                .ok_or_else(|| LoadError::format(path, format!("config field '{k}' is missing")))
        };
        let flag = |k: &str| v.get(k).and_then(Value::as_bool);
        let num_f = |k: &str| v.get(k).and_then(Value::as_f64);
        let hidden_size = req("hidden_size")?;
        let num_heads = req("num_attention_heads")?;
        let head_dim = match get_usize(v, "head_dim") {
            Some(d) => d,
            None if num_heads > 0 && hidden_size.is_multiple_of(num_heads) => {
                hidden_size / num_heads
            }
            None => {
                return Err(LoadError::format(
                    path,
                    "num_attention_heads must divide hidden_size",
                ))
            }
        };
        let num_kv_heads = get_usize(v, "num_key_value_heads").unwrap_or(num_heads);
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(LoadError::format(
                path,
                "num_key_value_heads must divide num_attention_heads",
            ));
        }
        let num_layers = req("num_hidden_layers")?;
        let max_position_embeddings = get_usize(v, "max_position_embeddings").unwrap_or(2048);
        let rope_params = v.get("rope_parameters").filter(|p| !p.is_null());
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
            Some(s) => parse_rope_scaling(s, max_position_embeddings, path)?,
            None => None,
        };
        let partial_rotary = num_f("partial_rotary_factor")
            .or_else(|| rope_params.and_then(|p| p.get("partial_rotary_factor")?.as_f64()))
            .unwrap_or(1.0);
        let rotary_dim =
            (partial_rotary < 1.0).then_some((head_dim as f64 * partial_rotary) as usize);
        let act_name = v
            .get("hidden_activation")
            .or_else(|| v.get("hidden_act"))
            .and_then(Value::as_str);
        let hidden_act = match act_name {
            None => match arch {
                Architecture::Gemma2 | Architecture::Starcoder2 => Activation::GeluTanh,
                _ => Activation::Silu,
            },
            Some(name) => Activation::parse(name).ok_or_else(|| {
                LoadError::unsupported(
                    path,
                    format!("hidden_act '{name}' (supported: silu, gelu_pytorch_tanh, gelu)"),
                )
            })?,
        };
        let (qkv_bias, o_bias, mlp_bias) = match arch {
            Architecture::Qwen2 => (true, false, false),
            Architecture::Starcoder2 => {
                let b = flag("use_bias").unwrap_or(true);
                (b, b, b)
            }
            _ => {
                let b = flag("attention_bias").unwrap_or(false);
                (b, b, flag("mlp_bias").unwrap_or(false))
            }
        };
        // transformers' config defaults apply to absent keys (an explicit null means none).
        let defaulted = |k: &str, default: Option<f64>| match v.get(k) {
            None => default,
            Some(x) => x.as_f64(),
        };
        let gemma = arch == Architecture::Gemma2;
        let family_window = matches!(arch, Architecture::Mistral | Architecture::Gemma2);
        let sliding_window = defaulted("sliding_window", family_window.then_some(4096.0))
            .map(|w| w as usize)
            .filter(|&w| w > 0);
        let sliding = sliding_layers(v, arch, num_layers, sliding_window, path)?;
        let sliding_window = sliding_window.filter(|_| sliding.iter().any(|&s| s));
        Ok(ModelConfig {
            architecture: arch,
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps: num_f("rms_norm_eps")
                .or_else(|| num_f("norm_epsilon"))
                .or_else(|| num_f("layer_norm_eps"))
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: flag("tie_word_embeddings").unwrap_or(matches!(
                arch,
                Architecture::Gemma2 | Architecture::Starcoder2
            )),
            bos_token_id: ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: ids(v.get("eos_token_id")),
            pad_token_id: ids(v.get("pad_token_id")).first().copied(),
            features: Features {
                hidden_act,
                qkv_bias,
                o_bias,
                mlp_bias,
                sliding_window: sliding_window.filter(|_| !sliding.is_empty()),
                sliding_layers: if sliding_window.is_some() {
                    sliding
                } else {
                    vec![]
                },
                attn_logit_softcapping: defaulted("attn_logit_softcapping", gemma.then_some(50.0)),
                final_logit_softcapping: defaulted(
                    "final_logit_softcapping",
                    gemma.then_some(30.0),
                ),
                query_pre_attn_scalar: defaulted("query_pre_attn_scalar", gemma.then_some(256.0)),
                rotary_dim,
            },
        })
    }

    /// Builds the config from GGUF metadata (already turned into JSON values by the reader).
    /// `has_output_tensor` tells whether the file has its own output head.
    pub fn from_gguf_metadata(
        md: &serde_json::Map<String, Value>,
        has_output_tensor: bool,
        path: &Path,
    ) -> Result<Self, LoadError> {
        let arch_name = md
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| LoadError::format(path, "GGUF metadata lacks general.architecture"))?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let num = |k: &str| md.get(&key(k)).and_then(Value::as_u64).map(|x| x as usize);
        let f = |k: &str| md.get(&key(k)).and_then(Value::as_f64);
        let sliding_window = num("attention.sliding_window").filter(|&w| w > 0);
        let arch = match arch_name {
            "llama" if sliding_window.is_some() => Architecture::Mistral,
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            "phi3" => Architecture::Phi3,
            "gemma2" => Architecture::Gemma2,
            "starcoder2" => Architecture::Starcoder2,
            other => {
                return Err(LoadError::unsupported(
                    path,
                    format!(
                        "architecture '{other}' (supported: {})",
                        Architecture::supported_gguf()
                    ),
                ))
            }
        };
        let req = |k: &str| {
            num(k).ok_or_else(|| {
                LoadError::format(path, format!("GGUF metadata lacks {arch_name}.{k}"))
            })
        };
        let hidden_size = req("embedding_length")?;
        let num_heads = req("attention.head_count")?;
        if num_heads == 0 {
            return Err(LoadError::format(path, "attention.head_count is 0"));
        }
        let num_kv_heads = num("attention.head_count_kv").unwrap_or(num_heads);
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(LoadError::format(
                path,
                "head_count_kv must divide head_count",
            ));
        }
        let num_layers = req("block_count")?;
        let vocab_size = match num("vocab_size") {
            Some(n) => n,
            None => md
                .get("tokenizer.ggml.tokens")
                .and_then(Value::as_array)
                .map(Vec::len)
                .ok_or_else(|| LoadError::format(path, "GGUF metadata lacks the vocabulary"))?,
        };
        let tok = |k: &str| md.get(k).and_then(Value::as_u64).map(|x| x as u32);
        let head_dim = num("attention.key_length").unwrap_or(hidden_size / num_heads);
        let max_position_embeddings = num("context_length").unwrap_or(2048);
        let rope_scaling = match md.get(&key("rope.scaling.type")).and_then(Value::as_str) {
            Some("linear") => Some(RopeScaling::Linear {
                factor: f("rope.scaling.factor").unwrap_or(1.0),
            }),
            Some("yarn") => Some(RopeScaling::Yarn {
                factor: f("rope.scaling.factor").unwrap_or(1.0),
                original_max_position_embeddings: num("rope.scaling.original_context_length")
                    .unwrap_or(max_position_embeddings),
                beta_fast: f("rope.scaling.yarn_beta_fast").unwrap_or(32.0),
                beta_slow: f("rope.scaling.yarn_beta_slow").unwrap_or(1.0),
                attention_factor: f("rope.scaling.attn_factor")
                    .unwrap_or_else(|| yarn_mscale(f("rope.scaling.factor").unwrap_or(1.0), 1.0)),
                truncate: true,
            }),
            Some("llama3") => Some(RopeScaling::Llama3 {
                factor: f("rope.scaling.factor").unwrap_or(8.0),
                low_freq_factor: f("rope.scaling.low_freq_factor").unwrap_or(1.0),
                high_freq_factor: f("rope.scaling.high_freq_factor").unwrap_or(4.0),
                original_max_position_embeddings: num("rope.scaling.original_context_length")
                    .unwrap_or(8192),
            }),
            Some("none") | None => None,
            Some(other) => {
                return Err(LoadError::unsupported(
                    path,
                    format!("rope scaling '{other}'"),
                ))
            }
        };
        let rotary_dim = num("rope.dimension_count").filter(|&d| d < head_dim);
        let sliding_layers = match (sliding_window, arch) {
            (None, _) => vec![],
            (Some(_), Architecture::Gemma2) => (0..num_layers).map(|i| i % 2 == 0).collect(),
            (Some(_), _) => vec![true; num_layers],
        };
        let biased = matches!(arch, Architecture::Qwen2 | Architecture::Starcoder2);
        Ok(ModelConfig {
            architecture: arch,
            vocab_size,
            hidden_size,
            intermediate_size: req("feed_forward_length")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps: f("attention.layer_norm_rms_epsilon")
                .or_else(|| f("attention.layer_norm_epsilon"))
                .unwrap_or(1e-5),
            rope_theta: f("rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
            tie_word_embeddings: !has_output_tensor,
            bos_token_id: tok("tokenizer.ggml.bos_token_id"),
            eos_token_ids: tok("tokenizer.ggml.eos_token_id").into_iter().collect(),
            pad_token_id: tok("tokenizer.ggml.padding_token_id"),
            features: Features {
                hidden_act: match arch {
                    Architecture::Gemma2 | Architecture::Starcoder2 => Activation::GeluTanh,
                    _ => Activation::Silu,
                },
                qkv_bias: biased,
                o_bias: arch == Architecture::Starcoder2,
                mlp_bias: arch == Architecture::Starcoder2,
                sliding_window,
                sliding_layers,
                attn_logit_softcapping: f("attn_logit_softcapping"),
                final_logit_softcapping: f("final_logit_softcapping"),
                // llama.cpp's rule for Gemma 2 27B (46 layers); head_dim otherwise.
                query_pre_attn_scalar: f("attention.query_pre_attn_scalar").or_else(|| {
                    (arch == Architecture::Gemma2 && num_layers == 46)
                        .then(|| (hidden_size / num_heads) as f64)
                }),
                rotary_dim,
            },
        })
    }

    /// GGUF metadata (llama.cpp's keys) describing this config; `convert` adds the tokenizer.
    pub fn to_gguf_metadata(&self) -> Vec<(String, GgufValue)> {
        let a = self.architecture.gguf_name();
        let k = |s: &str| format!("{a}.{s}");
        let u = |x: usize| GgufValue::U32(x as u32);
        let mut md = vec![
            (
                "general.architecture".to_string(),
                GgufValue::String(a.into()),
            ),
            (k("context_length"), u(self.max_position_embeddings)),
            (k("embedding_length"), u(self.hidden_size)),
            (k("feed_forward_length"), u(self.intermediate_size)),
            (k("block_count"), u(self.num_layers)),
            (k("attention.head_count"), u(self.num_heads)),
            (k("attention.head_count_kv"), u(self.num_kv_heads)),
            (k("attention.key_length"), u(self.head_dim)),
            (k("attention.value_length"), u(self.head_dim)),
            (
                k("rope.dimension_count"),
                u(self.features.rotary_dim.unwrap_or(self.head_dim)),
            ),
            (k("rope.freq_base"), GgufValue::F32(self.rope_theta as f32)),
            (k("vocab_size"), u(self.vocab_size)),
        ];
        let eps = GgufValue::F32(self.rms_norm_eps as f32);
        if self.architecture.layer_norm() {
            md.push((k("attention.layer_norm_epsilon"), eps));
        } else {
            md.push((k("attention.layer_norm_rms_epsilon"), eps));
        }
        let feat = &self.features;
        if let Some(w) = feat.sliding_window {
            md.push((k("attention.sliding_window"), u(w)));
        }
        for (name, v) in [
            ("attn_logit_softcapping", feat.attn_logit_softcapping),
            ("final_logit_softcapping", feat.final_logit_softcapping),
            (
                "attention.query_pre_attn_scalar",
                feat.query_pre_attn_scalar,
            ),
        ] {
            if let Some(v) = v {
                md.push((k(name), GgufValue::F32(v as f32)));
            }
        }
        let f32v = |x: f64| GgufValue::F32(x as f32);
        match &self.rope_scaling {
            // Written as the `rope_freqs.weight` tensor by `convert`.
            None | Some(RopeScaling::FreqFactors(_)) => {}
            Some(RopeScaling::Linear { factor }) => {
                md.push((k("rope.scaling.type"), GgufValue::String("linear".into())));
                md.push((k("rope.scaling.factor"), f32v(*factor)));
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                md.push((k("rope.scaling.type"), GgufValue::String("llama3".into())));
                md.push((k("rope.scaling.factor"), f32v(*factor)));
                md.push((k("rope.scaling.low_freq_factor"), f32v(*low_freq_factor)));
                md.push((k("rope.scaling.high_freq_factor"), f32v(*high_freq_factor)));
                md.push((
                    k("rope.scaling.original_context_length"),
                    u(*original_max_position_embeddings),
                ));
            }
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                ..
            }) => {
                md.push((k("rope.scaling.type"), GgufValue::String("yarn".into())));
                md.push((k("rope.scaling.factor"), f32v(*factor)));
                md.push((
                    k("rope.scaling.original_context_length"),
                    u(*original_max_position_embeddings),
                ));
                md.push((k("rope.scaling.yarn_beta_fast"), f32v(*beta_fast)));
                md.push((k("rope.scaling.yarn_beta_slow"), f32v(*beta_slow)));
                md.push((k("rope.scaling.attn_factor"), f32v(*attention_factor)));
            }
        }
        for (name, id) in [
            ("tokenizer.ggml.bos_token_id", self.bos_token_id),
            (
                "tokenizer.ggml.eos_token_id",
                self.eos_token_ids.first().copied(),
            ),
            ("tokenizer.ggml.padding_token_id", self.pad_token_id),
        ] {
            if let Some(id) = id {
                md.push((name.to_string(), GgufValue::U32(id)));
            }
        }
        md
    }

    /// The Hugging Face `config.json` for this model, with weights stored as `dtype`.
    pub fn to_hf_json(&self, dtype: &str) -> Value {
        let rope_scaling = match &self.rope_scaling {
            None => Value::Null,
            Some(RopeScaling::FreqFactors(_)) => {
                tracing::warn!("rope frequency factors have no config.json form; dropped");
                Value::Null
            }
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
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            }) => json!({
                "rope_type": "yarn",
                "factor": factor,
                "original_max_position_embeddings": original_max_position_embeddings,
                "beta_fast": beta_fast,
                "beta_slow": beta_slow,
                "attention_factor": attention_factor,
                "truncate": truncate,
            }),
        };
        let eos: Value = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let feat = &self.features;
        let mut v = json!({
            "architectures": [self.architecture.hf_name()],
            "model_type": self.architecture.model_type(),
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
            "hidden_act": feat.hidden_act.hf_name(),
            "attention_bias": feat.qkv_bias,
            "attention_dropout": 0.0,
            "mlp_bias": feat.mlp_bias,
            "initializer_range": 0.02,
            "use_cache": true,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype,
            "dtype": dtype,
        });
        let Some(obj) = v.as_object_mut() else {
            return v;
        };
        if let Some(w) = feat.sliding_window {
            obj.insert("sliding_window".into(), json!(w));
            let types: Vec<&str> = feat
                .sliding_layers
                .iter()
                .map(|&s| {
                    if s {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                })
                .collect();
            obj.insert("layer_types".into(), json!(types));
            if matches!(self.architecture, Architecture::Qwen2 | Architecture::Qwen3) {
                obj.insert("use_sliding_window".into(), json!(true));
            }
        } else {
            obj.insert("sliding_window".into(), Value::Null);
        }
        if let Some(d) = feat.rotary_dim {
            obj.insert(
                "partial_rotary_factor".into(),
                json!(d as f64 / self.head_dim as f64),
            );
        }
        match self.architecture {
            Architecture::Gemma2 => {
                obj.insert("hidden_activation".into(), json!(feat.hidden_act.hf_name()));
                obj.insert(
                    "attn_logit_softcapping".into(),
                    json!(feat.attn_logit_softcapping),
                );
                obj.insert(
                    "final_logit_softcapping".into(),
                    json!(feat.final_logit_softcapping),
                );
                obj.insert(
                    "query_pre_attn_scalar".into(),
                    json!(feat.query_pre_attn_scalar.unwrap_or(self.head_dim as f64)),
                );
            }
            Architecture::Starcoder2 => {
                obj.insert("use_bias".into(), json!(feat.qkv_bias));
                obj.insert("norm_epsilon".into(), json!(self.rms_norm_eps));
            }
            _ => {}
        }
        v
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// The attention window of layer `i` (`None`: the whole context).
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        let f = &self.features;
        f.sliding_window
            .filter(|_| f.sliding_layers.get(i).copied().unwrap_or(false))
    }

    /// Attention score scale: `1/sqrt(query_pre_attn_scalar or head_dim)`.
    pub fn attention_scale(&self) -> f32 {
        let d = self
            .features
            .query_pre_attn_scalar
            .unwrap_or(self.head_dim as f64);
        (1.0 / d.sqrt()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<ModelConfig, LoadError> {
        ModelConfig::from_hf_json(&v, Path::new("config.json"))
    }

    fn base(arch: &str) -> Value {
        json!({"architectures": [arch], "vocab_size": 320, "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2})
    }

    #[test]
    fn rope_fields_at_top_level_and_in_rope_parameters_agree() {
        let mut old = base("LlamaForCausalLM");
        old["rope_theta"] = json!(500000.0);
        old["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
        let mut new = base("LlamaForCausalLM");
        new["rope_parameters"] =
            json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0});
        let (a, b) = (parse(old).expect("old"), parse(new).expect("new"));
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
    }

    #[test]
    fn yarn_defaults_follow_transformers() {
        let mut v = base("Qwen2ForCausalLM");
        v["max_position_embeddings"] = json!(32768);
        v["rope_scaling"] = json!({"type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 8192});
        let c = parse(v).expect("yarn");
        let Some(RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
        }) = c.rope_scaling
        else {
            panic!("not yarn: {:?}", c.rope_scaling);
        };
        assert_eq!(
            (
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow
            ),
            (4.0, 8192, 32.0, 1.0)
        );
        assert!((attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
        assert!(truncate);
    }

    #[test]
    fn explicit_head_dim_and_architecture_switches() {
        let mut v = base("Gemma2ForCausalLM");
        v["head_dim"] = json!(32);
        v["sliding_window"] = json!(16);
        v["query_pre_attn_scalar"] = json!(24);
        let c = parse(v).expect("gemma2");
        assert_eq!((c.head_dim, c.q_dim(), c.kv_dim()), (32, 128, 64));
        // No layer_types: Gemma 2 alternates, the first layer sliding.
        assert_eq!(c.features.sliding_layers, vec![true, false, true, false]);
        assert_eq!(c.layer_window(2), Some(16));
        assert_eq!(c.layer_window(1), None);
        assert_eq!(c.features.hidden_act, Activation::GeluTanh);
        assert!(c.tie_word_embeddings, "Gemma 2 ties by default");
        assert!((c.attention_scale() - 1.0 / 24f32.sqrt()).abs() < 1e-7);

        let mut v = base("Qwen2ForCausalLM");
        v["sliding_window"] = json!(4096);
        v["use_sliding_window"] = json!(true);
        v["max_window_layers"] = json!(2);
        let c = parse(v).expect("qwen2");
        assert_eq!(c.features.sliding_layers, vec![false, false, true, true]);
        assert!(c.features.qkv_bias && !c.features.o_bias);

        let mut v = base("Qwen2ForCausalLM");
        v["sliding_window"] = json!(4096);
        v["use_sliding_window"] = json!(false);
        let c = parse(v).expect("qwen2 without windows");
        assert_eq!(c.features.sliding_window, None);
        assert!(c.features.sliding_layers.is_empty());

        let mut v = base("Starcoder2ForCausalLM");
        v["norm_epsilon"] = json!(1e-5);
        let c = parse(v).expect("starcoder2");
        assert!(c.architecture.layer_norm() && !c.architecture.gated_mlp());
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert!(c.features.qkv_bias && c.features.o_bias && c.features.mlp_bias);

        let mut v = base("Phi3ForCausalLM");
        v["partial_rotary_factor"] = json!(0.5);
        assert_eq!(parse(v).expect("phi3").features.rotary_dim, Some(8));
    }

    #[test]
    fn unsupported_variants_are_named() {
        let mut v = base("Phi3ForCausalLM");
        v["rope_scaling"] = json!({"type": "longrope", "short_factor": [1.0]});
        let e = parse(v).expect_err("longrope").to_string();
        assert!(e.contains("longrope") && e.contains("yarn"), "{e}");
        let mut v = base("LlamaForCausalLM");
        v["hidden_act"] = json!("relu2");
        let e = parse(v).expect_err("relu2").to_string();
        assert!(
            e.contains("relu2") && e.contains("gelu_pytorch_tanh"),
            "{e}"
        );
        let e = parse(base("GPT2LMHeadModel"))
            .expect_err("gpt2")
            .to_string();
        for arch in Architecture::ALL {
            assert!(e.contains(arch.hf_name()), "{e}");
        }
    }

    #[test]
    fn hf_json_round_trips_every_architecture() {
        for arch in Architecture::ALL {
            let mut v = base(arch.hf_name());
            if matches!(arch, Architecture::Mistral | Architecture::Gemma2) {
                v["sliding_window"] = json!(8);
            }
            let c = parse(v).expect("parse");
            let again = parse(c.to_hf_json("float32")).expect("reparse");
            assert_eq!(c, again, "{arch:?}");
        }
    }
}
