//! Builds a Hugging Face `tokenizer.json` document from GGUF tokenizer metadata, so the GGUF
//! vocabulary runs through the same `tokenizers` machinery as an HF folder and `convert` can
//! write it out unchanged.
//!
//! Supported: `tokenizer.ggml.model = gpt2` (byte-level BPE; pre-tokenizer chosen by
//! `tokenizer.ggml.pre`, as llama.cpp does) and `llama` (SentencePiece BPE with byte fallback;
//! merges rebuilt from the scores, as transformers does).

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::TextError;

const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
// Mistral's Tekken (Nemo, Small 3.x, Ministral): words split at case changes, digits one by
// one, no contractions (its tokenizer.json's, as llama.cpp quotes it for `tekken`).
const TEKKEN_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
// OpenAI's o200k (`gpt-4o`: Phi-4-mini, Llama 4): Tekken's with contractions and up to three
// digits together.
const GPT4O_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
// Seed-Coder: Qwen2's with punctuation runs that never take a line break.
const SEED_CODER_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
// DeepSeek-Coder (llama architecture; fill-in-the-middle tokens): regexes applied one after
// another, then single digits.
const DEEPSEEK_CODER_SPLITS: [&str; 4] =
    [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+"];

/// Tokenizer facts from GGUF metadata that are not part of `tokenizer.json`.
#[derive(Debug, Clone)]
pub struct GgufTokenizerFacts {
    /// `tokenizer.json` contents.
    pub tokenizer_json: Value,
    /// BOS token text.
    pub bos_token: Option<String>,
    /// EOS token text.
    pub eos_token: Option<String>,
    /// Unknown token text.
    pub unk_token: Option<String>,
    /// Padding token text.
    pub pad_token: Option<String>,
    /// Whether BOS is prepended when encoding with special tokens.
    pub add_bos: bool,
    /// Whether EOS is appended when encoding with special tokens.
    pub add_eos: bool,
    /// Jinja chat template.
    pub chat_template: Option<String>,
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(regex: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

fn split_then_byte_level(regex: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [split(regex), byte_level(false)]})
}

/// How a byte-level BPE vocabulary named by GGUF `tokenizer.ggml.pre` splits text before its
/// merges (names and rules as llama.cpp's `llama-vocab.cpp` maps them).
struct PreTokenizer {
    /// The `tokenizer.json` pre-tokenizer.
    json: Value,
    /// A piece that is itself in the vocabulary is one token, merges or not (llama.cpp's
    /// `ignore_merges`, Hugging Face's BPE `ignore_merges`: Llama 3, Tekken).
    ignore_merges: bool,
    /// Whether BOS is added when the file does not say (`tokenizer.ggml.add_bos_token`).
    add_bos: bool,
}

fn gpt2_pre_tokenizer(pre: &str) -> Result<PreTokenizer, TextError> {
    let plain = |json| PreTokenizer {
        json,
        ignore_merges: false,
        add_bos: false,
    };
    let bos_whole_words = |json| PreTokenizer {
        json,
        ignore_merges: true,
        add_bos: true,
    };
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" | "olmo" | "phi-2" | "jina-es" | "jina-de" | "jina-v2-es"
        | "jina-v2-de" | "gigachat" | "a.x-4.0" | "mellum" | "exaone4" => plain(byte_level(true)),
        // Every digit isolated, then GPT-2 splitting (upstream SmolLM / StarCoder tokenizers).
        "smollm" | "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" | "command-r" => {
            plain(json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}))
        }
        "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" => bos_whole_words(split_then_byte_level(LLAMA3_REGEX)),
        "smaug-bpe" | "dbrx" => plain(split_then_byte_level(LLAMA3_REGEX)),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "stablelm2" | "megrez" => {
            plain(split_then_byte_level(QWEN2_REGEX))
        }
        "tekken" => bos_whole_words(split_then_byte_level(TEKKEN_REGEX)),
        "gpt-4o" | "llama4" => plain(split_then_byte_level(GPT4O_REGEX)),
        "seed-coder" => plain(split_then_byte_level(SEED_CODER_REGEX)),
        "deepseek-coder" => {
            let mut parts: Vec<Value> = DEEPSEEK_CODER_SPLITS.iter().map(|r| split(r)).collect();
            parts.push(json!({"type": "Digits", "individual_digits": true}));
            parts.push(byte_level(false));
            plain(json!({"type": "Sequence", "pretokenizers": parts}))
        }
        other => {
            return Err(TextError::Unsupported(format!(
                "GGUF tokenizer.ggml.pre '{other}' (supported: default, gpt2, smollm, starcoder, \
                 refact, llama3/llama-bpe, qwen2, tekken, gpt-4o, deepseek-coder, seed-coder and \
                 their aliases)"
            )))
        }
    })
}

