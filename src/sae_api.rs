//! The SAE API: ETSI GS QKD 014 V1.1.1 over mutual TLS (status, enc_keys, dec_keys; GET and
//! POST), plus `GET /api/v1/sae/info/me`.
//!
//! Each handler authenticates the caller from its TLS certificate, parses the request
//! strictly, sends one message to the actor that owns the answer, and maps every error to an
//! ETSI Error JSON with 400, 401 or 503 (`error.rs`). Unknown paths and methods answer 400.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::http::ConnectionType;
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse, ResponseError};
use base64::Engine;
use futures_util::StreamExt;
use kme_actors::metrics::Metrics;
use kme_actors::sae_registry::{
    DecKeys, EncKeys, Identify, KeyStatus, RoutePolicy, SaeRegistry, MAX_RELAY_HOPS,
};
use kme_actors::types::{CertIdentity, Key, KmeId};
use uuid::Uuid;

use crate::ask::ask_ok;
use crate::cert_status::CertStatus;
use crate::error::ApiError;
use crate::etsi::{self, KeyContainer, KeyEntry, KeyIds, KeyQuery, KeyRequest, Object, Status};
use crate::sae_metrics::RequestId;
use crate::tls::{self, PeerIdentity};

/// Largest request body read; anything larger is refused with 400 before it is parsed.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// An oversized body is read and discarded up to this size before the 400 goes out, so that
/// HTTP/2 and HTTP/1.1 clients that are still sending receive the answer instead of a reset.
const DRAIN_LIMIT_BYTES: usize = 64 * 1024 * 1024;
/// Most key_IDs in one dec_keys request.
pub const MAX_KEY_IDS: usize = 4096;
/// Vendor extensions of the route (see `route_policy`).
const ROUTE_TYPE_EXTENSION: &str = "kme_route_type";
const MAX_HOPS_EXTENSION: &str = "kme_max_hops";

/// Shared by all handlers of one KME (actor addresses are cheap to clone).
pub struct SaeState {
    pub me: KmeId,
    pub registry: Addr<SaeRegistry>,
    pub timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// Callers' certificates checked again per request (expiry, CRLs).
    pub cert_status: Arc<CertStatus>,
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

/// Middleware in front of every route, so before any body byte is read: a caller without a
/// verified certificate, or (for a request with a body) one that is no SAE of this KME, gets
/// its 401 at once and the connection is closed — it costs no buffer, no actor work beyond
/// one lookup, no disk write.
pub async fn authenticate_first(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let refusal = match req.app_data::<web::Data<SaeState>>() {
        None => Some(ApiError::unavailable("the KME is starting")),
        Some(state) => {
            // Checked again at every request: a certificate may have expired or been revoked
            // since the connection's handshake.
            match tls::current_identity(req.conn_data::<PeerIdentity>(), &state.cert_status) {
                Ok(Some(identity)) if has_body(&req) => {
                    let identify = Identify {
                        identity: identity.clone(),
                    };
                    ask_ok(&state.registry, identify, state.timeout).await.err()
                }
                Ok(Some(_)) => None,
                Err(reason) => Some(ApiError::unauthorized(reason)),
                Ok(None) => Some(ApiError::unauthorized("a client certificate is required")),
            }
        }
    };
    match refusal {
        None => Ok(next.call(req).await?.map_into_left_body()),
        Some(err) => {
            let mut response = err.error_response();
            response
                .head_mut()
                .set_connection_type(ConnectionType::Close);
            Ok(req.into_response(response).map_into_right_body())
        }
    }
}

/// The request announces a body (its length, or chunks).
fn has_body(req: &ServiceRequest) -> bool {
    let headers = req.headers();
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0")
}

async fn unsupported(req: HttpRequest, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    // 401 before 400, here too: a caller without a valid identity learns nothing else (the
    // middleware answered those already; this is the same check for the direct caller).
    caller(&req)?;
    // Read (and drop) the body of an authenticated caller, so that an HTTP/2 client still
    // sending gets the answer.
    let _ = read_body(payload).await;
    Err(ApiError::bad_request(format!(
        "unsupported method or path: {} {}",
        req.method(),
        req.path()
    )))
}

/// The request's ID (`X-Request-Id`, set by the metrics middleware): it also names the keys'
/// delivery and relay in the actors' logs and audit records.
fn request_id(req: &HttpRequest) -> Uuid {
    req.extensions()
        .get::<RequestId>()
        .map_or_else(Uuid::new_v4, |id| id.0)
}

/// The verified certificate identity of the caller, or 401.
fn caller(req: &HttpRequest) -> Result<CertIdentity, ApiError> {
    match req.conn_data::<PeerIdentity>() {
        Some(PeerIdentity::Verified(identity)) => Ok(identity.clone()),
        Some(PeerIdentity::Rejected(reason)) => Err(ApiError::unauthorized(reason.clone())),
        _ => Err(ApiError::unauthorized("a client certificate is required")),
    }
}

/// The longest a request body may take to arrive (a caller that stalls mid-body holds a
/// connection no longer than this).
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

async fn read_body(payload: web::Payload) -> Result<web::BytesMut, ApiError> {
    actix_rt::time::timeout(BODY_READ_TIMEOUT, read_whole(payload))
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::bad_request(format!(
                "the request body did not arrive within {} s",
                BODY_READ_TIMEOUT.as_secs()
            )))
        })
}

