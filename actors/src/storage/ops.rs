//! The storage operations: one type per operation, each with its own result type.
//!
//! A caller sends `Exec(op)` to `Store` and gets `Result<op's Output>` back, after the
//! transaction that holds the operation is durable. Each operation's `apply` runs inside the
//! writer's batch transaction, in a savepoint of its own: an operation that fails leaves no
//! trace, and the others of its batch stand. No caller decodes a shared outcome type.

use std::collections::HashMap;
use std::time::Instant;

use rusqlite::{params, Connection};
use tokio::sync::oneshot;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::storage::audit::{AuditRecord, Retrieved};
use crate::storage::db::to_i64;
use crate::storage::held::Arrival;
use crate::storage::sealing::Sealer;
use crate::storage::writer::{
    activate, advance_position, append_audit, bound_record, expire_keys, insert_key,
    restart_stream, retrieve, store_blocks, BlockCache,
};
use crate::types::{now_ms, Binding, Key, KmeId, Owner, SaeId};

/// One block of link material to store. Its `Debug` shows where it goes, not its bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct BlockRecord {
    pub owner: Owner,
    pub seq: u64,
    /// Overwritten when dropped.
    pub data: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for BlockRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (owner, seq, len) = (self.owner.as_str(), self.seq, self.data.len());
        write!(f, "BlockRecord({owner} #{seq}, {len} bytes)")
    }
}

/// What storing a block did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOutcome {
    Stored,
    /// Already held with the same digest (a retried shipment): nothing changed.
    Duplicate,
}

/// A key whose material never leaves this KME (master and slaves are all local SAEs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalKey {
    pub id: Uuid,
    pub master: SaeId,
    pub slaves: Vec<SaeId>,
    pub material: Vec<u8>,
}

/// A key file of a file-drop link, as recorded once it gives blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsedKeyFile {
    pub name: String,
    pub sha256: [u8; 32],
}

/// What an operation works with inside the batch transaction.
pub struct Txn<'a> {
    pub(super) tx: &'a Connection,
    pub(super) sealer: &'a Sealer,
    /// The audit chain's head (id, hash), advanced by every record appended.
    pub(super) head: &'a mut (i64, Vec<u8>),
    pub(super) block_cache: &'a mut HashMap<KmeId, BlockCache>,
    /// Events of the audit records appended (counted in the metrics once committed).
    pub(super) events: &'a mut Vec<&'static str>,
    /// The key of the audit chain's MACs.
    pub(super) audit_key: &'a [u8; 32],
}

impl Txn<'_> {
    pub(super) fn audit(&mut self, record: &AuditRecord) -> Result<()> {
        append_audit(self.tx, self.audit_key, self.head, record)?;
        self.events.push(record.event);
        Ok(())
    }
}

/// One storage operation and what it answers.
pub trait Operation: Send + 'static {
    type Output: Send + 'static;
    /// Audit records are small and must not be lost to load: they are queued even when the
    /// store's queue is full.
    const ALWAYS_QUEUED: bool = false;
    fn apply(self, txn: &mut Txn<'_>) -> Result<Self::Output>;
    /// After this instant the caller has had its 503: the operation must not be committed then
    /// (the writer rolls it back if its transaction would commit later).
    fn deadline(&self) -> Option<Instant> {
        None
    }
}

/// Store link blocks (idempotent per owner and number; a replay of a consumed number fails).
/// `key_file`: the key file they come from, recorded as used in the same transaction (refused
/// if a file with its contents was used before). Authentication blocks from a key file (an
/// operator's re-key) restart the authentication stream at their first number.
pub struct StoreBlocks {
    pub peer: KmeId,
    pub blocks: Vec<BlockRecord>,
    pub confirmed: bool,
    pub key_file: Option<UsedKeyFile>,
}

impl Operation for StoreBlocks {
    type Output = Vec<BlockOutcome>;

    fn apply(self, txn: &mut Txn<'_>) -> Result<Self::Output> {
        if let Some(file) = self.key_file {
            let inserted = txn
                .tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO key_files(peer, name, sha256, pending)
                     VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![
                    self.peer.as_str(),
                    file.name,
                    file.sha256.as_slice(),
                    !self.confirmed
                ])?;
            if inserted == 0 {
                return Err(Error::PeerMessage(format!(
                    "key file {} was used before",
                    file.name
                )));
            }
            if let Some(first) = self.blocks.iter().find(|b| b.owner == Owner::Auth) {
                restart_stream(
                    txn.tx,
                    &self.peer,
                    &Owner::Auth,
                    first.seq,
                    first.data.len(),
                )?;
            }
        }
        store_blocks(txn.tx, txn.sealer, &self.peer, self.blocks, self.confirmed)
    }
}

