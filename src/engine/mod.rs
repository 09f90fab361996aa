//! Engine layer: continuous batching over one model. Tokens in, tokens out; knows nothing of
//! HTTP or text.
//!
//! The engine runs on its own thread (named `engine`) and owns the model, the KV cache, the
//! block pool and every sequence. [`EngineHandle::submit`] queues a [`GenerateRequest`] and
//! returns a [`Generation`], a channel of [`Event`]s; dropping the `Generation` cancels the
//! request and its KV blocks are free again at the next step.

pub mod block_pool;
pub mod draft;
pub mod gbnf;
pub mod json_mode;
pub mod json_schema;
pub mod pattern;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod step;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::model::{KvCache, KvDtype, LoraAdapter, Model, ModelConfig};

pub use request::{EngineError, Event, FinishReason, GenerateRequest, TokenLogprob, Usage};
pub use sampler::{Sampler, SamplingParams};
pub use scheduler::SchedulerConfig;

/// Most alternatives per token that can be asked for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Engine settings.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Tokens per step over all sequences.
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running_seqs: usize,
    /// Requests queued beyond the running ones before `submit` answers `Overloaded`.
    pub max_waiting: usize,
    /// Bytes of the KV pool.
    pub kv_cache_bytes: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Speculative decoding by prompt lookup: draft tokens per step and sequence (0: off).
    /// Used while at most [`SPECULATE_MAX_RUNNING`] sequences run; the tokens are the same
    /// either way.
    pub speculative_tokens: usize,
}

/// Running sequences up to which drafts are computed: beyond, a step's rows already keep the
/// cores busy and draft rows would slow everyone's step.
pub const SPECULATE_MAX_RUNNING: usize = 4;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_tokens: 512,
            max_running_seqs: 64,
            max_waiting: 1024,
            kv_cache_bytes: 1024 << 20,
            block_size: 16,
            speculative_tokens: 0,
        }
    }
}

/// Gauges and counters, published after every step (for `/metrics`, `/health`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    /// Sequences holding KV blocks.
    pub num_running: usize,
    /// Sequences queued.
    pub num_waiting: usize,
    /// KV blocks in use.
    pub kv_blocks_used: usize,
    /// KV blocks in the pool.
    pub kv_blocks_total: usize,
    /// Blocks of the sliding-window layers' pool in use (0 without such layers).
    pub kv_window_blocks_used: usize,
    /// Blocks in the sliding-window layers' pool.
    pub kv_window_blocks_total: usize,
    /// Prompt tokens computed (recomputation after preemption counts again).
    pub prompt_tokens_total: u64,
    /// Tokens generated.
    pub generation_tokens_total: u64,
    /// Steps run.
    pub num_steps: u64,
    /// Requests cancelled by their client.
    pub num_cancelled: u64,
    /// Preemptions for lack of KV blocks.
    pub num_preempted: u64,
    /// Prompt tokens looked up in the prefix cache at admission.
    pub prefix_cache_queries_total: u64,
    /// Of those, tokens whose KV was found and reused.
    pub prefix_cache_hits_total: u64,
    /// Draft tokens computed by speculative decoding.
    pub spec_draft_tokens_total: u64,
    /// Of those, tokens that sampling confirmed (each saved a step).
    pub spec_accepted_tokens_total: u64,
    /// Duration of the last step.
    pub last_step_seconds: f64,
}

enum Command {
    Submit(sequence::Sequence),
}

/// How the KV budget is split between the full-attention pool and, for models with
/// sliding-window layers, the window pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvSizes {
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks of the full-attention pool.
    pub num_blocks: usize,
    /// Blocks of the window pool (0 without sliding layers).
    pub num_window_blocks: usize,
    /// Blocks of the window pool one sequence holds at most.
    pub window_ring: usize,
}

impl KvSizes {
    /// Sliding layers get their share of the budget by layer count, but never more than every
    /// running sequence's full ring; full layers get the rest. A model with only sliding
    /// layers keeps a full pool of bookkeeping blocks with no storage behind them.
    pub fn new(c: &ModelConfig, dtype: KvDtype, config: &EngineConfig) -> Self {
        let bs = config.block_size.max(1);
        let sliding = (0..c.num_layers)
            .filter(|&i| c.layer_window(i).is_some())
            .count();
        let full = c.num_layers - sliding;
        let per_block = |layers: usize| KvCache::bytes_per_token(layers, c.kv_dim(), dtype) * bs;
        let budget = config.kv_cache_bytes;
        let Some(window) = c.features.sliding_window.filter(|_| sliding > 0) else {
            return KvSizes {
                block_size: bs,
                num_blocks: (budget / per_block(full).max(1)).max(1),
                num_window_blocks: 0,
                window_ring: 0,
            };
        };
        let seqs = config.max_running_seqs.max(1);
        let ring = scheduler::WindowPool::ring_blocks(bs, window, config.max_batch_tokens.max(1));
        let share = budget / c.num_layers * sliding;
        let num_window_blocks = (share / per_block(sliding).max(1)).clamp(ring, seqs * ring);
        let rest = budget.saturating_sub(num_window_blocks * per_block(sliding));
        let num_blocks = if full == 0 {
            seqs * c.max_position_embeddings.div_ceil(bs)
        } else {
            (rest / per_block(full)).max(1)
        };
        KvSizes {
            block_size: bs,
            num_blocks,
            num_window_blocks,
            window_ring: ring,
        }
    }
}

