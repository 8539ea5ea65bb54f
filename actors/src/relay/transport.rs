//! Relay: carries keys to KMEs that are not neighbours (trusted-node relay) and to slaves on
//! several KMEs at once (multicast), all or nothing.
//!
//! Owns: the relays passing through this KME (what arrived, where it goes next, whether the
//! onward legs are held below), in memory for the hold time only, and the hold time itself.
//! Handles: `Originate` (from `SaeRegistry`: enc_keys whose slaves are not all on one
//! neighbour), `Arrived` (from `SaeRegistry`, once an activation batch with relay legs is
//! durable here), `SettleFromPeer` (from the KME-to-KME edge: release or abort). Sends:
//! `Deliver` to the `KeyPool` of each next hop (which seals and sends the leg through its
//! `PeerLink`), `Settle` to the next hops' `PeerLink`s, `Exec` to `Store`.
//! Mailbox: bounded; callers `send` under their timeouts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::future::{join_all, BoxFuture};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::key_pool::{Deliver, DeliverAll, KeyPool, Outbound};
use crate::peer::peer_link::{PeerLink, Settle};
use crate::peer::protocol::SettleRequest;
use crate::storage::audit::AuditRecord;
use crate::storage::held::{Arrival, BurnUnsettled, HoldKeys, SettleRelays, Settlement};
use crate::storage::ops::AppendAudit;
use crate::storage::store::{Exec, Store};
use crate::types::{now_ms, Branch, Key, KmeId, SaeId};

const MAILBOX_CAPACITY: usize = 4096;
/// Outcomes of settlements, each with its index in the batch.
type IndexedOutcomes = BoxFuture<'static, Vec<(usize, Result<()>)>>;
/// Relay outcomes are kept this many hold times, for retried releases.
const FORGET_AFTER_HOLDS: u32 = 10;

/// The next hop: its pool (to send legs) and its channel (to settle them).
#[derive(Clone)]
pub struct NextHop {
    pub pool: Addr<KeyPool>,
    pub peer_link: Addr<PeerLink>,
}

/// A relay passing through this KME.
struct Transit {
    from: KmeId,
    onward: Vec<KmeId>,
    held_here: bool,
    /// Onward legs not yet durable at their next hop, and the first that failed.
    legs_left: usize,
    failure: Option<Error>,
    /// The onward legs' outcome, once known.
    forwarded: Option<Result<()>>,
    waiters: Vec<oneshot::Sender<Result<()>>>,
    since: Instant,
}

pub struct Relay {
    store: Addr<Store>,
    /// Shared with every relay in flight (cloned per relay, it would cost an allocation each).
    hops: Arc<HashMap<KmeId, NextHop>>,
    transit: HashMap<Uuid, Transit>,
    hold: Duration,
}

impl Relay {
    /// `hold`: how long keys of a relay wait here for its release before they are burned.
    pub fn new(store: Addr<Store>, hops: HashMap<KmeId, NextHop>, hold: Duration) -> Self {
        let hops = Arc::new(hops);
        Self {
            store,
            hops,
            transit: HashMap::new(),
            hold,
        }
    }

    fn sweep(&mut self, ctx: &mut Context<Self>) {
        let hold = self.hold;
        self.transit.retain(|_, t| t.since.elapsed() < hold);
        let hold_ms = i64::try_from(hold.as_millis()).unwrap_or(i64::MAX);
        let burn = BurnUnsettled {
            created_before_ms: now_ms().saturating_sub(hold_ms),
            forget_before_ms: now_ms()
                .saturating_sub(hold_ms.saturating_mul(i64::from(FORGET_AFTER_HOLDS))),
        };
        let store = self.store.clone();
        ctx.spawn(fut::wrap_future(async move {
            if let Ok(Err(err)) | Err(err) = store.send(Exec(burn)).await.map_err(Error::from) {
                log::error!("burning unsettled relays failed: {err}");
            }
        }));
    }
}

impl Actor for Relay {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        let every = (self.hold / 2).max(Duration::from_millis(100));
        ctx.run_interval(every, |act, ctx| act.sweep(ctx));
    }
}

/// What sends and settles the legs of one relay, cloned out of the actor.
#[derive(Clone)]
struct Legs {
    relay_id: Uuid,
    store: Addr<Store>,
    hops: Arc<HashMap<KmeId, NextHop>>,
}

impl Legs {
    fn hop(&self, kme: &KmeId) -> Result<&NextHop> {
        self.hops.get(kme).ok_or_else(|| {
            Error::PeerMessage(format!("relay {}: {kme} is not a neighbour", self.relay_id))
        })
    }

