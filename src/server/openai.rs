//! OpenAI wire types (requests as clients send them, responses as clients expect them) and
//! their validation into engine terms. Unknown fields are ignored; wrong types and bad values
//! are 400s that name the field.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::engine::json_schema::{Grammar, MAX_LITERAL};
use crate::engine::{SamplingParams, MAX_TOP_LOGPROBS};

use super::error::ApiError;

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// `prompt` of `/v1/completions`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// A batch of texts: `n` choices each, in order.
    Texts(Vec<String>),
    /// A batch of token arrays: `n` choices each, in order.
    TokenBatches(Vec<Vec<u32>>),
}

/// Sampling and output fields shared by completions and chat.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonFields {
    /// Model name; must be the served one when given.
    pub model: Option<String>,
    /// Sampling temperature (0 = greedy).
    pub temperature: Option<f32>,
    /// Nucleus threshold.
    pub top_p: Option<f32>,
    /// Top-k (0 or -1 = off).
    pub top_k: Option<i64>,
    /// Min-p.
    pub min_p: Option<f32>,
    /// Presence penalty, -2..2.
    pub presence_penalty: Option<f32>,
    /// Frequency penalty, -2..2.
    pub frequency_penalty: Option<f32>,
    /// Repetition penalty, > 0.
    pub repetition_penalty: Option<f32>,
    /// Token id (as a string) → bias, -100..100.
    pub logit_bias: Option<HashMap<String, f32>>,
    /// RNG seed.
    pub seed: Option<u64>,
    /// Keep going after EOS.
    pub ignore_eos: Option<bool>,
    /// Stop strings.
    pub stop: Option<StopField>,
    /// Choices to generate.
    pub n: Option<u32>,
    /// Server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// End-user id (accepted, logged nowhere).
    pub user: Option<String>,
    /// `{"type": "text"}` (the default), `{"type": "json_object"}` (JSON mode) or
    /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
    pub response_format: Option<serde_json::Value>,
    /// vLLM's guided decoding: the answer is an instance of this JSON schema.
    pub guided_json: Option<Value>,
    /// vLLM's guided decoding: the answer is exactly one of these texts.
    pub guided_choice: Option<Value>,
    /// vLLM's guided decoding: the answer matches this regular expression.
    pub guided_regex: Option<Value>,
    /// vLLM's guided decoding (and llama.cpp's `grammar`): the answer is what this GBNF
    /// grammar allows (a regular one).
    pub guided_grammar: Option<Value>,
    /// llama.cpp's spelling of `guided_grammar`.
    pub grammar: Option<Value>,
    /// vLLM's newer spelling of these: `{"json": schema}`, `{"choice": [texts]}` or
    /// `{"regex": pattern}`.
    pub structured_outputs: Option<Value>,
    /// vLLM's scheduling priority: lower runs first (default 0).
    pub priority: Option<i64>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: PromptField,
    /// Upper bound on new tokens (default: the rest of the context).
    pub max_tokens: Option<u32>,
    /// Prepend the prompt to the output.
    pub echo: Option<bool>,
    /// Log-probabilities of the top `logprobs` tokens (0–20).
    pub logprobs: Option<u32>,
    /// Fill-in-the-middle suffix (not supported yet).
    pub suffix: Option<String>,
    /// Shared fields (parsed separately from the same body; see [`parse_body`]).
    #[serde(skip)]
    pub common: CommonFields,
}

/// Message content: text or a list of typed parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ContentField {
    /// Text.
    Text(String),
    /// Parts; only `text` parts are supported.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// `text` (others are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a text part.
    pub text: Option<String>,
}

