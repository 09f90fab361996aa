//! OpenAI's Batch API (`/v1/batches`): a JSONL file of requests (uploaded with purpose
//! `batch`) runs in the background through the same routes as live traffic, a few at a time
//! so the engine batches them, and its results come back as files (purpose `batch_output`):
//! the 2xx responses in `output_file_id`, the others in `error_file_id`, in input order.
//! Batch requests run at priority [`BATCH_PRIORITY`] unless they give one: live traffic goes
//! first.
//!
//! On disk, under the data dir:
//! ```text
//! batches/<batch-id>.json            the batch (rewritten whole at each change of status)
//! batches/<batch-id>.results.jsonl   one line per finished request, appended and synced
//! ```
//! Nothing accepted is lost: after a restart a batch that was validating, running or
//! finalizing goes on from its results (requests already answered are not run again); one
//! being cancelled ends cancelled; one past its 24-hour window ends expired, its unrun
//! requests in the error file as `batch_expired`. Answers are not kept in memory: the
//! result files are written from the results file at the end, one answer at a time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tower::ServiceExt;

use super::error::{ApiError, AppJson};
use super::AppState;
use crate::files::{list_json, new_id, now, write_atomic, FileStore, BATCH_OUTPUT};

/// The routes a batch may run.
pub const ENDPOINTS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
];

/// Requests a batch may hold (OpenAI's limit).
pub const MAX_REQUESTS: usize = 50_000;

/// How long a batch may take (the only window OpenAI offers).
const WINDOW_SECS: u64 = 24 * 60 * 60;

/// The scheduling priority of batch requests that give none: after live requests (0), which
/// run first and may take a batch request's place (vLLM's convention: lower runs first).
pub const BATCH_PRIORITY: i64 = 1;

/// Validation errors kept per batch (the first ones).
const MAX_ERRORS: usize = 100;

/// Life of a batch (OpenAI's statuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    /// The input file is being checked.
    Validating,
    /// The input file was invalid: see `errors`.
    Failed,
    /// Requests are running.
    InProgress,
    /// The result files are being written.
    Finalizing,
    /// Done: see the result files.
    Completed,
    /// The window ended before every request ran.
    Expired,
    /// A client asked to cancel; running requests are being dropped.
    Cancelling,
    /// Cancelled; the requests answered before are in the result files.
    Cancelled,
}

impl BatchStatus {
    /// Whether the batch can no longer change.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            BatchStatus::Failed
                | BatchStatus::Completed
                | BatchStatus::Expired
                | BatchStatus::Cancelled
        )
    }
}

/// One problem with the input file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineError {
    /// Machine-readable code.
    pub code: String,
    /// Human-readable reason.
    pub message: String,
    /// The field at fault, if any.
    pub param: Option<String>,
    /// 1-based line of the input file, if one.
    pub line: Option<usize>,
}

/// Requests answered so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestCounts {
    /// Requests in the input file.
    pub total: usize,
    /// Answered with a 2xx status.
    pub completed: usize,
    /// Answered otherwise, or not run (expired).
    pub failed: usize,
}

/// Tokens the answered requests used (their `usage`, added up).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchUsage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Of those, served from the prefix cache.
    pub cached_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
    /// Of those, reasoning.
    pub reasoning_tokens: u64,
}

/// A batch as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    /// `batch_…`.
    pub id: String,
    /// The route every request goes to.
    pub endpoint: String,
    /// The requests (a file of purpose `batch`).
    pub input_file_id: String,
    /// `24h`.
    pub completion_window: String,
    /// Where it is.
    pub status: BatchStatus,
    /// The 2xx responses.
    pub output_file_id: Option<String>,
    /// The other responses.
    pub error_file_id: Option<String>,
    /// Problems with the input file (status `failed`).
    pub errors: Option<Vec<LineError>>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub expires_at: u64,
    /// Unix seconds.
    pub in_progress_at: Option<u64>,
    /// Unix seconds.
    pub finalizing_at: Option<u64>,
    /// Unix seconds.
    pub completed_at: Option<u64>,
    /// Unix seconds.
    pub failed_at: Option<u64>,
    /// Unix seconds.
    pub expired_at: Option<u64>,
    /// Unix seconds.
    pub cancelling_at: Option<u64>,
    /// Unix seconds.
    pub cancelled_at: Option<u64>,
    /// Requests answered so far.
    pub request_counts: RequestCounts,
    /// Tokens used so far.
    pub usage: BatchUsage,
    /// The client's key-value pairs.
    pub metadata: Option<Map<String, Value>>,
}

