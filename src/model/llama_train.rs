//! The llama forward as an autograd graph, for LoRA training: frozen f32 base weights, trainable
//! LoRA factors ([`LoraVars`]), masked cross-entropy.
//!
//! Only ops whose backward candle implements are used (the fast `rms_norm`, `softmax_last_dim`
//! and `rope` kernels silently drop gradients). Frozen projections go through
//! `FrozenMatmul`, a custom op whose backward computes only the input gradient — the weight
//! gradient of a frozen `(out, in)` matrix would be the largest product of the step and is
//! thrown away.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, Var};
use rand::{Rng, SeedableRng};

use super::attention::Rope;
use super::config::{Architecture, Features, ModelConfig};
use super::lora::{lora_delta, LoraAdapter, LoraPair, Target};
use super::train_ops::{contiguous_f32, RmsNorm, RopeAttention, SwiGlu};
use super::Model;

/// `x · Wᵀ` for a frozen `W: (out, in)`: backward gives `x` its gradient and nothing else.
struct FrozenMatmul {
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "frozen-matmul")?;
        let (out, inp) = self.w.dims2()?;
        let (rows, cols) = layout.shape().dims2()?;
        if cols != inp {
            candle_core::bail!("frozen-matmul: input has {cols} columns, weight {inp}");
        }
        let xt = Tensor::from_slice(x, (rows, cols), &Device::Cpu)?;
        let y = xt.matmul(&self.w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// Per-row cross-entropy `logsumexp(x) − x[label]` of `(n, vocab)` logits, with its gradient
/// `softmax(x) − onehot(label)` in one pass — candle's composed log-softmax makes about a dozen
/// passes and allocations over the (large) logits.
struct CrossEntropy {
    labels: Vec<u32>,
}

/// `(max, Σ exp(x − max))` of a row.
fn row_stats(row: &[f32]) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (max, row.iter().map(|v| (v - max).exp()).sum())
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let x = contiguous_f32(storage, layout, "cross-entropy")?;
        let (n, v) = layout.shape().dims2()?;
        if n != self.labels.len() || self.labels.iter().any(|&l| l as usize >= v) {
            candle_core::bail!("cross-entropy: labels do not fit the logits");
        }
        let losses: Vec<f32> = x
            .par_chunks_exact(v)
            .zip(self.labels.par_iter())
            .map(|(row, &l)| {
                let (max, sum) = row_stats(row);
                max + sum.ln() - row[l as usize]
            })
            .collect();
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let g = grad.to_vec1::<f32>()?;
        let arg = arg.contiguous()?;
        let (n, v) = arg.dims2()?;
        let (storage, layout) = arg.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::F32(x)) = &*storage else {
            candle_core::bail!("cross-entropy: f32 CPU logits expected");
        };
        let x = &x[layout.start_offset()..layout.start_offset() + n * v];
        let mut out = vec![0f32; n * v];
        out.par_chunks_exact_mut(v)
            .zip(x.par_chunks_exact(v))
            .zip(self.labels.par_iter().zip(g.par_iter()))
            .for_each(|((o, row), (&l, &gi))| {
                let (max, sum) = row_stats(row);
                let k = gi / sum;
                for (oi, xi) in o.iter_mut().zip(row) {
                    *oi = (xi - max).exp() * k;
                }
                o[l as usize] -= gi;
            });
        Ok(Some(Tensor::from_vec(out, (n, v), &Device::Cpu)?))
    }
}

struct FrozenBlock {
    input_norm: Arc<Vec<f32>>,
    post_attention_norm: Arc<Vec<f32>>,
    /// Per [`Target`], `(out, in)`.
    w: Vec<Tensor>,
}

/// The base model's weights as f32 tensors, frozen, for training.
pub struct FrozenLlama {
    config: ModelConfig,
    embed: Tensor,
    blocks: Vec<FrozenBlock>,
    norm: Arc<Vec<f32>>,
    lm_head: Tensor,
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

    /// The base weights dequantized to f32 for training (held only while a job runs).
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
        let named: HashMap<String, Tensor> = self.named_tensors()?.into_iter().collect();
        let get = |name: &str| -> Result<Tensor> {
            named
                .get(name)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("missing {name}")))
        };
        let norm = |name: &str| -> Result<Arc<Vec<f32>>> { Ok(Arc::new(get(name)?.to_vec1()?)) };
        let c = self.config().clone();
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            blocks.push(FrozenBlock {
                input_norm: norm(&format!("{p}.input_layernorm.weight"))?,
                post_attention_norm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                w: Target::ALL
                    .iter()
                    .map(|t| get(&format!("{p}.{}.weight", t.module_path()))?.contiguous())
                    .collect::<Result<_>>()?,
            });
        }
        let embed = get("model.embed_tokens.weight")?;
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            get("lm_head.weight")?
        };
        Ok(FrozenLlama {
            rope: Rope::new(&c),
            embed,
            blocks,
            norm: norm("model.norm.weight")?,
            lm_head,
            config: c,
        })
    }
}

