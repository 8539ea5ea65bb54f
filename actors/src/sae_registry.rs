//! SaeRegistry: the front door of every SAE request — who the caller is, where its keys go.
//!
//! Owns: certificate identity → SAE ID (the CN by default), SAE → home KME, the KMEs of the
//! network, and the route to each neighbour (its `KeyPool`, `Link` and ETSI limits).
//! Handles, one message per HTTP request from the edge: `KeyStatus` (status), `EncKeys`
//! (enc_keys), `DecKeys` (dec_keys), `Identify` (whoami, and refusals of bad requests),
//! `ReloadSaes` (the edge's reloader: SAEs, pinned certificates, rate limits), `ListSaes`
//! (dashboards), and
//! from the KME-to-KME edge `BindFromPeer` (a neighbour's activation batch, which it may send
//! only for its own SAEs' keys to SAEs of this KME). It
//! authorises and validates synchronously, then forwards to the actor that owns the answer —
//! `KeyPool`/`Link` of the route, or `Store` — on its own arbiter, so a request crosses
//! threads once each way. Keys between SAEs of this KME are made here (OS CSPRNG) and stored.
//! Mailbox: bounded; the edge uses `send` under its request timeout.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use actix::prelude::*;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::key_pool::{Deliver, KeyPool, PoolStatus};
use crate::link::{Health, LinkAddr, LinkHealth};
use crate::relay::router::{
    FindTree, FullPairs, HopView, OwnFullPairs, RouteView, Router, SubscribeFullPairs,
};
use crate::relay::transport::{Arrived, Originate, Relay};
use crate::sae_quota::{SaeLimits, SaeQuotas};
use crate::storage::audit::{AuditRecord, Delivered};
use crate::storage::ops::{Activate, InsertLocalKeys, LocalKey, Retrieve, WaitingKeys};
use crate::storage::store::{Exec, Store};
use crate::types::{
    Binding, Branch, CertBinding, CertIdentity, Key, KeyCount, KeyLimits, KeySizeBits, KmeId,
    RelayLeg, SaeId, MAC_KEY_BYTES,
};

const MAILBOX_CAPACITY: usize = 4096;

/// The way to one neighbour KME.
#[derive(Clone)]
pub struct NeighbourRoute {
    pub peer: KmeId,
    pub pool: Addr<KeyPool>,
    pub link: LinkAddr,
    pub limits: KeyLimits,
    /// Block size of the link: positions the neighbour binds are read in these units.
    pub block_bytes: usize,
}

/// Where the keys of one request come from.
#[derive(Clone)]
pub enum Target {
    /// The slaves' KME is a neighbour: material of that QKD link.
    Neighbour(NeighbourRoute),
    /// Master and slaves are all on this KME: the key never leaves it.
    Local(KeyLimits),
    /// The slaves are not all on this KME or one neighbour: trusted-node relay to `kmes`
    /// (multicast when there are several), keys held here too for `local_slaves`.
    Relay {
        kmes: Vec<KmeId>,
        local_slaves: Vec<SaeId>,
        limits: KeyLimits,
    },
}

impl Target {
    pub fn limits(&self) -> KeyLimits {
        match self {
            Target::Neighbour(route) => route.limits,
            Target::Local(limits) | Target::Relay { limits, .. } => *limits,
        }
    }
}

/// Longest relay path, in hops, unless the SAE asks for fewer (`kme_max_hops`).
pub const MAX_RELAY_HOPS: u32 = 16;
/// Most KMEs in one relay tree (bounds what a neighbour can make this KME do).
const MAX_TREE_KMES: usize = 64;

/// Route constraints an SAE made mandatory (vendor extensions `kme_route_type` and
/// `kme_max_hops` in `extension_mandatory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutePolicy {
    /// `kme_route_type: "direct"`: one link only, never a relay.
    pub direct_only: bool,
    pub max_hops: u32,
}

impl Default for RoutePolicy {
    fn default() -> Self {
        Self {
            direct_only: false,
            max_hops: MAX_RELAY_HOPS,
        }
    }
}

/// A resolved key request: who asks, for whom, and from where.
#[derive(Clone)]
pub struct KeyRoute {
    pub master: SaeId,
    /// The slave of the path first, then the additional slaves in request order.
    pub slaves: Vec<SaeId>,
    pub slave_kme: KmeId,
    pub target: Target,
}

/// The actors of the network beyond neighbours.
#[derive(Clone)]
pub struct Network {
    pub router: Addr<Router>,
    pub relay: Addr<Relay>,
    /// How often the counts of waiting keys are checked against their caps (the link state
    /// news interval: the counts travel with it).
    pub interval: std::time::Duration,
}

pub struct SaeRegistry {
    me: KmeId,
    store: Addr<Store>,
    /// SAE ID → home KME, for every SAE of the network.
    homes: HashMap<SaeId, KmeId>,
    kmes: HashSet<KmeId>,
    neighbours: HashMap<KmeId, NeighbourRoute>,
    local_limits: KeyLimits,
    /// SAEs identified by their certificate's SHA-256 instead of its CN.
    pinned: HashMap<CertBinding, SaeId>,
    /// Routes and relay beyond neighbours (None: keys reach neighbours only).
    network: Option<Network>,
    /// Rate limits of this KME's SAEs, asked before anything is spent for them.
    quotas: SaeQuotas,
    /// Pairs (master, slave) at the master's `max_waiting_keys` at the slave's KME, this one
    /// included: no more keys for them until the slave retrieves some.
    full_pairs: HashSet<(SaeId, SaeId)>,
    /// The same, counted at this KME (for its own SAEs as slaves).
    full_here: HashSet<(SaeId, SaeId)>,
}

