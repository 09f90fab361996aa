//! The llama forward as an autograd graph, for LoRA training: the frozen base (the serving
//! model's own layers), trainable LoRA factors ([`LoraVars`]), masked cross-entropy.
//!
//! Every op with a gradient is either one whose backward candle implements (candle's fast
//! `rms_norm`, `softmax_last_dim` and `rope` kernels silently drop gradients, so they are not
//! used) or a custom op with its own backward pass (`train_ops`, `FrozenMatmul`,
//! `HeadLoss`). Frozen projections compute only the input gradient — the weight gradient of
//! a frozen `(out, in)` matrix would be the largest product of the step and is thrown away.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, Var};
use rand::{Rng, SeedableRng};

use super::attention::Rope;
use super::config::{Architecture, Features, ModelConfig};
use super::linear::Linear;
use super::lora::{lora_delta, LoraAdapter, LoraPair, Target};
use super::train_ops::{contiguous_f32, RmsNorm, RopeAttention, SwiGlu};
use super::Model;

/// A frozen projection `x · Wᵀ (+ bias)` as the training graph runs it: forward through the
/// serving layer itself (for a GGUF model, the 8-bit kernels — the adapter learns on the
/// function it will be served with), backward through `Wᵀ` (see [`Linear::transposed`]).
#[derive(Clone)]
struct FrozenLinear {
    fwd: Linear,
    bwd: Linear,
}

impl FrozenLinear {
    /// `g · W` for `g: (rows, out)`. Each row is scaled by a power of two to a maximum near
    /// 2¹⁰ first and the result scaled back (both exact): gradients are tiny, and the 8-bit
    /// kernels keep each block's scale as f16, which would flush scales below 6·10⁻⁵.
    fn backward(&self, g: &mut [f32], rows: usize) -> Result<Vec<f32>> {
        let (out, inp) = (self.fwd.dims().0, self.fwd.dims().1);
        if g.len() != rows * out {
            candle_core::bail!(
                "frozen-matmul: gradient of {} values for {rows} rows",
                g.len()
            );
        }
        let mut scales = Vec::with_capacity(rows);
        for row in g.chunks_exact_mut(out) {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            // Clamped so that both 2^k and 2^-k stay finite.
            let k = if max > 0.0 && max.is_finite() {
                (10 - max.log2().ceil() as i32).clamp(-120, 120)
            } else {
                0
            };
            let up = 2f32.powi(k);
            row.iter_mut().for_each(|v| *v *= up);
            scales.push(2f32.powi(-k));
        }
        let mut dx = self.bwd.forward_vec(g, rows)?;
        for (row, s) in dx.chunks_exact_mut(inp).zip(scales) {
            row.iter_mut().for_each(|v| *v *= s);
        }
        Ok(dx)
    }

    fn new(fwd: Linear) -> Result<Self> {
        Ok(FrozenLinear {
            bwd: fwd.transposed()?,
            fwd,
        })
    }
}

/// `x · Wᵀ` for a frozen `W: (out, in)`: backward gives `x` its gradient and nothing else —
/// the weight gradient would be the largest product of the step, and is thrown away.
struct FrozenMatmul {
    w: FrozenLinear,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "frozen-matmul")?;
        let (out, inp) = self.w.fwd.dims();
        let (rows, cols) = layout.shape().dims2()?;
        if cols != inp {
            candle_core::bail!("frozen-matmul: input has {cols} columns, weight {inp}");
        }
        let y = self.w.fwd.forward_vec(x, rows)?;
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (rows, _) = grad.dims2()?;
        let mut g = grad.flatten_all()?.to_vec1::<f32>()?;
        let dx = self.w.backward(&mut g, rows)?;
        Ok(Some(Tensor::from_vec(
            dx,
            (rows, self.w.bwd.dims().0),
            &Device::Cpu,
        )?))
    }
}

