//! Privacy amplification: finite-key output length and Toeplitz hashing.
//!
//! **Output length** — Lim, Curty, Walenta, Xu, Zbinden, "Concise security bounds for
//! practical decoy-state quantum key distribution", PRA 89, 022307 (2014), Eq. (1):
//!
//! `l = floor( s_0 + s_1 (1 - h(phi_1)) - leak_EC - 6 log2(21/eps_sec) - log2(2/eps_cor) )`
//!
//! where `s_0`, `s_1` are lower bounds on vacuum and single-photon contributions to
//! the key bits, `phi_1` the upper bound on the single-photon phase-error rate (from
//! [`crate::bb84::estimation`]), and `leak_EC` the *actual* disclosure: every Cascade parity
//! bit plus the public verification tag bits. The key is `eps_sec + eps_cor` secure.
//!
//! **Hash** — `y = T x` with an `m x n` Toeplitz matrix `T_{ij} = t_{i-j+n-1}` given by
//! `n+m-1` public random bits (2-universal family, leftover hash lemma). `y_i` is
//! entry `i+n-1` of the integer convolution `t * x` reduced mod 2; it is computed
//! with one complex FFT of the packed sequence `t + i x` and one inverse FFT
//! (O((n+m) log(n+m))). [`toeplitz_hash_naive`] is the O(nm) reference for tests.

use crate::bb84::bits::BitVec;
use crate::bb84::fft::FftPlan;
use crate::bb84::math::h2;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Privacy-amplification failures.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PaError {
    /// Output longer than input.
    #[error("output length {m} exceeds input length {n}")]
    OutputTooLong {
        /// Requested output.
        m: usize,
        /// Input length.
        n: usize,
    },
    /// Seed length is not `n + m - 1`.
    #[error("Toeplitz seed has {got} bits, expected {expected}")]
    SeedLength {
        /// Required.
        expected: usize,
        /// Supplied.
        got: usize,
    },
    /// Sizes beyond what f64 FFT convolution is validated for.
    #[error("input too large for the FFT hash ({0} bits)")]
    TooLarge(usize),
}

/// Security parameters of the final key.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SecurityParams {
    /// Secrecy parameter `eps_sec`.
    pub eps_sec: f64,
    /// Correctness parameter `eps_cor` (must be >= the verification collision bound).
    pub eps_cor: f64,
}

impl Default for SecurityParams {
    fn default() -> Self {
        SecurityParams {
            eps_sec: 1e-10,
            eps_cor: 1e-15,
        }
    }
}

/// Inputs of the key-length formula.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KeyLengthInputs {
    /// Key bits entering privacy amplification.
    pub n_key: u64,
    /// Lower bound on vacuum-origin bits.
    pub s0: f64,
    /// Lower bound on single-photon bits.
    pub s1: f64,
    /// Upper bound on single-photon phase error rate.
    pub phi1: f64,
    /// Error-correction disclosure (parity bits).
    pub leak_ec: u64,
    /// Verification tag bits disclosed.
    pub leak_verify: u64,
}

/// Secret key length per Lim et al. 2014, Eq. (1); 0 if negative, at most `n_key`.
pub fn secret_key_length(inp: &KeyLengthInputs, sec: &SecurityParams) -> u64 {
    if inp.phi1.is_nan() || inp.phi1 >= 0.5 || sec.eps_sec <= 0.0 || sec.eps_cor <= 0.0 {
        return 0;
    }
    let l = inp.s0 + inp.s1 * (1.0 - h2(inp.phi1))
        - inp.leak_ec as f64
        - inp.leak_verify as f64
        - 6.0 * (21.0 / sec.eps_sec).log2()
        - (2.0 / sec.eps_cor).log2();
    if l.is_nan() || l <= 0.0 {
        return 0;
    }
    (l.floor() as u64).min(inp.n_key)
}

