//! Link: one end of a QKD link to a neighbour KME; delivers the material its pool hands out.
//!
//! Owns: the link's key source (any [`KeySource`]: bb84, file-drop, courier; driven only
//! through that trait), the next block numbers, the last known pool levels of both ends,
//! blocks still to be delivered, the key held for the next commit, and link health for
//! `status`. Handles: `Tick` (its own interval), `PoolLevel` (from its `KeyPool`),
//! `ReceiveBlocks`, `PeerLevel` and `SourceFromPeer` (from the KME-to-KME edge, at the
//! answering end), `LinkHealth` (status). Sends: `ShipBlocks`/`SourceExchange`/`ReportLevel`
//! to `PeerLink`, `Exec` to `Store`, `AddBlocks` to `KeyPool`; its source sends what it needs
//! (frames to `Bb84Engine`, offers to the peer) through the work it hands back.
//!
//! The lower-ID end drives production: on each tick its source yields material, bytes to ship
//! or a key both ends hold (see `key_source`). Every block gets an owner, the end whose pool
//! is emptier (or the authentication stream, while the source's stream runs low), and only
//! its owner allocates from it. Delivery is two-phase: the driving end stores a block
//! unconfirmed, the other end stores it for good, then the driving end confirms it; only then
//! may either end allocate from it.
//! - Bytes: the blocks travel with their bytes. A restart re-ships unconfirmed blocks, which
//!   the receiver answers idempotently.
//! - Shared keys: only block numbers travel (`Commit`); the answering end cuts its own copy,
//!   held since its source finished it, the same way. If the other end restarted before the
//!   commit it has lost its copy and answers `FrameLost`: the driving end discards the
//!   unconfirmed blocks and reuses their numbers. A commit retried after the driving end
//!   restarted is answered from what is stored.
//! - Out of step: when the other end refuses blocks because it numbers the key streams
//!   differently (an end restored from a backup, or started on a new database), it says its
//!   next numbers (`BlocksOutOfStep`). The driving end then realigns both ends above both:
//!   it discards the refused shipment and every key block of the link below the new numbers
//!   (here first, then `Realign` there), so neither end hands out material the other lacks.
//!   Their pools start empty; positions bound before stay bound (high marks move up too).
//!
//! Mailbox: bounded; one delivery or source work in flight at a time at the driving end.
//! `SourceFromPeer` and `ReceiveBlocks` are handled atomically, so a commit never races a
//! frame or a shipment.

pub mod auth;
pub mod key_source;
pub mod sources;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::key_pool::{AddBlocks, KeyPool, PoolLevel, ResetPool};
use crate::link::auth::{CommitAuth, WINDOW_BYTES};
use crate::link::key_source::{
    Condition, Delivery, KeySource, Produced, QkdHealth, SharedKey, Stream, Work,
};
use crate::peer::peer_link::{PeerLink, ReportLevel, ShipBlocks, SourceExchange};
use crate::peer::protocol::{BlockId, SourceReply, SourceRequest};
use crate::storage::audit::AuditRecord;
use crate::storage::db::StoredBlock;
use crate::storage::ops::{
    BlockOutcome, BlockRecord, ConfirmBlocks, DiscardBlocks, RealignStreams, StoreBlocks,
    UsedKeyFile,
};
use crate::storage::store::{Exec, Store};
use crate::types::{KmeId, LinkParams, Owner};

/// Below this many windows, a shared key refills the authentication stream first.
const AUTH_LOW_WINDOWS: u64 = 64;

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

/// Start-up state read from the database.
pub struct LinkState {
    pub next_own_seq: u64,
    pub next_peer_seq: u64,
    pub next_auth_seq: u64,
    /// Blocks stored here but not yet acknowledged by the peer (driving end).
    pub unshipped: Vec<BlockRecord>,
}

/// What every link end starts from, whatever its source.
pub struct LinkSetup {
    pub params: LinkParams,
    pub state: LinkState,
    pub pool: Addr<KeyPool>,
    pub peer: Addr<PeerLink>,
    pub store: Addr<Store>,
}

impl LinkSetup {
    /// Starts the link end with `source`.
    pub fn start<S: KeySource>(self, source: S) -> LinkAddr {
        LinkAddr::new(&Link::new(self, source).start())
    }
}

/// The messages a link end takes, whatever its source.
#[derive(Clone)]
pub struct LinkAddr {
    pub blocks: Recipient<ReceiveBlocks>,
    pub source: Recipient<SourceFromPeer>,
    pub peer_level: Recipient<PeerLevel>,
    pub pool_level: Recipient<PoolLevel>,
    pub health: Recipient<LinkHealth>,
}

impl LinkAddr {
    fn new<S: KeySource>(link: &Addr<Link<S>>) -> Self {
        Self {
            blocks: link.clone().recipient(),
            source: link.clone().recipient(),
            peer_level: link.clone().recipient(),
            pool_level: link.clone().recipient(),
            health: link.clone().recipient(),
        }
    }
}

/// How blocks reach the other end.
#[derive(Debug, Clone)]
enum Shipment {
    /// With their bytes.
    Bytes,
    /// By number only: the other end holds the same key `Some(id)`, or, after a restart here,
    /// perhaps already stored them (`None`). `used`: the key's record, `auth`: what tags
    /// the commit (see `SharedKey`).
    Commit {
        key: Option<u64>,
        used: Option<UsedKeyFile>,
        auth: Option<CommitAuth>,
    },
}

