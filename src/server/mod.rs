//! Server layer: a thin axum shell. Parses requests, calls the engine and the text layer,
//! formats responses. The only layer that knows both the engine and text.

pub mod batches;
pub mod completions;
pub mod embeddings;
pub mod error;
pub mod files;
pub mod fine_tuning;
pub mod infill;
pub mod info;
pub mod metrics;
pub mod ollama;
pub mod openai;
pub mod responses;
pub mod stream;
pub mod tools;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};

use crate::engine::json_mode::TokenBytes;
use crate::engine::EngineHandle;
use crate::model::TokenId;
use crate::text::{ChatTemplate, FimMode, FimTemplate, TextError, Tokenizer};
use crate::train::TrainingJobs;

use error::ApiError;
use metrics::Metrics;
use openai::SamplingDefaults;

/// HTTP-level settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Name clients use for the model (default: the model file or folder name).
    pub served_model_name: Option<String>,
    /// Accepted API keys; empty = no authentication.
    pub api_keys: Vec<String>,
    /// Whether `/metrics` needs a key too.
    pub metrics_require_key: bool,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Allowed CORS origin (`*` for any); none = no CORS headers.
    pub cors_allow_origin: Option<String>,
    /// Generation time limit per request; at the limit it ends with what it has (`length`).
    pub request_timeout: Option<std::time::Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            served_model_name: None,
            api_keys: Vec::new(),
            metrics_require_key: false,
            max_body_bytes: 8 << 20,
            cors_allow_origin: None,
            request_timeout: None,
        }
    }
}

/// What exists once the model is loaded.
pub struct Loaded {
    /// The engine.
    pub engine: EngineHandle,
    /// The tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The compiled chat template, if the model has one.
    pub chat_template: Option<ChatTemplate>,
    /// Name the model is served under.
    pub model_name: String,
    /// Token ids that end generation unless `ignore_eos`.
    pub eos_ids: Vec<TokenId>,
    /// Sampling defaults from `generation_config.json`.
    pub defaults: SamplingDefaults,
    /// How fill-in-the-middle requests are served (detected from the vocabulary).
    pub fim: FimMode,
    /// Whether chat answers' `<think>…</think>` goes to `reasoning_content` by default (on
    /// when the vocabulary has both tags as tokens: a thinking model; `--reasoning-format`).
    pub reasoning: bool,
    /// Load time (Unix seconds).
    pub created: u64,
    /// Fine-tuning jobs, when training is enabled.
    pub training: Option<TrainingJobs>,
    /// Folders `POST /v1/load_lora_adapter` may load from (besides the data dir's adapters).
    pub lora_dirs: Vec<PathBuf>,
    /// The model file's format, size, parameter count and quantization, when known (Ollama's
    /// model `details`).
    pub details: Option<crate::model::details::FileDetails>,
    /// Every token's bytes for JSON mode, built on a thread of its own at load (a decode per
    /// vocabulary entry: a fraction of a second that no request's thread should spend).
    token_bytes: Arc<OnceLock<Arc<TokenBytes>>>,
}

/// The reasoning tags of thinking models, as the JSON-mode constraint lets them through.
fn reasoning_tags() -> Arc<crate::engine::json_mode::ReasoningTags> {
    static TAGS: OnceLock<Arc<crate::engine::json_mode::ReasoningTags>> = OnceLock::new();
    TAGS.get_or_init(|| {
        Arc::new(crate::engine::json_mode::ReasoningTags {
            open: crate::text::reasoning::OPEN.as_bytes().into(),
            close: crate::text::reasoning::CLOSE.as_bytes().into(),
        })
    })
    .clone()
}

impl Loaded {
    /// Bundles a running engine with its tokenizer.
    pub fn new(
        engine: EngineHandle,
        tokenizer: Tokenizer,
        model_name: String,
        mut eos_ids: Vec<TokenId>,
        defaults: SamplingDefaults,
    ) -> Result<Self, TextError> {
        let chat_template = tokenizer
            .chat_template()
            .map(|t| ChatTemplate::new(t, tokenizer.bos_token(), tokenizer.eos_token()))
            .transpose()?;
        eos_ids.extend(tokenizer.eos_id());
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let fim = FimTemplate::detect(&tokenizer).map_or(FimMode::PrefixOnly, FimMode::Native);
        let reasoning = ["<think>", "</think>"]
            .iter()
            .all(|t| tokenizer.token_to_id(t).is_some());
        let tokenizer = Arc::new(tokenizer);
        let token_bytes = Arc::new(OnceLock::new());
        {
            let (cell, tokenizer) = (token_bytes.clone(), tokenizer.clone());
            // A request that comes first (or a failed spawn) leaves it to the request: the
            // OnceLock runs one initialiser.
            let _ = std::thread::Builder::new()
                .name("token-bytes".into())
                .spawn(move || {
                    cell.get_or_init(|| Arc::new(TokenBytes::new(tokenizer.token_bytes())));
                });
        }
        Ok(Loaded {
            fim,
            reasoning,
            engine,
            tokenizer,
            chat_template,
            model_name,
            eos_ids,
            defaults,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            training: None,
            lora_dirs: Vec::new(),
            details: None,
            token_bytes,
        })
    }

