//! SQLite file: opening, connection PRAGMAs, migrations and the start-up reads.
//!
//! One file per KME, in WAL mode. The single writer (`DbWriter`, a SyncArbiter of one) gets a
//! pool of one connection; start-up reads and audit verification use a small reader pool.
//! Everything here blocks, so it runs before the actors start or inside sync actors only.

use std::path::Path;

use r2d2::Pool;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{Error, Result};
use crate::storage::sealing::{block_aad, Purpose, Sealer};
use crate::types::{KmeId, Owner};

pub type DbPool = Pool<SqliteConnectionManager>;

/// Migrations in order; version N is applied when `PRAGMA user_version` < N.
const MIGRATIONS: &[(u32, &str)] = &[
    (1, include_str!("../../../sql/migrations/0001_init.sql")),
    (
        2,
        include_str!("../../../sql/migrations/0002_key_files.sql"),
    ),
    (3, include_str!("../../../sql/migrations/0003_relay.sql")),
    (
        4,
        include_str!("../../../sql/migrations/0004_expiry_by_binding_time.sql"),
    ),
    (
        5,
        include_str!("../../../sql/migrations/0005_waiting_keys.sql"),
    ),
    (
        6,
        include_str!("../../../sql/migrations/0006_audit_keyed.sql"),
    ),
];

/// Per-connection settings.
///
/// `synchronous = FULL`: a committed delivery must survive a power cut, not only a process
/// crash. With NORMAL, WAL may lose the last commits on power loss, and a lost "this key was
/// delivered" could let the same material be handed out again. Group commit in `Store` keeps
/// the fsync cost per batch, not per request. `secure_delete` overwrites deleted key material.
fn configure(conn: &mut Connection) -> rusqlite::Result<()> {
    // The writer uses about twenty statements; the default cache of 16 would re-parse some.
    conn.set_prepared_statement_cache_capacity(64);
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA secure_delete = ON;
         PRAGMA busy_timeout = 5000;
         PRAGMA wal_autocheckpoint = 16384;",
    )
}

/// Opens (creating if needed) the database, applies migrations, and returns the writer pool
/// (one connection) and a reader pool.
pub fn open(path: &Path, readers: u32) -> Result<(DbPool, DbPool)> {
    open_with_quota(path, readers, None)
}

/// A read-only connection to an existing database of this schema version, for inspection
/// (`kme audit-verify`): it never creates, migrates or writes anything, and a missing file
/// or another schema version is an error.
pub fn open_read_only(path: &Path) -> Result<Connection> {
    if !path.is_file() {
        return Err(Error::Storage(format!("no database at {}", path.display())));
    }
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let version: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let expected = MIGRATIONS.len();
    if version as usize != expected {
        return Err(Error::Storage(format!(
            "{} has schema version {version}, this kme reads version {expected} (start the KME once to migrate it)",
            path.display()
        )));
    }
    Ok(conn)
}

/// As `open`, with the database file limited to `quota_mb` MiB (`PRAGMA max_page_count`):
/// beyond it writes fail as on a full disk, and the KME answers 503 while it keeps serving.
pub fn open_with_quota(
    path: &Path,
    readers: u32,
    quota_mb: Option<u64>,
) -> Result<(DbPool, DbPool)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|err| {
            Error::Storage(format!(
                "cannot create data directory {}: {err}",
                dir.display()
            ))
        })?;
        // Only this KME's user may enter it (the WAL and its index are created there with
        // the process's umask).
        private(dir, 0o700)?;
    }
    let writer = pool(path, 1, quota_mb)?;
    private(path, 0o600)?;
    migrate(&mut *writer.get()?)?;
    let reader = pool(path, readers.max(1), quota_mb)?;
    Ok((writer, reader))
}

/// Sets `mode` on `path` (the data directory, the database file).
fn private(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|err| Error::Storage(format!("cannot restrict {}: {err}", path.display())))
}

fn pool(path: &Path, size: u32, quota_mb: Option<u64>) -> Result<DbPool> {
    let manager = SqliteConnectionManager::file(path).with_init(move |conn| {
        configure(conn)?;
        if let Some(mb) = quota_mb {
            // Pages are 4 KiB (SQLite's default, never changed here).
            conn.pragma_update(None, "max_page_count", to_i64(mb.saturating_mul(256)))?;
        }
        Ok(())
    });
    Ok(Pool::builder().max_size(size).build(manager)?)
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let current: u32 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
        log::info!("database migrated to version {version}");
    }
    Ok(())
}

/// Increments and returns the boot epoch: the high half of this KME's peer sequence numbers,
/// so that numbers keep growing across restarts without a write per message.
pub fn next_epoch(conn: &Connection) -> Result<u64> {
    conn.execute(
        "INSERT INTO meta(name, value) VALUES('epoch', 1)
         ON CONFLICT(name) DO UPDATE SET value = value + 1",
        [],
    )?;
    let epoch: i64 = conn.query_row("SELECT value FROM meta WHERE name = 'epoch'", [], |r| {
        r.get(0)
    })?;
    Ok(u64::try_from(epoch).unwrap_or(0))
}

/// The stored check value of the master key (`Sealer::check_value`), if any value was ever
/// sealed in this database.
pub fn master_key_check(conn: &Connection) -> Result<Option<i64>> {
    Ok(conn
        .query_row(
            "SELECT value FROM meta WHERE name = 'master_key_check'",
            [],
            |r| r.get(0),
        )
        .optional()?)
}

/// Records the master key's check value; from then on only that key opens this database.
pub fn set_master_key_check(conn: &Connection, check: i64) -> Result<()> {
    conn.execute(
        "INSERT INTO meta(name, value) VALUES('master_key_check', ?1)",
        params![check],
    )?;
    Ok(())
}

