//! Router: the topology of the QKD network and the routes to every KME.
//!
//! Owns: the static topology (every `[[link]]` of the network file), this KME's view of its own
//! links (state and material, refreshed every advert interval from its `KeyPool`s and `Link`s),
//! the newest link state news of every other KME (by origin, highest `seq` wins, so stale news
//! never overrides fresh), and when each neighbour was last heard.
//! Handles: `FindTree` (from `SaeRegistry`: routes for a request), `RouteView` (status),
//! `OwnFullPairs` and `SubscribeFullPairs` (from `SaeRegistry`: SAE pairs at their cap on
//! waiting keys travel with the link state news), `TopologyFromPeer` (from the KME-to-KME
//! edge). Sends: `Advertise` to each neighbour's
//! `PeerLink` every interval, carrying its own news and all it knows (flooding; at most one
//! advert per KME of the network, so the message is bounded).
//! Routes are shortest paths (breadth-first, at most `max_hops`) over hops that are usable now:
//! the link exists in the network file, neither end reports it `down` (a BB84 link whose
//! eavesdropper alarm is on is down), the sending end holds the material the request needs,
//! and a neighbour of this KME has been heard within `LIVENESS_ROUNDS` intervals (this KME
//! advertises a link to a silent neighbour as down, so KMEs further away route around a dead
//! KME too). News can only describe links of the file, each once, and only their origin's
//! end, so a neighbour cannot invent a route through itself; news not refreshed for
//! `NEWS_EXPIRY_ROUNDS` intervals is dropped; routes never repeat a KME.
//! Mailbox: bounded; the registry uses `send` under its request timeout.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::error::{Error, Result};
use crate::key_pool::{KeyPool, PoolStatus};
use crate::link::key_source::Condition;
use crate::link::{LinkAddr, LinkHealth};
use crate::peer::peer_link::{Advertise, PeerLink};
use crate::peer::protocol::{Advert, LinkReport, TopologyUpdate};
use crate::types::{Branch, KmeId, SaeId};

const MAILBOX_CAPACITY: usize = 1024;
/// A neighbour not heard for this many advert intervals is treated as down.
const LIVENESS_ROUNDS: u32 = 5;
/// News not refreshed for this many intervals is dropped (its origin is dead or cut off;
/// its neighbours report their links to it as down by then).
const NEWS_EXPIRY_ROUNDS: u32 = 20;
const COUNTER_MASK: u64 = (1 << 40) - 1;
/// Most full pairs one advert may name (bounds the message; a KME with more names these).
pub const MAX_FULL_PAIRS: usize = 4096;

/// This KME's end of the link to one neighbour.
#[derive(Clone)]
pub struct OwnLink {
    pub peer: KmeId,
    pub pool: Addr<KeyPool>,
    pub link: LinkAddr,
    pub peer_link: Addr<PeerLink>,
}

/// One hop's state as the router sees it (for status and refusals).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HopView {
    pub from: KmeId,
    pub to: KmeId,
    pub state: Condition,
    /// What `from` can send over the hop now, and the most it holds (None: no news yet).
    pub available_bytes: Option<u64>,
    pub capacity_bytes: Option<u64>,
}

pub struct Router {
    me: KmeId,
    /// Every link of the network, both directions.
    topology: HashSet<(KmeId, KmeId)>,
    /// The same, sorted once: searches walk it in a fixed order, so that equal routes are
    /// chosen the same way every time.
    hops: Vec<(KmeId, KmeId)>,
    kmes: HashSet<KmeId>,
    own: Vec<OwnLink>,
    own_reports: HashMap<KmeId, LinkReport>,
    /// The newest advert of each other KME, and when it arrived.
    news: HashMap<KmeId, (Advert, Instant)>,
    heard: HashMap<KmeId, Instant>,
    /// Pairs at their cap on waiting keys here (from `SaeRegistry`), advertised.
    own_full_pairs: Vec<(SaeId, SaeId)>,
    /// Told every round what pairs every KME reports full.
    full_pairs_to: Option<Recipient<FullPairs>>,
    interval: Duration,
    epoch: u64,
    counter: u64,
    started: Instant,
}

