//! Rotary position embedding and ragged causal attention over the paged KV cache.
//!
//! Attention is computed per (row, query head) with its own scores, so a token's result does
//! not depend on which other sequences share the batch or whether it came in a prefill chunk
//! or a decode step: batch invariance by construction. GQA reads each shared K/V head in
//! place; nothing is repeated or concatenated.

use rayon::prelude::*;

use super::config::{ModelConfig, RopeScaling};
use super::kv_cache::LayerKv;
use super::ForwardBatch;

/// Rotary embedding frequencies (`rotary_dim / 2` of them), HF's rotate-half layout over the
/// first `rotary_dim` dimensions of each head (all of them unless the rotary is partial).
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    head_dim: usize,
    /// Multiplier of cos and sin (YaRN's attention factor; 1 otherwise).
    attention_scaling: f32,
}

/// `cos`/`sin` of every row's position: `(T, rotary_dim / 2)` each.
pub struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    head_dim: usize,
}

/// YaRN frequencies as transformers computes them (`_compute_yarn_parameters`).
fn yarn_inv_freq(
    dim: usize,
    base: f64,
    factor: f64,
    original: usize,
    (beta_fast, beta_slow): (f64, f64),
    truncate: bool,
) -> Vec<f32> {
    let correction_dim = |rot: f64| {
        dim as f64 * (original as f64 / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
    };
    let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
    if truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
    if low == high {
        high += 0.001;
    }
    (0..dim / 2)
        .map(|i| {
            let pos_freq = (base as f32).powf((2 * i) as f32 / dim as f32);
            let extrapolation = 1.0 / pos_freq;
            let interpolation = 1.0 / (factor as f32 * pos_freq);
            let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
            let extrapolation_factor = 1.0 - ramp;
            interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
        })
        .collect()
}

impl Rope {
    /// Frequencies as transformers computes them in float32, with the config's scaling.
    pub fn new(config: &ModelConfig) -> Self {
        let dim = config.features.rotary_dim.unwrap_or(config.head_dim);
        let theta = config.rope_theta as f32;
        let mut inv_freq: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / dim as f32))
            .collect();
        let mut attention_scaling = 1.0;
        match &config.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => {
                inv_freq.iter_mut().for_each(|f| *f /= *factor as f32);
            }
            Some(RopeScaling::FreqFactors(factors)) => {
                inv_freq.iter_mut().zip(factors).for_each(|(f, d)| *f /= d);
            }
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            }) => {
                inv_freq = yarn_inv_freq(
                    dim,
                    config.rope_theta,
                    *factor,
                    *original_max_position_embeddings,
                    (*beta_fast, *beta_slow),
                    *truncate,
                );
                attention_scaling = *attention_factor as f32;
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old = *original_max_position_embeddings as f32;
                let (factor, low, high) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                );
                let low_wavelen = old / low;
                let high_wavelen = old / high;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - low) / (high - low);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        Rope {
            inv_freq,
            head_dim: config.head_dim,
            attention_scaling,
        }
    }

    /// The rotation frequencies, `rotary_dim / 2` of them.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Tables for the given positions, computed once per forward and shared by all layers.
    pub fn tables(&self, positions: &[u32]) -> RopeTables {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos() * self.attention_scaling);
                sin.push(angle.sin() * self.attention_scaling);
            }
        }
        RopeTables {
            cos,
            sin,
            half,
            head_dim: self.head_dim,
        }
    }
}

impl RopeTables {
    /// `(cos, sin)`, each `(T, rotary_dim / 2)` row-major.
    pub fn as_slices(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    /// Rotates `x: (T, heads * head_dim)` in place: `x·cos + rotate_half(x)·sin` over each
    /// head's rotary dimensions; the rest pass through.
    pub fn apply(&self, x: &mut [f32], heads: usize) {
        let half = self.half;
        let row_len = heads * self.head_dim;
        for (t, row) in x.chunks_exact_mut(row_len).enumerate() {
            let cos = &self.cos[t * half..(t + 1) * half];
            let sin = &self.sin[t * half..(t + 1) * half];
            for head in row.chunks_exact_mut(self.head_dim) {
                let (a, b) = head[..2 * half].split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * cos[i] - x2 * sin[i];
                    b[i] = x2 * cos[i] + x1 * sin[i];
                }
            }
        }
    }
}

/// Per-forward bookkeeping shared by all layers: which sequence each row belongs to and the
/// slots of every sequence's context in position order.
pub struct AttentionPlan {
    row_seq: Vec<usize>,
    context_slots: Vec<Vec<u32>>,
    /// Sliding layers, per sequence: the first position any of this step's rows attends and
    /// the window-pool slots of the positions from there on.
    window_slots: Vec<(usize, Vec<u32>)>,
    /// Sliding layers: the window-pool slot each row's keys/values are written to.
    row_window_slots: Vec<u32>,
}

impl AttentionPlan {
    /// Derives the plan from a (validated) batch; `window` is the sliding layers' window.
    pub fn new(batch: &ForwardBatch, block_size: usize, window: Option<usize>) -> Self {
        let mut row_seq = Vec::with_capacity(batch.token_ids.len());
        let mut context_slots = Vec::with_capacity(batch.seqs.len());
        let mut window_slots = Vec::new();
        let mut row_window_slots = Vec::new();
        for (i, s) in batch.seqs.iter().enumerate() {
            if let Some(w) = window {
                let first_row = s.context_len - s.query_len;
                let lo = (first_row + 1).saturating_sub(w);
                let slot = |p: usize| s.window_slot(p, batch.window_ring, block_size);
                window_slots.push((lo, (lo..s.context_len).map(slot).collect()));
                row_window_slots.extend((first_row..s.context_len).map(slot));
            }
            row_seq.extend(std::iter::repeat_n(i, s.query_len));
            context_slots.push(
                (0..s.context_len)
                    .map(|p| {
                        s.block_table[p / block_size] * block_size as u32 + (p % block_size) as u32
                    })
                    .collect(),
            );
        }
        AttentionPlan {
            row_seq,
            context_slots,
            window_slots,
            row_window_slots,
        }
    }

    /// Where this step's rows write their keys and values in a full (`sliding = false`) or
    /// sliding-window layer.
    pub fn write_slots<'a>(&'a self, batch: &'a ForwardBatch, sliding: bool) -> &'a [u32] {
        if sliding {
            &self.row_window_slots
        } else {
            &batch.slots
        }
    }

    /// Sequence `seq`'s slots from position `from` to `to` in a full or sliding layer.
    fn slots(&self, seq: usize, sliding: bool, from: usize, to: usize) -> &[u32] {
        if sliding {
            let (lo, slots) = &self.window_slots[seq];
            &slots[from - lo..to - lo]
        } else {
            &self.context_slots[seq][from..to]
        }
    }
}

/// Shape and arithmetic of one attention layer.
#[derive(Debug, Clone, Copy)]
pub struct HeadDims {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Multiplier of `q·k`.
    pub scale: f32,
    /// `cap · tanh(score / cap)` before the softmax.
    pub softcap: Option<f32>,
    /// Keys further back than `window - 1` positions are not attended.
    pub window: Option<usize>,
}