fn frozen(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.apply_op1(FrozenMatmul { w: w.clone() })
}

impl FrozenLlama {
    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Logits of the rows selected by `targets` (each target token's logits come from the row
    /// before it) and their labels: `(n, vocab)` and `(n,)`. `dropout_seed` enables LoRA
    /// dropout with a deterministic mask.
    fn target_logits(
        &self,
        batch: &TrainBatch,
        lora: &LoraVars,
        dropout_seed: Option<u64>,
    ) -> Result<(Tensor, Tensor)> {
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
        let ids = Tensor::from_vec(ids, b * t, dev)?;
        let mut x = self.embed.index_select(&ids, 0)?; // (b·t, h), no gradient
        let positions: Vec<u32> = (0..t as u32).collect();
        let tables = self.rope.tables(&positions);
        let (cos, sin) = tables.as_slices();
        let (cos, sin) = (Arc::new(cos.to_vec()), Arc::new(sin.to_vec()));
        let mut rng = dropout_seed.map(rand::rngs::StdRng::seed_from_u64);
        let eps = c.rms_norm_eps as f32;
        let mut proj =
            |x: &Tensor, blk: &FrozenBlock, layer: usize, tg: Target| -> Result<Tensor> {
                let y = frozen(x, &blk.w[tg as usize])?;
                match lora.vars.get(&(layer, tg)) {
                    None => Ok(y),
                    Some((a, bb)) => {
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
                        y + lora_delta(&xin, a.as_tensor(), bb.as_tensor(), lora.scale())?
                    }
                }
            };
        let rms_norm = |x: &Tensor, weight: &Arc<Vec<f32>>| {
            x.apply_op1(RmsNorm {
                weight: weight.clone(),
                eps,
            })
        };
        for (layer, blk) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &blk.input_norm)?;
            let q = proj(&h, blk, layer, Target::Q)?.contiguous()?;
            let k = proj(&h, blk, layer, Target::K)?.contiguous()?;
            let v = proj(&h, blk, layer, Target::V)?.contiguous()?;
            let y = q.apply_op3(
                &k,
                &v,
                RopeAttention {
                    batch: b,
                    seq_len: t,
                    heads: nh,
                    kv_heads: nkv,
                    head_dim: hd,
                    cos: cos.clone(),
                    sin: sin.clone(),
                    scale: 1.0 / (hd as f32).sqrt(),
                },
            )?;
            x = (x + proj(&y, blk, layer, Target::O)?)?;
            let h = rms_norm(&x, &blk.post_attention_norm)?;
            let gate = proj(&h, blk, layer, Target::Gate)?.contiguous()?;
            let up = proj(&h, blk, layer, Target::Up)?.contiguous()?;
            let m = gate.apply_op2(&up, SwiGlu)?;
            x = (x + proj(&m, blk, layer, Target::Down)?)?;
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
        let logits = frozen(&x, &self.lm_head)?;
        Ok((logits, Tensor::from_vec(labels, n, dev)?))
    }

    /// Summed cross-entropy over the batch's target tokens (divide by the token count for the
    /// mean), and that count.
    pub fn loss_sum(
        &self,
        batch: &TrainBatch,
        lora: &LoraVars,
        dropout_seed: Option<u64>,
    ) -> Result<(Tensor, usize)> {
        let (logits, labels) = self.target_logits(batch, lora, dropout_seed)?;
        let labels = labels.to_vec1::<u32>()?;
        let n = labels.len();
        let losses = logits.apply_op1(CrossEntropy { labels })?;
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
        Ok(self.target_logits(&batch, lora, None)?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::D;

    #[test]
    fn fused_cross_entropy_equals_composed_log_softmax() {
        let data: Vec<f32> = (0..3 * 7)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7)
            .collect();
        let labels = vec![2u32, 0, 6];
        let x = Var::from_tensor(&Tensor::from_vec(data, (3, 7), &Device::Cpu).unwrap()).unwrap();
        let weights = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        // Composed: −Σ w · log_softmax(x)[label].
        let ids = Tensor::from_vec(labels.clone(), (3, 1), &Device::Cpu).unwrap();
        let logp = candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1).unwrap();
        let picked = logp.gather(&ids, 1).unwrap().squeeze(1).unwrap();
        let want = (picked * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap();
        let want_grad = want.backward().unwrap();
        let fused = x.as_tensor().apply_op1(CrossEntropy { labels }).unwrap();
        let got = (fused * &weights).unwrap().sum_all().unwrap();
        let got_grad = got.backward().unwrap();
        let (a, b) = (
            want.to_scalar::<f32>().unwrap(),
            got.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let ga = want_grad
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let gb = got_grad
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (p, q) in ga.iter().zip(&gb) {
            assert!((p - q).abs() < 1e-5, "{ga:?} vs {gb:?}");
        }
    }
}
