//! `convert`, both ways:
//! - a GGUF file → a Hugging Face model folder (`config.json`, `generation_config.json`,
//!   `tokenizer.json`, `tokenizer_config.json`, `model.safetensors`) that transformers loads as
//!   is; weights are the exact dequantized values in HF layout;
//! - a Hugging Face folder → a GGUF file in llama.cpp's layout (tensor names, metadata keys,
//!   Q/K row permutation for llama, Gemma's `1 + w` norms), f32/f16 or quantized with candle's
//!   quantizers (IQ4_NL / IQ4_XS with nextoken's port of llama.cpp's), written by candle's GGUF
//!   writer (the IQ4 types as placeholders of the same size, then retyped in the header).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Tensor};

use crate::model::attention::Rope;
use crate::model::quant::{quantize_iq4, QuantFormat};
use crate::model::weights::retype_gguf_tensors;
use crate::model::{ModelConfig, RopeScaling};
use serde_json::json;

/// Weight dtype of the written folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConvertDtype {
    /// float32 (exact).
    F32,
    /// bfloat16.
    Bf16,
    /// float16.
    F16,
}

impl ConvertDtype {
    fn dtype(self) -> DType {
        match self {
            ConvertDtype::F32 => DType::F32,
            ConvertDtype::Bf16 => DType::BF16,
            ConvertDtype::F16 => DType::F16,
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            ConvertDtype::F32 => "float32",
            ConvertDtype::Bf16 => "bfloat16",
            ConvertDtype::F16 => "float16",
        }
    }
}

/// Converts `input` (a `.gguf` file) into an HF folder at `out_dir`.
pub fn gguf_to_hf(input: &Path, out_dir: &Path, dtype: ConvertDtype) -> anyhow::Result<()> {
    if input.is_dir() {
        bail!(
            "{}: convert expects a .gguf file, not a folder",
            input.display()
        );
    }
    let (model, source) = crate::model::Model::load(input)?;
    // A GGUF without a vocabulary (tiny test models) converts to a folder without tokenizer.
    let tokenizer = match &source {
        crate::model::ModelSource::Gguf { metadata, .. }
            if metadata.contains_key("tokenizer.ggml.model") =>
        {
            Some(crate::text::Tokenizer::from_gguf_metadata(metadata)?)
        }
        _ => None,
    };
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let config = model.config();
    let tensors = model
        .named_tensors()?
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(dtype.dtype())?)))
        .collect::<candle_core::Result<HashMap<_, _>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let weights_path = out_dir.join("model.safetensors");
    safetensors::serialize_to_file(&tensors, Some(metadata), &weights_path)
        .with_context(|| format!("writing {}", weights_path.display()))?;
    let write_json = |name: &str, value: serde_json::Value| -> anyhow::Result<()> {
        let path = out_dir.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(&value)?)
            .with_context(|| format!("writing {}", path.display()))
    };
    write_json("config.json", config.to_hf_json(dtype.torch_name()))?;
    let eos = match config.eos_token_ids.as_slice() {
        [one] => json!(one),
        many => json!(many),
    };
    write_json(
        "generation_config.json",
        json!({"bos_token_id": config.bos_token_id, "eos_token_id": eos,
               "pad_token_id": config.pad_token_id}),
    )?;
    if let Some(tokenizer) = tokenizer {
        tokenizer.save_hf_files(out_dir, config.max_position_embeddings)?;
    }
    Ok(())
}