/// A KV cache element: f32, or f16 (rounded to nearest on write, exact on read).
pub trait KvElem: Copy + Send + Sync + 'static {
    /// The stored form of `x`.
    fn from_f32(x: f32) -> Self;
    /// The value.
    fn to_f32(self) -> f32;
    /// `dst[i] = from_f32(src[i])` for the whole (equal-length) slices.
    fn store_all(dst: &mut [Self], src: &[f32]) {
        dst.iter_mut()
            .zip(src)
            .for_each(|(d, &x)| *d = Self::from_f32(x));
    }
    /// Eight consecutive values as f32 lanes.
    ///
    /// # Safety
    /// `p` is readable for 8 values; AVX2 and F16C are available.
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(unsafe_code)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees 8 readable values.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl KvElem for half::f16 {
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn store_all(dst: &mut [Self], src: &[f32]) {
        assert_eq!(dst.len(), src.len(), "store_all lengths");
        #[cfg(target_arch = "x86_64")]
        if crate::model::quant::simd_available() {
            #[allow(unsafe_code)]
            // SAFETY: F16C detected; equal lengths (asserted).
            unsafe {
                simd_x86::store_f16(dst, src)
            };
            return;
        }
        // Eight at a time through F16C where the CPU has it (the same rounding, to nearest).
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(unsafe_code)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable values (16 bytes).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

/// Writes the new rows' keys and values (`(T, kv_dim)` each) into their slots.
pub fn write_kv(layer: &mut LayerKv, slots: &[u32], k: &[f32], v: &[f32], kv_dim: usize) {
    fn write<E: KvElem>(dst: &mut [E], slots: &[u32], src: &[f32], kv_dim: usize) {
        for (t, &slot) in slots.iter().enumerate() {
            let at = slot as usize * kv_dim;
            E::store_all(
                &mut dst[at..at + kv_dim],
                &src[t * kv_dim..(t + 1) * kv_dim],
            );
        }
    }
    match layer {
        LayerKv::F32 { k: lk, v: lv } => {
            write(lk, slots, k, kv_dim);
            write(lv, slots, v, kv_dim);
        }
        LayerKv::F16 { k: lk, v: lv } => {
            write(lk, slots, k, kv_dim);
            write(lv, slots, v, kv_dim);
        }
    }
}

#[inline(always)]
fn dot<E: KvElem>(a: &[f32], b: &[E]) -> f32 {
    // Eight independent lanes so the compiler vectorises; fixed order, so deterministic.
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l].to_f32();
        }
    }
    let mut sum = 0f32;
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i].to_f32();
    }
    acc.iter().sum::<f32>() + sum
}

/// Where one (row, KV head) reads its keys and values.
#[derive(Clone, Copy)]
struct HeadView<'a, E> {
    k: &'a [E],
    v: &'a [E],
    slots: &'a [u32],
    kv_dim: usize,
    offset: usize,
    head_dim: usize,
    /// KV heads covered, from `offset` on: the queries are theirs in head order, the same
    /// number each (a decoding row's heads attended in one pass over its slot rows).
    heads: usize,
    scale: f32,
    softcap: Option<f32>,
    /// Whether this pass fetches whole slot rows (every KV head's K and V) one key block
    /// ahead: set for the first head of a tile, whose later heads then find them in cache.
    prefetch: bool,
}

/// Gemma 2's score soft-capping, in transformers' order of operations.
#[inline]
fn soft_cap(x: f32, cap: f32) -> f32 {
    (x / cap).tanh() * cap
}

