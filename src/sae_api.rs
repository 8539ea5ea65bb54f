//! The SAE API: ETSI GS QKD 014 V1.1.1 over mutual TLS (status, enc_keys, dec_keys; GET and
//! POST), plus `GET /api/v1/sae/info/me`.
//!
//! Each handler authenticates the caller from its TLS certificate, parses the request
//! strictly, sends one message to the actor that owns the answer, and maps every error to an
//! ETSI Error JSON with 400, 401 or 503 (`error.rs`). Unknown paths and methods answer 400.

use std::collections::HashSet;
use std::time::Duration;

use actix::Addr;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use futures_util::StreamExt;
use kme_actors::audit_log::AuditRecord;
use kme_actors::key_pool::{Deliver, PoolStatus};
use kme_actors::link::LinkHealth;
use kme_actors::sae_registry::{Identify, KeyRoute, RouteKeys, SaeRegistry, Target};
use kme_actors::store::{Exec, LocalKey, Op, Output, Store};
use kme_actors::types::{Key, KmeId, SaeId};
use uuid::Uuid;

use crate::ask::{ask, ask_ok};
use crate::error::ApiError;
use crate::etsi::{
    self, KeyContainer, KeyCount, KeyEntry, KeyIds, KeyQuery, KeyRequest, KeySizeBits, Status,
};
use crate::tls::PeerIdentity;

/// Largest request body read; anything larger is refused with 400 before it is parsed.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// An oversized body is read and discarded up to this size before the 400 goes out, so that
/// HTTP/2 and HTTP/1.1 clients that are still sending receive the answer instead of a reset.
const DRAIN_LIMIT_BYTES: usize = 64 * 1024 * 1024;
/// Most key_IDs in one dec_keys request.
pub const MAX_KEY_IDS: usize = 4096;
/// Vendor extension we understand in `extension_mandatory`: `{"kme_route_type": "direct"}`.
const ROUTE_TYPE_EXTENSION: &str = "kme_route_type";

/// Shared by all handlers of one KME (actor addresses are cheap to clone).
pub struct SaeState {
    pub me: KmeId,
    pub registry: Addr<SaeRegistry>,
    pub store: Addr<Store>,
    pub timeout: Duration,
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/keys/{slave_SAE_ID}/status")
            .route(web::get().to(status))
            .default_service(web::to(unsupported)),
    )
    .service(
        web::resource("/api/v1/keys/{slave_SAE_ID}/enc_keys")
            .route(web::get().to(enc_keys_get))
            .route(web::post().to(enc_keys_post))
            .default_service(web::to(unsupported)),
    )
    .service(
        web::resource("/api/v1/keys/{master_SAE_ID}/dec_keys")
            .route(web::get().to(dec_keys_get))
            .route(web::post().to(dec_keys_post))
            .default_service(web::to(unsupported)),
    )
    .service(
        web::resource("/api/v1/sae/info/me")
            .route(web::get().to(whoami))
            .default_service(web::to(unsupported)),
    )
    .default_service(web::to(unsupported));
}

async fn unsupported(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::bad_request(format!(
        "unsupported method or path: {} {}",
        req.method(),
        req.path()
    )))
}

/// The verified certificate identity of the caller, or 401.
fn caller(req: &HttpRequest) -> Result<String, ApiError> {
    match req.conn_data::<PeerIdentity>() {
        Some(PeerIdentity::Verified(cn)) => Ok(cn.clone()),
        Some(PeerIdentity::Rejected(reason)) => Err(ApiError::unauthorized(reason.clone())),
        _ => Err(ApiError::unauthorized("a client certificate is required")),
    }
}

async fn read_body(mut payload: web::Payload) -> Result<web::BytesMut, ApiError> {
    let mut body = web::BytesMut::new();
    let mut seen = 0usize;
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|err| ApiError::bad_request(format!("cannot read the request body: {err}")))?;
        seen += chunk.len();
        if seen > DRAIN_LIMIT_BYTES {
            break;
        }
        if seen <= MAX_BODY_BYTES {
            body.extend_from_slice(&chunk);
        }
    }
    if seen > MAX_BODY_BYTES {
        return Err(ApiError::bad_request(format!(
            "request body larger than {MAX_BODY_BYTES} bytes"
        )));
    }
    Ok(body)
}

