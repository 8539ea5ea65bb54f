//! Classical post-processing for decoy-state BB84 QKD.
//!
//! The crate (`kme-bb84`; no actors, no storage, no network) turns raw detection records into identical secret keys at both ends:
//! sifting → parameter estimation (sample QBER + decoy bounds) → Cascade error
//! correction → verification hash → Toeplitz privacy amplification, with every
//! classical message authenticated Wegman–Carter style. Each end is a deterministic
//! message-driven state machine ([`pipeline::AliceFrame`], [`pipeline::BobFrame`]),
//! so the caller can carry [`pipeline::Envelope`]s over any transport (e.g. HTTPS
//! between two actors). [`channel`] simulates the quantum link for tests/benchmarks.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod auth;
pub mod bits;
pub mod cascade;
pub mod channel;
pub mod estimation;
pub mod finite_key;
pub mod gf64;
pub mod math;
pub mod parallel;
pub mod pipeline;
pub mod privacy;
pub mod sifting;
pub mod verify;