impl BatchRecord {
    /// The batch as the API shows it.
    pub fn to_json(&self) -> Value {
        let u = &self.usage;
        json!({
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": self.errors.as_ref().map(|e| json!({"object": "list", "data": e})),
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id, "created_at": self.created_at,
            "in_progress_at": self.in_progress_at, "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at, "completed_at": self.completed_at,
            "failed_at": self.failed_at, "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at, "cancelled_at": self.cancelled_at,
            "request_counts": self.request_counts,
            "usage": {
                "input_tokens": u.input_tokens,
                "input_tokens_details": {"cached_tokens": u.cached_tokens},
                "output_tokens": u.output_tokens,
                "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
                "total_tokens": u.input_tokens + u.output_tokens,
            },
            "metadata": self.metadata,
        })
    }
}

/// One request of the input file.
#[derive(Debug, Clone)]
struct Line {
    /// 1-based line number.
    line: usize,
    custom_id: String,
    body: Value,
}

/// One finished request, as appended to the results file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Outcome {
    line: usize,
    custom_id: String,
    /// The route's status and JSON body, when it ran.
    status_code: Option<u16>,
    body: Option<Value>,
    /// Why it did not run.
    error: Option<Value>,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.status_code.is_some_and(|s| (200..300).contains(&s))
    }

    /// The line of the output or error file.
    fn to_output_line(&self) -> Value {
        let response = self
            .status_code
            .map(|s| json!({"status_code": s, "request_id": new_id("req_"), "body": self.body}));
        json!({"id": new_id("batch_req_"), "custom_id": self.custom_id, "response": response,
               "error": self.error})
    }
}

struct Inner {
    dir: PathBuf,
    files: FileStore,
    records: Mutex<BTreeMap<String, BatchRecord>>,
    /// Running batches' cancel signals.
    cancels: Mutex<HashMap<String, tokio::sync::watch::Sender<bool>>>,
    /// Requests each batch runs at once.
    concurrency: usize,
}

/// Handle to the batches (cheap to clone).
#[derive(Clone)]
pub struct Batches {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn storage(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "batch storage error");
    ApiError::status(
        StatusCode::INSUFFICIENT_STORAGE,
        "server_error",
        format!("the server could not store the batch: {e}"),
    )
}

impl Batches {
    /// Opens (creating) `data_dir/batches` and reads the batches there; `concurrency`
    /// requests of a batch run at once. Unfinished ones go on once [`Batches::resume`] runs.
    pub fn open(data_dir: &Path, files: FileStore, concurrency: usize) -> std::io::Result<Self> {
        let dir = data_dir.join("batches");
        std::fs::create_dir_all(&dir)?;
        let records = list_json::<BatchRecord>(&dir)
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        Ok(Batches {
            inner: Arc::new(Inner {
                dir,
                files,
                records: Mutex::new(records),
                cancels: Mutex::new(HashMap::new()),
                concurrency: concurrency.max(1),
            }),
        })
    }

    /// Starts a runner for every unfinished batch (after a restart).
    pub fn resume(&self, app: &AppState) {
        let ids: Vec<String> = lock(&self.inner.records)
            .values()
            .filter(|r| !r.status.is_terminal())
            .map(|r| r.id.clone())
            .collect();
        for id in ids {
            self.spawn(app, id);
        }
    }

