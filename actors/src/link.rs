//! Link: one end of a QKD link to a neighbour KME; produces the material its pool hands out.
//!
//! Owns: the link's key source, production pacing (a bit budget filled at the configured rate
//! on every tick), the next block numbers, the last known pool levels of both ends, blocks
//! still to be shipped, and link health for `status`. Handles: `Tick` (its own interval),
//! `PoolLevel` (from its `KeyPool`), `ReceiveBlocks` and `PeerLevel` (from the KME-to-KME edge,
//! on the receiving end), `LinkHealth` (status). Sends: `ShipBlocks`/`ReportLevel` to
//! `PeerLink`, `Exec` to `Store`, `AddBlocks` to `KeyPool`.
//! Courier protocol: the lower-ID end generates a block, stores it (unconfirmed), ships it; the
//! other end stores it and acks with its level; the generator then marks it confirmed and
//! only then either end may allocate from it. Each block gets an owner, the end whose pool is
//! emptier, and only its owner allocates from it. A restart re-ships unconfirmed blocks,
//! which the receiver answers idempotently.
//! Mailbox: bounded; one shipment in flight at a time.

use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::db::StoredBlock;
use crate::error::{Error, Result};
use crate::key_pool::{AddBlocks, KeyPool, PoolLevel};
use crate::key_source::{self, KeySource};
use crate::peer_link::{PeerLink, ReportLevel, ShipBlocks};
use crate::store::{BlockOutcome, BlockRecord, Op, Output, Store};
use crate::types::LinkParams;

/// Most blocks per shipment.
const MAX_BLOCKS_PER_SHIPMENT: u64 = 16;

pub struct Link {
    params: LinkParams,
    source: Box<dyn KeySource>,
    pool: Addr<KeyPool>,
    peer: Addr<PeerLink>,
    store: Addr<Store>,
    next_own_seq: u64,
    next_peer_seq: u64,
    own_level: u64,
    peer_level: u64,
    reported_level: Option<u64>,
    budget_bits: f64,
    last_tick: Instant,
    busy: bool,
    unshipped: Vec<BlockRecord>,
    unshipped_stored: bool,
    health: Health,
}

/// Link health, for logs and `status_extension`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub up: bool,
    pub reason: Option<String>,
    pub source: &'static str,
    pub blocks_produced: u64,
    pub bytes_produced: u64,
    pub own_level_bytes: u64,
    pub peer_level_bytes: u64,
}

/// Start-up state read from the database.
pub struct LinkState {
    pub next_own_seq: u64,
    pub next_peer_seq: u64,
    /// Blocks stored here but not yet acknowledged by the peer (generating end).
    pub unshipped: Vec<BlockRecord>,
}

impl Link {
    pub fn new(
        params: LinkParams,
        state: LinkState,
        pool: Addr<KeyPool>,
        peer: Addr<PeerLink>,
        store: Addr<Store>,
    ) -> Self {
        let source = key_source::for_kind(params.source);
        let health = Health {
            up: true,
            reason: None,
            source: source.name(),
            blocks_produced: 0,
            bytes_produced: 0,
            own_level_bytes: 0,
            peer_level_bytes: 0,
        };
        // One block for each end at once: a fresh network serves its first keys right after
        // start instead of one block-time later.
        let initial_budget = (params.block_bytes * 16) as f64;
        Self {
            params,
            source,
            pool,
            peer,
            store,
            next_own_seq: state.next_own_seq,
            next_peer_seq: state.next_peer_seq,
            own_level: 0,
            peer_level: 0,
            reported_level: None,
            budget_bits: initial_budget,
            last_tick: Instant::now(),
            busy: false,
            unshipped: state.unshipped,
            unshipped_stored: true,
            health,
        }
    }

    fn set_health(&mut self, result: &Result<()>) {
        match result {
            Ok(()) => {
                if !self.health.up {
                    log::info!("link to {} is up again", self.params.peer);
                }
                self.health.up = true;
                self.health.reason = None;
            }
            Err(err) => {
                if self.health.up {
                    log::warn!("link to {} is down: {err}", self.params.peer);
                }
                self.health.up = false;
                self.health.reason = Some(err.to_string());
            }
        }
    }

