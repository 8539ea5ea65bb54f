//! Parameter estimation: QBER from a random disclosed sample and decoy-state bounds
//! on the single-photon yield and error rate.
//!
//! * Sample: each signal-class sifted bit is disclosed with probability
//!   `sample_fraction`, positions drawn from a PRNG seeded by a seed Alice announces.
//!   The upper bound on the error rate of the *remaining* (key) bits inverts the
//!   Chernoff–Hoeffding bound, valid for sampling without replacement
//!   (Hoeffding 1963): with probability `>= 1 - eps_pe` the population rate is below
//!   `p_U`, so the remaining bits hold at most `N p_U - e_obs` errors.
//! * Decoy: vacuum + weak decoy bounds of Ma, Qi, Zhao, Lo, PRA 72, 012326 (2005):
//!   `Y1_L = mu/(mu nu - nu^2) [Q_nu e^nu - Q_mu e^mu nu^2/mu^2 - (mu^2-nu^2)/mu^2 Y0]`,
//!   `e1_U = (E_nu Q_nu e^nu - e0 Y0) / (Y1_L nu)`, `Q1_L = Y1_L mu e^{-mu}`, with every
//!   measured gain/error replaced by its Chernoff bound in the conservative direction
//!   (finite-size treatment in the spirit of Ma et al.'s fluctuation analysis).
//!   All decoy-class sifted bits are disclosed, so `E_nu` is measured exactly on them.
//!
//! Abort if the QBER upper bound exceeds the threshold (default 11 %).

use crate::bits::{byte_eq_mask, for_each_one, BitVec};
use crate::math::{chernoff_lower, chernoff_upper};
use crate::sifting::SiftedKey;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Estimation outcomes that stop the frame.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum EstimationError {
    /// Upper confidence bound on QBER above threshold (possible eavesdropping).
    #[error("QBER upper bound {upper:.4} exceeds threshold {threshold:.4}")]
    QberTooHigh {
        /// QBER observed on the sample.
        observed: f64,
        /// Upper bound computed.
        upper: f64,
        /// Configured threshold.
        threshold: f64,
    },
    /// Decoy analysis gave no positive single-photon yield (too few counts).
    #[error("decoy-state bound on single-photon yield is not positive")]
    NoSinglePhotons,
    /// Sample or decoy disclosure inconsistent with local data.
    #[error("disclosure has {got} bits, expected {expected}")]
    DisclosureLength {
        /// Expected bits.
        expected: usize,
        /// Received bits.
        got: usize,
    },
    /// Not enough sifted signal bits to sample from.
    #[error("too few sifted signal bits ({0})")]
    TooFewBits(usize),
}

/// Public estimation parameters (both ends must use the same values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EstimationConfig {
    /// Fraction of signal-class sifted bits disclosed for QBER estimation.
    pub sample_fraction: f64,
    /// Abort threshold on the QBER upper bound.
    pub qber_threshold: f64,
    /// Failure probability of each statistical bound.
    pub eps_pe: f64,
    /// Mean photon numbers `[mu, nu, vacuum]`.
    pub intensities: [f64; 3],
    /// Minimum number of sifted signal bits to proceed.
    pub min_signal_bits: usize,
}

impl Default for EstimationConfig {
    fn default() -> Self {
        EstimationConfig {
            sample_fraction: 0.05,
            qber_threshold: 0.11,
            eps_pe: 1e-10,
            intensities: [0.5, 0.1, 0.0],
            min_signal_bits: 10_000,
        }
    }
}

/// Alice → Bob: the sample seed and her bits needed for estimation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleDisclosure {
    /// Seed from which both ends derive the sample positions.
    pub sample_seed: u64,
    /// Alice's bits at the sampled signal positions (in order).
    pub sample_bits: BitVec,
    /// Alice's bits for all sifted decoy-class positions.
    pub decoy_bits: BitVec,
}

/// Sifted bits split by intensity class.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClassSplit {
    /// Signal-class bits (key candidates).
    pub signal: BitVec,
    /// Weak-decoy bits (fully disclosed).
    pub decoy: BitVec,
    /// Vacuum-class sifted count (their bits carry no information).
    pub vacuum_count: usize,
}