/// Merges for a SentencePiece vocabulary, rebuilt from piece scores the way transformers'
/// `SentencePieceExtractor` does: every split of a piece into two known pieces, ordered by the
/// merged piece's score (highest first), ties by the ids of the parts.
fn spm_merges(tokens: &[String], scores: &[f32], types: &[i64]) -> Vec<Value> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(usize, usize, f32)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        if types.get(i).copied().unwrap_or(TYPE_NORMAL) != TYPE_NORMAL {
            continue;
        }
        let score = scores.get(i).copied().unwrap_or(0.0);
        let mut local = Vec::new();
        for (cut, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (ids.get(&piece[..cut]), ids.get(&piece[cut..])) {
                local.push((l, r, score));
            }
        }
        local.sort_by_key(|&(l, r, _)| (l, r));
        merges.extend(local);
    }
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));
    merges
        .into_iter()
        .map(|(l, r, _)| json!([tokens[l], tokens[r]]))
        .collect()
}

/// Reads the tokenizer out of GGUF metadata.
pub fn from_gguf_metadata(md: &Map<String, Value>) -> Result<GgufTokenizerFacts, TextError> {
    let model = md
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .ok_or_else(|| TextError::Invalid("GGUF metadata has no tokenizer.ggml.model".into()))?;
    let tokens: Vec<String> = md
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .ok_or_else(|| TextError::Invalid("GGUF metadata has no tokenizer.ggml.tokens".into()))?
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect();
    let types: Vec<i64> = md
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|v| v.as_i64().unwrap_or(TYPE_NORMAL))
                .collect()
        })
        .unwrap_or_default();
    let token_id = |key: &str| {
        md.get(key)
            .and_then(Value::as_u64)
            .filter(|&i| (i as usize) < tokens.len())
            .map(|i| i as u32)
    };
    let token_text = |id: Option<u32>| id.map(|i| tokens[i as usize].clone());
    let flag = |key: &str| md.get(key).and_then(Value::as_bool);
    let bos_id = token_id("tokenizer.ggml.bos_token_id");
    let eos_id = token_id("tokenizer.ggml.eos_token_id");
    let unk_id = token_id("tokenizer.ggml.unknown_token_id");

    let added_tokens: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let ty = types.get(i).copied().unwrap_or(TYPE_NORMAL);
            let special = ty == TYPE_CONTROL || ty == TYPE_UNKNOWN;
            (special || ty == TYPE_USER_DEFINED).then(|| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": !special, "special": special})
            })
        })
        .collect();
    let vocab: Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();

    let (add_bos_default, tokenizer_parts) = match model {
        "gpt2" => {
            let pre = md
                .get("tokenizer.ggml.pre")
                .and_then(Value::as_str)
                .unwrap_or("default");
            let pre = gpt2_pre_tokenizer(pre)?;
            let merges = md
                .get("tokenizer.ggml.merges")
                .and_then(Value::as_array)
                .cloned()
                .ok_or_else(|| TextError::Invalid("GGUF gpt2 tokenizer has no merges".into()))?;
            let parts = json!({
                "normalizer": null,
                "pre_tokenizer": pre.json,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null,
                          "continuing_subword_prefix": null, "end_of_word_suffix": null,
                          "fuse_unk": false, "byte_fallback": false,
                          "ignore_merges": pre.ignore_merges,
                          "vocab": vocab, "merges": merges},
            });
            (pre.add_bos, parts)
        }
        "llama" => {
            let scores: Vec<f32> = md
                .get("tokenizer.ggml.scores")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect())
                .unwrap_or_default();
            let add_space_prefix = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
            let mut normalizers = Vec::new();
            if add_space_prefix {
                normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
            }
            normalizers
                .push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_space_prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let parts = json!({
                "normalizer": {"type": "Sequence", "normalizers": normalizers},
                "pre_tokenizer": null,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {"type": "BPE", "dropout": null, "unk_token": token_text(unk_id),
                          "continuing_subword_prefix": null, "end_of_word_suffix": null,
                          "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                          "vocab": vocab, "merges": spm_merges(&tokens, &scores, &types)},
            });
            (true, parts)
        }
        other => {
            return Err(TextError::Unsupported(format!(
                "GGUF tokenizer model '{other}' (supported: gpt2, llama)"
            )))
        }
    };
    let add_bos =
        flag("tokenizer.ggml.add_bos_token").unwrap_or(add_bos_default) && bos_id.is_some();
    let add_eos = flag("tokenizer.ggml.add_eos_token").unwrap_or(false) && eos_id.is_some();

    let mut single = Vec::new();
    let mut special_tokens = Map::new();
    if let (true, Some(id)) = (add_bos, bos_id) {
        let t = &tokens[id as usize];
        single.push(json!({"SpecialToken": {"id": t, "type_id": 0}}));
        special_tokens.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if let (true, Some(id)) = (add_eos, eos_id) {
        let t = &tokens[id as usize];
        single.push(json!({"SpecialToken": {"id": t, "type_id": 0}}));
        special_tokens.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    let mut pair = single.clone();
    pair.extend(single.iter().map(|v| {
        if v.get("Sequence").is_some() {
            json!({"Sequence": {"id": "B", "type_id": 1}})
        } else {
            v.clone()
        }
    }));

    let mut doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair,
                           "special_tokens": special_tokens},
    });
    if let (Some(d), Some(p)) = (doc.as_object_mut(), tokenizer_parts.as_object()) {
        for (k, v) in p {
            d.insert(k.clone(), v.clone());
        }
    }
    Ok(GgufTokenizerFacts {
        tokenizer_json: doc,
        bos_token: token_text(bos_id),
        eos_token: token_text(eos_id),
        unk_token: token_text(unk_id),
        pad_token: token_text(token_id("tokenizer.ggml.padding_token_id")),
        add_bos,
        add_eos,
        chat_template: md
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

/// Whether every field of `want` is in `have` with the same value (extra fields of `have`,
/// such as defaults a newer `tokenizers` writes, do not matter).
fn json_covers(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, v)| h.get(k).is_some_and(|hv| json_covers(hv, v))),
        (Value::Array(h), Value::Array(w)) => {
            h.len() == w.len() && h.iter().zip(w).all(|(a, b)| json_covers(a, b))
        }
        _ => have == want,
    }
}