    /// A fresh JSON-mode constraint for `grammar` over every token's bytes (built at load;
    /// should a request come first, it waits for or builds them).
    pub fn json_constraint(
        &self,
        grammar: Arc<crate::engine::json_schema::Grammar>,
    ) -> crate::engine::json_mode::JsonConstraint {
        let bytes = self
            .token_bytes
            .get_or_init(|| Arc::new(TokenBytes::new(self.tokenizer.token_bytes())));
        crate::engine::json_mode::JsonConstraint::new(bytes.clone(), grammar)
    }

    /// Enables the fine-tuning API with these jobs.
    pub fn with_training(mut self, jobs: TrainingJobs) -> Self {
        self.training = Some(jobs);
        self
    }

    /// The model file's details for listings.
    pub fn with_details(mut self, details: crate::model::details::FileDetails) -> Self {
        self.details = Some(details);
        self
    }

    /// Lets the runtime adapter API load from `dirs` too.
    pub fn with_lora_dirs(mut self, dirs: Vec<PathBuf>) -> Self {
        self.lora_dirs = dirs;
        self
    }

    /// Renders chats with the Jinja template `source` instead of the model's own
    /// (`--chat-template-file`).
    pub fn with_chat_template(mut self, source: &str) -> Result<Self, TextError> {
        self.chat_template = Some(ChatTemplate::new(
            source,
            self.tokenizer.bos_token(),
            self.tokenizer.eos_token(),
        )?);
        Ok(self)
    }

    /// Serves fill-in-the-middle with `mode` instead of the detected one (`--fim-template`).
    pub fn with_fim(mut self, mode: FimMode) -> Self {
        self.fim = mode;
        self
    }

    /// Whether `name` refers to the base model.
    pub fn serves(&self, name: &str) -> bool {
        name == self.model_name
    }

    /// Maps a request's `model` to the adapter it names: `None` for the base model (or no
    /// name), the adapter's name when one is loaded, 404 otherwise.
    pub fn resolve_model(&self, name: Option<&str>) -> Result<Option<String>, ApiError> {
        match name {
            None | Some("") => Ok(None),
            Some(m) if self.serves(m) => Ok(None),
            Some(m) if self.engine.has_adapter(m) => Ok(Some(m.to_string())),
            Some(m) => Err(ApiError::model_not_found(m)),
        }
    }

    /// Vocabulary size of the model.
    pub fn vocab_size(&self) -> usize {
        self.engine.limits().vocab_size
    }
}

struct Shared {
    config: ServerConfig,
    loaded: OnceLock<Arc<Loaded>>,
    metrics: Arc<Metrics>,
    responses: responses::SharedStore,
    files: OnceLock<crate::files::FileStore>,
    batches: OnceLock<batches::Batches>,
}

/// Shared state of all handlers.
#[derive(Clone)]
pub struct AppState {
    shared: Arc<Shared>,
}

impl AppState {
    /// State of a server whose model is still loading.
    pub fn new(config: ServerConfig) -> Self {
        AppState {
            shared: Arc::new(Shared {
                config,
                loaded: OnceLock::new(),
                metrics: Arc::new(Metrics::default()),
                responses: Default::default(),
                files: OnceLock::new(),
                batches: OnceLock::new(),
            }),
        }
    }

    /// Marks the model loaded; requests are served from now on.
    pub fn set_loaded(&self, loaded: Arc<Loaded>) {
        let _ = self.shared.loaded.set(loaded);
    }

    /// The loaded model, or 503 while loading.
    pub fn loaded(&self) -> Result<&Loaded, ApiError> {
        self.shared.loaded.get().map(Arc::as_ref).ok_or_else(|| {
            ApiError::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "the model is loading; retry shortly",
            )
        })
    }

    /// Keeps stored Responses-API responses in `dir` (one file each), reading back those
    /// already there: they survive a restart.
    pub fn keep_responses_in(&self, dir: &std::path::Path) -> std::io::Result<()> {
        let store = responses::ResponseStore::open(dir)?;
        let mut s = self
            .shared
            .responses
            .lock()
            .map_err(|_| std::io::Error::other("response store poisoned"))?;
        *s = store;
        Ok(())
    }

    /// Serves the Files API (and batches) from `files` (set once; later calls are ignored).
    pub fn set_files(&self, files: crate::files::FileStore) {
        let _ = self.shared.files.set(files);
    }

    /// The file store, if the server has one.
    pub fn files(&self) -> Option<&crate::files::FileStore> {
        self.shared.files.get()
    }

    /// Serves the Batch API from `data_dir/batches` over the file store (set first with
    /// [`AppState::set_files`]), `concurrency` requests of a batch at a time, and goes on with
    /// the batches a restart interrupted (they wait for the model). Call inside a Tokio
    /// runtime.
    pub fn open_batches(
        &self,
        data_dir: &std::path::Path,
        concurrency: usize,
    ) -> std::io::Result<()> {
        let files = self
            .files()
            .ok_or_else(|| std::io::Error::other("batches need the file store"))?
            .clone();
        let batches = batches::Batches::open(data_dir, files, concurrency)?;
        if self.shared.batches.set(batches.clone()).is_ok() {
            batches.resume(self);
        }
        Ok(())
    }

    /// The batches, if the server runs them.
    pub fn batches(&self) -> Option<&batches::Batches> {
        self.shared.batches.get()
    }

    /// Stored Responses-API responses.
    pub fn responses(&self) -> responses::SharedStore {
        self.shared.responses.clone()
    }

    /// Metrics registry.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Settings.
    pub fn config(&self) -> &ServerConfig {
        &self.shared.config
    }
}

