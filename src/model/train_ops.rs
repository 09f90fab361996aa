//! Fused kernels of the LoRA training graph, as candle custom ops with hand-written backward
//! passes: RMSNorm, SwiGLU and rotary + causal grouped-query attention.
//!
//! Composed from candle's elementwise ops, each of these is a dozen graph nodes, each a full
//! pass over memory with its own allocation, and as many again in the backward pass; that
//! overhead cost about as much as the step's matrix products. Each op here reads its inputs
//! once per pass. Tests check values and gradients against the composed candle ops.

use std::sync::Arc;

use super::vmath::fast_exp;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape};
use candle_core::{Storage, Tensor};
use rayon::prelude::*;

/// The contiguous f32 data a custom op's CPU kernel reads.
pub(super) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(x) = storage else {
        candle_core::bail!("{op}: f32 input expected");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous input expected");
    };
    Ok(&x[start..end])
}

/// A tensor's values as a flat vector (backward passes read their saved inputs this way).
fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Runs `f` on a tensor's contiguous f32 data without copying it.
fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{op}: CPU tensor expected");
    };
    f(contiguous_f32(cpu, layout, op)?)
}

fn matrix(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// Replaces each `v` by `e^(v − shift)` and returns their sum.
pub(super) fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
    row.iter_mut().for_each(|v| *v = fast_exp(*v - shift));
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        lanes.iter_mut().zip(c).for_each(|(l, v)| *l += v);
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// `1 / sqrt(mean(x²) + eps)` of a row.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let sum2: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (sum2 / row.len() as f32 + eps).sqrt()
}