/// One chat message as sent.
#[derive(Debug, Clone, Deserialize)]
pub struct WireMessage {
    /// `system`, `developer`, `user`, `assistant`, `tool`.
    pub role: String,
    /// Content (may be null for assistant messages).
    pub content: Option<ContentField>,
    /// The calls an assistant message made.
    #[serde(default)]
    pub tool_calls: Option<Vec<WireToolCall>>,
    /// The call a `tool` message answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// One call in an assistant message's `tool_calls`.
#[derive(Debug, Clone, Deserialize)]
pub struct WireToolCall {
    /// The call's id (`tool` messages refer to it).
    #[serde(default)]
    pub id: Option<String>,
    /// The function and its arguments.
    pub function: WireFunctionCall,
}

/// A called function.
#[derive(Debug, Clone, Deserialize)]
pub struct WireFunctionCall {
    /// Its name.
    pub name: String,
    /// Its arguments, JSON text.
    #[serde(default)]
    pub arguments: String,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<WireMessage>,
    /// Upper bound on new tokens.
    pub max_tokens: Option<u32>,
    /// Newer spelling of `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    /// Return log-probabilities.
    pub logprobs: Option<bool>,
    /// Alternatives per token (0–20; needs `logprobs`).
    pub top_logprobs: Option<u32>,
    /// Open the assistant's turn (default true).
    pub add_generation_prompt: Option<bool>,
    /// Functions the model may call (see `server::tools`).
    pub tools: Option<Value>,
    /// `"none"`, `"auto"`, `"required"` or a named function.
    pub tool_choice: Option<Value>,
    /// Several calls in one answer (default true, as OpenAI's): for templates with Hermes
    /// calls, up to 8; otherwise an answer makes one.
    pub parallel_tool_calls: Option<bool>,
    /// More variables for the chat template, as vLLM and llama.cpp take them (Qwen3's
    /// `{"enable_thinking": false}`).
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// llama.cpp's: `"deepseek"` puts the answer's `<think>…</think>` in
    /// `reasoning_content`, `"none"` leaves it in `content`, `"auto"` the server's choice.
    pub reasoning_format: Option<String>,
    /// Shared fields (parsed separately from the same body; see [`parse_body`]).
    #[serde(skip)]
    pub common: CommonFields,
}

/// Parses a request body into `T`, naming the offending field on error. Bodies are parsed
/// twice (the endpoint's own fields, then [`CommonFields`]) rather than with `serde(flatten)`,
/// which loses field paths in error messages.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let message = format!("invalid `{path}`: {}", e.inner());
        let inner = e.inner().to_string();
        let missing = inner
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
            .map(|f| {
                if path == "." {
                    f.to_string()
                } else {
                    format!("{path}.{f}")
                }
            });
        if let Some(field) = missing {
            ApiError::invalid(&field, format!("`{field}` is required"))
        } else if path == "." {
            ApiError::bad_request(inner)
        } else {
            ApiError::invalid(&path, message)
        }
    })
}

/// Sampling defaults of the model (`generation_config.json`), applied to unset fields.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingDefaults {
    /// Default temperature.
    pub temperature: Option<f32>,
    /// Default top-p.
    pub top_p: Option<f32>,
    /// Default top-k.
    pub top_k: Option<i64>,
    /// Default repetition penalty.
    pub repetition_penalty: Option<f32>,
}

impl SamplingDefaults {
    /// Reads `generation_config.json` fields.
    pub fn from_generation_config(v: &Value) -> Self {
        let f = |k: &str| v.get(k).and_then(Value::as_f64).map(|x| x as f32);
        SamplingDefaults {
            temperature: f("temperature"),
            top_p: f("top_p"),
            top_k: v.get("top_k").and_then(Value::as_i64),
            repetition_penalty: f("repetition_penalty"),
        }
    }
}

/// The shared fields, checked.
#[derive(Debug, Clone)]
pub struct ValidCommon {
    /// Sampling settings (seed of choice 0; choice i uses seed + i).
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Choices.
    pub n: usize,
    /// Keep going after EOS.
    pub ignore_eos: bool,
    /// Stream as SSE.
    pub stream: bool,
    /// Final usage chunk.
    pub include_usage: bool,
    /// JSON mode: the text is one JSON value of this grammar (any object, or a schema's).
    pub json: Option<Arc<Grammar>>,
    /// Scheduling priority (lower runs first).
    pub priority: i32,
}

fn check(ok: bool, param: &str, message: &str) -> Result<(), ApiError> {
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(param, message))
    }
}

