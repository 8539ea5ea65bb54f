//! The key sources behind [`KeySource`](super::key_source::KeySource), one file each:
//!
//! | file | source |
//! |---|---|
//! | `bb84.rs` | BB84 frames at both ends (the default); `bb84_engine.rs` is its engine actor |
//! | `file_drop.rs` | key files a real QKD device drops at both ends; `key_files.rs` reads them |
//! | `courier.rs` | CSPRNG bytes shipped to the peer: tests and benchmarks, not QKD |

pub mod bb84;
pub mod bb84_engine;
pub mod courier;
pub mod file_drop;
pub mod key_files;
