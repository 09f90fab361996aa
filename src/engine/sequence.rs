//! `Sequence`: everything about one request while the engine holds it, owned by the engine
//! thread alone. Finishing or cancelling a request is removing its `Sequence`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use crate::model::{LoraAdapter, TokenId};

use super::block_pool::{block_hashes, BlockHash};
use super::request::{Event, GenerateRequest, TokenLogprob};
use super::sampler::{log_softmax, top_logprobs, Sampler};

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
    /// Send the prompt's last hidden state instead of generating.
    pub embed: bool,
    /// Speculative decoding: guesses of the tokens after the last one, computed in this step
    /// after it and kept while sampling agrees with them (see `super::draft`). Empty outside
    /// a step that speculates.
    pub draft: Vec<TokenId>,
    /// Draft tokens to propose next time (adapted to how many were confirmed lately).
    pub draft_len: usize,
    /// Where events go; closed when the client dropped its `Generation`.
    pub events: UnboundedSender<Event>,
    /// Lower runs first ([`GenerateRequest::priority`]).
    pub priority: i32,
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
            embed: request.embed,
            priority: request.priority,
            draft: Vec::new(),
            draft_len: usize::MAX,
            events,
        }
    }

    /// Whether drafts may follow this sequence's next token: it is decoding (only its last
    /// sampled token is uncomputed) and nothing needs the tokens one at a time (a JSON
    /// constraint's state advances per token).
    pub fn can_speculate(&self) -> bool {
        self.num_uncomputed() == 1
            && self.num_generated() > 0
            && self.json.is_none()
            && self.prompt_logprobs.is_none()
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

    /// Samples this step's tokens from its logits `rows` (modified in place): the token after
    /// the last one from the first row, then, while each sampled token equals the draft whose
    /// row comes next, that row's token too. Every row is sampled as it would be alone in its
    /// own step (penalties count the tokens before it, the RNG draws once per token), so
    /// drafts change how many tokens a step yields, never which. `allowed`: a JSON
    /// constraint's allowed set for its state (JSON sequences have no drafts: one row).
    /// Returns the tokens, each with its log-probabilities if asked for; nothing is appended.
    pub fn pick(
        &mut self,
        rows: Vec<&mut Vec<f32>>,
        allowed: &[u64],
    ) -> Vec<(TokenId, Option<TokenLogprob>)> {
        let mut out: Vec<(TokenId, Option<TokenLogprob>)> = Vec::with_capacity(rows.len());
        for (r, row) in rows.into_iter().enumerate() {
            let logprob = self.top_logprobs.map(|n| (log_softmax(row), n));
            if let Some(c) = self.json.as_ref() {
                c.mask(row, &self.stop_token_ids, allowed);
            }
            let (prompt, generated) = self.tokens.split_at(self.num_prompt_tokens);
            let id = if out.is_empty() {
                self.sampler.sample(row, prompt, generated)
            } else {
                let so_far: Vec<TokenId> = generated
                    .iter()
                    .copied()
                    .chain(out.iter().map(|&(t, _)| t))
                    .collect();
                self.sampler.sample(row, prompt, &so_far)
            };
            if let Some(c) = self.json.as_mut() {
                c.advance(id);
            }
            let logprob = logprob.map(|(lp, n)| TokenLogprob {
                logprob: lp[id as usize],
                top: top_logprobs(&lp, n),
            });
            out.push((id, logprob));
            if self.draft.get(r) != Some(&id) {
                break;
            }
        }
        out
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampler::SamplingParams;

    fn sequence(sampling: SamplingParams, top: Option<usize>) -> Sequence {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let request = GenerateRequest {
            sampling,
            top_logprobs: top,
            ..GenerateRequest::greedy(vec![1, 2, 3, 4, 5, 3], 100)
        };
        let mut seq = Sequence::new(0, request, None, tx);
        seq.tokens.push(6);
        seq
    }

    /// Pseudo-random logits over a vocabulary of 12 with small margins, so penalties decide.
    fn rows(seed: u64, n: usize) -> Vec<Vec<f32>> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                (0..12)
                    .map(|_| {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        (s % 1000) as f32 / 1000.0
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn drafted_rows_give_exactly_the_tokens_of_one_row_per_step() {
        let settings = [
            SamplingParams::greedy(),
            SamplingParams {
                frequency_penalty: 0.3,
                presence_penalty: 0.1,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                repetition_penalty: 1.5,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                temperature: 0.7,
                top_k: 6,
                frequency_penalty: 0.2,
                seed: Some(5),
                ..Default::default()
            },
        ];
        let mut multi = 0;
        for (s, sampling) in settings.iter().enumerate() {
            for case in 0..200u64 {
                let logits = rows(case * 7 + s as u64, 5);
                // One row per step: what plain decoding does with these logits.
                let mut plain = sequence(sampling.clone(), Some(2));
                let mut steps = Vec::new();
                for row in &logits {
                    let mut row = row.clone();
                    let out = plain.pick(vec![&mut row], &[]);
                    assert_eq!(out.len(), 1, "no drafts, one token");
                    plain.tokens.push(out[0].0);
                    steps.push(out[0].clone());
                }
                // Drafts: the plain tokens, one of them (or none) wrong.
                let wrong = (case % 6) as usize;
                let mut spec = sequence(sampling.clone(), Some(2));
                spec.draft = steps[..4].iter().map(|(t, _)| *t).collect();
                if let Some(t) = spec.draft.get_mut(wrong) {
                    *t = (*t + 1) % 12;
                }
                let mut copies = logits.clone();
                let out = spec.pick(copies.iter_mut().collect(), &[]);
                // Kept: up to and including the row after the first wrong draft.
                let kept = (wrong + 1).min(5);
                assert_eq!(out, steps[..kept], "setting {s}, case {case}");
                multi += usize::from(kept > 1);
            }
        }
        assert!(multi > 500);
    }
}