impl SaeRegistry {
    pub fn new(
        me: KmeId,
        store: Addr<Store>,
        homes: HashMap<SaeId, KmeId>,
        kmes: HashSet<KmeId>,
        neighbours: Vec<NeighbourRoute>,
        local_limits: KeyLimits,
    ) -> Self {
        Self {
            me,
            store,
            homes,
            kmes,
            neighbours: neighbours
                .into_iter()
                .map(|r| (r.peer.clone(), r))
                .collect(),
            local_limits,
            pinned: HashMap::new(),
            network: None,
            quotas: SaeQuotas::new(SaeLimits::default(), HashMap::new()),
            full_pairs: HashSet::new(),
            full_here: HashSet::new(),
        }
    }

    /// Rate limits of this KME's SAEs (else `SaeLimits::default()` for each).
    pub fn with_quotas(mut self, quotas: SaeQuotas) -> Self {
        self.quotas = quotas;
        self
    }

    /// Keys for KMEs that are not neighbours go through `network`.
    pub fn with_network(mut self, network: Network) -> Self {
        self.network = Some(network);
        self
    }

    /// Identify these SAEs by certificate fingerprint (SHA-256, lowercase hex) only: their CN
    /// alone no longer suffices.
    pub fn with_pinned(mut self, pinned: HashMap<CertBinding, SaeId>) -> Self {
        self.pinned = pinned;
        self
    }

    /// The SAE behind a verified certificate identity, if it is homed on this KME.
    pub fn identify(&self, identity: &CertIdentity) -> Result<SaeId> {
        let mut bound: Vec<&SaeId> = CertBinding::of(identity)
            .filter_map(|binding| self.pinned.get(&binding))
            .collect();
        bound.sort();
        bound.dedup();
        if bound.len() > 1 {
            return Err(Error::NotAuthorized(
                "the client certificate is bound to several SAEs: whose it is is ambiguous".into(),
            ));
        }
        let id = match (bound.first(), &identity.cn) {
            (Some(sae), _) => (*sae).clone(),
            (None, None) => {
                return Err(Error::NotAuthorized(
                    "client certificate has no usable CN".into(),
                ))
            }
            (None, Some(cn)) => {
                let sae = SaeId::new(cn);
                if self.pinned.values().any(|pinned| *pinned == sae) {
                    return Err(Error::NotAuthorized(format!(
                        "SAE {cn} is bound to another certificate"
                    )));
                }
                sae
            }
        };
        match self.homes.get(&id) {
            Some(home) if *home == self.me => Ok(id),
            Some(home) => Err(Error::NotAuthorized(format!(
                "SAE {id} is registered at KME {home}, not at this KME"
            ))),
            None if self.kmes.contains(&KmeId::new(id.as_str())) => Err(Error::NotAuthorized(
                "KME certificates are not accepted on the SAE API".into(),
            )),
            None => Err(Error::NotAuthorized(format!(
                "certificate identity {id} is not a registered SAE"
            ))),
        }
    }

    fn known_sae(&self, id: &str, role: &str) -> Result<(SaeId, KmeId)> {
        let sae = SaeId::new(id);
        match self.homes.get(&sae) {
            Some(home) => Ok((sae, home.clone())),
            None => Err(Error::BadRequest(format!("unknown {role}: {id}"))),
        }
    }

    /// The route of a request for `slave` (and `additional` slaves). Whatever can never pass
    /// (identity, unknown or repeated SAEs, too many slaves, an unmet mandatory extension) is
    /// refused here; what depends on the network now (a usable route) is found later: 401/400
    /// before 503.
    pub fn route(
        &self,
        identity: &CertIdentity,
        slave: &str,
        additional: &[String],
        policy: RoutePolicy,
    ) -> Result<KeyRoute> {
        let master = self.identify(identity)?;
        let (slave, slave_kme) = self.known_sae(slave, "slave_SAE_ID")?;
        if slave == master {
            return Err(Error::BadRequest(
                "the master SAE cannot be its own slave".into(),
            ));
        }
        let mut slaves = vec![slave];
        let mut kmes = vec![slave_kme.clone()];
        for extra in additional {
            let (extra, home) = self.known_sae(extra, "additional slave SAE ID")?;
            if extra == master {
                return Err(Error::BadRequest(
                    "the master SAE cannot be one of its additional slaves".into(),
                ));
            }
            if slaves.contains(&extra) {
                return Err(Error::BadRequest(format!(
                    "slave SAE ID {extra} is listed more than once"
                )));
            }
            if !kmes.contains(&home) {
                kmes.push(home);
            }
            slaves.push(extra);
        }
        let target = match kmes.as_slice() {
            [one] if *one == self.me => Target::Local(self.local_limits),
            [one] if self.neighbours.contains_key(one) => match self.neighbours.get(one) {
                Some(route) => Target::Neighbour(route.clone()),
                None => return Err(Error::Unreachable(format!("no route to {one}"))),
            },
            _ if policy.direct_only => {
                return Err(Error::ExtensionUnmet(format!(
                    "kme_route_type \"direct\": the slaves' KMEs ({}) are not one neighbour of this KME",
                    kmes.iter().map(KmeId::as_str).collect::<Vec<_>>().join(", ")
                )))
            }
            _ => Target::Relay {
                local_slaves: slaves
                    .iter()
                    .filter(|s| self.homes.get(*s) == Some(&self.me))
                    .cloned()
                    .collect(),
                kmes: kmes.into_iter().filter(|k| *k != self.me).collect(),
                limits: self.local_limits,
            },
        };
        let limit = target.limits().max_sae_id_count as usize;
        if additional.len() > limit {
            return Err(Error::BadRequest(format!(
                "at most {limit} additional slave SAE IDs are allowed"
            )));
        }
        Ok(KeyRoute {
            master,
            slaves,
            slave_kme,
            target,
        })
    }

