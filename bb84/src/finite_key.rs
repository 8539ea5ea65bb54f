//! Finite-key secret key length of decoy-state BB84, valid against coherent attacks:
//! Lim, Curty, Walenta, Xu, Zbinden, "Concise security bounds for practical decoy-state quantum
//! key distribution", PRA 89, 022307 (2014), arXiv:1311.7129 — Eqs. (1)–(5), line by line.
//!
//! The protocol the bound speaks of (and the pipeline runs): Alice sends intensity `k` of
//! `mu1 > mu2 + mu3`, `mu2 > mu3 >= 0` with probability `p_k`, in basis X with probability
//! `q_x`, else Z; Bob measures X with probability `q_x`. The key is every sifted X-basis bit
//! (all three intensities); every sifted Z-basis bit is disclosed to count the errors `m_Z,k`
//! that bound the phase-error rate of the key. Counts are conditioned on detections, so the
//! Hoeffding terms `delta(n, eps) = sqrt(n/2 ln(1/eps))` hold for any attack.
//!
//! **The ε budget.** Every statistical bound fails with probability at most `eps_sec / 21`
//! (Lim et al., Appendix B: the 21 counts the Hoeffding bounds on the X and Z counts, the
//! random-sampling bound behind `gamma`, and the smoothing and privacy-amplification terms,
//! which together give the `6 log2(21/eps_sec)` of Eq. (1)); the whole key is
//! `eps_sec`-secret. Correctness: the verification hash collides with probability at most
//! `eps_cor`, whose `log2(2/eps_cor)` bits Eq. (1) charges. Authentication failure is not in
//! `eps_sec`: each Wegman–Carter tag is forged with probability at most `2^-59` (a 64-bit tag
//! over a polynomial hash of at most 32 Ki words), at most [`TAGS_PER_FRAME`] tags per frame,
//! so the total of a frame is `eps_sec + eps_cor + TAGS_PER_FRAME * 2^-59`
//! ([`EpsilonBudget::total`]).

use crate::math::h2;
use serde::{Deserialize, Serialize};

/// Tags of one frame (sifting, disclosure, verification, acknowledgement, confirmation, the
/// commit; the rest of a window's pads is margin).
pub const TAGS_PER_FRAME: f64 = 16.0;
/// Forgery probability of one Wegman–Carter tag: a 64-bit tag of a polynomial hash over
/// GF(2^64) of a message of at most 2^5 x 2^10 words (degree / field size).
pub const TAG_FORGERY: f64 = 1.0 / (1u64 << 59) as f64;

/// The security parameters of a frame's key and what each bound may fail with.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpsilonBudget {
    /// Secrecy: the key is `eps_sec`-close to ideal (given correct authentication).
    pub eps_sec: f64,
    /// Correctness: the two keys differ with probability at most `eps_cor`.
    pub eps_cor: f64,
}

impl Default for EpsilonBudget {
    fn default() -> Self {
        Self {
            eps_sec: 1e-10,
            eps_cor: 1e-15,
        }
    }
}

impl EpsilonBudget {
    /// What each Hoeffding bound, and the sampling bound in `gamma`, may fail with.
    pub fn per_bound(&self) -> f64 {
        self.eps_sec / 21.0
    }

    /// The frame's overall failure probability: secrecy, correctness and authentication.
    pub fn total(&self) -> f64 {
        self.eps_sec + self.eps_cor + TAGS_PER_FRAME * TAG_FORGERY
    }
}

/// Sifted detections and errors per intensity (signal `mu1` first, the weakest last).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BasisCounts {
    /// Sifted bits of this basis per intensity: `n_{B,k}`.
    pub detections: [u64; 3],
    /// Errors among them per intensity: `m_{B,k}` (X: found by error correction, reported
    /// only; Z: disclosed, used by the bound).
    pub errors: [u64; 3],
}

impl BasisCounts {
    pub fn total_detections(&self) -> u64 {
        self.detections.iter().sum()
    }

    pub fn total_errors(&self) -> u64 {
        self.errors.iter().sum()
    }
}

