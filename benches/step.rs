//! Whole forward steps of the real model in isolation (no scheduler, no sampling): the time of
//! one step, median of several, for the shapes the engine benchmarks stress.
//!
//! `cargo bench --bench step` prints one JSON line per shape:
//! - `warm`: one sequence, 1,500 cached tokens, the last 76 recomputed (the warm autocomplete
//!   step of `nextoken bench --scenario autocomplete`);
//! - `decode16` / `decode1`: 16 sequences (or one) of 214 cached tokens, one new row each (a
//!   decode step of the `nextoken bench` sweep);
//! - `prefill512`: 512 rows of a fresh sequence (a full token budget of prefill).
//!
//! `STEP_SHAPES=warm,decode16` chooses, `STEP_REPS` sets the steps timed (15); `NEXTOKEN_MODEL` names the model (default: the
//! SmolLM2 GGUF under `models/`). Under `cargo test` (no `--bench` argument) it runs each shape
//! once, shortened, and checks the logits' shape.

use std::time::Instant;

use nextoken::model::{ForwardBatch, Model};

/// One step shape: `seqs` sequences of `context` tokens whose last `rows` are this step's.
struct Shape {
    name: &'static str,
    seqs: usize,
    context: usize,
    rows: usize,
}

const SHAPES: [Shape; 4] = [
    Shape {
        name: "warm",
        seqs: 1,
        context: 1500,
        rows: 76,
    },
    Shape {
        name: "decode16",
        seqs: 16,
        context: 214,
        rows: 1,
    },
    Shape {
        name: "decode1",
        seqs: 1,
        context: 214,
        rows: 1,
    },
    Shape {
        name: "prefill512",
        seqs: 1,
        context: 512,
        rows: 512,
    },
];

fn main() {
    // Inside a pool, as the engine runs its steps (`EngineCore`): parallel loops then start
    // on a worker instead of waking the pool from outside each time.
    rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .build()
        .expect("a thread pool")
        .install(run);
}

fn run() {
    let bench = std::env::args().any(|a| a == "--bench");
    let path = std::env::var("NEXTOKEN_MODEL")
        .unwrap_or_else(|_| "models/SmolLM2-135M-Instruct.Q4_1.gguf".to_string());
    let (model, _) = Model::load(path.as_ref()).expect("the model (models/fetch-default.sh)");
    let vocab = model.config().vocab_size;
    let only = std::env::var("STEP_SHAPES").ok();
    let bs = 16;
    let reps: usize = std::env::var("STEP_REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(15);
    for shape in SHAPES {
        if only
            .as_ref()
            .is_some_and(|o| !o.split(',').any(|n| n == shape.name))
        {
            continue;
        }
        let (context, rows) = if bench {
            (shape.context, shape.rows)
        } else {
            (shape.context.min(40), shape.rows.min(8))
        };
        let per_seq = context.div_ceil(bs);
        let mut kv = model.new_kv_cache(shape.seqs * per_seq, bs);
        let token = |s: usize, i: usize| ((s * 7919 + i * 104_729) % (vocab - 1) + 1) as u32;
        // Blocks of different sequences interleaved, as a busy pool hands them out.
        let tables: Vec<Vec<u32>> = (0..shape.seqs)
            .map(|s| (0..per_seq).map(|b| (b * shape.seqs + s) as u32).collect())
            .collect();
        // The cached part, in chunks of the engine's default token budget.
        let cached = context - rows;
        for (s, table) in tables.iter().enumerate() {
            for c0 in (0..cached).step_by(512) {
                let c1 = (c0 + 512).min(cached);
                let tokens: Vec<u32> = (c0..c1).map(|i| token(s, i)).collect();
                let mut batch = ForwardBatch::default();
                batch.push_seq(&tokens, c0, table, bs);
                model.forward(&batch, &mut kv).expect("prefill");
            }
        }
        // The timed step; every repetition rewrites the same slots with the same values.
        let mut batch = ForwardBatch::default();
        for (s, table) in tables.iter().enumerate() {
            let tokens: Vec<u32> = (cached..context).map(|i| token(s, i)).collect();
            batch.push_seq(&tokens, cached, table, bs);
        }
        let mut times = Vec::new();
        for _ in 0..if bench { reps } else { 1 } {
            let start = Instant::now();
            let logits = model.forward(&batch, &mut kv).expect("step");
            times.push(start.elapsed().as_secs_f64() * 1e3);
            assert_eq!(logits.dims(), [shape.seqs, vocab]);
        }
        times.sort_by(f64::total_cmp);
        if bench {
            println!(
                "{{\"shape\":\"{}\",\"seqs\":{},\"context\":{context},\"rows\":{rows},\"ms_p50\":{:.2},\"ms_min\":{:.2}}}",
                shape.name,
                shape.seqs,
                times[times.len() / 2],
                times[0]
            );
        }
    }
}
