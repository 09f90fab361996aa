//! `/v1/completions` and `/v1/chat/completions`. Streaming and non-streaming share one path:
//! validate → submit `n` generations → `TextEvents` per choice → either one JSON body or SSE
//! chunks (role first for chat, finish reasons, optional usage chunk, `data: [DONE]`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, BoxStream, SelectAll, StreamExt};
use serde_json::{json, Value};

use crate::engine::{GenerateRequest, TokenLogprob};
use crate::text::fim::{self, FimInput};
use crate::text::{ChatMessage, ReasoningSplitter, Tokenizer};

use super::error::{ApiError, AppJson};
use super::openai::{
    parse_body, validate_top_logprobs, ChatRequest, CommonFields, CompletionRequest, ContentField,
    PromptField, ValidCommon, WireUsage,
};
use super::stream::{TextEvent, TextEvents, TokenInfo};
use super::tools::{call_text, mistral_call_id, wire_call, CallFormat, Progress, ToolPlan};
use super::{AppState, Loaded};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

impl Kind {
    /// `object` of a streamed chunk.
    fn chunk_object(self) -> &'static str {
        match self {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        }
    }
}

/// How log-probabilities are reported, if at all.
#[derive(Clone, Copy)]
enum Logprobs {
    None,
    /// Completions format with this many alternatives.
    Completion(usize),
    /// Chat format with this many alternatives.
    Chat(usize),
}

/// One request's generations: what was asked and how to answer.
pub(super) struct Job {
    kind: Kind,
    id: String,
    created: u64,
    pub(super) model: String,
    /// LoRA adapter the request runs with (`None`: the base model).
    adapter: Option<String>,
    /// One or more prompts (a completions request may send a batch); each gets `n` choices,
    /// prompt `p`'s being choices `p·n .. (p+1)·n`.
    prompts: Vec<Prompt>,
    logprobs: Logprobs,
    /// The echoed prompt's tokens get log-probabilities too (`echo` with `logprobs`), as
    /// OpenAI's legacy completions and vLLM report them.
    prompt_logprobs: bool,
    common: ValidCommon,
    /// Token ids that also end generation (a FIM template's end tokens).
    extra_stop_ids: Vec<u32>,
    /// `"fim"` or `"prefix"` when the request had a `suffix`.
    fim_mode: Option<&'static str>,
    /// Chat with tools: answers that are calls come back as `tool_calls`.
    pub(super) tools: Option<Arc<ToolPlan>>,
    /// Chat of a thinking model: each answer's reasoning split off (`reasoning_content`).
    pub(super) reasoning: Option<ReasoningSplitter>,
    /// Chat: the prompt as the template rendered it.
    pub(super) rendered: String,
}

/// One prompt of a request.
struct Prompt {
    ids: Vec<u32>,
    /// The text echoed in front of its choices (`echo`).
    echo: Option<String>,
    max_new_tokens: usize,
}

impl Job {
    /// A finished answer's text as (reasoning, answer): split for a thinking model's chat,
    /// else all answer.
    pub(super) fn split_answer(&self, text: String) -> (String, String) {
        match self.reasoning.clone() {
            Some(s) => {
                let split = s.split_whole(&text);
                (split.reasoning, split.content)
            }
            None => (String::new(), text),
        }
    }

    /// Reasoning tokens of a finished choice (0 unless its answer is split).
    pub(super) fn reasoning_tokens(&self, r: &ChoiceResult) -> usize {
        let Some(mut splitter) = self.reasoning.clone() else {
            return 0;
        };
        let mut start = 0;
        for &(end, tokens) in &r.pieces {
            splitter.push_tokens(r.text.get(start..end).unwrap_or_default(), tokens);
            start = end;
        }
        splitter.reasoning_tokens()
    }

    /// The prompt choice `i` continues.
    fn prompt_of(&self, i: usize) -> &Prompt {
        &self.prompts[(i / self.common.n).min(self.prompts.len() - 1)]
    }

    /// Prompt tokens of the whole request.
    pub(super) fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(|p| p.ids.len()).sum()
    }

    /// Prompt tokens served from the prefix cache: per prompt the most any of its choices
    /// found (they share one prefix), summed over the prompts.
    pub(super) fn cached_tokens(&self, per_choice: &[usize]) -> usize {
        per_choice
            .chunks(self.common.n.max(1))
            .map(|c| c.iter().copied().max().unwrap_or(0))
            .sum()
    }
}

/// Most choices (prompts × `n`) one request may ask for.
const MAX_CHOICES: usize = 256;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

/// The adapter the request's `model` names (`None`: the base model); 404 for unknown names.
fn check_model(loaded: &Loaded, common: &CommonFields) -> Result<Option<String>, ApiError> {
    loaded.resolve_model(common.model.as_deref())
}

