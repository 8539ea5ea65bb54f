//! The authentication key stream of a BB84 link: one-time material for the Wegman–Carter tags
//! of the post-processing messages (not an actor; the `bb84` key source of the `Link` at each
//! end owns one).
//!
//! The stream is stored as link blocks of the owner [`Owner::Auth`](crate::types::Owner) (no KME ID can take
//! that name), so it is written, confirmed, discarded and deleted by the same code as key
//! blocks, and no SAE pool ever allocates from it. Frame attempt `k` uses window `k`:
//! [`WINDOW_BYTES`] bytes at `k * WINDOW_BYTES`, holding a fresh polynomial-hash key and
//! [`WINDOW_PADS`] one-time pads per direction. Both ends burn the window durably (the
//! stream's position) before the first tag of the frame, and never accept a window below
//! their position, so no pad serves twice, even across crashes; an aborted frame costs its
//! window. Successful frames refill the stream from their own key (the cost shows in the
//! link's net key rate); the first material, and a re-key after exhaustion or when the two
//! ends are out of step (one restored from a backup), come from an operator's key file, which
//! restarts the stream above every number either end has used (or, after exhaustion only and
//! with `auth_bootstrap = "tls"`, over the TLS channel; see `sources::bb84`).

use std::collections::VecDeque;

use zeroize::Zeroize;

use crate::peer::protocol::BlockId;
use crate::storage::db::StoredBlock;

use kme_bb84::auth::{wegman_carter_tag, AuthKeyMaterial};

/// One-time pads per direction and frame attempt. A frame uses at most 7 (its tagged messages
/// and the verification key); the rest is margin (a frame that runs out aborts). The last pad
/// of the Alice-to-Bob direction is kept from the engine: it tags the frame's `Commit`.
pub const WINDOW_PADS: usize = 16;
/// Bytes of one window: the hash key and the pads of both directions.
pub const WINDOW_BYTES: u64 = 8 * (1 + 2 * WINDOW_PADS as u64);

/// The part of the stream this end holds: whole blocks from the one holding `position` on.
#[derive(Debug, Clone)]
pub struct AuthStream {
    block_bytes: u64,
    /// First byte not burned yet.
    position: u64,
    blocks: VecDeque<StoredBlock>,
    /// Why this end and the other are not at the same place in the stream (an end restored
    /// from a backup): no frame runs until an operator key restarts the stream.
    out_of_step: Option<String>,
}

impl AuthStream {
    /// `blocks`: the stored, confirmed blocks of the stream from `position / block_bytes` on.
    pub fn new(block_bytes: usize, position: u64, blocks: Vec<StoredBlock>) -> Self {
        Self {
            block_bytes: (block_bytes as u64).max(1),
            position,
            blocks: blocks.into(),
            out_of_step: None,
        }
    }

    /// Why the two ends are out of step, if they are.
    pub fn out_of_step(&self) -> Option<&str> {
        self.out_of_step.as_deref()
    }

    /// The two ends are out of step: frames wait for an operator key.
    pub fn set_out_of_step(&mut self, reason: String) {
        if self.out_of_step.is_none() {
            log::error!("{reason}");
        }
        self.out_of_step = Some(reason);
    }

    /// A frame started in step (the Bob end): a `Start` out of step before it was a stray one.
    pub fn in_step(&mut self) {
        self.out_of_step = None;
    }

    /// An operator key restarts the stream at its first block, `seq`: everything held before
    /// is given up (never used again), and the two ends are in step again.
    pub fn restart_at(&mut self, seq: u64) {
        self.position = self.position.max(seq.saturating_mul(self.block_bytes));
        self.blocks.clear();
        self.out_of_step = None;
    }

    /// The stream byte after the last one held.
    fn end(&self) -> u64 {
        self.blocks
            .back()
            .map_or(self.position, |b| (b.seq + 1) * self.block_bytes)
    }

    /// The first window that is not burned.
    pub fn next_window(&self) -> u64 {
        self.position.div_ceil(WINDOW_BYTES)
    }

    /// Whole windows held and not burned.
    pub fn windows_left(&self) -> u64 {
        (self.end() / WINDOW_BYTES).saturating_sub(self.next_window())
    }

    /// Stream position right after window `k`, the value to store when burning it.
    pub fn position_after(k: u64) -> u64 {
        k.saturating_add(1).saturating_mul(WINDOW_BYTES)
    }

    /// The key material of window `k`, if it is held and not burned.
    pub fn window(&self, k: u64) -> Option<AuthKeyMaterial> {
        let start = k.checked_mul(WINDOW_BYTES)?;
        let end = start.checked_add(WINDOW_BYTES)?;
        if start < self.position || end > self.end() {
            return None;
        }
        let mut bytes = Vec::with_capacity(WINDOW_BYTES as usize);
        for block in &self.blocks {
            let block_start = block.seq * self.block_bytes;
            let from = start.max(block_start);
            let to = end.min(block_start + self.block_bytes);
            if from < to {
                let range = (from - block_start) as usize..(to - block_start) as usize;
                bytes.extend_from_slice(block.data.get(range)?);
            }
        }
        if bytes.len() as u64 != WINDOW_BYTES {
            return None;
        }
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| {
                let mut word = [0u8; 8];
                word.copy_from_slice(c);
                u64::from_le_bytes(word)
            })
            .collect();
        let (mac, pads) = words.split_first()?;
        let (a2b, b2a) = pads.split_at(WINDOW_PADS);
        Some(AuthKeyMaterial {
            mac_key: *mac,
            a2b: a2b.to_vec(),
            b2a: b2a.to_vec(),
        })
    }

    /// Window `k` is burned (durably): forget it and everything before it.
    pub fn burn(&mut self, k: u64) {
        self.position = self.position.max(Self::position_after(k));
        while let Some(first) = self.blocks.front() {
            if (first.seq + 1) * self.block_bytes <= self.position {
                self.blocks.pop_front();
            } else {
                break;
            }
        }
    }

    /// Newly confirmed blocks of the stream, in order.
    pub fn append(&mut self, blocks: impl IntoIterator<Item = StoredBlock>) {
        self.blocks.extend(blocks);
    }
}

