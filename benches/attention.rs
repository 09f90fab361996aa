//! Decode attention in isolation: the time of one step's attention over all layers for C
//! sequences of L cached tokens each (SmolLM2's shape: 9 heads, 3 KV heads of 64, 30 layers,
//! f16 cache, blocks scattered over the pool as a long-running server leaves them).
//!
//! `cargo bench --bench attention` prints one JSON line per C with the median of several
//! steps; `ATTN_C=1,16` and `ATTN_L=214` choose the shapes, `ATTN_Q=76` makes the last 76
//! tokens of each context this step's rows (a prefill chunk after a prefix-cache hit). Under `cargo test` (no `--bench`
//! argument) it only checks that it runs.

use std::time::Instant;

use nextoken::model::attention::{self, AttentionPlan, HeadDims};
use nextoken::model::{ForwardBatch, KvCache, KvDtype};

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let list = |name: &str, default: &str| -> Vec<usize> {
        std::env::var(name)
            .unwrap_or_else(|_| default.to_string())
            .split(',')
            .filter_map(|v| v.parse().ok())
            .collect()
    };
    let (cs, lens) = if bench {
        (list("ATTN_C", "1,16"), list("ATTN_L", "214"))
    } else {
        (vec![2], vec![20])
    };
    let rows = list("ATTN_Q", "1").first().copied().unwrap_or(1).max(1);
    let (layers, heads, kv_heads, hd, bs) = (if bench { 30 } else { 2 }, 9, 3, 64, 16);
    let kv_dim = kv_heads * hd;
    for &len in &lens {
        for &c in &cs {
            let per_seq = len.div_ceil(bs);
            // Blocks of different sequences interleaved, as the block pool hands them out.
            let num_blocks = c * per_seq * 2;
            let mut kv = KvCache::with_windows(
                &vec![false; layers],
                kv_dim,
                num_blocks,
                0,
                bs,
                KvDtype::F16,
            );
            let mut batch = ForwardBatch::default();
            for s in 0..c {
                let table: Vec<u32> = (0..per_seq)
                    .map(|b| ((b * c + s) * 2 + (b % 2)) as u32)
                    .collect();
                let mut prefill = ForwardBatch::default();
                prefill.push_seq(&vec![1; len], 0, &table, bs);
                let plan_slots = prefill.slots.clone();
                for l in 0..layers {
                    let vals: Vec<f32> = (0..len * kv_dim)
                        .map(|i| ((i * 7 + l * 13 + s) % 101) as f32 * 0.01 - 0.5)
                        .collect();
                    attention::write_kv(kv.layer_mut(l), &plan_slots, &vals, &vals, kv_dim);
                }
                let q = rows.min(len);
                batch.push_seq(&vec![1; q], len - q, &table, bs);
            }
            let plan = AttentionPlan::new(&batch, bs, None);
            let dims = HeadDims {
                num_heads: heads,
                num_kv_heads: kv_heads,
                head_dim: hd,
                scale: 0.125,
                softcap: None,
                window: None,
            };
            let q: Vec<f32> = (0..batch.token_ids.len() * heads * hd)
                .map(|i| (i % 29) as f32 * 0.03 - 0.4)
                .collect();
            let mut times = Vec::new();
            for _ in 0..if bench { 15 } else { 1 } {
                let start = Instant::now();
                for l in 0..layers {
                    let out = attention::attend(&q, kv.layer_mut(l), &batch, &plan, dims);
                    assert_eq!(out.len(), q.len());
                }
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            let ms = times[times.len() / 2];
            let bytes = (c * len * layers * kv_dim * 2 * 2) as f64;
            // Query-key pairs (causal), two multiply-adds each per head dimension.
            let q = rows.min(len);
            let pairs = c * (q * (len - q) + q * (q + 1) / 2);
            let flops = (pairs * layers * heads * hd * 4) as f64;
            if bench {
                println!(
                    "{{\"seqs\":{c},\"context\":{len},\"rows\":{q},\"layers\":{layers},\"ms\":{ms:.3},\"kv_gb_s\":{:.2},\"gflop_s\":{:.1}}}",
                    bytes / ms / 1e6,
                    flops / ms / 1e6
                );
            }
        }
    }
}