    fn spawn(&self, app: &AppState, id: String) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        lock(&self.inner.cancels).insert(id.clone(), tx);
        let (batches, app) = (self.clone(), app.clone());
        tokio::spawn(async move {
            batches.run(&app, &id, rx).await;
            lock(&batches.inner.cancels).remove(&id);
        });
    }

    fn get(&self, id: &str) -> Result<BatchRecord, ApiError> {
        lock(&self.inner.records).get(id).cloned().ok_or_else(|| {
            ApiError::status(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("no batch with id '{id}'"),
            )
        })
    }

    fn path(&self, id: &str, suffix: &str) -> PathBuf {
        self.inner.dir.join(format!("{id}{suffix}"))
    }

    /// Changes a batch and writes it (memory first: readers see the change at once).
    fn update(&self, id: &str, f: impl FnOnce(&mut BatchRecord)) -> std::io::Result<BatchRecord> {
        let rec = {
            let mut records = lock(&self.inner.records);
            let rec = records
                .get_mut(id)
                .ok_or_else(|| std::io::Error::other(format!("batch {id} vanished")))?;
            f(rec);
            rec.clone()
        };
        self.save(&rec)?;
        Ok(rec)
    }

    fn save(&self, rec: &BatchRecord) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(rec).map_err(std::io::Error::other)?;
        write_atomic(&self.path(&rec.id, ".json"), &bytes)
    }

    /// Runs a batch to its end: validation, its requests, the result files.
    async fn run(&self, app: &AppState, id: &str, mut cancel: tokio::sync::watch::Receiver<bool>) {
        // A batch accepted (or resumed) while the model loads waits for it.
        while app.loaded().is_err() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if let Err(e) = self.run_inner(app, id, &mut cancel).await {
            tracing::error!(batch = %id, error = %e, "batch storage error");
            let _ = self.update(id, |r| {
                r.status = BatchStatus::Failed;
                r.failed_at = Some(now());
                r.errors = Some(vec![LineError {
                    code: "storage_error".into(),
                    message: format!("the server could not store the batch's results: {e}"),
                    param: None,
                    line: None,
                }]);
            });
        }
    }

    async fn run_inner(
        &self,
        app: &AppState,
        id: &str,
        cancel: &mut tokio::sync::watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let rec = lock(&self.inner.records)
            .get(id)
            .cloned()
            .ok_or_else(|| std::io::Error::other(format!("batch {id} vanished")))?;
        let input = self.inner.files.content(&rec.input_file_id);
        let lines = match input.map_err(|e| e.to_string()).and_then(|data| {
            String::from_utf8(data).map_err(|_| "the input file is not UTF-8".to_string())
        }) {
            Ok(text) => parse_input(&text, &rec.endpoint),
            Err(message) => Err(vec![LineError {
                code: "invalid_file".into(),
                message,
                param: Some("input_file_id".into()),
                line: None,
            }]),
        };
        let lines = match lines {
            Ok(lines) => lines,
            Err(errors) => {
                self.update(id, |r| {
                    r.status = BatchStatus::Failed;
                    r.failed_at = Some(now());
                    r.errors = Some(errors);
                })?;
                return Ok(());
            }
        };
        let results_path = self.path(id, ".results.jsonl");
        let (stored, counts, usage) = scan_outcomes(&results_path, lines.len())?;
        let mut rec = self.update(id, |r| {
            if r.status == BatchStatus::Validating {
                r.status = BatchStatus::InProgress;
                r.in_progress_at = Some(now());
            }
            (r.request_counts, r.usage) = (counts, usage);
        })?;
        if rec.status == BatchStatus::InProgress {
            let answered: HashSet<usize> = stored.iter().map(|s| s.line).collect();
            let todo: Vec<Line> = lines
                .iter()
                .filter(|l| !answered.contains(&l.line))
                .cloned()
                .collect();
            let stop = self.execute(app, &rec, todo, &results_path, cancel).await?;
            rec = self.update(id, |r| {
                r.status = match stop {
                    Stop::Cancelled => BatchStatus::Cancelling,
                    _ => BatchStatus::Finalizing,
                };
                r.finalizing_at = Some(now());
                if stop == Stop::Expired {
                    r.expired_at = Some(now());
                }
            })?;
        }
        // Finalizing (or cancelling): the result files, in input order, each answer read back
        // from the results file as it is written out (a batch's answers are never all in
        // memory). A batch whose every request was answered is complete, whenever that was.
        let (stored, mut counts, mut usage) = scan_outcomes(&results_path, lines.len())?;
        let expired =
            (rec.expired_at.is_some() || now() >= rec.expires_at) && stored.len() < lines.len();
        let mut unrun = Vec::new();
        if expired && rec.status != BatchStatus::Cancelling {
            let answered: HashSet<usize> = stored.iter().map(|s| s.line).collect();
            for l in lines.iter().filter(|l| !answered.contains(&l.line)) {
                let o = Outcome {
                    line: l.line,
                    custom_id: l.custom_id.clone(),
                    status_code: None,
                    body: None,
                    error: Some(json!({"code": "batch_expired", "message":
                        "This request could not be executed before the completion window expired."})),
                };
                add(&mut counts, &mut usage, &o);
                unrun.push(o);
            }
        }
        // (input line, answered with a 2xx, the outcome)
        let mut order: Vec<(usize, bool, Answer)> = stored
            .iter()
            .map(|s| (s.line, s.ok, Answer::Stored(s)))
            .chain(unrun.iter().map(|o| (o.line, o.ok(), Answer::Unrun(o))))
            .collect();
        order.sort_by_key(|e| e.0);
        let files = self.inner.files.clone();
        let write = |ok: bool, name: &str| -> std::io::Result<Option<String>> {
            if !order.iter().any(|e| e.1 == ok) {
                return Ok(None);
            }
            let mut results = None;
            let rec = files.create_with(&format!("{id}_{name}.jsonl"), BATCH_OUTPUT, |w| {
                for (_, _, answer) in order.iter().filter(|e| e.1 == ok) {
                    let line = match answer {
                        Answer::Stored(s) => {
                            let f = match &mut results {
                                Some(f) => f,
                                None => results.insert(std::fs::File::open(&results_path)?),
                            };
                            read_stored(f, s)?.to_output_line()
                        }
                        Answer::Unrun(o) => o.to_output_line(),
                    };
                    serde_json::to_writer(&mut *w, &line)?;
                    w.write_all(b"\n")?;
                }
                Ok(())
            })?;
            Ok(Some(rec.id))
        };
        let output = write(true, "output")?;
        let errors = write(false, "error")?;
        self.update(id, |r| {
            r.output_file_id = output;
            r.error_file_id = errors;
            r.request_counts = counts;
            r.usage = usage;
            let t = Some(now());
            if r.status == BatchStatus::Cancelling {
                r.status = BatchStatus::Cancelled;
                r.cancelled_at = t;
            } else if expired {
                r.status = BatchStatus::Expired;
                r.expired_at = r.expired_at.or(t);
            } else {
                r.status = BatchStatus::Completed;
                r.completed_at = t;
            }
        })?;
        let _ = std::fs::remove_file(&results_path);
        Ok(())
    }

    /// Runs `todo` through the routes, a few at a time, appending each outcome to the results
    /// file as it finishes; stops early on a cancel or at the end of the window (requests
    /// still running are dropped, which cancels them in the engine).
    async fn execute(
        &self,
        app: &AppState,
        rec: &BatchRecord,
        todo: Vec<Line>,
        results_path: &Path,
        cancel: &mut tokio::sync::watch::Receiver<bool>,
    ) -> std::io::Result<Stop> {
        let routes = super::internal_router(app.clone());
        let mut pending = todo.into_iter();
        let mut running = FuturesUnordered::new();
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(rec.expires_at.saturating_sub(now()));
        loop {
            if *cancel.borrow() {
                return Ok(Stop::Cancelled);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Stop::Expired);
            }
            while running.len() < self.inner.concurrency {
                let Some(line) = pending.next() else { break };
                running.push(run_line(routes.clone(), &rec.endpoint, line));
            }
            if running.is_empty() {
                return Ok(Stop::Done);
            }
            tokio::select! {
                Some(outcome) = running.next() => {
                    let path = results_path.to_path_buf();
                    let line = outcome.clone();
                    tokio::task::spawn_blocking(move || append_outcome(&path, &line))
                        .await
                        .map_err(std::io::Error::other)??;
                    if let Some(r) = lock(&self.inner.records).get_mut(&rec.id) {
                        add(&mut r.request_counts, &mut r.usage, &outcome);
                    }
                }
                _ = cancel.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(Stop::Expired),
            }
        }
    }

    /// `POST /v1/batches/{id}/cancel`: a batch not yet done goes to `cancelling`.
    fn cancel(&self, id: &str) -> Result<BatchRecord, ApiError> {
        let rec = self.get(id)?;
        match rec.status {
            BatchStatus::Validating | BatchStatus::InProgress => {}
            BatchStatus::Cancelling | BatchStatus::Cancelled => return Ok(rec),
            s => {
                return Err(ApiError::status(
                    StatusCode::CONFLICT,
                    "invalid_request_error",
                    format!(
                        "batch '{id}' is {} and can no longer be cancelled",
                        serde_json::to_value(s)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default()
                    ),
                ))
            }
        }
        let rec = self
            .update(id, |r| {
                r.status = BatchStatus::Cancelling;
                r.cancelling_at = Some(now());
            })
            .map_err(storage)?;
        if let Some(tx) = lock(&self.inner.cancels).get(id) {
            let _ = tx.send(true);
        }
        Ok(rec)
    }
}

