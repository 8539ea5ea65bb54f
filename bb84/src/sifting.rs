//! Basis reconciliation (sifting).
//!
//! Bob announces his measurement bases for all detected slots as one bit-packed
//! vector (1 bit per detection); Alice answers with a bit-packed "basis matches"
//! mask and, for the matching positions only, the intensity class of each pulse
//! (2 bits each) plus per-class pulse and detection counts needed for decoy
//! estimation. Both sides then keep the matching positions. The messages are plain
//! serde structs so they can cross any transport.

use crate::bits::{byte_eq_mask, pack2, unpack2, BitVec};
use crate::channel::{AliceRecord, BobRecord};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Sifting failures (all indicate inconsistent or malformed input).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SiftError {
    /// The two sides disagree on the number of detected slots.
    #[error("detection count mismatch: local {local}, remote {remote}")]
    CountMismatch {
        /// Our count.
        local: usize,
        /// Count implied by the message.
        remote: usize,
    },
    /// Class list length does not match the number of matching bases.
    #[error("class list has {got} entries, expected {expected}")]
    ClassCount {
        /// Expected entries.
        expected: usize,
        /// Entries received.
        got: usize,
    },
    /// A class code outside 0..=2.
    #[error("invalid intensity class code {0}")]
    BadClass(u8),
}

/// Bob → Alice: his bases for every detected slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiftRequest {
    /// Bit-packed bases (`true` = X).
    pub bob_bases: BitVec,
}

/// Alice → Bob: which bases matched, and the public decoy bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiftReply {
    /// Bit-packed mask over detected slots: `true` where bases match.
    pub matches: BitVec,
    /// Intensity class of each matching slot, 2 bits per entry.
    pub classes: BitVec,
    /// Pulses sent per intensity class in the frame.
    pub pulses_per_class: [u64; 3],
    /// Detections per intensity class (all bases).
    pub detections_per_class: [u64; 3],
}

/// Result of sifting at either end: bits at matching positions and their classes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SiftedKey {
    /// This side's bits at matching positions.
    pub bits: BitVec,
    /// Intensity class code per sifted bit.
    pub classes: Vec<u8>,
    /// The (common) basis of each sifted bit: `true` = X, the key basis.
    pub bases: BitVec,
}

/// Bob: build the basis announcement.
pub fn bob_request(bob: &BobRecord) -> SiftRequest {
    SiftRequest {
        bob_bases: bob.bases.clone(),
    }
}

/// Alice: compare bases, produce the reply and her sifted key.
pub fn alice_reply(
    alice: &AliceRecord,
    req: &SiftRequest,
    pulses_per_class: [u64; 3],
) -> Result<(SiftReply, SiftedKey), SiftError> {
    let n = alice.bases.len();
    if req.bob_bases.len() != n || alice.bits.len() != n || alice.classes.len() != n {
        return Err(SiftError::CountMismatch {
            local: n,
            remote: req.bob_bases.len(),
        });
    }
    // XNOR of the two basis vectors, word-parallel.
    let matches = alice.bases.xor(&req.bob_bases).not();
    // Class histogram from word-parallel masks; a code > 2 is reported (first one).
    let counts = [0u8, 1, 2].map(|c| byte_eq_mask(&alice.classes, c).count_ones() as u64);
    if counts.iter().sum::<u64>() != n as u64 {
        if let Some(&c) = alice.classes.iter().find(|c| **c > 2) {
            return Err(SiftError::BadClass(c));
        }
    }
    let detections = [counts[0], counts[1], counts[2]];
    let m = matches.count_ones();
    let mut classes = Vec::with_capacity(m);
    for (w, chunk) in matches.words().iter().zip(alice.classes.chunks(64)) {
        let mut w = *w;
        while w != 0 {
            let t = w.trailing_zeros() as usize;
            classes.push(chunk.get(t).copied().unwrap_or(0));
            w &= w - 1;
        }
    }
    let sifted = SiftedKey {
        bits: alice.bits.select(&matches),
        classes,
        bases: alice.bases.select(&matches),
    };
    let reply = SiftReply {
        classes: pack2(&sifted.classes),
        matches,
        pulses_per_class,
        detections_per_class: detections,
    };
    Ok((reply, sifted))
}