/// RMSNorm with a frozen weight: `y = x / rms(x) · w`, row by row; backward gives `x` its
/// gradient `r·(w⊙g) − x·r³·Σ(w⊙g⊙x)/n`.
pub(super) struct RmsNorm {
    /// The norm's weight (one value per column).
    pub weight: Arc<Vec<f32>>,
    /// Added to the mean square.
    pub eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "rms-norm")?;
        let n = self.weight.len();
        if n == 0 || !x.len().is_multiple_of(n) {
            candle_core::bail!("rms-norm: rows of {n} expected");
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| {
            let r = inv_rms(x, self.eps);
            for ((y, x), w) in y.iter_mut().zip(x).zip(self.weight.iter()) {
                *y = x * r * w;
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let n = self.weight.len();
        let g = values(grad)?;
        let dx = with_f32(arg, "rms-norm", |x| {
            let mut dx = vec![0f32; x.len()];
            dx.par_chunks_mut(n)
                .zip(x.par_chunks(n).zip(g.par_chunks(n)))
                .for_each(|(dx, (x, g))| {
                    let r = inv_rms(x, self.eps);
                    let dot: f32 = x
                        .iter()
                        .zip(g)
                        .zip(self.weight.iter())
                        .map(|((x, g), w)| x * g * w)
                        .sum();
                    let c = r * r * r * dot / n as f32;
                    for (((d, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(self.weight.iter()) {
                        *d = r * w * g - x * c;
                    }
                });
            Ok(dx)
        })?;
        Ok(Some(matrix(dx, arg.dims())?))
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

/// SwiGLU on the stacked gate/up projection: `x: (n, 2·width)` (gate columns, then up)
/// → `silu(gate) · up`, `(n, width)`. Taking the stacked output whole keeps slicing (a copy
/// and, backward, a zero-padded copy per slice) out of the graph.
pub(super) struct SwiGlu {
    /// Columns of the gate (and of the up) half.
    pub width: usize,
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "swiglu")?;
        let w = self.width;
        if w == 0 || !x.len().is_multiple_of(2 * w) {
            candle_core::bail!("swiglu: rows of 2 × {w} expected");
        }
        let rows = x.len() / (2 * w);
        let mut y = vec![0f32; rows * w];
        y.par_chunks_mut(w)
            .zip(x.par_chunks(2 * w))
            .for_each(|(y, x)| {
                let (g, u) = x.split_at(w);
                for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                    *y = g * sigmoid(*g) * u;
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((rows, w))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let w = self.width;
        let g = values(grad)?;
        let dx = with_f32(arg, "swiglu", |x| {
            let mut dx = vec![0f32; x.len()];
            dx.par_chunks_mut(2 * w)
                .zip(x.par_chunks(2 * w).zip(g.par_chunks(w)))
                .for_each(|(dx, (x, g))| {
                    let (dg, du) = dx.split_at_mut(w);
                    let (x, u) = x.split_at(w);
                    for i in 0..w {
                        let s = sigmoid(x[i]);
                        du[i] = g[i] * x[i] * s;
                        dg[i] = g[i] * u[i] * s * (1.0 + x[i] * (1.0 - s));
                    }
                });
            Ok(dx)
        })?;
        Ok(Some(matrix(dx, arg.dims())?))
    }
}

/// Rotary embedding then causal grouped-query attention over a padded batch, straight from the
/// stacked q/k/v projection's rows: `(b·t, heads·d + 2·kv_heads·d)` → `(b·t, heads·d)`.
/// Rows are sequence-major; each sequence's row `i` sits at position `i`. Nothing of size
/// `t × t` outlives a head: the backward pass recomputes each head's probabilities.
pub(super) struct RopeAttention {
    /// Sequences in the batch.
    pub batch: usize,
    /// Padded sequence length.
    pub seq_len: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// `cos`/`sin` per position and rotary pair: `(t, d/2)` each.
    pub cos: Arc<Vec<f32>>,
    /// See `cos`.
    pub sin: Arc<Vec<f32>>,
    /// Score multiplier (`1/√d`).
    pub scale: f32,
}

/// `y = x·cos + rotate_half(x)·sin` for one head's row.
fn rope(x: &[f32], cos: &[f32], sin: &[f32], y: &mut [f32]) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        y[i] = a * cos[i] - b * sin[i];
        y[i + half] = b * cos[i] + a * sin[i];
    }
}

/// The transpose of [`rope`] (rotation by the opposite angle): gradients back through it.
fn rope_back(g: &[f32], cos: &[f32], sin: &[f32], y: &mut [f32]) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = (g[i], g[i + half]);
        y[i] = a * cos[i] + b * sin[i];
        y[i + half] = b * cos[i] - a * sin[i];
    }
}

/// Softmax of a row in place.
fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let inv = 1.0 / exp_shifted(row, max);
    row.iter_mut().for_each(|v| *v *= inv);
}

impl RopeAttention {
    /// Columns of a stacked q/k/v row.
    fn width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// Column where query head `h` starts in a stacked row (then key and value heads, below).
    fn q_at(&self, h: usize) -> usize {
        h * self.head_dim
    }

    /// Column where key head `h` starts.
    fn k_at(&self, h: usize) -> usize {
        (self.heads + h) * self.head_dim
    }

    /// Column where value head `h` starts.
    fn v_at(&self, h: usize) -> usize {
        (self.heads + self.kv_heads + h) * self.head_dim
    }

    fn check(&self, qkv: usize) -> Result<()> {
        let rows = self.batch * self.seq_len;
        let ok = self.kv_heads > 0
            && self.heads.is_multiple_of(self.kv_heads)
            && self.head_dim.is_multiple_of(2)
            && qkv == rows * self.width()
            && self.cos.len() == self.seq_len * self.head_dim / 2
            && self.sin.len() == self.cos.len();
        if !ok {
            candle_core::bail!("rope-attention: input does not match the batch shape");
        }
        Ok(())
    }

    /// Sequence `s`'s `(t, d)` block of `x` (rows of `stride` columns) starting at column
    /// `col`, rotated and times `mul`.
    fn rotated(&self, x: &[f32], stride: usize, col: usize, s: usize, mul: f32) -> Vec<f32> {
        let (t, d) = (self.seq_len, self.head_dim);
        let half = d / 2;
        let mut out = vec![0f32; t * d];
        for (i, o) in out.chunks_exact_mut(d).enumerate() {
            let at = (s * t + i) * stride + col;
            rope(
                &x[at..at + d],
                &self.cos[i * half..(i + 1) * half],
                &self.sin[i * half..(i + 1) * half],
                o,
            );
            if mul != 1.0 {
                o.iter_mut().for_each(|v| *v *= mul);
            }
        }
        out
    }

    /// Sequence `s`'s `(t, d)` block of `x` at column `col`, as it is.
    fn rows(&self, x: &[f32], stride: usize, col: usize, s: usize) -> Vec<f32> {
        let (t, d) = (self.seq_len, self.head_dim);
        let mut out = Vec::with_capacity(t * d);
        for i in 0..t {
            let at = (s * t + i) * stride + col;
            out.extend_from_slice(&x[at..at + d]);
        }
        out
    }

    /// Writes a `(t, d)` block back into `out` (rows of `stride`) at column `col`.
    fn scatter(&self, rows: &[f32], stride: usize, col: usize, s: usize, out: &mut [f32]) {
        let (t, d) = (self.seq_len, self.head_dim);
        for i in 0..t {
            let at = (s * t + i) * stride + col;
            out[at..at + d].copy_from_slice(&rows[i * d..(i + 1) * d]);
        }
    }

    /// Query head `h` of sequence `s`: its `(t, d)` output rows.
    fn forward_head(&self, qkv: &[f32], s: usize, h: usize) -> Vec<f32> {
        let (t, d, w) = (self.seq_len, self.head_dim, self.width());
        let kvh = h / (self.heads / self.kv_heads);
        let qs = self.rotated(qkv, w, self.q_at(h), s, self.scale);
        let kr = self.rotated(qkv, w, self.k_at(kvh), s, 1.0);
        let vr = self.rows(qkv, w, self.v_at(kvh), s);
        let p = self.probabilities(&qs, &kr);
        let mut o = vec![0f32; t * d];
        gemm_into(&mut o, View::rows(&p, t, t), View::rows(&vr, t, d), false);
        o
    }

    /// Causal softmax probabilities `(t, t)` (zero above the diagonal) of scaled, rotated
    /// queries `qs` against rotated keys `kr`, both `(t, d)`.
    fn probabilities(&self, qs: &[f32], kr: &[f32]) -> Vec<f32> {
        let (t, d) = (self.seq_len, self.head_dim);
        let mut p = vec![0f32; t * t];
        gemm_into(
            &mut p,
            View::rows(qs, t, d),
            View::rows(kr, t, d).t(),
            false,
        );
        for (i, row) in p.chunks_exact_mut(t).enumerate() {
            softmax(&mut row[..=i]);
            row[i + 1..].fill(0.0);
        }
        p
    }

    /// The gradients of KV head `kvh` of sequence `s` and of its query heads.
    fn backward_group(&self, qkv: &[f32], g: &[f32], s: usize, kvh: usize) -> GroupGrads {
        let (t, d, group, w) = (
            self.seq_len,
            self.head_dim,
            self.heads / self.kv_heads,
            self.width(),
        );
        let half = d / 2;
        let kr = self.rotated(qkv, w, self.k_at(kvh), s, 1.0);
        let vr = self.rows(qkv, w, self.v_at(kvh), s);
        let mut dk = vec![0f32; t * d];
        let mut dv = vec![0f32; t * d];
        let mut dqs = Vec::with_capacity(group);
        for (n, h) in (kvh * group..(kvh + 1) * group).enumerate() {
            let qs = self.rotated(qkv, w, self.q_at(h), s, self.scale);
            let gh = self.rows(g, self.heads * d, self.q_at(h), s);
            let mut p = self.probabilities(&qs, &kr);
            // dV += Pᵀ·G; dP = G·Vᵀ
            gemm_into(
                &mut dv,
                View::rows(&p, t, t).t(),
                View::rows(&gh, t, d),
                n > 0,
            );
            let mut dp = vec![0f32; t * t];
            gemm_into(
                &mut dp,
                View::rows(&gh, t, d),
                View::rows(&vr, t, d).t(),
                false,
            );
            // P becomes dS = P ⊙ (dP − Σ_j P·dP), zero above the diagonal as P is.
            for (pi, dpi) in p.chunks_exact_mut(t).zip(dp.chunks_exact(t)) {
                let dot: f32 = pi.iter().zip(dpi).map(|(p, g)| p * g).sum();
                pi.iter_mut().zip(dpi).for_each(|(p, g)| *p *= g - dot);
            }
            // dQs = dS·K; dK += dSᵀ·Qs
            let mut dq = vec![0f32; t * d];
            gemm_into(&mut dq, View::rows(&p, t, t), View::rows(&kr, t, d), false);
            gemm_into(
                &mut dk,
                View::rows(&p, t, t).t(),
                View::rows(&qs, t, d),
                n > 0,
            );
            // Back through the scale and the rotation.
            let mut dqr = vec![0f32; t * d];
            for i in 0..t {
                let row = &mut dq[i * d..(i + 1) * d];
                row.iter_mut().for_each(|v| *v *= self.scale);
                rope_back(
                    row,
                    &self.cos[i * half..(i + 1) * half],
                    &self.sin[i * half..(i + 1) * half],
                    &mut dqr[i * d..(i + 1) * d],
                );
            }
            dqs.push(dqr);
        }
        let mut dkr = vec![0f32; t * d];
        for i in 0..t {
            rope_back(
                &dk[i * d..(i + 1) * d],
                &self.cos[i * half..(i + 1) * half],
                &self.sin[i * half..(i + 1) * half],
                &mut dkr[i * d..(i + 1) * d],
            );
        }
        (dqs, dkr, dv)
    }
}

/// A strided matrix view: element `(r, c)` at `data[r·rs + c·cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// A row-major `(rows, cols)` matrix.
    fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `c = a·b` (`c += a·b` when `accumulate`) for row-major `c: (a.rows, b.cols)`, on one
/// thread (callers parallelise over heads) with the `gemm` crate's kernels.
fn gemm_into(c: &mut [f32], a: View, b: View, accumulate: bool) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert!(
        b.rows == k && c.len() == m * n && a.in_bounds() && b.in_bounds(),
        "gemm_into: shapes"
    );
    #[allow(unsafe_code)]
    // SAFETY: the assertion above keeps every element the strides address inside its slice;
    // `c` is exclusively borrowed and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// One (sequence, KV head) task's gradients: each query head's `dq`, then `dk`, `dv`, all
/// `(t, d)`.
type GroupGrads = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);

