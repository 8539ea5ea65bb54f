//! The KME-to-KME channel (server side): activations (with relay legs), courier blocks, BB84
//! post-processing, pool levels, link state news and relay settlements from neighbour KMEs.
//!
//! Only neighbours named in `[[link]]` get here: the TLS handshake requires a certificate of
//! our CA, and each request's certificate CN must be a neighbour. Each handler identifies the
//! neighbour, parses its message and hands it to the domain: activations to `SaeRegistry`,
//! which decides which bindings the neighbour may make and has them made durable (sequence
//! numbers and the stream high mark reject replays and double binding); the rest to the link
//! end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::{Addr, Recipient};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use futures_util::StreamExt;
use kme_actors::link::{LinkAddr, PeerLevel, ReceiveBlocks, SourceFromPeer};
use kme_actors::peer::peer_link::MAX_SETTLE_BATCH;
use kme_actors::peer::protocol::{
    self, Activated, ActivationBatch, BlockId, BlockShipment, BlocksStored, LevelNoted,
    LevelReport, Refusal, SettleBatch, SettleResults, SourceRequest, TopologyNoted, TopologyUpdate,
};
use kme_actors::relay::router::{Router, TopologyFromPeer};
use kme_actors::relay::transport::{Relay, SettleFromPeer};
use kme_actors::sae_registry::{BindFromPeer, SaeRegistry};
use kme_actors::types::{CertIdentity, KmeId};
use kme_actors::Error;

use crate::ask::{ask, Mailbox};
use crate::cert_status::CertStatus;
use crate::tls::{self, PeerIdentity};

/// Largest body of a neighbour's message to `path`: what the largest legitimate one needs
/// (BB84 detection records and courier block shipments run to tens of MiB; a level report is
/// a few bytes), so that a neighbour, or one who took its key, cannot make this KME buffer
/// more.
fn body_limit(path: &str) -> usize {
    const KIB: usize = 1024;
    match path {
        protocol::LEVEL_PATH => 4 * KIB,
        protocol::TOPOLOGY_PATH => 1024 * KIB,
        protocol::SETTLE_PATH => 4 * 1024 * KIB,
        protocol::ACTIVATE_PATH => 64 * 1024 * KIB,
        _ => 256 * 1024 * KIB,
    }
}

pub struct PeerState {
    /// This KME's end of the link to each neighbour.
    pub neighbours: HashMap<KmeId, LinkAddr>,
    /// Decides which bindings a neighbour may make.
    pub registry: Addr<SaeRegistry>,
    /// Takes link state news.
    pub router: Addr<Router>,
    /// Settles relays.
    pub relay: Addr<Relay>,
    pub timeout: Duration,
    /// Neighbours' certificates checked again per request (expiry, CRLs).
    pub cert_status: Arc<CertStatus>,
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route(protocol::ACTIVATE_PATH, web::post().to(activate))
        .route(protocol::BLOCKS_PATH, web::post().to(blocks))
        .route(protocol::LEVEL_PATH, web::post().to(level))
        .route(protocol::SOURCE_PATH, web::post().to(source))
        .route(protocol::TOPOLOGY_PATH, web::post().to(topology))
        .route(protocol::SETTLE_PATH, web::post().to(settle))
        .default_service(web::to(|| async {
            Err::<HttpResponse, _>(PeerRefusal::new(
                StatusCode::NOT_FOUND,
                "unknown peer endpoint",
            ))
        }));
}

/// A refused or failed peer request; answers with a `Refusal`.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {message}")]
pub struct PeerRefusal {
    status: StatusCode,
    message: String,
    high_mark: Option<u64>,
    frame_lost: bool,
    last_seq: Option<u64>,
    next_blocks: Option<Vec<BlockId>>,
}

impl PeerRefusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            high_mark: None,
            frame_lost: false,
            last_seq: None,
            next_blocks: None,
        }
    }
}

