//! PeerLink: this KME's client to one neighbour KME over the KME-to-KME mTLS channel.
//!
//! Owns: the HTTPS client (mTLS, verifies the neighbour's certificate and KME ID), the
//! outgoing sequence numbers, and the batch of pending activations. Handles: `Activate` (from
//! `KeyPool`), `ShipBlocks` and `ReportLevel` (from `Link`), `Advertise` (from `Router`),
//! `Settle` (from `Relay`). Activations of concurrent
//! requests are batched: while one batch is in flight, new ones queue and go together in the
//! next, so one round trip and one commit at the neighbour serve many requests. Batches go one
//! at a time and in order, so the neighbour sees positions strictly increasing.
//! Every batch carries `seq = epoch << 40 | counter` (growing across restarts); a transport
//! failure is retried once with the identical bytes, which the neighbour answers idempotently.
//! On connect, before any key is bound, an empty batch tells the neighbour this run's first
//! number (the handshake): a neighbour that took higher numbers from this KME (restored from
//! a backup) refuses it with the last one it took, and the numbers go on above it, so the
//! first real batch is not refused. Retried every `HANDSHAKE_RETRY` until the neighbour
//! answers (a refused real batch resynchronises the same way meanwhile).
//! Mailbox: bounded; callers `send` under a timeout.

use std::time::Duration;

use actix::prelude::*;
use prometheus::Histogram;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::peer::protocol::{
    Activated, ActivationBatch, BlockShipment, BlocksStored, LevelNoted, LevelReport, Refusal,
    SettleBatch, SettleRequest, SettleResults, SourceReply, SourceRequest, TopologyNoted,
    TopologyUpdate, WireBlock, ACTIVATE_PATH, BLOCKS_PATH, LEVEL_PATH, SETTLE_PATH, SOURCE_PATH,
    TOPOLOGY_PATH,
};
use crate::storage::ops::BlockRecord;
use crate::types::{Binding, KmeId};

const MAILBOX_CAPACITY: usize = 1024;
/// Largest activation batch, in keys; bounds the size of one peer request.
const MAX_BATCH_KEYS: usize = 8192;
/// Largest settlement batch.
pub const MAX_SETTLE_BATCH: usize = 4096;
/// Settlements go one batch at a time (so that they batch well), but a settlement that has
/// waited this long behind a batch in flight goes in one more, up to `MAX_SETTLES_IN_FLIGHT`:
/// a neighbour settles a relay only after the next hop did, and in a ring those waits could
/// otherwise close a cycle.
const SETTLE_OVERTAKE_AFTER: Duration = Duration::from_millis(2);
const MAX_SETTLES_IN_FLIGHT: usize = 8;
/// Largest peer answer read (error bodies and small JSON replies).
const MAX_REPLY_BYTES: usize = 64 * 1024;
const COUNTER_MASK: u64 = (1 << 40) - 1;
/// Largest answer to a BB84 post-processing message (Cascade parities of a large frame).
const MAX_BB84_REPLY_BYTES: usize = 64 * 1024 * 1024;
/// How often the handshake is tried until the neighbour answers.
const HANDSHAKE_RETRY: Duration = Duration::from_secs(1);

type Waiter = oneshot::Sender<Result<()>>;

pub struct PeerLink {
    peer: KmeId,
    base_url: String,
    client: awc::Client,
    timeout: Duration,
    epoch: u64,
    counter: u64,
    pending: Vec<(Binding, Waiter)>,
    in_flight: bool,
    /// The neighbour answered an activation batch (the handshake or any other) this run.
    greeted: bool,
    settles: Vec<(SettleRequest, Waiter)>,
    settles_in_flight: usize,
    /// A check for settlements waiting behind the batch in flight is scheduled.
    overtake_armed: bool,
    /// Round trip of each answered request to this neighbour.
    round_trip: Option<Histogram>,
}

impl PeerLink {
    /// `client` must verify the neighbour's certificate and present ours (see `src/tls.rs`).
    pub fn new(
        peer: KmeId,
        base_url: String,
        client: awc::Client,
        timeout: Duration,
        epoch: u64,
    ) -> Self {
        Self {
            peer,
            base_url,
            client,
            timeout,
            epoch,
            counter: 0,
            pending: Vec::new(),
            in_flight: false,
            greeted: false,
            settles: Vec::new(),
            settles_in_flight: 0,
            overtake_armed: false,
            round_trip: None,
        }
    }

