//! `TextEvents`: drives one `Generation` through the detokenizer and the stop matcher. The only
//! place engine events meet text, and the only place a stop string ends a request (by dropping
//! the `Generation`, which cancels it in the engine).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use crate::engine::{EngineError, Event, FinishReason, Generation, TokenLogprob};
use crate::model::TokenId;
use crate::text::{Detokenizer, StopCheck, StopMatcher, Tokenizer};

use super::metrics::Metrics;

/// One generated token, for log-probabilities.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    /// Token id.
    pub id: TokenId,
    /// Its log-probability and alternatives, when requested.
    pub logprob: Option<TokenLogprob>,
}

/// What a client sees of a generation.
#[derive(Debug, Clone)]
pub enum TextEvent {
    /// Log-probabilities of prompt tokens `1..`, before anything else (when requested).
    PromptLogprobs(Vec<TokenLogprob>),
    /// New text and the tokens it came from (text may be empty while bytes are held back).
    Delta {
        /// Text safe to send.
        text: String,
        /// Tokens since the last delta.
        tokens: Vec<TokenInfo>,
    },
    /// The end: `stop` or `length`, and generated token count.
    Finished {
        /// OpenAI finish reason.
        reason: &'static str,
        /// Tokens generated.
        completion_tokens: usize,
        /// Prompt tokens whose KV came from the prefix cache.
        cached_tokens: usize,
    },
    /// The engine failed.
    Failed(EngineError),
}

/// Text events of one generation.
pub struct TextEvents {
    generation: Option<Generation>,
    detokenizer: Detokenizer,
    stop: StopMatcher,
    stop_token_ids: Vec<TokenId>,
    pending: VecDeque<TextEvent>,
    tokens: Vec<TokenInfo>,
    completion_tokens: usize,
    metrics: Option<Arc<Metrics>>,
    started: Instant,
    last_token: Option<Instant>,
    deadline: Option<Instant>,
    predict_budget: Option<std::time::Duration>,
    done: bool,
}

impl TextEvents {
    /// Wraps a generation; `stop_token_ids` are not rendered as text.
    pub fn new(
        generation: Generation,
        tokenizer: Arc<Tokenizer>,
        stop_strings: Vec<String>,
        stop_token_ids: Vec<TokenId>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        TextEvents {
            generation: Some(generation),
            detokenizer: Detokenizer::new(tokenizer, false),
            stop: StopMatcher::new(stop_strings),
            stop_token_ids,
            pending: VecDeque::new(),
            tokens: Vec::new(),
            completion_tokens: 0,
            metrics,
            started: Instant::now(),
            last_token: None,
            deadline: None,
            predict_budget: None,
            done: false,
        }
    }

    /// Ends generation at `deadline` with what was generated so far (finish reason `length`):
    /// the server's request timeout and llama.cpp's `t_max_predict_ms`.
    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline;
        self
    }

    /// Prompt tokens served from the prefix cache (0 once the generation is gone).
    fn cached_tokens(&self) -> usize {
        self.generation
            .as_ref()
            .map_or(0, Generation::cached_tokens)
    }

    /// Starts a generation time budget at the first token (llama.cpp's `t_max_predict_ms`);
    /// the earlier of it and any deadline applies.
    pub fn with_predict_budget(mut self, budget: Option<std::time::Duration>) -> Self {
        self.predict_budget = budget;
        self
    }

    fn finish(&mut self, reason: &'static str) {
        let tail = self.detokenizer.flush().ok().flatten().unwrap_or_default();
        let text = match self.stop.push(&tail) {
            StopCheck::Emit(t) => t + &self.stop.flush(),
            StopCheck::Stopped(t) => t,
        };
        if !text.is_empty() || !self.tokens.is_empty() {
            self.pending.push_back(TextEvent::Delta {
                text,
                tokens: std::mem::take(&mut self.tokens),
            });
        }
        self.pending.push_back(TextEvent::Finished {
            reason,
            completion_tokens: self.completion_tokens,
            cached_tokens: self.cached_tokens(),
        });
        self.end();
    }

    fn end(&mut self) {
        self.generation = None; // cancels in the engine if still running
        self.done = true;
        tracing::info!(
            completion_tokens = self.completion_tokens,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "generation ended"
        );
        if let Some(m) = &self.metrics {
            m.e2e.observe(self.started.elapsed().as_secs_f64());
        }
    }

    fn on_token(&mut self, id: TokenId, logprob: Option<TokenLogprob>) -> Result<(), EngineError> {
        let now = Instant::now();
        if let Some(m) = &self.metrics {
            match self.last_token {
                None => m.ttft.observe((now - self.started).as_secs_f64()),
                Some(prev) => m.itl.observe((now - prev).as_secs_f64()),
            }
        }
        if self.last_token.is_none() {
            if let Some(budget) = self.predict_budget {
                let end = now + budget;
                self.deadline = Some(self.deadline.map_or(end, |d| d.min(end)));
            }
        }
        self.last_token = Some(now);
        self.completion_tokens += 1;
        self.tokens.push(TokenInfo { id, logprob });
        if self.stop_token_ids.contains(&id) {
            return Ok(()); // the Finished event follows
        }
        let piece = self
            .detokenizer
            .step(id)
            .map_err(|e| EngineError::Model(e.to_string()))?
            .unwrap_or_default();
        match self.stop.push(&piece) {
            StopCheck::Emit(text) => {
                if !text.is_empty() {
                    self.pending.push_back(TextEvent::Delta {
                        text,
                        tokens: std::mem::take(&mut self.tokens),
                    });
                }
            }
            StopCheck::Stopped(text) => {
                self.pending.push_back(TextEvent::Delta {
                    text,
                    tokens: std::mem::take(&mut self.tokens),
                });
                self.pending.push_back(TextEvent::Finished {
                    reason: "stop",
                    completion_tokens: self.completion_tokens,
                    cached_tokens: self.cached_tokens(),
                });
                self.end();
            }
        }
        Ok(())
    }

    /// The next event; `None` after `Finished` or `Failed`.
    pub async fn next(&mut self) -> Option<TextEvent> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(ev);
            }
            if self.done {
                return None;
            }
            let ev = match (self.generation.as_mut(), self.deadline) {
                (Some(g), Some(d)) => {
                    match tokio::time::timeout_at(tokio::time::Instant::from_std(d), g.next()).await
                    {
                        Ok(ev) => ev,
                        Err(_) => {
                            self.finish("length");
                            continue;
                        }
                    }
                }
                (Some(g), None) => g.next().await,
                (None, _) => None,
            };
            match ev {
                Some(Event::PromptLogprobs(lps)) => return Some(TextEvent::PromptLogprobs(lps)),
                // Text requests never ask for one.
                Some(Event::Embedding(_)) => {}
                Some(Event::Token { id, logprob }) => {
                    if let Err(e) = self.on_token(id, logprob) {
                        self.end();
                        return Some(TextEvent::Failed(e));
                    }
                }
                Some(Event::Finished { reason, .. }) => self.finish(match reason {
                    FinishReason::StopToken(_) => "stop",
                    FinishReason::Length => "length",
                }),
                Some(Event::Failed(e)) => {
                    self.end();
                    return Some(TextEvent::Failed(e));
                }
                None => {
                    self.end();
                    return Some(TextEvent::Failed(EngineError::Stopped));
                }
            }
        }
    }
}
