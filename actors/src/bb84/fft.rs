//! Complex FFT (f64, split real/imaginary arrays) used by the Toeplitz hash.
//!
//! Privacy amplification needs ~2^17..2^21-point convolutions per frame, so this is
//! tuned for that one job: the forward transform is decimation-in-frequency leaving its
//! output in bit-reversed order, the inverse is decimation-in-time consuming
//! bit-reversed input, so no bit-reversal permutation pass is ever needed (pointwise
//! products do not care about order). Pairs of radix-2 stages are fused into radix-4
//! passes (3 complex multiplies per 4 points, half the memory passes), and the small
//! stages run block by block while the block is cache-hot. Twiddles are computed
//! directly with `sin_cos` (no recurrence drift) once per size and cached process-wide.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Twiddle factors for one transform size.
///
/// * `re`/`im` entries `[h, 2h)` hold `exp(-2 pi i j / (2h))` for `j < h`, the twiddles
///   of the radix-2 stage with half-size `h`;
/// * `re3`/`im3` entries `[h/2, h)` hold `exp(-2 pi i 3j / (2h))` for `j < h/2`, the
///   third twiddle of the fused radix-4 pass with top half-size `h`;
/// * `brev_re`/`brev_im` entry `r < n/2` holds `exp(-2 pi i k / n)` with
///   `k = bit_reverse(r, log2(n/2))` (real-output inverse, see [`FftPlan::real_inverse_pre`]).
#[derive(Debug)]
pub struct FftPlan {
    n: usize,
    re: Vec<f64>,
    im: Vec<f64>,
    re3: Vec<f64>,
    im3: Vec<f64>,
    brev_re: Vec<f64>,
    brev_im: Vec<f64>,
}

/// Points processed per cache-resident block (2 x 16 KiB-point f64 arrays = 256 KiB).
const BLOCK: usize = 1 << 14;

impl FftPlan {
    fn new(n: usize) -> Self {
        // Every twiddle is a power of W = exp(-2 pi i / n): compute the n/2 powers of
        // the top stage with `sin_cos` once and gather the other tables from them
        // (W^{k + n/2} = -W^k), so plan creation costs n/2 `sin_cos` calls.
        let half = n / 2;
        let (top_re, top_im): (Vec<f64>, Vec<f64>) = (0..half)
            .map(|k| {
                let ang = -2.0 * std::f64::consts::PI * k as f64 / n as f64;
                let (s, c) = ang.sin_cos();
                (c, s)
            })
            .unzip();
        let w = |k: usize| -> (f64, f64) {
            let k = k % n.max(1);
            if k < half {
                (top_re[k], top_im[k])
            } else {
                (-top_re[k - half], -top_im[k - half])
            }
        };
        let mut re = vec![0.0; n.max(1)];
        let mut im = vec![0.0; n.max(1)];
        let mut re3 = vec![0.0; n.max(1)];
        let mut im3 = vec![0.0; n.max(1)];
        let mut h = 1;
        while h < n {
            // exp(-2 pi i j / (2h)) = W^{j n / (2h)}.
            let stride = n / (2 * h);
            for j in 0..h {
                let (c, s) = w(j * stride);
                re[h + j] = c;
                im[h + j] = s;
            }
            for j in 0..h / 2 {
                let (c, s) = w(3 * j * stride);
                re3[h / 2 + j] = c;
                im3[h / 2 + j] = s;
            }
            h *= 2;
        }
        let bits = half.trailing_zeros();
        let (brev_re, brev_im) = (0..half).map(|r| w(bit_reverse(r, bits))).unzip();
        FftPlan {
            n,
            re,
            im,
            re3,
            im3,
            brev_re,
            brev_im,
        }
    }