/// Tensor type of the GGUF written from a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufQuant {
    /// float32 (exact).
    F32,
    /// float16.
    F16,
    /// 8-bit blocks of 32 with an f16 scale.
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit blocks of 32 with an f16 scale.
    #[value(name = "q4_0")]
    Q4_0,
    /// 4-bit blocks of 32 with an f16 scale and minimum.
    #[value(name = "q4_1")]
    Q4_1,
    /// 5-bit blocks of 32 with an f16 scale.
    #[value(name = "q5_0")]
    Q5_0,
    /// 6-bit super-blocks of 256 (16-value sub-blocks with 8-bit scales); rows that do not
    /// split into 256 fall back to Q8_0, as llama.cpp does.
    #[value(name = "q6_k")]
    Q6K,
    /// llama.cpp's `Q4_K_M` mix: Q4_K super-blocks, with Q6_K for the output head (the
    /// embeddings when tied) and for `attn_v` / `ffn_down` of the first and last eighth of the
    /// layers and every third between; rows that do not split into 256 fall back to Q5_0
    /// (Q4_K) and Q8_0 (Q6_K), as llama.cpp does.
    #[value(name = "q4_k_m")]
    Q4KM,
    /// llama.cpp's `Q5_K_M` mix: Q5_K super-blocks, with Q6_K where `q4_k_m` has it; rows
    /// that do not split into 256 fall back to Q5_1 (Q5_K) and Q8_0 (Q6_K).
    #[value(name = "q5_k_m")]
    Q5KM,
    /// 3-bit super-blocks of 256 (16-value sub-blocks with 6-bit scales); rows that do not
    /// split into 256 fall back to Q4_0 (llama.cpp's fallback before IQ4_NL).
    #[value(name = "q3_k")]
    Q3K,
    /// llama.cpp's IQ4_NL: 4-bit indices into a fixed non-linear table, blocks of 32 with an
    /// f16 scale; the output head Q6_K (Q8_0 where its rows do not split into 256), as
    /// llama.cpp's quantizer chooses.
    #[value(name = "iq4_nl")]
    IQ4NL,
    /// llama.cpp's IQ4_XS: IQ4_NL's table in super-blocks of 256 with 6-bit sub-block
    /// scales; rows that do not split into 256 fall back to IQ4_NL, and the head is Q6_K (or
    /// Q8_0), as llama.cpp does.
    #[value(name = "iq4_xs")]
    IQ4XS,
}

/// What one 2-D weight is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    /// A type candle quantizes and writes.
    Candle(GgmlDType),
    /// IQ4_NL or IQ4_XS.
    Iq4(QuantFormat),
}

impl GgufQuant {
    fn dtype(self) -> GgmlDType {
        match self {
            GgufQuant::F32 => GgmlDType::F32,
            GgufQuant::F16 => GgmlDType::F16,
            GgufQuant::Q8_0 => GgmlDType::Q8_0,
            GgufQuant::Q4_0 => GgmlDType::Q4_0,
            GgufQuant::Q4_1 => GgmlDType::Q4_1,
            GgufQuant::Q5_0 => GgmlDType::Q5_0,
            GgufQuant::Q6K => GgmlDType::Q6K,
            GgufQuant::Q4KM => GgmlDType::Q4K,
            GgufQuant::Q5KM => GgmlDType::Q5K,
            GgufQuant::Q3K => GgmlDType::Q3K,
            // Not used: `tensor_type` picks their head's and fallback types itself.
            GgufQuant::IQ4NL | GgufQuant::IQ4XS => GgmlDType::Q6K,
        }
    }

    /// The type of the 2-D weight `hf` (see [`GgufQuant::tensor_type`]); the IQ4 formats for
    /// all but the head.
    fn written(self, hf: &str, cols: usize, layers: usize, tied: bool) -> Written {
        let head = hf == "lm_head.weight" || (tied && hf == "model.embed_tokens.weight");
        let iq4 = match self {
            GgufQuant::IQ4NL => Some(QuantFormat::IQ4NL),
            GgufQuant::IQ4XS if cols.is_multiple_of(256) => Some(QuantFormat::IQ4XS),
            GgufQuant::IQ4XS => Some(QuantFormat::IQ4NL),
            _ => None,
        };
        match iq4 {
            Some(format) if !head && cols.is_multiple_of(32) => Written::Iq4(format),
            _ => Written::Candle(self.tensor_type(hf, cols, layers, tied)),
        }
    }

