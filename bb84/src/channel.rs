//! Statistical simulation of a decoy-state BB84 link, plus the asymptotic
//! (GLLP + infinite-decoy) key-rate formula used as the theoretical reference.
//!
//! At GHz pulse rates a per-pulse loop would dominate run time, so a frame of `N`
//! pulse slots is simulated by sampling counts: the number of pulses per intensity
//! class (multinomial), then the number of detections per class (binomial with a
//! normal / Poisson approximation for large counts), and only then generating the
//! detected events one by one. The detection model is the standard one of
//! Lo–Ma–Chen, PRL 94, 230504 (2005): gain `Q_k = 1 - (1 - Y0) e^{-eta k}` with
//! `eta = 10^{-alpha L / 10} * eta_det`; a detection is a dark count only with
//! probability `Y0 e^{-eta k} / Q_k` (random bit), otherwise photon-triggered with
//! misalignment error `e_d`.
//!
//! The intercept-resend eavesdropper measures a fraction of the photon-triggered
//! detections in a random basis and resends her result; on sifted bits this adds
//! 25 % errors. (We assume Eve compensates the loss she introduces, so yields are
//! unchanged — the worst case for detection by gain monitoring.)
//!
//! Detection slots are assumed to be announced already: the `i`-th entry of Alice's
//! and Bob's records refer to the same pulse slot.

use crate::bits::BitVec;
use crate::math::h2;
use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Intensity class of a pulse. The numeric value is the on-wire class code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intensity {
    /// Signal state (key generating), mean photon number `mu`.
    Signal = 0,
    /// Weak decoy, mean photon number `nu`.
    Decoy = 1,
    /// Vacuum decoy.
    Vacuum = 2,
}

/// Invalid channel parameters.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ChannelError {
    /// A probability-valued parameter lies outside [0, 1].
    #[error("parameter {name} = {value} is outside [0, 1]")]
    NotProbability {
        /// Parameter name.
        name: &'static str,
        /// Offending value.
        value: f64,
    },
    /// Intensities must satisfy `mu > nu > vacuum >= 0`, class probabilities sum to 1, etc.
    #[error("inconsistent parameters: {0}")]
    Inconsistent(&'static str),
}

/// Physical and protocol parameters of the simulated link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelParams {
    /// Source repetition rate (pulses per second); only used to convert to bit/s.
    pub pulse_rate_hz: f64,
    /// Mean photon numbers `[mu, nu, vacuum]`.
    pub intensities: [f64; 3],
    /// Probabilities of sending each intensity class (sum to 1).
    pub class_probs: [f64; 3],
    /// Probability that Alice prepares, and Bob measures, in the X basis (the key basis);
    /// otherwise Z (the test basis, every sifted bit of which is disclosed).
    pub x_basis_probability: f64,
    /// Fibre length in km.
    pub fibre_km: f64,
    /// Fibre attenuation in dB/km.
    pub atten_db_per_km: f64,
    /// Detector efficiency (including Bob's optics).
    pub detector_efficiency: f64,
    /// Dark-count probability per slot `Y0`.
    pub dark_count_prob: f64,
    /// Optical misalignment error `e_d`.
    pub misalignment: f64,
    /// Fraction of photon detections intercepted and resent by Eve.
    pub eve_fraction: f64,
}

impl Default for ChannelParams {
    fn default() -> Self {
        ChannelParams {
            pulse_rate_hz: 1e9,
            // Near the optimum of the finite-key rate at 20 km and 10^6-bit frames (a grid over
            // intensities, probabilities and q_x; see README, BB84 links).
            intensities: [0.4, 0.2, 0.0],
            class_probs: [0.3, 0.5, 0.2],
            x_basis_probability: 0.8,
            fibre_km: 20.0,
            atten_db_per_km: 0.2,
            detector_efficiency: 0.1,
            dark_count_prob: 1e-6,
            misalignment: 0.01,
            eve_fraction: 0.0,
        }
    }
}

