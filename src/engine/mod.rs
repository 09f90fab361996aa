//! Engine layer: turns token ids into more token ids. Sampling, and (for now) single-sequence
//! generation over the model's ragged-batch forward. Knows nothing of HTTP or text.

pub mod sampler;
pub mod single;

pub use sampler::{Sampler, SamplingParams};
pub use single::{generate, FinishReason, GenerateOptions, Generated};