    /// Refuses keys for a slave that has `max_waiting_keys` keys of this master waiting.
    fn check_waiting(&self, master: &SaeId, slaves: &[SaeId]) -> Result<()> {
        let full = slaves.iter().find(|slave| {
            let pair = (master.clone(), (*slave).clone());
            self.full_pairs.contains(&pair) || self.full_here.contains(&pair)
        });
        match (full, &self.network) {
            (None, _) => Ok(()),
            (Some(slave), network) => Err(Error::OverLimit {
                message: format!(
                    "{slave} has max_waiting_keys ({}) keys from {master} waiting; retry once it retrieves some",
                    self.quotas.max_waiting_keys(master)
                ),
                retry_after: network
                    .as_ref()
                    .map_or(std::time::Duration::from_secs(1), |n| n.interval),
            }),
        }
    }

    /// Counts the keys waiting here per pair and takes those at their cap as full, here and
    /// in this KME's link state news.
    fn count_waiting(&mut self, ctx: &mut Context<Self>) {
        let Some(network) = self.network.clone() else {
            return;
        };
        let counting = self.store.send(Exec(WaitingKeys));
        ctx.spawn(
            fut::wrap_future(counting).map(move |counted, act: &mut Self, _| {
                let waiting = match counted {
                    Ok(Ok(waiting)) => waiting,
                    Ok(Err(err)) => return log::warn!("counting waiting keys: {err}"),
                    Err(err) => return log::warn!("counting waiting keys: {err}"),
                };
                act.full_here = waiting
                    .into_iter()
                    .filter(|(master, _, keys)| *keys >= act.quotas.max_waiting_keys(master))
                    .map(|(master, slave, _)| (master, slave))
                    .collect();
                let own = act.full_here.iter().cloned().collect();
                network.router.do_send(OwnFullPairs(own));
            }),
        );
    }

    fn network(&self) -> Result<Network> {
        self.network.clone().ok_or_else(|| {
            Error::Unreachable(
                "the slaves' KMEs are not neighbours of this KME, and it relays to none".into(),
            )
        })
    }
}

impl Actor for SaeRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        if let Some(network) = &self.network {
            network
                .router
                .do_send(SubscribeFullPairs(ctx.address().recipient()));
            ctx.run_interval(network.interval, |act, ctx| act.count_waiting(ctx));
        }
    }
}

impl Handler<FullPairs> for SaeRegistry {
    type Result = ();

    /// Takes each KME's full pairs whose slave is that KME's own SAE (a KME speaks only for
    /// its SAEs).
    fn handle(&mut self, msg: FullPairs, _ctx: &mut Context<Self>) {
        self.full_pairs = msg
            .by_origin
            .into_iter()
            .flat_map(|(origin, pairs)| {
                let homes = &self.homes;
                pairs
                    .into_iter()
                    .filter(move |(_, slave)| homes.get(slave) == Some(&origin))
            })
            .collect();
    }
}

/// Which registered SAE of this KME is calling. Sent by the HTTP edge with the verified
/// certificate identity. Result: its SAE ID, or `NotAuthorized`.
#[derive(Message)]
#[rtype(result = "Result<SaeId>")]
pub struct Identify {
    pub identity: CertIdentity,
}

/// The SAEs of the network file as re-read (a reload): homes, pinned certificates, rate
/// limits. Sent by the edge's reloader. Result: the SAEs added and removed at this KME.
#[derive(Message)]
#[rtype(result = "(Vec<SaeId>, Vec<SaeId>)")]
pub struct ReloadSaes {
    pub homes: HashMap<SaeId, KmeId>,
    pub pinned: HashMap<CertBinding, SaeId>,
    pub limits: HashMap<SaeId, SaeLimits>,
}

impl Handler<ReloadSaes> for SaeRegistry {
    type Result = MessageResult<ReloadSaes>;

