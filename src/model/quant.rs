//! `QMatrix`: a weight matrix kept in GGUF block quantization (Q4_1, Q8_0), repacked at load
//! with f32 scales, and its matmul against f32 activations.
//!
//! Arithmetic: the same function as f32 activations times the exactly dequantized weights
//! (transformers' float32 arithmetic), regrouped per 32-element block:
//! `Σ x·(d·q + m) = d·Σ x·q + m·Σ x` (Q4_1) and `Σ x·(d·q) = d·Σ x·q` (Q8_0).
//! Every activation row goes through the same operation sequence whatever the number of rows in
//! the call, so results are bit-identical alone or batched (batch invariance by construction).
//! AVX2+FMA kernels are chosen at run time; a scalar path computes the same function elsewhere.

use rayon::prelude::*;

/// Elements per quantization block.
pub const BLOCK: usize = 32;

/// Block formats with a fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    /// 4-bit with scale and minimum: `w = d·q + m`, q in 0..16.
    Q4_1,
    /// 8-bit with scale: `w = d·q`, q in -128..128.
    Q8_0,
}

/// A Q4_1 block with f32 scale/min (repacked from GGUF's f16).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_1 {
    d: f32,
    m: f32,
    /// Element j in the low nibble of byte j, element j+16 in its high nibble (GGUF layout).
    qs: [u8; 16],
}

/// A Q8_0 block with an f32 scale.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_0 {
    d: f32,
    qs: [i8; 32],
}

#[derive(Debug, Clone)]
enum Blocks {
    Q4_1(Vec<BlockQ4_1>),
    Q8_0(Vec<BlockQ8_0>),
}