/// `requested` (or the rest of the context); 0 only where `allow_zero` (completions: the
/// prompt alone is computed, as evaluation harnesses score it).
fn max_new_tokens(
    loaded: &Loaded,
    prompt_len: usize,
    requested: Option<u32>,
    param: &str,
    allow_zero: bool,
) -> Result<usize, ApiError> {
    let context = loaded.engine.limits().context_length;
    if prompt_len >= context {
        return Err(ApiError::invalid(
            "prompt",
            format!("the prompt has {prompt_len} tokens; this model's context length is {context}"),
        ));
    }
    match requested {
        Some(0) if !allow_zero => {
            Err(ApiError::invalid(param, format!("`{param}` must be at least 1")))
        }
        Some(m) if prompt_len + m as usize > context => Err(ApiError::invalid(
            param,
            format!(
                "this model's maximum context length is {context} tokens; the prompt has {prompt_len} and `{param}` asks for {m} more"
            ),
        )),
        Some(m) => Ok(m as usize),
        None => Ok(context - prompt_len),
    }
}

/// [`start`] for a job of one prompt and one choice (the chat-shaped APIs built on the chat
/// path: Responses, Ollama's chat).
pub(super) fn start_one(
    loaded: &Loaded,
    app: &AppState,
    job: &Job,
) -> Result<TextEvents, ApiError> {
    start(loaded, app, job)?
        .pop()
        .ok_or_else(|| ApiError::bad_request("nothing to generate"))
}

/// Submits every choice and wraps each in `TextEvents`.
pub(super) fn start(
    loaded: &Loaded,
    app: &AppState,
    job: &Job,
) -> Result<Vec<TextEvents>, ApiError> {
    let mut stop_token_ids = if job.common.ignore_eos {
        vec![]
    } else {
        loaded.eos_ids.clone()
    };
    stop_token_ids.extend(&job.extra_stop_ids);
    let top_logprobs = match job.logprobs {
        Logprobs::None => None,
        Logprobs::Completion(n) | Logprobs::Chat(n) => Some(n),
    };
    let prompt_logprobs = top_logprobs.filter(|_| job.prompt_logprobs);
    let deadline = app
        .config()
        .request_timeout
        .map(|t| std::time::Instant::now() + t);
    let mut choices = Vec::with_capacity(job.common.n * job.prompts.len());
    for (prompt, i) in job
        .prompts
        .iter()
        .flat_map(|p| (0..job.common.n).map(move |i| (p, i)))
    {
        let mut sampling = job.common.sampling.clone();
        // Seeds count within a prompt: a batched prompt draws what it draws alone.
        sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
        let request = GenerateRequest {
            prompt: prompt.ids.clone(),
            sampling,
            max_new_tokens: prompt.max_new_tokens,
            stop_token_ids: stop_token_ids.clone(),
            adapter: job.adapter.clone(),
            top_logprobs,
            prompt_logprobs,
            json: job.common.json.clone().map(|g| {
                let c = loaded.json_constraint(g);
                // A thinking model reasons first; its answer is held to the grammar.
                match &job.reasoning {
                    Some(r) => c.after_reasoning(super::reasoning_tags(), r.in_reasoning()),
                    None => c,
                }
            }),
            embed: false,
            priority: job.common.priority,
        };
        let generation = loaded.engine.submit(request)?;
        choices.push(
            TextEvents::new(
                generation,
                loaded.tokenizer.clone(),
                job.common.stop.clone(),
                stop_token_ids.clone(),
                Some(app.metrics()),
            )
            .with_deadline(deadline),
        );
    }
    Ok(choices)
}

fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

/// Completions-format log-probabilities of `tokens`; `offset` is the text offset of the first.
fn completion_logprobs(tokenizer: &Tokenizer, tokens: &[TokenInfo], offset: &mut usize) -> Value {
    let mut texts = Vec::new();
    let mut lps = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    for t in tokens {
        let text = token_text(tokenizer, t.id);
        offsets.push(*offset);
        *offset += text.len();
        texts.push(text);
        let lp = t.logprob.as_ref();
        lps.push(lp.map(|l| l.logprob));
        // The prompt's first token has none: `null`, as OpenAI writes it.
        tops.push(lp.map_or(Value::Null, |l| {
            Value::Object(
                l.top
                    .iter()
                    .map(|(id, p)| (token_text(tokenizer, *id), json!(p)))
                    .collect(),
            )
        }));
    }
    json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// The prompt's tokens with their log-probabilities (`lps`: tokens `1..`; the first has none).
fn prompt_token_infos(prompt_ids: &[u32], lps: Vec<TokenLogprob>) -> Vec<TokenInfo> {
    let mut lps = lps.into_iter();
    prompt_ids
        .iter()
        .enumerate()
        .map(|(i, &id)| TokenInfo {
            id,
            logprob: if i == 0 { None } else { lps.next() },
        })
        .collect()
}

/// `a` with `b`'s completions-format arrays appended (the echoed prompt, then the completion).
fn concat_logprobs(mut a: Value, b: Value) -> Value {
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        if let (Some(x), Some(y)) = (a[key].as_array_mut(), b[key].as_array()) {
            x.extend(y.iter().cloned());
        }
    }
    a
}

