//! Keys of a relay held at this KME until the master's KME settles the relay (SQL side of
//! `relay`): stored not retrievable in `held_keys`, moved to `keys` by a release, deleted by
//! an abort or when the hold time passes unsettled. `relays` remembers each outcome, so a
//! retried release is answered the same and a release after a burn is refused.

use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::storage::audit::AuditRecord;
use crate::storage::ops::{Operation, Txn};
use crate::storage::sealing::{Purpose, Sealer};
use crate::storage::writer::{already_bound, key_aad};
use crate::types::{Branch, SaeId};

/// A relay leg that reached this KME in an activation batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    pub relay_id: Uuid,
    /// Keys for SAEs of this KME are held here.
    pub held_here: bool,
    /// The KMEs this one forwards to.
    pub onward: Vec<Branch>,
    /// What to forward (None at a leaf of the tree).
    pub forward: Option<Forward>,
}

/// Keys this KME forwards, in the clear in memory only (their material here is burned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub master: SaeId,
    pub slaves: Vec<SaeId>,
    pub key_ids: Vec<Uuid>,
    pub len: u32,
    pub keys: Vec<Vec<u8>>,
}

/// Keys of one relay for the SAEs `pending_json` of this KME.
pub(super) struct HeldKeys<'a> {
    pub relay_id: &'a Uuid,
    pub master: &'a SaeId,
    pub slaves_json: &'a str,
    pub pending_json: &'a str,
}

impl HeldKeys<'_> {
    pub(super) fn insert<'k>(
        &self,
        tx: &Connection,
        sealer: &Sealer,
        keys: impl Iterator<Item = (&'k Uuid, &'k Vec<u8>)>,
        now: i64,
    ) -> Result<()> {
        let keys: Vec<(&Uuid, &Vec<u8>)> = keys.collect();
        let ids: Vec<u8> = keys.iter().flat_map(|(id, _)| *id.as_bytes()).collect();
        let fresh = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO relays(relay_id, state, created_ms, key_ids)
                 VALUES (?1, 'held', ?2, ?3)",
            )?
            .execute(params![self.relay_id.as_bytes().as_slice(), now, ids])?;
        if fresh == 0 {
            return Err(Error::PeerMessage(format!(
                "relay {} reached this KME before",
                self.relay_id
            )));
        }
        let mut insert = tx.prepare_cached(
            "INSERT INTO held_keys(key_id, relay_id, master, slaves, pending, material, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for (id, material) in keys {
            let aad = key_aad(id, self.master.as_str(), self.slaves_json);
            insert
                .execute(params![
                    id.as_bytes().as_slice(),
                    self.relay_id.as_bytes().as_slice(),
                    self.master.as_str(),
                    self.slaves_json,
                    self.pending_json,
                    sealer.seal(Purpose::Key, &aad, material)?,
                    now
                ])
                .map_err(already_bound(id))?;
        }
        Ok(())
    }
}

/// How a relay ends at this KME.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Every KME holds the keys: they become retrievable.
    Release,
    /// Some KME failed: the keys are burned.
    Abort,
}

/// Settles the keys of `relays` held here, one outcome per relay in order. A release of an
/// unknown or burned relay fails (then the master's KME answers 503); an abort always
/// succeeds. One audit record for the whole operation.
pub struct SettleRelays {
    pub relays: Vec<Uuid>,
    pub settlement: Settlement,
    pub reason: String,
}

impl Operation for SettleRelays {
    type Output = Vec<Result<()>>;

    fn apply(self, txn: &mut Txn<'_>) -> Result<Vec<Result<()>>> {
        let mut outcomes = Vec::with_capacity(self.relays.len());
        let mut settled = Vec::new();
        let mut keys = 0;
        for relay_id in &self.relays {
            let outcome = settle(txn.tx, relay_id, self.settlement);
            if let Ok(Ok(Some(moved))) = &outcome {
                settled.push(relay_id);
                keys += moved;
            }
            outcomes.push(outcome?.map(|_| ()));
        }
        if !settled.is_empty() {
            let event = match self.settlement {
                Settlement::Release => "relay_released",
                Settlement::Abort => "relay_burned",
            };
            txn.audit(&AuditRecord::new(
                event,
                serde_json::json!({"relay_ids": settled, "keys": keys, "reason": self.reason}),
            ))?;
        }
        Ok(outcomes)
    }
}

