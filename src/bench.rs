//! `nextoken bench`: engine-level load test (no HTTP). For each concurrency C, submits C
//! requests at once with P-token prompts and N new tokens (EOS ignored) and prints one JSON
//! line: aggregate tokens/s, TTFT and inter-token latency percentiles, peak RSS.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::engine::{EngineHandle, Event, GenerateRequest};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Concurrency levels, one JSON line each.
    pub concurrency: Vec<usize>,
    /// Prompt tokens per request.
    pub prompt_tokens: usize,
    /// New tokens per request.
    pub new_tokens: usize,
    /// How every request samples (greedy by default; a temperature measures the sampler too).
    pub sampling: crate::engine::SamplingParams,
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The `q`-quantile (0..=1) of `xs` by nearest rank; 0 for an empty slice.
pub fn percentile(xs: &mut [f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let rank = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len());
    xs[rank - 1]
}

/// Distinct, deterministic prompts (no shared prefixes between requests).
pub(crate) fn prompt(i: usize, len: usize, vocab: usize) -> Vec<u32> {
    let mut s = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Skip the first ids (control tokens) of typical vocabularies.
            (100 + (s >> 33) as usize % (vocab - 100)) as u32
        })
        .collect()
}

/// One request's timings: first token (from the wave's start), gaps between tokens, count.
pub(crate) struct RequestTimes {
    pub(crate) ttft: Duration,
    pub(crate) gaps: Vec<Duration>,
    pub(crate) tokens: usize,
}

/// The sweep's figures for one wave of requests that took `wall` seconds: aggregate tokens/s,
/// TTFT p50/p95 and inter-token latency p50 (ms), and the wall time.
pub(crate) fn wave_summary(results: &[RequestTimes], wall: f64) -> serde_json::Value {
    let total: usize = results.iter().map(|r| r.tokens).sum();
    let mut ttft: Vec<f64> = results.iter().map(|r| r.ttft.as_secs_f64() * 1e3).collect();
    let mut itl: Vec<f64> = results
        .iter()
        .flat_map(|r| r.gaps.iter().map(|g| g.as_secs_f64() * 1e3))
        .collect();
    json!({
        "agg_tok_s": total as f64 / wall,
        "ttft_ms_p50": percentile(&mut ttft, 0.5),
        "ttft_ms_p95": percentile(&mut ttft, 0.95),
        "itl_ms_p50": percentile(&mut itl, 0.5),
        "wall_s": wall,
    })
}

/// `base` with the fields of `more` added.
pub(crate) fn merged(mut base: serde_json::Value, more: serde_json::Value) -> serde_json::Value {
    if let (Some(b), serde_json::Value::Object(m)) = (base.as_object_mut(), more) {
        b.extend(m);
    }
    base
}

/// Runs the sweep, printing one JSON line per concurrency level; returns the lines.
pub fn run(engine: &EngineHandle, config: &BenchConfig) -> anyhow::Result<Vec<serde_json::Value>> {
    let vocab = engine.limits().vocab_size;
    anyhow::ensure!(
        vocab > 200,
        "vocabulary too small for the benchmark prompts"
    );
    let mut lines = Vec::new();
    for &c in &config.concurrency {
        let started = Instant::now();
        let mut collectors = Vec::with_capacity(c);
        for i in 0..c {
            let request = GenerateRequest {
                sampling: crate::engine::SamplingParams {
                    // Distinct seeds: the requests must not all draw the same tokens.
                    seed: Some(i as u64),
                    ..config.sampling.clone()
                },
                ..GenerateRequest::greedy(prompt(i, config.prompt_tokens, vocab), config.new_tokens)
            };
            let mut generation = engine.submit(request)?;
            collectors.push(std::thread::spawn(
                move || -> anyhow::Result<RequestTimes> {
                    let mut last = Instant::now();
                    let mut times = RequestTimes {
                        ttft: Duration::ZERO,
                        gaps: Vec::new(),
                        tokens: 0,
                    };
                    while let Some(ev) = generation.blocking_next() {
                        match ev {
                            Event::Token { .. } => {
                                let now = Instant::now();
                                if times.tokens == 0 {
                                    times.ttft = now - started;
                                } else {
                                    times.gaps.push(now - last);
                                }
                                last = now;
                                times.tokens += 1;
                            }
                            Event::PromptLogprobs(_) | Event::Embedding(_) => {}
                            Event::Finished { .. } => break,
                            Event::Failed(e) => anyhow::bail!("request failed: {e}"),
                        }
                    }
                    Ok(times)
                },
            ));
        }
        let mut results = Vec::with_capacity(c);
        for h in collectors {
            results.push(
                h.join()
                    .map_err(|_| anyhow::anyhow!("collector panicked"))??,
            );
        }
        let summary = wave_summary(&results, started.elapsed().as_secs_f64());
        let line = merged(
            json!({
                "concurrency": c,
                "prompt_tokens": config.prompt_tokens,
                "new_tokens": config.new_tokens,
                "peak_rss_mb": peak_rss_mb(),
            }),
            summary,
        );
        println!("{line}");
        lines.push(line);
    }
    Ok(lines)
}

