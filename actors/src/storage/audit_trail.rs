//! The audit trail as a whole: where its keyed chain starts, its verification (against the
//! head kept outside the database), and its retention: a closed segment is exported as JSON
//! lines with its head under the audit key, after which it may be pruned from the database.
//!
//! A pruned trail starts at an anchor (`audit_pruned`: the last pruned record's id and hash,
//! MACed), so verification goes on from there and a cut of the oldest records that was not an
//! exported segment shows. Everything here blocks: it runs at start-up, in the `kme audit`
//! commands, or in a blocking task of the admin listener.

use std::io::Write;
use std::path::Path;

use openssl::sha::Sha256;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::storage::audit::{chain_hash, mac};
use crate::types::hex;

/// The copy of the chain's head outside the database, in the data directory.
pub const HEAD_FILE: &str = "audit.head";

/// Where the keyed part of the audit chain starts, checked against its MAC under `key`.
fn keyed_since(conn: &Connection, key: &[u8; 32]) -> Result<i64> {
    let (since, mac): (i64, Option<Vec<u8>>) = conn
        .query_row("SELECT since, mac FROM audit_keyed", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .map_err(|err| Error::Storage(format!("audit_keyed: {err}")))?;
    match mac {
        Some(mac) if mac == since_mac(key, since)? => Ok(since),
        Some(_) => Err(Error::Storage(
            "the start of the keyed audit chain was altered".into(),
        )),
        None => Err(Error::Storage(
            "the keyed audit chain is not sealed yet (start the KME once)".into(),
        )),
    }
}

fn since_mac(key: &[u8; 32], since: i64) -> Result<Vec<u8>> {
    Ok(mac(key, &[b"kme audit keyed since", &since.to_be_bytes()])?.to_vec())
}

/// At start, with the master key: seals where the keyed audit chain starts (once, after the
/// migration that keyed it), or checks that nobody moved it.
pub fn seal_keyed(conn: &Connection, key: &[u8; 32]) -> Result<()> {
    let unsealed: Option<i64> = conn
        .query_row("SELECT since FROM audit_keyed WHERE mac IS NULL", [], |r| {
            r.get(0)
        })
        .optional()?;
    if let Some(since) = unsealed {
        conn.execute(
            "UPDATE audit_keyed SET mac = ?1",
            params![since_mac(key, since)?],
        )?;
    }
    keyed_since(conn, key).map(|_| ())
}

/// The record before the trail's first one: the last pruned record (id, hash), checked
/// against its MAC, or (0, zeros) when nothing was pruned.
fn anchor(conn: &Connection, key: &[u8; 32]) -> Result<(i64, Vec<u8>)> {
    let row: Option<(i64, Vec<u8>, Vec<u8>)> = conn
        .query_row("SELECT upto, hash, mac FROM audit_pruned", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    match row {
        None => Ok((0, vec![0u8; 32])),
        Some((upto, hash, stored)) if stored == anchor_mac(key, upto, &hash)? => Ok((upto, hash)),
        Some(_) => Err(Error::Storage(
            "the anchor of the pruned audit trail was altered".into(),
        )),
    }
}

fn anchor_mac(key: &[u8; 32], upto: i64, hash: &[u8]) -> Result<Vec<u8>> {
    Ok(mac(key, &[b"kme audit pruned", &upto.to_be_bytes(), hash])?.to_vec())
}

/// Checks the database's audit trail against its head kept outside it (`HEAD_FILE` beside the
/// database, copied by the writer at most 50 ms behind): the record the head names must be
/// there with the same hash, or the trail's tail was cut (or replaced). A missing or unreadable
/// head file is an error too. A head within a pruned segment is checked against the anchor.
pub fn check_head(conn: &Connection, key: &[u8; 32], head_file: &Path) -> Result<()> {
    let text = std::fs::read_to_string(head_file).map_err(|err| {
        Error::Storage(format!(
            "no audit head at {}: {err} (a KME writes it at its first commit)",
            head_file.display()
        ))
    })?;
    let head: serde_json::Value = serde_json::from_str(&text)
        .map_err(|err| Error::Storage(format!("{}: {err}", head_file.display())))?;
    let (Some(id), Some(hash)) = (head["id"].as_i64(), head["hash"].as_str()) else {
        return Err(Error::Storage(format!(
            "{} is not an audit head",
            head_file.display()
        )));
    };
    let (upto, anchor_hash) = anchor(conn, key)?;
    let stored: Option<Vec<u8>> = if id < upto {
        // Pruned: the head file lagged behind an export; the anchor vouches for it.
        return Ok(());
    } else if id == upto {
        Some(anchor_hash)
    } else {
        conn.query_row("SELECT hash FROM audit WHERE id = ?1", params![id], |r| {
            r.get(0)
        })
        .optional()?
    };
    match stored {
        Some(stored) if hex(&stored) == hash => Ok(()),
        Some(_) => Err(Error::Storage(format!(
            "audit record {id} differs from the head kept outside the database"
        ))),
        None => Err(Error::Storage(format!(
            "the audit trail ends before its head, record {id}: its tail was cut"
        ))),
    }
}

/// Checks the audit hash chain from its first record (or the anchor of a pruned trail), keyed
/// MACs under `key` from where the chain became keyed; returns the number of records.
pub fn verify_chain(conn: &Connection, key: &[u8; 32]) -> Result<u64> {
    let since = keyed_since(conn, key)?;
    let (_, mut prev) = anchor(conn, key)?;
    let mut stmt =
        conn.prepare("SELECT id, at_ms, event, detail, prev_hash, hash FROM audit ORDER BY id")?;
    let mut rows = stmt.query([])?;
    let mut count = 0u64;
    while let Some(row) = rows.next()? {
        let record = Exported::from_row(row)?;
        if record.prev_hash != prev {
            return Err(Error::Storage(format!(
                "audit chain broken before record {}",
                record.id
            )));
        }
        let keyed = (record.id >= since).then_some(key);
        let expected = chain_hash(
            keyed,
            &prev,
            record.id,
            record.at_ms,
            &record.event,
            &record.detail,
        )?;
        if expected.as_slice() != record.hash {
            return Err(Error::Storage(format!(
                "audit record {} was altered",
                record.id
            )));
        }
        prev = record.hash;
        count += 1;
    }
    Ok(count)
}

/// One audit record as stored, and as exported (hashes in hex).
#[derive(Serialize)]
struct Exported {
    id: i64,
    at_ms: i64,
    event: String,
    detail: String,
    #[serde(serialize_with = "as_hex")]
    prev_hash: Vec<u8>,
    #[serde(serialize_with = "as_hex")]
    hash: Vec<u8>,
}

impl Exported {
    fn from_row(row: &rusqlite::Row) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            at_ms: row.get(1)?,
            event: row.get(2)?,
            detail: row.get(3)?,
            prev_hash: row.get(4)?,
            hash: row.get(5)?,
        })
    }
}