impl Router {
    /// `links`: every link of the network file; `epoch` grows with each start of this KME.
    pub fn new(
        me: KmeId,
        links: &[(KmeId, KmeId)],
        own: Vec<OwnLink>,
        interval: Duration,
        epoch: u64,
    ) -> Self {
        let mut topology = HashSet::new();
        let mut kmes = HashSet::new();
        for (a, b) in links {
            topology.insert((a.clone(), b.clone()));
            topology.insert((b.clone(), a.clone()));
            kmes.insert(a.clone());
            kmes.insert(b.clone());
        }
        let mut hops: Vec<(KmeId, KmeId)> = topology.iter().cloned().collect();
        hops.sort();
        Self {
            me,
            topology,
            hops,
            kmes,
            own,
            own_reports: HashMap::new(),
            news: HashMap::new(),
            heard: HashMap::new(),
            own_full_pairs: Vec::new(),
            full_pairs_to: None,
            interval,
            epoch,
            counter: 0,
            started: Instant::now(),
        }
    }

    fn liveness(&self) -> Duration {
        self.interval * LIVENESS_ROUNDS
    }

    /// Whether neighbour `peer` has talked within the liveness time (grace at start).
    fn heard_lately(&self, peer: &KmeId) -> bool {
        let last = self.heard.get(peer).copied().unwrap_or(self.started);
        last.elapsed() <= self.liveness()
    }

    /// News that is not too old to go by.
    fn current_news(&self) -> impl Iterator<Item = &Advert> {
        let expiry = self.interval * NEWS_EXPIRY_ROUNDS;
        self.news
            .values()
            .filter(move |(_, at)| at.elapsed() <= expiry)
            .map(|(advert, _)| advert)
    }

    /// This KME's advert from its links' `reports`: a link whose neighbour stopped talking
    /// is down, whatever its end says, so that KMEs further away route around it too.
    fn own_advert(&mut self, mut reports: Vec<LinkReport>) -> Advert {
        for report in &mut reports {
            if !self.heard_lately(&report.peer) {
                report.state = Condition::Down;
            }
        }
        self.own_reports = reports
            .iter()
            .map(|r| (r.peer.clone(), r.clone()))
            .collect();
        Advert {
            origin: self.me.clone(),
            seq: self.next_seq(),
            links: reports,
            full_pairs: self.own_full_pairs.clone(),
        }
    }

    /// Tells the subscriber which pairs each KME reports full now.
    fn tell_full_pairs(&self) {
        if let Some(to) = &self.full_pairs_to {
            let by_origin = self
                .current_news()
                .map(|a| (a.origin.clone(), a.full_pairs.clone()))
                .collect();
            // Advisory: a missed round is made up by the next one.
            let _ = to.try_send(FullPairs { by_origin });
        }
    }

    /// The state of the hop `from → to` and what `from` can send over it.
    /// What `origin` last said about its end of the link to `peer`.
    fn report(&self, origin: &KmeId, peer: &KmeId) -> Option<LinkReport> {
        let report = if *origin == self.me {
            self.own_reports.get(peer)
        } else {
            self.current_news()
                .find(|a| a.origin == *origin)
                .and_then(|a| a.links.iter().find(|l| l.peer == *peer))
        };
        report.cloned()
    }

    fn hop(&self, from: &KmeId, to: &KmeId) -> HopView {
        let sender = self.report(from, to);
        let receiver = self.report(to, from);
        let mut state = worst(
            sender.as_ref().map_or(Condition::Up, |r| r.state),
            receiver.as_ref().map_or(Condition::Up, |r| r.state),
        );
        // A neighbour that stopped talking is down, whatever it said last (grace at start).
        let neighbour = if *from == self.me {
            Some(to)
        } else if *to == self.me {
            Some(from)
        } else {
            None
        };
        if neighbour.is_some_and(|n| !self.heard_lately(n)) {
            state = Condition::Down;
        }
        HopView {
            from: from.clone(),
            to: to.clone(),
            state,
            available_bytes: sender.as_ref().map(|r| r.available_bytes),
            capacity_bytes: sender.map(|r| r.capacity_bytes),
        }
    }

    fn usable(&self, from: &KmeId, to: &KmeId, need: u64) -> bool {
        let hop = self.hop(from, to);
        hop.state != Condition::Down && hop.available_bytes.is_none_or(|a| a >= need)
    }

