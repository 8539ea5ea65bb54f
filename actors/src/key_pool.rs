//! KeyPool: the available key material of this end of one QKD link.
//!
//! Owns: this end's confirmed blocks not yet handed out (in memory, in order), the allocation
//! cursor in this end's stream, and the counts that `status` reports. The two ends of a link
//! allocate from disjoint blocks (each block has one owner), so they never race.
//! Handles: `Deliver` (enc_keys, from the HTTP edge), `PoolStatus` (status), `AddBlocks` (from
//! `Link`, when new material is confirmed at both ends), `WatchLevel` (from `Link`, once).
//! Sends: `Activate` to `PeerLink` (bind positions to key_IDs at the slave's KME), then
//! `CommitDelivery` to `Store`; `PoolLevel` to `Link` so that it replenishes.
//! Reservation is synchronous in `handle`, so concurrent requests never get the same bytes;
//! any failure after it burns the material (it is never returned to the pool).
//! Mailbox: bounded; the edge uses `send` under its request timeout, so a full pool of
//! waiting requests answers 503 instead of hanging.

use std::collections::VecDeque;

use actix::prelude::*;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::peer::peer_link::{Activate, PeerLink};
use crate::relay::seal::seal;
use crate::storage::audit::{AuditRecord, Delivered};
use crate::storage::db::StoredBlock;
use crate::storage::ops::{AppendAudit, CommitDelivery};
use crate::storage::store::{Exec, Store};
use crate::types::{
    Binding, Branch, Key, KeyLimits, LinkParams, Owner, RelayLeg, SaeId, MAC_KEY_BYTES,
};

const MAILBOX_CAPACITY: usize = 1024;

pub struct KeyPool {
    params: LinkParams,
    /// Own confirmed blocks, consecutive numbers, the first possibly partly used.
    blocks: VecDeque<StoredBlock>,
    /// Next unallocated byte of this end's stream.
    cursor: u64,
    store: Addr<Store>,
    peer: Addr<PeerLink>,
    level_watcher: Option<Recipient<PoolLevel>>,
}

impl KeyPool {
    /// `cursor` and `blocks` come from the database (`db::stream_state`, `db::blocks`).
    pub fn new(
        params: LinkParams,
        cursor: u64,
        blocks: Vec<StoredBlock>,
        store: Addr<Store>,
        peer: Addr<PeerLink>,
    ) -> Self {
        let mut pool = Self {
            params,
            blocks: VecDeque::new(),
            cursor,
            store,
            peer,
            level_watcher: None,
        };
        pool.add_blocks(blocks);
        pool
    }

    fn block_bytes(&self) -> u64 {
        self.params.block_bytes as u64
    }

    /// Bytes that can be handed out now.
    pub fn available(&self) -> u64 {
        match self.blocks.back() {
            Some(last) => end_of(last.seq, self.block_bytes()).saturating_sub(self.cursor),
            None => 0,
        }
    }

    fn add_blocks(&mut self, blocks: Vec<StoredBlock>) {
        let block = self.block_bytes();
        for b in blocks {
            if b.data.len() as u64 != block || end_of(b.seq, block) <= self.cursor {
                continue;
            }
            match self.blocks.back() {
                Some(last) if b.seq <= last.seq => continue,
                Some(last) if b.seq != last.seq + 1 => {
                    // A gap: material between is not usable here; restart after it.
                    log::warn!(
                        "link {}: block {} follows {}; skipping the gap",
                        self.params.peer,
                        b.seq,
                        last.seq
                    );
                    self.blocks.clear();
                    self.cursor = b.seq.saturating_mul(block);
                }
                None => self.cursor = self.cursor.max(b.seq.saturating_mul(block)),
                _ => {}
            }
            self.blocks.push_back(b);
        }
    }

    /// Takes `len` bytes at the cursor; the caller checked `available`. A pool that holds less
    /// than it counted (a block shorter than the link's block size) is an error, and the bytes
    /// passed over stay taken: material is never offered twice.
    fn take(&mut self, len: u64) -> Result<Vec<u8>> {
        let block = self.block_bytes();
        let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        let end = self.cursor + len;
        while self.cursor < end {
            let short = || Error::Storage(format!("the pool holds less than {len} bytes"));
            let front = self.blocks.front().ok_or_else(short)?;
            let base = front.seq.saturating_mul(block);
            let to = end.min(base.saturating_add(block)) - base;
            let range = usize::try_from(self.cursor.saturating_sub(base))
                .ok()
                .zip(usize::try_from(to).ok());
            let slice = range.and_then(|(from, to)| front.data.get(from..to));
            out.extend_from_slice(slice.ok_or_else(short)?);
            self.cursor = base.saturating_add(to).min(end);
            if self.cursor >= base.saturating_add(block) {
                self.blocks.pop_front();
            }
        }
        Ok(out)
    }

