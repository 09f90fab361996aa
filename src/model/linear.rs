//! `Linear`: the one type every projection (and the embedding table) of every architecture goes
//! through, so kernels can change without touching architecture code.
//!
//! Arithmetic: f32 weights (safetensors, f32/f16 GGUF tensors) are f32 tensors multiplied by
//! candle — the function transformers computes in float32. GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and
//! Q3_K/Q4_K/Q5_K/Q6_K weights stay quantized in memory (no f32 copy) and run through
//! `quant::QMatrix` kernels with llama.cpp's arithmetic (activations quantized to 8 bits per
//! block, integer dot products), one function for every row count.

use std::sync::Arc;

use candle_core::{Device, Result, Tensor};

use super::quant::QMatrix;

#[derive(Clone)]
enum Weight {
    /// `(out, in)` f32, contiguous.
    F32(Tensor),
    /// Panel-packed quantized blocks.
    Quant(Arc<QMatrix>),
}

/// `y = x · Wᵀ (+ b)` with `W: (out, in)`.
#[derive(Clone)]
pub struct Linear {
    weight: Weight,
    /// `(out_features,)`.
    bias: Option<Tensor>,
}

impl Linear {
    /// Wraps an f32 `(out, in)` weight and optional `(out,)` bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight: Weight::F32(weight),
            bias,
        }
    }

    /// Wraps a quantized weight.
    pub fn quantized(weight: QMatrix, bias: Option<Tensor>) -> Result<Self> {
        Ok(Linear {
            weight: Weight::Quant(Arc::new(weight)),
            bias,
        })
    }

    /// The same weight with a `(out,)` bias added.
    pub fn with_bias(self, bias: Tensor) -> Self {
        Linear {
            bias: Some(bias),
            ..self
        }
    }

    /// Whether the weight stays block-quantized (runs the 8-bit-activation kernels).
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, Weight::Quant(_))
    }

    /// How the weight is held: its block format's name, or `"f32"`.
    pub fn format_name(&self) -> &'static str {
        match &self.weight {
            Weight::F32(_) => "f32",
            Weight::Quant(q) => q.format().name(),
        }
    }

    /// `(out_features, in_features)`.
    pub fn dims(&self) -> (usize, usize) {
        match &self.weight {
            Weight::F32(w) => w.dims2().unwrap_or((0, 0)),
            Weight::Quant(q) => (q.rows(), q.cols()),
        }
    }

    /// `x: (rows, in)` → `(rows, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::F32(w) => x.matmul(&w.t()?)?,
            Weight::Quant(q) => {
                let rows = x.dim(0)?;
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                Tensor::from_vec(q.matmul(&xs, rows), (rows, q.rows()), &Device::Cpu)?
            }
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// `x: (rows, in)` row-major → `(rows, out)` row-major, without tensor plumbing.
    pub fn forward_vec(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut y = match &self.weight {
            Weight::F32(w) => {
                let (_, cols) = w.dims2()?;
                let xt = Tensor::from_slice(x, (rows, cols), &Device::Cpu)?;
                xt.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?
            }
            Weight::Quant(q) => q.matmul(x, rows),
        };
        if let Some(b) = &self.bias {
            // Read in place: no copy of the bias per call.
            let n = b.elem_count();
            let (storage, layout) = b.storage_and_layout();
            let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(all)) = &*storage else {
                candle_core::bail!("bias must be an f32 CPU tensor");
            };
            let Some(b) = all.get(layout.start_offset()..layout.start_offset() + n) else {
                candle_core::bail!("bias storage too short");
            };
            for row in y.chunks_exact_mut(n) {
                for (v, bi) in row.iter_mut().zip(b) {
                    *v += bi;
                }
            }
        }
        Ok(y)
    }

    /// [`Self::forward_vec`] split by output columns into parts of the given widths; quantized
    /// weights without bias write each part in place.
    pub fn forward_parts(&self, x: &[f32], rows: usize, widths: &[usize]) -> Result<Vec<Vec<f32>>> {
        if let (Weight::Quant(q), None) = (&self.weight, &self.bias) {
            if let Some(parts) = q.matmul_parts(x, rows, widths) {
                return Ok(parts);
            }
        }
        let y = self.forward_vec(x, rows)?;
        let total: usize = widths.iter().sum();
        let mut outs: Vec<Vec<f32>> = widths
            .iter()
            .map(|w| Vec::with_capacity(w * rows))
            .collect();
        for row in y.chunks_exact(total) {
            let mut at = 0;
            for (o, w) in outs.iter_mut().zip(widths) {
                o.extend_from_slice(&row[at..at + w]);
                at += w;
            }
        }
        Ok(outs)
    }

    /// Several quantized projections of the same input that could not be stacked (their
    /// formats differ), in one call: the activations quantized once, one parallel loop.
    /// `None` when any has a bias or float weights.
    pub fn forward_many(parts: &[&Linear], x: &[f32], rows: usize) -> Option<Vec<Vec<f32>>> {
        let qs: Option<Vec<&QMatrix>> = parts
            .iter()
            .map(|p| match (&p.weight, &p.bias) {
                (Weight::Quant(q), None) => Some(q.as_ref()),
                _ => None,
            })
            .collect();
        QMatrix::matmul_many(&qs?, x, rows)
    }

    /// Several projections of the same input stacked into one (their outputs side by side),
    /// so one kernel call serves them all; `None` when their storage cannot be stacked.
    pub fn stack(parts: &[&Linear]) -> Option<Linear> {
        let bias = if parts.iter().all(|p| p.bias.is_none()) {
            None
        } else {
            let biases: Option<Vec<Tensor>> = parts
                .iter()
                .map(|p| match &p.bias {
                    Some(b) => Some(b.clone()),
                    None => Tensor::zeros(p.dims().0, candle_core::DType::F32, &Device::Cpu).ok(),
                })
                .collect();
            Some(Tensor::cat(&biases?, 0).ok()?)
        };
        let weight = match &parts.first()?.weight {
            Weight::F32(_) => {
                let ws: Option<Vec<Tensor>> = parts
                    .iter()
                    .map(|p| match &p.weight {
                        Weight::F32(w) => Some(w.clone()),
                        Weight::Quant(_) => None,
                    })
                    .collect();
                Weight::F32(Tensor::cat(&ws?, 0).ok()?)
            }
            Weight::Quant(_) => {
                let qs: Option<Vec<&QMatrix>> = parts
                    .iter()
                    .map(|p| match &p.weight {
                        Weight::Quant(q) => Some(q.as_ref()),
                        Weight::F32(_) => None,
                    })
                    .collect();
                Weight::Quant(Arc::new(QMatrix::stack(&qs?)?))
            }
        };
        Some(Linear { weight, bias })
    }

    /// Rows `ids` of the weight as f32 `(ids.len(), in)`: the embedding lookup.
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        match &self.weight {
            Weight::F32(w) => w.index_select(&Tensor::from_slice(ids, ids.len(), &Device::Cpu)?, 0),
            Weight::Quant(q) => {
                let cols = q.cols();
                let mut out = vec![0f32; ids.len() * cols];
                for (row, &id) in out.chunks_exact_mut(cols).zip(ids) {
                    let id = id as usize;
                    if id >= q.rows() {
                        candle_core::bail!("row {id} out of range for {} rows", q.rows());
                    }
                    q.dequantize_row(id, row);
                }
                Tensor::from_vec(out, (ids.len(), cols), &Device::Cpu)
            }
        }
    }

    /// The weight as an f32 `(out, in)` tensor (dequantized when quantized).
    pub fn weight_f32(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::F32(w) => Ok(w.clone()),
            Weight::Quant(q) => {
                Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), &Device::Cpu)
            }
        }
    }

    /// The transposed weight `Wᵀ: (in, out)` without bias, so that its `forward` computes
    /// `g · W` (the input gradient of this layer, for training). A quantized weight gives a
    /// Q8_0 transpose (8-bit kernels both ways) when `out` is a multiple of 32, else f32.
    pub fn transposed(&self) -> Result<Linear> {
        if let Weight::Quant(q) = &self.weight {
            if let Some(t) = q.transposed_q8_0() {
                return Linear::quantized(t, None);
            }
        }
        Ok(Linear::new(self.weight_f32()?.t()?.contiguous()?, None))
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_is_added_to_every_row_in_both_paths() {
        let w = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.]], &Device::Cpu).expect("w");
        // A bias that is a view into a larger tensor (non-zero start offset).
        let b = Tensor::new(&[9f32, 10., 20., 30.], &Device::Cpu)
            .and_then(|t| t.narrow(0, 1, 3))
            .expect("b");
        let l = Linear::new(w, Some(b));
        let y = l.forward_vec(&[1., 2., 3., 4.], 2).expect("forward");
        assert_eq!(y, vec![11., 22., 33., 13., 24., 37.]);
        let x = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).expect("x");
        let t = l
            .forward(&x)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>());
        assert_eq!(t.expect("tensor path"), y);
    }
}