    /// Breadth-first from this KME over hops that `usable` allows: each reached KME's parent.
    fn search(
        &self,
        max_hops: u32,
        usable: impl Fn(&KmeId, &KmeId) -> bool,
    ) -> HashMap<KmeId, KmeId> {
        let mut parent = HashMap::new();
        let mut depth = HashMap::from([(self.me.clone(), 0u32)]);
        let mut queue = VecDeque::from([self.me.clone()]);
        while let Some(at) = queue.pop_front() {
            let d = depth.get(&at).copied().unwrap_or(0);
            if d >= max_hops {
                continue;
            }
            for (a, b) in &self.hops {
                if *a != at || depth.contains_key(b) || !usable(a, b) {
                    continue;
                }
                depth.insert(b.clone(), d + 1);
                parent.insert(b.clone(), a.clone());
                queue.push_back(b.clone());
            }
        }
        parent
    }

    /// The path from this KME to `to` (without this KME), from a search's parents.
    fn path(parent: &HashMap<KmeId, KmeId>, me: &KmeId, to: &KmeId) -> Option<Vec<KmeId>> {
        let mut path = vec![to.clone()];
        let mut at = to;
        while let Some(up) = parent.get(at) {
            if up == me {
                path.reverse();
                return Some(path);
            }
            path.push(up.clone());
            at = up;
        }
        None
    }

    /// Why no usable route reaches `to`: the first hop of the shortest path in the file that
    /// is not usable now, or that the route is too long.
    fn why_unreachable(&self, to: &KmeId, max_hops: u32, need: u64) -> Error {
        let any = self.search(u32::MAX, |_, _| true);
        let Some(path) = Self::path(&any, &self.me, to) else {
            return Error::Unreachable(format!("no link of the network leads to {to}"));
        };
        if path.len() > max_hops as usize {
            // Not a matter of time: the network has no route that short.
            return Error::ExtensionUnmet(format!(
                "kme_max_hops {max_hops}: the shortest route to {to} has {} hops",
                path.len()
            ));
        }
        let mut from = self.me.clone();
        for hop in &path {
            if !self.usable(&from, hop, need) {
                let view = self.hop(&from, hop);
                let what = match view.state {
                    Condition::Down => "is down".to_string(),
                    _ => format!(
                        "cannot carry the request now ({} bytes available)",
                        view.available_bytes.unwrap_or(0)
                    ),
                };
                return Error::Unreachable(format!(
                    "no route to {to}: the hop {from} -> {hop} {what}, and no other route is usable"
                ));
            }
            from = hop.clone();
        }
        Error::Unreachable(format!(
            "no route to {to} within {max_hops} hops while some links are down"
        ))
    }

    /// The tree of shortest usable paths from this KME to every KME of `to`, not over the
    /// direct link to `avoid`.
    pub fn tree(
        &self,
        to: &[KmeId],
        max_hops: u32,
        need: u64,
        avoid: Option<&KmeId>,
    ) -> Result<Vec<Branch>> {
        let avoided = |a: &KmeId, b: &KmeId| *a == self.me && Some(b) == avoid;
        let parent = self.search(max_hops, |a, b| !avoided(a, b) && self.usable(a, b, need));
        let mut roots: Vec<Branch> = Vec::new();
        for kme in to {
            let Some(path) = Self::path(&parent, &self.me, kme) else {
                return Err(self.why_unreachable(kme, max_hops, need));
            };
            insert_path(&mut roots, &path);
        }
        Ok(roots)
    }

    fn next_seq(&mut self) -> u64 {
        self.counter = (self.counter + 1).min(COUNTER_MASK);
        (self.epoch << 40) | self.counter
    }

