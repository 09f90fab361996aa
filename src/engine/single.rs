//! One sequence, generated to the end: prefill the prompt in chunks, then decode token by
//! token. The reference path that batched serving must agree with, and what `generate` runs.

use std::time::{Duration, Instant};

use crate::model::{ForwardBatch, Model, TokenId};

use super::sampler::{Sampler, SamplingParams};

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token (EOS) was generated; it is the last output id.
    Stop,
    /// `max_new_tokens` or the context length was reached.
    Length,
}

impl FinishReason {
    /// OpenAI spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Upper bound on new tokens.
    pub max_new_tokens: usize,
    /// Token ids that end generation (EOS), unless empty.
    pub stop_token_ids: Vec<TokenId>,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Prompt tokens per forward during prefill.
    pub prefill_chunk: usize,
    /// Tokens per KV block.
    pub block_size: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            stop_token_ids: Vec::new(),
            sampling: SamplingParams::greedy(),
            prefill_chunk: 512,
            block_size: 16,
        }
    }
}

/// The result of [`generate`].
#[derive(Debug, Clone)]
pub struct Generated {
    /// New token ids (ending with the stop token when `finish_reason` is `Stop`).
    pub output_ids: Vec<TokenId>,
    /// Log-softmax of the logits at each generated position (before penalties).
    pub logprobs: Vec<Vec<f32>>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Time spent on the prompt (including the first sampled token).
    pub prefill_time: Duration,
    /// Time spent on the remaining tokens.
    pub decode_time: Duration,
}

/// Generates from `prompt`, calling `on_token` for each new id as soon as it is sampled.
/// `keep_logprobs` stores the full log-softmax per step (for tests against references).
pub fn generate(
    model: &Model,
    prompt: &[TokenId],
    opts: &GenerateOptions,
    keep_logprobs: bool,
    mut on_token: impl FnMut(TokenId),
) -> candle_core::Result<Generated> {
    let context = model.config().max_position_embeddings;
    if prompt.is_empty() {
        candle_core::bail!("the prompt is empty");
    }
    if prompt.len() >= context {
        candle_core::bail!(
            "the prompt ({} tokens) fills the context ({context})",
            prompt.len()
        );
    }
    let max_new = opts.max_new_tokens.min(context - prompt.len());
    let total = prompt.len() + max_new;
    let bs = opts.block_size.max(1);
    let num_blocks = total.div_ceil(bs).max(1);
    let mut kv = model.new_kv_cache(num_blocks, bs);
    let block_table: Vec<u32> = (0..num_blocks as u32).collect();
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut out = Vec::with_capacity(max_new);
    let mut logprobs = Vec::new();
    let start = Instant::now();
    let mut prefill_time = Duration::ZERO;
    let mut pending: Vec<TokenId> = prompt.to_vec();
    let mut pos = 0usize;
    let mut finish = FinishReason::Length;
    while out.len() < max_new {
        // Prefill in chunks; only the last chunk's logits are used.
        let chunk = pending.len().min(opts.prefill_chunk.max(1));
        let mut batch = ForwardBatch::default();
        batch.push_seq(&pending[..chunk], pos, &block_table, bs);
        let logits = model.forward(&batch, &mut kv)?;
        pos += chunk;
        pending.drain(..chunk);
        if !pending.is_empty() {
            continue;
        }
        let mut row = logits.squeeze(0)?.to_vec1::<f32>()?;
        if keep_logprobs {
            logprobs.push(super::sampler::log_softmax(&row));
        }
        let id = sampler.sample(&mut row, prompt, &out);
        out.push(id);
        if out.len() == 1 {
            prefill_time = start.elapsed();
        }
        on_token(id);
        if opts.stop_token_ids.contains(&id) {
            finish = FinishReason::Stop;
            break;
        }
        pending.push(id);
    }
    Ok(Generated {
        output_ids: out,
        logprobs,
        finish_reason: finish,
        prefill_time,
        decode_time: start.elapsed().saturating_sub(prefill_time),
    })
}