fn bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(str::trim)
}

async fn auth(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let config = app.config();
    let path = req.uri().path();
    // `/props` is public as llama.cpp's is: its clients probe it to find the server.
    let exempt = path == "/health"
        || path == "/props"
        || path == "/"
        || (path == "/metrics" && !config.metrics_require_key)
        || req.method() == Method::OPTIONS;
    if config.api_keys.is_empty() || exempt {
        return next.run(req).await;
    }
    match bearer(&req) {
        Some(key) if config.api_keys.iter().any(|k| k == key) => next.run(req).await,
        Some(_) => ApiError::status(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid API key",
        )
        .into_response(),
        None => ApiError::status(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing API key: send 'Authorization: Bearer <key>'",
        )
        .into_response(),
    }
}

async fn count_requests(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(req).await;
    app.metrics()
        .count_request(&endpoint, response.status().as_u16());
    response
}

async fn not_found(req: Request) -> ApiError {
    ApiError::status(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::status(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!(
            "method {} is not allowed on {}",
            req.method(),
            req.uri().path()
        ),
    )
}

/// The application's routes and layers.
pub fn router(state: AppState) -> Router {
    let config = state.config().clone();
    let mut app = routes()
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(tracing::Level::INFO))
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
        );
    if let Some(origin) = &config.cors_allow_origin {
        let allow = if origin == "*" {
            AllowOrigin::any()
        } else {
            match HeaderValue::from_str(origin) {
                Ok(v) => AllowOrigin::exact(v),
                Err(_) => AllowOrigin::any(),
            }
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(allow)
                .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    app.with_state(state)
}

/// The routes as the server's own batches call them: no authentication (the batch was
/// accepted with a key), no request counting or tracing; the same body limit.
fn internal_router(state: AppState) -> Router {
    let limit = state.config().max_body_bytes;
    routes()
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Every route and its handler.
fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(info::playground))
        .route("/v1/completions", post(completions::completions))
        .route("/infill", post(infill::infill))
        .route("/completion", post(infill::completion))
        .route("/api/generate", post(infill::ollama_generate))
        .route("/api/chat", post(ollama::chat))
        .route("/api/tags", get(ollama::tags))
        .route("/api/ps", get(ollama::ps))
        .route("/api/show", post(ollama::show))
        .route("/api/version", get(ollama::version))
        .route("/api/embed", post(embeddings::ollama_embed))
        .route("/api/embeddings", post(embeddings::ollama_embeddings))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/apply-template", post(completions::apply_template))
        .route("/v1/responses", post(responses::responses))
        .route(
            "/v1/batches",
            post(batches::create_batch).get(batches::list_batches),
        )
        .route("/v1/batches/{id}", get(batches::get_batch))
        .route("/v1/batches/{id}/cancel", post(batches::cancel_batch))
        .route(
            "/v1/responses/{id}",
            get(responses::get_response).delete(responses::delete_response),
        )
        .route(
            "/v1/responses/{id}/input_items",
            get(responses::input_items_list),
        )
        .route("/v1/models", get(info::models))
        .route("/v1/models/{id}", get(info::model))
        .route("/health", get(info::health))
        .route("/props", get(info::props))
        .route("/tokenize", post(info::tokenize))
        .route("/detokenize", post(info::detokenize))
        .route("/metrics", get(info::metrics))
        .route("/v1/files", post(files::upload_file).get(files::list_files))
        .route(
            "/v1/files/{id}",
            get(files::get_file).delete(files::delete_file),
        )
        .route("/v1/files/{id}/content", get(files::file_content))
        .route(
            "/v1/fine_tuning/jobs",
            post(fine_tuning::create_job).get(fine_tuning::list_jobs),
        )
        .route("/v1/fine_tuning/jobs/{id}", get(fine_tuning::get_job))
        .route(
            "/v1/fine_tuning/jobs/{id}/events",
            get(fine_tuning::job_events),
        )
        .route(
            "/v1/fine_tuning/jobs/{id}/cancel",
            post(fine_tuning::cancel_job),
        )
        .route(
            "/v1/load_lora_adapter",
            post(fine_tuning::load_lora_adapter),
        )
        .route(
            "/v1/unload_lora_adapter",
            post(fine_tuning::unload_lora_adapter),
        )
}
