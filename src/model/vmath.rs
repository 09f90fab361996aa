//! Vectorisable elementwise math shared by serving and training: plain arithmetic that the
//! compiler turns into AVX2 code inside a `target_feature` function (chosen at run time), and
//! that computes the same values lane by lane as the scalar fallback (no FMA contraction).

/// `e^x` to within a few ulp (Cephes' `expf` polynomial; `x` clamped to `[-87.3, 88]`), in
/// plain arithmetic that the compiler vectorises over a slice — libm's `expf` is a call per
/// element, and the training step takes ~10⁸ exponentials (softmaxes, SiLU).
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 · 2²³: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    p = p * r * r + r + 1.0;
    let k = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    p * f32::from_bits(((k + 127) as u32) << 23)
}

/// SiLU in place, `x / (1 + e^(−x))`.
pub fn silu_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        #[allow(unsafe_code)]
        // SAFETY: AVX2 and FMA were detected at run time.
        unsafe {
            silu_avx2(xs)
        };
        return;
    }
    silu_portable(xs);
}

/// `silu(g) · u` into `gate`: SiLU rounded, then the product rounded, as two passes would.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gate and up widths");
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        #[allow(unsafe_code)]
        // SAFETY: AVX2 and FMA were detected at run time.
        unsafe {
            silu_mul_avx2(gate, up)
        };
        return;
    }
    silu_mul_portable(gate, up);
}

/// `out[i] = e^((xs[i] − shift) / div)` (softmax weights at a temperature), resized to fit.
pub fn exp_shifted(xs: &[f32], shift: f32, div: f32, out: &mut Vec<f32>) {
    out.clear();
    out.resize(xs.len(), 0.0);
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        #[allow(unsafe_code)]
        // SAFETY: AVX2 and FMA were detected at run time.
        unsafe {
            exp_shifted_avx2(xs, shift, div, out)
        };
        return;
    }
    exp_shifted_portable(xs, shift, div, out);
}

#[inline(always)]
fn exp_shifted_portable(xs: &[f32], shift: f32, div: f32, out: &mut [f32]) {
    out.iter_mut()
        .zip(xs)
        .for_each(|(o, &x)| *o = fast_exp((x - shift) / div));
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(xs: &[f32], shift: f32, div: f32, out: &mut [f32]) {
    exp_shifted_portable(xs, shift, div, out)
}

#[inline(always)]
fn silu_mul_portable(gate: &mut [f32], up: &[f32]) {
    gate.iter_mut()
        .zip(up)
        .for_each(|(g, u)| *g = *g / (fast_exp(-*g) + 1.0) * u);
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
    silu_mul_portable(gate, up)
}

#[inline(always)]
fn silu_portable(xs: &mut [f32]) {
    xs.iter_mut().for_each(|x| *x /= fast_exp(-*x) + 1.0);
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_avx2(xs: &mut [f32]) {
    silu_portable(xs)
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    use std::sync::OnceLock;
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_matches_the_libm_form() {
        let mut xs: Vec<f32> = (0..=3600).map(|i| -80.0 + i as f32 * 0.05).collect();
        let want: Vec<f32> = xs.iter().map(|&x| x / ((-x).exp() + 1.0)).collect();
        silu_in_place(&mut xs);
        for (g, w) in xs.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 4.0 * f32::EPSILON * w.abs().max(1e-30),
                "{g} vs {w}"
            );
        }
        // The vector and scalar forms agree bit for bit (odd length: a scalar tail too).
        let mut a: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let mut b = a.clone();
        silu_in_place(&mut a);
        silu_portable(&mut b);
        assert_eq!(a, b);
        // Fused with the product: the bits of the two passes.
        let g: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.53).cos() * 7.0).collect();
        let u: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.29).sin() * 3.0).collect();
        let mut two = g.clone();
        silu_in_place(&mut two);
        two.iter_mut().zip(&u).for_each(|(x, u)| *x *= u);
        let mut fused = g.clone();
        silu_mul(&mut fused, &u);
        assert_eq!(fused, two);
        let mut scalar = g;
        silu_mul_portable(&mut scalar, &u);
        assert_eq!(scalar, two);
    }

    #[test]
    fn shifted_exponentials_match_libm_and_the_scalar_form() {
        let xs: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.41).sin() * 30.0).collect();
        let mut out = Vec::new();
        exp_shifted(&xs, 30.0, 0.7, &mut out);
        for (&x, &o) in xs.iter().zip(&out) {
            let want = ((x - 30.0) / 0.7).exp();
            assert!(
                (o - want).abs() <= 4.0 * f32::EPSILON * want.max(1e-30),
                "{o} vs {want}"
            );
        }
        let mut scalar = vec![0.0; xs.len()];
        exp_shifted_portable(&xs, 30.0, 0.7, &mut scalar);
        assert_eq!(out, scalar);
        // The largest value's weight is exactly 1 (the sampler's min-p floor relies on it).
        exp_shifted(&[2.5, 1.0], 2.5, 1.3, &mut out);
        assert_eq!(out[0], 1.0);
    }
}
