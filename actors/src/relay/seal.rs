//! One hop of a relayed key: one-time pads and a one-time Wegman–Carter MAC, both taken from
//! the link the hop crosses (not an actor; the `KeyPool` of the sending end seals, the
//! `Store` of the receiving end opens, inside the transaction that burns the material).
//!
//! Layout of a sealed leg's material, in the sender's stream of the link: `n` pads of `len`
//! bytes (key `i` travels as key `i` XOR pad `i`), then [`MAC_KEY_BYTES`]: the hash key `r`
//! and the tag pad `s` (8 bytes each). The tag is `H_r(leg) XOR s`, `H_r` the polynomial hash
//! over GF(2^64) of the BB84 authentication, over everything the leg says (relay ID, master,
//! slaves, key_IDs, positions, the tree below, the sealed keys): a forger without the link's
//! material succeeds with probability at most (words + 1) / 2^64 per attempt, and each key is
//! used once. Pads and MAC keys are consumed like any key material: never twice.

use base64::Engine;
use serde::Serialize;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::types::{Binding, Branch, SaeId, Sealed, MAC_KEY_BYTES};
use kme_bb84::gf64::Gf64Mul;

/// What the tag covers: every field of the leg the receiver acts on.
#[derive(Serialize)]
struct Authenticated<'a> {
    relay_id: &'a Uuid,
    master: &'a SaeId,
    slaves: &'a [SaeId],
    start: u64,
    len: u32,
    key_ids: &'a [Uuid],
    onward: &'a [Branch],
    keys: &'a [String],
}

fn engine() -> &'static base64::engine::GeneralPurpose {
    &base64::engine::general_purpose::STANDARD
}

/// Bytes as 64-bit words, zero-padded, then their byte length (so padding cannot collide).
fn words(bytes: &[u8]) -> Vec<u64> {
    let mut words: Vec<u64> = bytes
        .chunks(8)
        .map(|chunk| {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            u64::from_le_bytes(word)
        })
        .collect();
    words.push(bytes.len() as u64);
    words
}

fn tag(
    binding: &Binding,
    relay_id: &Uuid,
    onward: &[Branch],
    keys: &[String],
    mac: &[u8],
) -> Result<u64> {
    let leg = Authenticated {
        relay_id,
        master: &binding.master,
        slaves: &binding.slaves,
        start: binding.start,
        len: binding.len,
        key_ids: &binding.key_ids,
        onward,
        keys,
    };
    let message = serde_json::to_vec(&leg).map_err(|err| Error::Storage(err.to_string()))?;
    let (r, s) = mac_key(mac)?;
    Ok(poly_hash(r, &words(&message)) ^ s)
}

/// `H_r(m) = sum_i m_i r^(L+2-i) + L r` over GF(2^64) (Horner form), as in the BB84
/// authentication, with one multiplication table: a leg is hashed once, so the four tables
/// of the unrolled `PolyHash` would cost more than they save.
fn poly_hash(r: u64, words: &[u64]) -> u64 {
    let mul = Gf64Mul::new(r);
    let acc = words.iter().fold(0, |acc, w| mul.mul(acc ^ w));
    mul.mul(acc ^ words.len() as u64)
}

