//! Running requests through the engine in tests.

use nextoken::engine::{Collected, EngineConfig, EngineHandle, GenerateRequest};

/// An engine on the default GGUF model with `config`.
pub fn engine(config: EngineConfig) -> EngineHandle {
    let (model, _) = nextoken::load(&super::model_path()).expect("default model loads");
    EngineHandle::spawn(model, config).expect("engine starts")
}

/// Runs one request to the end.
pub fn run(engine: &EngineHandle, request: GenerateRequest) -> Collected {
    engine
        .submit(request)
        .expect("submit")
        .blocking_collect(|_| {})
        .expect("request completes")
}
