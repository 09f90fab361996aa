//! What a model file is, for listings (Ollama's `details`: format, size, parameter count,
//! quantization level), read from the files' headers only.

use std::io::Read;
use std::path::Path;

use super::LoadError;

/// Facts about a model's weight files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDetails {
    /// `"gguf"` or `"safetensors"`.
    pub format: &'static str,
    /// Bytes of the weight files.
    pub size: u64,
    /// Values in every tensor of the files.
    pub parameters: u64,
    /// llama.cpp's file-type name (`Q4_K_M`, ...) for GGUF, the most common tensor type where
    /// a file has none; the weights' dtype (`BF16`, ...) for a folder.
    pub quantization: String,
}

/// llama.cpp's names of `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`).
fn file_type_name(t: u32) -> Option<&'static str> {
    Some(match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        _ => return None,
    })
}

/// The most common of `names` (by values), or `""`.
fn most_common(names: impl Iterator<Item = (String, u64)>) -> String {
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    for (n, v) in names {
        *counts.entry(n).or_insert(0) += v;
    }
    counts
        .into_iter()
        .max_by_key(|(_, v)| *v)
        .map(|(n, _)| n)
        .unwrap_or_default()
}

/// The details of the `.gguf` file or Hugging Face folder at `path`.
pub fn file_details(path: &Path) -> Result<FileDetails, LoadError> {
    let io = |e| LoadError::io(path, e);
    if path.is_file() {
        let mut file = std::fs::File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let (content, foreign) = super::weights::read_gguf_header(path, &mut file)?;
        let parameters = content
            .tensor_infos
            .values()
            .map(|t| t.shape.elem_count() as u64)
            .sum();
        let named = content
            .metadata
            .get("general.file_type")
            .and_then(|v| v.to_u32().ok())
            .and_then(file_type_name);
        let quantization = named.map(str::to_owned).unwrap_or_else(|| {
            most_common(content.tensor_infos.iter().map(|(n, t)| {
                let name = match foreign.get(n) {
                    Some(format) => format.name().to_string(),
                    None => {
                        // candle spells the k-quants `Q4K`; ggml `Q4_K`.
                        let mut name = format!("{:?}", t.ggml_dtype).to_uppercase();
                        if name.len() == 3 && name.starts_with('Q') && name.ends_with('K') {
                            name.insert(2, '_');
                        }
                        name
                    }
                };
                (name, t.shape.elem_count() as u64)
            }))
        });
        return Ok(FileDetails {
            format: "gguf",
            size,
            parameters,
            quantization,
        });
    }
    // A folder: every safetensors file's header (8 bytes of length, then JSON).
    let mut details = FileDetails {
        format: "safetensors",
        size: 0,
        parameters: 0,
        quantization: String::new(),
    };
    let mut dtypes = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(path)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    entries.sort();
    for file in entries {
        let io = |e| LoadError::io(&file, e);
        let mut f = std::fs::File::open(&file).map_err(io)?;
        details.size += f.metadata().map_err(io)?.len();
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(io)?;
        let len = u64::from_le_bytes(len);
        if len > 100 << 20 {
            return Err(LoadError::format(&file, "safetensors header too large"));
        }
        let mut header = vec![0u8; len as usize];
        f.read_exact(&mut header).map_err(io)?;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| LoadError::format(&file, format!("safetensors header: {e}")))?;
        for (name, t) in &header {
            if name == "__metadata__" {
                continue;
            }
            let count: u64 = t["shape"]
                .as_array()
                .map(|s| s.iter().filter_map(serde_json::Value::as_u64).product())
                .unwrap_or(0);
            details.parameters += count;
            dtypes.push((t["dtype"].as_str().unwrap_or("").to_owned(), count));
        }
    }
    details.quantization = most_common(dtypes.into_iter());
    Ok(details)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_types_have_llama_cpp_names() {
        assert_eq!(file_type_name(15), Some("Q4_K_M"));
        assert_eq!(file_type_name(3), Some("Q4_1"));
        assert_eq!(file_type_name(4), None);
    }
}
