//! Store: the front of the SQLite writer, with group commit.
//!
//! Owns: the queue of write operations waiting for the single writer, and whether a batch is
//! in flight. Handles: `Exec(op)` for every operation of `ops.rs`, from `KeyPool`, `Link`, its
//! key sources, `SaeRegistry` and the HTTP edge (peer activations, start-up audit). While one batch is being committed by `DbWriter`, new operations
//! queue here; when it returns they all go in the next transaction, so the fsync of
//! `synchronous = FULL` is paid per batch, not per request. Every caller gets exactly its own
//! outcome back, only after the transaction holding it is durable.
//! Mailbox: bounded (capacity set in `started`); callers use `send` under their own timeout.

use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::storage::checkpointer::{Checkpoint, DbCheckpointer};
use crate::storage::ops::{pending, ExpireKeys, Operation, Queued};
use crate::storage::writer::{DbWriter, WriteBatch};
use crate::types::now_ms;

/// Most operations committed in one transaction; bounds the latency of a batch.
const MAX_BATCH: usize = 512;
/// Most operations waiting for the writer; beyond it new ones are refused at once (503)
/// instead of queueing without bound behind a slow disk.
const MAX_QUEUE: usize = 16 * 1024;
const MAILBOX_CAPACITY: usize = 4096;
/// How often the WAL is checkpointed off the writer's path.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(1000);

/// Run one operation durably. Result: the operation's own outcome, after the commit that
/// holds it.
pub struct Exec<O: Operation>(pub O);

impl<O: Operation> Message for Exec<O> {
    type Result = Result<O::Output>;
}

pub struct Store {
    writer: Addr<DbWriter>,
    checkpointer: Option<Addr<DbCheckpointer>>,
    checkpointing: bool,
    queue: Vec<Box<dyn Queued>>,
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
        let rx = self.enqueue(
            ExpireKeys {
                created_before_ms: now_ms().saturating_sub(ttl_ms),
            },
            ctx,
        );
        ctx.spawn(fut::wrap_future(async move {
            if let Ok(Err(err)) = rx.await {
                log::error!("key expiry failed: {err}");
            }
        }));
    }

    fn enqueue<O: Operation>(
        &mut self,
        op: O,
        ctx: &mut Context<Self>,
    ) -> oneshot::Receiver<Result<O::Output>> {
        let (queued, rx) = pending(op);
        self.queue.push(queued);
        self.flush(ctx);
        rx
    }

    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight || self.queue.is_empty() {
            return;
        }
        let take = self.queue.len().min(MAX_BATCH);
        let batch: Vec<Box<dyn Queued>> = self.queue.drain(..take).collect();
        self.in_flight = true;
        let started = Instant::now();
        // The writer tells every caller its outcome itself, once the batch is durable; if it
        // is gone, the dropped batch tells them "storage writer stopped".
        let committed = self.writer.send(WriteBatch(batch));
        ctx.spawn(
            fut::wrap_future(committed).map(move |result, act: &mut Self, ctx| {
                match result {
                    Ok(Ok(())) => log::trace!(
                        "batch of {take} operations committed in {:?}",
                        started.elapsed()
                    ),
                    Ok(Err(_)) => {} // logged by the writer
                    Err(err) => log::error!("storage writer unreachable: {err}"),
                }
                act.in_flight = false;
                act.flush(ctx);
            }),
        );
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

impl<O: Operation> Handler<Exec<O>> for Store {
    type Result = ResponseFuture<Result<O::Output>>;

    fn handle(&mut self, msg: Exec<O>, ctx: &mut Context<Self>) -> Self::Result {
        if self.queue.len() >= MAX_QUEUE && !O::ALWAYS_QUEUED {
            log::warn!("storage queue full ({MAX_QUEUE} operations): refusing");
            return Box::pin(async { Err(Error::Unavailable("storage queue full".into())) });
        }
        let rx = self.enqueue(msg.0, ctx);
        Box::pin(async move {
            rx.await
                .map_err(|_| Error::Unavailable("storage writer stopped".into()))?
        })
    }
}