/// The source: intensities `[mu1, mu2, mu3]` and how often each is sent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub intensities: [f64; 3],
    pub probabilities: [f64; 3],
}

impl Source {
    /// `tau_n = sum_k e^{-k} k^n p_k / n!`: the probability that Alice sends `n` photons.
    pub fn tau(&self, n: i32) -> f64 {
        let factorial: f64 = (1..=n).map(f64::from).product();
        self.intensities
            .iter()
            .zip(&self.probabilities)
            .map(|(&k, &p)| (-k).exp() * k.powi(n) * p / factorial)
            .sum()
    }

    /// Whether the bounds apply: `mu1 > mu2 + mu3`, `mu2 > mu3 >= 0`, every `p_k > 0`.
    pub fn is_valid(&self) -> bool {
        let [mu1, mu2, mu3] = self.intensities;
        mu1 > mu2 + mu3 && mu2 > mu3 && mu3 >= 0.0 && self.probabilities.iter().all(|p| *p > 0.0)
    }
}

/// `delta(n, eps) = sqrt(n/2 ln(1/eps))`: Hoeffding's deviation for `n` detections.
pub fn hoeffding(n: u64, eps: f64) -> f64 {
    (n as f64 / 2.0 * (1.0 / eps).ln()).sqrt()
}

/// `x^{+-}_k = e^k / p_k (x_k +- delta(total, eps))` for each intensity (Lim et al. after
/// Eq. (3)): upper (`sign = 1`) or lower (`-1`) bounds on the counts had every pulse been of
/// intensity `k`.
fn scaled(source: &Source, counts: &[u64; 3], total: u64, eps: f64, sign: f64) -> [f64; 3] {
    let delta = hoeffding(total, eps);
    [0, 1, 2].map(|i| {
        let k = source.intensities[i];
        k.exp() / source.probabilities[i] * (counts[i] as f64 + sign * delta)
    })
}

/// Eq. (2): lower bound on the vacuum events `s_{B,0}` among `counts`.
fn vacuum_events(source: &Source, counts: &[u64; 3], eps: f64) -> f64 {
    let [_, mu2, mu3] = source.intensities;
    let total = counts.iter().sum();
    let lower = scaled(source, counts, total, eps, -1.0);
    let upper = scaled(source, counts, total, eps, 1.0);
    (source.tau(0) * (mu2 * lower[2] - mu3 * upper[1]) / (mu2 - mu3)).max(0.0)
}

/// Eq. (3): lower bound on the single-photon events `s_{B,1}` among `counts`, given `s0`.
fn single_photon_events(source: &Source, counts: &[u64; 3], s0: f64, eps: f64) -> f64 {
    let [mu1, mu2, mu3] = source.intensities;
    let total = counts.iter().sum();
    let lower = scaled(source, counts, total, eps, -1.0);
    let upper = scaled(source, counts, total, eps, 1.0);
    let tau0 = source.tau(0);
    let numerator =
        lower[1] - upper[2] - (mu2 * mu2 - mu3 * mu3) / (mu1 * mu1) * (upper[0] - s0 / tau0);
    let denominator = mu1 * (mu2 - mu3) - mu2 * mu2 + mu3 * mu3;
    (source.tau(1) * mu1 * numerator / denominator).max(0.0)
}

/// Eq. (4): upper bound on the single-photon errors `v_{Z,1}` of the Z basis.
fn single_photon_errors(source: &Source, errors: &[u64; 3], eps: f64) -> f64 {
    let [_, mu2, mu3] = source.intensities;
    let total = errors.iter().sum();
    let lower = scaled(source, errors, total, eps, -1.0);
    let upper = scaled(source, errors, total, eps, 1.0);
    (source.tau(1) * (upper[1] - lower[2]) / (mu2 - mu3)).max(0.0)
}

