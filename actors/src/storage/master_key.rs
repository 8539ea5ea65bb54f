//! The master key of a database: which key file opens it, and its rotation.
//!
//! The database stores a check value of its master key (`Sealer::check_value`), so a KME
//! started with another key refuses to run. `kme master-key rotate` (the KME stopped) draws a
//! new key, writes it beside the old one (`<key file>.new`), re-seals every sealed value under
//! it and stores the new check value in one transaction, then renames the new file over the
//! old. A crash before the commit leaves the old key working (the new file is ignored and
//! replaced next time); a crash after it leaves the new key in `<key file>.new`, which the
//! next start (or rotation) recognises by the check value and moves into place. The audit
//! chain's key stays the same across rotations: at the first one it is sealed into the
//! database (`sealed_secrets`), so the chain verifies from its first record on.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::storage::db;
use crate::storage::sealing::{block_aad, create_key_file, replace_file, Purpose, Sealer};
use crate::storage::writer::key_aad;

const AUDIT_KEY: &str = "audit_key";

/// How the key file is used: by a starting KME (which may create the first key and finish
/// an interrupted rotation) or by an inspection that changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Start,
    Inspect,
}

/// Where a rotation writes the new key before it is the key.
pub fn pending_file(key_file: &Path) -> PathBuf {
    PathBuf::from(format!("{}.new", key_file.display()))
}

/// The sealer of the database `conn` from `key_file`: the key whose check value the database
/// stores (the first key is created and recorded at the first start), with the audit chain's
/// key the database keeps, if any.
pub fn open_sealer(conn: &Connection, key_file: &Path, access: Access) -> Result<Sealer> {
    let stored = db::master_key_check(conn)?;
    let mut sealer = match stored {
        None if access == Access::Start => {
            let sealer = Sealer::from_key_file(key_file, true)?;
            db::set_master_key_check(conn, sealer.check_value()?)?;
            sealer
        }
        None => {
            return Err(Error::Storage(
                "the database has no master key yet (start the KME once)".into(),
            ))
        }
        Some(check) => matching_key(key_file, check, access)?,
    };
    let sealed: Option<Vec<u8>> = conn
        .query_row(
            "SELECT value FROM sealed_secrets WHERE name = ?1",
            params![AUDIT_KEY],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(sealed) = sealed {
        let key =
            zeroize::Zeroizing::new(sealer.open(Purpose::Secret, AUDIT_KEY.as_bytes(), &sealed)?);
        let key: [u8; 32] = key
            .as_slice()
            .try_into()
            .map_err(|_| Error::Storage("the stored audit key is not 32 bytes".into()))?;
        sealer.set_audit_key(key);
    }
    Ok(sealer)
}

/// The key (the file's, or a rotation's pending one) whose check value is `check`.
fn matching_key(key_file: &Path, check: i64, access: Access) -> Result<Sealer> {
    let pending = pending_file(key_file);
    if key_file.exists() {
        let sealer = Sealer::from_key_file(key_file, false)?;
        if sealer.check_value()? == check {
            return Ok(sealer);
        }
    }
    if pending.exists() {
        let sealer = Sealer::from_key_file(&pending, false)?;
        if sealer.check_value()? == check {
            // A rotation committed its transaction and stopped before the rename.
            if access == Access::Start {
                replace_file(&pending, key_file).map_err(|err| {
                    Error::Storage(format!("finishing the master key rotation: {err}"))
                })?;
                log::warn!(
                    "master key {}: finished an interrupted rotation",
                    key_file.display()
                );
            }
            return Ok(sealer);
        }
    }
    Err(Error::Storage(format!(
        "master key {} is not the key of this database{}",
        key_file.display(),
        if key_file.exists() { "" } else { " (missing)" }
    )))
}

/// What a rotation re-sealed.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Rotated {
    pub keys: u64,
    pub held_keys: u64,
    pub link_blocks: u64,
}

