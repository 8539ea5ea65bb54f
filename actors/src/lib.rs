//! The domain of the kme runtime: actors, their messages, key/pool/link logic and storage.
//!
//! No HTTP here: the `kme` crate's `src/` is the edge that parses requests and sends one
//! message per request to these actors. One actor per file, its messages beside it:
//!
//! | file | actor | owns |
//! |---|---|---|
//! | `sae_registry.rs` | `SaeRegistry` | identities, SAE homes, routes to neighbours |
//! | `key_pool.rs` | `KeyPool` (one per link) | this end's available material, allocation cursor |
//! | `link.rs` | `Link` (one per link) | its key source, block numbering, two-phase delivery, commits, link health |
//! | `bb84_engine.rs` | `Bb84Engine` (SyncArbiter of 1 per BB84 link) | channel simulation, the frame's post-processing |
//! | `peer_link.rs` | `PeerLink` (one per neighbour) | mTLS client, batching, sequence numbers |
//! | `audit_log.rs` | `AuditLog` | the hash-chained audit trail |
//! | `store.rs` | `Store` | group commit in front of the writer |
//! | `db_writer.rs` | `DbWriter` (SyncArbiter of 1) | the SQLite write connection |
//! | `db_checkpointer.rs` | `DbCheckpointer` (SyncArbiter of 1) | WAL checkpoints off the writer's path |
//!
//! Not actors: `key_source.rs` (the `KeySource` trait that a `Link` drives) and its sources in
//! `key_source/` (`bb84.rs`: BB84 frames at both ends; `file_drop.rs`: device key files;
//! `courier.rs`: CSPRNG stand-in, not QKD), `bb84/` (the post-processing library),
//! `link_auth.rs` (a BB84 link's authentication key stream), `sealing.rs`, `db.rs`,
//! `types.rs`.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod audit_log;
pub mod bb84;
pub mod bb84_engine;
pub mod db;
pub mod db_checkpointer;
pub mod db_writer;
pub mod error;
pub mod key_drop;
pub mod key_pool;
pub mod key_source;
pub mod link;
pub mod link_auth;
pub mod peer_link;
pub mod sae_registry;
pub mod sealing;
pub mod store;
pub mod types;

pub use error::{Error, Result};
