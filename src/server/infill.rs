//! Editor dialects: llama.cpp's `POST /infill` (llama.vim, llama.vscode) and `POST /completion`
//! (Continue, Tabby), and Ollama's `POST /api/generate`. All three go through one path:
//! fields → a `Plan` (prompt ids built by `text::fim` when there is a suffix) → one
//! `TextEvents` → a JSON body, SSE events (llama.cpp) or newline-delimited JSON (Ollama).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::json_schema::Grammar;
use crate::engine::{GenerateRequest, SamplingParams};
use crate::text::fim::{self, ExtraFile, FimInput};

use super::error::{ApiError, AppJson};
use super::openai::{gbnf_grammar, parse_body, schema_grammar};
use super::stream::{TextEvent, TextEvents, TokenInfo};
use super::{AppState, Loaded};

/// A prompt as text or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptValue {
    Text(String),
    Tokens(Vec<u32>),
}

/// One `input_extra` chunk.
#[derive(Debug, Deserialize)]
struct ExtraChunk {
    #[serde(default)]
    filename: Option<String>,
    #[serde(default)]
    text: String,
}

/// llama.cpp's request fields (`/infill` and `/completion`); unknown fields are ignored, as
/// llama.cpp does.
#[derive(Debug, Deserialize, Default)]
struct LlamaRequest {
    /// Base model or a loaded adapter (llama.cpp ignores it; we route by it).
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    input_prefix: Option<String>,
    #[serde(default)]
    input_suffix: Option<String>,
    #[serde(default)]
    input_extra: Option<Vec<ExtraChunk>>,
    #[serde(default)]
    prompt: Option<PromptValue>,
    #[serde(default)]
    n_predict: Option<i64>,
    #[serde(default)]
    t_max_predict_ms: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stop: Option<Vec<String>>,
    #[serde(default)]
    ignore_eos: Option<bool>,
    /// Alternatives to report with each generated token (`completion_probabilities`).
    #[serde(default)]
    n_probs: Option<i64>,
    /// JSON mode following this schema.
    #[serde(default)]
    json_schema: Option<Value>,
    /// GBNF grammar (not supported: a 400 rather than unconstrained text).
    #[serde(default)]
    grammar: Option<String>,
    #[serde(flatten)]
    sampling: RawSampling,
}

/// Ollama's `options`.
#[derive(Debug, Deserialize, Default)]
struct OllamaOptions {
    #[serde(default)]
    num_predict: Option<i64>,
    #[serde(default)]
    stop: Option<Vec<String>>,
    #[serde(flatten)]
    sampling: RawSampling,
}

/// Ollama's `/api/generate` fields.
#[derive(Debug, Deserialize)]
struct OllamaRequest {
    #[serde(default)]
    model: Option<String>,
    prompt: String,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    options: Option<OllamaOptions>,
    /// `"json"`: JSON mode; a JSON schema object: JSON mode following it.
    #[serde(default)]
    format: Option<Value>,
    /// `true`: the prompt as it is; otherwise (and without `suffix`) it is the user's turn of
    /// the model's chat template, as Ollama formats it.
    #[serde(default)]
    raw: Option<bool>,
    /// A system message for the templated prompt.
    #[serde(default)]
    system: Option<String>,
}

/// Sampling fields common to the dialects (same names in llama.cpp's body and Ollama's
/// `options`), before validation.
#[derive(Debug, Deserialize, Default)]
struct RawSampling {
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    repeat_penalty: Option<f32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
}