/// Why the requests stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Done,
    Cancelled,
    Expired,
}

/// One request through the routes (no authentication: the batch was accepted with a key).
/// A full queue (429, live traffic first) is waited out, as its `Retry-After` asks.
async fn run_line(routes: axum::Router, endpoint: &str, line: Line) -> Outcome {
    let mut outcome = Outcome {
        line: line.line,
        custom_id: line.custom_id,
        status_code: None,
        body: None,
        error: None,
    };
    let response = loop {
        let request = Request::post(endpoint)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(line.body.to_string()));
        let response = match request {
            Ok(request) => routes.clone().oneshot(request).await,
            Err(e) => {
                outcome.error = Some(json!({"code": "invalid_request", "message": e.to_string()}));
                return outcome;
            }
        };
        let Ok(response) = response;
        if response.status() != StatusCode::TOO_MANY_REQUESTS {
            break response;
        }
        let wait = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .unwrap_or(1);
        tokio::time::sleep(Duration::from_secs(wait.clamp(1, 60))).await;
    };
    let status = response.status().as_u16();
    match axum::body::to_bytes(response.into_body(), usize::MAX).await {
        Ok(bytes) => {
            outcome.status_code = Some(status);
            outcome.body = Some(
                serde_json::from_slice(&bytes)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into())),
            );
        }
        Err(e) => {
            outcome.error = Some(json!({"code": "server_error", "message": e.to_string()}));
        }
    }
    outcome
}

