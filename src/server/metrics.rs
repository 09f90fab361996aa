//! Prometheus metrics, named like vLLM's under a `nextoken:` prefix so existing dashboards
//! work: engine gauges and counters (from `EngineStats`), latency histograms, and requests by
//! endpoint and status.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::engine::EngineStats;

/// A cumulative histogram with fixed buckets (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, seconds: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if seconds <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// All server metrics.
pub struct Metrics {
    /// Time to first token.
    pub ttft: Histogram,
    /// Time between tokens.
    pub itl: Histogram,
    /// Request latency.
    pub e2e: Histogram,
    requests: Mutex<BTreeMap<(String, u16), u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            ttft: Histogram::new(LATENCY_BUCKETS),
            itl: Histogram::new(LATENCY_BUCKETS),
            e2e: Histogram::new(LATENCY_BUCKETS),
            requests: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Metrics {
    /// Counts a finished HTTP request.
    pub fn count_request(&self, endpoint: &str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint.to_string(), status)).or_default() += 1;
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self, stats: Option<&EngineStats>) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, value: f64| {
            let _ = writeln!(out, "# HELP nextoken:{name} {help}\n# TYPE nextoken:{name} {kind}\nnextoken:{name} {value}");
        };
        let s = stats.cloned().unwrap_or_default();
        gauge(
            "num_requests_running",
            "Requests running in the engine.",
            "gauge",
            s.num_running as f64,
        );
        gauge(
            "num_requests_waiting",
            "Requests waiting for the engine.",
            "gauge",
            s.num_waiting as f64,
        );
        let usage = if s.kv_blocks_total > 0 {
            s.kv_blocks_used as f64 / s.kv_blocks_total as f64
        } else {
            0.0
        };
        gauge(
            "kv_cache_usage_perc",
            "Fraction of KV cache blocks in use (0-1).",
            "gauge",
            usage,
        );
        gauge(
            "kv_cache_blocks_used",
            "KV cache blocks in use.",
            "gauge",
            s.kv_blocks_used as f64,
        );
        gauge(
            "kv_cache_blocks_total",
            "KV cache blocks in the pool.",
            "gauge",
            s.kv_blocks_total as f64,
        );
        gauge(
            "kv_cache_window_blocks_used",
            "Blocks of the sliding-window layers' KV pool in use (0 without such layers).",
            "gauge",
            s.kv_window_blocks_used as f64,
        );
        gauge(
            "kv_cache_window_blocks_total",
            "Blocks in the sliding-window layers' KV pool.",
            "gauge",
            s.kv_window_blocks_total as f64,
        );
        gauge(
            "prompt_tokens_total",
            "Prompt tokens computed.",
            "counter",
            s.prompt_tokens_total as f64,
        );
        gauge(
            "generation_tokens_total",
            "Tokens generated.",
            "counter",
            s.generation_tokens_total as f64,
        );
        gauge(
            "prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache.",
            "counter",
            s.prefix_cache_queries_total as f64,
        );
        gauge(
            "prefix_cache_hits_total",
            "Prompt tokens whose KV came from the prefix cache.",
            "counter",
            s.prefix_cache_hits_total as f64,
        );
        gauge(
            "spec_decode_num_draft_tokens_total",
            "Draft tokens computed by speculative decoding.",
            "counter",
            s.spec_draft_tokens_total as f64,
        );
        gauge(
            "spec_decode_num_accepted_tokens_total",
            "Draft tokens confirmed by sampling.",
            "counter",
            s.spec_accepted_tokens_total as f64,
        );
        gauge(
            "num_preemptions_total",
            "Sequences preempted for lack of KV blocks.",
            "counter",
            s.num_preempted as f64,
        );
        gauge(
            "num_cancelled_total",
            "Requests cancelled by their client.",
            "counter",
            s.num_cancelled as f64,
        );
        self.ttft.render(
            &mut out,
            "nextoken:time_to_first_token_seconds",
            "Time to first token.",
        );
        self.itl.render(
            &mut out,
            "nextoken:inter_token_latency_seconds",
            "Time between tokens.",
        );
        self.e2e.render(
            &mut out,
            "nextoken:e2e_request_latency_seconds",
            "End-to-end request latency.",
        );
        let _ = writeln!(
            out,
            "# HELP nextoken:http_requests_total HTTP requests by endpoint and status.\n# TYPE nextoken:http_requests_total counter"
        );
        if let Ok(m) = self.requests.lock() {
            for ((endpoint, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "nextoken:http_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
                );
            }
        }
        out
    }
}
