//! `EngineCore`: one step of continuous batching. (draft) → schedule → one forward over the
//! ragged batch → sample → emit → finish. Owns the model, the KV cache, the block pool and every
//! sequence; runs on the engine thread only.

use std::collections::HashMap;
use std::time::Instant;

use crate::model::{ForwardBatch, KvCache, Model, TokenId};

use super::block_pool::BlockPool;
use super::json_mode::MaskKey;
use super::request::{EngineError, Event, FinishReason, TokenLogprob, Usage};
use super::sampler::{log_softmax, top_logprobs};
use super::scheduler::{ScheduledBatch, Scheduler, SchedulerConfig, WindowPool};
use super::sequence::Sequence;
use super::EngineStats;

/// The engine's state and its step.
pub struct EngineCore {
    model: Model,
    kv: KvCache,
    pool: BlockPool,
    scheduler: Scheduler,
    stats: EngineStats,
    /// Compute threads. The forward runs *inside* the pool, so the engine thread sleeps while
    /// it computes instead of competing with spinning workers for the cores.
    threads: rayon::ThreadPool,
    /// JSON mode: the tokens each recogniser state allows, per token table and grammar, remembered
    /// (trying every token's bytes takes milliseconds; generation keeps returning to the same
    /// few states).
    json_masks: HashMap<MaskKey, Vec<u64>>,
    /// Draft tokens per decoding sequence and step (0: no speculative decoding).
    speculate: usize,
}

/// How much longer a sequence's next draft may be after all of its draft was confirmed.
const ADAPT_STEP: usize = 2;

/// JSON-mode states remembered before the memo starts over (6 KB each for a 49k vocabulary).
const MAX_JSON_MASKS: usize = 2048;

