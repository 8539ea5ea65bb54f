//! Alerts: watches this KME's link ends and tells the operator's webhook when one needs
//! attention.
//!
//! Owns: the last state seen of each link end, the queue of events not yet delivered, the
//! webhook's HTTP client. Talks to: `Router` (each link's state: down when its end says so or
//! the neighbour is silent) and each link end's `KeyPool` (level) and `Link` (BB84
//! authentication windows), once a second; the webhook, one HTTP POST of one JSON event at a
//! time. Nobody waits on this actor, so it never holds up a key: the queue is bounded (the
//! oldest event goes when it is full, logged), and an event the webhook does not take after
//! `ATTEMPTS` tries (1, 2, 4 s apart) is logged and dropped.
//! Events (`event` of the JSON): `link_down` / `link_up`, `pool_low` (below
//! `pool_low_percent` of the pool's capacity) / `pool_ok` (back above twice that),
//! `auth_key_low` (a BB84 link's authentication windows at `auth_windows_low` or fewer), and
//! `audit_chain_broken` (the audit trail, verified every `audit_check` off the actors' thread
//! on a reader connection, no longer verifies; once, until it verifies again).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde_json::{json, Value};

use crate::key_pool::PoolStatus;
use crate::link::key_source::Condition;
use crate::link::LinkHealth;
use crate::relay::router::{OwnLink, RouteView, Router};
use crate::storage::audit_trail;
use crate::storage::db::DbPool;
use crate::types::{now_ms, KmeId};

/// Events waiting for the webhook, at most.
const QUEUE: usize = 256;
const ATTEMPTS: u32 = 4;
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// `[alerts]` of the network file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertSettings {
    pub webhook_url: String,
    pub pool_low_percent: u64,
    pub auth_windows_low: u64,
    /// How often the audit trail is verified.
    pub audit_check: Duration,
}

/// What verifying this KME's audit trail takes (see `audit_trail::verify_chain`).
pub struct AuditCheck {
    pub reader: DbPool,
    pub key: Arc<zeroize::Zeroizing<[u8; 32]>>,
    pub head_file: PathBuf,
}

/// What was last seen of one link end.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Seen {
    down: bool,
    pool_low: bool,
    auth_low: bool,
}

pub struct Alerts {
    me: KmeId,
    settings: AlertSettings,
    links: Vec<OwnLink>,
    router: Addr<Router>,
    client: awc::Client,
    /// Per link end; empty until the first check (at start), whose view is the baseline.
    seen: HashMap<KmeId, Seen>,
    queue: VecDeque<Value>,
    sending: bool,
    audit: Option<Arc<AuditCheck>>,
    /// The last verification failed (and was told).
    audit_broken: bool,
}

impl Alerts {
    pub fn new(
        me: KmeId,
        settings: AlertSettings,
        links: Vec<OwnLink>,
        router: Addr<Router>,
    ) -> Self {
        let client = awc::Client::builder()
            .timeout(Duration::from_secs(5))
            .finish();
        Self {
            me,
            settings,
            links,
            router,
            client,
            seen: HashMap::new(),
            queue: VecDeque::new(),
            sending: false,
            audit: None,
            audit_broken: false,
        }
    }

    /// Verifies the audit trail every `audit_check` and tells of a broken one.
    pub fn with_audit_check(mut self, check: AuditCheck) -> Self {
        self.audit = Some(Arc::new(check));
        self
    }

    fn check_audit(&mut self, ctx: &mut Context<Self>) {
        let Some(check) = self.audit.clone() else {
            return;
        };
        let verifying = actix_rt::task::spawn_blocking(move || -> crate::Result<u64> {
            let conn = check.reader.get()?;
            let records = audit_trail::verify_chain(&conn, &check.key)?;
            audit_trail::check_head(&conn, &check.key, &check.head_file)?;
            Ok(records)
        });
        ctx.spawn(
            fut::wrap_future(verifying).map(|outcome, act: &mut Self, ctx| {
                let failure = match outcome {
                    Ok(Ok(_)) => None,
                    Ok(Err(err)) => Some(err.to_string()),
                    Err(err) => Some(format!("the verification did not finish: {err}")),
                };
                match failure {
                    Some(why) if !act.audit_broken => {
                        act.audit_broken = true;
                        log::error!("audit trail verification failed: {why}");
                        act.enqueue("audit_chain_broken", None, json!({ "message": why }), ctx);
                    }
                    Some(_) => {}
                    None => act.audit_broken = false,
                }
            }),
        );
    }

