//! Error-verification: after Cascade, both ends hash their key with a polynomial
//! universal hash over GF(2^64) keyed by fresh secret bits and compare tags; a
//! mismatch discards the frame.
//!
//! Two different keys of `L` words collide with probability `<= (L+1)/2^64` over the
//! choice of the hash key, which is the `eps_cor` used in the key-length formula. The
//! tag is sent in the clear, so its 64 bits count as leakage; the 64-bit hash key is
//! consumed from the shared secret pool.

use crate::bits::BitVec;
use crate::gf64::PolyHash;

/// Secret key bits consumed per verification.
pub const VERIFY_KEY_BITS: u64 = 64;
/// Bits of the (public) tag, counted as leakage.
pub const VERIFY_TAG_BITS: u64 = 64;

/// Verification tag of `key` under hash key `r`.
pub fn verification_tag(key: &BitVec, r: u64) -> u64 {
    let mut h = PolyHash::new(r);
    h.absorb(key.len() as u64);
    h.absorb_all(key.words());
    h.finish_reset()
}

/// Collision probability bound for keys of `n_bits` bits (the achieved `eps_cor`).
pub fn collision_bound(n_bits: usize) -> f64 {
    let words = n_bits.div_ceil(64) as f64 + 2.0;
    words / 2f64.powi(64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cascade::random_key;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn equal_keys_equal_tags_and_any_flip_detected() {
        let mut rng = StdRng::seed_from_u64(1);
        let a = random_key(10_000, &mut rng);
        let r = rng.next_u64();
        assert_eq!(verification_tag(&a, r), verification_tag(&a.clone(), r));
        for i in [0, 17, 9_999] {
            let mut b = a.clone();
            b.flip(i);
            assert_ne!(verification_tag(&a, r), verification_tag(&b, r));
        }
    }

    #[test]
    fn collisions_behave_like_universal_hash() {
        // With a tiny 8-bit truncation, the collision rate over random keys r for a
        // fixed pair of messages should be close to 2^-8 (universal-hash behaviour).
        let mut rng = StdRng::seed_from_u64(2);
        let a = random_key(640, &mut rng);
        let mut b = a.clone();
        b.flip(3);
        b.flip(300);
        let trials = 40_000;
        let coll = (0..trials)
            .filter(|_| {
                let r = rng.next_u64();
                (verification_tag(&a, r) ^ verification_tag(&b, r)) & 0xFF == 0
            })
            .count();
        let rate = coll as f64 / trials as f64;
        assert!((rate - 1.0 / 256.0).abs() < 0.002, "rate {rate}");
        assert!(collision_bound(1 << 20) < 1e-14);
    }
}