/// The output head and cross-entropy in one op: `x: (n, hidden)` → per row
/// `logsumexp(l) − l[label]` with `l = x · Wᵀ`. The `(n, vocab)` logits never enter the graph:
/// the forward pass keeps their softmax, and the backward pass computes
/// `dx = g · (softmax · W − W[label])` — the one-hot part as an exact row of `W`, so that the
/// (8-bit) kernel only sees the smooth, non-negative probabilities.
struct HeadLoss {
    head: FrozenLinear,
    labels: Vec<u32>,
    /// The forward pass's softmax rows, taken by the backward pass.
    probs: std::sync::Mutex<Option<Vec<f32>>>,
}

impl HeadLoss {
    /// Logits of `x: (n, hidden)` turned into softmax rows in place, and each row's loss.
    fn softmax_and_losses(&self, x: &[f32], n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        use rayon::prelude::*;
        let v = self.head.fwd.dims().0;
        if n != self.labels.len() || self.labels.iter().any(|&l| l as usize >= v) {
            candle_core::bail!("head-loss: labels do not fit the logits");
        }
        let mut p = self.head.fwd.forward_vec(x, n)?;
        let losses = p
            .par_chunks_exact_mut(v)
            .zip(self.labels.par_iter())
            .map(|(row, &l)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let picked = row[l as usize];
                let sum = super::train_ops::exp_shifted(row, max);
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|e| *e *= inv);
                max + sum.ln() - picked
            })
            .collect();
        Ok((p, losses))
    }
}

impl CustomOp1 for HeadLoss {
    fn name(&self) -> &'static str {
        "head-loss"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "head-loss")?;
        let (n, _) = layout.shape().dims2()?;
        let (p, losses) = self.softmax_and_losses(x, n)?;
        if let Ok(mut slot) = self.probs.lock() {
            *slot = Some(p);
        }
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let g = grad.to_vec1::<f32>()?;
        let (n, hidden) = arg.dims2()?;
        let v = self.head.fwd.dims().0;
        let kept = self.probs.lock().ok().and_then(|mut s| s.take());
        let mut p = match kept {
            Some(p) => p,
            None => {
                self.softmax_and_losses(&arg.flatten_all()?.to_vec1::<f32>()?, n)?
                    .0
            }
        };
        p.par_chunks_exact_mut(v)
            .zip(g.par_iter())
            .for_each(|(row, &gi)| row.iter_mut().for_each(|e| *e *= gi));
        let mut dx = self.head.backward(&mut p, n)?;
        let label_rows = self
            .head
            .fwd
            .rows(&self.labels)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for ((d, w), &gi) in dx
            .chunks_exact_mut(hidden)
            .zip(label_rows.chunks_exact(hidden))
            .zip(&g)
        {
            d.iter_mut().zip(w).for_each(|(d, w)| *d -= gi * w);
        }
        Ok(Some(Tensor::from_vec(dx, (n, hidden), &Device::Cpu)?))
    }
}

struct FrozenBlock {
    input_norm: Arc<Vec<f32>>,
    post_attention_norm: Arc<Vec<f32>>,
    /// q, k, v stacked: `(q_dim + 2·kv_dim, hidden)`.
    qkv: FrozenLinear,
    o: FrozenLinear,
    /// gate, up stacked: `(2·intermediate, hidden)`.
    gate_up: FrozenLinear,
    down: FrozenLinear,
}

/// The base model's weights, frozen, for training: the serving layers plus each one's
/// transpose for the backward pass.
pub struct FrozenLlama {
    config: ModelConfig,
    embed: Linear,
    blocks: Vec<FrozenBlock>,
    norm: Arc<Vec<f32>>,
    lm_head: FrozenLinear,
    rope: Rope,
}

/// The LoRA factors being trained, as autograd variables.
pub struct LoraVars {
    rank: usize,
    alpha: f64,
    targets: Vec<Target>,
    dropout: f32,
    /// `(layer, target)` → `(A: (r, in), B: (out, r))`.
    vars: HashMap<(usize, Target), (Var, Var)>,
}