/// Settles one relay: `Ok(Ok(Some(keys moved or burned)))` when its state changed,
/// `Ok(Ok(None))` when there was nothing to do (settled the same way before, or an abort of an
/// unknown relay), `Ok(Err)` for a release that cannot be, `Err` for SQL failures.
fn settle(
    tx: &Connection,
    relay_id: &Uuid,
    settlement: Settlement,
) -> Result<Result<Option<usize>>> {
    let id = relay_id.as_bytes().as_slice();
    let state: Option<String> = tx
        .prepare_cached("SELECT state FROM relays WHERE relay_id = ?1")?
        .query_row(params![id], |r| r.get(0))
        .optional()?;
    let state = match (settlement, state.as_deref()) {
        (Settlement::Release, Some("released"))
        | (Settlement::Abort, Some("burned"))
        | (Settlement::Abort, None) => return Ok(Ok(None)),
        (Settlement::Release, Some("held")) => "released",
        (Settlement::Release, _) => {
            return Ok(Err(Error::PeerMessage(format!(
                "relay {relay_id} is not held here"
            ))))
        }
        (Settlement::Abort, Some(_)) => "burned",
    };
    let mut moved = 0;
    if state == "released" {
        moved = tx
            .prepare_cached(
                "INSERT INTO keys(key_id, master, slaves, pending, material, created_ms)
                 SELECT key_id, master, slaves, pending, material, created_ms
                 FROM held_keys WHERE relay_id = ?1",
            )?
            .execute(params![id])?;
    } else {
        // Released keys not retrieved yet are burned too: the master never got them.
        let ids: Vec<u8> = tx
            .prepare_cached("SELECT key_ids FROM relays WHERE relay_id = ?1")?
            .query_row(params![id], |r| r.get(0))?;
        let mut delete = tx.prepare_cached("DELETE FROM keys WHERE key_id = ?1")?;
        for key_id in ids.chunks_exact(16) {
            moved += delete.execute(params![key_id])?;
        }
    }
    moved += tx
        .prepare_cached("DELETE FROM held_keys WHERE relay_id = ?1")?
        .execute(params![id])?;
    tx.prepare_cached("UPDATE relays SET state = ?2 WHERE relay_id = ?1")?
        .execute(params![id, state])?;
    Ok(Ok(Some(moved)))
}

/// Burns held keys of relays not settled by `created_before_ms`, and forgets outcomes older
/// than `forget_before_ms`. Output: how many keys were burned.
pub(super) fn burn_unsettled(
    tx: &Connection,
    created_before_ms: i64,
    forget_before_ms: i64,
) -> Result<Vec<Uuid>> {
    let relays: Vec<Uuid> = tx
        .prepare_cached(
            "UPDATE relays SET state = 'burned' WHERE state = 'held' AND created_ms < ?1
             RETURNING relay_id",
        )?
        .query_map(params![created_before_ms], |r| r.get::<_, Vec<u8>>(0))?
        .filter_map(|id| id.ok().and_then(|id| Uuid::from_slice(&id).ok()))
        .collect();
    for relay in &relays {
        tx.prepare_cached("DELETE FROM held_keys WHERE relay_id = ?1")?
            .execute(params![relay.as_bytes().as_slice()])?;
    }
    tx.prepare_cached("DELETE FROM relays WHERE created_ms < ?1")?
        .execute(params![forget_before_ms])?;
    Ok(relays)
}

/// The expiry sweep of relays: held keys of relays not settled by `created_before_ms` are
/// burned; outcomes older than `forget_before_ms` are forgotten. Output: relays burned.
pub struct BurnUnsettled {
    pub created_before_ms: i64,
    pub forget_before_ms: i64,
}

impl Operation for BurnUnsettled {
    type Output = usize;

    fn apply(self, txn: &mut Txn<'_>) -> Result<usize> {
        let burned = burn_unsettled(txn.tx, self.created_before_ms, self.forget_before_ms)?;
        if !burned.is_empty() {
            log::warn!(
                "{} relays never settled: their held keys are burned",
                burned.len()
            );
            txn.audit(&AuditRecord::new(
                "relay_burned",
                serde_json::json!({"relay_ids": burned, "reason": "not settled within the hold time"}),
            ))?;
        }
        Ok(burned.len())
    }
}

/// At the master's KME: keys of a multicast for slaves of this KME, held like those that
/// arrive by relay until the relay is released.
pub struct HoldKeys {
    pub relay_id: Uuid,
    pub master: SaeId,
    pub slaves: Vec<SaeId>,
    pub local_slaves: Vec<SaeId>,
    pub keys: Vec<crate::types::Key>,
}

impl Operation for HoldKeys {
    type Output = ();

    fn apply(self, txn: &mut Txn<'_>) -> Result<()> {
        let json =
            |ids: &[SaeId]| serde_json::to_string(ids).map_err(|e| Error::Storage(e.to_string()));
        let (slaves, pending) = (json(&self.slaves)?, json(&self.local_slaves)?);
        let held = HeldKeys {
            relay_id: &self.relay_id,
            master: &self.master,
            slaves_json: &slaves,
            pending_json: &pending,
        };
        let keys = self.keys.iter().map(|k| (&k.id, &k.material));
        held.insert(txn.tx, txn.sealer, keys, crate::types::now_ms())
    }
}