fn append_outcome(path: &Path, outcome: &Outcome) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut line = serde_json::to_vec(outcome).map_err(std::io::Error::other)?;
    line.push(b'\n');
    f.write_all(&line)?;
    f.sync_data()
}

/// Where one outcome sits in the results file (read again only to write the result files),
/// and whether it was answered with a 2xx.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stored {
    line: usize,
    offset: u64,
    len: usize,
    ok: bool,
}

/// The outcomes already written, each request once, with the counts and token usage of a
/// batch of `total` — read one line at a time, their bodies not kept. A missing file has
/// none. A torn last line (a crash mid-write: no line break) is cut off the file, so that
/// its request runs again and the next outcome starts a line of its own.
fn scan_outcomes(
    path: &Path,
    total: usize,
) -> std::io::Result<(Vec<Stored>, RequestCounts, BatchUsage)> {
    use std::io::BufRead;
    let mut counts = RequestCounts {
        total,
        ..RequestCounts::default()
    };
    let mut usage = BatchUsage::default();
    let mut stored = Vec::new();
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((stored, counts, usage)),
        Err(e) => return Err(e),
    };
    let mut reader = std::io::BufReader::new(file);
    let (mut seen, mut offset, mut buf) = (HashSet::new(), 0u64, Vec::new());
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        if buf.last() != Some(&b'\n') {
            let f = std::fs::OpenOptions::new().write(true).open(path)?;
            f.set_len(offset)?;
            f.sync_all()?;
            break;
        }
        if let Ok(o) = serde_json::from_slice::<Outcome>(&buf) {
            if seen.insert(o.line) {
                add(&mut counts, &mut usage, &o);
                stored.push(Stored {
                    line: o.line,
                    offset,
                    len: n,
                    ok: o.ok(),
                });
            }
        }
        offset += n as u64;
    }
    Ok((stored, counts, usage))
}

/// A finished request's outcome, for the result files.
enum Answer<'a> {
    /// In the results file.
    Stored(&'a Stored),
    /// Never run (the completion window ended first).
    Unrun(&'a Outcome),
}

/// One outcome of the results file, read back.
fn read_stored(file: &mut std::fs::File, s: &Stored) -> std::io::Result<Outcome> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(s.offset))?;
    let mut buf = vec![0; s.len];
    file.read_exact(&mut buf)?;
    serde_json::from_slice(&buf).map_err(std::io::Error::other)
}

