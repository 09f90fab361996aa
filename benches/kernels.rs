//! Quantized matmul kernels in isolation: GFLOP/s and weight bandwidth per row count.
//!
//! `cargo bench --bench kernels [-- THREADS]` (default: the process's rayon pool). Prints one
//! JSON line per (format, shape, rows) with the median of several timed runs;
//! `KERNELS_FORMAT=Q4_1` (or `Q8_0`, `Q4K`, `Q6K`, `Q5K`) and `KERNELS_T=16,64` choose the format
//! and the row counts. Under `cargo test` (no
//! `--bench` argument) it only checks that the kernels run.

use std::time::Instant;

use nextoken::model::quant::{QMatrix, QuantFormat, BLOCK};

fn random_bytes(format: QuantFormat, rows: usize, cols: usize) -> Vec<u8> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let mut out = Vec::new();
    let per = if matches!(
        format,
        QuantFormat::Q4K
            | QuantFormat::Q6K
            | QuantFormat::Q5K
            | QuantFormat::Q3K
            | QuantFormat::IQ4XS
    ) {
        256
    } else {
        BLOCK
    };
    for _ in 0..rows * cols / per {
        let d = half::f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5).to_le_bytes();
        match format {
            QuantFormat::Q4_1 => {
                out.extend(d);
                out.extend(half::f16::from_f32(-((next() % 1000) as f32) * 1e-4).to_le_bytes());
                out.extend((0..16).map(|_| next() as u8));
            }
            QuantFormat::Q8_0 => {
                out.extend(d);
                out.extend((0..32).map(|_| next() as u8));
            }
            QuantFormat::Q4K => {
                out.extend(d);
                out.extend(d);
                out.extend((0..140).map(|_| next() as u8));
            }
            QuantFormat::Q5K => {
                out.extend(d);
                out.extend(d);
                out.extend((0..172).map(|_| next() as u8));
            }
            QuantFormat::Q5_1 => {
                out.extend(d);
                out.extend(half::f16::from_f32(-((next() % 1000) as f32) * 1e-4).to_le_bytes());
                out.extend((0..20).map(|_| next() as u8));
            }
            QuantFormat::Q6K => {
                out.extend((0..208).map(|_| next() as u8));
                out.extend(d);
            }
            QuantFormat::Q3K => {
                out.extend((0..108).map(|_| next() as u8));
                out.extend(d);
            }
            QuantFormat::IQ4NL => {
                out.extend(d);
                out.extend((0..16).map(|_| next() as u8));
            }
            QuantFormat::IQ4XS => {
                out.extend(d);
                out.extend((0..134).map(|_| next() as u8));
            }
        }
    }
    out
}

fn main() {
    // `cargo test --all-targets` runs this binary without `--bench`: a quick smoke run only.
    if !std::env::args().any(|a| a == "--bench") {
        let bytes = random_bytes(QuantFormat::Q4_1, 32, 64);
        let q = QMatrix::from_gguf_bytes(QuantFormat::Q4_1, 32, 64, &bytes).expect("valid");
        assert_eq!(q.matmul(&vec![0.5f32; 7 * 64], 7).len(), 7 * 32);
        return;
    }
    if let Some(threads) = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<usize>().ok())
    {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .expect("pool");
    }
    let shapes = [
        (QuantFormat::Q4_1, 1536, 576),
        (QuantFormat::Q4_1, 576, 1536),
        (QuantFormat::Q8_0, 49152, 576),
        (QuantFormat::Q4K, 576, 1536),
        (QuantFormat::Q6K, 576, 1536),
        (QuantFormat::Q5K, 576, 1536),
    ];
    let only_format = std::env::var("KERNELS_FORMAT").ok();
    let only_t: Option<Vec<usize>> = std::env::var("KERNELS_T")
        .ok()
        .map(|v| v.split(',').filter_map(|t| t.parse().ok()).collect());
    for (format, rows, cols) in shapes {
        if only_format
            .as_ref()
            .is_some_and(|f| *f != format!("{format:?}"))
        {
            continue;
        }
        let q = QMatrix::from_gguf_bytes(format, rows, cols, &random_bytes(format, rows, cols))
            .expect("valid");
        let default_ts = vec![1usize, 2, 4, 8, 16, 64, 256];
        for &t in only_t.as_ref().unwrap_or(&default_ts) {
            let x: Vec<f32> = (0..t * cols)
                .map(|i| (i % 17) as f32 * 0.01 - 0.08)
                .collect();
            let budget = 2e8 / (rows * cols * t) as f64;
            let reps = (budget.ceil() as usize).clamp(1, 2000);
            let mut times = Vec::new();
            for _ in 0..7 {
                let start = Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(q.matmul(std::hint::black_box(&x), t));
                }
                times.push(start.elapsed().as_secs_f64() / reps as f64);
            }
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            let flops = 2.0 * (rows * cols * t) as f64;
            println!(
                "{{\"format\":\"{format:?}\",\"rows\":{rows},\"cols\":{cols},\"t\":{t},\"us\":{:.1},\"gflops\":{:.1},\"weight_gb_s\":{:.1}}}",
                median * 1e6,
                flops / median / 1e9,
                q.bytes() as f64 / median / 1e9
            );
        }
    }
}
