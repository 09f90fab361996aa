//! Training data: JSONL lines of `{"prompt","completion"}` or `{"messages":[...]}` → token ids
//! with a loss mask (only the completion / the assistant turns are learned).
//!
//! Pieces are tokenized separately at the boundaries of learned spans, exactly as a request
//! would be: the prompt alone (as `/v1/completions` encodes it), or the conversation rendered up
//! to the assistant's turn (as `/v1/chat/completions` does); the model learns the tokens it
//! would have to generate after that prompt.

use serde_json::Value;

use crate::text::{ChatMessage, ChatTemplate, Tokenizer};

/// One training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// `true` where the token is learned (predicted from the tokens before it).
    pub targets: Vec<bool>,
}

impl Example {
    /// Tokens counted in the loss.
    pub fn num_targets(&self) -> usize {
        self.targets.iter().filter(|&&t| t).count()
    }
}

/// Why a training file was refused: the 1-based line and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
pub struct DataError {
    /// Line number (1-based), when one line is at fault.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

fn at(line: usize, message: impl Into<String>) -> DataError {
    DataError {
        line: Some(line),
        message: message.into(),
    }
}

/// What tokenizing needs.
pub struct DataFormat<'a> {
    /// The base model's tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// Its chat template (required for `messages` lines).
    pub chat_template: Option<&'a ChatTemplate>,
    /// Appended (learned) after a completion so the model learns to stop.
    pub eos_id: Option<u32>,
    /// Longest accepted example, in tokens.
    pub max_tokens: usize,
}

fn message_text(v: &Value, line: usize, i: usize) -> Result<ChatMessage, DataError> {
    let role = v
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| at(line, format!("messages[{i}] has no 'role' string")))?;
    if !matches!(role, "system" | "user" | "assistant") {
        return Err(at(
            line,
            format!("messages[{i}].role '{role}' is not system, user or assistant"),
        ));
    }
    let content = match v.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut s = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => s.push_str(t),
                    _ => {
                        return Err(at(
                            line,
                            format!("messages[{i}].content: only text parts are supported"),
                        ))
                    }
                }
            }
            s
        }
        _ => {
            return Err(at(
                line,
                format!("messages[{i}] has no 'content' string or text parts"),
            ))
        }
    };
    Ok(ChatMessage::text(role, &content))
}

fn tokenize(f: &DataFormat, text: &str, first: bool, line: usize) -> Result<Vec<u32>, DataError> {
    f.tokenizer
        .encode(text, first)
        .map_err(|e| at(line, format!("cannot tokenize: {e}")))
}

fn prompt_completion(
    f: &DataFormat,
    prompt: &str,
    completion: &str,
    line: usize,
) -> Result<Example, DataError> {
    if completion.is_empty() {
        return Err(at(line, "'completion' is empty"));
    }
    let p = tokenize(f, prompt, true, line)?;
    let mut c = tokenize(f, completion, false, line)?;
    c.extend(f.eos_id);
    let mut targets = vec![false; p.len()];
    targets.resize(p.len() + c.len(), true);
    let mut tokens = p;
    tokens.extend(c);
    Ok(Example { tokens, targets })
}

fn conversation(
    f: &DataFormat,
    messages: &[ChatMessage],
    line: usize,
) -> Result<Example, DataError> {
    let template = f.chat_template.ok_or_else(|| {
        at(
            line,
            "'messages' needs a chat template and this model has none",
        )
    })?;
    let render =
        |m: &[ChatMessage], gen: bool| template.render(m, gen).map_err(|e| at(line, e.to_string()));
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err(at(line, "'messages' has no assistant message to learn"));
    }
    // Learned spans as byte ranges of the full rendering: [render(..i, gen), render(..=i)).
    let full = render(messages, false)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let start = render(&messages[..i], true)?;
        let end = render(&messages[..=i], false)?;
        if !end.starts_with(&start) || !full.starts_with(&end) {
            return Err(at(
                line,
                "the chat template does not render conversations prefix-consistently",
            ));
        }
        spans.push((start.len(), end.len()));
    }
    let mut tokens = Vec::new();
    let mut targets = Vec::new();
    let mut pos = 0;
    for (s, e) in spans {
        for (range, learned) in [(pos..s, false), (s..e, true)] {
            if range.is_empty() {
                continue;
            }
            let ids = tokenize(f, &full[range], tokens.is_empty(), line)?;
            targets.extend(std::iter::repeat_n(learned, ids.len()));
            tokens.extend(ids);
        }
        pos = e;
    }
    Ok(Example { tokens, targets })
}

/// Parses a whole JSONL file. Blank lines are skipped; the first bad line fails it all.
pub fn parse_jsonl(text: &str, f: &DataFormat) -> Result<Vec<Example>, DataError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(raw).map_err(|e| at(line, format!("invalid JSON: {e}")))?;
        let ex = match (v.get("prompt"), v.get("completion"), v.get("messages")) {
            (Some(Value::String(p)), Some(Value::String(c)), None) => {
                prompt_completion(f, p, c, line)?
            }
            (None, None, Some(Value::Array(ms))) => {
                let ms = ms
                    .iter()
                    .enumerate()
                    .map(|(j, m)| message_text(m, line, j))
                    .collect::<Result<Vec<_>, _>>()?;
                conversation(f, &ms, line)?
            }
            _ => return Err(at(
                line,
                "expected {\"prompt\": string, \"completion\": string} or {\"messages\": [...]}",
            )),
        };
        if ex.tokens.len() > f.max_tokens {
            return Err(at(
                line,
                format!(
                    "the example has {} tokens; the limit is {}",
                    ex.tokens.len(),
                    f.max_tokens
                ),
            ));
        }
        if ex.tokens.len() < 2 || ex.num_targets() == 0 {
            return Err(at(line, "the example has no tokens to learn"));
        }
        out.push(ex);
    }
    if out.is_empty() {
        return Err(DataError {
            line: None,
            message: "the file has no examples".into(),
        });
    }
    Ok(out)
}
