//! Wegman–Carter authentication of the classical channel.
//!
//! Tag = `H_r(transcript) XOR pad`, where `H_r` is the polynomial hash over GF(2^64)
//! ([`crate::gf64::PolyHash`], ε-almost-XOR-universal with ε = (L+1)/2^64) keyed by a
//! long-term secret `r`, and `pad` is 64 fresh one-time-pad bits from a pre-shared
//! stream. Reusing `r` is safe because every tag is one-time padded (Wegman–Carter
//! 1981; Stinson's ε-AXU formulation). Key consumption: 64 bits for `r` once per link,
//! plus 64 bits per tag.
//!
//! Pads are indexed; each direction has its own stream. A sender never reuses an
//! index (its counter only grows) and a receiver accepts only indices at or above its
//! watermark, advancing it after a valid tag, so a dropped message burns pads but can
//! never desynchronise the streams or enable a replay. The tag may cover several
//! messages (the running transcript since the previous tag): the pipeline tags every
//! message except Cascade rounds, whose contents are covered by the next tagged
//! message before any key is released.

use crate::gf64::PolyHash;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Bits of pre-shared key consumed per tag.
pub const KEY_BITS_PER_TAG: u64 = 64;

/// Most words one tag may cover: the forgery bound `(L+1)/2^64` of a tag holds for
/// transcripts up to this long, and a longer one is neither sealed nor accepted (a frame of
/// 10^6 key bits covers some 10^5 words per tag).
pub const MAX_TAGGED_WORDS: u64 = 1 << 22;

/// Authentication failures.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No pre-shared pad left in this direction.
    #[error("authentication key stream exhausted")]
    Exhausted,
    /// Pad index below the watermark (replay) or beyond the stream.
    #[error("pad index {0} not acceptable")]
    BadIndex(u64),
    /// Tag does not verify.
    #[error("authentication tag mismatch")]
    BadTag,
    /// The transcript is longer than a tag's forgery bound covers.
    #[error("{0} words since the last tag, more than one tag covers")]
    TooLong(u64),
}

/// Whether one tag's forgery bound covers `transcript`.
fn covered(transcript: &PolyHash) -> Result<(), AuthError> {
    match transcript.len() {
        words if words > MAX_TAGGED_WORDS => Err(AuthError::TooLong(words)),
        _ => Ok(()),
    }
}

/// Which end of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Sender of quantum states; answers reconciliation queries.
    Alice,
    /// Receiver; drives reconciliation.
    Bob,
}

/// Pre-shared secret material, identical at both ends. Overwritten when dropped; its `Debug`
/// shows sizes only.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthKeyMaterial {
    /// Long-term polynomial-hash key `r`.
    pub mac_key: u64,
    /// One-time pads for Alice → Bob tags (and keys Alice draws).
    pub a2b: Vec<u64>,
    /// One-time pads for Bob → Alice tags (and keys Bob draws, e.g. verification).
    pub b2a: Vec<u64>,
}

impl std::fmt::Debug for AuthKeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AuthKeyMaterial({} + {} pads)",
            self.a2b.len(),
            self.b2a.len()
        )
    }
}

impl Drop for AuthKeyMaterial {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.mac_key.zeroize();
        self.a2b.zeroize();
        self.b2a.zeroize();
    }
}

impl AuthKeyMaterial {
    /// Deterministic material from a seed: **for tests and simulation only** (a real
    /// link loads pre-shared or previously distilled key here).
    pub fn insecure_from_seed(seed: u64, words_per_direction: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        AuthKeyMaterial {
            mac_key: rng.next_u64(),
            a2b: (0..words_per_direction).map(|_| rng.next_u64()).collect(),
            b2a: (0..words_per_direction).map(|_| rng.next_u64()).collect(),
        }
    }
}

/// Tag to attach to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthTag {
    /// Index of the one-time pad used.
    pub pad_index: u64,
    /// `H_r(transcript) ^ pad`.
    pub tag: u64,
}

/// One end's persistent authentication state (lives across frames). Its pads are overwritten
/// when dropped; its `Debug` shows positions only.
#[derive(Clone)]
pub struct AuthChannel {
    mac_key: u64,
    out_pads: Vec<u64>,
    in_pads: Vec<u64>,
    out_next: u64,
    in_next: u64,
    consumed_bits: u64,
}