impl CustomOp1 for RopeAttention {
    fn name(&self) -> &'static str {
        "rope-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(storage, layout, "rope-attention")?;
        self.check(qkv.len())?;
        let heads: Vec<Vec<f32>> = (0..self.batch * self.heads)
            .into_par_iter()
            .map(|task| self.forward_head(qkv, task / self.heads, task % self.heads))
            .collect();
        let (rows, width) = (self.batch * self.seq_len, self.heads * self.head_dim);
        let mut out = vec![0f32; rows * width];
        for (task, o) in heads.iter().enumerate() {
            let (s, h) = (task / self.heads, task % self.heads);
            self.scatter(o, width, self.q_at(h), s, &mut out);
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, width))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (qkv, g) = (values(arg)?, values(grad)?);
        self.check(qkv.len())?;
        let (rows, w) = (self.batch * self.seq_len, self.width());
        if g.len() != rows * self.heads * self.head_dim {
            candle_core::bail!("rope-attention: gradient does not match the output");
        }
        let group = self.heads / self.kv_heads;
        // One task per (sequence, KV head): the group's query heads add into the same dK, dV.
        let parts: Vec<GroupGrads> = (0..self.batch * self.kv_heads)
            .into_par_iter()
            .map(|task| {
                let (s, kvh) = (task / self.kv_heads, task % self.kv_heads);
                self.backward_group(&qkv, &g, s, kvh)
            })
            .collect();
        let mut dqkv = vec![0f32; qkv.len()];
        for (task, (dqs, dkr, dvr)) in parts.iter().enumerate() {
            let (s, kvh) = (task / self.kv_heads, task % self.kv_heads);
            for (n, dqr) in dqs.iter().enumerate() {
                self.scatter(dqr, w, self.q_at(kvh * group + n), s, &mut dqkv);
            }
            self.scatter(dkr, w, self.k_at(kvh), s, &mut dqkv);
            self.scatter(dvr, w, self.v_at(kvh), s, &mut dqkv);
        }
        Ok(Some(matrix(dqkv, &[rows, w])?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_values;
    use candle_core::{Var, D};

    fn var(shape: &[usize], seed: u32) -> Var {
        let n = shape.iter().product();
        Var::from_tensor(&matrix(test_values(n, seed), shape).expect("tensor")).expect("var")
    }

    /// Checks `fused` against `composed` (values, and the gradients of `Σ y·r` for a random
    /// `r` with respect to every input).
    fn agree(inputs: &[Var], fused: &Tensor, composed: &Tensor, tol: f32) {
        let w = matrix(test_values(fused.elem_count(), 99), fused.dims()).expect("weights");
        let (a, b) = (values(fused).expect("f"), values(composed).expect("c"));
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < tol, "values differ by {diff}");
        let ga = (fused * &w)
            .and_then(|x| x.sum_all())
            .and_then(|x| x.backward());
        let gb = (composed * &w)
            .and_then(|x| x.sum_all())
            .and_then(|x| x.backward());
        let (ga, gb) = (ga.expect("fused backward"), gb.expect("composed backward"));
        for (n, v) in inputs.iter().enumerate() {
            let a = values(ga.get(v.as_tensor()).expect("fused grad")).expect("a");
            let b = values(gb.get(v.as_tensor()).expect("composed grad")).expect("b");
            let scale = b.iter().map(|x| x.abs()).fold(0f32, f32::max);
            let diff = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                scale > 0.0 && diff < tol * scale.max(1.0),
                "input {n}: grads differ by {diff}"
            );
        }
    }

    #[test]
    fn fast_exp_is_within_a_few_ulp() {
        for i in 0..=20_000 {
            let x = -87.0 + i as f32 * (87.0 + 88.0) / 20_000.0;
            let (got, want) = (fast_exp(x), x.exp());
            assert!(
                (got - want).abs() <= 4.0 * f32::EPSILON * want,
                "e^{x}: {got} vs {want}"
            );
        }
        let mut row = vec![0.5f32, -1.0, 2.0, 0.0, -3.5, 1.25, 0.75, -0.25, 3.0];
        let want: f32 = row.iter().map(|v| (v - 3.0f32).exp()).sum();
        let got = exp_shifted(&mut row, 3.0);
        assert!((got - want).abs() < 1e-6 * want, "{got} vs {want}");
        assert!((row[8] - 1.0).abs() < 1e-7);
    }

    #[test]
    fn rms_norm_matches_the_composed_ops() {
        let x = var(&[5, 12], 1);
        let weight = test_values(12, 2);
        let w = matrix(weight.clone(), &[12]).expect("w");
        let op = RmsNorm {
            weight: Arc::new(weight),
            eps: 1e-5,
        };
        let fused = x.as_tensor().apply_op1(op).expect("fused");
        let composed = candle_nn::ops::rms_norm_slow(x.as_tensor(), &w, 1e-5).expect("composed");
        agree(&[x], &fused, &composed, 1e-5);
    }

    #[test]
    fn swiglu_matches_the_composed_ops() {
        let (g, u) = (var(&[4, 9], 3), var(&[4, 9], 4));
        let fused = Tensor::cat(&[g.as_tensor(), u.as_tensor()], 1)
            .and_then(|gu| gu.apply_op1(SwiGlu { width: 9 }))
            .expect("fused");
        let composed = (g.as_tensor().silu().expect("silu") * u.as_tensor()).expect("mul");
        agree(&[g, u], &fused, &composed, 1e-5);
    }

    /// The graph the training forward used before: rope, repeated K/V, masked softmax.
    fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor, op: &RopeAttention) -> Tensor {
        let (b, t, nh, nkv, hd) = (op.batch, op.seq_len, op.heads, op.kv_heads, op.head_dim);
        let f = || -> Result<Tensor> {
            let cos = matrix(op.cos.to_vec(), &[t, hd / 2])?;
            let sin = matrix(op.sin.to_vec(), &[t, hd / 2])?;
            let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
            let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let q = candle_nn::rotary_emb::rope_slow(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_slow(&k, &cos, &sin)?;
            let group = nh / nkv;
            let repeat = |x: Tensor| -> Result<Tensor> {
                x.unsqueeze(2)?
                    .broadcast_as((b, nkv, group, t, hd))?
                    .reshape((b, nh, t, hd))
            };
            let (k, v) = (repeat(k)?, repeat(v)?);
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            let mask = matrix(mask, &[t, t])?;
            let att = (q.matmul(&k.t()?.contiguous()?)? * f64::from(op.scale))?;
            let att = candle_nn::ops::softmax(&att.broadcast_add(&mask)?, D::Minus1)?;
            att.matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * t, nh * hd))
        };
        f().expect("composed attention")
    }

    #[test]
    fn rope_attention_matches_the_composed_ops() {
        let (b, t, nh, nkv, hd) = (2, 7, 6, 2, 8);
        let angles: Vec<f32> = (0..t * hd / 2)
            .map(|i| (i / (hd / 2)) as f32 * (0.3 + 0.2 * (i % (hd / 2)) as f32))
            .collect();
        let op = RopeAttention {
            batch: b,
            seq_len: t,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            cos: Arc::new(angles.iter().map(|a| a.cos()).collect()),
            sin: Arc::new(angles.iter().map(|a| a.sin()).collect()),
            scale: 1.0 / (hd as f32).sqrt(),
        };
        let q = var(&[b * t, nh * hd], 5);
        let k = var(&[b * t, nkv * hd], 6);
        let v = var(&[b * t, nkv * hd], 7);
        let composed = composed_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &op);
        let fused = Tensor::cat(&[q.as_tensor(), k.as_tensor(), v.as_tensor()], 1)
            .and_then(|qkv| qkv.apply_op1(op))
            .expect("fused");
        agree(&[q, k, v], &fused, &composed, 1e-5);
    }
}