    fn handle(&mut self, msg: ReloadSaes, _ctx: &mut Context<Self>) -> Self::Result {
        let here = |homes: &HashMap<SaeId, KmeId>| -> HashSet<SaeId> {
            homes
                .iter()
                .filter(|(_, kme)| **kme == self.me)
                .map(|(sae, _)| sae.clone())
                .collect()
        };
        let (before, after) = (here(&self.homes), here(&msg.homes));
        let mut added: Vec<SaeId> = after.difference(&before).cloned().collect();
        let mut removed: Vec<SaeId> = before.difference(&after).cloned().collect();
        added.sort();
        removed.sort();
        self.homes = msg.homes;
        self.pinned = msg.pinned;
        self.quotas.set_limits(msg.limits);
        MessageResult((added, removed))
    }
}

/// Every SAE of the network, its KME, and the keys admitted for it here since the start
/// (enc_keys asked, dec_keys retrieved), sorted (dashboards). Sent by the admin edge.
#[derive(Message)]
#[rtype(result = "Vec<(SaeId, KmeId, u64)>")]
pub struct ListSaes;

impl Handler<ListSaes> for SaeRegistry {
    type Result = MessageResult<ListSaes>;

    fn handle(&mut self, _msg: ListSaes, _ctx: &mut Context<Self>) -> Self::Result {
        let mut saes: Vec<(SaeId, KmeId, u64)> = self
            .homes
            .iter()
            .map(|(sae, kme)| (sae.clone(), kme.clone(), self.quotas.usage(sae)))
            .collect();
        saes.sort();
        MessageResult(saes)
    }
}

impl Handler<Identify> for SaeRegistry {
    type Result = Result<SaeId>;

    fn handle(&mut self, msg: Identify, _ctx: &mut Context<Self>) -> Self::Result {
        self.identify(&msg.identity)
    }
}

/// What `status` reports for a master and slave.
#[derive(Debug, Clone)]
pub struct StatusReport {
    pub master: SaeId,
    pub slave: SaeId,
    pub slave_kme: KmeId,
    pub limits: KeyLimits,
    pub stored_key_count: u64,
    /// The link's peer, health and available bytes (a neighbour's KME).
    pub link: Option<(KmeId, Health, u64)>,
    /// The hops of the relay route and their states (a KME beyond the neighbours).
    pub route: Option<Vec<HopView>>,
}

/// status: sent by the edge. Result: counts and limits of the route to the slave's KME.
#[derive(Message)]
#[rtype(result = "Result<StatusReport>")]
pub struct KeyStatus {
    pub identity: CertIdentity,
    pub slave: String,
}

impl Handler<KeyStatus> for SaeRegistry {
    type Result = ResponseFuture<Result<StatusReport>>;

    fn handle(&mut self, msg: KeyStatus, _ctx: &mut Context<Self>) -> Self::Result {
        let route = self
            .route(&msg.identity, &msg.slave, &[], RoutePolicy::default())
            .and_then(|route| {
                self.quotas.admit_request(&route.master)?;
                Ok(route)
            });
        let route = match route {
            Ok(route) => route,
            Err(err) => return Box::pin(async { Err(err) }),
        };
        let limits = route.target.limits();
        let mut report = StatusReport {
            master: route.master,
            slave: route
                .slaves
                .into_iter()
                .next()
                .unwrap_or_else(|| SaeId::new("")),
            slave_kme: route.slave_kme,
            limits,
            stored_key_count: limits.max_key_count,
            link: None,
            route: None,
        };
        match route.target {
            Target::Local(_) => Box::pin(async move { Ok(report) }),
            Target::Neighbour(link) => Box::pin(async move {
                let counts = link.pool.send(PoolStatus).await?;
                let health = link.link.health.send(LinkHealth).await?;
                report.stored_key_count = counts.stored_key_count;
                report.link = Some((link.peer, health, counts.available_bytes));
                Ok(report)
            }),
            Target::Relay { .. } => {
                let network = self.network();
                let to = report.slave_kme.clone();
                Box::pin(async move {
                    let view = RouteView {
                        to,
                        max_hops: MAX_RELAY_HOPS,
                    };
                    let hops = network?.router.send(view).await??;
                    // What the bottleneck hop can carry now, and at most, in keys of the
                    // default size (each leg also spends a 16-byte MAC key; negligible here).
                    let key_bytes = u64::from(limits.key_size / 8).max(1);
                    let bottleneck = |bytes: fn(&HopView) -> Option<u64>| {
                        hops.iter()
                            .map(|h| bytes(h).unwrap_or(0))
                            .min()
                            .unwrap_or(0)
                            / key_bytes
                    };
                    let most = bottleneck(|h| h.capacity_bytes).min(limits.max_key_count);
                    report.limits.max_key_count = most;
                    report.stored_key_count = bottleneck(|h| h.available_bytes).min(most);
                    report.route = Some(hops);
                    Ok(report)
                })
            }
        }
    }
}

/// enc_keys: sent by the edge with the request's raw `number` and `size`. Result: the keys,
/// durable at every KME involved; or why not (400/401/503 variants). Not served after
/// `deadline` (by then the SAE has had its 503).
#[derive(Message)]
#[rtype(result = "Result<Vec<Key>>")]
pub struct EncKeys {
    pub identity: CertIdentity,
    pub slave: String,
    pub additional: Vec<String>,
    pub number: Option<i64>,
    pub size: Option<i64>,
    pub request_id: Uuid,
    pub policy: RoutePolicy,
    pub deadline: Instant,
}

