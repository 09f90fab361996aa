//! `Scheduler`: decides which tokens of which sequences run in the next step.
//!
//! Tokens, not phases (vLLM v1): every sequence has `num_computed_tokens` catching up with
//! `tokens.len()`; a step gives running sequences their tokens first (1 when decoding, followed
//! by its draft tokens when speculating; a chunk when prefilling), then admits waiting ones,
//! all under one token budget. When KV blocks run out, the newest running sequence is
//! preempted: its blocks are freed and it is recomputed later from its tokens. The result is
//! plain data ([`ScheduledBatch`]); no tensors here.
//!
//! Priorities (vLLM's: lower runs first, 0 by default) order everything by `(priority, id)`
//! (ids grow with arrival): the waiting queue, the running sequences' claim on the budget, and
//! preemption, which takes the least urgent running sequence (the newest of them) — also to
//! admit a waiting sequence more urgent than it. With one priority this is first come, first
//! served, the newest preempted first.

use std::collections::VecDeque;

use std::collections::HashSet;

use super::block_pool::{BlockHash, BlockPool};
use super::sequence::Sequence;

/// Limits of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Tokens per step over all sequences (prefill chunks + decode tokens).
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running_seqs: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batch_tokens: 512,
            max_running_seqs: 64,
        }
    }
}

/// One sequence's share of a step: its next `num_tokens` uncomputed tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    /// Index into [`Scheduler::running`].
    pub index: usize,
    /// Tokens to compute this step.
    pub num_tokens: usize,
}

/// What the next step computes, in row order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ScheduledBatch {
    /// Per sequence.
    pub items: Vec<Scheduled>,
    /// Sequences preempted while scheduling (their ids).
    pub preempted: Vec<u64>,
    /// Tokens of admitted sequences looked up in the prefix cache.
    pub prefix_queried_tokens: usize,
    /// Of those, tokens found (their KV is reused, not computed).
    pub prefix_hit_tokens: usize,
}

impl ScheduledBatch {
    /// Total tokens of the step.
    pub fn num_tokens(&self) -> usize {
        self.items.iter().map(|s| s.num_tokens).sum()
    }
}

/// The sliding-window layers' own block pool. Each sequence holds at most `ring` of its
/// blocks, reused in turn as positions move on.
pub struct WindowPool {
    /// The blocks.
    pub pool: BlockPool,
    /// Blocks per sequence: enough for the window plus one step's tokens, so no key a row
    /// of the step attends is overwritten by another row of the same step.
    pub ring: usize,
}

impl WindowPool {
    /// The positions a step reads span `window + step - 1` tokens; the ring holds more than
    /// that, whatever their alignment to blocks.
    pub fn ring_blocks(block_size: usize, window: usize, max_step_tokens: usize) -> usize {
        (window + max_step_tokens)
            .saturating_sub(2)
            .div_ceil(block_size)
            + 1
    }
}

/// Waiting and running sequences.
pub struct Scheduler {
    config: SchedulerConfig,
    /// Present when the model has sliding-window layers; prefix caching is then off (the
    /// window pool's contents are per sequence).
    pub window: Option<WindowPool>,
    /// Not started, or preempted; by `(priority, id)`.
    pub waiting: VecDeque<Sequence>,
    /// Holding KV blocks; sorted by `(priority, id)` at the start of each step (the least
    /// urgent, newest last).
    pub running: Vec<Sequence>,
}

