//! Link: one end of a QKD link to a neighbour KME; produces the material its pool hands out.
//!
//! Owns: the link's key source, production pacing, the next block numbers, the last known
//! pool levels of both ends, blocks still to be delivered, the BB84 authentication stream and
//! link health for `status`. Handles: `Tick` (its own interval), `PoolLevel` (from its
//! `KeyPool`), `ReceiveBlocks`, `PeerLevel` and `SourceFromPeer` (from the KME-to-KME edge, at
//! the receiving end), `LinkHealth` (status). Sends: `ShipBlocks`/`SourceExchange`/`ReportLevel`
//! to `PeerLink`, `Exec` to `Store`, `AddBlocks` to `KeyPool`, frame work to `Bb84Engine`.
//!
//! The lower-ID end drives production. Every block gets an owner, the end whose pool is
//! emptier, and only its owner allocates from it. Delivery is two-phase: the driving end
//! stores a block unconfirmed, the other end stores it for good, then the driving end
//! confirms it; only then may either end allocate from it.
//! - courier: the driving end draws blocks from its `KeySource` and ships their bytes. A
//!   restart re-ships unconfirmed blocks, which the receiver answers idempotently.
//! - bb84: the driving end is Alice. Per frame it burns an authentication window (durably, at
//!   both ends, before the first tag), has its engine simulate the pulses, sends Bob's
//!   detection record in place of the quantum channel, then carries the post-processing
//!   messages between the two engines. Once both ends hold the verified, amplified key, it
//!   cuts it into blocks and sends only their numbers (`Commit`); the other end cuts its own
//!   copy the same way. Key bytes never cross the network. If the other end restarted before
//!   the commit it has lost its copy and answers `FrameLost`: the driving end discards the
//!   unconfirmed blocks and reuses their numbers. An aborted frame (QBER above threshold,
//!   failed verification or authentication, lost message) yields nothing at either end; the
//!   link backs off and tries again, so it recovers by itself once the channel is clean.
//!
//! Mailbox: bounded; one delivery or frame in flight at a time. `SourceFromPeer` is handled
//! atomically, so a commit never races a frame.

mod bb84;
use bb84::Bb84End;
mod file_drop;
use file_drop::{destroy_key_file, FileDropState};

use std::path::PathBuf;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::Serialize;

use crate::audit_log::AuditRecord;
use crate::bb84_engine::Bb84Engine;
use crate::db::StoredBlock;
use crate::error::{Error, Result};
use crate::key_drop::{self, KeyFile};
use crate::key_pool::{AddBlocks, KeyPool, PoolLevel};
use crate::key_source::{self, KeySource};
use crate::link_auth::{auth_owner, AuthStream, WINDOW_BYTES};
use crate::peer_link::{
    BlockId, PeerLink, PeerReply, ReportLevel, ShipBlocks, SourceExchange, SourceRequest,
};
use crate::store::{BlockOutcome, BlockRecord, Op, Output, Store, UsedKeyFile};
use crate::types::{KmeId, LinkParams, SourceKind};

/// Most blocks per courier shipment.
const MAX_BLOCKS_PER_SHIPMENT: u64 = 16;
/// Below this many windows, the next frame's key refills the authentication stream first.
const AUTH_LOW_WINDOWS: u64 = 64;
/// After this many aborted frames in a row the link counts as down (before: degraded).
const DOWN_AFTER_ABORTS: u64 = 3;

/// Link health, for logs and `status_extension`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Health {
    pub state: Condition,
    pub reason: Option<String>,
    pub source: &'static str,
    pub blocks_produced: u64,
    pub bytes_produced: u64,
    pub own_level_bytes: u64,
    pub peer_level_bytes: u64,
    /// BB84 links only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qkd: Option<QkdHealth>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Condition {
    Up,
    /// BB84: the last frames aborted, fewer than `DOWN_AFTER_ABORTS` in a row.
    Degraded,
    Down,
}

