//! Bit-packed vector used for keys, bases and parity masks everywhere in the crate.
//!
//! Post-processing works on 10^5..10^7 bits per frame; packing 64 bits per `u64`
//! word makes XOR, popcount and range parities word-parallel, which is what keeps
//! sifting, Cascade and hashing fast. The struct is serde-serialisable so it can
//! travel inside protocol messages (the length is explicit; bits beyond it are
//! always kept zero so equality and hashing are well defined).

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors from constructing a [`BitVec`] from untrusted parts (e.g. a received message).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BitsError {
    /// The word buffer does not match the declared bit length.
    #[error("bit vector of {len} bits needs {expected} words, got {got}")]
    WordCount {
        /// Declared length in bits.
        len: usize,
        /// Words required for that length.
        expected: usize,
        /// Words supplied.
        got: usize,
    },
    /// Bits beyond the declared length were set (malformed encoding).
    #[error("bits set beyond the declared length")]
    DirtyTail,
}

/// A fixed-length vector of bits packed little-endian into `u64` words.
/// Deserialisation goes through [`BitVec::from_words`], so a vector received from the network
/// always has the right word count and a clean tail. Its words are overwritten when it is
/// dropped (a frame's keys are bit vectors) and its `Debug` shows only the length.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WireBits")]
pub struct BitVec {
    words: Vec<u64>,
    len: usize,
}

impl Drop for BitVec {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.words);
    }
}

impl std::fmt::Debug for BitVec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BitVec({} bits)", self.len)
    }
}

/// The serialised form of a [`BitVec`], checked before it becomes one.
#[derive(Deserialize)]
struct WireBits {
    words: Vec<u64>,
    len: usize,
}

impl TryFrom<WireBits> for BitVec {
    type Error = BitsError;

    fn try_from(wire: WireBits) -> Result<Self, BitsError> {
        BitVec::from_words(wire.words, wire.len)
    }
}

#[inline]
fn words_for(len: usize) -> usize {
    len.div_ceil(64)
}

impl BitVec {
    /// All-zero vector of `len` bits.
    pub fn zeros(len: usize) -> Self {
        BitVec {
            words: vec![0; words_for(len)],
            len,
        }
    }

    /// Empty vector with room for `cap` bits.
    pub fn with_capacity(cap: usize) -> Self {
        BitVec {
            words: Vec::with_capacity(words_for(cap)),
            len: 0,
        }
    }

    /// Build from packed words; validates the word count and that the tail is clean,
    /// because the parts may come from the network.
    pub fn from_words(words: Vec<u64>, len: usize) -> Result<Self, BitsError> {
        let expected = words_for(len);
        if words.len() != expected {
            return Err(BitsError::WordCount {
                len,
                expected,
                got: words.len(),
            });
        }
        let v = BitVec { words, len };
        if v.tail_dirty() {
            return Err(BitsError::DirtyTail);
        }
        Ok(v)
    }

    /// Build from booleans (convenience for tests and small inputs).
    pub fn from_bools<I: IntoIterator<Item = bool>>(bits: I) -> Self {
        let mut v = BitVec::default();
        for b in bits {
            v.push(b);
        }
        v
    }

    /// Number of bits.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no bits.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Packed words (bits beyond `len` are zero).
    #[inline]
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Bit `i`; out-of-range reads return `false` rather than panicking.
    #[inline]
    pub fn get(&self, i: usize) -> bool {
        if i >= self.len {
            return false;
        }
        self.words
            .get(i >> 6)
            .is_some_and(|w| (w >> (i & 63)) & 1 == 1)
    }

    /// Set bit `i` (ignored when out of range).
    #[inline]
    pub fn set(&mut self, i: usize, v: bool) {
        if i >= self.len {
            return;
        }
        if let Some(w) = self.words.get_mut(i >> 6) {
            let m = 1u64 << (i & 63);
            if v {
                *w |= m;
            } else {
                *w &= !m;
            }
        }
    }

    /// Flip bit `i` (ignored when out of range).
    #[inline]
    pub fn flip(&mut self, i: usize) {
        if i >= self.len {
            return;
        }
        if let Some(w) = self.words.get_mut(i >> 6) {
            *w ^= 1u64 << (i & 63);
        }
    }

