//! `Sequence`: everything about one request while the engine holds it, owned by the engine
//! thread alone. Finishing or cancelling a request is removing its `Sequence`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use crate::model::{LoraAdapter, TokenId};

use super::block_pool::{block_hashes, BlockHash};
use super::request::{Event, GenerateRequest, TokenLogprob};
use super::sampler::Sampler;

/// One request's state.
pub struct Sequence {
    /// Engine-wide id, in arrival order.
    pub id: u64,
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<TokenId>,
    /// Length of the prompt within `tokens`.
    pub num_prompt_tokens: usize,
    /// Tokens whose K/V are in the cache (the rest is computed in coming steps).
    pub num_computed_tokens: usize,
    /// KV blocks holding positions `0..num_computed_tokens` (and room for the next tokens).
    pub block_table: Vec<u32>,
    /// Sliding-window layers: blocks of the window pool, used as a ring (see
    /// `model::SeqSpan::window_table`).
    pub window_table: Vec<u32>,
    /// Names of this sequence's full blocks so far (prefix caching), in order.
    pub block_hashes: Vec<BlockHash>,
    /// Leading entries of `block_table` already named in the pool.
    pub num_registered_blocks: usize,
    /// Prompt tokens whose KV came from the prefix cache at admission.
    pub num_cached_tokens: usize,
    /// `num_cached_tokens`, readable by the client's `Generation`.
    pub cached_tokens_report: Arc<AtomicUsize>,
    /// Seeds the block names: requests on different adapters never share KV.
    pub cache_salt: u64,
    /// The adapter this sequence runs with (`None`: the base model).
    pub adapter: Option<Arc<LoraAdapter>>,
    /// Upper bound on generated tokens.
    pub max_new_tokens: usize,
    /// Token ids that finish the request.
    pub stop_token_ids: Vec<TokenId>,
    /// Alternatives to report with each token, if any.
    pub top_logprobs: Option<usize>,
    /// Alternatives to report with each prompt token, if prompt log-probabilities were asked
    /// for and are not sent yet (`None` once sent).
    pub prompt_logprobs: Option<usize>,
    /// Prompt log-probabilities computed so far, by position (position 0 has none).
    pub prompt_lps: Vec<Option<TokenLogprob>>,
    /// Seeded sampler; its RNG advances only when this sequence samples.
    pub sampler: Sampler,
    /// JSON mode's state, when asked for.
    pub json: Option<super::json_mode::JsonConstraint>,
    /// Where events go; closed when the client dropped its `Generation`.
    pub events: UnboundedSender<Event>,
}

impl Sequence {
    /// Wraps a validated request.
    pub fn new(
        id: u64,
        request: GenerateRequest,
        adapter: Option<Arc<LoraAdapter>>,
        events: UnboundedSender<Event>,
    ) -> Self {
        let num_prompt_tokens = request.prompt.len();
        let mut tokens = request.prompt;
        tokens.reserve(request.max_new_tokens);
        Sequence {
            id,
            tokens,
            num_prompt_tokens,
            num_computed_tokens: 0,
            block_table: Vec::new(),
            window_table: Vec::new(),
            block_hashes: Vec::new(),
            num_registered_blocks: 0,
            num_cached_tokens: 0,
            cached_tokens_report: Arc::new(AtomicUsize::new(0)),
            // Salted by the load, not the name: a reloaded adapter never reuses old KV.
            cache_salt: adapter.as_ref().map_or(0, |a| {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                a.id().hash(&mut h);
                h.finish() | 1
            }),
            adapter,
            max_new_tokens: request.max_new_tokens,
            stop_token_ids: request.stop_token_ids,
            top_logprobs: request.top_logprobs,
            prompt_logprobs: request.prompt_logprobs,
            prompt_lps: if request.prompt_logprobs.is_some() {
                vec![None; num_prompt_tokens]
            } else {
                Vec::new()
            },
            sampler: Sampler::new(request.sampling),
            json: request.json,
            events,
        }
    }

    /// Names of the full blocks among the first `tokens` tokens, extending the stored chain.
    pub fn hashes_up_to(&mut self, tokens: usize, block_size: usize) -> &[BlockHash] {
        let full = tokens.min(self.tokens.len()) / block_size;
        if full > self.block_hashes.len() {
            let done = self.block_hashes.len();
            let salt = self.block_hashes.last().copied().unwrap_or(self.cache_salt);
            let more = block_hashes(
                &self.tokens[done * block_size..full * block_size],
                block_size,
                salt,
            );
            self.block_hashes.extend(more);
        }
        &self.block_hashes[..full]
    }

    /// Records the prompt tokens served from the prefix cache.
    pub fn set_cached_tokens(&mut self, n: usize) {
        self.num_cached_tokens = n;
        self.cached_tokens_report.store(n, Ordering::Relaxed);
    }

    /// Whether this step's rows need logits for prompt log-probabilities.
    pub fn wants_prompt_logits(&self) -> bool {
        self.prompt_logprobs.is_some()
    }

    /// Tokens not yet in the cache.
    pub fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed_tokens
    }

    /// Generated tokens so far.
    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.num_prompt_tokens
    }

    /// Whether the client has gone away.
    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// The prompt part of `tokens`.
    pub fn prompt(&self) -> &[TokenId] {
        &self.tokens[..self.num_prompt_tokens]
    }

    /// The generated part of `tokens`.
    pub fn generated(&self) -> &[TokenId] {
        &self.tokens[self.num_prompt_tokens..]
    }
}
