//! `Sampler`: logits → next token for one sequence. Penalties, logit bias, temperature
//! (0 = greedy), top-k, top-p, min-p, and a seeded RNG owned by the sequence, so the same seed
//! gives the same tokens whatever else is batched. Also log-probabilities.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::TokenId;

/// How to pick the next token. Values are validated before they get here.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 = off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the top token; 0 = off.
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of tokens seen so far; 1 = off.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of every token already generated.
    pub frequency_penalty: f32,
    /// Added to the logits of the given tokens.
    pub logit_bias: Vec<(TokenId, f32)>,
    /// RNG seed; `None` draws one.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }
}

/// Per-sequence sampler state.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Reused between steps (candidate ids).
    scratch: Vec<usize>,
    /// Reused between steps (unnormalised probabilities).
    weights: Vec<f32>,
    /// Reused between steps (probability mass per weight bin).
    bins: Vec<f64>,
}

/// Weight bins for the nucleus search: the f32 bits above this one (exponent and 4 mantissa
/// bits), 16 bins per octave.
const BIN_SHIFT: u32 = 19;

/// Cuts `cand` (most likely first) after the first token where the running weight reaches
/// `target`; keeps all when it never does.
fn nucleus(cand: &mut Vec<usize>, weight: impl Fn(usize) -> f64, target: f64) {
    let mut acc = 0f64;
    if let Some(n) = cand.iter().position(|&i| {
        acc += weight(i);
        acc >= target
    }) {
        cand.truncate(n + 1);
    }
}

/// Index of the largest value; the first one on ties (as torch.argmax).
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// `log_softmax` of one row: `x − max − ln Σ e^(x − max)`, the sum accumulated in f64 over
/// vectorised exponentials (a libm call per token of the vocabulary cost ~1 ms per step).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut w = Vec::new();
    crate::model::vmath::exp_shifted(logits, max, 1.0, &mut w);
    let sum: f64 = w.iter().map(|&x| f64::from(x)).sum();
    let lse = f64::from(max) + sum.ln();
    logits
        .iter()
        .map(|&x| (f64::from(x) - lse) as f32)
        .collect()
}

/// The `n` most likely tokens with their log-probabilities, most likely first.
pub fn top_logprobs(logprobs: &[f32], n: usize) -> Vec<(TokenId, f32)> {
    let mut idx: Vec<usize> = (0..logprobs.len()).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(n - 1, |&a, &b| {
        logprobs[b].total_cmp(&logprobs[a]).then(a.cmp(&b))
    });
    idx.truncate(n);
    idx.sort_by(|&a, &b| logprobs[b].total_cmp(&logprobs[a]).then(a.cmp(&b)));
    idx.into_iter()
        .map(|i| (i as TokenId, logprobs[i]))
        .collect()
}

