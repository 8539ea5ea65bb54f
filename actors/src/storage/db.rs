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
    (
        7,
        include_str!("../../../sql/migrations/0007_audit_retention.sql"),
    ),
    (
        8,
        include_str!("../../../sql/migrations/0008_sealed_secrets.sql"),
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

/// A connection to an existing database of this schema version, for the `kme audit`
/// commands, beside a running KME or not: it never creates or migrates anything, a missing
/// file or another schema version is an error, and only `writable` (pruning) may write.
pub fn open_existing(path: &Path, writable: bool) -> Result<Connection> {
    use rusqlite::OpenFlags;
    if !path.is_file() {
        return Err(Error::Storage(format!("no database at {}", path.display())));
    }
    let access = if writable {
        OpenFlags::SQLITE_OPEN_READ_WRITE
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    };
    let conn = Connection::open_with_flags(path, access | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    // The KME may be committing: wait for its lock as its own connections do.
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
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

/// A stored block: number in its owner's stream and its bytes (its `Debug` shows no byte).
#[derive(Clone, PartialEq, Eq)]
pub struct StoredBlock {
    pub seq: u64,
    /// Overwritten when dropped.
    pub data: zeroize::Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for StoredBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoredBlock(#{}, {} bytes)", self.seq, self.data.len())
    }
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
            data: sealer.open(Purpose::LinkBlock, &aad, &sealed)?.into(),
        });
    }
    Ok(blocks)
}

/// How much of its size limit (`max_db_mb`, as `max_page_count`) the database uses: pages in
/// use, not the file's size, since pruned records leave free pages that are used again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fill {
    pub used_bytes: u64,
    pub limit_bytes: u64,
}

impl Fill {
    pub fn share(&self) -> f64 {
        self.used_bytes as f64 / self.limit_bytes.max(1) as f64
    }
}

pub fn fill(conn: &Connection) -> Result<Fill> {
    let pragma = |name: &str| -> Result<u64> {
        Ok(to_u64(
            conn.pragma_query_value(None, name, |r| r.get::<_, i64>(0))?,
        ))
    };
    let page = pragma("page_size")?;
    let used = pragma("page_count")?.saturating_sub(pragma("freelist_count")?);
    Ok(Fill {
        used_bytes: used * page,
        limit_bytes: pragma("max_page_count")? * page,
    })
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
    fn blocks_show_where_they_go_not_their_bytes() {
        let stored = StoredBlock {
            seq: 3,
            data: vec![0xab; 4].into(),
        };
        let record = crate::storage::ops::BlockRecord {
            owner: Owner::parse("kme-a"),
            seq: 3,
            data: vec![0xab; 4].into(),
        };
        for shown in [format!("{stored:?}"), format!("{record:?}")] {
            assert!(shown.contains("#3") && shown.contains("4 bytes"), "{shown}");
            assert!(!shown.contains("171") && !shown.contains("ab"), "{shown}");
        }
    }

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

    #[test]
    fn fill_counts_pages_in_use_against_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, _) = open_with_quota(&dir.path().join("kme.sqlite"), 1, Some(1)).unwrap();
        let conn = writer.get().unwrap();
        let empty = fill(&conn).unwrap();
        assert_eq!(empty.limit_bytes, 1 << 20);
        conn.execute_batch(
            "CREATE TABLE filler(b BLOB); INSERT INTO filler VALUES (zeroblob(600000));",
        )
        .unwrap();
        let full = fill(&conn).unwrap();
        assert!(full.share() > 0.55 && full.share() < 0.75, "{full:?}");
        // Deleted rows free pages that count as free again.
        conn.execute_batch("DELETE FROM filler;").unwrap();
        assert!(fill(&conn).unwrap().used_bytes < full.used_bytes - 500_000);
    }
}