/// A request in flight. Dropping it cancels the request.
pub struct Generation {
    id: u64,
    events: UnboundedReceiver<Event>,
    cached_tokens: Arc<AtomicUsize>,
    _permit: OwnedSemaphorePermit,
}

impl Generation {
    /// Prompt tokens whose KV came from the prefix cache (known once the request is admitted;
    /// 0 before).
    pub fn cached_tokens(&self) -> usize {
        self.cached_tokens.load(Ordering::Relaxed)
    }

    /// Engine-wide request id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event; `None` after the last one.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The next event, blocking the current thread (not for async contexts).
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.events.blocking_recv()
    }
}

/// Facts about the model that submitters need to validate requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelLimits {
    /// Longest sequence (prompt + generated).
    pub context_length: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Tokens the KV pool can hold.
    pub kv_capacity_tokens: usize,
    /// Sequences that run at once (llama.cpp's slots).
    pub max_running_seqs: usize,
}

/// Cheap-to-clone handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    commands: UnboundedSender<Command>,
    admission: Arc<Semaphore>,
    stats: watch::Receiver<EngineStats>,
    next_id: Arc<AtomicU64>,
    limits: ModelLimits,
    config: Arc<ModelConfig>,
    /// Loaded adapters by name. Submitting resolves the name here, so a sequence keeps its
    /// adapter even if it is unloaded while the sequence runs.
    adapters: Arc<RwLock<BTreeMap<String, Arc<LoraAdapter>>>>,
}