impl std::fmt::Debug for AuthChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthChannel")
            .field("out_next", &self.out_next)
            .field("in_next", &self.in_next)
            .field("consumed_bits", &self.consumed_bits)
            .finish_non_exhaustive()
    }
}

impl Drop for AuthChannel {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.mac_key.zeroize();
        self.out_pads.zeroize();
        self.in_pads.zeroize();
    }
}

/// Compute a Wegman–Carter tag over `words` (stand-alone form of the MAC).
pub fn wegman_carter_tag(mac_key: u64, words: &[u64], pad: u64) -> u64 {
    PolyHash::hash(mac_key, words) ^ pad
}

impl AuthChannel {
    /// Set up one end; counts the 64-bit hash key as consumed.
    pub fn new(role: Role, material: &AuthKeyMaterial) -> Self {
        let (out_pads, in_pads) = match role {
            Role::Alice => (material.a2b.clone(), material.b2a.clone()),
            Role::Bob => (material.b2a.clone(), material.a2b.clone()),
        };
        AuthChannel {
            mac_key: material.mac_key,
            out_pads,
            in_pads,
            out_next: 0,
            in_next: 0,
            consumed_bits: KEY_BITS_PER_TAG,
        }
    }

    /// Fresh transcript hasher keyed with the link's hash key.
    pub fn transcript(&self) -> PolyHash {
        PolyHash::new(self.mac_key)
    }

    /// Total pre-shared key bits consumed by this end (sent tags and drawn keys).
    pub fn consumed_bits(&self) -> u64 {
        self.consumed_bits
    }

    /// Pads left for outgoing use.
    pub fn remaining_out(&self) -> u64 {
        (self.out_pads.len() as u64).saturating_sub(self.out_next)
    }

    /// Draw the next outgoing pad (for a tag or as secret key material).
    pub fn take_out(&mut self) -> Result<(u64, u64), AuthError> {
        let idx = self.out_next;
        let pad = *self
            .out_pads
            .get(usize::try_from(idx).map_err(|_| AuthError::Exhausted)?)
            .ok_or(AuthError::Exhausted)?;
        self.out_next += 1;
        self.consumed_bits += KEY_BITS_PER_TAG;
        Ok((idx, pad))
    }

    /// Tag the outgoing transcript (which is reset).
    pub fn seal(&mut self, transcript: &mut PolyHash) -> Result<AuthTag, AuthError> {
        covered(transcript)?;
        let (pad_index, pad) = self.take_out()?;
        Ok(AuthTag {
            pad_index,
            tag: transcript.finish_reset() ^ pad,
        })
    }

    fn in_pad(&self, idx: u64) -> Result<u64, AuthError> {
        usize::try_from(idx)
            .ok()
            .and_then(|i| self.in_pads.get(i).copied())
            .ok_or(AuthError::BadIndex(idx))
    }

    /// Verify an incoming tag over the incoming transcript (which is reset). Returns
    /// the watermark before this message, so the caller can accept key indices the
    /// peer drew between its previous tag and this one.
    pub fn open(&mut self, transcript: &mut PolyHash, tag: &AuthTag) -> Result<u64, AuthError> {
        covered(transcript)?;
        if tag.pad_index < self.in_next {
            return Err(AuthError::BadIndex(tag.pad_index));
        }
        let pad = self.in_pad(tag.pad_index)?;
        if transcript.finish_reset() ^ pad != tag.tag {
            return Err(AuthError::BadTag);
        }
        let prev = self.in_next;
        self.consumed_bits += KEY_BITS_PER_TAG * (tag.pad_index + 1 - self.in_next);
        self.in_next = tag.pad_index + 1;
        Ok(prev)
    }