/// Expand a public 64-bit seed into the `n + m - 1` Toeplitz bits (ChaCha12 stream).
pub fn toeplitz_seed_bits(n: usize, m: usize, seed: u64) -> BitVec {
    let len = (n + m).saturating_sub(1);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut words: Vec<u64> = (0..len.div_ceil(64)).map(|_| rng.next_u64()).collect();
    if !len.is_multiple_of(64) {
        if let Some(w) = words.last_mut() {
            *w &= (1u64 << (len % 64)) - 1;
        }
    }
    BitVec::from_words(words, len).unwrap_or_default()
}

fn check(key: &BitVec, seed: &BitVec, m: usize) -> Result<(), PaError> {
    let n = key.len();
    if m > n {
        return Err(PaError::OutputTooLong { m, n });
    }
    let expected = (n + m).saturating_sub(1);
    if m > 0 && seed.len() != expected {
        return Err(PaError::SeedLength {
            expected,
            got: seed.len(),
        });
    }
    Ok(())
}

/// Reference O(n m) Toeplitz product (tests only; far too slow for real frames).
pub fn toeplitz_hash_naive(key: &BitVec, seed: &BitVec, m: usize) -> Result<BitVec, PaError> {
    check(key, seed, m)?;
    let n = key.len();
    Ok(BitVec::from_bools((0..m).map(|i| {
        (0..n).fold(false, |acc, j| acc ^ (seed.get(i + n - 1 - j) & key.get(j)))
    })))
}

/// Set `dst[u] = bit(lo + u)` of `v` (0.0 / 1.0) for `u < dst.len()`; bits outside
/// `v` (including negative positions `lo + u < 0`) read as 0.
fn fill_bits(v: &BitVec, lo: isize, dst: &mut [f64]) {
    let words = v.words();
    let len = v.len() as isize;
    for (u, d) in dst.iter_mut().enumerate() {
        let p = lo + u as isize;
        *d = if p >= 0 && p < len {
            let p = p as usize;
            words
                .get(p >> 6)
                .map_or(0.0, |w| ((w >> (p & 63)) & 1) as f64)
        } else {
            0.0
        };
    }
}

/// Split of the key into `pieces` blocks of `block` bits and the transform size.
///
/// `T x = sum_k T_k x_k` where `T_k` is the `m x block` Toeplitz matrix of a seed
/// segment, so the spectra of the `pieces` convolutions (each of size
/// `>= m + block - 1`) are summed and inverted once. Smaller transforms can win
/// when `m` is small compared with `n`; the cost model counts one complex FFT per
/// piece plus a half-size inverse.
fn split_plan(n: usize, m: usize) -> (usize, usize, usize) {
    let mut best = (f64::MAX, 1, n, 4);
    for pieces in 1..=32usize {
        let block = n.div_ceil(pieces);
        if pieces > 1 && block * (pieces - 1) >= n {
            continue;
        }
        let l = (m + block - 1).next_power_of_two().max(4);
        let lf = l as f64;
        let cost = (pieces as f64 + 0.5) * lf * lf.log2() + pieces as f64 * 3.0 * lf;
        if cost < best.0 {
            best = (cost, pieces, block, l);
        }
    }
    (best.1, best.2, best.3)
}

/// Offset step between the FFT arrays, in doubles (5 cache lines).
const PAD: usize = 40;

