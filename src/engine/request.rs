//! The public seam of the engine: what a request is, and the events that answer it.

use crate::model::TokenId;

use super::sampler::SamplingParams;

/// One generation request, already validated (the engine cannot see an invalid value).
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt token ids (non-empty).
    pub prompt: Vec<TokenId>,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Upper bound on new tokens. 0: only the prompt is computed (its KV then serves later
    /// requests from the prefix cache; its log-probabilities, if asked for, are reported) and
    /// the request finishes with `Length` and no token.
    pub max_new_tokens: usize,
    /// Token ids that end the request (the model's EOS unless `ignore_eos`, plus any others).
    pub stop_token_ids: Vec<TokenId>,
    /// LoRA adapter name, as loaded with [`super::EngineHandle::load_adapter`]; `None` is the
    /// base model.
    pub adapter: Option<String>,
    /// Number of alternatives to report with each token's log-probability (≤ 20).
    pub top_logprobs: Option<usize>,
    /// Report the log-probability of every prompt token after the first, each given the
    /// tokens before it, with this many alternatives (≤ 20): how evaluation harnesses score
    /// text. The whole prompt is then computed (no prefix-cache reuse for it).
    pub prompt_logprobs: Option<usize>,
    /// JSON mode: only tokens that keep the generated text a prefix of one value of the
    /// constraint's grammar (any object, a schema's instance, a tool call, a choice), and a
    /// stop token only once it may end.
    pub json: Option<super::json_mode::JsonConstraint>,
    /// An embedding instead of tokens: once the prompt is computed, its last token's final
    /// hidden state is sent ([`Event::Embedding`]); `max_new_tokens` must be 0.
    pub embed: bool,
    /// Scheduling priority, vLLM's convention: lower runs first (0 by default). Waiting
    /// requests are admitted by (priority, arrival); when room runs out the least urgent
    /// running sequence (the newest of them) is preempted first, also to admit a more urgent
    /// one. The tokens never depend on it.
    pub priority: i32,
}

impl GenerateRequest {
    /// A greedy request for `max_new_tokens` tokens with no stop tokens.
    pub fn greedy(prompt: Vec<TokenId>, max_new_tokens: usize) -> Self {
        GenerateRequest {
            prompt,
            sampling: SamplingParams::greedy(),
            max_new_tokens,
            stop_token_ids: Vec::new(),
            adapter: None,
            top_logprobs: None,
            prompt_logprobs: None,
            json: None,
            embed: false,
            priority: 0,
        }
    }

    /// An embedding of `prompt` (see [`GenerateRequest::embed`]).
    pub fn embedding(prompt: Vec<TokenId>) -> Self {
        GenerateRequest {
            embed: true,
            ..GenerateRequest::greedy(prompt, 0)
        }
    }
}

/// Log-probability of a generated token and of the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// Log-probability of the chosen token.
    pub logprob: f32,
    /// The most likely tokens with their log-probabilities, most likely first.
    pub top: Vec<(TokenId, f32)>,
}

/// Why a request finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// One of the stop token ids was generated (it is the last token sent).
    StopToken(TokenId),
    /// `max_new_tokens` or the model's context length was reached.
    Length,
}

impl FinishReason {
    /// OpenAI spelling: `stop` or `length`.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::StopToken(_) => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache (not computed again).
    pub cached_tokens: usize,
}

/// What the engine sends back for a request, in order: prompt log-probabilities (when
/// requested), tokens, then one `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Log-probabilities of prompt tokens `1..` (the first has nothing before it to be
    /// predicted from), once the whole prompt is computed; only with
    /// [`GenerateRequest::prompt_logprobs`].
    PromptLogprobs(Vec<TokenLogprob>),
    /// The prompt's last token's final hidden state (`hidden_size` values, after the final
    /// norm; not normalised to unit length), before `Finished`; only with
    /// [`GenerateRequest::embed`].
    Embedding(Vec<f32>),
    /// A new token.
    Token {
        /// The token id.
        id: TokenId,
        /// Its log-probability, when requested.
        logprob: Option<TokenLogprob>,
    },
    /// The request ended normally.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Token counts.
        usage: Usage,
    },
    /// The request failed.
    Failed(EngineError),
}

/// Errors of the engine.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The request can never run (too long for the context or the KV pool, empty prompt, ...).
    #[error("{0}")]
    Invalid(String),
    /// Too many requests are waiting.
    #[error("the server is overloaded: too many requests waiting")]
    Overloaded,
    /// No adapter is loaded under that name.
    #[error("no model or adapter named '{0}'")]
    UnknownAdapter(String),
    /// The engine thread is gone.
    #[error("the engine has stopped")]
    Stopped,
    /// The model failed during a step.
    #[error("model error: {0}")]
    Model(String),
}