/// Counts one finished request, and adds an answered one's `usage` (chat and completions
/// name its fields `prompt_tokens`/`completion_tokens`, the Responses API
/// `input_tokens`/`output_tokens`).
fn add(counts: &mut RequestCounts, total: &mut BatchUsage, o: &Outcome) {
    if !o.ok() {
        counts.failed += 1;
        return;
    }
    counts.completed += 1;
    let Some(u) = o.body.as_ref().and_then(|b| b.get("usage")) else {
        return;
    };
    let n = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| u.pointer(k).and_then(Value::as_u64))
            .unwrap_or(0)
    };
    total.input_tokens += n(&["/prompt_tokens", "/input_tokens"]);
    total.output_tokens += n(&["/completion_tokens", "/output_tokens"]);
    total.cached_tokens += n(&[
        "/prompt_tokens_details/cached_tokens",
        "/input_tokens_details/cached_tokens",
    ]);
    total.reasoning_tokens += n(&[
        "/completion_tokens_details/reasoning_tokens",
        "/output_tokens_details/reasoning_tokens",
    ]);
}

/// The requests of an input file, or why it is refused (OpenAI's checks: one JSON object per
/// line with a unique `custom_id`, `method` POST, `url` the batch's endpoint, a `body` object;
/// streaming is not for batches).
fn parse_input(text: &str, endpoint: &str) -> Result<Vec<Line>, Vec<LineError>> {
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    let mut ids = HashSet::new();
    let mut error = |code: &str, message: String, param: Option<&str>, line: usize| {
        if errors.len() < MAX_ERRORS {
            errors.push(LineError {
                code: code.into(),
                message,
                param: param.map(str::to_string),
                line: Some(line),
            });
        }
    };
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(raw) else {
            error(
                "invalid_json_line",
                format!("line {n} is not a JSON object"),
                None,
                n,
            );
            continue;
        };
        let custom_id = match obj.get("custom_id") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => {
                error(
                    "missing_required_parameter",
                    format!("line {n}: `custom_id` (a non-empty string) is required"),
                    Some("custom_id"),
                    n,
                );
                continue;
            }
        };
        if !ids.insert(custom_id.clone()) {
            error(
                "duplicate_custom_id",
                format!("line {n}: custom_id '{custom_id}' appears more than once"),
                Some("custom_id"),
                n,
            );
            continue;
        }
        if obj.get("method").and_then(Value::as_str) != Some("POST") {
            error(
                "invalid_method",
                format!("line {n}: `method` must be \"POST\""),
                Some("method"),
                n,
            );
            continue;
        }
        match obj.get("url").and_then(Value::as_str) {
            Some(url) if url == endpoint => {}
            url => {
                error(
                    "invalid_url",
                    format!(
                        "line {n}: `url` is {}, but this batch's endpoint is {endpoint}",
                        url.map_or_else(|| "missing".to_string(), |u| format!("'{u}'"))
                    ),
                    Some("url"),
                    n,
                );
                continue;
            }
        }
        let Some(body @ Value::Object(_)) = obj.get("body") else {
            error(
                "missing_required_parameter",
                format!("line {n}: `body` (the request, a JSON object) is required"),
                Some("body"),
                n,
            );
            continue;
        };
        if body.get("stream").and_then(Value::as_bool) == Some(true) {
            error(
                "invalid_request",
                format!("line {n}: streaming is not supported in batches"),
                Some("body.stream"),
                n,
            );
            continue;
        }
        let mut body = body.clone();
        if let Some(obj) = body.as_object_mut() {
            obj.entry("priority").or_insert(json!(BATCH_PRIORITY));
        }
        lines.push(Line {
            line: n,
            custom_id,
            body,
        });
    }
    if lines.len() > MAX_REQUESTS {
        error(
            "too_many_requests",
            format!(
                "the file has {} requests; a batch holds at most {MAX_REQUESTS}",
                lines.len()
            ),
            None,
            text.lines().count(),
        );
    }
    if lines.is_empty() && errors.is_empty() {
        errors.push(LineError {
            code: "empty_file".into(),
            message: "the input file has no requests".into(),
            param: Some("input_file_id".into()),
            line: None,
        });
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        Err(errors)
    }
}

