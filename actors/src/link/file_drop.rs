//! file-drop key files of a `Link`: the driving end offers them, the other end matches them
//! (see `key_drop` for the device contract).

use std::collections::HashSet;

use super::*;
use crate::peer_link::FileMatch;
use crate::types::hex;

/// How long the driving end of a file-drop link waits after finding no usable file.
const FILE_DROP_IDLE: Duration = Duration::from_millis(500);
/// How long the driving end waits for a key file's twin before it skips the file (until the
/// next start) and says so in the log and in `status`.
const TWIN_PATIENCE: Duration = Duration::from_secs(60);

/// The file-drop state of the driving end.
#[derive(Default)]
pub(super) struct FileDropState {
    /// Files left aside until the next start: a differing, missing or disowned twin, or
    /// shorter than one block. Never destroyed on the other end's word.
    skipped: HashSet<String>,
    /// The file whose twin is missing, as read and hashed once, and since when it waits.
    waiting: Option<(KeyFile, Instant)>,
}

/// What the driving end learnt about its first key file.
enum Offered {
    /// Both ends hold it and it was never used: it becomes blocks.
    Use(KeyFile),
    /// Its contents gave blocks before (a crash left it): destroyed at both ends.
    Destroyed,
    /// Shorter than one block: never offered.
    TooShort(KeyFile),
    /// The other end answered this: the file waits or is skipped.
    Refused(KeyFile, Option<FileMatch>),
}

