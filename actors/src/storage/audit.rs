//! The audit trail of this KME: its records and their hash chain.
//!
//! The chain lives in the append-only `audit` table. Every record travels one way: as part of a
//! storage operation (`ops.rs`), which `DbWriter` appends inside the same transaction as the
//! key-state change it records (fail-closed: no audit record, no key). An event that changes
//! no key state (start-up, withdrawn keys) is an operation of its own, `AppendAudit`.

use openssl::sha::Sha256;
use serde::Serialize;
use uuid::Uuid;

use crate::error::Result;
use crate::types::{Binding, KmeId, SaeId};

/// One audit event: a short machine-readable kind and a JSON detail. Never holds key bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub event: &'static str,
    pub detail: String,
}

impl AuditRecord {
    /// `detail` is serialised to JSON directly (hot paths pass plain structs, not `json!` maps).
    pub fn new(event: &'static str, detail: impl Serialize) -> Self {
        let detail = serde_json::to_string(&detail)
            .unwrap_or_else(|err| format!("{{\"unserialisable_detail\":\"{err}\"}}"));
        Self { event, detail }
    }
}

/// Detail of `keys_delivered`: keys handed to a master SAE (positions, never key bytes).
#[derive(Serialize)]
#[allow(non_snake_case)]
pub struct Delivered<'a> {
    pub request_id: Uuid,
    pub master: &'a SaeId,
    pub slaves: &'a [SaeId],
    /// The neighbour KME whose link gave the material, or "local".
    pub link: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<u64>,
    pub size: u32,
    pub key_IDs: Vec<Uuid>,
}

/// Detail of `keys_bound`: an activation batch from a neighbour, bound at this KME.
#[derive(Serialize)]
pub struct Bound<'a> {
    pub from_kme: &'a KmeId,
    pub seq: u64,
    pub bindings: &'a [Binding],
}

/// Detail of `keys_retrieved`: keys consumed by a slave SAE.
#[derive(Serialize)]
#[allow(non_snake_case)]
pub struct Retrieved<'a> {
    pub slave: &'a SaeId,
    pub master: &'a SaeId,
    pub key_IDs: &'a [Uuid],
}

/// hash = SHA-256(prev_hash || id || at_ms || event || 0x00 || detail).
pub fn chain_hash(prev: &[u8], id: i64, at_ms: i64, event: &str, detail: &str) -> Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(&id.to_be_bytes());
    hasher.update(&at_ms.to_be_bytes());
    hasher.update(event.as_bytes());
    hasher.update(&[0]);
    hasher.update(detail.as_bytes());
    Ok(hasher.finish())
}
