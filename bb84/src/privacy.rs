//! Privacy amplification: Toeplitz hashing of the corrected key down to the length the
//! finite-key bound allows ([`crate::finite_key`]).
//!
//! `y = T x` with an `m x n` Toeplitz matrix `T_{ij} = t_{i-j+n-1}` given by
//! `n+m-1` public, uniformly random bits, all of them sent (a 2-universal family, so the
//! leftover hash lemma applies; a short seed expanded by a PRNG would not be). `y_i` is
//! entry `i+n-1` of the integer convolution `t * x` reduced mod 2; it is computed
//! with one complex FFT of the packed sequence `t + i x` and one real-output inverse FFT
//! (O((n+m) log(n+m)); `rustfft` and `realfft`, which pick SIMD kernels at run time).
//! [`toeplitz_hash_naive`] is the O(nm) reference for tests.

use crate::bits::{for_each_one_in, BitVec};
use crate::cascade::random_key;
use crate::parallel;
use rand::Rng;
use realfft::{ComplexToReal, RealFftPlanner};
use rustfft::{num_complex::Complex, Fft, FftPlanner};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use thiserror::Error;

/// Privacy-amplification failures.
#[derive(Debug, Error, Clone, PartialEq)]
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
    /// A convolution value came out farther than `EXACTNESS_MARGIN` from an integer: the two
    /// ends might round it differently (their SIMD kernels may differ), so the frame aborts.
    #[error("FFT hash not exact: a value {0} away from an integer")]
    Inexact(f64),
}

/// Largest distance from an integer a convolution value may have: the FFT's error is about
/// 1e-16 * sqrt(n m) * log L, some 1e-9 at the largest frames, so anything near this margin
/// means the arithmetic went wrong, not a rounding question.
const EXACTNESS_MARGIN: f64 = 1e-3;

/// The parity of the integer `v` stands for, if `v` is within `EXACTNESS_MARGIN` of it.
fn exact_parity(v: f64) -> Result<bool, PaError> {
    let nearest = v.round();
    if (v - nearest).abs() > EXACTNESS_MARGIN || !v.is_finite() {
        return Err(PaError::Inexact((v - nearest).abs()));
    }
    Ok((nearest as i64) & 1 == 1)
}