fn mac_key(mac: &[u8]) -> Result<(u64, u64)> {
    let word = |range: std::ops::Range<usize>| {
        mac.get(range)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    match (mac.len() == MAC_KEY_BYTES, word(0..8), word(8..16)) {
        (true, Some(r), Some(s)) => Ok((r, s)),
        _ => Err(Error::Storage("a relay MAC key must be 16 bytes".into())),
    }
}

/// Splits material into `n` pads of `len` bytes and the MAC key after them.
fn split(material: &[u8], n: usize, len: usize) -> Result<(&[u8], &[u8])> {
    let pads = n.saturating_mul(len);
    if material.len() != pads + MAC_KEY_BYTES {
        return Err(Error::Storage(format!(
            "relay material of {} bytes, expected {}",
            material.len(),
            pads + MAC_KEY_BYTES
        )));
    }
    Ok(material.split_at(pads))
}

/// Seals `keys` (each `binding.len` bytes) with `material` (pads, then MAC key) for the leg
/// `binding` with relay `relay_id` and subtree `onward`.
pub fn seal(
    binding: &Binding,
    relay_id: &Uuid,
    onward: &[Branch],
    keys: &[Vec<u8>],
    material: &[u8],
) -> Result<Sealed> {
    let len = binding.len as usize;
    let (pads, mac) = split(material, keys.len(), len)?;
    let sealed: Vec<String> = keys
        .iter()
        .zip(pads.chunks_exact(len.max(1)))
        .map(|(key, pad)| {
            let bytes: Vec<u8> = key.iter().zip(pad).map(|(k, p)| k ^ p).collect();
            engine().encode(bytes)
        })
        .collect();
    let tag = tag(binding, relay_id, onward, &sealed, mac)?;
    Ok(Sealed { keys: sealed, tag })
}

/// Checks the tag of a sealed leg and returns its keys; `material` are the pads and MAC key
/// at the leg's positions. A wrong tag, count or length is a refusal of the peer message.
pub fn open(
    binding: &Binding,
    relay_id: &Uuid,
    onward: &[Branch],
    sealed: &Sealed,
    material: &[u8],
) -> Result<Vec<Vec<u8>>> {
    let len = binding.len as usize;
    let refuse = |why: &str| Error::PeerMessage(format!("relay {relay_id}: {why}"));
    if sealed.keys.len() != binding.key_ids.len() {
        return Err(refuse("the sealed keys do not match the key_IDs"));
    }
    let (pads, mac) = split(material, sealed.keys.len(), len)?;
    if tag(binding, relay_id, onward, &sealed.keys, mac)? != sealed.tag {
        return Err(refuse("the MAC does not verify (tampered or replayed leg)"));
    }
    sealed
        .keys
        .iter()
        .zip(pads.chunks_exact(len.max(1)))
        .map(|(text, pad)| {
            let bytes = engine()
                .decode(text)
                .map_err(|_| refuse("a sealed key is not base64"))?;
            if bytes.len() != len {
                return Err(refuse("a sealed key has the wrong length"));
            }
            Ok(bytes.iter().zip(pad).map(|(c, p)| c ^ p).collect())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kme_bb84::gf64::PolyHash;

    fn binding() -> Binding {
        Binding {
            master: SaeId::new("sae-a"),
            slaves: vec![SaeId::new("sae-c")],
            start: 4096,
            len: 4,
            key_ids: vec![Uuid::now_v7(), Uuid::now_v7()],
            relay: None,
        }
    }

    #[test]
    fn the_leg_hash_is_the_bb84_polynomial_hash() {
        let words: Vec<u64> = (0..37u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let r = 0x0123_4567_89ab_cdef;
        assert_eq!(poly_hash(r, &words), PolyHash::hash(r, &words));
    }

    #[test]
    fn sealed_keys_open_only_unchanged_and_with_the_same_material() {
        let b = binding();
        let relay = Uuid::new_v4();
        let keys = vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8]];
        let material: Vec<u8> = (0..8 + MAC_KEY_BYTES as u8)
            .map(|i| i.wrapping_mul(37))
            .collect();
        let sealed = seal(&b, &relay, &[], &keys, &material).unwrap();
        assert_ne!(
            sealed.keys[0],
            engine().encode(&keys[0]),
            "keys travel sealed"
        );
        assert_eq!(open(&b, &relay, &[], &sealed, &material).unwrap(), keys);

        // A flipped bit anywhere is refused: in a sealed key, the tag, a position, a slave.
        let mut flipped = sealed.clone();
        let mut bytes = engine().decode(&flipped.keys[1]).unwrap();
        bytes[0] ^= 1;
        flipped.keys[1] = engine().encode(bytes);
        assert!(open(&b, &relay, &[], &flipped, &material).is_err());
        let mut bad_tag = sealed.clone();
        bad_tag.tag ^= 1 << 63;
        assert!(open(&b, &relay, &[], &bad_tag, &material).is_err());
        let moved = Binding {
            start: 4097,
            ..b.clone()
        };
        assert!(open(&moved, &relay, &[], &sealed, &material).is_err());
        let other_slave = Binding {
            slaves: vec![SaeId::new("sae-x")],
            ..b.clone()
        };
        assert!(open(&other_slave, &relay, &[], &sealed, &material).is_err());
        let rerouted = [Branch {
            kme: crate::types::KmeId::new("kme-x"),
            onward: vec![],
        }];
        assert!(open(&b, &relay, &rerouted, &sealed, &material).is_err());
        // Other material (a replay against later positions) does not verify either.
        let mut other = material.clone();
        other[8] ^= 1;
        assert!(open(&b, &relay, &[], &sealed, &other).is_err());
        // A truncated leg.
        let mut short = sealed;
        short.keys.pop();
        assert!(open(&b, &relay, &[], &short, &material).is_err());
    }
}