/// The three steps of a delivery at the driving end, with what they need cloned out of the
/// link so that they run without borrowing it.
struct DeliverySteps {
    store: Addr<Store>,
    peer: Addr<PeerLink>,
    link_peer: KmeId,
}

impl DeliverySteps {
    /// Stores the blocks here, unconfirmed (with the key file they come from, if any).
    async fn store_unconfirmed(&self, blocks: &[BlockRecord], shipment: &Shipment) -> Result<()> {
        let key_file = match shipment {
            Shipment::Commit { used, .. } => used.clone(),
            Shipment::Bytes => None,
        };
        let op = StoreBlocks {
            peer: self.link_peer.clone(),
            blocks: blocks.to_vec(),
            confirmed: false,
            key_file,
        };
        self.store.send(Exec(op)).await??;
        Ok(())
    }

    /// Has the other end store its copy of key `key` as these blocks (tagged with `auth`);
    /// returns its pool level. If it lost the key, the blocks are discarded here too
    /// (`FrameLost`).
    async fn commit(
        &self,
        blocks: &[BlockRecord],
        key: Option<u64>,
        auth: Option<&CommitAuth>,
    ) -> Result<u64> {
        let ids: Vec<BlockId> = blocks
            .iter()
            .map(|b| BlockId {
                owner: b.owner.clone(),
                seq: b.seq,
            })
            .collect();
        let tag = key.zip(auth).map(|(id, auth)| auth.tag(id, &ids));
        let commit = SourceRequest::Commit {
            frame_id: key,
            blocks: ids,
            tag,
        };
        match self.peer.send(SourceExchange(commit)).await? {
            Ok(SourceReply::Committed { level }) => Ok(level),
            Ok(other) => Err(other.unexpected("commit")),
            Err(lost @ Error::FrameLost { .. }) => {
                let audit = AuditRecord::new(
                    "key_frame_discarded",
                    serde_json::json!({
                        "peer": self.link_peer.as_str(),
                        "frame_id": key,
                        "blocks": blocks.len(),
                    }),
                );
                let op = DiscardBlocks {
                    peer: self.link_peer.clone(),
                    audit,
                };
                self.store.send(Exec(op)).await??;
                Err(lost)
            }
            Err(err) => Err(err),
        }
    }

    /// The other end holds the blocks durably: they may be used here now.
    async fn confirm(&self, blocks: &[BlockRecord]) -> Result<()> {
        let op = ConfirmBlocks {
            peer: self.link_peer.clone(),
            blocks: blocks.iter().map(|b| (b.owner.clone(), b.seq)).collect(),
        };
        self.store.send(Exec(op)).await??;
        Ok(())
    }
}

/// Blocks still to be delivered, retried on every tick until the other end has them.
struct PendingDelivery {
    blocks: Vec<BlockRecord>,
    stored: bool,
    shipment: Shipment,
}

/// How a key is cut into blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Authentication blocks first while the stream holds fewer than `AUTH_LOW_WINDOWS`
    /// (`windows` now), then key blocks.
    AuthFirst { windows: u64 },
    /// Blocks of one stream only.
    To(Stream),
}

/// Everything of a link end but its source. Sources get it in their calls: the `pub` methods
/// are what they may use.
pub struct LinkCore {
    params: LinkParams,
    pool: Addr<KeyPool>,
    peer: Addr<PeerLink>,
    store: Addr<Store>,
    next_own_seq: u64,
    next_peer_seq: u64,
    next_auth_seq: u64,
    own_level: u64,
    peer_level: u64,
    reported_level: Option<u64>,
    busy: bool,
    pending: Option<PendingDelivery>,
    /// Answering end: the key the source finished last, until the driving end commits it.
    held: Option<SharedKey>,
    /// The last failure to reach the peer or the storage, until the next success.
    failure: Option<String>,
    /// Driving end: the other end numbers the key streams differently (its next numbers):
    /// the ends realign before anything else.
    out_of_step: Option<Vec<BlockId>>,
    blocks_produced: u64,
    bytes_produced: u64,
}

impl LinkCore {
    pub fn params(&self) -> &LinkParams {
        &self.params
    }

    /// The number the next authentication block of this link takes here.
    pub fn next_auth_seq(&self) -> u64 {
        self.next_auth_seq
    }

    /// The KME-to-KME channel to the other end.
    pub fn peer(&self) -> &Addr<PeerLink> {
        &self.peer
    }

    pub fn store(&self) -> &Addr<Store> {
        &self.store
    }

    /// Both ends' pools are at their high water mark: no material is wanted now.
    pub fn pools_full(&self) -> bool {
        self.own_level.min(self.peer_level) >= self.params.high_water_bytes()
    }

    /// How many of `max` more key blocks the pools take before both are at their high water
    /// mark (each goes to the emptier end).
    pub fn wanted_blocks(&self, max: u64) -> u64 {
        let high = self.params.high_water_bytes();
        let (mut own, mut peer) = (self.own_level, self.peer_level);
        let mut wanted = 0;
        while wanted < max && own.min(peer) < high {
            self.next_owner(&mut own, &mut peer);
            wanted += 1;
        }
        wanted
    }

