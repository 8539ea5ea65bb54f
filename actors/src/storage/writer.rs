//! DbWriter: the single writer of the SQLite file (a SyncArbiter of one thread).
//!
//! Owns: the write connection pool (one connection) and the head of the audit hash chain.
//! Handles: `WriteBatch`, sent only by `Store`, which groups concurrent operations so that one
//! transaction (and one fsync) serves many requests. Each operation runs in its own savepoint:
//! a refused operation (unknown key, replayed message) changes nothing and does not disturb the
//! others; a failed commit fails them all, and then nothing was changed. An operation whose
//! caller has had its 503 by the time of COMMIT (a dec_keys past its deadline) is rolled back
//! first: a key is never consumed for an SAE that was told it was not.
//! Mailbox: SyncArbiter queues are unbounded; `Store` keeps at most one batch in flight.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use openssl::sha::sha256;
use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::relay::seal::open;
use crate::storage::audit::{chain_hash, AuditRecord, Bound};
use crate::storage::db::{to_i64, to_u64, DbPool};
use crate::storage::held::{Arrival, Forward, HeldKeys};
use crate::storage::ops::{BlockOutcome, BlockRecord, Completion, Queued, Txn};
use crate::storage::sealing::{block_aad, Purpose, Sealer};
use crate::types::{now_ms, Binding, Key, KmeId, Owner, SaeId};

/// Most keys deleted by one expiry sweep.
const EXPIRY_CHUNK: i64 = 10_000;

/// Deletes keys created before `created_before_ms` (at most `EXPIRY_CHUNK`); returns their IDs.
pub(super) fn expire_keys(tx: &Connection, created_before_ms: i64) -> Result<Vec<Uuid>> {
    let expired: Vec<Uuid> = tx
        // By our own clock at binding (`created_ms`), never by the time inside a UUIDv7 key_ID:
        // that is the master KME's clock, and a neighbour running behind would have its keys
        // deleted here early (one ahead, kept forever). At most EXPIRY_CHUNK per sweep, so that
        // a long-offline slave's backlog never makes one huge transaction that stalls every
        // request; the next sweep goes on.
        .prepare_cached(
            "DELETE FROM keys WHERE key_id IN
             (SELECT key_id FROM keys WHERE created_ms < ?1 ORDER BY created_ms LIMIT ?2)
             RETURNING key_id",
        )?
        .query_map(params![created_before_ms, EXPIRY_CHUNK], |r| {
            r.get::<_, Vec<u8>>(0)
        })?
        .filter_map(|id| id.ok().and_then(|id| Uuid::from_slice(&id).ok()))
        .collect();
    Ok(expired)
}

pub struct DbWriter {
    pool: DbPool,
    sealer: Arc<Sealer>,
    audit_head: Option<(i64, Vec<u8>)>,
    /// The last block read per peer stream. Blocks never change once stored, and bindings
    /// arrive in stream order, so consecutive activations mostly hit it.
    block_cache: HashMap<KmeId, BlockCache>,
    metrics: Option<Arc<Metrics>>,
    /// The key of the audit chain's MACs (None: it could not be derived; writes then fail).
    audit_key: Option<zeroize::Zeroizing<[u8; 32]>>,
    /// Where the chain's head is copied outside the database, and when it last was.
    head_file: Option<(PathBuf, Option<Instant>)>,
}

impl DbWriter {
    /// `sealer` encrypts key material before it reaches the file (see `sealing.rs`).
    pub fn new(pool: DbPool, sealer: Arc<Sealer>) -> Self {
        let audit_key = sealer.audit_key().ok();
        Self {
            pool,
            sealer,
            audit_head: None,
            block_cache: HashMap::new(),
            metrics: None,
            audit_key,
            head_file: None,
        }
    }

    /// Copies the audit chain's head to `path` after commits (see `audit_trail::check_head`).
    pub fn with_head_file(mut self, path: PathBuf) -> Self {
        self.head_file = Some((path, None));
        self
    }

    /// The head outside the database: at most `HEAD_EVERY` behind (a cut tail of the trail
    /// shows against it), and written at once for the last record of a run.
    fn copy_head(&mut self, stopping: bool) {
        let (Some((path, written)), Some((id, hash))) = (&mut self.head_file, &self.audit_head)
        else {
            return;
        };
        if !stopping && written.is_some_and(|at| at.elapsed() < HEAD_EVERY) {
            return;
        }
        *written = Some(Instant::now());
        if let Err(err) = write_head(path, *id, hash) {
            log::error!("cannot copy the audit head to {}: {err}", path.display());
        }
    }

    /// Commit latency, batch sizes and audit records by event go to `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }
}

impl Actor for DbWriter {
    type Context = SyncContext<Self>;
}

/// Operations to run in one transaction, in order. Each caller is told its operation's outcome
/// only once the transaction is durable; when it could not be committed, every caller of the
/// batch gets the error (and the result here is that error, for the log).
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub struct WriteBatch(pub Vec<Box<dyn Queued>>);

impl Handler<WriteBatch> for DbWriter {
    type Result = Result<()>;

    fn handle(&mut self, msg: WriteBatch, _ctx: &mut SyncContext<Self>) -> Self::Result {
        let started = std::time::Instant::now();
        let result = self.write(msg.0);
        log::trace!("transaction took {:?}", started.elapsed());
        result
    }
}

impl DbWriter {
    fn write(&mut self, mut batch: Vec<Box<dyn Queued>>) -> Result<()> {
        // Operations with a deadline go last, the latest deadline first: those that would
        // commit after their caller's 503 are then the tail of the transaction, rolled back
        // just before COMMIT. Callers of one batch were concurrent, so any order is theirs.
        batch.sort_by_key(|op| op.deadline().map(Reverse));
        let started = Instant::now();
        let operations = batch.len();
        let mut applied = Vec::with_capacity(batch.len());
        let mut events = Vec::new();
        let mut waiting = batch.into_iter();
        match self.transaction(&mut waiting, &mut applied, &mut events) {
            Ok(rolled_back_from) => {
                self.copy_head(events.contains(&"kme_stopped"));
                if let Some(metrics) = &self.metrics {
                    metrics
                        .commit_seconds
                        .observe(started.elapsed().as_secs_f64());
                    metrics.batch_operations.observe(operations as f64);
                    for event in events {
                        metrics.audit_records.with_label_values(&[event]).inc();
                    }
                }
                let late = Error::Unavailable(
                    "the request's time ran out before its storage transaction committed".into(),
                );
                for (i, done) in applied.into_iter().enumerate() {
                    if i >= rolled_back_from && done.error().is_none() {
                        done.fail(&late);
                    } else {
                        done.complete();
                    }
                }
                Ok(())
            }
            Err(err) => {
                self.audit_head = None;
                log::error!("storage batch failed: {err}");
                applied.into_iter().for_each(|done| done.fail(&err));
                waiting.for_each(|op| op.fail(&err));
                Err(err)
            }
        }
    }