    /// Read an incoming-stream key the peer drew at `idx`; only valid for indices in
    /// `[prev_watermark, current_watermark)` as returned by [`AuthChannel::open`].
    pub fn peer_key(&self, idx: u64, prev_watermark: u64) -> Result<u64, AuthError> {
        if idx < prev_watermark || idx >= self.in_next {
            return Err(AuthError::BadIndex(idx));
        }
        self.in_pad(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_shows_no_key_material() {
        let material = AuthKeyMaterial {
            mac_key: 0x5eed_5eed_5eed_5eed,
            a2b: vec![0xabcd_abcd_abcd_abcd; 2],
            b2a: vec![0x1234_1234_1234_1234],
        };
        let channel = AuthChannel::new(Role::Alice, &material);
        // A frame's keys are bit vectors: their Debug shows the length, not the words.
        let key = crate::bits::BitVec::from_words(vec![0x5eed_5eed_5eed_5eed], 64).unwrap();
        assert_eq!(format!("{key:?}"), "BitVec(64 bits)");
        for shown in [format!("{material:?}"), format!("{channel:?}")] {
            for secret in [
                0x5eed_5eed_5eed_5eed_u64,
                0xabcd_abcd_abcd_abcd,
                0x1234_1234_1234_1234,
            ] {
                assert!(!shown.contains(&secret.to_string()), "{shown}");
                assert!(!shown.contains(&format!("{secret:x}")), "{shown}");
            }
        }
    }

    #[test]
    fn a_transcript_longer_than_one_tag_covers_is_refused() {
        let m = AuthKeyMaterial::insecure_from_seed(3, 8);
        let mut a = AuthChannel::new(Role::Alice, &m);
        let mut b = AuthChannel::new(Role::Bob, &m);
        let words = vec![7u64; 1 << 16];
        let mut long = a.transcript();
        for _ in 0..(MAX_TAGGED_WORDS >> 16) {
            long.absorb_all(&words);
        }
        // At the limit a tag is made and accepted ...
        let mut received = b.transcript();
        for _ in 0..(MAX_TAGGED_WORDS >> 16) {
            received.absorb_all(&words);
        }
        let mut at_limit = long.clone();
        let tag = a.seal(&mut at_limit).unwrap();
        assert!(b.open(&mut received.clone(), &tag).is_ok());
        // ... one word more and it is neither made nor accepted.
        long.absorb(1);
        received.absorb(1);
        assert_eq!(
            a.seal(&mut long),
            Err(AuthError::TooLong(MAX_TAGGED_WORDS + 1))
        );
        assert_eq!(
            b.open(&mut received, &tag),
            Err(AuthError::TooLong(MAX_TAGGED_WORDS + 1))
        );
    }

    #[test]
    fn tag_roundtrip_and_tamper() {
        let m = AuthKeyMaterial::insecure_from_seed(1, 8);
        let mut a = AuthChannel::new(Role::Alice, &m);
        let mut b = AuthChannel::new(Role::Bob, &m);
        let mut ta = a.transcript();
        ta.absorb_all(&[1, 2, 3]);
        let tag = a.seal(&mut ta).unwrap();
        let mut tb = b.transcript();
        tb.absorb_all(&[1, 2, 3]);
        assert_eq!(b.open(&mut tb, &tag), Ok(0));
        // Replay of the same pad index is refused.
        let mut tb = b.transcript();
        tb.absorb_all(&[1, 2, 3]);
        assert_eq!(b.open(&mut tb, &tag), Err(AuthError::BadIndex(0)));
        // Tampered content fails.
        let mut ta = a.transcript();
        ta.absorb_all(&[4]);
        let tag = a.seal(&mut ta).unwrap();
        let mut tb = b.transcript();
        tb.absorb_all(&[5]);
        assert_eq!(b.open(&mut tb, &tag), Err(AuthError::BadTag));
        assert_eq!(a.consumed_bits(), 64 * 3);
    }

    #[test]
    fn dropped_message_burns_pad_without_desync() {
        let m = AuthKeyMaterial::insecure_from_seed(2, 8);
        let mut a = AuthChannel::new(Role::Alice, &m);
        let mut b = AuthChannel::new(Role::Bob, &m);
        let mut t = a.transcript();
        t.absorb(9);
        let _lost = a.seal(&mut t).unwrap();
        t.absorb(10);
        let tag = a.seal(&mut t).unwrap();
        let mut tb = b.transcript();
        tb.absorb(10);
        assert_eq!(b.open(&mut tb, &tag), Ok(0));
        assert_eq!(wegman_carter_tag(m.mac_key, &[10], m.a2b[1]), tag.tag);
    }
}