    /// Cached plan for a power-of-two size.
    pub fn get(n: usize) -> Arc<FftPlan> {
        static CACHE: OnceLock<Mutex<HashMap<usize, Arc<FftPlan>>>> = OnceLock::new();
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        match cache.lock() {
            Ok(mut m) => m
                .entry(n)
                .or_insert_with(|| Arc::new(FftPlan::new(n)))
                .clone(),
            // A poisoned lock only means another thread panicked mid-insert; build afresh.
            Err(_) => Arc::new(FftPlan::new(n)),
        }
    }

    /// Transform size.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True for the degenerate size 0.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn stage(&self, h: usize) -> (&[f64], &[f64]) {
        (
            self.re.get(h..2 * h).unwrap_or(&[]),
            self.im.get(h..2 * h).unwrap_or(&[]),
        )
    }

    fn stage3(&self, h: usize) -> (&[f64], &[f64]) {
        (
            self.re3.get(h / 2..h).unwrap_or(&[]),
            self.im3.get(h / 2..h).unwrap_or(&[]),
        )
    }

    /// Pass schedule: fused radix-4 tops of the full-array passes, the cache block
    /// size, the radix-4 tops inside a block, and whether a final radix-2 (h = 1)
    /// stage remains. Listed in DIF (forward) order.
    fn schedule(&self) -> (Vec<usize>, usize, Vec<usize>, bool) {
        let mut big = Vec::new();
        let mut h = self.n / 2;
        while h >= 2 && 2 * h > BLOCK {
            big.push(h);
            h /= 4;
        }
        let block = 2 * h;
        let mut small = Vec::new();
        while h >= 2 {
            small.push(h);
            h /= 4;
        }
        (big, block, small, h == 1)
    }

    /// Forward DIF transform in place; output in bit-reversed order.
    pub fn forward_dif(&self, re: &mut [f64], im: &mut [f64]) {
        if self.n < 2 {
            return;
        }
        let (big, block, small, last2) = self.schedule();
        for &h in &big {
            self.dif4(re, im, h);
        }
        if block < 2 {
            return;
        }
        for (cr, ci) in re.chunks_mut(block).zip(im.chunks_mut(block)) {
            for &h in &small {
                self.dif4(cr, ci, h);
            }
            if last2 {
                radix2_unit(cr, ci);
            }
        }
    }

    /// Inverse DIT transform in place from bit-reversed input to natural order,
    /// unnormalised (caller divides by `n`). Mirror image of [`FftPlan::forward_dif`].
    pub fn inverse_dit(&self, re: &mut [f64], im: &mut [f64]) {
        if self.n < 2 {
            return;
        }
        let (big, block, small, last2) = self.schedule();
        if block >= 2 {
            for (cr, ci) in re.chunks_mut(block).zip(im.chunks_mut(block)) {
                if last2 {
                    radix2_unit(cr, ci);
                }
                for &h in small.iter().rev() {
                    self.dit4(cr, ci, h);
                }
            }
        }
        for &h in big.iter().rev() {
            self.dit4(re, im, h);
        }
    }

    /// The twiddles of a fused radix-4 step over blocks of `2h`: `w^j`, `w^2j`, `w^3j` for
    /// `j < h/2` (re, im each), shared by `dif4` and `dit4`.
    fn quarter_twiddles(&self, h: usize) -> [&[f64]; 6] {
        let q = h / 2;
        let (w1r, w1i) = self.stage(h);
        let (w2r, w2i) = self.stage(q);
        let (w3r, w3i) = self.stage3(h);
        [w1r, w1i, w2r, w2i, w3r, w3i].map(|w| w.get(..q).unwrap_or(w))
    }

    /// Fused DIF stages `h` and `h/2` (`h >= 2`) over blocks of `2h` points.
    fn dif4(&self, re: &mut [f64], im: &mut [f64], h: usize) {
        let q = h / 2;
        if q == 1 {
            for (cr, ci) in re.chunks_exact_mut(4).zip(im.chunks_exact_mut(4)) {
                if let ([ar, br, cr, dr], [ai, bi, ci, di]) = (cr, ci) {
                    let (s0r, s0i) = (*ar + *cr, *ai + *ci);
                    let (ur, ui) = (*ar - *cr, *ai - *ci);
                    let (s1r, s1i) = (*br + *dr, *bi + *di);
                    let (vr, vi) = (*bi - *di, *dr - *br);
                    *ar = s0r + s1r;
                    *ai = s0i + s1i;
                    *br = s0r - s1r;
                    *bi = s0i - s1i;
                    *cr = ur + vr;
                    *ci = ui + vi;
                    *dr = ur - vr;
                    *di = ui - vi;
                }
            }
            return;
        }
        let [w1r, w1i, w2r, w2i, w3r, w3i] = self.quarter_twiddles(h);
        for_each_quarters(re, im, h, |[ar, br, cr, dr], [ai, bi, ci, di]| {
            for j in 0..q {
                let (a_r, a_i, b_r, b_i) = (ar[j], ai[j], br[j], bi[j]);
                let (c_r, c_i, d_r, d_i) = (cr[j], ci[j], dr[j], di[j]);
                let (s0r, s0i) = (a_r + c_r, a_i + c_i);
                let (ur, ui) = (a_r - c_r, a_i - c_i);
                let (s1r, s1i) = (b_r + d_r, b_i + d_i);
                // v = (b - d) * (-i)
                let (vr, vi) = (b_i - d_i, d_r - b_r);
                ar[j] = s0r + s1r;
                ai[j] = s0i + s1i;
                let (xr, xi) = (s0r - s1r, s0i - s1i);
                br[j] = xr * w2r[j] - xi * w2i[j];
                bi[j] = xr * w2i[j] + xi * w2r[j];
                let (xr, xi) = (ur + vr, ui + vi);
                cr[j] = xr * w1r[j] - xi * w1i[j];
                ci[j] = xr * w1i[j] + xi * w1r[j];
                let (xr, xi) = (ur - vr, ui - vi);
                dr[j] = xr * w3r[j] - xi * w3i[j];
                di[j] = xr * w3i[j] + xi * w3r[j];
            }
        });
    }

    /// Fused DIT stages `h/2` and `h` (`h >= 2`, conjugate twiddles) over blocks of `2h`.
    fn dit4(&self, re: &mut [f64], im: &mut [f64], h: usize) {
        let q = h / 2;
        if q == 1 {
            for (cr, ci) in re.chunks_exact_mut(4).zip(im.chunks_exact_mut(4)) {
                if let ([ar, br, cr, dr], [ai, bi, ci, di]) = (cr, ci) {
                    let (a1r, a1i) = (*ar + *br, *ai + *bi);
                    let (b1r, b1i) = (*ar - *br, *ai - *bi);
                    let (t1r, t1i) = (*cr + *dr, *ci + *di);
                    // t2 = i (c - d)
                    let (t2r, t2i) = (*di - *ci, *cr - *dr);
                    *ar = a1r + t1r;
                    *ai = a1i + t1i;
                    *cr = a1r - t1r;
                    *ci = a1i - t1i;
                    *br = b1r + t2r;
                    *bi = b1i + t2i;
                    *dr = b1r - t2r;
                    *di = b1i - t2i;
                }
            }
            return;
        }
        let [w1r, w1i, w2r, w2i, w3r, w3i] = self.quarter_twiddles(h);
        for_each_quarters(re, im, h, |[ar, br, cr, dr], [ai, bi, ci, di]| {
            for j in 0..q {
                let (a_r, a_i, b_r, b_i) = (ar[j], ai[j], br[j], bi[j]);
                let (c_r, c_i, d_r, d_i) = (cr[j], ci[j], dr[j], di[j]);
                // x * conj(w) = (xr c + xi s, xi c - xr s)
                let (rr, ri) = (b_r * w2r[j] + b_i * w2i[j], b_i * w2r[j] - b_r * w2i[j]);
                let (pr, pi) = (c_r * w1r[j] + c_i * w1i[j], c_i * w1r[j] - c_r * w1i[j]);
                let (qr, qi) = (d_r * w3r[j] + d_i * w3i[j], d_i * w3r[j] - d_r * w3i[j]);
                let (a1r, a1i) = (a_r + rr, a_i + ri);
                let (b1r, b1i) = (a_r - rr, a_i - ri);
                let (t1r, t1i) = (pr + qr, pi + qi);
                // t2 = i (p - q)
                let (t2r, t2i) = (qi - pi, pr - qr);
                ar[j] = a1r + t1r;
                ai[j] = a1i + t1i;
                cr[j] = a1r - t1r;
                ci[j] = a1i - t1i;
                br[j] = b1r + t2r;
                bi[j] = b1i + t2i;
                dr[j] = b1r - t2r;
                di[j] = b1i - t2i;
            }
        });
    }

    /// Real-output inverse, step 1. `re`/`im` (length `n`, bit-reversed order) hold the
    /// spectrum `P` of a real sequence `c` of length `n`; this packs it in place into
    /// the first `n/2` slots as the bit-reversed spectrum of `z_j = c_{2j} + i c_{2j+1}`
    /// (times 2), so that an unnormalised size-`n/2` [`FftPlan::inverse_dit`] on those
    /// slots yields `n * z`.
    pub fn real_inverse_pre(&self, re: &mut [f64], im: &mut [f64]) {
        // Slot 2r holds P_k with k = bitrev(r) < n/2 and slot 2r+1 holds P_{k+n/2}.
        // E = P_k + P_{k+n/2}, O = (P_k - P_{k+n/2}) conj(W^k), Z = E + i O.
        let half = self.n / 2;
        for r in 0..half.min(self.brev_re.len()) {
            let (Some(&p0r), Some(&p0i), Some(&p1r), Some(&p1i)) = (
                re.get(2 * r),
                im.get(2 * r),
                re.get(2 * r + 1),
                im.get(2 * r + 1),
            ) else {
                return;
            };
            let (c, s) = (self.brev_re[r], self.brev_im[r]);
            let (er, ei) = (p0r + p1r, p0i + p1i);
            let (dr, di) = (p0r - p1r, p0i - p1i);
            let (or, oi) = (dr * c + di * s, di * c - dr * s);
            if let (Some(zr), Some(zi)) = (re.get_mut(r), im.get_mut(r)) {
                *zr = er - oi;
                *zi = ei + or;
            }
        }
    }
}

