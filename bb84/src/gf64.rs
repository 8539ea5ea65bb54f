//! Arithmetic in GF(2^64) and the polynomial universal hash built on it.
//!
//! Both key verification ([`crate::verify`]) and Wegman–Carter authentication
//! ([`crate::auth`]) need an ε-almost-(XOR-)universal hash. Polynomial evaluation over
//! GF(2^64) at a secret point `r` gives collision probability `<= (L+1)/2^64` for
//! messages of up to `L` words. No `unsafe`/intrinsics are allowed, so carry-less
//! multiplication is done in software with an 8-bit window table precomputed per key
//! (8 table lookups per multiply instead of 64 shift/xor steps).
//!
//! Field: GF(2)[x] / (x^64 + x^4 + x^3 + x + 1).

/// Multiplier by a fixed field element `r` (precomputed window table).
#[derive(Clone, Debug)]
pub struct Gf64Mul {
    /// `u(x) * r(x)` for every byte `u`: 4 KiB, L1-resident, 8 lookups per multiply.
    table: Box<[u128; 256]>,
}

/// Reduce a 128-bit carry-less product modulo x^64 + x^4 + x^3 + x + 1.
#[inline]
fn reduce(x: u128) -> u64 {
    let lo = x as u64;
    let hi = (x >> 64) as u64;
    // x^64 ≡ x^4 + x^3 + x + 1, so hi * x^64 ≡ hi * 0x1B (a 68-bit product).
    let h = hi as u128;
    let t = h ^ (h << 1) ^ (h << 3) ^ (h << 4);
    let lo2 = lo ^ (t as u64);
    let hi2 = (t >> 64) as u64; // at most 4 bits
    let t2 = hi2 ^ (hi2 << 1) ^ (hi2 << 3) ^ (hi2 << 4);
    lo2 ^ t2
}

impl Gf64Mul {
    /// Precompute `u(x) * r(x)` for every byte `u`.
    pub fn new(r: u64) -> Self {
        let mut table = Box::new([0u128; 256]);
        for (u, slot) in table.iter_mut().enumerate() {
            let mut acc = 0u128;
            for b in 0..8 {
                if (u >> b) & 1 == 1 {
                    acc ^= (r as u128) << b;
                }
            }
            *slot = acc;
        }
        Gf64Mul { table }
    }

    /// `a * r` in GF(2^64).
    #[inline]
    pub fn mul(&self, a: u64) -> u64 {
        let acc = a.to_be_bytes().iter().fold(0u128, |acc, &byte| {
            (acc << 8) ^ self.table[usize::from(byte)]
        });
        reduce(acc)
    }
}

/// Multiply two field elements (convenience; builds a table each call).
pub fn gf64_mul(a: u64, b: u64) -> u64 {
    Gf64Mul::new(b).mul(a)
}

/// Incremental polynomial hash `H_r(m) = sum_i m_i r^{L+2-i} + L r` (Horner form).
///
/// The trailing length term makes the encoding prefix-free so messages of different
/// lengths also collide with probability at most `(L+1)/2^64`.
///
/// Slices are absorbed four words at a time as `(acc ^ w1) r^4 ^ w2 r^3 ^ w3 r^2 ^ w4 r`,
/// the same value as four Horner steps, but with four independent multiplies in flight
/// instead of one long dependency chain.
#[derive(Clone, Debug)]
pub struct PolyHash {
    mul: Gf64Mul,
    /// Multipliers by r^2, r^3, r^4.
    powers: [Gf64Mul; 3],
    acc: u64,
    len: u64,
}

impl PolyHash {
    /// Start a hash keyed by the secret evaluation point `r`.
    pub fn new(r: u64) -> Self {
        let mul = Gf64Mul::new(r);
        let r2 = mul.mul(r);
        let r3 = mul.mul(r2);
        let r4 = mul.mul(r3);
        PolyHash {
            mul,
            powers: [r2, r3, r4].map(Gf64Mul::new),
            acc: 0,
            len: 0,
        }
    }

    /// Absorb one 64-bit word.
    #[inline]
    pub fn absorb(&mut self, w: u64) {
        self.acc = self.mul.mul(self.acc ^ w);
        self.len += 1;
    }

    /// Absorb a slice of words.
    pub fn absorb_all(&mut self, ws: &[u64]) {
        let mut quads = ws.chunks_exact(4);
        let [r2, r3, r4] = &self.powers;
        for q in &mut quads {
            if let &[w1, w2, w3, w4] = q {
                self.acc = r4.mul(self.acc ^ w1) ^ r3.mul(w2) ^ r2.mul(w3) ^ self.mul.mul(w4);
            }
        }
        self.len += (ws.len() - quads.remainder().len()) as u64;
        for &w in quads.remainder() {
            self.absorb(w);
        }
    }

    /// Words absorbed so far (for collision-bound accounting).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if nothing has been absorbed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Final tag; resets the state so the hasher (and its table) can be reused.
    pub fn finish_reset(&mut self) -> u64 {
        let t = self.mul.mul(self.acc ^ self.len);
        self.acc = 0;
        self.len = 0;
        t
    }

    /// One-shot hash of a word slice.
    pub fn hash(r: u64, ws: &[u64]) -> u64 {
        let mut h = PolyHash::new(r);
        h.absorb_all(ws);
        h.finish_reset()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, RngExt, SeedableRng};

    /// Bit-by-bit reference multiplication.
    fn slow_mul(a: u64, b: u64) -> u64 {
        let mut acc = 0u128;
        for i in 0..64 {
            if (b >> i) & 1 == 1 {
                acc ^= (a as u128) << i;
            }
        }
        for i in (64..128).rev() {
            if (acc >> i) & 1 == 1 {
                acc ^= 0x1Bu128 << (i - 64);
                acc ^= 1u128 << i;
            }
        }
        acc as u64
    }

    #[test]
    fn field_laws() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..200 {
            let (a, b, c): (u64, u64, u64) = (rng.random(), rng.random(), rng.random());
            assert_eq!(gf64_mul(a, b), slow_mul(a, b));
            assert_eq!(gf64_mul(a, b), gf64_mul(b, a));
            assert_eq!(gf64_mul(gf64_mul(a, b), c), gf64_mul(a, gf64_mul(b, c)));
            assert_eq!(gf64_mul(a ^ b, c), gf64_mul(a, c) ^ gf64_mul(b, c));
            assert_eq!(gf64_mul(a, 1), a);
        }
    }

    #[test]
    fn slices_hash_as_word_by_word_horner() {
        let mut rng = StdRng::seed_from_u64(2);
        let r: u64 = rng.random();
        let words: Vec<u64> = (0..23).map(|_| rng.random()).collect();
        for len in 0..words.len() {
            let mut one_by_one = PolyHash::new(r);
            for &w in &words[..len] {
                one_by_one.absorb(w);
            }
            let mut sliced = PolyHash::new(r);
            sliced.absorb(7);
            sliced.absorb_all(&words[..len]);
            let mut reference = PolyHash::new(r);
            reference.absorb(7);
            for &w in &words[..len] {
                reference.absorb(w);
            }
            assert_eq!(sliced.len(), reference.len());
            assert_eq!(sliced.finish_reset(), reference.finish_reset());
            assert_eq!(PolyHash::hash(r, &words[..len]), one_by_one.finish_reset());
        }
    }

    #[test]
    fn length_matters() {
        let r = 0x1234_5678_9abc_def1;
        assert_ne!(PolyHash::hash(r, &[0, 5]), PolyHash::hash(r, &[5]));
        assert_ne!(PolyHash::hash(r, &[]), PolyHash::hash(r, &[0]));
    }
}
