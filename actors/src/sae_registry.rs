//! SaeRegistry: the front door of every SAE request — who the caller is, where its keys go.
//!
//! Owns: certificate identity → SAE ID (the CN by default), SAE → home KME, the KMEs of the
//! network, and the route to each neighbour (its `KeyPool`, `Link` and ETSI limits).
//! Handles, one message per HTTP request from the edge: `KeyStatus` (status), `EncKeys`
//! (enc_keys), `DecKeys` (dec_keys), `Identify` (whoami, and refusals of bad requests), and
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
use crate::storage::audit::{AuditRecord, Delivered};
use crate::storage::ops::{Activate, InsertLocalKeys, LocalKey, Retrieve};
use crate::storage::store::{Exec, Store};
use crate::types::{Binding, CertIdentity, Key, KeyCount, KeyLimits, KeySizeBits, KmeId, SaeId};

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
}

impl Target {
    pub fn limits(&self) -> KeyLimits {
        match self {
            Target::Neighbour(route) => route.limits,
            Target::Local(limits) => *limits,
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

pub struct SaeRegistry {
    me: KmeId,
    store: Addr<Store>,
    /// SAE ID → home KME, for every SAE of the network.
    homes: HashMap<SaeId, KmeId>,
    kmes: HashSet<KmeId>,
    neighbours: HashMap<KmeId, NeighbourRoute>,
    local_limits: KeyLimits,
    /// SAEs identified by their certificate's SHA-256 instead of its CN.
    pinned: HashMap<String, SaeId>,
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
        }
    }

    /// Identify these SAEs by certificate fingerprint (SHA-256, lowercase hex) only: their CN
    /// alone no longer suffices.
    pub fn with_pinned(mut self, pinned: HashMap<String, SaeId>) -> Self {
        self.pinned = pinned;
        self
    }

    /// The SAE behind a verified certificate identity, if it is homed on this KME.
    pub fn identify(&self, identity: &CertIdentity) -> Result<SaeId> {
        let id = match (self.pinned.get(&identity.sha256), &identity.cn) {
            (Some(sae), _) => sae.clone(),
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
    /// (identity, unknown or repeated SAEs, too many slaves) is refused before what depends on
    /// the network now (a slave KME no route reaches): 401/400 before 503.
    pub fn route(
        &self,
        identity: &CertIdentity,
        slave: &str,
        additional: &[String],
    ) -> Result<KeyRoute> {
        self.resolve(identity, slave, additional)?.into_route()
    }

    /// A request's SAEs, checked; its target, or why no route reaches it now.
    fn resolve(
        &self,
        identity: &CertIdentity,
        slave: &str,
        additional: &[String],
    ) -> Result<Resolved> {
        let master = self.identify(identity)?;
        let (slave, slave_kme) = self.known_sae(slave, "slave_SAE_ID")?;
        if slave == master {
            return Err(Error::BadRequest(
                "the master SAE cannot be its own slave".into(),
            ));
        }
        let mut slaves = vec![slave];
        let mut elsewhere = None;
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
            if home != slave_kme && elsewhere.is_none() {
                elsewhere = Some(extra.clone());
            }
            slaves.push(extra);
        }
        let target = if slave_kme == self.me {
            Some(Target::Local(self.local_limits))
        } else {
            self.neighbours
                .get(&slave_kme)
                .cloned()
                .map(Target::Neighbour)
        };
        if let Some(target) = &target {
            let limit = target.limits().max_sae_id_count as usize;
            if additional.len() > limit {
                return Err(Error::BadRequest(format!(
                    "at most {limit} additional slave SAE IDs are allowed"
                )));
            }
        }
        let reach = match (target, elsewhere) {
            (Some(target), None) => Reach::Now(target),
            (Some(target), Some(extra)) => Reach::Later {
                limits: Some(target.limits()),
                why: Error::Unreachable(format!(
                    "additional slave {extra} is not at the KME of the first slave: multicast across KMEs needs trusted-node relay, not available yet"
                )),
            },
            (None, _) => Reach::Later {
                limits: None,
                why: Error::Unreachable(format!(
                    "no route to {slave_kme}, the KME of the slave SAE: it is not a neighbour of this KME and trusted-node relay is not available yet"
                )),
            },
        };
        Ok(Resolved {
            master,
            slaves,
            slave_kme,
            reach,
        })
    }
}

/// A request whose SAEs are checked, and how far it reaches.
struct Resolved {
    master: SaeId,
    slaves: Vec<SaeId>,
    slave_kme: KmeId,
    reach: Reach,
}

enum Reach {
    /// Served now from this target.
    Now(Target),
    /// Not servable now (503): `why`; `limits` of the first slave's route, if there is one.
    Later {
        limits: Option<KeyLimits>,
        why: Error,
    },
}

impl Resolved {
    fn into_route(self) -> Result<KeyRoute> {
        match self.reach {
            Reach::Now(target) => Ok(KeyRoute {
                master: self.master,
                slaves: self.slaves,
                slave_kme: self.slave_kme,
                target,
            }),
            Reach::Later { why, .. } => Err(why),
        }
    }

    /// The route of an enc_keys request and its checked `number` and `size`. The size checks
    /// use the first slave's limits even when the request cannot be served now: 400 before 503.
    fn into_request(
        self,
        number: Option<i64>,
        size: Option<i64>,
    ) -> Result<(KeyRoute, KeyCount, KeySizeBits)> {
        if let Reach::Later {
            limits: Some(limits),
            ..
        } = &self.reach
        {
            validate(*limits, number, size)?;
        }
        let route = self.into_route()?;
        let (number, size) = validate(route.target.limits(), number, size)?;
        Ok((route, number, size))
    }
}

impl Actor for SaeRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
    }
}