fn batches(app: &AppState) -> Result<&Batches, ApiError> {
    app.batches().ok_or_else(|| {
        ApiError::status(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "batches are not enabled on this server (it has no data dir)",
        )
    })
}

/// `POST /v1/batches` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
    /// OpenAI's expiry of the result files: accepted, not applied (they are kept until
    /// deleted).
    #[serde(default)]
    #[allow(dead_code)]
    output_expires_after: Option<Value>,
}

/// `POST /v1/batches`: checks the request and the file's purpose, then validates and runs the
/// file in the background.
pub async fn create_batch(
    State(app): State<AppState>,
    AppJson(req): AppJson<CreateBatch>,
) -> Result<Response, ApiError> {
    let batches = batches(&app)?;
    if !ENDPOINTS.contains(&req.endpoint.as_str()) {
        return Err(ApiError::invalid(
            "endpoint",
            format!(
                "endpoint '{}' is not supported; use one of: {}",
                req.endpoint,
                ENDPOINTS.join(", ")
            ),
        ));
    }
    if req.completion_window != "24h" {
        return Err(ApiError::invalid(
            "completion_window",
            "completion_window must be \"24h\"",
        ));
    }
    if let Some(m) = &req.metadata {
        let bad = m.len() > 16
            || m.iter().any(|(k, v)| {
                k.chars().count() > 64 || v.as_str().is_none_or(|s| s.chars().count() > 512)
            });
        if bad {
            return Err(ApiError::invalid(
                "metadata",
                "metadata holds at most 16 pairs: keys up to 64 characters, string values up to 512",
            ));
        }
    }
    let file = batches
        .inner
        .files
        .get(&req.input_file_id)
        .map_err(|e| ApiError::invalid("input_file_id", e.to_string()))?;
    if file.purpose != "batch" {
        return Err(ApiError::invalid(
            "input_file_id",
            format!(
                "file '{}' has purpose '{}'; batch input is uploaded with purpose 'batch'",
                file.id, file.purpose
            ),
        ));
    }
    let created = now();
    let rec = BatchRecord {
        id: new_id("batch_"),
        endpoint: req.endpoint,
        input_file_id: req.input_file_id,
        completion_window: req.completion_window,
        status: BatchStatus::Validating,
        output_file_id: None,
        error_file_id: None,
        errors: None,
        created_at: created,
        expires_at: created + WINDOW_SECS,
        in_progress_at: None,
        finalizing_at: None,
        completed_at: None,
        failed_at: None,
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
        request_counts: RequestCounts::default(),
        usage: BatchUsage::default(),
        metadata: req.metadata,
    };
    batches.save(&rec).map_err(storage)?;
    lock(&batches.inner.records).insert(rec.id.clone(), rec.clone());
    batches.spawn(&app, rec.id.clone());
    Ok(axum::Json(rec.to_json()).into_response())
}

/// `GET /v1/batches/{id}`.
pub async fn get_batch(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(batches(&app)?.get(&id)?.to_json()).into_response())
}

/// `POST /v1/batches/{id}/cancel`.
pub async fn cancel_batch(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(batches(&app)?.cancel(&id)?.to_json()).into_response())
}