    /// Records the outcome of reaching the peer or the storage (logged when it changes).
    pub fn set_health(&mut self, result: &Result<()>) {
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

    /// Answering end: the key to store when the driving end commits it (None: none).
    pub fn hold(&mut self, key: Option<SharedKey>) {
        self.held = key;
    }

    /// The next number of `owner`'s stream (an owner this link `accepts`).
    fn next_seq(&mut self, owner: &Owner) -> &mut u64 {
        match owner {
            Owner::Auth => &mut self.next_auth_seq,
            Owner::Kme(kme) if *kme == self.params.me => &mut self.next_own_seq,
            Owner::Kme(_) => &mut self.next_peer_seq,
        }
    }

    /// Owner of the next block: the emptier end (its level is raised by one block).
    fn next_owner(&self, own: &mut u64, peer: &mut u64) -> Owner {
        let block = self.params.block_bytes as u64;
        if *own <= *peer {
            *own += block;
            Owner::Kme(self.params.me.clone())
        } else {
            *peer += block;
            Owner::Kme(self.params.peer.clone())
        }
    }

    /// Numbers the next block of `owner`.
    fn take_seq(&mut self, owner: &Owner) -> u64 {
        let next = self.next_seq(owner);
        let seq = *next;
        *next += 1;
        seq
    }

    /// Which stream a block of `owner` belongs to, if it is of this link at all.
    /// Whether blocks of `owner` may arrive here: pool blocks if `pools`, authentication
    /// blocks if `auth` (the source keeps a stream), nobody else's.
    fn may_receive(&self, owner: &Owner, pools: bool, auth: bool) -> bool {
        match self.stream_of(owner) {
            Some(Stream::Pools) => pools,
            Some(Stream::Auth) => auth,
            None => false,
        }
    }

    fn stream_of(&self, owner: &Owner) -> Option<Stream> {
        match owner {
            Owner::Auth => Some(Stream::Auth),
            Owner::Kme(kme) if *kme == self.params.me || *kme == self.params.peer => {
                Some(Stream::Pools)
            }
            Owner::Kme(_) => None,
        }
    }

    /// Cuts key material into numbered blocks. A remainder below one block is dropped (at
    /// both ends).
    fn cut(&mut self, key: &[u8], mut cut: Cut) -> Vec<BlockRecord> {
        let block = self.params.block_bytes;
        let window_per_block = (block as u64 / WINDOW_BYTES).max(1);
        let (mut own, mut peer) = (self.own_level, self.peer_level);
        let mut blocks = Vec::new();
        for chunk in key.chunks_exact(block) {
            let owner = match &mut cut {
                Cut::To(Stream::Auth) => Owner::Auth,
                Cut::AuthFirst { windows } if *windows < AUTH_LOW_WINDOWS => {
                    *windows += window_per_block;
                    Owner::Auth
                }
                Cut::AuthFirst { .. } | Cut::To(Stream::Pools) => {
                    self.next_owner(&mut own, &mut peer)
                }
            };
            let seq = self.take_seq(&owner);
            blocks.push(BlockRecord {
                owner,
                seq,
                data: chunk.to_vec().into(),
            });
        }
        blocks
    }

    /// The other end lost the key: its blocks are gone here too, their numbers free again.
    fn discarded(&mut self, blocks: &[BlockRecord]) {
        log::warn!(
            "link to {}: the peer lost a frame before its commit; {} blocks discarded",
            self.params.peer,
            blocks.len()
        );
        self.rewind(blocks);
    }

    /// Blocks discarded unconfirmed: their numbers are free again.
    fn rewind(&mut self, blocks: &[BlockRecord]) {
        for block in blocks {
            let next = self.next_seq(&block.owner);
            *next = (*next).min(block.seq);
        }
    }

    /// This end's next number of each key stream (for a `BlocksOutOfStep`).
    fn key_stream_numbers(&self) -> Vec<BlockId> {
        let me = Owner::Kme(self.params.me.clone());
        let peer = Owner::Kme(self.params.peer.clone());
        vec![
            BlockId {
                seq: self.next_own_seq,
                owner: me,
            },
            BlockId {
                seq: self.next_peer_seq,
                owner: peer,
            },
        ]
    }

    /// A refusal for blocks numbered differently, with this end's numbers.
    fn with_our_numbers(&self, err: Error) -> Error {
        match err {
            Error::BlocksOutOfStep { peer, .. } => Error::BlocksOutOfStep {
                peer,
                next: self.key_stream_numbers(),
            },
            other => other,
        }
    }

    /// The numbers both ends go on from: above this end's and `theirs` (the other end's,
    /// owners as in `key_stream_numbers`; any other owner is refused).
    fn realigned_numbers(&self, theirs: &[BlockId]) -> Result<Vec<BlockId>> {
        let mut next = self.key_stream_numbers();
        for id in theirs {
            let Some(ours) = next.iter_mut().find(|n| n.owner == id.owner) else {
                return Err(Error::PeerMessage(format!(
                    "{} is not a key stream of this link",
                    id.owner
                )));
            };
            ours.seq = ours.seq.max(id.seq);
        }
        Ok(next)
    }

    /// The key streams go on from `next` here (their blocks below are gone from storage).
    fn realigned(&mut self, next: &[BlockId]) {
        for id in next {
            let seq = self.next_seq(&id.owner);
            *seq = id.seq;
        }
        self.held = None;
        log::warn!(
            "link to {}: key streams realigned at {:?}; the link's unused material is discarded",
            self.params.peer,
            next.iter()
                .map(|n| (n.owner.as_str(), n.seq))
                .collect::<Vec<_>>()
        );
    }

    /// Realigns the key streams here at `next`: storage first, then the pool.
    fn realign_storage(
        &self,
        next: Vec<BlockId>,
        by: &str,
    ) -> impl std::future::Future<Output = Result<()>> {
        let op = RealignStreams {
            peer: self.params.peer.clone(),
            next: next.iter().map(|n| (n.owner.clone(), n.seq)).collect(),
            block_bytes: self.params.block_bytes,
            audit: AuditRecord::new(
                "link_realigned",
                serde_json::json!({
                    "peer": self.params.peer.as_str(),
                    "by": by,
                    "next": next.iter().map(|n| (n.owner.as_str(), n.seq)).collect::<HashMap<_, _>>(),
                }),
            ),
        };
        let own = next
            .iter()
            .find(|n| n.owner == Owner::Kme(self.params.me.clone()))
            .map_or(0, |n| n.seq.saturating_mul(self.params.block_bytes as u64));
        let (store, pool) = (self.store.clone(), self.pool.clone());
        async move {
            store.send(Exec(op)).await??;
            pool.send(ResetPool(own)).await?;
            Ok(())
        }
    }

    /// Blocks now held at both ends: own ones to the pool. Returns the authentication ones.
    fn held_by_both(&mut self, blocks: Vec<BlockRecord>) -> Vec<StoredBlock> {
        let mut own = Vec::new();
        let mut auth_blocks = Vec::new();
        for b in blocks {
            if b.owner != Owner::Auth {
                self.blocks_produced += 1;
                self.bytes_produced += b.data.len() as u64;
            }
            let seq = self.next_seq(&b.owner);
            *seq = (*seq).max(b.seq + 1);
            let stored = StoredBlock {
                seq: b.seq,
                data: b.data,
            };
            match &b.owner {
                Owner::Kme(kme) if *kme == self.params.me => own.push(stored),
                Owner::Kme(_) => {}
                Owner::Auth => auth_blocks.push(stored),
            }
        }
        if !own.is_empty() {
            self.own_level += (own.len() * self.params.block_bytes) as u64;
            self.pool.do_send(AddBlocks(own));
        }
        auth_blocks
    }
}

/// One end of a link, fed by the source `S`.
pub struct Link<S: KeySource> {
    core: LinkCore,
    source: S,
}

impl<S: KeySource> Link<S> {
    fn new(setup: LinkSetup, source: S) -> Self {
        let LinkSetup {
            params,
            state,
            pool,
            peer,
            store,
        } = setup;
        // After a restart, blocks of a source that delivers by number are committed by
        // number: their key bytes must never travel.
        let shipment = match source.delivery() {
            Delivery::Bytes => Shipment::Bytes,
            Delivery::ByNumber => Shipment::Commit {
                key: None,
                used: None,
                auth: None,
            },
        };
        let pending = (!state.unshipped.is_empty()).then_some(PendingDelivery {
            blocks: state.unshipped,
            stored: true,
            shipment,
        });
        Self {
            core: LinkCore {
                params,
                pool,
                peer,
                store,
                next_own_seq: state.next_own_seq,
                next_peer_seq: state.next_peer_seq,
                next_auth_seq: state.next_auth_seq,
                own_level: 0,
                peer_level: 0,
                reported_level: None,
                busy: false,
                pending,
                held: None,
                failure: None,
                out_of_step: None,
                blocks_produced: 0,
                bytes_produced: 0,
            },
            source,
        }
    }

