//! Text layer: text ⇄ token ids. Tokenizer loading (HF `tokenizer.json` or GGUF metadata),
//! special tokens, incremental detokenization. No engine, no HTTP, no tensors.

pub mod chat_template;
pub mod detokenizer;
pub mod fim;
pub mod gguf_vocab;
pub mod reasoning;
pub mod stop;

use std::path::Path;

use serde_json::{json, Map, Value};

/// Special tokens that stand for a tool-call tag in some vocabularies (Mistral's
/// `[TOOL_CALLS]`, Hermes' `<tool_call>` where a vocabulary marks it special): constrained
/// decoding treats them as their text ([`Tokenizer::token_bytes`]).
pub const TOOL_TAG_TOKENS: [&str; 3] = ["[TOOL_CALLS]", "<tool_call>", "</tool_call>"];

pub use chat_template::{ChatMessage, ChatTemplate};
pub use detokenizer::Detokenizer;
pub use fim::{FimMode, FimTemplate};
pub use reasoning::{ReasoningSplitter, Split};
pub use stop::{StopCheck, StopMatcher};

/// Errors of the text layer.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// Input or files that cannot be used.
    #[error("{0}")]
    Invalid(String),
    /// A tokenizer feature this build does not support.
    #[error("unsupported {0}")]
    Unsupported(String),
    /// The `tokenizers` library failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// A tokenizer plus the facts around it that serving needs: BOS/EOS, whether BOS is added,
/// the chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    unk_token: Option<String>,
    pad_token: Option<String>,
    add_bos: bool,
    add_eos: bool,
    chat_template: Option<String>,
}

fn token_field(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Value, TextError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TextError::Invalid(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| TextError::Invalid(format!("{}: invalid JSON: {e}", path.display())))
}

impl Tokenizer {
    /// Builds the tokenizer from GGUF metadata.
    pub fn from_gguf_metadata(md: &Map<String, Value>) -> Result<Self, TextError> {
        let facts = gguf_vocab::from_gguf_metadata(md)?;
        let inner = tokenizers::Tokenizer::from_bytes(facts.tokenizer_json.to_string())
            .map_err(|e| TextError::Tokenizer(e.to_string()))?;
        Ok(Tokenizer {
            inner,
            bos_token: facts.bos_token,
            eos_token: facts.eos_token,
            unk_token: facts.unk_token,
            pad_token: facts.pad_token,
            add_bos: facts.add_bos,
            add_eos: facts.add_eos,
            chat_template: facts.chat_template,
        })
    }

    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from an HF folder.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TextError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(TextError::Invalid(format!(
                "{}: no tokenizer.json in the folder; the weights load, but text in and out \
                 needs the model's tokenizer (copy tokenizer.json and tokenizer_config.json \
                 from its repository)",
                dir.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| TextError::Invalid(format!("{}: {e}", path.display())))?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            read_json(&config_path)?
        } else {
            json!({})
        };
        let chat_template = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        }
        .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        let bos_token = token_field(config.get("bos_token"));
        let eos_token = token_field(config.get("eos_token"));
        let mut tok = Tokenizer {
            inner,
            bos_token,
            eos_token,
            unk_token: token_field(config.get("unk_token")),
            pad_token: token_field(config.get("pad_token")),
            add_bos: false,
            add_eos: false,
            chat_template,
        };
        // The post-processor decides what `add_special_tokens` adds; an explicit flag in
        // tokenizer_config.json wins (as transformers' Llama tokenizers do).
        let probe = tok
            .inner
            .encode("a", true)
            .map_err(|e| TextError::Tokenizer(e.to_string()))?;
        let probe_ids = probe.get_ids();
        tok.add_bos = config
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or_else(|| {
                tok.bos_id().is_some() && probe_ids.first().copied() == tok.bos_id()
            });
        tok.add_eos = config
            .get("add_eos_token")
            .and_then(Value::as_bool)
            .unwrap_or_else(|| tok.eos_id().is_some() && probe_ids.last().copied() == tok.eos_id());
        Ok(tok)
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are always
    /// recognised; `add_special` adds BOS/EOS where the tokenizer's config says so.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TextError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TextError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 2);
        if add_special && self.add_bos {
            ids.extend(self.bos_id());
        }
        ids.extend_from_slice(enc.get_ids());
        if add_special && self.add_eos {
            ids.extend(self.eos_id());
        }
        Ok(ids)
    }

    /// Text of `ids`; special tokens are kept unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TextError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TextError::Tokenizer(e.to_string()))
    }

    /// Id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Raw vocabulary string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// BOS id, if the tokenizer has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// EOS id, if the tokenizer has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Whether BOS is prepended when encoding with special tokens.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The chat template, if the model ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// BOS token text.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// EOS token text.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Every id's text as bytes, for constrained decoding (JSON mode): decoded after an
    /// anchor token with the anchor's text removed, so a leading space that single-token
    /// decoding drops (SentencePiece) is kept. `None` for special tokens — but the tool-call
    /// tags of [`TOOL_TAG_TOKENS`], which a model writes as one special token (Mistral's
    /// `[TOOL_CALLS]`) and constrained calls must be able to begin with — and for tokens
    /// whose text alone is not UTF-8 (part of a multi-byte character).
    pub fn token_bytes(&self) -> Vec<Option<Box<[u8]>>> {
        let added = self.inner.get_added_tokens_decoder();
        let anchor = self
            .encode("a", false)
            .ok()
            .filter(|ids| ids.len() == 1)
            .map(|ids| ids[0]);
        let anchor_text = anchor.and_then(|a| self.decode(&[a], false).ok());
        (0..self.vocab_size() as u32)
            .map(|id| {
                if let Some(t) = added.get(&id).filter(|t| t.special) {
                    return TOOL_TAG_TOKENS
                        .contains(&t.content.as_str())
                        .then(|| t.content.as_bytes().into());
                }
                let text = match (anchor, &anchor_text) {
                    (Some(a), Some(at)) => {
                        let full = self.decode(&[a, id], false).ok()?;
                        full.strip_prefix(at.as_str())?.to_string()
                    }
                    _ => self.decode(&[id], false).ok()?,
                };
                (!text.is_empty() && !text.contains('\u{FFFD}'))
                    .then(|| text.into_bytes().into_boxed_slice())
            })
            .collect()
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    /// llama.cpp's GGUF tokenizer metadata for this tokenizer (byte-level BPE only).
    pub fn gguf_metadata(
        &self,
    ) -> Result<Vec<(String, candle_core::quantized::gguf_file::Value)>, TextError> {
        gguf_vocab::to_gguf_metadata(self)
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (HF format) into `dir`.
    pub fn save_hf_files(&self, dir: &Path, model_max_length: usize) -> Result<(), TextError> {
        let io = |e: std::io::Error| TextError::Invalid(format!("{}: {e}", dir.display()));
        self.inner
            .save(dir.join("tokenizer.json"), true)
            .map_err(|e| TextError::Tokenizer(e.to_string()))?;
        let added: Map<String, Value> = self
            .inner
            .get_added_tokens_decoder()
            .iter()
            .map(|(id, t)| {
                (
                    id.to_string(),
                    json!({"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip,
                           "normalized": t.normalized, "single_word": t.single_word,
                           "special": t.special}),
                )
            })
            .collect();
        let config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": false,
            "model_max_length": model_max_length,
            "added_tokens_decoder": added,
        });
        let text =
            serde_json::to_string_pretty(&config).map_err(|e| TextError::Invalid(e.to_string()))?;
        std::fs::write(dir.join("tokenizer_config.json"), text).map_err(io)
    }
}
