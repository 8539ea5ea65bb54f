//! Starting the domain of one KME: what each link end resumes from, read from the database
//! before any actor starts, and the actors of one link end, wired together.
//!
//! The edge (`src/node.rs`) opens the storage, makes the TLS clients and the listeners, and
//! per neighbour calls [`resume`] (before any actor runs, so a failed start leaves nothing
//! running) and then [`start_link`]. Which source drives a link, and from which block and
//! position each stream goes on, is decided here.

use actix::prelude::*;
use rusqlite::Connection;

use crate::error::{Error, Result};
use crate::key_pool::{KeyPool, WatchLevel};
use crate::link::auth::AuthStream;
use crate::link::sources::bb84::Bb84;
use crate::link::sources::bb84_engine::Bb84Engine;
use crate::link::sources::courier::Courier;
use crate::link::sources::file_drop::FileDrop;
use crate::link::{LinkAddr, LinkSetup, LinkState};
use crate::peer::peer_link::PeerLink;
use crate::sae_registry::NeighbourRoute;
use crate::storage::db::{self, StoredBlock};
use crate::storage::ops::BlockRecord;
use crate::storage::sealing::Sealer;
use crate::storage::store::Store;
use crate::types::{LinkParams, Owner, SourceKind};

/// What one link end resumes from.
pub struct LinkResume {
    params: LinkParams,
    /// This end's allocation cursor in its own stream.
    position: u64,
    /// This end's confirmed blocks from `position` on: its pool.
    own_blocks: Vec<StoredBlock>,
    state: LinkState,
    /// The link's authentication stream (BB84 links use it).
    auth: AuthStream,
}

/// Reads what the link end `params` resumes from.
pub fn resume(conn: &Connection, sealer: &Sealer, params: LinkParams) -> Result<LinkResume> {
    let (me, peer) = (&params.me, &params.peer);
    let owners = [
        Owner::Kme(me.clone()),
        Owner::Kme(peer.clone()),
        Owner::Auth,
    ];
    let [mine, theirs, auth_owner] = &owners;
    let own = db::stream_state(conn, peer, mine)?;
    let theirs = db::stream_state(conn, peer, theirs)?;
    let auth = db::stream_state(conn, peer, auth_owner)?;
    let block = params.block_bytes as u64;
    let own_blocks = db::blocks(conn, sealer, peer, mine, own.position / block, true)?;
    let auth_blocks = db::blocks(conn, sealer, peer, auth_owner, auth.position / block, true)?;
    let mut unshipped = Vec::new();
    for owner in &owners {
        for b in db::blocks(conn, sealer, peer, owner, 0, false)? {
            unshipped.push(BlockRecord {
                owner: owner.clone(),
                seq: b.seq,
                data: b.data,
            });
        }
    }
    log::info!(
        "link {me} — {peer}: resuming at position {} with {} own blocks, {} to ship",
        own.position,
        own_blocks.len(),
        unshipped.len()
    );
    Ok(LinkResume {
        position: own.position,
        own_blocks,
        state: LinkState {
            next_own_seq: own.next_seq,
            next_peer_seq: theirs.next_seq,
            next_auth_seq: auth.next_seq,
            unshipped,
        },
        auth: AuthStream::new(params.block_bytes, auth.position, auth_blocks),
        params,
    })
}

/// The running actors of one link end: the registry's way to the neighbour, and the link
/// end the KME-to-KME channel hands the neighbour's messages to.
pub struct StartedLink {
    pub route: NeighbourRoute,
    pub link: LinkAddr,
}

/// Starts the pool and the link end of `resume`, with its key source, talking to the
/// neighbour through `peer`. Runs inside the actix system.
pub fn start_link(
    resume: LinkResume,
    store: Addr<Store>,
    peer: Addr<PeerLink>,
) -> Result<StartedLink> {
    let params = resume.params;
    let pool = KeyPool::new(
        params.clone(),
        resume.position,
        resume.own_blocks,
        store.clone(),
        peer.clone(),
    )
    .start();
    let setup = LinkSetup {
        params: params.clone(),
        state: resume.state,
        pool: pool.clone(),
        peer,
        store,
    };
    let link = match &params.source {
        SourceKind::Bb84(settings) => {
            let settings = (**settings).clone();
            let mut seed = [0u8; 32];
            openssl::rand::rand_bytes(&mut seed)
                .map_err(|err| Error::Unavailable(format!("CSPRNG: {err}")))?;
            let engine_settings = settings.clone();
            let engine =
                SyncArbiter::start(1, move || Bb84Engine::new(engine_settings.clone(), seed));
            setup.start(Bb84::new(
                settings,
                engine,
                resume.auth,
                params.auth_key_dir.clone(),
            ))
        }
        SourceKind::FileDrop => setup.start(FileDrop::new(params.key_drop_dir.clone())),
        SourceKind::Courier => {
            log::warn!(
                "link to {}: source \"courier\" ships CSPRNG bytes over TLS: it is NOT QKD (tests and benchmarks only)",
                params.peer
            );
            setup.start(Courier::new(params.block_bytes))
        }
    };
    pool.do_send(WatchLevel(link.pool_level.clone()));
    Ok(StartedLink {
        route: NeighbourRoute {
            peer: params.peer.clone(),
            pool,
            link: link.clone(),
            limits: params.limits,
            block_bytes: params.block_bytes,
        },
        link,
    })
}
