//! Fine-tuning jobs: a queue of LoRA jobs run one at a time on a trainer
//! thread, their events, and the adapters they produce — published to the engine the moment a
//! job succeeds. Uses `model` and `text`; of the engine only the public handle (to publish
//! adapters and to see whether requests are waiting).
//!
//! Serving has priority: before every forward/backward pass the trainer waits while the
//! engine has requests running or waiting, so training only uses the cores when serving is
//! idle (a request that arrives mid-pass waits at most for that pass, which is kept short by
//! `micro_batch_tokens`).
//!
//! Nothing accepted is lost: jobs, events and adapters live in the data dir ([`store`]), the
//! training files in the [`FileStore`]. After a restart, jobs that were queued run again, and a job that was running
//! is reported `failed` with code `interrupted` (its partial adapter is never served).

pub mod dataset;
pub mod store;
pub mod trainer;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::broadcast;

use crate::engine::EngineHandle;
use crate::files::{new_id, now, FileStore};
use crate::model::{LoraAdapter, Model, Target};
use crate::text::{ChatTemplate, Tokenizer};

pub use crate::files::FileRecord;
pub use store::{EventRecord, Hyperparameters, JobError, JobRecord, JobStatus, LoraSpec, Store};
use trainer::{Outcome, TrainParams};

/// Base learning rate for LoRA; `learning_rate_multiplier` scales it.
pub const BASE_LEARNING_RATE: f64 = 1e-3;

/// Settings of the training subsystem.
#[derive(Debug, Clone)]
pub struct TrainingConfig {
    /// Where jobs and adapters live.
    pub data_dir: PathBuf,
    /// The base model's served name (jobs must name it).
    pub base_model: String,
    /// Longest training example, in tokens.
    pub max_example_tokens: usize,
    /// Padded tokens per forward/backward pass.
    pub micro_batch_tokens: usize,
}

/// Errors answered to API callers: the file store's (not found, invalid field, storage).
pub use crate::files::FileError as TrainError;

fn invalid(param: &str, message: impl Into<String>) -> TrainError {
    TrainError::Invalid {
        param: param.into(),
        message: message.into(),
    }
}

fn io_err(e: std::io::Error) -> TrainError {
    TrainError::Io(e.to_string())
}

/// What a client asks for (already parsed from the wire).
#[derive(Debug, Clone, Default)]
pub struct JobSpec {
    /// Base model name.
    pub model: String,
    /// File id.
    pub training_file: String,
    /// File id.
    pub validation_file: Option<String>,
    /// Name suffix of the fine-tuned model.
    pub suffix: Option<String>,
    /// Seed (random if absent).
    pub seed: Option<u64>,
    /// `None` fields are `auto`.
    pub hyperparameters: Hyperparameters,
    /// LoRA rank (default 8).
    pub r: Option<usize>,
    /// LoRA alpha (default 2·r).
    pub alpha: Option<f64>,
    /// LoRA dropout (default 0).
    pub dropout: Option<f32>,
    /// PEFT module names (default q_proj, v_proj).
    pub target_modules: Option<Vec<String>>,
}

#[derive(Default)]
struct State {
    jobs: BTreeMap<String, JobRecord>,
    events: BTreeMap<String, Vec<EventRecord>>,
    cancelled: HashSet<String>,
}

struct Inner {
    config: TrainingConfig,
    store: Store,
    files: FileStore,
    state: Mutex<State>,
    queue: Mutex<std::sync::mpsc::Sender<String>>,
    events_tx: broadcast::Sender<(String, EventRecord)>,
}

/// Handle to the fine-tuning subsystem (cheap to clone).
#[derive(Clone)]
pub struct TrainingJobs {
    inner: Arc<Inner>,
}

/// What the trainer thread needs from the served model.
pub struct TrainerModel {
    /// The base model (shares weights with the engine's).
    pub model: Model,
    /// Its tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// Its chat template source, if any.
    pub chat_template: Option<String>,
}

