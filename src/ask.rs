//! Sending one message to an actor from a request, under a hard timeout.
//!
//! `Addr::send` waits for mailbox space and then for the answer; the outer timeout bounds both
//! (actix's own `.timeout()` does not cover a full mailbox). A full, closed or slow actor is a
//! 503, never a hang.

use std::time::Duration;

use actix::dev::ToEnvelope;
use actix::{Actor, Addr, Handler, Message};

use crate::error::ApiError;

/// Sends `msg` and returns the handler's answer.
pub async fn ask<A, M>(addr: &Addr<A>, msg: M, timeout: Duration) -> Result<M::Result, ApiError>
where
    A: Actor + Handler<M>,
    A::Context: ToEnvelope<A, M>,
    M: Message + Send + 'static,
    M::Result: Send,
{
    match actix_web::rt::time::timeout(timeout, addr.send(msg)).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(err)) => Err(kme_actors::Error::from(err).into()),
        Err(_) => Err(ApiError::timeout()),
    }
}

/// Sends `msg` whose handler answers `Result<T, kme_actors::Error>`, flattening both layers.
pub async fn ask_ok<A, M, T>(addr: &Addr<A>, msg: M, timeout: Duration) -> Result<T, ApiError>
where
    A: Actor + Handler<M>,
    A::Context: ToEnvelope<A, M>,
    M: Message<Result = kme_actors::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    Ok(ask(addr, msg, timeout).await??)
}
