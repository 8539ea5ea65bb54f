//! A database restored from a backup: the keys it holds for retrieval may have been retrieved
//! since the backup was taken, and nothing in them says so. `kme restored` (the KME stopped)
//! forgets every key waiting for retrieval and every key held for a relay, in one
//! transaction with the audit record `database_restored`, so that no SAE gets a key twice.
//! That record keeps the head the trail had outside the database before (`audit_trail`),
//! which the restored trail no longer reaches, and the head file moves to the new record.
//! Link material needs nothing here: the links realign with their neighbours (see `link`).

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use crate::error::{Error, Result};
use crate::storage::audit::AuditRecord;
use crate::storage::master_key::{open_sealer, Access};
use crate::storage::writer::{append_audit, audit_head, write_head};

/// What a restored database forgot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forgotten {
    pub keys: u64,
    pub held_keys: u64,
}

/// Deletes the waiting and held keys of the database `conn` (opened with `key_file`, which
/// keys its audit chain), audits it with the trail's previous head from `head_file`, and
/// writes the new head there.
pub fn forget_waiting_keys(
    conn: &mut Connection,
    key_file: &Path,
    head_file: &Path,
) -> Result<Forgotten> {
    let audit_key = open_sealer(conn, key_file, Access::Inspect)?.audit_key()?;
    let previous_head = std::fs::read_to_string(head_file)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let forgotten = Forgotten {
        keys: tx.execute("DELETE FROM keys", [])? as u64,
        held_keys: tx.execute("DELETE FROM held_keys", [])? as u64,
    };
    let record = AuditRecord::new(
        "database_restored",
        serde_json::json!({
            "keys_forgotten": forgotten.keys,
            "held_keys_forgotten": forgotten.held_keys,
            "previous_head": previous_head,
        }),
    );
    let mut head = audit_head(&tx)?;
    append_audit(&tx, &audit_key, &mut head, &record)?;
    tx.commit()?;
    write_head(head_file, head.0, &head.1)
        .map_err(|err| Error::Storage(format!("{}: {err}", head_file.display())))?;
    Ok(forgotten)
}