/// Split a sifted key by class code.
///
/// Word-parallel: builds per-class masks 64 codes at a time, then compacts the bits.
pub fn split_by_class(s: &SiftedKey) -> ClassSplit {
    let signal_mask = byte_eq_mask(&s.classes, 0);
    let decoy_mask = byte_eq_mask(&s.classes, 1);
    let signal = s.bits.select(&signal_mask);
    let decoy = s.bits.select(&decoy_mask);
    let vacuum_count = s.classes.len() - signal.len() - decoy.len();
    ClassSplit {
        signal,
        decoy,
        vacuum_count,
    }
}

/// Sample mask over `n` positions: each chosen independently with probability `fraction`
/// rounded to a multiple of 2^-16.
pub fn sample_mask(n: usize, fraction: f64, seed: u64) -> BitVec {
    let mut rng = StdRng::seed_from_u64(seed);
    let threshold = sample_threshold(fraction);
    // Each PRNG draw gives four 16-bit lanes, one per position, in order (the sequence is
    // part of the protocol); a position is chosen when its lane is below the threshold.
    let mut words = Vec::with_capacity(n.div_ceil(64));
    let mut left = n;
    while left > 0 {
        let k = left.min(64);
        let mut w = 0u64;
        for j in (0..k).step_by(4) {
            let draw = rng.next_u64();
            for lane in 0..4.min(k - j) {
                let x = (draw >> (16 * lane)) & 0xffff;
                w |= u64::from(x < threshold) << (j + lane);
            }
        }
        words.push(w);
        left -= k;
    }
    BitVec::from_words_lossy(words, n)
}

/// `fraction` in units of 2^-16 (0 ..= 65536).
fn sample_threshold(fraction: f64) -> u64 {
    (fraction.clamp(0.0, 1.0) * 65_536.0).round() as u64
}

/// Split `bits` into (sampled, remaining key) according to `mask`.
pub fn apply_sample(bits: &BitVec, mask: &BitVec) -> (BitVec, BitVec) {
    let sampled = bits.select(mask);
    let key = bits.select(&mask.not());
    (sampled, key)
}

/// Upper bound on the error rate of the `remaining` unsampled bits, given `errors`
/// in a uniformly random sample of `sample` bits; fails with probability `<= eps`.
pub fn qber_upper_bound(sample: u64, errors: u64, remaining: u64, eps: f64) -> f64 {
    if remaining == 0 {
        return 0.0;
    }
    let p_u = chernoff_upper(errors, sample, eps);
    let total = (sample + remaining) as f64;
    ((total * p_u - errors as f64) / remaining as f64).clamp(0.0, 1.0)
}

/// Public counts entering the decoy analysis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecoyStats {
    /// Pulses sent per class.
    pub pulses: [u64; 3],
    /// Detections per class.
    pub detections: [u64; 3],
    /// Sifted decoy bits compared.
    pub decoy_sifted: u64,
    /// Errors among them.
    pub decoy_errors: u64,
}

/// Decoy-state bounds (all per pulse of the stated class).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DecoyBounds {
    /// Lower / upper bounds on the vacuum yield `Y0`.
    pub y0: (f64, f64),
    /// Upper bound on the signal gain `Q_mu`.
    pub q_mu_upper: f64,
    /// Lower bound on the single-photon yield `Y1`.
    pub y1_lower: f64,
    /// Lower bound on the single-photon signal gain `Q1 = Y1 mu e^{-mu}`.
    pub q1_lower: f64,
    /// Upper bound on the single-photon error rate from the decoy class.
    pub e1_upper: f64,
}

/// Vacuum + weak decoy bounds (Ma et al. 2005) with Chernoff finite-size corrections.
pub fn decoy_bounds(
    stats: &DecoyStats,
    mu: f64,
    nu: f64,
    eps: f64,
) -> Result<DecoyBounds, EstimationError> {
    let [s, d, v] = [0, 1, 2].map(|i| (stats.detections[i], stats.pulses[i]));
    let y0_l = chernoff_lower(v.0, v.1, eps);
    let y0_u = chernoff_upper(v.0, v.1, eps);
    let q_mu_u = chernoff_upper(s.0, s.1, eps);
    let q_nu_l = chernoff_lower(d.0, d.1, eps);
    let q_nu_u = chernoff_upper(d.0, d.1, eps);
    let e_nu_u = chernoff_upper(stats.decoy_errors, stats.decoy_sifted, eps);
    let y1_l = mu / (mu * nu - nu * nu)
        * (q_nu_l * nu.exp()
            - q_mu_u * mu.exp() * nu * nu / (mu * mu)
            - (mu * mu - nu * nu) / (mu * mu) * y0_u);
    if y1_l.is_nan() || y1_l <= 0.0 {
        return Err(EstimationError::NoSinglePhotons);
    }
    let e1_u = ((e_nu_u * q_nu_u * nu.exp() - 0.5 * y0_l) / (y1_l * nu)).clamp(0.0, 0.5);
    Ok(DecoyBounds {
        y0: (y0_l, y0_u),
        q_mu_upper: q_mu_u,
        y1_lower: y1_l,
        q1_lower: y1_l * mu * (-mu).exp(),
        e1_upper: e1_u,
    })
}