impl From<Error> for PeerRefusal {
    fn from(err: Error) -> Self {
        match err {
            Error::FrameLost { .. } => Self {
                frame_lost: true,
                ..Self::new(StatusCode::GONE, err.to_string())
            },
            Error::ActivationRejected {
                high_mark, reason, ..
            } => Self {
                high_mark: Some(high_mark),
                ..Self::new(StatusCode::CONFLICT, reason)
            },
            Error::BlocksOutOfStep { ref next, .. } => {
                log::warn!("refused peer message: {err}");
                Self {
                    next_blocks: Some(next.clone()),
                    ..Self::new(StatusCode::CONFLICT, err.to_string())
                }
            }
            Error::SequenceBehind { last_seq, .. } => {
                log::warn!("refused peer message: {err}");
                Self {
                    last_seq: Some(last_seq),
                    ..Self::new(StatusCode::CONFLICT, err.to_string())
                }
            }
            Error::PeerMessage(_) | Error::BadRequest(_) => {
                log::warn!("refused peer message: {err}");
                Self::new(StatusCode::BAD_REQUEST, err.to_string())
            }
            other => {
                log::error!("peer message failed: {other}");
                Self::new(StatusCode::SERVICE_UNAVAILABLE, other.to_string())
            }
        }
    }
}

impl ResponseError for PeerRefusal {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if self.status == StatusCode::FORBIDDEN {
            // Not a neighbour, or no longer one (a certificate expired or revoked since the
            // handshake): its connection serves nothing more.
            response.force_close();
        }
        response.json(Refusal {
            error: self.message.clone(),
            high_mark: self.high_mark,
            frame_lost: self.frame_lost,
            last_seq: self.last_seq,
            next_blocks: self.next_blocks.clone(),
        })
    }
}

/// Asks an actor and keeps its domain error (the peer needs the precise refusal).
async fn ask_domain<M, T>(to: &impl Mailbox<M>, msg: M, timeout: Duration) -> Result<T, Error>
where
    M: actix::Message<Result = Result<T, Error>>,
{
    match ask(to, msg, timeout).await {
        Ok(answer) => answer,
        Err(err) => Err(Error::Unavailable(err.message)),
    }
}

/// The neighbour KME behind this connection.
fn neighbour<'a>(
    req: &HttpRequest,
    state: &'a PeerState,
) -> Result<(KmeId, &'a LinkAddr), PeerRefusal> {
    let cn = match tls::current_identity(req.conn_data::<PeerIdentity>(), &state.cert_status) {
        Ok(Some(CertIdentity { cn: Some(cn), .. })) => cn,
        Err(why) => return Err(PeerRefusal::new(StatusCode::FORBIDDEN, why)),
        Ok(_) => {
            return Err(PeerRefusal::new(
                StatusCode::FORBIDDEN,
                "a KME certificate is required",
            ))
        }
    };
    let id = KmeId::new(cn);
    match state.neighbours.get(&id) {
        Some(end) => Ok((id, end)),
        None => {
            log::warn!("KME-to-KME request from {cn}, which is not a neighbour");
            Err(PeerRefusal::new(
                StatusCode::FORBIDDEN,
                "not a neighbour KME of this KME",
            ))
        }
    }
}

/// The longest a neighbour's message body may take to arrive.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

async fn read_body(req: &HttpRequest, payload: web::Payload) -> Result<web::BytesMut, PeerRefusal> {
    let limit = body_limit(req.path());
    let announced = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|length| length > limit as u64) {
        return Err(too_large(limit));
    }
    actix_rt::time::timeout(BODY_READ_TIMEOUT, read_whole(payload, limit))
        .await
        .unwrap_or_else(|_| {
            Err(PeerRefusal::new(
                StatusCode::REQUEST_TIMEOUT,
                "the message body did not arrive in time",
            ))
        })
}

async fn read_whole(mut payload: web::Payload, limit: usize) -> Result<web::BytesMut, PeerRefusal> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|err| PeerRefusal::new(StatusCode::BAD_REQUEST, err.to_string()))?;
        if body.len() + chunk.len() > limit {
            return Err(too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn too_large(limit: usize) -> PeerRefusal {
    PeerRefusal::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("peer message larger than this endpoint takes ({limit} bytes)"),
    )
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, PeerRefusal> {
    serde_json::from_slice(body).map_err(|err| {
        PeerRefusal::new(
            StatusCode::BAD_REQUEST,
            format!("invalid peer message: {err}"),
        )
    })
}

/// A request from a neighbour: who sent it, its link end, the raw body and the parsed message.
struct Incoming<'a, T> {
    peer: KmeId,
    end: &'a LinkAddr,
    body: web::BytesMut,
    message: T,
}

async fn incoming<'a, T: serde::de::DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
    state: &'a PeerState,
) -> Result<Incoming<'a, T>, PeerRefusal> {
    let (peer, end) = neighbour(req, state)?;
    let body = read_body(req, payload).await?;
    let message = parse(&body)?;
    Ok(Incoming {
        peer,
        end,
        body,
        message,
    })
}

