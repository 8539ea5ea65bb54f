//! SaeRegistry: who the callers are and where their keys go.
//!
//! Owns: certificate identity → SAE ID (the CN by default), SAE → home KME, the KMEs of the
//! network, and the route to each neighbour (its `KeyPool`, `Link` and ETSI limits).
//! Handles: `Identify` (whoami, dec_keys, every request), `RouteKeys` (status and enc_keys),
//! sent by the HTTP edge, one message per request. Read-only after start-up, so it never
//! waits on anything and answers in O(1).
//! Mailbox: bounded; the edge uses `send` under its request timeout.

use std::collections::{HashMap, HashSet};

use actix::prelude::*;

use crate::error::{Error, Result};
use crate::key_pool::KeyPool;
use crate::link::Link;
use crate::types::{KeyLimits, KmeId, SaeId};

const MAILBOX_CAPACITY: usize = 4096;

/// The way to one neighbour KME.
#[derive(Clone)]
pub struct NeighbourRoute {
    pub peer: KmeId,
    pub pool: Addr<KeyPool>,
    pub link: Addr<Link>,
    pub limits: KeyLimits,
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
    /// SAE ID → home KME, for every SAE of the network.
    homes: HashMap<SaeId, KmeId>,
    kmes: HashSet<KmeId>,
    neighbours: HashMap<KmeId, NeighbourRoute>,
    local_limits: KeyLimits,
}

impl SaeRegistry {
    pub fn new(
        me: KmeId,
        homes: HashMap<SaeId, KmeId>,
        kmes: HashSet<KmeId>,
        neighbours: Vec<NeighbourRoute>,
        local_limits: KeyLimits,
    ) -> Self {
        Self {
            me,
            homes,
            kmes,
            neighbours: neighbours
                .into_iter()
                .map(|r| (r.peer.clone(), r))
                .collect(),
            local_limits,
        }
    }

    /// The SAE behind a verified certificate identity, if it is homed on this KME.
    pub fn identify(&self, identity: &str) -> Result<SaeId> {
        let id = SaeId::new(identity);
        match self.homes.get(&id) {
            Some(home) if *home == self.me => Ok(id),
            Some(home) => Err(Error::NotAuthorized(format!(
                "SAE {identity} is registered at KME {home}, not at this KME"
            ))),
            None if self.kmes.contains(&KmeId::new(identity)) => Err(Error::NotAuthorized(
                "KME certificates are not accepted on the SAE API".into(),
            )),
            None => Err(Error::NotAuthorized(format!(
                "certificate identity {identity} is not a registered SAE"
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

    pub fn route(&self, identity: &str, slave: &str, additional: &[String]) -> Result<KeyRoute> {
        let master = self.identify(identity)?;
        let (slave, slave_kme) = self.known_sae(slave, "slave_SAE_ID")?;
        if slave == master {
            return Err(Error::BadRequest(
                "the master SAE cannot be its own slave".into(),
            ));
        }
        let mut slaves = vec![slave];
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
            if home != slave_kme {
                return Err(Error::Unreachable(format!(
                    "additional slave {extra} is not at the KME of the first slave: multicast across KMEs needs trusted-node relay, not available yet"
                )));
            }
            slaves.push(extra);
        }
        let target = if slave_kme == self.me {
            Target::Local(self.local_limits)
        } else if let Some(route) = self.neighbours.get(&slave_kme) {
            Target::Neighbour(route.clone())
        } else {
            return Err(Error::Unreachable(
                "the KME of the slave SAE is not a neighbour of this KME: trusted-node relay is not available yet".into(),
            ));
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
    pub identity: String,
}

impl Handler<Identify> for SaeRegistry {
    type Result = Result<SaeId>;

    fn handle(&mut self, msg: Identify, _ctx: &mut Context<Self>) -> Self::Result {
        self.identify(&msg.identity)
    }
}

/// Resolve status / enc_keys: caller, slaves and the source of the keys. Sent by the edge.
#[derive(Message)]
#[rtype(result = "Result<KeyRoute>")]
pub struct RouteKeys {
    pub identity: String,
    pub slave: String,
    pub additional: Vec<String>,
}

impl Handler<RouteKeys> for SaeRegistry {
    type Result = Result<KeyRoute>;

    fn handle(&mut self, msg: RouteKeys, _ctx: &mut Context<Self>) -> Self::Result {
        self.route(&msg.identity, &msg.slave, &msg.additional)
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
        SaeRegistry::new(KmeId::new("kme-b"), homes, kmes, Vec::new(), limits())
    }

    #[test]
    fn identities() {
        let r = registry();
        assert_eq!(r.identify("sae-b").unwrap(), SaeId::new("sae-b"));
        assert!(matches!(r.identify("sae-a"), Err(Error::NotAuthorized(_))));
        assert!(matches!(r.identify("kme-a"), Err(Error::NotAuthorized(_))));
        assert!(matches!(r.identify("nobody"), Err(Error::NotAuthorized(_))));
    }

    #[test]
    fn routes_and_refusals() {
        let r = registry();
        let local = r.route("sae-b", "sae-b2", &[]).unwrap();
        assert!(matches!(local.target, Target::Local(_)));
        assert!(matches!(
            r.route("sae-b", "sae-b", &[]),
            Err(Error::BadRequest(_))
        ));
        assert!(matches!(
            r.route("sae-b", "ghost", &[]),
            Err(Error::BadRequest(_))
        ));
        assert!(matches!(
            r.route("sae-b", "sae-a", &[]),
            Err(Error::Unreachable(_))
        ));
        let dup = vec!["sae-b2".to_string()];
        assert!(matches!(
            r.route("sae-b", "sae-b2", &dup),
            Err(Error::BadRequest(_))
        ));
        let own = vec!["sae-b".to_string()];
        assert!(matches!(
            r.route("sae-b", "sae-b2", &own),
            Err(Error::BadRequest(_))
        ));
    }
}
