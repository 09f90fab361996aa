//! nextoken: an inference server for pre-trained next-token language models.
//!
//! Layers (dependencies point one way):
//! ```text
//! server (axum) ──▶ engine ──▶ model (candle)
//!        └──────────────▶ text (tokenizers)
//! ```
//! - [`model`]: architectures, weight loading (GGUF, safetensors), the ragged-batch forward.
//! - [`text`]: tokenizer loading, incremental detokenization.
//! - [`engine`]: continuous batching, KV block pool, sampling.
//! - [`server`]: OpenAI-compatible HTTP API.
//! - [`train`]: fine-tuning jobs; [`files`]: the uploaded and generated files both it and the
//!   server's batches use.

pub mod bench;
pub mod bench_http;
pub mod convert;
pub mod engine;
pub mod files;
pub mod model;
pub mod server;
pub mod text;
pub mod train;

use std::path::Path;
use std::sync::Once;

/// Loads a model and its tokenizer from a `.gguf` file or a Hugging Face folder.
pub fn load(path: &Path) -> anyhow::Result<(model::Model, text::Tokenizer)> {
    let (model, source) = model::Model::load(path)?;
    let tokenizer = match &source {
        model::ModelSource::Gguf { metadata, path } => {
            text::Tokenizer::from_gguf_metadata(metadata)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        model::ModelSource::HfDir(dir) => text::Tokenizer::from_hf_dir(dir)?,
    };
    Ok((model, tokenizer))
}

/// Sets the compute thread count once per process (default: the available cores). Without it
/// candle re-reads `/proc/cpuinfo` on every matmul, and more busy threads than cores collapse
/// throughput.
pub fn configure_threads(threads: Option<usize>) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let n = threads
            .or_else(|| {
                std::env::var("RAYON_NUM_THREADS")
                    .ok()
                    .and_then(|s| s.parse().ok())
            })
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        // Candle and rayon both read this variable; set before any pool exists.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        // Candle's element-wise worker spins ~25k iterations after every op before parking;
        // during training that spinning competes with the matmul threads for the cores.
        if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
            std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
        }
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    });
}