/// What a BB84 link measures, frame by frame.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct QkdHealth {
    pub frames_ok: u64,
    pub frames_aborted: u64,
    pub consecutive_aborts: u64,
    pub last_abort: Option<String>,
    /// QBER observed on the disclosed sample of the last frame that got that far.
    pub qber: Option<f64>,
    /// Its upper confidence bound (the value compared with the abort threshold).
    pub qber_upper: Option<f64>,
    /// Reconciliation efficiency f = leaked / (n h(QBER)) of the last reconciled frame.
    pub efficiency: Option<f64>,
    /// Over the last frames: bits / frame time (a paced frame lasts at least its pulses /
    /// pulse rate, so a paced link shows its physical rate; idle time is not counted).
    pub sifted_bits_per_s: f64,
    pub secret_bits_per_s: f64,
    pub auth_windows_left: u64,
    pub fibre_km: f64,
    pub eavesdropper: f64,
}

/// Start-up state read from the database.
pub struct LinkState {
    pub next_own_seq: u64,
    pub next_peer_seq: u64,
    pub next_auth_seq: u64,
    /// Blocks stored here but not yet acknowledged by the peer (driving end).
    pub unshipped: Vec<BlockRecord>,
    /// The BB84 authentication stream as stored (empty on courier links).
    pub auth: AuthStream,
}

/// How blocks reach the other end.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Delivery {
    /// With their bytes (courier blocks, the first authentication key).
    Bytes,
    /// By number only: the other end holds the same key from BB84 frame or key file
    /// `Some(id)`, or, after a restart here, perhaps already stored them (`None`). `file`: the
    /// key file to destroy once the other end has stored the blocks.
    Commit {
        frame: Option<u64>,
        file: Option<OfferedFile>,
    },
}

/// A file-drop key file on its way to blocks: where it is, and its record as used.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OfferedFile {
    path: PathBuf,
    record: UsedKeyFile,
}

impl OfferedFile {
    fn new(file: &KeyFile) -> Self {
        Self {
            path: file.path.clone(),
            record: UsedKeyFile {
                name: file.name.clone(),
                sha256: file.sha256,
            },
        }
    }
}

/// Blocks still to be delivered, retried on every tick until the other end has them.
struct PendingDelivery {
    blocks: Vec<BlockRecord>,
    stored: bool,
    delivery: Delivery,
}

/// Bob end: the key of the last frame (or key file) finished here, until the Alice end
/// commits it.
struct HeldKey {
    frame_id: u64,
    key: Vec<u8>,
    /// file-drop: the file to record as used and destroy once the key is stored.
    file: Option<OfferedFile>,
}

pub struct Link {
    params: LinkParams,
    source: Box<dyn KeySource>,
    bb84: Option<Bb84End>,
    pool: Addr<KeyPool>,
    peer: Addr<PeerLink>,
    store: Addr<Store>,
    next_own_seq: u64,
    next_peer_seq: u64,
    next_auth_seq: u64,
    own_level: u64,
    peer_level: u64,
    reported_level: Option<u64>,
    budget_bits: f64,
    last_tick: Instant,
    busy: bool,
    pending: Option<PendingDelivery>,
    held: Option<HeldKey>,
    /// file-drop, driving end: no offer before this instant.
    next_offer_at: Instant,
    file_drop: FileDropState,
    /// The last failure to reach the peer or the storage, until the next success.
    failure: Option<String>,
    blocks_produced: u64,
    bytes_produced: u64,
}

