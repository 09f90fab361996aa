//! `KvCache`: the keys and values of every cached token, per layer, in preallocated pools of
//! fixed-size blocks. A token's *slot* is `block * block_size + offset`; which blocks belong to
//! which sequence is the engine's business (block tables), not the cache's.
//!
//! Sliding-window layers (Mistral, Gemma 2, ...) have their own, smaller pool: a sequence
//! keeps only a ring of blocks there (its *window table*), reused as positions move on, so
//! their KV does not grow past the window.

/// Keys and values of one layer: `(num_slots, kv_dim)` each, row-major.
pub struct LayerKv {
    /// Keys after rotary embedding.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
}

/// Paged KV storage for all layers.
pub struct KvCache {
    block_size: usize,
    num_blocks: usize,
    num_window_blocks: usize,
    kv_dim: usize,
    layers: Vec<LayerKv>,
    sliding: Vec<bool>,
}

impl KvCache {
    /// Allocates `num_blocks` blocks of `block_size` tokens for `num_layers` full-attention
    /// layers.
    pub fn new(num_layers: usize, kv_dim: usize, num_blocks: usize, block_size: usize) -> Self {
        Self::with_windows(&vec![false; num_layers], kv_dim, num_blocks, 0, block_size)
    }

    /// Full layers get `num_blocks` blocks; layers marked in `sliding` get
    /// `num_window_blocks`.
    pub fn with_windows(
        sliding: &[bool],
        kv_dim: usize,
        num_blocks: usize,
        num_window_blocks: usize,
        block_size: usize,
    ) -> Self {
        let layers = sliding
            .iter()
            .map(|&s| {
                let blocks = if s { num_window_blocks } else { num_blocks };
                let n = blocks * block_size * kv_dim;
                LayerKv {
                    k: vec![0.0; n],
                    v: vec![0.0; n],
                }
            })
            .collect();
        KvCache {
            block_size,
            num_blocks,
            num_window_blocks,
            kv_dim,
            layers,
            sliding: sliding.to_vec(),
        }
    }

    /// Bytes one cached token takes over `num_layers` layers (keys and values, f32).
    pub fn bytes_per_token(num_layers: usize, kv_dim: usize) -> usize {
        num_layers * kv_dim * 2 * std::mem::size_of::<f32>()
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the full-attention pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks in the sliding-window pool.
    pub fn num_window_blocks(&self) -> usize {
        self.num_window_blocks
    }

    /// Slots in the full-attention pool.
    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Width of one token's keys (or values) in one layer.
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// Whether layer `i` lives in the sliding-window pool.
    pub fn is_sliding(&self, i: usize) -> bool {
        self.sliding.get(i).copied().unwrap_or(false)
    }

    /// Whether any layer lives in the sliding-window pool.
    pub fn has_windows(&self) -> bool {
        self.sliding.iter().any(|&s| s)
    }

    /// The storage of layer `i`.
    pub fn layer_mut(&mut self, i: usize) -> &mut LayerKv {
        &mut self.layers[i]
    }

    /// Copies the K/V of slot `from` to slot `to` in every full-attention layer (copy-on-write
    /// of a shared partial block).
    pub fn copy_slot(&mut self, from: usize, to: usize) {
        let d = self.kv_dim;
        for (l, _) in self
            .layers
            .iter_mut()
            .zip(&self.sliding)
            .filter(|(_, &s)| !s)
        {
            l.k.copy_within(from * d..(from + 1) * d, to * d);
            l.v.copy_within(from * d..(from + 1) * d, to * d);
        }
    }
}
