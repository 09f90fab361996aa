//! `QMatrix`: a weight matrix kept in GGUF block quantization (Q4_1, Q8_0), repacked at load
//! into 16-output panels, and its matmul against f32 activations.
//!
//! Layout: outputs are grouped in panels of 16; per panel and 32-input block the 16 scales
//! (and minimums) sit together, then the quants input by input, so one AVX2 load yields the
//! weights of 8 outputs at one input — the "outer product" form a GEMM micro-kernel wants.
//!
//! Arithmetic (the one function every path computes, whatever the row count): for output `n`
//! and activation row `x`, per block `b` in order,
//! `S = Σⱼ x[j]·q[j]` (fused multiply-adds, j ascending, from 0),
//! `acc = d·S + acc`, then (Q4_1) `acc = m·X + acc` with `X = Σⱼ x[j]` (ascending) — i.e.
//! `Σ x·(d·q + m)` regrouped per block. Each output lane runs the same chain of fused
//! operations on every path (one row, few rows with in-register unpacking, many rows through a
//! dequantized panel in cache, scalar fallback), so results are bit-identical alone or batched:
//! batch invariance by construction. AVX2+FMA+F16C is chosen at run time.

use rayon::prelude::*;

/// Elements per quantization block.
pub const BLOCK: usize = 32;

/// Outputs per panel: two AVX2 vectors.
const PANEL: usize = 16;

/// Block formats with a fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    /// 4-bit with scale and minimum: `w = d·q + m`, q in 0..16.
    Q4_1,
    /// 8-bit with scale: `w = d·q`, q in -128..128.
    Q8_0,
}

/// 16 outputs × 32 inputs of Q4_1.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct PanelQ4_1 {
    /// f16 bits of each output's scale.
    d: [u16; PANEL],
    /// f16 bits of each output's minimum.
    m: [u16; PANEL],
    /// `qs[2·g + h][i]`: the quants of output `8h + i` for inputs `8g..8g+8`, input `8g + j` in
    /// bits `4j..4j+4` — one AVX2 load holds 8 inputs × 8 outputs, unpacked without shuffles.
    qs: [[u32; 8]; 8],
}

/// 16 outputs × 32 inputs of Q8_0.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct PanelQ8_0 {
    /// f16 bits of each output's scale.
    d: [u16; PANEL],
    /// Per input: the 16 outputs' quants.
    qs: [[i8; PANEL]; BLOCK],
}

const EMPTY_Q4_1: PanelQ4_1 = PanelQ4_1 {
    d: [0; PANEL],
    m: [0; PANEL],
    qs: [[0; 8]; 8],
};
const EMPTY_Q8_0: PanelQ8_0 = PanelQ8_0 {
    d: [0; PANEL],
    qs: [[0; PANEL]; BLOCK],
};

/// Panel-major blocks: panel `p`, block `b` at `p * nb + b`.
#[derive(Debug, Clone)]
enum Panels {
    Q4_1(Vec<PanelQ4_1>),
    Q8_0(Vec<PanelQ8_0>),
}

/// A `(rows, cols)` quantized matrix (rows = output features), panel-packed.
#[derive(Debug, Clone)]
pub struct QMatrix {
    rows: usize,
    cols: usize,
    panels: Panels,
}