/// Chat-format log-probabilities (`content` entries) of `tokens`.
fn chat_logprobs(tokenizer: &Tokenizer, tokens: &[TokenInfo]) -> Vec<Value> {
    let entry = |id: u32, logprob: f32| {
        let text = token_text(tokenizer, id);
        json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()})
    };
    tokens
        .iter()
        .filter_map(|t| {
            let l = t.logprob.as_ref()?;
            let mut e = entry(t.id, l.logprob);
            e["top_logprobs"] = l.top.iter().map(|(id, p)| entry(*id, *p)).collect();
            Some(e)
        })
        .collect()
}

/// One choice, generated to its end.
pub(super) struct ChoiceResult {
    pub(super) text: String,
    /// Log-probabilities of prompt tokens `1..`, when requested.
    prompt_logprobs: Option<Vec<TokenLogprob>>,
    tokens: Vec<TokenInfo>,
    pub(super) finish: &'static str,
    pub(super) completion_tokens: usize,
    pub(super) cached_tokens: usize,
    /// When the first token arrived (prompt time vs generation time, for Ollama's timings).
    pub(super) first_token: Option<std::time::Instant>,
    /// Per delta: where its text ends in `text`, and how many tokens it came from.
    pieces: Vec<(usize, usize)>,
}

/// Runs one choice's events to the end.
pub(super) async fn collect(mut events: TextEvents) -> Result<ChoiceResult, ApiError> {
    let mut out = ChoiceResult {
        text: String::new(),
        prompt_logprobs: None,
        tokens: Vec::new(),
        finish: "length",
        completion_tokens: 0,
        cached_tokens: 0,
        first_token: None,
        pieces: Vec::new(),
    };
    while let Some(ev) = events.next().await {
        match ev {
            TextEvent::PromptLogprobs(lps) => out.prompt_logprobs = Some(lps),
            TextEvent::Delta { text, tokens } => {
                if out.first_token.is_none() && !tokens.is_empty() {
                    out.first_token = Some(std::time::Instant::now());
                }
                out.text.push_str(&text);
                out.pieces.push((out.text.len(), tokens.len()));
                out.tokens.extend(tokens);
            }
            TextEvent::Finished {
                reason,
                completion_tokens,
                cached_tokens,
            } => {
                out.finish = reason;
                out.completion_tokens = completion_tokens;
                out.cached_tokens = cached_tokens;
            }
            TextEvent::Failed(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

async fn respond_json(
    loaded: &Loaded,
    job: Job,
    choices: Vec<TextEvents>,
) -> Result<Response, ApiError> {
    let results = futures::future::join_all(choices.into_iter().map(collect)).await;
    let mut body_choices = Vec::new();
    let mut completion_tokens = 0;
    let mut reasoning_tokens = 0;
    let mut cached = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        let r = r?;
        completion_tokens += r.completion_tokens;
        reasoning_tokens += job.reasoning_tokens(&r);
        cached.push(r.cached_tokens);
        let tokenizer = &loaded.tokenizer;
        let prompt = job.prompt_of(i);
        body_choices.push(match job.kind {
            Kind::Completion => {
                let echo = prompt.echo.clone().unwrap_or_default();
                let mut offset = echo.len();
                let mut logprobs = match job.logprobs {
                    Logprobs::Completion(_) => completion_logprobs(tokenizer, &r.tokens, &mut offset),
                    _ => Value::Null,
                };
                if let Some(lps) = r.prompt_logprobs {
                    let prompt = prompt_token_infos(&prompt.ids, lps);
                    let head = completion_logprobs(tokenizer, &prompt, &mut 0);
                    logprobs = concat_logprobs(head, logprobs);
                }
                json!({"index": i, "text": echo + &r.text, "logprobs": logprobs, "finish_reason": r.finish})
            }
            Kind::Chat => {
                let logprobs = match job.logprobs {
                    Logprobs::Chat(_) => json!({"content": chat_logprobs(tokenizer, &r.tokens)}),
                    _ => Value::Null,
                };
                let (reasoning, text) = job.split_answer(r.text);
                let plan = job.tools.as_ref();
                let mut choice = match plan.and_then(|t| t.finished_calls(&text)) {
                    Some((calls, whole)) => {
                        let calls: Vec<Value> =
                            calls.iter().map(|(name, args)| wire_call(name, args)).collect();
                        // Text the model wrote before its calls (Hermes, `"auto"`).
                        let before = plan.map_or("", |t| t.text_before_calls(&text));
                        let content = Some(before).filter(|t| !t.is_empty());
                        // A call cut short keeps the reason it was cut for.
                        let finish = if whole { "tool_calls" } else { r.finish };
                        json!({"index": i, "message": {"role": "assistant", "content": content,
                               "tool_calls": calls},
                               "logprobs": logprobs, "finish_reason": finish})
                    }
                    None => json!({"index": i, "message": {"role": "assistant", "content": text},
                                   "logprobs": logprobs, "finish_reason": r.finish}),
                };
                if !reasoning.is_empty() {
                    choice["message"]["reasoning_content"] = json!(reasoning);
                }
                choice
            }
        });
    }
    let object = match job.kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion",
    };
    let usage = WireUsage::new(
        job.prompt_tokens(),
        completion_tokens,
        job.cached_tokens(&cached),
    )
    .with_reasoning_tokens(reasoning_tokens);
    let mut body = json!({
        "id": job.id, "object": object, "created": job.created, "model": job.model,
        "choices": body_choices, "usage": usage,
    });
    if let Some(mode) = job.fim_mode {
        body["fim_mode"] = json!(mode);
    }
    Ok(axum::Json(body).into_response())
}

enum Phase {
    Streaming,
    Usage,
    Done,
    End,
}

struct SseState {
    job: Job,
    tokenizer: Arc<Tokenizer>,
    pre: VecDeque<Value>,
    merged: SelectAll<BoxStream<'static, (usize, TextEvent)>>,
    offsets: Vec<usize>,
    completion_tokens: usize,
    /// Per choice, the prompt tokens it found in the prefix cache.
    cached: Vec<usize>,
    /// Per choice, with tools: the text (and tokens) held back while it may be a call.
    held: Vec<Option<(String, Vec<TokenInfo>)>>,
    /// Per choice, per call whose name went out: how far into the held text its arguments
    /// have been sent.
    args_sent: Vec<Vec<usize>>,
    /// Per choice of a thinking model's chat: its reasoning split off as it streams.
    reasoning: Vec<Option<ReasoningSplitter>>,
    phase: Phase,
}

impl SseState {
    fn chunk(&self, choice: Value) -> Value {
        let object = self.job.kind.chunk_object();
        json!({"id": self.job.id, "object": object, "created": self.job.created,
               "model": self.job.model, "choices": [choice]})
    }

    fn format(&mut self, i: usize, ev: TextEvent) -> Option<Value> {
        match ev {
            TextEvent::PromptLogprobs(lps) => {
                // The echo chunk, held back until the prompt's log-probabilities came.
                let prompt = self.job.prompt_of(i);
                let echo = prompt.echo.clone().unwrap_or_default();
                let prompt = prompt_token_infos(&prompt.ids, lps);
                let logprobs = completion_logprobs(&self.tokenizer, &prompt, &mut 0);
                let choice =
                    json!({"index": i, "text": echo, "logprobs": logprobs, "finish_reason": null});
                Some(self.chunk(choice))
            }
            TextEvent::Delta { text, tokens } => {
                let Some(splitter) = self.reasoning.get_mut(i).and_then(Option::as_mut) else {
                    return self.answer_delta(i, text, tokens);
                };
                let split = splitter.push_tokens(&text, tokens.len());
                self.reasoning_delta(i, split.reasoning);
                let chunk = self.answer_delta(i, split.content, tokens);
                if self.pre.is_empty() {
                    return chunk;
                }
                // After the reasoning chunk.
                self.pre.extend(chunk);
                None
            }
            TextEvent::Finished {
                reason,
                completion_tokens,
                cached_tokens,
            } => {
                if let Some(splitter) = self.reasoning.get_mut(i).and_then(Option::as_mut) {
                    let split = splitter.finish();
                    self.reasoning_delta(i, split.reasoning);
                    if let Some(chunk) = self.answer_delta(i, split.content, Vec::new()) {
                        self.pre.push_back(chunk);
                    }
                }
                self.finished(i, reason, completion_tokens, cached_tokens);
                None
            }
            TextEvent::Failed(e) => {
                self.phase = Phase::End;
                Some(ApiError::from(e).body())
            }
        }
    }

    /// A reasoning chunk for the stream, queued (nothing for empty text).
    fn reasoning_delta(&mut self, i: usize, text: String) {
        if !text.is_empty() {
            let choice = json!({"index": i, "delta": {"reasoning_content": text},
                                "logprobs": null, "finish_reason": null});
            let chunk = self.chunk(choice);
            self.pre.push_back(chunk);
        }
    }

    /// The chunk of a piece of the answer: text, or (with tools) a call's progress — text
    /// that may still begin a call held back, text before a call sent first.
    fn answer_delta(&mut self, i: usize, text: String, tokens: Vec<TokenInfo>) -> Option<Value> {
        let (Some(held), Some(plan)) = (
            self.held.get_mut(i).and_then(Option::as_mut),
            self.job.tools.as_ref(),
        ) else {
            return self.delta(i, text, tokens);
        };
        held.0.push_str(&text);
        held.1.extend(tokens);
        let upto = match plan.progress(&held.0) {
            Progress::Text => {
                let (text, tokens) = self.held[i].take().unwrap_or_default();
                return self.delta(i, text, tokens);
            }
            Progress::TextUpTo(n) | Progress::CallsFrom(n) => n,
        };
        if upto == 0 {
            return self.call_progress(i, false);
        }
        // The text before what may be a call goes out; the rest stays held.
        let rest = held.0.split_off(upto);
        let text = std::mem::replace(&mut held.0, rest);
        let tokens = std::mem::take(&mut held.1);
        let chunk = self.delta(i, text, tokens);
        match (chunk, self.call_progress(i, false)) {
            (Some(text), Some(call)) => {
                self.pre.extend([text, call]);
                None
            }
            (text, call) => text.or(call),
        }
    }

    /// Choice `i` ended: a call's last pieces or the held text, then the finish chunk, queued.
    fn finished(
        &mut self,
        i: usize,
        reason: &'static str,
        completion_tokens: usize,
        cached_tokens: usize,
    ) {
        self.completion_tokens += completion_tokens;
        if let Some(c) = self.cached.get_mut(i) {
            *c = cached_tokens;
        }
        let mut reason = reason;
        if let Some(chunk) = self.call_progress(i, true) {
            self.pre.push_back(chunk);
        }
        if let Some((text, tokens)) = self.held.get_mut(i).and_then(Option::take) {
            let calls = self.job.tools.as_ref().and_then(|t| t.parse_calls(&text));
            if calls.is_some() {
                reason = "tool_calls";
            } else if self.args_sent[i].is_empty() {
                // Not a call after all (cut short before its arguments): the text.
                if let Some(chunk) = self.delta(i, text, tokens) {
                    self.pre.push_back(chunk);
                }
            }
        }
        let choice = match self.job.kind {
            Kind::Completion => {
                json!({"index": i, "text": "", "logprobs": null, "finish_reason": reason})
            }
            Kind::Chat => {
                json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": reason})
            }
        };
        let chunk = self.chunk(choice);
        self.pre.push_back(chunk);
    }

    /// The next pieces of the calls being written: each call's id and name once the name is
    /// complete, then its arguments as they come — all but what may be the call's own end
    /// (`ToolPlan::calls_so_far`), until `last` or the next call begins.
    fn call_progress(&mut self, i: usize, last: bool) -> Option<Value> {
        let text = &self.held.get(i)?.as_ref()?.0;
        let plan = self.job.tools.as_ref()?;
        let sent = self.args_sent.get_mut(i)?;
        let mut deltas = Vec::new();
        for (k, span) in plan.calls_so_far(text, last).into_iter().enumerate() {
            match sent.get(k).copied() {
                None => {
                    let mut call = wire_call(&span.name, &text[span.start..span.end]);
                    call["index"] = json!(k);
                    deltas.push(call);
                    sent.push(span.end);
                }
                Some(from) if span.end > from => {
                    deltas.push(
                        json!({"index": k, "function": {"arguments": &text[from..span.end]}}),
                    );
                    sent[k] = span.end;
                }
                Some(_) => {}
            }
        }
        if deltas.is_empty() {
            return None;
        }
        let choice = json!({"index": i, "delta": {"tool_calls": deltas}, "logprobs": null,
                            "finish_reason": null});
        Some(self.chunk(choice))
    }

    /// A chunk of generated text (and its tokens' log-probabilities, when asked for).
    fn delta(&mut self, i: usize, text: String, tokens: Vec<TokenInfo>) -> Option<Value> {
        if text.is_empty()
            && !matches!(
                self.job.logprobs,
                Logprobs::Completion(_) | Logprobs::Chat(_)
            )
        {
            return None;
        }
        let choice = match (self.job.kind, self.job.logprobs) {
            (Kind::Completion, lp) => {
                let logprobs = match lp {
                    Logprobs::Completion(_) => {
                        completion_logprobs(&self.tokenizer, &tokens, &mut self.offsets[i])
                    }
                    _ => Value::Null,
                };
                json!({"index": i, "text": text, "logprobs": logprobs, "finish_reason": null})
            }
            (Kind::Chat, lp) => {
                let logprobs = match lp {
                    Logprobs::Chat(_) => {
                        json!({"content": chat_logprobs(&self.tokenizer, &tokens)})
                    }
                    _ => Value::Null,
                };
                json!({"index": i, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null})
            }
        };
        Some(self.chunk(choice))
    }

    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(v) = self.pre.pop_front() {
                return Some(SseEvent::default().data(v.to_string()));
            }
            match self.phase {
                Phase::Streaming => match self.merged.next().await {
                    Some((i, ev)) => {
                        if let Some(v) = self.format(i, ev) {
                            return Some(SseEvent::default().data(v.to_string()));
                        }
                    }
                    None => {
                        self.phase = if self.job.common.include_usage {
                            Phase::Usage
                        } else {
                            Phase::Done
                        };
                    }
                },
                Phase::Usage => {
                    self.phase = Phase::Done;
                    let reasoning = self.reasoning.iter().flatten();
                    let usage = WireUsage::new(
                        self.job.prompt_tokens(),
                        self.completion_tokens,
                        self.job.cached_tokens(&self.cached),
                    )
                    .with_reasoning_tokens(reasoning.map(|s| s.reasoning_tokens()).sum());
                    let object = self.job.kind.chunk_object();
                    let v = json!({"id": self.job.id, "object": object, "created": self.job.created,
                                   "model": self.job.model, "choices": [], "usage": usage});
                    return Some(SseEvent::default().data(v.to_string()));
                }
                Phase::Done => {
                    self.phase = Phase::End;
                    return Some(SseEvent::default().data("[DONE]"));
                }
                Phase::End => return None,
            }
        }
    }
}