/// Bob: apply Alice's answer to get his sifted key.
pub fn bob_apply(bob: &BobRecord, reply: &SiftReply) -> Result<SiftedKey, SiftError> {
    let n = bob.bits.len();
    if reply.matches.len() != n {
        return Err(SiftError::CountMismatch {
            local: n,
            remote: reply.matches.len(),
        });
    }
    let m = reply.matches.count_ones();
    let classes = unpack2(&reply.classes);
    if classes.len() != m || reply.classes.len() != 2 * m {
        return Err(SiftError::ClassCount {
            expected: m,
            got: classes.len(),
        });
    }
    if let Some(bad) = classes.iter().find(|c| **c > 2) {
        return Err(SiftError::BadClass(*bad));
    }
    Ok(SiftedKey {
        bits: bob.bits.select(&reply.matches),
        classes,
        bases: bob.bases.select(&reply.matches),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{simulate_frame, ChannelParams};
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn sifting_keeps_matching_bases() {
        let alice = AliceRecord {
            bits: BitVec::from_bools([true, false, true, true, false]),
            bases: BitVec::from_bools([false, true, true, false, false]),
            classes: vec![0, 1, 2, 0, 0],
        };
        let bob = BobRecord {
            bits: BitVec::from_bools([true, true, true, false, false]),
            bases: BitVec::from_bools([false, false, true, true, false]),
        };
        let req = bob_request(&bob);
        let (reply, a) = alice_reply(&alice, &req, [3, 1, 1]).unwrap();
        let b = bob_apply(&bob, &reply).unwrap();
        assert_eq!(a.bits, BitVec::from_bools([true, true, false]));
        assert_eq!(b.bits, BitVec::from_bools([true, true, false]));
        assert_eq!(a.classes, vec![0, 2, 0]);
        assert_eq!(b.classes, a.classes);
        assert_eq!(a.bases, BitVec::from_bools([false, true, false]));
        assert_eq!(b.bases, a.bases);
        assert_eq!(reply.detections_per_class, [3, 1, 1]);
    }

    #[test]
    fn simulated_frame_sifts_where_the_bases_match_with_low_qber() {
        let mut rng = StdRng::seed_from_u64(3);
        let f = simulate_frame(&ChannelParams::default(), 5_000_000, &mut rng).unwrap();
        let req = bob_request(&f.bob);
        let (reply, a) = alice_reply(&f.alice, &req, f.pulses_per_class).unwrap();
        let json = serde_json::to_string(&reply).unwrap();
        let reply: SiftReply = serde_json::from_str(&json).unwrap();
        let b = bob_apply(&f.bob, &reply).unwrap();
        // Both ends choose X with q_x, else Z: they match with q_x^2 + (1 - q_x)^2.
        let q = ChannelParams::default().x_basis_probability;
        let ratio = a.bits.len() as f64 / f.alice.bits.len() as f64;
        assert!(
            (ratio - (q * q + (1.0 - q) * (1.0 - q))).abs() < 0.02,
            "{ratio}"
        );
        let qber = a.bits.hamming(&b.bits) as f64 / a.bits.len() as f64;
        assert!(qber < 0.03, "qber {qber}");
    }

    #[test]
    fn mismatched_lengths_rejected() {
        let bob = BobRecord {
            bits: BitVec::zeros(3),
            bases: BitVec::zeros(3),
        };
        let alice = AliceRecord {
            bits: BitVec::zeros(4),
            bases: BitVec::zeros(4),
            classes: vec![0; 4],
        };
        assert!(matches!(
            alice_reply(&alice, &bob_request(&bob), [0; 3]),
            Err(SiftError::CountMismatch { .. })
        ));
    }
}