/// llama.cpp's defaults (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05).
fn sampling(raw: &RawSampling) -> Result<SamplingParams, ApiError> {
    let temperature = raw.temperature.unwrap_or(0.8);
    if !temperature.is_finite() || temperature < 0.0 {
        return Err(ApiError::invalid(
            "temperature",
            "`temperature` must be ≥ 0",
        ));
    }
    let top_p = raw.top_p.unwrap_or(0.95);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", "`top_p` must be in (0, 1]"));
    }
    let min_p = raw.min_p.unwrap_or(0.05);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::invalid("min_p", "`min_p` must be in [0, 1]"));
    }
    let repetition_penalty = raw.repeat_penalty.unwrap_or(1.0);
    if !repetition_penalty.is_finite() || repetition_penalty <= 0.0 {
        return Err(ApiError::invalid(
            "repeat_penalty",
            "`repeat_penalty` must be > 0",
        ));
    }
    for (v, name) in [
        (raw.presence_penalty, "presence_penalty"),
        (raw.frequency_penalty, "frequency_penalty"),
    ] {
        if v.is_some_and(|v| !v.is_finite()) {
            return Err(ApiError::invalid(
                name,
                format!("`{name}` must be a number"),
            ));
        }
    }
    Ok(SamplingParams {
        temperature,
        // ≤ 0 means off in llama.cpp.
        top_k: raw.top_k.map_or(40, |k| k.max(0) as usize),
        top_p,
        min_p,
        repetition_penalty,
        presence_penalty: raw.presence_penalty.unwrap_or(0.0),
        frequency_penalty: raw.frequency_penalty.unwrap_or(0.0),
        logit_bias: Vec::new(),
        // Negative seeds (llama.cpp's -1) draw a random one.
        seed: raw.seed.and_then(|s| u64::try_from(s).ok()),
    })
}

/// What to run for one editor request.
struct Plan {
    prompt_ids: Vec<u32>,
    stop_ids: Vec<u32>,
    stop_strings: Vec<String>,
    sampling: SamplingParams,
    n_predict: Option<i64>,
    predict_budget: Option<Duration>,
    fim_mode: Option<&'static str>,
    /// LoRA adapter (`None`: the base model).
    adapter: Option<String>,
    /// Alternatives per generated token, when `n_probs` asked for probabilities.
    n_probs: Option<usize>,
    /// JSON mode: the grammar the text follows.
    json: Option<Arc<Grammar>>,
}

/// llama.cpp's `json_schema` (as there, `{}` allows any JSON value) or GBNF `grammar` (a
/// regular one; see `engine::gbnf`).
fn llama_json(req: &LlamaRequest) -> Result<Option<Arc<Grammar>>, ApiError> {
    let grammar = req.grammar.as_deref().filter(|g| !g.trim().is_empty());
    match (&req.json_schema, grammar) {
        (None | Some(Value::Null), None) => Ok(None),
        (None | Some(Value::Null), Some(g)) => gbnf_grammar(g, "grammar").map(Some),
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "grammar",
            "give one of `grammar` and `json_schema`",
        )),
        (Some(s), None) => schema_grammar(s, "json_schema").map(Some),
    }
}

/// llama.cpp's `n_probs`: 0 (or absent) for none, at most the engine's limit.
fn n_probs(n: Option<i64>) -> Result<Option<usize>, ApiError> {
    match n {
        None | Some(0) => Ok(None),
        Some(n) if (1..=crate::engine::MAX_TOP_LOGPROBS as i64).contains(&n) => {
            Ok(Some(n as usize))
        }
        Some(_) => Err(ApiError::invalid(
            "n_probs",
            format!(
                "`n_probs` must be between 0 and {}",
                crate::engine::MAX_TOP_LOGPROBS
            ),
        )),
    }
}

/// llama.cpp's `completion_probabilities` entries of `tokens`: each token's log-probability
/// and its most likely alternatives.
fn completion_probabilities(loaded: &Loaded, tokens: &[TokenInfo]) -> Vec<Value> {
    let entry = |id: u32, logprob: f32| {
        let text = loaded.tokenizer.decode(&[id], false).unwrap_or_default();
        json!({"id": id, "token": text, "bytes": text.as_bytes(), "logprob": logprob})
    };
    tokens
        .iter()
        .filter_map(|t| {
            let lp = t.logprob.as_ref()?;
            let mut e = entry(t.id, lp.logprob);
            e["top_logprobs"] = lp.top.iter().map(|&(id, p)| entry(id, p)).collect();
            Some(e)
        })
        .collect()
}

