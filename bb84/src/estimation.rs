//! Parameter estimation: the sifted bits split by basis, as the finite-key bound
//! ([`crate::finite_key`], Lim et al. 2014) wants them.
//!
//! * Every sifted X-basis bit, of every intensity, is a key bit (`n_X = sum_k n_{X,k}`);
//!   nothing of them is disclosed before error correction.
//! * Every sifted Z-basis bit is disclosed by Alice: Bob counts the errors per intensity
//!   (`m_{Z,k}`), which bound the phase-error rate of the key's single photons.
//!
//! Abort if the Z-basis error rate exceeds the threshold (default 11 %) or the bounds leave no
//! single photon in the key.

use crate::bits::{byte_eq_mask, for_each_one, BitVec};
use crate::finite_key::{bounds, BasisCounts, Bounds, EpsilonBudget, Source};
use crate::sifting::SiftedKey;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Estimation outcomes that stop the frame.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum EstimationError {
    /// The test basis's error rate is above the threshold (possible eavesdropping).
    #[error("QBER {observed:.4} exceeds threshold {threshold:.4} (phase-error bound {upper:.4})")]
    QberTooHigh {
        /// Error rate of the disclosed Z-basis bits.
        observed: f64,
        /// Upper bound on the key's single-photon phase-error rate.
        upper: f64,
        /// Configured threshold.
        threshold: f64,
    },
    /// The bounds found no single photon among the key bits (too few counts).
    #[error("the decoy bounds leave no single-photon key bit")]
    NoSinglePhotons,
    /// Disclosure inconsistent with local data.
    #[error("disclosure has {got} bits, expected {expected}")]
    DisclosureLength {
        /// Expected bits.
        expected: usize,
        /// Received bits.
        got: usize,
    },
    /// Not enough sifted key bits to go on.
    #[error("too few sifted key bits ({0})")]
    TooFewBits(usize),
}

/// Public estimation parameters (both ends must use the same values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EstimationConfig {
    /// Abort threshold on the test basis's error rate.
    pub qber_threshold: f64,
    /// The source: intensities `[mu1, mu2, mu3]` and their probabilities.
    pub source: Source,
    /// Minimum number of sifted key (X-basis) bits to proceed.
    pub min_key_bits: usize,
    /// What each bound may fail with.
    pub eps: EpsilonBudget,
}

impl Default for EstimationConfig {
    fn default() -> Self {
        EstimationConfig {
            qber_threshold: 0.11,
            source: Source {
                intensities: [0.4, 0.2, 0.0],
                probabilities: [0.3, 0.5, 0.2],
            },
            min_key_bits: 10_000,
            eps: EpsilonBudget::default(),
        }
    }
}

/// Alice → Bob: her bits of every sifted Z-basis position, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disclosure {
    pub z_bits: BitVec,
}

/// Sifted bits split by basis, each with the intensity class of every bit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BasisSplit {
    /// X-basis bits: the key.
    pub key: BitVec,
    pub key_classes: Vec<u8>,
    /// Z-basis bits: disclosed.
    pub test: BitVec,
    pub test_classes: Vec<u8>,
}

/// The entries of `values` where `mask` is set, in order.
fn select_bytes(values: &[u8], mask: &BitVec) -> Vec<u8> {
    let mut out = Vec::with_capacity(mask.count_ones());
    for_each_one(mask, |i| {
        if let Some(v) = values.get(i) {
            out.push(*v);
        }
    });
    out
}

/// Split a sifted key by basis.
pub fn split_by_basis(s: &SiftedKey) -> BasisSplit {
    let z = s.bases.not();
    BasisSplit {
        key: s.bits.select(&s.bases),
        key_classes: select_bytes(&s.classes, &s.bases),
        test: s.bits.select(&z),
        test_classes: select_bytes(&s.classes, &z),
    }
}

/// How many of `classes` are of each intensity class.
pub fn per_class(classes: &[u8]) -> [u64; 3] {
    [0u8, 1, 2].map(|c| byte_eq_mask(classes, c).count_ones() as u64)
}

/// Disagreements between `remote` and `local` per intensity class of each position.
pub fn errors_per_class(
    remote: &BitVec,
    local: &BitVec,
    classes: &[u8],
) -> Result<[u64; 3], EstimationError> {
    if remote.len() != local.len() || classes.len() != local.len() {
        return Err(EstimationError::DisclosureLength {
            expected: local.len(),
            got: remote.len(),
        });
    }
    let mut errors = [0u64; 3];
    for_each_one(&remote.xor(local), |i| {
        if let Some(e) = classes.get(i).and_then(|c| errors.get_mut(usize::from(*c))) {
            *e += 1;
        }
    });
    Ok(errors)
}

/// What Bob estimated of a frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimates {
    /// Key bits: sifted X-basis bits per intensity (errors not known yet).
    pub x: BasisCounts,
    /// Disclosed Z-basis bits and their errors per intensity.
    pub z: BasisCounts,
    /// Error rate of the disclosed Z-basis bits.
    pub qber_test: f64,
    /// The finite-key bounds on these counts.
    pub bounds: Bounds,
}