    /// Applies the operations in one transaction, each in a savepoint of its own, and commits.
    /// Operations with a deadline keep their savepoints open until COMMIT: those past their
    /// deadline by then are rolled back. Result: the index (in `applied`) from which every
    /// operation was rolled back that way. `events`: those of the audit records that stand.
    /// On an error, the operations not yet applied are left in `waiting`.
    fn transaction(
        &mut self,
        waiting: &mut impl Iterator<Item = Box<dyn Queued>>,
        applied: &mut Vec<Box<dyn Completion>>,
        events: &mut Vec<&'static str>,
    ) -> Result<usize> {
        let audit_key = self
            .audit_key
            .as_deref()
            .ok_or_else(|| Error::Storage("no audit key".into()))?;
        let mut conn = self.pool.get()?;
        let tx = conn.transaction()?;
        let mut head = match self.audit_head.clone() {
            Some(head) => head,
            None => audit_head(&tx)?,
        };
        // Cached statements: `Transaction::savepoint` parses its SQL on every call, which
        // showed up as a tenth of the writer's time.
        let savepoint = |sql: &str| -> Result<()> {
            tx.prepare_cached(sql)?.execute([])?;
            Ok(())
        };
        // Open savepoints of applied operations with a deadline: where each one starts in
        // `applied`, its deadline, and the audit head and events before it.
        let mut due = Vec::new();
        for op in waiting.by_ref() {
            let deadline = op.deadline();
            let (begin, rollback, release) = match deadline {
                None => ("SAVEPOINT op", "ROLLBACK TO op", "RELEASE op"),
                Some(_) => ("SAVEPOINT due", "ROLLBACK TO due", "RELEASE due"),
            };
            if let Err(err) = savepoint(begin) {
                op.fail(&err);
                return Err(err);
            }
            let before = (head.clone(), events.len());
            let mut txn = Txn {
                tx: &tx,
                sealer: &self.sealer,
                head: &mut head,
                block_cache: &mut self.block_cache,
                events,
                audit_key,
            };
            let done = op.apply(&mut txn);
            let error = done.error().cloned();
            applied.push(done);
            if let Some(err) = error {
                if tx.is_autocommit() {
                    // SQLite rolled the whole transaction back (it does on SQLITE_FULL, and
                    // may on I/O errors): nothing of the batch stands, and this is why.
                    return Err(err);
                }
                savepoint(rollback)?;
                (head, _) = before.clone();
                events.truncate(before.1);
                savepoint(release)?;
            } else if let Some(deadline) = deadline {
                due.push((applied.len() - 1, deadline, before));
            } else {
                savepoint(release)?;
            }
        }
        let mut rolled_back_from = applied.len();
        let now = Instant::now();
        while let Some((index, deadline, (head_before, events_before))) = due.pop() {
            if deadline > now {
                break;
            }
            savepoint("ROLLBACK TO due")?;
            savepoint("RELEASE due")?;
            head = head_before;
            events.truncate(events_before);
            rolled_back_from = index;
        }
        tx.commit()?;
        self.audit_head = Some(head);
        Ok(rolled_back_from)
    }
}