/// A finished generation with its timings.
struct Outcome {
    text: String,
    ids: Vec<u32>,
    /// `completion_probabilities` so far (when asked for).
    probs: Vec<Value>,
    reason: &'static str,
    cached_tokens: usize,
    submitted: Instant,
    first_token: Option<Instant>,
    ended: Instant,
}

impl Outcome {
    /// Nothing generated yet.
    fn new(submitted: Instant) -> Self {
        Outcome {
            text: String::new(),
            ids: Vec::new(),
            probs: Vec::new(),
            reason: "length",
            cached_tokens: 0,
            submitted,
            first_token: None,
            ended: submitted,
        }
    }
}

/// Assembles a FIM prompt from editor fields with the model's FIM mode.
fn fim_plan(loaded: &Loaded, input: &FimInput) -> Result<fim::FimPrompt, ApiError> {
    Ok(fim::build(&loaded.tokenizer, &loaded.fim, input)?)
}

fn check_ids(loaded: &Loaded, ids: &[u32]) -> Result<(), ApiError> {
    if ids.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    match ids.iter().find(|&&t| t as usize >= loaded.vocab_size()) {
        Some(bad) => Err(ApiError::invalid(
            "prompt",
            format!("token id {bad} is outside the vocabulary"),
        )),
        None => Ok(()),
    }
}

/// Submits the plan; returns its text events and the stop ids in force.
fn start(app: &AppState, loaded: &Loaded, plan: Plan) -> Result<TextEvents, ApiError> {
    check_ids(loaded, &plan.prompt_ids)?;
    let context = loaded.engine.limits().context_length;
    let prompt_len = plan.prompt_ids.len();
    if prompt_len >= context {
        return Err(ApiError::invalid(
            "prompt",
            format!("the prompt has {prompt_len} tokens; this model's context length is {context}"),
        ));
    }
    let room = context - prompt_len;
    let max_new_tokens = match plan.n_predict {
        None => room,
        Some(n) if n < 0 => room,
        // The prompt only: llama.vim sends its ring buffer of recent chunks this way
        // (`input_extra`, nothing else) to have them cached before the next completion.
        Some(0) => 0,
        // Editors ask for a fixed budget; near the end of the context it is clamped.
        Some(n) => (n as usize).min(room),
    };
    let stop_ids = plan.stop_ids;
    let generation = loaded.engine.submit(GenerateRequest {
        prompt: plan.prompt_ids,
        sampling: plan.sampling,
        max_new_tokens,
        stop_token_ids: stop_ids.clone(),
        adapter: plan.adapter,
        top_logprobs: plan.n_probs,
        prompt_logprobs: None,
        json: plan.json.map(|g| loaded.json_constraint(g)),
        embed: false,
        priority: 0,
    })?;
    let deadline = app.config().request_timeout.map(|t| Instant::now() + t);
    Ok(TextEvents::new(
        generation,
        loaded.tokenizer.clone(),
        plan.stop_strings,
        stop_ids,
        Some(app.metrics()),
    )
    .with_deadline(deadline)
    .with_predict_budget(plan.predict_budget))
}

async fn collect(
    loaded: &Loaded,
    mut events: TextEvents,
    submitted: Instant,
) -> Result<Outcome, ApiError> {
    let mut out = Outcome::new(submitted);
    while let Some(ev) = events.next().await {
        match ev {
            TextEvent::Delta { text, tokens } => {
                if out.first_token.is_none() && !tokens.is_empty() {
                    out.first_token = Some(Instant::now());
                }
                out.text.push_str(&text);
                out.ids.extend(tokens.iter().map(|t| t.id));
                out.probs.extend(completion_probabilities(loaded, &tokens));
            }
            TextEvent::Finished {
                reason,
                cached_tokens,
                ..
            } => {
                out.reason = reason;
                out.cached_tokens = cached_tokens;
            }
            TextEvent::Failed(e) => return Err(e.into()),
            TextEvent::PromptLogprobs(_) => {} // never requested here
        }
    }
    out.ended = Instant::now();
    Ok(out)
}

