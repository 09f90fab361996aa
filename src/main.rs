//! The `nextoken` command line: `generate` and `convert`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nextoken::convert::{ConvertDtype, GgufQuant};
use nextoken::engine::{EngineConfig, EngineHandle, GenerateRequest, SamplingParams};
use nextoken::server;
use nextoken::text::Detokenizer;

/// Default model: what `models/fetch-default.sh` downloads.
const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(
    name = "nextoken",
    version,
    about = "Inference server for next-token language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Generate a continuation of a prompt.
    Generate(GenerateArgs),
    /// Engine benchmark: C concurrent requests, P-token prompts, N new tokens each.
    Bench(BenchArgs),
    /// Convert between formats: a `.gguf` file into a Hugging Face folder, or a Hugging Face
    /// folder into a `.gguf` file.
    Convert {
        /// Input: a `.gguf` file or a Hugging Face folder.
        input: PathBuf,
        /// Output: a folder (from GGUF) or a `.gguf` file (from a folder).
        output: PathBuf,
        /// Weight dtype of the folder written from a GGUF file.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: ConvertDtype,
        /// Tensor type of the GGUF written from a folder.
        #[arg(long, value_enum, default_value = "f16")]
        quant: GgufQuant,
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A `.gguf` file or a Hugging Face folder.
    #[arg(long, env = "NEXTOKEN_MODEL", default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Prompt text; special tokens such as `<|im_start|>` are recognised.
    #[arg(long)]
    prompt: String,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Top-k sampling; 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// RNG seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating after the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// A `.gguf` file or a Hugging Face folder.
    #[arg(long, env = "NEXTOKEN_MODEL", default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "NEXTOKEN_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 = any free port).
    #[arg(long, env = "NEXTOKEN_PORT", default_value_t = 8080)]
    port: u16,
    /// Model name clients use (default: the file or folder name).
    #[arg(long, env = "NEXTOKEN_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// API key clients must send as `Authorization: Bearer KEY` (repeatable; env: comma-separated).
    #[arg(long = "api-key", env = "NEXTOKEN_API_KEY", value_delimiter = ',')]
    api_keys: Vec<String>,
    /// Require the API key for /metrics too.
    #[arg(long, env = "NEXTOKEN_METRICS_REQUIRE_KEY")]
    metrics_require_key: bool,
    /// Tokens per engine step (prefill chunks + decode tokens).
    #[arg(long, env = "NEXTOKEN_MAX_BATCH_TOKENS", default_value_t = 512)]
    max_batch_tokens: usize,
    /// Sequences decoded together at most.
    #[arg(long, env = "NEXTOKEN_MAX_RUNNING_SEQS", default_value_t = 64)]
    max_running_seqs: usize,
    /// Requests queued beyond the running ones before answering 429.
    #[arg(long, env = "NEXTOKEN_MAX_WAITING", default_value_t = 256)]
    max_waiting: usize,
    /// KV cache size in MiB.
    #[arg(long, env = "NEXTOKEN_KV_CACHE_MB", default_value_t = 1024)]
    kv_cache_mb: usize,
    /// Speculative decoding by prompt lookup: up to this many draft tokens per step, taken
    /// from the context where its last tokens occurred before (0: off). Same tokens either
    /// way; faster where answers copy the context (code edits, quotes), while few requests run.
    #[arg(long, env = "NEXTOKEN_SPECULATE", default_value_t = 0)]
    speculate: usize,
    /// Largest request body in MiB.
    #[arg(long, env = "NEXTOKEN_MAX_BODY_MB", default_value_t = 8)]
    max_body_mb: usize,
    /// CORS origin allowed to call the API (`*` for any).
    #[arg(long, env = "NEXTOKEN_CORS_ALLOW_ORIGIN")]
    cors_allow_origin: Option<String>,
    /// Per-request generation time limit in seconds (0 = none); at the limit the request ends
    /// with what it has generated (finish reason `length`).
    #[arg(long, env = "NEXTOKEN_REQUEST_TIMEOUT", default_value_t = 0)]
    request_timeout: u64,
    /// Fill-in-the-middle template (starcoder, qwen, codellama, deepseek, codestral); default:
    /// detected from the vocabulary, else prefix completion.
    #[arg(long, env = "NEXTOKEN_FIM_TEMPLATE")]
    fim_template: Option<String>,
    /// A Jinja chat template file to render chats with instead of the model's own (llama.cpp's
    /// `--chat-template-file`; e.g. a template that knows tools); fine-tuning data is
    /// rendered with it too.
    #[arg(long, env = "NEXTOKEN_CHAT_TEMPLATE_FILE")]
    chat_template_file: Option<PathBuf>,
    /// Thinking models' reasoning in chat answers: `deepseek` puts the text between `<think>`
    /// and `</think>` in `reasoning_content`, `none` leaves it in `content`, `auto` is
    /// `deepseek` when the vocabulary has both tags as tokens (llama.cpp's flag and values;
    /// a request's `reasoning_format` overrides it).
    #[arg(long, env = "NEXTOKEN_REASONING_FORMAT", default_value = "auto",
          value_parser = ["auto", "deepseek", "none"])]
    reasoning_format: String,
    /// Seconds running requests get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "NEXTOKEN_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    shutdown_grace_secs: u64,
    /// Where uploaded files, batches, fine-tuning jobs, their events, adapters and stored
    /// responses are kept (created if missing; everything in it is listed again after a
    /// restart).
    #[arg(long, env = "NEXTOKEN_DATA_DIR", default_value = "nextoken-data")]
    data_dir: PathBuf,
    /// A PEFT LoRA adapter to serve from startup, as NAME=PATH (repeatable; env:
    /// comma-separated). Requests select it with `"model": "NAME"`.
    #[arg(long = "lora", env = "NEXTOKEN_LORA", value_delimiter = ',')]
    loras: Vec<String>,
    /// A folder `POST /v1/load_lora_adapter` may load adapters from (repeatable; the data
    /// dir's adapters are always allowed).
    #[arg(long = "lora-dir", env = "NEXTOKEN_LORA_DIR", value_delimiter = ',')]
    lora_dirs: Vec<PathBuf>,
    /// Requests of a `/v1/batches` batch that run at once (the engine batches them; live
    /// requests join the same steps).
    #[arg(long, env = "NEXTOKEN_BATCH_CONCURRENCY", default_value_t = 8)]
    batch_concurrency: usize,
    /// Turn off the fine-tuning API (its jobs; the Files API and batches stay).
    #[arg(long, env = "NEXTOKEN_NO_TRAINING")]
    no_training: bool,
}