/// A Toeplitz seed of `n + m - 1` bits drawn whole from `rng` (the KME passes its
/// OS-seeded CSPRNG), not expanded from a short seed: the family of all `m x n` Toeplitz
/// matrices is 2-universal only when every one of them can be drawn with equal chance.
pub fn random_toeplitz_seed<R: Rng + ?Sized>(n: usize, m: usize, rng: &mut R) -> BitVec {
    random_key((n + m).saturating_sub(1), rng)
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

/// For every set bit `lo + u` of `v` with `u < dst.len()`, `set(dst[u])`: `dst` is zeroed
/// beforehand, so only the ones (about half the bits) are written. Positions outside `v`
/// (including negative ones) read as 0.
fn fill_ones<T>(v: &BitVec, lo: isize, dst: &mut [T], set: impl Fn(&mut T)) {
    let first = usize::try_from(lo).unwrap_or(0);
    let end = usize::try_from(lo + dst.len() as isize).unwrap_or(0);
    for_each_one_in(v, first..end, |p| {
        if let Some(d) = dst.get_mut((p as isize - lo) as usize) {
            set(d);
        }
    });
}

/// Split of the key into `pieces` blocks of `block` bits and the transform size, for
/// `workers` threads.
///
/// `T x = sum_k T_k x_k` where `T_k` is the `m x block` Toeplitz matrix of a seed
/// segment, so the spectra of the `pieces` convolutions (each of size
/// `>= m + block - 1`) are summed and inverted once. Smaller transforms can win
/// when `m` is small compared with `n`, and pieces run side by side on the workers; the
/// cost model counts the complex FFTs on the busiest worker plus a half-size inverse.
fn split_plan(n: usize, m: usize, workers: usize) -> (usize, usize, usize) {
    let mut best = (f64::MAX, 1, n, 4);
    for pieces in 1..=32usize {
        let block = n.div_ceil(pieces);
        if pieces > 1 && block * (pieces - 1) >= n {
            continue;
        }
        let l = transform_len(m + block - 1);
        let lf = l as f64;
        let rounds = pieces.div_ceil(workers.max(1)) as f64;
        let cost = (rounds + 0.5) * lf * lf.log2() + rounds * 3.0 * lf;
        if cost < best.0 {
            best = (cost, pieces, block, l);
        }
    }
    (best.1, best.2, best.3)
}

/// The smallest even length `>= need` of the form `c * 2^k` with `c` in {1, 3, 5, 9, 15, 25}:
/// rustfft is fast on such sizes, and they waste far less padding than powers of two alone.
fn transform_len(need: usize) -> usize {
    [1usize, 3, 5, 9, 15, 25]
        .iter()
        .map(|&c| c * need.div_ceil(c).next_power_of_two())
        .filter(|l| l.is_multiple_of(2))
        .min()
        .unwrap_or(need.next_power_of_two())
        .max(4)
}

/// Buffers of one worker. A frame's hash needs tens of MiB, and fresh pages for every frame
/// cost more (page faults) than the transforms themselves, so workspaces are pooled and
/// reused frame after frame: at most [`parallel::workers`] of them are kept, and a buffer
/// far larger than the frame at hand is given back (see [`fit`]).
#[derive(Default)]
struct Workspace {
    z: Vec<Complex<f64>>,
    /// Half spectrum (bins 0..=l/2) of this worker's pieces of the convolution.
    acc: Vec<Complex<f64>>,
    scratch: Vec<Complex<f64>>,
    out: Vec<f64>,
}

static WORKSPACES: Mutex<Vec<Workspace>> = Mutex::new(Vec::new());

fn take_workspace() -> Workspace {
    WORKSPACES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .pop()
        .unwrap_or_default()
}

fn return_workspaces(spent: impl IntoIterator<Item = Workspace>) {
    let mut pool = WORKSPACES.lock().unwrap_or_else(PoisonError::into_inner);
    pool.extend(spent);
    pool.truncate(parallel::workers());
}

/// `v` with `len` elements of `fill`, its allocation kept unless it is over twice `len`.
fn fit<T: Clone>(v: &mut Vec<T>, len: usize, fill: T) {
    if v.capacity() > 2 * len.max(1 << 16) {
        *v = Vec::new();
    }
    v.resize(len, fill);
}

/// The transforms of one length: a complex forward FFT and a real-output inverse.
type Plans = (Arc<dyn Fft<f64>>, Arc<dyn ComplexToReal<f64>>);

/// Plans of the lengths used last, shared by every worker (a plan holds twiddle tables as
/// large as its transform). A link's frames use a few lengths; older ones are dropped.
static PLANS: Mutex<VecDeque<(usize, Plans)>> = Mutex::new(VecDeque::new());
const PLANS_KEPT: usize = 4;

fn plans(l: usize) -> Plans {
    let mut cache = PLANS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, plans)) = cache.iter().find(|(len, _)| *len == l) {
        return plans.clone();
    }
    let plans: Plans = (
        FftPlanner::new().plan_fft_forward(l),
        RealFftPlanner::new().plan_fft_inverse(l),
    );
    cache.push_back((l, plans.clone()));
    if cache.len() > PLANS_KEPT {
        cache.pop_front();
    }
    plans
}

/// Fast `m`-bit Toeplitz hash of `key` (`n` bits) with `seed` (`n + m - 1` bits).
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
    let (pieces, block, l) = split_plan(n, m, parallel::workers());
    let shares: Vec<Vec<usize>> = (0..parallel::workers().min(pieces))
        .map(|w| (w..pieces).step_by(parallel::workers()).collect())
        .collect();
    let (forward, inverse) = plans(l);
    let job = Pieces {
        key,
        seed,
        m,
        block,
        forward: forward.as_ref(),
    };
    let mut spent = parallel::map(&shares, |share| {
        let mut ws = take_workspace();
        pieces_spectrum(&mut ws, &job, share);
        ws
    });
    let result = match spent.split_first_mut() {
        Some((first, rest)) => {
            for other in rest.iter() {
                for (sum, part) in first.acc.iter_mut().zip(&other.acc) {
                    *sum += part;
                }
            }
            inverse_bits(first, inverse.as_ref(), m, block)
        }
        None => Err(PaError::TooLarge(n)),
    };
    return_workspaces(spent);
    result
}