impl Sampler {
    /// A sampler for one sequence.
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Sampler {
            params,
            rng: StdRng::seed_from_u64(seed),
            scratch: Vec::new(),
            weights: Vec::new(),
            bins: Vec::new(),
        }
    }

    /// The parameters in use.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Applies penalties and bias in place; `prompt` counts for the repetition penalty only,
    /// `generated` for all three (as vLLM does).
    fn adjust(&self, logits: &mut [f32], prompt: &[TokenId], generated: &[TokenId]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in prompt.iter().chain(generated) {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (l, s) in logits.iter_mut().zip(seen) {
                if s {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<TokenId, u32>::new();
            for &t in generated {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
    }

    /// Picks the next token from `logits` (modified in place by penalties and bias).
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        prompt: &[TokenId],
        generated: &[TokenId],
    ) -> TokenId {
        self.adjust(logits, prompt, generated);
        let p = &self.params;
        if p.temperature <= 0.0 || p.top_k == 1 {
            return argmax(logits) as TokenId;
        }
        self.keep(logits);
        let (cand, w) = (&self.scratch, &self.weights);
        let weight = |i: usize| f64::from(w[i]);
        let total: f64 = cand.iter().map(|&i| weight(i)).sum();
        let mut u = f64::from(self.rng.random::<f32>()) * total;
        for &i in cand.iter() {
            if u < weight(i) {
                return i as TokenId;
            }
            u -= weight(i);
        }
        cand.last().map_or_else(|| argmax(logits), |&i| i) as TokenId
    }

    /// The tokens that top-k, top-p and min-p keep into `scratch` (most likely first where a
    /// cut needed the order), and every token's unnormalised probability into `weights`.
    fn keep(&mut self, logits: &[f32]) {
        let p = &self.params;
        let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        let cand = &mut self.scratch;
        cand.clear();
        if p.top_k > 0 && p.top_k < logits.len() {
            cand.extend(0..logits.len());
            cand.select_nth_unstable_by(p.top_k - 1, by_logit);
            cand.truncate(p.top_k);
            cand.sort_by(by_logit);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Unnormalised probabilities (the most likely token's is 1).
        let w = &mut self.weights;
        crate::model::vmath::exp_shifted(logits, max, p.temperature, w);
        let weight = |i: usize| f64::from(w[i]);
        // min-p keeps tokens at least `min_p` times as likely as the top one.
        let floor = p.min_p.max(0.0);
        if cand.is_empty() {
            // No top-k: all tokens are candidates. Sorting 50k of them per token would cost
            // milliseconds, so a histogram of the weights (positive floats order as their bits:
            // bins of 1/16 octave) finds the bin where the nucleus ends, and only the tokens
            // from that bin up are sorted.
            if p.top_p >= 1.0 {
                // Every token above the floor, in id order: the same distribution.
                cand.extend((0..w.len()).filter(|&i| w[i] >= floor));
            } else {
                let mass = &mut self.bins;
                mass.clear();
                mass.resize((1f32.to_bits() >> BIN_SHIFT) as usize + 1, 0.0);
                let last = mass.len() - 1;
                for &x in w.iter() {
                    mass[((x.to_bits() >> BIN_SHIFT) as usize).min(last)] += f64::from(x);
                }
                let target = f64::from(p.top_p) * mass.iter().sum::<f64>();
                let mut acc = 0f64;
                let bin = (0..mass.len())
                    .rev()
                    .find(|&k| {
                        acc += mass[k];
                        acc >= target
                    })
                    .unwrap_or(0);
                let cut = f32::from_bits((bin as u32) << BIN_SHIFT).max(floor);
                cand.extend((0..w.len()).filter(|&i| w[i] >= cut));
                cand.sort_by(by_logit);
                nucleus(cand, weight, target);
            }
        } else {
            // Top-k (sorted): then the nucleus within it, then min-p.
            let total: f64 = cand.iter().map(|&i| weight(i)).sum();
            if p.top_p < 1.0 {
                nucleus(cand, weight, f64::from(p.top_p) * total);
            }
            let top = weight(cand[0]);
            let keep = cand
                .iter()
                .take_while(|&&i| weight(i) >= f64::from(floor) * top)
                .count();
            cand.truncate(keep.max(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9, -1.0]
    }

    #[test]
    fn greedy_takes_first_max() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&mut logits(), &[], &[]), 1);
        assert_eq!(argmax(&[1.0, 5.0, 5.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let params = SamplingParams {
            temperature: 1.5,
            seed: Some(7),
            ..Default::default()
        };
        let run = || {
            let mut s = Sampler::new(params.clone());
            (0..50)
                .map(|_| s.sample(&mut logits(), &[], &[]))
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        assert!(
            a.iter().collect::<std::collections::HashSet<_>>().len() > 2,
            "{a:?}"
        );
    }

    #[test]
    fn top_k_and_top_p_restrict_candidates() {
        let mut s = Sampler::new(SamplingParams {
            top_k: 2,
            seed: Some(1),
            ..Default::default()
        });
        for _ in 0..100 {
            assert!([1, 4].contains(&s.sample(&mut logits(), &[], &[])));
        }
        // Probabilities of the sorted logits: 3.0 → 0.39, 2.9 → 0.35; top_p 0.5 keeps two.
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.5,
            seed: Some(2),
            ..Default::default()
        });
        for _ in 0..100 {
            assert!([1, 4].contains(&s.sample(&mut logits(), &[], &[])));
        }
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.95,
            seed: Some(3),
            ..Default::default()
        });
        for _ in 0..100 {
            assert!([1, 4].contains(&s.sample(&mut logits(), &[], &[])));
        }
    }

    /// The kept set as the textbook algorithm finds it: every token sorted, softmax, the
    /// nucleus prefix, then min-p.
    fn reference_kept(logits: &[f32], p: &SamplingParams) -> Vec<usize> {
        let mut cand: Vec<usize> = (0..logits.len()).collect();
        cand.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let max = logits[cand[0]];
        let w: Vec<f64> = cand
            .iter()
            .map(|&i| (f64::from(logits[i] - max) / f64::from(p.temperature)).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let mut keep = cand.len();
        let mut acc = 0.0;
        for (i, x) in w.iter().enumerate() {
            acc += x;
            if acc >= f64::from(p.top_p) * total {
                keep = i + 1;
                break;
            }
        }
        keep = keep.min(
            w.iter()
                .take_while(|&&x| x >= f64::from(p.min_p))
                .count()
                .max(1),
        );
        cand.truncate(keep);
        cand.sort_unstable();
        cand
    }

    #[test]
    fn kept_tokens_match_the_full_sort() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut cases = 0;
        for n in [7usize, 1000, 49152] {
            for (temperature, top_k, top_p, min_p) in [
                (1.0, 0, 0.9, 0.0),
                (0.7, 0, 0.95, 0.0),
                (1.3, 0, 0.5, 0.05),
                (1.0, 0, 1.0, 0.1),
                (1.0, 0, 1.0, 0.0),
                (0.8, 40, 0.9, 0.0),
                (1.0, 5, 1.0, 0.3),
                (2.0, 0, 0.99, 0.0),
            ] {
                // Peaked and flat rows: a few large logits over a spread of small ones.
                let spread = if cases % 2 == 0 { 3.0 } else { 12.0 };
                let logits: Vec<f32> = (0..n)
                    .map(|_| rng.random::<f32>() * spread - rng.random::<f32>().powi(8) * 20.0)
                    .collect();
                let params = SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    seed: Some(1),
                    ..Default::default()
                };
                let mut s = Sampler::new(params.clone());
                s.keep(&logits);
                let mut got = s.scratch.clone();
                got.sort_unstable();
                assert_eq!(got, reference_kept(&logits, &params), "n={n} {params:?}");
                cases += 1;
            }
        }
        assert_eq!(cases, 24);
    }

    #[test]
    fn penalties_and_bias_change_the_choice() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            presence_penalty: 0.5,
            ..Default::default()
        });
        assert_eq!(s.sample(&mut logits(), &[], &[1]), 4);
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repetition_penalty: 2.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&mut logits(), &[1, 4], &[]), 2);
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            logit_bias: vec![(5, 10.0)],
            ..Default::default()
        });
        assert_eq!(s.sample(&mut logits(), &[], &[]), 5);
    }

    #[test]
    fn top_logprobs_sorted_and_normalised() {
        let lp = log_softmax(&logits());
        let total: f64 = lp.iter().map(|&x| f64::from(x).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        let top = top_logprobs(&lp, 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 4, 2]);
        // Against the libm form over a vocabulary-sized row.
        let row: Vec<f32> = (0..49152)
            .map(|i| (i as f32 * 0.013).sin() * 14.0)
            .collect();
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = f64::from(max)
            + row
                .iter()
                .map(|&x| f64::from(x - max).exp())
                .sum::<f64>()
                .ln();
        for (&x, &got) in row.iter().zip(&log_softmax(&row)) {
            let want = (f64::from(x) - lse) as f32;
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
    }
}
