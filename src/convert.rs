//! `convert`: a GGUF file → a Hugging Face model folder (`config.json`,
//! `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`, `model.safetensors`)
//! that transformers loads as is. Weights are the exact dequantized values in HF layout.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::DType;
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
    let (model, tokenizer) = crate::load(input)?;
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
    tokenizer.save_hf_files(out_dir, config.max_position_embeddings)?;
    Ok(())
}