/// Softmax(q·Kᵀ·scale)·V for query vectors `q: (Q, head_dim)` that share one KV head, vector
/// `g` attending to slots `ranges[g].0 .. ranges[g].1`; written into `out` (zeroed).
/// Portable path.
fn attend_group<E: KvElem>(
    q: &[f32],
    ranges: &[(usize, usize)],
    view: &HeadView<E>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = view.head_dim;
    let per = (q.len() / hd / view.heads.max(1)).max(1);
    let queries = q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)).zip(ranges);
    for (g, ((qg, og), &(lo, n))) in queries.enumerate() {
        let offset = view.offset + (g / per) * hd;
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for &s in &view.slots[lo..n] {
            let base = s as usize * view.kv_dim + offset;
            let mut x = dot(qg, &view.k[base..base + hd]) * view.scale;
            if let Some(cap) = view.softcap {
                x = soft_cap(x, cap);
            }
            max = max.max(x);
            scores.push(x);
        }
        let mut sum = 0f32;
        for x in scores.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        for (&s, &w) in view.slots[lo..n].iter().zip(scores.iter()) {
            let base = s as usize * view.kv_dim + offset;
            let p = w * inv;
            for (oi, vi) in og.iter_mut().zip(&view.v[base..base + hd]) {
                *oi += p * vi.to_f32();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd_x86 {
    //! AVX2 attention for head widths that are multiples of 8 (up to 256). Every score, exp and
    //! output element of a (row, head) runs a fixed operation sequence that depends only on its
    //! own context length, never on other rows or sequences: batch invariance holds.
    use std::arch::x86_64::*;

    use super::{HeadView, KvElem};

    /// `dst[i] = f16(src[i])`, rounded to nearest (ties to even) as `half::f16::from_f32`,
    /// eight at a time (a KV row's write without a call per few values).
    ///
    /// # Safety
    /// F16C is available; `dst` and `src` have the same length.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn store_f16(dst: &mut [half::f16], src: &[f32]) {
        let n = src.len();
        let mut i = 0;
        // SAFETY: eight values from `i < n - 7` on are inside both slices.
        unsafe {
            while i + 8 <= n {
                let h = _mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm256_loadu_ps(
                    src.as_ptr().add(i),
                ));
                _mm_storeu_si128(dst.as_mut_ptr().add(i).cast(), h);
                i += 8;
            }
        }
        for (d, &x) in dst[i..].iter_mut().zip(&src[i..]) {
            *d = half::f16::from_f32(x);
        }
    }

    /// Widest head handled (32 vectors of q kept per head in L1, output in 8-vector chunks).
    pub(super) const MAX_HEAD_DIM: usize = 256;

    /// `exp(x)` for `x ≤ 0` (Cephes polynomial, ~1 ulp); underflows to 0 below -87.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn exp_neg(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        p = _mm256_fmadd_ps(
            p,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(p, _mm256_castsi256_ps(e))
    }

    /// Keys ahead whose lines are requested: enough to cover a memory access at the rate
    /// one query consumes keys (measured at 16 sequences: 8 to 32 alike, none ~15% slower).
    const PREFETCH_KEYS: usize = 16;

    /// Prefetches the cache lines of `len` elements from `p` (a hint: never faults).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn prefetch_head<E>(p: *const E, len: usize) {
        let bytes = len * std::mem::size_of::<E>();
        for off in (0..bytes).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(off));
        }
    }

    /// Sums of four 8-lane accumulators, each reduced by the same fixed tree.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum4(a: [__m256; 4]) -> __m128 {
        let h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
    }

    /// f32 values per 64-byte cache line.
    const LINE_FLOATS: usize = 16;

    /// Values from `p` to the next cache-line boundary (0 if `p` is on one).
    fn to_line(p: *const f32) -> usize {
        (p.addr().wrapping_neg() % 64) / 4
    }

    /// Keys per block: a block's K (or V) head rows stay in L1 while every query vector of
    /// the tile uses them.
    const KEY_BLOCK: usize = 64;

    /// The AVX2 form of `super::attend_group` (`head_dim % 8 == 0`, `≤ MAX_HEAD_DIM`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn attend_group<E: KvElem>(
        q: &[f32],
        ranges: &[(usize, usize)],
        view: &HeadView<E>,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let hd = view.head_dim;
        let nc = hd / 8;
        let qn = q.len() / hd;
        let n = view.slots.len();
        let heads = view.heads.max(1);
        // Queries per head; query g's head starts `hoff(g)` elements into a slot's head rows.
        let per = qn / heads;
        let hoff = |g: usize| (g / per) * hd;
        // Tiles of several rows (prefill) stage each key/value block once as f32 (an exact
        // conversion) for all their queries, instead of converting it per query; their scores
        // go 16 keys at a time.
        let staged = per > 3;
        assert!(qn.is_multiple_of(heads) && (!staged || heads == 1));
        let padded = n.next_multiple_of(if staged { KEY_STEP } else { 4 });
        assert!(hd.is_multiple_of(8) && hd <= MAX_HEAD_DIM && out.len() == q.len());
        assert!(ranges.len() == qn && ranges.iter().all(|&(lo, m)| lo < m && m <= n));
        assert!(view.slots.iter().all(|&s| {
            (s as usize + 1) * view.kv_dim >= s as usize * view.kv_dim + view.offset + heads * hd
                && (s as usize + 1) * view.kv_dim <= view.k.len().min(view.v.len())
        }));
        // Not cleared: every score a query reads (its range) is written below first. Scores
        // and the stage start on a cache line: their vectors (at multiples of 16 values)
        // then never straddle two lines (half of them did).
        if scores.len() < qn * padded + LINE_FLOATS {
            scores.resize(qn * padded + LINE_FLOATS, 0.0);
        }
        let skip = to_line(scores.as_ptr());
        let scores = &mut scores[skip..];
        let scale = _mm256_set1_ps(view.scale);
        // SAFETY (whole body): every slot's head row lies inside k and v (asserted above);
        // q/out hold `qn × hd`; scores hold `qn × padded`; key indices stay below `padded`
        // and are clamped to real slots.
        unsafe {
            let kp = view.k.as_ptr().add(view.offset);
            let vp = view.v.as_ptr().add(view.offset);
            let row = |i: usize, base: *const E| -> *const E {
                // Padding keys repeat the last real one; their scores are never used.
                base.add(view.slots[i.min(n - 1)] as usize * view.kv_dim)
            };
            // Slot rows sit in scattered cache blocks, far more of them per step than the
            // caches hold: without prefetching, the loads below wait on memory one at a time.
            let row_bytes = view.kv_dim * std::mem::size_of::<E>();
            let prefetch = |from: usize, to: usize| {
                if !view.prefetch {
                    return;
                }
                for i in from..to.min(n) {
                    let at = view.slots[i] as usize * view.kv_dim;
                    let (k, v) = (
                        view.k.as_ptr().add(at).cast::<i8>(),
                        view.v.as_ptr().add(at).cast::<i8>(),
                    );
                    for off in (0..row_bytes).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(k.add(off));
                        _mm_prefetch::<_MM_HINT_T0>(v.add(off));
                    }
                }
            };
            prefetch(0, KEY_BLOCK);
            // Runs of up to three consecutive queries over the same keys of the same head (a
            // decoding row's heads): their key and value vectors are converted once for all.
            let mut runs: Vec<(usize, usize)> = Vec::new();
            if !staged {
                let mut g = 0;
                while g < qn {
                    let same = (g + 1..(g + 3).min(qn))
                        .take_while(|&h| ranges[h] == ranges[g] && h / per == g / per)
                        .count();
                    runs.push((g, same));
                    g += same + 1;
                }
            }
            // Scores; each score's arithmetic depends only on its query and key, so blocking,
            // the layout and the tile's other rows change nothing.
            let mut stage = if staged {
                vec![0f32; KEY_BLOCK * hd + LINE_FLOATS]
            } else {
                Vec::new()
            };
            let sp = stage.as_mut_ptr().add(to_line(stage.as_ptr()));
            // Rows `kb..kend` of `base` (K or V) into the stage as f32, `hd` apart.
            let stage_rows = |base: *const E, kb: usize, kend: usize| {
                for i in kb..kend {
                    let src = row(i, base);
                    for c in 0..nc {
                        _mm256_storeu_ps(sp.add((i - kb) * hd + c * 8), E::load8(src.add(c * 8)));
                    }
                }
            };
            // Keys `kb..kend` (a multiple of 8 of them) into the stage transposed: element d of
            // key kb + j at `d · KEY_BLOCK + j`, so that eight keys' products are one vector.
            let stage_keys = |kb: usize, kend: usize| {
                for j0 in (kb..kend).step_by(8) {
                    let keys: [*const E; 8] = std::array::from_fn(|j| row(j0 + j, kp));
                    for c in 0..nc {
                        let r: [__m256; 8] = std::array::from_fn(|j| E::load8(keys[j].add(c * 8)));
                        for (l, t) in transpose8(r).into_iter().enumerate() {
                            _mm256_storeu_ps(sp.add((c * 8 + l) * KEY_BLOCK + j0 - kb), t);
                        }
                    }
                }
            };
            for kb in (0..padded).step_by(KEY_BLOCK) {
                prefetch(kb + KEY_BLOCK, kb + 2 * KEY_BLOCK);
                if staged {
                    let kend = (kb + KEY_BLOCK).min(padded);
                    stage_keys(kb, kend);
                    // The next block's keys arrive while this one's scores are computed.
                    for i in kend..(kend + KEY_BLOCK).min(n) {
                        prefetch_head(row(i, kp), hd);
                    }
                    for s0 in (kb..kend).step_by(KEY_STEP) {
                        let kt = sp.add(s0 - kb).cast_const();
                        let so = scores.as_mut_ptr();
                        // Queries four at a time, those needing none of these keys skipped
                        // (a score past a query's range is computed, never used).
                        for g0 in (0..qn).step_by(4) {
                            let g1 = (g0 + 4).min(qn);
                            if !ranges[g0..g1]
                                .iter()
                                .any(|&(lo, m)| lo < s0 + KEY_STEP && m > s0)
                            {
                                continue;
                            }
                            let at = |a: usize| {
                                let g = (g0 + a).min(g1 - 1);
                                (q.as_ptr().add(g * hd), so.add(g * padded + s0))
                            };
                            match g1 - g0 {
                                1 => scores_t::<1>([at(0)], kt, nc, scale),
                                2 => scores_t::<2>([at(0), at(1)], kt, nc, scale),
                                3 => scores_t::<3>([at(0), at(1), at(2)], kt, nc, scale),
                                _ => scores_t::<4>([at(0), at(1), at(2), at(3)], kt, nc, scale),
                            }
                        }
                    }
                    continue;
                }
                // Key steps outer, runs inner: with several heads, each step uses the whole of
                // its four slot rows while they are in L1.
                let first = runs
                    .iter()
                    .map(|&(g, _)| ranges[g].0 & !3)
                    .min()
                    .unwrap_or(0);
                let last = runs.iter().map(|&(g, _)| ranges[g].1).max().unwrap_or(0);
                let end = last.next_multiple_of(4).min(kb + KEY_BLOCK);
                let mut i = kb.max(first);
                while i < end {
                    // The slices of keys further on: their lines arrive while these four are
                    // computed (the rows are scattered over cache blocks, hardware prefetchers
                    // do not follow them). All heads' K and V rows when this pass covers them.
                    for j in i + PREFETCH_KEYS..(i + PREFETCH_KEYS + 4).min(n) {
                        if heads > 1 {
                            prefetch_head(row(j, kp), heads * hd);
                            prefetch_head(row(j, vp), heads * hd);
                        } else {
                            prefetch_head(row(j, kp), hd);
                        }
                    }
                    let ks = [row(i, kp), row(i + 1, kp), row(i + 2, kp), row(i + 3, kp)];
                    let so = scores.as_mut_ptr();
                    for &(g, same) in &runs {
                        let (lo, m) = ranges[g];
                        if i < lo & !3 || i >= m.next_multiple_of(4) {
                            continue;
                        }
                        let ks = ks.map(|k| k.add(hoff(g)));
                        let at = |a: usize| {
                            let g = g + a.min(same);
                            (q.as_ptr().add(g * hd), so.add(g * padded + i))
                        };
                        match same {
                            0 => scores_direct::<E, 1>([at(0)], ks, nc, scale),
                            1 => scores_direct::<E, 2>([at(0), at(1)], ks, nc, scale),
                            _ => scores_direct::<E, 3>([at(0), at(1), at(2)], ks, nc, scale),
                        }
                    }
                    i += 4;
                }
            }
            for (g, &(lo, n)) in ranges.iter().enumerate() {
                // This query's keys only: the 8-lane sums below start at its first key, so
                // where the tile's view begins changes nothing.
                let sg = &mut scores[g * padded + lo..g * padded + padded];
                let n = n - lo;
                if let Some(cap) = view.softcap {
                    for x in &mut sg[..n] {
                        *x = super::soft_cap(*x, cap);
                    }
                }
                // The maximum is the same in any order; eight lanes break the scalar chain.
                // (`maxps` returns its second operand where the first is NaN, as `f32::max`
                // ignores NaN.)
                let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
                let mut i = 0;
                while i + 8 <= n {
                    mv = _mm256_max_ps(_mm256_loadu_ps(sg.as_ptr().add(i)), mv);
                    i += 8;
                }
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), mv);
                let max = sg[i..n]
                    .iter()
                    .chain(&lanes)
                    .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let mx = _mm256_set1_ps(max);
                let mut sum = _mm256_setzero_ps();
                let mut i = 0;
                while i + 8 <= n {
                    let e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(sg.as_ptr().add(i)), mx));
                    _mm256_storeu_ps(sg.as_mut_ptr().add(i), e);
                    sum = _mm256_add_ps(sum, e);
                    i += 8;
                }
                let mut tail = [0f32; 8];
                tail[..n - i].copy_from_slice(&sg[i..n]);
                let e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), mx));
                _mm256_storeu_ps(tail.as_mut_ptr(), e);
                // Lanes past the context contribute nothing.
                tail[n - i..].fill(0.0);
                sg[i..n].copy_from_slice(&tail[..n - i]);
                sum = _mm256_add_ps(sum, _mm256_loadu_ps(tail.as_ptr()));
                let s4 = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps::<1>(sum));
                let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                let total = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<0b01>(s2, s2)));
                let inv = 1.0 / total;
                for x in &mut sg[..n] {
                    *x *= inv;
                }
            }
            // Weighted values: key blocks outer; each output keeps accumulating in key order
            // (stored and reloaded exactly between blocks).
            if staged {
                for kb in (0..n).step_by(KEY_BLOCK) {
                    let kend = (kb + KEY_BLOCK).min(n);
                    stage_rows(vp, kb, kend);
                    for i in kend..(kend + KEY_BLOCK).min(n) {
                        prefetch_head(row(i, vp), hd);
                    }
                    let rows: Vec<*const f32> = (kb..kend)
                        .map(|i| sp.add((i - kb) * hd).cast_const())
                        .collect();
                    // Each query's keys within this block.
                    let span = |g: usize| (kb.max(ranges[g].0), ranges[g].1.min(kend));
                    let (sbase, obase) = (scores.as_ptr(), out.as_mut_ptr());
                    let mut g = 0;
                    while g < qn {
                        let (begin, end) = span(g);
                        // Up to three consecutive queries over the same keys (a row's heads,
                        // or the next row's while both see the whole block).
                        let same = (g + 1..(g + 3).min(qn))
                            .take_while(|&h| span(h) == (begin, end))
                            .count();
                        if end > begin {
                            let rs = &rows[begin - kb..end - kb];
                            let at = |g: usize| (sbase.add(g * padded + begin), obase.add(g * hd));
                            for c0 in (0..nc).step_by(4) {
                                let q3 = [at(g), at(g + 1.min(same)), at(g + same)];
                                match (same, nc - c0) {
                                    (2, 1) => weighted_multi::<f32, 3, 1, false>(q3, rs, 0, c0),
                                    (2, 2) => weighted_multi::<f32, 3, 2, false>(q3, rs, 0, c0),
                                    (2, 3) => weighted_multi::<f32, 3, 3, false>(q3, rs, 0, c0),
                                    (2, _) => weighted_multi::<f32, 3, 4, false>(q3, rs, 0, c0),
                                    (1, 1) => weighted_multi::<f32, 2, 1, false>(
                                        [q3[0], q3[1]],
                                        rs,
                                        0,
                                        c0,
                                    ),
                                    (1, 2) => weighted_multi::<f32, 2, 2, false>(
                                        [q3[0], q3[1]],
                                        rs,
                                        0,
                                        c0,
                                    ),
                                    (1, 3) => weighted_multi::<f32, 2, 3, false>(
                                        [q3[0], q3[1]],
                                        rs,
                                        0,
                                        c0,
                                    ),
                                    (1, _) => weighted_multi::<f32, 2, 4, false>(
                                        [q3[0], q3[1]],
                                        rs,
                                        0,
                                        c0,
                                    ),
                                    (_, 1) => {
                                        weighted_multi::<f32, 1, 1, false>([q3[0]], rs, 0, c0)
                                    }
                                    (_, 2) => {
                                        weighted_multi::<f32, 1, 2, false>([q3[0]], rs, 0, c0)
                                    }
                                    (_, 3) => {
                                        weighted_multi::<f32, 1, 3, false>([q3[0]], rs, 0, c0)
                                    }
                                    _ => weighted_multi::<f32, 1, 4, false>([q3[0]], rs, 0, c0),
                                }
                            }
                        }
                        g += same + 1;
                    }
                }
                return;
            }
            let rows: Vec<*const E> = (0..n).map(|i| row(i, vp)).collect();
            for kb in (0..n).step_by(KEY_BLOCK) {
                for &(g, same) in &runs {
                    let (lo, m) = ranges[g];
                    let (begin, end) = (kb.max(lo), m.min(kb + KEY_BLOCK));
                    if end <= begin {
                        continue;
                    }
                    let (rs, voff) = (&rows[begin..end], hoff(g));
                    let (sb, ob) = (scores.as_ptr(), out.as_mut_ptr());
                    let at = |a: usize| {
                        let g = g + a.min(same);
                        (sb.add(g * padded + begin), ob.add(g * hd))
                    };
                    if same == 0 {
                        weighted_all::<E>(at(0).0, rs, voff, nc, at(0).1);
                        continue;
                    }
                    // A row's heads over the same value rows: each value vector converted
                    // once for all of them.
                    for c0 in (0..nc).step_by(4) {
                        let q3 = [at(0), at(1), at(2)];
                        match (same, nc - c0) {
                            (2, 1) => weighted_multi::<E, 3, 1, true>(q3, rs, voff, c0),
                            (2, 2) => weighted_multi::<E, 3, 2, true>(q3, rs, voff, c0),
                            (2, 3) => weighted_multi::<E, 3, 3, true>(q3, rs, voff, c0),
                            (2, _) => weighted_multi::<E, 3, 4, true>(q3, rs, voff, c0),
                            (_, 1) => weighted_multi::<E, 2, 1, true>([q3[0], q3[1]], rs, voff, c0),
                            (_, 2) => weighted_multi::<E, 2, 2, true>([q3[0], q3[1]], rs, voff, c0),
                            (_, 3) => weighted_multi::<E, 2, 3, true>([q3[0], q3[1]], rs, voff, c0),
                            _ => weighted_multi::<E, 2, 4, true>([q3[0], q3[1]], rs, voff, c0),
                        }
                    }
                }
            }
        }
    }

    /// Scaled scores of four keys `ks` (cache rows) for each of `Q` queries `(query, out)`:
    /// per query exactly the one-query arithmetic (an 8-lane FMA chain per key over the
    /// head's vectors, summed by `hsum4`), each key vector converted once for all queries.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scores_direct<E: KvElem, const Q: usize>(
        qs: [(*const f32, *mut f32); Q],
        ks: [*const E; 4],
        nc: usize,
        scale: __m256,
    ) {
        // SAFETY: each query and key row holds `8 · nc` values, each output 4.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 4]; Q];
            for c in 0..nc {
                for (j, &k) in ks.iter().enumerate() {
                    let kv = E::load8(k.add(c * 8));
                    for (a, &(qp, _)) in acc.iter_mut().zip(&qs) {
                        a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c * 8)), kv, a[j]);
                    }
                }
            }
            for (a, &(_, op)) in acc.iter().zip(&qs) {
                _mm_storeu_ps(op, _mm_mul_ps(hsum4(*a), _mm256_castps256_ps128(scale)));
            }
        }
    }

    /// Keys per score step of a staged tile (two vectors).
    const KEY_STEP: usize = 16;

    /// Scaled scores of `KEY_STEP` staged keys (`kt`: transposed, rows `KEY_BLOCK` apart)
    /// for each of `Q` queries `(query, out)`. Per query and key the same arithmetic as the
    /// direct path: lane `l` of its 8-lane accumulator there, the FMA chain over the head's
    /// elements `8c + l`, is one vector of keys here; the lanes are then summed in `hsum4`'s
    /// tree, ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), and scaled.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scores_t<const Q: usize>(
        qs: [(*const f32, *mut f32); Q],
        kt: *const f32,
        nc: usize,
        scale: __m256,
    ) {
        // SAFETY: each query holds `8 · nc` values, each output `KEY_STEP`; `kt` rows
        // `0..8 · nc` hold `KEY_STEP` keys each.
        unsafe {
            let mut lanes = [[[_mm256_setzero_ps(); 2]; Q]; 8];
            for (l, lane) in lanes.iter_mut().enumerate() {
                let mut acc = [[_mm256_setzero_ps(); 2]; Q];
                for c in 0..nc {
                    let d = c * 8 + l;
                    let k0 = _mm256_loadu_ps(kt.add(d * KEY_BLOCK));
                    let k1 = _mm256_loadu_ps(kt.add(d * KEY_BLOCK + 8));
                    for (a, &(qp, _)) in acc.iter_mut().zip(&qs) {
                        let x = _mm256_broadcast_ss(&*qp.add(d));
                        a[0] = _mm256_fmadd_ps(x, k0, a[0]);
                        a[1] = _mm256_fmadd_ps(x, k1, a[1]);
                    }
                }
                *lane = acc;
            }
            for (i, &(_, op)) in qs.iter().enumerate() {
                for (v, dst) in [op, op.add(8)].into_iter().enumerate() {
                    let p = |l: usize| lanes[l][i][v];
                    let s = _mm256_add_ps(
                        _mm256_add_ps(_mm256_add_ps(p(0), p(1)), _mm256_add_ps(p(2), p(3))),
                        _mm256_add_ps(_mm256_add_ps(p(4), p(5)), _mm256_add_ps(p(6), p(7))),
                    );
                    _mm256_storeu_ps(dst, _mm256_mul_ps(s, scale));
                }
            }
        }
    }

    /// The 8 × 8 transpose of `r` (vector `l` of the result holds lane `l` of each input).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t: [__m256; 8] = std::array::from_fn(|i| {
            let (a, b) = (r[(i / 2) * 2], r[(i / 2) * 2 + 1]);
            if i % 2 == 0 {
                _mm256_unpacklo_ps(a, b)
            } else {
                _mm256_unpackhi_ps(a, b)
            }
        });
        // Lanes 0/1 (from unpacklo) and 2/3 (unpackhi) of each 4-key group.
        let u = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        std::array::from_fn(|l| {
            if l < 4 {
                _mm256_permute2f128_ps::<0x20>(u[l], u[l + 4])
            } else {
                _mm256_permute2f128_ps::<0x31>(u[l - 4], u[l])
            }
        })
    }

    /// [`weighted`] for `Q` queries `(weights, output)` over the same value rows (cache rows,
    /// or a staged tile's f32 rows), `W` vectors from element `voff + 8·c0` of each: each value
    /// vector loaded (converted) once for all of them; per output element the same FMA
    /// sequence. `AHEAD`: prefetch the rows 16 keys on (cache rows; a staged block is in L1).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn weighted_multi<E: KvElem, const Q: usize, const W: usize, const AHEAD: bool>(
        qs: [(*const f32, *mut f32); Q],
        rows: &[*const E],
        voff: usize,
        c0: usize,
    ) {
        // SAFETY: each weight row holds rows.len() weights; each value row (c0 + W) · 8
        // values; each output (c0 + W) · 8.
        unsafe {
            let mut acc: [[__m256; W]; Q] = std::array::from_fn(|a| {
                std::array::from_fn(|c| _mm256_loadu_ps(qs[a].1.add((c0 + c) * 8)))
            });
            for (i, &v) in rows.iter().enumerate() {
                if let Some(&ahead) = rows.get(i + PREFETCH_KEYS).filter(|_| AHEAD) {
                    prefetch_head(ahead.add(voff + c0 * 8), W * 8);
                }
                let w: [__m256; Q] = std::array::from_fn(|a| _mm256_set1_ps(*qs[a].0.add(i)));
                for c in 0..W {
                    let x = E::load8(v.add(voff + (c0 + c) * 8));
                    for (qa, wa) in acc.iter_mut().zip(&w) {
                        qa[c] = _mm256_fmadd_ps(*wa, x, qa[c]);
                    }
                }
            }
            for (a, qa) in acc.iter().enumerate() {
                for (c, x) in qa.iter().enumerate() {
                    _mm256_storeu_ps(qs[a].1.add((c0 + c) * 8), *x);
                }
            }
        }
    }

    /// [`weighted`] over a whole head (`nc` vectors), eight vectors at a time.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn weighted_all<E: KvElem>(
        p: *const f32,
        rows: &[*const E],
        voff: usize,
        nc: usize,
        out: *mut f32,
    ) {
        // SAFETY: forwarded to `weighted` with the caller's sizes.
        unsafe {
            for c0 in (0..nc).step_by(8) {
                let o = out.add(c0 * 8);
                match nc - c0 {
                    1 => weighted::<E, 1>(p, rows, voff + c0 * 8, o),
                    2 => weighted::<E, 2>(p, rows, voff + c0 * 8, o),
                    3 => weighted::<E, 3>(p, rows, voff + c0 * 8, o),
                    4 => weighted::<E, 4>(p, rows, voff + c0 * 8, o),
                    5 => weighted::<E, 5>(p, rows, voff + c0 * 8, o),
                    6 => weighted::<E, 6>(p, rows, voff + c0 * 8, o),
                    7 => weighted::<E, 7>(p, rows, voff + c0 * 8, o),
                    _ => weighted::<E, 8>(p, rows, voff + c0 * 8, o),
                }
            }
        }
    }

    /// `out[c] += Σᵢ p[i]·v_i[at + 8c]` for `W` vectors, keys in order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn weighted<E: KvElem, const W: usize>(
        p: *const f32,
        rows: &[*const E],
        at: usize,
        out: *mut f32,
    ) {
        // SAFETY: `p` holds rows.len() weights; each row holds at + W · 8 values; `out` W · 8.
        unsafe {
            let mut acc: [__m256; W] = std::array::from_fn(|c| _mm256_loadu_ps(out.add(c * 8)));
            for (i, &v) in rows.iter().enumerate() {
                if let Some(&ahead) = rows.get(i + PREFETCH_KEYS) {
                    prefetch_head(ahead.add(at), W * 8);
                }
                let w = _mm256_set1_ps(*p.add(i));
                let v = v.add(at);
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(w, E::load8(v.add(c * 8)), *a);
                }
            }
            for (c, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(c * 8), *a);
            }
        }
    }
}

