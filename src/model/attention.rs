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

/// Rotary embedding frequencies (`head_dim / 2` of them), HF's rotate-half layout.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

/// `cos`/`sin` of every row's position: `(T, head_dim / 2)` each.
pub struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl Rope {
    /// Frequencies as transformers computes them in float32, with the config's scaling.
    pub fn new(config: &ModelConfig) -> Self {
        let dim = config.head_dim;
        let theta = config.rope_theta as f32;
        let mut inv_freq: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / dim as f32))
            .collect();
        match &config.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => {
                inv_freq.iter_mut().for_each(|f| *f /= *factor as f32);
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
        Rope { inv_freq }
    }

    /// Tables for the given positions, computed once per forward and shared by all layers.
    pub fn tables(&self, positions: &[u32]) -> RopeTables {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        RopeTables { cos, sin, half }
    }
}

impl RopeTables {
    /// Rotates `x: (T, heads * head_dim)` in place: `x·cos + rotate_half(x)·sin`.
    pub fn apply(&self, x: &mut [f32], heads: usize) {
        let half = self.half;
        let row_len = heads * 2 * half;
        for (t, row) in x.chunks_exact_mut(row_len).enumerate() {
            let cos = &self.cos[t * half..(t + 1) * half];
            let sin = &self.sin[t * half..(t + 1) * half];
            for head in row.chunks_exact_mut(2 * half) {
                let (a, b) = head.split_at_mut(half);
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
}

impl AttentionPlan {
    /// Derives the plan from a (validated) batch.
    pub fn new(batch: &ForwardBatch, block_size: usize) -> Self {
        let mut row_seq = Vec::with_capacity(batch.token_ids.len());
        let mut context_slots = Vec::with_capacity(batch.seqs.len());
        for (i, s) in batch.seqs.iter().enumerate() {
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
        }
    }
}

/// Head counts of one attention layer.
#[derive(Debug, Clone, Copy)]
pub struct HeadDims {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
}

/// Writes the new rows' keys and values (`(T, kv_dim)` each) into their slots.
pub fn write_kv(layer: &mut LayerKv, slots: &[u32], k: &[f32], v: &[f32], kv_dim: usize) {
    for (t, &slot) in slots.iter().enumerate() {
        let dst = slot as usize * kv_dim;
        layer.k[dst..dst + kv_dim].copy_from_slice(&k[t * kv_dim..(t + 1) * kv_dim]);
        layer.v[dst..dst + kv_dim].copy_from_slice(&v[t * kv_dim..(t + 1) * kv_dim]);
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent lanes so the compiler vectorises; fixed order, so deterministic.
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut sum = 0f32;
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i];
    }
    acc.iter().sum::<f32>() + sum
}

/// Where one (row, head) reads its keys and values.
struct HeadView<'a> {
    k: &'a [f32],
    v: &'a [f32],
    slots: &'a [u32],
    kv_dim: usize,
    offset: usize,
    scale: f32,
}

/// Softmax(q·Kᵀ·scale)·V for one query head, written into `out` (zeroed).
#[inline(always)]
fn attend_one(q: &[f32], view: &HeadView, scores: &mut Vec<f32>, out: &mut [f32]) {
    let hd = q.len();
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for &s in view.slots {
        let base = s as usize * view.kv_dim + view.offset;
        let x = dot(q, &view.k[base..base + hd]) * view.scale;
        max = max.max(x);
        scores.push(x);
    }
    let mut sum = 0f32;
    for x in scores.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    for (&s, &w) in view.slots.iter().zip(scores.iter()) {
        let base = s as usize * view.kv_dim + view.offset;
        let p = w * inv;
        for (oi, vi) in out.iter_mut().zip(&view.v[base..base + hd]) {
            *oi += p * vi;
        }
    }
}

/// The same function compiled for AVX2 (identical operation order, wider registers).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_one_avx2(q: &[f32], view: &HeadView, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend_one(q, view, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn attend_one_dispatch(q: &[f32], view: &HeadView, scores: &mut Vec<f32>, out: &mut [f32]) {
    use std::sync::OnceLock;
    static AVX2: OnceLock<bool> = OnceLock::new();
    if *AVX2.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
        // SAFETY: AVX2 and FMA were detected at run time.
        unsafe { attend_one_avx2(q, view, scores, out) }
    } else {
        attend_one(q, view, scores, out)
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn attend_one_dispatch(q: &[f32], view: &HeadView, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend_one(q, view, scores, out)
}

/// Causal attention of every row over its own sequence's cached context (which already holds
/// this step's keys/values). `q: (T, num_heads * head_dim)` after rope; returns the same shape.
pub fn attend(
    q: &[f32],
    layer: &LayerKv,
    batch: &ForwardBatch,
    plan: &AttentionPlan,
    dims: HeadDims,
) -> Vec<f32> {
    let HeadDims {
        num_heads,
        num_kv_heads,
        head_dim,
    } = dims;
    let kv_dim = num_kv_heads * head_dim;
    let group = num_heads / num_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut out = vec![0f32; q.len()];
    out.par_chunks_mut(head_dim).enumerate().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, (idx, o)| {
            let (t, h) = (idx / num_heads, idx % num_heads);
            let view = HeadView {
                k: &layer.k,
                v: &layer.v,
                slots: &plan.context_slots[plan.row_seq[t]][..=batch.positions[t] as usize],
                kv_dim,
                offset: (h / group) * head_dim,
                scale,
            };
            attend_one_dispatch(&q[idx * head_dim..(idx + 1) * head_dim], &view, scores, o);
        },
    );
    out
}
