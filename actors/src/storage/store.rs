//! Store: the front of the SQLite writer, with group commit.
//!
//! Owns: the queue of write operations waiting for the single writer, and whether a batch is
//! in flight. Handles: `Exec(Op)` from `KeyPool`, `Link`, `AuditLog` and the HTTP edge (peer
//! activations, dec_keys). While one batch is being committed by `DbWriter`, new operations
//! queue here; when it returns they all go in the next transaction, so the fsync of
//! `synchronous = FULL` is paid per batch, not per request. Every caller gets exactly its own
//! outcome back, only after the transaction holding it is durable.
//! Mailbox: bounded (capacity set in `started`); callers use `send` under their own timeout.

use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::storage::audit::AuditRecord;
use crate::storage::checkpointer::{Checkpoint, DbCheckpointer};
use crate::storage::writer::{DbWriter, WriteBatch};
use crate::types::{now_ms, Binding, Key, KmeId, SaeId};

/// Most operations committed in one transaction; bounds the latency of a batch.
const MAX_BATCH: usize = 512;
/// Most operations waiting for the writer; beyond it new ones are refused at once (503)
/// instead of queueing without bound behind a slow disk.
const MAX_QUEUE: usize = 16 * 1024;
const MAILBOX_CAPACITY: usize = 4096;
/// How often the WAL is checkpointed off the writer's path.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(1000);

/// One block of link material to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRecord {
    pub owner: KmeId,
    pub seq: u64,
    pub data: Vec<u8>,
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

/// A write operation; each runs atomically (its own savepoint) inside a batch transaction.
#[derive(Debug, Clone)]
pub enum Op {
    /// Store link blocks (idempotent per owner and number; a replay of a consumed number fails).
    /// `key_file`: the file-drop key file they come from, recorded as used in the same
    /// transaction (refused if a file with its contents was used before).
    StoreBlocks {
        peer: KmeId,
        blocks: Vec<BlockRecord>,
        confirmed: bool,
        key_file: Option<UsedKeyFile>,
    },
    /// file-drop: did a key file with these contents give blocks for good on this link?
    KeyFileUsed { peer: KmeId, sha256: [u8; 32] },
    /// The other end holds these blocks (owner, number) durably: they may be used now.
    ConfirmBlocks {
        peer: KmeId,
        blocks: Vec<(KmeId, u64)>,
    },
    /// BB84, Alice end: the Bob end lost the frame these unconfirmed blocks came from. Delete
    /// every unconfirmed block of the link and rewind each stream to its first deleted number
    /// (nobody allocated from them, and the Bob end never stored them).
    DiscardBlocks { peer: KmeId, audit: AuditRecord },
    /// At the slave's KME: bind positions of the peer's stream to key_IDs (one peer batch).
    Activate {
        peer: KmeId,
        seq: u64,
        digest: [u8; 32],
        block_bytes: usize,
        bindings: Vec<Binding>,
    },
    /// At the master's KME: keys up to `position` of our stream were delivered (or burned).
    CommitDelivery {
        peer: KmeId,
        owner: KmeId,
        position: u64,
        block_bytes: usize,
        audit: AuditRecord,
    },
    /// Keys for SAE pairs on this KME only.
    InsertLocalKeys {
        keys: Vec<LocalKey>,
        audit: AuditRecord,
    },
    /// dec_keys: consume-once retrieval by a named slave. Not applied after `deadline`: by
    /// then the SAE has had its 503, and a key it never received must stay retrievable.
    Retrieve {
        caller: SaeId,
        master: SaeId,
        key_ids: Vec<Uuid>,
        deadline: Instant,
    },
    /// Delete keys bound before `created_before_ms` that some slave never retrieved.
    ExpireKeys { created_before_ms: i64 },
    /// An audit event on its own.
    Audit(AuditRecord),
}

/// A key file of a file-drop link, as recorded once it gives blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsedKeyFile {
    pub name: String,
    pub sha256: [u8; 32],
}

/// Outcome of one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Done,
    Flag(bool),
    Blocks(Vec<BlockOutcome>),
    Keys(Vec<Key>),
}

/// Run one operation durably. Result: its outcome, after the commit that holds it.
#[derive(Message)]
#[rtype(result = "Result<Output>")]
pub struct Exec(pub Op);

impl From<Op> for Exec {
    fn from(op: Op) -> Self {
        Exec(op)
    }
}

type Waiter = oneshot::Sender<Result<Output>>;