/// file-drop, driving end.
impl Link {
    pub(super) fn file_drop_tick(&mut self, ctx: &mut Context<Self>, now: Instant) {
        let high = self.params.high_water_bytes();
        if self.own_level.min(self.peer_level) >= high || now < self.next_offer_at {
            return;
        }
        self.busy = true;
        let dir = self.params.key_drop_dir.clone();
        let skipped = self.file_drop.skipped.clone();
        // A file waiting for its twin is offered again as read before, not read and hashed
        // anew every time (it may be large), as long as it is still there unchanged in size.
        let waiting = self.file_drop.waiting.take();
        let since = waiting.as_ref().map(|(_, since)| *since);
        let block_bytes = self.params.block_bytes;
        let peer = self.peer.clone();
        let store = self.store.clone();
        let link_peer = self.params.peer.clone();
        let work = async move {
            let found = actix_rt::task::spawn_blocking(move || match waiting {
                Some((file, _))
                    if std::fs::metadata(&file.path)
                        .is_ok_and(|m| m.len() == file.bytes.len() as u64) =>
                {
                    Ok(Some(file))
                }
                _ => key_drop::next_file(&dir, &skipped),
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
            Ok(Some(match reply.file {
                Some(FileMatch::Matched) => Offered::Use(file),
                answer => Offered::Refused(file, answer),
            }))
        };
        ctx.spawn(fut::wrap_future(work).map(
            move |result: Result<Option<Offered>>, act: &mut Self, ctx| {
                act.busy = false;
                act.next_offer_at = Instant::now() + FILE_DROP_IDLE;
                match result {
                    Ok(Some(Offered::Use(file))) => act.use_file(ctx, file),
                    // Go on with the next file at once.
                    Ok(Some(Offered::Destroyed)) => act.next_offer_at = Instant::now(),
                    Ok(Some(Offered::TooShort(file))) => {
                        log::warn!(
                            "link to {}: key file {} is shorter than one block ({} bytes): left aside",
                            act.params.peer,
                            file.name,
                            act.params.block_bytes
                        );
                        act.file_drop.skipped.insert(file.name);
                        act.next_offer_at = Instant::now();
                    }
                    Ok(Some(Offered::Refused(file, answer))) => {
                        act.file_refused(file, answer, since)
                    }
                    Ok(None) => act.set_health(&Ok(())),
                    Err(err) => act.set_health(&Err(err)),
                }
            },
        ));
    }

    /// Both ends hold the same file: its key becomes blocks, committed by number.
    fn use_file(&mut self, ctx: &mut Context<Self>, file: KeyFile) {
        self.set_health(&Ok(()));
        let frame = Some(file.frame_id());
        let offered = OfferedFile::new(&file);
        let blocks = self.cut(file.bytes);
        log::info!(
            "link to {}: key file {} gives {} blocks",
            self.params.peer,
            file.name,
            blocks.len()
        );
        let delivery = Delivery::Commit {
            frame,
            file: Some(offered),
        };
        self.ship(ctx, blocks, false, delivery);
    }

    /// The other end cannot use its twin: wait for a missing one (a while, since `since` if it
    /// was waiting already), leave the file aside otherwise. Never destroyed or renamed on the
    /// other end's word.
    fn file_refused(&mut self, file: KeyFile, answer: Option<FileMatch>, since: Option<Instant>) {
        let peer = self.params.peer.clone();
        let err = match answer {
            Some(FileMatch::Missing) | None => {
                let since = since.unwrap_or_else(Instant::now);
                if since.elapsed() < TWIN_PATIENCE {
                    self.set_health(&Err(Error::Unavailable(format!(
                        "{peer} has no key file {} yet",
                        file.name
                    ))));
                    self.file_drop.waiting = Some((file, since));
                    return;
                }
                format!("{peer} never got key file {}", file.name)
            }
            Some(FileMatch::Mismatch) => format!("key file {} differs at {peer}", file.name),
            Some(FileMatch::Used | FileMatch::Matched) => {
                format!(
                    "{peer} says key file {} was used; this KME has no record of it",
                    file.name
                )
            }
        };
        log::error!("link to {peer}: {err}; the file is left aside until the next start");
        self.file_drop.skipped.insert(file.name);
        self.set_health(&Err(Error::Unavailable(err)));
    }
}

/// Whether key file contents gave blocks for good on the link to `peer`.
async fn key_file_used(store: &Addr<Store>, peer: &KmeId, sha256: &[u8; 32]) -> Result<bool> {
    let op = Op::KeyFileUsed {
        peer: peer.clone(),
        sha256: *sha256,
    };
    Ok(matches!(store.send(op.into()).await??, Output::Flag(true)))
}

/// file-drop, the other end.
impl Link {
    /// Holds the key file `name` for the commit if it has the offered length and hash.
    pub(super) fn file_offer(&mut self, name: String, bytes: u64, sha256: String) -> Reply {
        if !key_drop::valid_name(&name) {
            return refuse(format!("\"{name}\" is not a key file name"));
        }
        self.held = None;
        let dir = self.params.key_drop_dir.clone();
        let store = self.store.clone();
        let peer = self.params.peer.clone();
        let work = async move {
            let read = actix_rt::task::spawn_blocking(move || key_drop::read_named(&dir, &name))
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
        Box::pin(fut::wrap_future(work).map(
            |result: Result<(FileMatch, Option<KeyFile>)>, act: &mut Self, _| {
                let (answer, file) = result?;
                if answer == FileMatch::Mismatch {
                    log::error!(
                        "link to {}: an offered key file differs from ours",
                        act.params.peer
                    );
                }
                act.held = file.map(|file| HeldKey {
                    frame_id: file.frame_id(),
                    file: Some(OfferedFile::new(&file)),
                    key: file.bytes,
                });
                Ok(PeerReply {
                    ok: true,
                    file: Some(answer),
                    ..PeerReply::default()
                })
            },
        ))
    }

    /// At start: destroy key files that gave blocks before a crash could remove them.
    pub(super) fn sweep_used_key_files(&mut self, ctx: &mut Context<Self>) {
        let dir = self.params.key_drop_dir.clone();
        let store = self.store.clone();
        let peer = self.params.peer.clone();
        let work = async move {
            let listed =
                actix_rt::task::spawn_blocking(move || key_drop::names(&dir).map(|n| (dir, n)));
            let Ok(Ok((dir, names))) = listed.await else {
                return;
            };
            for name in names {
                let dir = dir.clone();
                let read =
                    actix_rt::task::spawn_blocking(move || key_drop::read_named(&dir, &name));
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
        };
        ctx.spawn(fut::wrap_future(work));
    }
}

/// Best effort: a used key file that cannot be destroyed now is logged; it is recorded as used,
/// so it is destroyed, never used, when it turns up again (at start or at an offer).
pub(super) async fn destroy_key_file(peer: &KmeId, path: PathBuf) {
    let shown = path.display().to_string();
    let destroyed = actix_rt::task::spawn_blocking(move || key_drop::destroy(&path)).await;
    if !matches!(destroyed, Ok(Ok(()))) {
        log::error!("link to {peer}: cannot destroy used key file {shown}");
    }
}