    /// Refreshes this KME's own reports, then sends everything known to every neighbour.
    fn advertise(&mut self, ctx: &mut Context<Self>) {
        let own = self.own.clone();
        let refresh = async move {
            let mut reports = Vec::with_capacity(own.len());
            for link in &own {
                let counts = link.pool.send(PoolStatus).await;
                let health = link.link.health.send(LinkHealth).await;
                let report = match (counts, health) {
                    (Ok(counts), Ok(health)) => LinkReport {
                        peer: link.peer.clone(),
                        state: health.state,
                        available_bytes: counts.available_bytes,
                        capacity_bytes: counts.limits.max_key_count
                            * u64::from(counts.limits.key_size / 8),
                        qber: health.qkd.as_ref().and_then(|q| q.qber),
                        secret_bits_per_s: health.qkd.map(|q| q.secret_bits_per_s),
                    },
                    _ => LinkReport {
                        peer: link.peer.clone(),
                        state: Condition::Down,
                        available_bytes: 0,
                        capacity_bytes: 0,
                        qber: None,
                        secret_bits_per_s: None,
                    },
                };
                reports.push(report);
            }
            reports
        };
        ctx.spawn(
            fut::wrap_future(refresh).map(|reports: Vec<LinkReport>, act: &mut Self, _| {
                let mine = act.own_advert(reports);
                let mut adverts: Vec<Advert> = act.current_news().cloned().collect();
                adverts.push(mine);
                act.tell_full_pairs();
                for link in &act.own {
                    // Advisory: a full mailbox or a dead neighbour only delays news by a round.
                    let _ = link.peer_link.try_send(Advertise(TopologyUpdate {
                        adverts: adverts.clone(),
                    }));
                }
            }),
        );
    }

    /// Takes the news of `update` from neighbour `from` that is newer than what is known and
    /// describes only links of the network file at their origin's end, each at most once.
    fn learn(&mut self, from: &KmeId, update: TopologyUpdate) -> Result<()> {
        if update.adverts.len() > self.kmes.len() {
            return Err(Error::PeerMessage(format!(
                "{} adverts from {from}; the network has {} KMEs",
                update.adverts.len(),
                self.kmes.len()
            )));
        }
        self.heard.insert(from.clone(), Instant::now());
        for advert in update.adverts {
            if advert.origin == self.me || !self.kmes.contains(&advert.origin) {
                continue;
            }
            let mut peers = HashSet::new();
            let foreign = advert.full_pairs.len() > MAX_FULL_PAIRS
                || advert.links.iter().any(|l| {
                    !peers.insert(&l.peer)
                        || !self
                            .topology
                            .contains(&(advert.origin.clone(), l.peer.clone()))
                });
            if foreign {
                log::warn!(
                    "{from} relayed news of {} about links that are not in the network file, one link twice, or too many full pairs; ignored",
                    advert.origin
                );
                continue;
            }
            let newer = self
                .news
                .get(&advert.origin)
                .is_none_or(|(known, _)| advert.seq > known.seq);
            if newer {
                self.news
                    .insert(advert.origin.clone(), (advert, Instant::now()));
            }
        }
        Ok(())
    }
}

fn worst(a: Condition, b: Condition) -> Condition {
    match (a, b) {
        (Condition::Down, _) | (_, Condition::Down) => Condition::Down,
        (Condition::Degraded, _) | (_, Condition::Degraded) => Condition::Degraded,
        _ => Condition::Up,
    }
}

/// Adds `path` to the trees of `roots`, sharing the hops it has in common with them.
fn insert_path(roots: &mut Vec<Branch>, path: &[KmeId]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let index = match roots.iter().position(|b| b.kme == *first) {
        Some(index) => index,
        None => {
            roots.push(Branch {
                kme: first.clone(),
                onward: Vec::new(),
            });
            roots.len() - 1
        }
    };
    if let Some(branch) = roots.get_mut(index) {
        insert_path(&mut branch.onward, rest);
    }
}

impl Actor for Router {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        self.advertise(ctx);
        ctx.run_interval(self.interval, |act, ctx| act.advertise(ctx));
    }
}

/// The routes of one request: a tree from this KME reaching every KME of `to`, each hop able
/// to carry `need_bytes`, no path longer than `max_hops`. Sent by `SaeRegistry`.
#[derive(Message)]
#[rtype(result = "Result<Vec<Branch>>")]
pub struct FindTree {
    pub to: Vec<KmeId>,
    pub max_hops: u32,
    pub need_bytes: u64,
    /// Not the direct link to this neighbour (its pool just refused the request).
    pub avoid: Option<KmeId>,
}

impl Handler<FindTree> for Router {
    type Result = Result<Vec<Branch>>;

