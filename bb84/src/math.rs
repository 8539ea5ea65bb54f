//! Small numeric helpers shared by the bounds, error correction and theory code.

/// Binary Shannon entropy `h(p)` in bits; 0 outside `(0, 1)`.
pub fn h2(p: f64) -> f64 {
    if !(p > 0.0 && p < 1.0) {
        return 0.0;
    }
    -p * p.log2() - (1.0 - p) * (1.0 - p).log2()
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
}