fn f16_bits(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// Quant of output `i`, input `k` of a Q4_1 panel block.
fn q4_at(blk: &PanelQ4_1, i: usize, k: usize) -> u32 {
    (blk.qs[(k / 8) * 2 + i / 8][i % 8] >> (4 * (k % 8))) & 0xF
}

/// Q4_1 quants are unpacked by masking a nibble in place (`q·16ʲ`, no shift) for inputs
/// `j = 0..7` of each group of 8, and by a shift for `j = 7`; activations carry the inverse
/// power of two. Both scalings are exact, so `x'·q' = x·q` and every path multiplies the same
/// pair of floats.
const Q4_SCALE: [f32; 8] = [
    1.0, 16.0, 256.0, 4096.0, 65536.0, 1048576.0, 16777216.0, 1.0,
];

/// One output row's block in plain form: f16 scale, f16 minimum (0 for Q8_0), quants.
#[derive(Clone, Copy)]
struct RowBlock {
    d: u16,
    m: u16,
    q: [i16; BLOCK],
}

/// Activation rows per kernel call (12 accumulators of one panel).
const MICRO_ROWS: usize = 6;
/// Rows whose activations share one unpacking of each panel (≈ 48 × 1536 × 4 B in L2).
const ROW_BLOCK: usize = 48;

impl QMatrix {
    /// Parses GGUF block bytes of a `(rows, cols)` matrix.
    pub fn from_gguf_bytes(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self, String> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(format!("{cols} columns are not a multiple of {BLOCK}"));
        }
        let nb = cols / BLOCK;
        let block_bytes = match format {
            QuantFormat::Q4_1 => 20,
            QuantFormat::Q8_0 => 34,
        };
        if bytes.len() != rows * nb * block_bytes {
            return Err(format!(
                "expected {} bytes of {format:?} blocks, got {}",
                rows * nb * block_bytes,
                bytes.len()
            ));
        }
        let mut m = QMatrix::empty(format, rows, cols);
        for (i, b) in bytes.chunks_exact(block_bytes).enumerate() {
            let mut q = [0i16; BLOCK];
            let block = match format {
                QuantFormat::Q4_1 => {
                    for j in 0..16 {
                        q[j] = i16::from(b[4 + j] & 0x0F);
                        q[j + 16] = i16::from(b[4 + j] >> 4);
                    }
                    RowBlock {
                        d: f16_bits(b, 0),
                        m: f16_bits(b, 2),
                        q,
                    }
                }
                QuantFormat::Q8_0 => {
                    for (qj, &byte) in q.iter_mut().zip(&b[2..34]) {
                        *qj = i16::from(byte as i8);
                    }
                    RowBlock {
                        d: f16_bits(b, 0),
                        m: 0,
                        q,
                    }
                }
            };
            m.set_block(i / nb, i % nb, &block);
        }
        Ok(m)
    }

    fn empty(format: QuantFormat, rows: usize, cols: usize) -> Self {
        let n = rows.div_ceil(PANEL) * (cols / BLOCK);
        let panels = match format {
            QuantFormat::Q4_1 => Panels::Q4_1(vec![EMPTY_Q4_1; n]),
            QuantFormat::Q8_0 => Panels::Q8_0(vec![EMPTY_Q8_0; n]),
        };
        QMatrix { rows, cols, panels }
    }

    fn block(&self, row: usize, b: usize) -> RowBlock {
        let nb = self.cols / BLOCK;
        let (p, i) = (row / PANEL, row % PANEL);
        let mut q = [0i16; BLOCK];
        match &self.panels {
            Panels::Q4_1(v) => {
                let blk = &v[p * nb + b];
                for (k, qk) in q.iter_mut().enumerate() {
                    *qk = q4_at(blk, i, k) as i16;
                }
                RowBlock {
                    d: blk.d[i],
                    m: blk.m[i],
                    q,
                }
            }
            Panels::Q8_0(v) => {
                let blk = &v[p * nb + b];
                for (k, qk) in q.iter_mut().enumerate() {
                    *qk = i16::from(blk.qs[k][i]);
                }
                RowBlock {
                    d: blk.d[i],
                    m: 0,
                    q,
                }
            }
        }
    }

    fn set_block(&mut self, row: usize, b: usize, block: &RowBlock) {
        let nb = self.cols / BLOCK;
        let (p, i) = (row / PANEL, row % PANEL);
        match &mut self.panels {
            Panels::Q4_1(v) => {
                let blk = &mut v[p * nb + b];
                blk.d[i] = block.d;
                blk.m[i] = block.m;
                for (k, &qk) in block.q.iter().enumerate() {
                    let word = &mut blk.qs[(k / 8) * 2 + i / 8][i % 8];
                    let shift = 4 * (k % 8);
                    // Quants are 0..16 by construction (parsed from nibbles).
                    *word = (*word & !(0xF << shift)) | (((qk as u32) & 0xF) << shift);
                }
            }
            Panels::Q8_0(v) => {
                let blk = &mut v[p * nb + b];
                blk.d[i] = block.d;
                for (k, &qk) in block.q.iter().enumerate() {
                    blk.qs[k][i] = qk as i8;
                }
            }
        }
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The block format.
    pub fn format(&self) -> QuantFormat {
        match self.panels {
            Panels::Q4_1(_) => QuantFormat::Q4_1,
            Panels::Q8_0(_) => QuantFormat::Q8_0,
        }
    }

    /// Bytes held by the packed weights.
    pub fn bytes(&self) -> usize {
        match &self.panels {
            Panels::Q4_1(v) => std::mem::size_of_val(v.as_slice()),
            Panels::Q8_0(v) => std::mem::size_of_val(v.as_slice()),
        }
    }

    /// The matrices' rows one after another (same format and columns; every part but the last
    /// a whole number of panels), or `None`.
    pub fn stack(parts: &[&QMatrix]) -> Option<Self> {
        let first = parts.first()?;
        let (format, cols) = (first.format(), first.cols);
        let fits = parts.iter().all(|p| p.format() == format && p.cols == cols)
            && parts[..parts.len() - 1]
                .iter()
                .all(|p| p.rows.is_multiple_of(PANEL));
        if !fits {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let panels = match format {
            QuantFormat::Q4_1 => Panels::Q4_1(
                parts
                    .iter()
                    .flat_map(|p| match &p.panels {
                        Panels::Q4_1(v) => v.clone(),
                        Panels::Q8_0(_) => Vec::new(),
                    })
                    .collect(),
            ),
            QuantFormat::Q8_0 => Panels::Q8_0(
                parts
                    .iter()
                    .flat_map(|p| match &p.panels {
                        Panels::Q8_0(v) => v.clone(),
                        Panels::Q4_1(_) => Vec::new(),
                    })
                    .collect(),
            ),
        };
        Some(QMatrix { rows, cols, panels })
    }

    /// A matrix whose row `i` is this matrix's row `source[i]`.
    pub fn gather_rows(&self, source: &[usize]) -> Self {
        let nb = self.cols / BLOCK;
        let mut out = QMatrix::empty(self.format(), source.len(), self.cols);
        for (i, &r) in source.iter().enumerate() {
            for b in 0..nb {
                out.set_block(i, b, &self.block(r, b));
            }
        }
        out
    }

    /// Row `r` dequantized exactly (`d·q + m` in f32, as ggml and gguf-py compute it).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (b, o) in out.chunks_exact_mut(BLOCK).enumerate() {
            let blk = self.block(r, b);
            let (d, m) = (f16_to_f32(blk.d), f16_to_f32(blk.m));
            for (oj, &q) in o.iter_mut().zip(&blk.q) {
                *oj = match self.format() {
                    QuantFormat::Q4_1 => f32::from(q) * d + m,
                    QuantFormat::Q8_0 => f32::from(q) * d,
                };
            }
        }
    }

    /// The whole matrix dequantized, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(r, row);
        }
        out
    }

    /// `y = x · Wᵀ` for `x: (t, cols)` row-major; returns `(t, rows)` row-major.
    pub fn matmul(&self, x: &[f32], t: usize) -> Vec<f32> {
        assert_eq!(x.len(), t * self.cols, "activation size");
        let nb = self.cols / BLOCK;
        let np = self.rows.div_ceil(PANEL);
        // Per activation row and block: Σx (the Q4_1 minimum's share), ascending.
        let xsum: Vec<f32> = match self.panels {
            Panels::Q4_1(_) => x
                .chunks_exact(BLOCK)
                .map(|c| c.iter().fold(0f32, |s, &v| s + v))
                .collect(),
            Panels::Q8_0(_) => vec![0f32; t * nb],
        };
        let scaled: Vec<f32>;
        let x = match self.panels {
            Panels::Q4_1(_) => {
                scaled = scale_for_q4(x);
                &scaled
            }
            Panels::Q8_0(_) => x,
        };
        let job = Job {
            panels: &self.panels,
            nb,
            x,
            xsum: &xsum,
            t,
        };
        // Panel groups in parallel: enough tasks to balance, few enough to amortise dispatch.
        let threads = rayon::current_num_threads().max(1);
        let per_task = np.div_ceil(threads * 4).max(4).min(np.max(1));
        let groups: Vec<(usize, Vec<f32>)> = (0..np)
            .step_by(per_task)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|p0| {
                let p1 = (p0 + per_task).min(np);
                let width = (p1 - p0) * PANEL;
                let mut out = vec![0f32; t * width];
                job.run(p0, p1, &mut out);
                (p0, out)
            })
            .collect();
        let mut y = vec![0f32; t * self.rows];
        for (p0, out) in &groups {
            let width = out.len() / t.max(1);
            let c0 = p0 * PANEL;
            let keep = width.min(self.rows - c0);
            for r in 0..t {
                y[r * self.rows + c0..r * self.rows + c0 + keep]
                    .copy_from_slice(&out[r * width..r * width + keep]);
            }
        }
        y
    }
}