    fn health(&self) -> Health {
        let core = &self.core;
        let source = self.source.health();
        let (state, reason) = match &core.failure {
            Some(failure) => (Condition::Down, Some(failure.clone())),
            None => (source.condition, source.reason),
        };
        Health {
            state,
            reason,
            source: self.source.name(),
            blocks_produced: core.blocks_produced,
            bytes_produced: core.bytes_produced,
            own_level_bytes: core.own_level,
            peer_level_bytes: core.peer_level,
            qkd: source.qkd,
        }
    }

    /// The source's work as an actor future: its step runs with the source and the core.
    fn run<T: 'static>(work: Work<S, T>) -> ResponseActFuture<Self, T> {
        match work {
            Work::Ready(value) => Box::pin(fut::ready(value)),
            Work::Later(future) => Box::pin(
                fut::wrap_future(future)
                    .map(|then, act: &mut Self, _| then(&mut act.source, &mut act.core)),
            ),
        }
    }

    /// Driving end: delivers what the source yielded.
    fn deliver(&mut self, ctx: &mut Context<Self>, produced: Produced) {
        let (blocks, shipment) = match produced {
            Produced::Nothing => return,
            Produced::Bytes { material, to } => {
                (self.core.cut(&material, Cut::To(to)), Shipment::Bytes)
            }
            Produced::Shared(key) => {
                let windows = self
                    .source
                    .auth_stream()
                    .map_or(u64::MAX, |auth| auth.windows_left());
                let cut = match key.stream {
                    Some(stream) => Cut::To(stream),
                    None => Cut::AuthFirst { windows },
                };
                if let Some(peer_next) = key.fresh_auth_from {
                    // Numbers neither end has used: the stream restarts at them at both ends.
                    self.core.next_auth_seq = self.core.next_auth_seq.max(peer_next);
                }
                let blocks = self.core.cut(&key.bytes, cut);
                let shipment = Shipment::Commit {
                    key: Some(key.id),
                    used: key.used,
                    auth: key.commit_auth,
                };
                (blocks, shipment)
            }
        };
        if !blocks.is_empty() {
            self.ship(ctx, blocks, false, shipment);
        }
    }

