//! Sending one message to an actor from a request, under a hard timeout.
//!
//! `Addr::send` waits for mailbox space and then for the answer; the outer timeout bounds both
//! (actix's own `.timeout()` does not cover a full mailbox). A full, closed or slow actor is a
//! 503, never a hang.

use std::future::Future;
use std::time::Duration;

use actix::dev::ToEnvelope;
use actix::{Actor, Addr, Handler, MailboxError, Message, Recipient};

use crate::error::ApiError;

/// Where a message `M` can be sent: an actor's `Addr`, or a `Recipient` of `M` (a link end,
/// whatever its source).
pub trait Mailbox<M: Message> {
    fn post(&self, msg: M) -> impl Future<Output = Result<M::Result, MailboxError>>;
}

impl<A, M> Mailbox<M> for Addr<A>
where
    A: Actor + Handler<M>,
    A::Context: ToEnvelope<A, M>,
    M: Message + Send + 'static,
    M::Result: Send,
{
    fn post(&self, msg: M) -> impl Future<Output = Result<M::Result, MailboxError>> {
        self.send(msg)
    }
}

impl<M> Mailbox<M> for Recipient<M>
where
    M: Message + Send + 'static,
    M::Result: Send,
{
    fn post(&self, msg: M) -> impl Future<Output = Result<M::Result, MailboxError>> {
        self.send(msg)
    }
}

/// Sends `msg` and returns the handler's answer.
pub async fn ask<M>(to: &impl Mailbox<M>, msg: M, timeout: Duration) -> Result<M::Result, ApiError>
where
    M: Message,
{
    match actix_web::rt::time::timeout(timeout, to.post(msg)).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(err)) => Err(kme_actors::Error::from(err).into()),
        Err(_) => Err(ApiError::timeout()),
    }
}

/// Sends `msg` whose handler answers `Result<T, kme_actors::Error>`, flattening both layers.
pub async fn ask_ok<M, T>(to: &impl Mailbox<M>, msg: M, timeout: Duration) -> Result<T, ApiError>
where
    M: Message<Result = kme_actors::Result<T>>,
{
    Ok(ask(to, msg, timeout).await??)
}