/// Fast Toeplitz hash via FFT convolution.
pub fn toeplitz_hash(key: &BitVec, seed: &BitVec, m: usize) -> Result<BitVec, PaError> {
    check(key, seed, m)?;
    if m == 0 {
        return Ok(BitVec::default());
    }
    let n = key.len();
    // Convolution entries are < 2^27 for n < 2^27: exact after rounding in f64 with
    // ample margin (FFT error ~ 1e-16 * sqrt(n m) * log L).
    if n >= 1 << 27 {
        return Err(PaError::TooLarge(n));
    }
    let (pieces, block, l) = split_plan(n, m);
    let plan = FftPlan::get(l);
    let half_plan = FftPlan::get(l / 2);
    // The four arrays are walked in lockstep; offsets of a few cache lines apart keep equal
    // indices from landing in the same cache sets (large allocations are page-aligned).
    let mut bufs = [0usize, 1, 2, 3].map(|i| vec![0f64; l + PAD * i]);
    let [acc_re_buf, acc_im_buf, re_buf, im_buf] = &mut bufs;
    let acc_re = &mut acc_re_buf[..l];
    let acc_im = &mut acc_im_buf[PAD..PAD + l];
    let re = &mut re_buf[2 * PAD..2 * PAD + l];
    let im = &mut im_buf[3 * PAD..3 * PAD + l];
    // Z = FFT(t + i x). With A = Z_k, B = Z_{-k}: T_k X_k = -i (A^2 - conj(B)^2) / 4.
    let prod = |xr: f64, xi: f64, yr: f64, yi: f64| {
        // D = x^2 - conj(y)^2; P = -i D / 4 = (D.im, -D.re) / 4.
        let d_re = xr * xr - xi * xi - (yr * yr - yi * yi);
        let d_im = 2.0 * xr * xi + 2.0 * yr * yi;
        (0.25 * d_im, -0.25 * d_re)
    };
    for k in 0..pieces {
        // Piece k: key bits [k*block, (k+1)*block) (zero-padded past n); its seed
        // segment s_u = t_{u + n - k*block - block}, u < m + block - 1, so that
        // y_i gets entry i + block - 1 of s * x_k.
        let x_lo = (k * block) as isize;
        let t_lo = n as isize - x_lo - block as isize;
        let seg = m + block - 1;
        fill_bits(seed, t_lo, &mut re[..seg]);
        re[seg..].fill(0.0);
        fill_bits(key, x_lo, &mut im[..block]);
        im[block..].fill(0.0);
        plan.forward_dif(re, im);
        // In bit-reversed storage the partner of slot s in octave [2^j, 2^{j+1}) is the
        // mirrored slot 3*2^j - 1 - s (and slot 0 pairs with itself), so the pass reads
        // two sequential streams instead of doing random accesses.
        if let (Some(r0), Some(i0), Some(ar), Some(ai)) = (
            re.first(),
            im.first(),
            acc_re.first_mut(),
            acc_im.first_mut(),
        ) {
            let p = prod(*r0, *i0, *r0, *i0);
            *ar += p.0;
            *ai += p.1;
        }
        let mut oct = 1;
        while oct < l {
            let seg_re = &re[oct..2 * oct];
            let seg_im = &im[oct..2 * oct];
            let acc_r = &mut acc_re[oct..2 * oct];
            let acc_i = &mut acc_im[oct..2 * oct];
            for a in 0..oct.div_ceil(2) {
                let b = oct - 1 - a;
                let (ar, ai, br, bi) = (seg_re[a], seg_im[a], seg_re[b], seg_im[b]);
                let p1 = prod(ar, ai, br, bi);
                acc_r[a] += p1.0;
                acc_i[a] += p1.1;
                if b != a {
                    let p2 = prod(br, bi, ar, ai);
                    acc_r[b] += p2.0;
                    acc_i[b] += p2.1;
                }
            }
            oct *= 2;
        }
    }

    // Real-output inverse through a half-size complex transform: slot j of the
    // result holds l * (c_{2j} + i c_{2j+1}).
    plan.real_inverse_pre(acc_re, acc_im);
    half_plan.inverse_dit(&mut acc_re[..l / 2], &mut acc_im[..l / 2]);
    let scale = 1.0 / l as f64;
    let off = block - 1;
    let bit = |v: f64| ((v * scale).round() as i64) & 1 == 1;
    let mut words = vec![0u64; m.div_ceil(64)];
    for (i, w) in words.iter_mut().enumerate() {
        let mut acc = 0u64;
        for b in 0..64.min(m - 64 * i) {
            let idx = off + 64 * i + b;
            let v = if idx & 1 == 0 {
                acc_re.get(idx >> 1)
            } else {
                acc_im.get(idx >> 1)
            };
            if v.is_some_and(|&v| bit(v)) {
                acc |= 1u64 << b;
            }
        }
        *w = acc;
    }
    BitVec::from_words(words, m).map_err(|_| PaError::TooLarge(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bb84::cascade::random_key;

    #[test]
    fn fast_equals_naive_on_random_sizes() {
        let mut rng = StdRng::seed_from_u64(1);
        for &(n, m) in &[
            (1usize, 1usize),
            (2, 1),
            (7, 3),
            (64, 64),
            (100, 37),
            (513, 200),
            (1000, 999),
            (2049, 1500),
            (5000, 10),
            (3000, 100),
            (4097, 1),
            (6000, 700),
        ] {
            let key = random_key(n, &mut rng);
            let seed = toeplitz_seed_bits(n, m, rng.next_u64());
            let fast = toeplitz_hash(&key, &seed, m).unwrap();
            let slow = toeplitz_hash_naive(&key, &seed, m).unwrap();
            assert_eq!(fast, slow, "n={n} m={m}");
        }
    }

    #[test]
    fn split_plan_uses_pieces_for_short_outputs() {
        assert_eq!(split_plan(1000, 999).0, 1);
        let (pieces, block, l) = split_plan(1_050_000, 60_000);
        assert!(pieces > 1);
        assert!(block * pieces >= 1_050_000 && l >= 60_000 + block - 1);
        assert!(split_plan(5000, 10).0 > 1);
    }

    #[test]
    fn large_hash_is_linear() {
        // Linearity check at a realistic size (naive would be too slow): T(a^b) = Ta ^ Tb.
        let mut rng = StdRng::seed_from_u64(2);
        let n = 1 << 18;
        let m = 100_000;
        let a = random_key(n, &mut rng);
        let b = random_key(n, &mut rng);
        let seed = toeplitz_seed_bits(n, m, 9);
        let ha = toeplitz_hash(&a, &seed, m).unwrap();
        let hb = toeplitz_hash(&b, &seed, m).unwrap();
        let hab = toeplitz_hash(&a.xor(&b), &seed, m).unwrap();
        assert_eq!(hab, ha.xor(&hb));
        // And spot-check a few output bits against the definition.
        for i in [0usize, 1, 5_000, m - 1] {
            let bit = (0..n).fold(false, |acc, j| acc ^ (seed.get(i + n - 1 - j) & a.get(j)));
            assert_eq!(ha.get(i), bit);
        }
    }

    fn length_at(q: f64) -> u64 {
        let n = 1_000_000u64;
        let inp = KeyLengthInputs {
            n_key: n,
            s0: 0.0,
            s1: 0.6 * n as f64,
            phi1: q * 1.1,
            leak_ec: (1.1 * h2(q) * n as f64) as u64,
            leak_verify: 64,
        };
        secret_key_length(&inp, &SecurityParams::default())
    }

    #[test]
    fn key_length_monotone_and_zero_above_threshold() {
        let mut last = u64::MAX;
        for q in [0.005, 0.01, 0.02, 0.03, 0.05, 0.07] {
            let l = length_at(q);
            assert!(l < last, "q={q} l={l}");
            last = l;
        }
        assert!(length_at(0.01) > 300_000);
        assert_eq!(length_at(0.11), 0);
        assert_eq!(length_at(0.2), 0);
        let tiny = KeyLengthInputs {
            n_key: 100,
            s0: 0.0,
            s1: 100.0,
            phi1: 0.0,
            leak_ec: 0,
            leak_verify: 64,
        };
        assert_eq!(secret_key_length(&tiny, &SecurityParams::default()), 0);
    }
}
