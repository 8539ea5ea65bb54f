//! file-drop: the key source of real QKD devices that write each key as a file, under the
//! same name at both ends (see `key_files` for the device contract).
//!
//! Owns this end's key file directory (`<key_drop_dir>/<peer>/`) and, at the driving end, the
//! files left aside and the one waiting for its twin. Its `Link` calls it at both ends: at the
//! driving end, on each tick, to offer the first file by name, length and SHA-256 (over
//! `PeerLink`); at the other end, with those offers, which it answers after hashing its twin
//! (holding the key for the commit if both match); at start, to destroy files used before a
//! crash; and once a file's blocks are stored at both ends, to destroy it. A matched file is a
//! shared key: both `Link`s cut it into blocks, only numbers travel, and each records the
//! file's contents as used with its blocks, so the same bytes never give blocks twice.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::future::LocalBoxFuture;

use crate::error::{Error, Result};
use crate::link::key_source::{foreign, Delivery, KeySource, Produced, SharedKey, Stream, Work};
use crate::link::sources::key_files::{self, KeyFile};
use crate::link::LinkCore;
use crate::peer::peer_link::SourceExchange;
use crate::peer::protocol::{FileMatch, SourceReply, SourceRequest};
use crate::storage::ops::{KeyFileUsed, UsedKeyFile};
use crate::storage::store::{Exec, Store};
use crate::types::{hex, KmeId};

/// How long the driving end of a file-drop link waits after finding no usable file.
const FILE_DROP_IDLE: Duration = Duration::from_millis(500);
/// How long the driving end waits for a key file's twin before it skips the file (until the
/// next start) and says so in the log and in `status`.
const TWIN_PATIENCE: Duration = Duration::from_secs(60);

/// The file-drop source of one link end.
pub struct FileDrop {
    /// Where this end's device writes the link's key files.
    dir: PathBuf,
    /// Driving end: no offer before this instant.
    next_offer_at: Instant,
    /// Files left aside until the next start: a differing, missing or disowned twin, or
    /// shorter than one block. Never destroyed on the other end's word.
    skipped: HashSet<String>,
    /// The file whose twin is missing, as read and hashed once, and since when it waits.
    waiting: Option<(KeyFile, Instant)>,
    /// Which blocks the files become (see `SharedKey::stream`).
    stream: Option<Stream>,
    /// The start's sweep of used files is done: before, nothing is offered or matched (a
    /// file being destroyed must not be read).
    swept: bool,
}

/// What the driving end learnt about its first key file.
enum Offered {
    /// Both ends hold it and it was never used: it becomes blocks (numbered, if it is an
    /// authentication key, from at least the other end's next number).
    Use(KeyFile, u64),
    /// Its contents gave blocks before (a crash left it): destroyed at both ends.
    Destroyed,
    /// Shorter than one block: never offered.
    TooShort(KeyFile),
    /// The other end answered this: the file waits or is skipped.
    Refused(KeyFile, FileMatch),
}

impl FileDrop {
    /// `dir`: where this end's device writes the link's key files.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            next_offer_at: Instant::now(),
            skipped: HashSet::new(),
            waiting: None,
            stream: None,
            swept: false,
        }
    }

    /// The authentication key files of a BB84 link (`kme link rekey` installs them in
    /// `dir`): each becomes authentication blocks only.
    pub fn for_auth_keys(dir: PathBuf) -> Self {
        Self {
            stream: Some(Stream::Auth),
            ..Self::new(dir)
        }
    }
}

impl KeySource for FileDrop {
    fn name(&self) -> &'static str {
        "file-drop"
    }

    fn delivery(&self) -> Delivery {
        Delivery::ByNumber
    }

    /// Destroys key files that gave blocks before a crash could remove them.
    fn start(&mut self, link: &mut LinkCore) -> Work<Self, ()> {
        let sweep = sweep_used_key_files(
            self.dir.clone(),
            link.store().clone(),
            link.params().peer.clone(),
        );
        Work::later(sweep, |(), me: &mut Self, _| me.swept = true)
    }

    /// Offers the first key file, when the pools want material.
    fn drive(&mut self, link: &mut LinkCore, now: Instant) -> Work<Self, Produced> {
        if link.pools_full() {
            return Work::Ready(Produced::Nothing);
        }
        self.offer_when_due(link, now)
    }

    fn answer(
        &mut self,
        request: SourceRequest,
        link: &mut LinkCore,
    ) -> Work<Self, Result<SourceReply>> {
        match request {
            SourceRequest::FileOffer {
                name,
                bytes,
                sha256,
            } => self.file_offer(link, name, bytes, sha256),
            _ => foreign(self),
        }
    }

    /// Both ends hold the file's blocks: it goes.
    fn key_used(&self, link: &LinkCore, used: &UsedKeyFile) -> LocalBoxFuture<'static, ()> {
        let peer = link.params().peer.clone();
        let path = self.dir.join(&used.name);
        Box::pin(async move { destroy_key_file(&peer, path).await })
    }
}