/// Runs `request` to its end; returns the seconds it took.
fn timed(engine: &EngineHandle, request: GenerateRequest) -> anyhow::Result<f64> {
    let started = Instant::now();
    engine
        .submit(request)?
        .blocking_collect(|_| {})
        .map_err(|e| anyhow::anyhow!("request failed: {e}"))?;
    Ok(started.elapsed().as_secs_f64())
}

/// llama-bench's two figures for one sequence, medians of `repetitions`: prefill of a
/// `pp`-token prompt (to its first token) and decode of `tg` tokens from a 1-token prompt.
/// Prints and returns `{"pp", "prefill_tok_s", "tg", "decode_tok_s", "runs"}`.
pub fn pp_tg(
    engine: &EngineHandle,
    pp: usize,
    tg: usize,
    repetitions: usize,
) -> anyhow::Result<serde_json::Value> {
    let vocab = engine.limits().vocab_size;
    anyhow::ensure!(
        vocab > 200,
        "vocabulary too small for the benchmark prompts"
    );
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for r in 0..repetitions.max(1) {
        if pp > 0 {
            // A fresh prompt each time: nothing comes from the prefix cache.
            let s = timed(engine, GenerateRequest::greedy(prompt(r, pp, vocab), 1))?;
            prefill.push(pp as f64 / s);
        }
        if tg > 0 {
            let s = timed(
                engine,
                GenerateRequest::greedy(prompt(r + 500, 1, vocab), tg),
            )?;
            decode.push(tg as f64 / s);
        }
    }
    let runs = json!({"prefill_tok_s": prefill, "decode_tok_s": decode});
    let line = json!({
        "pp": pp,
        "prefill_tok_s": percentile(&mut prefill, 0.5),
        "tg": tg,
        "decode_tok_s": percentile(&mut decode, 0.5),
        "runs": runs,
        "peak_rss_mb": peak_rss_mb(),
    });
    println!("{line}");
    Ok(line)
}

/// Time from submit to the first token; the generation is then run to its end.
fn first_token_ms(engine: &EngineHandle, request: GenerateRequest) -> anyhow::Result<(f64, usize)> {
    let started = Instant::now();
    let mut generation = engine.submit(request)?;
    let mut ttft = None;
    while let Some(ev) = generation.blocking_next() {
        match ev {
            Event::Token { .. } => {
                ttft.get_or_insert_with(|| started.elapsed().as_secs_f64() * 1e3);
            }
            Event::PromptLogprobs(_) | Event::Embedding(_) => {}
            Event::Finished { .. } => break,
            Event::Failed(e) => anyhow::bail!("request failed: {e}"),
        }
    }
    let cached = generation.cached_tokens();
    Ok((ttft.unwrap_or(0.0), cached))
}

/// Editor autocomplete: a `context`-token file, then `requests` completions whose last
/// `changed` tokens differ each time (the cursor moved), `new_tokens` each. Prints and returns
/// one JSON line with the cold and warm TTFT.
pub fn autocomplete(
    engine: &EngineHandle,
    context: usize,
    changed: usize,
    new_tokens: usize,
    requests: usize,
) -> anyhow::Result<serde_json::Value> {
    let vocab = engine.limits().vocab_size;
    anyhow::ensure!(
        changed < context,
        "--changed must be below the context size"
    );
    let base = prompt(10_000, context, vocab);
    let (cold, _) = first_token_ms(engine, GenerateRequest::greedy(base.clone(), new_tokens))?;
    let mut ttft = Vec::new();
    let mut cached = Vec::new();
    for r in 0..requests {
        let mut p = base[..context - changed].to_vec();
        p.extend(prompt(20_000 + r, changed, vocab));
        let (t, c) = first_token_ms(engine, GenerateRequest::greedy(p, new_tokens))?;
        ttft.push(t);
        cached.push(c as f64);
    }
    let line = json!({
        "scenario": "autocomplete",
        "context_tokens": context,
        "changed_tokens": changed,
        "new_tokens": new_tokens,
        "requests": requests,
        "ttft_ms_cold": cold,
        "ttft_ms_p50": percentile(&mut ttft, 0.5),
        "ttft_ms_p95": percentile(&mut ttft, 0.95),
        "cached_tokens_p50": percentile(&mut cached, 0.5),
    });
    println!("{line}");
    Ok(line)
}