fn as_hex<S: serde::Serializer>(bytes: &[u8], out: S) -> std::result::Result<S::Ok, S::Error> {
    out.serialize_str(&hex(bytes))
}

/// The last line of an exported segment: which records it holds, the hash of the last one
/// (the chain goes on from it), a SHA-256 of the record lines before it, and a MAC of all
/// that under the audit key, so that `prune` deletes only what a whole export holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub kme: String,
    pub first: i64,
    pub last: i64,
    pub head: String,
    pub records_sha256: String,
    pub mac: String,
}

impl Segment {
    fn expected_mac(&self, key: &[u8; 32]) -> Result<String> {
        let parts: [&[u8]; 6] = [
            b"kme audit segment",
            self.kme.as_bytes(),
            &self.first.to_be_bytes(),
            &self.last.to_be_bytes(),
            self.head.as_bytes(),
            self.records_sha256.as_bytes(),
        ];
        Ok(hex(&mac(key, &parts)?))
    }
}

#[derive(Serialize, Deserialize)]
struct SegmentLine {
    segment: Segment,
}

/// Writes the closed segment of `kme`'s trail from its first record to `upto` (default: all
/// but the newest record, which stays as the chain's head), at most `max_records` of them, to
/// `out`, one JSON object per line and the `Segment` last, after checking the whole chain.
/// Only reads.
pub fn export_segment(
    conn: &Connection,
    key: &[u8; 32],
    kme: &str,
    (upto, max_records): (Option<i64>, Option<u64>),
    out: &mut dyn Write,
) -> Result<Segment> {
    // One snapshot for the check and the export, while the KME goes on writing.
    let snapshot = conn.unchecked_transaction()?;
    verify_chain(&snapshot, key)?;
    let (anchor_id, _) = anchor(&snapshot, key)?;
    let newest: Option<i64> = snapshot.query_row("SELECT max(id) FROM audit", [], |r| r.get(0))?;
    let newest = newest.unwrap_or(anchor_id);
    let first = anchor_id + 1;
    let most = max_records.map_or(i64::MAX, |n| i64::try_from(n).unwrap_or(i64::MAX));
    let last = upto
        .unwrap_or(newest - 1)
        .min(first.saturating_add(most).saturating_sub(1));
    if last >= newest {
        return Err(Error::Storage(format!(
            "record {last} is not closed: a segment ends before the newest record, {newest}"
        )));
    }
    if last < first {
        return Err(Error::Storage(format!(
            "nothing to export: the trail starts at record {first} and its newest, {newest}, stays"
        )));
    }
    let mut stmt = snapshot.prepare(
        "SELECT id, at_ms, event, detail, prev_hash, hash FROM audit
         WHERE id BETWEEN ?1 AND ?2 ORDER BY id",
    )?;
    let mut rows = stmt.query(params![first, last])?;
    let mut digest = Sha256::new();
    let mut head = String::new();
    let io = |err: std::io::Error| Error::Storage(format!("cannot write the export: {err}"));
    while let Some(row) = rows.next()? {
        let record = Exported::from_row(row)?;
        let mut line = serde_json::to_vec(&record)
            .map_err(|err| Error::Storage(format!("audit record {}: {err}", record.id)))?;
        line.push(b'\n');
        digest.update(&line);
        out.write_all(&line).map_err(io)?;
        head = hex(&record.hash);
    }
    let mut segment = Segment {
        kme: kme.to_owned(),
        first,
        last,
        head,
        records_sha256: hex(&digest.finish()),
        mac: String::new(),
    };
    segment.mac = segment.expected_mac(key)?;
    let line = serde_json::to_string(&SegmentLine {
        segment: segment.clone(),
    })
    .map_err(|err| Error::Storage(format!("segment: {err}")))?;
    writeln!(out, "{line}").map_err(io)?;
    out.flush().map_err(io)?;
    Ok(segment)
}