impl LoraVars {
    /// PEFT's initialisation: `A` uniform in `±1/√in` (Kaiming with `a = √5`), `B` zero, so
    /// training starts exactly at the base model. Seeded.
    pub fn init(
        config: &ModelConfig,
        rank: usize,
        alpha: f64,
        dropout: f32,
        targets: &[Target],
        seed: u64,
    ) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut vars = HashMap::new();
        for layer in 0..config.num_layers {
            for &t in targets {
                let (out, inp) = t.dims(config);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..rank * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (rank, inp), &Device::Cpu)?)?;
                let b = Var::zeros((out, rank), DType::F32, &Device::Cpu)?;
                vars.insert((layer, t), (a, b));
            }
        }
        let mut targets = targets.to_vec();
        targets.sort();
        targets.dedup();
        Ok(LoraVars {
            rank,
            alpha,
            targets,
            dropout,
            vars,
        })
    }

    /// Every variable, in a fixed order (layer, target, A then B).
    pub fn all_vars(&self) -> Vec<Var> {
        let mut keys: Vec<_> = self.vars.keys().copied().collect();
        keys.sort();
        keys.iter()
            .flat_map(|k| {
                let (a, b) = &self.vars[k];
                [a.clone(), b.clone()]
            })
            .collect()
    }

    /// `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// A serving adapter with the current values.
    pub fn to_adapter(&self, config: &ModelConfig) -> std::result::Result<LoraAdapter, String> {
        let mut pairs = HashMap::new();
        for (&k, (a, b)) in &self.vars {
            let copy = |v: &Var| v.as_tensor().copy().map_err(|e| e.to_string());
            pairs.insert(
                k,
                LoraPair {
                    a: copy(a)?,
                    b: copy(b)?,
                },
            );
        }
        LoraAdapter::new(config, self.rank, self.alpha, false, pairs)
    }

    /// Adapted projections.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }
}

/// Sequences to train on: `tokens[i]` with `targets[i][p]` true where token `p` is predicted
/// (counted in the loss).
pub struct TrainBatch<'a> {
    /// Token ids of each sequence.
    pub tokens: &'a [&'a [u32]],
    /// Loss mask, same shape as `tokens`.
    pub targets: &'a [&'a [bool]],
}

/// The training graph is llama's: plain llama configs only.
fn trainable(c: &ModelConfig) -> bool {
    c.architecture == Architecture::Llama && c.features == Features::default()
}

impl Model {
    /// Whether the training graph covers this architecture (llama only, for now).
    pub fn supports_training(&self) -> bool {
        trainable(self.config())
    }

    /// The base weights prepared for training (the serving layers plus each one's transpose
    /// for the backward pass; held only while a job runs).
    pub fn frozen(&self) -> Result<FrozenLlama> {
        match self {
            Model::Decoder(m) => m.frozen(),
        }
    }
}