/// How far behind the head outside the database may be.
const HEAD_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// `{"id": .., "hash": hex}` to `path`, replaced whole (written aside, then renamed).
pub(super) fn write_head(path: &Path, id: i64, hash: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let text = serde_json::json!({"id": id, "hash": crate::types::hex(hash)}).to_string();
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

pub(super) fn audit_head(tx: &Connection) -> Result<(i64, Vec<u8>)> {
    let row = tx
        .query_row(
            "SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)),
        )
        .optional()?;
    Ok(row.unwrap_or((0, vec![0u8; 32])))
}

/// A neighbour's sequence numbers are `epoch << EPOCH_SHIFT | counter` (see `PeerLink`).
const EPOCH_SHIFT: u32 = 40;
/// Most epochs (restarts, resynchronisations) a neighbour may move ahead between two batches.
const MAX_EPOCH_JUMP: u64 = 1 << 16;
/// Highest epoch taken: room for 2^20 restarts.
const MAX_EPOCH: u64 = 1 << 20;

pub(super) fn append_audit(
    tx: &Connection,
    key: &[u8; 32],
    head: &mut (i64, Vec<u8>),
    record: &AuditRecord,
) -> Result<()> {
    let id = head.0 + 1;
    let at_ms = now_ms();
    let hash = chain_hash(Some(key), &head.1, id, at_ms, record.event, &record.detail)?;
    tx.prepare_cached(
        "INSERT INTO audit(id, at_ms, event, detail, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![id, at_ms, record.event, record.detail, head.1, hash.as_slice()])?;
    *head = (id, hash.to_vec());
    Ok(())
}

pub(super) fn bound_record(peer: &KmeId, seq: u64, bindings: &[Binding]) -> AuditRecord {
    // Sealed keys stay out of the trail: without their pads (burned) they are noise, but an
    // audit log is no place for anything derived from key material.
    let bindings: Vec<Binding> = bindings
        .iter()
        .map(|b| {
            let mut b = b.clone();
            if let Some(sealed) = b.relay.as_mut().and_then(|leg| leg.sealed.as_mut()) {
                sealed.keys.clear();
            }
            b
        })
        .collect();
    AuditRecord::new(
        "keys_bound",
        Bound {
            from_kme: peer,
            seq,
            bindings: &bindings,
        },
    )
}

pub(super) fn store_blocks(
    tx: &Connection,
    sealer: &Sealer,
    peer: &KmeId,
    blocks: Vec<BlockRecord>,
    confirmed: bool,
) -> Result<Vec<BlockOutcome>> {
    let mut outcomes = Vec::with_capacity(blocks.len());
    for block in blocks {
        let digest = sha256(&block.data);
        let existing: Option<Vec<u8>> = tx
            .prepare_cached(
                "SELECT digest FROM link_blocks WHERE peer = ?1 AND owner = ?2 AND seq = ?3",
            )?
            .query_row(
                params![peer.as_str(), block.owner.as_str(), to_i64(block.seq)],
                |r| r.get(0),
            )
            .optional()?;
        match existing {
            Some(stored) if stored == digest => {
                outcomes.push(BlockOutcome::Duplicate);
                continue;
            }
            // The ends numbered different material alike: an end was restored.
            Some(_) => {
                return Err(out_of_step(
                    peer,
                    &block.owner,
                    format!(
                        "block {} of {} differs from the stored one",
                        block.seq, block.owner
                    ),
                ))
            }
            None => {}
        }
        let state = crate::storage::db::stream_state(tx, peer, &block.owner)?;
        if block.seq < state.next_seq {
            // Held once and already consumed: a retried shipment (or a replay) changes nothing.
            outcomes.push(BlockOutcome::Duplicate);
            continue;
        }
        if block.seq >= MAX_POSITION {
            return Err(Error::PeerMessage(format!(
                "block {} of {} is out of range",
                block.seq, block.owner
            )));
        }
        if block.seq != state.next_seq {
            // Numbers beyond this end's: it lost blocks (restored, or a new database).
            return Err(out_of_step(
                peer,
                &block.owner,
                format!(
                    "block {} of {} does not follow block {}",
                    block.seq,
                    block.owner,
                    state.next_seq.saturating_sub(1)
                ),
            ));
        }
        tx.prepare_cached(
            "INSERT INTO link_blocks(peer, owner, seq, data, digest, confirmed)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            peer.as_str(),
            block.owner.as_str(),
            to_i64(block.seq),
            sealer.seal(
                Purpose::LinkBlock,
                &block_aad(peer.as_str(), block.owner.as_str(), block.seq),
                &block.data
            )?,
            digest.as_slice(),
            confirmed
        ])?;
        raise_next_seq(tx, peer, &block.owner, block.seq + 1)?;
        outcomes.push(BlockOutcome::Stored);
    }
    Ok(outcomes)
}

/// The refusal of a block the ends number differently: the key streams realign
/// (`Error::BlocksOutOfStep`, whose numbers the link end fills in); the authentication stream
/// waits for an operator key (`why`).
fn out_of_step(peer: &KmeId, owner: &Owner, why: String) -> Error {
    match owner {
        Owner::Auth => Error::PeerMessage(why),
        Owner::Kme(_) => Error::BlocksOutOfStep {
            peer: peer.to_string(),
            next: Vec::new(),
        },
    }
}

/// Positions and block numbers stay below this, so that they fit SQLite's signed integers and
/// no arithmetic on values a peer sends can overflow.
const MAX_POSITION: u64 = 1 << 62;

/// Binds positions of the peer's stream to key_IDs. Returns false for an idempotent retry of
/// the last batch (nothing changed), true when the batch was bound now.
#[allow(clippy::too_many_arguments)]
pub(super) fn activate(
    tx: &Connection,
    sealer: &Sealer,
    peer: &KmeId,
    seq: u64,
    digest: &[u8; 32],
    block_bytes: usize,
    bindings: &[Binding],
    local_slaves: &[Vec<SaeId>],
    cache: &mut BlockCache,
) -> Result<Option<Vec<Arrival>>> {
    let last: Option<(i64, Vec<u8>)> = tx
        .prepare_cached("SELECT last_seq, last_digest FROM peer_sequence WHERE peer = ?1")?
        .query_row(params![peer.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((last_seq, last_digest)) = last {
        let last_seq = to_u64(last_seq);
        if seq == last_seq && last_digest.as_slice() == digest.as_slice() {
            return Ok(None);
        }
        if seq <= last_seq {
            return Err(Error::SequenceBehind { last_seq });
        }
        // A number far ahead would leave no room above it (every later batch a "replay").
        if seq >> EPOCH_SHIFT > (last_seq >> EPOCH_SHIFT).saturating_add(MAX_EPOCH_JUMP) {
            return Err(Error::PeerMessage(format!(
                "activation {seq} is too far ahead of {last_seq}"
            )));
        }
    }
    if seq >> EPOCH_SHIFT > MAX_EPOCH {
        return Err(Error::PeerMessage(format!(
            "activation {seq}: its epoch is out of range"
        )));
    }
    let peer_stream = Owner::Kme(peer.clone());
    let state = crate::storage::db::stream_state(tx, peer, &peer_stream)?;
    let mut high_mark = state.position;
    let now = now_ms();
    let mut arrivals = Vec::new();
    for (binding, local) in bindings.iter().zip(local_slaves) {
        let end = binding.end().filter(|end| *end < MAX_POSITION);
        let Some(end) = end.filter(|_| binding.len > 0 && !binding.key_ids.is_empty()) else {
            return Err(Error::PeerMessage(
                "a binding is empty or out of range".into(),
            ));
        };
        if binding.start < high_mark {
            return Err(Error::ActivationRejected {
                peer: peer.to_string(),
                high_mark: high_mark.max(state.position),
                reason: format!("position {} is already bound", binding.start),
            });
        }
        let slaves =
            serde_json::to_string(&binding.slaves).map_err(|e| Error::Storage(e.to_string()))?;
        if let Some(leg) = &binding.relay {
            let span = u32::try_from(end - binding.start)
                .map_err(|_| Error::PeerMessage("a relay leg is too long".into()))?;
            let material = read_stream(tx, sealer, peer, binding.start, span, block_bytes, cache)?;
            let keys = match &leg.sealed {
                Some(sealed) => open(binding, &leg.relay_id, &leg.onward, sealed, &material)?,
                None => material
                    .chunks_exact(binding.len as usize)
                    .map(<[u8]>::to_vec)
                    .collect(),
            };
            if !local.is_empty() {
                let pending =
                    serde_json::to_string(local).map_err(|e| Error::Storage(e.to_string()))?;
                let held = HeldKeys {
                    relay_id: &leg.relay_id,
                    master: &binding.master,
                    slaves_json: &slaves,
                    pending_json: &pending,
                };
                held.insert(tx, sealer, binding.key_ids.iter().zip(&keys), now)?;
            }
            arrivals.push(Arrival {
                relay_id: leg.relay_id,
                held_here: !local.is_empty(),
                onward: leg.onward.clone(),
                forward: (!leg.onward.is_empty()).then(|| Forward {
                    master: binding.master.clone(),
                    slaves: binding.slaves.clone(),
                    key_ids: binding.key_ids.clone(),
                    len: binding.len,
                    keys,
                }),
            });
        } else {
            let mut start = binding.start;
            for key_id in &binding.key_ids {
                let material =
                    read_stream(tx, sealer, peer, start, binding.len, block_bytes, cache)?;
                insert_key(tx, sealer, key_id, &binding.master, &slaves, &material, now)?;
                start += u64::from(binding.len);
            }
        }
        high_mark = end;
    }
    advance_position(tx, peer, &peer_stream, high_mark, block_bytes)?;
    tx.prepare_cached(
        "INSERT INTO peer_sequence(peer, last_seq, last_digest) VALUES (?1, ?2, ?3)
         ON CONFLICT(peer) DO UPDATE SET last_seq = excluded.last_seq, last_digest = excluded.last_digest",
    )?
    .execute(params![peer.as_str(), to_i64(seq), digest.as_slice()])?;
    Ok(Some(arrivals))
}

/// The last block read of one peer stream (number and bytes).
pub(super) type BlockCache = Option<(u64, Zeroizing<Vec<u8>>)>;

/// Reads `len` bytes at `start` of `owner`'s stream on the link to `owner`.
fn read_stream(
    tx: &Connection,
    sealer: &Sealer,
    owner: &KmeId,
    start: u64,
    len: u32,
    block_bytes: usize,
    cache: &mut BlockCache,
) -> Result<Vec<u8>> {
    let block = (block_bytes as u64).max(1);
    let end = start.saturating_add(u64::from(len));
    let mut out = Vec::with_capacity(len as usize);
    let mut pos = start;
    while pos < end {
        let seq = pos / block;
        if cache.as_ref().map(|(cached, _)| *cached) != Some(seq) {
            let data: Option<Vec<u8>> = tx
                .prepare_cached(
                    // Not `confirmed`: the owner binding positions proves it holds the block.
                    "SELECT data FROM link_blocks WHERE peer = ?1 AND owner = ?1 AND seq = ?2",
                )?
                .query_row(params![owner.as_str(), to_i64(seq)], |r| r.get(0))
                .optional()?;
            let data = data.ok_or_else(|| Error::ActivationRejected {
                peer: owner.to_string(),
                high_mark: 0,
                reason: format!("block {seq} is not held here"),
            })?;
            let aad = block_aad(owner.as_str(), owner.as_str(), seq);
            *cache = Some((seq, sealer.open(Purpose::LinkBlock, &aad, &data)?.into()));
        }
        let data = cache
            .as_ref()
            .map(|(_, d)| d.as_slice())
            .unwrap_or_default();
        let block_end = (seq + 1).saturating_mul(block);
        let range = usize::try_from(pos - seq * block)
            .ok()
            .zip(usize::try_from(end.min(block_end) - seq * block).ok());
        let slice = range
            .and_then(|(from, to)| data.get(from..to))
            .ok_or_else(|| {
                Error::Storage(format!(
                    "block {seq} of {owner} is shorter than {block_bytes} bytes"
                ))
            })?;
        out.extend_from_slice(slice);
        pos = block_end;
    }
    Ok(out)
}

/// Restarts `owner`'s stream at block `seq` (forward only): the next block stored is `seq`, the
/// position moves to its start, and the blocks below it are deleted, never used.
pub(super) fn restart_stream(
    tx: &Connection,
    peer: &KmeId,
    owner: &Owner,
    seq: u64,
    block_bytes: usize,
) -> Result<()> {
    if seq >= MAX_POSITION {
        return Err(Error::PeerMessage(format!(
            "block {seq} of {owner} is out of range"
        )));
    }
    raise_next_seq(tx, peer, owner, seq)?;
    advance_position(
        tx,
        peer,
        owner,
        seq.saturating_mul(block_bytes as u64),
        block_bytes,
    )
}

/// The next block of `owner`'s stream is at least `next`.
fn raise_next_seq(tx: &Connection, peer: &KmeId, owner: &Owner, next: u64) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO link_streams(peer, owner, next_seq) VALUES (?1, ?2, ?3)
         ON CONFLICT(peer, owner) DO UPDATE SET next_seq = max(next_seq, excluded.next_seq)",
    )?
    .execute(params![peer.as_str(), owner.as_str(), to_i64(next)])?;
    Ok(())
}

/// Moves the stream position forward (never back) and deletes blocks wholly below it.
pub(super) fn advance_position(
    tx: &Connection,
    peer: &KmeId,
    owner: &Owner,
    position: u64,
    block_bytes: usize,
) -> Result<()> {
    let block = (block_bytes as u64).max(1);
    let before = crate::storage::db::stream_state(tx, peer, owner)?.position;
    if position <= before {
        return Ok(());
    }
    tx.prepare_cached(
        "INSERT INTO link_streams(peer, owner, position) VALUES (?1, ?2, ?3)
         ON CONFLICT(peer, owner) DO UPDATE SET position = max(position, excluded.position)",
    )?
    .execute(params![peer.as_str(), owner.as_str(), to_i64(position)])?;
    // Only when a block boundary was crossed is there anything to delete.
    if position / block > before / block {
        tx.prepare_cached("DELETE FROM link_blocks WHERE peer = ?1 AND owner = ?2 AND seq < ?3")?
            .execute(params![
                peer.as_str(),
                owner.as_str(),
                to_i64(position / block)
            ])?;
    }
    Ok(())
}

/// `slaves_json`: the JSON array of slave SAE IDs (made once per binding, not per key).
pub(super) fn insert_key(
    tx: &Connection,
    sealer: &Sealer,
    id: &Uuid,
    master: &SaeId,
    slaves_json: &str,
    material: &[u8],
    now: i64,
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO keys(key_id, master, slaves, pending, material, created_ms)
         VALUES (?1, ?2, ?3, ?3, ?4, ?5)",
    )?
    .execute(params![
        id.as_bytes().as_slice(),
        master.as_str(),
        slaves_json,
        sealer.seal(
            Purpose::Key,
            &key_aad(id, master.as_str(), slaves_json),
            material
        )?,
        now
    ])
    .map_err(already_bound(id))?;
    Ok(())
}