    fn check(&mut self, ctx: &mut Context<Self>) {
        let links = self.links.clone();
        let router = self.router.clone();
        let settings = self.settings.clone();
        let looking = async move {
            let mut now = Vec::with_capacity(links.len());
            for link in links {
                let view = RouteView {
                    to: link.peer.clone(),
                    max_hops: 1,
                };
                let down = !matches!(
                    router.send(view).await,
                    Ok(Ok(hops)) if hops.iter().all(|h| h.state != Condition::Down)
                );
                let pool_percent = match link.pool.send(PoolStatus).await {
                    Ok(counts) if counts.limits.max_key_count > 0 => {
                        Some(100 * counts.stored_key_count / counts.limits.max_key_count)
                    }
                    _ => None,
                };
                let auth_windows = match link.link.health.send(LinkHealth).await {
                    Ok(health) => health.qkd.map(|q| q.auth_windows_left),
                    Err(_) => None,
                };
                now.push((link.peer, down, pool_percent, auth_windows));
            }
            (now, settings)
        };
        ctx.spawn(
            fut::wrap_future(looking).map(|(now, settings), act: &mut Self, ctx| {
                for (peer, down, pool_percent, auth_windows) in now {
                    let before = act.seen.get(&peer).copied();
                    let low = settings.pool_low_percent;
                    let seen = Seen {
                        down,
                        // Hysteresis: low below the mark, ok again only above twice it.
                        pool_low: match (pool_percent, before) {
                            (Some(p), _) if p < low => true,
                            (Some(p), Some(b)) if b.pool_low => p <= 2 * low,
                            _ => false,
                        },
                        auth_low: auth_windows.is_some_and(|w| w <= settings.auth_windows_low),
                    };
                    act.seen.insert(peer.clone(), seen);
                    let Some(before) = before else { continue };
                    let detail =
                        json!({"pool_percent": pool_percent, "auth_windows_left": auth_windows});
                    for (was, is, on, off) in [
                        (before.down, seen.down, Some("link_down"), Some("link_up")),
                        (
                            before.pool_low,
                            seen.pool_low,
                            Some("pool_low"),
                            Some("pool_ok"),
                        ),
                        (before.auth_low, seen.auth_low, Some("auth_key_low"), None),
                    ] {
                        let event = match (was, is) {
                            (false, true) => on,
                            (true, false) => off,
                            _ => None,
                        };
                        if let Some(event) = event {
                            act.enqueue(event, Some(&peer), detail.clone(), ctx);
                        }
                    }
                }
            }),
        );
    }

    /// Queues `event` (of the link to `peer`, or of the KME itself) for the webhook.
    fn enqueue(
        &mut self,
        event: &str,
        peer: Option<&KmeId>,
        detail: Value,
        ctx: &mut Context<Self>,
    ) {
        match peer {
            Some(peer) => log::warn!("alert: {event} on the link to {peer}"),
            None => log::warn!("alert: {event}"),
        }
        if self.queue.len() >= QUEUE {
            if let Some(dropped) = self.queue.pop_front() {
                log::warn!("alert queue full: dropped {dropped}");
            }
        }
        self.queue.push_back(json!({
            "kme": self.me, "event": event, "peer": peer, "at_ms": now_ms(), "detail": detail,
        }));
        self.send_next(ctx);
    }

    /// Delivers the oldest queued event (one at a time), retrying with backoff.
    fn send_next(&mut self, ctx: &mut Context<Self>) {
        if self.sending {
            return;
        }
        let Some(event) = self.queue.pop_front() else {
            return;
        };
        self.sending = true;
        let (client, url) = (self.client.clone(), self.settings.webhook_url.clone());
        let delivery = async move {
            let mut wait = Duration::from_secs(1);
            for attempt in 1..=ATTEMPTS {
                match client.post(&url).send_json(&event).await {
                    Ok(response) if response.status().is_success() => return,
                    Ok(response) => log::warn!(
                        "webhook {url} answered {} (attempt {attempt})",
                        response.status()
                    ),
                    Err(err) => log::warn!("webhook {url}: {err} (attempt {attempt})"),
                }
                if attempt < ATTEMPTS {
                    actix_rt::time::sleep(wait).await;
                    wait *= 2;
                }
            }
            log::error!("webhook {url} did not take {event}; dropped");
        };
        ctx.spawn(fut::wrap_future(delivery).map(|(), act: &mut Self, ctx| {
            act.sending = false;
            act.send_next(ctx);
        }));
    }
}

impl Actor for Alerts {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // The view at start is the baseline: a link that is down by the next check (a
        // neighbour dead since before this KME started) is news.
        self.check(ctx);
        ctx.run_interval(CHECK_EVERY, |act, ctx| act.check(ctx));
        if self.audit.is_some() {
            ctx.run_interval(self.settings.audit_check, |act, ctx| act.check_audit(ctx));
        }
    }
}