impl ChannelParams {
    /// Reject physically meaningless parameters.
    pub fn validate(&self) -> Result<(), ChannelError> {
        let probs = [
            ("detector_efficiency", self.detector_efficiency),
            ("dark_count_prob", self.dark_count_prob),
            ("misalignment", self.misalignment),
            ("eve_fraction", self.eve_fraction),
            ("x_basis_probability", self.x_basis_probability),
            ("class_probs[0]", self.class_probs[0]),
            ("class_probs[1]", self.class_probs[1]),
            ("class_probs[2]", self.class_probs[2]),
        ];
        for (name, value) in probs {
            if !(0.0..=1.0).contains(&value) {
                return Err(ChannelError::NotProbability { name, value });
            }
        }
        if (self.class_probs.iter().sum::<f64>() - 1.0).abs() > 1e-9 {
            return Err(ChannelError::Inconsistent(
                "class probabilities must sum to 1",
            ));
        }
        // The conditions of the finite-key bounds (Lim et al. 2014), which handle a weak third
        // intensity as such and divide by each intensity's probability.
        if !self.source().is_valid() {
            return Err(ChannelError::Inconsistent(
                "need signal > decoy + vacuum, decoy > vacuum >= 0 and each intensity's \
                 probability > 0",
            ));
        }
        if !(self.x_basis_probability > 0.0 && self.x_basis_probability < 1.0) {
            return Err(ChannelError::Inconsistent(
                "the X-basis probability must be strictly between 0 and 1",
            ));
        }
        if !(self.fibre_km >= 0.0 && self.atten_db_per_km >= 0.0) {
            return Err(ChannelError::Inconsistent("negative length or attenuation"));
        }
        Ok(())
    }

    /// What the finite-key bound must know of the source.
    pub fn source(&self) -> crate::finite_key::Source {
        crate::finite_key::Source {
            intensities: self.intensities,
            probabilities: self.class_probs,
        }
    }

    /// Overall transmittance `eta` (fibre times detector).
    pub fn transmittance(&self) -> f64 {
        10f64.powf(-self.atten_db_per_km * self.fibre_km / 10.0) * self.detector_efficiency
    }

    /// Expected gain `Q_k` for class `k`.
    pub fn gain(&self, class: Intensity) -> f64 {
        let k = self.intensities[class as usize];
        1.0 - (1.0 - self.dark_count_prob) * (-self.transmittance() * k).exp()
    }

    /// Expected QBER `E_k` for class `k` without eavesdropping.
    pub fn qber(&self, class: Intensity) -> f64 {
        let k = self.intensities[class as usize];
        let q = self.gain(class);
        if q <= 0.0 {
            return 0.5;
        }
        (0.5 * self.dark_count_prob + self.misalignment * (1.0 - (-self.transmittance() * k).exp()))
            / q
    }

    /// True single-photon yield `Y1 = Y0 + eta - Y0 eta`.
    pub fn single_photon_yield(&self) -> f64 {
        let eta = self.transmittance();
        self.dark_count_prob + eta - self.dark_count_prob * eta
    }

    /// True single-photon error rate `e1 = (e0 Y0 + e_d eta) / Y1`.
    pub fn single_photon_error(&self) -> f64 {
        let eta = self.transmittance();
        (0.5 * self.dark_count_prob + self.misalignment * eta) / self.single_photon_yield()
    }

    /// Pulses needed for about `sifted` sifted X-basis (key) bits, all intensities.
    pub fn pulses_for_sifted(&self, sifted: f64) -> u64 {
        let q = self.x_basis_probability;
        let per_pulse: f64 = [Intensity::Signal, Intensity::Decoy, Intensity::Vacuum]
            .iter()
            .map(|&c| self.class_probs[c as usize] * self.gain(c) * q * q)
            .sum();
        if per_pulse <= 0.0 {
            return 0;
        }
        (sifted / per_pulse).ceil() as u64
    }
}

/// Alice's record of the detected slots (columnar, bit-packed).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AliceRecord {
    /// Bit value she encoded.
    pub bits: BitVec,
    /// Basis: `false` = Z, `true` = X.
    pub bases: BitVec,
    /// Intensity class code ([`Intensity`] as u8) of each detected slot.
    pub classes: Vec<u8>,
}

/// Bob's record of the detected slots.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BobRecord {
    /// Measured bit.
    pub bits: BitVec,
    /// Measurement basis: `false` = Z, `true` = X.
    pub bases: BitVec,
}

/// Output of one simulated frame.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChannelFrame {
    /// Alice's side.
    pub alice: AliceRecord,
    /// Bob's side.
    pub bob: BobRecord,
    /// Pulses sent per class (Alice knows and later announces these).
    pub pulses_per_class: [u64; 3],
    /// Total pulse slots in the frame.
    pub pulses: u64,
}

#[inline]
fn uniform<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn std_normal<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    // Box–Muller; 1 - u keeps the log argument in (0, 1].
    let u1 = 1.0 - uniform(rng);
    let u2 = uniform(rng);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn poisson<R: Rng + ?Sized>(rng: &mut R, lambda: f64) -> u64 {
    // Knuth's method; only used for lambda < 60 where e^{-lambda} is representable.
    let l = (-lambda).exp();
    let mut k = 0u64;
    let mut p = 1.0;
    loop {
        p *= uniform(rng);
        if p <= l {
            return k;
        }
        k += 1;
    }
}