/// file-drop: did a key file with these contents give blocks for good on this link?
pub struct KeyFileUsed {
    pub peer: KmeId,
    pub sha256: [u8; 32],
}

impl Operation for KeyFileUsed {
    type Output = bool;

    fn apply(self, txn: &mut Txn<'_>) -> Result<bool> {
        Ok(txn
            .tx
            .prepare_cached(
                "SELECT 1 FROM key_files WHERE peer = ?1 AND sha256 = ?2 AND pending = 0",
            )?
            .exists(params![self.peer.as_str(), self.sha256.as_slice()])?)
    }
}

/// The other end holds these blocks (owner, number) durably: they may be used now.
pub struct ConfirmBlocks {
    pub peer: KmeId,
    pub blocks: Vec<(Owner, u64)>,
}

impl Operation for ConfirmBlocks {
    type Output = ();

    fn apply(self, txn: &mut Txn<'_>) -> Result<()> {
        let peer = self.peer.as_str();
        let mut stmt = txn.tx.prepare_cached(
            "UPDATE link_blocks SET confirmed = 1 WHERE peer = ?1 AND owner = ?2 AND seq = ?3",
        )?;
        for (owner, seq) in self.blocks {
            stmt.execute(params![peer, owner.as_str(), to_i64(seq)])?;
        }
        txn.tx
            .prepare_cached("UPDATE key_files SET pending = 0 WHERE peer = ?1 AND pending = 1")?
            .execute(params![peer])?;
        Ok(())
    }
}

/// BB84, Alice end: the Bob end lost the frame these unconfirmed blocks came from. Delete
/// every unconfirmed block of the link and rewind each stream to its first deleted number
/// (nobody allocated from them, and the Bob end never stored them).
pub struct DiscardBlocks {
    pub peer: KmeId,
    pub audit: AuditRecord,
}

impl Operation for DiscardBlocks {
    type Output = ();

    fn apply(self, txn: &mut Txn<'_>) -> Result<()> {
        discard_unconfirmed(txn, &self.peer)?;
        txn.audit(&self.audit)
    }
}

/// Deletes every unconfirmed block of the link to `peer` (and the key files pending with
/// them), rewinding each stream to its first deleted number.
fn discard_unconfirmed(txn: &mut Txn<'_>, peer: &KmeId) -> Result<()> {
    {
        let peer = peer.as_str();
        txn.tx
            .prepare_cached(
                "UPDATE link_streams SET next_seq = (SELECT min(b.seq) FROM link_blocks b
                     WHERE b.peer = link_streams.peer AND b.owner = link_streams.owner
                       AND b.confirmed = 0)
                 WHERE peer = ?1 AND EXISTS (SELECT 1 FROM link_blocks b
                     WHERE b.peer = link_streams.peer AND b.owner = link_streams.owner
                       AND b.confirmed = 0)",
            )?
            .execute(params![peer])?;
        txn.tx
            .prepare_cached("DELETE FROM link_blocks WHERE peer = ?1 AND confirmed = 0")?
            .execute(params![peer])?;
        txn.tx
            .prepare_cached("DELETE FROM key_files WHERE peer = ?1 AND pending = 1")?
            .execute(params![peer])?;
    }
    txn.block_cache.remove(peer);
    Ok(())
}

/// Both ends of the link to `peer` go on from the numbers `next` (one per key stream, above
/// what either end holds): every unconfirmed block is discarded (the shipment the other end
/// refused), then each key stream's blocks below its number are deleted and its next number
/// and position move there. Authentication blocks are not touched.
pub struct RealignStreams {
    pub peer: KmeId,
    pub next: Vec<(Owner, u64)>,
    pub block_bytes: usize,
    pub audit: AuditRecord,
}

impl Operation for RealignStreams {
    type Output = ();

    fn apply(self, txn: &mut Txn<'_>) -> Result<()> {
        discard_unconfirmed(txn, &self.peer)?;
        for (owner, next) in &self.next {
            if *owner == Owner::Auth {
                return Err(Error::PeerMessage(
                    "the authentication stream is not realigned".into(),
                ));
            }
            // Deletes the blocks below and moves the next number and position there.
            restart_stream(txn.tx, &self.peer, owner, *next, self.block_bytes)?;
        }
        txn.block_cache.remove(&self.peer);
        txn.audit(&self.audit)
    }
}