/// A key_ID that is already in the table is a peer's mistake (or a replay), not a storage
/// failure.
pub(super) fn already_bound(id: &Uuid) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
    move |err| match err {
        rusqlite::Error::SqliteFailure(e, _)
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Error::PeerMessage(format!("key_ID {id} is already bound"))
        }
        other => other.into(),
    }
}

/// Associated data of a sealed key: its ID, master and slaves, so that rewriting those columns
/// in the file makes the key fail to open rather than go to another SAE.
pub(super) fn key_aad(id: &Uuid, master: &str, slaves_json: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(16 + master.len() + slaves_json.len() + 2);
    aad.extend_from_slice(id.as_bytes());
    aad.extend_from_slice(master.as_bytes());
    aad.push(0);
    aad.extend_from_slice(slaves_json.as_bytes());
    aad
}

/// Consume-once retrieval by a slave. Nothing changes unless every key can be returned.
pub(super) fn retrieve(
    tx: &Connection,
    sealer: &Sealer,
    caller: &SaeId,
    master: &SaeId,
    key_ids: &[Uuid],
) -> Result<Vec<Key>> {
    struct Row {
        master: String,
        slaves: Vec<String>,
        slaves_json: String,
        pending: Vec<String>,
        material: Vec<u8>,
    }
    let mut rows = Vec::with_capacity(key_ids.len());
    let mut not_named = false;
    let mut missing = false;
    {
        let mut stmt = tx.prepare_cached(
            "SELECT master, slaves, pending, material FROM keys WHERE key_id = ?1",
        )?;
        for id in key_ids {
            let row = stmt
                .query_row(params![id.as_bytes().as_slice()], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                    ))
                })
                .optional()?;
            let Some((row_master, slaves, pending, material)) = row else {
                missing = true;
                continue;
            };
            let row = Row {
                master: row_master,
                slaves: parse_ids(&slaves)?,
                slaves_json: slaves,
                pending: parse_ids(&pending)?,
                material,
            };
            if !row.slaves.iter().any(|s| s == caller.as_str()) {
                not_named = true;
            } else if row.master != master.as_str()
                || !row.pending.iter().any(|s| s == caller.as_str())
            {
                missing = true;
            }
            rows.push((id, row));
        }
    }
    if not_named {
        return Err(Error::NotAuthorized(
            "the caller is not a slave SAE of one or more of the requested keys".into(),
        ));
    }
    if missing {
        return Err(Error::KeysNotFound);
    }
    let mut keys = Vec::with_capacity(rows.len());
    let mut seen = HashSet::with_capacity(rows.len());
    for (id, row) in rows {
        if !seen.insert(*id) {
            return Err(Error::BadRequest("a key_ID is listed twice".into()));
        }
        let pending: Vec<&String> = row
            .pending
            .iter()
            .filter(|s| s.as_str() != caller.as_str())
            .collect();
        if pending.is_empty() {
            tx.prepare_cached("DELETE FROM keys WHERE key_id = ?1")?
                .execute(params![id.as_bytes().as_slice()])?;
        } else {
            let pending =
                serde_json::to_string(&pending).map_err(|e| Error::Storage(e.to_string()))?;
            tx.prepare_cached("UPDATE keys SET pending = ?2 WHERE key_id = ?1")?
                .execute(params![id.as_bytes().as_slice(), pending])?;
        }
        keys.push(Key {
            id: *id,
            material: sealer.open(
                Purpose::Key,
                &key_aad(id, &row.master, &row.slaves_json),
                &row.material,
            )?,
        });
    }
    Ok(keys)
}

