//! `Linear`: the one type every projection of every architecture goes through, so kernels can
//! be swapped (quantized, multi-row, GEMM) without touching architecture code.
//!
//! Arithmetic: f32 activations times f32 weights (GGUF blocks dequantized exactly at load), the
//! same function transformers computes in float32. Whatever kernel is picked for a row count,
//! it must compute this function; only the summation order may differ.

use candle_core::{Result, Tensor};

/// `y = x · Wᵀ (+ b)` with `W: (out, in)`.
#[derive(Clone)]
pub struct Linear {
    /// `(out_features, in_features)`, f32, contiguous.
    weight: Tensor,
    /// `(out_features,)`.
    bias: Option<Tensor>,
}

impl Linear {
    /// Wraps a `(out, in)` weight and optional `(out,)` bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    /// `x: (rows, in)` → `(rows, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The `(out, in)` weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}