    /// Sends the leg to `branch` over its link: `seal` None takes the keys from the link.
    async fn send(&self, branch: &Branch, deliver: Deliver) -> Result<Vec<Key>> {
        self.hop(&branch.kme)?.pool.send(deliver).await?
    }

    /// Seals `keys` to every branch at once.
    async fn send_sealed(&self, branches: &[Branch], keys: &[Key], head: &Head) -> Result<()> {
        let sends = branches.iter().map(|branch| {
            let deliver = head.deliver(self.relay_id, branch, Some(keys.to_vec()));
            self.send(branch, deliver)
        });
        join_all(sends)
            .await
            .into_iter()
            .try_for_each(|r| r.map(|_| ()))
    }

    /// Settles the relay here (if keys are held here) and at every branch, all at once.
    async fn settle(
        &self,
        branches: &[KmeId],
        here: bool,
        release: bool,
        reason: &str,
    ) -> Result<()> {
        let settlement = if release {
            Settlement::Release
        } else {
            Settlement::Abort
        };
        let local = async {
            if !here {
                return Ok(());
            }
            let op = SettleRelays {
                relays: vec![self.relay_id],
                settlement,
                reason: reason.to_string(),
            };
            let outcomes = self.store.send(Exec(op)).await??;
            outcomes.into_iter().collect::<Result<()>>()
        };
        let remote = branches.iter().map(|kme| async move {
            let request = SettleRequest {
                relay_id: self.relay_id,
                release,
                reason: reason.to_string(),
            };
            self.hop(kme)?.peer_link.send(Settle(request)).await?
        });
        let (local, remote) = futures_util::future::join(local, join_all(remote)).await;
        local?;
        remote.into_iter().collect()
    }

    /// The relay failed with `err`: aborts it in the background (the SAE gets its 503 now,
    /// not after the abort has waited on a slow hop) and returns `err`.
    fn abort_later(&self, branches: Vec<KmeId>, here: bool, err: Error) -> Error {
        log::warn!("relay {}: {err}; aborting it everywhere", self.relay_id);
        let legs = self.clone();
        let reason = err.to_string();
        actix::spawn(async move { legs.abort(&branches, here, &reason).await });
        err
    }

    /// Best effort: burns the relay here and below, and says so in this KME's audit trail.
    /// Failures are logged; whatever cannot be reached burns its held keys when the hold time
    /// passes.
    async fn abort(&self, branches: &[KmeId], here: bool, reason: &str) {
        let reached = self.settle(branches, here, false, reason).await;
        if let Err(err) = &reached {
            log::warn!(
                "relay {}: abort did not reach everywhere: {err}",
                self.relay_id
            );
        }
        let record = AuditRecord::new(
            "relay_aborted",
            serde_json::json!({
                "relay_id": self.relay_id,
                "reason": reason,
                "next_hops": branches,
                "reached_all": reached.is_ok(),
            }),
        );
        if let Ok(Err(err)) | Err(err) = self
            .store
            .send(Exec(AppendAudit(record)))
            .await
            .map_err(Error::from)
        {
            log::error!("relay {}: cannot audit the abort: {err}", self.relay_id);
        }
    }
}

/// Who the keys of a relay are for, and their shape.
#[derive(Clone)]
struct Head {
    master: SaeId,
    slaves: Vec<SaeId>,
    number: u32,
    size_bits: u32,
}

impl Head {
    /// The leg of this relay to `branch`: the link's own material (`seal` None) or `seal`'s
    /// keys sealed with it.
    fn deliver(&self, relay_id: Uuid, branch: &Branch, seal: Option<Vec<Key>>) -> Deliver {
        Deliver {
            master: self.master.clone(),
            slaves: self.slaves.clone(),
            number: self.number,
            size_bits: self.size_bits,
            request_id: relay_id,
            relay: Some(Outbound {
                relay_id,
                onward: branch.onward.clone(),
                seal,
            }),
        }
    }
}

/// enc_keys for slaves that are not all on one neighbour: the keys go along `tree` (the
/// first branch's link gives them, the other branches get them sealed) and are held for
/// `local_slaves` here; the relay is released everywhere before the keys are returned, and
/// not after `deadline` (the SAE has had its 503 by then). Any failure aborts it everywhere.
/// Sent by `SaeRegistry`.
#[derive(Message)]
#[rtype(result = "Result<Vec<Key>>")]
pub struct Originate {
    pub master: SaeId,
    pub slaves: Vec<SaeId>,
    pub local_slaves: Vec<SaeId>,
    pub number: u32,
    pub size_bits: u32,
    pub request_id: Uuid,
    pub tree: Vec<Branch>,
    pub deadline: Instant,
}

