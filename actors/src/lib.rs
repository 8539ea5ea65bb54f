//! The domain of the kme runtime: actors, their messages, key/pool/link logic and storage.
//!
//! No HTTP here: the `kme` crate's `src/` is the edge that parses requests and sends one
//! message per request to these actors. One actor per file, its messages beside it:
//!
//! | file | actor | owns |
//! |---|---|---|
//! | `sae_registry.rs` | `SaeRegistry` | identities, SAE homes, routes to neighbours, per-SAE rate limits (`sae_quota.rs`) |
//! | `key_pool.rs` | `KeyPool` (one per link) | this end's available material, allocation cursor |
//! | `link/mod.rs` | `Link` (one per link) | its key source, block numbering, two-phase delivery, commits, link health |
//! | `link/sources/bb84_engine.rs` | `Bb84Engine` (SyncArbiter of 1 per BB84 link) | channel simulation, the frame's post-processing |
//! | `peer/peer_link.rs` | `PeerLink` (one per neighbour) | mTLS client, batching, sequence numbers |
//! | `relay/router.rs` | `Router` | the network's links, link state news, routes beyond the neighbours |
//! | `relay/transport.rs` | `Relay` | relays and multicasts passing through this KME, release and abort |
//! | `storage/store.rs` | `Store` | group commit in front of the writer |
//! | `storage/writer.rs` | `DbWriter` (SyncArbiter of 1) | the SQLite write connection |
//! | `alerts.rs` | `Alerts` | link and pool states last seen, the webhook's queue of events |
//! | `storage/checkpointer.rs` | `DbCheckpointer` (SyncArbiter of 1) | WAL checkpoints off the writer's path |
//!
//! A folder per subsystem: `link/` (the `Link`, the `KeySource` trait it drives in
//! `key_source.rs`, the authentication stream in `auth.rs`, and the sources in `sources/`:
//! `bb84.rs` with its engine, `file_drop.rs` with `key_files.rs`, `courier.rs`, a CSPRNG
//! stand-in that is not QKD), `peer/` (the KME-to-KME client and its wire types in
//! `protocol.rs`), `relay/` (routing, trusted-node relay and multicast, and the one-time pad
//! and MAC of a hop in `seal.rs`), `storage/` (SQLite, sealing at rest, the audit chain). The BB84
//! post-processing itself is the `kme-bb84` crate (`bb84/`): no actors, no storage.
//! `startup.rs` reads what each link end resumes from and starts its actors.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod alerts;
pub mod error;
pub mod key_pool;
pub mod link;
pub mod metrics;
pub mod peer;
pub mod relay;
pub mod sae_quota;
pub mod sae_registry;
pub mod startup;
pub mod storage;
pub mod types;

pub use error::{Error, Result};