/// The pieces of `key` (each `block` bits) of one hash: their seed segments and transform.
struct Pieces<'a> {
    key: &'a BitVec,
    seed: &'a BitVec,
    m: usize,
    block: usize,
    forward: &'a dyn Fft<f64>,
}

/// Sum of the half spectra of the convolutions of `share`'s pieces, into `ws.acc`.
fn pieces_spectrum(ws: &mut Workspace, pieces: &Pieces, share: &[usize]) {
    let Pieces {
        key,
        seed,
        m,
        block,
        forward,
    } = *pieces;
    let l = forward.len();
    let n = key.len();
    let zero = Complex::new(0.0, 0.0);
    let half = l / 2;
    fit(&mut ws.z, l, zero);
    let scratch_len = forward.get_inplace_scratch_len();
    fit(&mut ws.scratch, scratch_len, zero);
    ws.acc.clear();
    fit(&mut ws.acc, half + 1, zero);
    let z = &mut ws.z[..l];
    for &k in share {
        // Piece k: key bits [k*block, (k+1)*block) (zero-padded past n); its seed
        // segment s_u = t_{u + n - k*block - block}, u < m + block - 1, so that
        // y_i gets entry i + block - 1 of s * x_k.
        let x_lo = (k * block) as isize;
        let t_lo = n as isize - x_lo - block as isize;
        let seg = m + block - 1;
        // One complex transform of t + i x gives both spectra: with A = Z_j and
        // B = Z_{-j}, T_j X_j = -i (A^2 - conj(B)^2) / 4.
        z.fill(zero);
        fill_ones(seed, t_lo, &mut z[..seg], |c| c.re = 1.0);
        fill_ones(key, x_lo, &mut z[..block], |c| c.im = 1.0);
        forward.process_with_scratch(z, &mut ws.scratch[..scratch_len]);
        let product = |a: Complex<f64>, b: Complex<f64>| {
            let d = a * a - b.conj() * b.conj();
            Complex::new(0.25 * d.im, -0.25 * d.re)
        };
        if let (Some(slot), Some(&z0)) = (ws.acc.first_mut(), z.first()) {
            *slot += product(z0, z0);
        }
        // Bin j (1 <= j <= l/2) pairs with bin l - j: walk z[1..=l/2] forwards and
        // z[l/2..l] backwards instead of indexing modulo l.
        let (low, high) = z.split_at(half);
        let ups = low.iter().skip(1).chain(high.first());
        let downs = high.iter().rev();
        for (slot, (&a, &b)) in ws.acc.iter_mut().skip(1).zip(ups.zip(downs)) {
            *slot += product(a, b);
        }
    }
}

