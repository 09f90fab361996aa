//! `QMatrix`: a weight matrix kept in GGUF block quantization (Q4_1, Q8_0, Q5_1, Q3_K, Q4_K,
//! Q5_K, Q6_K; Q4_0 and Q5_0 arrive as Q4_1 and Q8_0 blocks of the same weights), repacked at
//! load into 16-output panels, and its matmul against activations quantized to 8 bits.
//!
//! Arithmetic: llama.cpp's for Q4_1 and Q8_0; the k-quants run the same per-32 arithmetic on
//! their exact sub-block scales. Each activation row is quantized per 32-input block as its
//! Q8_1 (`quantize_row_q8_1`): `d = max|x| / 127`, `q = round(x · 127 / max|x|)` (ties to
//! even), `d` and `s = d·Σq` rounded to f16. Per output `n` and block `b`, the integer dot
//! `Σ qw·qx` is exact; then, blocks in order, `acc = (dw·dx)·isum + acc` (Q6_K and Q3_K: one
//! integer sum and scale per 16 inputs, the first half's step then the second's) and (Q4_1,
//! Q4_K, Q5_1, Q5_K) `acc = mw·sx + acc` — fused multiply-adds. Every
//! path (one row, row tiles, scalar fallback) computes exactly this per output lane, so
//! results are bit-identical alone or batched: batch invariance by construction. AVX2 integer
//! dot products (`vpmaddubsw`) do 32 multiply-adds per instruction, which is what lets many
//! rows (prefill, a batch of decodes) run several times faster than one.
//!
//! Layout: outputs are grouped in panels of 16; per panel and 32-input block the scales (and
//! minimums) sit together, then the quants as one 32-bit word per output per 4 inputs, so one
//! AVX2 load yields 4 inputs × 8 outputs, lanes along outputs. Within each group of 8 inputs
//! the words hold inputs 0, 2, 4, 6 and 1, 3, 5, 7 (how Q4_1 nibbles unpack without shuffles);
//! quantized activations are stored in the same order.

use rayon::prelude::*;

/// Elements per quantization block.
pub const BLOCK: usize = 32;

/// Outputs per panel: two AVX2 vectors.
const PANEL: usize = 16;

/// Values per GGUF k-quant super-block.
pub const SUPER_BLOCK: usize = 256;

/// Block formats with a fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    /// 4-bit with scale and minimum: `w = d·q + m`, q in 0..16.
    Q4_1,
    /// 8-bit with scale: `w = d·q`, q in -128..128.
    Q8_0,
    /// GGUF Q4_K: super-blocks of 256 whose 32-value sub-blocks are `w = (d·sc)·q − dmin·mn`
    /// (6-bit `sc`, `mn`; q in 0..16). Kept as 4-bit panels with each sub-block's scale and
    /// minimum as exact f32s: the Q4_1 arithmetic.
    Q4K,
    /// GGUF Q6_K: super-blocks of 256 whose 16-value sub-blocks are `w = (d·sc)·(q − 32)`
    /// (8-bit `sc`, 6-bit q). Kept as 8-bit panels of `q − 32` with each sub-block's scale as
    /// an exact f32: two scales per 32-input block.
    Q6K,
    /// GGUF Q5_1: `w = d·q + m`, 5-bit q. Kept as 8-bit panels with the scale and minimum as
    /// f32s (exact widenings).
    Q5_1,
    /// GGUF Q5_K: super-blocks of 256 whose 32-value sub-blocks are `w = (d·sc)·q − dmin·mn`
    /// (5-bit q). Kept as Q5_1's panels, with each sub-block's scale and minimum.
    Q5K,
    /// GGUF Q3_K: super-blocks of 256 whose 16-value sub-blocks are `w = (d·(sc − 32))·q`
    /// (6-bit `sc`, q in −4..4). Kept as Q6_K's panels.
    Q3K,
    /// llama.cpp's IQ4_NL: 32-value blocks `w = d·T[q]`, 4-bit q indexing the fixed
    /// non-linear table `T` (ggml's `kvalues_iq4nl`, −127..113). Kept as Q8_0's panels of `T[q]` with
    /// the block's f16 scale: the same weights exactly.
    IQ4NL,
    /// llama.cpp's IQ4_XS: super-blocks of 256 whose 32-value sub-blocks are
    /// `w = (d·(sc − 32))·T[q]` (6-bit `sc`, IQ4_NL's table). Kept as 8-bit panels of `T[q]`
    /// with each sub-block's scale as an exact f32 (an f16 times a small integer).
    IQ4XS,
}

/// IQ4_NL's and IQ4_XS's 16 quant values (ggml's `kvalues_iq4nl`).
const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

impl QuantFormat {
    /// ggml's name of the format (`"Q4_K"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q4_1 => "Q4_1",
            QuantFormat::Q8_0 => "Q8_0",
            QuantFormat::Q4K => "Q4_K",
            QuantFormat::Q6K => "Q6_K",
            QuantFormat::Q5_1 => "Q5_1",
            QuantFormat::Q5K => "Q5_K",
            QuantFormat::Q3K => "Q3_K",
            QuantFormat::IQ4NL => "IQ4_NL",
            QuantFormat::IQ4XS => "IQ4_XS",
        }
    }

    /// One GGUF block: `(values, bytes)`.
    pub(crate) fn gguf_block(self) -> (usize, usize) {
        match self {
            QuantFormat::Q4_1 => (BLOCK, 20),
            QuantFormat::Q8_0 => (BLOCK, 34),
            QuantFormat::Q4K => (SUPER_BLOCK, 144),
            QuantFormat::Q6K => (SUPER_BLOCK, 210),
            QuantFormat::Q5_1 => (BLOCK, 24),
            QuantFormat::Q5K => (SUPER_BLOCK, 176),
            QuantFormat::Q3K => (SUPER_BLOCK, 110),
            QuantFormat::IQ4NL => (BLOCK, 18),
            QuantFormat::IQ4XS => (SUPER_BLOCK, 136),
        }
    }
}

/// 16 outputs × 32 inputs of Q4_1. On a cache line (320 bytes: five lines), so that no
/// vector load of its quants straddles two.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct PanelQ4_1 {
    /// f16 bits of each output's scale.
    d: [u16; PANEL],
    /// f16 bits of each output's minimum.
    m: [u16; PANEL],
    /// `qs[2·g + h][i]`: the quants of output `8h + i` for inputs `8g..8g+8`, input `8g + j` in
    /// bits `4j..4j+4` — one AVX2 load holds 8 inputs × 8 outputs, unpacked without shuffles.
    qs: [[u32; 8]; 8],
}

/// 16 outputs × 32 inputs of Q8_0. On a 32-byte boundary (544 bytes), so that no vector
/// load of its quants straddles two cache lines.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
struct PanelQ8_0 {
    /// f16 bits of each output's scale.
    d: [u16; PANEL],
    /// `qs[2·g + a][i][j]`: output `i`'s quant of input `8g + 2j + a` (see the module doc).
    qs: [[[i8; 4]; PANEL]; 8],
}

/// 16 outputs × 32 inputs of Q4_K: [`PanelQ4_1`] with f32 scales and minimums (384 bytes,
/// six cache lines).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct PanelQ4K {
    /// Each output's sub-block scale `d·sc`.
    d: [f32; PANEL],
    /// Each output's sub-block minimum `−dmin·mn`.
    m: [f32; PANEL],
    /// As [`PanelQ4_1::qs`].
    qs: [[u32; 8]; 8],
}

/// 16 outputs × 32 inputs of Q6_K (`q − 32`) or Q3_K (its signed 3-bit quants): [`PanelQ8_0`]'s
/// layout of the quants with two f32 scales per output, inputs 0..16 and 16..32 (640 bytes,
/// ten cache lines).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct PanelQ6K {
    /// `d[s][i]`: output `i`'s scale `d·sc` of the block's inputs `16s..16s+16`.
    d: [[f32; PANEL]; 2],
    /// As [`PanelQ8_0::qs`].
    qs: [[[i8; 4]; PANEL]; 8],
}

/// 16 outputs × 32 inputs of Q5_1 or Q5_K: [`PanelQ8_0`]'s layout of the quants (0..32) with
/// f32 scales and minimums (640 bytes, ten cache lines).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct PanelQ5 {
    /// Each output's (sub-)block scale.
    d: [f32; PANEL],
    /// Each output's (sub-)block minimum.
    m: [f32; PANEL],
    /// As [`PanelQ8_0::qs`].
    qs: [[[i8; 4]; PANEL]; 8],
}

const EMPTY_Q5: PanelQ5 = PanelQ5 {
    d: [0.0; PANEL],
    m: [0.0; PANEL],
    qs: [[[0; 4]; PANEL]; 8],
};
const EMPTY_Q4K: PanelQ4K = PanelQ4K {
    d: [0.0; PANEL],
    m: [0.0; PANEL],
    qs: [[0; 8]; 8],
};
const EMPTY_Q6K: PanelQ6K = PanelQ6K {
    d: [[0.0; PANEL]; 2],
    qs: [[[0; 4]; PANEL]; 8],
};
/// 16 outputs × 32 inputs of 8-bit quants with f32 scales (IQ4_XS): [`PanelQ8_0`]'s layout.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct PanelQ8F {
    /// Each output's scale.
    d: [f32; PANEL],
    /// As [`PanelQ8_0::qs`].
    qs: [[[i8; 4]; PANEL]; 8],
}

const EMPTY_Q4_1: PanelQ4_1 = PanelQ4_1 {
    d: [0; PANEL],
    m: [0; PANEL],
    qs: [[0; 8]; 8],
};
const EMPTY_Q8_0: PanelQ8_0 = PanelQ8_0 {
    d: [0; PANEL],
    qs: [[[0; 4]; PANEL]; 8],
};
const EMPTY_Q8F: PanelQ8F = PanelQ8F {
    d: [0.0; PANEL],
    qs: [[[0; 4]; PANEL]; 8],
};

/// Panel-major blocks: panel `p`, block `b` at `p * nb + b`.
#[derive(Debug, Clone)]
enum Panels {
    Q4_1(Vec<PanelQ4_1>),
    Q8_0(Vec<PanelQ8_0>),
    Q8F(Vec<PanelQ8F>),
    Q4K(Vec<PanelQ4K>),
    Q6K(Vec<PanelQ6K>),
    Q5(Vec<PanelQ5>),
}

/// A `(rows, cols)` quantized matrix (rows = output features), panel-packed.
#[derive(Debug, Clone)]
pub struct QMatrix {
    rows: usize,
    cols: usize,
    /// The GGUF format the blocks came in (Q5_1 and Q5_K share a panel kind).
    format: QuantFormat,
    panels: Panels,
}

