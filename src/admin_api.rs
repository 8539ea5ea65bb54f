//! The operator's listener (`admin_listen` of a `[[kme]]`): `/health`, `/ready`, `/metrics`,
//! `POST /reload` (re-read the network file, see `reload.rs`), `POST /audit/verify` (the audit
//! trail's hash chain, checked on a read-only connection), and the live dashboard: `/`
//! (`dashboard.html`) drawing `/api/network` (every KME and link as this KME sees them, the
//! SAEs, the latest audit records).
//!
//! Over mTLS only operators' certificates (`[[operator]]` CNs of our CA) get in: an SAE or
//! KME certificate is refused (401); on a loopback address the network file may leave TLS off
//! (`admin_tls = false`), so that a local Prometheus or browser reaches it. Every answer is
//! read from the actors when asked: nothing here keeps state of its own but the metrics.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use actix_web::{web, HttpRequest, HttpResponse};
use kme_actors::key_pool::PoolStatus;
use kme_actors::link::key_source::Condition;
use kme_actors::link::LinkHealth;
use kme_actors::metrics::Metrics;
use kme_actors::relay::router::{NetworkView, OwnLink, RouteView, Router};
use kme_actors::sae_registry::{ListSaes, SaeRegistry};
use kme_actors::storage::audit_trail;
use kme_actors::storage::db::DbPool;
use kme_actors::storage::ops::{RecentEvents, WaitingKeys};
use kme_actors::storage::store::{Exec, Store};
use kme_actors::types::KmeId;
use prometheus::{GaugeVec, Opts, Registry};
use serde_json::json;

use crate::cert_status::CertStatus;
use crate::reload::Reloader;
use crate::tls::{self, PeerIdentity};

pub struct AdminState {
    pub me: KmeId,
    pub metrics: Arc<Metrics>,
    pub links: Vec<OwnLink>,
    pub store: Addr<Store>,
    pub router: Addr<Router>,
    /// The SQLite file (its size, and its WAL's, is a metric).
    pub db_file: PathBuf,
    /// Its size limit (`max_db_mb`) in bytes, a metric beside its size.
    pub db_limit_bytes: u64,
    /// CNs allowed in when the listener has TLS; None: plain HTTP on loopback.
    pub operators: Option<HashSet<String>>,
    /// Operators' certificates checked again per request (expiry, CRLs).
    pub cert_status: Arc<CertStatus>,
    pub timeout: Duration,
    pub reloader: Arc<Reloader>,
    pub registry: Addr<SaeRegistry>,
    /// Read-only connections (audit verification runs on one, off the writer's path).
    pub reader: DbPool,
    /// The key of the audit chain's MACs.
    pub audit_key: Arc<zeroize::Zeroizing<[u8; 32]>>,
}

/// The live dashboard (plain HTML and JS; it polls `/api/network`).
const DASHBOARD: &str = include_str!("dashboard.html");
/// Audit records shown on the dashboard.
const RECENT_EVENTS: u32 = 20;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(dashboard))
        .route("/api/network", web::get().to(network))
        .route("/health", web::get().to(health))
        .route("/ready", web::get().to(ready))
        .route("/metrics", web::get().to(metrics))
        .route("/reload", web::post().to(reload))
        .route("/audit/verify", web::post().to(audit_verify))
        .route("/audit/export", web::get().to(audit_export))
        .default_service(web::to(not_found));
}

/// None when the caller may use the listener, else the refusal.
fn refused(req: &HttpRequest, state: &AdminState) -> Option<HttpResponse> {
    let operators = state.operators.as_ref()?;
    let message = match tls::current_identity(req.conn_data::<PeerIdentity>(), &state.cert_status) {
        Ok(Some(identity))
            if identity
                .cn
                .as_ref()
                .is_some_and(|cn| operators.contains(cn)) =>
        {
            return None
        }
        Err(why) => why,
        Ok(_) => "an operator certificate ([[operator]] of the network file) is required".into(),
    };
    Some(
        HttpResponse::Unauthorized()
            .force_close()
            .json(json!({ "message": message })),
    )
}

async fn not_found(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    refused(&req, &state)
        .unwrap_or_else(|| HttpResponse::NotFound().json(json!({"message": "no such page"})))
}

async fn dashboard(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    refused(&req, &state).unwrap_or_else(|| {
        HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .body(DASHBOARD)
    })
}