fn parse_json<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request(format!("invalid JSON request: {err}")))
}

fn parse_query<T: serde::de::DeserializeOwned>(req: &HttpRequest) -> Result<T, ApiError> {
    web::Query::<T>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|err| ApiError::bad_request(format!("invalid query: {err}")))
}

async fn route(
    state: &SaeState,
    identity: String,
    slave: String,
    additional: Vec<String>,
) -> Result<KeyRoute, ApiError> {
    let msg = RouteKeys {
        identity,
        slave,
        additional,
    };
    ask_ok(&state.registry, msg, state.timeout).await
}

async fn status(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<SaeState>,
) -> Result<HttpResponse, ApiError> {
    let identity = caller(&req)?;
    let route = route(&state, identity, path.into_inner(), Vec::new()).await?;
    let limits = route.target.limits();
    let (stored_key_count, extension) = match &route.target {
        Target::Neighbour(link) => {
            let counts = ask(&link.pool, PoolStatus, state.timeout).await?;
            let health = ask(&link.link, LinkHealth, state.timeout).await?;
            let extension = serde_json::json!({
                "link": {
                    "peer_KME_ID": link.peer.as_str(),
                    "source": health.source,
                    "state": if health.up { "up" } else { "down" },
                    "reason": health.reason,
                    "available_bytes": counts.available_bytes,
                    "bytes_produced": health.bytes_produced,
                }
            });
            (counts.stored_key_count, Some(extension))
        }
        Target::Local(limits) => (
            limits.max_key_count,
            Some(serde_json::json!({"route": "local"})),
        ),
    };
    Ok(HttpResponse::Ok().json(Status {
        source_KME_ID: state.me.to_string(),
        target_KME_ID: route.slave_kme.to_string(),
        master_SAE_ID: route.master.to_string(),
        slave_SAE_ID: route
            .slaves
            .first()
            .map(ToString::to_string)
            .unwrap_or_default(),
        key_size: limits.key_size,
        stored_key_count,
        max_key_count: limits.max_key_count,
        max_key_per_request: limits.max_key_per_request,
        max_key_size: limits.max_key_size,
        min_key_size: limits.min_key_size,
        max_SAE_ID_count: limits.max_sae_id_count,
        status_extension: extension,
    }))
}

async fn enc_keys_get(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<SaeState>,
) -> Result<HttpResponse, ApiError> {
    let identity = caller(&req)?;
    let request = parse_query::<KeyQuery>(&req).map(|query| KeyRequest {
        number: query.number,
        size: query.size,
        ..KeyRequest::default()
    });
    enc_keys(identity, path.into_inner(), request, &state).await
}

async fn enc_keys_post(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<SaeState>,
) -> Result<HttpResponse, ApiError> {
    let identity = caller(&req)?;
    let request = if req.query_string().is_empty() {
        read_body(payload).await.and_then(|body| parse_json(&body))
    } else {
        Err(ApiError::bad_request(
            "POST enc_keys takes its parameters in the JSON body",
        ))
    };
    enc_keys(identity, path.into_inner(), request, &state).await
}

/// Checks `extension_mandatory`: only `kme_route_type: "direct"` is understood (and always met).
fn mandatory_extensions(request: &KeyRequest) -> Result<(), ApiError> {
    for extension in request.extension_mandatory.iter().flatten() {
        for (name, value) in extension {
            if name != ROUTE_TYPE_EXTENSION {
                return Err(ApiError::bad_request(etsi::EXTENSION_UNSUPPORTED).with_detail(
                    serde_json::json!({"extension_mandatory_unsupported": format!("{name} is not supported")}),
                ));
            }
            if value.as_str() != Some("direct") {
                return Err(ApiError::bad_request(etsi::EXTENSION_UNSATISFIED).with_detail(
                    serde_json::json!({ROUTE_TYPE_EXTENSION: format!("{value} cannot be met: only \"direct\" routes are available")}),
                ));
            }
        }
    }
    Ok(())
}