impl Handler<EncKeys> for SaeRegistry {
    type Result = ResponseFuture<Result<Vec<Key>>>;

    fn handle(&mut self, msg: EncKeys, _ctx: &mut Context<Self>) -> Self::Result {
        let prepared = self
            .route(&msg.identity, &msg.slave, &msg.additional, msg.policy)
            .and_then(|route| {
                self.quotas.admit_request(&route.master)?;
                let (number, size) = validate(route.target.limits(), msg.number, msg.size)?;
                self.quotas.admit_keys(&route.master, number.get())?;
                self.check_waiting(&route.master, &route.slaves)?;
                Ok((route, number, size))
            });
        let (route, number, size) = match prepared {
            Ok(prepared) => prepared,
            Err(err) => return Box::pin(async { Err(err) }),
        };
        match route.target {
            Target::Neighbour(link) => {
                let deliver = Deliver {
                    master: route.master.clone(),
                    slaves: route.slaves.clone(),
                    number: number.get(),
                    size_bits: size.get(),
                    request_id: msg.request_id,
                    relay: None,
                };
                // The link's pool is empty (its link down, say): around it by relay, unless
                // the SAE asked for the direct route only or the request is beyond the relay
                // limits. The relay takes nothing from it.
                let around = self.network.clone().filter(|_| {
                    !msg.policy.direct_only
                        && validate(self.local_limits, msg.number, msg.size).is_ok()
                });
                let request = RelayRequest {
                    to: vec![link.peer.clone()],
                    avoid: Some(link.peer.clone()),
                    local_slaves: Vec::new(),
                    master: route.master,
                    slaves: route.slaves,
                    number,
                    size,
                    msg,
                };
                Box::pin(async move {
                    match (link.pool.send(deliver).await?, around) {
                        (Err(exhausted @ Error::PoolExhausted { .. }), Some(network)) => {
                            match request.send(network).await {
                                Err(Error::Unreachable(_)) => Err(exhausted),
                                relayed => relayed,
                            }
                        }
                        (direct, _) => direct,
                    }
                })
            }
            Target::Local(_) => {
                let store = self.store.clone();
                let op = local_keys(&route.master, &route.slaves, number, size, msg.request_id);
                Box::pin(async move {
                    let (keys, op) = op?;
                    store.send(Exec(op)).await??;
                    Ok(keys)
                })
            }
            Target::Relay {
                kmes, local_slaves, ..
            } => {
                let network = self.network();
                let request = RelayRequest {
                    to: kmes,
                    avoid: None,
                    local_slaves,
                    master: route.master,
                    slaves: route.slaves,
                    number,
                    size,
                    msg,
                };
                Box::pin(async move { request.send(network?).await })
            }
        }
    }
}

/// An enc_keys request served by relay: to the KMEs `to`, held here for `local_slaves`.
struct RelayRequest {
    to: Vec<KmeId>,
    /// The neighbour whose direct link must not be the first hop (its pool just came up
    /// empty, whatever the last link state news said).
    avoid: Option<KmeId>,
    local_slaves: Vec<SaeId>,
    master: SaeId,
    slaves: Vec<SaeId>,
    number: KeyCount,
    size: KeySizeBits,
    msg: EncKeys,
}

impl RelayRequest {
    /// Finds the tree of routes, then has `Relay` carry the keys along it.
    async fn send(self, network: Network) -> Result<Vec<Key>> {
        let need =
            u64::from(self.number.get()) * u64::from(self.size.get() / 8) + MAC_KEY_BYTES as u64;
        let find = FindTree {
            to: self.to,
            max_hops: self.msg.policy.max_hops,
            need_bytes: need,
            avoid: self.avoid,
        };
        let tree = network.router.send(find).await??;
        let originate = Originate {
            master: self.master,
            slaves: self.slaves,
            local_slaves: self.local_slaves,
            number: self.number.get(),
            size_bits: self.size.get(),
            request_id: self.msg.request_id,
            tree,
            deadline: self.msg.deadline,
        };
        network.relay.send(originate).await?
    }
}

/// Checks `number` and `size` against the route's limits, and that the request fits in the pool.
fn validate(
    limits: KeyLimits,
    number: Option<i64>,
    size: Option<i64>,
) -> Result<(KeyCount, KeySizeBits)> {
    let number = KeyCount::parse(number, limits.max_key_per_request).map_err(Error::BadRequest)?;
    let size = KeySizeBits::parse(
        size,
        limits.key_size,
        limits.min_key_size,
        limits.max_key_size,
    )
    .map_err(Error::BadRequest)?;
    let capacity = limits
        .max_key_count
        .saturating_mul(u64::from(limits.key_size));
    let asked = u64::from(number.get()) * u64::from(size.get());
    if asked > capacity {
        return Err(Error::BadRequest(format!(
            "number x size ({asked} bits) exceeds the {capacity} bits of key material this link's pool holds (max_key_count x key_size)"
        )));
    }
    Ok((number, size))
}