fn respond_sse(loaded: &Loaded, job: Job, choices: Vec<TextEvents>) -> Response {
    let n = choices.len();
    let mut merged = SelectAll::new();
    for (i, events) in choices.into_iter().enumerate() {
        let s = stream::unfold(events, move |mut ev| async move {
            ev.next().await.map(|e| ((i, e), ev))
        });
        merged.push(s.boxed());
    }
    let mut state = SseState {
        tokenizer: loaded.tokenizer.clone(),
        pre: VecDeque::new(),
        merged,
        offsets: (0..n)
            .map(|i| job.prompt_of(i).echo.as_ref().map_or(0, String::len))
            .collect(),
        completion_tokens: 0,
        cached: vec![0; n],
        held: (0..n)
            .map(|_| job.tools.as_ref().map(|_| Default::default()))
            .collect(),
        args_sent: vec![Vec::new(); n],
        reasoning: vec![job.reasoning.clone(); n],
        phase: Phase::Streaming,
        job,
    };
    for i in 0..n {
        let first = match (state.job.kind, &state.job.prompt_of(i).echo) {
            (Kind::Chat, _) => Some(
                json!({"index": i, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": null, "finish_reason": null}),
            ),
            // With prompt log-probabilities it goes out when they come (`format`).
            (Kind::Completion, Some(echo)) if !state.job.prompt_logprobs => {
                Some(json!({"index": i, "text": echo, "logprobs": null, "finish_reason": null}))
            }
            _ => None,
        };
        if let Some(choice) = first {
            let chunk = state.chunk(choice);
            state.pre.push_back(chunk);
        }
    }
    let events = stream::unfold(state, |mut st| async move {
        st.next().await.map(|e| (Ok::<_, Infallible>(e), st))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn run(app: AppState, job: Job) -> Result<Response, ApiError> {
    let loaded = app.loaded()?;
    let choices = start(loaded, &app, &job)?;
    if job.common.stream {
        Ok(respond_sse(loaded, job, choices))
    } else {
        respond_json(loaded, job, choices).await
    }
}

/// `POST /v1/completions`.
pub async fn completions(
    State(app): State<AppState>,
    AppJson(body): AppJson<Value>,
) -> Result<Response, ApiError> {
    let mut req: CompletionRequest = parse_body(&body)?;
    req.common = parse_body(&body)?;
    let loaded = app.loaded()?;
    let adapter = check_model(loaded, &req.common)?;
    let mut common = req.common.validate(&loaded.defaults, loaded.vocab_size())?;
    let tokenizer = &loaded.tokenizer;
    let mut extra_stop_ids = Vec::new();
    let mut fim_mode = None;
    let batch = match (req.prompt, req.suffix.filter(|s| !s.is_empty())) {
        // Fill-in-the-middle: the model's FIM template, or prefix completion cut at the suffix.
        (PromptField::Text(prefix), Some(suffix)) => {
            let input = FimInput {
                prefix,
                suffix,
                ..Default::default()
            };
            let built = fim::build(tokenizer, &loaded.fim, &input)?;
            extra_stop_ids = built.stop_ids;
            common.stop.extend(built.stop_strings);
            fim_mode = Some(built.mode);
            vec![built.ids]
        }
        (_, Some(_)) => {
            return Err(ApiError::invalid(
                "suffix",
                "`suffix` needs a text `prompt` (the code before the cursor)",
            ))
        }
        (prompt, None) => match prompt {
            PromptField::Text(t) => vec![tokenizer.encode(&t, true)?],
            PromptField::Tokens(ids) => vec![ids],
            PromptField::Texts(v) => v
                .iter()
                .map(|t| tokenizer.encode(t, true))
                .collect::<Result<_, _>>()?,
            PromptField::TokenBatches(v) => v,
        },
    };
    if batch.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt list is empty"));
    }
    if batch.len() * common.n > MAX_CHOICES {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "{} prompts with n = {} ask for {} completions; at most {MAX_CHOICES}",
                batch.len(),
                common.n,
                batch.len() * common.n
            ),
        ));
    }
    let echo = req.echo.unwrap_or(false);
    let single = batch.len() == 1;
    let mut prompts = Vec::with_capacity(batch.len());
    for (p, ids) in batch.into_iter().enumerate() {
        // Errors name the prompt in a batch ("prompt[2]").
        let param = if single {
            "prompt".to_string()
        } else {
            format!("prompt[{p}]")
        };
        if ids.is_empty() {
            return Err(ApiError::invalid(&param, "the prompt is empty"));
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= loaded.vocab_size()) {
            return Err(ApiError::invalid(
                &param,
                format!("token id {bad} is outside the vocabulary"),
            ));
        }
        let max_new_tokens = max_new_tokens(loaded, ids.len(), req.max_tokens, "max_tokens", true)?;
        let echo = if echo {
            Some(tokenizer.decode(&ids, false)?)
        } else {
            None
        };
        prompts.push(Prompt {
            ids,
            echo,
            max_new_tokens,
        });
    }
    let logprobs = match req.logprobs {
        Some(n) => Logprobs::Completion(validate_top_logprobs(n, "logprobs")?),
        None => Logprobs::None,
    };
    let job = Job {
        kind: Kind::Completion,
        id: request_id("cmpl"),
        created: now_secs(),
        model: adapter.clone().unwrap_or_else(|| loaded.model_name.clone()),
        adapter,
        prompts,
        prompt_logprobs: echo && matches!(logprobs, Logprobs::Completion(_)),
        logprobs,
        common,
        extra_stop_ids,
        fim_mode,
        tools: None,
        reasoning: None,
        rendered: String::new(),
    };
    run(app, job).await
}

fn message_text(content: Option<ContentField>, index: usize) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(ContentField::Text(t)) => Ok(t),
        Some(ContentField::Parts(parts)) => {
            let mut out = String::new();
            for p in parts {
                if p.kind != "text" {
                    return Err(ApiError::invalid(
                        &format!("messages[{index}].content"),
                        format!(
                            "content part type '{}' is not supported (text only)",
                            p.kind
                        ),
                    ));
                }
                out.push_str(p.text.as_deref().unwrap_or_default());
            }
            Ok(out)
        }
    }
}