    /// The peer says positions below `high_mark` are bound there: never offer them again.
    fn burn_to(&mut self, high_mark: u64) {
        if high_mark <= self.cursor {
            return;
        }
        let skip = high_mark - self.cursor;
        match self.take(skip.min(self.available())) {
            Ok(burned) => log::warn!(
                "link {}: burned {} bytes up to position {high_mark} already bound at the peer",
                self.params.peer,
                burned.len()
            ),
            Err(err) => log::error!(
                "link {}: burning up to {high_mark}: {err}",
                self.params.peer
            ),
        }
        self.cursor = self.cursor.max(high_mark);
    }

    fn report_level(&self) {
        if let Some(watcher) = &self.level_watcher {
            // Advisory: a full watcher mailbox only delays replenishment by one tick.
            let _ = watcher.try_send(PoolLevel(self.available()));
        }
    }

    fn counts(&self) -> PoolCounts {
        let limits = self.params.limits;
        let key_bytes = u64::from(limits.key_size / 8).max(1);
        PoolCounts {
            stored_key_count: (self.available() / key_bytes).min(limits.max_key_count),
            available_bytes: self.available(),
            limits,
        }
    }
}

/// First position after block `seq`.
fn end_of(seq: u64, block: u64) -> u64 {
    seq.saturating_add(1).saturating_mul(block)
}

impl Actor for KeyPool {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
    }
}

/// enc_keys: hand `number` keys of `size_bits` to `master`, bound for `slaves` at the peer.
/// Sent by the HTTP edge. Result: the keys, after both KMEs made them durable; or
/// `PoolExhausted` at once, or a peer/storage error (then the material is burned).
#[derive(Message)]
#[rtype(result = "Result<Vec<Key>>")]
pub struct Deliver {
    pub master: SaeId,
    pub slaves: Vec<SaeId>,
    pub number: u32,
    pub size_bits: u32,
    pub request_id: Uuid,
    /// A leg of a relay (see `relay`); None: the slaves' KME is this neighbour.
    pub relay: Option<Outbound>,
}

/// A relay leg sent over this link.
pub struct Outbound {
    pub relay_id: Uuid,
    /// The KMEs the neighbour forwards to.
    pub onward: Vec<Branch>,
    /// None: the keys are this link's material (positions only travel). Some: these keys
    /// (key_ID, bytes), sealed with pads of this link.
    pub seal: Option<Vec<Key>>,
}

impl Handler<Deliver> for KeyPool {
    type Result = ResponseActFuture<Self, Result<Vec<Key>>>;

    fn handle(&mut self, msg: Deliver, _ctx: &mut Context<Self>) -> Self::Result {
        Box::pin(self.deliver_all(vec![msg]).map(|mut outcomes, _, _| {
            outcomes
                .pop()
                .unwrap_or_else(|| Err(Error::Unavailable("a delivery without outcome".into())))
        }))
    }
}

/// Several deliveries over this link at once (the relay legs of one activation batch): one
/// activation message to `PeerLink`, one commit. Sent by `Relay`. Result: the outcome of
/// each, in order.
#[derive(Message)]
#[rtype(result = "Vec<Result<Vec<Key>>>")]
pub struct DeliverAll(pub Vec<Deliver>);

impl Handler<DeliverAll> for KeyPool {
    type Result = ResponseActFuture<Self, Vec<Result<Vec<Key>>>>;

    fn handle(&mut self, msg: DeliverAll, _ctx: &mut Context<Self>) -> Self::Result {
        self.deliver_all(msg.0)
    }
}

/// Deliveries whose material is taken: their keys, and the request each serves.
struct Taken {
    index: usize,
    keys: Vec<Key>,
    request_id: Uuid,
}