impl TrainingJobs {
    /// Opens the data dir (training files come from `files`), recovers earlier jobs (re-queues queued ones, reports interrupted
    /// ones), publishes the adapters of succeeded jobs and starts the trainer thread.
    pub fn start(
        config: TrainingConfig,
        files: FileStore,
        base: TrainerModel,
        engine: EngineHandle,
    ) -> std::io::Result<Self> {
        let store = Store::open(&config.data_dir)?;
        let (queue_tx, queue_rx) = std::sync::mpsc::channel();
        let (events_tx, _) = broadcast::channel(1024);
        let jobs = TrainingJobs {
            inner: Arc::new(Inner {
                config,
                store,
                files,
                state: Mutex::default(),
                queue: Mutex::new(queue_tx),
                events_tx,
            }),
        };
        jobs.recover(&engine)?;
        let worker = jobs.clone();
        std::thread::Builder::new()
            .name("trainer".into())
            .spawn(move || {
                while let Ok(id) = queue_rx.recv() {
                    worker.run_job(&id, &base, &engine);
                }
            })?;
        Ok(jobs)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn recover(&self, engine: &EngineHandle) -> std::io::Result<()> {
        let store = &self.inner.store;
        let mut requeue = Vec::new();
        {
            let mut st = self.state();
            for j in store.jobs() {
                st.events.insert(j.id.clone(), store.events(&j.id));
                st.jobs.insert(j.id.clone(), j);
            }
        }
        let jobs: Vec<JobRecord> = self.state().jobs.values().cloned().collect();
        for job in jobs {
            match job.status {
                JobStatus::ValidatingFiles | JobStatus::Queued => requeue.push(job.id.clone()),
                JobStatus::Running => {
                    self.finish(
                        &job.id,
                        JobStatus::Failed,
                        Some(JobError {
                            code: "interrupted".into(),
                            message: "the server stopped while this job was running; start a new job to train again".into(),
                            param: None,
                        }),
                    );
                }
                JobStatus::Succeeded => {
                    let Some(name) = &job.fine_tuned_model else {
                        continue;
                    };
                    let dir = store.adapter_dir(&job.id);
                    match LoraAdapter::load_peft(&dir, engine.model_config()) {
                        Ok(a) => engine.load_adapter(name, a),
                        Err(e) => {
                            tracing::error!(job = %job.id, error = %e, "cannot load the adapter of a succeeded job")
                        }
                    }
                }
                JobStatus::Failed | JobStatus::Cancelled => {}
            }
        }
        for id in requeue {
            self.enqueue(&id);
        }
        Ok(())
    }

    fn enqueue(&self, id: &str) {
        if let Ok(q) = self.inner.queue.lock() {
            let _ = q.send(id.to_string());
        }
    }

    /// The data dir.
    pub fn data_dir(&self) -> &std::path::Path {
        self.inner.store.root()
    }

    /// Where adapters are written (runtime adapter loading allows paths under it).
    pub fn adapters_dir(&self) -> PathBuf {
        self.inner.store.root().join("adapters")
    }

    /// Events of all jobs as they happen.
    pub fn subscribe(&self) -> broadcast::Receiver<(String, EventRecord)> {
        self.inner.events_tx.subscribe()
    }

    // ---- jobs ----

    /// Validates and queues a job.
    pub fn create_job(&self, spec: JobSpec) -> Result<JobRecord, TrainError> {
        if spec.model != self.inner.config.base_model {
            return Err(TrainError::NotFound(format!(
                "the model '{}' cannot be fine-tuned here; the base model is '{}'",
                spec.model, self.inner.config.base_model
            )));
        }
        for (param, id) in [
            ("training_file", Some(&spec.training_file)),
            ("validation_file", spec.validation_file.as_ref()),
        ] {
            let Some(id) = id else { continue };
            let file = self
                .inner
                .files
                .get(id)
                .map_err(|e| invalid(param, e.to_string()))?;
            if file.purpose != "fine-tune" {
                return Err(invalid(
                    param,
                    format!(
                        "file '{id}' has purpose '{}'; training data is uploaded with purpose 'fine-tune'",
                        file.purpose
                    ),
                ));
            }
        }
        let h = &spec.hyperparameters;
        if h.n_epochs.is_some_and(|n| !(1..=50).contains(&n)) {
            return Err(invalid(
                "hyperparameters.n_epochs",
                "n_epochs must be 1..=50",
            ));
        }
        if h.batch_size.is_some_and(|n| !(1..=256).contains(&n)) {
            return Err(invalid(
                "hyperparameters.batch_size",
                "batch_size must be 1..=256",
            ));
        }
        if h.learning_rate_multiplier
            .is_some_and(|m| !(m > 0.0 && m <= 100.0))
        {
            return Err(invalid(
                "hyperparameters.learning_rate_multiplier",
                "learning_rate_multiplier must be in (0, 100]",
            ));
        }
        let r = spec.r.unwrap_or(8);
        if !(1..=256).contains(&r) {
            return Err(invalid("lora.r", "r must be 1..=256"));
        }
        let alpha = spec.alpha.unwrap_or(2.0 * r as f64);
        if !(alpha > 0.0 && alpha.is_finite()) {
            return Err(invalid("lora.alpha", "alpha must be positive"));
        }
        let dropout = spec.dropout.unwrap_or(0.0);
        if !(0.0..1.0).contains(&dropout) {
            return Err(invalid("lora.dropout", "dropout must be in [0, 1)"));
        }
        let modules = spec
            .target_modules
            .clone()
            .unwrap_or_else(|| vec!["q_proj".into(), "v_proj".into()]);
        if modules.is_empty() {
            return Err(invalid("lora.target_modules", "target_modules is empty"));
        }
        if let Some(bad) = modules.iter().find(|m| Target::parse(m).is_none()) {
            return Err(invalid(
                "lora.target_modules",
                format!("unknown target module '{bad}' (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"),
            ));
        }
        if let Some(s) = &spec.suffix {
            if s.len() > 64
                || !s
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(invalid(
                    "suffix",
                    "suffix: up to 64 characters of letters, digits, '-' and '_'",
                ));
            }
        }
        let rec = JobRecord {
            id: new_id("ftjob-"),
            created_at: now(),
            model: spec.model,
            training_file: spec.training_file,
            validation_file: spec.validation_file,
            suffix: spec.suffix,
            seed: spec.seed.unwrap_or_else(|| rand::random::<u32>() as u64),
            hyperparameters: spec.hyperparameters,
            lora: LoraSpec {
                r,
                alpha,
                dropout,
                target_modules: modules,
            },
            status: JobStatus::ValidatingFiles,
            fine_tuned_model: None,
            finished_at: None,
            started_at: None,
            trained_tokens: None,
            error: None,
            estimated_finish: None,
        };
        self.inner.store.save_job(&rec).map_err(io_err)?;
        self.state().jobs.insert(rec.id.clone(), rec.clone());
        self.event(&rec.id, "info", "Validating training file", None);
        self.enqueue(&rec.id);
        Ok(rec)
    }