async fn enc_keys(
    identity: String,
    slave: String,
    request: Result<KeyRequest, ApiError>,
    state: &SaeState,
) -> Result<HttpResponse, ApiError> {
    let request = match request.and_then(|r| mandatory_extensions(&r).map(|()| r)) {
        Ok(request) => request,
        Err(err) => {
            // An unauthorised caller learns nothing about what it sent: 401 comes first.
            ask_ok(&state.registry, Identify { identity }, state.timeout).await?;
            return Err(err);
        }
    };
    let additional = request.additional_slave_SAE_IDs.clone().unwrap_or_default();
    let route = route(state, identity, slave, additional).await?;
    let limits = route.target.limits();
    let number = KeyCount::parse(request.number, limits.max_key_per_request)
        .map_err(ApiError::bad_request)?;
    let size = KeySizeBits::parse(
        request.size,
        limits.key_size,
        limits.min_key_size,
        limits.max_key_size,
    )
    .map_err(ApiError::bad_request)?;
    let capacity_bits = limits
        .max_key_count
        .saturating_mul(u64::from(limits.key_size));
    let asked_bits = u64::from(number.get()) * u64::from(size.get());
    if asked_bits > capacity_bits {
        return Err(ApiError::bad_request(format!(
            "number x size ({asked_bits} bits) exceeds the {capacity_bits} bits of key material this link's pool holds (max_key_count x key_size)"
        )));
    }
    let request_id = Uuid::new_v4();
    let keys = match &route.target {
        Target::Neighbour(link) => {
            let msg = Deliver {
                master: route.master.clone(),
                slaves: route.slaves.clone(),
                number: number.get(),
                size_bits: size.get(),
                request_id,
            };
            ask_ok(&link.pool, msg, state.timeout).await?
        }
        Target::Local(_) => local_keys(state, &route, number, size, request_id).await?,
    };
    let engine = &base64::engine::general_purpose::STANDARD;
    Ok(HttpResponse::Ok().json(KeyContainer {
        keys: keys
            .into_iter()
            .map(|k| KeyEntry {
                key_ID: k.id,
                key: engine.encode(&k.material),
            })
            .collect(),
    }))
}

/// Keys between SAEs of this KME never leave it, so they need no link material: they come
/// from the OS CSPRNG and are stored for the slaves like any other key.
async fn local_keys(
    state: &SaeState,
    route: &KeyRoute,
    number: KeyCount,
    size: KeySizeBits,
    request_id: Uuid,
) -> Result<Vec<Key>, ApiError> {
    let mut keys = Vec::with_capacity(number.get() as usize);
    for _ in 0..number.get() {
        let mut material = vec![0u8; size.get() as usize / 8];
        openssl::rand::rand_bytes(&mut material).map_err(|err| {
            log::error!("CSPRNG failed: {err}");
            ApiError::unavailable("the KME cannot generate keys right now; retry later")
        })?;
        keys.push(Key {
            id: Uuid::now_v7(),
            material,
        });
    }
    let audit = AuditRecord::new(
        "keys_delivered",
        serde_json::json!({
            "request_id": request_id,
            "master": route.master.as_str(),
            "slaves": route.slaves.iter().map(SaeId::as_str).collect::<Vec<_>>(),
            "link": "local", "size": size.get(),
            "key_IDs": keys.iter().map(|k| k.id).collect::<Vec<_>>(),
        }),
    );
    let op = Op::InsertLocalKeys {
        keys: keys
            .iter()
            .map(|k| LocalKey {
                id: k.id,
                master: route.master.clone(),
                slaves: route.slaves.clone(),
                material: k.material.clone(),
            })
            .collect(),
        audit,
    };
    ask_ok(&state.store, Exec(op), state.timeout).await?;
    Ok(keys)
}

