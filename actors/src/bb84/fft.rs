//! Radix-2 complex FFT (f64, split real/imaginary arrays) used by the Toeplitz hash.
//!
//! Privacy amplification needs a ~2^21-point convolution per frame, so this is tuned
//! for that one job: the forward transform is decimation-in-frequency leaving its
//! output in bit-reversed order, the inverse is decimation-in-time consuming
//! bit-reversed input, so no bit-reversal permutation pass is ever needed (pointwise
//! products do not care about order). Twiddles are computed directly with `sin_cos`
//! (no recurrence drift) once per size and cached process-wide.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Twiddle factors for one transform size: entries `[h, 2h)` hold
/// `exp(-2 pi i j / (2h))` for `j < h`, i.e. the twiddles of the stage with half-size `h`.
#[derive(Debug)]
pub struct FftPlan {
    n: usize,
    re: Vec<f64>,
    im: Vec<f64>,
}

impl FftPlan {
    fn new(n: usize) -> Self {
        let mut re = vec![0.0; n.max(1)];
        let mut im = vec![0.0; n.max(1)];
        let mut h = 1;
        while h < n {
            for j in 0..h {
                let ang = -std::f64::consts::PI * j as f64 / h as f64;
                let (s, c) = ang.sin_cos();
                if let (Some(r), Some(i)) = (re.get_mut(h + j), im.get_mut(h + j)) {
                    *r = c;
                    *i = s;
                }
            }
            h *= 2;
        }
        FftPlan { n, re, im }
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

    /// Forward DIF transform in place; output in bit-reversed order.
    ///
    /// Stages whose butterflies span more than [`BLOCK`] points run as full passes;
    /// the remaining small stages run block by block while the block is cache-hot,
    /// which cuts memory traffic from log2(n) passes to about log2(n/BLOCK) + 1.
    pub fn forward_dif(&self, re: &mut [f64], im: &mut [f64]) {
        let mut h = self.n / 2;
        while h >= 1 && 2 * h > BLOCK {
            self.dif_stage(re, im, h);
            h /= 2;
        }
        if h == 0 {
            return;
        }
        for (cr, ci) in re.chunks_mut(2 * h).zip(im.chunks_mut(2 * h)) {
            let mut hh = h;
            while hh >= 1 {
                self.dif_stage(cr, ci, hh);
                hh /= 2;
            }
        }
    }

    fn dif_stage(&self, re: &mut [f64], im: &mut [f64], h: usize) {
        if h == 1 {
            // Twiddle is 1: plain sum/difference, without per-chunk iterator setup.
            radix2_unit(re, im);
            return;
        }
        let (wr, wi) = self.stage(h);
        for (cr, ci) in re.chunks_exact_mut(2 * h).zip(im.chunks_exact_mut(2 * h)) {
            let (ar, br) = cr.split_at_mut(h);
            let (ai, bi) = ci.split_at_mut(h);
            for (((((xr, xi), yr), yi), c), s) in ar
                .iter_mut()
                .zip(ai.iter_mut())
                .zip(br.iter_mut())
                .zip(bi.iter_mut())
                .zip(wr.iter())
                .zip(wi.iter())
            {
                let (dr, di) = (*xr - *yr, *xi - *yi);
                *xr += *yr;
                *xi += *yi;
                *yr = dr * c - di * s;
                *yi = dr * s + di * c;
            }
        }
    }

    /// Inverse DIT transform in place from bit-reversed input to natural order,
    /// unnormalised (caller divides by `n`). Same cache blocking as the forward pass.
    pub fn inverse_dit(&self, re: &mut [f64], im: &mut [f64]) {
        let top = (self.n / 2).min(BLOCK / 2);
        if top >= 1 {
            for (cr, ci) in re.chunks_mut(2 * top).zip(im.chunks_mut(2 * top)) {
                let mut hh = 1;
                while hh <= top {
                    self.dit_stage(cr, ci, hh);
                    hh *= 2;
                }
            }
        }
        let mut h = 2 * top.max(1);
        while h < self.n {
            self.dit_stage(re, im, h);
            h *= 2;
        }
    }

    fn dit_stage(&self, re: &mut [f64], im: &mut [f64], h: usize) {
        if h == 1 {
            radix2_unit(re, im);
            return;
        }
        let (wr, wi) = self.stage(h);
        for (cr, ci) in re.chunks_exact_mut(2 * h).zip(im.chunks_exact_mut(2 * h)) {
            let (ar, br) = cr.split_at_mut(h);
            let (ai, bi) = ci.split_at_mut(h);
            for (((((xr, xi), yr), yi), c), s) in ar
                .iter_mut()
                .zip(ai.iter_mut())
                .zip(br.iter_mut())
                .zip(bi.iter_mut())
                .zip(wr.iter())
                .zip(wi.iter())
            {
                // Conjugate twiddle for the inverse.
                let tr = *yr * c + *yi * s;
                let ti = *yi * c - *yr * s;
                *yr = *xr - tr;
                *yi = *xi - ti;
                *xr += tr;
                *xi += ti;
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

/// Points processed per cache-resident block (2 x 16 KiB-point f64 arrays = 256 KiB).
const BLOCK: usize = 1 << 14;

/// Bit-reversal of `k` within `bits` bits.
#[inline]
pub fn bit_reverse(k: usize, bits: u32) -> usize {
    if bits == 0 {
        return 0;
    }
    k.reverse_bits() >> (usize::BITS - bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_dft() {
        let n = 16;
        let plan = FftPlan::get(n);
        let xr: Vec<f64> = (0..n).map(|i| (i * i % 7) as f64).collect();
        let xi: Vec<f64> = (0..n).map(|i| (i % 3) as f64).collect();
        let (mut re, mut im) = (xr.clone(), xi.clone());
        plan.forward_dif(&mut re, &mut im);
        // Compare with a direct DFT, undoing the bit-reversed order.
        for k in 0..n {
            let (mut sr, mut si) = (0.0, 0.0);
            for j in 0..n {
                let a = -2.0 * std::f64::consts::PI * (j * k) as f64 / n as f64;
                sr += xr[j] * a.cos() - xi[j] * a.sin();
                si += xr[j] * a.sin() + xi[j] * a.cos();
            }
            let s = bit_reverse(k, 4);
            assert!((re[s] - sr).abs() < 1e-9 && (im[s] - si).abs() < 1e-9);
        }
        plan.inverse_dit(&mut re, &mut im);
        for j in 0..n {
            assert!((re[j] / n as f64 - xr[j]).abs() < 1e-9);
            assert!((im[j] / n as f64 - xi[j]).abs() < 1e-9);
        }
    }
}