impl Link {
    /// `engine`: the BB84 engine of this end, for BB84 links.
    pub fn new(
        params: LinkParams,
        state: LinkState,
        engine: Option<Addr<Bb84Engine>>,
        pool: Addr<KeyPool>,
        peer: Addr<PeerLink>,
        store: Addr<Store>,
    ) -> Self {
        let bb84 = match (&params.source, engine) {
            (SourceKind::Bb84(settings), Some(engine)) => {
                Some(Bb84End::new((**settings).clone(), engine, state.auth))
            }
            _ => None,
        };
        // After a restart, BB84 and file-drop blocks left unconfirmed are committed by number:
        // their key bytes must never travel.
        let delivery = match params.source {
            SourceKind::Courier => Delivery::Bytes,
            SourceKind::Bb84(_) | SourceKind::FileDrop => Delivery::Commit {
                frame: None,
                file: None,
            },
        };
        let pending = (!state.unshipped.is_empty()).then_some(PendingDelivery {
            blocks: state.unshipped,
            stored: true,
            delivery,
        });
        // One block for each end at once: a fresh network serves its first keys right after
        // start instead of one block-time later.
        let initial_budget = (params.block_bytes * 16) as f64;
        Self {
            source: key_source::courier(),
            bb84,
            pool,
            peer,
            store,
            next_own_seq: state.next_own_seq,
            next_peer_seq: state.next_peer_seq,
            next_auth_seq: state.next_auth_seq,
            own_level: 0,
            peer_level: 0,
            reported_level: None,
            budget_bits: initial_budget,
            last_tick: Instant::now(),
            busy: false,
            pending,
            held: None,
            next_offer_at: Instant::now(),
            file_drop: FileDropState::default(),
            failure: None,
            blocks_produced: 0,
            bytes_produced: 0,
            params,
        }
    }

    fn set_health(&mut self, result: &Result<()>) {
        match result {
            Ok(()) => {
                if self.failure.take().is_some() {
                    log::info!("link to {} is up again", self.params.peer);
                }
            }
            Err(err) => {
                if self.failure.is_none() {
                    log::warn!("link to {} is down: {err}", self.params.peer);
                }
                self.failure = Some(err.to_string());
            }
        }
    }

    fn health(&self) -> Health {
        let qkd = self.bb84.as_ref().map(|b| QkdHealth {
            auth_windows_left: b.auth.windows_left(),
            fibre_km: b.settings.channel.fibre_km,
            eavesdropper: b.settings.channel.eve_fraction,
            ..b.stats.clone()
        });
        let (state, reason) = match (&self.failure, &qkd) {
            (Some(failure), _) => (Condition::Down, Some(failure.clone())),
            (None, Some(q)) if q.consecutive_aborts >= DOWN_AFTER_ABORTS => {
                (Condition::Down, q.last_abort.clone())
            }
            (None, Some(q)) if q.consecutive_aborts > 0 => {
                (Condition::Degraded, q.last_abort.clone())
            }
            _ => (Condition::Up, None),
        };
        Health {
            state,
            reason,
            source: self.params.source.name(),
            blocks_produced: self.blocks_produced,
            bytes_produced: self.bytes_produced,
            own_level_bytes: self.own_level,
            peer_level_bytes: self.peer_level,
            qkd,
        }
    }

    fn next_seq(&mut self, owner: &KmeId) -> &mut u64 {
        if *owner == self.params.me {
            &mut self.next_own_seq
        } else if *owner == self.params.peer {
            &mut self.next_peer_seq
        } else {
            &mut self.next_auth_seq
        }
    }

    /// Owner of the next block: the emptier end (its level is raised by one block).
    fn next_owner(&self, own: &mut u64, peer: &mut u64) -> KmeId {
        let block = self.params.block_bytes as u64;
        if *own <= *peer {
            *own += block;
            self.params.me.clone()
        } else {
            *peer += block;
            self.params.peer.clone()
        }
    }

    /// Numbers the next block of `owner`.
    fn take_seq(&mut self, owner: &KmeId) -> u64 {
        let next = self.next_seq(owner);
        let seq = *next;
        *next += 1;
        seq
    }