fn f16_bits(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// Quant of output `i`, input `k` of a 4-bit panel block's quants.
fn q4_at(qs: &[[u32; 8]; 8], i: usize, k: usize) -> u32 {
    (qs[(k / 8) * 2 + i / 8][i % 8] >> (4 * (k % 8))) & 0xF
}

/// Sets output `i`'s quant of input `k` (0..16) in a 4-bit panel block's quants.
fn set_q4(qs: &mut [[u32; 8]; 8], i: usize, k: usize, q: i16) {
    let word = &mut qs[(k / 8) * 2 + i / 8][i % 8];
    let shift = 4 * (k % 8);
    *word = (*word & !(0xF << shift)) | (((q as u32) & 0xF) << shift);
}

/// Where input `k` of a block sits among the Q8_0 words: `(word, byte)`.
fn q8_slot(k: usize) -> (usize, usize) {
    ((k / 8) * 2 + k % 2, (k % 8) / 2)
}

/// One output row's block in plain form: the scales of inputs 0..16 and 16..32 (the same but
/// for Q6_K and Q3_K), the minimum (0 without one), quants. f16 scales widened exactly.
#[derive(Clone, Copy)]
struct RowBlock {
    d: [f32; 2],
    m: f32,
    q: [i16; BLOCK],
}

impl Panels {
    /// A minimum per block (`acc += m·Σx` after the products): Q4_1, Q4_K, Q5_1 and Q5_K.
    fn has_min(&self) -> bool {
        !matches!(self, Panels::Q8_0(_) | Panels::Q8F(_) | Panels::Q6K(_))
    }

    /// Output `i`'s block of panel block `at`.
    fn row_block(&self, at: usize, i: usize) -> RowBlock {
        let mut q = [0i16; BLOCK];
        let q8 = |q: &mut [i16; BLOCK], qs: &[[[i8; 4]; PANEL]; 8]| {
            for (k, qk) in q.iter_mut().enumerate() {
                let (w, j) = q8_slot(k);
                *qk = i16::from(qs[w][i][j]);
            }
        };
        let q4 = |q: &mut [i16; BLOCK], qs: &[[u32; 8]; 8]| {
            for (k, qk) in q.iter_mut().enumerate() {
                *qk = q4_at(qs, i, k) as i16;
            }
        };
        match self {
            Panels::Q4_1(v) => {
                q4(&mut q, &v[at].qs);
                let d = f16_to_f32(v[at].d[i]);
                RowBlock {
                    d: [d; 2],
                    m: f16_to_f32(v[at].m[i]),
                    q,
                }
            }
            Panels::Q8_0(v) => {
                q8(&mut q, &v[at].qs);
                let d = f16_to_f32(v[at].d[i]);
                RowBlock {
                    d: [d; 2],
                    m: 0.0,
                    q,
                }
            }
            Panels::Q8F(v) => {
                q8(&mut q, &v[at].qs);
                RowBlock {
                    d: [v[at].d[i]; 2],
                    m: 0.0,
                    q,
                }
            }
            Panels::Q4K(v) => {
                q4(&mut q, &v[at].qs);
                RowBlock {
                    d: [v[at].d[i]; 2],
                    m: v[at].m[i],
                    q,
                }
            }
            Panels::Q6K(v) => {
                q8(&mut q, &v[at].qs);
                RowBlock {
                    d: [v[at].d[0][i], v[at].d[1][i]],
                    m: 0.0,
                    q,
                }
            }
            Panels::Q5(v) => {
                q8(&mut q, &v[at].qs);
                RowBlock {
                    d: [v[at].d[i]; 2],
                    m: v[at].m[i],
                    q,
                }
            }
        }
    }

    /// Sets output `i`'s block of panel block `at` (f16 formats: scales that are f16 values).
    fn set_row_block(&mut self, at: usize, i: usize, block: &RowBlock) {
        let f16 = |x: f32| half::f16::from_f32(x).to_bits();
        let q8 = |qs: &mut [[[i8; 4]; PANEL]; 8]| {
            for (k, &qk) in block.q.iter().enumerate() {
                let (w, j) = q8_slot(k);
                qs[w][i][j] = qk as i8;
            }
        };
        // 4-bit quants are 0..16 by construction (parsed from nibbles).
        let q4 = |qs: &mut [[u32; 8]; 8]| {
            for (k, &qk) in block.q.iter().enumerate() {
                set_q4(qs, i, k, qk);
            }
        };
        match self {
            Panels::Q4_1(v) => {
                let blk = &mut v[at];
                (blk.d[i], blk.m[i]) = (f16(block.d[0]), f16(block.m));
                q4(&mut blk.qs);
            }
            Panels::Q8_0(v) => {
                v[at].d[i] = f16(block.d[0]);
                q8(&mut v[at].qs);
            }
            Panels::Q8F(v) => {
                v[at].d[i] = block.d[0];
                q8(&mut v[at].qs);
            }
            Panels::Q4K(v) => {
                let blk = &mut v[at];
                (blk.d[i], blk.m[i]) = (block.d[0], block.m);
                q4(&mut blk.qs);
            }
            Panels::Q6K(v) => {
                let blk = &mut v[at];
                (blk.d[0][i], blk.d[1][i]) = (block.d[0], block.d[1]);
                q8(&mut blk.qs);
            }
            Panels::Q5(v) => {
                let blk = &mut v[at];
                (blk.d[i], blk.m[i]) = (block.d[0], block.m);
                q8(&mut blk.qs);
            }
        }
    }
}

/// Rows whose quantized activations stay in L2 while every panel passes over them.
const ROW_BLOCK: usize = 64;
/// Row tiles of a panel from which its Q4_1 quants are unpacked once for all of them
/// (`unpack_panel`). Measured with two threads, alternating: matmul time of a 16-row decode
/// step (4 tiles) 13.0–15.6 → 12.1–13.4 ms and of the 76-row warm autocomplete step (tasks of
/// 19 rows: 5 tiles) 51.7–55.6 → 50.4–51.8 ms without it (three pairs each); 32-row tasks (8
/// tiles) faster without in 5 of 6 kernel-bench pairs; 512-row prefill (64-row blocks: 16
/// tiles) the same either way.
const PRE_MIN_TILES: usize = 9;

/// GGUF Q4_0 blocks (`w = d·(q − 8)`: an f16 scale, 16 bytes of nibbles) as Q4_1 blocks
/// (`w = d·q + m`) with the same scale and nibbles and `m = −8d`, exact in f16 — so every
/// weight is the same number, served by the Q4_1 kernels. `Err` for a ragged length or a
/// scale too large for `−8d` to be an f16.
pub fn q4_0_as_q4_1(bytes: &[u8]) -> Result<Vec<u8>, String> {
    if !bytes.len().is_multiple_of(18) {
        return Err(format!("{} bytes are not whole Q4_0 blocks", bytes.len()));
    }
    let mut out = Vec::with_capacity(bytes.len() / 18 * 20);
    for b in bytes.chunks_exact(18) {
        let d = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
        let m = half::f16::from_f32(-8.0 * d);
        if m.to_f32() != -8.0 * d {
            return Err(format!("a Q4_0 scale of {d} has no Q4_1 minimum"));
        }
        out.extend_from_slice(&b[..2]);
        out.extend_from_slice(&m.to_bits().to_le_bytes());
        out.extend_from_slice(&b[2..]);
    }
    Ok(out)
}

/// GGUF Q5_0 blocks (`w = d·(q − 16)`, q of 5 bits) as Q8_0 blocks of the same weights: the
/// scale kept, `q − 16` as a byte. `Err` for a ragged length.
pub fn q5_0_as_q8_0(bytes: &[u8]) -> Result<Vec<u8>, String> {
    if !bytes.len().is_multiple_of(22) {
        return Err(format!("{} bytes are not whole Q5_0 blocks", bytes.len()));
    }
    let mut out = Vec::with_capacity(bytes.len() / 22 * 34);
    for b in bytes.chunks_exact(22) {
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        out.extend_from_slice(&b[..2]);
        let q = |j: usize, nibble: u8| ((nibble | (((qh >> j) & 1) as u8) << 4) as i8 - 16) as u8;
        out.extend((0..16).map(|j| q(j, b[6 + j] & 0x0F)));
        out.extend((0..16).map(|j| q(j + 16, b[6 + j] >> 4)));
    }
    Ok(out)
}

/// The index of the [`IQ4_VALUES`] entry nearest `x` (ggml's `best_index_int8`).
fn iq4_index(x: f32) -> u8 {
    let v = |i: usize| f32::from(IQ4_VALUES[i]);
    if x <= v(0) {
        return 0;
    }
    if x >= v(15) {
        return 15;
    }
    let (mut lo, mut hi) = (0, 15);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if x < v(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    (if x - v(hi - 1) < v(hi) - x {
        hi - 1
    } else {
        hi
    }) as u8
}

/// GGUF bytes of `x` (whole blocks of `format`, IQ4_NL or IQ4_XS) as llama.cpp quantizes
/// them without an importance matrix (`quantize_row_iq4_nl_impl`, 7 tries each side): per
/// 32 values, the table indices nearest `x·127/max` and then `x·(k − 127)/max` for
/// `k = −7..7` (`max`: the value of largest magnitude) each give a least-squares scale (each
/// value weighted by its square); the best fit wins. IQ4_XS then rounds the eight sub-block
/// scales to 6-bit multiples of one f16 `d` and picks the indices again. `None` for other
/// formats or lengths.
pub fn quantize_iq4(format: QuantFormat, x: &[f32]) -> Option<Vec<u8>> {
    let values = format.gguf_block().0;
    if !matches!(format, QuantFormat::IQ4NL | QuantFormat::IQ4XS) || !x.len().is_multiple_of(values)
    {
        return None;
    }
    use rayon::prelude::*;
    let blocks: Vec<Vec<u8>> = x
        .par_chunks_exact(values)
        .map(|sb| iq4_block(format, sb))
        .collect();
    Some(blocks.concat())
}

/// One GGUF block of [`quantize_iq4`].
fn iq4_block(format: QuantFormat, sb: &[f32]) -> Vec<u8> {
    let t0 = f32::from(IQ4_VALUES[0]);
    let (values, bytes) = format.gguf_block();
    let mut out = Vec::with_capacity(bytes);
    let mut scales = [0f32; SUPER_BLOCK / BLOCK];
    let mut idx = [0u8; SUPER_BLOCK];
    for (ib, xb) in sb.chunks_exact(BLOCK).enumerate() {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xb {
            if v.abs() > amax {
                (amax, max) = (v.abs(), v);
            }
        }
        if amax < 1e-15 {
            continue;
        }
        // Σw·q·x and Σw·q² (w = x²) of the indices nearest x·id.
        let fit = |id: f32| {
            let (mut qx, mut q2) = (0f32, 0f32);
            for &v in xb {
                let q = f32::from(IQ4_VALUES[usize::from(iq4_index(id * v))]);
                let w = v * v;
                qx += w * q * v;
                q2 += w * q * q;
            }
            (qx, q2)
        };
        // ggml's first guess: the largest magnitude onto the table's positive side.
        let (qx, q2) = fit(-t0 / max);
        let mut d = qx / q2;
        let mut best = d * qx;
        for k in -7i32..=7 {
            let id = (k as f32 + t0) / max;
            let (qx, q2) = fit(id);
            if q2 > 0.0 && qx * qx > best * q2 {
                d = qx / q2;
                best = d * qx;
            }
        }
        scales[ib] = d;
    }
    let n = values / BLOCK;
    if n == 1 {
        let d = scales[0];
        out.extend(half::f16::from_f32(d).to_le_bytes());
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (j, &v) in sb.iter().enumerate() {
            idx[j] = iq4_index(id * v);
        }
    } else {
        let max_scale = scales[..n]
            .iter()
            .fold(0f32, |m, &s| if s.abs() > m.abs() { s } else { m });
        let d = -max_scale / 32.0;
        out.extend(half::f16::from_f32(d).to_le_bytes());
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let (mut high, mut low) = (0u16, [0u8; 4]);
        for ib in 0..n {
            let l = ((id * scales[ib]).round_ties_even() as i32).clamp(-32, 31);
            let dl = d * l as f32;
            let idl = if dl != 0.0 { 1.0 / dl } else { 0.0 };
            for j in 0..BLOCK {
                idx[ib * BLOCK + j] = iq4_index(idl * sb[ib * BLOCK + j]);
            }
            let l = (l + 32) as u8;
            low[ib / 2] |= (l & 0x0F) << (4 * (ib % 2));
            high |= u16::from(l >> 4) << (2 * ib);
        }
        out.extend(high.to_le_bytes());
        out.extend(low);
    }
    for i in 0..n {
        out.extend((0..16).map(|j| idx[32 * i + j] | (idx[32 * i + 16 + j] << 4)));
    }
    out
}

/// ggml's 6-bit scale and minimum `j` of a Q4_K super-block's 12 scale bytes.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// One GGUF block of `format` as its 32-value blocks, each passed to `emit` with its index
/// in the block (one for Q4_1 and Q8_0, eight for the k-quants' super-blocks; nothing is
/// allocated per block). `b` holds exactly one block.
fn gguf_row_blocks(format: QuantFormat, b: &[u8], mut emit: impl FnMut(usize, &RowBlock)) {
    let f16 = |at: usize| f16_to_f32(f16_bits(b, at));
    let mut q = [0i16; BLOCK];
    match format {
        QuantFormat::Q4_1 => {
            for j in 0..16 {
                q[j] = i16::from(b[4 + j] & 0x0F);
                q[j + 16] = i16::from(b[4 + j] >> 4);
            }
            emit(
                0,
                &RowBlock {
                    d: [f16(0); 2],
                    m: f16(2),
                    q,
                },
            );
        }
        QuantFormat::Q8_0 => {
            for (qj, &byte) in q.iter_mut().zip(&b[2..34]) {
                *qj = i16::from(byte as i8);
            }
            emit(
                0,
                &RowBlock {
                    d: [f16(0); 2],
                    m: 0.0,
                    q,
                },
            );
        }
        QuantFormat::Q4K => {
            // d, dmin, 12 scale bytes, then 4 × 32 bytes: each the low nibbles of one
            // sub-block and the high nibbles of the next.
            let (d, dmin) = (f16(0), f16(2));
            let (scales, qs) = (&b[4..16], &b[16..144]);
            for s in 0..8 {
                let (sc, mn) = scale_min_k4(s, scales);
                let bytes = &qs[(s / 2) * 32..(s / 2) * 32 + 32];
                let mut q = [0i16; BLOCK];
                for (qk, &byte) in q.iter_mut().zip(bytes) {
                    *qk = i16::from(if s % 2 == 0 { byte & 0x0F } else { byte >> 4 });
                }
                emit(
                    s,
                    &RowBlock {
                        d: [d * f32::from(sc); 2],
                        m: -(dmin * f32::from(mn)),
                        q,
                    },
                );
            }
        }
        QuantFormat::Q5_1 => {
            // d, m, 32 high bits, 16 bytes of nibbles (inputs j and j + 16).
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            for j in 0..16 {
                let high = |k: usize| (((qh >> k) & 1) as i16) << 4;
                q[j] = i16::from(b[8 + j] & 0x0F) | high(j);
                q[j + 16] = i16::from(b[8 + j] >> 4) | high(j + 16);
            }
            emit(
                0,
                &RowBlock {
                    d: [f16(0); 2],
                    m: f16(2),
                    q,
                },
            );
        }
        QuantFormat::Q5K => {
            // Q4_K's d, dmin and scales, then 32 bytes of high bits (bit s of byte l: value
            // l of sub-block s), then Q4_K's nibbles.
            let (d, dmin) = (f16(0), f16(2));
            let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
            for s in 0..8 {
                let (sc, mn) = scale_min_k4(s, scales);
                let bytes = &qs[(s / 2) * 32..(s / 2) * 32 + 32];
                let mut q = [0i16; BLOCK];
                for (l, (qk, &byte)) in q.iter_mut().zip(bytes).enumerate() {
                    let low = if s % 2 == 0 { byte & 0x0F } else { byte >> 4 };
                    *qk = i16::from(low | (((qh[l] >> s) & 1) << 4));
                }
                emit(
                    s,
                    &RowBlock {
                        d: [d * f32::from(sc); 2],
                        m: -(dmin * f32::from(mn)),
                        q,
                    },
                );
            }
        }
        QuantFormat::IQ4NL => {
            // d, then 16 bytes: table indices of values j (low nibble) and j + 16 (high).
            for j in 0..16 {
                q[j] = i16::from(IQ4_VALUES[usize::from(b[2 + j] & 0x0F)]);
                q[j + 16] = i16::from(IQ4_VALUES[usize::from(b[2 + j] >> 4)]);
            }
            emit(
                0,
                &RowBlock {
                    d: [f16(0); 2],
                    m: 0.0,
                    q,
                },
            );
        }
        QuantFormat::IQ4XS => {
            // d, 16 bits of scales' high pairs, 4 bytes of their low nibbles, then IQ4_NL's
            // 16 index bytes per sub-block.
            let d = f16(0);
            let high = u16::from_le_bytes([b[2], b[3]]);
            let (low, qs) = (&b[4..8], &b[8..136]);
            for s in 0..8 {
                let sc =
                    ((low[s / 2] >> (4 * (s % 2))) & 0x0F) | ((((high >> (2 * s)) & 3) as u8) << 4);
                let bytes = &qs[16 * s..16 * s + 16];
                let mut q = [0i16; BLOCK];
                for (j, &byte) in bytes.iter().enumerate() {
                    q[j] = i16::from(IQ4_VALUES[usize::from(byte & 0x0F)]);
                    q[j + 16] = i16::from(IQ4_VALUES[usize::from(byte >> 4)]);
                }
                emit(
                    s,
                    &RowBlock {
                        d: [d * (f32::from(sc) - 32.0); 2],
                        m: 0.0,
                        q,
                    },
                );
            }
        }
        QuantFormat::Q3K => {
            // 32 bytes of high bits, 64 of 2-bit pairs, 12 of packed 6-bit scales, d. Value
            // `32g + k` (g < 8, k < 32): bits 2(g % 4).. of qs[32(g / 4) + k], minus 4 unless
            // bit g of hmask[k] is set; its scale is the 16-value one, 2g + k / 16.
            let (hmask, qs, packed, d) = (&b[..32], &b[32..96], &b[96..108], f16(108));
            let word = |k: usize| {
                u32::from_le_bytes([
                    packed[4 * k],
                    packed[4 * k + 1],
                    packed[4 * k + 2],
                    packed[4 * k + 3],
                ])
            };
            let (a0, a1, t) = (word(0), word(1), word(2));
            let (low, high) = (0x0f0f_0f0fu32, 0x0303_0303u32);
            let aux = [
                (a0 & low) | ((t & high) << 4),
                (a1 & low) | (((t >> 2) & high) << 4),
                ((a0 >> 4) & low) | (((t >> 4) & high) << 4),
                ((a1 >> 4) & low) | (((t >> 6) & high) << 4),
            ];
            let scale = |s: usize| d * (f32::from(aux[s / 4].to_le_bytes()[s % 4] as i8) - 32.0);
            for g in 0..8 {
                let mut q = [0i16; BLOCK];
                for (k, qk) in q.iter_mut().enumerate() {
                    let two = (qs[32 * (g / 4) + k] >> (2 * (g % 4))) & 3;
                    let minus = if hmask[k] & (1 << g) == 0 { 4 } else { 0 };
                    *qk = i16::from(two) - minus;
                }
                emit(
                    g,
                    &RowBlock {
                        d: [scale(2 * g), scale(2 * g + 1)],
                        m: 0.0,
                        q,
                    },
                );
            }
        }
        QuantFormat::Q6K => {
            // 128 bytes of low nibbles, 64 of high bit pairs, 16 scales, d. Value
            // `128n + 32k + l` (k < 4, l < 32): low nibble of ql[64n + l + 32(k % 2)] (high
            // nibble for k ≥ 2), bits 2k.. of qh[32n + l]; its scale is the 16-value one.
            let (ql, qh, sc, d) = (&b[..128], &b[128..192], &b[192..208], f16(208));
            let mut all = [0i16; SUPER_BLOCK];
            for (e, qe) in all.iter_mut().enumerate() {
                let (n, k, l) = (e / 128, (e % 128) / 32, e % 32);
                let low = ql[64 * n + l + 32 * (k % 2)];
                let low = if k < 2 { low & 0x0F } else { low >> 4 };
                let high = (qh[32 * n + l] >> (2 * k)) & 3;
                *qe = i16::from(low | (high << 4)) - 32;
            }
            for s in 0..8 {
                let mut q = [0i16; BLOCK];
                q.copy_from_slice(&all[s * BLOCK..(s + 1) * BLOCK]);
                emit(
                    s,
                    &RowBlock {
                        d: [
                            d * f32::from(sc[2 * s] as i8),
                            d * f32::from(sc[2 * s + 1] as i8),
                        ],
                        m: 0.0,
                        q,
                    },
                );
            }
        }
    }
}

impl QMatrix {
    /// Parses GGUF block bytes of a `(rows, cols)` matrix.
    pub fn from_gguf_bytes(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self, String> {
        let (block_values, block_bytes) = format.gguf_block();
        if !cols.is_multiple_of(block_values) {
            return Err(format!(
                "{cols} columns are not a multiple of {format:?}'s {block_values}"
            ));
        }
        let nb = cols / BLOCK;
        if bytes.len() != rows * cols / block_values * block_bytes {
            return Err(format!(
                "expected {} bytes of {format:?} blocks, got {}",
                rows * cols / block_values * block_bytes,
                bytes.len()
            ));
        }
        let mut m = QMatrix::empty(format, rows, cols);
        // Each GGUF block's 32-value blocks, in order along the row.
        let per = block_values / BLOCK;
        for (i, b) in bytes.chunks_exact(block_bytes).enumerate() {
            gguf_row_blocks(format, b, |s, block| {
                let at = i * per + s;
                m.set_block(at / nb, at % nb, block);
            });
        }
        Ok(m)
    }

    fn empty(format: QuantFormat, rows: usize, cols: usize) -> Self {
        let n = rows.div_ceil(PANEL) * (cols / BLOCK);
        let panels = match format {
            QuantFormat::Q4_1 => Panels::Q4_1(vec![EMPTY_Q4_1; n]),
            QuantFormat::Q8_0 | QuantFormat::IQ4NL => Panels::Q8_0(vec![EMPTY_Q8_0; n]),
            QuantFormat::IQ4XS => Panels::Q8F(vec![EMPTY_Q8F; n]),
            QuantFormat::Q4K => Panels::Q4K(vec![EMPTY_Q4K; n]),
            QuantFormat::Q6K | QuantFormat::Q3K => Panels::Q6K(vec![EMPTY_Q6K; n]),
            QuantFormat::Q5_1 | QuantFormat::Q5K => Panels::Q5(vec![EMPTY_Q5; n]),
        };
        QMatrix {
            rows,
            cols,
            format,
            panels,
        }
    }

    fn block(&self, row: usize, b: usize) -> RowBlock {
        let nb = self.cols / BLOCK;
        self.panels.row_block((row / PANEL) * nb + b, row % PANEL)
    }

    fn set_block(&mut self, row: usize, b: usize, block: &RowBlock) {
        let nb = self.cols / BLOCK;
        self.panels
            .set_row_block((row / PANEL) * nb + b, row % PANEL, block);
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
        self.format
    }

    /// Bytes held by the packed weights.
    pub fn bytes(&self) -> usize {
        match &self.panels {
            Panels::Q4_1(v) => std::mem::size_of_val(v.as_slice()),
            Panels::Q8_0(v) => std::mem::size_of_val(v.as_slice()),
            Panels::Q8F(v) => std::mem::size_of_val(v.as_slice()),
            Panels::Q4K(v) => std::mem::size_of_val(v.as_slice()),
            Panels::Q6K(v) => std::mem::size_of_val(v.as_slice()),
            Panels::Q5(v) => std::mem::size_of_val(v.as_slice()),
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
        // The parts' panels one after another (all of the first part's kind, checked above).
        macro_rules! concat {
            ($kind:ident) => {
                Panels::$kind(
                    parts
                        .iter()
                        .flat_map(|p| match &p.panels {
                            Panels::$kind(v) => v.clone(),
                            _ => Vec::new(),
                        })
                        .collect(),
                )
            };
        }
        let panels = match format {
            QuantFormat::Q4_1 => concat!(Q4_1),
            QuantFormat::Q8_0 | QuantFormat::IQ4NL => concat!(Q8_0),
            QuantFormat::IQ4XS => concat!(Q8F),
            QuantFormat::Q4K => concat!(Q4K),
            QuantFormat::Q6K | QuantFormat::Q3K => concat!(Q6K),
            QuantFormat::Q5_1 | QuantFormat::Q5K => concat!(Q5),
        };
        Some(QMatrix {
            rows,
            cols,
            format,
            panels,
        })
    }

    /// Quantizes f32 `(rows, cols)` row-major to Q8_0 as llama.cpp's `quantize_row_q8_0` does
    /// (`d = max|x| / 127` rounded to f16, `q = round(x / d)`); `None` unless `cols` is a
    /// multiple of 32.
    pub fn quantize_q8_0(x: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) || x.len() != rows * cols {
            return None;
        }
        let mut bytes = Vec::with_capacity(x.len() / BLOCK * 34);
        for xb in x.chunks_exact(BLOCK) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            bytes.extend(half::f16::from_f32(d).to_le_bytes());
            bytes.extend(xb.iter().map(|v| (v * id).round() as i8 as u8));
        }
        QMatrix::from_gguf_bytes(QuantFormat::Q8_0, rows, cols, &bytes).ok()
    }

    /// `Wᵀ` as Q8_0 (blocks along this matrix's rows), for products `g · W` — the input
    /// gradient of `x · Wᵀ`. `None` unless the row count is a multiple of 32.
    pub fn transposed_q8_0(&self) -> Option<Self> {
        let (rows, cols) = (self.rows, self.cols);
        let w = self.dequantize();
        let mut t = vec![0f32; rows * cols];
        for (r, row) in w.chunks_exact(cols).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                t[c * rows + r] = v;
            }
        }
        QMatrix::quantize_q8_0(&t, cols, rows)
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
        let with_min = self.panels.has_min();
        for (b, o) in out.chunks_exact_mut(BLOCK).enumerate() {
            let blk = self.block(r, b);
            for (k, (oj, &q)) in o.iter_mut().zip(&blk.q).enumerate() {
                let w = f32::from(q) * blk.d[k / 16];
                *oj = if with_min { w + blk.m } else { w };
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
        if let Some(mut parts) = self.matmul_parts(x, t, &[self.rows]) {
            return parts.pop().unwrap_or_default();
        }
        // Rows not a whole number of panels: each task fills a padded buffer, then copied.
        let np = self.rows.div_ceil(PANEL);
        let acts = QuantizedActs::new(x, self.cols);
        let job = acts.job(&self.panels, 0, t);
        let groups: Vec<(usize, Vec<f32>)> = (0..np)
            .into_par_iter()
            .map(|p| {
                let mut out = vec![0f32; t * PANEL];
                job.run(p, p + 1, &mut out);
                (p, out)
            })
            .collect();
        let mut y = vec![0f32; t * self.rows];
        for (p, out) in &groups {
            let c0 = p * PANEL;
            let keep = PANEL.min(self.rows - c0);
            for r in 0..t {
                y[r * self.rows + c0..r * self.rows + c0 + keep]
                    .copy_from_slice(&out[r * PANEL..r * PANEL + keep]);
            }
        }
        y
    }

    /// `x · Wᵀ` split by output columns into consecutive parts of the given widths (the
    /// projections of a stacked matrix), each `(t, width)` row-major, written in place by the
    /// kernels: no full-width buffer, no split copy. `None` unless the widths are whole panels
    /// (multiples of 16) summing to the rows.
    pub fn matmul_parts(&self, x: &[f32], t: usize, widths: &[usize]) -> Option<Vec<Vec<f32>>> {
        assert_eq!(x.len(), t * self.cols, "activation size");
        let whole = widths.iter().all(|w| w.is_multiple_of(PANEL));
        if !whole || widths.iter().sum::<usize>() != self.rows {
            return None;
        }
        let mut at = 0;
        let parts: Vec<(&Panels, usize, usize)> = widths
            .iter()
            .map(|&w| {
                at += w / PANEL;
                (&self.panels, at - w / PANEL, w)
            })
            .collect();
        Some(matmul_into(&QuantizedActs::new(x, self.cols), t, &parts))
    }

    /// `x · Wᵢᵀ` for several matrices of the same input (projections that cannot be stacked,
    /// their formats differing): one activation quantization and one parallel loop for all,
    /// each `(t, rows_i)` row-major. `None` unless every matrix has `x`'s columns and whole
    /// panels.
    pub fn matmul_many(parts: &[&QMatrix], x: &[f32], t: usize) -> Option<Vec<Vec<f32>>> {
        let cols = parts.first()?.cols;
        let fits = parts
            .iter()
            .all(|p| p.cols == cols && p.rows.is_multiple_of(PANEL));
        if !fits || x.len() != t * cols {
            return None;
        }
        let parts: Vec<(&Panels, usize, usize)> =
            parts.iter().map(|p| (&p.panels, 0, p.rows)).collect();
        Some(matmul_into(&QuantizedActs::new(x, cols), t, &parts))
    }
}

/// The outputs of `parts` — `(panels, first panel, width)`: `width / 16` panels from `first`
/// — for the `t` quantized rows of `acts`, each `(t, width)` row-major, written in place by
/// the kernels in one parallel loop over all of them.
fn matmul_into(acts: &QuantizedActs, t: usize, parts: &[(&Panels, usize, usize)]) -> Vec<Vec<f32>> {
    let threads = rayon::current_num_threads().max(1);
    let mut outs: Vec<Vec<f32>> = parts
        .iter()
        .map(|&(_, _, w)| Vec::with_capacity(t * w))
        .collect();
    // Each part's place in one sequence of all parts' panels: (panels, first panel in them,
    // where the part starts in the sequence, panels, width, output).
    let mut at = 0;
    let placed: Vec<(&Panels, usize, usize, usize, usize, SharedOut)> = parts
        .iter()
        .zip(outs.iter_mut())
        .map(|(&(panels, first, w), o)| {
            at += w / PANEL;
            (
                panels,
                first,
                at - w / PANEL,
                w / PANEL,
                w,
                SharedOut(o.as_mut_ptr()),
            )
        })
        .collect();
    let np = at;
    // Tasks: rows r0..r1 × panels g0..g1 of the sequence; a task may span parts.
    let mut tasks: Vec<(usize, usize, usize, usize)> = Vec::new();
    if t >= 32 {
        // Many rows (prefill): blocks of rows, each over every panel.
        let per_task = t.div_ceil(threads * 2);
        for r0 in (0..t).step_by(per_task) {
            for &(_, _, start, n, _, _) in &placed {
                tasks.push((r0, (r0 + per_task).min(t), start, start + n));
            }
        }
    } else {
        // Panel groups of balanced sizes (36 panels: 4 and 5, not 5 and a last 1) across all
        // parts, so every thread gets the same share: enough tasks to balance, few enough
        // (≥ 4 panels each) to amortise dispatch.
        let chunks = np.div_ceil(4).clamp(1, threads * 4);
        for c in 0..chunks {
            tasks.push((0, t, np * c / chunks, np * (c + 1) / chunks));
        }
    }
    tasks.into_par_iter().for_each(|(r0, r1, g0, g1)| {
        for &(panels, first, start, n, width, out) in &placed {
            let (q0, q1) = (g0.max(start), g1.min(start + n));
            if q0 >= q1 {
                continue;
            }
            let job = acts.job(panels, r0, r1);
            // SAFETY: `out` has capacity for t × width; this task writes rows r0..r1, columns
            // (q0-start)·16..(q1-start)·16 of it (inside: the part has `n` panels of 16) and
            // no other task writes those; `outs` outlives the loop.
            #[allow(unsafe_code)]
            unsafe {
                job.run_strided(
                    first + q0 - start,
                    first + q1 - start,
                    out.get().add(r0 * width + (q0 - start) * PANEL),
                    width,
                )
            };
        }
    });
    for (o, &(_, _, w)) in outs.iter_mut().zip(parts) {
        // SAFETY: the tasks above cover every (row, column) of every part: all rows (row
        // blocks, or every task with all t rows) × all of its panels.
        #[allow(unsafe_code)]
        unsafe {
            o.set_len(t * w)
        };
    }
    outs
}

/// Activation rows quantized per 32-input block (llama.cpp's Q8_1; see the module doc).
pub struct QuantizedActs {
    /// Quants, each group of 8 inputs stored as inputs 0, 2, 4, 6, 1, 3, 5, 7.
    q: Vec<i8>,
    /// Per row and block: the scale, rounded to f16.
    d: Vec<f32>,
    /// Per row and block: `d·Σq` rounded to f16 (the Q4_1 minimum's share).
    s: Vec<f32>,
    /// Inputs per row.
    cols: usize,
}

impl QuantizedActs {
    /// Quantizes `x: (t, cols)` row-major, `cols` a multiple of 32.
    pub fn new(x: &[f32], cols: usize) -> Self {
        debug_assert!(cols.is_multiple_of(BLOCK) && x.len().is_multiple_of(cols.max(1)));
        let (nb, blocks) = (cols / BLOCK, x.len() / BLOCK);
        let mut out = QuantizedActs {
            q: vec![0; x.len()],
            d: vec![0.0; blocks],
            s: vec![0.0; blocks],
            cols,
        };
        type RowParts<'a> = ((&'a [f32], &'a mut [i8]), (&'a mut [f32], &'a mut [f32]));
        let row = |((xr, qr), (dr, sr)): RowParts| {
            for (((xb, qb), d), s) in xr
                .chunks_exact(BLOCK)
                .zip(qr.chunks_exact_mut(BLOCK))
                .zip(dr.iter_mut())
                .zip(sr.iter_mut())
            {
                let xb: &[f32; BLOCK] = xb.try_into().expect("chunks of BLOCK");
                let qb: &mut [i8; BLOCK] = qb.try_into().expect("chunks of BLOCK");
                let (amax, sum) = quantize_block(xb, qb);
                let scale = amax / 127.0;
                *d = half::f16::from_f32(scale).to_f32();
                *s = half::f16::from_f32(scale * sum as f32).to_f32();
            }
        };
        let rows = x.len() / cols.max(1);
        let w = cols.max(1);
        let nbw = nb.max(1);
        // Rows are independent: prefill-sized inputs are quantized on every core (decode-sized
        // ones are a few microseconds, less than waking the pool).
        if rows >= 64 {
            x.par_chunks(w)
                .zip(out.q.par_chunks_mut(w))
                .zip(out.d.par_chunks_mut(nbw).zip(out.s.par_chunks_mut(nbw)))
                .with_min_len(16)
                .for_each(row);
        } else {
            x.chunks(w)
                .zip(out.q.chunks_mut(w))
                .zip(out.d.chunks_mut(nbw).zip(out.s.chunks_mut(nbw)))
                .for_each(row);
        }
        out
    }
}

/// Index in the stored order of input `k` of a block (see [`QuantizedActs`]).
fn stored_at(k: usize) -> usize {
    (k / 8) * 8 + (k % 2) * 4 + (k % 8) / 2
}

/// Quantizes one block into `qb` (stored order): returns `(max |x|, Σq)`; each quant is
/// `round(x · 127 / max |x|)`, ties to even.
fn quantize_block(xb: &[f32; BLOCK], qb: &mut [i8; BLOCK]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        return simd_x86::quantize_block(xb, qb);
    }
    quantize_block_scalar(xb, qb)
}

fn quantize_block_scalar(xb: &[f32; BLOCK], qb: &mut [i8; BLOCK]) -> (f32, i32) {
    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0;
    for (k, &v) in xb.iter().enumerate() {
        // Within ±127 for finite inputs; `as` saturates whatever comes.
        let q = (v * id).round_ties_even() as i8;
        qb[stored_at(k)] = q;
        sum += i32::from(q);
    }
    (amax, sum)
}

impl QuantizedActs {
    /// The matmul of rows `r0..r1` against `panels`.
    fn job<'a>(&'a self, panels: &'a Panels, r0: usize, r1: usize) -> Job<'a> {
        let (cols, nb) = (self.cols, self.cols / BLOCK);
        Job {
            panels,
            nb,
            q: &self.q[r0 * cols..r1 * cols],
            d: &self.d[r0 * nb..r1 * nb],
            s: &self.s[r0 * nb..r1 * nb],
            t: r1 - r0,
        }
    }
}

/// One matmul's inputs: the panels and `t` rows of quantized activations.
struct Job<'a> {
    panels: &'a Panels,
    nb: usize,
    q: &'a [i8],
    d: &'a [f32],
    s: &'a [f32],
    t: usize,
}

