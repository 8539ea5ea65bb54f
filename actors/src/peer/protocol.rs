//! The KME-to-KME wire protocol: endpoint paths and the JSON bodies both ends exchange. The
//! client side is `PeerLink` (`peer_link.rs`), the server side the edge's `peer_api.rs`.

use base64::Engine;
use openssl::sha::sha256;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::link::key_source::Condition;
use crate::storage::ops::BlockRecord;
use crate::types::{Binding, KmeId, Owner, SaeId};
use kme_bb84::bits::BitVec;
use kme_bb84::pipeline::{Envelope, FrameReport};

pub const ACTIVATE_PATH: &str = "/peer/v1/activate";
pub const BLOCKS_PATH: &str = "/peer/v1/blocks";
pub const LEVEL_PATH: &str = "/peer/v1/level";
pub const SOURCE_PATH: &str = "/peer/v1/source";
pub const TOPOLOGY_PATH: &str = "/peer/v1/topology";
pub const SETTLE_PATH: &str = "/peer/v1/relay/settle";

/// Link state news, flooded between neighbours (see `relay::router`): each KME's view of its
/// own links, the newest `seq` of each origin winning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyUpdate {
    pub adverts: Vec<Advert>,
}

/// One KME's links as it sees them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Advert {
    pub origin: KmeId,
    /// `epoch << 40 | counter`: grows across the origin's restarts.
    pub seq: u64,
    pub links: Vec<LinkReport>,
    /// Pairs (master, slave) whose slave is an SAE of the origin and has as many keys from
    /// that master waiting there as the master's `max_waiting_keys`: no more keys for them
    /// until it retrieves some.
    #[serde(default)]
    pub full_pairs: Vec<(SaeId, SaeId)>,
}

/// The origin's end of its link to `peer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkReport {
    pub peer: KmeId,
    pub state: Condition,
    /// Material the origin can send over this link now.
    pub available_bytes: u64,
    /// The most its pool holds (`max_key_count` x `key_size`).
    pub capacity_bytes: u64,
    /// BB84 links: QBER of the last frame measured, and the secret key rate (dashboards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qber: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_bits_per_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyNoted {}

/// Release or abort of a relay, passed down its tree (see `relay`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleRequest {
    pub relay_id: uuid::Uuid,
    pub release: bool,
    pub reason: String,
}

/// Settlements of concurrent relays, sent together (their order does not matter).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleBatch {
    pub settles: Vec<SettleRequest>,
}

/// The outcome of each settlement of a batch, in order: None when it is done, else why not.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleResults {
    pub results: Vec<Option<String>>,
}

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
        /// BB84: the Wegman–Carter tag of the frame and blocks (`link::auth::CommitAuth`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<u64>,
    },
    /// The ends number the key blocks differently: go on from these numbers (above both
    /// ends' own), discarding every key block of the link below them.
    Realign { next: Vec<BlockId> },
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

/// Answer of the activation endpoint: the batch is durable here.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Activated {}

/// Answer of the blocks endpoint: the blocks are stored; the receiver's pool level now.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlocksStored {
    pub level: u64,
}

/// Answer of the level endpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelNoted {}

/// The answering end's part of a running BB84 frame.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrameProgress {
    /// Its post-processing messages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub envelopes: Vec<Envelope>,
    /// Its statistics, once its part of the frame is over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<FrameReport>,
}

/// Answer of the source endpoint: one variant per outcome of a `SourceRequest`. The driving
/// end takes only the variants its request can have, and any other is an error.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum SourceReply {
    /// `Start`: its authentication window is burned here; go on from `next_window`.
    WindowBehind { next_window: u64 },
    /// `Start`, `Step`: the frame goes on (or ended) here.
    Progress(Box<FrameProgress>),
    /// `Start`: the window is neither burned nor held here (an end was restored from a
    /// backup): the link waits for an operator key. This end's next window.
    AuthOutOfStep { next_window: u64 },
    /// `FileOffer`: what this end found under the offered name, and (an authentication key
    /// file) the next number of this end's authentication stream, so that the key restarts
    /// the stream above what either end has used.
    FileOffer {
        file: FileMatch,
        #[serde(default)]
        next_auth_seq: u64,
    },
    /// `Commit`: the blocks are stored here; this end's pool level now.
    Committed { level: u64 },
    /// `Realign`: this end goes on from the numbers given, its pool empty.
    Realigned {},
}

