//! Storage: the SQLite file (WAL) and everything that writes or reads it.
//!
//! | file | what |
//! |---|---|
//! | `store.rs` | `Store` actor: group commit in front of the writer |
//! | `ops.rs` | the storage operations, one type each with its own result, and what each does in SQL |
//! | `writer.rs` | `DbWriter` (SyncArbiter of 1): the write connection, one transaction per batch |
//! | `checkpointer.rs` | `DbCheckpointer` (SyncArbiter of 1): WAL checkpoints off the writer's path |
//! | `held.rs` | keys of a relay held until the master's KME releases or aborts it |
//! | `db.rs` | opening, migrations (`sql/migrations`), read-side queries |
//! | `audit.rs` | audit records and their hash chain |
//! | `audit_trail.rs` | the trail as a whole: verification, its head outside the database, export and pruning of segments |
//! | `sealing.rs` | AES-256-GCM sealing of key material at rest, data keys by HKDF |
//! | `master_key.rs` | which key file opens the database, and the master key's rotation |
//! | `restored.rs` | a database restored from a backup: its waiting keys forgotten |

pub mod audit;
pub mod audit_trail;
pub mod checkpointer;
pub mod db;
pub mod held;
pub mod master_key;
pub mod ops;
pub mod restored;
pub mod sealing;
pub mod store;
pub mod writer;