/// GGUF tokenizer metadata (llama.cpp's keys) for a byte-level BPE tokenizer, the inverse of
/// [`from_gguf_metadata`] for `tokenizer.ggml.model = gpt2`. Other tokenizer kinds are an error
/// that names what was found.
pub fn to_gguf_metadata(
    tok: &super::Tokenizer,
) -> Result<Vec<(String, candle_core::quantized::gguf_file::Value)>, TextError> {
    use candle_core::quantized::gguf_file::Value as G;
    let doc: Value = serde_json::from_str(
        &tok.inner
            .to_string(false)
            .map_err(|e| TextError::Tokenizer(e.to_string()))?,
    )
    .map_err(|e| TextError::Invalid(e.to_string()))?;
    let model = &doc["model"];
    let kind = model["type"].as_str().unwrap_or("<none>");
    let pre_json = &doc["pre_tokenizer"];
    let pre = [
        "gpt2",
        "smollm",
        "llama3",
        "qwen2",
        "tekken",
        "gpt-4o",
        "seed-coder",
    ]
    .into_iter()
    .find(|name| gpt2_pre_tokenizer(name).is_ok_and(|want| json_covers(pre_json, &want.json)));
    let (true, Some(pre)) = (kind == "BPE", pre) else {
        return Err(TextError::Unsupported(format!(
            "tokenizer for GGUF: only byte-level BPE tokenizers are written (model type \
             '{kind}', pre-tokenizer {})",
            pre_json
        )));
    };
    let vocab_size = tok.inner.get_vocab_size(true);
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut types = vec![TYPE_NORMAL; vocab_size];
    for (text, id) in tok.inner.get_vocab(true) {
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = text;
        }
    }
    for (id, added) in tok.inner.get_added_tokens_decoder() {
        if let Some(t) = types.get_mut(id as usize) {
            *t = if added.special {
                TYPE_CONTROL
            } else {
                TYPE_USER_DEFINED
            };
        }
    }
    let merges: Vec<G> = model["merges"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .filter_map(|m| match m {
                    Value::String(s) => Some(s.clone()),
                    Value::Array(pair) => Some(format!(
                        "{} {}",
                        pair.first()?.as_str()?,
                        pair.get(1)?.as_str()?
                    )),
                    _ => None,
                })
                .map(G::String)
                .collect()
        })
        .unwrap_or_default();
    let mut md = vec![
        ("tokenizer.ggml.model".to_string(), G::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), G::String(pre.into())),
        (
            "tokenizer.ggml.tokens".to_string(),
            G::Array(tokens.into_iter().map(G::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            G::Array(types.into_iter().map(|t| G::I32(t as i32)).collect()),
        ),
        ("tokenizer.ggml.merges".to_string(), G::Array(merges)),
        (
            "tokenizer.ggml.add_bos_token".to_string(),
            G::Bool(tok.add_bos),
        ),
        (
            "tokenizer.ggml.add_eos_token".to_string(),
            G::Bool(tok.add_eos),
        ),
    ];
    for (key, text) in [
        ("tokenizer.ggml.bos_token_id", &tok.bos_token),
        ("tokenizer.ggml.eos_token_id", &tok.eos_token),
        ("tokenizer.ggml.unknown_token_id", &tok.unk_token),
        ("tokenizer.ggml.padding_token_id", &tok.pad_token),
    ] {
        if let Some(id) = text.as_deref().and_then(|t| tok.inner.token_to_id(t)) {
            md.push((key.to_string(), G::U32(id)));
        }
    }
    if let Some(t) = &tok.chat_template {
        md.push(("tokenizer.chat_template".to_string(), G::String(t.clone())));
    }
    Ok(md)
}