/// Bits `block - 1 .. block - 1 + m` of the convolution whose half spectrum is `ws.acc`.
fn inverse_bits(
    ws: &mut Workspace,
    inverse: &dyn ComplexToReal<f64>,
    m: usize,
    block: usize,
) -> Result<BitVec, PaError> {
    let l = inverse.len();
    let scratch_len = inverse.get_scratch_len();
    if ws.scratch.len() < scratch_len {
        fit(&mut ws.scratch, scratch_len, Complex::new(0.0, 0.0));
    }
    fit(&mut ws.out, l, 0.0);
    // The bins 0 and l/2 of a real sequence's spectrum are real (rounding aside).
    if let Some(first) = ws.acc.first_mut() {
        first.im = 0.0;
    }
    if let Some(last) = ws.acc.last_mut() {
        last.im = 0.0;
    }
    inverse
        .process_with_scratch(&mut ws.acc, &mut ws.out, &mut ws.scratch[..scratch_len])
        .map_err(|_| PaError::TooLarge(l))?;
    let scale = 1.0 / l as f64;
    let out = ws.out.get(block - 1..block - 1 + m).unwrap_or_default();
    let mut words = Vec::with_capacity(m.div_ceil(64));
    for chunk in out.chunks(64) {
        let mut word = 0u64;
        for (b, &v) in chunk.iter().enumerate() {
            word |= u64::from(exact_parity(v * scale)?) << b;
        }
        words.push(word);
    }
    BitVec::from_words(words, m).map_err(|_| PaError::TooLarge(l))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, RngExt, SeedableRng};

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
            (1600, 801),
            (2500, 2000),
            (9000, 4500),
        ] {
            let key = random_key(n, &mut rng);
            let seed = random_toeplitz_seed(n, m, &mut rng);
            let fast = toeplitz_hash(&key, &seed, m).unwrap();
            let slow = toeplitz_hash_naive(&key, &seed, m).unwrap();
            assert_eq!(fast, slow, "n={n} m={m}");
        }
    }

    #[test]
    fn the_seed_is_drawn_whole_and_must_have_full_length() {
        let (n, m) = (1_000, 300);
        let mut rng = StdRng::seed_from_u64(5);
        let seed = random_toeplitz_seed(n, m, &mut rng);
        assert_eq!(seed.len(), n + m - 1);
        // Every one of the n + m - 1 bits is drawn: about half of them are ones, up to the
        // last word (a seed expanded from 64 bits would also pass this; the length of what
        // travels is what matters, checked at the receiving end below).
        assert!(
            (500..800).contains(&seed.count_ones()),
            "{}",
            seed.count_ones()
        );
        assert_ne!(random_toeplitz_seed(n, m, &mut rng), seed);
        let key = random_key(n, &mut rng);
        let short = random_toeplitz_seed(n, m - 1, &mut rng);
        assert_eq!(
            toeplitz_hash(&key, &short, m),
            Err(PaError::SeedLength {
                expected: n + m - 1,
                got: n + m - 2
            })
        );
    }

    /// At the size of a default frame (10^6 key bits and more, a third of them kept), sampled
    /// output bits against the definition: the FFT's rounding must hold where it is tightest.
    #[test]
    fn a_full_frame_hash_matches_the_naive_product_on_sampled_bits() {
        let mut rng = StdRng::seed_from_u64(13);
        let (n, m) = (1_100_000, 400_000);
        let key = random_key(n, &mut rng);
        let seed = random_toeplitz_seed(n, m, &mut rng);
        let fast = toeplitz_hash(&key, &seed, m).unwrap();
        let ones: Vec<usize> = (0..n).filter(|&j| key.get(j)).collect();
        let samples = [0, 1, 2, m / 3, m / 2, m - 2, m - 1]
            .into_iter()
            .chain((0..57).map(|_| rng.random_range(0..m)));
        for i in samples {
            let bit = ones
                .iter()
                .fold(false, |acc, &j| acc ^ seed.get(i + n - 1 - j));
            assert_eq!(fast.get(i), bit, "output bit {i}");
        }
    }

    #[test]
    fn a_value_off_an_integer_aborts_instead_of_being_rounded() {
        assert_eq!(exact_parity(3.0 + 1e-9), Ok(true));
        assert_eq!(exact_parity(4.0 - 1e-9), Ok(false));
        assert!(matches!(exact_parity(2.5), Err(PaError::Inexact(_))));
        assert!(matches!(exact_parity(7.01), Err(PaError::Inexact(_))));
        assert!(exact_parity(f64::NAN).is_err());
    }

    #[test]
    fn transform_lengths_are_even_smooth_and_tight() {
        assert_eq!(transform_len(2400), 2560);
        assert_eq!(transform_len(2048), 2048);
        assert_eq!(transform_len(1_600_000), 1_638_400);
        assert_eq!(transform_len(1), 4);
        for need in 3..5000 {
            let l = transform_len(need);
            assert!(
                l >= need && l.is_multiple_of(2) && l < 2 * need.max(2),
                "{need} -> {l}"
            );
        }
    }

    #[test]
    fn split_plan_uses_pieces_for_short_outputs() {
        assert_eq!(split_plan(1000, 999, 1).0, 1);
        let (pieces, block, l) = split_plan(1_050_000, 60_000, 1);
        assert!(pieces > 1);
        assert!(block * pieces >= 1_050_000 && l >= 60_000 + block - 1);
        assert!(split_plan(5000, 10, 1).0 > 1);
    }

    #[test]
    fn large_hash_is_linear() {
        // Linearity check at a realistic size (naive would be too slow): T(a^b) = Ta ^ Tb.
        let mut rng = StdRng::seed_from_u64(2);
        let n = 1 << 18;
        let m = 100_000;
        let a = random_key(n, &mut rng);
        let b = random_key(n, &mut rng);
        let seed = random_toeplitz_seed(n, m, &mut StdRng::seed_from_u64(9));
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
}