impl Job<'_> {
    /// Panels `p0..p1` for every row into `out: (t, (p1-p0)*16)`.
    #[allow(unsafe_code)]
    fn run(&self, p0: usize, p1: usize, out: &mut [f32]) {
        let width = (p1 - p0) * PANEL;
        assert!(out.len() >= self.t * width, "output size");
        // SAFETY: `out` holds t rows of `width` outputs (asserted), exactly what is written.
        unsafe { self.run_strided(p0, p1, out.as_mut_ptr(), width) }
    }

    /// Panels `p0..p1` for every row: row `r`'s outputs go to `out + r·stride`, 16 per panel.
    ///
    /// # Safety
    /// `out + r·stride .. + (p1-p0)·16` must be writable for every row `r < t`, and no one
    /// else may access those elements during the call.
    #[allow(unsafe_code)]
    unsafe fn run_strided(&self, p0: usize, p1: usize, out: *mut f32, stride: usize) {
        #[cfg(target_arch = "x86_64")]
        if simd_available() {
            // SAFETY: forwarded from the caller; AVX2 detected.
            unsafe { simd_x86::run(self, p0, p1, out, stride) };
            return;
        }
        let width = (p1 - p0) * PANEL;
        let mut row = vec![0f32; width];
        for r in 0..self.t {
            self.run_scalar_row(p0, p1, r, &mut row);
            // SAFETY: the caller's contract covers `out + r·stride .. + width`.
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out.add(r * stride), width) };
        }
    }

    /// The reference form of the arithmetic, one output at a time.
    #[cfg(test)]
    fn run_scalar(&self, p0: usize, p1: usize, out: &mut [f32]) {
        let width = (p1 - p0) * PANEL;
        for (r, row) in out.chunks_exact_mut(width).take(self.t).enumerate() {
            self.run_scalar_row(p0, p1, r, row);
        }
    }

    /// Row `r`'s outputs of panels `p0..p1`, one at a time: the reference arithmetic.
    fn run_scalar_row(&self, p0: usize, p1: usize, r: usize, out: &mut [f32]) {
        let (nb, cols) = (self.nb, self.nb * BLOCK);
        let xq = &self.q[r * cols..(r + 1) * cols];
        let two_scales = matches!(self.panels, Panels::Q6K(_));
        let with_min = self.panels.has_min();
        for p in p0..p1 {
            for i in 0..PANEL {
                let mut acc = 0f32;
                for b in 0..nb {
                    let xb = &xq[b * BLOCK..(b + 1) * BLOCK];
                    let blk = self.panels.row_block(p * nb + b, i);
                    // Products of inputs `ks` (activation bytes in the stored order, see
                    // `QuantizedActs`).
                    let isum = |ks: std::ops::Range<usize>| -> f32 {
                        ks.map(|k| i32::from(blk.q[k]) * i32::from(xb[stored_at(k)]))
                            .sum::<i32>() as f32
                    };
                    let (dx, sx) = (self.d[r * nb + b], self.s[r * nb + b]);
                    if two_scales {
                        // One integer sum and scale per 16 inputs.
                        acc = (blk.d[0] * dx).mul_add(isum(0..16), acc);
                        acc = (blk.d[1] * dx).mul_add(isum(16..BLOCK), acc);
                    } else {
                        acc = (blk.d[0] * dx).mul_add(isum(0..BLOCK), acc);
                    }
                    if with_min {
                        acc = blk.m.mul_add(sx, acc);
                    }
                }
                out[(p - p0) * PANEL + i] = acc;
            }
        }
    }
}

