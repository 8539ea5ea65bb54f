//! Around every SAE API request: its ID (`X-Request-Id` on the answer, the delivery's and
//! relay's ID in the actors' logs and audit records, and in the log line of every refusal the
//! KME is to blame for), and its metrics: count and latency by endpoint and status, keys
//! handed out, refusals by reason. Labels never carry an SAE ID or a key_ID, so the number of
//! series stays fixed.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage};
use uuid::Uuid;

use crate::error::Refused;
use crate::sae_api::{KeysHanded, SaeState};

/// The ID of one SAE API request (in the request's extensions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestId(pub Uuid);

/// The endpoint of an SAE API path, as a metric label.
fn endpoint(path: &str) -> &'static str {
    if path.ends_with("/enc_keys") {
        "enc_keys"
    } else if path.ends_with("/dec_keys") {
        "dec_keys"
    } else if path.ends_with("/status") {
        "status"
    } else if path == "/api/v1/sae/info/me" {
        "info"
    } else {
        "other"
    }
}

/// The middleware (`actix_web::middleware::from_fn(track)` on the SAE API's `App`).
pub async fn track(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let metrics = req
        .app_data::<web::Data<SaeState>>()
        .map(|state| state.metrics.clone());
    let endpoint = endpoint(req.path());
    let id = Uuid::new_v4();
    req.extensions_mut().insert(RequestId(id));
    let started = Instant::now();
    let mut response = next.call(req).await?;
    if let Ok(value) = HeaderValue::from_str(&id.to_string()) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-request-id"), value);
    }
    let status = response.status();
    if status.is_server_error() {
        let reason = response.response().extensions().get::<Refused>().copied();
        log::warn!(
            "request {id}: {endpoint} answered {status} ({})",
            reason.map_or("?", |Refused(r)| r)
        );
    } else {
        log::debug!("request {id}: {endpoint} answered {status}");
    }
    if let Some(metrics) = metrics {
        metrics
            .sae_requests
            .with_label_values(&[endpoint, response.status().as_str()])
            .inc();
        metrics
            .sae_request_seconds
            .with_label_values(&[endpoint])
            .observe(started.elapsed().as_secs_f64());
        let extensions = response.response().extensions();
        if let Some(Refused(reason)) = extensions.get::<Refused>() {
            metrics.refusals.with_label_values(&[reason]).inc();
        }
        if let Some(KeysHanded(keys)) = extensions.get::<KeysHanded>() {
            let direction = if endpoint == "dec_keys" {
                "retrieved"
            } else {
                "delivered"
            };
            metrics
                .sae_keys
                .with_label_values(&[direction])
                .inc_by(*keys);
        }
    }
    Ok(response)
}