pub struct Store {
    writer: Addr<DbWriter>,
    checkpointer: Option<Addr<DbCheckpointer>>,
    checkpointing: bool,
    queue: Vec<(Op, Waiter)>,
    in_flight: bool,
    key_ttl: Duration,
}

impl Store {
    /// `key_ttl`: how long a bound key waits for its slaves before it is deleted.
    pub fn new(writer: Addr<DbWriter>, key_ttl: Duration) -> Self {
        Self {
            writer,
            checkpointer: None,
            checkpointing: false,
            queue: Vec::new(),
            in_flight: false,
            key_ttl,
        }
    }

    /// Checkpoints the WAL every `CHECKPOINT_EVERY` through `checkpointer`.
    pub fn with_checkpointer(mut self, checkpointer: Addr<DbCheckpointer>) -> Self {
        self.checkpointer = Some(checkpointer);
        self
    }

    /// Starts a checkpoint unless the previous one still runs (they never queue up).
    fn checkpoint(&mut self, ctx: &mut Context<Self>) {
        let Some(checkpointer) = self.checkpointer.clone().filter(|_| !self.checkpointing) else {
            return;
        };
        self.checkpointing = true;
        ctx.spawn(
            fut::wrap_future(checkpointer.send(Checkpoint)).map(|_, act: &mut Self, _| {
                act.checkpointing = false;
            }),
        );
    }

    /// Queues the expiry sweep; its outcome is logged (and audited by the writer).
    fn expire(&mut self, ctx: &mut Context<Self>) {
        let ttl_ms = i64::try_from(self.key_ttl.as_millis()).unwrap_or(i64::MAX);
        let (tx, rx) = oneshot::channel();
        let op = Op::ExpireKeys {
            created_before_ms: now_ms().saturating_sub(ttl_ms),
        };
        self.queue.push((op, tx));
        self.flush(ctx);
        ctx.spawn(fut::wrap_future(async move {
            if let Ok(Err(err)) = rx.await {
                log::error!("key expiry failed: {err}");
            }
        }));
    }

    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight || self.queue.is_empty() {
            return;
        }
        let take = self.queue.len().min(MAX_BATCH);
        let (ops, waiters): (Vec<Op>, Vec<Waiter>) = self.queue.drain(..take).unzip();
        self.in_flight = true;
        let started = Instant::now();
        let batch = self.writer.send(WriteBatch(ops));
        ctx.spawn(
            fut::wrap_future(batch).map(move |result, act: &mut Self, ctx| {
                log::trace!(
                    "batch of {take} operations committed in {:?}",
                    started.elapsed()
                );
                match result {
                    Ok(Ok(outcomes)) => {
                        for (waiter, outcome) in waiters.into_iter().zip(outcomes) {
                            // A dropped waiter is a caller that timed out; its write stands.
                            let _ = waiter.send(outcome);
                        }
                    }
                    Ok(Err(err)) => fail_all(waiters, &err),
                    Err(err) => fail_all(waiters, &Error::from(err)),
                }
                act.in_flight = false;
                act.flush(ctx);
            }),
        );
    }
}

fn fail_all(waiters: Vec<Waiter>, err: &Error) {
    log::error!("storage batch failed: {err}");
    for waiter in waiters {
        let _ = waiter.send(Err(err.clone()));
    }
}

impl Actor for Store {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        let every = (self.key_ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        ctx.run_interval(every, |act, ctx| act.expire(ctx));
        if self.checkpointer.is_some() {
            ctx.run_interval(CHECKPOINT_EVERY, |act, ctx| act.checkpoint(ctx));
        }
    }
}

impl Handler<Exec> for Store {
    type Result = ResponseFuture<Result<Output>>;

    fn handle(&mut self, msg: Exec, ctx: &mut Context<Self>) -> Self::Result {
        // Audit records are small and must not be lost to load: they skip the limit.
        if self.queue.len() >= MAX_QUEUE && !matches!(msg.0, Op::Audit(_)) {
            log::warn!("storage queue full ({MAX_QUEUE} operations): refusing");
            return Box::pin(async { Err(Error::Unavailable("storage queue full".into())) });
        }
        let (tx, rx) = oneshot::channel();
        self.queue.push((msg.0, tx));
        self.flush(ctx);
        Box::pin(async move {
            rx.await
                .map_err(|_| Error::Unavailable("storage writer stopped".into()))?
        })
    }
}