/// llama.cpp's final object: content, counts, stop type, cache hits, timings.
fn llama_final(loaded: &Loaded, plan_info: &PlanInfo, o: &Outcome, content: &str) -> Value {
    let first = o.first_token.unwrap_or(o.ended);
    let prompt_ms = (first - o.submitted).as_secs_f64() * 1e3;
    let predicted_ms = (o.ended - first).as_secs_f64() * 1e3;
    let predicted_n = o.ids.len();
    let prompt_n = plan_info.prompt_len.saturating_sub(o.cached_tokens);
    let per = |ms: f64, n: usize| if n == 0 { 0.0 } else { ms / n as f64 };
    let rate = |ms: f64, n: usize| if ms <= 0.0 { 0.0 } else { n as f64 * 1e3 / ms };
    let ended_on_stop_token = o
        .ids
        .last()
        .is_some_and(|id| plan_info.stop_ids.contains(id));
    let stop_type = match o.reason {
        "stop" if ended_on_stop_token => "eos",
        "stop" => "word",
        _ => "limit",
    };
    let mut v = json!({
        "index": 0,
        "content": content,
        "tokens": [],
        "id_slot": 0,
        "stop": true,
        "model": loaded.model_name,
        "tokens_predicted": predicted_n,
        "tokens_evaluated": plan_info.prompt_len,
        "generation_settings": {"n_ctx": loaded.engine.limits().context_length},
        "has_new_line": content.contains('\n'),
        "truncated": false,
        "stop_type": stop_type,
        "stopping_word": "",
        "tokens_cached": o.cached_tokens,
        "fim_mode": plan_info.fim_mode,
        "timings": {
            "prompt_n": prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": per(prompt_ms, prompt_n),
            "prompt_per_second": rate(prompt_ms, prompt_n),
            "predicted_n": predicted_n,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": per(predicted_ms, predicted_n),
            "predicted_per_second": rate(predicted_ms, predicted_n),
        },
    });
    if plan_info.n_probs {
        // Streamed, the pieces carried them; the final object has none left to report.
        v["completion_probabilities"] = json!(o.probs);
    }
    v
}

/// What the response needs to know about the plan after it was submitted.
struct PlanInfo {
    prompt_len: usize,
    stop_ids: Vec<u32>,
    fim_mode: Option<&'static str>,
    /// `completion_probabilities` were asked for.
    n_probs: bool,
}