/// `POST /apply-template` (llama.cpp's): a chat request's prompt as the model's template
/// renders it (`{"prompt": …}`), nothing generated.
pub async fn apply_template(
    State(app): State<AppState>,
    AppJson(body): AppJson<Value>,
) -> Result<Response, ApiError> {
    let job = chat_job(app.loaded()?, &body)?;
    Ok(axum::Json(json!({"prompt": job.rendered})).into_response())
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(app): State<AppState>,
    AppJson(body): AppJson<Value>,
) -> Result<Response, ApiError> {
    let job = chat_job(app.loaded()?, &body)?;
    run(app, job).await
}

/// A chat request's job (also what `/v1/responses` runs, its body translated).
pub(super) fn chat_job(loaded: &Loaded, body: &Value) -> Result<Job, ApiError> {
    let mut req: ChatRequest = parse_body(body)?;
    req.common = parse_body(body)?;
    let adapter = check_model(loaded, &req.common)?;
    let mut common = req.common.validate(&loaded.defaults, loaded.vocab_size())?;
    let template = loaded.chat_template.as_ref().ok_or_else(|| {
        ApiError::bad_request("this model has no chat template; use /v1/completions")
    })?;
    // A template that writes calls itself is given the tools and the calls as they are.
    let format = CallFormat::of_template(template.tool_syntax());
    let native = format.is_native();
    // Mistral's templates take 9-character call ids only (they raise on any other).
    let call_id = |id: String| match format {
        CallFormat::Mistral { .. } => mistral_call_id(&id),
        _ => id,
    };
    let tools = ToolPlan::from_request(
        req.tools.as_ref(),
        req.tool_choice.as_ref(),
        format,
        req.parallel_tool_calls.unwrap_or(true),
    )?;
    if let Some(plan) = &tools {
        if common.json.is_some() {
            return Err(ApiError::invalid(
                "response_format",
                "`response_format` with `tools` is not supported",
            ));
        }
        common.json = Some(plan.grammar.clone());
    }
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must not be empty",
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    // Earlier calls' names by id, for the results that answer them.
    let mut call_names: Vec<(String, String)> = Vec::new();
    for (i, m) in req.messages.into_iter().enumerate() {
        if !["system", "developer", "user", "assistant", "tool"].contains(&m.role.as_str()) {
            return Err(ApiError::invalid(
                &format!("messages[{i}].role"),
                format!("unknown role '{}'", m.role),
            ));
        }
        let role = if m.role == "developer" {
            "system".to_string()
        } else {
            m.role
        };
        let mut content = message_text(m.content, i)?;
        if native {
            let mut message = ChatMessage {
                role,
                content,
                ..Default::default()
            };
            if let Some(calls) = m.tool_calls.filter(|c| !c.is_empty()) {
                let calls = calls.into_iter().map(|c| {
                    let arguments = serde_json::from_str::<Value>(&c.function.arguments)
                        .unwrap_or(Value::String(c.function.arguments));
                    call_names.extend(c.id.clone().map(|id| (id, c.function.name.clone())));
                    json!({"type": "function", "id": c.id.map(call_id),
                           "function": {"name": c.function.name, "arguments": arguments}})
                });
                message.tool_calls = Some(calls.collect());
            }
            if message.role == "tool" {
                message.name = m
                    .tool_call_id
                    .as_ref()
                    .and_then(|id| call_names.iter().find(|(i, _)| i == id))
                    .map(|(_, n)| n.clone());
                message.tool_call_id = m.tool_call_id.map(call_id);
            }
            messages.push(message);
            continue;
        }
        // Calls and their results, as the model writes calls (see `server::tools`).
        let role = match role.as_str() {
            "assistant" => {
                for c in m.tool_calls.unwrap_or_default() {
                    if !content.is_empty() {
                        content.push('\n');
                    }
                    content.push_str(&call_text(&c.function.name, &c.function.arguments));
                    call_names.extend(c.id.map(|id| (id, c.function.name)));
                }
                role
            }
            "tool" => {
                let name = m
                    .tool_call_id
                    .and_then(|id| call_names.iter().find(|(i, _)| *i == id))
                    .map_or("the function", |(_, n)| n.as_str());
                content = format!("Result of {name}: {content}");
                "user".to_owned()
            }
            _ => role,
        };
        messages.push(ChatMessage::text(&role, &content));
    }
    if let Some(plan) = tools.as_ref().filter(|p| p.format == CallFormat::Prompted) {
        let text = plan.system_text();
        match messages.first_mut() {
            Some(m) if m.role == "system" => m.content = format!("{}\n\n{text}", m.content),
            _ => messages.insert(0, ChatMessage::text("system", &text)),
        }
    }
    let prompt = template
        .render_with(
            &messages,
            req.add_generation_prompt.unwrap_or(true),
            tools
                .as_ref()
                .filter(|p| p.format.is_native())
                .map(|p| &p.declared),
            &req.chat_template_kwargs.unwrap_or_default(),
        )
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let reasoning = match req.reasoning_format.as_deref() {
        None | Some("auto") => loaded.reasoning,
        Some("deepseek") => true,
        Some("none") => false,
        Some(other) => {
            return Err(ApiError::invalid(
                "reasoning_format",
                format!("unknown `reasoning_format` '{other}' (auto, deepseek, none)"),
            ))
        }
    }
    .then(|| ReasoningSplitter::new(&prompt));
    // The template writes any BOS itself (as transformers' apply_chat_template does).
    let prompt_ids = loaded.tokenizer.encode(&prompt, false)?;
    let requested = req.max_completion_tokens.or(req.max_tokens);
    let param = if req.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_new_tokens = max_new_tokens(loaded, prompt_ids.len(), requested, param, false)?;
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (true, n) => Logprobs::Chat(validate_top_logprobs(n.unwrap_or(0), "top_logprobs")?),
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ))
        }
        (false, None) => Logprobs::None,
    };
    let job = Job {
        kind: Kind::Chat,
        id: request_id("chatcmpl"),
        created: now_secs(),
        model: adapter.clone().unwrap_or_else(|| loaded.model_name.clone()),
        adapter,
        prompts: vec![Prompt {
            ids: prompt_ids,
            echo: None,
            max_new_tokens,
        }],
        prompt_logprobs: false,
        logprobs,
        common,
        extra_stop_ids: Vec::new(),
        fim_mode: None,
        tools: tools.map(Arc::new),
        reasoning,
        rendered: prompt,
    };
    Ok(job)
}