async fn read_whole(mut payload: web::Payload) -> Result<web::BytesMut, ApiError> {
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

/// The body of a POST, which carries all its parameters (a query string is refused).
async fn post_body(req: &HttpRequest, payload: web::Payload) -> Result<web::BytesMut, ApiError> {
    if req.query_string().is_empty() {
        read_body(payload).await
    } else {
        Err(ApiError::bad_request(
            "a POST takes its parameters in the JSON body, not in the query string",
        ))
    }
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

async fn status(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<SaeState>,
) -> Result<HttpResponse, ApiError> {
    let identity = caller(&req)?;
    let msg = KeyStatus {
        identity,
        slave: path.into_inner(),
    };
    let report = ask_ok(&state.registry, msg, state.timeout).await?;
    let limits = report.limits;
    let extension = match &report.link {
        Some((peer, health, available_bytes)) => serde_json::json!({
            "link": {
                "peer_KME_ID": peer.as_str(),
                "source": health.source,
                "state": health.state,
                "reason": health.reason,
                "available_bytes": available_bytes,
                "bytes_produced": health.bytes_produced,
                "qkd": health.qkd,
            }
        }),
        None => match &report.route {
            Some(hops) => serde_json::json!({"route": "relay", "hops": hops}),
            None => serde_json::json!({"route": "local"}),
        },
    };
    Ok(HttpResponse::Ok().json(Status {
        source_KME_ID: state.me.to_string(),
        target_KME_ID: report.slave_kme.to_string(),
        master_SAE_ID: report.master.to_string(),
        slave_SAE_ID: report.slave.to_string(),
        key_size: limits.key_size,
        stored_key_count: report.stored_key_count,
        max_key_count: limits.max_key_count,
        max_key_per_request: limits.max_key_per_request,
        max_key_size: limits.max_key_size,
        min_key_size: limits.min_key_size,
        max_SAE_ID_count: limits.max_sae_id_count,
        status_extension: Some(extension),
    }))
}

/// The 400 of a request that could not be parsed — after checking who sent it, so that an
/// unauthorised caller gets 401 whatever it sent.
async fn refuse(
    state: &SaeState,
    identity: CertIdentity,
    err: ApiError,
) -> Result<HttpResponse, ApiError> {
    ask_ok(&state.registry, Identify { identity }, state.timeout).await?;
    Err(err)
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
    enc_keys(
        identity,
        path.into_inner(),
        request,
        request_id(&req),
        &state,
    )
    .await
}

async fn enc_keys_post(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<SaeState>,
) -> Result<HttpResponse, ApiError> {
    let identity = caller(&req)?;
    let request = post_body(&req, payload)
        .await
        .and_then(|body| parse_json::<Object<KeyRequest>>(&body))
        .map(|request| request.0);
    enc_keys(
        identity,
        path.into_inner(),
        request,
        request_id(&req),
        &state,
    )
    .await
}

/// The route policy of `extension_mandatory`: the vendor extensions `kme_route_type`
/// (`"direct"`: one link, never a relay; `"indirect"`: relay allowed, the default) and
/// `kme_max_hops` (1 to 16). Any other mandatory extension is unsupported (400). The same
/// names in `extension_optional` are accepted and not enforced (the KME always takes the
/// shortest usable route); other optional extensions are ignored.
fn route_policy(request: &KeyRequest) -> Result<RoutePolicy, ApiError> {
    let unmet = |name: &str, why: String| {
        ApiError::bad_request(etsi::EXTENSION_UNSATISFIED)
            .with_detail(serde_json::json!({ name: why }))
    };
    let mut policy = RoutePolicy::default();
    for extension in request.extension_mandatory.iter().flatten() {
        for (name, value) in extension {
            match (name.as_str(), value) {
                (ROUTE_TYPE_EXTENSION, serde_json::Value::String(kind)) if kind == "direct" => {
                    policy.direct_only = true
                }
                (ROUTE_TYPE_EXTENSION, serde_json::Value::String(kind)) if kind == "indirect" => {}
                (ROUTE_TYPE_EXTENSION, other) => {
                    return Err(unmet(
                        name,
                        format!("{other} cannot be met: the route types are \"direct\" and \"indirect\""),
                    ))
                }
                (MAX_HOPS_EXTENSION, value) => {
                    policy.max_hops = value
                        .as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .filter(|n| (1..=MAX_RELAY_HOPS).contains(n))
                        .ok_or_else(|| {
                            unmet(
                                name,
                                format!("{value} cannot be met: 1 to {MAX_RELAY_HOPS} hops"),
                            )
                        })?
                }
                _ => {
                    return Err(ApiError::bad_request(etsi::EXTENSION_UNSUPPORTED).with_detail(
                        serde_json::json!({"extension_mandatory_unsupported": format!("{name} is not supported")}),
                    ))
                }
            }
        }
    }
    Ok(policy)
}

/// The parts of a key request the domain takes: additional slaves and route policy.
fn prepare(mut request: KeyRequest) -> Result<(KeyRequest, Vec<String>, RoutePolicy), ApiError> {
    if !request.unknown.is_empty() {
        log::debug!(
            "enc_keys: ignoring fields the standard does not name: {:?}",
            request.unknown.keys().collect::<Vec<_>>()
        );
    }
    let additional = request.additional_slaves().map_err(ApiError::bad_request)?;
    let policy = route_policy(&request)?;
    Ok((request, additional, policy))
}

async fn enc_keys(
    identity: CertIdentity,
    slave: String,
    request: Result<KeyRequest, ApiError>,
    request_id: Uuid,
    state: &SaeState,
) -> Result<HttpResponse, ApiError> {
    let (request, additional, policy) = match request.and_then(prepare) {
        Ok(prepared) => prepared,
        Err(err) => return refuse(state, identity, err).await,
    };
    let msg = EncKeys {
        identity,
        slave,
        additional,
        number: request.number,
        size: request.size,
        request_id,
        policy,
        deadline: Instant::now() + state.timeout,
    };
    let keys = ask_ok(&state.registry, msg, state.timeout).await?;
    Ok(key_container(keys))
}

/// Set on a key container answer: how many keys it hands out (read by the metrics middleware).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeysHanded(pub u64);

fn key_container(keys: Vec<Key>) -> HttpResponse {
    let engine = &base64::engine::general_purpose::STANDARD;
    let handed = KeysHanded(keys.len() as u64);
    let mut response = HttpResponse::Ok().json(KeyContainer {
        keys: keys
            .into_iter()
            .map(|k| KeyEntry {
                key_ID: k.id,
                key: engine.encode(&k.material).into(),
            })
            .collect(),
    });
    response.extensions_mut().insert(handed);
    response
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
    let ids = post_body(&req, payload)
        .await
        .and_then(|body| dec_key_ids(&body));
    dec_keys(identity, path.into_inner(), ids, &state).await
}

/// The key_IDs of a dec_keys POST body (a Key IDs object).
fn dec_key_ids(body: &[u8]) -> Result<Vec<String>, ApiError> {
    serde_json::from_slice::<Object<KeyIds>>(body)
        .map(|request| request.0.key_IDs.into_iter().map(|k| k.0.key_ID).collect())
        .map_err(|err| ApiError::bad_request(format!("invalid JSON request: {err}")))
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
    identity: CertIdentity,
    master: String,
    ids: Result<Vec<String>, ApiError>,
    state: &SaeState,
) -> Result<HttpResponse, ApiError> {
    let key_ids = match ids.and_then(key_ids) {
        Ok(key_ids) => key_ids,
        Err(err) => return refuse(state, identity, err).await,
    };
    let msg = DecKeys {
        identity,
        master,
        key_ids,
        deadline: deadline(state.timeout),
    };
    let keys = ask_ok(&state.registry, msg, state.timeout).await?;
    Ok(key_container(keys))
}

/// When a consuming write must have started for its answer to still reach the SAE: the
/// request timeout less a margin for the commit and the response.
fn deadline(timeout: Duration) -> std::time::Instant {
    std::time::Instant::now() + timeout - timeout / 4
}

async fn whoami(req: HttpRequest, state: web::Data<SaeState>) -> Result<HttpResponse, ApiError> {
    let identity = caller(&req)?;
    let sae = ask_ok(&state.registry, Identify { identity }, state.timeout).await?;
    Ok(HttpResponse::Ok()
        .json(serde_json::json!({"SAE_ID": sae.as_str(), "KME_ID": state.me.as_str()})))
}

/// Property tests of what SAEs send (`make fuzz` runs them long): no body, query or key_ID
/// list may panic the parser, and a valid request mutated anywhere is answered, not crashed.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    const VALID: &str = r#"{"number":2,"size":256,"additional_slave_SAE_IDs":["sae-c"],"extension_mandatory":[{"kme_route_type":"direct"},{"kme_max_hops":3}]}"#;

    /// Every step an enc_keys body goes through before an actor sees it.
    fn enc_request(body: &[u8]) {
        let _ = parse_json::<Object<KeyRequest>>(body).and_then(|r| prepare(r.0));
    }

    proptest! {
        #[test]
        fn any_bytes_as_an_enc_keys_body(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            enc_request(&body);
        }

        #[test]
        fn a_valid_enc_keys_body_mutated(at in 0..VALID.len(), byte in any::<u8>()) {
            let mut body = VALID.as_bytes().to_vec();
            body[at] = byte;
            enc_request(&body);
        }

        #[test]
        fn any_bytes_as_a_dec_keys_body(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = dec_key_ids(&body).and_then(key_ids);
        }

        #[test]
        fn any_key_ids(ids in proptest::collection::vec(".{0,40}", 0..8)) {
            let _ = key_ids(ids);
        }

        #[test]
        fn any_query_string(query in "[ -~]{0,80}") {
            let _ = web::Query::<KeyQuery>::from_query(&query);
        }
    }
}