    /// Append one bit.
    #[inline]
    pub fn push(&mut self, v: bool) {
        if self.len & 63 == 0 {
            self.words.push(0);
        }
        let i = self.len;
        self.len += 1;
        if v {
            if let Some(w) = self.words.last_mut() {
                *w |= 1u64 << (i & 63);
            }
        }
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Hamming distance to `other` over the common prefix, plus the length difference.
    pub fn hamming(&self, other: &BitVec) -> usize {
        let common: usize = self
            .words
            .iter()
            .zip(other.words.iter())
            .map(|(a, b)| (a ^ b).count_ones() as usize)
            .sum();
        common + self.len.abs_diff(other.len)
    }

    /// Parity (XOR) of bits in `[start, end)`, word-parallel.
    pub fn parity_range(&self, start: usize, end: usize) -> bool {
        let end = end.min(self.len);
        if start >= end {
            return false;
        }
        let ws = start >> 6;
        let we = (end - 1) >> 6;
        let lo_mask = !0u64 << (start & 63);
        let hi_mask = !0u64 >> (63 - ((end - 1) & 63));
        let Some(slice) = self.words.get(ws..=we) else {
            return false;
        };
        let acc = if ws == we {
            slice.first().map_or(0, |w| w & lo_mask & hi_mask)
        } else {
            let mut acc = 0u64;
            let last = slice.len() - 1;
            for (k, w) in slice.iter().enumerate() {
                let mut v = *w;
                if k == 0 {
                    v &= lo_mask;
                }
                if k == last {
                    v &= hi_mask;
                }
                acc ^= v;
            }
            acc
        };
        acc.count_ones() & 1 == 1
    }

    /// Parity of the whole vector.
    pub fn parity(&self) -> bool {
        self.words.iter().fold(0u64, |a, w| a ^ w).count_ones() & 1 == 1
    }

    /// Bits at the positions where `mask` is set (mask beyond `self` reads as zero bits).
    ///
    /// Word-parallel: each 64-bit word is compacted with a software `pext`.
    pub fn select(&self, mask: &BitVec) -> BitVec {
        let mut out = BitVec::with_capacity(mask.count_ones());
        for (wi, &m) in mask.words.iter().enumerate() {
            if m == 0 {
                continue;
            }
            let x = self.words.get(wi).copied().unwrap_or(0);
            out.append_low(compress(x, m), m.count_ones());
        }
        out
    }

    /// Build from words, clearing any bits beyond `len` (crate-internal; the word
    /// count must already be `ceil(len / 64)`, otherwise the vector is resized).
    pub(crate) fn from_words_lossy(mut words: Vec<u64>, len: usize) -> Self {
        words.resize(words_for(len), 0);
        let mut v = BitVec { words, len };
        v.clean_tail();
        v
    }

    /// Append the low `k` bits of `v` (`k <= 64`; higher bits of `v` must be zero).
    #[inline]
    fn append_low(&mut self, v: u64, k: u32) {
        if k == 0 {
            return;
        }
        let off = self.len & 63;
        if off == 0 {
            self.words.push(v);
        } else {
            if let Some(last) = self.words.last_mut() {
                *last |= v << off;
            }
            if off + k as usize > 64 {
                self.words.push(v >> (64 - off));
            }
        }
        self.len += k as usize;
    }

    /// Iterate over indices of set bits.
    pub fn ones(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let t = w.trailing_zeros() as usize;
                w &= w - 1;
                Some((wi << 6) | t)
            })
        })
    }

    /// Keep only the first `len` bits (no-op if already shorter).
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        self.len = len;
        self.words.truncate(words_for(len));
        self.clean_tail();
    }

    /// Bitwise NOT restricted to `len` bits.
    pub fn not(&self) -> BitVec {
        let mut v = BitVec {
            words: self.words.iter().map(|w| !w).collect(),
            len: self.len,
        };
        v.clean_tail();
        v
    }

    /// Bitwise XOR; the result has the length of the shorter operand.
    pub fn xor(&self, other: &BitVec) -> BitVec {
        let len = self.len.min(other.len);
        let mut v = BitVec {
            words: self
                .words
                .iter()
                .zip(other.words.iter())
                .map(|(a, b)| a ^ b)
                .take(words_for(len))
                .collect(),
            len,
        };
        v.clean_tail();
        v
    }

    fn tail_mask(&self) -> u64 {
        match self.len & 63 {
            0 => !0,
            r => (1u64 << r) - 1,
        }
    }

    fn tail_dirty(&self) -> bool {
        self.words
            .last()
            .is_some_and(|w| w & !self.tail_mask() != 0)
    }

    fn clean_tail(&mut self) {
        let m = self.tail_mask();
        if let Some(w) = self.words.last_mut() {
            *w &= m;
        }
    }
}