/// At the slave's KME: bind positions of the peer's stream to key_IDs (one peer batch).
/// Relay legs among them are opened and their keys held for `local_slaves` (the binding's
/// slaves homed here, in binding order). Output: the relay legs that arrived (none for a
/// retried batch, which changes nothing).
pub struct Activate {
    pub peer: KmeId,
    pub seq: u64,
    pub digest: [u8; 32],
    pub block_bytes: usize,
    pub bindings: Vec<Binding>,
    pub local_slaves: Vec<Vec<SaeId>>,
}

impl Operation for Activate {
    type Output = Vec<Arrival>;

    fn apply(self, txn: &mut Txn<'_>) -> Result<Vec<Arrival>> {
        let cache = txn.block_cache.entry(self.peer.clone()).or_default();
        let arrivals = activate(
            txn.tx,
            txn.sealer,
            &self.peer,
            self.seq,
            &self.digest,
            self.block_bytes,
            &self.bindings,
            &self.local_slaves,
            cache,
        )?;
        match arrivals {
            Some(arrivals) => {
                let record = if self.bindings.is_empty() {
                    // The neighbour's handshake (see `PeerLink`): its numbers, nothing bound.
                    AuditRecord::new(
                        "peer_handshake",
                        serde_json::json!({"from_kme": self.peer.as_str(), "seq": self.seq}),
                    )
                } else {
                    bound_record(&self.peer, self.seq, &self.bindings)
                };
                txn.audit(&record)?;
                Ok(arrivals)
            }
            None => Ok(Vec::new()),
        }
    }
}

/// At the master's KME: keys up to `position` of our stream were delivered (or burned).
pub struct CommitDelivery {
    pub peer: KmeId,
    pub owner: Owner,
    pub position: u64,
    pub block_bytes: usize,
    /// One record per delivery up to `position`.
    pub audits: Vec<AuditRecord>,
}

impl Operation for CommitDelivery {
    type Output = ();

    fn apply(self, txn: &mut Txn<'_>) -> Result<()> {
        advance_position(
            txn.tx,
            &self.peer,
            &self.owner,
            self.position,
            self.block_bytes,
        )?;
        self.audits.iter().try_for_each(|audit| txn.audit(audit))
    }
}

/// Keys for SAE pairs on this KME only.
pub struct InsertLocalKeys {
    pub keys: Vec<LocalKey>,
    pub audit: AuditRecord,
}

impl Operation for InsertLocalKeys {
    type Output = ();

    fn apply(self, txn: &mut Txn<'_>) -> Result<()> {
        let now = now_ms();
        for key in self.keys {
            let slaves =
                serde_json::to_string(&key.slaves).map_err(|e| Error::Storage(e.to_string()))?;
            insert_key(
                txn.tx,
                txn.sealer,
                &key.id,
                &key.master,
                &slaves,
                &key.material,
                now,
            )?;
        }
        txn.audit(&self.audit)
    }
}

/// dec_keys: consume-once retrieval by a named slave. Neither applied nor committed after
/// `deadline`: by then the SAE has had its 503, and a key it never received must stay
/// retrievable.
pub struct Retrieve {
    pub caller: SaeId,
    pub master: SaeId,
    pub key_ids: Vec<Uuid>,
    pub deadline: Instant,
}

impl Operation for Retrieve {
    type Output = Vec<Key>;

    fn apply(self, txn: &mut Txn<'_>) -> Result<Vec<Key>> {
        if Instant::now() > self.deadline {
            return Err(Error::Unavailable(
                "dec_keys expired before it reached storage".into(),
            ));
        }
        let keys = retrieve(
            txn.tx,
            txn.sealer,
            &self.caller,
            &self.master,
            &self.key_ids,
        )?;
        let record = AuditRecord::new(
            "keys_retrieved",
            Retrieved {
                slave: &self.caller,
                master: &self.master,
                key_IDs: &self.key_ids,
            },
        );
        txn.audit(&record)?;
        Ok(keys)
    }

    fn deadline(&self) -> Option<Instant> {
        Some(self.deadline)
    }
}

/// The pairs (master, slave) with keys waiting here for that slave: how many. Read through
/// the writer (a small table), so it is in step with the transactions that change it.
pub struct WaitingKeys;

impl Operation for WaitingKeys {
    type Output = Vec<(SaeId, SaeId, u64)>;

    fn apply(self, txn: &mut Txn<'_>) -> Result<Self::Output> {
        let mut rows = txn
            .tx
            .prepare_cached("SELECT master, slave, keys FROM waiting_keys WHERE keys > 0")?;
        let waiting = rows
            .query_map([], |r| {
                Ok((
                    SaeId::new(&r.get::<_, String>(0)?),
                    SaeId::new(&r.get::<_, String>(1)?),
                    r.get::<_, i64>(2)?,
                ))
            })?
            .map(|row| row.map(|(m, s, keys)| (m, s, u64::try_from(keys).unwrap_or(0))))
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(waiting)
    }
}