/// Which registered SAE of this KME is calling. Sent by the HTTP edge with the verified
/// certificate identity. Result: its SAE ID, or `NotAuthorized`.
#[derive(Message)]
#[rtype(result = "Result<SaeId>")]
pub struct Identify {
    pub identity: CertIdentity,
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
    /// The link's peer, health and available bytes (None for keys local to this KME).
    pub link: Option<(KmeId, Health, u64)>,
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
        let route = match self.route(&msg.identity, &msg.slave, &[]) {
            Ok(route) => route,
            Err(err) => return Box::pin(async { Err(err) }),
        };
        let mut report = StatusReport {
            master: route.master,
            slave: route
                .slaves
                .into_iter()
                .next()
                .unwrap_or_else(|| SaeId::new("")),
            slave_kme: route.slave_kme,
            limits: route.target.limits(),
            stored_key_count: route.target.limits().max_key_count,
            link: None,
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
        }
    }
}

/// enc_keys: sent by the edge with the request's raw `number` and `size`. Result: the keys,
/// durable at every KME involved; or why not (400/401/503 variants).
#[derive(Message)]
#[rtype(result = "Result<Vec<Key>>")]
pub struct EncKeys {
    pub identity: CertIdentity,
    pub slave: String,
    pub additional: Vec<String>,
    pub number: Option<i64>,
    pub size: Option<i64>,
    pub request_id: Uuid,
}

impl Handler<EncKeys> for SaeRegistry {
    type Result = ResponseFuture<Result<Vec<Key>>>;

    fn handle(&mut self, msg: EncKeys, _ctx: &mut Context<Self>) -> Self::Result {
        let prepared = self
            .resolve(&msg.identity, &msg.slave, &msg.additional)
            .and_then(|resolved| resolved.into_request(msg.number, msg.size));
        let (route, number, size) = match prepared {
            Ok(prepared) => prepared,
            Err(err) => return Box::pin(async { Err(err) }),
        };
        match route.target {
            Target::Neighbour(link) => {
                let deliver = Deliver {
                    master: route.master,
                    slaves: route.slaves,
                    number: number.get(),
                    size_bits: size.get(),
                    request_id: msg.request_id,
                };
                Box::pin(async move { link.pool.send(deliver).await? })
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
        }
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
        let caller = match self.identify(&msg.identity) {
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
        Box::pin(async move { store.send(Exec(op)).await? })
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
        let max_key_bytes = route.limits.max_key_size / 8;
        let max_keys = route.limits.max_key_per_request as usize;
        for b in &bindings {
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
            // UUIDv7 only: their time prefix orders keys for expiry (`ExpireKeys`).
            if b.key_ids.iter().any(|id| id.get_version_num() != 7) {
                return Err(Error::PeerMessage(format!(
                    "a binding of {} has key_IDs that are not UUIDv7",
                    b.master
                )));
            }
            if self.homes.get(&b.master) != Some(&peer) {
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
        }
        Ok(Activate {
            block_bytes: route.block_bytes,
            peer,
            seq,
            digest,
            bindings,
        })
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
        }
    }

    #[actix::test]
    async fn identities() {
        let r = registry();
        assert_eq!(r.identify(&cert("sae-b")).unwrap(), SaeId::new("sae-b"));
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
        let pinned = [("f".repeat(64), SaeId::new("sae-b2"))]
            .into_iter()
            .collect();
        let r = registry().with_pinned(pinned);
        let holder = CertIdentity {
            cn: None,
            sha256: "f".repeat(64),
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
        let local = r.route(&cert("sae-b"), "sae-b2", &[]).unwrap();
        assert!(matches!(local.target, Target::Local(_)));
        assert!(matches!(
            r.route(&cert("sae-b"), "sae-b", &[]),
            Err(Error::BadRequest(_))
        ));
        assert!(matches!(
            r.route(&cert("sae-b"), "ghost", &[]),
            Err(Error::BadRequest(_))
        ));
        assert!(matches!(
            r.route(&cert("sae-b"), "sae-a", &[]),
            Err(Error::Unreachable(_))
        ));
        let dup = vec!["sae-b2".to_string()];
        assert!(matches!(
            r.route(&cert("sae-b"), "sae-b2", &dup),
            Err(Error::BadRequest(_))
        ));
        let own = vec!["sae-b".to_string()];
        assert!(matches!(
            r.route(&cert("sae-b"), "sae-b2", &own),
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
