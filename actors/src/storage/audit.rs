//! The audit trail of this KME: its records and their hash chain.
//!
//! The chain lives in the append-only `audit` table. Every record travels one way: as part of a
//! storage operation (`ops.rs`), which `DbWriter` appends inside the same transaction as the
//! key-state change it records (fail-closed: no audit record, no key). An event that changes
//! no key state (start-up, withdrawn keys) is an operation of its own, `AppendAudit`.

use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::sha::Sha256;
use openssl::sign::Signer;
use serde::Serialize;
use uuid::Uuid;

use crate::error::{Error, Result};
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

/// hash = HMAC-SHA256(key, prev_hash || id || at_ms || event || 0x00 || detail), or the same
/// unkeyed SHA-256 (`key` None) for records written before the chain was keyed.
pub fn chain_hash(
    key: Option<&[u8; 32]>,
    prev: &[u8],
    id: i64,
    at_ms: i64,
    event: &str,
    detail: &str,
) -> Result<[u8; 32]> {
    let parts: [&[u8]; 6] = [
        prev,
        &id.to_be_bytes(),
        &at_ms.to_be_bytes(),
        event.as_bytes(),
        &[0],
        detail.as_bytes(),
    ];
    match key {
        Some(key) => mac(key, &parts),
        None => {
            let mut hasher = Sha256::new();
            parts.iter().for_each(|part| hasher.update(part));
            Ok(hasher.finish())
        }
    }
}

/// HMAC-SHA256 under `key` of `parts`, concatenated.
pub fn mac(key: &[u8; 32], parts: &[&[u8]]) -> Result<[u8; 32]> {
    let fail = |err: openssl::error::ErrorStack| Error::Storage(format!("audit MAC: {err}"));
    let key = PKey::hmac(key).map_err(fail)?;
    let mut signer = Signer::new(MessageDigest::sha256(), &key).map_err(fail)?;
    for part in parts {
        signer.update(part).map_err(fail)?;
    }
    let mut out = [0u8; 32];
    let written = signer.sign(&mut out).map_err(fail)?;
    if written != out.len() {
        return Err(Error::Storage("audit MAC: short output".into()));
    }
    Ok(out)
}