/// A `(rows, cols)` quantized matrix, row-major in blocks of 32 along `cols`.
#[derive(Debug, Clone)]
pub struct QMatrix {
    rows: usize,
    cols: usize,
    blocks: Blocks,
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Output rows handled per parallel task.
const OUT_TILE: usize = 16;
/// Activation rows sharing one unpacked weight block.
const ROW_GROUP: usize = 4;

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
        let n = rows * cols / BLOCK;
        let block_bytes = match format {
            QuantFormat::Q4_1 => 20,
            QuantFormat::Q8_0 => 34,
        };
        if bytes.len() != n * block_bytes {
            return Err(format!(
                "expected {} bytes of {format:?} blocks, got {}",
                n * block_bytes,
                bytes.len()
            ));
        }
        let blocks = match format {
            QuantFormat::Q4_1 => Blocks::Q4_1(
                bytes
                    .chunks_exact(20)
                    .map(|b| {
                        let mut qs = [0u8; 16];
                        qs.copy_from_slice(&b[4..20]);
                        BlockQ4_1 {
                            d: f16_at(b, 0),
                            m: f16_at(b, 2),
                            qs,
                        }
                    })
                    .collect(),
            ),
            QuantFormat::Q8_0 => Blocks::Q8_0(
                bytes
                    .chunks_exact(34)
                    .map(|b| {
                        let mut qs = [0i8; 32];
                        for (q, &byte) in qs.iter_mut().zip(&b[2..34]) {
                            *q = byte as i8;
                        }
                        BlockQ8_0 {
                            d: f16_at(b, 0),
                            qs,
                        }
                    })
                    .collect(),
            ),
        };
        Ok(QMatrix { rows, cols, blocks })
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
        match self.blocks {
            Blocks::Q4_1(_) => QuantFormat::Q4_1,
            Blocks::Q8_0(_) => QuantFormat::Q8_0,
        }
    }

    /// A matrix whose row `i` is this matrix's row `source[i]`.
    pub fn gather_rows(&self, source: &[usize]) -> Self {
        let nb = self.cols / BLOCK;
        fn pick<T: Copy>(v: &[T], nb: usize, source: &[usize]) -> Vec<T> {
            source
                .iter()
                .flat_map(|&r| v[r * nb..(r + 1) * nb].iter().copied())
                .collect()
        }
        let blocks = match &self.blocks {
            Blocks::Q4_1(v) => Blocks::Q4_1(pick(v, nb, source)),
            Blocks::Q8_0(v) => Blocks::Q8_0(pick(v, nb, source)),
        };
        QMatrix {
            rows: source.len(),
            cols: self.cols,
            blocks,
        }
    }

    /// Row `r` dequantized exactly (`d·q + m` in f32, as ggml and gguf-py compute it).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let nb = self.cols / BLOCK;
        match &self.blocks {
            Blocks::Q4_1(v) => {
                for (b, o) in v[r * nb..(r + 1) * nb]
                    .iter()
                    .zip(out.chunks_exact_mut(BLOCK))
                {
                    for j in 0..16 {
                        o[j] = f32::from(b.qs[j] & 0x0F) * b.d + b.m;
                        o[j + 16] = f32::from(b.qs[j] >> 4) * b.d + b.m;
                    }
                }
            }
            Blocks::Q8_0(v) => {
                for (b, o) in v[r * nb..(r + 1) * nb]
                    .iter()
                    .zip(out.chunks_exact_mut(BLOCK))
                {
                    for (oj, &q) in o.iter_mut().zip(&b.qs) {
                        *oj = f32::from(q) * b.d;
                    }
                }
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
        debug_assert_eq!(x.len(), t * self.cols);
        let nb = self.cols / BLOCK;
        // Per activation row and block: Σx (the Q4_1 minimum's share), in a fixed order.
        let sums: Vec<f32> = match self.blocks {
            Blocks::Q4_1(_) => x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect(),
            Blocks::Q8_0(_) => Vec::new(),
        };
        let simd = simd_available();
        // Output tiles in parallel; each tile computes all activation rows, `(tile, t)` order.
        let tiles: Vec<Vec<f32>> = (0..self.rows.div_ceil(OUT_TILE))
            .into_par_iter()
            .map(|tile| {
                let o0 = tile * OUT_TILE;
                let o1 = (o0 + OUT_TILE).min(self.rows);
                let mut out = vec![0f32; (o1 - o0) * t];
                for g in (0..t).step_by(ROW_GROUP) {
                    let rows = (t - g).min(ROW_GROUP);
                    for o in o0..o1 {
                        let dst = &mut out[(o - o0) * t + g..(o - o0) * t + g + rows];
                        let xs = &x[g * self.cols..(g + rows) * self.cols];
                        match &self.blocks {
                            Blocks::Q4_1(v) => {
                                let w = &v[o * nb..(o + 1) * nb];
                                let s = &sums[g * nb..(g + rows) * nb];
                                dot_q4_1(simd, w, xs, s, dst);
                            }
                            Blocks::Q8_0(v) => dot_q8_0(simd, &v[o * nb..(o + 1) * nb], xs, dst),
                        }
                    }
                }
                out
            })
            .collect();
        let mut y = vec![0f32; t * self.rows];
        for (tile, out) in tiles.iter().enumerate() {
            let o0 = tile * OUT_TILE;
            for (i, col) in out.chunks_exact(t).enumerate() {
                for (r, &v) in col.iter().enumerate() {
                    y[r * self.rows + o0 + i] = v;
                }
            }
        }
        y
    }
}

#[cfg(target_arch = "x86_64")]
fn simd_available() -> bool {
    use std::sync::OnceLock;
    static SIMD: OnceLock<bool> = OnceLock::new();
    *SIMD.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(not(target_arch = "x86_64"))]
fn simd_available() -> bool {
    false
}