/// Runs a llama.cpp-dialect plan and answers in llama.cpp's format.
async fn respond_llama(
    app: AppState,
    mut plan: Plan,
    ignore_eos: bool,
    stream: bool,
) -> Result<Response, ApiError> {
    let loaded = app.loaded()?;
    if !ignore_eos {
        plan.stop_ids.extend(&loaded.eos_ids);
    }
    let info = PlanInfo {
        prompt_len: plan.prompt_ids.len(),
        stop_ids: plan.stop_ids.clone(),
        fim_mode: plan.fim_mode,
        n_probs: plan.n_probs.is_some(),
    };
    let submitted = Instant::now();
    let events = start(&app, loaded, plan)?;
    if !stream {
        let o = collect(loaded, events, submitted).await?;
        return Ok(axum::Json(llama_final(loaded, &info, &o, &o.text)).into_response());
    }
    // SSE: one event per text delta, then the final object (llama.cpp sends no [DONE] here).
    struct St {
        app: AppState,
        events: Option<TextEvents>,
        info: PlanInfo,
        o: Outcome,
    }
    let st = St {
        app: app.clone(),
        events: Some(events),
        info,
        o: Outcome::new(submitted),
    };
    let s = stream::unfold(st, |mut st| async move {
        let events = st.events.as_mut()?;
        loop {
            match events.next().await {
                Some(TextEvent::PromptLogprobs(_)) => {} // never requested here
                Some(TextEvent::Delta { text, tokens }) => {
                    if st.o.first_token.is_none() && !tokens.is_empty() {
                        st.o.first_token = Some(Instant::now());
                    }
                    st.o.ids.extend(tokens.iter().map(|t| t.id));
                    if text.is_empty() {
                        continue;
                    }
                    let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
                    let mut v = json!({"index": 0, "content": text, "tokens": ids, "stop": false,
                                   "id_slot": 0, "tokens_predicted": st.o.ids.len(),
                                   "tokens_evaluated": st.info.prompt_len});
                    if st.info.n_probs {
                        let loaded = st.app.loaded().ok()?;
                        v["completion_probabilities"] =
                            json!(completion_probabilities(loaded, &tokens));
                    }
                    return Some((
                        Ok::<_, Infallible>(SseEvent::default().data(v.to_string())),
                        st,
                    ));
                }
                Some(TextEvent::Finished {
                    reason,
                    cached_tokens,
                    ..
                }) => {
                    st.o.reason = reason;
                    st.o.cached_tokens = cached_tokens;
                }
                Some(TextEvent::Failed(e)) => {
                    st.events = None;
                    let body = ApiError::from(e).body();
                    return Some((Ok(SseEvent::default().data(body.to_string())), st));
                }
                None => {
                    st.events = None;
                    st.o.ended = Instant::now();
                    let loaded = st.app.loaded().ok()?;
                    let v = llama_final(loaded, &st.info, &st.o, "");
                    return Some((Ok(SseEvent::default().data(v.to_string())), st));
                }
            }
        }
    });
    Ok(Sse::new(s).keep_alive(KeepAlive::default()).into_response())
}

fn extra_files(chunks: Option<Vec<ExtraChunk>>) -> Vec<ExtraFile> {
    chunks
        .unwrap_or_default()
        .into_iter()
        .map(|c| ExtraFile {
            filename: c.filename.unwrap_or_else(|| "tmp".into()),
            text: c.text,
        })
        .collect()
}

/// `POST /infill` (llama.cpp): `input_prefix`, `input_suffix`, `input_extra`, `prompt`.
pub async fn infill(
    State(app): State<AppState>,
    AppJson(body): AppJson<Value>,
) -> Result<Response, ApiError> {
    let mut req: LlamaRequest = parse_body(&body)?;
    let loaded = app.loaded()?;
    let prompt = match &req.prompt {
        None => String::new(),
        Some(PromptValue::Text(t)) => t.clone(),
        Some(PromptValue::Tokens(_)) => {
            return Err(ApiError::invalid(
                "prompt",
                "`prompt` must be text for /infill",
            ))
        }
    };
    let input = FimInput {
        prefix: req.input_prefix.clone().unwrap_or_default(),
        suffix: req.input_suffix.clone().unwrap_or_default(),
        prompt,
        extra: extra_files(req.input_extra.take()),
    };
    let built = fim_plan(loaded, &input)?;
    let mut stop_strings = req.stop.clone().unwrap_or_default();
    stop_strings.extend(built.stop_strings);
    let plan = Plan {
        prompt_ids: built.ids,
        stop_ids: built.stop_ids,
        stop_strings,
        sampling: sampling(&req.sampling)?,
        n_predict: req.n_predict,
        predict_budget: req.t_max_predict_ms.map(Duration::from_millis),
        fim_mode: Some(built.mode),
        adapter: loaded.resolve_model(req.model.as_deref())?,
        n_probs: n_probs(req.n_probs)?,
        json: llama_json(&req)?,
    };
    respond_llama(
        app.clone(),
        plan,
        req.ignore_eos.unwrap_or(false),
        req.stream.unwrap_or(false),
    )
    .await
}