    fn handle(&mut self, msg: FindTree, _ctx: &mut Context<Self>) -> Self::Result {
        self.tree(&msg.to, msg.max_hops, msg.need_bytes, msg.avoid.as_ref())
    }
}

/// The current route to `to` and the state of each hop (for `status`). Sent by `SaeRegistry`.
#[derive(Message)]
#[rtype(result = "Result<Vec<HopView>>")]
pub struct RouteView {
    pub to: KmeId,
    pub max_hops: u32,
}

impl Handler<RouteView> for Router {
    type Result = Result<Vec<HopView>>;

    fn handle(&mut self, msg: RouteView, _ctx: &mut Context<Self>) -> Self::Result {
        let parent = self.search(msg.max_hops, |a, b| self.usable(a, b, 0));
        let Some(path) = Self::path(&parent, &self.me, &msg.to) else {
            return Err(self.why_unreachable(&msg.to, msg.max_hops, 0));
        };
        let mut from = self.me.clone();
        let mut hops = Vec::with_capacity(path.len());
        for to in path {
            hops.push(self.hop(&from, &to));
            from = to;
        }
        Ok(hops)
    }
}

/// Link state news from neighbour `from`. Sent by the KME-to-KME edge.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub struct TopologyFromPeer {
    pub from: KmeId,
    pub update: TopologyUpdate,
}

impl Handler<TopologyFromPeer> for Router {
    type Result = Result<()>;

    fn handle(&mut self, msg: TopologyFromPeer, _ctx: &mut Context<Self>) -> Self::Result {
        self.learn(&msg.from, msg.update)
    }
}

/// One link of the network file as this KME sees it (dashboards, `kme admin network`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LinkView {
    pub ends: [KmeId; 2],
    /// The worse of what the two ends report (and down if a neighbour of this KME is silent).
    pub state: Condition,
    /// Each end's pool fill (available / capacity), when known.
    pub fill: [Option<f64>; 2],
    pub qber: Option<f64>,
    pub secret_bits_per_s: Option<f64>,
}

/// Every KME and link of the network with their states now. Sent by the admin edge.
#[derive(Message)]
#[rtype(result = "(Vec<KmeId>, Vec<LinkView>)")]
pub struct NetworkView;

impl Handler<NetworkView> for Router {
    type Result = MessageResult<NetworkView>;

    fn handle(&mut self, _msg: NetworkView, _ctx: &mut Context<Self>) -> Self::Result {
        let mut kmes: Vec<KmeId> = self.kmes.iter().cloned().collect();
        kmes.sort();
        let links = self
            .hops
            .iter()
            .filter(|(a, b)| a < b)
            .map(|(a, b)| {
                let (ab, ba) = (self.hop(a, b), self.hop(b, a));
                let fill = |h: &HopView| match (h.available_bytes, h.capacity_bytes) {
                    (Some(available), Some(capacity)) if capacity > 0 => {
                        Some(available as f64 / capacity as f64)
                    }
                    _ => None,
                };
                let figure = |pick: fn(&LinkReport) -> Option<f64>| {
                    [(a, b), (b, a)]
                        .iter()
                        .find_map(|(from, to)| self.report(from, to).as_ref().and_then(pick))
                };
                LinkView {
                    ends: [a.clone(), b.clone()],
                    state: worst(ab.state, ba.state),
                    fill: [fill(&ab), fill(&ba)],
                    qber: figure(|r| r.qber),
                    secret_bits_per_s: figure(|r| r.secret_bits_per_s),
                }
            })
            .collect();
        MessageResult((kmes, links))
    }
}

/// The pairs whose slave is an SAE of each KME (`by_origin`) and that are at their cap on
/// waiting keys there, as the newest news says. Sent every round to the subscriber
/// (`SaeRegistry`), which checks each pair's slave is the origin's own.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FullPairs {
    pub by_origin: Vec<(KmeId, Vec<(SaeId, SaeId)>)>,
}

/// Where to send `FullPairs` every round. Sent once at start.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SubscribeFullPairs(pub Recipient<FullPairs>);

impl Handler<SubscribeFullPairs> for Router {
    type Result = ();

    fn handle(&mut self, msg: SubscribeFullPairs, _ctx: &mut Context<Self>) {
        self.full_pairs_to = Some(msg.0);
    }
}