impl CommonFields {
    /// Validates the shared fields against the vocabulary size.
    pub fn validate(
        &self,
        defaults: &SamplingDefaults,
        vocab_size: usize,
    ) -> Result<ValidCommon, ApiError> {
        let temperature = self.temperature.or(defaults.temperature).unwrap_or(1.0);
        check(
            temperature.is_finite() && temperature >= 0.0,
            "temperature",
            "`temperature` must be >= 0",
        )?;
        let top_p = self.top_p.or(defaults.top_p).unwrap_or(1.0);
        check(
            top_p > 0.0 && top_p <= 1.0,
            "top_p",
            "`top_p` must be in (0, 1]",
        )?;
        let top_k = self.top_k.or(defaults.top_k).unwrap_or(0);
        check(
            top_k >= -1,
            "top_k",
            "`top_k` must be -1, 0 (off) or positive",
        )?;
        let min_p = self.min_p.unwrap_or(0.0);
        check(
            (0.0..=1.0).contains(&min_p),
            "min_p",
            "`min_p` must be in [0, 1]",
        )?;
        let presence = self.presence_penalty.unwrap_or(0.0);
        check(
            (-2.0..=2.0).contains(&presence),
            "presence_penalty",
            "`presence_penalty` must be in [-2, 2]",
        )?;
        let frequency = self.frequency_penalty.unwrap_or(0.0);
        check(
            (-2.0..=2.0).contains(&frequency),
            "frequency_penalty",
            "`frequency_penalty` must be in [-2, 2]",
        )?;
        let repetition = self
            .repetition_penalty
            .or(defaults.repetition_penalty)
            .unwrap_or(1.0);
        check(
            repetition.is_finite() && repetition > 0.0,
            "repetition_penalty",
            "`repetition_penalty` must be > 0",
        )?;
        let mut logit_bias = Vec::new();
        for (k, &v) in self.logit_bias.iter().flatten() {
            let id: u32 = k
                .parse()
                .ok()
                .filter(|&id: &u32| (id as usize) < vocab_size)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "logit_bias",
                        format!("`logit_bias` key '{k}' is not a token id"),
                    )
                })?;
            check(
                (-100.0..=100.0).contains(&v),
                "logit_bias",
                "`logit_bias` values must be in [-100, 100]",
            )?;
            logit_bias.push((id, v));
        }
        logit_bias.sort_by_key(|&(id, _)| id);
        let n = self.n.unwrap_or(1) as usize;
        check((1..=16).contains(&n), "n", "`n` must be between 1 and 16")?;
        let stop = match &self.stop {
            None => vec![],
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        check(
            stop.iter().all(|s| !s.is_empty()),
            "stop",
            "`stop` strings must not be empty",
        )?;
        let mut json = match &self.response_format {
            None => None,
            Some(f) => response_format(f)?,
        };
        let so = self.structured_outputs.as_ref();
        for (param, schema, choice, regex, gbnf) in [
            ("guided_json", self.guided_json.as_ref(), None, None, None),
            (
                "guided_choice",
                None,
                self.guided_choice.as_ref(),
                None,
                None,
            ),
            ("guided_regex", None, None, self.guided_regex.as_ref(), None),
            (
                "guided_grammar",
                None,
                None,
                None,
                self.guided_grammar.as_ref(),
            ),
            ("grammar", None, None, None, self.grammar.as_ref()),
            (
                "structured_outputs",
                so.and_then(|s| s.get("json")),
                so.and_then(|s| s.get("choice")),
                so.and_then(|s| s.get("regex")),
                so.and_then(|s| s.get("grammar")),
            ),
        ] {
            let grammar = match (schema, choice, regex, gbnf) {
                (Some(s), ..) => schema_grammar(s, param)?,
                (None, Some(c), ..) => choice_grammar(c, param)?,
                (None, None, Some(r), _) => regex_grammar(r, param)?,
                (None, None, None, Some(g)) => match g.as_str() {
                    Some(g) => gbnf_grammar(g, param)?,
                    None => {
                        return Err(ApiError::invalid(
                            param,
                            format!("`{param}` must be a GBNF grammar (a string)"),
                        ))
                    }
                },
                (None, None, None, None) => continue,
            };
            check(
                json.is_none(),
                param,
                "give one of `response_format`, `guided_json`, `guided_choice`, \
                 `guided_regex`, `guided_grammar`, `grammar` and `structured_outputs`",
            )?;
            json = Some(grammar);
        }
        Ok(ValidCommon {
            json,
            priority: priority(self.priority)?,
            sampling: SamplingParams {
                temperature,
                top_k: top_k.max(0) as usize,
                top_p,
                min_p,
                repetition_penalty: repetition,
                presence_penalty: presence,
                frequency_penalty: frequency,
                logit_bias,
                seed: self.seed,
            },
            stop,
            n,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            stream: self.stream.unwrap_or(false),
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }
}

/// vLLM's `priority` (lower runs first; 0 when absent), checked to be a 32-bit integer.
pub fn priority(p: Option<i64>) -> Result<i32, ApiError> {
    p.map_or(Ok(0), |p| {
        i32::try_from(p)
            .map_err(|_| ApiError::invalid("priority", "`priority` must be an integer of 32 bits"))
    })
}

/// OpenAI's `response_format` (llama.cpp's `{"type": "json_object", "schema"}` too): the
/// grammar JSON mode follows, `None` for plain text.
fn response_format(f: &Value) -> Result<Option<Arc<Grammar>>, ApiError> {
    let param = "response_format";
    let schema = |s: Option<&Value>| match s {
        None => Ok(Some(Arc::new(Grammar::any_object()))),
        Some(s) => Grammar::from_schema(s)
            .map(|g| Some(Arc::new(g)))
            .map_err(|e| ApiError::invalid(param, format!("unsupported JSON schema: {e}"))),
    };
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => schema(f.get("schema")),
        Some("json_schema") => match f.get("json_schema") {
            Some(Value::Object(j)) => schema(j.get("schema")),
            _ => Err(ApiError::invalid(
                param,
                "`response_format.json_schema` must be an object with the `schema`",
            )),
        },
        _ => Err(ApiError::invalid(
            param,
            "`response_format.type` must be `text`, `json_object` or `json_schema`",
        )),
    }
}