impl KeyPool {
    /// Takes the material of each delivery in order (one the pool cannot cover fails at once
    /// with `PoolExhausted`), then has the peer bind them all and commits them here, both at
    /// once. The cursor moves past the material either way, so a failure only burns it.
    fn deliver_all(
        &mut self,
        legs: Vec<Deliver>,
    ) -> ResponseActFuture<Self, Vec<Result<Vec<Key>>>> {
        let mut outcomes: Vec<Result<Vec<Key>>> = Vec::with_capacity(legs.len());
        let (mut bindings, mut audits, mut taken) = (Vec::new(), Vec::new(), Vec::new());
        for (index, msg) in legs.iter().enumerate() {
            match self.take_for(msg) {
                Ok((keys, binding, audit)) => {
                    bindings.push(binding);
                    audits.push(audit);
                    taken.push(Taken {
                        index,
                        keys,
                        request_id: msg.request_id,
                    });
                    outcomes.push(Ok(Vec::new()));
                }
                Err(err) => outcomes.push(Err(err)),
            }
        }
        self.report_level();
        if taken.is_empty() {
            return Box::pin(fut::ready(outcomes));
        }
        let commit = CommitDelivery {
            peer: self.params.peer.clone(),
            owner: Owner::Kme(self.params.me.clone()),
            position: self.cursor,
            block_bytes: self.params.block_bytes,
            audits,
        };
        let peer = self.peer.clone();
        let store = self.store.clone();
        let work = async move {
            let (bound, committed) =
                futures_util::future::join(async { peer.send(Activate(bindings)).await? }, async {
                    store.send(Exec(commit)).await?
                })
                .await;
            let failed = bound.err().or(committed.err());
            if let Some(err) = &failed {
                // Whatever half stands (delivery records here, keys bound at the slave's
                // KME), say in the trail that the SAEs never got these keys.
                let request_ids: Vec<Uuid> = taken.iter().map(|t| t.request_id).collect();
                let withdrawn = AuditRecord::new(
                    "keys_withdrawn",
                    serde_json::json!({"request_ids": request_ids, "reason": err.to_string()}),
                );
                if let Ok(Err(audit_err)) | Err(audit_err) = store
                    .send(Exec(AppendAudit(withdrawn)))
                    .await
                    .map_err(Error::from)
                {
                    log::error!("cannot audit a withdrawn delivery: {audit_err}");
                }
            }
            for t in taken {
                if let Some(slot) = outcomes.get_mut(t.index) {
                    *slot = match &failed {
                        Some(err) => Err(err.clone()),
                        None => Ok(t.keys),
                    };
                }
            }
            (outcomes, failed)
        };
        Box::pin(
            fut::wrap_future(work).map(|(outcomes, failed), act: &mut Self, _| {
                if let Some(Error::ActivationRejected { high_mark, .. }) = failed {
                    act.burn_to(high_mark);
                }
                outcomes
            }),
        )
    }

    /// Takes the material of one delivery: its keys, binding and audit record.
    fn take_for(&mut self, msg: &Deliver) -> Result<(Vec<Key>, Binding, AuditRecord)> {
        let key_bytes = msg.size_bits / 8;
        let sealing = msg.relay.as_ref().is_some_and(|r| r.seal.is_some());
        let mac = if sealing { MAC_KEY_BYTES as u64 } else { 0 };
        let need = u64::from(msg.number) * u64::from(key_bytes) + mac;
        if need == mac || self.available() < need {
            return Err(Error::PoolExhausted {
                peer: self.params.peer.to_string(),
            });
        }
        let start = self.cursor;
        let material = self.take(need).inspect_err(|err| {
            log::error!("link {}: {err}", self.params.peer);
        })?;
        let end = self.cursor;
        let (keys, binding) = bind(msg, start, key_bytes, material)?;
        let audit = AuditRecord::new(
            "keys_delivered",
            Delivered {
                request_id: msg.request_id,
                master: &msg.master,
                slaves: &msg.slaves,
                link: self.params.peer.as_str(),
                start: Some(start),
                end: Some(end),
                size: msg.size_bits,
                key_IDs: binding.key_ids.clone(),
            },
        );
        Ok((keys, binding, audit))
    }
}

/// The keys of `msg` and their binding at `start`: the material itself, or for a sealed relay
/// leg the given keys sealed with it.
fn bind(
    msg: &Deliver,
    start: u64,
    key_bytes: u32,
    material: Vec<u8>,
) -> Result<(Vec<Key>, Binding)> {
    let keys: Vec<Key> = match msg.relay.as_ref().and_then(|r| r.seal.as_ref()) {
        Some(keys) => keys.clone(),
        None => material
            .chunks(key_bytes as usize)
            .map(|chunk| Key {
                id: Uuid::now_v7(),
                material: chunk.to_vec(),
            })
            .collect(),
    };
    let mut binding = Binding {
        master: msg.master.clone(),
        slaves: msg.slaves.clone(),
        start,
        len: key_bytes,
        key_ids: keys.iter().map(|k| k.id).collect(),
        relay: None,
    };
    if let Some(out) = &msg.relay {
        let sealed = match &out.seal {
            Some(keys) => {
                let plain: Vec<Vec<u8>> = keys.iter().map(|k| k.material.clone()).collect();
                Some(seal(
                    &binding,
                    &out.relay_id,
                    &out.onward,
                    &plain,
                    &material,
                )?)
            }
            None => None,
        };
        binding.relay = Some(RelayLeg {
            relay_id: out.relay_id,
            onward: out.onward.clone(),
            sealed,
        });
    }
    Ok((keys, binding))
}

/// Counts for `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCounts {
    pub stored_key_count: u64,
    pub available_bytes: u64,
    pub limits: KeyLimits,
}