async fn activate(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<PeerState>,
) -> Result<HttpResponse, PeerRefusal> {
    let Incoming {
        peer,
        body,
        message: batch,
        ..
    } = incoming::<ActivationBatch>(&req, payload, &state).await?;
    let bind = BindFromPeer {
        peer,
        seq: batch.seq,
        digest: protocol::batch_digest(&body),
        bindings: batch.bindings,
    };
    ask_domain(&state.registry, bind, state.timeout).await?;
    Ok(HttpResponse::Ok().json(Activated {}))
}

async fn blocks(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<PeerState>,
) -> Result<HttpResponse, PeerRefusal> {
    let level = to_link(
        &req,
        payload,
        &state,
        |link| &link.blocks,
        |shipment: BlockShipment| {
            let blocks = shipment
                .blocks
                .into_iter()
                .map(|b| b.decode())
                .collect::<Result<Vec<_>, Error>>()?;
            Ok(ReceiveBlocks(blocks))
        },
    )
    .await?;
    Ok(HttpResponse::Ok().json(BlocksStored { level }))
}

/// Parses a neighbour's message `T`, turns it into the message for its link end (taken by
/// `to`) and returns that end's answer.
async fn to_link<T, M, R>(
    req: &HttpRequest,
    payload: web::Payload,
    state: &PeerState,
    to: fn(&LinkAddr) -> &Recipient<M>,
    message: impl FnOnce(T) -> Result<M, Error>,
) -> Result<R, PeerRefusal>
where
    T: serde::de::DeserializeOwned,
    M: actix::Message<Result = Result<R, Error>> + Send + 'static,
    R: Send + 'static,
{
    let Incoming {
        end, message: m, ..
    } = incoming::<T>(req, payload, state).await?;
    Ok(ask_domain(to(end), message(m)?, state.timeout).await?)
}

async fn level(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<PeerState>,
) -> Result<HttpResponse, PeerRefusal> {
    let Incoming {
        end,
        message: report,
        ..
    } = incoming::<LevelReport>(&req, payload, &state).await?;
    ask(&end.peer_level, PeerLevel(report.level), state.timeout)
        .await
        .map_err(|err| PeerRefusal::new(StatusCode::SERVICE_UNAVAILABLE, err.message))?;
    Ok(HttpResponse::Ok().json(LevelNoted {}))
}

async fn source(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<PeerState>,
) -> Result<HttpResponse, PeerRefusal> {
    let reply = to_link(
        &req,
        payload,
        &state,
        |link| &link.source,
        |r: SourceRequest| Ok(SourceFromPeer(r)),
    )
    .await?;
    Ok(HttpResponse::Ok().json(reply))
}

async fn topology(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<PeerState>,
) -> Result<HttpResponse, PeerRefusal> {
    let Incoming {
        peer,
        message: update,
        ..
    } = incoming::<TopologyUpdate>(&req, payload, &state).await?;
    let news = TopologyFromPeer { from: peer, update };
    ask_domain(&state.router, news, state.timeout).await?;
    Ok(HttpResponse::Ok().json(TopologyNoted {}))
}

async fn settle(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<PeerState>,
) -> Result<HttpResponse, PeerRefusal> {
    let Incoming {
        peer,
        message: batch,
        ..
    } = incoming::<SettleBatch>(&req, payload, &state).await?;
    if batch.settles.len() > MAX_SETTLE_BATCH {
        return Err(PeerRefusal::new(
            StatusCode::BAD_REQUEST,
            "too many settlements in one batch",
        ));
    }
    let settle = SettleFromPeer {
        from: peer,
        requests: batch.settles,
    };
    let results = ask(&state.relay, settle, state.timeout)
        .await
        .map_err(|err| PeerRefusal::new(StatusCode::SERVICE_UNAVAILABLE, err.message))?
        .into_iter()
        .map(|outcome| outcome.err().map(|err| err.to_string()))
        .collect();
    Ok(HttpResponse::Ok().json(SettleResults { results }))
}