/// Call `f` for every set bit of `v`, in increasing order (faster than the iterator
/// in hot loops because it avoids the nested closure state).
#[inline]
pub fn for_each_one<F: FnMut(usize)>(v: &BitVec, f: F) {
    for_each_one_in(v, 0..v.len, f);
}

/// Call `f` for every set bit of `v` at a position in `range`, in increasing order.
#[inline]
pub fn for_each_one_in<F: FnMut(usize)>(v: &BitVec, range: std::ops::Range<usize>, mut f: F) {
    let (first, end) = (range.start, range.end.min(v.len));
    if first >= end {
        return;
    }
    let skip = first / 64;
    for (wi, &word) in v.words.iter().enumerate().take(end.div_ceil(64)).skip(skip) {
        let base = wi * 64;
        // Only the first word starts before `first` (by less than 64), and every word taken
        // starts before `end`.
        let low = first.saturating_sub(base);
        let high = (end - base).min(64);
        let mut w = word & (u64::MAX >> (64 - high)) & (u64::MAX << low);
        while w != 0 {
            f(base | w.trailing_zeros() as usize);
            w &= w - 1;
        }
    }
}

/// Software `pext`: gather the bits of `x` at the set positions of `m` into the low
/// bits of the result, in order (Hacker's Delight, `compress`, 6 log-steps).
#[inline]
pub(crate) fn compress(x: u64, m: u64) -> u64 {
    if m == !0 {
        return x;
    }
    let mut x = x & m;
    let mut m = m;
    let mut mk = !m << 1;
    for i in 0..6u32 {
        let mut mp = mk ^ (mk << 1);
        mp ^= mp << 2;
        mp ^= mp << 4;
        mp ^= mp << 8;
        mp ^= mp << 16;
        mp ^= mp << 32;
        let mv = mp & m;
        let sh = 1u32 << i;
        m = (m ^ mv) | (mv >> sh);
        let t = x & mv;
        x = (x ^ t) | (t >> sh);
        mk &= !mp;
    }
    x
}

/// Mask over `vals` with bit `i` set where `vals[i] == target` (word at a time).
pub(crate) fn byte_eq_mask(vals: &[u8], target: u8) -> BitVec {
    let words = vals
        .chunks(64)
        .map(|chunk| {
            let mut w = 0u64;
            let mut groups = chunk.chunks_exact(8);
            let mut shift = 0u32;
            for g in groups.by_ref() {
                let mut b = [0u8; 8];
                b.copy_from_slice(g);
                w |= eq_bytes8(u64::from_le_bytes(b), target) << shift;
                shift += 8;
            }
            for (j, &c) in groups.remainder().iter().enumerate() {
                w |= u64::from(c == target) << (shift as usize + j);
            }
            w
        })
        .collect();
    BitVec::from_words_lossy(words, vals.len())
}