impl Handler<Originate> for Relay {
    type Result = ResponseFuture<Result<Vec<Key>>>;

    fn handle(&mut self, msg: Originate, _ctx: &mut Context<Self>) -> Self::Result {
        let legs = Legs {
            relay_id: msg.request_id,
            store: self.store.clone(),
            hops: self.hops.clone(),
        };
        let head = Head {
            master: msg.master.clone(),
            slaves: msg.slaves.clone(),
            number: msg.number,
            size_bits: msg.size_bits,
        };
        // A relay that is not done in nine tenths of the SAE's time fails by itself, so the
        // SAE hears why (and the relay is aborted) before its request times out.
        let budget = msg.deadline.saturating_duration_since(Instant::now()) * 9 / 10;
        if budget.is_zero() {
            // Nothing may leave for a request whose SAE has (or is about to have) its 503: a
            // leg sent now would only burn link material.
            return Box::pin(async {
                Err(Error::Unavailable(
                    "the request's time ran out before the relay started".into(),
                ))
            });
        }
        let all_branches: Vec<KmeId> = msg.tree.iter().map(|b| b.kme.clone()).collect();
        let timed = legs.clone();
        let work = async move {
            let Some((first, others)) = msg.tree.split_first() else {
                return Err(Error::Unreachable("a relay needs at least one hop".into()));
            };
            let here = !msg.local_slaves.is_empty();
            let branches: Vec<KmeId> = msg.tree.iter().map(|b| b.kme.clone()).collect();
            let keys = match legs
                .send(first, head.deliver(legs.relay_id, first, None))
                .await
            {
                Ok(keys) => keys,
                Err(err) => return Err(legs.abort_later(branches[..1].to_vec(), false, err)),
            };
            let rest = async {
                legs.send_sealed(others, &keys, &head).await?;
                if here {
                    let hold = HoldKeys {
                        relay_id: legs.relay_id,
                        master: msg.master,
                        slaves: msg.slaves,
                        local_slaves: msg.local_slaves,
                        keys: keys.clone(),
                    };
                    legs.store.send(Exec(hold)).await??;
                }
                let late = || Error::Unavailable("the relay outlived its request".into());
                if Instant::now() > msg.deadline {
                    return Err(late());
                }
                legs.settle(&branches, here, true, "released").await?;
                // Released after the SAE had its 503: the keys must not stand.
                if Instant::now() > msg.deadline {
                    return Err(late());
                }
                Ok(())
            };
            match rest.await {
                Ok(()) => Ok(keys),
                Err(err) => Err(legs.abort_later(branches, here, err)),
            }
        };
        Box::pin(async move {
            match actix::clock::timeout(budget, work).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    let err = Error::PeerUnavailable {
                        peer: all_branches
                            .iter()
                            .map(KmeId::as_str)
                            .collect::<Vec<_>>()
                            .join(", "),
                        reason: format!("the relay did not complete within {budget:?}"),
                    };
                    Err(timed.abort_later(all_branches, true, err))
                }
            }
        })
    }
}

/// Relay legs durable here (an activation batch from `from`): forward each onward. Sent by
/// `SaeRegistry`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Arrived {
    pub from: KmeId,
    pub arrivals: Vec<Arrival>,
}

impl Handler<Arrived> for Relay {
    type Result = ();