/// Activations divided by `Q4_SCALE` (exact powers of two).
fn scale_for_q4(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(8)
        .flat_map(|c| c.iter().zip(&Q4_SCALE).map(|(v, s)| v / s))
        .collect()
}

/// One matmul's shared inputs (`x` scaled for Q4_1).
struct Job<'a> {
    panels: &'a Panels,
    nb: usize,
    x: &'a [f32],
    xsum: &'a [f32],
    t: usize,
}

impl Job<'_> {
    /// Panels `p0..p1` for every row into `out: (t, (p1-p0)*16)`.
    fn run(&self, p0: usize, p1: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if simd_available() {
            simd_x86::run(self, p0, p1, out);
            return;
        }
        self.run_scalar(p0, p1, out);
    }

    fn run_scalar(&self, p0: usize, p1: usize, out: &mut [f32]) {
        let (nb, cols) = (self.nb, self.nb * BLOCK);
        let width = (p1 - p0) * PANEL;
        for p in p0..p1 {
            for i in 0..PANEL {
                for r in 0..self.t {
                    let x = &self.x[r * cols..(r + 1) * cols];
                    let mut acc = 0f32;
                    for b in 0..nb {
                        let (d, m, s) = match self.panels {
                            Panels::Q4_1(v) => {
                                let blk = &v[p * nb + b];
                                let mut s = 0f32;
                                for j in 0..BLOCK {
                                    // The SIMD unpacking's exact power-of-two scaling (below).
                                    let q = q4_at(blk, i, j) as f32 * Q4_SCALE[j % 8];
                                    s = x[b * BLOCK + j].mul_add(q, s);
                                }
                                (f16_to_f32(blk.d[i]), Some(f16_to_f32(blk.m[i])), s)
                            }
                            Panels::Q8_0(v) => {
                                let blk = &v[p * nb + b];
                                let mut s = 0f32;
                                for j in 0..BLOCK {
                                    s = x[b * BLOCK + j].mul_add(f32::from(blk.qs[j][i]), s);
                                }
                                (f16_to_f32(blk.d[i]), None, s)
                            }
                        };
                        acc = d.mul_add(s, acc);
                        if let Some(m) = m {
                            acc = m.mul_add(self.xsum[r * nb + b], acc);
                        }
                    }
                    out[r * width + (p - p0) * PANEL + i] = acc;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn simd_available() -> bool {
    use std::sync::OnceLock;
    static SIMD: OnceLock<bool> = OnceLock::new();
    *SIMD.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn simd_available() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd_x86 {
    //! AVX2 + FMA + F16C kernels. Lanes run along outputs; every lane runs the identical chain
    //! of fused operations whatever the kernel, which is what makes batching invisible.
    use std::arch::x86_64::*;

    use super::{Job, Panels, BLOCK, MICRO_ROWS, PANEL, ROW_BLOCK};

    /// Pointers into one panel block: scales, minimums (Q4_1 only), quants.
    #[derive(Clone, Copy)]
    struct BlockPtrs {
        d: *const u16,
        m: *const u16,
        qs: *const u8,
    }

    fn block_ptrs(job: &Job, p: usize, b: usize) -> BlockPtrs {
        match job.panels {
            Panels::Q4_1(v) => {
                let blk = &v[p * job.nb + b];
                BlockPtrs {
                    d: blk.d.as_ptr(),
                    m: blk.m.as_ptr(),
                    qs: blk.qs.as_ptr().cast(),
                }
            }
            Panels::Q8_0(v) => {
                let blk = &v[p * job.nb + b];
                BlockPtrs {
                    d: blk.d.as_ptr(),
                    m: blk.d.as_ptr(),
                    qs: blk.qs.as_ptr().cast(),
                }
            }
        }
    }

    pub(super) fn run(job: &Job, p0: usize, p1: usize, out: &mut [f32]) {
        let q4 = matches!(job.panels, Panels::Q4_1(_));
        assert!(out.len() >= job.t * (p1 - p0) * PANEL);
        assert!(job.x.len() >= job.t * job.nb * BLOCK && job.xsum.len() >= job.t * job.nb);
        // SAFETY: only called after run-time detection of AVX2, FMA and F16C
        // (`simd_available`); the sizes every pointer below walks are asserted above.
        unsafe {
            if q4 {
                run_avx2::<true>(job, p0, p1, out)
            } else {
                run_avx2::<false>(job, p0, p1, out)
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_avx2<const Q4: bool>(job: &Job, p0: usize, p1: usize, out: &mut [f32]) {
        let o = out.as_mut_ptr();
        let unpacked_min = if Q4 { usize::MAX } else { 6 };
        if job.t >= unpacked_min {
            // Many rows: panels are unpacked to f32 once per block of rows (the block's
            // activations stay in L2) and reused by every row tile of the block.
            let width = (p1 - p0) * PANEL;
            let mut quants = vec![0f32; job.nb * BLOCK * PANEL];
            let mut scales = vec![0f32; job.nb * 2 * PANEL];
            for r_start in (0..job.t).step_by(ROW_BLOCK) {
                let r_end = (r_start + ROW_BLOCK).min(job.t);
                let tiles = (r_end - r_start).div_ceil(MICRO_ROWS);
                for p in p0..p1 {
                    // SAFETY: panel p exists; the buffers hold nb blocks; rows < t.
                    unsafe {
                        unpack_panel::<Q4>(job, p, &mut quants, &mut scales);
                        let (q, s) = (quants.as_ptr(), scales.as_ptr());
                        // Balanced tiles (8 rows = 4 + 4, not 6 + 2) keep chains busy.
                        for i in 0..tiles {
                            let a = r_start + (r_end - r_start) * i / tiles;
                            let b = r_start + (r_end - r_start) * (i + 1) / tiles;
                            let dst = o.add(a * width + (p - p0) * PANEL);
                            match b - a {
                                1 => micro::<Q4, 1>(job, a, q, s, dst, width),
                                2 => micro::<Q4, 2>(job, a, q, s, dst, width),
                                3 => micro::<Q4, 3>(job, a, q, s, dst, width),
                                4 => micro::<Q4, 4>(job, a, q, s, dst, width),
                                5 => micro::<Q4, 5>(job, a, q, s, dst, width),
                                _ => micro::<Q4, 6>(job, a, q, s, dst, width),
                            }
                        }
                    }
                }
            }
            return;
        }
        // Row tiles of up to MICRO_ROWS; narrower tiles take more panels at once so enough
        // independent accumulator chains hide the FMA latency.
        let mut r = 0;
        while r < job.t {
            let n = (job.t - r).min(MICRO_ROWS);
            // SAFETY: rows r..r+n < t and panels p0..p1 exist; `out` holds t × width.
            unsafe {
                match n {
                    1 => tile::<Q4, 1, 3>(job, p0, p1, r, o),
                    2 => tile::<Q4, 2, 2>(job, p0, p1, r, o),
                    3 => tile::<Q4, 3, 2>(job, p0, p1, r, o),
                    4 => tile::<Q4, 4, 1>(job, p0, p1, r, o),
                    5 => tile::<Q4, 5, 1>(job, p0, p1, r, o),
                    _ => tile::<Q4, 6, 1>(job, p0, p1, r, o),
                }
            }
            r += n;
        }
    }

    /// Panel `p` unpacked: `quants[b][k][16]` as f32 (the same values `unpack` yields),
    /// `scales[b] = [d; 16] ++ [m; 16]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack_panel<const Q4: bool>(
        job: &Job,
        p: usize,
        quants: &mut [f32],
        scales: &mut [f32],
    ) {
        assert!(quants.len() >= job.nb * BLOCK * PANEL && scales.len() >= job.nb * 2 * PANEL);
        // SAFETY: offsets below stay inside the asserted lengths; panel p exists (caller).
        unsafe {
            for b in 0..job.nb {
                let bp = block_ptrs(job, p, b);
                let sc = scales.as_mut_ptr().add(b * 2 * PANEL);
                let m = if Q4 { bp.m } else { bp.d };
                _mm256_storeu_ps(sc, _mm256_cvtph_ps(_mm_loadu_si128(bp.d.cast())));
                _mm256_storeu_ps(
                    sc.add(8),
                    _mm256_cvtph_ps(_mm_loadu_si128(bp.d.add(8).cast())),
                );
                _mm256_storeu_ps(sc.add(16), _mm256_cvtph_ps(_mm_loadu_si128(m.cast())));
                _mm256_storeu_ps(
                    sc.add(24),
                    _mm256_cvtph_ps(_mm_loadu_si128(m.add(8).cast())),
                );
                for k in 0..BLOCK {
                    let w = unpack::<Q4>(bp.qs, k);
                    let q = quants.as_mut_ptr().add((b * BLOCK + k) * PANEL);
                    _mm256_storeu_ps(q, w[0]);
                    _mm256_storeu_ps(q.add(8), w[1]);
                }
            }
        }
    }

    /// `MR` rows (from `r0`) × one unpacked panel.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn micro<const Q4: bool, const MR: usize>(
        job: &Job,
        r0: usize,
        quants: *const f32,
        scales: *const f32,
        out: *mut f32,
        width: usize,
    ) {
        let (nb, cols) = (job.nb, job.nb * BLOCK);
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        // SAFETY (whole body): rows r0..r0+MR exist (caller); `quants`/`scales` hold nb blocks.
        unsafe {
            for b in 0..nb {
                let mut s = [[_mm256_setzero_ps(); 2]; MR];
                let xb = job.x.as_ptr().add(r0 * cols + b * BLOCK);
                for k in 0..BLOCK {
                    let q = quants.add((b * BLOCK + k) * PANEL);
                    let (w0, w1) = (_mm256_loadu_ps(q), _mm256_loadu_ps(q.add(8)));
                    for (r, sr) in s.iter_mut().enumerate() {
                        let x = _mm256_broadcast_ss(&*xb.add(r * cols + k));
                        sr[0] = _mm256_fmadd_ps(x, w0, sr[0]);
                        sr[1] = _mm256_fmadd_ps(x, w1, sr[1]);
                    }
                }
                let sc = scales.add(b * 2 * PANEL);
                let d = [_mm256_loadu_ps(sc), _mm256_loadu_ps(sc.add(8))];
                let m = [_mm256_loadu_ps(sc.add(16)), _mm256_loadu_ps(sc.add(24))];
                for r in 0..MR {
                    let xs = _mm256_set1_ps(*job.xsum.get_unchecked((r0 + r) * nb + b));
                    for v in 0..2 {
                        acc[r][v] = _mm256_fmadd_ps(d[v], s[r][v], acc[r][v]);
                        if Q4 {
                            acc[r][v] = _mm256_fmadd_ps(m[v], xs, acc[r][v]);
                        }
                    }
                }
            }
            for (r, ar) in acc.iter().enumerate() {
                let dst = out.add(r * width);
                _mm256_storeu_ps(dst, ar[0]);
                _mm256_storeu_ps(dst.add(8), ar[1]);
            }
        }
    }

    /// Rows `r0..r0+MR` against panels `p0..p1`, `NP` panels per kernel call.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const Q4: bool, const MR: usize, const NP: usize>(
        job: &Job,
        p0: usize,
        p1: usize,
        r0: usize,
        out: *mut f32,
    ) {
        let width = (p1 - p0) * PANEL;
        let mut p = p0;
        // SAFETY: forwarded from the caller; each call's panels lie inside p0..p1.
        unsafe {
            while p + NP <= p1 {
                fused::<Q4, MR, NP>(job, p, r0, out.add(r0 * width + (p - p0) * PANEL), width);
                p += NP;
            }
            while p < p1 {
                fused::<Q4, MR, 1>(job, p, r0, out.add(r0 * width + (p - p0) * PANEL), width);
                p += 1;
            }
        }
    }

    /// The quants of input `k` for the panel's 16 outputs as f32 (Q4_1: scaled by
    /// `Q4_SCALE[k % 8]`): `[outputs 0..8, outputs 8..16]`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack<const Q4: bool>(qs: *const u8, k: usize) -> [__m256; 2] {
        // SAFETY: `qs` points at one panel block's quants (256 bytes Q4_1, 512 Q8_0); k < 32.
        unsafe {
            if Q4 {
                let (g, j) = (k / 8, k % 8);
                let v0 = _mm256_loadu_si256(qs.add(g * 64).cast());
                let v1 = _mm256_loadu_si256(qs.add(g * 64 + 32).cast());
                if j == 7 {
                    [
                        _mm256_cvtepi32_ps(_mm256_srli_epi32::<28>(v0)),
                        _mm256_cvtepi32_ps(_mm256_srli_epi32::<28>(v1)),
                    ]
                } else {
                    let mask = _mm256_set1_epi32(0xF << (4 * j));
                    [
                        _mm256_cvtepi32_ps(_mm256_and_si256(v0, mask)),
                        _mm256_cvtepi32_ps(_mm256_and_si256(v1, mask)),
                    ]
                }
            } else {
                let p = qs.add(k * PANEL);
                [
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()))),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8).cast()))),
                ]
            }
        }
    }

    /// `MR` rows × `NP` panels, quants unpacked in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fused<const Q4: bool, const MR: usize, const NP: usize>(
        job: &Job,
        p: usize,
        r0: usize,
        out: *mut f32,
        width: usize,
    ) {
        let (nb, cols) = (job.nb, job.nb * BLOCK);
        let mut acc = [[[_mm256_setzero_ps(); 2]; NP]; MR];
        // SAFETY (whole body): rows r0..r0+MR and panels p..p+NP exist (caller), so every
        // x, xsum and out offset is inside the asserted sizes.
        unsafe {
            for b in 0..nb {
                let mut s = [[[_mm256_setzero_ps(); 2]; NP]; MR];
                let ptrs: [BlockPtrs; NP] = std::array::from_fn(|i| block_ptrs(job, p + i, b));
                for g in 0..BLOCK / 8 {
                    for j in 0..8 {
                        let k = g * 8 + j;
                        for (i, bp) in ptrs.iter().enumerate() {
                            let w = unpack::<Q4>(bp.qs, k);
                            for (r, sr) in s.iter_mut().enumerate() {
                                let x = job.x.as_ptr().add((r0 + r) * cols + b * BLOCK + k);
                                let x = _mm256_broadcast_ss(&*x);
                                sr[i][0] = _mm256_fmadd_ps(x, w[0], sr[i][0]);
                                sr[i][1] = _mm256_fmadd_ps(x, w[1], sr[i][1]);
                            }
                        }
                    }
                }
                for (i, bp) in ptrs.iter().enumerate() {
                    let d = [
                        _mm256_cvtph_ps(_mm_loadu_si128(bp.d.cast())),
                        _mm256_cvtph_ps(_mm_loadu_si128(bp.d.add(8).cast())),
                    ];
                    let m = [
                        _mm256_cvtph_ps(_mm_loadu_si128(bp.m.cast())),
                        _mm256_cvtph_ps(_mm_loadu_si128(bp.m.add(8).cast())),
                    ];
                    for r in 0..MR {
                        let xs = _mm256_set1_ps(*job.xsum.get_unchecked((r0 + r) * nb + b));
                        for v in 0..2 {
                            acc[r][i][v] = _mm256_fmadd_ps(d[v], s[r][i][v], acc[r][i][v]);
                            if Q4 {
                                acc[r][i][v] = _mm256_fmadd_ps(m[v], xs, acc[r][i][v]);
                            }
                        }
                    }
                }
            }
            for (r, ar) in acc.iter().enumerate() {
                for (i, ai) in ar.iter().enumerate() {
                    let dst = out.add(r * width + i * PANEL);
                    _mm256_storeu_ps(dst, ai[0]);
                    _mm256_storeu_ps(dst.add(8), ai[1]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random GGUF bytes for a matrix in `format`.
    fn random_bytes(format: QuantFormat, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let n = rows * cols / BLOCK;
        let mut out = Vec::new();
        for _ in 0..n {
            let d = half::f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
            out.extend(d.to_le_bytes());
            match format {
                QuantFormat::Q4_1 => {
                    let m = half::f16::from_f32(-((next() % 1000) as f32) * 1e-4);
                    out.extend(m.to_le_bytes());
                    out.extend((0..16).map(|_| next() as u8));
                }
                QuantFormat::Q8_0 => out.extend((0..32).map(|_| next() as u8)),
            }
        }
        out
    }

    fn activations(t: usize, cols: usize) -> Vec<f32> {
        (0..t * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.7)
            .collect()
    }

    #[test]
    fn matmul_equals_dequantized_f32_product() {
        for format in [QuantFormat::Q4_1, QuantFormat::Q8_0] {
            let (rows, cols, t) = (37, 96, 7);
            let q =
                QMatrix::from_gguf_bytes(format, rows, cols, &random_bytes(format, rows, cols, 3))
                    .expect("valid");
            let w = q.dequantize();
            let x = activations(t, cols);
            let y = q.matmul(&x, t);
            for r in 0..t {
                for o in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|k| f64::from(x[r * cols + k]) * f64::from(w[o * cols + k]))
                        .sum();
                    let got = f64::from(y[r * rows + o]);
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{format:?} {r},{o}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_row_is_bit_identical_alone_or_batched() {
        for format in [QuantFormat::Q4_1, QuantFormat::Q8_0] {
            let (rows, cols) = (40, 96);
            let q =
                QMatrix::from_gguf_bytes(format, rows, cols, &random_bytes(format, rows, cols, 9))
                    .expect("valid");
            let x = activations(13, cols);
            // Every row count exercises a different kernel shape (1, 2 fused; 3.. micro-tiles).
            for t in 1..=13 {
                let batched = q.matmul(&x[..t * cols], t);
                for r in 0..t {
                    let alone = q.matmul(&x[r * cols..(r + 1) * cols], 1);
                    assert_eq!(
                        alone,
                        batched[r * rows..(r + 1) * rows],
                        "{format:?} t={t} row {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn scalar_and_simd_paths_are_bit_identical() {
        for format in [QuantFormat::Q4_1, QuantFormat::Q8_0] {
            let (rows, cols) = (48, 96);
            let q =
                QMatrix::from_gguf_bytes(format, rows, cols, &random_bytes(format, rows, cols, 5))
                    .expect("valid");
            for t in [1, 2, 3, 7] {
                let x = activations(t, cols);
                let nb = cols / BLOCK;
                let xsum: Vec<f32> = match format {
                    QuantFormat::Q4_1 => x
                        .chunks_exact(BLOCK)
                        .map(|c| c.iter().fold(0f32, |s, &v| s + v))
                        .collect(),
                    QuantFormat::Q8_0 => vec![0f32; t * nb],
                };
                let job = Job {
                    panels: &q.panels,
                    nb,
                    x: &x,
                    xsum: &xsum,
                    t,
                };
                let np = rows / PANEL;
                let (mut a, mut b) = (vec![0f32; t * rows], vec![1f32; t * rows]);
                job.run_scalar(0, np, &mut a);
                job.run(0, np, &mut b);
                assert_eq!(a, b, "{format:?} t={t}");
            }
        }
    }

    #[test]
    fn gather_rows_and_bad_sizes() {
        let bytes = random_bytes(QuantFormat::Q4_1, 4, 32, 1);
        let q = QMatrix::from_gguf_bytes(QuantFormat::Q4_1, 4, 32, &bytes).expect("valid");
        let g = q.gather_rows(&[2, 0]);
        let (mut a, mut b) = (vec![0f32; 32], vec![0f32; 32]);
        g.dequantize_row(0, &mut a);
        q.dequantize_row(2, &mut b);
        assert_eq!(a, b);
        assert!(QMatrix::from_gguf_bytes(QuantFormat::Q4_1, 4, 32, &bytes[1..]).is_err());
        assert!(QMatrix::from_gguf_bytes(QuantFormat::Q4_1, 4, 30, &bytes).is_err());
    }
}

#[cfg(test)]
mod candle_agreement {
    use super::*;
    use candle_core::quantized::{ggml_file, GgmlDType};
    use candle_core::Device;

    #[test]
    fn dequantization_is_bit_identical_to_ggml() {
        for (format, dtype) in [
            (QuantFormat::Q4_1, GgmlDType::Q4_1),
            (QuantFormat::Q8_0, GgmlDType::Q8_0),
        ] {
            let bytes = tests_support::bytes(format, 6, 64);
            let ours = QMatrix::from_gguf_bytes(format, 6, 64, &bytes)
                .expect("valid")
                .dequantize();
            let theirs = ggml_file::qtensor_from_ggml(dtype, &bytes, vec![6, 64], &Device::Cpu)
                .expect("candle parses")
                .dequantize(&Device::Cpu)
                .expect("dequantize")
                .flatten_all()
                .expect("flat")
                .to_vec1::<f32>()
                .expect("f32");
            assert_eq!(ours, theirs, "{format:?}");
        }
    }

    mod tests_support {
        use super::super::{QuantFormat, BLOCK};
        pub fn bytes(format: QuantFormat, rows: usize, cols: usize) -> Vec<u8> {
            let mut out = Vec::new();
            for i in 0..rows * cols / BLOCK {
                out.extend(half::f16::from_f32(0.01 + i as f32 * 0.003).to_le_bytes());
                if format == QuantFormat::Q4_1 {
                    out.extend(half::f16::from_f32(-0.05 * i as f32).to_le_bytes());
                    out.extend((0..16u8).map(|j| j.wrapping_mul(37).wrapping_add(i as u8)));
                } else {
                    out.extend((0..32u8).map(|j| j.wrapping_mul(53).wrapping_add(i as u8)));
                }
            }
            out
        }
    }
}
