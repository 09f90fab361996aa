//! `KvCache`: the keys and values of every cached token, per layer, in preallocated pools of
//! fixed-size blocks. A token's *slot* is `block * block_size + offset`; which blocks belong to
//! which sequence is the engine's business (block tables), not the cache's.
//!
//! Sliding-window layers (Mistral, Gemma 2, ...) have their own, smaller pool: a sequence
//! keeps only a ring of blocks there (its *window table*), reused as positions move on, so
//! their KV does not grow past the window.

/// What a KV cache stores per element: f32, or f16 — half the memory and the bandwidth that
/// attention over long batches is bound by (llama.cpp's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// 4 bytes per value: attention is exactly transformers' float32.
    F32,
    /// 2 bytes per value, rounded to nearest when written.
    F16,
}

impl KvDtype {
    /// Bytes per stored value.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

/// Zeroed storage of `T` (f32 or f16) from an anonymous memory mapping: its pages are backed by
/// memory only once written, so a large KV pool costs what the cached tokens use, not what it
/// could hold (a heap allocation of this size may be zeroed eagerly, touching every page).
pub enum KvBuf<T> {
    /// The usual case.
    Mapped(memmap2::MmapMut, usize),
    /// Where the mapping failed, or the size is 0.
    Heap(Vec<T>),
}

/// Element types whose all-zero bytes are the value 0 (so a fresh mapping reads as zeros).
pub trait ZeroBits: Copy + Default {}
impl ZeroBits for f32 {}
impl ZeroBits for half::f16 {}

impl<T: ZeroBits> KvBuf<T> {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return KvBuf::Heap(Vec::new());
        }
        match memmap2::MmapMut::map_anon(len * std::mem::size_of::<T>()) {
            Ok(map) => KvBuf::Mapped(map, len),
            Err(_) => KvBuf::Heap(vec![T::default(); len]),
        }
    }
}

impl<T: ZeroBits> std::ops::Deref for KvBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            // SAFETY: the mapping is page-aligned (so aligned for T), holds `len` values of T,
            // starts zeroed (all-zero bits are 0 for every `ZeroBits` type), and lives as long
            // as `self`.
            #[allow(unsafe_code)]
            KvBuf::Mapped(map, len) => unsafe {
                std::slice::from_raw_parts(map.as_ptr().cast::<T>(), *len)
            },
            KvBuf::Heap(v) => v,
        }
    }
}

impl<T: ZeroBits> std::ops::DerefMut for KvBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            // SAFETY: as in `deref`, with exclusive access through `&mut self`.
            #[allow(unsafe_code)]
            KvBuf::Mapped(map, len) => unsafe {
                std::slice::from_raw_parts_mut(map.as_mut_ptr().cast::<T>(), *len)
            },
            KvBuf::Heap(v) => v,
        }
    }
}

/// Keys (after rotary embedding) and values of one layer: `(num_slots, kv_dim)` each,
/// row-major, in the cache's element type.
pub enum LayerKv {
    /// f32 storage.
    F32 {
        /// Keys.
        k: KvBuf<f32>,
        /// Values.
        v: KvBuf<f32>,
    },
    /// f16 storage.
    F16 {
        /// Keys.
        k: KvBuf<half::f16>,
        /// Values.
        v: KvBuf<half::f16>,
    },
}

impl LayerKv {
    fn zeroed(dtype: KvDtype, len: usize) -> Self {
        match dtype {
            KvDtype::F32 => LayerKv::F32 {
                k: KvBuf::zeroed(len),
                v: KvBuf::zeroed(len),
            },
            KvDtype::F16 => LayerKv::F16 {
                k: KvBuf::zeroed(len),
                v: KvBuf::zeroed(len),
            },
        }
    }

    /// Copies slot `from`'s row to slot `to` in K and V (rows of `d` values).
    fn copy_row(&mut self, from: usize, to: usize, d: usize) {
        match self {
            LayerKv::F32 { k, v } => {
                k.copy_within(from * d..(from + 1) * d, to * d);
                v.copy_within(from * d..(from + 1) * d, to * d);
            }
            LayerKv::F16 { k, v } => {
                k.copy_within(from * d..(from + 1) * d, to * d);
                v.copy_within(from * d..(from + 1) * d, to * d);
            }
        }
    }
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
        Self::with_windows(
            &vec![false; num_layers],
            kv_dim,
            num_blocks,
            0,
            block_size,
            KvDtype::F32,
        )
    }

    /// Full layers get `num_blocks` blocks; layers marked in `sliding` get
    /// `num_window_blocks`; values stored as `dtype`.
    pub fn with_windows(
        sliding: &[bool],
        kv_dim: usize,
        num_blocks: usize,
        num_window_blocks: usize,
        block_size: usize,
        dtype: KvDtype,
    ) -> Self {
        let layers = sliding
            .iter()
            .map(|&s| {
                let blocks = if s { num_window_blocks } else { num_blocks };
                LayerKv::zeroed(dtype, blocks * block_size * kv_dim)
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

    /// Bytes one cached token takes over `num_layers` layers (keys and values).
    pub fn bytes_per_token(num_layers: usize, kv_dim: usize, dtype: KvDtype) -> usize {
        num_layers * kv_dim * 2 * dtype.size()
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
            l.copy_row(from, to, d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_buffers_start_zeroed_and_keep_what_is_written() {
        for len in [0, 1, 3, 100_000] {
            let mut b = KvBuf::<f32>::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0.0));
            if len > 0 {
                b[len - 1] = 2.5;
                b.copy_within(len - 1..len, 0);
                assert_eq!((b[0], b[len - 1]), (2.5, 2.5));
            }
        }
        assert!(matches!(KvBuf::<f32>::zeroed(10), KvBuf::Mapped(..)));
        let h = KvBuf::<half::f16>::zeroed(5);
        assert!(h.iter().all(|&x| x == half::f16::ZERO));
    }
}