/// The output of a matmul, shared by tasks that each write their own panels' columns.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: a `SharedOut` is only dereferenced through `Job::run_strided` by tasks whose column
// ranges are disjoint, while the owning `Vec` outlives them all (see `QMatrix::matmul`).
#[allow(unsafe_code)]
unsafe impl Send for SharedOut {}
#[allow(unsafe_code)]
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Whether AVX2, FMA and F16C are there (detected once): the kernels' and attention's SIMD paths.
#[cfg(target_arch = "x86_64")]
pub(crate) fn simd_available() -> bool {
    use std::sync::OnceLock;
    static SIMD: OnceLock<bool> = OnceLock::new();
    *SIMD.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn simd_available() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd_x86 {
    //! AVX2 + FMA + F16C kernels. Lanes run along outputs; the integer dot of a block is exact
    //! whatever the summation order, and the float steps are the scalar path's, lane by lane.
    use std::arch::x86_64::*;

    use super::{Job, Panels, BLOCK, PANEL, PRE_MIN_TILES, ROW_BLOCK};

    /// The kernels' format parameter (`const F: u8`).
    const Q4_1: u8 = 0;
    const Q8_0: u8 = 1;
    const Q4K: u8 = 2;
    const Q6K: u8 = 3;
    const Q5: u8 = 4;
    const Q8F: u8 = 5;

    /// 4-bit nibble panels (Q4_1, Q4_K) rather than 8-bit ones (Q8_0, Q6_K, Q5).
    const fn is_q4(f: u8) -> bool {
        f == Q4_1 || f == Q4K
    }

    /// Activation rows per kernel call, every format: Q4_1 / Q4_K 4 rows × 16 outputs (8 sums
    /// and a group's 4 weight vectors fill the registers; ~10% faster at 76 rows than the
    /// earlier 8 × 8 halves, 3 × 16 slower), the 8-bit panels 4 rows × 8 outputs — a fourth
    /// row pays since their block sums are hand-allocated (one core, `cargo bench --bench
    /// kernels`, three alternating runs against the intrinsics' 3 rows: Q8_0 49,152 × 576 at
    /// 16 / 76 rows 83–87 / 95–99 → 94–99 / 98–106 GFLOP/s; Q5_K 576 × 1,536 55–61 / 62–64 →
    /// 63–79 / 72–75; Q6_K at 76 rows 67–93 → 75–107).
    const MICRO_ROWS: usize = 4;

    /// Pointers into one panel block: scales (Q6_K: of inputs 0..16), second scales (Q6_K:
    /// inputs 16..32; the same elsewhere), minimums (Q4_1, Q4_K, Q5; the scales elsewhere),
    /// quants. Scales and minimums are f16 bits (Q4_1, Q8_0) or f32s (Q4_K, Q6_K, Q5).
    #[derive(Clone, Copy)]
    struct BlockPtrs {
        d: *const u8,
        d2: *const u8,
        m: *const u8,
        qs: *const u8,
    }

    fn block_ptrs(job: &Job, p: usize, b: usize) -> BlockPtrs {
        let at = p * job.nb + b;
        match job.panels {
            Panels::Q4_1(v) => BlockPtrs {
                d: v[at].d.as_ptr().cast(),
                d2: v[at].d.as_ptr().cast(),
                m: v[at].m.as_ptr().cast(),
                qs: v[at].qs.as_ptr().cast(),
            },
            Panels::Q8_0(v) => BlockPtrs {
                d: v[at].d.as_ptr().cast(),
                d2: v[at].d.as_ptr().cast(),
                m: v[at].d.as_ptr().cast(),
                qs: v[at].qs.as_ptr().cast(),
            },
            Panels::Q8F(v) => BlockPtrs {
                d: v[at].d.as_ptr().cast(),
                d2: v[at].d.as_ptr().cast(),
                m: v[at].d.as_ptr().cast(),
                qs: v[at].qs.as_ptr().cast(),
            },
            Panels::Q4K(v) => BlockPtrs {
                d: v[at].d.as_ptr().cast(),
                d2: v[at].d.as_ptr().cast(),
                m: v[at].m.as_ptr().cast(),
                qs: v[at].qs.as_ptr().cast(),
            },
            Panels::Q6K(v) => BlockPtrs {
                d: v[at].d[0].as_ptr().cast(),
                d2: v[at].d[1].as_ptr().cast(),
                m: v[at].d[0].as_ptr().cast(),
                qs: v[at].qs.as_ptr().cast(),
            },
            Panels::Q5(v) => BlockPtrs {
                d: v[at].d.as_ptr().cast(),
                d2: v[at].d.as_ptr().cast(),
                m: v[at].m.as_ptr().cast(),
                qs: v[at].qs.as_ptr().cast(),
            },
        }
    }

    /// Bytes from one panel block to the next.
    fn block_stride(panels: &Panels) -> usize {
        match panels {
            Panels::Q4_1(_) => std::mem::size_of::<super::PanelQ4_1>(),
            Panels::Q8_0(_) => std::mem::size_of::<super::PanelQ8_0>(),
            Panels::Q8F(_) => std::mem::size_of::<super::PanelQ8F>(),
            Panels::Q4K(_) => std::mem::size_of::<super::PanelQ4K>(),
            Panels::Q6K(_) => std::mem::size_of::<super::PanelQ6K>(),
            Panels::Q5(_) => std::mem::size_of::<super::PanelQ5>(),
        }
    }

    /// Outputs `8h..8h+8` of a block's scales or minimums at `p` as f32 (f16 bits widened
    /// exactly, or f32s as they are).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales8<const F: u8>(p: *const u8, h: usize) -> __m256 {
        // SAFETY: `p` points at 16 scales of the format's width (the caller's block).
        unsafe {
            if F == Q4K || F == Q6K || F == Q5 || F == Q8F {
                _mm256_loadu_ps(p.cast::<f32>().add(8 * h))
            } else {
                _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<u16>().add(8 * h).cast()))
            }
        }
    }

    /// Q6_K's and Q5's products in 16-bit lanes: `sum` (if any) plus `|w| × (x · sign w)` of
    /// both weight vectors. Quants are within ±32 (Q5: 0..32), so one 16-input half-block (two
    /// groups, eight products per lane) stays below 2¹⁵ — one widening per half-block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn products6(
        sum: Option<__m256i>,
        wa: __m256i,
        wb: __m256i,
        xa: __m256i,
        xb: __m256i,
    ) -> __m256i {
        let pa = _mm256_maddubs_epi16(_mm256_abs_epi8(wa), _mm256_sign_epi8(xa, wa));
        let pb = _mm256_maddubs_epi16(_mm256_abs_epi8(wb), _mm256_sign_epi8(xb, wb));
        let s = _mm256_add_epi16(pa, pb);
        match sum {
            Some(sum) => _mm256_add_epi16(sum, s),
            None => s,
        }
    }

    /// [`super::quantize_block_scalar`] in vector form (same products, same rounding).
    pub(super) fn quantize_block(xb: &[f32; BLOCK], qb: &mut [i8; BLOCK]) -> (f32, i32) {
        // SAFETY: only called after run-time detection of AVX2 (`simd_available`).
        unsafe { quantize_block_avx2(xb, qb) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quantize_block_avx2(xb: &[f32; BLOCK], qb: &mut [i8; BLOCK]) -> (f32, i32) {
        // SAFETY: four loads of 8 inside the 32-element array, one 32-byte store into `qb`.
        unsafe {
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xb.as_ptr().add(8 * i)));
            let sign = _mm256_set1_ps(-0.0);
            let m = v.iter().fold(_mm256_setzero_ps(), |m, &x| {
                _mm256_max_ps(m, _mm256_andnot_ps(sign, x))
            });
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), m);
            let amax = lanes.iter().fold(0f32, |a, &b| a.max(b));
            let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            // Each group of 8 into the stored order 0, 2, 4, 6, 1, 3, 5, 7.
            let order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
            let q: [__m256i; 4] = std::array::from_fn(|i| {
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm256_mul_ps(v[i], id),
                );
                _mm256_permutevar8x32_epi32(_mm256_cvtps_epi32(r), order)
            });
            let total =
                _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let mut sums = [0i32; 8];
            _mm256_storeu_si256(sums.as_mut_ptr().cast(), total);
            // Saturating packs interleave 4-byte runs across the two 128-bit halves; one
            // permutation puts the groups back in sequence.
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let bytes =
                _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(qb.as_mut_ptr().cast(), bytes);
            (amax, sums.iter().sum())
        }
    }

    /// See `Job::run_strided`.
    ///
    /// # Safety
    /// As `Job::run_strided`.
    pub(super) unsafe fn run(job: &Job, p0: usize, p1: usize, out: *mut f32, stride: usize) {
        let cols = job.nb * BLOCK;
        assert!(job.q.len() >= job.t * cols);
        assert!(job.d.len() >= job.t * job.nb && job.s.len() >= job.t * job.nb);
        // SAFETY: only called after run-time detection of AVX2, FMA and F16C
        // (`simd_available`); the activation sizes are asserted above, the output is the
        // caller's contract.
        unsafe {
            match job.panels {
                Panels::Q4_1(_) => run_avx2::<Q4_1>(job, p0, p1, out, stride),
                Panels::Q8_0(_) => run_avx2::<Q8_0>(job, p0, p1, out, stride),
                Panels::Q8F(_) => run_avx2::<Q8F>(job, p0, p1, out, stride),
                Panels::Q4K(_) => run_avx2::<Q4K>(job, p0, p1, out, stride),
                Panels::Q6K(_) => run_avx2::<Q6K>(job, p0, p1, out, stride),
                Panels::Q5(_) => run_avx2::<Q5>(job, p0, p1, out, stride),
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_avx2<const F: u8>(job: &Job, p0: usize, p1: usize, o: *mut f32, width: usize) {
        // Per block of rows, panel-outer: a panel's quants (a few KB) stay in L1 while every
        // row tile of the block uses them.
        for r_start in (0..job.t).step_by(ROW_BLOCK) {
            let r_end = (r_start + ROW_BLOCK).min(job.t);
            let tiles = (r_end - r_start).div_ceil(MICRO_ROWS);
            for p in p0..p1 {
                // Q4_1 with many row tiles: the panel's quants unpacked to bytes once, not per
                // tile. With few tiles the tiles' own unpacking wins: it overlaps the panel's
                // first touch with their products, where the separate pass stalls on it.
                let pre = is_q4(F) && tiles >= PRE_MIN_TILES;
                if pre {
                    // SAFETY: panel p exists (the caller's range).
                    unsafe { unpack_panel(job, p) };
                }
                for i in 0..tiles {
                    // Balanced tiles (6 rows = 3 + 3, not 4 + 2).
                    let a = r_start + (r_end - r_start) * i / tiles;
                    let b = r_start + (r_end - r_start) * (i + 1) / tiles;
                    // SAFETY: rows a..b < t and panel p exist; the caller's contract covers
                    // row r's 16 outputs of panel p at `o + r·width + (p-p0)·16`.
                    unsafe {
                        let dst = o.add(a * width + (p - p0) * PANEL);
                        if pre {
                            let w = UNPACKED.with_borrow(|u| u.as_ptr().cast::<[u8; 32]>());
                            match b - a {
                                1 => row1::<F>(job, p, a, dst),
                                2 => full_q4::<F, 2, true>(job, p, w, a, dst, width),
                                3 => full_q4::<F, 3, true>(job, p, w, a, dst, width),
                                _ => full_q4::<F, 4, true>(job, p, w, a, dst, width),
                            }
                            continue;
                        }
                        match b - a {
                            1 => row1::<F>(job, p, a, dst),
                            2 => kernel::<F, 2>(job, p, a, dst, width),
                            3 => kernel::<F, 3>(job, p, a, dst, width),
                            // Tiles are at most MICRO_ROWS (4) rows.
                            _ => kernel::<F, 4>(job, p, a, dst, width),
                        }
                    }
                }
            }
        }
    }

    thread_local! {
        /// This thread's unpacked Q4_1 panel (see [`unpack_panel`]).
        static UNPACKED: std::cell::RefCell<Vec<Bytes32>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }

    /// One vector of bytes on a 32-byte boundary: its load never straddles two cache lines.
    #[derive(Clone, Copy)]
    #[repr(C, align(32))]
    struct Bytes32([u8; 32]);

    /// Panel `p`'s Q4_1 quants unpacked to bytes into this thread's `UNPACKED`: per block 16
    /// vectors, `[g][h][lo, hi]` — [`weights`]' results, stored (9–25 KB for SmolLM2's widths).
    ///
    /// # Safety
    /// Panel `p` exists; AVX2 was detected.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack_panel(job: &Job, p: usize) {
        let nibble = _mm256_set1_epi8(0x0F);
        UNPACKED.with_borrow_mut(|u| {
            if u.len() < job.nb * 16 {
                u.resize(job.nb * 16, Bytes32([0; 32]));
            }
            let up = u.as_mut_ptr().cast::<[u8; 32]>();
            for b in 0..job.nb {
                let bp = block_ptrs(job, p, b);
                for g in 0..BLOCK / 8 {
                    for h in 0..2 {
                        // SAFETY: `u` holds nb · 16 vectors; the block is panel p's.
                        unsafe {
                            let (lo, hi) = weights::<true>(bp.qs, g, h, nibble);
                            let w = up.add(b * 16 + g * 4 + h * 2);
                            _mm256_storeu_si256(w.cast(), lo);
                            _mm256_storeu_si256(w.add(1).cast(), hi);
                        }
                    }
                }
            }
        });
    }

    /// The weights of inputs `8g + {0,2,4,6}` and `8g + {1,3,5,7}` of outputs `8h..8h+8` of the
    /// block at `qs` (Q4_1 nibbles unpacked to bytes; Q8_0 bytes as stored).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn weights<const Q4: bool>(
        qs: *const u8,
        g: usize,
        h: usize,
        nibble: __m256i,
    ) -> (__m256i, __m256i) {
        // SAFETY: `qs` points at a whole panel block (the caller's), g < 4, h < 2.
        unsafe {
            if Q4 {
                let v = _mm256_loadu_si256(qs.add((2 * g + h) * 32).cast());
                (
                    _mm256_and_si256(v, nibble),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble),
                )
            } else {
                (
                    _mm256_loadu_si256(qs.add((2 * g) * 64 + h * 32).cast()),
                    _mm256_loadu_si256(qs.add((2 * g + 1) * 64 + h * 32).cast()),
                )
            }
        }
    }

    /// `sum` plus the integer products of weights `wa`/`wb` with the broadcast activations
    /// `xa`/`xb`: Q4_1 in 16-bit lanes (≤ 16 products of 15 × 127 per lane: no overflow),
    /// Q8_0 widened to 32 bits.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn products<const Q4: bool>(
        sum: __m256i,
        wa: __m256i,
        wb: __m256i,
        xa: __m256i,
        xb: __m256i,
        ones: __m256i,
    ) -> __m256i {
        if Q4 {
            let pa = _mm256_maddubs_epi16(wa, xa);
            let pb = _mm256_maddubs_epi16(wb, xb);
            _mm256_add_epi16(sum, _mm256_add_epi16(pa, pb))
        } else {
            // u8 × i8 products need an unsigned side: |w| × (x · sign w).
            let pa = _mm256_maddubs_epi16(_mm256_abs_epi8(wa), _mm256_sign_epi8(xa, wa));
            let pb = _mm256_maddubs_epi16(_mm256_abs_epi8(wb), _mm256_sign_epi8(xb, wb));
            // Each 16-bit pair sum fills most of its range: widen before adding.
            let s = _mm256_add_epi32(_mm256_madd_epi16(pa, ones), _mm256_madd_epi16(pb, ones));
            _mm256_add_epi32(sum, s)
        }
    }

    /// One row (decoding) × one panel: both halves in one pass over the blocks, so the
    /// activation broadcasts, the row's scales and the block addresses serve 16 outputs. Per
    /// output lane the same integer sums and float steps as [`full_q4`] and [`half_q8`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row1<const F: u8>(job: &Job, p: usize, r: usize, out: *mut f32) {
        let (nb, cols) = (job.nb, job.nb * BLOCK);
        let ones = _mm256_set1_epi16(1);
        let nibble = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); 2];
        // The panel's first block; the others follow at a fixed stride.
        let (first, stride) = (block_ptrs(job, p, 0), block_stride(job.panels));
        // SAFETY (whole body): row r and panel p exist (caller), so every block of the panel
        // (`nb` of them, `stride` bytes apart), activation, scale and output offset lies
        // inside the sizes `run` asserted.
        unsafe {
            let xq = job.q.as_ptr().add(r * cols);
            for b in 0..nb {
                let (d, m, qs) = (
                    first.d.byte_add(b * stride),
                    first.m.byte_add(b * stride),
                    first.qs.byte_add(b * stride),
                );
                let dx = _mm256_set1_ps(*job.d.get_unchecked(r * nb + b));
                if F == Q6K || F == Q5 {
                    // 16-bit sums per 16-input half-block, widened.
                    let mut sub = [[_mm256_setzero_si256(); 2]; 2];
                    for g in 0..BLOCK / 8 {
                        let x = xq.add(b * BLOCK + g * 8);
                        let xa = _mm256_set1_epi32(x.cast::<i32>().read_unaligned());
                        let xb = _mm256_set1_epi32(x.add(4).cast::<i32>().read_unaligned());
                        for (h, sh) in sub[g / 2].iter_mut().enumerate() {
                            let (wa, wb) = weights::<false>(qs, g, h, nibble);
                            *sh = products6((g % 2 == 1).then_some(*sh), wa, wb, xa, xb);
                        }
                    }
                    let sub = sub.map(|s| s.map(|v| _mm256_madd_epi16(v, ones)));
                    if F == Q5 {
                        // Q5: the whole block's sum (exact), its scale, then its minimum.
                        let sx = _mm256_set1_ps(*job.s.get_unchecked(r * nb + b));
                        for (h, ah) in acc.iter_mut().enumerate() {
                            let i32s = _mm256_add_epi32(sub[0][h], sub[1][h]);
                            let dw = scales8::<F>(d, h);
                            *ah = _mm256_fmadd_ps(
                                _mm256_mul_ps(dw, dx),
                                _mm256_cvtepi32_ps(i32s),
                                *ah,
                            );
                            *ah = _mm256_fmadd_ps(scales8::<F>(m, h), sx, *ah);
                        }
                        continue;
                    }
                    // Q6_K: each half-block scaled by its own scale.
                    let d2 = first.d2.byte_add(b * stride);
                    for (h, ah) in acc.iter_mut().enumerate() {
                        for (s, ds) in [d, d2].into_iter().enumerate() {
                            let i32s = sub[s][h];
                            let dw = scales8::<F>(ds, h);
                            *ah = _mm256_fmadd_ps(
                                _mm256_mul_ps(dw, dx),
                                _mm256_cvtepi32_ps(i32s),
                                *ah,
                            );
                        }
                    }
                    continue;
                }
                let q4 = is_q4(F);
                let mut isum = [_mm256_setzero_si256(); 2];
                for g in 0..BLOCK / 8 {
                    let x = xq.add(b * BLOCK + g * 8);
                    let xa = _mm256_set1_epi32(x.cast::<i32>().read_unaligned());
                    let xb = _mm256_set1_epi32(x.add(4).cast::<i32>().read_unaligned());
                    for (h, sh) in isum.iter_mut().enumerate() {
                        *sh = if q4 {
                            let (wa, wb) = weights::<true>(qs, g, h, nibble);
                            products::<true>(*sh, wa, wb, xa, xb, ones)
                        } else {
                            let (wa, wb) = weights::<false>(qs, g, h, nibble);
                            products::<false>(*sh, wa, wb, xa, xb, ones)
                        };
                    }
                }
                let sx = _mm256_set1_ps(*job.s.get_unchecked(r * nb + b));
                for (h, (ah, sh)) in acc.iter_mut().zip(&isum).enumerate() {
                    let dw = scales8::<F>(d, h);
                    let i32s = if q4 {
                        _mm256_madd_epi16(*sh, ones)
                    } else {
                        *sh
                    };
                    *ah = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(i32s), *ah);
                    if q4 {
                        let mw = scales8::<F>(m, h);
                        *ah = _mm256_fmadd_ps(mw, sx, *ah);
                    }
                }
            }
            _mm256_storeu_ps(out, acc[0]);
            _mm256_storeu_ps(out.add(8), acc[1]);
        }
    }

    /// `R` rows (from `r0`) × one panel (16 outputs): Q4_1 both halves in one pass, Q8_0 one
    /// half (8 outputs, one vector) at a time so that its sums and weights fit in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn kernel<const F: u8, const R: usize>(
        job: &Job,
        p: usize,
        r0: usize,
        out: *mut f32,
        width: usize,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            if is_q4(F) {
                full_q4::<F, R, false>(job, p, std::ptr::null(), r0, out, width);
            } else {
                half_q8::<F, R>(job, p, 0, r0, out, width);
                half_q8::<F, R>(job, p, 1, r0, out.add(8), width);
            }
        }
    }

    /// One row's step of a Q4 group in [`q4_block_sums`]'s registers: both weight pairs
    /// (`ymm8`/`ymm9`: outputs 0..8, `ymm10`/`ymm11`: 8..16) times the row's two broadcast
    /// activation words (`ymm12`, `ymm13`), added to (or, `set`, starting) the row's two sums.
    macro_rules! q4_row {
        ($op:ident, $x:literal, $s0:literal, $s1:literal, $xo0:literal, $xo1:literal) => {
            concat!(
                "vpbroadcastd ymm12, dword ptr [", $x, " + ", $xo0, "]\n",
                "vpbroadcastd ymm13, dword ptr [", $x, " + ", $xo1, "]\n",
                "vpmaddubsw ymm14, ymm8, ymm12\n",
                "vpmaddubsw ymm15, ymm9, ymm13\n",
                q4_row!(@sum $op, $s0),
                "vpmaddubsw ymm14, ymm10, ymm12\n",
                "vpmaddubsw ymm15, ymm11, ymm13\n",
                q4_row!(@sum $op, $s1),
            )
        };
        (@sum set, $s:literal) => { concat!("vpaddw ", $s, ", ymm14, ymm15\n") };
        (@sum add, $s:literal) => {
            concat!("vpaddw ymm14, ymm14, ymm15\n", "vpaddw ", $s, ", ", $s, ", ymm14\n")
        };
    }

    /// Every row's step of one group (activation bytes `$xo0`, `$xo1` of the block).
    macro_rules! q4_rows {
        (2, $op:ident, $xo0:literal, $xo1:literal) => {
            concat!(
                q4_row!($op, "{x0}", "ymm0", "ymm1", $xo0, $xo1),
                q4_row!($op, "{x1}", "ymm2", "ymm3", $xo0, $xo1),
            )
        };
        (3, $op:ident, $xo0:literal, $xo1:literal) => {
            concat!(
                q4_rows!(2, $op, $xo0, $xo1),
                q4_row!($op, "{x2}", "ymm4", "ymm5", $xo0, $xo1)
            )
        };
        (4, $op:ident, $xo0:literal, $xo1:literal) => {
            concat!(
                q4_rows!(3, $op, $xo0, $xo1),
                q4_row!($op, "{x3}", "ymm6", "ymm7", $xo0, $xo1)
            )
        };
    }

    /// A group's four weight vectors into `ymm8..ymm11`: nibbles unpacked from the panel
    /// block (`unpack`, halves at bytes `$a`, `$b`), or loaded from an unpacked panel
    /// (`pre`, vectors at `$a..$d`).
    macro_rules! q4_weights {
        (unpack, $a:literal, $b:literal) => {
            concat!(
                "vmovdqu ymm8, ymmword ptr [{w} + ",
                $a,
                "]\n",
                "vpsrlw ymm9, ymm8, 4\n",
                "vpand ymm8, ymm8, ymmword ptr [{nibble}]\n",
                "vpand ymm9, ymm9, ymmword ptr [{nibble}]\n",
                "vmovdqu ymm10, ymmword ptr [{w} + ",
                $b,
                "]\n",
                "vpsrlw ymm11, ymm10, 4\n",
                "vpand ymm10, ymm10, ymmword ptr [{nibble}]\n",
                "vpand ymm11, ymm11, ymmword ptr [{nibble}]\n",
            )
        };
        (pre, $a:literal, $b:literal, $c:literal, $d:literal) => {
            concat!(
                "vmovdqu ymm8, ymmword ptr [{w} + ",
                $a,
                "]\n",
                "vmovdqu ymm9, ymmword ptr [{w} + ",
                $b,
                "]\n",
                "vmovdqu ymm10, ymmword ptr [{w} + ",
                $c,
                "]\n",
                "vmovdqu ymm11, ymmword ptr [{w} + ",
                $d,
                "]\n",
            )
        };
    }

    /// A whole block: four groups of eight inputs (the first group starts the sums).
    macro_rules! q4_block {
        ($r:tt, unpack) => {
            concat!(
                q4_weights!(unpack, "0", "32"),
                q4_rows!($r, set, "0", "4"),
                q4_weights!(unpack, "64", "96"),
                q4_rows!($r, add, "8", "12"),
                q4_weights!(unpack, "128", "160"),
                q4_rows!($r, add, "16", "20"),
                q4_weights!(unpack, "192", "224"),
                q4_rows!($r, add, "24", "28"),
            )
        };
        ($r:tt, pre) => {
            concat!(
                q4_weights!(pre, "0", "32", "64", "96"),
                q4_rows!($r, set, "0", "4"),
                q4_weights!(pre, "128", "160", "192", "224"),
                q4_rows!($r, add, "8", "12"),
                q4_weights!(pre, "256", "288", "320", "352"),
                q4_rows!($r, add, "16", "20"),
                q4_weights!(pre, "384", "416", "448", "480"),
                q4_rows!($r, add, "24", "28"),
            )
        };
    }

    /// `vpand`'s nibble mask, where the block asm reads it.
    static NIBBLE: Bytes32 = Bytes32([0x0F; 32]);

    /// The integer sums of one Q4 block for `R` (2–4) rows × both halves of a panel:
    /// `[r][h]` holds outputs `8h..8h+8` of row `r`, 16-bit pair sums as [`products`] makes
    /// them (≤ 16 products of 15 × 127 per lane). Written out by hand: the compiler, given
    /// the intrinsics, spills sums and weights of a 4-row tile to the stack (all sixteen vector
    /// registers are needed); here the sums live in `ymm0..ymm7`, a group's weights in
    /// `ymm8..ymm11`, the broadcasts and products in `ymm12..ymm15` (`cargo bench --bench
    /// kernels` on one thread, Q4_1 1,536 × 576 at 76 rows: ~104 → 137–164 GFLOP/s).
    /// `w`: the block's nibbles (or with `PRE`, its 16 unpacked vectors); `x`: row 0's
    /// activations of the block, rows `cols` bytes apart.
    ///
    /// # Safety
    /// AVX2 is available; `w` and the `R` rows of 32 activations are readable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_block_sums<const R: usize, const PRE: bool>(
        w: *const u8,
        x: *const i8,
        cols: usize,
    ) -> [[__m256i; 2]; R] {
        // Overwritten whole below; zeros only give the array a value.
        // SAFETY: an all-zero bit pattern is a valid `__m256i`.
        let mut sums: [[__m256i; 2]; R] = unsafe { std::mem::zeroed() };
        let s = sums.as_mut_ptr().cast::<__m256i>();
        let nibble = NIBBLE.0.as_ptr();
        macro_rules! call {
            ($r:tt, $load:ident; $($x:ident = $k:literal),*; $($reg:tt => $i:literal),*) => {
                std::arch::asm!(
                    q4_block!($r, $load),
                    // `pre` blocks need no mask; an operand must be named to be passed.
                    "# {nibble}",
                    w = in(reg) w,
                    nibble = in(reg) nibble,
                    $($x = in(reg) x.add(cols * $k),)*
                    $(out($reg) *s.add($i),)*
                    out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                    out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
                    options(nostack, preserves_flags, readonly),
                )
            };
        }
        // SAFETY: the caller's pointers; the asm reads only the block and the rows.
        unsafe {
            match (R, PRE) {
                (2, false) => call!(2, unpack; x0 = 0, x1 = 1;
                    "ymm0" => 0, "ymm1" => 1, "ymm2" => 2, "ymm3" => 3),
                (2, true) => call!(2, pre; x0 = 0, x1 = 1;
                    "ymm0" => 0, "ymm1" => 1, "ymm2" => 2, "ymm3" => 3),
                (3, false) => call!(3, unpack; x0 = 0, x1 = 1, x2 = 2;
                    "ymm0" => 0, "ymm1" => 1, "ymm2" => 2, "ymm3" => 3, "ymm4" => 4, "ymm5" => 5),
                (3, true) => call!(3, pre; x0 = 0, x1 = 1, x2 = 2;
                    "ymm0" => 0, "ymm1" => 1, "ymm2" => 2, "ymm3" => 3, "ymm4" => 4, "ymm5" => 5),
                (4, false) => call!(4, unpack; x0 = 0, x1 = 1, x2 = 2, x3 = 3;
                    "ymm0" => 0, "ymm1" => 1, "ymm2" => 2, "ymm3" => 3,
                    "ymm4" => 4, "ymm5" => 5, "ymm6" => 6, "ymm7" => 7),
                (4, true) => call!(4, pre; x0 = 0, x1 = 1, x2 = 2, x3 = 3;
                    "ymm0" => 0, "ymm1" => 1, "ymm2" => 2, "ymm3" => 3,
                    "ymm4" => 4, "ymm5" => 5, "ymm6" => 6, "ymm7" => 7),
                _ => unreachable!("Q4 row tiles have 2 to 4 rows"),
            }
        }
        sums
    }

    /// A row's products with a group of 8-bit weights (`ymm8`, `ymm9`; magnitudes `ymm10`,
    /// `ymm11`): its two activation words (bytes `$xo0`, `$xo1` of row `$x`) broadcast, the
    /// weights' signs moved onto them, times the magnitudes — 16-bit pair sums in `ymm12`,
    /// `ymm13` (as [`products`] and [`products6`] make them).
    macro_rules! signed_products {
        ($x:literal, $xo0:literal, $xo1:literal) => {
            concat!(
                "vpbroadcastd ymm12, dword ptr [",
                $x,
                " + ",
                $xo0,
                "]\n",
                "vpbroadcastd ymm13, dword ptr [",
                $x,
                " + ",
                $xo1,
                "]\n",
                "vpsignb ymm12, ymm12, ymm8\n",
                "vpsignb ymm13, ymm13, ymm9\n",
                "vpmaddubsw ymm12, ymm10, ymm12\n",
                "vpmaddubsw ymm13, ymm11, ymm13\n",
            )
        };
    }

    /// One row's step of a Q8_0 group in [`q8_block_sums`]'s registers: the weights' signs
    /// moved onto the row's broadcast activations (`ymm12`, `ymm13`), multiplied by the
    /// weights' magnitudes (`ymm10`, `ymm11`), widened (`ymm15`: ones) and added to (or, `set`,
    /// starting) the row's 32-bit sums.
    macro_rules! q8_row {
        ($op:ident, $x:literal, $s:literal, $xo0:literal, $xo1:literal) => {
            concat!(
                signed_products!($x, $xo0, $xo1),
                "vpmaddwd ymm12, ymm12, ymm15\n",
                "vpmaddwd ymm13, ymm13, ymm15\n",
                group_sum!("vpaddd", $op, $s),
            )
        };
    }

    /// A row's two products (`ymm12`, `ymm13`) added into its sum `$s` with `$add` (`vpaddd`
    /// or `vpaddw`): `set` starts the sum (the block's first group), `add` adds to it.
    macro_rules! group_sum {
        ($add:literal, set, $s:literal) => {
            concat!($add, " ", $s, ", ymm12, ymm13\n")
        };
        ($add:literal, add, $s:literal) => {
            concat!(
                $add,
                " ymm12, ymm12, ymm13\n",
                $add,
                " ",
                $s,
                ", ",
                $s,
                ", ymm12\n"
            )
        };
    }

    /// Every row's step of one group (activation bytes `$xo0`, `$xo1` of the block) by the
    /// format's row macro (`q8_row`, `q6_row`): rows `$x` into sums `$s`.
    macro_rules! each_row {
        ($row:ident, $op:ident, $xo0:literal, $xo1:literal; $($x:literal => $s:literal),*) => {
            concat!($($row!($op, $x, $s, $xo0, $xo1),)*)
        };
    }

    /// A Q8_0 group's weights (one half of the panel: vectors at `$a`, `$b`) and their
    /// magnitudes into `ymm8..ymm11`.
    macro_rules! q8_weights {
        ($a:literal, $b:literal) => {
            concat!(
                "vmovdqu ymm8, ymmword ptr [{w} + ",
                $a,
                "]\n",
                "vmovdqu ymm9, ymmword ptr [{w} + ",
                $b,
                "]\n",
                "vpabsb ymm10, ymm8\n",
                "vpabsb ymm11, ymm9\n",
            )
        };
    }

    /// A whole Q8_0 block (four groups; the first starts the sums).
    macro_rules! q8_block {
        ($($x:literal => $s:literal),*) => {
            concat!(
                q8_weights!("0", "64"),
                each_row!(q8_row, set, "0", "4"; $($x => $s),*),
                q8_weights!("128", "192"),
                each_row!(q8_row, add, "8", "12"; $($x => $s),*),
                q8_weights!("256", "320"),
                each_row!(q8_row, add, "16", "20"; $($x => $s),*),
                q8_weights!("384", "448"),
                each_row!(q8_row, add, "24", "28"; $($x => $s),*),
            )
        };
    }

    /// The 32-bit integer sums of one Q8_0 block for `R` (1–4) rows × one half of a panel
    /// (outputs `8h..8h+8`; `w` already points at the half), as [`products`] makes them, with
    /// the vector registers allocated by hand (see [`q4_block_sums`]): sums in `ymm0..`,
    /// weights and magnitudes in `ymm8..ymm11`, broadcasts and products in `ymm12`, `ymm13`.
    ///
    /// # Safety
    /// AVX2 is available; the block at `w` and the `R` rows of 32 activations are readable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_block_sums<const R: usize>(
        w: *const u8,
        x: *const i8,
        cols: usize,
    ) -> [__m256i; R] {
        // SAFETY: an all-zero bit pattern is a valid `__m256i`; overwritten below.
        let mut sums: [__m256i; R] = unsafe { std::mem::zeroed() };
        let s = sums.as_mut_ptr();
        let ones = _mm256_set1_epi16(1);
        macro_rules! call {
            ($($x:ident = $k:literal, $xs:literal => $reg:tt, $i:literal);*) => {
                std::arch::asm!(
                    q8_block!($($xs => $reg),*),
                    w = in(reg) w,
                    $($x = in(reg) x.add(cols * $k),)*
                    $(out($reg) *s.add($i),)*
                    out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                    out("ymm12") _, out("ymm13") _,
                    in("ymm15") ones,
                    options(nostack, preserves_flags, readonly),
                )
            };
        }
        // SAFETY: the caller's pointers; the asm reads only the block and the rows.
        unsafe {
            match R {
                1 => call!(x0 = 0, "{x0}" => "ymm0", 0),
                2 => call!(x0 = 0, "{x0}" => "ymm0", 0; x1 = 1, "{x1}" => "ymm1", 1),
                3 => call!(x0 = 0, "{x0}" => "ymm0", 0; x1 = 1, "{x1}" => "ymm1", 1;
                    x2 = 2, "{x2}" => "ymm2", 2),
                4 => call!(x0 = 0, "{x0}" => "ymm0", 0; x1 = 1, "{x1}" => "ymm1", 1;
                    x2 = 2, "{x2}" => "ymm2", 2; x3 = 3, "{x3}" => "ymm3", 3),
                _ => unreachable!("Q8_0 row tiles have 1 to 4 rows"),
            }
        }
        sums
    }

    /// One row's step of a Q6_K / Q5 group in [`q6_block_sums`]'s registers: [`signed_products`]
    /// products, kept in 16 bits (quants within ±32: a 16-input half-block cannot overflow).
    macro_rules! q6_row {
        ($op:ident, $x:literal, $s:literal, $xo0:literal, $xo1:literal) => {
            concat!(
                signed_products!($x, $xo0, $xo1),
                group_sum!("vpaddw", $op, $s)
            )
        };
    }

    /// 16-bit sums widened to 32 bits in place (`ymm15`: ones).
    macro_rules! widen {
        ($($s:literal),*) => { concat!($("vpmaddwd ", $s, ", ", $s, ", ymm15\n",)*) };
    }

    /// A whole Q6_K / Q5 block: each 16-input half-block (two groups) summed and widened.
    macro_rules! q6_block {
        ($($x:literal => $lo:literal, $hi:literal),*) => {
            concat!(
                q8_weights!("0", "64"), each_row!(q6_row, set, "0", "4"; $($x => $lo),*),
                q8_weights!("128", "192"), each_row!(q6_row, add, "8", "12"; $($x => $lo),*),
                widen!($($lo),*),
                q8_weights!("256", "320"), each_row!(q6_row, set, "16", "20"; $($x => $hi),*),
                q8_weights!("384", "448"), each_row!(q6_row, add, "24", "28"; $($x => $hi),*),
                widen!($($hi),*),
            )
        };
    }

    /// The 32-bit integer sums of each 16-input half-block of one 8-bit Q6_K / Q5 block for
    /// `R` (1–4) rows × one half of a panel (`w` already points at the half): `[r][s]` for
    /// half-block `s` ([`products6`]' 16-bit sums, widened), with the vector registers allocated by
    /// hand (see [`q4_block_sums`]): half-block sums in `ymm0..ymm3` and `ymm4..ymm7`, weights
    /// and magnitudes in `ymm8..ymm11`, broadcasts and products in `ymm12`, `ymm13`.
    ///
    /// # Safety
    /// AVX2 is available; the block at `w` and the `R` rows of 32 activations are readable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_block_sums<const R: usize>(
        w: *const u8,
        x: *const i8,
        cols: usize,
    ) -> [[__m256i; 2]; R] {
        // SAFETY: an all-zero bit pattern is a valid `__m256i`; overwritten below.
        let mut sums: [[__m256i; 2]; R] = unsafe { std::mem::zeroed() };
        let s = sums.as_mut_ptr().cast::<__m256i>();
        let ones = _mm256_set1_epi16(1);
        macro_rules! call {
            ($($x:ident = $k:literal, $xs:literal => $lo:tt, $hi:tt, $i:literal);*) => {
                std::arch::asm!(
                    q6_block!($($xs => $lo, $hi),*),
                    w = in(reg) w,
                    $($x = in(reg) x.add(cols * $k),)*
                    $(out($lo) *s.add(2 * $i), out($hi) *s.add(2 * $i + 1),)*
                    out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                    out("ymm12") _, out("ymm13") _,
                    in("ymm15") ones,
                    options(nostack, preserves_flags, readonly),
                )
            };
        }
        // SAFETY: the caller's pointers; the asm reads only the block and the rows.
        unsafe {
            match R {
                1 => call!(x0 = 0, "{x0}" => "ymm0", "ymm4", 0),
                2 => {
                    call!(x0 = 0, "{x0}" => "ymm0", "ymm4", 0; x1 = 1, "{x1}" => "ymm1", "ymm5", 1)
                }
                3 => {
                    call!(x0 = 0, "{x0}" => "ymm0", "ymm4", 0; x1 = 1, "{x1}" => "ymm1", "ymm5", 1;
                    x2 = 2, "{x2}" => "ymm2", "ymm6", 2)
                }
                4 => {
                    call!(x0 = 0, "{x0}" => "ymm0", "ymm4", 0; x1 = 1, "{x1}" => "ymm1", "ymm5", 1;
                    x2 = 2, "{x2}" => "ymm2", "ymm6", 2; x3 = 3, "{x3}" => "ymm3", "ymm7", 3)
                }
                _ => unreachable!("8-bit row tiles have 1 to 4 rows"),
            }
        }
        sums
    }

    /// Q4_1: `R` (2–4) rows × both halves of a panel in one pass, so each activation
    /// broadcast serves 16 outputs; a block's integer sums from [`q4_block_sums`]. Per output
    /// lane the same integer sums and float steps as [`row1`]. `PRE`: the weights come
    /// unpacked from `pre` ([`unpack_panel`]'s layout) instead of being unpacked here.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn full_q4<const F: u8, const R: usize, const PRE: bool>(
        job: &Job,
        p: usize,
        pre: *const [u8; 32],
        r0: usize,
        out: *mut f32,
        width: usize,
    ) {
        let (nb, cols) = (job.nb, job.nb * BLOCK);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let ones = _mm256_set1_epi16(1);
        // SAFETY (whole body): rows r0..r0+R and panel p exist (caller), so every
        // activation, scale and output offset is inside the sizes `run` asserted; with PRE,
        // `pre` holds panel p unpacked (nb · 16 vectors, `unpack_panel`).
        unsafe {
            let xq = job.q.as_ptr().add(r0 * cols);
            for b in 0..nb {
                let bp = block_ptrs(job, p, b);
                let w = if PRE {
                    pre.add(b * 16).cast::<u8>()
                } else {
                    bp.qs
                };
                let isum = q4_block_sums::<R, PRE>(w, xq.add(b * BLOCK), cols);
                let dw = [scales8::<F>(bp.d, 0), scales8::<F>(bp.d, 1)];
                for (r, (ar, sr)) in acc.iter_mut().zip(&isum).enumerate() {
                    let dx = _mm256_set1_ps(*job.d.get_unchecked((r0 + r) * nb + b));
                    for h in 0..2 {
                        let i32s = _mm256_madd_epi16(sr[h], ones);
                        ar[h] = _mm256_fmadd_ps(
                            _mm256_mul_ps(dw[h], dx),
                            _mm256_cvtepi32_ps(i32s),
                            ar[h],
                        );
                    }
                }
                let mw = [scales8::<F>(bp.m, 0), scales8::<F>(bp.m, 1)];
                for (r, ar) in acc.iter_mut().enumerate() {
                    let sx = _mm256_set1_ps(*job.s.get_unchecked((r0 + r) * nb + b));
                    for h in 0..2 {
                        ar[h] = _mm256_fmadd_ps(mw[h], sx, ar[h]);
                    }
                }
            }
            for (r, ar) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(r * width), ar[0]);
                _mm256_storeu_ps(out.add(r * width + 8), ar[1]);
            }
        }
    }

    /// Q8_0: `R` rows × one half (8 outputs, one vector) of a panel.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half_q8<const F: u8, const R: usize>(
        job: &Job,
        p: usize,
        h: usize,
        r0: usize,
        out: *mut f32,
        width: usize,
    ) {
        let (nb, cols) = (job.nb, job.nb * BLOCK);
        let mut acc = [_mm256_setzero_ps(); R];
        // SAFETY (whole body): rows r0..r0+R and panel p exist (caller), h < 2, so every
        // activation, scale and output offset is inside the sizes `run` asserted.
        unsafe {
            let xq = job.q.as_ptr().add(r0 * cols);
            for b in 0..nb {
                let bp = block_ptrs(job, p, b);
                if F == Q5 {
                    // The halves added (exact); the block's scale, then its minimum.
                    let halves = q6_block_sums::<R>(bp.qs.add(h * 32), xq.add(b * BLOCK), cols);
                    let isum: [__m256i; R] =
                        std::array::from_fn(|r| _mm256_add_epi32(halves[r][0], halves[r][1]));
                    let (dw, mw) = (scales8::<F>(bp.d, h), scales8::<F>(bp.m, h));
                    for (r, (ar, ir)) in acc.iter_mut().zip(&isum).enumerate() {
                        let at = (r0 + r) * nb + b;
                        let dx = _mm256_set1_ps(*job.d.get_unchecked(at));
                        *ar = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(*ir), *ar);
                        *ar = _mm256_fmadd_ps(mw, _mm256_set1_ps(*job.s.get_unchecked(at)), *ar);
                    }
                    continue;
                }
                if F == Q6K {
                    // Per 16-input sub-block (two groups): 16-bit sums, widened, scaled.
                    let halves = q6_block_sums::<R>(bp.qs.add(h * 32), xq.add(b * BLOCK), cols);
                    for (s, ds) in [bp.d, bp.d2].into_iter().enumerate() {
                        let dw = scales8::<F>(ds, h);
                        for (r, (ar, i32s)) in acc.iter_mut().zip(halves.map(|v| v[s])).enumerate()
                        {
                            let dx = _mm256_set1_ps(*job.d.get_unchecked((r0 + r) * nb + b));
                            *ar = _mm256_fmadd_ps(
                                _mm256_mul_ps(dw, dx),
                                _mm256_cvtepi32_ps(i32s),
                                *ar,
                            );
                        }
                    }
                    continue;
                }
                // Group g's inputs 8g + {0,2,4,6} and 8g + {1,3,5,7} of outputs 8h..8h+8 are
                // at 128g + 32h and 128g + 64 + 32h ([`weights`]).
                let isum = q8_block_sums::<R>(bp.qs.add(h * 32), xq.add(b * BLOCK), cols);
                let dw = scales8::<F>(bp.d, h);
                for (r, (ar, sr)) in acc.iter_mut().zip(&isum).enumerate() {
                    let dx = _mm256_set1_ps(*job.d.get_unchecked((r0 + r) * nb + b));
                    *ar = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(*sr), *ar);
                }
            }
            for (r, ar) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(r * width), *ar);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [QuantFormat; 9] = [
        QuantFormat::Q4_1,
        QuantFormat::Q8_0,
        QuantFormat::Q4K,
        QuantFormat::Q6K,
        QuantFormat::Q5_1,
        QuantFormat::Q5K,
        QuantFormat::Q3K,
        QuantFormat::IQ4NL,
        QuantFormat::IQ4XS,
    ];

    /// `cols` rounded up to whole GGUF blocks of `format` (256 for the k-quants).
    fn wide(format: QuantFormat, cols: usize) -> usize {
        cols.next_multiple_of(format.gguf_block().0)
    }

    /// Random GGUF bytes for a matrix in `format`.
    /// A `(rows, cols)` matrix of [`random_bytes`].
    fn random_matrix(format: QuantFormat, rows: usize, cols: usize, seed: u64) -> QMatrix {
        QMatrix::from_gguf_bytes(format, rows, cols, &random_bytes(format, rows, cols, seed))
            .expect("valid")
    }

    fn random_bytes(format: QuantFormat, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let (values, _) = format.gguf_block();
        let mut out = Vec::new();
        for _ in 0..rows * cols / values {
            let d = half::f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
            match format {
                QuantFormat::Q4_1 => {
                    out.extend(d.to_le_bytes());
                    let m = half::f16::from_f32(-((next() % 1000) as f32) * 1e-4);
                    out.extend(m.to_le_bytes());
                    out.extend((0..16).map(|_| next() as u8));
                }
                QuantFormat::Q8_0 => {
                    out.extend(d.to_le_bytes());
                    out.extend((0..32).map(|_| next() as u8));
                }
                QuantFormat::Q4K | QuantFormat::Q5K => {
                    out.extend(d.to_le_bytes());
                    let dmin = half::f16::from_f32((next() % 1000) as f32 * 1e-5);
                    out.extend(dmin.to_le_bytes());
                    let n = if format == QuantFormat::Q4K { 140 } else { 172 };
                    out.extend((0..n).map(|_| next() as u8));
                }
                QuantFormat::Q5_1 => {
                    out.extend(d.to_le_bytes());
                    let m = half::f16::from_f32(-((next() % 1000) as f32) * 1e-4);
                    out.extend(m.to_le_bytes());
                    out.extend((0..20).map(|_| next() as u8));
                }
                QuantFormat::IQ4NL => {
                    out.extend(d.to_le_bytes());
                    out.extend((0..16).map(|_| next() as u8));
                }
                QuantFormat::IQ4XS => {
                    // Every index and 6-bit scale (sub-block scales of both signs).
                    out.extend(d.to_le_bytes());
                    out.extend((0..134).map(|_| next() as u8));
                }
                QuantFormat::Q3K => {
                    // Every 3-bit quant and 6-bit scale.
                    out.extend((0..108).map(|_| next() as u8));
                    out.extend(d.to_le_bytes());
                }
                QuantFormat::Q6K => {
                    // Every 6-bit quant and 8-bit scale, both signs.
                    out.extend((0..208).map(|_| next() as u8));
                    out.extend(
                        half::f16::from_f32(1e-4 + (next() % 100) as f32 * 1e-6).to_le_bytes(),
                    );
                }
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
    fn matmul_is_the_dequantized_product_up_to_8_bit_activations() {
        for format in ALL {
            let (rows, cols, t) = (37, wide(format, 96), 7);
            let q = random_matrix(format, rows, cols, 3);
            let w = q.dequantize();
            let x = activations(t, cols);
            let y = q.matmul(&x, t);
            for r in 0..t {
                for o in 0..rows {
                    let (want, scale): (f64, f64) = (0..cols)
                        .map(|k| (f64::from(x[r * cols + k]), f64::from(w[o * cols + k])))
                        .fold((0.0, 0.0), |(s, a), (x, w)| (s + x * w, a + (x * w).abs()));
                    let got = f64::from(y[r * rows + o]);
                    // Rounding each activation to 1/254 of its block's range, at most.
                    assert!(
                        (got - want).abs() <= scale / 127.0 + 1e-6,
                        "{format:?} {r},{o}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_row_is_bit_identical_alone_or_batched() {
        for format in ALL {
            let (rows, cols) = (40, wide(format, 96));
            let q = random_matrix(format, rows, cols, 9);
            let x = activations(18, cols);
            // Row tiles of 1–4 and their mixes; 16+ rows are quantized in parallel.
            for t in 1..=18 {
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
    fn prefill_sized_batches_are_bit_identical_to_single_rows() {
        for format in ALL {
            // Whole panels and ≥ 32 rows: row blocks written in place by parallel tasks.
            let (rows, cols, t) = (48, wide(format, 96), 70);
            let q = random_matrix(format, rows, cols, 4);
            let x = activations(t, cols);
            let batched = q.matmul(&x, t);
            for r in 0..t {
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
    fn scalar_and_simd_paths_are_bit_identical() {
        for format in ALL {
            let (rows, cols) = (48, wide(format, 96));
            let q = random_matrix(format, rows, cols, 5);
            // 36 and 38 rows: enough tiles per panel for the unpacked-panel path.
            for t in [1, 2, 3, 4, 5, 7, 36, 38] {
                let x = activations(t, cols);
                let acts = QuantizedActs::new(&x, cols);
                let job = acts.job(&q.panels, 0, t);
                let np = rows / PANEL;
                let (mut a, mut b) = (vec![0f32; t * rows], vec![1f32; t * rows]);
                job.run_scalar(0, np, &mut a);
                job.run(0, np, &mut b);
                assert_eq!(a, b, "{format:?} t={t}");
            }
        }
    }

    #[test]
    fn parts_are_the_columns_of_the_whole_product() {
        // Panel groups that end where parts do, and (14 panels in 4 groups of 3–4) that start
        // and end inside them.
        let shapes: [(usize, &[usize]); 2] = [(96, &[32, 16, 48]), (224, &[96, 48, 80])];
        for (format, (rows, widths)) in ALL.into_iter().flat_map(|f| shapes.map(|s| (f, s))) {
            let cols = wide(format, 64);
            let q = random_matrix(format, rows, cols, 9);
            // Both task layouts: panel groups (few rows) and row blocks (32 or more).
            for t in [1, 3, 17, 40] {
                let x = activations(t, cols);
                let whole = q.matmul(&x, t);
                let parts = q.matmul_parts(&x, t, widths).expect("whole panels");
                let mut at = 0;
                for (part, &w) in parts.iter().zip(widths) {
                    assert_eq!(part.len(), t * w);
                    for r in 0..t {
                        assert_eq!(
                            &part[r * w..(r + 1) * w],
                            &whole[r * rows + at..r * rows + at + w],
                            "{format:?} t={t} part at {at}"
                        );
                    }
                    at += w;
                }
                // Against the scalar reference too.
                let acts = QuantizedActs::new(&x, cols);
                let mut want = vec![0f32; t * rows];
                acts.job(&q.panels, 0, t)
                    .run_scalar(0, rows / PANEL, &mut want);
                assert_eq!(whole, want, "{format:?} t={t}");
            }
            // Rows not a whole number of panels: the padded path, against the scalar one.
            let odd = random_matrix(format, 40, cols, 4);
            for t in [1, 33] {
                let x = activations(t, cols);
                let acts = QuantizedActs::new(&x, cols);
                let mut padded = vec![0f32; t * 48];
                acts.job(&odd.panels, 0, t).run_scalar(0, 3, &mut padded);
                let want: Vec<f32> = padded
                    .chunks_exact(48)
                    .flat_map(|r| r[..40].to_vec())
                    .collect();
                assert_eq!(odd.matmul(&x, t), want, "{format:?} t={t} odd rows");
            }
            let x = activations(2, cols);
            assert!(
                q.matmul_parts(&x, 2, &[40, 56]).is_none(),
                "not whole panels"
            );
            assert!(
                q.matmul_parts(&x, 2, &[32, 32]).is_none(),
                "not all the rows"
            );
        }
    }

    #[test]
    fn matrices_of_different_formats_in_one_call_are_their_own_products() {
        // q/k/v of a Q4_K_M file where v is Q6_K: one call, each output bit for bit its own.
        let cols = 256;
        let parts = [
            random_matrix(QuantFormat::Q4K, 48, cols, 1),
            random_matrix(QuantFormat::Q8_0, 16, cols, 2),
            random_matrix(QuantFormat::Q6K, 32, cols, 3),
        ];
        let refs: Vec<&QMatrix> = parts.iter().collect();
        for t in [1, 3, 17, 40] {
            let x = activations(t, cols);
            let outs = QMatrix::matmul_many(&refs, &x, t).expect("same columns");
            for (part, out) in parts.iter().zip(&outs) {
                assert_eq!(*out, part.matmul(&x, t), "{:?} t={t}", part.format());
            }
        }
        let other = random_matrix(QuantFormat::Q4_1, 16, 64, 4);
        let x = activations(2, cols);
        assert!(QMatrix::matmul_many(&[&parts[0], &other], &x, 2).is_none());
        let odd = random_matrix(QuantFormat::Q8_0, 40, cols, 5);
        assert!(QMatrix::matmul_many(&[&parts[0], &odd], &x, 2).is_none());
    }

    #[test]
    fn vector_and_scalar_activation_quantization_agree() {
        let x = activations(4, 64);
        for (i, xb) in x.chunks_exact(BLOCK).enumerate() {
            let mut xb: [f32; BLOCK] = xb.try_into().expect("block");
            // Exact ties (x · 127 / max = k + ½) and a zero block too.
            if i == 1 {
                xb[0] = 2.0;
                xb[1] = 2.5 * 2.0 / 127.0;
                xb[2] = 3.5 * 2.0 / 127.0;
            }
            if i == 2 {
                xb = [0.0; BLOCK];
            }
            let (mut a, mut b) = ([0i8; BLOCK], [0i8; BLOCK]);
            let want = quantize_block_scalar(&xb, &mut a);
            assert_eq!(quantize_block(&xb, &mut b), want, "block {i}");
            assert_eq!(a, b, "block {i}");
            if i == 1 {
                assert_eq!([a[stored_at(1)], a[stored_at(2)]], [2, 4], "ties to even");
            }
        }
    }

    #[test]
    fn extreme_activations_do_not_overflow() {
        // Every activation quant at ±127 against every Q4_1 quant at 15: the largest sums.
        let (rows, cols) = (16, 64);
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            bytes.extend(half::f16::from_f32(1.0).to_le_bytes());
            bytes.extend(half::f16::from_f32(0.0).to_le_bytes());
            bytes.extend([0xFFu8; 16]);
        }
        let q = QMatrix::from_gguf_bytes(QuantFormat::Q4_1, rows, cols, &bytes).expect("valid");
        for sign in [1.0f32, -1.0] {
            // 127 → scale 1 and quant 127 exactly.
            let y = q.matmul(&vec![sign * 127.0; cols], 1);
            assert!(
                y.iter().all(|&v| v == sign * 15.0 * 127.0 * cols as f32),
                "{y:?}"
            );
        }
    }

    #[test]
    fn extreme_q6_k_sums_stay_in_16_bits() {
        // Every Q6_K quant at −32 (q = 0) against activations at ±127: 8 products of 4,064
        // per 16-bit lane in a sub-block, the most its sums reach.
        let (rows, cols) = (16, 512);
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / SUPER_BLOCK {
            bytes.extend([0u8; 192]);
            bytes.extend([1u8; 16]);
            bytes.extend(half::f16::from_f32(1.0).to_le_bytes());
        }
        let q = QMatrix::from_gguf_bytes(QuantFormat::Q6K, rows, cols, &bytes).expect("valid");
        for sign in [1.0f32, -1.0] {
            let y = q.matmul(&vec![sign * 127.0; cols], 1);
            let want = sign * -32.0 * 127.0 * cols as f32;
            assert!(y.iter().all(|&v| v == want), "{y:?}");
            let y = q.matmul(&vec![sign * 127.0; 5 * cols], 5);
            assert!(y.iter().all(|&v| v == want), "tiles: {y:?}");
        }
        // Q5_1 at its largest quant, 31: 8 products of 3,937 per lane and half-block.
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            bytes.extend(half::f16::from_f32(1.0).to_le_bytes());
            bytes.extend(half::f16::from_f32(0.0).to_le_bytes());
            bytes.extend([0xFFu8; 20]);
        }
        let q = QMatrix::from_gguf_bytes(QuantFormat::Q5_1, rows, cols, &bytes).expect("valid");
        for sign in [1.0f32, -1.0] {
            let want = sign * 31.0 * 127.0 * cols as f32;
            for t in [1, 5] {
                let y = q.matmul(&vec![sign * 127.0; t * cols], t);
                assert!(y.iter().all(|&v| v == want), "Q5_1 t={t}: {y:?}");
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
        // k-quants: whole 256-value super-blocks per row, and their rows gathered too.
        let bytes = random_bytes(QuantFormat::Q6K, 4, 256, 2);
        assert!(QMatrix::from_gguf_bytes(QuantFormat::Q6K, 8, 128, &bytes).is_err());
        let q = QMatrix::from_gguf_bytes(QuantFormat::Q6K, 4, 256, &bytes).expect("valid");
        let g = q.gather_rows(&[3, 1]);
        let (mut a, mut b) = (vec![0f32; 256], vec![0f32; 256]);
        g.dequantize_row(1, &mut a);
        q.dequantize_row(1, &mut b);
        assert_eq!(a, b);
    }
}

#[cfg(test)]
mod candle_agreement {
    use super::*;
    use candle_core::quantized::{ggml_file, GgmlDType};
    use candle_core::Device;

    /// candle's port of ggml's CPU matmul quantizes activations to Q8_1 too, with small
    /// differences from ggml's AVX2 path that we follow (`1/d` for `127/max`, ties away from
    /// zero, `s` rounded as f16 · f16): results agree to a part in a thousand of `Σ|x·w|`; a
    /// layout or sign error would be off by the order of `Σ|x·w|` itself.
    #[test]
    fn matmul_agrees_with_ggml_arithmetic() {
        use candle_core::quantized::QMatMul;
        use candle_core::{Module, Tensor};
        for (format, dtype) in [
            (QuantFormat::Q4_1, GgmlDType::Q4_1),
            (QuantFormat::Q8_0, GgmlDType::Q8_0),
            (QuantFormat::Q4K, GgmlDType::Q4K),
            (QuantFormat::Q6K, GgmlDType::Q6K),
            (QuantFormat::Q5_1, GgmlDType::Q5_1),
            (QuantFormat::Q5K, GgmlDType::Q5K),
            (QuantFormat::Q3K, GgmlDType::Q3K),
        ] {
            let (rows, cols, t) = (24, 256, 3);
            // ggml quantizes the k-quants' activations per 256 (Q8_K), coarser than our 32.
            let tol = if format.gguf_block().0 == BLOCK {
                1e-3
            } else {
                1e-2
            };
            let bytes = tests_support::bytes(format, rows, cols);
            let ours = QMatrix::from_gguf_bytes(format, rows, cols, &bytes).expect("valid");
            let x: Vec<f32> = (0..t * cols)
                .map(|i| ((i * 7919 % 997) as f32 / 498.5 - 1.0) * 0.9)
                .collect();
            let y = ours.matmul(&x, t);
            let qt = ggml_file::qtensor_from_ggml(dtype, &bytes, vec![rows, cols], &Device::Cpu)
                .expect("candle parses");
            let mm = QMatMul::from_qtensor(qt).expect("qmatmul");
            let xt = Tensor::from_slice(&x, (t, cols), &Device::Cpu).expect("x");
            let theirs = mm
                .forward(&xt)
                .and_then(|y| y.flatten_all())
                .and_then(|y| y.to_vec1::<f32>())
                .expect("candle matmul");
            let w = ours.dequantize();
            for (i, (a, b)) in y.iter().zip(&theirs).enumerate() {
                let (r, o) = (i / rows, i % rows);
                let scale: f32 = (0..cols)
                    .map(|k| (x[r * cols + k] * w[o * cols + k]).abs())
                    .sum();
                assert!(
                    (a - b).abs() <= tol * scale,
                    "{format:?} {i}: {a} vs {b} (scale {scale})"
                );
            }
        }
    }

    /// The IQ4 quantizer: weights that are a scale times table values come back exactly
    /// (IQ4_NL); others within 4-bit error (relative RMS under 10%); zeros stay zeros; the
    /// chosen scale fits no worse than the plain `max / 127` guess.
    #[test]
    fn iq4_quantizer_round_trips() {
        let d = half::f16::from_f32(0.0123).to_f32();
        let exact: Vec<f32> = (0..256)
            .map(|i| d * f32::from(IQ4_VALUES[(i * 7 + i / 32) % 16]))
            .collect();
        let bytes = quantize_iq4(QuantFormat::IQ4NL, &exact).expect("whole blocks");
        let back = QMatrix::from_gguf_bytes(QuantFormat::IQ4NL, 1, 256, &bytes)
            .expect("valid")
            .dequantize();
        assert_eq!(back, exact);
        let mut seed = 5u64;
        let x: Vec<f32> = (0..4096)
            .map(|i| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                // Sub-blocks of different magnitudes (IQ4_XS's 6-bit scales at work).
                u * (1.0 + (i / 32 % 8) as f32) * 0.01
            })
            .chain(std::iter::repeat_n(0.0, 256))
            .collect();
        for format in [QuantFormat::IQ4NL, QuantFormat::IQ4XS] {
            let bytes = quantize_iq4(format, &x).expect("whole blocks");
            let back = QMatrix::from_gguf_bytes(format, 1, x.len(), &bytes)
                .expect("valid")
                .dequantize();
            let err: f32 = x.iter().zip(&back).map(|(a, b)| (a - b) * (a - b)).sum();
            let norm: f32 = x.iter().map(|a| a * a).sum();
            assert!(
                (err / norm).sqrt() < 0.1,
                "{format:?}: {}",
                (err / norm).sqrt()
            );
            assert!(back[4096..].iter().all(|&v| v == 0.0), "{format:?}: zeros");
        }
        assert_eq!(quantize_iq4(QuantFormat::Q8_0, &x), None);
        assert_eq!(quantize_iq4(QuantFormat::IQ4XS, &x[..255]), None);
    }

    /// IQ4_NL and IQ4_XS blocks (random, every index and scale) decode bit for bit to the
    /// values llama.cpp's `gguf` Python package gives them (`tests/reference/iq4.json`, made
    /// by `scripts/iq4-reference.py`), as do the matrices' panels read back.
    #[test]
    fn iq4_blocks_match_llama_cpp_gguf_py() {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/iq4.json"),
        )
        .expect("tests/reference/iq4.json");
        let reference: serde_json::Value = serde_json::from_str(&text).expect("json");
        for (format, key) in [
            (QuantFormat::IQ4NL, "IQ4_NL"),
            (QuantFormat::IQ4XS, "IQ4_XS"),
        ] {
            let hex = reference[key]["hex"].as_str().expect("hex");
            let bytes: Vec<u8> = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex byte"))
                .collect();
            let want: Vec<f32> = reference[key]["values"]
                .as_array()
                .expect("values")
                .iter()
                .map(|v| v.as_f64().expect("number") as f32)
                .collect();
            // As one row, and as rows of one GGUF block each (panels of several rows).
            let values = format.gguf_block().0;
            for rows in [1, want.len() / values] {
                let q = QMatrix::from_gguf_bytes(format, rows, want.len() / rows, &bytes)
                    .expect("valid blocks");
                let got = q.dequantize();
                assert_eq!(got.len(), want.len());
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.to_bits(), w.to_bits(), "{key} value {i}: {g} vs {w}");
                }
            }
        }
    }

    /// GGUF blocks of `dtype` as candle dequantizes them (ggml's arithmetic).
    fn candle_dequantized(dtype: GgmlDType, bytes: &[u8], rows: usize, cols: usize) -> Vec<f32> {
        ggml_file::qtensor_from_ggml(dtype, bytes, vec![rows, cols], &Device::Cpu)
            .expect("candle parses")
            .dequantize(&Device::Cpu)
            .expect("dequantize")
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("f32")
    }

    #[test]
    fn dequantization_is_bit_identical_to_ggml() {
        for (format, dtype) in [
            (QuantFormat::Q4_1, GgmlDType::Q4_1),
            (QuantFormat::Q8_0, GgmlDType::Q8_0),
            (QuantFormat::Q4K, GgmlDType::Q4K),
            (QuantFormat::Q6K, GgmlDType::Q6K),
            (QuantFormat::Q5_1, GgmlDType::Q5_1),
            (QuantFormat::Q5K, GgmlDType::Q5K),
            (QuantFormat::Q3K, GgmlDType::Q3K),
        ] {
            let cols = format.gguf_block().0.max(64);
            let bytes = tests_support::bytes(format, 6, cols);
            let ours = QMatrix::from_gguf_bytes(format, 6, cols, &bytes)
                .expect("valid")
                .dequantize();
            let theirs = candle_dequantized(dtype, &bytes, 6, cols);
            assert_eq!(ours, theirs, "{format:?}");
        }
        // Q5_0 (every 5-bit quant) as Q8_0 blocks of the same weights.
        let q5: Vec<u8> = (0..6 * 64 / BLOCK)
            .flat_map(|i| {
                let mut b = half::f16::from_f32(0.01 + i as f32 * 0.003)
                    .to_le_bytes()
                    .to_vec();
                b.extend((0..20u8).map(|j| j.wrapping_mul(53).wrapping_add(i as u8 * 11)));
                b
            })
            .collect();
        let ours = QMatrix::from_gguf_bytes(
            QuantFormat::Q8_0,
            6,
            64,
            &q5_0_as_q8_0(&q5).expect("converts"),
        )
        .expect("valid")
        .dequantize();
        assert_eq!(
            ours,
            candle_dequantized(GgmlDType::Q5_0, &q5, 6, 64),
            "Q5_0"
        );
        assert!(q5_0_as_q8_0(&q5[..21]).is_err());
    }

    #[test]
    fn q4_0_blocks_become_q4_1_blocks_of_the_same_weights() {
        // Scales across f16's range: subnormal, small, ordinary, large; every nibble.
        let mut bytes = Vec::new();
        for (i, d) in [3e-7f32, 1e-4, 0.0123, -0.5, 2.0, 1000.0]
            .iter()
            .enumerate()
        {
            bytes.extend(half::f16::from_f32(*d).to_le_bytes());
            bytes.extend((0..16u8).map(|j| j.wrapping_mul(29).wrapping_add(i as u8 * 7)));
        }
        let converted = q4_0_as_q4_1(&bytes).expect("converts");
        let ours = QMatrix::from_gguf_bytes(QuantFormat::Q4_1, 3, 64, &converted)
            .expect("valid")
            .dequantize();
        let theirs = candle_dequantized(GgmlDType::Q4_0, &bytes, 3, 64);
        assert_eq!(ours, theirs, "bit for bit");
        assert!(q4_0_as_q4_1(&bytes[..17]).is_err());
        let huge = [
            half::f16::from_f32(60000.0).to_le_bytes().to_vec(),
            vec![0; 16],
        ]
        .concat();
        assert!(q4_0_as_q4_1(&huge).is_err(), "−8d beyond f16");
    }

    mod tests_support {
        use super::super::{QuantFormat, BLOCK};
        pub fn bytes(format: QuantFormat, rows: usize, cols: usize) -> Vec<u8> {
            let mut out = Vec::new();
            let (values, _) = format.gguf_block();
            if values > BLOCK {
                for i in 0..rows * cols / values {
                    let pattern = |n: usize, k: u8| {
                        (0..n as u8).map(move |j| j.wrapping_mul(k).wrapping_add(i as u8 * 7))
                    };
                    let d = half::f16::from_f32(0.001 + i as f32 * 0.0007).to_le_bytes();
                    if format == QuantFormat::Q4K || format == QuantFormat::Q5K {
                        out.extend(d);
                        out.extend(half::f16::from_f32(0.002 * i as f32).to_le_bytes());
                        out.extend(pattern(12, 29));
                        if format == QuantFormat::Q5K {
                            out.extend(pattern(32, 83));
                        }
                        out.extend(pattern(128, 37));
                    } else if format == QuantFormat::Q3K {
                        out.extend(pattern(96, 41));
                        out.extend(pattern(12, 67));
                        out.extend(d);
                    } else {
                        out.extend(pattern(192, 41));
                        out.extend(pattern(16, 67));
                        out.extend(d);
                    }
                }
                return out;
            }
            for i in 0..rows * cols / BLOCK {
                out.extend(half::f16::from_f32(0.01 + i as f32 * 0.003).to_le_bytes());
                if format == QuantFormat::Q4_1 {
                    out.extend(half::f16::from_f32(-0.05 * i as f32).to_le_bytes());
                    out.extend((0..16u8).map(|j| j.wrapping_mul(37).wrapping_add(i as u8)));
                } else if format == QuantFormat::Q5_1 {
                    out.extend(half::f16::from_f32(-0.05 * i as f32).to_le_bytes());
                    out.extend((0..20u8).map(|j| j.wrapping_mul(37).wrapping_add(i as u8)));
                } else {
                    out.extend((0..32u8).map(|j| j.wrapping_mul(53).wrapping_add(i as u8)));
                }
            }
            out
        }
    }
}