/// State of one owner's stream on one link, as stored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StreamState {
    pub next_seq: u64,
    pub position: u64,
}

pub fn stream_state(conn: &Connection, peer: &KmeId, owner: &Owner) -> Result<StreamState> {
    // Cached: every activation and every delivery reads it (parsing it each time cost about
    // 4 % of a relaying KME's CPU).
    let row = conn
        .prepare_cached(
            "SELECT next_seq, position FROM link_streams WHERE peer = ?1 AND owner = ?2",
        )?
        .query_row(params![peer.as_str(), owner.as_str()], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })
        .optional()?;
    Ok(row
        .map(|(next_seq, position)| StreamState {
            next_seq: to_u64(next_seq),
            position: to_u64(position),
        })
        .unwrap_or_default())
}

/// A stored block: number in its owner's stream and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlock {
    pub seq: u64,
    pub data: Vec<u8>,
}

/// Blocks of `owner` on the link to `peer`, in order, from `from_seq` on; `confirmed` selects
/// blocks the other end holds too (usable) or blocks still to be shipped.
pub fn blocks(
    conn: &Connection,
    sealer: &Sealer,
    peer: &KmeId,
    owner: &Owner,
    from_seq: u64,
    confirmed: bool,
) -> Result<Vec<StoredBlock>> {
    let mut stmt = conn.prepare(
        "SELECT seq, data FROM link_blocks
         WHERE peer = ?1 AND owner = ?2 AND seq >= ?3 AND confirmed = ?4 ORDER BY seq",
    )?;
    let rows = stmt.query_map(
        params![peer.as_str(), owner.as_str(), to_i64(from_seq), confirmed],
        |r| Ok((to_u64(r.get::<_, i64>(0)?), r.get::<_, Vec<u8>>(1)?)),
    )?;
    let mut blocks = Vec::new();
    for row in rows {
        let (seq, sealed) = row?;
        let aad = block_aad(peer.as_str(), owner.as_str(), seq);
        blocks.push(StoredBlock {
            seq,
            data: sealer.open(Purpose::LinkBlock, &aad, &sealed)?,
        });
    }
    Ok(blocks)
}

/// Where the keyed part of the audit chain starts, checked against its MAC under `key`.
fn audit_keyed_since(conn: &Connection, key: &[u8; 32]) -> Result<i64> {
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
    let mac = crate::storage::audit::mac(key, &[b"kme audit keyed since", &since.to_be_bytes()])?;
    Ok(mac.to_vec())
}

/// At start, with the master key: seals where the keyed audit chain starts (once, after the
/// migration that keyed it), or checks that nobody moved it.
pub fn seal_audit_keyed(conn: &Connection, key: &[u8; 32]) -> Result<()> {
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
    audit_keyed_since(conn, key).map(|_| ())
}

/// Checks the database's audit trail against its head kept outside it (`audit.head` beside the
/// database, copied by the writer at most 50 ms behind): the record the head names must be
/// there with the same hash, or the trail's tail was cut (or replaced). A missing or unreadable
/// head file is an error too.
pub fn check_audit_head(conn: &Connection, head_file: &Path) -> Result<()> {
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
    let stored: Option<Vec<u8>> = conn
        .query_row("SELECT hash FROM audit WHERE id = ?1", params![id], |r| {
            r.get(0)
        })
        .optional()?;
    match stored {
        Some(stored) if crate::types::hex(&stored) == hash => Ok(()),
        Some(_) => Err(Error::Storage(format!(
            "audit record {id} differs from the head kept outside the database"
        ))),
        None => Err(Error::Storage(format!(
            "the audit trail ends before its head, record {id}: its tail was cut"
        ))),
    }
}

/// Checks the audit hash chain from the first record, keyed MACs under `key` from where the
/// chain became keyed; returns the number of records.
pub fn verify_audit_chain(conn: &Connection, key: &[u8; 32]) -> Result<u64> {
    let since = audit_keyed_since(conn, key)?;
    let mut stmt =
        conn.prepare("SELECT id, at_ms, event, detail, prev_hash, hash FROM audit ORDER BY id")?;
    let mut rows = stmt.query([])?;
    let mut prev = vec![0u8; 32];
    let mut count = 0u64;
    while let Some(row) = rows.next()? {
        let id: i64 = row.get(0)?;
        let at_ms: i64 = row.get(1)?;
        let event: String = row.get(2)?;
        let detail: String = row.get(3)?;
        let prev_hash: Vec<u8> = row.get(4)?;
        let hash: Vec<u8> = row.get(5)?;
        if prev_hash != prev {
            return Err(Error::Storage(format!(
                "audit chain broken before record {id}"
            )));
        }
        let keyed = (id >= since).then_some(key);
        let expected = crate::storage::audit::chain_hash(keyed, &prev, id, at_ms, &event, &detail)?;
        if expected.as_slice() != hash {
            return Err(Error::Storage(format!("audit record {id} was altered")));
        }
        prev = hash;
        count += 1;
    }
    Ok(count)
}

pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_once_and_epoch_grows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kme.sqlite");
        let (writer, _) = open(&path, 1).unwrap();
        let conn = writer.get().unwrap();
        assert_eq!(next_epoch(&conn).unwrap(), 1);
        assert_eq!(next_epoch(&conn).unwrap(), 2);
        drop(conn);
        drop(writer);
        let (writer, _) = open(&path, 1).unwrap();
        let conn = writer.get().unwrap();
        let version: u32 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as u32);
        assert_eq!(next_epoch(&conn).unwrap(), 3);
    }
}