/// Everything the key-length formula needs, computed by Bob.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimates {
    /// Bits left for the key after removing the sample.
    pub n_key: u64,
    /// Sample size and errors observed.
    pub sample_size: u64,
    /// Errors in the sample.
    pub sample_errors: u64,
    /// Observed sample QBER.
    pub qber_sample: f64,
    /// Upper bound on QBER of the key bits.
    pub qber_upper: f64,
    /// Decoy bounds.
    pub decoy: DecoyBounds,
    /// Lower bound on vacuum-origin key bits `s_0`.
    pub s0: f64,
    /// Lower bound on single-photon key bits `s_1`.
    pub s1: f64,
    /// Upper bound on the single-photon phase error rate `phi_1`.
    pub phi1: f64,
}

/// Full estimation at Bob's end.
///
/// `phi_1` is the smaller of the decoy-class bound and the bound obtained by charging
/// all signal errors to single photons (`E_mu Q_mu e^mu >= e0 Y0 + e1 Y1 mu`). With
/// symmetric basis choice the phase error of one basis equals the bit error of the
/// other, which we estimate jointly (asymptotically standard; see README).
pub fn estimate(
    cfg: &EstimationConfig,
    stats: &DecoyStats,
    sample_size: u64,
    sample_errors: u64,
    n_key: u64,
) -> Result<Estimates, EstimationError> {
    let qber_sample = if sample_size > 0 {
        sample_errors as f64 / sample_size as f64
    } else {
        0.5
    };
    let qber_upper = qber_upper_bound(sample_size, sample_errors, n_key, cfg.eps_pe);
    if qber_upper > cfg.qber_threshold {
        return Err(EstimationError::QberTooHigh {
            observed: qber_sample,
            upper: qber_upper,
            threshold: cfg.qber_threshold,
        });
    }
    let [mu, nu, _] = cfg.intensities;
    let decoy = decoy_bounds(stats, mu, nu, cfg.eps_pe)?;
    let e1_sig =
        (qber_upper * decoy.q_mu_upper * mu.exp() - 0.5 * decoy.y0.0) / (decoy.y1_lower * mu);
    let phi1 = decoy.e1_upper.min(e1_sig).clamp(0.0, 0.5);
    let frac_single = (decoy.q1_lower / decoy.q_mu_upper).clamp(0.0, 1.0);
    let frac_vac = ((-mu).exp() * decoy.y0.0 / decoy.q_mu_upper).clamp(0.0, 1.0);
    Ok(Estimates {
        n_key,
        sample_size,
        sample_errors,
        qber_sample,
        qber_upper,
        decoy,
        s0: n_key as f64 * frac_vac,
        s1: n_key as f64 * frac_single,
        phi1,
    })
}

/// Count disagreements between disclosed and local bits (lengths must match).
pub fn count_errors(remote: &BitVec, local: &BitVec) -> Result<u64, EstimationError> {
    if remote.len() != local.len() {
        return Err(EstimationError::DisclosureLength {
            expected: local.len(),
            got: remote.len(),
        });
    }
    Ok(remote.hamming(local) as u64)
}