/// file-drop, driving end.
impl FileDrop {
    /// Offers the first key file to the other end when an offer is due, whatever the pools
    /// hold.
    pub(crate) fn offer_when_due(&mut self, link: &LinkCore, now: Instant) -> Work<Self, Produced> {
        if !self.swept || now < self.next_offer_at {
            return Work::Ready(Produced::Nothing);
        }
        self.offer(link)
    }

    fn offer(&mut self, link: &LinkCore) -> Work<Self, Produced> {
        let dir = self.dir.clone();
        let skipped = self.skipped.clone();
        // A file waiting for its twin is offered again as read before, not read and hashed
        // anew every time (it may be large), as long as it is still there unchanged in size.
        let waiting = self.waiting.take();
        let since = waiting.as_ref().map(|(_, since)| *since);
        let block_bytes = link.params().block_bytes;
        let peer = link.peer().clone();
        let store = link.store().clone();
        let link_peer = link.params().peer.clone();
        let work = async move {
            let found = actix_rt::task::spawn_blocking(move || match waiting {
                Some((file, _))
                    if std::fs::metadata(&file.path)
                        .is_ok_and(|m| m.len() == file.bytes.len() as u64) =>
                {
                    Ok(Some(file))
                }
                _ => key_files::next_file(&dir, &skipped),
            })
            .await
            .map_err(|err| Error::Storage(err.to_string()))?
            .map_err(|err| Error::Storage(format!("key files: {err}")))?;
            let Some(file) = found else {
                return Ok(None);
            };
            // Used before (a crash left it behind): offered all the same, so that the other
            // end destroys its twin too, then destroyed here, never used.
            let used = key_file_used(&store, &link_peer, &file.sha256).await?;
            if !used && file.bytes.len() < block_bytes {
                return Ok(Some(Offered::TooShort(file)));
            }
            let offer = SourceRequest::FileOffer {
                name: file.name.clone(),
                bytes: file.bytes.len() as u64,
                sha256: hex(&file.sha256),
            };
            let reply = peer.send(SourceExchange(offer)).await??;
            if used {
                destroy_key_file(&link_peer, file.path.clone()).await;
                return Ok(Some(Offered::Destroyed));
            }
            Ok(Some(match reply {
                SourceReply::FileOffer {
                    file: FileMatch::Matched,
                    next_auth_seq,
                } => Offered::Use(file, next_auth_seq),
                SourceReply::FileOffer { file: answer, .. } => Offered::Refused(file, answer),
                other => return Err(other.unexpected("file offer")),
            }))
        };
        Work::later(
            work,
            move |result: Result<Option<Offered>>, me: &mut Self, link| {
                me.next_offer_at = Instant::now() + FILE_DROP_IDLE;
                match result {
                    Ok(Some(Offered::Use(file, peer_next))) => {
                        return me.use_file(link, file, peer_next)
                    }
                    // Go on with the next file at once.
                    Ok(Some(Offered::Destroyed)) => me.next_offer_at = Instant::now(),
                    Ok(Some(Offered::TooShort(file))) => {
                        log::warn!(
                            "link to {}: key file {} is shorter than one block ({} bytes): left aside",
                            link.params().peer,
                            file.name,
                            link.params().block_bytes
                        );
                        me.skipped.insert(file.name);
                        me.next_offer_at = Instant::now();
                    }
                    Ok(Some(Offered::Refused(file, answer))) => {
                        me.file_refused(link, file, answer, since)
                    }
                    Ok(None) => link.set_health(&Ok(())),
                    Err(err) => link.set_health(&Err(err)),
                }
                Produced::Nothing
            },
        )
    }

    /// Both ends hold the same file: its key is shared, committed by number. An authentication
    /// key restarts the stream above `peer_next` (the other end's next number) and our own.
    fn use_file(&mut self, link: &mut LinkCore, file: KeyFile, peer_next: u64) -> Produced {
        link.set_health(&Ok(()));
        log::info!(
            "link to {}: key file {} gives {} blocks",
            link.params().peer,
            file.name,
            file.bytes.len() / link.params().block_bytes.max(1)
        );
        let mut key = shared_key(file, self.stream);
        if self.stream == Some(Stream::Auth) {
            key.fresh_auth_from = Some(peer_next);
        }
        Produced::Shared(key)
    }

    /// The other end cannot use its twin: wait for a missing one (a while, since `since` if it
    /// was waiting already), leave the file aside otherwise. Never destroyed or renamed on the
    /// other end's word.
    fn file_refused(
        &mut self,
        link: &mut LinkCore,
        file: KeyFile,
        answer: FileMatch,
        since: Option<Instant>,
    ) {
        let peer = link.params().peer.clone();
        let err = match answer {
            FileMatch::Missing => {
                let since = since.unwrap_or_else(Instant::now);
                if since.elapsed() < TWIN_PATIENCE {
                    link.set_health(&Err(Error::Unavailable(format!(
                        "{peer} has no key file {} yet",
                        file.name
                    ))));
                    self.waiting = Some((file, since));
                    return;
                }
                format!("{peer} never got key file {}", file.name)
            }
            FileMatch::Mismatch => format!("key file {} differs at {peer}", file.name),
            FileMatch::Used | FileMatch::Matched => {
                format!(
                    "{peer} says key file {} was used; this KME has no record of it",
                    file.name
                )
            }
        };
        log::error!("link to {peer}: {err}; the file is left aside until the next start");
        self.skipped.insert(file.name);
        link.set_health(&Err(Error::Unavailable(err)));
    }
}