    /// Store (unless already stored), deliver, confirm, then hand the blocks to their users.
    fn ship(
        &mut self,
        ctx: &mut Context<Self>,
        blocks: Vec<BlockRecord>,
        stored: bool,
        shipment: Shipment,
    ) {
        self.core.busy = true;
        let to = DeliverySteps {
            store: self.core.store.clone(),
            peer: self.core.peer.clone(),
            link_peer: self.core.params.peer.clone(),
        };
        let let_go = match &shipment {
            Shipment::Commit {
                used: Some(used), ..
            } => Some(self.source.key_used(&self.core, used)),
            _ => None,
        };
        let pending = shipment.clone();
        let work = async move {
            let mut stored = stored;
            let result: Result<u64> = async {
                if !stored {
                    to.store_unconfirmed(&blocks, &pending).await?;
                    stored = true;
                }
                let level = match &pending {
                    Shipment::Bytes => to.peer.send(ShipBlocks(blocks.clone())).await??,
                    Shipment::Commit { key, auth, .. } => {
                        let level = to.commit(&blocks, *key, auth.as_ref()).await?;
                        // Both ends hold the blocks and record the key as used: its origin
                        // goes (a key file that cannot go now is destroyed when it turns up
                        // again).
                        if let Some(let_go) = let_go {
                            let_go.await;
                        }
                        level
                    }
                };
                to.confirm(&blocks).await?;
                Ok(level)
            }
            .await;
            (result, blocks, stored)
        };
        ctx.spawn(fut::wrap_future(work).map(
            move |(result, blocks, stored), act: &mut Self, _| {
                act.core.busy = false;
                match result {
                    Ok(level) => {
                        act.core.peer_level = level;
                        act.core.set_health(&Ok(()));
                        let from_key_file =
                            matches!(shipment, Shipment::Commit { used: Some(_), .. });
                        act.on_held_by_both(blocks, from_key_file);
                    }
                    Err(Error::FrameLost { .. }) => act.core.discarded(&blocks),
                    Err(Error::BlocksOutOfStep { peer, next }) => {
                        // Refused whole: nothing of it was stored there.
                        act.core.rewind(&blocks);
                        act.core.out_of_step = Some(next.clone());
                        act.core
                            .set_health(&Err(Error::BlocksOutOfStep { peer, next }));
                    }
                    Err(err) => {
                        // Kept and retried on a later tick, with the same numbers and bytes.
                        act.core.pending = Some(PendingDelivery {
                            blocks,
                            stored,
                            shipment,
                        });
                        act.core.set_health(&Err(err));
                    }
                }
            },
        ));
    }

    /// Blocks now held at both ends: own ones to the pool, authentication ones to the stream.
    /// Authentication blocks `from_key_file` (an operator key) restart the stream, as the
    /// storage did when it stored them.
    fn on_held_by_both(&mut self, blocks: Vec<BlockRecord>, from_key_file: bool) {
        let auth_blocks = self.core.held_by_both(blocks);
        if let Some(auth) = self.source.auth_stream() {
            if let (true, Some(first)) = (from_key_file, auth_blocks.first()) {
                auth.restart_at(first.seq);
            }
            auth.append(auth_blocks);
        }
    }
}

impl<S: KeySource> Actor for Link<S> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let work @ Work::Later(_) = self.source.start(&mut self.core) {
            ctx.spawn(Self::run(work));
        }
        let every = Duration::from_millis(self.core.params.tick_ms.max(1));
        ctx.run_interval(every, |act, ctx| act.tick(ctx));
    }
}

impl<S: KeySource> Link<S> {
    fn tick(&mut self, ctx: &mut Context<Self>) {
        if !self.core.params.is_generator() {
            self.report_level(ctx);
            return;
        }
        if self.core.busy {
            return;
        }
        if let Some(theirs) = self.core.out_of_step.clone() {
            self.realign(ctx, &theirs);
            return;
        }
        if let Some(pending) = self.core.pending.take() {
            self.ship(ctx, pending.blocks, pending.stored, pending.shipment);
            return;
        }
        match self.source.drive(&mut self.core, Instant::now()) {
            Work::Ready(produced) => self.deliver(ctx, produced),
            work @ Work::Later(_) => {
                self.core.busy = true;
                ctx.spawn(Self::run(work).map(|produced, act: &mut Self, ctx| {
                    act.core.busy = false;
                    act.deliver(ctx, produced)
                }));
            }
        }
    }

    /// Driving end: realigns both ends' key streams above both (`theirs`: the other end's
    /// numbers), here first; retried on later ticks until the other end has too.
    fn realign(&mut self, ctx: &mut Context<Self>, theirs: &[BlockId]) {
        let next = match self.core.realigned_numbers(theirs) {
            Ok(next) => next,
            Err(err) => {
                self.core.out_of_step = None;
                self.core.set_health(&Err(err));
                return;
            }
        };
        self.core.busy = true;
        let here = self.core.realign_storage(next.clone(), "this end");
        let peer = self.core.peer.clone();
        let request = SourceRequest::Realign { next: next.clone() };
        let work = async move {
            here.await?;
            match peer.send(SourceExchange(request)).await? {
                Ok(SourceReply::Realigned {}) => Ok(()),
                Ok(other) => Err(other.unexpected("realign")),
                Err(err) => Err(err),
            }
        };
        ctx.spawn(
            fut::wrap_future(work).map(move |result: Result<()>, act: &mut Self, _| {
                act.core.busy = false;
                match result {
                    Ok(()) => {
                        act.core.realigned(&next);
                        act.core.out_of_step = None;
                        act.core.set_health(&Ok(()));
                    }
                    Err(Error::BlocksOutOfStep { peer, next: theirs }) => {
                        act.core.out_of_step = Some(theirs.clone());
                        act.core
                            .set_health(&Err(Error::BlocksOutOfStep { peer, next: theirs }));
                    }
                    Err(err) => act.core.set_health(&Err(err)),
                }
            }),
        );
    }

