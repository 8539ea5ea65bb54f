//! The one integration-test binary: real KMEs on 127.0.0.1:0 with a PKI minted here, driven by
//! a real mTLS client. Add modules here, never new files in tests/ (each is a slow binary).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod api;
mod bad_input;
mod bb84;
mod bb84_faults;
mod crash;
mod db_probe;
mod file_drop;
mod harness;
mod load;
mod operations;
mod pki;
mod relay;
mod revocation;
mod sae_cli;