/// `POST /completion` (llama.cpp's native completion): `prompt` (text or ids), `n_predict`.
pub async fn completion(
    State(app): State<AppState>,
    AppJson(body): AppJson<Value>,
) -> Result<Response, ApiError> {
    let mut req: LlamaRequest = parse_body(&body)?;
    let loaded = app.loaded()?;
    let (prompt_ids, stop_ids, mut stop_strings, fim_mode) = match (&req.prompt, &req.input_suffix)
    {
        (Some(PromptValue::Tokens(ids)), _) => (ids.clone(), Vec::new(), Vec::new(), None),
        (prompt, Some(suffix)) => {
            let prefix = match prompt {
                Some(PromptValue::Text(t)) => t.clone(),
                _ => req.input_prefix.clone().unwrap_or_default(),
            };
            let built = fim_plan(
                loaded,
                &FimInput {
                    prefix,
                    suffix: suffix.clone(),
                    prompt: String::new(),
                    extra: extra_files(req.input_extra.take()),
                },
            )?;
            (
                built.ids,
                built.stop_ids,
                built.stop_strings,
                Some(built.mode),
            )
        }
        (Some(PromptValue::Text(t)), None) => (
            loaded.tokenizer.encode(t, true)?,
            Vec::new(),
            Vec::new(),
            None,
        ),
        (None, None) => return Err(ApiError::invalid("prompt", "`prompt` is required")),
    };
    stop_strings.extend(req.stop.clone().unwrap_or_default());
    let plan = Plan {
        prompt_ids,
        stop_ids,
        stop_strings,
        sampling: sampling(&req.sampling)?,
        n_predict: req.n_predict,
        predict_budget: req.t_max_predict_ms.map(Duration::from_millis),
        fim_mode,
        adapter: loaded.resolve_model(req.model.as_deref())?,
        n_probs: n_probs(req.n_probs)?,
        json: llama_json(&req)?,
    };
    respond_llama(
        app.clone(),
        plan,
        req.ignore_eos.unwrap_or(false),
        req.stream.unwrap_or(false),
    )
    .await
}

/// RFC 3339 UTC time, as Ollama writes `created_at`.
pub(super) fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Ollama's final object (durations in nanoseconds).
fn ollama_final(model: &str, prompt_len: usize, o: &Outcome, response: &str) -> Value {
    let first = o.first_token.unwrap_or(o.ended);
    let ns = |d: Duration| d.as_nanos() as u64;
    json!({
        "model": model,
        "created_at": rfc3339(SystemTime::now()),
        "response": response,
        "done": true,
        "done_reason": if o.reason == "stop" { "stop" } else { "length" },
        "context": [],
        "total_duration": ns(o.ended - o.submitted),
        "load_duration": 0,
        "prompt_eval_count": prompt_len,
        "prompt_eval_duration": ns(first - o.submitted),
        "eval_count": o.ids.len(),
        "eval_duration": ns(o.ended - first),
    })
}

