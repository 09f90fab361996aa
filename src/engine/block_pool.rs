//! `BlockPool`: which KV blocks are free, how many holders each used block has, and which
//! full blocks hold known content (prefix caching). Ids only, no tensors; the model's
//! `KvCache` holds the data at the same block ids.
//!
//! Prefix caching (vLLM v1's design): a full block is named by the hash chain of the token ids
//! up to and including it (plus the adapter). When its last holder lets go, a named block
//! stays in the free queue with its content; a later sequence whose prompt starts with the
//! same tokens takes it back instead of recomputing. Free blocks are reused least recently
//! freed first, and a reused block loses its name.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Content name of a full block: hash of the previous block's name and this block's tokens.
pub type BlockHash = u64;

/// Names of the full blocks of `tokens` (block `i` covers `tokens[i*bs..(i+1)*bs]`), chained
/// from `salt` (the adapter's identity; 0 for the base model).
pub fn block_hashes(tokens: &[u32], block_size: usize, salt: u64) -> Vec<BlockHash> {
    let mut prev = salt;
    tokens
        .chunks_exact(block_size)
        .map(|chunk| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            prev.hash(&mut h);
            chunk.hash(&mut h);
            prev = h.finish();
            prev
        })
        .collect()
}

/// A pool of `num_blocks` KV blocks of `block_size` tokens.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    /// Free blocks by the order they became free (oldest first).
    free: BTreeMap<u64, u32>,
    /// Per block: its key in `free` while free.
    free_key: Vec<Option<u64>>,
    next_key: u64,
    /// Holders per block (0 = free).
    ref_counts: Vec<u32>,
    /// Named blocks (held or free) by name.
    by_hash: HashMap<BlockHash, u32>,
    /// Per block: its name, if it holds a known full block.
    hash_of: Vec<Option<BlockHash>>,
}

