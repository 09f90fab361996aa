//! The LoRA training loop: shuffled epochs, gradient accumulation up to `batch_size` examples,
//! AdamW over the LoRA factors only, linear warmup then linear decay, masked cross-entropy.
//! Seeded: the same data, settings and seed give the same adapter.

use candle_core::backprop::GradStore;
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::model::llama_train::{FrozenLlama, LoraVars, TrainBatch};
use crate::model::Target;

use super::dataset::Example;

/// Settings of one training run (already validated and resolved from `auto`).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainParams {
    /// Passes over the training data.
    pub n_epochs: usize,
    /// Examples per optimizer step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha (the delta is scaled by `alpha / rank`).
    pub alpha: f64,
    /// Dropout on the LoRA input.
    pub dropout: f32,
    /// Adapted projections.
    pub targets: Vec<Target>,
    /// Seeds initialisation, shuffling and dropout.
    pub seed: u64,
    /// Padded tokens per forward/backward pass (examples beyond it go to the next pass and
    /// their gradients are accumulated).
    pub micro_batch_tokens: usize,
}

/// Progress after one optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// 1-based step.
    pub step: usize,
    /// Steps in the whole run.
    pub total_steps: usize,
    /// Mean loss over the step's learned tokens.
    pub train_loss: f64,
    /// Mean loss over the validation set (after each epoch's last step), if there is one.
    pub valid_loss: Option<f64>,
    /// Learning rate used for this step.
    pub learning_rate: f64,
    /// Tokens processed so far (all tokens of every example seen, as OpenAI bills them).
    pub trained_tokens: usize,
}

/// Steps of a run over `n` examples.
pub fn total_steps(n: usize, p: &TrainParams) -> usize {
    n.div_ceil(p.batch_size.max(1)) * p.n_epochs
}

/// Linear warmup over the first tenth of the steps, then linear decay.
pub fn learning_rate(step: usize, total: usize, peak: f64) -> f64 {
    let warmup = total.div_ceil(10).max(1);
    if step < warmup {
        peak * (step + 1) as f64 / warmup as f64
    } else {
        peak * (total - step) as f64 / (total - warmup).max(1) as f64
    }
}