/// One audit record, as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RecentEvent {
    pub id: i64,
    pub at_ms: i64,
    pub event: String,
    pub detail: String,
}

/// The newest `limit` audit records, newest first.
pub struct RecentEvents {
    pub limit: u32,
}

impl Operation for RecentEvents {
    type Output = Vec<RecentEvent>;

    fn apply(self, txn: &mut Txn<'_>) -> Result<Self::Output> {
        let mut rows = txn.tx.prepare_cached(
            "SELECT id, at_ms, event, detail FROM audit ORDER BY id DESC LIMIT ?1",
        )?;
        let events = rows
            .query_map(params![self.limit], |r| {
                Ok(RecentEvent {
                    id: r.get(0)?,
                    at_ms: r.get(1)?,
                    event: r.get(2)?,
                    detail: r.get(3)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(events)
    }
}

/// Delete keys bound before `created_before_ms` that some slave never retrieved (at most a
/// chunk per sweep). Output: how many were deleted.
pub struct ExpireKeys {
    pub created_before_ms: i64,
}

impl Operation for ExpireKeys {
    type Output = usize;

    fn apply(self, txn: &mut Txn<'_>) -> Result<usize> {
        let expired = expire_keys(txn.tx, self.created_before_ms)?;
        if !expired.is_empty() {
            log::info!("{} keys expired unretrieved", expired.len());
            let record = AuditRecord::new(
                "keys_expired",
                serde_json::json!({"count": expired.len(), "key_IDs": expired}),
            );
            txn.audit(&record)?;
        }
        Ok(expired.len())
    }
}

/// An audit event that changes no key state (start-up, withdrawn keys).
pub struct AppendAudit(pub AuditRecord);

impl Operation for AppendAudit {
    type Output = ();
    const ALWAYS_QUEUED: bool = true;

    fn apply(self, txn: &mut Txn<'_>) -> Result<()> {
        txn.audit(&self.0)
    }
}

/// An operation queued for the writer with the channel its caller waits on; the writer runs
/// batches of them without knowing their types.
pub trait Queued: Send {
    /// Runs the operation; its outcome waits in the returned completion until the batch's
    /// transaction is durable (or failed).
    fn apply(self: Box<Self>, txn: &mut Txn<'_>) -> Box<dyn Completion>;
    /// The batch never ran: the caller gets `err`.
    fn fail(self: Box<Self>, err: &Error);
    /// See `Operation::deadline`.
    fn deadline(&self) -> Option<Instant>;
}

/// The outcome of an applied operation, not yet told to its caller.
pub trait Completion: Send {
    /// Why the operation failed, if it did.
    fn error(&self) -> Option<&Error>;
    /// The transaction is durable: the caller gets the operation's outcome.
    fn complete(self: Box<Self>);
    /// The transaction was rolled back: the caller gets `err` instead of the outcome.
    fn fail(self: Box<Self>, err: &Error);
}

struct Pending<O: Operation> {
    op: O,
    waiter: oneshot::Sender<Result<O::Output>>,
}

/// `op` ready for a batch, and the receiver its caller waits on.
pub(super) fn pending<O: Operation>(
    op: O,
) -> (Box<dyn Queued>, oneshot::Receiver<Result<O::Output>>) {
    let (waiter, rx) = oneshot::channel();
    (Box::new(Pending { op, waiter }), rx)
}

impl<O: Operation> Queued for Pending<O> {
    fn apply(self: Box<Self>, txn: &mut Txn<'_>) -> Box<dyn Completion> {
        Box::new(Applied {
            outcome: self.op.apply(txn),
            waiter: self.waiter,
        })
    }

    fn fail(self: Box<Self>, err: &Error) {
        // A dropped receiver is a caller that timed out.
        let _ = self.waiter.send(Err(err.clone()));
    }

    fn deadline(&self) -> Option<Instant> {
        self.op.deadline()
    }
}

struct Applied<T> {
    outcome: Result<T>,
    waiter: oneshot::Sender<Result<T>>,
}

impl<T: Send + 'static> Completion for Applied<T> {
    fn error(&self) -> Option<&Error> {
        self.outcome.as_ref().err()
    }

    fn complete(self: Box<Self>) {
        // A dropped receiver is a caller that timed out; its write stands.
        let _ = self.waiter.send(self.outcome);
    }

    fn fail(self: Box<Self>, err: &Error) {
        let _ = self.waiter.send(Err(err.clone()));
    }
}