    /// Every job, newest first.
    pub fn jobs(&self) -> Vec<JobRecord> {
        let mut v: Vec<JobRecord> = self.state().jobs.values().cloned().collect();
        v.sort_by(|a, b| b.id.cmp(&a.id));
        v
    }

    /// One job.
    pub fn job(&self, id: &str) -> Result<JobRecord, TrainError> {
        self.state()
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| TrainError::NotFound(format!("no fine-tuning job with id '{id}'")))
    }

    /// A job's events, oldest first.
    pub fn events(&self, id: &str) -> Result<Vec<EventRecord>, TrainError> {
        self.job(id)?;
        Ok(self.state().events.get(id).cloned().unwrap_or_default())
    }

    /// Cancels a job that has not finished (a running one stops before its next pass).
    pub fn cancel(&self, id: &str) -> Result<JobRecord, TrainError> {
        let job = self.job(id)?;
        if job.status.is_terminal() {
            return Err(invalid(
                "job_id",
                format!("the job has already {}", status_word(job.status)),
            ));
        }
        self.state().cancelled.insert(id.to_string());
        if job.status != JobStatus::Running {
            self.finish(id, JobStatus::Cancelled, None);
        }
        self.job(id)
    }

    fn event(&self, job: &str, level: &str, message: &str, data: Option<serde_json::Value>) {
        let seq = self.state().events.get(job).map_or(0, Vec::len);
        let ev = EventRecord {
            id: format!("ftevent-{}-{seq:06}", job.trim_start_matches("ftjob-")),
            created_at: now(),
            level: level.into(),
            message: message.into(),
            kind: if data.is_some() { "metrics" } else { "message" }.into(),
            data,
        };
        if let Err(e) = self.inner.store.append_event(job, &ev) {
            tracing::error!(job, error = %e, "cannot store a job event");
        }
        self.state()
            .events
            .entry(job.to_string())
            .or_default()
            .push(ev.clone());
        let _ = self.inner.events_tx.send((job.to_string(), ev));
    }

    /// Applies `f` to the job and stores it.
    fn update(&self, id: &str, f: impl FnOnce(&mut JobRecord)) -> std::io::Result<JobRecord> {
        let rec = {
            let mut st = self.state();
            let Some(job) = st.jobs.get_mut(id) else {
                return Err(std::io::Error::other("unknown job"));
            };
            f(job);
            job.clone()
        };
        self.inner.store.save_job(&rec)?;
        Ok(rec)
    }

    fn finish(&self, id: &str, status: JobStatus, error: Option<JobError>) {
        let message = match (&status, &error) {
            (JobStatus::Failed, Some(e)) => format!("Job failed: {}", e.message),
            (JobStatus::Cancelled, _) => "Job cancelled".to_string(),
            _ => "The job has successfully completed".to_string(),
        };
        let level = if status == JobStatus::Failed {
            "error"
        } else {
            "info"
        };
        // The event first: whoever sees the final status also finds the final event.
        self.event(id, level, &message, None);
        let stored = self.update(id, |j| {
            j.status = status;
            j.error = error;
            j.finished_at = Some(now());
            j.estimated_finish = None;
        });
        if let Err(e) = stored {
            tracing::error!(job = id, error = %e, "cannot store the job's final state");
        }
    }

    fn fail(&self, id: &str, code: &str, message: String, param: Option<&str>) {
        self.finish(
            id,
            JobStatus::Failed,
            Some(JobError {
                code: code.into(),
                message,
                param: param.map(str::to_string),
            }),
        );
    }

    fn is_cancelled(&self, id: &str) -> bool {
        self.state().cancelled.contains(id)
    }

    fn load_examples(
        &self,
        base: &TrainerModel,
        template: Option<&ChatTemplate>,
        file: &str,
    ) -> Result<Vec<dataset::Example>, String> {
        let data = self.inner.files.content(file).map_err(|e| e.to_string())?;
        let text = String::from_utf8(data).map_err(|_| format!("file {file}: not UTF-8"))?;
        let format = dataset::DataFormat {
            tokenizer: &base.tokenizer,
            chat_template: template,
            eos_id: base.tokenizer.eos_id(),
            max_tokens: self.inner.config.max_example_tokens,
        };
        dataset::parse_jsonl(&text, &format).map_err(|e| format!("file {file}: {e}"))
    }

    /// Runs one job to its end (on the trainer thread).
    fn run_job(&self, id: &str, base: &TrainerModel, engine: &EngineHandle) {
        let Ok(job) = self.job(id) else { return };
        if job.status.is_terminal() {
            return;
        }
        if self.is_cancelled(id) {
            self.finish(id, JobStatus::Cancelled, None);
            return;
        }
        // Validate the data.
        let template = base.chat_template.as_deref().and_then(|src| {
            ChatTemplate::new(src, base.tokenizer.bos_token(), base.tokenizer.eos_token()).ok()
        });
        let train_set = match self.load_examples(base, template.as_ref(), &job.training_file) {
            Ok(v) => v,
            Err(m) => {
                return self.fail(id, "invalid_training_file", m, Some("training_file"));
            }
        };
        let valid_set = match &job.validation_file {
            None => Vec::new(),
            Some(f) => match self.load_examples(base, template.as_ref(), f) {
                Ok(v) => v,
                Err(m) => {
                    return self.fail(id, "invalid_validation_file", m, Some("validation_file"));
                }
            },
        };
        let n = train_set.len();
        let h = Hyperparameters {
            n_epochs: Some(job.hyperparameters.n_epochs.unwrap_or(if n < 100 {
                (300 / n.max(1)).clamp(3, 30)
            } else {
                3
            })),
            batch_size: Some(
                job.hyperparameters
                    .batch_size
                    .unwrap_or((n / 10).clamp(1, 8)),
            ),
            learning_rate_multiplier: Some(
                job.hyperparameters.learning_rate_multiplier.unwrap_or(1.0),
            ),
        };
        let params = TrainParams {
            n_epochs: h.n_epochs.unwrap_or(3),
            batch_size: h.batch_size.unwrap_or(1),
            learning_rate: BASE_LEARNING_RATE * h.learning_rate_multiplier.unwrap_or(1.0),
            rank: job.lora.r,
            alpha: job.lora.alpha,
            dropout: job.lora.dropout,
            targets: job.lora.targets(),
            seed: job.seed,
            micro_batch_tokens: self.inner.config.micro_batch_tokens,
        };
        let started = Instant::now();
        let queued = self.update(id, |j| {
            j.hyperparameters = h;
            j.status = JobStatus::Queued;
        });
        if let Err(e) = queued {
            return self.fail(id, "storage_error", e.to_string(), None);
        }
        self.event(
            id,
            "info",
            "Files validated, moving job to queued state",
            None,
        );
        if self.is_cancelled(id) {
            return self.finish(id, JobStatus::Cancelled, None);
        }
        if let Err(e) = self.update(id, |j| {
            j.status = JobStatus::Running;
            j.started_at = Some(now());
        }) {
            return self.fail(id, "storage_error", e.to_string(), None);
        }
        self.event(id, "info", "Fine-tuning job started", None);
        let frozen = match base.model.frozen() {
            Ok(f) => f,
            Err(e) => return self.fail(id, "training_error", e.to_string(), None),
        };
        let total = trainer::total_steps(n, &params);
        let keep_going = || loop {
            if self.is_cancelled(id) {
                return false;
            }
            let s = engine.stats();
            if s.num_running + s.num_waiting == 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let on_step = |r: &trainer::StepReport| {
            let mut data = json!({
                "step": r.step,
                "total_steps": r.total_steps,
                "train_loss": r.train_loss,
                "learning_rate": r.learning_rate,
                "trained_tokens": r.trained_tokens,
            });
            let mut message = format!(
                "Step {}/{}: training loss={:.4}",
                r.step, total, r.train_loss
            );
            if let Some(v) = r.valid_loss {
                data["valid_loss"] = json!(v);
                message.push_str(&format!(", validation loss={v:.4}"));
            }
            let per_step = started.elapsed().as_secs_f64() / r.step as f64;
            let eta = now() + (per_step * (r.total_steps - r.step) as f64).ceil() as u64;
            let _ = self.update(id, |j| {
                j.trained_tokens = Some(r.trained_tokens as u64);
                j.estimated_finish = Some(eta);
            });
            self.event(id, "info", &message, Some(data));
        };
        let lora = match trainer::train(
            &frozen, &train_set, &valid_set, &params, keep_going, on_step,
        ) {
            Ok(Outcome::Finished(l)) => l,
            Ok(Outcome::Cancelled) => return self.finish(id, JobStatus::Cancelled, None),
            Err(e) => return self.fail(id, "training_error", e.to_string(), None),
        };
        drop(frozen);
        let adapter = match lora.to_adapter(engine.model_config()) {
            Ok(a) => a,
            Err(e) => return self.fail(id, "training_error", e, None),
        };
        let name = fine_tuned_name(&job);
        if let Err(e) = adapter.save_peft(
            &self.inner.store.adapter_dir(id),
            &self.inner.config.base_model,
        ) {
            return self.fail(
                id,
                "storage_error",
                format!("cannot write the adapter: {e}"),
                None,
            );
        }
        // The record says `succeeded` only once the adapter is on disk; then it is served.
        if let Err(e) = self.update(id, |j| j.fine_tuned_model = Some(name.clone())) {
            return self.fail(id, "storage_error", e.to_string(), None);
        }
        engine.load_adapter(&name, adapter);
        self.event(
            id,
            "info",
            &format!("New fine-tuned model created: {name}"),
            None,
        );
        self.finish(id, JobStatus::Succeeded, None);
    }
}

/// `ft:<base>:<suffix>:<job>` (OpenAI's shape), or `ft:<base>:<job>` without a suffix.
pub fn fine_tuned_name(job: &JobRecord) -> String {
    let short = job.id.trim_start_matches("ftjob-");
    match &job.suffix {
        Some(s) => format!("ft:{}:{s}:{short}", job.model),
        None => format!("ft:{}:{short}", job.model),
    }
}

fn status_word(s: JobStatus) -> &'static str {
    match s {
        JobStatus::Succeeded => "succeeded",
        JobStatus::Failed => "failed",
        JobStatus::Cancelled => "been cancelled",
        _ => "started",
    }
}
