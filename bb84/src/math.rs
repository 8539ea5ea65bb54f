//! Small numeric helpers shared by estimation, key-length and theory code:
//! binary entropy and Chernoff (relative-entropy) confidence bounds.
//!
//! The Chernoff–Hoeffding bound `P[X/n >= p + t] <= exp(-n D(p+t || p))` also holds
//! for sampling *without* replacement (Hoeffding 1963, Thm. 4), so the same inversion
//! serves both the random-sample QBER test and the decoy gain/error counts. It is much
//! tighter than the additive Hoeffding/Serfling form at the small rates QKD sees.

/// Binary Shannon entropy `h(p)` in bits; 0 outside `(0, 1)`.
pub fn h2(p: f64) -> f64 {
    if !(p > 0.0 && p < 1.0) {
        return 0.0;
    }
    -p * p.log2() - (1.0 - p) * (1.0 - p).log2()
}

/// Relative entropy `D(q || p)` between Bernoulli distributions, in nats.
pub fn kl_bernoulli(q: f64, p: f64) -> f64 {
    let term = |a: f64, b: f64| {
        if a <= 0.0 {
            0.0
        } else if b <= 0.0 {
            f64::INFINITY
        } else {
            a * (a / b).ln()
        }
    };
    term(q, p) + term(1.0 - q, 1.0 - p)
}

/// Upper confidence bound on a Bernoulli rate: the largest `p >= k/n` with
/// `n D(k/n || p) <= ln(1/eps)`; the true rate exceeds it with probability `<= eps`.
/// Returns 1 when `n == 0` (nothing observed, nothing known).
pub fn chernoff_upper(k: u64, n: u64, eps: f64) -> f64 {
    if n == 0 {
        return 1.0;
    }
    let q = (k as f64 / n as f64).min(1.0);
    let target = (1.0 / eps).ln() / n as f64;
    // D(q||p) is increasing in p on [q,1]: bisect.
    let (mut lo, mut hi) = (q, 1.0);
    for _ in 0..80 {
        let mid = 0.5 * (lo + hi);
        if kl_bernoulli(q, mid) > target {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// Lower confidence bound, mirror of [`chernoff_upper`]; returns 0 when `n == 0`.
pub fn chernoff_lower(k: u64, n: u64, eps: f64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    1.0 - chernoff_upper(n.saturating_sub(k), n, eps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_values() {
        assert!((h2(0.5) - 1.0).abs() < 1e-12);
        assert_eq!(h2(0.0), 0.0);
        assert!((h2(0.11) - 0.4999).abs() < 1e-3);
    }

    #[test]
    fn chernoff_brackets_estimate() {
        let u = chernoff_upper(100, 10_000, 1e-10);
        let l = chernoff_lower(100, 10_000, 1e-10);
        assert!(l < 0.01 && u > 0.01);
        assert!(u < 0.02 && l > 0.004, "u={u} l={l}");
        assert!(chernoff_upper(0, 1000, 1e-10) > 0.0);
        assert_eq!(chernoff_upper(0, 0, 0.1), 1.0);
    }
}