    /// Receiving end: tell the generator our level when it changed.
    fn report_level(&mut self, ctx: &mut Context<Self>) {
        let core = &mut self.core;
        if core.busy || core.reported_level == Some(core.own_level) {
            return;
        }
        core.busy = true;
        let level = core.own_level;
        let peer = core.peer.clone();
        ctx.spawn(
            fut::wrap_future(async move { peer.send(ReportLevel(level)).await }).map(
                move |result, act: &mut Self, _| {
                    act.core.busy = false;
                    let result = result.map_err(Error::from).and_then(|r| r);
                    if result.is_ok() {
                        act.core.reported_level = Some(level);
                    }
                    act.core.set_health(&result);
                },
            ),
        );
    }
}

impl<S: KeySource> Handler<PoolLevel> for Link<S> {
    type Result = ();

    fn handle(&mut self, msg: PoolLevel, _ctx: &mut Context<Self>) {
        self.core.own_level = msg.0;
    }
}

/// Blocks shipped with their bytes by the driving end (courier blocks; on a BB84 link only the
/// bootstrap authentication key). Sent by the KME-to-KME edge. Result: our pool level.
#[derive(Message)]
#[rtype(result = "Result<u64>")]
pub struct ReceiveBlocks(pub Vec<BlockRecord>);

/// Atomic, like `SourceFromPeer`: a commit never looks at the stream while a shipment to it is
/// half stored.
impl<S: KeySource> Handler<ReceiveBlocks> for Link<S> {
    type Result = AtomicResponse<Self, Result<u64>>;

    fn handle(&mut self, msg: ReceiveBlocks, _ctx: &mut Context<Self>) -> Self::Result {
        AtomicResponse::new(self.receive_blocks(msg.0))
    }
}

