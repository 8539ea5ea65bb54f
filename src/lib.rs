//! kme: an ETSI GS QKD 014 Key Management Entity. This crate is the edge: configuration,
//! TLS, the HTTP routes of the SAE API and of the KME-to-KME channel, and the CLI. The domain
//! (actors, pools, links, storage) is the `kme-actors` crate in `actors/`, the BB84
//! post-processing the `kme-bb84` crate in `bb84/`, the benchmarks the `kme-bench` crate in
//! `bench/`.
//!
//! | file | what |
//! |---|---|
//! | `config.rs` | `kme.toml`: raw file → validated `Config` → one KME's `NodeConfig` |
//! | `tls.rs` | OpenSSL acceptors/connector, certificate identity of a connection |
//! | `cert_status.rs` | a connection's certificate checked again per request: expiry, CRLs |
//! | `sae_api.rs` | ETSI 014 routes: status, enc_keys, dec_keys, sae/info/me |
//! | `peer_api.rs` | KME-to-KME routes: activations, courier blocks, levels |
//! | `etsi.rs` | ETSI JSON formats, spec messages, `KeyCount` / `KeySizeBits` |
//! | `error.rs` | the one error → HTTP mapping (400 / 401 / 503, ETSI Error JSON) |
//! | `ask.rs` | one actor message per request, under a hard timeout |
//! | `node.rs` | starting one KME (storage, actors, listeners) |
//! | `reload.rs` | SIGHUP / `POST /reload`: SAEs and their limits re-read without a restart |
//! | `admin_cli.rs` | `kme admin`: health, ready, metrics, reload from the terminal |
//! | `admin_api.rs` | the operator's listener: `/health`, `/ready`, `/metrics` |
//! | `sae_metrics.rs` | metrics middleware of the SAE API (requests, latency, keys, refusals) |
//! | `link_cli.rs` | `kme link rekey`: a BB84 link's authentication key file installed |
//! | `sae_cli.rs` | `kme sae`: an ETSI 014 client for scripts (exit codes per answer) |

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod admin_api;
pub mod admin_cli;
pub mod ask;
pub mod cert_status;
pub mod config;
pub mod error;
pub mod etsi;
pub mod link_cli;
pub mod node;
pub mod peer_api;
pub mod reload;
pub mod sae_api;
pub mod sae_cli;
pub mod sae_metrics;
pub mod tls;