/// Keys between SAEs of this KME never leave it, so they need no link material: they come
/// from the OS CSPRNG and are stored for the slaves like any other key.
fn local_keys(
    master: &SaeId,
    slaves: &[SaeId],
    number: KeyCount,
    size: KeySizeBits,
    request_id: Uuid,
) -> Result<(Vec<Key>, InsertLocalKeys)> {
    let mut keys = Vec::with_capacity(number.get() as usize);
    for _ in 0..number.get() {
        let mut material = vec![0u8; size.get() as usize / 8];
        openssl::rand::rand_bytes(&mut material)
            .map_err(|err| Error::Unavailable(format!("CSPRNG failed: {err}")))?;
        keys.push(Key {
            id: Uuid::now_v7(),
            material,
        });
    }
    let audit = AuditRecord::new(
        "keys_delivered",
        Delivered {
            request_id,
            master,
            slaves,
            link: "local",
            start: None,
            end: None,
            size: size.get(),
            key_IDs: keys.iter().map(|k| k.id).collect(),
        },
    );
    let op = InsertLocalKeys {
        keys: keys
            .iter()
            .map(|k| LocalKey {
                id: k.id,
                master: master.clone(),
                slaves: slaves.to_vec(),
                material: k.material.clone(),
            })
            .collect(),
        audit,
    };
    Ok((keys, op))
}

/// dec_keys: sent by the edge with validated key_IDs and the time by which the retrieval must
/// have reached storage. Result: the keys, consumed for this slave.
#[derive(Message)]
#[rtype(result = "Result<Vec<Key>>")]
pub struct DecKeys {
    pub identity: CertIdentity,
    pub master: String,
    pub key_ids: Vec<Uuid>,
    pub deadline: Instant,
}

impl Handler<DecKeys> for SaeRegistry {
    type Result = ResponseFuture<Result<Vec<Key>>>;

    fn handle(&mut self, msg: DecKeys, _ctx: &mut Context<Self>) -> Self::Result {
        let caller = self.identify(&msg.identity).and_then(|caller| {
            self.quotas.admit_request(&caller)?;
            let keys = u32::try_from(msg.key_ids.len()).unwrap_or(u32::MAX);
            self.quotas.admit_keys(&caller, keys)?;
            Ok(caller)
        });
        let caller = match caller {
            Ok(caller) => caller,
            Err(err) => return Box::pin(async { Err(err) }),
        };
        let op = Retrieve {
            caller,
            master: SaeId::new(&msg.master),
            key_ids: msg.key_ids,
            deadline: msg.deadline,
        };
        let store = self.store.clone();
        Box::pin(async move { store.send(Exec(op)).await? })
    }
}

/// At the slave's KME: a neighbour binds positions of its stream to key_IDs (one activation
/// batch, whose SHA-256 `digest` makes a retry recognisable). Only keys of the neighbour's own
/// SAEs, for SAEs of this KME, within the link's limits: anything else is refused whole.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub struct BindFromPeer {
    pub peer: KmeId,
    pub seq: u64,
    pub digest: [u8; 32],
    pub bindings: Vec<Binding>,
}

impl Handler<BindFromPeer> for SaeRegistry {
    type Result = ResponseFuture<Result<()>>;

    fn handle(&mut self, msg: BindFromPeer, _ctx: &mut Context<Self>) -> Self::Result {
        let op = match self.authorise_bindings(msg) {
            Ok(op) => op,
            Err(err) => return Box::pin(async { Err(err) }),
        };
        let store = self.store.clone();
        let relay = self.network.as_ref().map(|n| n.relay.clone());
        let from = op.peer.clone();
        Box::pin(async move {
            let arrivals = store.send(Exec(op)).await??;
            if let (false, Some(relay)) = (arrivals.is_empty(), relay) {
                relay.send(Arrived { from, arrivals }).await?;
            }
            Ok(())
        })
    }
}

impl SaeRegistry {
    /// The durable activation of `msg`, if every binding in it is one the neighbour may make.
    fn authorise_bindings(&self, msg: BindFromPeer) -> Result<Activate> {
        let BindFromPeer {
            peer,
            seq,
            digest,
            bindings,
        } = msg;
        let Some(route) = self.neighbours.get(&peer) else {
            return Err(Error::PeerMessage(format!("{peer} is not a neighbour")));
        };
        let mut local_slaves = Vec::with_capacity(bindings.len());
        for b in &bindings {
            // A relayed key was checked by the master's KME against the relay limits (the
            // `[defaults]` of the network file, the same at every KME), not this link's.
            let limits = match b.relay {
                None => route.limits,
                Some(_) => self.local_limits,
            };
            let max_key_bytes = limits.max_key_size / 8;
            let max_keys = limits.max_key_per_request as usize;
            if b.len == 0
                || b.len > max_key_bytes
                || b.slaves.is_empty()
                || b.key_ids.is_empty()
                || b.key_ids.len() > max_keys
            {
                return Err(Error::PeerMessage(format!(
                    "a binding of {} has a bad length, no key or no slave",
                    b.master
                )));
            }
            let local = match &b.relay {
                None => self.direct_binding(&peer, b)?,
                Some(leg) => self.relay_binding(&peer, b, leg)?,
            };
            local_slaves.push(local);
        }
        Ok(Activate {
            block_bytes: route.block_bytes,
            peer,
            seq,
            digest,
            bindings,
            local_slaves,
        })
    }