/// Typing: a new request every `interval`, each abandoning the previous one (its context one
/// token longer, as if a character was typed). Prints and returns one JSON line: the most
/// requests running at once, and the last request's TTFT next to a lone keystroke's on the
/// same warm cache (and the cold first request's).
pub fn typing(
    engine: &EngineHandle,
    context: usize,
    keystrokes: usize,
    interval: Duration,
    new_tokens: usize,
) -> anyhow::Result<serde_json::Value> {
    let vocab = engine.limits().vocab_size;
    let base = prompt(30_000, context + keystrokes, vocab);
    // The file is open already: its context is cached, as in the editor before typing starts.
    let (cold, _) = first_token_ms(
        engine,
        GenerateRequest::greedy(base[..context].to_vec(), new_tokens),
    )?;
    // A lone keystroke on the warm cache: the reference the last request is compared with.
    let mut lone = base[..context].to_vec();
    lone.push(base[context + keystrokes - 1] ^ 1);
    let (single, _) = first_token_ms(engine, GenerateRequest::greedy(lone, new_tokens))?;
    let mut max_running = 0;
    let mut previous = None;
    for k in 1..keystrokes {
        let g = engine.submit(GenerateRequest::greedy(
            base[..context + k].to_vec(),
            new_tokens,
        ))?;
        drop(previous.replace(g)); // the editor abandons the previous request
        let until = Instant::now() + interval;
        while Instant::now() < until {
            max_running = max_running.max(engine.stats().num_running);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    drop(previous);
    let (last, _) = first_token_ms(
        engine,
        GenerateRequest::greedy(base[..context + keystrokes].to_vec(), new_tokens),
    )?;
    let line = json!({
        "scenario": "typing",
        "context_tokens": context,
        "keystrokes": keystrokes,
        "interval_ms": interval.as_millis() as u64,
        "max_running": max_running,
        "cold_ttft_ms": cold,
        "single_ttft_ms": single,
        "last_ttft_ms": last,
    });
    println!("{line}");
    Ok(line)
}

/// LoRA training speed: seconds per optimizer step on `batch` random-id sequences of `len`
/// tokens (loss over every token), r = 8, alpha = 16, q/v targets, as in
/// `../shared/reference/lora_speed.json`. One warm-up step, then `steps` timed; prints and
/// returns the median.
pub fn lora_step(
    model: &crate::model::Model,
    batch: usize,
    len: usize,
    steps: usize,
) -> anyhow::Result<f64> {
    use crate::model::Target;
    use crate::train::dataset::Example;
    use crate::train::trainer::{train, TrainParams};
    let vocab = model.config().vocab_size as u32;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let examples: Vec<Example> = (0..batch * (steps + 1))
        .map(|_| Example {
            tokens: (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % vocab as u64) as u32
                })
                .collect(),
            targets: vec![true; len],
        })
        .collect();
    let frozen = model.frozen()?;
    let params = TrainParams {
        n_epochs: 1,
        batch_size: batch,
        learning_rate: 1e-3,
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: vec![Target::Q, Target::V],
        seed: 1,
        micro_batch_tokens: batch * len,
    };
    let mut times = Vec::new();
    let mut last = Instant::now();
    train(
        &frozen,
        &examples,
        &[],
        &params,
        || true,
        |r| {
            let now = Instant::now();
            let dt = now.duration_since(last).as_secs_f64();
            last = now;
            eprintln!("step {}: {dt:.3} s, loss {:.3}", r.step, r.train_loss);
            if r.step > 1 {
                times.push(dt);
            }
        },
    )?;
    let median = percentile(&mut times, 0.5);
    println!(
        "{}",
        json!({"scenario": "lora", "batch": [batch, len], "rank": 8, "targets": ["q_proj", "v_proj"],
               "median_s_per_step": median, "steps": times.len(), "peak_rss_mb": peak_rss_mb()})
    );
    Ok(median)
}

