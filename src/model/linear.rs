//! `Linear`: the one type every projection (and the embedding table) of every architecture goes
//! through, so kernels can change without touching architecture code.
//!
//! Arithmetic everywhere: f32 activations times the exactly dequantized weights — the function
//! transformers computes in float32. GGUF Q4_1/Q8_0 weights stay quantized in memory (no f32
//! copy) and run through `quant::QMatrix` kernels, one function for every row count; other
//! weights are f32 tensors multiplied by candle.

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

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}
