//! LoRA adapters: `y = x·Wᵀ + (alpha/r)·(x·Aᵀ)·Bᵀ` on frozen base weights.
//!
//! The math lives once, in [`lora_rows`]: serving (each sequence's rows of a ragged batch use
//! that sequence's adapter) calls it directly, training through [`lora_delta`] (the same
//! function as an autograd op). Each row is computed alone in a fixed order, so a sequence's
//! delta never depends on what else is in the batch. Adapters are
//! read and written in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`,
//! tensors named `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`), so they
//! move freely between nextoken and the Python ecosystem.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Result, Tensor};
use serde_json::{json, Value};

use super::config::ModelConfig;
use super::LoadError;

/// A projection of a llama-family block that an adapter can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// Attention query projection.
    Q,
    /// Attention key projection.
    K,
    /// Attention value projection.
    V,
    /// Attention output projection.
    O,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// MLP down projection.
    Down,
}

impl Target {
    /// Every target, in block order.
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// PEFT's `target_modules` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// Parses a `target_modules` entry.
    pub fn parse(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Module path inside a block (`self_attn.q_proj`).
    pub fn module_path(self) -> String {
        match self {
            Target::Q | Target::K | Target::V | Target::O => format!("self_attn.{}", self.name()),
            _ => format!("mlp.{}", self.name()),
        }
    }

    /// `(out_features, in_features)` of the base projection.
    pub fn dims(self, c: &ModelConfig) -> (usize, usize) {
        let (h, q, kv, ff) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        match self {
            Target::Q => (q, h),
            Target::K | Target::V => (kv, h),
            Target::O => (h, q),
            Target::Gate | Target::Up => (ff, h),
            Target::Down => (h, ff),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A dot product in a fixed order (eight running lanes, then the tail), whatever the caller.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            lanes[k] += x[k] * y[k];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `scale · (x·Aᵀ)·Bᵀ` for `x: (rows, in)`, `A: (r, in)`, `B: (out, r)`, all row-major: the
/// LoRA delta added to the frozen projection's output, `(rows, out)`. Each row is computed on
/// its own, so its result does not depend on the other rows (batch invariance).
pub fn lora_rows(x: &[f32], a: &[f32], b: &[f32], rank: usize, scale: f32) -> Vec<f32> {
    use rayon::prelude::*;
    let (inp, out) = (a.len().checked_div(rank), b.len().checked_div(rank));
    let (Some(inp @ 1..), Some(out @ 1..)) = (inp, out) else {
        return Vec::new();
    };
    let rows = x.len() / inp;
    let mut y = vec![0f32; rows * out];
    let row = |(yr, xr): (&mut [f32], &[f32])| {
        let z: Vec<f32> = a.chunks_exact(inp).map(|ar| dot(xr, ar)).collect();
        for (v, br) in yr.iter_mut().zip(b.chunks_exact(rank)) {
            *v = dot(&z, br) * scale;
        }
    };
    if rows >= 16 {
        y.par_chunks_mut(out).zip(x.par_chunks(inp)).for_each(row);
    } else {
        y.chunks_mut(out).zip(x.chunks(inp)).for_each(row);
    }
    y
}

/// [`lora_rows`] as an autograd op on `(x, A, B)`; the backward pass gives all three their
/// gradients (`dx = s·(g·B)·A`, `dA = s·(g·B)ᵀ·x`, `dB = s·gᵀ·(x·Aᵀ)`).
struct LoraDelta {
    scale: f32,
}

impl candle_core::CustomOp3 for LoraDelta {
    fn name(&self) -> &'static str {
        "lora-delta"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let f32s = |s: &'_ candle_core::CpuStorage, l: &candle_core::Layout| -> Result<Vec<f32>> {
            let candle_core::CpuStorage::F32(v) = s else {
                candle_core::bail!("lora-delta: f32 inputs expected");
            };
            match l.contiguous_offsets() {
                Some((a, b)) => Ok(v[a..b].to_vec()),
                None => candle_core::bail!("lora-delta: contiguous inputs expected"),
            }
        };
        let (rows, inp) = l1.shape().dims2()?;
        let (rank, a_in) = l2.shape().dims2()?;
        let (out, b_rank) = l3.shape().dims2()?;
        if a_in != inp || b_rank != rank {
            candle_core::bail!("lora-delta: x {inp} wide, A ({rank}, {a_in}), B ({out}, {b_rank})");
        }
        let y = lora_rows(
            &f32s(s1, l1)?,
            &f32s(s2, l2)?,
            &f32s(s3, l3)?,
            rank,
            self.scale,
        );
        Ok((candle_core::CpuStorage::F32(y), (rows, out).into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = f64::from(self.scale);
        let gb = grad.matmul(b)?.affine(s, 0.0)?; // (rows, r)
        let dx = gb.matmul(a)?;
        let da = gb.t()?.matmul(x)?;
        let db = grad.t()?.matmul(&x.matmul(&a.t()?)?)?.affine(s, 0.0)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// `scale · (x·Aᵀ)·Bᵀ` for `x: (rows, in)`, `A: (r, in)`, `B: (out, r)` as a tensor op with
/// gradients (training); the arithmetic is [`lora_rows`].
pub fn lora_delta(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        LoraDelta {
            scale: scale as f32,
        },
    )
}

/// One adapted projection's factors.
#[derive(Clone)]
pub struct LoraPair {
    /// `(r, in)`.
    pub a: Tensor,
    /// `(out, r)`.
    pub b: Tensor,
}

/// A loaded adapter for one base model.
pub struct LoraAdapter {
    id: u64,
    rank: usize,
    alpha: f64,
    scale: f64,
    targets: Vec<Target>,
    /// Per layer, per [`Target`] index.
    layers: Vec<[Option<LoraPair>; 7]>,
}

impl std::fmt::Debug for LoraAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraAdapter")
            .field("id", &self.id)
            .field("rank", &self.rank)
            .field("alpha", &self.alpha)
            .field("targets", &self.targets)
            .finish()
    }
}

/// Two adapters are the same only when they are the same load (ids are process-unique), so a
/// reloaded adapter under an old name never shares cached KV with its predecessor.
impl PartialEq for LoraAdapter {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}
impl Eq for LoraAdapter {}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// PEFT's tensor name of one factor (`"A"` or `"B"`).
pub fn peft_tensor_name(layer: usize, target: Target, factor: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_{factor}.weight",
        target.module_path()
    )
}

impl LoraAdapter {
    /// Builds an adapter from factors, checking every shape against the base model.
    /// `pairs[(layer, target)]`; a target must be present in every layer.
    pub fn new(
        config: &ModelConfig,
        rank: usize,
        alpha: f64,
        use_rslora: bool,
        mut pairs: HashMap<(usize, Target), LoraPair>,
    ) -> std::result::Result<Self, String> {
        if rank == 0 {
            return Err("rank r must be at least 1".into());
        }
        let mut targets: Vec<Target> = pairs.keys().map(|(_, t)| *t).collect();
        targets.sort();
        targets.dedup();
        if targets.is_empty() {
            return Err("the adapter has no LoRA weights".into());
        }
        let mut layers = Vec::with_capacity(config.num_layers);
        for layer in 0..config.num_layers {
            let mut row: [Option<LoraPair>; 7] = Default::default();
            for &t in &targets {
                let pair = pairs.remove(&(layer, t)).ok_or_else(|| {
                    format!("layer {layer} has no weights for target '{}'", t.name())
                })?;
                let (out, inp) = t.dims(config);
                let (a, b) = (pair.a.dims(), pair.b.dims());
                if a != [rank, inp] || b != [out, rank] {
                    return Err(format!(
                        "layer {layer} {}: lora_A {a:?} / lora_B {b:?} do not fit the base model \
                         (expected [{rank}, {inp}] / [{out}, {rank}])",
                        t.name()
                    ));
                }
                row[t.index()] = Some(LoraPair {
                    a: pair.a.to_dtype(DType::F32).map_err(|e| e.to_string())?,
                    b: pair.b.to_dtype(DType::F32).map_err(|e| e.to_string())?,
                });
            }
            layers.push(row);
        }
        if let Some((layer, _)) = pairs.keys().next() {
            return Err(format!(
                "weights for layer {layer}, but the base model has {} layers",
                config.num_layers
            ));
        }
        let scale = if use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        };
        Ok(LoraAdapter {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            rank,
            alpha,
            scale,
            targets,
            layers,
        })
    }

    /// Process-unique id of this load.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// LoRA rank `r`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The multiplier of the delta (`alpha / r`, or `alpha / √r` with rsLoRA).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Adapted projections.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// The factors of `target` in `layer`, if adapted.
    pub fn get(&self, layer: usize, target: Target) -> Option<&LoraPair> {
        self.layers.get(layer)?[target.index()].as_ref()
    }

    /// Reads a PEFT adapter folder and checks it against the base model.
    pub fn load_peft(dir: &Path, config: &ModelConfig) -> std::result::Result<Self, LoadError> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| LoadError::io(&cfg_path, e))?;
        let cfg: Value = serde_json::from_str(&text)
            .map_err(|e| LoadError::format(&cfg_path, format!("invalid JSON: {e}")))?;
        let bad = |m: String| LoadError::format(&cfg_path, m);
        if let Some(t) = cfg.get("peft_type").and_then(Value::as_str) {
            if t != "LORA" {
                return Err(LoadError::unsupported(
                    &cfg_path,
                    format!("peft_type '{t}'"),
                ));
            }
        }
        let rank = cfg
            .get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("'r' missing or not a positive integer".into()))?
            as usize;
        let alpha = cfg
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .unwrap_or(rank as f64);
        let use_rslora = cfg
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if cfg.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
            return Err(LoadError::unsupported(&cfg_path, "fan_in_fan_out = true"));
        }
        if let Some(b) = cfg.get("bias").and_then(Value::as_str) {
            if b != "none" {
                return Err(LoadError::unsupported(&cfg_path, format!("bias = '{b}'")));
            }
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if cfg
                .get(key)
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty())
            {
                return Err(LoadError::unsupported(&cfg_path, key));
            }
        }
        if cfg
            .get("modules_to_save")
            .is_some_and(|m| !m.is_null() && m.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(LoadError::unsupported(&cfg_path, "modules_to_save"));
        }
        let modules: Vec<String> = match cfg.get("target_modules") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        for m in &modules {
            if Target::parse(m).is_none() {
                return Err(LoadError::unsupported(
                    &cfg_path,
                    format!("target module '{m}' (supported: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"),
                ));
            }
        }
        let st_path = dir.join("adapter_model.safetensors");
        if !st_path.exists() {
            return Err(LoadError::io(
                &st_path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            ));
        }
        let tensors = candle_core::safetensors::load(&st_path, &Device::Cpu)
            .map_err(|e| LoadError::format(&st_path, e))?;
        let mut factors: HashMap<(usize, Target, bool), Tensor> = HashMap::new();
        for (name, t) in tensors {
            let parsed = parse_peft_name(&name).ok_or_else(|| {
                LoadError::unsupported(
                    &st_path,
                    format!("tensor '{name}' (not a LoRA factor of a llama block)"),
                )
            })?;
            factors.insert(parsed, t);
        }
        let mut pairs = HashMap::new();
        for (&(layer, target, is_a), t) in &factors {
            if !is_a {
                continue;
            }
            let b = factors.get(&(layer, target, false)).ok_or_else(|| {
                LoadError::format(
                    &st_path,
                    format!("layer {layer} {}: lora_B missing", target.name()),
                )
            })?;
            pairs.insert(
                (layer, target),
                LoraPair {
                    a: t.clone(),
                    b: b.clone(),
                },
            );
        }
        if pairs.len() * 2 != factors.len() {
            return Err(LoadError::format(&st_path, "a lora_B without its lora_A"));
        }
        if !modules.is_empty() {
            if let Some((_, t)) = pairs
                .keys()
                .find(|(_, t)| !modules.iter().any(|m| m == t.name()))
            {
                return Err(LoadError::format(
                    &st_path,
                    format!(
                        "weights for '{}', which target_modules does not list",
                        t.name()
                    ),
                ));
            }
        }
        LoraAdapter::new(config, rank, alpha, use_rslora, pairs)
            .map_err(|m| LoadError::format(&st_path, m))
    }

    /// Writes the adapter as a PEFT folder: into `dir.tmp`, then renamed to `dir`, so a reader
    /// never sees half an adapter.
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> std::io::Result<()> {
        let tmp = dir.with_extension("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let mut tensors = HashMap::new();
        for (layer, row) in self.layers.iter().enumerate() {
            for &t in &self.targets {
                if let Some(p) = &row[t.index()] {
                    tensors.insert(peft_tensor_name(layer, t, "A"), p.a.clone());
                    tensors.insert(peft_tensor_name(layer, t, "B"), p.b.clone());
                }
            }
        }
        candle_core::safetensors::save(&tensors, tmp.join("adapter_model.safetensors"))
            .map_err(std::io::Error::other)?;
        let config = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "target_modules": self.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "use_rslora": (self.scale - self.alpha / self.rank as f64).abs() > 1e-12,
            "modules_to_save": null,
        });
        let text = serde_json::to_string_pretty(&config).map_err(std::io::Error::other)?;
        std::fs::write(tmp.join("adapter_config.json"), text)?;
        sync_dir(&tmp)?;
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::rename(&tmp, dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_file() {
            std::fs::File::open(&p)?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

/// `(layer, target, is_A)` of a PEFT tensor name (with or without the `.default` adapter name).
fn parse_peft_name(name: &str) -> Option<(usize, Target, bool)> {
    let rest = name.split("layers.").nth(1)?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let mut parts = rest.split('.');
    let _group = parts.next()?; // self_attn / mlp
    let target = Target::parse(parts.next()?)?;
    let is_a = match parts.next()? {
        "lora_A" => true,
        "lora_B" => false,
        _ => return None,
    };
    let tail: Vec<&str> = parts.collect();
    if tail != ["weight"] && tail != ["default", "weight"] {
        return None;
    }
    Some((layer, target, is_a))
}

/// Adds each sequence's LoRA delta to the projection output `y: (rows, out)` of input
/// `x: (rows, in)` — rows grouped by adapter so every adapter runs one product per call.
/// `row_adapters[i]` is row `i`'s adapter, if any.
pub fn add_deltas(
    y: &mut [f32],
    x: &[f32],
    row_adapters: &[Option<&LoraAdapter>],
    layer: usize,
    target: Target,
) -> Result<()> {
    let rows = row_adapters.len();
    if rows == 0 {
        return Ok(());
    }
    let (inp, out) = (x.len() / rows, y.len() / rows);
    let mut groups: Vec<(&LoraAdapter, Vec<usize>)> = Vec::new();
    for (i, a) in row_adapters.iter().enumerate() {
        let Some(a) = a else { continue };
        if a.get(layer, target).is_none() {
            continue;
        }
        match groups.iter_mut().find(|(g, _)| g.id == a.id) {
            Some((_, idx)) => idx.push(i),
            None => groups.push((a, vec![i])),
        }
    }
    for (adapter, idx) in groups {
        let Some(pair) = adapter.get(layer, target) else {
            continue;
        };
        let mut xs = Vec::with_capacity(idx.len() * inp);
        for &i in &idx {
            xs.extend_from_slice(&x[i * inp..(i + 1) * inp]);
        }
        let (a, b) = (
            pair.a.flatten_all()?.to_vec1::<f32>()?,
            pair.b.flatten_all()?.to_vec1::<f32>()?,
        );
        let d = lora_rows(&xs, &a, &b, pair.a.dim(0)?, adapter.scale as f32);
        for (k, &i) in idx.iter().enumerate() {
            for (v, dv) in y[i * out..(i + 1) * out]
                .iter_mut()
                .zip(&d[k * out..(k + 1) * out])
            {
                *v += dv;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::model::test_values as values;

    #[test]
    fn each_row_is_bit_identical_alone_or_with_others() {
        let (rows, inp, out, r) = (7, 45, 19, 4);
        let (x, a, b) = (
            values(rows * inp, 1),
            values(r * inp, 2),
            values(out * r, 3),
        );
        let all = lora_rows(&x, &a, &b, r, 0.7);
        let many = lora_rows(&values(40 * inp, 1), &a, &b, r, 0.7);
        for i in 0..rows {
            let alone = lora_rows(&x[i * inp..(i + 1) * inp], &a, &b, r, 0.7);
            assert_eq!(alone, all[i * out..(i + 1) * out], "row {i}");
            assert_eq!(alone, many[i * out..(i + 1) * out], "row {i} among 40");
        }
    }

    #[test]
    fn delta_op_gradients_match_the_composed_matmuls() {
        use candle_core::Var;
        let (rows, inp, out, r) = (5, 12, 9, 3);
        let var = |n: usize, shape: (usize, usize), seed: u32| {
            Var::from_tensor(&Tensor::from_vec(values(n, seed), shape, &Device::Cpu).unwrap())
                .unwrap()
        };
        let (x, a, b) = (
            var(rows * inp, (rows, inp), 4),
            var(r * inp, (r, inp), 5),
            var(out * r, (out, r), 6),
        );
        let w = Tensor::from_vec(values(rows * out, 7), (rows, out), &Device::Cpu).unwrap();
        let fused = lora_delta(x.as_tensor(), a.as_tensor(), b.as_tensor(), 1.5).unwrap();
        let composed = x
            .as_tensor()
            .matmul(&a.as_tensor().t().unwrap())
            .and_then(|z| z.matmul(&b.as_tensor().t().unwrap()))
            .and_then(|y| y.affine(1.5, 0.0))
            .unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let close = |p: &[f32], q: &[f32]| p.iter().zip(q).all(|(p, q)| (p - q).abs() < 1e-5);
        assert!(close(&flat(&fused), &flat(&composed)));
        let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (composed * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &a, &b] {
            let (p, q) = (
                flat(gf.get(v.as_tensor()).unwrap()),
                flat(gc.get(v.as_tensor()).unwrap()),
            );
            assert!(close(&p, &q), "{p:?} vs {q:?}");
        }
    }

    #[test]
    fn delta_matches_hand_computed_values() {
        // x = [1, 2], A = [[1, 0], [0, 1], [1, 1]] (r = 3), B = [[1, 2, 3]] (out = 1), scale 0.5:
        // x·Aᵀ = [1, 2, 3]; ·Bᵀ = 1 + 4 + 9 = 14; · 0.5 = 7.
        let x = Tensor::new(&[[1f32, 2.]], &Device::Cpu).unwrap();
        let a = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1f32, 2., 3.]], &Device::Cpu).unwrap();
        let d = lora_delta(&x, &a, &b, 0.5)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(d, vec![vec![7.0]]);
    }

    #[test]
    fn peft_names_parse_both_spellings() {
        assert_eq!(
            parse_peft_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, Target::Q, true))
        );
        assert_eq!(
            parse_peft_name("base_model.model.model.layers.12.mlp.down_proj.lora_B.default.weight"),
            Some((12, Target::Down, false))
        );
        assert_eq!(parse_peft_name("base_model.model.lm_head.weight"), None);
        assert_eq!(
            peft_tensor_name(0, Target::V, "B"),
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
        );
    }
}