/// Indices where `mask` is set (helper for tests and diagnostics).
pub fn mask_positions(mask: &BitVec) -> Vec<usize> {
    let mut v = Vec::new();
    for_each_one(mask, |i| v.push(i));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{simulate_frame, ChannelParams, Intensity};
    use crate::sifting::{alice_reply, bob_apply, bob_request};

    #[test]
    fn qber_bound_is_conservative_and_tightens() {
        let u1 = qber_upper_bound(10_000, 200, 190_000, 1e-10);
        let u2 = qber_upper_bound(100_000, 2_000, 1_900_000, 1e-10);
        assert!(u1 > 0.02 && u2 > 0.02 && u2 < u1);
        assert!(u2 < 0.025);
    }

    #[test]
    fn word_parallel_split_and_sample_match_bitwise_reference() {
        let mut rng = StdRng::seed_from_u64(99);
        for n in [0usize, 1, 63, 64, 65, 1000, 10_007] {
            let classes: Vec<u8> = (0..n).map(|_| (rng.next_u64() % 4) as u8).collect();
            let bits = BitVec::from_bools((0..n).map(|_| rng.next_u64() & 1 == 1));
            let s = SiftedKey { bits, classes };
            let mut reference = ClassSplit::default();
            for (i, c) in s.classes.iter().enumerate() {
                match c {
                    0 => reference.signal.push(s.bits.get(i)),
                    1 => reference.decoy.push(s.bits.get(i)),
                    _ => reference.vacuum_count += 1,
                }
            }
            assert_eq!(split_by_class(&s), reference);
            for fraction in [0.0, 0.05, 0.5, 1.0] {
                let mut r = StdRng::seed_from_u64(7);
                let threshold = sample_threshold(fraction);
                let lanes: Vec<u64> = (0..n.div_ceil(4))
                    .flat_map(|_| {
                        let draw = r.next_u64();
                        (0..4).map(move |lane| (draw >> (16 * lane)) & 0xffff)
                    })
                    .collect();
                let reference = BitVec::from_bools(lanes.iter().take(n).map(|&x| x < threshold));
                assert_eq!(sample_mask(n, fraction, 7), reference);
            }
        }
    }

    #[test]
    fn sample_mask_is_deterministic() {
        let a = sample_mask(10_000, 0.1, 42);
        assert_eq!(a, sample_mask(10_000, 0.1, 42));
        let k = a.count_ones();
        assert!((800..1200).contains(&k));
        assert_eq!(mask_positions(&a).len(), k);
    }

    #[test]
    fn bounds_contain_truth_on_simulated_data() {
        let p = ChannelParams {
            misalignment: 0.02,
            ..ChannelParams::default()
        };
        let mut rng = StdRng::seed_from_u64(11);
        let f = simulate_frame(&p, 60_000_000, &mut rng).unwrap();
        let (reply, a) = alice_reply(&f.alice, &bob_request(&f.bob), f.pulses_per_class).unwrap();
        let b = bob_apply(&f.bob, &reply).unwrap();
        let (sa, sb) = (split_by_class(&a), split_by_class(&b));
        let mask = sample_mask(sa.signal.len(), 0.05, 5);
        let (samp_a, key_a) = apply_sample(&sa.signal, &mask);
        let (samp_b, key_b) = apply_sample(&sb.signal, &mask);
        let errs = count_errors(&samp_a, &samp_b).unwrap();
        let stats = DecoyStats {
            pulses: reply.pulses_per_class,
            detections: reply.detections_per_class,
            decoy_sifted: sa.decoy.len() as u64,
            decoy_errors: count_errors(&sa.decoy, &sb.decoy).unwrap(),
        };
        let cfg = EstimationConfig::default();
        let est = estimate(&cfg, &stats, samp_a.len() as u64, errs, key_a.len() as u64).unwrap();
        let true_key_qber = key_a.hamming(&key_b) as f64 / key_a.len() as f64;
        assert!(est.qber_upper >= true_key_qber, "{est:?}");
        assert!(est.qber_upper < true_key_qber + 0.01);
        let y1 = p.single_photon_yield();
        let e1 = p.single_photon_error();
        assert!(
            est.decoy.y1_lower <= y1 && est.decoy.y1_lower > 0.7 * y1,
            "{est:?} y1={y1}"
        );
        assert!(est.phi1 >= e1, "phi1 {} < e1 {e1}", est.phi1);
        assert!(est.decoy.q_mu_upper >= p.gain(Intensity::Signal));
        assert!(est.s1 > 0.5 * est.n_key as f64);
    }

    #[test]
    fn high_qber_aborts() {
        let cfg = EstimationConfig::default();
        let stats = DecoyStats {
            pulses: [1_000_000; 3],
            detections: [20_000, 4_000, 2],
            decoy_sifted: 2_000,
            decoy_errors: 500,
        };
        let r = estimate(&cfg, &stats, 5_000, 1_250, 95_000);
        assert!(matches!(r, Err(EstimationError::QberTooHigh { .. })));
    }
}
