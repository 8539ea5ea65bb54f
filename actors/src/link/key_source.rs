//! Key sources: where a link's secret material comes from, behind one trait, [`KeySource`].
//!
//! A link is a pair of `Link` actors, one per KME. The `Link` keeps what every source shares:
//! block numbering, the two pools' levels, two-phase delivery (store unconfirmed, deliver,
//! confirm), commits at the answering end, and whether the peer and the storage are reachable.
//! What differs is the source's, and the `Link` reaches it only through this trait:
//!
//! - at the driving (lower-ID) end, on every tick with nothing in flight, [`KeySource::drive`]
//!   yields material: bytes to ship ([`Produced::Bytes`]) or a key both ends hold
//!   ([`Produced::Shared`]), which the `Link` cuts into blocks and commits by number;
//! - at the answering end, [`KeySource::answer`] takes the driving end's `SourceRequest`s (all
//!   but `Commit`, which the `Link` handles for sources delivering [`Delivery::ByNumber`]);
//! - [`KeySource::start`] runs once at start, [`KeySource::health`] feeds
//!   `status_extension.link`, [`KeySource::auth_stream`] names the authentication stream the
//!   `Link` refills from the source's keys (if any), and [`KeySource::key_used`] lets go of a
//!   key's origin once both ends hold its blocks.
//!
//! A source never holds the `Link`: its methods get [`LinkCore`] (parameters, peer and store
//! addresses, pool levels, health, the key held for a commit) and return [`Work`]: a value
//! at once, or a future (storage, peer, engine) and a step the `Link` runs with the source and
//! the core again when the future is done, on the actor.
//!
//! The three sources:
//! - [`Bb84`](super::sources::bb84::Bb84) (the default network): the driving end is Alice; per frame its engine
//!   simulates the pulses, the two engines run the post-processing over the KME-to-KME
//!   channel, and both ends hold the same key ([`Produced::Shared`]). It keeps the link's
//!   authentication stream, whose first key it ships as bytes.
//! - [`FileDrop`](super::sources::file_drop::FileDrop) (real devices): a device writes key files under the same names at
//!   both ends; the driving end offers one by name, length and SHA-256, the other end holds
//!   its twin if both match, and the file's key is shared ([`Produced::Shared`]) and the files
//!   destroyed once stored.
//! - [`Courier`](super::sources::courier::Courier) (tests, benchmarks): the driving end draws bytes from the CSPRNG and
//!   ships them ([`Produced::Bytes`]). NOT quantum key distribution.
//!
//! A new source (a device driver) is one file in `link/sources/` implementing `KeySource`, plus its
//! `SourceKind` variant with its configuration and the line in `startup.rs` that builds it.

use std::future::Future;
use std::time::Instant;

use futures_util::future::LocalBoxFuture;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::link::auth::{AuthStream, CommitAuth};
use crate::link::LinkCore;
use crate::peer::protocol::{SourceReply, SourceRequest};
use crate::storage::ops::UsedKeyFile;

/// A link's source of secret material. See the module doc.
pub trait KeySource: Unpin + Sized + 'static {
    /// Short name for logs and `status_extension.link.source`.
    fn name(&self) -> &'static str;

    /// How this source's key blocks reach the other end. It also decides how blocks left
    /// unconfirmed by a restart are delivered again, whether the answering end takes key
    /// blocks shipped as bytes, and whether it takes `Commit`s.
    fn delivery(&self) -> Delivery;

    /// Once, when the link starts, at both ends.
    fn start(&mut self, _link: &mut LinkCore) -> Work<Self, ()> {
        Work::Ready(())
    }

    /// Driving end, on a tick with nothing in flight: the next material, if any. The `Link`
    /// runs no other delivery or `drive` until the returned work is done.
    fn drive(&mut self, link: &mut LinkCore, now: Instant) -> Work<Self, Produced>;

    /// Answering end: a message of the driving end's source (never `Commit` on a source that
    /// delivers by number: the `Link` handles those). Handled atomically: no other message of
    /// the link is handled until the answer is ready.
    fn answer(
        &mut self,
        _request: SourceRequest,
        _link: &mut LinkCore,
    ) -> Work<Self, Result<SourceReply>> {
        foreign(self)
    }

    /// The authentication stream this source keys its messages from, if it keeps one: the
    /// `Link` cuts authentication blocks from shared keys while it runs low, appends confirmed
    /// ones to it, and takes them as bytes (the first key) at the answering end.
    fn auth_stream(&mut self) -> Option<&mut AuthStream> {
        None
    }

    /// Health beyond reachability (which the `Link` tracks itself and reports first).
    fn health(&self) -> SourceHealth {
        SourceHealth::default()
    }

    /// Both ends hold the blocks of the key recorded as `used` for good: let go of where it
    /// came from (file-drop destroys the key file). Run before the driving end confirms the
    /// blocks and before the answering end acknowledges the commit; best effort.
    fn key_used(&self, _link: &LinkCore, _used: &UsedKeyFile) -> LocalBoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// The answer to a message that is not of `source`'s protocol.
pub fn foreign<S: KeySource>(source: &S) -> Work<S, Result<SourceReply>> {
    Work::refuse(format!(
        "not a message of the {} source of this link",
        source.name()
    ))
}

