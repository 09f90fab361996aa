//! `KvCache`: the keys and values of every cached token, per layer, in one preallocated pool of
//! fixed-size blocks. A token's *slot* is `block * block_size + offset`; which blocks belong to
//! which sequence is the engine's business (block tables), not the cache's.

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
    kv_dim: usize,
    layers: Vec<LayerKv>,
}

impl KvCache {
    /// Allocates `num_blocks` blocks of `block_size` tokens for `num_layers` layers.
    pub fn new(num_layers: usize, kv_dim: usize, num_blocks: usize, block_size: usize) -> Self {
        let n = num_blocks * block_size * kv_dim;
        let layers = (0..num_layers)
            .map(|_| LayerKv {
                k: vec![0.0; n],
                v: vec![0.0; n],
            })
            .collect();
        KvCache {
            block_size,
            num_blocks,
            kv_dim,
            layers,
        }
    }

    /// Bytes one cached token takes over all layers (keys and values, f32).
    pub fn bytes_per_token(num_layers: usize, kv_dim: usize) -> usize {
        num_layers * kv_dim * 2 * std::mem::size_of::<f32>()
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Slots in the pool.
    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Width of one token's keys (or values) in one layer.
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// The storage of layer `i`.
    pub fn layer_mut(&mut self, i: usize) -> &mut LayerKv {
        &mut self.layers[i]
    }

    /// Copies the K/V of slot `from` to slot `to` in every layer (copy-on-write of a shared
    /// partial block).
    pub fn copy_slot(&mut self, from: usize, to: usize) {
        let d = self.kv_dim;
        for l in &mut self.layers {
            l.k.copy_within(from * d..(from + 1) * d, to * d);
            l.v.copy_within(from * d..(from + 1) * d, to * d);
        }
    }
}