    fn handle(&mut self, msg: Arrived, ctx: &mut Context<Self>) {
        // The legs of the whole batch, by next hop: one delivery to each next hop's pool.
        let mut by_hop: HashMap<KmeId, Vec<(Uuid, Deliver)>> = HashMap::new();
        for arrival in msg.arrivals {
            let relay_id = arrival.relay_id;
            let transit = Transit {
                from: msg.from.clone(),
                onward: arrival.onward.iter().map(|b| b.kme.clone()).collect(),
                held_here: arrival.held_here,
                legs_left: arrival.onward.len(),
                failure: None,
                forwarded: None,
                waiters: Vec::new(),
                since: Instant::now(),
            };
            self.transit.insert(relay_id, transit);
            let Some(forward) = arrival.forward else {
                self.forwarded(relay_id, Ok(()));
                continue;
            };
            let keys: Vec<Key> = forward
                .key_ids
                .iter()
                .zip(forward.keys)
                .map(|(id, material)| Key { id: *id, material })
                .collect();
            let head = Head {
                master: forward.master,
                slaves: forward.slaves,
                number: u32::try_from(keys.len()).unwrap_or(u32::MAX),
                size_bits: forward.len.saturating_mul(8),
            };
            for branch in &arrival.onward {
                let leg = head.deliver(relay_id, branch, Some(keys.clone()));
                by_hop
                    .entry(branch.kme.clone())
                    .or_default()
                    .push((relay_id, leg));
            }
        }
        for (kme, legs) in by_hop {
            let (relays, delivers): (Vec<Uuid>, Vec<Deliver>) = legs.into_iter().unzip();
            let Some(hop) = self.hops.get(&kme) else {
                for relay_id in relays {
                    let err = Error::PeerMessage(format!("{kme} is not a neighbour"));
                    self.leg_done(relay_id, Err(err));
                }
                continue;
            };
            let sent = hop.pool.send(DeliverAll(delivers));
            ctx.spawn(
                fut::wrap_future(sent).map(move |outcomes, act: &mut Self, _| {
                    let outcomes = match outcomes {
                        Ok(outcomes) => outcomes,
                        Err(err) => vec![Err(Error::from(err)); relays.len()],
                    };
                    for (relay_id, outcome) in relays.into_iter().zip(outcomes) {
                        act.leg_done(relay_id, outcome.map(|_| ()));
                    }
                }),
            );
        }
    }
}

impl Relay {
    /// One onward leg of `relay_id` is durable at its next hop, or failed: once all are in,
    /// the relay is forwarded (or failed, with the first failure).
    fn leg_done(&mut self, relay_id: Uuid, outcome: Result<()>) {
        let Some(transit) = self.transit.get_mut(&relay_id) else {
            return;
        };
        if let Err(err) = outcome {
            log::warn!("relay {relay_id}: forwarding failed: {err}");
            transit.failure.get_or_insert(err);
        }
        transit.legs_left = transit.legs_left.saturating_sub(1);
        if transit.legs_left == 0 {
            let result = transit.failure.take().map_or(Ok(()), Err);
            self.forwarded(relay_id, result);
        }
    }

    fn forwarded(&mut self, relay_id: Uuid, result: Result<()>) {
        if let Some(transit) = self.transit.get_mut(&relay_id) {
            for waiter in transit.waiters.drain(..) {
                let _ = waiter.send(result.clone());
            }
            transit.forwarded = Some(result);
        }
    }
}

/// Releases or aborts of relays that came from neighbour `from` (one batch). Sent by the
/// KME-to-KME edge. Result: the outcome of each, in order. A release succeeds only when the
/// keys are held here (if any are for this KME) and at every KME below; an abort burns what
/// it reaches and always succeeds.
#[derive(Message)]
#[rtype(result = "Vec<Result<()>>")]
pub struct SettleFromPeer {
    pub from: KmeId,
    pub requests: Vec<SettleRequest>,
}

impl Handler<SettleFromPeer> for Relay {
    type Result = ResponseFuture<Vec<Result<()>>>;

    fn handle(&mut self, msg: SettleFromPeer, _ctx: &mut Context<Self>) -> Self::Result {
        // Releases of relays that end here, all legs in: one storage operation for all of
        // them (the common case at a slave's KME). The others one by one.
        let (leaves, others): (Vec<_>, Vec<_>) = msg
            .requests
            .into_iter()
            .enumerate()
            .partition(|(_, r)| r.release && self.ends_here(&msg.from, &r.relay_id));
        let mut settles: Vec<IndexedOutcomes> = Vec::new();
        for (i, request) in others {
            let settle = self.settle(&msg.from, request);
            settles.push(Box::pin(async move { vec![(i, settle.await)] }));
        }
        if !leaves.is_empty() {
            settles.push(self.release_leaves(leaves));
        }
        Box::pin(async move {
            let mut outcomes: Vec<(usize, Result<()>)> =
                join_all(settles).await.into_iter().flatten().collect();
            outcomes.sort_by_key(|(i, _)| *i);
            outcomes.into_iter().map(|(_, outcome)| outcome).collect()
        })
    }
}

impl Relay {
    /// The relay came from `from`, all its legs are in, and it goes nowhere from here.
    fn ends_here(&self, from: &KmeId, relay_id: &Uuid) -> bool {
        self.transit.get(relay_id).is_some_and(|t| {
            t.from == *from && t.onward.is_empty() && t.held_here && t.forwarded == Some(Ok(()))
        })
    }