/// How a source's key blocks reach the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// With their bytes, over the KME-to-KME TLS channel (the courier).
    Bytes,
    /// Both ends hold the key; only block numbers travel (`Commit`), never key bytes.
    ByNumber,
}

/// The blocks a run of material is cut into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Key blocks, each for the end whose pool is emptier.
    Pools,
    /// Blocks of the authentication stream.
    Auth,
}

/// What the driving end's source yields for the `Link` to deliver. (No `Debug`: it holds
/// key bytes.)
pub enum Produced {
    Nothing,
    /// Material to ship with its bytes, cut into blocks of `to` (a remainder below one block
    /// is dropped).
    Bytes {
        material: Zeroizing<Vec<u8>>,
        to: Stream,
    },
    /// A key both ends hold: cut into blocks (authentication blocks first while the stream
    /// runs low, then key blocks) and committed by number.
    Shared(SharedKey),
}

/// A key both ends of a link hold (a BB84 frame's, a key file's).
pub struct SharedKey {
    /// Names the key in `Commit` (the frame, or an id from the file's hash).
    pub id: u64,
    pub bytes: Zeroizing<Vec<u8>>,
    /// Recorded as used in the transaction that stores its blocks, so that the same key
    /// never gives blocks twice (file-drop: the file's name and hash).
    pub used: Option<UsedKeyFile>,
    /// What tags its `Commit` (BB84: from the frame's authentication window).
    pub commit_auth: Option<CommitAuth>,
    /// All its blocks for one stream (an authentication key file: `Some(Auth)`), or (None)
    /// authentication blocks first while the stream runs low, then key blocks.
    pub stream: Option<Stream>,
    /// An operator's authentication key, which restarts the stream: its blocks are numbered
    /// from at least this (the other end's next number).
    pub fresh_auth_from: Option<u64>,
}

/// Asynchronous work of a source, for its `Link` to run.
pub enum Work<S, T> {
    /// Done at once.
    Ready(T),
    /// A future, then a step with the source and the link (see [`Work::later`]).
    Later(LocalBoxFuture<'static, Then<S, T>>),
}

/// The step after a source's future, run on the `Link` actor.
pub type Then<S, T> = Box<dyn FnOnce(&mut S, &mut LinkCore) -> T>;

impl<S: 'static, T: 'static> Work<S, T> {
    /// Runs `future` (off the source: it may wait for the store, the peer or an engine), then
    /// `then` with its output, the source and the link.
    pub fn later<O: 'static>(
        future: impl Future<Output = O> + 'static,
        then: impl FnOnce(O, &mut S, &mut LinkCore) -> T + 'static,
    ) -> Self {
        Work::Later(Box::pin(async move {
            let out = future.await;
            Box::new(move |source: &mut S, link: &mut LinkCore| then(out, source, link))
                as Then<S, T>
        }))
    }

    /// The work of a source that another one (`O`) embeds, as `O`'s: `part` finds it in `O`.
    pub fn within<O: 'static>(self, part: fn(&mut O) -> &mut S) -> Work<O, T> {
        match self {
            Work::Ready(value) => Work::Ready(value),
            Work::Later(future) => Work::Later(Box::pin(async move {
                let then = future.await;
                Box::new(move |outer: &mut O, link: &mut LinkCore| then(part(outer), link))
                    as Then<O, T>
            })),
        }
    }

    /// The same work, its outcome passed through `f`.
    pub fn map<U: 'static>(self, f: impl FnOnce(T) -> U + 'static) -> Work<S, U> {
        match self {
            Work::Ready(value) => Work::Ready(f(value)),
            Work::Later(future) => Work::Later(Box::pin(async move {
                let then = future.await;
                Box::new(move |source: &mut S, link: &mut LinkCore| f(then(source, link)))
                    as Then<S, U>
            })),
        }
    }
}

impl<S, R> Work<S, Result<R>> {
    /// The peer's message is refused with `message`.
    pub fn refuse(message: String) -> Self {
        Work::Ready(Err(Error::PeerMessage(message)))
    }
}

/// A source's view of its link's health.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceHealth {
    pub condition: Condition,
    pub reason: Option<String>,
    /// What a QKD source measures (BB84 links).
    pub qkd: Option<QkdHealth>,
}

impl Default for SourceHealth {
    fn default() -> Self {
        Self {
            condition: Condition::Up,
            reason: None,
            qkd: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Condition {
    Up,
    /// BB84: the last frames aborted, fewer than three in a row.
    Degraded,
    Down,
}

/// What a BB84 link measures, frame by frame.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct QkdHealth {
    pub frames_ok: u64,
    pub frames_aborted: u64,
    pub consecutive_aborts: u64,
    pub last_abort: Option<String>,
    /// QBER observed on the disclosed sample of the last frame that got that far.
    pub qber: Option<f64>,
    /// Its upper confidence bound (the value compared with the abort threshold).
    pub qber_upper: Option<f64>,
    /// Reconciliation efficiency f = leaked / (n h(QBER)) of the last reconciled frame.
    pub efficiency: Option<f64>,
    /// Over the last frames: bits / frame time (a paced frame lasts at least its pulses /
    /// pulse rate, so a paced link shows its physical rate; idle time is not counted).
    pub sifted_bits_per_s: f64,
    pub secret_bits_per_s: f64,
    pub auth_windows_left: u64,
    pub fibre_km: f64,
    pub eavesdropper: f64,
}