/// status: what this end can hand out now. Sent by the HTTP edge and by `Link`.
#[derive(Message)]
#[rtype(result = "PoolCounts")]
pub struct PoolStatus;

impl Handler<PoolStatus> for KeyPool {
    type Result = MessageResult<PoolStatus>;

    fn handle(&mut self, _msg: PoolStatus, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.counts())
    }
}

/// New own blocks, durable and confirmed at both ends. Sent by `Link`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddBlocks(pub Vec<StoredBlock>);

impl Handler<AddBlocks> for KeyPool {
    type Result = ();

    fn handle(&mut self, msg: AddBlocks, _ctx: &mut Context<Self>) {
        let was_empty = self.available() == 0;
        self.add_blocks(msg.0);
        if was_empty && self.available() > 0 {
            log::info!("link {}: pool refilled", self.params.peer);
        }
        self.report_level();
    }
}

/// The pool's available bytes, sent to the watcher whenever they change.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PoolLevel(pub u64);

/// The link's key streams realigned (see `link`): every block here is gone from storage, and
/// this end's stream goes on at `position` (never back). Sent by `Link`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ResetPool(pub u64);

impl Handler<ResetPool> for KeyPool {
    type Result = ();

    fn handle(&mut self, msg: ResetPool, _ctx: &mut Context<Self>) {
        self.blocks.clear();
        self.cursor = self.cursor.max(msg.0);
        self.report_level();
    }
}

/// Register the actor that replenishes this pool (the link's `Link`). Sent once at start-up.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WatchLevel(pub Recipient<PoolLevel>);

impl Handler<WatchLevel> for KeyPool {
    type Result = ();

    fn handle(&mut self, msg: WatchLevel, _ctx: &mut Context<Self>) {
        self.level_watcher = Some(msg.0);
        self.report_level();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::KmeId;

    fn block(seq: u64, len: usize) -> StoredBlock {
        StoredBlock {
            seq,
            data: (0..len)
                .map(|i| (seq as usize * 31 + i) as u8)
                .collect::<Vec<u8>>()
                .into(),
        }
    }

    #[actix::test]
    async fn take_crosses_blocks_and_never_repeats_bytes() {
        let mut pool = pool(0, vec![block(0, 8), block(1, 8), block(2, 8)]);
        assert_eq!(pool.available(), 24);
        let a = pool.take(5).unwrap();
        let b = pool.take(6).unwrap();
        assert_eq!(a, block(0, 8).data[..5].to_vec());
        let mut expected = block(0, 8).data[5..].to_vec();
        expected.extend_from_slice(&block(1, 8).data[..3]);
        assert_eq!(b, expected);
        assert_eq!(pool.available(), 13);
        pool.burn_to(20);
        assert_eq!(pool.available(), 4);
        assert_eq!(pool.take(4).unwrap(), block(2, 8).data[4..].to_vec());
    }

    #[actix::test]
    async fn resumes_after_cursor_and_skips_gaps() {
        let mut pool = pool(12, vec![block(1, 8), block(2, 8)]);
        assert_eq!(pool.available(), 12);
        pool.add_blocks(vec![block(5, 8)]);
        assert_eq!(pool.available(), 8, "material before a gap is not used");
        assert_eq!(pool.take(8).unwrap(), *block(5, 8).data);
    }

    #[actix::test]
    async fn a_pool_holding_less_than_it_counts_refuses_and_offers_nothing_twice() {
        let mut pool = pool(0, vec![block(0, 8), block(1, 5)]);
        assert!(matches!(pool.take(16), Err(Error::Storage(_))));
        assert_eq!(pool.cursor, 8, "the good block passed over stays taken");
    }

    /// A pool of 8-byte blocks whose store and peer are real actors that the test never uses.
    fn pool(cursor: u64, blocks: Vec<StoredBlock>) -> KeyPool {
        let writer = SyncArbiter::start(1, || {
            crate::storage::writer::DbWriter::new(test_pool(), test_sealer())
        });
        let store = Store::new(writer, std::time::Duration::from_secs(3600)).start();
        let peer = PeerLink::new(
            KmeId::new("kme-b"),
            "https://127.0.0.1:1".into(),
            awc::Client::default(),
            std::time::Duration::from_millis(100),
            1,
        )
        .start();
        KeyPool::new(LinkParams::for_tests(8, 1000), cursor, blocks, store, peer)
    }

    fn test_sealer() -> std::sync::Arc<crate::storage::sealing::Sealer> {
        std::sync::Arc::new(crate::storage::sealing::Sealer::from_master(&[1u8; 32]).unwrap())
    }

    fn test_pool() -> crate::storage::db::DbPool {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sqlite");
        let (writer, _) = crate::storage::db::open(&path, 1).unwrap();
        std::mem::forget(dir);
        writer
    }
}