async fn dec_keys_get(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<SaeState>,
) -> Result<HttpResponse, ApiError> {
    let identity = caller(&req)?;
    let ids = parse_query::<Vec<(String, String)>>(&req).and_then(|pairs| {
        let ids: Vec<String> = pairs
            .into_iter()
            .map(|(name, value)| match name.as_str() {
                "key_ID" => Ok(value),
                _ => Err(ApiError::bad_request(format!(
                    "unknown query parameter {name}"
                ))),
            })
            .collect::<Result<_, _>>()?;
        if ids.len() == 1 {
            Ok(ids)
        } else {
            Err(ApiError::bad_request(
                "GET dec_keys takes exactly one key_ID; use POST for several",
            ))
        }
    });
    dec_keys(identity, path.into_inner(), ids, &state).await
}

async fn dec_keys_post(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<SaeState>,
) -> Result<HttpResponse, ApiError> {
    let identity = caller(&req)?;
    let ids = if req.query_string().is_empty() {
        read_body(payload).await.and_then(|body| {
            serde_json::from_slice::<KeyIds>(&body)
                .map(|request| request.key_IDs.into_iter().map(|k| k.key_ID).collect())
                .map_err(|err| ApiError::bad_request(format!("invalid JSON request: {err}")))
        })
    } else {
        Err(ApiError::bad_request(
            "POST dec_keys takes its parameters in the JSON body",
        ))
    };
    dec_keys(identity, path.into_inner(), ids, &state).await
}

/// Validated, distinct key_IDs of a dec_keys request.
fn key_ids(ids: Vec<String>) -> Result<Vec<Uuid>, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::bad_request("key_IDs must name at least one key"));
    }
    if ids.len() > MAX_KEY_IDS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_KEY_IDS} key_IDs per request"
        )));
    }
    let mut key_ids = Vec::with_capacity(ids.len());
    let mut seen = HashSet::with_capacity(ids.len());
    for id in &ids {
        let parsed = Uuid::parse_str(id)
            .map_err(|_| ApiError::bad_request(format!("key_ID {id:?} is not a UUID")))?;
        if !seen.insert(parsed) {
            return Err(ApiError::bad_request(format!(
                "key_ID {id} is listed more than once"
            )));
        }
        key_ids.push(parsed);
    }
    Ok(key_ids)
}

async fn dec_keys(
    identity: String,
    master: String,
    ids: Result<Vec<String>, ApiError>,
    state: &SaeState,
) -> Result<HttpResponse, ApiError> {
    // Who asks comes first: an unauthorised caller gets 401 whatever it sent.
    let caller = ask_ok(&state.registry, Identify { identity }, state.timeout).await?;
    let key_ids = ids.and_then(key_ids)?;
    let op = Op::Retrieve {
        caller,
        master: SaeId::new(&master),
        key_ids,
        deadline: deadline(state.timeout),
    };
    let keys = match ask_ok(&state.store, Exec(op), state.timeout).await? {
        Output::Keys(keys) => keys,
        _ => Vec::new(),
    };
    let engine = &base64::engine::general_purpose::STANDARD;
    Ok(HttpResponse::Ok().json(KeyContainer {
        keys: keys
            .into_iter()
            .map(|k| KeyEntry {
                key_ID: k.id,
                key: engine.encode(&k.material),
            })
            .collect(),
    }))
}

/// When a consuming write must have started for its answer to still reach the SAE: the
/// request timeout less a margin for the commit and the response.
fn deadline(timeout: Duration) -> std::time::Instant {
    std::time::Instant::now() + timeout - (timeout / 4).min(Duration::from_millis(500))
}

async fn whoami(req: HttpRequest, state: web::Data<SaeState>) -> Result<HttpResponse, ApiError> {
    let identity = caller(&req)?;
    let sae = ask_ok(&state.registry, Identify { identity }, state.timeout).await?;
    Ok(HttpResponse::Ok()
        .json(serde_json::json!({"SAE_ID": sae.as_str(), "KME_ID": state.me.as_str()})))
}