impl BlockPool {
    /// A pool with every block free.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        let mut pool = BlockPool {
            block_size,
            free: BTreeMap::new(),
            free_key: vec![None; num_blocks],
            next_key: 0,
            ref_counts: vec![0; num_blocks],
            by_hash: HashMap::new(),
            hash_of: vec![None; num_blocks],
        };
        for b in 0..num_blocks as u32 {
            pool.push_free(b);
        }
        pool
    }

    fn push_free(&mut self, block: u32) {
        self.free.insert(self.next_key, block);
        self.free_key[block as usize] = Some(self.next_key);
        self.next_key += 1;
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks not held by anyone (named ones included: they are reclaimable).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks held by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Free blocks that still hold a named prefix.
    pub fn num_cached_free(&self) -> usize {
        self.free
            .values()
            .filter(|&&b| self.hash_of[b as usize].is_some())
            .count()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Takes `n` free blocks (least recently freed first, forgetting their names), or none at
    /// all if fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let mut blocks = Vec::with_capacity(n);
        for _ in 0..n {
            let (_, b) = self.free.pop_first()?;
            self.free_key[b as usize] = None;
            if let Some(h) = self.hash_of[b as usize].take() {
                self.by_hash.remove(&h);
            }
            self.ref_counts[b as usize] = 1;
            blocks.push(b);
        }
        Some(blocks)
    }

    /// Takes the blocks named by the leading `hashes`, as far as they are known; each taken
    /// block gains a holder.
    pub fn take_prefix(&mut self, hashes: &[BlockHash]) -> Vec<u32> {
        let mut out = Vec::new();
        for h in hashes {
            let Some(&b) = self.by_hash.get(h) else {
                break;
            };
            if let Some(key) = self.free_key[b as usize].take() {
                self.free.remove(&key);
            }
            self.ref_counts[b as usize] += 1;
            out.push(b);
        }
        out
    }

    /// How many of the leading `hashes` are known (without taking them).
    pub fn known_prefix(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.by_hash.contains_key(h))
            .count()
    }

    /// Names a held, now full block; a name already given to another block is left alone.
    pub fn register(&mut self, block: u32, hash: BlockHash) {
        if self.hash_of[block as usize].is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        self.by_hash.insert(hash, block);
        self.hash_of[block as usize] = Some(hash);
    }

    /// Adds a holder to a used block (sharing).
    pub fn retain(&mut self, block: u32) {
        let rc = &mut self.ref_counts[block as usize];
        debug_assert!(*rc > 0, "invariant: retained block {block} is in use");
        *rc += 1;
    }

    /// Drops one holder of each block; blocks nobody holds become free (keeping their name).
    pub fn release(&mut self, blocks: &[u32]) {
        // Last blocks first: a sequence's tail is the least likely to be asked for again, so
        // it should be reused before its head.
        for &b in blocks.iter().rev() {
            let rc = &mut self.ref_counts[b as usize];
            debug_assert!(*rc > 0, "invariant: released block {b} is in use");
            *rc = rc.saturating_sub(1);
            if *rc == 0 {
                self.push_free(b);
            }
        }
    }

    /// Holders of a block.
    pub fn ref_count(&self, block: u32) -> u32 {
        self.ref_counts[block as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_all_or_nothing_and_free_returns_blocks() {
        let mut p = BlockPool::new(4, 16);
        assert_eq!(p.blocks_for(33), 3);
        let a = p.allocate(3).expect("3 of 4");
        assert_eq!(p.num_free(), 1);
        assert!(p.allocate(2).is_none(), "no partial allocation");
        assert_eq!(p.num_free(), 1);
        p.release(&a);
        assert_eq!(p.num_free(), 4);
        assert_eq!(p.num_used(), 0);
    }

    #[test]
    fn shared_blocks_are_freed_by_the_last_holder() {
        let mut p = BlockPool::new(2, 16);
        let a = p.allocate(1).expect("one");
        p.retain(a[0]);
        assert_eq!(p.ref_count(a[0]), 2);
        p.release(&a);
        assert_eq!(p.num_free(), 1, "still held once");
        p.release(&a);
        assert_eq!(p.num_free(), 2);
    }

    #[test]
    fn hash_chains_depend_on_every_earlier_token_and_the_salt() {
        let a = block_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4, 0);
        assert_eq!(a.len(), 2, "only full blocks are named");
        let b = block_hashes(&[1, 2, 3, 0, 5, 6, 7, 8], 4, 0);
        assert_ne!(a[0], b[0]);
        assert_ne!(a[1], b[1], "same block tokens, different history");
        assert_ne!(
            a,
            block_hashes(&[1, 2, 3, 4, 5, 6, 7, 8], 4, 9),
            "adapter salt"
        );
        assert_eq!(a, block_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 10], 4, 0));
    }

    #[test]
    fn named_blocks_survive_release_and_are_taken_back() {
        let mut p = BlockPool::new(4, 4);
        let h = block_hashes(&[1, 2, 3, 4, 5, 6, 7, 8], 4, 0);
        let a = p.allocate(2).expect("two");
        p.register(a[0], h[0]);
        p.register(a[1], h[1]);
        p.release(&a);
        assert_eq!(p.num_free(), 4);
        assert_eq!(p.num_cached_free(), 2);
        assert_eq!(p.known_prefix(&h), 2);
        let got = p.take_prefix(&h);
        assert_eq!(got, a);
        assert_eq!(p.num_used(), 2);
        // A second holder shares them.
        assert_eq!(p.take_prefix(&h[..1]), vec![a[0]]);
        assert_eq!(p.ref_count(a[0]), 2);
        p.release(&got);
        p.release(&[a[0]]);
        assert_eq!(p.num_used(), 0);
    }

    #[test]
    fn reuse_evicts_least_recently_freed_and_forgets_names() {
        let mut p = BlockPool::new(3, 4);
        let h = block_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 4, 0);
        let a = p.allocate(3).expect("three");
        for (b, hash) in a.iter().zip(&h) {
            p.register(*b, *hash);
        }
        p.release(&a); // freed tail first: a[2], a[1], a[0]
        let fresh = p.allocate(1).expect("one");
        assert_eq!(fresh, vec![a[2]], "the tail block goes first");
        assert_eq!(p.known_prefix(&h), 2, "the head two blocks are still known");
        assert_eq!(p.take_prefix(&h), vec![a[0], a[1]]);
    }
}