impl EngineHandle {
    /// Loads nothing: takes a loaded model and starts the engine thread.
    pub fn spawn(model: Model, config: EngineConfig) -> Result<Self, EngineError> {
        let c = model.config();
        let config_arc = Arc::new(c.clone());
        let sizes = KvSizes::new(c, model.kv_dtype(), &config);
        let num_blocks = sizes.num_blocks;
        let limits = ModelLimits {
            context_length: c.max_position_embeddings,
            vocab_size: c.vocab_size,
            kv_capacity_tokens: num_blocks * config.block_size,
            max_running_seqs: config.max_running_seqs.max(1),
        };
        let scheduler = SchedulerConfig {
            max_batch_tokens: config.max_batch_tokens.max(1),
            max_running_seqs: config.max_running_seqs.max(1),
        };
        let mut core = step::EngineCore::new(model, sizes, scheduler, config.speculative_tokens)
            .map_err(|e| EngineError::Model(format!("cannot start compute threads: {e}")))?;
        let (commands, mut rx) = unbounded_channel();
        let (stats_tx, stats) = watch::channel(core.stats());
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || 'outer: loop {
                if core.is_idle() {
                    match rx.blocking_recv() {
                        Some(Command::Submit(seq)) => core.add(seq),
                        None => break 'outer,
                    }
                }
                loop {
                    match rx.try_recv() {
                        Ok(Command::Submit(seq)) => core.add(seq),
                        Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                        Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                            if core.is_idle() {
                                break 'outer;
                            }
                            break;
                        }
                    }
                }
                core.step();
                let _ = stats_tx.send(core.stats());
            })
            .map_err(|e| EngineError::Model(format!("cannot start the engine thread: {e}")))?;
        Ok(EngineHandle {
            commands,
            admission: Arc::new(Semaphore::new(
                config.max_running_seqs.max(1) + config.max_waiting,
            )),
            stats,
            next_id: Arc::new(AtomicU64::new(0)),
            limits,
            config: config_arc,
            adapters: Arc::default(),
        })
    }

    /// The served model's hyper-parameters (adapters are checked against them).
    pub fn model_config(&self) -> &ModelConfig {
        &self.config
    }

    /// Makes `adapter` available under `name` to requests submitted from now on, replacing
    /// any adapter of that name (running requests keep the one they started with).
    pub fn load_adapter(&self, name: &str, adapter: LoraAdapter) {
        if let Ok(mut map) = self.adapters.write() {
            map.insert(name.to_string(), Arc::new(adapter));
        }
    }

    /// Removes an adapter; `false` if none had that name.
    pub fn unload_adapter(&self, name: &str) -> bool {
        self.adapters
            .write()
            .is_ok_and(|mut map| map.remove(name).is_some())
    }

    /// Names of the loaded adapters, sorted.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters
            .read()
            .map(|map| map.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether an adapter of that name is loaded.
    pub fn has_adapter(&self, name: &str) -> bool {
        self.adapters.read().is_ok_and(|map| map.contains_key(name))
    }

    /// What requests are validated against.
    pub fn limits(&self) -> &ModelLimits {
        &self.limits
    }

    /// Statistics as of the last step.
    pub fn stats(&self) -> EngineStats {
        self.stats.borrow().clone()
    }

    /// Queues a request. `Invalid` if it can never run, `Overloaded` when the queue is full,
    /// `Stopped` if the engine thread is gone.
    pub fn submit(&self, request: GenerateRequest) -> Result<Generation, EngineError> {
        let l = &self.limits;
        if request.prompt.is_empty() {
            return Err(EngineError::Invalid("the prompt is empty".into()));
        }
        if let Some(&bad) = request.prompt.iter().find(|&&t| t as usize >= l.vocab_size) {
            return Err(EngineError::Invalid(format!(
                "token id {bad} is outside the vocabulary (size {})",
                l.vocab_size
            )));
        }
        let total = request.prompt.len().saturating_add(request.max_new_tokens);
        if total > l.context_length {
            return Err(EngineError::Invalid(format!(
                "the prompt ({} tokens) plus max_new_tokens ({}) exceeds the context length ({})",
                request.prompt.len(),
                request.max_new_tokens,
                l.context_length
            )));
        }
        if total > l.kv_capacity_tokens {
            return Err(EngineError::Invalid(format!(
                "the prompt ({} tokens) plus max_new_tokens ({}) exceeds the KV cache ({} tokens)",
                request.prompt.len(),
                request.max_new_tokens,
                l.kv_capacity_tokens
            )));
        }
        if request.embed && request.max_new_tokens > 0 {
            return Err(EngineError::Invalid(
                "an embedding request generates no tokens (max_new_tokens 0)".into(),
            ));
        }
        if [request.top_logprobs, request.prompt_logprobs]
            .iter()
            .any(|n| n.is_some_and(|n| n > MAX_TOP_LOGPROBS))
        {
            return Err(EngineError::Invalid(format!(
                "at most {MAX_TOP_LOGPROBS} top log-probabilities"
            )));
        }
        let adapter = match &request.adapter {
            None => None,
            Some(name) => Some(
                self.adapters
                    .read()
                    .ok()
                    .and_then(|map| map.get(name).cloned())
                    .ok_or_else(|| EngineError::UnknownAdapter(name.clone()))?,
            ),
        };
        let permit = self
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| EngineError::Overloaded)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded_channel();
        let seq = sequence::Sequence::new(id, request, adapter, tx);
        let cached_tokens = seq.cached_tokens_report.clone();
        self.commands
            .send(Command::Submit(seq))
            .map_err(|_| EngineError::Stopped)?;
        Ok(Generation {
            id,
            events: rx,
            cached_tokens,
            _permit: permit,
        })
    }
}

/// Everything one request produced, collected (for the CLI, benchmarks and tests).
#[derive(Debug, Clone, PartialEq)]
pub struct Collected {
    /// Generated ids, ending with the stop token when it stopped on one.
    pub tokens: Vec<crate::model::TokenId>,
    /// Per token, when requested.
    pub logprobs: Vec<Option<TokenLogprob>>,
    /// Prompt tokens `1..`, when requested (else empty).
    pub prompt_logprobs: Vec<TokenLogprob>,
    /// The prompt's embedding, when requested (else empty).
    pub embedding: Vec<f32>,
    /// How it ended.
    pub finish: FinishReason,
    /// Token counts.
    pub usage: Usage,
}

impl Generation {
    /// Blocks until the request ends, calling `on_token` for each token as it arrives.
    pub fn blocking_collect(
        mut self,
        mut on_token: impl FnMut(crate::model::TokenId),
    ) -> Result<Collected, EngineError> {
        let mut tokens = Vec::new();
        let mut logprobs = Vec::new();
        let mut prompt_logprobs = Vec::new();
        let mut embedding = Vec::new();
        while let Some(ev) = self.blocking_next() {
            match ev {
                Event::PromptLogprobs(lps) => prompt_logprobs = lps,
                Event::Embedding(e) => embedding = e,
                Event::Token { id, logprob } => {
                    on_token(id);
                    tokens.push(id);
                    logprobs.push(logprob);
                }
                Event::Finished { reason, usage } => {
                    return Ok(Collected {
                        tokens,
                        logprobs,
                        prompt_logprobs,
                        embedding,
                        finish: reason,
                        usage,
                    })
                }
                Event::Failed(e) => return Err(e),
            }
        }
        Err(EngineError::Stopped)
    }
}

/// A small seeded random index source for tests' random walks: `rand(n)` in `0..n`
/// (xorshift64).
#[cfg(test)]
pub(crate) fn xorshift(mut seed: u64) -> impl FnMut(usize) -> usize {
    move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    }
}