/// The network as this KME sees it: KMEs, links (state, pool fill per end, QBER, secret
/// rate), SAEs, and the latest audit records.
async fn network(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Some(refusal) = refused(&req, &state) {
        return refusal;
    }
    let timeout = state.timeout;
    let view = actix::clock::timeout(timeout, state.router.send(NetworkView)).await;
    let Ok(Ok((kmes, links))) = view else {
        return HttpResponse::ServiceUnavailable()
            .json(json!({"message": "the router does not answer"}));
    };
    let saes = match actix::clock::timeout(timeout, state.registry.send(ListSaes)).await {
        Ok(Ok(saes)) => saes,
        _ => Vec::new(),
    };
    let recent = RecentEvents {
        limit: RECENT_EVENTS,
    };
    let events = match actix::clock::timeout(timeout, state.store.send(Exec(recent))).await {
        Ok(Ok(Ok(events))) => events,
        _ => Vec::new(),
    };
    HttpResponse::Ok().json(json!({
        "kme": state.me,
        "kmes": kmes,
        "links": links,
        "saes": saes
            .iter()
            .map(|(sae, kme, keys)| json!({"sae": sae, "kme": kme, "keys": keys}))
            .collect::<Vec<_>>(),
        "events": events,
    }))
}

/// The process answers.
async fn health(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    refused(&req, &state).unwrap_or_else(|| {
        HttpResponse::Ok().json(json!({"status": "ok", "kme": state.me.as_str()}))
    })
}

