//! The domain error: one enum for everything the actors can refuse or fail at.
//!
//! Variants are named after what went wrong, not after HTTP; `src/error.rs` maps each one to
//! exactly one ETSI status (400, 401 or 503). Messages of server-side variants may name internal
//! causes: the edge logs them and shows the SAE a generic text instead.

/// Result alias of the actors crate.
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong (the text is safe to show to the SAE).
    #[error("{0}")]
    BadRequest(String),
    /// `dec_keys` named keys that are unknown, already retrieved or of another master.
    #[error("one or more keys specified are not found on KME")]
    KeysNotFound,
    /// A mandatory extension of the request is understood but cannot be met (the text says
    /// which and why).
    #[error("{0}")]
    ExtensionUnmet(String),
    /// The caller may not do this (unknown identity, not a named slave, foreign SAE).
    #[error("{0}")]
    NotAuthorized(String),
    /// The pool of the link cannot cover the request right now; it refills by itself.
    #[error("not enough key material for this request right now; retry later")]
    PoolExhausted { peer: String },
    /// The SAE is over one of its rate limits (`message` names it); nothing was taken, and the
    /// request would pass after `retry_after`.
    #[error("{message}")]
    OverLimit {
        message: String,
        retry_after: std::time::Duration,
    },
    /// The slave's KME is not reachable by any supported route.
    #[error("{0}")]
    Unreachable(String),
    /// The neighbour KME did not answer, or answered with an error.
    #[error("peer KME {peer} unavailable: {reason}")]
    PeerUnavailable { peer: String, reason: String },
    /// The neighbour refused an activation because positions were already bound there;
    /// `high_mark` tells the master where the peer's bindable material starts.
    #[error("peer KME {peer} rejected the activation: {reason}")]
    ActivationRejected {
        peer: String,
        high_mark: u64,
        reason: String,
    },
    /// The neighbour no longer holds the key of a BB84 frame (it restarted before the frame was
    /// committed): the frame's blocks are discarded at both ends.
    #[error("peer KME {peer} no longer holds the frame's key")]
    FrameLost { peer: String },
    /// The two ends of a link number its key blocks differently (one was restored from a
    /// backup or started on a new database): `next` is the refusing end's next number of each
    /// key stream, so that the ends realign above both (see `link`).
    #[error("key-block numbering out of step with {peer}: was an end restored from a backup? The ends realign above both, discarding the link's unused material")]
    BlocksOutOfStep {
        peer: String,
        next: Vec<crate::peer::protocol::BlockId>,
    },
    /// A neighbour's activation carries a sequence number at or below the last one taken from
    /// it: a replay, or a neighbour restored from a backup (which moves its numbers past
    /// `last_seq` when told, and sends again).
    #[error("peer message rejected: an activation not newer than {last_seq}, the last taken from its sender (a replay, or a KME restored from a backup)")]
    SequenceBehind { last_seq: u64 },
    /// A message from a peer KME is invalid or a replay.
    #[error("peer message rejected: {0}")]
    PeerMessage(String),
    /// SQLite or the connection pool failed.
    #[error("storage failure: {0}")]
    Storage(String),
    /// An actor did not answer (mailbox closed or full, or the hard timeout elapsed).
    #[error("internal actor unavailable: {0}")]
    Unavailable(String),
}

impl From<rusqlite::Error> for Error {
    fn from(err: rusqlite::Error) -> Self {
        Error::Storage(err.to_string())
    }
}

impl From<r2d2::Error> for Error {
    fn from(err: r2d2::Error) -> Self {
        Error::Storage(err.to_string())
    }
}

impl From<actix::MailboxError> for Error {
    fn from(err: actix::MailboxError) -> Self {
        Error::Unavailable(err.to_string())
    }
}
