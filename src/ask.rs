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

#[cfg(test)]
mod tests {
    use super::*;
    use actix::prelude::*;

    /// An actor that takes one message and then never gets to the next: its mailbox (of one)
    /// fills up behind it.
    struct Stuck;

    impl Actor for Stuck {
        type Context = Context<Self>;

        fn started(&mut self, ctx: &mut Context<Self>) {
            ctx.set_mailbox_capacity(1);
        }
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct Hold;

    impl Handler<Hold> for Stuck {
        type Result = ();

        fn handle(&mut self, _: Hold, ctx: &mut Context<Self>) {
            ctx.wait(fut::wrap_future(std::future::pending::<()>()));
        }
    }

    #[actix::test]
    async fn a_full_mailbox_is_a_503_never_a_hang() {
        let stuck = Stuck.start();
        // One message blocks the actor; the next ones fill its mailbox.
        stuck.do_send(Hold);
        for _ in 0..4 {
            let _ = stuck.try_send(Hold);
        }
        let answer = actix_web::rt::time::timeout(
            Duration::from_secs(10),
            ask(&stuck, Hold, Duration::from_millis(50)),
        )
        .await
        .expect("ask returned");
        let err = answer.expect_err("no answer from a stuck actor");
        assert_eq!(err.status.as_u16(), 503);
        assert_eq!(err.message, "the KME is busy; retry later");
    }
}