/// The pairs at their cap on waiting keys at this KME, to advertise. Sent by `SaeRegistry`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct OwnFullPairs(pub Vec<(SaeId, SaeId)>);

impl Handler<OwnFullPairs> for Router {
    type Result = ();

    fn handle(&mut self, mut msg: OwnFullPairs, _ctx: &mut Context<Self>) {
        msg.0.truncate(MAX_FULL_PAIRS);
        self.own_full_pairs = msg.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> KmeId {
        KmeId::new(s)
    }

    fn ring() -> Router {
        let links = [("a", "b"), ("b", "c"), ("c", "d"), ("d", "a")].map(|(x, y)| (id(x), id(y)));
        Router::new(id("a"), &links, Vec::new(), Duration::from_secs(3600), 1)
    }

    fn report(origin: &str, seq: u64, links: &[(&str, Condition, u64)]) -> Advert {
        Advert {
            origin: id(origin),
            seq,
            links: links
                .iter()
                .map(|(peer, state, available_bytes)| LinkReport {
                    peer: id(peer),
                    state: *state,
                    available_bytes: *available_bytes,
                    capacity_bytes: 1 << 30,
                    qber: None,
                    secret_bits_per_s: None,
                })
                .collect(),
            full_pairs: Vec::new(),
        }
    }

    fn learn(r: &mut Router, adverts: Vec<Advert>) -> Result<()> {
        r.learn(&id("b"), TopologyUpdate { adverts })
    }

    fn kmes(branch: &Branch) -> Vec<&str> {
        branch.kmes().into_iter().map(KmeId::as_str).collect()
    }

    #[test]
    fn routes_go_around_a_down_link_and_come_back() {
        let mut r = ring();
        let tree = r.tree(&[id("c")], 8, 32, None).unwrap();
        assert_eq!(kmes(&tree[0]), ["b", "c"], "shortest, first in order");
        learn(&mut r, vec![report("b", 5, &[("c", Condition::Down, 0)])]).unwrap();
        let tree = r.tree(&[id("c")], 8, 32, None).unwrap();
        assert_eq!(kmes(&tree[0]), ["d", "c"]);
        // Stale news (a lower seq) does not override fresh; newer news does.
        learn(
            &mut r,
            vec![report("b", 4, &[("c", Condition::Up, 1 << 20)])],
        )
        .unwrap();
        assert_eq!(
            kmes(&r.tree(&[id("c")], 8, 32, None).unwrap()[0]),
            ["d", "c"]
        );
        learn(
            &mut r,
            vec![report("b", 6, &[("c", Condition::Up, 1 << 20)])],
        )
        .unwrap();
        assert_eq!(
            kmes(&r.tree(&[id("c")], 8, 32, None).unwrap()[0]),
            ["b", "c"]
        );
        // A hop without the material the request needs is avoided too.
        learn(&mut r, vec![report("b", 7, &[("c", Condition::Up, 16)])]).unwrap();
        assert_eq!(
            kmes(&r.tree(&[id("c")], 8, 32, None).unwrap()[0]),
            ["d", "c"]
        );
    }

    #[test]
    fn no_route_names_the_missing_hop_and_the_hop_limit_holds() {
        let mut r = ring();
        learn(
            &mut r,
            vec![
                report("b", 1, &[("c", Condition::Down, 0)]),
                report("d", 1, &[("c", Condition::Down, 0)]),
            ],
        )
        .unwrap();
        let err = r.tree(&[id("c")], 8, 32, None).unwrap_err();
        assert!(
            matches!(&err, Error::Unreachable(m) if m.contains("b -> c is down")),
            "{err:?}"
        );
        let r = ring();
        let err = r.tree(&[id("c")], 1, 32, None).unwrap_err();
        assert!(
            matches!(&err, Error::ExtensionUnmet(m) if m.contains("has 2 hops")),
            "{err:?}"
        );
    }

    #[test]
    fn news_cannot_invent_links_or_loops() {
        let mut r = ring();
        // b claims a link to c that is fine and one straight to everything: the invented
        // links are not in the file, so the whole advert is ignored.
        learn(
            &mut r,
            vec![report(
                "b",
                9,
                &[("c", Condition::Down, 0), ("z", Condition::Up, 1 << 30)],
            )],
        )
        .unwrap();
        assert_eq!(
            kmes(&r.tree(&[id("c")], 8, 32, None).unwrap()[0]),
            ["b", "c"]
        );
        // News about this KME itself, or from KMEs not in the network, is ignored.
        learn(&mut r, vec![report("a", 99, &[("b", Condition::Down, 0)])]).unwrap();
        learn(&mut r, vec![report("x", 1, &[("a", Condition::Up, 0)])]).unwrap();
        assert_eq!(kmes(&r.tree(&[id("b")], 8, 32, None).unwrap()[0]), ["b"]);
        // More adverts than KMEs in the network: refused whole.
        let flood = (0..5).map(|i| report("c", i, &[])).collect();
        assert!(learn(&mut r, flood).is_err());
    }

    /// The registry falls back to a relay when a neighbour's pool came up empty: the detour
    /// must not be that same link, whatever the last news said about it.
    #[test]
    fn a_detour_around_an_emptied_neighbour_never_takes_its_link() {
        let r = ring();
        assert_eq!(kmes(&r.tree(&[id("b")], 8, 32, None).unwrap()[0]), ["b"]);
        let detour = r.tree(&[id("b")], 8, 32, Some(&id("b"))).unwrap();
        assert_eq!(kmes(&detour[0]), ["d", "c", "b"]);
    }

    #[test]
    fn news_naming_one_link_twice_is_ignored() {
        let mut r = ring();
        learn(
            &mut r,
            vec![report(
                "b",
                3,
                &[("c", Condition::Up, 1 << 20), ("c", Condition::Down, 0)],
            )],
        )
        .unwrap();
        assert!(r.news.is_empty());
    }

    /// A dead KME's last news does not stand forever, and a neighbour that stopped talking is
    /// advertised as down (so that KMEs further away route around it too).
    #[test]
    fn silent_neighbours_are_advertised_down_and_old_news_expires() {
        let links = [("a", "b"), ("b", "c"), ("c", "d"), ("d", "a")].map(|(x, y)| (id(x), id(y)));
        let mut r = Router::new(id("a"), &links, Vec::new(), Duration::from_millis(2), 1);
        learn(&mut r, vec![report("b", 5, &[("c", Condition::Down, 0)])]).unwrap();
        let up = |peer: &str| LinkReport {
            peer: id(peer),
            state: Condition::Up,
            available_bytes: 1 << 20,
            capacity_bytes: 1 << 30,
            qber: None,
            secret_bits_per_s: None,
        };
        let advert = r.own_advert(vec![up("b"), up("d")]);
        let states: Vec<Condition> = advert.links.iter().map(|l| l.state).collect();
        assert_eq!(
            states,
            [Condition::Up, Condition::Up],
            "within the grace time"
        );
        std::thread::sleep(Duration::from_millis(60));
        // b talks again (with nothing new about c); d has been silent for 30 rounds.
        learn(&mut r, Vec::new()).unwrap();
        let advert = r.own_advert(vec![up("b"), up("d")]);
        let states: Vec<Condition> = advert.links.iter().map(|l| l.state).collect();
        assert_eq!(states, [Condition::Up, Condition::Down]);
        assert_eq!(
            kmes(&r.tree(&[id("c")], 8, 32, None).unwrap()[0]),
            ["b", "c"],
            "b's old news that b — c is down has expired"
        );
    }

    #[test]
    fn a_multicast_tree_shares_hops() {
        let links = [("a", "b"), ("b", "c"), ("b", "d"), ("a", "e")].map(|(x, y)| (id(x), id(y)));
        let r = Router::new(id("a"), &links, Vec::new(), Duration::from_secs(3600), 1);
        let tree = r
            .tree(&[id("c"), id("d"), id("e"), id("b")], 8, 0, None)
            .unwrap();
        assert_eq!(tree.len(), 2);
        assert_eq!(tree[0].kme, id("b"));
        let below: Vec<&str> = tree[0].onward.iter().map(|b| b.kme.as_str()).collect();
        assert_eq!(below, ["c", "d"]);
        assert_eq!(kmes(&tree[1]), ["e"]);
    }
}