impl EngineCore {
    /// A core with KV pools of the given sizes.
    pub fn new(
        model: Model,
        sizes: super::KvSizes,
        config: SchedulerConfig,
        speculate: usize,
    ) -> std::result::Result<Self, rayon::ThreadPoolBuildError> {
        let super::KvSizes {
            block_size,
            num_blocks,
            num_window_blocks,
            window_ring,
        } = sizes;
        let kv = model.new_kv_cache_windowed(num_blocks, num_window_blocks, block_size);
        let scheduler = if num_window_blocks > 0 {
            Scheduler::with_window(
                config,
                WindowPool {
                    pool: BlockPool::new(num_window_blocks, block_size),
                    ring: window_ring,
                },
            )
        } else {
            Scheduler::new(config)
        };
        let threads = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("compute-{i}"))
            .build()?;
        Ok(EngineCore {
            threads,
            json_masks: HashMap::new(),
            speculate,
            model,
            kv,
            pool: BlockPool::new(num_blocks, block_size),
            scheduler,
            stats: EngineStats {
                kv_blocks_total: num_blocks,
                kv_window_blocks_total: num_window_blocks,
                ..Default::default()
            },
        })
    }

    /// Queues a sequence.
    pub fn add(&mut self, seq: Sequence) {
        self.scheduler.add(seq);
    }

    /// Nothing queued or running.
    pub fn is_idle(&self) -> bool {
        self.scheduler.is_idle()
    }

    /// Counters and gauges as of the last step.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            num_running: self.scheduler.running.len(),
            num_waiting: self.scheduler.waiting.len(),
            kv_blocks_used: self.pool.num_used(),
            kv_window_blocks_used: self
                .scheduler
                .window
                .as_ref()
                .map_or(0, |w| w.pool.num_used()),
            ..self.stats.clone()
        }
    }

    /// Runs one step. Model errors fail the sequences of that step; the engine goes on.
    pub fn step(&mut self) {
        let cancelled = self.scheduler.reap_cancelled(&mut self.pool);
        self.stats.num_cancelled += cancelled as u64;
        self.propose_drafts();
        let batch = self.scheduler.schedule(&mut self.pool);
        self.stats.num_preempted += batch.preempted.len() as u64;
        self.stats.prefix_cache_queries_total += batch.prefix_queried_tokens as u64;
        self.stats.prefix_cache_hits_total += batch.prefix_hit_tokens as u64;
        if batch.items.is_empty() {
            return;
        }
        let started = Instant::now();
        let forward = self.forward_batch(&batch);
        let (model, kv) = (&self.model, &mut self.kv);
        match self
            .threads
            .install(|| model.forward_with_hidden(&forward, kv))
        {
            Ok((logits, hidden)) => match logits.to_vec2::<f32>() {
                Ok(rows) => self.sample_and_emit(&batch, rows, &hidden),
                Err(e) => self.fail(&batch, &e.to_string()),
            },
            Err(e) => self.fail(&batch, &e.to_string()),
        }
        for seq in &mut self.scheduler.running {
            seq.draft.clear();
        }
        self.stats.num_steps += 1;
        self.stats.last_step_seconds = started.elapsed().as_secs_f64();
    }

    /// Speculative decoding: drafts for the decoding sequences while few run (see
    /// [`super::draft`]), at most what they may still generate.
    fn propose_drafts(&mut self) {
        let running = &mut self.scheduler.running;
        if self.speculate == 0
            || self.scheduler.window.is_some()
            || running.len() > super::SPECULATE_MAX_RUNNING
        {
            return;
        }
        let context = self.model.config().max_position_embeddings;
        for seq in running.iter_mut().filter(|s| s.can_speculate()) {
            // The step yields at most drafts + 1 tokens, each at a position below the context.
            let room = (seq.max_new_tokens.saturating_sub(seq.num_generated()))
                .min(context.saturating_sub(seq.tokens.len()))
                .saturating_sub(1);
            let len = seq.draft_len.min(self.speculate);
            seq.draft = super::draft::ngram_draft(&seq.tokens, len.min(room));
        }
    }

    fn forward_batch(&self, batch: &ScheduledBatch) -> ForwardBatch {
        let bs = self.pool.block_size();
        let mut fb = ForwardBatch {
            window_ring: self.scheduler.window.as_ref().map_or(0, |w| w.ring),
            ..Default::default()
        };
        for item in &batch.items {
            let seq = &self.scheduler.running[item.index];
            let start = seq.num_computed_tokens;
            let end = start + item.num_tokens - seq.draft.len();
            if seq.draft.is_empty() {
                fb.push_seq(&seq.tokens[start..end], start, &seq.block_table, bs);
            } else {
                let tokens: Vec<TokenId> = seq.tokens[start..end]
                    .iter()
                    .chain(&seq.draft)
                    .copied()
                    .collect();
                fb.push_seq(&tokens, start, &seq.block_table, bs);
            }
            if let Some(span) = fb.seqs.last_mut() {
                // Drafts are checked against the logits of every row.
                span.all_logits = seq.wants_prompt_logits() || !seq.draft.is_empty();
                span.adapter = seq.adapter.clone();
                span.window_table.clone_from(&seq.window_table);
            }
        }
        fb
    }

    /// `rows`: the step's logits rows; `hidden`: the same rows' final hidden states.
    fn sample_and_emit(&mut self, batch: &ScheduledBatch, mut rows: Vec<Vec<f32>>, hidden: &[f32]) {
        let context = self.model.config().max_position_embeddings;
        let width = self.model.config().hidden_size;
        // Bookkeeping first (prompt log-probabilities included); then the sequences whose
        // prompt is done sample, each with its own sampler and RNG, in parallel (a
        // temperature's softmax over the vocabulary is ~0.1 ms per sequence); then tokens and
        // finishes go out in batch order.
        // The logits rows each sequence that samples this step samples from, in order: its last
        // row, or its token's and its drafts' rows.
        let mut rows_of: Vec<Option<std::ops::Range<usize>>> =
            vec![None; self.scheduler.running.len()];
        let mut finished = Vec::new();
        // Each item's logits rows (all of its rows for prompt log-probabilities or drafts, else
        // its last); prompt log-probabilities are recorded first.
        let mut first_row = 0;
        let mut item_rows = Vec::with_capacity(batch.items.len());
        for item in &batch.items {
            let seq = &self.scheduler.running[item.index];
            let n = if seq.wants_prompt_logits() || !seq.draft.is_empty() {
                item.num_tokens
            } else {
                1
            };
            item_rows.push(first_row..first_row + n);
            first_row += n;
        }
        self.record_prompt_logprobs(batch, &item_rows, &rows);
        for (item, span) in batch.items.iter().zip(&item_rows) {
            let seq = &mut self.scheduler.running[item.index];
            let before = seq.num_computed_tokens;
            // Drafts count as computed once sampling confirms them (below).
            seq.num_computed_tokens += item.num_tokens - seq.draft.len();
            if self.scheduler.window.is_none() {
                Scheduler::register_full_blocks(seq, &mut self.pool);
            }
            let p = seq.num_prompt_tokens;
            self.stats.prompt_tokens_total +=
                (seq.num_computed_tokens.min(p) - before.min(p)) as u64;
            // A prefill chunk that does not reach the end of the prompt samples nothing.
            if seq.num_uncomputed() > 0 {
                continue;
            }
            if let Some(top) = seq.prompt_logprobs.take() {
                let lps = std::mem::take(&mut seq.prompt_lps);
                let lps = lps.into_iter().skip(1).map(|lp| {
                    lp.unwrap_or_else(|| {
                        debug_assert!(false, "prompt log-probability missing ({top} wanted)");
                        TokenLogprob {
                            logprob: f32::NAN,
                            top: Vec::new(),
                        }
                    })
                });
                let _ = seq.events.send(Event::PromptLogprobs(lps.collect()));
            }
            if seq.embed {
                // Last-token pooling: the prompt's last row.
                let at = (span.end - 1) * width;
                if let Some(h) = hidden.get(at..at + width) {
                    let _ = seq.events.send(Event::Embedding(h.to_vec()));
                }
            }
            if seq.num_generated() >= seq.max_new_tokens {
                // Nothing to generate (`max_new_tokens` 0): the prompt was the work.
                let usage = Usage {
                    prompt_tokens: seq.num_prompt_tokens,
                    completion_tokens: 0,
                    cached_tokens: seq.num_cached_tokens,
                };
                let _ = seq.events.send(Event::Finished {
                    reason: FinishReason::Length,
                    usage,
                });
                finished.push(item.index);
                continue;
            }
            rows_of[item.index] = Some(if seq.draft.is_empty() {
                span.end - 1..span.end
            } else {
                span.clone()
            });
        }
        self.remember_json_masks(&rows_of);
        let masks = &self.json_masks;
        let mut rows_left: Vec<Option<&mut Vec<f32>>> = rows.iter_mut().map(Some).collect();
        let work: Vec<(usize, &mut Sequence, Vec<&mut Vec<f32>>)> = self
            .scheduler
            .running
            .iter_mut()
            .enumerate()
            .filter_map(|(i, seq)| {
                let rows: Option<Vec<_>> = rows_of[i]
                    .clone()?
                    .map(|r| rows_left.get_mut(r)?.take())
                    .collect();
                Some((i, seq, rows?))
            })
            .collect();
        let pick = |(i, seq, rows): (usize, &mut Sequence, Vec<&mut Vec<f32>>)| {
            let allowed = seq
                .json
                .as_ref()
                .and_then(|c| masks.get(&c.key()?))
                .map_or(&[][..], Vec::as_slice);
            (i, seq.pick(rows, allowed))
        };
        // A lone sequence samples here: waking the pool would cost more than it saves.
        type Picked = Vec<(TokenId, Option<TokenLogprob>)>;
        let sampled: Vec<(usize, Picked)> = if work.len() > 1 {
            use rayon::prelude::*;
            self.threads
                .install(|| work.into_par_iter().map(pick).collect())
        } else {
            work.into_iter().map(pick).collect()
        };
        let mut picked: Vec<Option<Picked>> = vec![None; self.scheduler.running.len()];
        for (i, out) in sampled {
            picked[i] = Some(out);
        }
        for item in &batch.items {
            let Some(out) = picked[item.index].take() else {
                continue;
            };
            let seq = &mut self.scheduler.running[item.index];
            // Every token but the last was a draft whose KV this step computed.
            let confirmed = out.len().saturating_sub(1);
            self.stats.spec_draft_tokens_total += seq.draft.len() as u64;
            self.stats.spec_accepted_tokens_total += confirmed as u64;
            if !seq.draft.is_empty() {
                // Longer drafts after a run of confirmations, shorter after refusals: rows
                // of refused drafts are work thrown away.
                seq.draft_len = if confirmed == seq.draft.len() {
                    confirmed.saturating_add(ADAPT_STEP)
                } else {
                    confirmed + 1
                };
            }
            let mut reason = None;
            for (id, logprob) in out {
                seq.tokens.push(id);
                self.stats.generation_tokens_total += 1;
                let _ = seq.events.send(Event::Token { id, logprob });
                reason = Self::finish_reason(seq, id, context);
                if reason.is_some() {
                    break;
                }
            }
            if reason.is_none() && confirmed > 0 {
                seq.num_computed_tokens += confirmed;
                if self.scheduler.window.is_none() {
                    Scheduler::register_full_blocks(seq, &mut self.pool);
                }
            }
            if let Some(reason) = reason {
                let usage = Usage {
                    prompt_tokens: seq.num_prompt_tokens,
                    completion_tokens: seq.num_generated(),
                    cached_tokens: seq.num_cached_tokens,
                };
                let _ = seq.events.send(Event::Finished { reason, usage });
                finished.push(item.index);
            }
        }
        self.remove(finished);
    }

    /// Why `seq` finishes with its newest token `id`, if it does.
    fn finish_reason(seq: &Sequence, id: TokenId, context: usize) -> Option<FinishReason> {
        if seq.stop_token_ids.contains(&id) {
            Some(FinishReason::StopToken(id))
        } else if seq.num_generated() >= seq.max_new_tokens
            || seq.tokens.len() >= context
            // A complete JSON object with no stop token to end on.
            || seq.json.as_ref().is_some_and(|c| c.is_done()) && seq.stop_token_ids.is_empty()
        {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    /// Makes sure the memo holds the allowed set of every sampling JSON-mode sequence's state
    /// (`rows_of`: the sequences that sample this step); new sets are computed on the pool.
    fn remember_json_masks(&mut self, rows_of: &[Option<std::ops::Range<usize>>]) {
        let mut missing: Vec<(MaskKey, &super::json_mode::JsonConstraint)> = Vec::new();
        for (seq, _) in self
            .scheduler
            .running
            .iter()
            .zip(rows_of)
            .filter(|(_, r)| r.is_some())
        {
            if let Some((c, key)) = seq.json.as_ref().and_then(|c| Some((c, c.key()?))) {
                if !self.json_masks.contains_key(&key) && !missing.iter().any(|(k, _)| *k == key) {
                    missing.push((key, c));
                }
            }
        }
        if missing.is_empty() {
            return;
        }
        if self.json_masks.len() + missing.len() > MAX_JSON_MASKS {
            self.json_masks.clear();
        }
        let sets: Vec<(MaskKey, Vec<u64>)> = {
            use rayon::prelude::*;
            self.threads.install(|| {
                missing
                    .par_iter()
                    .map(|(k, c)| (k.clone(), c.allowed()))
                    .collect()
            })
        };
        self.json_masks.extend(sets);
    }

    /// Stores the log-probabilities of the prompt tokens this step's rows predict, for the
    /// sequences that asked for them (`item_rows`: each item's logits rows; row `i` of an
    /// item sits at position `num_computed_tokens + i` and predicts the token after it).
    fn record_prompt_logprobs(
        &mut self,
        batch: &ScheduledBatch,
        item_rows: &[std::ops::Range<usize>],
        rows: &[Vec<f32>],
    ) {
        // (sequence, position predicted, its token, logits row, alternatives)
        let mut work = Vec::new();
        for (item, span) in batch.items.iter().zip(item_rows) {
            let seq = &self.scheduler.running[item.index];
            let Some(top) = seq.prompt_logprobs else {
                continue;
            };
            for (i, r) in span.clone().enumerate() {
                let k = seq.num_computed_tokens + i + 1;
                if k < seq.num_prompt_tokens {
                    work.push((item.index, k, seq.tokens[k], r, top));
                }
            }
        }
        if work.is_empty() {
            return;
        }
        let score = |&(s, k, id, r, top): &(usize, usize, TokenId, usize, usize)| {
            let lp = log_softmax(&rows[r]);
            let entry = TokenLogprob {
                logprob: lp[id as usize],
                top: top_logprobs(&lp, top),
            };
            (s, k, entry)
        };
        let scored: Vec<(usize, usize, TokenLogprob)> = {
            use rayon::prelude::*;
            self.threads
                .install(|| work.par_iter().map(score).collect())
        };
        for (s, k, entry) in scored {
            if let Some(slot) = self.scheduler.running[s].prompt_lps.get_mut(k) {
                *slot = Some(entry);
            }
        }
    }

    fn fail(&mut self, batch: &ScheduledBatch, message: &str) {
        tracing::error!(message, "model step failed");
        let mut indices = Vec::new();
        for item in &batch.items {
            let seq = &self.scheduler.running[item.index];
            let _ = seq
                .events
                .send(Event::Failed(EngineError::Model(message.to_string())));
            indices.push(item.index);
        }
        self.remove(indices);
    }

    fn remove(&mut self, mut indices: Vec<usize>) {
        indices.sort_unstable();
        for i in indices.into_iter().rev() {
            self.scheduler.finish(i, &mut self.pool);
        }
    }

    /// Blocks in use (for tests: all free again once everything has ended).
    pub fn num_used_blocks(&self) -> usize {
        self.pool.num_used()
            + self
                .scheduler
                .window
                .as_ref()
                .map_or(0, |w| w.pool.num_used())
    }

    /// The model (read-only).
    pub fn model(&self) -> &Model {
        &self.model
    }
}