    /// A neighbour binds keys of its own SAEs for SAEs of this KME. Returns those slaves.
    fn direct_binding(&self, peer: &KmeId, b: &Binding) -> Result<Vec<SaeId>> {
        if self.homes.get(&b.master) != Some(peer) {
            return Err(Error::PeerMessage(format!(
                "master {} is not an SAE of {peer}",
                b.master
            )));
        }
        if let Some(foreign) = b
            .slaves
            .iter()
            .find(|s| self.homes.get(*s) != Some(&self.me))
        {
            return Err(Error::PeerMessage(format!(
                "slave {foreign} is not an SAE of this KME"
            )));
        }
        Ok(b.slaves.clone())
    }

    /// A relay leg: only the master's KME sends a leg of link material (unsealed); the tree
    /// below is bounded, has no loop and starts at neighbours of this KME; every slave is a
    /// registered SAE, and something is held here or goes on. Returns the slaves homed here.
    fn relay_binding(&self, peer: &KmeId, b: &Binding, leg: &RelayLeg) -> Result<Vec<SaeId>> {
        let refuse =
            |why: String| Err(Error::PeerMessage(format!("relay {}: {why}", leg.relay_id)));
        let Some(origin) = self.homes.get(&b.master) else {
            return refuse(format!("master {} is not a registered SAE", b.master));
        };
        if leg.sealed.is_none() && origin != peer {
            return refuse(format!("only {origin} sends the keys of {}", b.master));
        }
        let below: Vec<&KmeId> = leg.onward.iter().flat_map(Branch::kmes).collect();
        let depth = leg.onward.iter().map(Branch::depth).max().unwrap_or(0);
        let distinct: HashSet<&KmeId> = below.iter().copied().collect();
        if below.len() > MAX_TREE_KMES
            || depth > MAX_RELAY_HOPS as usize
            || distinct.len() != below.len()
            || [&self.me, peer, origin]
                .iter()
                .any(|k| distinct.contains(k))
        {
            return refuse("the tree below this KME is too large or loops".into());
        }
        if let Some(far) = leg
            .onward
            .iter()
            .find(|n| !self.neighbours.contains_key(&n.kme))
        {
            return refuse(format!("{} is not a neighbour of this KME", far.kme));
        }
        if let Some(unknown) = b.slaves.iter().find(|s| !self.homes.contains_key(*s)) {
            return refuse(format!("slave {unknown} is not a registered SAE"));
        }
        let local: Vec<SaeId> = b
            .slaves
            .iter()
            .filter(|s| self.homes.get(*s) == Some(&self.me))
            .cloned()
            .collect();
        if local.is_empty() && leg.onward.is_empty() {
            return refuse("no slave of this KME and nowhere to go".into());
        }
        Ok(local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> KeyLimits {
        KeyLimits {
            key_size: 256,
            min_key_size: 64,
            max_key_size: 8192,
            max_key_per_request: 128,
            max_key_count: 1000,
            max_sae_id_count: 1,
        }
    }

    fn registry() -> SaeRegistry {
        let homes = [
            ("sae-a", "kme-a"),
            ("sae-b", "kme-b"),
            ("sae-b2", "kme-b"),
            ("sae-c", "kme-c"),
        ]
        .into_iter()
        .map(|(s, k)| (SaeId::new(s), KmeId::new(k)))
        .collect();
        let kmes = ["kme-a", "kme-b", "kme-c"]
            .into_iter()
            .map(KmeId::new)
            .collect();
        let writer = SyncArbiter::start(1, || {
            crate::storage::writer::DbWriter::new(test_pool(), test_sealer())
        });
        let store = Store::new(writer, std::time::Duration::from_secs(60)).start();
        SaeRegistry::new(
            KmeId::new("kme-b"),
            store,
            homes,
            kmes,
            Vec::new(),
            limits(),
        )
    }

    fn test_sealer() -> std::sync::Arc<crate::storage::sealing::Sealer> {
        std::sync::Arc::new(crate::storage::sealing::Sealer::from_master(&[1u8; 32]).unwrap())
    }

    fn test_pool() -> crate::storage::db::DbPool {
        let dir = tempfile::tempdir().unwrap();
        let (writer, _) = crate::storage::db::open(&dir.path().join("t.sqlite"), 1).unwrap();
        std::mem::forget(dir);
        writer
    }

    fn cert(cn: &str) -> CertIdentity {
        CertIdentity {
            cn: Some(cn.to_string()),
            sha256: format!("{:064x}", cn.len()),
            ..CertIdentity::default()
        }
    }

    #[actix::test]
    async fn identities() {
        let r = registry();
        assert_eq!(r.identify(&cert("sae-b")).unwrap(), SaeId::new("sae-b"));
        // Bound by a SAN URI (a SPIFFE ID): that URI is sae-b2, whatever the CN; a
        // certificate naming two bound SAEs is nobody's.
        let spiffe = |uri: &str| CertBinding::Uri(uri.to_string());
        let pinned = [
            (spiffe("spiffe://kme.test/sae-b2"), SaeId::new("sae-b2")),
            (spiffe("spiffe://kme.test/sae-b"), SaeId::new("sae-b")),
        ]
        .into_iter()
        .collect();
        let r = registry().with_pinned(pinned);
        let workload = |uris: &[&str]| CertIdentity {
            cn: Some("workload-7".into()),
            uris: uris.iter().map(|u| u.to_string()).collect(),
            ..CertIdentity::default()
        };
        let b2 = workload(&["spiffe://kme.test/sae-b2"]);
        assert_eq!(r.identify(&b2).unwrap(), SaeId::new("sae-b2"));
        assert!(r.identify(&cert("sae-b2")).is_err(), "its CN alone");
        assert!(r.identify(&workload(&["spiffe://kme.test/other"])).is_err());
        let both = workload(&["spiffe://kme.test/sae-b2", "spiffe://kme.test/sae-b"]);
        assert!(r.identify(&both).is_err(), "ambiguous");
        assert!(matches!(
            r.identify(&cert("sae-a")),
            Err(Error::NotAuthorized(_))
        ));
        assert!(matches!(
            r.identify(&cert("kme-a")),
            Err(Error::NotAuthorized(_))
        ));
        assert!(matches!(
            r.identify(&cert("nobody")),
            Err(Error::NotAuthorized(_))
        ));
        // Pinned: only the certificate with that fingerprint is sae-b2, whatever its CN.
        let pinned = [(CertBinding::Sha256("f".repeat(64)), SaeId::new("sae-b2"))]
            .into_iter()
            .collect();
        let r = registry().with_pinned(pinned);
        let holder = CertIdentity {
            cn: None,
            sha256: "f".repeat(64),
            ..CertIdentity::default()
        };
        assert_eq!(r.identify(&holder).unwrap(), SaeId::new("sae-b2"));
        assert!(matches!(
            r.identify(&cert("sae-b2")),
            Err(Error::NotAuthorized(_))
        ));
        assert_eq!(r.identify(&cert("sae-b")).unwrap(), SaeId::new("sae-b"));
    }

    #[actix::test]
    async fn routes_and_refusals() {
        let r = registry();
        let local = r
            .route(&cert("sae-b"), "sae-b2", &[], RoutePolicy::default())
            .unwrap();
        assert!(matches!(local.target, Target::Local(_)));
        assert!(matches!(
            r.route(&cert("sae-b"), "sae-b", &[], RoutePolicy::default()),
            Err(Error::BadRequest(_))
        ));
        assert!(matches!(
            r.route(&cert("sae-b"), "ghost", &[], RoutePolicy::default()),
            Err(Error::BadRequest(_))
        ));
        // Not a neighbour (this registry has none): relayed, unless the SAE made
        // `kme_route_type: "direct"` mandatory.
        let far = r.route(&cert("sae-b"), "sae-a", &[], RoutePolicy::default());
        assert!(
            matches!(far.map(|r| r.target), Ok(Target::Relay { kmes, local_slaves, .. })
                if kmes == [KmeId::new("kme-a")] && local_slaves.is_empty())
        );
        let direct = RoutePolicy {
            direct_only: true,
            ..RoutePolicy::default()
        };
        assert!(matches!(
            r.route(&cert("sae-b"), "sae-a", &[], direct),
            Err(Error::ExtensionUnmet(_))
        ));
        // A multicast with a slave here and one elsewhere: held here too.
        let mixed = r.route(
            &cert("sae-b"),
            "sae-b2",
            &["sae-c".to_string()],
            RoutePolicy::default(),
        );
        assert!(
            matches!(mixed.map(|r| r.target), Ok(Target::Relay { kmes, local_slaves, .. })
                if kmes == [KmeId::new("kme-c")] && local_slaves == [SaeId::new("sae-b2")])
        );
        let dup = vec!["sae-b2".to_string()];
        assert!(matches!(
            r.route(&cert("sae-b"), "sae-b2", &dup, RoutePolicy::default()),
            Err(Error::BadRequest(_))
        ));
        let own = vec!["sae-b".to_string()];
        assert!(matches!(
            r.route(&cert("sae-b"), "sae-b2", &own, RoutePolicy::default()),
            Err(Error::BadRequest(_))
        ));
    }

    #[actix::test]
    async fn a_request_that_can_never_pass_gets_400_before_one_no_route_serves_now_gets_503() {
        let r = registry().start();
        let enc = |additional: &[&str], size| EncKeys {
            identity: cert("sae-b"),
            slave: "sae-b2".into(),
            additional: additional.iter().map(|s| s.to_string()).collect(),
            number: Some(1),
            size: Some(size),
            request_id: Uuid::new_v4(),
            policy: RoutePolicy::default(),
            deadline: Instant::now() + std::time::Duration::from_secs(5),
        };
        // sae-a is at another KME (503 now), but two additional slaves exceed the limit of
        // one, and 12 bits is not a size: those never pass.
        let too_many = r.send(enc(&["sae-a", "sae-c"], 256)).await.unwrap();
        assert_eq!(
            too_many,
            Err(Error::BadRequest(
                "at most 1 additional slave SAE IDs are allowed".into()
            ))
        );
        let bad_size = r.send(enc(&["sae-a"], 12)).await.unwrap();
        assert!(matches!(bad_size, Err(Error::BadRequest(m)) if m.contains("multiple of 8")));
        let elsewhere = r.send(enc(&["sae-a"], 256)).await.unwrap();
        assert!(matches!(elsewhere, Err(Error::Unreachable(_))));
    }
}