    /// The type of the 2-D weight `hf` with rows of `cols` values, in a model of `layers`
    /// layers whose head is `tied` to the embeddings: llama.cpp's choice
    /// (`llama_tensor_get_type`) for the mixes, then its fallbacks where the rows do not split
    /// into the type's blocks.
    fn tensor_type(self, hf: &str, cols: usize, layers: usize, tied: bool) -> GgmlDType {
        let layer = hf
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        // llama.cpp's `use_more_bits`: the first and last eighth, and every third between
        // (`i − n/8` is only reached past the first eighth).
        let more_bits = |i: usize| {
            let n = layers;
            i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
        };
        let head = hf == "lm_head.weight" || (tied && hf == "model.embed_tokens.weight");
        let mix = matches!(self, GgufQuant::Q4KM | GgufQuant::Q5KM);
        let iq4 = matches!(self, GgufQuant::IQ4NL | GgufQuant::IQ4XS);
        let more = (hf.ends_with("v_proj.weight") || hf.ends_with("down_proj.weight"))
            && layer.is_some_and(more_bits);
        let mut dtype = if (mix && (head || more)) || (iq4 && head) {
            GgmlDType::Q6K
        } else if iq4 {
            // Rows the IQ4 blocks do not fit (not a multiple of 32).
            GgmlDType::F16
        } else {
            self.dtype()
        };
        if !cols.is_multiple_of(dtype.block_size()) {
            dtype = match dtype {
                GgmlDType::Q4K => GgmlDType::Q5_0,
                GgmlDType::Q5K => GgmlDType::Q5_1,
                GgmlDType::Q6K => GgmlDType::Q8_0,
                GgmlDType::Q3K => GgmlDType::Q4_0,
                other => other,
            };
        }
        if !cols.is_multiple_of(dtype.block_size()) {
            dtype = GgmlDType::F16;
        }
        dtype
    }

    /// llama.cpp's `general.file_type`.
    fn file_type(self) -> u32 {
        match self {
            GgufQuant::F32 => 0,
            GgufQuant::F16 => 1,
            GgufQuant::Q4_0 => 2,
            GgufQuant::Q4_1 => 3,
            GgufQuant::Q8_0 => 7,
            GgufQuant::Q5_0 => 8,
            GgufQuant::Q4KM => 15,
            GgufQuant::Q5KM => 17,
            GgufQuant::Q3K => 11,
            GgufQuant::Q6K => 18,
            GgufQuant::IQ4NL => 25,
            GgufQuant::IQ4XS => 30,
        }
    }
}