    /// The round trip of every answered request goes to `metrics` (labelled by the peer).
    pub fn with_metrics(mut self, metrics: &Metrics) -> Self {
        self.round_trip = Some(
            metrics
                .peer_request_seconds
                .with_label_values(&[self.peer.as_str()]),
        );
        self
    }

    /// `epoch << 40 | counter`: grows across restarts (the epoch is bumped durably at every
    /// start) and within one run for 2^40 batches (over a year at 20,000 batches/s).
    fn next_seq(&mut self) -> u64 {
        self.counter = (self.counter + 1).min(COUNTER_MASK);
        (self.epoch << 40) | self.counter
    }

    /// The neighbour has taken `last_seq` from this KME already (it was restored from a
    /// backup, or its boot epoch lags): numbers go on from the epoch after it. The refused
    /// batch fails (its callers get a 503); the next one goes through, and its positions
    /// are checked against the neighbour's high mark as always, so no material serves twice.
    fn resynchronise(&mut self, last_seq: u64) {
        let epoch = (last_seq >> 40).saturating_add(1);
        if epoch > self.epoch {
            log::warn!(
                "{} has taken activation {last_seq} from this KME already: sequence numbers \
                 go on from epoch {epoch} (this KME's data was restored from an older state?)",
                self.peer
            );
            self.epoch = epoch;
            self.counter = 0;
        }
    }

    /// An empty batch with the next number: the neighbour takes it, or refuses it with the
    /// last number it took from this KME (see the module doc).
    fn handshake(&mut self, ctx: &mut Context<Self>) {
        if self.greeted {
            return;
        }
        if self.in_flight {
            ctx.run_later(HANDSHAKE_RETRY, |act, ctx| act.handshake(ctx));
            return;
        }
        self.send_batch(ctx, Vec::new(), Vec::new());
    }

    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight || self.pending.is_empty() {
            return;
        }
        let mut count = 0;
        let take = self
            .pending
            .iter()
            .take_while(|(b, _)| {
                count += b.key_ids.len();
                count <= MAX_BATCH_KEYS
            })
            .count()
            .max(1);
        let (bindings, waiters): (Vec<Binding>, Vec<Waiter>) = self.pending.drain(..take).unzip();
        self.send_batch(ctx, bindings, waiters);
    }

    /// Sends one activation batch (none other is in flight); its answer goes to `waiters`.
    fn send_batch(
        &mut self,
        ctx: &mut Context<Self>,
        bindings: Vec<Binding>,
        waiters: Vec<Waiter>,
    ) {
        let handshake = bindings.is_empty();
        let batch = ActivationBatch {
            seq: self.next_seq(),
            bindings,
        };
        self.in_flight = true;
        let request = post_json(
            self.clone_request(),
            ACTIVATE_PATH,
            to_body(&batch),
            true,
            MAX_REPLY_BYTES,
        );
        ctx.spawn(fut::wrap_future(request).map(
            move |result: Result<Activated>, act: &mut Self, ctx| {
                match &result {
                    Ok(_) => act.greeted = true,
                    Err(Error::SequenceBehind { last_seq }) => {
                        act.resynchronise(*last_seq);
                        act.greeted = true;
                    }
                    Err(_) => {}
                }
                let outcome = result.map(|_| ());
                for waiter in waiters {
                    let _ = waiter.send(outcome.clone());
                }
                act.in_flight = false;
                if handshake && !act.greeted {
                    ctx.run_later(HANDSHAKE_RETRY, |act, ctx| act.handshake(ctx));
                }
                act.flush(ctx);
            },
        ));
    }

    /// Sends the waiting settlements as one batch if none is in flight; otherwise checks again
    /// after `SETTLE_OVERTAKE_AFTER` and then sends them alongside.
    fn flush_settles(&mut self, ctx: &mut Context<Self>) {
        if self.settles.is_empty() {
            return;
        }
        if self.settles_in_flight == 0 {
            self.send_settles(ctx);
        } else if !self.overtake_armed {
            self.overtake_armed = true;
            ctx.run_later(SETTLE_OVERTAKE_AFTER, |act, ctx| {
                act.overtake_armed = false;
                if act.settles_in_flight < MAX_SETTLES_IN_FLIGHT {
                    act.send_settles(ctx);
                }
                act.flush_settles(ctx);
            });
        }
    }

    /// Sends the waiting settlements (up to `MAX_SETTLE_BATCH`) as one batch.
    fn send_settles(&mut self, ctx: &mut Context<Self>) {
        if !self.settles.is_empty() {
            let take = self.settles.len().min(MAX_SETTLE_BATCH);
            let (settles, waiters): (Vec<SettleRequest>, Vec<Waiter>) =
                self.settles.drain(..take).unzip();
            self.settles_in_flight += 1;
            let target = self.clone_request();
            let peer = target.peer.to_string();
            let body = to_body(&SettleBatch { settles });
            let request = post_json(target, SETTLE_PATH, body, true, MAX_REPLY_BYTES);
            ctx.spawn(fut::wrap_future(request).map(
                move |answer: Result<SettleResults>, act: &mut Self, ctx| {
                    let outcomes: Vec<Result<()>> = match answer {
                        Ok(answer) if answer.results.len() == waiters.len() => answer
                            .results
                            .into_iter()
                            .map(|refused| match refused {
                                None => Ok(()),
                                Some(reason) => Err(Error::PeerUnavailable {
                                    peer: peer.clone(),
                                    reason,
                                }),
                            })
                            .collect(),
                        Ok(_) => vec![
                            Err(Error::PeerMessage(
                                "the settlement answer does not match the batch".into()
                            ));
                            waiters.len()
                        ],
                        Err(err) => vec![Err(err); waiters.len()],
                    };
                    for (waiter, outcome) in waiters.into_iter().zip(outcomes) {
                        let _ = waiter.send(outcome);
                    }
                    act.settles_in_flight -= 1;
                    act.flush_settles(ctx);
                },
            ));
        }
    }

    /// POSTs a notice whose answer (`R`, empty) only says it arrived; not retried.
    fn notify<R: DeserializeOwned + 'static>(
        &self,
        path: &'static str,
        body: Result<Vec<u8>>,
    ) -> ResponseFuture<Result<()>> {
        let target = self.clone_request();
        Box::pin(async move {
            post_json::<R>(target, path, body, false, MAX_REPLY_BYTES)
                .await
                .map(|_| ())
        })
    }

    fn clone_request(&self) -> Target {
        Target {
            peer: self.peer.clone(),
            base_url: self.base_url.clone(),
            client: self.client.clone(),
            timeout: self.timeout,
            round_trip: self.round_trip.clone(),
        }
    }
}