    /// Generating end: turn the bit budget into blocks for whichever end needs them.
    fn produce(&mut self) -> Result<Vec<BlockRecord>> {
        let block_bits = (self.params.block_bytes * 8) as f64;
        let high = self.params.high_water_bytes();
        let block = self.params.block_bytes as u64;
        let mut own = self.own_level;
        let mut peer = self.peer_level;
        let mut blocks = Vec::new();
        while self.budget_bits >= block_bits && (blocks.len() as u64) < MAX_BLOCKS_PER_SHIPMENT {
            let owner = if own < high && own <= peer {
                own += block;
                let seq = self.next_own_seq;
                self.next_own_seq += 1;
                (self.params.me.clone(), seq)
            } else if peer < high {
                peer += block;
                let seq = self.next_peer_seq;
                self.next_peer_seq += 1;
                (self.params.peer.clone(), seq)
            } else {
                break;
            };
            let data = self.source.next_block(self.params.block_bytes)?;
            self.budget_bits -= block_bits;
            blocks.push(BlockRecord {
                owner: owner.0,
                seq: owner.1,
                data,
            });
        }
        Ok(blocks)
    }

    /// Store (unless already stored), ship, confirm, then hand own blocks to the pool.
    fn ship(&mut self, ctx: &mut Context<Self>, blocks: Vec<BlockRecord>, stored: bool) {
        self.busy = true;
        let store = self.store.clone();
        let peer = self.peer.clone();
        let link_peer = self.params.peer.clone();
        let work = async move {
            let mut stored = stored;
            let result: Result<u64> = async {
                if !stored {
                    let op = Op::StoreBlocks {
                        peer: link_peer.clone(),
                        blocks: blocks.clone(),
                        confirmed: false,
                    };
                    store.send(op.into()).await??;
                    stored = true;
                }
                let level = peer.send(ShipBlocks(blocks.clone())).await??;
                let op = Op::ConfirmBlocks {
                    peer: link_peer.clone(),
                    blocks: blocks.iter().map(|b| (b.owner.clone(), b.seq)).collect(),
                };
                store.send(op.into()).await??;
                Ok(level)
            }
            .await;
            (result, blocks, stored)
        };
        ctx.spawn(
            fut::wrap_future(work).map(|(result, blocks, stored), act: &mut Self, _| {
                act.busy = false;
                match result {
                    Ok(level) => act.shipped(level, blocks),
                    Err(err) => {
                        // Kept and retried on a later tick, with the same numbers and bytes.
                        act.unshipped = blocks;
                        act.unshipped_stored = stored;
                        act.set_health(&Err(err));
                    }
                }
            }),
        );
    }

    fn shipped(&mut self, peer_level: u64, blocks: Vec<BlockRecord>) {
        self.peer_level = peer_level;
        self.health.peer_level_bytes = peer_level;
        self.health.blocks_produced += blocks.len() as u64;
        self.health.bytes_produced += (blocks.len() * self.params.block_bytes) as u64;
        let own: Vec<StoredBlock> = blocks
            .into_iter()
            .filter(|b| b.owner == self.params.me)
            .map(|b| StoredBlock {
                seq: b.seq,
                data: b.data,
            })
            .collect();
        if !own.is_empty() {
            self.own_level += (own.len() * self.params.block_bytes) as u64;
            self.pool.do_send(AddBlocks(own));
        }
        self.set_health(&Ok(()));
    }
}

impl Actor for Link {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let every = Duration::from_millis(self.params.tick_ms.max(1));
        ctx.run_interval(every, |act, ctx| act.tick(ctx));
    }
}