impl super::decoder::Decoder {
    /// See [`Model::frozen`].
    pub fn frozen(&self) -> Result<FrozenLlama> {
        let c = self.config();
        if !trainable(c) {
            candle_core::bail!(
                "fine-tuning supports llama-architecture models; this one is {}",
                c.architecture.hf_name()
            );
        }
        let w = self.training_weights()?;
        let blocks = w
            .layers
            .into_iter()
            .map(|l| {
                Ok(FrozenBlock {
                    input_norm: Arc::new(l.input_norm),
                    post_attention_norm: Arc::new(l.post_attention_norm),
                    qkv: FrozenLinear::new(l.qkv)?,
                    o: FrozenLinear::new(l.o)?,
                    gate_up: FrozenLinear::new(l.gate_up)?,
                    down: FrozenLinear::new(l.down)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(FrozenLlama {
            rope: Rope::new(c),
            embed: w.embed,
            blocks,
            norm: Arc::new(w.norm),
            lm_head: FrozenLinear::new(w.head)?,
            config: c.clone(),
        })
    }
}

/// A frozen output `y` plus the LoRA deltas of its parts (`(target, columns)` in order: one
/// part, or a stacked projection's), side by side with zeros for untrained parts and added in
/// one go — so a stacked output is never sliced.
fn adapt_stacked(
    delta: &mut impl FnMut(&Tensor, usize, Target) -> Result<Option<Tensor>>,
    y: Tensor,
    x: &Tensor,
    layer: usize,
    parts: &[(Target, usize)],
) -> Result<Tensor> {
    let rows = y.dim(0)?;
    let mut deltas = Vec::with_capacity(parts.len());
    for &(tg, _) in parts {
        deltas.push(delta(x, layer, tg)?);
    }
    if deltas.iter().all(Option::is_none) {
        return Ok(y);
    }
    if let [Some(d)] = &deltas[..] {
        return y + d;
    }
    let side_by_side = deltas
        .into_iter()
        .zip(parts)
        .map(|(d, &(_, width))| match d {
            Some(d) => Ok(d),
            None => Tensor::zeros((rows, width), DType::F32, &Device::Cpu),
        })
        .collect::<Result<Vec<_>>>()?;
    y + Tensor::cat(&side_by_side, 1)?
}

fn frozen(x: &Tensor, w: &FrozenLinear) -> Result<Tensor> {
    x.apply_op1(FrozenMatmul { w: w.clone() })
}

impl FrozenLlama {
    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Final hidden states (after the last norm) of the rows selected by `targets` (each target
    /// token is predicted from the row before it) and their labels: `(n, hidden)` and `n`
    /// ids. `dropout_seed` enables LoRA dropout with a deterministic mask.
    fn target_hidden(
        &self,
        batch: &TrainBatch,
        lora: &LoraVars,
        dropout_seed: Option<u64>,
    ) -> Result<(Tensor, Vec<u32>)> {
        let c = &self.config;
        let b = batch.tokens.len();
        let t = batch.tokens.iter().map(|s| s.len()).max().unwrap_or(0);
        if b == 0 || t < 2 {
            candle_core::bail!("training batch: every sequence needs at least two tokens");
        }
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let dev = &Device::Cpu;
        let mut ids = Vec::with_capacity(b * t);
        for s in batch.tokens {
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(0u32, t - s.len()));
        }
        let mut x = self.embed.rows(&ids)?; // (b·t, h), no gradient
        let positions: Vec<u32> = (0..t as u32).collect();
        let tables = self.rope.tables(&positions);
        let (cos, sin) = tables.as_slices();
        let (cos, sin) = (Arc::new(cos.to_vec()), Arc::new(sin.to_vec()));
        let mut rng = dropout_seed.map(rand::rngs::StdRng::seed_from_u64);
        let eps = c.rms_norm_eps as f32;
        // The LoRA delta of `tg` (input `x`), if it is trained.
        let mut delta = |x: &Tensor, layer: usize, tg: Target| -> Result<Option<Tensor>> {
            let Some((a, bb)) = lora.vars.get(&(layer, tg)) else {
                return Ok(None);
            };
            let xin = match rng.as_mut() {
                Some(r) if lora.dropout > 0.0 => {
                    let keep = 1.0 - lora.dropout;
                    let m: Vec<f32> = (0..x.elem_count())
                        .map(|_| {
                            if r.random::<f32>() < keep {
                                1.0 / keep
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    (x * Tensor::from_vec(m, x.shape(), dev)?)?
                }
                _ => x.clone(),
            };
            lora_delta(&xin, a.as_tensor(), bb.as_tensor(), lora.scale()).map(Some)
        };
        let (q_dim, kv_dim, ff) = (c.q_dim(), c.kv_dim(), c.intermediate_size);
        let rms_norm = |x: &Tensor, weight: &Arc<Vec<f32>>| {
            x.apply_op1(RmsNorm {
                weight: weight.clone(),
                eps,
            })
        };
        for (layer, blk) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &blk.input_norm)?;
            let parts = [(Target::Q, q_dim), (Target::K, kv_dim), (Target::V, kv_dim)];
            let qkv = adapt_stacked(&mut delta, frozen(&h, &blk.qkv)?, &h, layer, &parts)?;
            let y = qkv.apply_op1(RopeAttention {
                batch: b,
                seq_len: t,
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                cos: cos.clone(),
                sin: sin.clone(),
                scale: 1.0 / (hd as f32).sqrt(),
            })?;
            x = (x + adapt_stacked(
                &mut delta,
                frozen(&y, &blk.o)?,
                &y,
                layer,
                &[(Target::O, c.hidden_size)],
            )?)?;
            let h = rms_norm(&x, &blk.post_attention_norm)?;
            let parts = [(Target::Gate, ff), (Target::Up, ff)];
            let gate_up = adapt_stacked(&mut delta, frozen(&h, &blk.gate_up)?, &h, layer, &parts)?;
            let m = gate_up.apply_op1(SwiGlu { width: ff })?;
            x = (x + adapt_stacked(
                &mut delta,
                frozen(&m, &blk.down)?,
                &m,
                layer,
                &[(Target::Down, c.hidden_size)],
            )?)?;
        }
        let mut rows = Vec::new();
        let mut labels = Vec::new();
        for (i, (s, m)) in batch.tokens.iter().zip(batch.targets).enumerate() {
            for p in 1..s.len() {
                if m.get(p).copied().unwrap_or(false) {
                    rows.push((i * t + p - 1) as u32);
                    labels.push(s[p]);
                }
            }
        }
        if rows.is_empty() {
            candle_core::bail!("training batch: no target tokens");
        }
        let n = rows.len();
        let x = x.index_select(&Tensor::from_vec(rows, n, dev)?, 0)?;
        let x = x.apply_op1(RmsNorm {
            weight: self.norm.clone(),
            eps,
        })?;
        Ok((x, labels))
    }

    /// Summed cross-entropy over the batch's target tokens (divide by the token count for the
    /// mean), and that count.
    pub fn loss_sum(
        &self,
        batch: &TrainBatch,
        lora: &LoraVars,
        dropout_seed: Option<u64>,
    ) -> Result<(Tensor, usize)> {
        let (x, labels) = self.target_hidden(batch, lora, dropout_seed)?;
        let n = labels.len();
        let losses = x.apply_op1(HeadLoss {
            head: self.lm_head.clone(),
            labels,
            probs: Default::default(),
        })?;
        Ok((losses.sum_all()?, n))
    }

    /// Logits of every position of one sequence (tests compare them with the serving path).
    pub fn logits(&self, tokens: &[u32], lora: &LoraVars) -> Result<Tensor> {
        let mask = vec![true; tokens.len()];
        let seqs = [tokens];
        let masks = [&mask[..]];
        let batch = TrainBatch {
            tokens: &seqs,
            targets: &masks,
        };
        frozen(&self.target_hidden(&batch, lora, None)?.0, &self.lm_head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quant::QMatrix;
    use crate::model::test_values;
    use candle_core::D;

    /// `Σ w_i · loss_i` through [`HeadLoss`] and through composed candle ops on `x · Wᵀ`
    /// (with `W` as the head dequantizes it): the values, and the gradients of `x`.
    fn head_loss_vs_composed(head: Linear, x: &[f32], rows: usize, tol: f32) {
        let (vocab, hidden) = head.dims();
        let labels: Vec<u32> = (0..rows).map(|i| ((i * 7 + 3) % vocab) as u32).collect();
        let weights: Vec<f32> = (0..rows).map(|i| 1.0 + i as f32).collect();
        let weights = Tensor::from_vec(weights, rows, &Device::Cpu).expect("weights");
        let x = Var::from_tensor(&Tensor::from_slice(x, (rows, hidden), &Device::Cpu).expect("x"))
            .expect("var");
        let composed = || -> Result<Tensor> {
            let logits = x.as_tensor().matmul(&head.weight_f32()?.t()?)?;
            let ids = Tensor::from_vec(labels.clone(), (rows, 1), &Device::Cpu)?;
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            (logp.gather(&ids, 1)?.squeeze(1)? * &weights)?
                .sum_all()?
                .neg()
        };
        let want = composed().expect("composed");
        let fused = x
            .as_tensor()
            .apply_op1(HeadLoss {
                head: FrozenLinear::new(head.clone()).expect("frozen"),
                labels: labels.clone(),
                probs: Default::default(),
            })
            .and_then(|l| (l * &weights)?.sum_all())
            .expect("fused");
        let (a, b) = (
            want.to_scalar::<f32>().expect("a"),
            fused.to_scalar::<f32>().expect("b"),
        );
        assert!((a - b).abs() < tol * a.abs().max(1.0), "loss {a} vs {b}");
        let grad = |loss: &Tensor| {
            let g = loss.backward().expect("backward");
            let g = g.get(x.as_tensor()).expect("x has a gradient").clone();
            g.flatten_all()
                .and_then(|g| g.to_vec1::<f32>())
                .expect("grad")
        };
        let (ga, gb) = (grad(&want), grad(&fused));
        let scale = ga.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = ga
            .iter()
            .zip(&gb)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            scale > 0.0 && diff <= tol * scale,
            "gradients differ by {diff} (scale {scale})"
        );
    }

    #[test]
    fn quantized_backward_keeps_tiny_gradients() {
        // Without the per-row power-of-two scaling, f16 block scales flush these to zero.
        let (out, inp, rows) = (64, 32, 3);
        let w = test_values(out * inp, 5);
        let q = QMatrix::quantize_q8_0(&w, out, inp).expect("q8_0");
        let layer =
            FrozenLinear::new(Linear::quantized(q.clone(), None).expect("linear")).expect("frozen");
        let wq = q.dequantize();
        for magnitude in [1e-9f32, 1e-30, 1e-40] {
            let g: Vec<f32> = test_values(rows * out, 6)
                .iter()
                .map(|v| v * magnitude)
                .collect();
            let got = layer.backward(&mut g.clone(), rows).expect("backward");
            for r in 0..rows {
                let want: Vec<f32> = (0..inp)
                    .map(|c| (0..out).map(|o| g[r * out + o] * wq[o * inp + c]).sum())
                    .collect();
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (a, b) in got[r * inp..(r + 1) * inp].iter().zip(&want) {
                    assert!(a.is_finite() && (a - b).abs() <= 0.03 * scale, "{a} vs {b}");
                }
                assert!(scale > 0.0);
            }
        }
    }

    #[test]
    fn head_loss_equals_composed_log_softmax() {
        let (vocab, hidden, rows) = (7, 5, 3);
        let w = Tensor::from_vec(
            test_values(vocab * hidden, 1),
            (vocab, hidden),
            &Device::Cpu,
        )
        .expect("w");
        head_loss_vs_composed(
            Linear::new(w, None),
            &test_values(rows * hidden, 2),
            rows,
            1e-5,
        );
    }

    #[test]
    fn quantized_head_loss_stays_close_to_the_f32_function() {
        // 8-bit activations forward and 8-bit probabilities backward: close, not equal.
        let (vocab, hidden, rows) = (96, 64, 5);
        let q =
            QMatrix::quantize_q8_0(&test_values(vocab * hidden, 3), vocab, hidden).expect("q8_0");
        let head = Linear::quantized(q, None).expect("linear");
        let x: Vec<f32> = test_values(rows * hidden, 4)
            .iter()
            .map(|v| v * 3.0)
            .collect();
        head_loss_vs_composed(head, &x, rows, 0.02);
    }
}
