//! Reads of a KME's database from a test, next to the running KME (SQLite in WAL mode lets a
//! reader in): audit events, the audit hash chain, and link blocks.

use std::path::Path;

use kme_actors::storage::db::{self, DbPool};
use kme_actors::types::{KmeId, Owner};
use serde_json::Value;

/// A reader of the database of `kme` in the test network under `dir`.
pub fn open(dir: &Path, kme: &str) -> DbPool {
    let path = dir.join(format!("data/{kme}/kme.sqlite"));
    let (_, reader) = db::open(&path, 1).unwrap();
    reader
}

/// How many link blocks numbered `seq` of `owner` on the link to `peer` the database of `kme`
/// holds (confirmed or not).
pub fn link_blocks(dir: &Path, kme: &str, peer: &str, owner: &str, seq: u64) -> i64 {
    let conn = open(dir, kme).get().unwrap();
    conn.query_row(
        "SELECT count(*) FROM link_blocks WHERE peer = ?1 AND owner = ?2 AND seq = ?3",
        (peer, owner, seq as i64),
        |r| r.get(0),
    )
    .unwrap()
}

/// The next block number of `owner`'s stream on the link to `peer`, as `kme` stored it.
pub fn next_seq(dir: &Path, kme: &str, peer: &str, owner: &str) -> u64 {
    let conn = open(dir, kme).get().unwrap();
    db::stream_state(&conn, &KmeId::new(peer), &Owner::parse(owner))
        .unwrap()
        .next_seq
}

/// The details of every audit record `event` of `kme`, in order.
pub fn audit_events(dir: &Path, kme: &str, event: &str) -> Vec<Value> {
    let conn = open(dir, kme).get().unwrap();
    let mut stmt = conn
        .prepare("SELECT detail FROM audit WHERE event = ?1 ORDER BY id")
        .unwrap();
    let details = stmt
        .query_map([event], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|d| serde_json::from_str(&d.unwrap()).unwrap())
        .collect();
    details
}

/// Runs `sql` on the database of `kme` as someone with the file would (triggers may be
/// dropped first).
pub fn tamper(dir: &Path, kme: &str, sql: &str) {
    let conn = open(dir, kme).get().unwrap();
    conn.execute_batch(sql).unwrap();
}

/// How many rows `table` of the database of `kme` holds.
pub fn count(dir: &Path, kme: &str, table: &str) -> i64 {
    let conn = open(dir, kme).get().unwrap();
    conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

/// The stream position of `owner` on the link to `peer`, as `kme` stored it (for the peer's
/// stream: everything below it is bound).
pub fn position(dir: &Path, kme: &str, peer: &str, owner: &str) -> u64 {
    let conn = open(dir, kme).get().unwrap();
    db::stream_state(&conn, &KmeId::new(peer), &Owner::parse(owner))
        .unwrap()
        .position
}