/// Re-seals every sealed value of the database under a new master key, which then replaces
/// `key_file` (see the module doc for why a crash anywhere leaves one working key). The KME
/// must not run meanwhile (`kme master-key rotate` makes sure).
pub fn rotate(conn: &mut Connection, key_file: &Path) -> Result<Rotated> {
    let old = open_sealer(conn, key_file, Access::Start)?;
    let pending = pending_file(key_file);
    let _ = std::fs::remove_file(&pending);
    create_key_file(&pending)
        .map_err(|err| Error::Storage(format!("{}: {err}", pending.display())))?;
    let new = Sealer::from_key_file(&pending, false)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut rotated = Rotated::default();
    for table in ["keys", "held_keys"] {
        let rows: Vec<(Vec<u8>, String, String, Vec<u8>)> = tx
            .prepare(&format!(
                "SELECT key_id, master, slaves, material FROM {table}"
            ))?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut update = tx.prepare(&format!(
            "UPDATE {table} SET material = ?1 WHERE key_id = ?2"
        ))?;
        for (id, master, slaves, sealed) in rows {
            let uuid = uuid::Uuid::from_slice(&id)
                .map_err(|err| Error::Storage(format!("{table}: key_id: {err}")))?;
            let aad = key_aad(&uuid, &master, &slaves);
            let material = zeroize::Zeroizing::new(old.open(Purpose::Key, &aad, &sealed)?);
            update.execute(params![new.seal(Purpose::Key, &aad, &material)?, id])?;
        }
        let count = tx.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| {
            r.get::<_, i64>(0)
        })?;
        match table {
            "keys" => rotated.keys = db::to_u64(count),
            _ => rotated.held_keys = db::to_u64(count),
        }
    }
    let blocks: Vec<(String, String, i64, Vec<u8>)> = tx
        .prepare("SELECT peer, owner, seq, data FROM link_blocks")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut update =
        tx.prepare("UPDATE link_blocks SET data = ?1 WHERE peer = ?2 AND owner = ?3 AND seq = ?4")?;
    for (peer, owner, seq, sealed) in blocks {
        let aad = block_aad(&peer, &owner, db::to_u64(seq));
        let data = zeroize::Zeroizing::new(old.open(Purpose::LinkBlock, &aad, &sealed)?);
        update.execute(params![
            new.seal(Purpose::LinkBlock, &aad, &data)?,
            peer,
            owner,
            seq
        ])?;
        rotated.link_blocks += 1;
    }
    drop(update);
    // The audit chain keeps its key: sealed under the new master key from now on.
    let audit_key = old.audit_key()?;
    tx.execute(
        "INSERT INTO sealed_secrets(name, value) VALUES (?1, ?2)
         ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        params![
            AUDIT_KEY,
            new.seal(Purpose::Secret, AUDIT_KEY.as_bytes(), &*audit_key)?
        ],
    )?;
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE name = 'master_key_check'",
        params![new.check_value()?],
    )?;
    tx.commit()?;
    replace_file(&pending, key_file).map_err(|err| {
        Error::Storage(format!(
            "the database is sealed under {} now, but it could not replace {}: {err} (the next start does)",
            pending.display(),
            key_file.display()
        ))
    })?;
    Ok(rotated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::audit_trail;

    /// A database at its first start, with a key, a held key and a block sealed in it and
    /// an audit record.
    fn started() -> (tempfile::TempDir, Connection, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kme.sqlite");
        drop(db::open(&path, 1).unwrap());
        let conn = Connection::open(&path).unwrap();
        let key_file = dir.path().join("master.key");
        let sealer = open_sealer(&conn, &key_file, Access::Start).unwrap();
        let id = uuid::Uuid::from_u128(7);
        let aad = key_aad(&id, "sae-a", "[\"sae-b\"]");
        conn.execute(
            "INSERT INTO keys(key_id, master, slaves, pending, material, created_ms)
             VALUES (?1, 'sae-a', '[\"sae-b\"]', '[\"sae-b\"]', ?2, 0)",
            params![
                id.as_bytes().as_slice(),
                sealer.seal(Purpose::Key, &aad, &[5u8; 32]).unwrap()
            ],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO link_blocks(peer, owner, seq, data, digest, confirmed)
             VALUES ('kme-b', 'kme-a', 3, ?1, x'00', 1)",
            params![sealer
                .seal(
                    Purpose::LinkBlock,
                    &block_aad("kme-b", "kme-a", 3),
                    &[6u8; 64]
                )
                .unwrap()],
        )
        .unwrap();
        audit_trail::seal_keyed(&conn, &sealer.audit_key().unwrap()).unwrap();
        let mut head = (0, vec![0u8; 32]);
        let record = crate::storage::audit::AuditRecord::new("test", 1);
        crate::storage::writer::append_audit(
            &conn,
            &sealer.audit_key().unwrap(),
            &mut head,
            &record,
        )
        .unwrap();
        (dir, conn, key_file)
    }

    /// The key of the test database, opened with the sealer of `key_file`.
    fn key_material(conn: &Connection, sealer: &Sealer) -> Vec<u8> {
        let sealed: Vec<u8> = conn
            .query_row("SELECT material FROM keys", [], |r| r.get(0))
            .unwrap();
        let aad = key_aad(&uuid::Uuid::from_u128(7), "sae-a", "[\"sae-b\"]");
        sealer.open(Purpose::Key, &aad, &sealed).unwrap()
    }

    #[test]
    fn a_rotation_reseals_everything_under_a_new_key_and_the_audit_chain_still_verifies() {
        let (_dir, mut conn, key_file) = started();
        let old_key = std::fs::read(&key_file).unwrap();
        let rotated = rotate(&mut conn, &key_file).unwrap();
        assert_eq!(
            rotated,
            Rotated {
                keys: 1,
                held_keys: 0,
                link_blocks: 1
            }
        );
        assert_ne!(std::fs::read(&key_file).unwrap(), old_key);
        assert!(!pending_file(&key_file).exists());
        let sealer = open_sealer(&conn, &key_file, Access::Start).unwrap();
        assert_eq!(key_material(&conn, &sealer), vec![5u8; 32]);
        let audit_key = sealer.audit_key().unwrap();
        assert_eq!(audit_trail::verify_chain(&conn, &audit_key).unwrap(), 1);
        // The old key opens nothing any more.
        let old = Sealer::from_master(&old_key).unwrap();
        let sealed: Vec<u8> = conn
            .query_row("SELECT material FROM keys", [], |r| r.get(0))
            .unwrap();
        let aad = key_aad(&uuid::Uuid::from_u128(7), "sae-a", "[\"sae-b\"]");
        assert!(old.open(Purpose::Key, &aad, &sealed).is_err());
        // And a second rotation keeps the audit key too.
        rotate(&mut conn, &key_file).unwrap();
        let sealer = open_sealer(&conn, &key_file, Access::Inspect).unwrap();
        assert_eq!(*sealer.audit_key().unwrap(), *audit_key);
    }

    fn write_private(path: &Path, bytes: &[u8]) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, bytes).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn a_rotation_cut_after_its_commit_is_finished_at_the_next_start() {
        let (_dir, mut conn, key_file) = started();
        let old_key = std::fs::read(&key_file).unwrap();
        rotate(&mut conn, &key_file).unwrap();
        // As if the rename had not happened: the old key in place, the new one pending.
        let new_key = std::fs::read(&key_file).unwrap();
        write_private(&pending_file(&key_file), &new_key);
        write_private(&key_file, &old_key);
        let inspected = open_sealer(&conn, &key_file, Access::Inspect).unwrap();
        assert_eq!(key_material(&conn, &inspected), vec![5u8; 32]);
        assert_eq!(
            std::fs::read(&key_file).unwrap(),
            old_key,
            "inspect moves nothing"
        );
        let started = open_sealer(&conn, &key_file, Access::Start).unwrap();
        assert_eq!(key_material(&conn, &started), vec![5u8; 32]);
        assert_eq!(std::fs::read(&key_file).unwrap(), new_key);
        assert!(!pending_file(&key_file).exists());
    }

    #[test]
    fn a_rotation_cut_before_its_commit_leaves_the_old_key_working() {
        let (_dir, conn, key_file) = started();
        let old_key = std::fs::read(&key_file).unwrap();
        // The new key written, nothing committed.
        create_key_file(&pending_file(&key_file)).unwrap();
        let sealer = open_sealer(&conn, &key_file, Access::Start).unwrap();
        assert_eq!(key_material(&conn, &sealer), vec![5u8; 32]);
        assert_eq!(std::fs::read(&key_file).unwrap(), old_key);
        // Another key altogether: refused.
        std::fs::remove_file(&key_file).unwrap();
        create_key_file(&key_file).unwrap();
        assert!(open_sealer(&conn, &key_file, Access::Start).is_err());
    }
}