    /// Courier, driving end: turn the bit budget into blocks for whichever end needs them.
    fn produce(&mut self) -> Result<Vec<BlockRecord>> {
        let block_bits = (self.params.block_bytes * 8) as f64;
        let high = self.params.high_water_bytes();
        let (mut own, mut peer) = (self.own_level, self.peer_level);
        let mut blocks = Vec::new();
        while self.budget_bits >= block_bits
            && (blocks.len() as u64) < MAX_BLOCKS_PER_SHIPMENT
            && own.min(peer) < high
        {
            let owner = self.next_owner(&mut own, &mut peer);
            let seq = self.take_seq(&owner);
            let data = self.source.next_block(self.params.block_bytes)?;
            self.budget_bits -= block_bits;
            blocks.push(BlockRecord { owner, seq, data });
        }
        Ok(blocks)
    }

    /// Store (unless already stored), deliver, confirm, then hand the blocks to their users.
    fn ship(
        &mut self,
        ctx: &mut Context<Self>,
        blocks: Vec<BlockRecord>,
        stored: bool,
        delivery: Delivery,
    ) {
        self.busy = true;
        let store = self.store.clone();
        let peer = self.peer.clone();
        let link_peer = self.params.peer.clone();
        let pending = delivery.clone();
        let work = async move {
            let mut stored = stored;
            let delivery = &pending;
            let result: Result<u64> = async {
                if !stored {
                    let key_file = match delivery {
                        Delivery::Commit {
                            file: Some(file), ..
                        } => Some(file.record.clone()),
                        _ => None,
                    };
                    let op = Op::StoreBlocks {
                        peer: link_peer.clone(),
                        blocks: blocks.clone(),
                        confirmed: false,
                        key_file,
                    };
                    store.send(op.into()).await??;
                    stored = true;
                }
                let level = match delivery {
                    Delivery::Bytes => peer.send(ShipBlocks(blocks.clone())).await??,
                    Delivery::Commit { frame, file } => {
                        let ids = blocks
                            .iter()
                            .map(|b| BlockId {
                                owner: b.owner.clone(),
                                seq: b.seq,
                            })
                            .collect();
                        let commit = SourceRequest::Commit {
                            frame_id: *frame,
                            blocks: ids,
                        };
                        let level = match peer.send(SourceExchange(commit)).await? {
                            Ok(reply) => reply.level.unwrap_or(0),
                            Err(lost @ Error::FrameLost { .. }) => {
                                let audit = AuditRecord::new(
                                    "key_frame_discarded",
                                    serde_json::json!({
                                        "peer": link_peer.as_str(),
                                        "frame_id": frame,
                                        "blocks": blocks.len(),
                                    }),
                                );
                                let op = Op::DiscardBlocks {
                                    peer: link_peer.clone(),
                                    audit,
                                };
                                store.send(op.into()).await??;
                                return Err(lost);
                            }
                            Err(err) => return Err(err),
                        };
                        // Both ends hold the blocks and record the file as used: it goes (and
                        // if it cannot, it is destroyed when it turns up again).
                        if let Some(file) = file {
                            destroy_key_file(&link_peer, file.path.clone()).await;
                        }
                        level
                    }
                };
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
        ctx.spawn(fut::wrap_future(work).map(
            move |(result, blocks, stored), act: &mut Self, _| {
                act.busy = false;
                match result {
                    Ok(level) => act.shipped(level, blocks),
                    Err(Error::FrameLost { .. }) => act.discarded(&blocks),
                    Err(err) => {
                        // Kept and retried on a later tick, with the same numbers and bytes.
                        act.pending = Some(PendingDelivery {
                            blocks,
                            stored,
                            delivery,
                        });
                        act.set_health(&Err(err));
                    }
                }
            },
        ));
    }

    fn shipped(&mut self, peer_level: u64, blocks: Vec<BlockRecord>) {
        self.peer_level = peer_level;
        self.set_health(&Ok(()));
        self.accept(blocks);
    }

    /// The other end lost the frame: its blocks are gone here too, their numbers free again.
    fn discarded(&mut self, blocks: &[BlockRecord]) {
        log::warn!(
            "link to {}: the peer lost a frame before its commit; {} blocks discarded",
            self.params.peer,
            blocks.len()
        );
        for block in blocks {
            let next = self.next_seq(&block.owner);
            *next = (*next).min(block.seq);
        }
    }

    /// Blocks now held at both ends: own ones to the pool, authentication ones to the stream.
    fn accept(&mut self, blocks: Vec<BlockRecord>) {
        let auth = auth_owner();
        let mut own = Vec::new();
        let mut auth_blocks = Vec::new();
        for b in blocks {
            if b.owner != auth {
                self.blocks_produced += 1;
                self.bytes_produced += b.data.len() as u64;
            }
            let seq = self.next_seq(&b.owner);
            *seq = (*seq).max(b.seq + 1);
            let stored = StoredBlock {
                seq: b.seq,
                data: b.data,
            };
            if b.owner == self.params.me {
                own.push(stored);
            } else if b.owner == auth {
                auth_blocks.push(stored);
            }
        }
        if let Some(bb84) = self.bb84.as_mut() {
            bb84.auth.append(auth_blocks);
        }
        if !own.is_empty() {
            self.own_level += (own.len() * self.params.block_bytes) as u64;
            self.pool.do_send(AddBlocks(own));
        }
    }
}

impl Actor for Link {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.params.source == SourceKind::FileDrop {
            self.sweep_used_key_files(ctx);
        }
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
        if let Some(pending) = self.pending.take() {
            self.ship(ctx, pending.blocks, pending.stored, pending.delivery);
            return;
        }
        if self.bb84.is_some() {
            self.bb84_tick(ctx, now);
            return;
        }
        if self.params.source == SourceKind::FileDrop {
            self.file_drop_tick(ctx, now);
            return;
        }
        match self.produce() {
            Ok(blocks) if !blocks.is_empty() => self.ship(ctx, blocks, false, Delivery::Bytes),
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

/// Key blocks from a frame's or a file's key.
impl Link {
    /// Cuts a frame's key into blocks: authentication blocks first while the stream runs low,
    /// then blocks for the emptier end. A remainder below one block is dropped (at both ends).
    fn cut(&mut self, key: Vec<u8>) -> Vec<BlockRecord> {
        let block = self.params.block_bytes;
        let window_per_block = (block as u64 / WINDOW_BYTES).max(1);
        let mut auth_windows = self
            .bb84
            .as_ref()
            .map_or(u64::MAX, |b| b.auth.windows_left());
        let (mut own, mut peer) = (self.own_level, self.peer_level);
        let auth = auth_owner();
        let mut blocks = Vec::new();
        for chunk in key.chunks_exact(block) {
            let owner = if auth_windows < AUTH_LOW_WINDOWS {
                auth_windows += window_per_block;
                auth.clone()
            } else {
                self.next_owner(&mut own, &mut peer)
            };
            let seq = self.take_seq(&owner);
            blocks.push(BlockRecord {
                owner,
                seq,
                data: chunk.to_vec(),
            });
        }
        blocks
    }
}

impl Handler<PoolLevel> for Link {
    type Result = ();

    fn handle(&mut self, msg: PoolLevel, _ctx: &mut Context<Self>) {
        self.own_level = msg.0;
    }
}

/// Blocks shipped with their bytes by the driving end (courier blocks; on a BB84 link only the
/// bootstrap authentication key). Sent by the KME-to-KME edge. Result: our pool level.
#[derive(Message)]
#[rtype(result = "Result<u64>")]
pub struct ReceiveBlocks(pub Vec<BlockRecord>);

/// Atomic, like `SourceFromPeer`: a commit never looks at the stream while a shipment to it is
/// half stored.
impl Handler<ReceiveBlocks> for Link {
    type Result = AtomicResponse<Self, Result<u64>>;

    fn handle(&mut self, msg: ReceiveBlocks, _ctx: &mut Context<Self>) -> Self::Result {
        AtomicResponse::new(self.receive_blocks(msg.0))
    }
}

impl Link {
    fn receive_blocks(&mut self, blocks: Vec<BlockRecord>) -> ResponseActFuture<Self, Result<u64>> {
        if self.params.is_generator() {
            let err = Error::PeerMessage(format!(
                "{} generates this link's material; it accepts no shipments",
                self.params.me
            ));
            return Box::pin(fut::ready(Err(err)));
        }
        let auth = auth_owner();
        // Key bytes travel only on courier links; a BB84 link takes its first authentication
        // key this way, a file-drop link nothing.
        let allowed = |owner: &KmeId| match self.params.source {
            SourceKind::Courier => *owner == self.params.me || *owner == self.params.peer,
            SourceKind::Bb84(_) => *owner == auth,
            SourceKind::FileDrop => false,
        };
        if let Some(bad) = blocks
            .iter()
            .find(|b| !allowed(&b.owner) || b.data.len() != self.params.block_bytes)
        {
            let err = Error::PeerMessage(format!(
                "block {} of {} does not belong to this link",
                bad.seq, bad.owner
            ));
            return Box::pin(fut::ready(Err(err)));
        }
        self.store_received(blocks, None)
    }

    /// Receiving end: stores blocks for good, then hands the new ones to their users.
    /// Result: our pool level.
    /// `key_file`: the file-drop key file they come from, recorded as used with them.
    fn store_received(
        &mut self,
        blocks: Vec<BlockRecord>,
        key_file: Option<UsedKeyFile>,
    ) -> ResponseActFuture<Self, Result<u64>> {
        let store = self.store.clone();
        let op = Op::StoreBlocks {
            peer: self.params.peer.clone(),
            blocks: blocks.clone(),
            confirmed: true,
            key_file,
        };
        let work = async move {
            let outcomes = match store.send(op.into()).await?? {
                Output::Blocks(outcomes) => outcomes,
                _ => Vec::new(),
            };
            let fresh: Vec<BlockRecord> = blocks
                .into_iter()
                .zip(outcomes)
                .filter(|(_, outcome)| *outcome == BlockOutcome::Stored)
                .map(|(b, _)| b)
                .collect();
            Ok(fresh)
        };
        Box::pin(fut::wrap_future(work).map(
            |result: Result<Vec<BlockRecord>>, act: &mut Self, _| {
                act.accept(result?);
                act.reported_level = Some(act.own_level);
                act.set_health(&Ok(()));
                Ok(act.own_level)
            },
        ))
    }
}

/// A BB84 post-processing message from the Alice end. Sent by the KME-to-KME edge.
/// Result: our answer (envelopes, our report once our part of the frame is over, level).
#[derive(Message)]
#[rtype(result = "Result<PeerReply>")]
pub struct SourceFromPeer(pub SourceRequest);

impl Handler<SourceFromPeer> for Link {
    type Result = AtomicResponse<Self, Result<PeerReply>>;

    fn handle(&mut self, msg: SourceFromPeer, _ctx: &mut Context<Self>) -> Self::Result {
        let work = match (msg.0, &self.params.source, self.params.is_generator()) {
            (_, _, true) | (_, SourceKind::Courier, _) => refuse(format!(
                "{} drives the link with {}; it takes no key-source messages",
                self.params.me, self.params.peer
            )),
            (
                SourceRequest::Start {
                    frame_id,
                    window,
                    record,
                },
                SourceKind::Bb84(_),
                _,
            ) => self.bob_start(frame_id, window, record),
            (
                SourceRequest::Step {
                    frame_id,
                    envelopes,
                },
                SourceKind::Bb84(_),
                _,
            ) => self.bob_step(frame_id, envelopes),
            (
                SourceRequest::FileOffer {
                    name,
                    bytes,
                    sha256,
                },
                SourceKind::FileDrop,
                _,
            ) => self.file_offer(name, bytes, sha256),
            (SourceRequest::Commit { frame_id, blocks }, _, _) => self.bob_commit(frame_id, blocks),
            (_, source, _) => refuse(format!(
                "not a message of the {} source of this link",
                source.name()
            )),
        };
        AtomicResponse::new(work)
    }
}

type Reply = ResponseActFuture<Link, Result<PeerReply>>;

fn refuse(message: String) -> Reply {
    Box::pin(fut::ready(Err(Error::PeerMessage(message))))
}

/// Commits, at the end that does not drive (BB84 and file-drop).
impl Link {
    /// Stores the held frame key as the blocks the Alice end names; without the key, answers
    /// from what is stored: all named blocks held (a retried commit) or the frame is lost.
    fn bob_commit(&mut self, frame_id: Option<u64>, ids: Vec<BlockId>) -> Reply {
        let auth = auth_owner();
        let (me, peer) = (self.params.me.clone(), self.params.peer.clone());
        let bb84 = matches!(self.params.source, SourceKind::Bb84(_));
        if let Some(bad) = ids
            .iter()
            .find(|id| id.owner != me && id.owner != peer && (id.owner != auth || !bb84))
        {
            return refuse(format!("block owner {} is not of this link", bad.owner));
        }
        let held = match (&self.held, frame_id) {
            (Some(held), Some(id)) if held.frame_id == id => self.held.take(),
            _ => None,
        };
        let Some(HeldKey { key, file, .. }) = held else {
            let held: Vec<bool> = ids
                .iter()
                .map(|id| id.seq < *self.next_seq(&id.owner))
                .collect();
            // An empty commit (a file-drop file shorter than one block) proves nothing: lost.
            return if !held.is_empty() && held.iter().all(|h| *h) {
                Box::pin(fut::ready(Ok(PeerReply {
                    ok: true,
                    level: Some(self.own_level),
                    ..PeerReply::default()
                })))
            } else if held.iter().any(|h| *h) {
                refuse("commit names blocks stored here and blocks not stored here".into())
            } else {
                Box::pin(fut::ready(Err(Error::FrameLost {
                    peer: self.params.me.to_string(),
                })))
            };
        };
        let block = self.params.block_bytes;
        // Exactly the key's whole blocks: a commit may not take a frame or file for less.
        if ids.len() != key.len() / block {
            return refuse(format!(
                "commit names {} blocks, the frame's key holds {}",
                ids.len(),
                key.len() / block
            ));
        }
        let blocks = ids
            .into_iter()
            .zip(key.chunks_exact(block))
            .map(|(id, data)| BlockRecord {
                owner: id.owner,
                seq: id.seq,
                data: data.to_vec(),
            })
            .collect();
        let kept = HeldKey {
            frame_id: frame_id.unwrap_or_default(),
            key: key.clone(),
            file: file.clone(),
        };
        let record = file.as_ref().map(|f| f.record.clone());
        let stored = self
            .store_received(blocks, record)
            .then(move |level, act: &mut Self, _| {
                if level.is_err() {
                    // A passing storage failure: the retried commit finds the key again.
                    act.held = Some(kept);
                }
                let peer = act.params.peer.clone();
                let destroyed = async move {
                    let level = level?;
                    // Used here for good: the device's file goes before the Alice end hears so.
                    if let Some(file) = file {
                        destroy_key_file(&peer, file.path).await;
                    }
                    Ok(PeerReply {
                        ok: true,
                        level: Some(level),
                        ..PeerReply::default()
                    })
                };
                fut::wrap_future(destroyed)
            });
        Box::pin(stored)
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
    }
}

/// Current health. Sent by the HTTP edge (status).
#[derive(Message)]
#[rtype(result = "Health")]
pub struct LinkHealth;

impl Handler<LinkHealth> for Link {
    type Result = MessageResult<LinkHealth>;

    fn handle(&mut self, _msg: LinkHealth, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.health())
    }
}