fn model_name(path: &std::path::Path) -> String {
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    name.and_then(|n| n.to_str()).unwrap_or("model").to_string()
}

/// Loads the model into a running engine (blocking; seconds).
fn load_for_serving(
    args: &ServeArgs,
    name: String,
    files: nextoken::files::FileStore,
) -> anyhow::Result<server::Loaded> {
    let (model, tokenizer) = nextoken::load(&args.model)?;
    // Which weights run the quantized kernels and which became f32 copies (formats without
    // kernels), so a slow or large file says why.
    let formats: Vec<String> = model
        .weight_formats()
        .iter()
        .map(|(format, n)| format!("{n} {format}"))
        .collect();
    eprintln!("nextoken: weight matrices: {}", formats.join(", "));
    let eos_ids = model.config().eos_token_ids.clone();
    // The trainer reads the same (shared, immutable) base weights the engine serves.
    let base_for_training = (!args.no_training).then(|| model.clone());
    let generation_config = args.model.join("generation_config.json");
    let defaults = std::fs::read_to_string(&generation_config)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .map(|v| server::openai::SamplingDefaults::from_generation_config(&v))
        .unwrap_or_default();
    let engine = EngineHandle::spawn(
        model,
        EngineConfig {
            max_batch_tokens: args.max_batch_tokens,
            max_running_seqs: args.max_running_seqs,
            max_waiting: args.max_waiting,
            kv_cache_bytes: args.kv_cache_mb << 20,
            speculative_tokens: args.speculate,
            ..Default::default()
        },
    )?;
    let fim = match &args.fim_template {
        Some(name) => {
            Some(nextoken::text::FimTemplate::named(name, &tokenizer).map_err(anyhow::Error::msg)?)
        }
        None => None,
    };
    for spec in &args.loras {
        let (lora_name, path) = spec
            .split_once('=')
            .with_context(|| format!("--lora '{spec}': expected NAME=PATH"))?;
        let adapter = nextoken::model::LoraAdapter::load_peft(
            std::path::Path::new(path),
            engine.model_config(),
        )
        .with_context(|| format!("--lora {lora_name}"))?;
        engine.load_adapter(lora_name, adapter);
        eprintln!("nextoken: adapter '{lora_name}' loaded from {path}");
    }
    // The template chats are rendered with, served and trained alike.
    let template_file = args
        .chat_template_file
        .as_ref()
        .map(|path| {
            std::fs::read_to_string(path)
                .with_context(|| format!("--chat-template-file {}", path.display()))
        })
        .transpose()?;
    let chat_template = template_file
        .clone()
        .or_else(|| tokenizer.chat_template().map(str::to_string));
    let mut loaded =
        server::Loaded::new(engine.clone(), tokenizer, name.clone(), eos_ids, defaults)?
            .with_lora_dirs(args.lora_dirs.clone());
    if let Some(source) = &template_file {
        loaded = loaded
            .with_chat_template(source)
            .context("--chat-template-file")?;
    }
    match args.reasoning_format.as_str() {
        "deepseek" => loaded.reasoning = true,
        "none" => loaded.reasoning = false,
        _ => {}
    }
    match nextoken::model::details::file_details(&args.model) {
        Ok(details) => loaded = loaded.with_details(details),
        Err(e) => eprintln!("nextoken: no model details for listings: {e}"),
    }
    let base_for_training = base_for_training.filter(|m| {
        let ok = m.supports_training();
        if !ok {
            eprintln!(
                "nextoken: fine-tuning is off: the trainer runs llama-architecture models only"
            );
        }
        ok
    });
    if let Some(model) = base_for_training {
        let c = model.config();
        let jobs = nextoken::train::TrainingJobs::start(
            nextoken::train::TrainingConfig {
                data_dir: args.data_dir.clone(),
                base_model: name,
                max_example_tokens: c.max_position_embeddings.min(2048),
                micro_batch_tokens: 512,
            },
            files,
            nextoken::train::TrainerModel {
                model,
                tokenizer: loaded.tokenizer.clone(),
                chat_template,
            },
            engine,
        )
        .with_context(|| format!("data dir {}", args.data_dir.display()))?;
        loaded = loaded.with_training(jobs);
    }
    Ok(match fim {
        Some(t) => loaded.with_fim(nextoken::text::FimMode::Native(t)),
        None => loaded,
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let config = server::ServerConfig {
            served_model_name: args.served_model_name.clone(),
            api_keys: args
                .api_keys
                .iter()
                .filter(|k| !k.is_empty())
                .cloned()
                .collect(),
            metrics_require_key: args.metrics_require_key,
            max_body_bytes: args.max_body_mb << 20,
            cors_allow_origin: args.cors_allow_origin.clone(),
            request_timeout: (args.request_timeout > 0)
                .then(|| std::time::Duration::from_secs(args.request_timeout)),
        };
        let state = server::AppState::new(config);
        let responses_dir = args.data_dir.join("responses");
        state
            .keep_responses_in(&responses_dir)
            .with_context(|| format!("responses dir {}", responses_dir.display()))?;
        let files = nextoken::files::FileStore::open(&args.data_dir)
            .with_context(|| format!("data dir {}", args.data_dir.display()))?;
        state.set_files(files.clone());
        state
            .open_batches(&args.data_dir, args.batch_concurrency)
            .with_context(|| format!("data dir {}", args.data_dir.display()))?;
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("binding {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "nextoken: listening on http://{addr} (loading {})",
            args.model.display()
        );
        // Listen first so /health answers 503 while the model loads.
        let name = args
            .served_model_name
            .clone()
            .unwrap_or_else(|| model_name(&args.model));
        let grace = std::time::Duration::from_secs(args.shutdown_grace_secs);
        let load_state = state.clone();
        let loader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let loaded = load_for_serving(&args, name.clone(), files)?;
            load_state.set_loaded(std::sync::Arc::new(loaded));
            eprintln!("nextoken: model '{name}' ready");
            Ok(())
        });
        let app = server::router(state);
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            shutdown_signal().await;
            eprintln!(
                "nextoken: shutting down; running requests get {}s",
                grace.as_secs()
            );
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                eprintln!("nextoken: grace period over, exiting");
                std::process::exit(0);
            });
        });
        let serving = tokio::spawn(std::future::IntoFuture::into_future(server));
        // A model that fails to load is a startup error: report it and exit non-zero.
        loader.await.context("loader")??;
        serving.await.context("server")??;
        Ok(())
    })
}