/// `GET /v1/batches` query: OpenAI's cursor pagination.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/batches`: newest first, `limit` (1–100, default 20) after the batch `after`.
pub async fn list_batches(
    State(app): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid("limit", "limit must be 1..=100"));
    }
    let records = lock(&batches(&app)?.inner.records).clone();
    let newest_first = records.values().rev();
    let mut after: Vec<&BatchRecord> = match &q.after {
        Some(a) => newest_first.skip_while(|r| r.id != *a).skip(1).collect(),
        None => newest_first.collect(),
    };
    let has_more = after.len() > limit;
    after.truncate(limit);
    let data: Vec<Value> = after.iter().map(|r| r.to_json()).collect();
    Ok(axum::Json(json!({
        "object": "list", "data": data, "has_more": has_more,
        "first_id": after.first().map(|r| r.id.clone()),
        "last_id": after.last().map(|r| r.id.clone()),
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(text: &str) -> Vec<(String, Option<usize>)> {
        match parse_input(text, "/v1/completions") {
            Ok(_) => Vec::new(),
            Err(e) => e.into_iter().map(|e| (e.code, e.line)).collect(),
        }
    }

    #[test]
    fn input_files_are_checked_line_by_line() {
        let good = |id: &str| {
            json!({"custom_id": id, "method": "POST", "url": "/v1/completions",
                   "body": {"prompt": "Hi", "max_tokens": 2}})
            .to_string()
        };
        let urgent = json!({"custom_id": "u", "method": "POST", "url": "/v1/completions",
                            "body": {"prompt": "Hi", "priority": -3}});
        let text = format!("{}\n\n{}\n{urgent}\n", good("a"), good("b"));
        let lines = parse_input(&text, "/v1/completions").expect("valid");
        let seen: Vec<(usize, &str)> = lines
            .iter()
            .map(|l| (l.line, l.custom_id.as_str()))
            .collect();
        assert_eq!(seen, [(1, "a"), (3, "b"), (4, "u")]);
        assert_eq!(lines[1].body["max_tokens"], 2);
        // After live requests unless the line says otherwise.
        assert_eq!(lines[1].body["priority"], BATCH_PRIORITY);
        assert_eq!(lines[2].body["priority"], -3);

        let bad = [
            "not json".to_string(),
            good("a"),
            good("a"),
            json!({"method": "POST", "url": "/v1/completions", "body": {}}).to_string(),
            json!({"custom_id": "c", "method": "GET", "url": "/v1/completions", "body": {}})
                .to_string(),
            json!({"custom_id": "d", "method": "POST", "url": "/v1/embeddings", "body": {}})
                .to_string(),
            json!({"custom_id": "e", "method": "POST", "url": "/v1/completions"}).to_string(),
            json!({"custom_id": "f", "method": "POST", "url": "/v1/completions",
                   "body": {"stream": true}})
            .to_string(),
        ]
        .join("\n");
        let expected: Vec<(String, Option<usize>)> = [
            ("invalid_json_line", 1),
            ("duplicate_custom_id", 3),
            ("missing_required_parameter", 4),
            ("invalid_method", 5),
            ("invalid_url", 6),
            ("missing_required_parameter", 7),
            ("invalid_request", 8),
        ]
        .iter()
        .map(|&(c, l)| (c.to_string(), Some(l)))
        .collect();
        assert_eq!(codes(&bad), expected);
        assert_eq!(codes("\n \n"), [("empty_file".to_string(), None)]);
    }

    #[test]
    fn outcomes_are_counted_and_read_back_once_each() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("r.jsonl");
        let ok = |line: usize| Outcome {
            line,
            custom_id: format!("c{line}"),
            status_code: Some(200),
            body: Some(json!({"usage": {"prompt_tokens": 5, "completion_tokens": 3,
                "prompt_tokens_details": {"cached_tokens": 2}}})),
            error: None,
        };
        let refused = Outcome {
            status_code: Some(400),
            body: Some(json!({"error": {"message": "no"}})),
            ..ok(2)
        };
        for o in [ok(1), refused, ok(3), ok(1)] {
            append_outcome(&path, &o).expect("append");
        }
        // A torn last line (a crash mid-write) is ignored, and cut off: that request runs
        // again, its outcome on a line of its own.
        let whole = std::fs::metadata(&path).expect("meta").len();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"line\": 4, \"cus"))
            .expect("torn");
        let (stored, counts, usage) = scan_outcomes(&path, 5).expect("scan");
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), whole);
        append_outcome(&path, &ok(4)).expect("append");
        let (again, _, _) = scan_outcomes(&path, 5).expect("scan");
        assert_eq!(
            again.iter().map(|s| s.line).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(stored.iter().map(|s| s.line).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(
            stored.iter().map(|s| s.ok).collect::<Vec<_>>(),
            [true, false, true]
        );
        assert_eq!(
            (counts, usage),
            (
                RequestCounts {
                    total: 5,
                    completed: 2,
                    failed: 1
                },
                BatchUsage {
                    input_tokens: 10,
                    cached_tokens: 4,
                    output_tokens: 6,
                    reasoning_tokens: 0
                }
            )
        );
        let mut file = std::fs::File::open(&path).expect("open");
        let line = read_stored(&mut file, &stored[1])
            .expect("read back")
            .to_output_line();
        assert_eq!(line["custom_id"], "c2");
        assert_eq!(line["response"]["status_code"], 400);
        assert_eq!(line["error"], Value::Null);
    }
}