/// Sample Binomial(n, p): exact for small n, Poisson for rare events, normal otherwise.
pub fn sample_binomial<R: Rng + ?Sized>(rng: &mut R, n: u64, p: f64) -> u64 {
    if n == 0 || p <= 0.0 {
        return 0;
    }
    if p >= 1.0 {
        return n;
    }
    if p > 0.5 {
        return n - sample_binomial(rng, n, 1.0 - p);
    }
    if n <= 64 {
        return (0..n).filter(|_| uniform(rng) < p).count() as u64;
    }
    let mean = n as f64 * p;
    let var = mean * (1.0 - p);
    if var < 30.0 && mean < 60.0 {
        return poisson(rng, mean).min(n);
    }
    let x = (mean + var.sqrt() * std_normal(rng)).round();
    x.clamp(0.0, n as f64) as u64
}

/// Simulate a frame of `pulses` slots and return the detected events.
pub fn simulate_frame<R: Rng + ?Sized>(
    params: &ChannelParams,
    pulses: u64,
    rng: &mut R,
) -> Result<ChannelFrame, ChannelError> {
    params.validate()?;
    let eta = params.transmittance();
    let [p0, p1, _] = params.class_probs;
    let n0 = sample_binomial(rng, pulses, p0);
    let rest = pulses - n0;
    let n1 = if p1 > 0.0 {
        sample_binomial(rng, rest, (p1 / (1.0 - p0)).min(1.0))
    } else {
        0
    };
    let n2 = rest - n1;
    let sent = [n0, n1, n2];
    let classes = [Intensity::Signal, Intensity::Decoy, Intensity::Vacuum];
    let mut det = [0u64; 3];
    let mut p_dark_only = [0f64; 3];
    for (i, c) in classes.iter().enumerate() {
        let q = params.gain(*c);
        det[i] = sample_binomial(rng, sent[i], q);
        let k = params.intensities[i];
        p_dark_only[i] = if q > 0.0 {
            params.dark_count_prob * (-eta * k).exp() / q
        } else {
            1.0
        };
    }
    let total: u64 = det.iter().sum();
    let cap = usize::try_from(total).map_err(|_| ChannelError::Inconsistent("frame too large"))?;
    let mut alice = AliceRecord {
        bits: BitVec::with_capacity(cap),
        bases: BitVec::with_capacity(cap),
        classes: Vec::with_capacity(cap),
    };
    let mut bob = BobRecord {
        bits: BitVec::with_capacity(cap),
        bases: BitVec::with_capacity(cap),
    };
    // Random interleaving of the classes: draw the next class with probability
    // proportional to the detections still to place (exact uniform shuffle of counts).
    let mut left = det;
    let mut remaining = total;
    while remaining > 0 {
        let r = rng.random_range(0..remaining);
        let class = if r < left[0] {
            0
        } else if r < left[0] + left[1] {
            1
        } else {
            2
        };
        left[class] -= 1;
        remaining -= 1;
        let rb = rng.next_u64();
        let a_bit = rb & 1 == 1;
        let a_basis = uniform(rng) < params.x_basis_probability;
        let b_basis = uniform(rng) < params.x_basis_probability;
        let eve_basis = rb & 8 == 8;
        let eve_rand = rb & 16 == 16;
        let bob_rand = rb & 32 == 32;
        let b_bit = if uniform(rng) < p_dark_only[class] {
            bob_rand
        } else {
            let intercepted = params.eve_fraction > 0.0 && uniform(rng) < params.eve_fraction;
            let (s_bit, s_basis) = if intercepted && eve_basis != a_basis {
                (eve_rand, eve_basis)
            } else {
                (a_bit, a_basis)
            };
            if b_basis == s_basis {
                s_bit ^ (uniform(rng) < params.misalignment)
            } else {
                bob_rand
            }
        };
        alice.bits.push(a_bit);
        alice.bases.push(a_basis);
        alice.classes.push(class as u8);
        bob.bits.push(b_bit);
        bob.bases.push(b_basis);
    }
    Ok(ChannelFrame {
        alice,
        bob,
        pulses_per_class: sent,
        pulses,
    })
}