/// What one request needs; cloned out of the actor so the request runs without borrowing it.
struct Target {
    peer: KmeId,
    base_url: String,
    client: awc::Client,
    timeout: Duration,
    round_trip: Option<Histogram>,
}

impl Target {
    fn unavailable(&self, reason: impl Into<String>) -> Error {
        Error::PeerUnavailable {
            peer: self.peer.to_string(),
            reason: reason.into(),
        }
    }
}

/// POSTs `body` as JSON and reads the endpoint's answer `R` (at most `limit` bytes); with
/// `retry`, a transport failure is retried once with the same bytes.
async fn post_json<R: DeserializeOwned>(
    target: Target,
    path: &str,
    body: Result<Vec<u8>>,
    retry: bool,
    limit: usize,
) -> Result<R> {
    let bytes = body?;
    let url = format!("{}{}", target.base_url, path);
    let attempts = if retry { 2 } else { 1 };
    let mut last = target.unavailable("no attempt made");
    for _ in 0..attempts {
        let started = std::time::Instant::now();
        let sent = target
            .client
            .post(&url)
            .timeout(target.timeout)
            .insert_header(("content-type", "application/json"))
            .send_body(bytes.clone())
            .await;
        let mut response = match sent {
            Ok(response) => response,
            Err(err) => {
                last = target.unavailable(err.to_string());
                continue;
            }
        };
        if let Some(round_trip) = &target.round_trip {
            round_trip.observe(started.elapsed().as_secs_f64());
        }
        let status = response.status();
        if status.is_success() {
            return response
                .json::<R>()
                .limit(limit)
                .await
                .map_err(|err| target.unavailable(format!("HTTP {status}: {err}")));
        }
        let refusal: Refusal = match response.json().limit(MAX_REPLY_BYTES).await {
            Ok(refusal) => refusal,
            Err(err) => return Err(target.unavailable(format!("HTTP {status}: {err}"))),
        };
        if refusal.frame_lost {
            return Err(Error::FrameLost {
                peer: target.peer.to_string(),
            });
        }
        if let Some(last_seq) = refusal.last_seq {
            return Err(Error::SequenceBehind { last_seq });
        }
        if let Some(next) = refusal.next_blocks {
            return Err(Error::BlocksOutOfStep {
                peer: target.peer.to_string(),
                next,
            });
        }
        return Err(match refusal.high_mark {
            Some(high_mark) => Error::ActivationRejected {
                peer: target.peer.to_string(),
                high_mark,
                reason: refusal.error,
            },
            None => target.unavailable(refusal.error),
        });
    }
    Err(last)
}