/// What authenticates a BB84 frame's `Commit` (the owners and numbers of the blocks its key
/// becomes): the window's hash key and its last Alice-to-Bob pad, which the engine never
/// gets. Both ends split it off the window before the frame starts; the Bob end binds the
/// frame's key only to blocks whose tag verifies, so no one on the channel can renumber them.
#[derive(Clone)]
pub struct CommitAuth {
    mac_key: u64,
    pad: u64,
}

impl Drop for CommitAuth {
    fn drop(&mut self) {
        self.mac_key.zeroize();
        self.pad.zeroize();
    }
}

impl std::fmt::Debug for CommitAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitAuth(..)")
    }
}

impl CommitAuth {
    /// Takes the commit's pad out of `material` (before the engine gets it).
    pub fn split_from(material: &mut AuthKeyMaterial) -> Option<Self> {
        let pad = material.a2b.pop()?;
        Some(Self {
            mac_key: material.mac_key,
            pad,
        })
    }

    /// The Wegman–Carter tag of the commit of frame `frame_id` as `blocks`.
    pub fn tag(&self, frame_id: u64, blocks: &[BlockId]) -> u64 {
        wegman_carter_tag(self.mac_key, &commit_words(frame_id, blocks), self.pad)
    }

    pub fn verifies(&self, frame_id: u64, blocks: &[BlockId], tag: u64) -> bool {
        self.tag(frame_id, blocks) == tag
    }
}

/// The commit as words, without ambiguity: a domain word, the frame, the count, then per
/// block its owner's length, the owner's bytes (8 per word, zero-padded) and its number.
fn commit_words(frame_id: u64, blocks: &[BlockId]) -> Vec<u64> {
    const COMMIT: u64 = u64::from_be_bytes(*b"\0commit\0");
    let mut words = vec![COMMIT, frame_id, blocks.len() as u64];
    for block in blocks {
        let owner = block.owner.as_str().as_bytes();
        words.push(owner.len() as u64);
        words.extend(owner.chunks(8).map(|chunk| {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            u64::from_le_bytes(word)
        }));
        words.push(block.seq);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Owner;

    fn block(seq: u64, len: usize) -> StoredBlock {
        StoredBlock {
            seq,
            data: (0..len)
                .map(|i| (seq as usize * len + i) as u8)
                .collect::<Vec<u8>>()
                .into(),
        }
    }

    #[test]
    fn windows_span_blocks_and_are_burned_once() {
        // 100-byte blocks: window 0 = bytes 0..264 spans blocks 0, 1 and 2.
        let mut stream = AuthStream::new(100, 0, (0..6).map(|s| block(s, 100)).collect());
        assert_eq!(stream.windows_left(), 2);
        let w0 = stream.window(0).unwrap();
        assert_eq!(w0.a2b.len(), WINDOW_PADS);
        assert_eq!(w0.mac_key, u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]));
        assert_ne!(stream.window(1).unwrap(), w0);
        assert!(stream.window(2).is_none(), "only 600 bytes held");
        assert!(stream.window(u64::MAX / WINDOW_BYTES).is_none());
        assert!(stream.window(u64::MAX).is_none());
        stream.burn(0);
        assert!(
            stream.window(0).is_none(),
            "a burned window never comes back"
        );
        assert_eq!(stream.next_window(), 1);
        assert_eq!(stream.windows_left(), 1);
        // Blocks 0 and 1 lie wholly below position 264 and are dropped.
        assert_eq!(stream.blocks.front().unwrap().seq, 2);
        stream.append((6..9).map(|s| block(s, 100)));
        assert_eq!(stream.windows_left(), 2);
    }

    #[test]
    fn a_commit_tag_covers_every_owner_and_number() {
        let mut material = AuthKeyMaterial::insecure_from_seed(7, WINDOW_PADS);
        let auth = CommitAuth::split_from(&mut material).unwrap();
        assert_eq!(
            material.a2b.len(),
            WINDOW_PADS - 1,
            "the engine never gets the pad"
        );
        let id = |owner: &str, seq| BlockId {
            owner: Owner::parse(owner),
            seq,
        };
        let blocks = [id("kme-a", 4), id("kme-b", 9), id("#auth", 2)];
        let tag = auth.tag(3, &blocks);
        assert!(auth.verifies(3, &blocks, tag));
        let mut swapped = blocks.clone();
        swapped.swap(0, 1);
        let mut renumbered = blocks.clone();
        renumbered[2].seq = 3;
        let mut renamed = blocks.clone();
        renamed[0] = id("kme-c", 4);
        for (other, why) in [
            (&swapped[..], "owners swapped"),
            (&renumbered[..], "a number changed"),
            (&renamed[..], "an owner changed"),
            (&blocks[..2], "a block left out"),
        ] {
            assert!(!auth.verifies(3, other, tag), "{why}");
        }
        assert!(!auth.verifies(4, &blocks, tag), "another frame");
    }

    #[test]
    fn restart_resumes_after_the_burned_window() {
        // Position 264 (window 0 burned) with blocks from 2 on, as loaded at start.
        let stream = AuthStream::new(100, 264, (2..6).map(|s| block(s, 100)).collect());
        assert_eq!(stream.next_window(), 1);
        assert!(stream.window(0).is_none());
        assert!(stream.window(1).is_some());
    }
}