impl SourceReply {
    /// The error for an answer that `request` cannot have.
    pub fn unexpected(&self, request: &str) -> Error {
        let answer = match self {
            SourceReply::WindowBehind { .. } => "window_behind",
            SourceReply::AuthOutOfStep { .. } => "auth_out_of_step",
            SourceReply::Progress(_) => "progress",
            SourceReply::FileOffer { .. } => "file_offer",
            SourceReply::Committed { .. } => "committed",
            SourceReply::Realigned {} => "realigned",
        };
        Error::PeerMessage(format!("a {request} was answered with {answer}"))
    }
}

/// Body of a refused or failed request, any endpoint (with a 4xx or 5xx status).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Refusal {
    pub error: String,
    /// Activation: positions below this are bound here already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_mark: Option<u64>,
    /// Commit: this end no longer holds the frame's key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub frame_lost: bool,
    /// Activation: the last sequence number taken from the sender (its numbers are behind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    /// Blocks, commit: the ends number the link's key blocks differently; this end's next
    /// number of each key stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_blocks: Option<Vec<BlockId>>,
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
        let data: Zeroizing<Vec<u8>> = base64::engine::general_purpose::STANDARD
            .decode(self.data.as_bytes())
            .map_err(|err| Error::PeerMessage(format!("block {} is not base64: {err}", self.seq)))?
            .into();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_replies_are_flat_objects_tagged_by_outcome() {
        let behind = serde_json::to_value(SourceReply::WindowBehind { next_window: 7 }).unwrap();
        assert_eq!(
            behind,
            serde_json::json!({"reply": "window_behind", "next_window": 7})
        );
        let committed: SourceReply =
            serde_json::from_str(r#"{"reply":"committed","level":42}"#).unwrap();
        assert!(matches!(committed, SourceReply::Committed { level: 42 }));
        // An answer without its outcome, or without the outcome's fields, is refused.
        assert!(serde_json::from_str::<SourceReply>(r#"{"level":42}"#).is_err());
        assert!(serde_json::from_str::<SourceReply>(r#"{"reply":"committed"}"#).is_err());
        assert!(matches!(
            committed.unexpected("start"),
            Error::PeerMessage(message) if message == "a start was answered with committed"
        ));
    }
}

/// Property tests of every message a neighbour sends (`make fuzz` runs them long): arbitrary
/// and mutated bytes are refused by the parser, never a panic.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// Parses `bytes` as every peer message type.
    fn every_message(bytes: &[u8]) {
        let _ = serde_json::from_slice::<ActivationBatch>(bytes);
        let _ = serde_json::from_slice::<BlockShipment>(bytes);
        let _ = serde_json::from_slice::<LevelReport>(bytes);
        let _ = serde_json::from_slice::<SettleBatch>(bytes);
        let _ = serde_json::from_slice::<SettleResults>(bytes);
        let _ = serde_json::from_slice::<TopologyUpdate>(bytes);
        let _ = serde_json::from_slice::<SourceRequest>(bytes);
        let _ = serde_json::from_slice::<SourceReply>(bytes);
        let _ = serde_json::from_slice::<Refusal>(bytes);
        if let Ok(shipment) = serde_json::from_slice::<BlockShipment>(bytes) {
            for block in shipment.blocks {
                let _ = block.decode();
            }
        }
    }

    const VALID: &str = r#"{"seq":7,"bindings":[{"master":"sae-a","slaves":["sae-b"],"start":0,"len":32,"key_ids":["0190b4a6-2a5e-7c3e-8a3e-1b2c3d4e5f60"],"relay":{"relay_id":"0190b4a6-2a5e-7c3e-8a3e-1b2c3d4e5f61","onward":[{"kme":"kme-c","onward":[]}],"sealed":{"keys":["AAAA"],"tag":1}}}]}"#;

    proptest! {
        #[test]
        fn any_bytes_as_every_peer_message(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            every_message(&bytes);
        }

        #[test]
        fn a_valid_activation_mutated(at in 0..VALID.len(), byte in any::<u8>()) {
            let mut bytes = VALID.as_bytes().to_vec();
            bytes[at] = byte;
            every_message(&bytes);
        }
    }
}