/// What a queued activation or settlement's batch said about it.
async fn answer(peer: &str, rx: oneshot::Receiver<Result<()>>) -> Result<()> {
    rx.await.map_err(|_| Error::PeerUnavailable {
        peer: peer.to_string(),
        reason: "peer link stopped".into(),
    })?
}

fn to_body<T: Serialize>(body: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(body).map_err(|err| Error::PeerMessage(err.to_string()))
}

impl Actor for PeerLink {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        self.handshake(ctx);
    }
}

/// Bind these positions of our stream to key_IDs at the neighbour (one binding per request
/// or relay leg). Sent by `KeyPool`. Result: Ok once the neighbour holds them all durably.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub struct Activate(pub Vec<Binding>);

impl Handler<Activate> for PeerLink {
    type Result = ResponseFuture<Result<()>>;

    fn handle(&mut self, msg: Activate, ctx: &mut Context<Self>) -> Self::Result {
        let waiting: Vec<_> = msg
            .0
            .into_iter()
            .map(|binding| {
                let (tx, rx) = oneshot::channel();
                self.pending.push((binding, tx));
                rx
            })
            .collect();
        self.flush(ctx);
        let peer = self.peer.to_string();
        Box::pin(async move {
            for rx in waiting {
                answer(&peer, rx).await?;
            }
            Ok(())
        })
    }
}

/// Ship blocks of link material (courier source). Sent by `Link` at the generating end.
/// Result: the neighbour's pool level after storing them.
#[derive(Message)]
#[rtype(result = "Result<u64>")]
pub struct ShipBlocks(pub Vec<BlockRecord>);

impl Handler<ShipBlocks> for PeerLink {
    type Result = ResponseFuture<Result<u64>>;

    fn handle(&mut self, msg: ShipBlocks, _ctx: &mut Context<Self>) -> Self::Result {
        let body = to_body(&BlockShipment {
            blocks: msg.0.iter().map(WireBlock::encode).collect(),
        });
        let target = self.clone_request();
        Box::pin(async move {
            let stored: BlocksStored =
                post_json(target, BLOCKS_PATH, body, true, MAX_REPLY_BYTES).await?;
            Ok(stored.level)
        })
    }
}

/// Tell the generating end how full our pool is. Sent by `Link` at the other end.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub struct ReportLevel(pub u64);

impl Handler<ReportLevel> for PeerLink {
    type Result = ResponseFuture<Result<()>>;

    fn handle(&mut self, msg: ReportLevel, _ctx: &mut Context<Self>) -> Self::Result {
        self.notify::<LevelNoted>(LEVEL_PATH, to_body(&LevelReport { level: msg.0 }))
    }
}

/// A BB84 post-processing message for the Bob end. Sent by `Link` at the Alice end.
/// Result: the Bob end's answer. Only a commit (idempotent) is retried after a transport error.
#[derive(Message)]
#[rtype(result = "Result<SourceReply>")]
pub struct SourceExchange(pub SourceRequest);

impl Handler<SourceExchange> for PeerLink {
    type Result = ResponseFuture<Result<SourceReply>>;

    fn handle(&mut self, msg: SourceExchange, _ctx: &mut Context<Self>) -> Self::Result {
        let retry = matches!(msg.0, SourceRequest::Commit { .. });
        let body = to_body(&msg.0);
        let target = self.clone_request();
        Box::pin(post_json(
            target,
            SOURCE_PATH,
            body,
            retry,
            MAX_BB84_REPLY_BYTES,
        ))
    }
}

/// Link state news for the neighbour. Sent by `Router`; not retried (the next round repeats it).
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub struct Advertise(pub TopologyUpdate);

impl Handler<Advertise> for PeerLink {
    type Result = ResponseFuture<Result<()>>;

    fn handle(&mut self, msg: Advertise, _ctx: &mut Context<Self>) -> Self::Result {
        self.notify::<TopologyNoted>(TOPOLOGY_PATH, to_body(&msg.0))
    }
}

/// Release or abort a relay at the neighbour (and below it). Sent by `Relay`. Batched with
/// the settlements of concurrent relays; settling is idempotent, so a transport failure is
/// retried once.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub struct Settle(pub SettleRequest);

impl Handler<Settle> for PeerLink {
    type Result = ResponseFuture<Result<()>>;

    fn handle(&mut self, msg: Settle, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.settles.push((msg.0, tx));
        self.flush_settles(ctx);
        let peer = self.peer.to_string();
        Box::pin(async move { answer(&peer, rx).await })
    }
}