fn parse_ids(json: &str) -> Result<Vec<String>> {
    serde_json::from_str(json).map_err(|e| Error::Storage(format!("corrupt SAE list: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::ops::{
        pending, Activate, AppendAudit, DiscardBlocks, ExpireKeys, KeyFileUsed, Operation,
        RealignStreams, Retrieve, StoreBlocks, UsedKeyFile,
    };
    use crate::storage::{audit_trail, db};
    use std::time::Duration;
    use tokio::sync::oneshot;

    /// Adds `op` to `batch`; the receiver gives its outcome once the batch is written.
    fn queue<O: Operation>(
        batch: &mut Vec<Box<dyn Queued>>,
        op: O,
    ) -> oneshot::Receiver<Result<O::Output>> {
        let (queued, rx) = pending(op);
        batch.push(queued);
        rx
    }

    fn conn() -> (
        tempfile::TempDir,
        r2d2::PooledConnection<r2d2_sqlite::SqliteConnectionManager>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (writer, _) = db::open(&dir.path().join("t.sqlite"), 1).unwrap();
        let conn = writer.get().unwrap();
        (dir, conn)
    }

    fn sealer() -> Sealer {
        Sealer::from_master(&[9u8; 32]).unwrap()
    }

    fn audit_key() -> [u8; 32] {
        *sealer().audit_key().unwrap()
    }

    /// The audit chain of `conn` checked with the test master key (its keyed start sealed
    /// first, as a KME does at start).
    fn verify(conn: &Connection) -> Result<u64> {
        audit_trail::seal_keyed(conn, &audit_key())?;
        audit_trail::verify_chain(conn, &audit_key())
    }

    fn kme(id: &str) -> KmeId {
        KmeId::new(id)
    }

    /// Stores confirmed blocks, as the receiving end does.
    fn store(
        conn: &Connection,
        peer: &KmeId,
        blocks: Vec<BlockRecord>,
    ) -> Result<Vec<BlockOutcome>> {
        store_blocks(conn, &sealer(), peer, blocks, true)
    }

    fn block(owner: &str, seq: u64) -> BlockRecord {
        BlockRecord {
            owner: Owner::parse(owner),
            seq,
            data: (0..16)
                .map(|i| (seq * 16 + i) as u8)
                .collect::<Vec<u8>>()
                .into(),
        }
    }

    fn binding(start: u64, slaves: &[&str]) -> Binding {
        Binding {
            master: SaeId::new("sae-a"),
            slaves: slaves.iter().map(|s| SaeId::new(s)).collect(),
            start,
            len: 8,
            key_ids: vec![Uuid::now_v7()],
            relay: None,
        }
    }

    /// Activation of a batch from kme-a (blocks of 16 bytes), with a cold block cache.
    fn bind(conn: &Connection, seq: u64, digest: &[u8; 32], bindings: &[Binding]) -> Result<bool> {
        let local: Vec<Vec<SaeId>> = bindings.iter().map(|b| b.slaves.clone()).collect();
        activate(
            conn,
            &sealer(),
            &kme("kme-a"),
            seq,
            digest,
            16,
            bindings,
            &local,
            &mut None,
        )
        .map(|fresh| fresh.is_some())
    }

    /// One block of kme-a's stream and one key bound on it for `slaves`.
    fn bound_key(conn: &Connection, slaves: &[&str]) -> Binding {
        let peer = kme("kme-a");
        store(conn, &peer, vec![block("kme-a", 0)]).unwrap();
        let key = binding(0, slaves);
        bind(conn, 1, &[0u8; 32], std::slice::from_ref(&key)).unwrap();
        key
    }

    /// Blocks numbered differently at the two ends are refused as out of step (key streams:
    /// the ends realign) or as a bad message (the authentication stream).
    #[test]
    fn blocks_are_idempotent_and_replays_of_consumed_ones_fail() {
        let (_dir, conn) = conn();
        let peer = kme("kme-a");
        let stored = store(&conn, &peer, vec![block("kme-a", 0), block("kme-a", 1)]).unwrap();
        assert_eq!(stored, vec![BlockOutcome::Stored, BlockOutcome::Stored]);
        let again = store(&conn, &peer, vec![block("kme-a", 1)]).unwrap();
        assert_eq!(again, vec![BlockOutcome::Duplicate]);
        let mut altered = block("kme-a", 1);
        altered.data[0] ^= 1;
        assert!(matches!(
            store(&conn, &peer, vec![altered]),
            Err(Error::BlocksOutOfStep { .. })
        ));
        // Block 0 is consumed (deleted): shipping it again changes nothing, it is not stored.
        advance_position(&conn, &peer, &Owner::Kme(peer.clone()), 16, 16).unwrap();
        let replay = store(&conn, &peer, vec![block("kme-a", 0)]).unwrap();
        assert_eq!(replay, vec![BlockOutcome::Duplicate]);
        let held: i64 = conn
            .query_row("SELECT count(*) FROM link_blocks WHERE seq = 0", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(held, 0);
        // Numbers must follow each other: a gap is refused.
        assert!(matches!(
            store(&conn, &peer, vec![block("kme-a", 5)]),
            Err(Error::BlocksOutOfStep { .. })
        ));
        assert!(matches!(
            store(&conn, &peer, vec![block("#auth", 5)]),
            Err(Error::PeerMessage(_))
        ));
    }

    #[test]
    fn activation_binds_once_retries_are_idempotent_and_replays_fail() {
        let (_dir, conn) = conn();
        let peer = kme("kme-a");
        store(&conn, &peer, vec![block("kme-a", 0), block("kme-a", 1)]).unwrap();
        let first = vec![binding(0, &["sae-b"]), binding(12, &["sae-b"])];
        let digest = [1u8; 32];
        assert!(bind(&conn, 10, &digest, &first).unwrap());
        // The identical batch again (a retry after a lost answer): accepted, nothing bound twice.
        assert!(!bind(&conn, 10, &digest, &first).unwrap());
        let count: i64 = conn
            .query_row("SELECT count(*) FROM keys", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 2);
        // An older or equal sequence number with other content: a replay.
        let other = vec![binding(20, &["sae-b"])];
        assert!(matches!(
            bind(&conn, 10, &[2u8; 32], &other),
            Err(Error::SequenceBehind { last_seq: 10, .. })
        ));
        assert!(matches!(
            bind(&conn, 9, &[2u8; 32], &other),
            Err(Error::SequenceBehind { last_seq: 10, .. })
        ));
        // A newer batch reusing bound positions is refused with the high mark.
        let reuse = vec![binding(16, &["sae-b"])];
        match bind(&conn, 11, &[3u8; 32], &reuse) {
            Err(Error::ActivationRejected { high_mark, .. }) => assert_eq!(high_mark, 20),
            other => panic!("expected a rejection, got {other:?}"),
        }
        // Positions a peer cannot have: refused, no arithmetic overflow.
        let mut huge = binding(u64::MAX, &["sae-b"]);
        assert!(matches!(
            bind(&conn, 12, &[4u8; 32], std::slice::from_ref(&huge)),
            Err(Error::PeerMessage(_))
        ));
        huge.start = 1 << 62;
        assert!(matches!(
            bind(&conn, 12, &[4u8; 32], &[huge]),
            Err(Error::PeerMessage(_))
        ));
        // Material spans blocks 0 and 1 for the key at 12..20.
        let material = retrieve(
            &conn,
            &sealer(),
            &SaeId::new("sae-b"),
            &SaeId::new("sae-a"),
            &[first[1].key_ids[0]],
        )
        .unwrap();
        let mut expected = block("kme-a", 0).data[12..].to_vec();
        expected.extend_from_slice(&block("kme-a", 1).data[..4]);
        assert_eq!(material[0].material, expected);
        // Block 0 is wholly bound, so it is gone from the store.
        let blocks: i64 = conn
            .query_row("SELECT count(*) FROM link_blocks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(blocks, 1);
    }

    #[test]
    fn retrieval_is_consume_once_per_named_slave() {
        let (_dir, conn) = conn();
        let key = bound_key(&conn, &["sae-b", "sae-b2"]);
        let (a, b, b2, x) = (
            SaeId::new("sae-a"),
            SaeId::new("sae-b"),
            SaeId::new("sae-b2"),
            SaeId::new("sae-x"),
        );
        assert!(matches!(
            retrieve(&conn, &sealer(), &x, &a, &[key.key_ids[0]]),
            Err(Error::NotAuthorized(_))
        ));
        assert!(matches!(
            retrieve(&conn, &sealer(), &b, &x, &[key.key_ids[0]]),
            Err(Error::KeysNotFound)
        ));
        assert!(matches!(
            retrieve(&conn, &sealer(), &b, &a, &[key.key_ids[0], Uuid::now_v7()]),
            Err(Error::KeysNotFound)
        ));
        let first = retrieve(&conn, &sealer(), &b, &a, &[key.key_ids[0]]).unwrap();
        assert!(matches!(
            retrieve(&conn, &sealer(), &b, &a, &[key.key_ids[0]]),
            Err(Error::KeysNotFound)
        ));
        let second = retrieve(&conn, &sealer(), &b2, &a, &[key.key_ids[0]]).unwrap();
        assert_eq!(first, second);
        let left: i64 = conn
            .query_row("SELECT count(*) FROM keys", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0, "the key is deleted once every slave has it");
    }

    /// Realigning the key streams at 5 (kme-a's) and 3 (kme-b's): the refused shipment
    /// (unconfirmed) and every key block below the numbers are gone, the streams go on from
    /// them with their positions there, and the authentication stream is untouched.
    #[test]
    fn realigning_discards_every_key_block_below_the_new_numbers_and_no_authentication_block() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, _) = db::open(&dir.path().join("t.sqlite"), 1).unwrap();
        let mut writer = DbWriter::new(pool.clone(), Arc::new(sealer()));
        let peer = kme("kme-b");
        let store = |blocks, confirmed| StoreBlocks {
            peer: peer.clone(),
            blocks,
            confirmed,
            key_file: None,
        };
        let mut batch = Vec::new();
        let stored = [
            queue(
                &mut batch,
                store(
                    vec![block("kme-a", 0), block("kme-b", 0), block("#auth", 0)],
                    true,
                ),
            ),
            queue(
                &mut batch,
                store(vec![block("kme-a", 1), block("kme-b", 1)], false),
            ),
        ];
        let mut realigned = queue(
            &mut batch,
            RealignStreams {
                peer: peer.clone(),
                next: vec![(Owner::parse("kme-a"), 5), (Owner::parse("kme-b"), 3)],
                block_bytes: 16,
                audit: AuditRecord::new("link_realigned", serde_json::json!({})),
            },
        );
        let mut auth = queue(
            &mut batch,
            RealignStreams {
                peer: peer.clone(),
                next: vec![(Owner::Auth, 9)],
                block_bytes: 16,
                audit: AuditRecord::new("link_realigned", serde_json::json!({})),
            },
        );
        writer.write(batch).unwrap();
        for mut outcome in stored {
            assert!(outcome.try_recv().unwrap().is_ok());
        }
        assert_eq!(realigned.try_recv().unwrap(), Ok(()));
        assert!(matches!(
            auth.try_recv().unwrap(),
            Err(Error::PeerMessage(_))
        ));
        let conn = pool.get().unwrap();
        for (owner, next) in [("kme-a", 5), ("kme-b", 3), ("#auth", 1)] {
            let state = db::stream_state(&conn, &peer, &Owner::parse(owner)).unwrap();
            assert_eq!(state.next_seq, next, "{owner}");
            if owner != "#auth" {
                assert_eq!(state.position, next * 16, "{owner}");
            }
        }
        let left: Vec<String> = conn
            .prepare("SELECT owner FROM link_blocks")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<std::result::Result<_, _>>()
            .unwrap();
        assert_eq!(left, vec!["#auth"]);
        let next = store_blocks(&conn, &sealer(), &peer, vec![block("kme-a", 5)], true).unwrap();
        assert_eq!(next, vec![BlockOutcome::Stored]);
    }

    #[test]
    fn discarding_a_lost_frame_rewinds_only_unconfirmed_blocks_and_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, _) = db::open(&dir.path().join("t.sqlite"), 1).unwrap();
        let mut writer = DbWriter::new(pool.clone(), Arc::new(sealer()));
        let peer = kme("kme-b");
        let file = |name: &str| {
            Some(UsedKeyFile {
                name: name.into(),
                sha256: [name.len() as u8; 32],
            })
        };
        let store = |blocks, confirmed, key_file| StoreBlocks {
            peer: peer.clone(),
            blocks,
            confirmed,
            key_file,
        };
        let used = |name: &str| KeyFileUsed {
            peer: peer.clone(),
            sha256: [name.len() as u8; 32],
        };
        let mut batch = Vec::new();
        let stored = [
            queue(
                &mut batch,
                store(vec![block("kme-a", 0), block("kme-a", 1)], true, file("f1")),
            ),
            queue(
                &mut batch,
                store(
                    vec![block("kme-a", 2), block("#auth", 0)],
                    false,
                    file("f22"),
                ),
            ),
        ];
        let mut discarded = queue(
            &mut batch,
            DiscardBlocks {
                peer: peer.clone(),
                audit: AuditRecord::new("bb84_frame_lost", serde_json::json!({})),
            },
        );
        let mut f1_used = queue(&mut batch, used("f1"));
        let mut f22_used = queue(&mut batch, used("f22"));
        // The contents of a used file never give blocks again, under any name.
        let mut reused = queue(&mut batch, store(vec![block("kme-a", 2)], true, file("g1")));
        writer.write(batch).unwrap();
        for mut outcome in stored {
            assert!(outcome.try_recv().unwrap().is_ok());
        }
        assert_eq!(discarded.try_recv().unwrap(), Ok(()));
        assert_eq!(f1_used.try_recv().unwrap(), Ok(true));
        assert_eq!(
            f22_used.try_recv().unwrap(),
            Ok(false),
            "discarded with its blocks"
        );
        assert!(matches!(
            reused.try_recv().unwrap(),
            Err(Error::PeerMessage(_))
        ));
        let conn = pool.get().unwrap();
        assert_eq!(
            db::stream_state(&conn, &peer, &Owner::parse("kme-a"))
                .unwrap()
                .next_seq,
            2
        );
        assert_eq!(
            db::stream_state(&conn, &peer, &Owner::Auth)
                .unwrap()
                .next_seq,
            0
        );
        let left: Vec<i64> = conn
            .prepare("SELECT seq FROM link_blocks ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<std::result::Result<_, _>>()
            .unwrap();
        assert_eq!(left, vec![0, 1]);
        // The rewound numbers can be stored again, with other bytes.
        let mut other = block("kme-a", 2);
        other.data[0] ^= 0xff;
        let again = store_blocks(&conn, &sealer(), &peer, vec![other], false).unwrap();
        assert_eq!(again, vec![BlockOutcome::Stored]);
    }

    /// Runs `op` alone in one batch and returns its outcome.
    fn run<O: Operation>(writer: &mut DbWriter, op: O) -> Result<O::Output> {
        let mut batch = Vec::new();
        let mut rx = queue(&mut batch, op);
        writer.write(batch).unwrap();
        rx.try_recv().unwrap()
    }

    #[test]
    fn relay_keys_are_held_then_released_once_and_an_abort_burns_them_even_after() {
        use crate::storage::held::{HoldKeys, SettleRelays, Settlement};
        let dir = tempfile::tempdir().unwrap();
        let (pool, _) = db::open(&dir.path().join("t.sqlite"), 1).unwrap();
        let mut writer = DbWriter::new(pool.clone(), Arc::new(sealer()));
        let relay = Uuid::new_v4();
        let key = Key {
            id: Uuid::now_v7(),
            material: vec![7; 32],
        };
        let hold = |relay_id| HoldKeys {
            relay_id,
            master: SaeId::new("sae-a"),
            slaves: vec![SaeId::new("sae-c")],
            local_slaves: vec![SaeId::new("sae-c")],
            keys: vec![key.clone()],
        };
        let settle = |settlement| SettleRelays {
            relays: vec![relay],
            settlement,
            reason: "test".into(),
        };
        let count = |table: &str| -> i64 {
            let conn = pool.get().unwrap();
            conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        };
        run(&mut writer, hold(relay)).unwrap();
        assert_eq!(
            (count("held_keys"), count("keys")),
            (1, 0),
            "held, not retrievable"
        );
        // The same relay again (a replayed leg) is refused.
        assert!(run(&mut writer, hold(relay)).is_err());
        let released = run(&mut writer, settle(Settlement::Release)).unwrap();
        assert_eq!(released, vec![Ok(())]);
        assert_eq!((count("held_keys"), count("keys")), (0, 1), "released");
        // A retried release changes nothing; an abort after it burns the released key.
        assert_eq!(
            run(&mut writer, settle(Settlement::Release)).unwrap(),
            vec![Ok(())]
        );
        assert_eq!(count("keys"), 1);
        assert_eq!(
            run(&mut writer, settle(Settlement::Abort)).unwrap(),
            vec![Ok(())]
        );
        assert_eq!((count("held_keys"), count("keys")), (0, 0), "burned");
        // And a release after the burn is refused; so is one of a relay never held here.
        let refused = run(&mut writer, settle(Settlement::Release)).unwrap();
        assert!(matches!(refused.as_slice(), [Err(Error::PeerMessage(_))]));
        let unknown = SettleRelays {
            relays: vec![Uuid::new_v4()],
            settlement: Settlement::Release,
            reason: "test".into(),
        };
        assert!(run(&mut writer, unknown).unwrap()[0].is_err());
    }

    #[test]
    fn a_refused_operation_leaves_the_rest_of_its_batch_intact() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, _) = db::open(&dir.path().join("t.sqlite"), 1).unwrap();
        let mut writer = DbWriter::new(pool.clone(), Arc::new(sealer()));
        let peer = kme("kme-a");
        let good = binding(0, &["sae-b"]);
        let mut batch = Vec::new();
        let mut stored = queue(
            &mut batch,
            StoreBlocks {
                peer: peer.clone(),
                blocks: vec![block("kme-a", 0)],
                confirmed: true,
                key_file: None,
            },
        );
        let mut bound = queue(
            &mut batch,
            Activate {
                peer: peer.clone(),
                seq: 5,
                digest: [1; 32],
                block_bytes: 16,
                bindings: vec![good.clone()],
                local_slaves: vec![good.slaves.clone()],
            },
        );
        // Refused: the same positions again under a newer number.
        let mut refused = queue(
            &mut batch,
            Activate {
                peer: peer.clone(),
                seq: 6,
                digest: [2; 32],
                block_bytes: 16,
                bindings: vec![binding(0, &["sae-b"])],
                local_slaves: vec![vec![SaeId::new("sae-b")]],
            },
        );
        let mut audited = queue(
            &mut batch,
            AppendAudit(AuditRecord::new("test", serde_json::json!({}))),
        );
        writer.write(batch).unwrap();
        assert_eq!(stored.try_recv().unwrap(), Ok(vec![BlockOutcome::Stored]));
        assert_eq!(bound.try_recv().unwrap(), Ok(Vec::new()));
        assert_eq!(audited.try_recv().unwrap(), Ok(()));
        assert!(matches!(
            refused.try_recv().unwrap(),
            Err(Error::ActivationRejected { .. })
        ));
        let conn = pool.get().unwrap();
        let keys: i64 = conn
            .query_row("SELECT count(*) FROM keys", [], |r| r.get(0))
            .unwrap();
        assert_eq!(keys, 1);
        let last: i64 = conn
            .query_row("SELECT last_seq FROM peer_sequence", [], |r| r.get(0))
            .unwrap();
        assert_eq!(last, 5, "the refused batch left no trace");
        assert_eq!(
            verify(&conn).unwrap(),
            2,
            "audit chain intact across the rollback"
        );
    }

    #[test]
    fn keys_not_retrieved_in_time_expire_with_an_audit_record() {
        let (_dir, mut conn) = conn();
        bound_key(&conn, &["sae-b"]);
        let tx = conn.transaction().unwrap();
        let mut head = audit_head(&tx).unwrap();
        // Expires keys created before `before`; returns the keys left.
        let mut expire = |before| expire_before(&tx, &mut head, before);
        assert_eq!(expire(now_ms() - 60_000), 1, "a fresh key stays");
        assert_eq!(expire(now_ms() + 1), 0);
        let events: i64 = tx
            .query_row(
                "SELECT count(*) FROM audit WHERE event = 'keys_expired'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(events, 1);
    }

    /// Expires, in `tx`, the keys bound before `before`; returns how many keys are left.
    fn expire_before(tx: &Connection, head: &mut (i64, Vec<u8>), before: i64) -> i64 {
        let sealer = sealer();
        let mut cache = HashMap::new();
        let mut events = Vec::new();
        let mut txn = Txn {
            tx,
            sealer: &sealer,
            head,
            block_cache: &mut cache,
            events: &mut events,
            audit_key: &audit_key(),
        };
        ExpireKeys {
            created_before_ms: before,
        }
        .apply(&mut txn)
        .unwrap();
        tx.query_row("SELECT count(*) FROM keys", [], |r| r.get(0))
            .unwrap()
    }

    /// An operation that is past its deadline when its transaction would commit (here: slow
    /// work applied after it in the same batch) is rolled back, and says why: the SAE has had
    /// its 503, so the key stays retrievable.
    #[test]
    fn dec_keys_whose_deadline_passes_before_commit_consumes_nothing() {
        struct SlowUntil(Instant);
        impl Operation for SlowUntil {
            type Output = ();
            fn apply(self, _txn: &mut Txn<'_>) -> Result<()> {
                std::thread::sleep(Duration::from_millis(150));
                Ok(())
            }
            fn deadline(&self) -> Option<Instant> {
                Some(self.0)
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let (pool, _) = db::open(&dir.path().join("t.sqlite"), 1).unwrap();
        let key = bound_key(&pool.get().unwrap(), &["sae-b"]);
        let mut writer = DbWriter::new(pool.clone(), Arc::new(sealer()));
        let retrieve = |deadline| Retrieve {
            caller: SaeId::new("sae-b"),
            master: SaeId::new("sae-a"),
            key_ids: key.key_ids.clone(),
            deadline,
        };
        let mut batch = Vec::new();
        let start = Instant::now();
        let mut late = queue(&mut batch, retrieve(start + Duration::from_millis(100)));
        queue(&mut batch, SlowUntil(start + Duration::from_millis(50)));
        writer.write(batch).unwrap();
        assert!(
            matches!(late.try_recv().unwrap(), Err(Error::Unavailable(m)) if m.contains("ran out")),
            "the late dec_keys is refused"
        );
        let mut batch = Vec::new();
        let mut again = queue(
            &mut batch,
            retrieve(Instant::now() + Duration::from_secs(5)),
        );
        writer.write(batch).unwrap();
        assert_eq!(
            again.try_recv().unwrap().unwrap().len(),
            1,
            "the key was not consumed by the late request"
        );
        let conn = pool.get().unwrap();
        assert_eq!(
            verify(&conn).unwrap(),
            conn.query_row("SELECT count(*) FROM audit", [], |r| r.get::<_, i64>(0))
                .unwrap() as u64,
            "the rolled-back retrieval left no audit record and the chain holds"
        );
    }

    /// The master's KME wrote the time inside a UUIDv7 key_ID by its own clock: a neighbour
    /// running a day behind (or ahead) must not get its keys deleted early (or kept forever).
    #[test]
    fn keys_expire_by_the_local_time_of_binding_not_by_the_key_id_clock() {
        let (_dir, mut conn) = conn();
        let peer = kme("kme-a");
        store(&conn, &peer, vec![block("kme-a", 0)]).unwrap();
        let day_s = 86_400;
        let now_s = u64::try_from(now_ms() / 1000).unwrap();
        let minted_at = |secs| Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, secs, 0));
        let mut behind = binding(0, &["sae-b"]);
        behind.key_ids = vec![minted_at(now_s - day_s)];
        let mut ahead = binding(8, &["sae-b"]);
        ahead.key_ids = vec![minted_at(now_s + day_s)];
        bind(&conn, 1, &[0u8; 32], &[behind, ahead]).unwrap();
        let tx = conn.transaction().unwrap();
        let mut head = audit_head(&tx).unwrap();
        let mut expire = |before| expire_before(&tx, &mut head, before);
        assert_eq!(
            expire(now_ms() - 60_000),
            2,
            "bound a moment ago: neither key expires, whatever its key_ID says"
        );
        assert_eq!(
            expire(now_ms() + 1),
            0,
            "both expire by the time of binding"
        );
    }

    /// A batch that fills the database (its quota, as on a full disk) fails as a whole, with
    /// the reason: SQLite rolls the whole transaction back on SQLITE_FULL, and the batch must
    /// not then fail with "no such savepoint" instead. Nothing of it stands; the next batch
    /// goes on from the same audit head.
    #[test]
    fn a_full_database_fails_the_batch_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, _) = db::open_with_quota(&dir.path().join("t.sqlite"), 1, Some(1)).unwrap();
        let mut writer = DbWriter::new(pool.clone(), Arc::new(sealer()));
        let small = |i: u32| AppendAudit(AuditRecord::new("test", serde_json::json!({ "i": i })));
        let mut batch = Vec::new();
        let mut first = queue(&mut batch, small(0));
        writer.write(batch).unwrap();
        assert_eq!(first.try_recv().unwrap(), Ok(()));
        let mut batch = Vec::new();
        let mut before = queue(&mut batch, small(1));
        let huge = AppendAudit(AuditRecord::new("test", "x".repeat(2 << 20)));
        let mut filling = queue(&mut batch, huge);
        let mut after = queue(&mut batch, small(2));
        let reason = writer.write(batch).unwrap_err().to_string();
        assert!(reason.contains("database or disk is full"), "{reason}");
        for outcome in [&mut before, &mut filling, &mut after] {
            let told = outcome.try_recv().unwrap().unwrap_err().to_string();
            assert!(told.contains("database or disk is full"), "{told}");
        }
        let conn = pool.get().unwrap();
        assert_eq!(verify(&conn).unwrap(), 1, "nothing stands");
        drop(conn);
        let mut batch = Vec::new();
        let mut next = queue(&mut batch, small(3));
        writer.write(batch).unwrap();
        assert_eq!(next.try_recv().unwrap(), Ok(()));
        let conn = pool.get().unwrap();
        assert_eq!(verify(&conn).unwrap(), 2);
    }

    #[test]
    fn the_audit_chain_detects_tampering() {
        let (_dir, mut conn) = conn();
        let tx = conn.transaction().unwrap();
        let mut head = audit_head(&tx).unwrap();
        for i in 0..3 {
            append_audit(
                &tx,
                &audit_key(),
                &mut head,
                &AuditRecord::new("test", serde_json::json!({"i": i})),
            )
            .unwrap();
        }
        tx.commit().unwrap();
        assert_eq!(verify(&conn).unwrap(), 3);
        assert!(
            conn.execute("UPDATE audit SET detail = '{}' WHERE id = 2", [])
                .is_err(),
            "no update"
        );
        assert!(
            conn.execute("DELETE FROM audit WHERE id = 2", []).is_err(),
            "no delete"
        );
        assert_eq!(verify(&conn).unwrap(), 3);
        // Past the triggers (someone with the file): a middle record changed, or deleted,
        // breaks the chain.
        let copy = |conn: &Connection| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("copy.sqlite");
            conn.execute("VACUUM INTO ?1", [path.to_str().unwrap()])
                .unwrap();
            (dir, Connection::open(path).unwrap())
        };
        let (_d1, changed) = copy(&conn);
        changed
            .execute_batch(
                "DROP TRIGGER audit_no_update; UPDATE audit SET detail = '{\"i\":9}' WHERE id = 2;",
            )
            .unwrap();
        assert!(verify(&changed).is_err(), "changed record");
        let (_d2, cut) = copy(&conn);
        cut.execute_batch("DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE id = 2;")
            .unwrap();
        assert!(verify(&cut).is_err(), "deleted record");
        // Someone with the file but not the master key changes record 2 and recomputes the
        // chain from there (plain SHA-256, or an HMAC under a key of their own): detected.
        for forger_key in [None, Some([1u8; 32])] {
            let (_d, rewritten) = copy(&conn);
            rewritten
                .execute_batch("DROP TRIGGER audit_no_update;")
                .unwrap();
            let mut prev: Vec<u8> = rewritten
                .query_row("SELECT hash FROM audit WHERE id = 1", [], |r| r.get(0))
                .unwrap();
            for id in 2..=3i64 {
                let (at, event, detail): (i64, String, String) = rewritten
                    .query_row(
                        "SELECT at_ms, event, detail FROM audit WHERE id = ?1",
                        [id],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .unwrap();
                let detail = if id == 2 { "{\"i\":9}".into() } else { detail };
                let hash = chain_hash(forger_key.as_ref(), &prev, id, at, &event, &detail).unwrap();
                rewritten
                    .execute(
                        "UPDATE audit SET detail = ?1, prev_hash = ?2, hash = ?3 WHERE id = ?4",
                        params![detail, prev, hash.as_slice(), id],
                    )
                    .unwrap();
                prev = hash.to_vec();
            }
            assert!(
                verify(&rewritten).is_err(),
                "recomputed with {forger_key:?}"
            );
            // Nor can the rewrite pass for records older than the keyed chain: where the
            // keyed chain starts is itself under the key.
            rewritten
                .execute("UPDATE audit_keyed SET since = 100", [])
                .unwrap();
            assert!(audit_trail::verify_chain(&rewritten, &audit_key()).is_err());
        }
    }
}