fn attend_group_dispatch<E: KvElem>(
    q: &[f32],
    ranges: &[(usize, usize)],
    view: &HeadView<E>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::model::quant::simd_available()
            && view.head_dim.is_multiple_of(8)
            && view.head_dim <= simd_x86::MAX_HEAD_DIM
            && !view.slots.is_empty()
        {
            #[allow(unsafe_code)]
            // SAFETY: AVX2, FMA and F16C were detected at run time.
            unsafe {
                simd_x86::attend_group(q, ranges, view, scores, out)
            };
            return;
        }
    }
    attend_group(q, ranges, view, scores, out)
}

/// Scores scratch a thread keeps between calls, at most (16 MiB of f32).
const KEEP_SCORES: usize = 1 << 22;

thread_local! {
    /// Each thread's scores scratch, kept between calls: a prefill tile's (~0.7 MB) would
    /// otherwise be allocated and zeroed per task.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Consecutive rows of one sequence attended together (their keys read once per tile; 40:
/// the warm autocomplete step's 76 rows fastest among 8 / 16 / 24 / 40 / 64 / 76).
const ROW_TILE: usize = 40;

/// Causal attention of every row over its own sequence's cached context (which already holds
/// this step's keys/values). `q: (T, num_heads * head_dim)` after rope; returns the same shape.
pub fn attend(
    q: &[f32],
    layer: &LayerKv,
    batch: &ForwardBatch,
    plan: &AttentionPlan,
    dims: HeadDims,
) -> Vec<f32> {
    match layer {
        LayerKv::F32 { k, v } => attend_in(q, k, v, batch, plan, dims),
        LayerKv::F16 { k, v } => attend_in(q, k, v, batch, plan, dims),
    }
}

fn attend_in<E: KvElem>(
    q: &[f32],
    layer_k: &[E],
    layer_v: &[E],
    batch: &ForwardBatch,
    plan: &AttentionPlan,
    dims: HeadDims,
) -> Vec<f32> {
    let HeadDims {
        num_heads,
        num_kv_heads,
        head_dim,
        scale,
        softcap,
        window,
    } = dims;
    let kv_dim = num_kv_heads * head_dim;
    let group = num_heads / num_kv_heads;
    let q_dim = num_heads * head_dim;
    // Tiles of up to ROW_TILE consecutive rows of the same sequence, of balanced sizes (76
    // rows: 38 + 38, not 40 + 36).
    let mut tiles = Vec::new();
    let mut r = 0;
    for s in &batch.seqs {
        let count = s.query_len.div_ceil(ROW_TILE);
        tiles.extend((0..count).map(|i| {
            (
                r + s.query_len * i / count,
                r + s.query_len * (i + 1) / count,
            )
        }));
        r += s.query_len;
    }
    // Single rows (decoding), when there are enough of them: one task per row, all KV heads
    // in one pass over the row's slot rows (or, for larger query groups, heads in turn, the
    // first head's pass prefetching the whole slot rows for the others). Otherwise one task per (tile, KV head): with few rows so every
    // core works, and for multi-row tiles (prefill) so the cores' shares of a long tile's
    // arithmetic come out even.
    let split = tiles.len() < 2 * rayon::current_num_threads();
    let tasks: Vec<(usize, usize, std::ops::Range<usize>)> = tiles
        .iter()
        .flat_map(|&(a, b)| {
            let per = if split || b - a > 1 { 1 } else { num_kv_heads };
            (0..num_kv_heads)
                .step_by(per)
                .map(move |h| (a, b, h..(h + per).min(num_kv_heads)))
        })
        .collect();
    let results: Vec<(usize, usize, Vec<Vec<f32>>)> = tasks
        .into_par_iter()
        .map(|(r0, r1, heads)| {
            let (h0, h1) = (heads.start, heads.end);
            // A decoding row's heads in one pass over its slot rows when they take the direct
            // path (≤ 3 queries per head): each row's K and V lines are used by every head
            // while in cache, the arithmetic spread over their arrival.
            let calls: Vec<std::ops::Range<usize>> = if h1 - h0 > 1 && group <= 3 {
                std::iter::once(h0..h1).collect()
            } else {
                (h0..h1).map(|h| h..h + 1).collect()
            };
            let together = calls.len() == 1 && h1 - h0 > 1;
            let outs = calls
                .into_iter()
                .flat_map(|hs| {
                    let rows = r1 - r0;
                    let mut qs = Vec::with_capacity(hs.len() * rows * group * head_dim);
                    let mut ranges = Vec::with_capacity(hs.len() * rows * group);
                    for kvh in hs.clone() {
                        for t in r0..r1 {
                            let base = t * q_dim + kvh * group * head_dim;
                            qs.extend_from_slice(&q[base..base + group * head_dim]);
                            let end = batch.positions[t] as usize + 1;
                            let start = window.map_or(0, |w| end.saturating_sub(w));
                            ranges.extend(std::iter::repeat_n((start, end), group));
                        }
                    }
                    // The tile's view starts at its earliest key (rows are consecutive
                    // positions, so a sliding window skips all but a few keys outside any
                    // row's window).
                    let first = ranges.iter().map(|r| r.0).min().unwrap_or(0);
                    let longest = ranges.iter().map(|r| r.1).max().unwrap_or(0);
                    ranges
                        .iter_mut()
                        .for_each(|r| *r = (r.0 - first, r.1 - first));
                    let view = HeadView {
                        k: layer_k,
                        v: layer_v,
                        slots: plan.slots(plan.row_seq[r0], window.is_some(), first, longest),
                        kv_dim,
                        offset: hs.start * head_dim,
                        head_dim,
                        heads: hs.len(),
                        scale,
                        softcap,
                        prefetch: !together && h1 - h0 > 1 && hs.start == h0,
                    };
                    let mut o = vec![0f32; qs.len()];
                    SCORES.with_borrow_mut(|scores| {
                        attend_group_dispatch(&qs, &ranges, &view, scores, &mut o);
                        // A long context's tile is not worth keeping between steps.
                        if scores.capacity() > KEEP_SCORES {
                            *scores = Vec::new();
                        }
                    });
                    // Per head, as the results are gathered below.
                    o.chunks_exact(rows * group * head_dim)
                        .map(<[f32]>::to_vec)
                        .collect::<Vec<_>>()
                })
                .collect();
            (r0, h0, outs)
        })
        .collect();
    let mut out = vec![0f32; q.len()];
    let width = group * head_dim;
    for (r0, h0, outs) in results {
        for (kvh, o) in (h0..).zip(&outs) {
            for (i, chunk) in o.chunks_exact(width).enumerate() {
                let base = (r0 + i) * q_dim + kvh * width;
                out[base..base + width].copy_from_slice(chunk);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::model::test_values as values;

    /// Equal bit for bit (NaNs and signed zeros included), and of equal length.
    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// YaRN frequencies against a float64 port of transformers' `_compute_yarn_parameters`
    /// (head_dim 16, base 10000, factor 4, original context 128, betas 32/1).
    #[test]
    fn yarn_frequencies_match_transformers() {
        let v = serde_json::json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 8,
            "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 4, "rope_theta": 10000.0,
            "rope_scaling": {"type": "yarn", "factor": 4.0,
                             "original_max_position_embeddings": 128}});
        let c = ModelConfig::from_hf_json(&v, std::path::Path::new("c")).expect("config");
        let rope = Rope::new(&c);
        let want = [
            1.0,
            0.237_170_825,
            0.05,
            0.007_905_694_15,
            0.0025,
            0.000_790_569_415,
            0.000_25,
            7.905_694_15e-5,
        ];
        for (a, b) in rope.inv_freq.iter().zip(want) {
            assert!((f64::from(*a) - b).abs() <= 1e-6 * b, "{a} vs {b}");
        }
        assert!((f64::from(rope.attention_scaling) - 1.138_629_436_111_989).abs() < 1e-6);
        // Partial rotary leaves the tail of each head alone.
        let mut c = c;
        c.features.rotary_dim = Some(8);
        let t = Rope::new(&c).tables(&[3]);
        let mut x: Vec<f32> = (0..32).map(|i| i as f32).collect();
        t.apply(&mut x, 2);
        for head in 0..2 {
            let h = &x[head * 16..head * 16 + 16];
            assert_eq!(
                &h[8..],
                &((head * 16 + 8)..(head * 16 + 16))
                    .map(|i| i as f32)
                    .collect::<Vec<_>>()[..]
            );
            assert_ne!(h[0], (head * 16) as f32);
        }
    }

    /// The dispatched (AVX2 where available) path agrees with the portable one for every
    /// context length around the 4-key and 8-lane boundaries, with scattered slots.
    #[test]
    fn simd_and_portable_paths_agree() {
        // Groups of 3 (one row's heads) take the direct path; 8 (a prefill tile) the staged one.
        for (head_dim, group) in [
            (64, 3),
            (24, 3),
            (128, 3),
            (64, 8),
            (24, 8),
            (128, 8),
            (64, 4),
            (64, 13),
            (24, 22),
        ] {
            let kv_heads = 2;
            let kv_dim = kv_heads * head_dim;
            let slots_total = 160;
            let k = values(slots_total * kv_dim, 1);
            let v = values(slots_total * kv_dim, 2);
            let q = values(group * head_dim, 3);
            for n in (1..=19).chain([70, 130]) {
                let slots: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % 160).collect();
                let view = HeadView {
                    k: &k,
                    v: &v,
                    slots: &slots,
                    kv_dim,
                    offset: head_dim,
                    head_dim,
                    heads: 1,
                    scale: 0.125,
                    softcap: None,
                    prefetch: true,
                };
                // Query vectors with different context lengths, as in a prefill tile.
                // ... and sliding windows starting anywhere, with and without soft-capping.
                // ... and a decoding row's heads: every query over the same keys.
                let cases = [
                    (None, None, false),
                    (Some(5), None, false),
                    (Some(9), Some(3.0), false),
                    (None, None, true),
                    (Some(9), Some(3.0), true),
                ];
                for (window, softcap, shared) in cases {
                    let ranges: Vec<(usize, usize)> = (0..group)
                        .map(|g| {
                            let end = if shared { n } else { n - g.min(n - 1) };
                            (window.map_or(0, |w: usize| end.saturating_sub(w)), end)
                        })
                        .collect();
                    let view = HeadView { softcap, ..view };
                    let (mut a, mut b) = (vec![0f32; q.len()], vec![0f32; q.len()]);
                    attend_group(&q, &ranges, &view, &mut Vec::new(), &mut a);
                    // Scratch left over from other calls (NaN): no stale score is ever read.
                    let mut scratch = vec![f32::NAN; 1 << 14];
                    attend_group_dispatch(&q, &ranges, &view, &mut scratch, &mut b);
                    for (x, y) in a.iter().zip(&b) {
                        assert!((x - y).abs() < 1e-5, "hd {head_dim} n {n}: {x} vs {y}");
                    }
                    // Each query alone gives the same bits as in its tile (batch invariance).
                    for (g, range) in ranges.iter().enumerate() {
                        let qg = &q[g * head_dim..(g + 1) * head_dim];
                        let mut alone = vec![0f32; head_dim];
                        attend_group_dispatch(qg, &[*range], &view, &mut scratch, &mut alone);
                        let tiled = &b[g * head_dim..(g + 1) * head_dim];
                        assert!(
                            same_bits(&alone, tiled),
                            "hd {head_dim} n {n} group {group} query {g}"
                        );
                    }
                }
            }
        }
    }

    /// A decoding row's heads in one pass (the view covering several KV heads) give each
    /// head's bits of a pass of its own, on both paths.
    #[test]
    fn heads_in_one_pass_match_one_head_at_a_time() {
        for (head_dim, group) in [(64, 3), (24, 2), (128, 1), (64, 3)] {
            let kv_heads = 3;
            let kv_dim = kv_heads * head_dim;
            let k = values(160 * kv_dim, 4);
            let v = values(160 * kv_dim, 5);
            let q = values(kv_heads * group * head_dim, 6);
            for n in [1, 5, 70, 130] {
                let slots: Vec<u32> = (0..n as u32).map(|i| (i * 11 + 5) % 160).collect();
                let ranges = vec![(0, n); kv_heads * group];
                let view = HeadView {
                    k: &k,
                    v: &v,
                    slots: &slots,
                    kv_dim,
                    offset: 0,
                    head_dim,
                    heads: kv_heads,
                    scale: 0.125,
                    softcap: None,
                    prefetch: false,
                };
                let width = group * head_dim;
                let mut all = vec![0f32; q.len()];
                attend_group_dispatch(&q, &ranges, &view, &mut Vec::new(), &mut all);
                let mut portable = vec![0f32; q.len()];
                attend_group(&q, &ranges, &view, &mut Vec::new(), &mut portable);
                for h in 0..kv_heads {
                    let one = HeadView {
                        offset: h * head_dim,
                        heads: 1,
                        ..view
                    };
                    let qh = &q[h * width..(h + 1) * width];
                    let mut alone = vec![0f32; width];
                    attend_group_dispatch(qh, &ranges[..group], &one, &mut Vec::new(), &mut alone);
                    let got = &all[h * width..(h + 1) * width];
                    assert!(
                        same_bits(&alone, got),
                        "hd {head_dim} group {group} n {n} head {h}"
                    );
                    let mut alone_p = vec![0f32; width];
                    attend_group(qh, &ranges[..group], &one, &mut Vec::new(), &mut alone_p);
                    assert_eq!(alone_p, portable[h * width..(h + 1) * width]);
                }
            }
        }
    }

    /// Writing into an f16 cache rounds each value to nearest (ties to even), as one
    /// conversion at a time would, whatever the row width.
    #[test]
    fn f16_writes_round_each_value_to_nearest() {
        let kv_dim = 20;
        let mut cache = crate::model::KvCache::with_windows(
            &[false],
            kv_dim,
            2,
            0,
            4,
            crate::model::KvDtype::F16,
        );
        let mut k = values(3 * kv_dim, 5);
        // Exact ties between two f16 values, and values beyond f16's range.
        k[0] = 1.0 + 2f32.powi(-11);
        k[1] = 1.0 + 3.0 * 2f32.powi(-11);
        k[2] = 70_000.0;
        let v: Vec<f32> = k.iter().map(|x| -x * 3.7).collect();
        let slots = [5u32, 0, 7];
        write_kv(cache.layer_mut(0), &slots, &k, &v, kv_dim);
        let LayerKv::F16 { k: lk, v: lv } = cache.layer_mut(0) else {
            panic!("f16 layer expected");
        };
        for (t, &slot) in slots.iter().enumerate() {
            for i in 0..kv_dim {
                let at = slot as usize * kv_dim + i;
                let (wk, wv) = (k[t * kv_dim + i], v[t * kv_dim + i]);
                assert_eq!(
                    lk[at].to_bits(),
                    half::f16::from_f32(wk).to_bits(),
                    "k {t} {i}"
                );
                assert_eq!(
                    lv[at].to_bits(),
                    half::f16::from_f32(wv).to_bits(),
                    "v {t} {i}"
                );
            }
        }
        assert_eq!(lk[5 * kv_dim].to_f32(), 1.0);
        assert_eq!(lk[5 * kv_dim + 1].to_f32(), 1.0 + 2.0 * 2f32.powi(-10));
        assert!(lk[5 * kv_dim + 2].to_f32().is_infinite());
    }

    /// An f16 cache holding values that f16 represents exactly gives bit-identical attention
    /// to an f32 cache holding the same values (both kernels): storage is the only difference.
    #[test]
    fn f16_cache_is_the_f32_cache_of_its_rounded_values() {
        let (head_dim, kv_heads, group) = (64, 2, 3);
        let kv_dim = kv_heads * head_dim;
        let k16: Vec<half::f16> = values(160 * kv_dim, 1)
            .into_iter()
            .map(half::f16::from_f32)
            .collect();
        let v16: Vec<half::f16> = values(160 * kv_dim, 2)
            .into_iter()
            .map(half::f16::from_f32)
            .collect();
        let (k32, v32): (Vec<f32>, Vec<f32>) = (
            k16.iter().map(|x| x.to_f32()).collect(),
            v16.iter().map(|x| x.to_f32()).collect(),
        );
        let q = values(group * head_dim, 3);
        let slots: Vec<u32> = (0..37u32).map(|i| (i * 7 + 3) % 160).collect();
        let ranges: Vec<(usize, usize)> = (0..group).map(|g| (0, 37 - g)).collect();
        let view32 = HeadView {
            k: &k32[..],
            v: &v32[..],
            slots: &slots,
            kv_dim,
            offset: head_dim,
            head_dim,
            heads: 1,
            scale: 0.125,
            softcap: None,
            prefetch: true,
        };
        let view16 = HeadView {
            k: &k16[..],
            v: &v16[..],
            slots: &slots,
            kv_dim,
            offset: head_dim,
            head_dim,
            heads: 1,
            scale: 0.125,
            softcap: None,
            prefetch: true,
        };
        let run = |f: &dyn Fn(&mut [f32])| {
            let mut o = vec![0f32; q.len()];
            f(&mut o);
            o
        };
        let portable32 = run(&|o| attend_group(&q, &ranges, &view32, &mut Vec::new(), o));
        let portable16 = run(&|o| attend_group(&q, &ranges, &view16, &mut Vec::new(), o));
        assert_eq!(portable32, portable16);
        let fast32 = run(&|o| attend_group_dispatch(&q, &ranges, &view32, &mut Vec::new(), o));
        let fast16 = run(&|o| attend_group_dispatch(&q, &ranges, &view16, &mut Vec::new(), o));
        assert_eq!(fast32, fast16);
        // Writing rounds to nearest.
        let mut layer = crate::model::kv_cache::LayerKv::F16 {
            k: crate::model::kv_cache::KvBuf::zeroed(kv_dim),
            v: crate::model::kv_cache::KvBuf::zeroed(kv_dim),
        };
        let row = values(kv_dim, 4);
        write_kv(&mut layer, &[0], &row, &row, kv_dim);
        let LayerKv::F16 { k, .. } = &layer else {
            unreachable!("built as f16")
        };
        assert!(k
            .iter()
            .zip(&row)
            .all(|(a, &b)| *a == half::f16::from_f32(b)));
    }
}