/// Estimation at Bob's end from the counts of both bases.
pub fn estimate(
    cfg: &EstimationConfig,
    x: BasisCounts,
    z: BasisCounts,
) -> Result<Estimates, EstimationError> {
    let n_key = x.total_detections();
    if n_key < cfg.min_key_bits as u64 || z.total_detections() == 0 {
        return Err(EstimationError::TooFewBits(n_key as usize));
    }
    let qber_test = z.total_errors() as f64 / z.total_detections() as f64;
    let bounds = bounds(&cfg.source, &x, &z, &cfg.eps);
    if qber_test > cfg.qber_threshold {
        return Err(EstimationError::QberTooHigh {
            observed: qber_test,
            upper: bounds.phi_x,
            threshold: cfg.qber_threshold,
        });
    }
    if bounds.s_x1 <= 0.0 {
        return Err(EstimationError::NoSinglePhotons);
    }
    Ok(Estimates {
        x,
        z,
        qber_test,
        bounds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{simulate_frame, ChannelParams};
    use crate::sifting::{alice_reply, bob_apply, bob_request};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn split_and_error_counts_match_a_bitwise_reference() {
        let mut rng = StdRng::seed_from_u64(99);
        for n in [0usize, 1, 63, 64, 65, 1000, 10_007] {
            let classes: Vec<u8> = (0..n).map(|_| (rng.next_u64() % 3) as u8).collect();
            let bits = BitVec::from_bools((0..n).map(|_| rng.next_u64() & 1 == 1));
            let bases = BitVec::from_bools((0..n).map(|_| rng.next_u64() & 1 == 1));
            let s = SiftedKey {
                bits,
                classes,
                bases,
            };
            let split = split_by_basis(&s);
            let (mut key, mut test) = (Vec::new(), Vec::new());
            for i in 0..n {
                let entry = (s.bits.get(i), s.classes[i]);
                if s.bases.get(i) {
                    key.push(entry);
                } else {
                    test.push(entry);
                }
            }
            assert_eq!(split.key, BitVec::from_bools(key.iter().map(|e| e.0)));
            assert_eq!(
                split.key_classes,
                key.iter().map(|e| e.1).collect::<Vec<_>>()
            );
            assert_eq!(split.test, BitVec::from_bools(test.iter().map(|e| e.0)));
            assert_eq!(
                split.test_classes,
                test.iter().map(|e| e.1).collect::<Vec<_>>()
            );
            let flipped = BitVec::from_bools((0..split.test.len()).map(|i| i % 7 == 3));
            let errors =
                errors_per_class(&split.test.xor(&flipped), &split.test, &split.test_classes)
                    .unwrap();
            let mut reference = [0u64; 3];
            for (i, (_, class)) in test.iter().enumerate() {
                if i % 7 == 3 {
                    reference[usize::from(*class)] += 1;
                }
            }
            assert_eq!(errors, reference);
        }
        assert!(errors_per_class(&BitVec::zeros(3), &BitVec::zeros(4), &[0; 4]).is_err());
    }

    #[test]
    fn bounds_contain_the_truth_of_a_simulated_frame() {
        let p = ChannelParams {
            misalignment: 0.02,
            ..ChannelParams::default()
        };
        let mut rng = StdRng::seed_from_u64(11);
        let f = simulate_frame(&p, p.pulses_for_sifted(1_000_000.0), &mut rng).unwrap();
        let (reply, a) = alice_reply(&f.alice, &bob_request(&f.bob), f.pulses_per_class).unwrap();
        let b = bob_apply(&f.bob, &reply).unwrap();
        let (sa, sb) = (split_by_basis(&a), split_by_basis(&b));
        let x = BasisCounts {
            detections: per_class(&sb.key_classes),
            errors: [0; 3],
        };
        let z = BasisCounts {
            detections: per_class(&sb.test_classes),
            errors: errors_per_class(&sa.test, &sb.test, &sb.test_classes).unwrap(),
        };
        let cfg = EstimationConfig::default();
        let est = estimate(&cfg, x, z).unwrap();
        // Single photons in the X key bits: pulses p_k N q_x^2 k e^-k Y1, summed.
        let q = p.x_basis_probability;
        let y1 = p.single_photon_yield();
        let true_s1: f64 = (0..3)
            .map(|k| {
                let mu = p.intensities[k];
                f.pulses_per_class[k] as f64 * q * q * mu * (-mu).exp() * y1
            })
            .sum();
        let bounds = est.bounds;
        assert!(
            bounds.s_x1 <= true_s1 && bounds.s_x1 > 0.6 * true_s1,
            "{bounds:?} vs {true_s1}"
        );
        let e1 = p.single_photon_error();
        // The phase-error bound holds the true single-photon error rate, with the finite-size
        // terms of some 10^4 test bits on top.
        assert!(
            bounds.phi_x >= e1 && bounds.phi_x < e1 + 0.08,
            "{bounds:?} e1={e1}"
        );
        assert!((est.qber_test - 0.02).abs() < 0.005, "{est:?}");
    }

    #[test]
    fn high_qber_aborts() {
        let cfg = EstimationConfig::default();
        let x = BasisCounts {
            detections: [200_000, 40_000, 20],
            errors: [0; 3],
        };
        let z = BasisCounts {
            detections: [20_000, 4_000, 2],
            errors: [5_000, 1_000, 1],
        };
        let r = estimate(&cfg, x, z);
        assert!(
            matches!(r, Err(EstimationError::QberTooHigh { .. })),
            "{r:?}"
        );
    }
}
