//! `Linear`: the one type every projection (and the embedding table) of every architecture goes
//! through, so kernels can change without touching architecture code.
//!
//! Arithmetic everywhere: f32 activations times the exactly dequantized weights — the function
//! transformers computes in float32. GGUF Q4_1/Q8_0 weights stay quantized in memory and run
//! through `quant::QMatrix` kernels; other weights are f32 tensors multiplied by candle.

use std::sync::Arc;

use candle_core::{Device, Result, Tensor};

use super::quant::QMatrix;

#[derive(Clone)]
enum Weight {
    /// `(out, in)` f32, contiguous.
    F32(Tensor),
    /// Quantized blocks, plus their exact f32 dequantization for many-row calls.
    Quant(Arc<QMatrix>, Tensor),
}

/// From this many activation rows on, the f32 GEMM on the dequantized copy beats the
/// quantized kernel (prefill chunks, large batches); both compute the same function.
const GEMM_MIN_ROWS: usize = 32;

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

    /// Wraps a quantized weight (and keeps an exact f32 copy for many-row calls).
    pub fn quantized(weight: QMatrix, bias: Option<Tensor>) -> Result<Self> {
        let dense = Tensor::from_vec(
            weight.dequantize(),
            (weight.rows(), weight.cols()),
            &Device::Cpu,
        )?;
        Ok(Linear {
            weight: Weight::Quant(Arc::new(weight), dense),
            bias,
        })
    }

    /// `(out_features, in_features)`.
    pub fn dims(&self) -> (usize, usize) {
        match &self.weight {
            Weight::F32(w) => w.dims2().unwrap_or((0, 0)),
            Weight::Quant(q, _) => (q.rows(), q.cols()),
        }
    }

    /// `x: (rows, in)` → `(rows, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::F32(w) => x.matmul(&w.t()?)?,
            Weight::Quant(_, w) if x.dim(0)? >= GEMM_MIN_ROWS => x.matmul(&w.t()?)?,
            Weight::Quant(q, _) => {
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
            Weight::F32(w) | Weight::Quant(_, w) => {
                w.index_select(&Tensor::from_slice(ids, ids.len(), &Device::Cpu)?, 0)
            }
        }
    }

    /// The weight as an f32 `(out, in)` tensor (dequantized when quantized).
    pub fn weight_f32(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::F32(w) => Ok(w.clone()),
            Weight::Quant(q, _) => {
                Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), &Device::Cpu)
            }
        }
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}