impl Link {
    fn tick(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last_tick).as_secs_f64();
        self.last_tick = now;
        if !self.params.is_generator() {
            self.report_level(ctx);
            return;
        }
        let block_bits = (self.params.block_bytes * 8) as f64;
        let cap =
            (self.params.rate_bits_per_s as f64).max(block_bits * MAX_BLOCKS_PER_SHIPMENT as f64);
        self.budget_bits =
            (self.budget_bits + self.params.rate_bits_per_s as f64 * elapsed).min(cap);
        if self.busy {
            return;
        }
        if !self.unshipped.is_empty() {
            let blocks = std::mem::take(&mut self.unshipped);
            let stored = self.unshipped_stored;
            self.ship(ctx, blocks, stored);
            return;
        }
        match self.produce() {
            Ok(blocks) if !blocks.is_empty() => self.ship(ctx, blocks, false),
            Ok(_) => {}
            Err(err) => self.set_health(&Err(err)),
        }
    }

    /// Receiving end: tell the generator our level when it changed.
    fn report_level(&mut self, ctx: &mut Context<Self>) {
        if self.busy || self.reported_level == Some(self.own_level) {
            return;
        }
        self.busy = true;
        let level = self.own_level;
        let peer = self.peer.clone();
        ctx.spawn(
            fut::wrap_future(async move { peer.send(ReportLevel(level)).await }).map(
                move |result, act: &mut Self, _| {
                    act.busy = false;
                    let result = result.map_err(Error::from).and_then(|r| r);
                    if result.is_ok() {
                        act.reported_level = Some(level);
                    }
                    act.set_health(&result);
                },
            ),
        );
    }
}

impl Handler<PoolLevel> for Link {
    type Result = ();

    fn handle(&mut self, msg: PoolLevel, _ctx: &mut Context<Self>) {
        self.own_level = msg.0;
        self.health.own_level_bytes = msg.0;
    }
}

/// Blocks shipped by the generating end. Sent by the KME-to-KME edge. Result: our pool level.
#[derive(Message)]
#[rtype(result = "Result<u64>")]
pub struct ReceiveBlocks(pub Vec<BlockRecord>);

impl Handler<ReceiveBlocks> for Link {
    type Result = ResponseActFuture<Self, Result<u64>>;

    fn handle(&mut self, msg: ReceiveBlocks, _ctx: &mut Context<Self>) -> Self::Result {
        let peer = self.params.peer.clone();
        let me = self.params.me.clone();
        let store = self.store.clone();
        let blocks = msg.0;
        if self.params.is_generator() {
            let err = Error::PeerMessage(format!(
                "{} generates this link's material; it accepts no shipments",
                self.params.me
            ));
            return Box::pin(fut::ready(Err(err)));
        }
        if let Some(bad) = blocks
            .iter()
            .find(|b| (b.owner != me && b.owner != peer) || b.data.len() != self.params.block_bytes)
        {
            let err = Error::PeerMessage(format!(
                "block {} of {} does not belong to this link",
                bad.seq, bad.owner
            ));
            return Box::pin(fut::ready(Err(err)));
        }
        let work = async move {
            let op = Op::StoreBlocks {
                peer,
                blocks: blocks.clone(),
                confirmed: true,
            };
            let outcomes = match store.send(op.into()).await?? {
                Output::Blocks(outcomes) => outcomes,
                _ => Vec::new(),
            };
            let fresh: Vec<StoredBlock> = blocks
                .into_iter()
                .zip(outcomes)
                .filter(|(b, outcome)| b.owner == me && *outcome == BlockOutcome::Stored)
                .map(|(b, _)| StoredBlock {
                    seq: b.seq,
                    data: b.data,
                })
                .collect();
            Ok(fresh)
        };
        Box::pin(fut::wrap_future(work).map(
            |result: Result<Vec<StoredBlock>>, act: &mut Self, _| {
                let fresh = result?;
                let added = (fresh.len() * act.params.block_bytes) as u64;
                act.health.blocks_produced += fresh.len() as u64;
                act.health.bytes_produced += added;
                if !fresh.is_empty() {
                    act.pool.do_send(AddBlocks(fresh));
                }
                act.own_level += added;
                act.reported_level = Some(act.own_level);
                act.set_health(&Ok(()));
                Ok(act.own_level)
            },
        ))
    }
}

/// The other end's pool level. Sent by the KME-to-KME edge.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PeerLevel(pub u64);

impl Handler<PeerLevel> for Link {
    type Result = ();

    fn handle(&mut self, msg: PeerLevel, _ctx: &mut Context<Self>) {
        self.peer_level = msg.0;
        self.health.peer_level_bytes = msg.0;
    }
}

/// Current health. Sent by the HTTP edge (status).
#[derive(Message)]
#[rtype(result = "Health")]
pub struct LinkHealth;

impl Handler<LinkHealth> for Link {
    type Result = MessageResult<LinkHealth>;

    fn handle(&mut self, _msg: LinkHealth, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.health.clone())
    }
}