/// Asymptotic decoy-state BB84 secret key rate in bits per pulse, for the protocol the
/// pipeline runs (key from the X basis, every intensity): GLLP with infinite decoys (Lo, Ma,
/// Chen, PRL 94, 230504 (2005), Eq. (1)) per intensity `k`,
/// `R = q_x^2 sum_k p_k { Y_0 e^{-k} + Y_1 k e^{-k} [1 - h(e_1)] - Q_k f h(E_k) }`: the rate
/// the finite-key bound tends to as frames grow. Clamped at 0.
pub fn theoretical_key_rate(params: &ChannelParams, f_ec: f64) -> f64 {
    let y1 = params.single_photon_yield();
    let e1 = params.single_photon_error();
    let per_intensity = |class: Intensity| {
        let k = params.intensities[class as usize];
        params.dark_count_prob * (-k).exp() + y1 * k * (-k).exp() * (1.0 - h2(e1))
            - params.gain(class) * f_ec * h2(params.qber(class))
    };
    let q = params.x_basis_probability;
    let r: f64 = [Intensity::Signal, Intensity::Decoy, Intensity::Vacuum]
        .iter()
        .map(|&c| params.class_probs[c as usize] * per_intensity(c))
        .sum();
    (q * q * r).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    fn sifted_qber(f: &ChannelFrame, class: u8) -> (usize, usize) {
        let mut n = 0;
        let mut e = 0;
        for i in 0..f.alice.classes.len() {
            if f.alice.classes[i] == class && f.alice.bases.get(i) == f.bob.bases.get(i) {
                n += 1;
                if f.alice.bits.get(i) != f.bob.bits.get(i) {
                    e += 1;
                }
            }
        }
        (n, e)
    }

    #[test]
    fn gains_and_qber_match_model() {
        let p = ChannelParams::default();
        let mut rng = StdRng::seed_from_u64(7);
        let f = simulate_frame(&p, 20_000_000, &mut rng).unwrap();
        let det_sig = f.alice.classes.iter().filter(|c| **c == 0).count() as f64;
        let q_sim = det_sig / f.pulses_per_class[0] as f64;
        let q_th = p.gain(Intensity::Signal);
        assert!((q_sim / q_th - 1.0).abs() < 0.03, "{q_sim} vs {q_th}");
        let (n, e) = sifted_qber(&f, 0);
        let qber = e as f64 / n as f64;
        assert!(
            (qber - p.qber(Intensity::Signal)).abs() < 0.003,
            "qber {qber}"
        );
    }

    #[test]
    fn full_intercept_resend_gives_quarter_errors() {
        let p = ChannelParams {
            eve_fraction: 1.0,
            ..ChannelParams::default()
        };
        let mut rng = StdRng::seed_from_u64(8);
        let f = simulate_frame(&p, 10_000_000, &mut rng).unwrap();
        let (n, e) = sifted_qber(&f, 0);
        let qber = e as f64 / n as f64;
        assert!((qber - 0.25).abs() < 0.02, "qber {qber}");
    }

    #[test]
    fn binomial_moments() {
        let mut rng = StdRng::seed_from_u64(9);
        for (n, p) in [(50u64, 0.3), (10_000, 0.001), (1_000_000, 0.02)] {
            let m = 400;
            let xs: Vec<f64> = (0..m)
                .map(|_| sample_binomial(&mut rng, n, p) as f64)
                .collect();
            let mean = xs.iter().sum::<f64>() / m as f64;
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            assert!((mean - n as f64 * p).abs() < 4.0 * sd / (m as f64).sqrt() + 0.5);
        }
    }

    #[test]
    fn theory_rate_decreases_with_distance() {
        let mut last = f64::INFINITY;
        for km in [10.0, 50.0, 100.0] {
            let p = ChannelParams {
                fibre_km: km,
                ..ChannelParams::default()
            };
            let r = theoretical_key_rate(&p, 1.1);
            assert!(r > 0.0 && r < last);
            last = r;
        }
        assert!(ChannelParams {
            intensities: [0.1, 0.5, 0.0],
            ..ChannelParams::default()
        }
        .validate()
        .is_err());
        // A weak third intensity is what the bounds allow (Lim et al.), as long as the signal
        // exceeds the other two together.
        let weak_vacuum = ChannelParams {
            intensities: [0.5, 0.1, 0.001],
            ..ChannelParams::default()
        };
        assert!(weak_vacuum.validate().is_ok());
        let too_weak_signal = ChannelParams {
            intensities: [0.5, 0.4, 0.2],
            ..ChannelParams::default()
        };
        assert!(too_weak_signal.validate().is_err());
    }
}