impl Scheduler {
    /// An empty scheduler.
    pub fn new(config: SchedulerConfig) -> Self {
        Scheduler {
            config,
            window: None,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    /// A scheduler whose sequences also hold blocks of a window pool.
    pub fn with_window(config: SchedulerConfig, window: WindowPool) -> Self {
        Scheduler {
            window: Some(window),
            ..Self::new(config)
        }
    }

    /// Frees every block `seq` holds, in both pools.
    fn release(seq: &mut Sequence, pool: &mut BlockPool, window: &mut Option<WindowPool>) {
        pool.release(&seq.block_table);
        seq.block_table.clear();
        seq.draft.clear();
        if let Some(w) = window {
            w.pool.release(&seq.window_table);
        }
        seq.window_table.clear();
    }

    /// Allocates what `seq` needs to hold `tokens` tokens, in both pools, or nothing.
    fn grow(
        seq: &mut Sequence,
        tokens: usize,
        pool: &mut BlockPool,
        window: &mut Option<WindowPool>,
    ) -> bool {
        let need = pool
            .blocks_for(tokens)
            .saturating_sub(seq.block_table.len());
        let Some(blocks) = pool.allocate(need) else {
            return false;
        };
        if let Some(w) = window {
            let want = w.pool.blocks_for(tokens).min(w.ring);
            let need = want.saturating_sub(seq.window_table.len());
            let Some(more) = w.pool.allocate(need) else {
                pool.release(&blocks);
                return false;
            };
            seq.window_table.extend(more);
        }
        seq.block_table.extend(blocks);
        true
    }

    /// Queues a sequence in `(priority, id)` order (a new one behind every other of its
    /// priority; a preempted one ahead of those that came after it).
    pub fn add(&mut self, seq: Sequence) {
        let key = (seq.priority, seq.id);
        let at = self.waiting.partition_point(|s| (s.priority, s.id) < key);
        self.waiting.insert(at, seq);
    }

    /// Nothing to do.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Removes sequences whose client went away; returns how many.
    pub fn reap_cancelled(&mut self, pool: &mut BlockPool) -> usize {
        let before = self.waiting.len() + self.running.len();
        let window = &mut self.window;
        let mut keep = |s: &mut Sequence| {
            // Checked once: the client may go away between two checks.
            let cancelled = s.is_cancelled();
            if cancelled {
                Self::release(s, pool, window);
            }
            !cancelled
        };
        self.running.retain_mut(&mut keep);
        self.waiting.retain_mut(&mut keep);
        before - self.waiting.len() - self.running.len()
    }

    /// Removes running sequence `index` and frees its blocks.
    pub fn finish(&mut self, index: usize, pool: &mut BlockPool) -> Sequence {
        let mut seq = self.running.remove(index);
        Self::release(&mut seq, pool, &mut self.window);
        seq
    }

    /// Preempts the last running sequence (the least urgent, newest: `running` is sorted).
    fn preempt_newest(&mut self, pool: &mut BlockPool) -> Option<u64> {
        let mut seq = self.running.pop()?;
        Self::release(&mut seq, pool, &mut self.window);
        seq.num_computed_tokens = 0;
        seq.num_registered_blocks = 0;
        let id = seq.id;
        self.add(seq);
        Some(id)
    }

    /// Plans the next step, allocating the KV blocks it needs.
    pub fn schedule(&mut self, pool: &mut BlockPool) -> ScheduledBatch {
        let mut batch = ScheduledBatch::default();
        // The most urgent claim the budget first; the least urgent are preempted first.
        self.running.sort_by_key(|s| (s.priority, s.id));
        let mut budget = self.config.max_batch_tokens;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &mut self.running[i];
            // A decoding sequence's drafts (if any) follow its token, as far as the budget goes.
            let n = (seq.num_uncomputed() + seq.draft.len()).min(budget);
            seq.draft.truncate(n.saturating_sub(seq.num_uncomputed()));
            if n == 0 {
                i += 1;
                continue;
            }
            let tokens = seq.num_computed_tokens + n;
            match Self::grow(&mut self.running[i], tokens, pool, &mut self.window) {
                true => {
                    batch.items.push(Scheduled {
                        index: i,
                        num_tokens: n,
                    });
                    budget -= n;
                    i += 1;
                }
                false if !self.running[i].draft.is_empty() => {
                    // Drafts are optional: without them the sequence may still fit.
                    self.running[i].draft.clear();
                }
                false => {
                    // Out of blocks: the newest running sequence gives its blocks back (it may
                    // be this one; then the loop ends because `i` is past the end).
                    if let Some(id) = self.preempt_newest(pool) {
                        batch.preempted.push(id);
                    }
                }
            }
        }
        if !batch.preempted.is_empty() {
            return batch;
        }
        // Blocks this step completes: a waiting prompt that needs one of them waits a step and
        // then takes it from the cache (how `n > 1` and identical concurrent prompts share).
        let bs = pool.block_size();
        let mut in_flight: HashSet<BlockHash> = HashSet::new();
        // Only an admission can need them.
        let admitting = !self.waiting.is_empty() && self.window.is_none();
        for item in batch.items.iter().filter(|_| admitting) {
            let seq = &mut self.running[item.index];
            let end = seq.num_computed_tokens + item.num_tokens;
            let from = seq.num_computed_tokens / bs;
            in_flight.extend(seq.hashes_up_to(end, bs).iter().skip(from));
        }
        while budget > 0 {
            let Some(priority) = self.waiting.front().map(|s| s.priority) else {
                break;
            };
            if self.running.len() >= self.config.max_running_seqs {
                // Full: only a more urgent sequence gets in, in place of the least urgent.
                if !self.make_room(priority, &mut batch, &mut budget, pool) {
                    break;
                }
                continue;
            }
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            let mut taken = 0;
            // Prompt log-probabilities need every prompt row computed: no cached prefix.
            if seq.block_table.is_empty() && self.window.is_none() && !seq.wants_prompt_logits() {
                // At least the last token is computed: its logits are needed.
                let hashes = seq.hashes_up_to(seq.tokens.len() - 1, bs);
                let known = pool.known_prefix(hashes);
                if hashes.get(known).is_some_and(|h| in_flight.contains(h)) {
                    break;
                }
                let blocks = pool.take_prefix(hashes);
                taken = blocks.len();
                batch.prefix_queried_tokens += seq.tokens.len();
                batch.prefix_hit_tokens += taken * bs;
                seq.num_computed_tokens = taken * bs;
                seq.num_registered_blocks = taken;
                if seq.num_generated() == 0 {
                    seq.set_cached_tokens(taken * bs);
                }
                seq.block_table = blocks;
            }
            let n = seq.num_uncomputed().min(budget);
            if !Self::grow(seq, seq.num_computed_tokens + n, pool, &mut self.window) {
                if taken > 0 {
                    // Give the cached prefix back; it is taken again when room is made.
                    pool.release(&seq.block_table);
                    seq.block_table.clear();
                    seq.num_computed_tokens = 0;
                    seq.num_registered_blocks = 0;
                }
                if self.make_room(priority, &mut batch, &mut budget, pool) {
                    continue;
                }
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            let end = seq.num_computed_tokens + n;
            let from = seq.num_computed_tokens / bs;
            in_flight.extend(seq.hashes_up_to(end, bs).iter().skip(from));
            self.running.push(seq);
            batch.items.push(Scheduled {
                index: self.running.len() - 1,
                num_tokens: n,
            });
            budget -= n;
        }
        batch
    }

    /// Preempts the least urgent running sequence if it is less urgent than `priority` (a
    /// waiting sequence's), taking its share of this step back; whether it did. Sequences
    /// admitted in this step are never less urgent than the waiting ones behind them, so the
    /// one preempted is always the last of `running` and its item, if any, the last one.
    fn make_room(
        &mut self,
        priority: i32,
        batch: &mut ScheduledBatch,
        budget: &mut usize,
        pool: &mut BlockPool,
    ) -> bool {
        let Some(last) = self.running.last() else {
            return false;
        };
        if last.priority <= priority {
            return false;
        }
        let index = self.running.len() - 1;
        if let Some(at) = batch.items.iter().position(|item| item.index == index) {
            *budget += batch.items.remove(at).num_tokens;
        }
        match self.preempt_newest(pool) {
            Some(id) => {
                batch.preempted.push(id);
                true
            }
            None => false,
        }
    }

    /// Names the blocks a sequence has filled since the last call, so later requests can
    /// reuse them.
    pub fn register_full_blocks(seq: &mut Sequence, pool: &mut BlockPool) {
        let bs = pool.block_size();
        let full = seq.num_computed_tokens / bs;
        if full <= seq.num_registered_blocks {
            return;
        }
        let start = seq.num_registered_blocks;
        let hashes = seq.hashes_up_to(full * bs, bs).to_vec();
        let end = full.min(seq.block_table.len());
        for (&block, &hash) in seq.block_table[start..end].iter().zip(&hashes[start..end]) {
            pool.register(block, hash);
        }
        seq.num_registered_blocks = full;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::request::{Event, GenerateRequest};
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    fn seq(id: u64, prompt_len: usize) -> (Sequence, UnboundedReceiver<Event>) {
        let (tx, rx) = unbounded_channel();
        // Distinct prompts per id: identical ones would share cached blocks.
        let req = GenerateRequest::greedy(vec![id as u32 + 1; prompt_len], 100);
        (Sequence::new(id, req, None, tx), rx)
    }

    /// Marks the scheduled tokens computed, and decoding sequences as having sampled one more.
    fn run(s: &mut Scheduler, batch: &ScheduledBatch, pool: &mut BlockPool) {
        for item in &batch.items {
            let seq = &mut s.running[item.index];
            seq.num_computed_tokens += item.num_tokens;
            Scheduler::register_full_blocks(seq, pool);
            if seq.num_uncomputed() == 0 {
                seq.tokens.push(7);
            }
        }
    }

    fn config(max_batch_tokens: usize, max_running_seqs: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_batch_tokens,
            max_running_seqs,
        }
    }

    /// A sequence of `priority` (lower runs first).
    fn urgent(id: u64, prompt_len: usize, priority: i32) -> (Sequence, UnboundedReceiver<Event>) {
        let (mut q, rx) = seq(id, prompt_len);
        q.priority = priority;
        (q, rx)
    }

    fn ids(seqs: impl IntoIterator<Item = impl std::ops::Deref<Target = Sequence>>) -> Vec<u64> {
        seqs.into_iter().map(|s| s.id).collect()
    }

    #[test]
    fn priorities_order_admission_and_the_budget() {
        let mut pool = BlockPool::new(100, 16);
        let mut s = Scheduler::new(config(512, 2));
        let mut rxs = vec![];
        for (id, p) in [(0, 0), (1, 5), (2, -1), (3, 0)] {
            let (q, rx) = urgent(id, 4, p);
            rxs.push(rx);
            s.add(q);
        }
        assert_eq!(ids(&s.waiting), [2, 0, 3, 1]);
        let b = s.schedule(&mut pool);
        assert_eq!(ids(&s.running), [2, 0]);
        assert_eq!(ids(&s.waiting), [3, 1]);
        run(&mut s, &b, &mut pool);
        // A budget of one token goes to the most urgent running sequence.
        let mut s2 = Scheduler::new(config(1, 4));
        let mut pool2 = BlockPool::new(100, 16);
        for (id, p) in [(0, 3), (1, 1)] {
            let (mut q, rx) = urgent(id, 4, p);
            q.num_computed_tokens = 4;
            q.tokens.push(7);
            assert!(Scheduler::grow(&mut q, 5, &mut pool2, &mut None));
            rxs.push(rx);
            s2.running.push(q);
        }
        let b = s2.schedule(&mut pool2);
        assert_eq!(b.items.len(), 1);
        assert_eq!(s2.running[b.items[0].index].id, 1);
    }

    #[test]
    fn a_more_urgent_request_takes_the_place_of_the_least_urgent() {
        let mut pool = BlockPool::new(100, 4);
        let mut s = Scheduler::new(config(512, 2));
        let (a, _ra) = urgent(0, 6, 1);
        let (b, _rb) = urgent(1, 6, 1);
        s.add(a);
        s.add(b);
        let first = s.schedule(&mut pool);
        run(&mut s, &first, &mut pool);
        let used = pool.num_used();
        let (c, _rc) = urgent(2, 5, 0);
        s.add(c);
        let step = s.schedule(&mut pool);
        // The running set is full: the newest of the least urgent (1) makes room for 2.
        assert_eq!(step.preempted, vec![1]);
        assert_eq!(ids(&s.running), [0, 2]);
        assert_eq!(
            step.items,
            vec![
                Scheduled {
                    index: 0,
                    num_tokens: 1
                },
                Scheduled {
                    index: 1,
                    num_tokens: 5
                }
            ]
        );
        assert_eq!(ids(&s.waiting), [1]);
        assert!(s.waiting[0].block_table.is_empty());
        assert_eq!(
            pool.num_used(),
            used,
            "1's two blocks freed, as many taken by 2"
        );
        run(&mut s, &step, &mut pool);
        // Equally or less urgent newcomers wait their turn.
        let (d, _rd) = urgent(3, 5, 1);
        s.add(d);
        let step = s.schedule(&mut pool);
        assert!(step.preempted.is_empty());
        assert_eq!(ids(&s.waiting), [1, 3]);
    }

    #[test]
    fn out_of_blocks_an_urgent_request_preempts_the_least_urgent() {
        // 4 blocks of 4 tokens: the less urgent sequence holds all of them.
        let mut pool = BlockPool::new(4, 4);
        let mut s = Scheduler::new(config(512, 8));
        let (a, _ra) = urgent(0, 14, 1);
        s.add(a);
        let first = s.schedule(&mut pool);
        run(&mut s, &first, &mut pool);
        assert_eq!(pool.num_free(), 0);
        let (b, _rb) = urgent(1, 6, 0);
        s.add(b);
        let step = s.schedule(&mut pool);
        // 0's decode token was scheduled, then taken back with its blocks for 1's prompt.
        assert_eq!(step.preempted, vec![0]);
        assert_eq!(
            step.items,
            vec![Scheduled {
                index: 0,
                num_tokens: 6
            }]
        );
        assert_eq!(ids(&s.running), [1]);
        assert_eq!(ids(&s.waiting), [0]);
        assert_eq!(pool.num_used(), 2);
        // Out of blocks while decoding: the least urgent goes, even if it is the older.
        let mut pool = BlockPool::new(4, 4);
        let mut s = Scheduler::new(config(512, 8));
        let (a, _ra) = urgent(0, 6, 1);
        let (b, _rb) = urgent(1, 6, 0);
        s.add(a);
        s.add(b);
        for _ in 0..3 {
            let step = s.schedule(&mut pool);
            assert!(step.preempted.is_empty());
            run(&mut s, &step, &mut pool);
        }
        let step = s.schedule(&mut pool);
        assert_eq!(step.preempted, vec![0]);
        assert_eq!(ids(&s.running), [1]);
    }

    #[test]
    fn budget_chunks_long_prompts_and_keeps_decodes_moving() {
        let mut pool = BlockPool::new(100, 16);
        let mut s = Scheduler::new(config(64, 8));
        let (a, _ra) = seq(0, 10);
        let (b, _rb) = seq(1, 150);
        s.add(a);
        s.add(b);
        let first = s.schedule(&mut pool);
        assert_eq!(
            first.items,
            vec![
                Scheduled {
                    index: 0,
                    num_tokens: 10
                },
                Scheduled {
                    index: 1,
                    num_tokens: 54
                }
            ]
        );
        run(&mut s, &first, &mut pool);
        // Next step: the short one decodes one token, the long one continues its prefill.
        let second = s.schedule(&mut pool);
        assert_eq!(
            second.items,
            vec![
                Scheduled {
                    index: 0,
                    num_tokens: 1
                },
                Scheduled {
                    index: 1,
                    num_tokens: 63
                }
            ]
        );
        assert_eq!(second.num_tokens(), 64);
        assert_eq!(s.running[1].block_table.len(), pool.blocks_for(54 + 63));
    }

    #[test]
    fn max_running_limits_admission() {
        let mut pool = BlockPool::new(100, 16);
        let mut s = Scheduler::new(config(512, 2));
        let mut rxs = vec![];
        for i in 0..3 {
            let (q, rx) = seq(i, 4);
            rxs.push(rx);
            s.add(q);
        }
        let b = s.schedule(&mut pool);
        assert_eq!(b.items.len(), 2);
        assert_eq!(s.waiting.len(), 1);
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_and_frees_its_blocks() {
        // 4 blocks of 4 tokens: two 6-token prompts take 2 blocks each.
        let mut pool = BlockPool::new(4, 4);
        let mut s = Scheduler::new(config(512, 8));
        let (a, _ra) = seq(0, 6);
        let (b, _rb) = seq(1, 6);
        s.add(a);
        s.add(b);
        let first = s.schedule(&mut pool);
        assert_eq!(first.items.len(), 2);
        assert_eq!(pool.num_free(), 0);
        run(&mut s, &first, &mut pool);
        // Both decode positions 6 and 7 in their 2 blocks; position 8 needs a third block.
        for _ in 0..2 {
            let step = s.schedule(&mut pool);
            assert_eq!(step.items.len(), 2);
            assert!(step.preempted.is_empty());
            run(&mut s, &step, &mut pool);
        }
        let third = s.schedule(&mut pool);
        // a needs a block for position 8; b (newest) is preempted to free one.
        assert_eq!(third.preempted, vec![1]);
        assert_eq!(
            third.items,
            vec![Scheduled {
                index: 0,
                num_tokens: 1
            }]
        );
        assert_eq!(s.waiting.len(), 1);
        assert_eq!(s.waiting[0].num_computed_tokens, 0);
        assert!(s.waiting[0].block_table.is_empty());
        assert_eq!(
            s.waiting[0].tokens.len(),
            9,
            "keeps its generated tokens for recompute"
        );
        assert_eq!(pool.num_used(), 3);
    }

    #[test]
    fn identical_prompts_share_the_prefix_computed_once() {
        let mut pool = BlockPool::new(10, 4);
        let mut s = Scheduler::new(config(512, 8));
        let (tx, _r1) = tokio::sync::mpsc::unbounded_channel();
        let (tx2, _r2) = tokio::sync::mpsc::unbounded_channel();
        let prompt: Vec<u32> = (10..19).collect(); // 9 tokens: 2 full blocks + 1
        s.add(Sequence::new(
            0,
            GenerateRequest::greedy(prompt.clone(), 5),
            None,
            tx,
        ));
        s.add(Sequence::new(
            1,
            GenerateRequest::greedy(prompt, 5),
            None,
            tx2,
        ));
        let first = s.schedule(&mut pool);
        assert_eq!(first.items.len(), 1, "the twin waits for the shared blocks");
        assert_eq!(first.num_tokens(), 9);
        run(&mut s, &first, &mut pool);
        let second = s.schedule(&mut pool);
        // The first decodes; the twin computes only its last prompt token.
        assert_eq!(second.items.len(), 2);
        assert_eq!(second.items[1].num_tokens, 1);
        assert_eq!(s.running[1].num_cached_tokens, 8);
        assert_eq!(s.running[1].block_table[..2], s.running[0].block_table[..2]);
        assert_eq!(pool.ref_count(s.running[0].block_table[0]), 2);
        run(&mut s, &second, &mut pool);
        s.finish(1, &mut pool);
        s.finish(0, &mut pool);
        assert_eq!(pool.num_used(), 0);
        assert!(
            pool.num_cached_free() >= 2,
            "named blocks stay cached once free"
        );
    }

    #[test]
    fn cancelled_sequences_release_their_blocks() {
        let mut pool = BlockPool::new(10, 4);
        let mut s = Scheduler::new(config(512, 8));
        let (a, ra) = seq(0, 9);
        let (b, _rb) = seq(1, 3);
        let (c, rc) = seq(2, 3);
        s.add(a);
        s.add(b);
        s.add(c);
        let batch = s.schedule(&mut pool);
        assert_eq!(batch.items.len(), 3);
        assert_eq!(pool.num_used(), 5);
        drop(ra);
        drop(rc);
        assert_eq!(s.reap_cancelled(&mut pool), 2);
        assert_eq!(pool.num_used(), 1);
        let only = s.finish(0, &mut pool);
        assert_eq!(only.id, 1);
        assert_eq!(pool.num_used(), 0);
        assert!(s.is_idle());
    }
}