    /// Releases the keys held here of relays that `ends_here`, in one storage operation.
    /// Result: the outcome of each, with its index in the batch.
    fn release_leaves(&self, leaves: Vec<(usize, SettleRequest)>) -> IndexedOutcomes {
        let (indices, relays): (Vec<usize>, Vec<Uuid>) =
            leaves.into_iter().map(|(i, r)| (i, r.relay_id)).unzip();
        let op = SettleRelays {
            relays,
            settlement: Settlement::Release,
            reason: "released".into(),
        };
        let store = self.store.clone();
        Box::pin(async move {
            let outcomes = match store.send(Exec(op)).await.map_err(Error::from) {
                Ok(Ok(outcomes)) if outcomes.len() == indices.len() => outcomes,
                Ok(Ok(_)) => vec![Err(Error::Storage("settlement count".into())); indices.len()],
                Ok(Err(err)) | Err(err) => vec![Err(err); indices.len()],
            };
            indices.into_iter().zip(outcomes).collect()
        })
    }
}

/// Most characters of a neighbour's reason kept: it goes into the audit trail.
const MAX_PEER_REASON_CHARS: usize = 200;

fn bounded(reason: String) -> String {
    if reason.chars().count() <= MAX_PEER_REASON_CHARS {
        return reason;
    }
    let mut cut: String = reason.chars().take(MAX_PEER_REASON_CHARS).collect();
    cut.push('…');
    cut
}

impl Relay {
    /// The release or abort of one relay that came from `from`.
    fn settle(&mut self, from: &KmeId, request: SettleRequest) -> BoxFuture<'static, Result<()>> {
        let SettleRequest {
            relay_id,
            release,
            reason,
        } = request;
        let reason = bounded(reason);
        let legs = Legs {
            relay_id,
            store: self.store.clone(),
            hops: self.hops.clone(),
        };
        let Some(transit) = self.transit.get_mut(&relay_id).filter(|t| t.from == *from) else {
            // Unknown here (never arrived, or this KME restarted since): nothing below is
            // known, so nothing can be released (the sender then aborts); an abort burns what
            // is held here.
            return Box::pin(async move {
                if release {
                    return Err(Error::PeerMessage(format!(
                        "relay {relay_id} is not known here"
                    )));
                }
                legs.abort(&[], true, &reason).await;
                Ok(())
            });
        };
        let (onward, here) = (transit.onward.clone(), transit.held_here);
        let forwarded = match &transit.forwarded {
            Some(result) => Ok(result.clone()),
            None => {
                let (tx, rx) = oneshot::channel();
                transit.waiters.push(tx);
                Err(rx)
            }
        };
        if !release || forwarded.as_ref().is_ok_and(|r| r.is_err()) {
            self.transit.remove(&relay_id);
        }
        Box::pin(async move {
            if !release {
                legs.abort(&onward, here, &reason).await;
                return Ok(());
            }
            let forwarded = match forwarded {
                Ok(result) => result,
                Err(rx) => rx
                    .await
                    .unwrap_or_else(|_| Err(Error::Unavailable("the relay stopped".into()))),
            };
            let result = match forwarded {
                Ok(()) => legs.settle(&onward, here, true, &reason).await,
                Err(err) => Err(err),
            };
            if let Err(err) = &result {
                legs.abort(&onward, here, &err.to_string()).await;
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::writer::DbWriter;

    #[actix::test]
    async fn a_relay_whose_time_has_run_out_sends_no_leg() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, _) = crate::storage::db::open(&dir.path().join("t.sqlite"), 1).unwrap();
        let sealer = Arc::new(crate::storage::sealing::Sealer::from_master(&[1u8; 32]).unwrap());
        let writer = SyncArbiter::start(1, move || DbWriter::new(pool.clone(), sealer.clone()));
        let store = Store::new(writer, Duration::from_secs(3600)).start();
        let relay = Relay::new(store, HashMap::new(), Duration::from_secs(10)).start();
        let originate = Originate {
            master: SaeId::new("sae-a"),
            slaves: vec![SaeId::new("sae-c")],
            local_slaves: Vec::new(),
            number: 1,
            size_bits: 256,
            request_id: Uuid::new_v4(),
            tree: vec![Branch {
                kme: KmeId::new("kme-b"),
                onward: Vec::new(),
            }],
            deadline: Instant::now(),
        };
        let outcome = relay.send(originate).await.unwrap();
        assert!(
            matches!(&outcome, Err(Error::Unavailable(m)) if m.contains("time ran out")),
            "refused before any hop is tried: {outcome:?}"
        );
    }
}