/// Size-2 butterflies with unit twiddle (identical for DIF and DIT).
fn radix2_unit(re: &mut [f64], im: &mut [f64]) {
    for (r, i) in re.chunks_exact_mut(2).zip(im.chunks_exact_mut(2)) {
        if let ([r0, r1], [i0, i1]) = (r, i) {
            let (a, b) = (*r0, *r1);
            *r0 = a + b;
            *r1 = a - b;
            let (a, b) = (*i0, *i1);
            *i0 = a + b;
            *i1 = a - b;
        }
    }
}

/// Bit-reversal of `k` within `bits` bits.
#[inline]
pub fn bit_reverse(k: usize, bits: u32) -> usize {
    if bits == 0 {
        return 0;
    }
    k.reverse_bits() >> (usize::BITS - bits)
}

/// Calls `f` on every block of `2h` points, split into its four quarters of `h/2` points
/// (real parts, then imaginary parts): the shape both fused radix-4 passes walk.
#[inline(always)]
fn for_each_quarters(
    re: &mut [f64],
    im: &mut [f64],
    h: usize,
    mut f: impl FnMut([&mut [f64]; 4], [&mut [f64]; 4]),
) {
    let q = h / 2;
    for (cr, ci) in re.chunks_exact_mut(2 * h).zip(im.chunks_exact_mut(2 * h)) {
        let (abr, cdr) = cr.split_at_mut(h);
        let (abi, cdi) = ci.split_at_mut(h);
        let (ar, br) = abr.split_at_mut(q);
        let (cr, dr) = cdr.split_at_mut(q);
        let (ai, bi) = abi.split_at_mut(q);
        let (ci, di) = cdi.split_at_mut(q);
        // Exactly q long each, so the callers' index loops need no bounds checks.
        f(
            [&mut ar[..q], &mut br[..q], &mut cr[..q], &mut dr[..q]],
            [&mut ai[..q], &mut bi[..q], &mut ci[..q], &mut di[..q]],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_size(n: usize) {
        let plan = FftPlan::get(n);
        let bits = n.trailing_zeros();
        let xr: Vec<f64> = (0..n).map(|i| (i * i % 7) as f64).collect();
        let xi: Vec<f64> = (0..n).map(|i| (i % 3) as f64).collect();
        let (mut re, mut im) = (xr.clone(), xi.clone());
        plan.forward_dif(&mut re, &mut im);
        // Compare with a direct DFT, undoing the bit-reversed order.
        for k in 0..n {
            let (mut sr, mut si) = (0.0, 0.0);
            for j in 0..n {
                let a = -2.0 * std::f64::consts::PI * ((j * k) % n) as f64 / n as f64;
                sr += xr[j] * a.cos() - xi[j] * a.sin();
                si += xr[j] * a.sin() + xi[j] * a.cos();
            }
            let s = bit_reverse(k, bits);
            assert!(
                (re[s] - sr).abs() < 1e-6 && (im[s] - si).abs() < 1e-6,
                "n={n} k={k}"
            );
        }
        plan.inverse_dit(&mut re, &mut im);
        for j in 0..n {
            assert!((re[j] / n as f64 - xr[j]).abs() < 1e-9, "n={n}");
            assert!((im[j] / n as f64 - xi[j]).abs() < 1e-9, "n={n}");
        }
    }

    #[test]
    fn roundtrip_and_dft() {
        for n in [1usize, 2, 4, 8, 16, 32, 64, 128, 512] {
            check_size(n);
        }
        // Sizes beyond the cache block exercise the full-array passes.
        for n in [BLOCK * 2, BLOCK * 4] {
            let plan = FftPlan::get(n);
            let xr: Vec<f64> = (0..n).map(|i| (i * i % 7) as f64).collect();
            let xi: Vec<f64> = (0..n).map(|i| (i % 3) as f64).collect();
            let (mut re, mut im) = (xr.clone(), xi.clone());
            plan.forward_dif(&mut re, &mut im);
            // DC term sits in slot 0; check it and the round trip.
            let sum_r: f64 = xr.iter().sum();
            assert!((re[0] - sum_r).abs() < 1e-6);
            plan.inverse_dit(&mut re, &mut im);
            for j in 0..n {
                assert!((re[j] / n as f64 - xr[j]).abs() < 1e-9);
                assert!((im[j] / n as f64 - xi[j]).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn real_inverse_matches_complex_inverse() {
        for n in [4usize, 8, 64, 1024] {
            let plan = FftPlan::get(n);
            let half = FftPlan::get(n / 2);
            let x: Vec<f64> = (0..n).map(|i| ((i * 5 + 3) % 11) as f64).collect();
            let (mut re, mut im) = (x.clone(), vec![0.0; n]);
            plan.forward_dif(&mut re, &mut im);
            plan.real_inverse_pre(&mut re, &mut im);
            half.inverse_dit(&mut re[..n / 2], &mut im[..n / 2]);
            for j in 0..n / 2 {
                assert!((re[j] / n as f64 - x[2 * j]).abs() < 1e-9, "n={n} j={j}");
                assert!(
                    (im[j] / n as f64 - x[2 * j + 1]).abs() < 1e-9,
                    "n={n} j={j}"
                );
            }
        }
    }
}
