//! Files, jobs, events and adapters on disk under the data dir:
//!
//! ```text
//! jobs/<job-id>.json     the job         jobs/<job-id>.events.jsonl   its events, appended
//! adapters/<job-id>/     PEFT adapter (written to <job-id>.tmp, then renamed)
//! ```
//! Every whole-file write goes to a temporary name, is synced, then renamed over the old one,
//! so a crash leaves either the old or the new version, never a torn one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::files::list_json;
use crate::model::Target;

/// Life of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Its data is being checked.
    ValidatingFiles,
    /// Waiting for the trainer.
    Queued,
    /// Training.
    Running,
    /// The adapter is written and served.
    Succeeded,
    /// See its `error`.
    Failed,
    /// Cancelled by a client.
    Cancelled,
}

impl JobStatus {
    /// Whether the job can no longer change.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// Why a job failed (OpenAI's `error` object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    /// Machine-readable code.
    pub code: String,
    /// Human-readable reason.
    pub message: String,
    /// The field at fault, if any.
    pub param: Option<String>,
}

/// Hyper-parameters; `None` is `auto` until the job resolves it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hyperparameters {
    /// Passes over the data.
    pub n_epochs: Option<usize>,
    /// Examples per optimizer step.
    pub batch_size: Option<usize>,
    /// Multiplies the base learning rate.
    pub learning_rate_multiplier: Option<f64>,
}

/// LoRA settings of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    /// Rank.
    pub r: usize,
    /// Scale numerator (`alpha / r`).
    pub alpha: f64,
    /// Dropout on the LoRA input.
    pub dropout: f32,
    /// Adapted projections (PEFT names).
    pub target_modules: Vec<String>,
}

impl LoraSpec {
    /// The targets, parsed (validated at creation).
    pub fn targets(&self) -> Vec<Target> {
        self.target_modules
            .iter()
            .filter_map(|m| Target::parse(m))
            .collect()
    }
}

/// A fine-tuning job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// `ftjob-…`.
    pub id: String,
    /// Unix seconds.
    pub created_at: u64,
    /// The base model's served name.
    pub model: String,
    /// File id.
    pub training_file: String,
    /// File id.
    pub validation_file: Option<String>,
    /// Part of the fine-tuned model's name.
    pub suffix: Option<String>,
    /// Seeds everything random.
    pub seed: u64,
    /// As requested; resolved once training starts.
    pub hyperparameters: Hyperparameters,
    /// LoRA settings.
    pub lora: LoraSpec,
    /// Where it is.
    pub status: JobStatus,
    /// The model name requests use, once succeeded.
    pub fine_tuned_model: Option<String>,
    /// Unix seconds.
    pub finished_at: Option<u64>,
    /// Unix seconds, when training began.
    pub started_at: Option<u64>,
    /// Tokens processed.
    pub trained_tokens: Option<u64>,
    /// Why it failed.
    pub error: Option<JobError>,
    /// Unix seconds, while running.
    pub estimated_finish: Option<u64>,
}

/// A job event (`message` or `metrics`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// `ftevent-…`, increasing within a job.
    pub id: String,
    /// Unix seconds.
    pub created_at: u64,
    /// `info`, `warn` or `error`.
    pub level: String,
    /// Human-readable text.
    pub message: String,
    /// `message` or `metrics`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Metrics (`step`, `train_loss`, `valid_loss`, `learning_rate`, ...).
    pub data: Option<Value>,
}

/// The data dir.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

pub use crate::files::write_atomic;

fn to_json<T: Serialize>(v: &T) -> std::io::Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(std::io::Error::other)
}

impl Store {
    /// Opens (creating) the data dir.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        for sub in ["jobs", "adapters"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    /// The data dir.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes a job's current state.
    pub fn save_job(&self, rec: &JobRecord) -> std::io::Result<()> {
        write_atomic(
            &self.root.join(format!("jobs/{}.json", rec.id)),
            &to_json(rec)?,
        )
    }

    /// Every stored job.
    pub fn jobs(&self) -> Vec<JobRecord> {
        list_json(&self.root.join("jobs"))
    }

    /// Appends one event to a job's log.
    pub fn append_event(&self, job: &str, ev: &EventRecord) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join(format!("jobs/{job}.events.jsonl")))?;
        let mut line = serde_json::to_vec(ev).map_err(std::io::Error::other)?;
        line.push(b'\n');
        f.write_all(&line)?;
        f.sync_data()
    }

    /// A job's events, oldest first (a torn last line from a crash is ignored).
    pub fn events(&self, job: &str) -> Vec<EventRecord> {
        std::fs::read_to_string(self.root.join(format!("jobs/{job}.events.jsonl")))
            .map(|text| {
                text.lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Where a job's adapter is written.
    pub fn adapter_dir(&self, job: &str) -> PathBuf {
        self.root.join("adapters").join(job)
    }
}
