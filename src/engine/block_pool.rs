//! `BlockPool`: which KV blocks are free and how many holders each used block has. Ids only,
//! no tensors; the model's `KvCache` holds the data at the same block ids.

/// A pool of `num_blocks` KV blocks of `block_size` tokens.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    /// Free block ids; popped from the back.
    free: Vec<u32>,
    /// Holders per block (0 = free).
    ref_counts: Vec<u32>,
}

impl BlockPool {
    /// A pool with every block free.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        BlockPool {
            block_size,
            free: (0..num_blocks as u32).rev().collect(),
            ref_counts: vec![0; num_blocks],
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks not held by anyone.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks held by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Takes `n` free blocks, or none at all if fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let blocks = self.free.split_off(self.free.len() - n);
        for &b in &blocks {
            self.ref_counts[b as usize] = 1;
        }
        Some(blocks)
    }

    /// Adds a holder to a used block (sharing).
    pub fn retain(&mut self, block: u32) {
        let rc = &mut self.ref_counts[block as usize];
        debug_assert!(*rc > 0, "invariant: retained block {block} is in use");
        *rc += 1;
    }

    /// Drops one holder of each block; blocks nobody holds become free.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks {
            let rc = &mut self.ref_counts[b as usize];
            debug_assert!(*rc > 0, "invariant: released block {b} is in use");
            *rc = rc.saturating_sub(1);
            if *rc == 0 {
                self.free.push(b);
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
}