/// llama.cpp's Q/K row permutation (HF rotate-half layout → ggml's interleaved one).
fn permute_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    w.reshape((heads, 2, rows / heads / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// Converts the HF folder `input` into the GGUF file `out`. 2-D weights get `quant` (per
/// tensor for the `q4_k_m` / `q5_k_m` mixes; rows that do not split into the type's blocks
/// fall back to a smaller block, then to f16, as llama.cpp does); norms and biases stay f32.
/// The tokenizer is written when the folder has one.
pub fn hf_to_gguf(input: &Path, out: &Path, quant: GgufQuant) -> anyhow::Result<()> {
    if !input.is_dir() {
        bail!(
            "{}: convert to GGUF expects a Hugging Face folder",
            input.display()
        );
    }
    let (model, _) = crate::model::Model::load(input)?;
    let config = model.config();
    let arch = config.architecture;
    let mut metadata = config.to_gguf_metadata();
    let name = input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    metadata.push(("general.name".into(), gguf_file::Value::String(name)));
    metadata.push((
        "general.file_type".into(),
        gguf_file::Value::U32(quant.file_type()),
    ));
    if input.join("tokenizer.json").exists() {
        let tokenizer = crate::text::Tokenizer::from_hf_dir(input)?;
        metadata.extend(tokenizer.gguf_metadata()?);
    }
    // The last value of a key wins; llama.cpp refuses duplicate keys.
    let mut seen = std::collections::HashSet::new();
    let mut unique: Vec<(String, gguf_file::Value)> = metadata
        .into_iter()
        .rev()
        .filter(|(k, _)| seen.insert(k.clone()))
        .collect();
    unique.reverse();
    let permute = arch.gguf_name() == "llama";
    let mut tensors = Vec::new();
    // llama.cpp reads Llama 3 rope scaling as per-frequency divisors (nextoken reads the
    // metadata keys written above first).
    if matches!(
        config.rope_scaling,
        Some(RopeScaling::Llama3 { .. } | RopeScaling::FreqFactors(_))
    ) {
        let scaled = Rope::new(config);
        let plain = Rope::new(&ModelConfig {
            rope_scaling: None,
            ..config.clone()
        });
        let factors: Vec<f32> = plain
            .inv_freq()
            .iter()
            .zip(scaled.inv_freq())
            .map(|(p, s)| p / s)
            .collect();
        let n = factors.len();
        let t = Tensor::from_vec(factors, n, &candle_core::Device::Cpu)?;
        tensors.push((
            "rope_freqs.weight".to_string(),
            QTensor::quantize(&t, GgmlDType::F32)?,
        ));
    }
    let named = model.named_tensors()?;
    let tied = !named.iter().any(|(hf, _)| hf == "lm_head.weight");
    // IQ4 tensors: GGUF name → (ggml type, row length), set in the header once written.
    let mut retype = HashMap::new();
    for (hf, t) in named {
        let gguf = crate::model::weights::gguf_name(arch, &hf)
            .with_context(|| format!("no GGUF name for tensor '{hf}'"))?;
        // A fresh buffer: candle's quantizer reads the whole storage, not a view's part of it.
        let mut t = Tensor::from_vec(
            t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            t.shape(),
            &candle_core::Device::Cpu,
        )?;
        if permute && hf.ends_with("q_proj.weight") {
            t = permute_rows(&t, config.num_heads)?;
        } else if permute && hf.ends_with("k_proj.weight") {
            t = permute_rows(&t, config.num_kv_heads)?;
        }
        if arch.unit_offset_norms() && hf.ends_with("norm.weight") {
            t = (t + 1.0)?;
        }
        let t = t.contiguous()?.copy()?;
        let written = if t.rank() < 2 {
            Written::Candle(GgmlDType::F32)
        } else {
            quant.written(&hf, t.dim(1)?, config.num_layers, tied)
        };
        let q = match written {
            Written::Candle(dtype) => QTensor::quantize(&t, dtype),
            Written::Iq4(format) => {
                let (rows, cols) = t.dims2()?;
                let bytes = quantize_iq4(format, &t.flatten_all()?.to_vec1::<f32>()?)
                    .with_context(|| format!("quantizing '{hf}' to {}", format.name()))?;
                // A placeholder of the same byte size: Q4_0 has IQ4_NL's blocks (32 values
                // in 18 bytes); IQ4_XS's 136 bytes per 256 values are 68 f16s.
                let (ggml_type, placeholder, dims) = match format {
                    QuantFormat::IQ4NL => (20, GgmlDType::Q4_0, vec![rows, cols]),
                    _ => (23, GgmlDType::F16, vec![rows, cols / 256 * 68]),
                };
                retype.insert(gguf.clone(), (ggml_type, cols as u64));
                qtensor_from_ggml(placeholder, &bytes, dims, &candle_core::Device::Cpu)
            }
        }
        .with_context(|| format!("quantizing '{hf}'"))?;
        tensors.push((gguf, q));
    }
    let tmp = out.with_extension("gguf.tmp");
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
    );
    let md_refs: Vec<(&str, &gguf_file::Value)> =
        unique.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &md_refs, &t_refs)?;
    use std::io::Write;
    file.flush()?;
    drop(file);
    retype_gguf_tensors(&tmp, &retype)?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
