//! The KME-to-KME wire protocol: endpoint paths and the JSON bodies both ends exchange. The
//! client side is `PeerLink` (`peer_link.rs`), the server side the edge's `peer_api.rs`.

use base64::Engine;
use openssl::sha::sha256;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::storage::ops::BlockRecord;
use crate::types::{Binding, Owner};
use kme_bb84::bits::BitVec;
use kme_bb84::pipeline::{Envelope, FrameReport};

pub const ACTIVATE_PATH: &str = "/peer/v1/activate";
pub const BLOCKS_PATH: &str = "/peer/v1/blocks";
pub const LEVEL_PATH: &str = "/peer/v1/level";
pub const SOURCE_PATH: &str = "/peer/v1/source";

/// Body of an activation: bind these positions of the sender's stream to key_IDs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivationBatch {
    pub seq: u64,
    pub bindings: Vec<Binding>,
}

/// One block of link material on the wire (courier source).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireBlock {
    pub owner: Owner,
    pub seq: u64,
    /// Standard base64.
    pub data: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockShipment {
    pub blocks: Vec<WireBlock>,
}

/// How many bytes the sender's pool holds now (so the generating end knows what to produce).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelReport {
    pub level: u64,
}

/// A block by owner and number (its bytes are known at both ends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockId {
    pub owner: Owner,
    pub seq: u64,
}

/// Key-source messages from the driving end (the lower KME ID; Alice on BB84 links) to the
/// other end: BB84 post-processing, file-drop offers, and commits of both.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum SourceRequest {
    /// A new frame: Bob's detection record (in place of the quantum channel) and the
    /// authentication window that keys its tags.
    Start {
        frame_id: u64,
        window: u64,
        record: DetectionRecord,
        /// The sender's `bb84::pipeline::PROTOCOL_VERSION` (absent before version 2).
        #[serde(default)]
        protocol: u32,
    },
    /// Post-processing messages of the running frame.
    Step {
        frame_id: u64,
        envelopes: Vec<Envelope>,
    },
    /// file-drop: use the key file `name` if yours has this length and SHA-256 (hex).
    FileOffer {
        name: String,
        bytes: u64,
        sha256: String,
    },
    /// Store the frame's (or file's) key as these blocks, in order (a remainder below one block is
    /// dropped at both ends). `frame_id` is None when the Alice end restarted in between:
    /// then the Bob end answers from what it stored.
    Commit {
        frame_id: Option<u64>,
        blocks: Vec<BlockId>,
    },
}

/// The other end's key file under an offered name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileMatch {
    /// Same length and hash: held for the commit.
    Matched,
    /// Not (yet) written there.
    Missing,
    /// Different (the driving end sets its copy aside as `.rejected`).
    Mismatch,
    /// Gave blocks before (a crash left it behind): destroyed, not used again.
    Used,
}

/// Answer of every peer endpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_mark: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// BB84: the answering end's post-processing messages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub envelopes: Vec<Envelope>,
    /// BB84: the answering end's statistics, once its part of the frame is over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<FrameReport>,
    /// BB84: the `Start`'s authentication window is burned here; this is the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_window: Option<u64>,
    /// file-drop: what the answering end found under the offered name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileMatch>,
    /// BB84: the answering end no longer holds the committed frame's key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub frame_lost: bool,
}

impl WireBlock {
    pub fn encode(block: &BlockRecord) -> Self {
        Self {
            owner: block.owner.clone(),
            seq: block.seq,
            data: base64::engine::general_purpose::STANDARD.encode(&block.data),
        }
    }

    pub fn decode(self) -> Result<BlockRecord> {
        let data = base64::engine::general_purpose::STANDARD
            .decode(self.data.as_bytes())
            .map_err(|err| {
                Error::PeerMessage(format!("block {} is not base64: {err}", self.seq))
            })?;
        Ok(BlockRecord {
            owner: self.owner,
            seq: self.seq,
            data,
        })
    }
}

/// The digest that makes a retried activation recognisable: SHA-256 of the request body.
pub fn batch_digest(body: &[u8]) -> [u8; 32] {
    sha256(body)
}

/// Bob's detection record as it travels (bit-packed: measured bits and bases of the detected
/// slots). It stands in for the quantum channel and carries nothing Alice chose.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectionRecord {
    pub bits: BitVec,
    pub bases: BitVec,
}