impl<S: KeySource> Link<S> {
    fn receive_blocks(&mut self, blocks: Vec<BlockRecord>) -> ResponseActFuture<Self, Result<u64>> {
        let params = &self.core.params;
        if params.is_generator() {
            let err = Error::PeerMessage(format!(
                "{} generates this link's material; it accepts no shipments",
                params.me
            ));
            return Box::pin(fut::ready(Err(err)));
        }
        // Key bytes travel only from sources that deliver them; a source with an
        // authentication stream takes its first key this way.
        let bytes = self.source.delivery() == Delivery::Bytes;
        let auth = self.source.auth_stream().is_some();
        let core = &self.core;
        if let Some(bad) = blocks.iter().find(|b| {
            !core.may_receive(&b.owner, bytes, auth) || b.data.len() != core.params.block_bytes
        }) {
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
    /// `key_file`: the record of the key they come from, stored with them.
    fn store_received(
        &mut self,
        blocks: Vec<BlockRecord>,
        key_file: Option<UsedKeyFile>,
    ) -> ResponseActFuture<Self, Result<u64>> {
        let store = self.core.store.clone();
        let from_key_file = key_file.is_some();
        let op = StoreBlocks {
            peer: self.core.params.peer.clone(),
            blocks: blocks.clone(),
            confirmed: true,
            key_file,
        };
        let work = async move {
            let outcomes = store.send(Exec(op)).await??;
            let fresh: Vec<BlockRecord> = blocks
                .into_iter()
                .zip(outcomes)
                .filter(|(_, outcome)| *outcome == BlockOutcome::Stored)
                .map(|(b, _)| b)
                .collect();
            Ok(fresh)
        };
        Box::pin(fut::wrap_future(work).map(
            move |result: Result<Vec<BlockRecord>>, act: &mut Self, _| {
                let fresh = result.map_err(|err| act.core.with_our_numbers(err))?;
                act.on_held_by_both(fresh, from_key_file);
                act.core.reported_level = Some(act.core.own_level);
                act.core.set_health(&Ok(()));
                Ok(act.core.own_level)
            },
        ))
    }
}

/// A message of the driving end's source. Sent by the KME-to-KME edge.
/// Result: our answer (for BB84: envelopes, our report once our part of the frame is over).
#[derive(Message)]
#[rtype(result = "Result<SourceReply>")]
pub struct SourceFromPeer(pub SourceRequest);

impl<S: KeySource> Handler<SourceFromPeer> for Link<S> {
    type Result = AtomicResponse<Self, Result<SourceReply>>;

    fn handle(&mut self, msg: SourceFromPeer, _ctx: &mut Context<Self>) -> Self::Result {
        let params = &self.core.params;
        let answer = match msg.0 {
            _ if params.is_generator() => Self::run(Work::refuse(format!(
                "{} drives the link with {}; it takes no key-source messages",
                params.me, params.peer
            ))),
            SourceRequest::Commit {
                frame_id,
                blocks,
                tag,
            } if self.source.delivery() == Delivery::ByNumber => self.commit(frame_id, blocks, tag),
            SourceRequest::Realign { next } => self.realign_here(next),
            request => Self::run(self.source.answer(request, &mut self.core)),
        };
        AtomicResponse::new(answer)
    }
}

type Reply<S> = ResponseActFuture<Link<S>, Result<SourceReply>>;

/// Realignment, at the end that does not drive.
impl<S: KeySource> Link<S> {
    /// Goes on from the driving end's numbers `next`, if they are above this end's own
    /// (else refuses with its own, for the driving end to try again).
    fn realign_here(&mut self, next: Vec<BlockId>) -> Reply<S> {
        let core = &self.core;
        let ours = core.key_stream_numbers();
        let above_ours = next.len() == ours.len()
            && ours
                .iter()
                .all(|o| next.iter().any(|n| n.owner == o.owner && n.seq >= o.seq));
        if !above_ours {
            return Self::run(Work::Ready(Err(Error::BlocksOutOfStep {
                peer: core.params.me.to_string(),
                next: ours,
            })));
        }
        let here = core.realign_storage(next.clone(), "the other end");
        Box::pin(
            fut::wrap_future(here).map(move |result: Result<()>, act: &mut Self, _| {
                result?;
                act.core.realigned(&next);
                Ok(SourceReply::Realigned {})
            }),
        )
    }
}

/// Commits, at the end that does not drive (sources that deliver by number).
impl<S: KeySource> Link<S> {
    /// Stores the held key as the blocks the driving end names (if the key came with a
    /// `CommitAuth`, only with a tag that verifies); without the key, answers from what is
    /// stored: all named blocks held (a retried commit) or the key is lost.
    fn commit(&mut self, key_id: Option<u64>, ids: Vec<BlockId>, tag: Option<u64>) -> Reply<S> {
        let auth = self.source.auth_stream().is_some();
        let core = &mut self.core;
        if let Some(bad) = ids
            .iter()
            .find(|id| !core.may_receive(&id.owner, true, auth))
        {
            return Self::run(Work::refuse(format!(
                "block owner {} is not of this link",
                bad.owner
            )));
        }
        let held = match (&core.held, key_id) {
            (Some(held), Some(id)) if held.id == id => core.held.take(),
            _ => None,
        };
        let Some(key) = held else {
            let held: Vec<bool> = ids
                .iter()
                .map(|id| id.seq < *core.next_seq(&id.owner))
                .collect();
            // An empty commit (a file-drop file shorter than one block) proves nothing: lost.
            return if !held.is_empty() && held.iter().all(|h| *h) {
                Self::run(Work::Ready(Ok(SourceReply::Committed {
                    level: core.own_level,
                })))
            } else if held.iter().any(|h| *h) {
                Self::run(Work::refuse(
                    "commit names blocks stored here and blocks not stored here".into(),
                ))
            } else {
                Self::run(Work::Ready(Err(Error::FrameLost {
                    peer: core.params.me.to_string(),
                })))
            };
        };
        if let Some(auth) = &key.commit_auth {
            if !tag.is_some_and(|tag| auth.verifies(key.id, &ids, tag)) {
                // Kept for the genuine commit, which the driving end sends again.
                core.held = Some(key);
                return Self::run(Work::refuse(
                    "the commit's authentication tag does not verify: not the blocks the frame's driving end named".into(),
                ));
            }
        }
        let block = core.params.block_bytes;
        // Exactly the key's whole blocks: a commit may not take a key for less.
        if ids.len() != key.bytes.len() / block {
            return Self::run(Work::refuse(format!(
                "commit names {} blocks, the frame's key holds {}",
                ids.len(),
                key.bytes.len() / block
            )));
        }
        let blocks = ids
            .into_iter()
            .zip(key.bytes.chunks_exact(block))
            .map(|(id, data)| BlockRecord {
                owner: id.owner,
                seq: id.seq,
                data: data.to_vec().into(),
            })
            .collect();
        let let_go = key
            .used
            .as_ref()
            .map(|used| self.source.key_used(&self.core, used));
        let record = key.used.clone();
        let stored = self
            .store_received(blocks, record)
            .then(move |level, act: &mut Self, _| {
                if level.is_err() {
                    // A passing storage failure: the retried commit finds the key again.
                    act.core.held = Some(key);
                }
                let released = async move {
                    let level = level?;
                    // Used here for good: its origin goes before the driving end hears so.
                    if let Some(let_go) = let_go {
                        let_go.await;
                    }
                    Ok(SourceReply::Committed { level })
                };
                fut::wrap_future(released)
            });
        Box::pin(stored)
    }
}

/// The other end's pool level. Sent by the KME-to-KME edge.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PeerLevel(pub u64);

impl<S: KeySource> Handler<PeerLevel> for Link<S> {
    type Result = ();

    fn handle(&mut self, msg: PeerLevel, _ctx: &mut Context<Self>) {
        self.core.peer_level = msg.0;
    }
}

/// Current health. Sent by the HTTP edge (status).
#[derive(Message)]
#[rtype(result = "Health")]
pub struct LinkHealth;

impl<S: KeySource> Handler<LinkHealth> for Link<S> {
    type Result = MessageResult<LinkHealth>;

    fn handle(&mut self, _msg: LinkHealth, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.health())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::key_source::SourceHealth;
    use crate::link::sources::courier::Courier;
    use crate::types::KmeId;

    /// A courier link end kme-a — kme-b with 1 KiB blocks, pools full at 3200 bytes, and
    /// actors that never run (nothing here sends to them and waits).
    fn link() -> Link<Courier> {
        link_with(Courier::new(1024))
    }

    fn link_with<S: KeySource>(source: S) -> Link<S> {
        let setup = LinkSetup {
            params: LinkParams::for_tests(1024, 100),
            state: LinkState {
                next_own_seq: 5,
                next_peer_seq: 7,
                next_auth_seq: 3,
                unshipped: Vec::new(),
            },
            pool: Context::<KeyPool>::new().address(),
            peer: Context::<PeerLink>::new().address(),
            store: Context::<Store>::new().address(),
        };
        Link::new(setup, source)
    }

    fn core(own_level: u64, peer_level: u64) -> LinkCore {
        let mut core = link().core;
        core.own_level = own_level;
        core.peer_level = peer_level;
        core
    }

    fn owners(blocks: &[BlockRecord]) -> Vec<(String, u64)> {
        blocks
            .iter()
            .map(|b| (b.owner.to_string(), b.seq))
            .collect()
    }

    #[actix::test]
    async fn blocks_are_wanted_until_both_pools_are_full() {
        assert!(!core(0, 0).pools_full());
        // Four blocks for each end take both from 0 to 4096 >= 3200.
        assert_eq!(core(0, 0).wanted_blocks(16), 8);
        assert_eq!(core(0, 0).wanted_blocks(3), 3);
        // Only this end is short: four blocks take it from 0 to 4096 >= 3200.
        assert_eq!(core(0, 3200).wanted_blocks(16), 4);
        assert!(core(3200, 5000).pools_full());
        assert_eq!(core(3200, 5000).wanted_blocks(16), 0);
    }

    #[actix::test]
    async fn cuts_number_blocks_for_the_emptier_end_and_the_auth_stream() {
        let key = vec![7u8; 3 * 1024 + 100];
        let mut link = core(1024, 0);
        // The emptier end first; the remainder below one block is dropped.
        let blocks = link.cut(&key, Cut::To(Stream::Pools));
        assert_eq!(
            owners(&blocks),
            [("kme-b", 7), ("kme-a", 5), ("kme-b", 8)].map(|(o, s)| (o.to_string(), s))
        );
        assert!(blocks.iter().all(|b| b.data.len() == 1024));
        // 1 KiB holds three windows: one authentication block lifts 62 windows above 64.
        let blocks = link.cut(&key, Cut::AuthFirst { windows: 62 });
        assert_eq!(
            owners(&blocks),
            [("#auth", 3), ("kme-b", 9), ("kme-a", 6)].map(|(o, s)| (o.to_string(), s))
        );
        let blocks = link.cut(&key[..2048], Cut::To(Stream::Auth));
        assert_eq!(
            owners(&blocks),
            [("#auth", 4), ("#auth", 5)].map(|(o, s)| (o.to_string(), s))
        );
    }

    #[actix::test]
    async fn lost_blocks_free_their_numbers_and_accepted_ones_move_them_on() {
        let mut link = core(0, 0);
        let blocks = link.cut(&[1u8; 2048], Cut::To(Stream::Pools));
        assert_eq!(link.next_own_seq, 6);
        link.discarded(&blocks);
        assert_eq!((link.next_own_seq, link.next_peer_seq), (5, 7));
        let auth_blocks = link.cut(&[2u8; 2048], Cut::To(Stream::Auth));
        let auth = link.held_by_both(auth_blocks);
        assert_eq!(auth.iter().map(|b| b.seq).collect::<Vec<_>>(), [3, 4]);
        assert_eq!((link.next_auth_seq, link.blocks_produced), (5, 0));
        let own = BlockRecord {
            owner: Owner::Kme(KmeId::new("kme-a")),
            seq: 9,
            data: vec![3u8; 1024].into(),
        };
        assert!(link.held_by_both(vec![own]).is_empty());
        assert_eq!((link.next_own_seq, link.own_level), (10, 1024));
        assert_eq!((link.blocks_produced, link.bytes_produced), (1, 1024));
    }

    #[actix::test]
    async fn blocks_belong_to_the_two_ends_or_the_auth_stream() {
        let link = core(0, 0);
        let stream = |owner: &str| link.stream_of(&Owner::parse(owner));
        assert_eq!(stream("kme-a"), Some(Stream::Pools));
        assert_eq!(stream("kme-b"), Some(Stream::Pools));
        assert_eq!(stream("#auth"), Some(Stream::Auth));
        assert_eq!(stream("kme-c"), None);
    }

    /// A source whose own health is degraded (as a BB84 link after aborted frames).
    struct DegradedSource;

    impl KeySource for DegradedSource {
        fn name(&self) -> &'static str {
            "degraded"
        }

        fn delivery(&self) -> Delivery {
            Delivery::ByNumber
        }

        fn drive(&mut self, _link: &mut LinkCore, _now: Instant) -> Work<Self, Produced> {
            Work::Ready(Produced::Nothing)
        }

        fn health(&self) -> SourceHealth {
            SourceHealth {
                condition: Condition::Degraded,
                reason: Some("frames aborted".into()),
                qkd: None,
            }
        }
    }

    #[actix::test]
    async fn a_failure_to_reach_the_peer_is_reported_before_the_source_health() {
        let mut link = link_with(DegradedSource);
        let health = link.health();
        assert_eq!(
            (health.state, health.source, health.reason.as_deref()),
            (Condition::Degraded, "degraded", Some("frames aborted"))
        );
        link.core
            .set_health(&Err(Error::Unavailable("peer unreachable".into())));
        let health = link.health();
        assert_eq!(health.state, Condition::Down);
        assert!(health
            .reason
            .is_some_and(|r| r.contains("peer unreachable")));
        link.core.set_health(&Ok(()));
        assert_eq!(link.health().state, Condition::Degraded);
    }

    #[actix::test]
    async fn source_work_runs_its_future_then_its_step() {
        let mut link = core(0, 0);
        let work: Work<u64, u64> = Work::later(async { 2 }, |out, sum: &mut u64, link| {
            *sum += out + link.params().block_bytes as u64;
            *sum
        });
        let Work::Later(future) = work else {
            panic!("a future is later work");
        };
        let then = future.await;
        let mut sum = 1;
        assert_eq!(then(&mut sum, &mut link), 1027);
    }
}