/// A JSON schema given directly (llama.cpp's `json_schema`, Ollama's `format` object).
pub fn schema_grammar(schema: &Value, param: &str) -> Result<Arc<Grammar>, ApiError> {
    Grammar::from_schema(schema)
        .map(Arc::new)
        .map_err(|e| ApiError::invalid(param, format!("unsupported JSON schema: {e}")))
}

/// A GBNF grammar (llama.cpp's `grammar`, vLLM's `guided_grammar`), when it is regular.
pub fn gbnf_grammar(g: &str, param: &str) -> Result<Arc<Grammar>, ApiError> {
    Grammar::gbnf(g)
        .map(Arc::new)
        .map_err(|e| ApiError::invalid(param, format!("unsupported grammar: {e}")))
}

/// vLLM's `guided_regex`: the answer matches this regular expression.
fn regex_grammar(r: &Value, param: &str) -> Result<Arc<Grammar>, ApiError> {
    let Some(source) = r.as_str() else {
        return Err(ApiError::invalid(
            param,
            format!("`{param}` must be a regular expression (a string)"),
        ));
    };
    Grammar::regex(source)
        .map(Arc::new)
        .map_err(|e| ApiError::invalid(param, format!("unsupported regular expression: {e}")))
}

/// vLLM's `guided_choice`: the answer is exactly one of these texts.
fn choice_grammar(c: &Value, param: &str) -> Result<Arc<Grammar>, ApiError> {
    let texts: Option<Vec<&str>> = c
        .as_array()
        .and_then(|a| a.iter().map(Value::as_str).collect());
    match texts {
        Some(t)
            if !t.is_empty()
                && t.len() <= 1024
                && t.iter().all(|s| (1..=MAX_LITERAL).contains(&s.len())) =>
        {
            Ok(Arc::new(Grammar::choice(&t)))
        }
        _ => Err(ApiError::invalid(
            param,
            format!("`{param}` must be a list of 1 to 1024 texts of 1 to {MAX_LITERAL} bytes"),
        )),
    }
}

/// Checks `logprobs` / `top_logprobs` counts.
pub fn validate_top_logprobs(n: u32, param: &str) -> Result<usize, ApiError> {
    check(
        (n as usize) <= MAX_TOP_LOGPROBS,
        param,
        &format!("`{param}` must be between 0 and {MAX_TOP_LOGPROBS}"),
    )?;
    Ok(n as usize)
}

/// Token counts in responses.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct WireUsage {
    /// Prompt tokens (per request, not per choice).
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
    /// Sum.
    pub total_tokens: usize,
    /// Prefix-cache hits.
    pub prompt_tokens_details: PromptTokensDetails,
    /// A thinking model's reasoning tokens.
    pub completion_tokens_details: CompletionTokensDetails,
}

/// OpenAI's `usage.completion_tokens_details`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct CompletionTokensDetails {
    /// Generated tokens of the reasoning (`<think>`…`</think>`, the tags included), over all
    /// choices; 0 when the answer is not split.
    pub reasoning_tokens: usize,
}

/// OpenAI's `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

impl WireUsage {
    /// Usage for a prompt, a number of generated tokens and the prompt tokens found cached.
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        WireUsage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
            completion_tokens_details: CompletionTokensDetails::default(),
        }
    }

    /// With the reasoning's share of the generated tokens.
    pub fn with_reasoning_tokens(mut self, reasoning_tokens: usize) -> Self {
        self.completion_tokens_details.reasoning_tokens = reasoning_tokens;
        self
    }

    /// As JSON.
    pub fn to_json(self) -> Value {
        json!(self)
    }
}