/// Deletes from `kme`'s database the records of an exported segment (`export`, the file's
/// text), once the file is proven whole (its records' SHA-256 and the MAC under the audit
/// key) and proven to be the trail's oldest part (it starts at the trail's first record and
/// its head is the stored record's hash); the anchor moves to its last record in the same
/// transaction. Returns the number of records deleted.
pub fn prune_segment(
    conn: &mut Connection,
    key: &[u8; 32],
    kme: &str,
    export: &str,
) -> Result<u64> {
    let bad = |why: String| Error::Storage(format!("not a whole segment export: {why}"));
    let mut lines: Vec<&str> = export.split_inclusive('\n').collect();
    let last_line = lines.pop().ok_or_else(|| bad("empty".into()))?;
    let SegmentLine { segment } =
        serde_json::from_str(last_line).map_err(|err| bad(format!("last line: {err}")))?;
    let mut digest = Sha256::new();
    lines.iter().for_each(|line| digest.update(line.as_bytes()));
    if hex(&digest.finish()) != segment.records_sha256 {
        return Err(bad("its records differ from what was exported".into()));
    }
    if segment.expected_mac(key)? != segment.mac {
        return Err(bad(
            "its MAC does not verify under this KME's master key".into()
        ));
    }
    if segment.kme != kme {
        return Err(bad(format!("it was exported from {}", segment.kme)));
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (anchor_id, _) = anchor(&tx, key)?;
    if segment.first != anchor_id + 1 {
        return Err(Error::Storage(format!(
            "the trail starts at record {}, the segment at {}: prune the oldest segment first",
            anchor_id + 1,
            segment.first
        )));
    }
    let stored: Option<Vec<u8>> = tx
        .query_row(
            "SELECT hash FROM audit WHERE id = ?1",
            params![segment.last],
            |r| r.get(0),
        )
        .optional()?;
    let Some(head) = stored.filter(|hash| hex(hash) == segment.head) else {
        return Err(Error::Storage(format!(
            "record {} of this database differs from the segment's head",
            segment.last
        )));
    };
    tx.execute("DELETE FROM audit_pruned", [])?;
    tx.execute(
        "INSERT INTO audit_pruned(upto, hash, at_ms, mac) VALUES (?1, ?2, ?3, ?4)",
        params![
            segment.last,
            head,
            crate::types::now_ms(),
            anchor_mac(key, segment.last, &head)?
        ],
    )?;
    let deleted = tx.execute("DELETE FROM audit WHERE id <= ?1", params![segment.last])?;
    tx.commit()?;
    Ok(deleted as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::audit::AuditRecord;
    use crate::storage::db;
    use crate::storage::sealing::Sealer;

    fn key() -> [u8; 32] {
        *Sealer::from_master(&[9u8; 32])
            .unwrap()
            .audit_key()
            .unwrap()
    }

    /// A database whose trail holds `records` records, sealed as a KME does at start.
    fn trail(records: i64) -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sqlite");
        drop(db::open(&path, 1).unwrap());
        let conn = Connection::open(&path).unwrap();
        seal_keyed(&conn, &key()).unwrap();
        append(&conn, records);
        (dir, conn)
    }

    fn append(conn: &Connection, records: i64) {
        let mut head: (i64, Vec<u8>) = conn
            .query_row(
                "SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .unwrap()
            .unwrap_or((0, vec![0u8; 32]));
        for i in 0..records {
            let record = AuditRecord::new("test", serde_json::json!({ "i": i }));
            crate::storage::writer::append_audit(conn, &key(), &mut head, &record).unwrap();
        }
    }

    fn export(conn: &Connection, upto: Option<i64>) -> (Segment, String) {
        let mut out = Vec::new();
        let segment = export_segment(conn, &key(), "kme-a", (upto, None), &mut out).unwrap();
        (segment, String::from_utf8(out).unwrap())
    }

    fn count(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM audit", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn an_exported_segment_is_pruned_and_the_rest_still_verifies() {
        let (_dir, mut conn) = trail(10);
        let (segment, text) = export(&conn, Some(6));
        assert_eq!((segment.first, segment.last), (1, 6));
        assert_eq!(text.lines().count(), 7, "six records and the segment");
        assert_eq!(prune_segment(&mut conn, &key(), "kme-a", &text).unwrap(), 6);
        assert_eq!(count(&conn), 4);
        assert_eq!(verify_chain(&conn, &key()).unwrap(), 4);
        // The chain goes on, and the next segment starts after the anchor.
        append(&conn, 3);
        assert_eq!(verify_chain(&conn, &key()).unwrap(), 7);
        let (next, text) = export(&conn, None);
        assert_eq!((next.first, next.last), (7, 12), "all but the newest");
        assert_eq!(prune_segment(&mut conn, &key(), "kme-a", &text).unwrap(), 6);
        assert_eq!(verify_chain(&conn, &key()).unwrap(), 1);
        // At most `max_records` per segment.
        append(&conn, 5);
        let mut out = Vec::new();
        let capped = export_segment(&conn, &key(), "kme-a", (None, Some(2)), &mut out).unwrap();
        assert_eq!((capped.first, capped.last), (13, 14));
    }

    #[test]
    fn prune_refuses_what_is_not_a_whole_export_of_the_oldest_records() {
        let (_dir, mut conn) = trail(10);
        let (_, oldest) = export(&conn, Some(3));
        let edited = oldest.replacen("\"i\\\":0", "\"i\\\":7", 1);
        assert_ne!(edited, oldest);
        let cut = oldest.lines().skip(1).collect::<Vec<_>>().join("\n") + "\n";
        let renamed = oldest.replace("kme-a", "kme-b");
        for (file, why) in [
            (edited.as_str(), "a record edited"),
            (cut.as_str(), "a record left out"),
            (renamed.as_str(), "another KME's name"),
            ("", "empty"),
        ] {
            assert!(
                prune_segment(&mut conn, &key(), "kme-a", file).is_err(),
                "{why}"
            );
        }
        assert!(
            prune_segment(&mut conn, &other_key(), "kme-a", &oldest).is_err(),
            "under another master key"
        );
        assert_eq!(count(&conn), 10, "nothing pruned");
        prune_segment(&mut conn, &key(), "kme-a", &oldest).unwrap();
        assert_eq!(count(&conn), 7, "the three exported records pruned");
        // Once pruned, the same segment no longer starts the trail.
        assert!(
            prune_segment(&mut conn, &key(), "kme-a", &oldest).is_err(),
            "the same segment twice"
        );
        assert_eq!(verify_chain(&conn, &key()).unwrap(), 7);
    }

    fn other_key() -> [u8; 32] {
        *Sealer::from_master(&[8u8; 32])
            .unwrap()
            .audit_key()
            .unwrap()
    }

    #[test]
    fn the_newest_record_is_never_exported_for_pruning() {
        let (_dir, conn) = trail(3);
        let mut out = Vec::new();
        assert!(export_segment(&conn, &key(), "kme-a", (Some(3), None), &mut out).is_err());
        let (_dir, single) = trail(1);
        assert!(export_segment(&single, &key(), "kme-a", (None, None), &mut out).is_err());
    }

    #[test]
    fn a_cut_of_the_oldest_records_without_an_export_shows() {
        let (_dir, conn) = trail(5);
        // The trigger keeps records that no anchor covers.
        assert!(conn.execute("DELETE FROM audit WHERE id = 1", []).is_err());
        // Someone with the file drops it and cuts the oldest records: the chain's first
        // record no longer follows the (absent) anchor.
        conn.execute_batch("DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE id <= 2;")
            .unwrap();
        assert!(verify_chain(&conn, &key()).is_err());
        // Nor can they write an anchor of their own without the master key.
        let hash: Vec<u8> = conn
            .query_row("SELECT prev_hash FROM audit WHERE id = 3", [], |r| r.get(0))
            .unwrap();
        conn.execute(
            "INSERT INTO audit_pruned(upto, hash, at_ms, mac) VALUES (2, ?1, 0, ?2)",
            params![hash, anchor_mac(&other_key(), 2, &hash).unwrap()],
        )
        .unwrap();
        assert!(verify_chain(&conn, &key()).is_err());
    }
}
