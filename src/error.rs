//! The one mapping from errors to HTTP answers on the SAE API.
//!
//! Every error answer is an ETSI Error object (clause 6.5) with status 400, 401 or 503, the
//! only codes ETSI GS QKD 014 defines. Server-side causes are logged, and the SAE gets a
//! message that says what to do (retry later) without internal detail.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use kme_actors::Error;

use crate::etsi::{self, ErrorBody};

#[derive(Debug, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub details: Vec<serde_json::Value>,
    /// Sent as `Retry-After` (whole seconds, at least 1) with a 503 that will pass by then.
    pub retry_after: Option<std::time::Duration>,
    /// Why, in one word (the `reason` label of the refusals metric).
    pub reason: &'static str,
}

/// Set on every error answer: why it was refused (read by the metrics middleware).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub &'static str);

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        let reason = match status {
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            _ => "unavailable",
        };
        Self {
            status,
            message: message.into(),
            details: Vec::new(),
            retry_after: None,
            reason,
        }
    }

    fn because(mut self, reason: &'static str) -> Self {
        self.reason = reason;
        self
    }
    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.details.push(detail);
        self
    }
    pub fn timeout() -> Self {
        log::warn!("request timed out waiting for an actor");
        Self::unavailable("the KME is busy; retry later").because("timeout")
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::BadRequest(message) => Self::bad_request(message),
            Error::KeysNotFound => {
                Self::bad_request(etsi::KEYS_NOT_FOUND).because("keys_not_found")
            }
            Error::ExtensionUnmet(why) => Self::bad_request(etsi::EXTENSION_UNSATISFIED)
                .with_detail(serde_json::json!({"extension_mandatory_unmet": why}))
                .because("extension_unmet"),
            Error::NotAuthorized(message) => Self::unauthorized(message),
            Error::PoolExhausted { .. } => {
                Self::unavailable(err.to_string()).because("pool_exhausted")
            }
            Error::Unreachable(_) => Self::unavailable(err.to_string()).because("unreachable"),
            Error::OverLimit {
                message,
                retry_after,
            } => Self {
                retry_after: Some(retry_after),
                ..Self::unavailable(message).because("over_limit")
            },
            Error::PeerUnavailable { .. }
            | Error::ActivationRejected { .. }
            | Error::FrameLost { .. }
            | Error::BlocksOutOfStep { .. }
            | Error::SequenceBehind { .. }
            | Error::PeerMessage(_) => {
                log::warn!("peer failure: {err}");
                Self::unavailable("the slave's KME could not take the keys; retry later")
                    .because("peer")
            }
            Error::Storage(_) => {
                log::error!("storage failure: {err}");
                Self::unavailable("key storage is unavailable; retry later").because("storage")
            }
            Error::Unavailable(_) => {
                log::error!("actor failure: {err}");
                Self::unavailable("the KME is busy; retry later").because("busy")
            }
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(wait) = self.retry_after {
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response.insert_header((header::RETRY_AFTER, seconds.max(1)));
        }
        let mut response = response.json(ErrorBody {
            message: self.message.clone(),
            details: self.details.clone(),
        });
        response.extensions_mut().insert(Refused(self.reason));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::MessageBody;

    /// The status each domain error must map to. No wildcard: a new variant does not compile
    /// until it is given its code here (and an example in the test below).
    fn expected_status(err: &Error) -> u16 {
        match err {
            Error::BadRequest(_) | Error::KeysNotFound | Error::ExtensionUnmet(_) => 400,
            Error::NotAuthorized(_) => 401,
            Error::PoolExhausted { .. }
            | Error::OverLimit { .. }
            | Error::Unreachable(_)
            | Error::PeerUnavailable { .. }
            | Error::ActivationRejected { .. }
            | Error::FrameLost { .. }
            | Error::BlocksOutOfStep { .. }
            | Error::SequenceBehind { .. }
            | Error::PeerMessage(_)
            | Error::Storage(_)
            | Error::Unavailable(_) => 503,
        }
    }

    #[test]
    fn every_domain_error_maps_to_an_etsi_code_and_body() {
        let secret = "disk full at /var/secret";
        let cases = [
            Error::BadRequest("x".into()),
            Error::KeysNotFound,
            Error::ExtensionUnmet("x".into()),
            Error::NotAuthorized("x".into()),
            Error::PoolExhausted { peer: "p".into() },
            Error::OverLimit {
                message: "x".into(),
                retry_after: std::time::Duration::from_millis(1500),
            },
            Error::Unreachable("x".into()),
            Error::PeerUnavailable {
                peer: "p".into(),
                reason: secret.into(),
            },
            Error::ActivationRejected {
                peer: "p".into(),
                high_mark: 1,
                reason: secret.into(),
            },
            Error::PeerMessage(secret.into()),
            Error::FrameLost { peer: "p".into() },
            Error::BlocksOutOfStep {
                peer: "p".into(),
                next: Vec::new(),
            },
            Error::SequenceBehind { last_seq: 2 },
            Error::Storage(secret.into()),
            Error::Unavailable(secret.into()),
        ];
        for err in cases {
            let code = expected_status(&err);
            let response = ApiError::from(err.clone()).error_response();
            assert_eq!(response.status().as_u16(), code, "{err:?}");
            if matches!(err, Error::OverLimit { .. }) {
                assert_eq!(
                    response.headers().get(header::RETRY_AFTER).unwrap(),
                    "2",
                    "rounded up"
                );
            }
            let body = response.into_body().try_into_bytes().unwrap();
            let parsed: ErrorBody = serde_json::from_slice(&body).unwrap();
            assert!(!parsed.message.is_empty(), "{err:?}");
            assert!(
                !parsed.message.contains(secret),
                "internal detail leaked: {err:?}"
            );
        }
    }
}