/// Examples in passes of at most `budget` padded tokens (at least one example each).
fn micro_batches<'a>(examples: &[&'a Example], budget: usize) -> Vec<Vec<&'a Example>> {
    let mut out: Vec<Vec<&Example>> = Vec::new();
    let mut cur: Vec<&Example> = Vec::new();
    let mut longest = 0;
    for &e in examples {
        let l = longest.max(e.tokens.len());
        if !cur.is_empty() && l * (cur.len() + 1) > budget {
            out.push(std::mem::take(&mut cur));
            longest = 0;
        }
        longest = longest.max(e.tokens.len());
        cur.push(e);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn batch_loss(
    model: &FrozenLlama,
    lora: &LoraVars,
    examples: &[&Example],
    dropout_seed: Option<u64>,
) -> candle_core::Result<(candle_core::Tensor, usize)> {
    let tokens: Vec<&[u32]> = examples.iter().map(|e| &e.tokens[..]).collect();
    let targets: Vec<&[bool]> = examples.iter().map(|e| &e.targets[..]).collect();
    model.loss_sum(
        &TrainBatch {
            tokens: &tokens,
            targets: &targets,
        },
        lora,
        dropout_seed,
    )
}

/// Mean loss over `examples` (no gradients are used).
pub fn evaluate(
    model: &FrozenLlama,
    lora: &LoraVars,
    examples: &[Example],
    budget: usize,
) -> candle_core::Result<f64> {
    let refs: Vec<&Example> = examples.iter().collect();
    let (mut sum, mut n) = (0.0, 0);
    for mb in micro_batches(&refs, budget) {
        let (loss, count) = batch_loss(model, lora, &mb, None)?;
        sum += loss.to_scalar::<f32>()? as f64;
        n += count;
    }
    Ok(sum / n.max(1) as f64)
}

/// How a run ended.
pub enum Outcome {
    /// All steps ran.
    Finished(LoraVars),
    /// `keep_going` said stop.
    Cancelled,
}

/// Trains a fresh adapter. `keep_going` is called before every forward pass (it may block,
/// e.g. while the server has requests to serve) and returns `false` to cancel; `on_step`
/// after every optimizer step.
pub fn train(
    model: &FrozenLlama,
    train_set: &[Example],
    valid_set: &[Example],
    p: &TrainParams,
    mut keep_going: impl FnMut() -> bool,
    mut on_step: impl FnMut(&StepReport),
) -> candle_core::Result<Outcome> {
    let lora = LoraVars::init(
        model.config(),
        p.rank,
        p.alpha,
        p.dropout,
        &p.targets,
        p.seed,
    )?;
    let vars = lora.all_vars();
    let mut opt = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: p.learning_rate,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    let total = total_steps(train_set.len(), p);
    let mut order: Vec<usize> = (0..train_set.len()).collect();
    let mut step = 0;
    let mut trained_tokens = 0;
    for epoch in 0..p.n_epochs {
        let mut rng = rand::rngs::StdRng::seed_from_u64(p.seed.wrapping_add(epoch as u64 + 1));
        order.shuffle(&mut rng);
        let batches: Vec<&[usize]> = order.chunks(p.batch_size.max(1)).collect();
        let last_batch = batches.len().saturating_sub(1);
        for (bi, idx) in batches.into_iter().enumerate() {
            let examples: Vec<&Example> = idx.iter().map(|&i| &train_set[i]).collect();
            let targets: usize = examples.iter().map(|e| e.num_targets()).sum();
            let mut grads: Option<GradStore> = None;
            let mut loss_sum = 0.0;
            for (mi, mb) in micro_batches(&examples, p.micro_batch_tokens)
                .iter()
                .enumerate()
            {
                if !keep_going() {
                    return Ok(Outcome::Cancelled);
                }
                let seed = (p.dropout > 0.0).then(|| {
                    p.seed
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        .wrapping_add(((step as u64) << 16) + mi as u64)
                });
                let (loss, _) = batch_loss(model, &lora, mb, seed)?;
                loss_sum += loss.to_scalar::<f32>()? as f64;
                let g = (loss / targets.max(1) as f64)?.backward()?;
                grads = Some(match grads {
                    None => g,
                    Some(mut acc) => {
                        for v in &vars {
                            if let Some(new) = g.get(v.as_tensor()) {
                                let sum = match acc.get(v.as_tensor()) {
                                    Some(old) => (old + new)?,
                                    None => new.clone(),
                                };
                                acc.insert(v.as_tensor(), sum);
                            }
                        }
                        acc
                    }
                });
                trained_tokens += mb.iter().map(|e| e.tokens.len()).sum::<usize>();
            }
            let lr = learning_rate(step, total, p.learning_rate);
            opt.set_learning_rate(lr);
            if let Some(g) = &grads {
                opt.step(g)?;
            }
            step += 1;
            let valid_loss = if !valid_set.is_empty() && bi == last_batch {
                Some(evaluate(model, &lora, valid_set, p.micro_batch_tokens)?)
            } else {
                None
            };
            on_step(&StepReport {
                step,
                total_steps: total,
                train_loss: loss_sum / targets.max(1) as f64,
                valid_loss,
                learning_rate: lr,
                trained_tokens,
            });
        }
    }
    Ok(Outcome::Finished(lora))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_linearly() {
        let lrs: Vec<f64> = (0..20).map(|s| learning_rate(s, 20, 1.0)).collect();
        assert_eq!(lrs[0], 0.5);
        assert_eq!(lrs[1], 1.0);
        assert!((lrs[2] - 18.0 / 18.0).abs() < 1e-12);
        assert!((lrs[19] - 1.0 / 18.0).abs() < 1e-12);
        assert!(lrs.windows(2).skip(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn micro_batches_respect_the_padded_budget() {
        let ex = |n: usize| Example {
            tokens: vec![1; n],
            targets: vec![true; n],
        };
        let data = [ex(10), ex(30), ex(5), ex(60)];
        let refs: Vec<&Example> = data.iter().collect();
        let mbs = micro_batches(&refs, 64);
        let sizes: Vec<usize> = mbs.iter().map(|m| m.len()).collect();
        // [10, 30] pads to 2·30 = 60; adding 5 → 3·30 = 90 > 64; [5, 60] → 120 > 64.
        assert_eq!(sizes, vec![2, 1, 1]);
    }
}