#[derive(clap::Args)]
struct BenchArgs {
    /// A `.gguf` file or a Hugging Face folder.
    #[arg(long, env = "NEXTOKEN_MODEL", default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Concurrency levels to sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 150)]
    prompt_tokens: usize,
    /// New tokens per request (EOS ignored).
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Tokens per engine step.
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    /// KV cache size in MiB.
    #[arg(long, default_value_t = 1024)]
    kv_cache_mb: usize,
    /// Speculative decoding: draft tokens per step (0: off), as `serve --speculate`.
    #[arg(long, default_value_t = 0)]
    speculate: usize,
    /// What to run: `sweep` (concurrency sweep), `autocomplete`, `typing`, `editors` (both), or
    /// `lora` (seconds per LoRA training step, batch 4 × 128 tokens), or `speculative` (decode
    /// speed with and without prompt-lookup drafts on built-in texts, `--new-tokens` each).
    #[arg(long, default_value = "sweep")]
    scenario: String,
    /// Editor scenarios: context tokens.
    #[arg(long, default_value_t = 1500)]
    context_tokens: usize,
    /// Sweep: sampling temperature of every request (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sweep: nucleus (top-p) sampling of every request (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// llama-bench mode: prefill a prompt of this many tokens (one sequence).
    #[arg(long)]
    pp: Option<usize>,
    /// llama-bench mode: decode this many tokens (one sequence).
    #[arg(long)]
    tg: Option<usize>,
    /// llama-bench mode: runs per figure (the median is printed).
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    /// HTTP mode: the base URL of a running OpenAI-compatible server (this one, llama.cpp's
    /// llama-server, ...); streams `/v1/completions` at each concurrency level.
    #[arg(long)]
    url: Option<String>,
    /// HTTP mode: bearer token for the server.
    #[arg(long)]
    api_key: Option<String>,
    /// HTTP mode: the server's process id, to report its peak RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// HTTP mode: selects the prompts; give each repeated run its own so no server answers
    /// from its prompt cache.
    #[arg(long, default_value_t = 0)]
    prompt_seed: usize,
}

fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(url) = &args.url {
        let config = nextoken::bench_http::HttpBenchConfig {
            concurrency: args.concurrency.clone(),
            prompt_tokens: args.prompt_tokens,
            new_tokens: args.new_tokens,
            api_key: args.api_key.clone(),
            server_pid: args.server_pid,
            prompt_seed: args.prompt_seed,
        };
        nextoken::bench_http::run(url, &config)?;
        return Ok(());
    }
    let (model, tokenizer) = nextoken::load(&args.model)?;
    if args.scenario == "speculative" {
        // Two engines, drafts off and on (`--speculate`, 4 if not given), one at a time.
        let draft = if args.speculate > 0 {
            args.speculate
        } else {
            4
        };
        let config = |speculative_tokens| EngineConfig {
            kv_cache_bytes: args.kv_cache_mb << 20,
            speculative_tokens,
            ..Default::default()
        };
        let stop = model.config().eos_token_ids.clone();
        let spec = EngineHandle::spawn(model.clone(), config(draft))?;
        let plain = EngineHandle::spawn(model, config(0))?;
        let prompts = nextoken::bench::SPECULATIVE_TEXTS
            .iter()
            .map(|(name, text)| Ok((*name, tokenizer.encode(text, true)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        nextoken::bench::speculative(
            &plain,
            &spec,
            &prompts,
            &stop,
            args.new_tokens,
            args.repetitions,
        )?;
        return Ok(());
    }
    if args.scenario == "lora" {
        nextoken::bench::lora_step(&model, 4, 128, 5)?;
        return Ok(());
    }
    let max_running_seqs = args.concurrency.iter().copied().max().unwrap_or(1).max(64);
    let engine = EngineHandle::spawn(
        model,
        EngineConfig {
            max_batch_tokens: args.max_batch_tokens,
            kv_cache_bytes: args.kv_cache_mb << 20,
            max_running_seqs,
            speculative_tokens: args.speculate,
            ..Default::default()
        },
    )?;
    let ctx = args.context_tokens;
    if args.pp.is_some() || args.tg.is_some() {
        nextoken::bench::pp_tg(
            &engine,
            args.pp.unwrap_or(0),
            args.tg.unwrap_or(0),
            args.repetitions,
        )?;
        return Ok(());
    }
    match args.scenario.as_str() {
        "sweep" => {
            let config = nextoken::bench::BenchConfig {
                concurrency: args.concurrency,
                prompt_tokens: args.prompt_tokens,
                new_tokens: args.new_tokens,
                sampling: nextoken::engine::SamplingParams {
                    temperature: args.temperature,
                    top_p: args.top_p,
                    ..Default::default()
                },
            };
            nextoken::bench::run(&engine, &config)?;
        }
        "autocomplete" | "typing" | "editors" => {
            if args.scenario != "typing" {
                // The cursor moves: the last 5% of the context changes, 32 new tokens.
                nextoken::bench::autocomplete(&engine, ctx, ctx / 20, 32, 10)?;
            }
            if args.scenario != "autocomplete" {
                let interval = std::time::Duration::from_millis(50);
                nextoken::bench::typing(&engine, ctx, 20, interval, 32)?;
            }
        }
        other => {
            anyhow::bail!(
                "unknown --scenario `{other}` (sweep, autocomplete, typing, editors, \
                 speculative, lora)"
            )
        }
    }
    Ok(())
}

fn validate(args: &GenerateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.temperature >= 0.0 && args.temperature.is_finite(),
        "--temperature must be >= 0"
    );
    anyhow::ensure!(
        args.top_p > 0.0 && args.top_p <= 1.0,
        "--top-p must be in (0, 1]"
    );
    anyhow::ensure!(args.max_tokens >= 1, "--max-tokens must be >= 1");
    Ok(())
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    validate(&args)?;
    let (model, tokenizer) = nextoken::load(&args.model)?;
    let tokenizer = Arc::new(tokenizer);
    let prompt_ids = tokenizer.encode(&args.prompt, true)?;
    anyhow::ensure!(!prompt_ids.is_empty(), "the prompt is empty");
    let context = model.config().max_position_embeddings;
    anyhow::ensure!(
        prompt_ids.len() < context,
        "the prompt ({} tokens) fills the context ({context})",
        prompt_ids.len()
    );
    let mut stop = model.config().eos_token_ids.clone();
    stop.extend(tokenizer.eos_id());
    stop.sort_unstable();
    stop.dedup();
    let request = GenerateRequest {
        prompt: prompt_ids.clone(),
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            ..Default::default()
        },
        max_new_tokens: args.max_tokens.min(context - prompt_ids.len()),
        stop_token_ids: if args.ignore_eos { vec![] } else { stop },
        adapter: None,
        top_logprobs: None,
        prompt_logprobs: None,
        priority: 0,
        json: None,
        embed: false,
    };
    // The stop token ends the stream; it is in output_ids but not in the text.
    let stop_ids = request.stop_token_ids.clone();
    let engine = EngineHandle::spawn(model, EngineConfig::default())?;
    let mut detok = Detokenizer::new(tokenizer.clone(), false);
    let mut stdout = std::io::stdout().lock();
    let json = args.json;
    let mut text = String::new();
    let mut stream_err = None;
    let started = Instant::now();
    let mut first_token_at = None;
    let out = engine.submit(request)?.blocking_collect(|id| {
        first_token_at.get_or_insert_with(Instant::now);
        if stop_ids.contains(&id) {
            return;
        }
        match detok.step(id) {
            Ok(Some(piece)) => {
                text.push_str(&piece);
                if !json {
                    let _ = write!(stdout, "{piece}");
                    let _ = stdout.flush();
                }
            }
            Ok(None) => {}
            Err(e) => stream_err = Some(e),
        }
    })?;
    let finished_at = Instant::now();
    if let Some(e) = stream_err {
        return Err(e.into());
    }
    if let Some(rest) = detok.flush()? {
        text.push_str(&rest);
        if !json {
            write!(stdout, "{rest}")?;
        }
    }
    let first = first_token_at.unwrap_or(finished_at);
    let prefill_tps = prompt_ids.len() as f64 / (first - started).as_secs_f64().max(1e-9);
    let decoded = out.tokens.len().saturating_sub(1);
    let decode_tps = decoded as f64 / (finished_at - first).as_secs_f64().max(1e-9);
    if json {
        let obj = serde_json::json!({
            "prompt_ids": prompt_ids,
            "output_ids": out.tokens,
            "text": text,
            "finish_reason": out.finish.as_str(),
            "prefill_tokens_per_s": prefill_tps,
            "decode_tokens_per_s": decode_tps,
        });
        writeln!(stdout, "{obj}")?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "prompt: {} tokens, {prefill_tps:.1} tok/s | decode: {decoded} tokens, {decode_tps:.1} tok/s | finish: {}",
            prompt_ids.len(),
            out.finish.as_str()
        );
    }
    Ok(())
}

/// Candle allocates a fresh buffer for every tensor op. glibc serves large ones with fresh
/// mmaps (and returns them at free), so every training step page-faults its few GiB of
/// activations back in. Keeping freed memory in the heap for reuse removes that; the cost is
/// that RSS stays at its peak.
#[allow(unsafe_code)]
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called once at start-up, before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    nextoken::configure_threads(None);
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => run_serve(args),
        Command::Generate(args) => run_generate(args),
        Command::Bench(args) => run_bench(args),
        Command::Convert {
            input,
            output,
            dtype,
            quant,
        } => if input.is_dir() {
            nextoken::convert::hf_to_gguf(&input, &output, quant)
        } else {
            nextoken::convert::gguf_to_hf(&input, &output, dtype)
        }
        .with_context(|| format!("converting {}", input.display())),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