/// A key file's key, as both ends commit it: numbered from its hash, recorded as used by name
/// and hash.
fn shared_key(file: KeyFile, stream: Option<Stream>) -> SharedKey {
    SharedKey {
        id: file.frame_id(),
        used: Some(UsedKeyFile {
            name: file.name,
            sha256: file.sha256,
        }),
        bytes: file.bytes,
        // Key files come with no authentication stream: the commit rests on the TLS channel.
        commit_auth: None,
        stream,
        fresh_auth_from: None,
    }
}

/// Whether key file contents gave blocks for good on the link to `peer`.
async fn key_file_used(store: &Addr<Store>, peer: &KmeId, sha256: &[u8; 32]) -> Result<bool> {
    let op = KeyFileUsed {
        peer: peer.clone(),
        sha256: *sha256,
    };
    store.send(Exec(op)).await?
}

/// file-drop, the other end.
impl FileDrop {
    /// Holds the key file `name` for the commit if it has the offered length and hash.
    fn file_offer(
        &mut self,
        link: &mut LinkCore,
        name: String,
        bytes: u64,
        sha256: String,
    ) -> Work<Self, Result<SourceReply>> {
        if !key_files::valid_name(&name) {
            return Work::refuse(format!("\"{name}\" is not a key file name"));
        }
        if !self.swept {
            // Still destroying the files used before a restart: as good as not there yet.
            return Work::Ready(Ok(SourceReply::FileOffer {
                file: FileMatch::Missing,
                next_auth_seq: 0,
            }));
        }
        link.hold(None);
        let dir = self.dir.clone();
        let store = link.store().clone();
        let peer = link.params().peer.clone();
        let work = async move {
            let read = actix_rt::task::spawn_blocking(move || key_files::read_named(&dir, &name))
                .await
                .map_err(|err| Error::Storage(err.to_string()))?;
            let file = match read {
                Ok(Some(file)) => file,
                Ok(None) => return Ok((FileMatch::Missing, None)),
                Err(err) => {
                    // Unreadable or oversized here: as good as missing (the driving end gives
                    // up on it after a while), and logged for the operator.
                    log::error!("link to {peer}: key file: {err}");
                    return Ok((FileMatch::Missing, None));
                }
            };
            if key_file_used(&store, &peer, &file.sha256).await? {
                // Its contents gave blocks already: destroy it if a crash left it, never use it.
                destroy_key_file(&peer, file.path).await;
                return Ok((FileMatch::Used, None));
            }
            // A differing twin stays where it is: the neighbour's word alone must not take our
            // key files out of use.
            if file.bytes.len() as u64 == bytes && hex(&file.sha256) == sha256 {
                return Ok((FileMatch::Matched, Some(file)));
            }
            Ok((FileMatch::Mismatch, None))
        };
        Work::later(
            work,
            |result: Result<(FileMatch, Option<KeyFile>)>, me: &mut Self, link| {
                let (answer, file) = result?;
                if answer == FileMatch::Mismatch {
                    log::error!(
                        "link to {}: an offered key file differs from ours",
                        link.params().peer
                    );
                }
                link.hold(file.map(|file| shared_key(file, me.stream)));
                let next_auth_seq = match me.stream {
                    Some(Stream::Auth) => link.next_auth_seq(),
                    _ => 0,
                };
                Ok(SourceReply::FileOffer {
                    file: answer,
                    next_auth_seq,
                })
            },
        )
    }
}

/// At start: destroys the key files of `dir` that gave blocks before a crash could remove
/// them.
async fn sweep_used_key_files(dir: PathBuf, store: Addr<Store>, peer: KmeId) {
    let listed = actix_rt::task::spawn_blocking(move || key_files::names(&dir).map(|n| (dir, n)));
    let Ok(Ok((dir, names))) = listed.await else {
        return;
    };
    for name in names {
        let dir = dir.clone();
        let read = actix_rt::task::spawn_blocking(move || key_files::read_named(&dir, &name));
        let Ok(Ok(Some(file))) = read.await else {
            continue;
        };
        if matches!(key_file_used(&store, &peer, &file.sha256).await, Ok(true)) {
            log::warn!(
                "link to {peer}: destroying key file {}, used before a restart",
                file.name
            );
            destroy_key_file(&peer, file.path).await;
        }
    }
}

/// Best effort: a used key file that cannot be destroyed now is logged; it is recorded as used,
/// so it is destroyed, never used, when it turns up again (at start or at an offer).
async fn destroy_key_file(peer: &KmeId, path: PathBuf) {
    let shown = path.display().to_string();
    let destroyed = actix_rt::task::spawn_blocking(move || key_files::destroy(&path)).await;
    if !matches!(destroyed, Ok(Ok(()))) {
        log::error!("link to {peer}: cannot destroy used key file {shown}");
    }
}