/// Texts for the speculative-decoding scenario (SmolLM2's chat format where it is a chat):
/// answers that copy their context (a code edit, a completion among similar functions, a
/// quote) and one that does not (a story), where drafts are mostly refused.
pub const SPECULATIVE_TEXTS: [(&str, &str); 4] = [
    (
        "code_edit",
        "<|im_start|>user\nRename the function `area` to `rectangle_area` in this code and \
         show the whole code:\n```python\ndef area(width, height):\n    \"\"\"Area of a \
         rectangle.\"\"\"\n    return width * height\n\n\ndef perimeter(width, height):\n    \
         \"\"\"Perimeter of a rectangle.\"\"\"\n    return 2 * (width + height)\n\n\n\
         print(area(3, 4), perimeter(3, 4))\n```<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "completion",
        "class Vector:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n\
         \x20   def __add__(self, other):\n        return Vector(self.x + other.x, self.y + \
         other.y)\n\n    def __sub__(self, other):\n        return Vector(self.x - other.x, \
         self.y - other.y)\n\n    def __mul__(self, k):\n",
    ),
    (
        "quote",
        "<|im_start|>user\nHere is a sentence: \"The committee will meet on Tuesday at noon in \
         the main hall to discuss the budget for next year.\" Repeat the sentence word for \
         word, then say what day the meeting is.<|im_end|>\n<|im_start|>assistant\n",
    ),
    ("story", "Once upon a time, in a small village by the sea,"),
];

/// Speculative decoding: each prompt run greedily to EOS or `new_tokens` on `plain` (no
/// drafts) and on `spec` (drafts), `repetitions` times each, alternating. Prints and returns
/// one JSON line per prompt: tokens, median decode tokens/s (after the first token) of both,
/// their ratio, the share of tokens that came from confirmed drafts, and whether both gave
/// the same tokens.
pub fn speculative(
    plain: &EngineHandle,
    spec: &EngineHandle,
    prompts: &[(&str, Vec<u32>)],
    stop: &[u32],
    new_tokens: usize,
    repetitions: usize,
) -> anyhow::Result<Vec<serde_json::Value>> {
    // Decode tokens/s after the first token, and the tokens.
    let run = |engine: &EngineHandle, ids: &[u32]| -> anyhow::Result<(f64, Vec<u32>)> {
        let request = GenerateRequest {
            stop_token_ids: stop.to_vec(),
            ..GenerateRequest::greedy(ids.to_vec(), new_tokens)
        };
        let mut first = None;
        let mut generation = engine.submit(request)?;
        let mut tokens = Vec::new();
        while let Some(ev) = generation.blocking_next() {
            match ev {
                Event::Token { id, .. } => {
                    first.get_or_insert_with(Instant::now);
                    tokens.push(id);
                }
                Event::PromptLogprobs(_) | Event::Embedding(_) => {}
                Event::Finished { .. } => break,
                Event::Failed(e) => anyhow::bail!("request failed: {e}"),
            }
        }
        let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
        let rate = if secs > 0.0 {
            (tokens.len() - 1) as f64 / secs
        } else {
            0.0
        };
        Ok((rate, tokens))
    };
    let mut lines = Vec::new();
    for (name, ids) in prompts {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let (mut same, mut tokens) = (true, 0);
        let accepted_before = spec.stats().spec_accepted_tokens_total;
        for _ in 0..repetitions.max(1) {
            let (ra, ta) = run(plain, ids)?;
            let (rb, tb) = run(spec, ids)?;
            same &= ta == tb;
            tokens = ta.len();
            a.push(ra);
            b.push(rb);
        }
        // The stats are published after each step; the last one's may be a step late.
        std::thread::sleep(Duration::from_millis(50));
        let accepted = spec.stats().spec_accepted_tokens_total - accepted_before;
        let (pa, pb) = (percentile(&mut a, 0.5), percentile(&mut b, 0.5));
        let line = json!({
            "scenario": "speculative",
            "prompt": name,
            "tokens": tokens,
            "plain_decode_tok_s": pa,
            "spec_decode_tok_s": pb,
            "speedup": if pa > 0.0 { pb / pa } else { 0.0 },
            "from_drafts": accepted as f64 / (tokens * repetitions.max(1)).max(1) as f64,
            "same_tokens": same,
        });
        println!("{line}");
        lines.push(line);
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut xs = vec![5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(percentile(&mut xs, 0.5), 3.0);
        assert_eq!(percentile(&mut xs, 0.95), 5.0);
        assert_eq!(percentile(&mut [], 0.5), 0.0);
    }

    #[test]
    fn prompts_are_distinct_and_in_range() {
        let a = prompt(0, 50, 1000);
        let b = prompt(1, 50, 1000);
        assert_ne!(a, b);
        assert!(a.iter().all(|&t| (100..1000).contains(&t)));
    }
}