/// SWAR: 8-bit mask of the bytes of `x` equal to `target` (bit `j` = byte `j`).
#[inline]
fn eq_bytes8(x: u64, target: u8) -> u64 {
    const LO7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let y = x ^ (u64::from(target) * 0x0101_0101_0101_0101);
    // High bit of each byte set iff that byte of `y` is non-zero (exact, no carries).
    let nonzero = ((y & LO7) + LO7) | y;
    let zero = !nonzero & 0x8080_8080_8080_8080;
    // Gather the 8 high bits into one byte.
    (zero >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56
}

/// Pack values in `0..4` two bits each (used for intensity classes on the wire).
pub fn pack2(vals: &[u8]) -> BitVec {
    let words = vals
        .chunks(32)
        .map(|chunk| {
            chunk
                .iter()
                .enumerate()
                .fold(0u64, |w, (j, &c)| w | (u64::from(c & 3) << (2 * j)))
        })
        .collect();
    BitVec::from_words_lossy(words, vals.len() * 2)
}

/// Inverse of [`pack2`].
pub fn unpack2(v: &BitVec) -> Vec<u8> {
    let n = v.len() / 2;
    let mut out = Vec::with_capacity(n);
    for &w in &v.words {
        let k = (n - out.len()).min(32);
        out.extend((0..k).map(|j| ((w >> (2 * j)) & 3) as u8));
        if out.len() == n {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserialisation_rejects_malformed_vectors() {
        let v = BitVec::from_bools([true, false, true]);
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(serde_json::from_str::<BitVec>(&json).unwrap(), v);
        for bad in [
            r#"{"words":[],"len":3}"#,
            r#"{"words":[1,2],"len":3}"#,
            r#"{"words":[255],"len":3}"#,
        ] {
            assert!(serde_json::from_str::<BitVec>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn push_get_parity() {
        let bools: Vec<bool> = (0..300).map(|i| (i * 7 + i / 3) % 5 == 0).collect();
        let v = BitVec::from_bools(bools.iter().copied());
        assert_eq!(v.len(), 300);
        for (i, b) in bools.iter().enumerate() {
            assert_eq!(v.get(i), *b);
        }
        for s in [0usize, 1, 63, 64, 65, 100, 250] {
            for e in [s, s + 1, s + 63, s + 64, s + 130, 300] {
                let expect = bools[s..e.min(300).max(s)].iter().filter(|b| **b).count() % 2 == 1;
                assert_eq!(v.parity_range(s, e), expect, "{s}..{e}");
            }
        }
    }

    #[test]
    fn ones_in_a_range_are_the_ones_of_that_range() {
        let bools: Vec<bool> = (0..300).map(|i| (i * 7 + i / 3) % 5 == 0).collect();
        let v = BitVec::from_bools(bools.iter().copied());
        for s in [0usize, 1, 63, 64, 65, 100, 250, 300] {
            for e in [s, s + 1, s + 63, s + 64, s + 130, 300, 400] {
                let mut got = Vec::new();
                for_each_one_in(&v, s..e, |i| got.push(i));
                let expect: Vec<usize> = (s..e.min(300)).filter(|&i| bools[i]).collect();
                assert_eq!(got, expect, "{s}..{e}");
            }
        }
        let mut all = Vec::new();
        for_each_one(&v, |i| all.push(i));
        assert_eq!(all, v.ones().collect::<Vec<_>>());
    }

    #[test]
    fn from_words_validates() {
        assert!(BitVec::from_words(vec![0, 0], 65).is_ok());
        assert!(BitVec::from_words(vec![0], 65).is_err());
        assert_eq!(
            BitVec::from_words(vec![0, 4], 65),
            Err(BitsError::DirtyTail)
        );
    }

    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn word_parallel_matches_bitwise_reference() {
        let mut st = 0x9e37_79b9_7f4a_7c15u64;
        for n in [0usize, 1, 5, 63, 64, 65, 127, 128, 129, 1000, 4097] {
            for density in [0u64, 1, 2, 3] {
                let bits = BitVec::from_bools((0..n).map(|_| xorshift(&mut st) & 1 == 1));
                let mask = BitVec::from_bools((0..n + density as usize * 3).map(|_| {
                    let r = xorshift(&mut st) & 3;
                    if density == 3 {
                        r != 0
                    } else {
                        r < density
                    }
                }));
                let mut reference = BitVec::default();
                for i in mask.ones() {
                    reference.push(bits.get(i));
                }
                let got = bits.select(&mask);
                assert_eq!(got, reference, "n={n} d={density}");
                assert!(!got.tail_dirty());
                let vals: Vec<u8> = (0..n).map(|_| (xorshift(&mut st) % 4) as u8).collect();
                let packed = pack2(&vals);
                let mut ref_packed = BitVec::zeros(n * 2);
                for (i, &c) in vals.iter().enumerate() {
                    ref_packed.set(2 * i, c & 1 == 1);
                    ref_packed.set(2 * i + 1, c & 2 == 2);
                }
                assert_eq!(packed, ref_packed);
                assert_eq!(unpack2(&packed), vals);
                let eq1 = byte_eq_mask(&vals, 1);
                assert_eq!(eq1, BitVec::from_bools(vals.iter().map(|&c| c == 1)));
            }
        }
        for _ in 0..10_000 {
            let (x, m) = (xorshift(&mut st), xorshift(&mut st) & xorshift(&mut st));
            let mut r = 0u64;
            let mut k = 0;
            for i in 0..64 {
                if (m >> i) & 1 == 1 {
                    r |= ((x >> i) & 1) << k;
                    k += 1;
                }
            }
            assert_eq!(compress(x, m), r);
        }
    }

    #[test]
    fn select_and_pack() {
        let v = BitVec::from_bools([true, false, true, true]);
        let m = BitVec::from_bools([true, true, false, true]);
        assert_eq!(v.select(&m), BitVec::from_bools([true, false, true]));
        let vals = vec![0u8, 1, 2, 3, 2];
        assert_eq!(unpack2(&pack2(&vals)), vals);
        assert_eq!(m.ones().collect::<Vec<_>>(), vec![0, 1, 3]);
    }
}