/// `gamma(a, b, c, d)` of Eq. (5): the random-sampling term that carries the phase-error rate
/// of the Z basis's single photons (`c` of them, rate `b`) over to the X basis's (`d`).
pub fn gamma(a: f64, b: f64, c: f64, d: f64) -> f64 {
    let spread = (c + d) * (1.0 - b) * b / (c * d * std::f64::consts::LN_2);
    let log = ((c + d) / (c * d * (1.0 - b) * b) * (21.0 * 21.0) / (a * a)).log2();
    (spread * log).sqrt()
}

/// The basis the key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyBasis {
    X,
}

/// What the bound used and gave, for one frame: `kme bench-link` prints it so that anyone can
/// recompute the key length from the counts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FiniteKey {
    pub intensities: [f64; 3],
    pub probabilities: [f64; 3],
    /// The basis the key comes from (`"X"`).
    pub key_basis: KeyBasis,
    #[serde(rename = "X")]
    pub x: BasisCounts,
    #[serde(rename = "Z")]
    pub z: BasisCounts,
    pub eps_sec: f64,
    pub eps_cor: f64,
    /// Everything counted as leaked: error correction (as `cascade_leakage` counts it) and the
    /// verification tag.
    pub leak_ec_bits: u64,
    /// `s_{X,0}`, `s_{X,1}`: lower bounds on the key's vacuum and single-photon bits.
    pub s0: f64,
    pub s1: f64,
    /// Upper bound on the phase-error rate of the key's single-photon bits.
    pub phi1: f64,
    pub key_length_bits: u64,
}

/// The bounds of Eqs. (2)–(5) on one frame's counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub s_x0: f64,
    pub s_x1: f64,
    pub s_z1: f64,
    pub v_z1: f64,
    /// Upper bound on the phase-error rate `phi_X` (Eq. (5)); 0.5 when nothing is known.
    pub phi_x: f64,
}

/// Eqs. (2)–(5) on the counts of the two bases.
pub fn bounds(source: &Source, x: &BasisCounts, z: &BasisCounts, eps: &EpsilonBudget) -> Bounds {
    let e = eps.per_bound();
    let s_x0 = vacuum_events(source, &x.detections, e);
    let s_x1 = single_photon_events(source, &x.detections, s_x0, e);
    let s_z0 = vacuum_events(source, &z.detections, e);
    let s_z1 = single_photon_events(source, &z.detections, s_z0, e);
    let v_z1 = single_photon_errors(source, &z.errors, e);
    let phi_x = if s_z1 > 0.0 && s_x1 > 0.0 {
        let rate = (v_z1 / s_z1).min(0.5);
        if rate > 0.0 {
            (rate + gamma(eps.eps_sec, rate, s_z1, s_x1)).min(0.5)
        } else {
            // No single-photon error seen: the rate is taken at the smallest value the
            // sampling term is defined for (one error).
            let rate = (1.0 / s_z1).min(0.5);
            (rate + gamma(eps.eps_sec, rate, s_z1, s_x1)).min(0.5)
        }
    } else {
        0.5
    };
    Bounds {
        s_x0,
        s_x1,
        s_z1,
        v_z1,
        phi_x: if phi_x.is_nan() { 0.5 } else { phi_x },
    }
}

/// Eq. (1): `l = floor(s_{X,0} + s_{X,1} (1 - h(phi_X)) - leak_EC - 6 log2(21/eps_sec) -
/// log2(2/eps_cor))`, 0 if negative, at most `n_x` (the key bits).
pub fn key_length(bounds: &Bounds, leak_ec: f64, n_x: u64, eps: &EpsilonBudget) -> u64 {
    if bounds.phi_x >= 0.5 || eps.eps_sec <= 0.0 || eps.eps_cor <= 0.0 {
        return 0;
    }
    let l = bounds.s_x0 + bounds.s_x1 * (1.0 - h2(bounds.phi_x))
        - leak_ec
        - 6.0 * (21.0 / eps.eps_sec).log2()
        - (2.0 / eps.eps_cor).log2();
    if l.is_nan() || l <= 0.0 {
        return 0;
    }
    (l.floor() as u64).min(n_x)
}