/// Ready to serve keys: the store answers, and every link's neighbour is heard and its link
/// not down. 503 with the reasons otherwise.
async fn ready(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Some(refusal) = refused(&req, &state) {
        return refusal;
    }
    let mut reasons = Vec::new();
    let store = actix::clock::timeout(state.timeout, state.store.send(Exec(WaitingKeys))).await;
    if !matches!(store, Ok(Ok(Ok(_)))) {
        reasons.push("the store does not answer".to_string());
    }
    for link in &state.links {
        let view = RouteView {
            to: link.peer.clone(),
            max_hops: 1,
        };
        match actix::clock::timeout(state.timeout, state.router.send(view)).await {
            Ok(Ok(Ok(hops))) if hops.iter().all(|h| h.state != Condition::Down) => {}
            Ok(Ok(Ok(_))) | Ok(Ok(Err(_))) => {
                reasons.push(format!("the link to {} is down", link.peer));
            }
            _ => reasons.push(format!("no state for the link to {}", link.peer)),
        }
    }
    let body = json!({"kme": state.me.as_str(), "ready": reasons.is_empty(), "reasons": reasons});
    if reasons.is_empty() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Re-reads the network file: 200 with the SAEs added and removed, or 400 with why nothing
/// changed.
async fn reload(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Some(refusal) = refused(&req, &state) {
        return refusal;
    }
    match state.reloader.reload().await {
        Ok(reloaded) => HttpResponse::Ok().json(reloaded),
        Err(why) => HttpResponse::BadRequest().json(json!({"message": why})),
    }
}

/// Audit records per `GET /audit/export` at most (a few MiB of JSON lines).
const EXPORT_MAX_RECORDS: u64 = 10_000;

#[derive(serde::Deserialize)]
struct ExportQuery {
    upto: Option<i64>,
}

/// The oldest closed segment of the audit trail (up to `?upto=`, at most
/// `EXPORT_MAX_RECORDS`) as JSON lines, its MACed head last, as `kme audit export` writes it;
/// 409 if the chain does not verify or nothing is closed.
async fn audit_export(
    req: HttpRequest,
    query: web::Query<ExportQuery>,
    state: web::Data<AdminState>,
) -> HttpResponse {
    if let Some(refusal) = refused(&req, &state) {
        return refusal;
    }
    let (reader, key, me) = (
        state.reader.clone(),
        state.audit_key.clone(),
        state.me.clone(),
    );
    let upto = query.upto;
    let exported = web::block(move || -> Result<Vec<u8>, kme_actors::Error> {
        let conn = reader.get()?;
        let mut out = Vec::new();
        let limits = (upto, Some(EXPORT_MAX_RECORDS));
        audit_trail::export_segment(&conn, &key, me.as_str(), limits, &mut out)?;
        Ok(out)
    })
    .await;
    match exported {
        Ok(Ok(lines)) => HttpResponse::Ok()
            .content_type("application/x-ndjson")
            .body(lines),
        Ok(Err(err)) => HttpResponse::Conflict().json(json!({"message": err.to_string()})),
        Err(err) => HttpResponse::ServiceUnavailable().json(json!({"message": err.to_string()})),
    }
}

/// Checks the audit trail's hash chain now: 200 with the number of records, or 409 with
/// where it breaks.
async fn audit_verify(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Some(refusal) = refused(&req, &state) {
        return refusal;
    }
    let (reader, key) = (state.reader.clone(), state.audit_key.clone());
    let head = state.db_file.with_file_name(audit_trail::HEAD_FILE);
    let checked = web::block(move || -> Result<u64, kme_actors::Error> {
        let conn = reader.get()?;
        let count = audit_trail::verify_chain(&conn, &key)?;
        audit_trail::check_head(&conn, &key, &head)?;
        Ok(count)
    })
    .await;
    match checked {
        Ok(Ok(records)) => HttpResponse::Ok().json(json!({"intact": true, "records": records})),
        Ok(Err(err)) => {
            log::error!("audit verification failed: {err}");
            HttpResponse::Conflict().json(json!({"intact": false, "message": err.to_string()}))
        }
        Err(err) => HttpResponse::ServiceUnavailable().json(json!({"message": err.to_string()})),
    }
}

/// Prometheus text exposition: the counters and histograms kept as things happen, and the
/// levels the actors own, read now.
async fn metrics(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Some(refusal) = refused(&req, &state) {
        return refusal;
    }
    let rendered = match levels(&state).await {
        Ok(levels) => state.metrics.render(&levels),
        Err(err) => Err(err),
    };
    match rendered {
        Ok(text) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4; charset=utf-8")
            .body(text),
        Err(err) => {
            log::error!("metrics: {err}");
            HttpResponse::InternalServerError().json(json!({"message": "metrics unavailable"}))
        }
    }
}

/// Gauges of what the actors own, per link end (`peer`), and the database size.
async fn levels(state: &AdminState) -> Result<Registry, prometheus::Error> {
    let registry = Registry::new_custom(Some("kme".into()), None)?;
    let gauge = |name: &str, help: &str, labels: &[&str]| {
        let family = GaugeVec::new(Opts::new(name, help), labels)?;
        registry.register(Box::new(family.clone()))?;
        Ok::<_, prometheus::Error>(family)
    };
    let pool_bytes = gauge(
        "pool_available_bytes",
        "Key material this end can hand out now",
        &["peer"],
    )?;
    let pool_keys = gauge(
        "pool_stored_keys",
        "Keys of the default size the pool holds (ETSI stored_key_count)",
        &["peer"],
    )?;
    let pool_max = gauge(
        "pool_max_keys",
        "Most keys the pool holds (ETSI max_key_count)",
        &["peer"],
    )?;
    let link_up = gauge(
        "link_state",
        "Link state: 2 up, 1 degraded, 0 down",
        &["peer"],
    )?;
    let qkd = gauge(
        "qkd",
        "BB84 link figures: qber, efficiency, sifted_bits_per_s, secret_bits_per_s, auth_windows_left, frames_ok, frames_aborted",
        &["peer", "figure"],
    )?;
    let timeout = state.timeout;
    for link in &state.links {
        let peer = link.peer.as_str();
        if let Ok(Ok(counts)) = actix::clock::timeout(timeout, link.pool.send(PoolStatus)).await {
            pool_bytes
                .with_label_values(&[peer])
                .set(counts.available_bytes as f64);
            pool_keys
                .with_label_values(&[peer])
                .set(counts.stored_key_count as f64);
            pool_max
                .with_label_values(&[peer])
                .set(counts.limits.max_key_count as f64);
        }
        let health = actix::clock::timeout(timeout, link.link.health.send(LinkHealth)).await;
        let Ok(Ok(health)) = health else {
            continue;
        };
        link_up.with_label_values(&[peer]).set(match health.state {
            Condition::Up => 2.0,
            Condition::Degraded => 1.0,
            Condition::Down => 0.0,
        });
        if let Some(q) = health.qkd {
            let figures = [
                ("qber", q.qber),
                ("efficiency", q.efficiency),
                ("sifted_bits_per_s", Some(q.sifted_bits_per_s)),
                ("secret_bits_per_s", Some(q.secret_bits_per_s)),
                ("auth_windows_left", Some(q.auth_windows_left as f64)),
                ("frames_ok", Some(q.frames_ok as f64)),
                ("frames_aborted", Some(q.frames_aborted as f64)),
            ];
            for (figure, value) in figures {
                if let Some(value) = value {
                    qkd.with_label_values(&[peer, figure]).set(value);
                }
            }
        }
    }
    let db_bytes = prometheus::Gauge::with_opts(Opts::new(
        "database_bytes",
        "Size of the SQLite file and its WAL",
    ))?;
    registry.register(Box::new(db_bytes.clone()))?;
    let wal = PathBuf::from(format!("{}-wal", state.db_file.display()));
    let size = [&state.db_file, &wal]
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum::<u64>();
    db_bytes.set(size as f64);
    let db_limit = prometheus::Gauge::with_opts(Opts::new(
        "database_limit_bytes",
        "Size limit of the database (max_db_mb); a warning is logged from 80 % on",
    ))?;
    registry.register(Box::new(db_limit.clone()))?;
    db_limit.set(state.db_limit_bytes as f64);
    Ok(registry)
}