/// `POST /api/generate` (Ollama): `prompt` (the user's turn of the chat template, with
/// `system` if given, unless `raw: true`), optional `suffix` (FIM: the prompt is the
/// prefix, never templated), `options`, `stream` (default true: newline-delimited JSON).
pub async fn ollama_generate(
    State(app): State<AppState>,
    AppJson(body): AppJson<Value>,
) -> Result<Response, ApiError> {
    let req: OllamaRequest = parse_body(&body)?;
    let loaded = app.loaded()?;
    let adapter = loaded.resolve_model(req.model.as_deref())?;
    let opts = req.options.unwrap_or_default();
    let (prompt_ids, stop_ids, mut stop_strings, fim_mode) = match &req.suffix {
        Some(suffix) => {
            let built = fim_plan(
                loaded,
                &FimInput {
                    prefix: req.prompt.clone(),
                    suffix: suffix.clone(),
                    ..Default::default()
                },
            )?;
            (
                built.ids,
                built.stop_ids,
                built.stop_strings,
                Some(built.mode),
            )
        }
        None => (
            match loaded
                .chat_template
                .as_ref()
                .filter(|_| req.raw != Some(true))
            {
                Some(template) => {
                    let mut messages = Vec::with_capacity(2);
                    if let Some(system) = &req.system {
                        messages.push(crate::text::ChatMessage::text("system", system));
                    }
                    messages.push(crate::text::ChatMessage::text("user", &req.prompt));
                    let text = template
                        .render(&messages, true)
                        .map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
                    // The template writes any BOS itself.
                    loaded.tokenizer.encode(&text, false)?
                }
                None => loaded.tokenizer.encode(&req.prompt, true)?,
            },
            Vec::new(),
            Vec::new(),
            None,
        ),
    };
    stop_strings.extend(opts.stop.clone().unwrap_or_default());
    let mut stop_ids = stop_ids;
    stop_ids.extend(&loaded.eos_ids);
    let plan = Plan {
        prompt_ids,
        stop_ids,
        stop_strings,
        sampling: sampling(&opts.sampling)?,
        n_predict: opts.num_predict,
        predict_budget: None,
        fim_mode,
        adapter: adapter.clone(),
        n_probs: None,
        json: match &req.format {
            None => None,
            Some(f) if f == "json" => Some(Arc::new(Grammar::any_object())),
            Some(f) if f.as_str().is_some_and(str::is_empty) => None,
            Some(f) if f.is_object() => Some(schema_grammar(f, "format")?),
            Some(_) => {
                return Err(ApiError::invalid(
                    "format",
                    "`format` must be \"json\" or a JSON schema object",
                ))
            }
        },
    };
    let prompt_len = plan.prompt_ids.len();
    let model = adapter.unwrap_or_else(|| loaded.model_name.clone());
    let submitted = Instant::now();
    let events = start(&app, loaded, plan)?;
    if !req.stream.unwrap_or(true) {
        let o = collect(loaded, events, submitted).await?;
        return Ok(axum::Json(ollama_final(&model, prompt_len, &o, &o.text)).into_response());
    }
    let st = (Some(events), Outcome::new(submitted));
    let model2 = loaded.model_name.clone();
    let s = stream::unfold(st, move |(mut events, mut o)| {
        let model = model2.clone();
        async move {
            let ev = events.as_mut()?;
            loop {
                match ev.next().await {
                    Some(TextEvent::PromptLogprobs(_)) => {} // never requested here
                    Some(TextEvent::Delta { text, tokens }) => {
                        if o.first_token.is_none() && !tokens.is_empty() {
                            o.first_token = Some(Instant::now());
                        }
                        o.ids.extend(tokens.iter().map(|t| t.id));
                        if text.is_empty() {
                            continue;
                        }
                        let v = json!({"model": model, "created_at": rfc3339(SystemTime::now()),
                                       "response": text, "done": false});
                        return Some((Ok::<_, Infallible>(format!("{v}\n")), (events, o)));
                    }
                    Some(TextEvent::Finished { reason, .. }) => o.reason = reason,
                    Some(TextEvent::Failed(e)) => {
                        let v = json!({"error": ApiError::from(e).message});
                        return Some((Ok(format!("{v}\n")), (None, o)));
                    }
                    None => {
                        o.ended = Instant::now();
                        let v = ollama_final(&model, prompt_len, &o, "");
                        return Some((Ok(format!("{v}\n")), (None, o)));
                    }
                }
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(s),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_251_199); // 2024-02-29T23:59:59Z
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.000000000Z");
    }
}