/// One weight row against up to `ROW_GROUP` activation rows (`xs`: rows × cols).
fn dot_q4_1(simd: bool, w: &[BlockQ4_1], xs: &[f32], sums: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        simd_x86::dot_q4_1(w, xs, sums, out);
        return;
    }
    let _ = simd;
    let cols = w.len() * BLOCK;
    for (r, o) in out.iter_mut().enumerate() {
        let x = &xs[r * cols..(r + 1) * cols];
        let s = &sums[r * w.len()..(r + 1) * w.len()];
        let mut acc = 0f32;
        let mut macc = 0f32;
        for (b, blk) in w.iter().enumerate() {
            let xb = &x[b * BLOCK..(b + 1) * BLOCK];
            let mut dot = 0f32;
            for j in 0..16 {
                dot += xb[j] * f32::from(blk.qs[j] & 0x0F) + xb[j + 16] * f32::from(blk.qs[j] >> 4);
            }
            acc += blk.d * dot;
            macc += blk.m * s[b];
        }
        *o = acc + macc;
    }
}

fn dot_q8_0(simd: bool, w: &[BlockQ8_0], xs: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        simd_x86::dot_q8_0(w, xs, out);
        return;
    }
    let _ = simd;
    let cols = w.len() * BLOCK;
    for (r, o) in out.iter_mut().enumerate() {
        let x = &xs[r * cols..(r + 1) * cols];
        let mut acc = 0f32;
        for (b, blk) in w.iter().enumerate() {
            let dot: f32 = x[b * BLOCK..(b + 1) * BLOCK]
                .iter()
                .zip(&blk.qs)
                .map(|(a, &q)| a * f32::from(q))
                .sum();
            acc += blk.d * dot;
        }
        *o = acc;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd_x86 {
    //! AVX2 + FMA kernels. Each activation row runs the identical instruction sequence whether
    //! it is alone in the call or one of several, which is what makes batching invisible.
    use std::arch::x86_64::*;

    use super::{BlockQ4_1, BlockQ8_0, BLOCK};

    /// Horizontal sum in a fixed order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    // The row count is a const parameter so accumulators live in registers; each row runs the
    // same instructions for every R, which keeps results bit-identical across batch sizes.
    pub(super) fn dot_q4_1(w: &[BlockQ4_1], xs: &[f32], sums: &[f32], out: &mut [f32]) {
        // SAFETY: only called after run-time detection of AVX2 and FMA (`simd_available`).
        unsafe {
            match out.len() {
                1 => dot_q4_1_avx2::<1>(w, xs, sums, out),
                2 => dot_q4_1_avx2::<2>(w, xs, sums, out),
                3 => dot_q4_1_avx2::<3>(w, xs, sums, out),
                _ => dot_q4_1_avx2::<4>(w, xs, sums, out),
            }
        }
    }

    pub(super) fn dot_q8_0(w: &[BlockQ8_0], xs: &[f32], out: &mut [f32]) {
        // SAFETY: only called after run-time detection of AVX2 and FMA (`simd_available`).
        unsafe {
            match out.len() {
                1 => dot_q8_0_avx2::<1>(w, xs, out),
                2 => dot_q8_0_avx2::<2>(w, xs, out),
                3 => dot_q8_0_avx2::<3>(w, xs, out),
                _ => dot_q8_0_avx2::<4>(w, xs, out),
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_q4_1_avx2<const R: usize>(
        w: &[BlockQ4_1],
        xs: &[f32],
        sums: &[f32],
        out: &mut [f32],
    ) {
        let rows = R;
        let nb = w.len();
        let cols = nb * BLOCK;
        assert!(out.len() == R && xs.len() >= rows * cols && sums.len() >= rows * nb);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut macc = [0f32; R];
        let mask = _mm_set1_epi8(0x0F);
        for (b, blk) in w.iter().enumerate() {
            // SAFETY: `qs` is 16 bytes; unaligned load.
            let q = unsafe { _mm_loadu_si128(blk.qs.as_ptr().cast()) };
            let lo = _mm_and_si128(q, mask);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
            let q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
            let q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(lo)));
            let q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
            let q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(hi)));
            let d = _mm256_set1_ps(blk.d);
            for r in 0..rows {
                // SAFETY: row r's block b spans xs[r*cols + b*32 .. +32], inside `xs` (asserted).
                unsafe {
                    let p = xs.as_ptr().add(r * cols + b * BLOCK);
                    let mut s = _mm256_mul_ps(_mm256_loadu_ps(p), q0);
                    s = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(8)), q1, s);
                    s = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(16)), q2, s);
                    s = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(24)), q3, s);
                    acc[r] = _mm256_fmadd_ps(d, s, acc[r]);
                }
                macc[r] += blk.m * sums[r * nb + b];
            }
        }
        for ((o, a), m) in out.iter_mut().zip(acc).zip(macc) {
            *o = hsum(a) + m;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_q8_0_avx2<const R: usize>(w: &[BlockQ8_0], xs: &[f32], out: &mut [f32]) {
        let rows = R;
        let cols = w.len() * BLOCK;
        assert!(out.len() == R && xs.len() >= rows * cols);
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, blk) in w.iter().enumerate() {
            let p = blk.qs.as_ptr();
            // SAFETY: `qs` is 32 bytes; four unaligned 8-byte loads inside it.
            let (q0, q1, q2, q3) = unsafe {
                (
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()))),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8).cast()))),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(16).cast()))),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(24).cast()))),
                )
            };
            let d = _mm256_set1_ps(blk.d);
            for (r, a) in acc.iter_mut().enumerate().take(rows) {
                // SAFETY: row r's block b spans xs[r*cols + b*32 .. +32], inside `xs` (asserted).
                unsafe {
                    let x = xs.as_ptr().add(r * cols + b * BLOCK);
                    let mut s = _mm256_mul_ps(_mm256_loadu_ps(x), q0);
                    s = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(8)), q1, s);
                    s = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(16)), q2, s);
                    s = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(24)), q3, s);
                    *a = _mm256_fmadd_ps(d, s, *a);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = hsum(a);
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
            let (rows, cols) = (40, 64);
            let q =
                QMatrix::from_gguf_bytes(format, rows, cols, &random_bytes(format, rows, cols, 9))
                    .expect("valid");
            let x = activations(11, cols);
            let batched = q.matmul(&x, 11);
            for r in 0..11 {
                let alone = q.matmul(&x[r * cols..(r + 1) * cols], 1);
                assert_eq!(
                    alone,
                    batched[r * rows..(r + 1) * rows],
                    "{format:?} row {r}"
                );
            }
        }
    }

    #[test]
    fn scalar_and_simd_paths_agree() {
        let (rows, cols) = (8, 64);
        for format in [QuantFormat::Q4_1, QuantFormat::Q8_0] {
            let q =
                QMatrix::from_gguf_bytes(format, rows, cols, &random_bytes(format, rows, cols, 5))
                    .expect("valid");
            let x = activations(3, cols);
            let nb = cols / BLOCK;
            let sums: Vec<f32> = x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect();
            for o in 0..rows {
                let (mut a, mut b) = ([0f32; 3], [0f32; 3]);
                match &q.blocks {
                    Blocks::Q4_1(v) => {
                        dot_q4_1(false, &v[o * nb..(o + 1) * nb], &x, &sums, &mut a);
                        dot_q4_1(
                            simd_available(),
                            &v[o * nb..(o + 1) * nb],
                            &x,
                            &sums,
                            &mut b,
                        );
                    }
                    Blocks::Q8_0(v) => {
                        dot_q8_0(false, &v[o * nb..(o + 1) * nb], &x, &mut a);
                        dot_q8_0(simd_available(), &v[o * nb..(o + 1) * nb], &x, &mut b);
                    }
                }
                for (p, s) in a.iter().zip(&b) {
                    assert!(
                        (p - s).abs() < 1e-4 * (1.0 + p.abs()),
                        "{format:?}: {p} vs {s}"
                    );
                }
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
