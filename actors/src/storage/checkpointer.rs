//! DbCheckpointer: moves the WAL into the database file off the writer's path.
//!
//! Owns: a connection of its own. Handles: `Checkpoint`, sent by `Store` on a timer. SQLite
//! would otherwise checkpoint inside whichever commit crosses `wal_autocheckpoint`, stalling
//! every request queued behind that commit for the time of copying and fsyncing the pages. A
//! PASSIVE checkpoint never blocks the writer; the writer's own auto-checkpoint stays as a
//! high safety limit (see `db::configure`).
//! Mailbox: SyncArbiter of one; `Store` sends at most one `Checkpoint` per interval.

use actix::prelude::*;

use crate::storage::db::DbPool;

pub struct DbCheckpointer {
    pool: DbPool,
}

impl DbCheckpointer {
    pub fn new(pool: DbPool) -> Self {
        Self { pool }
    }
}

impl Actor for DbCheckpointer {
    type Context = SyncContext<Self>;
}

/// Copy what the WAL holds into the database file, without waiting for anyone.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Checkpoint;

impl Handler<Checkpoint> for DbCheckpointer {
    type Result = ();

    fn handle(&mut self, _msg: Checkpoint, _ctx: &mut SyncContext<Self>) {
        let result = self
            .pool
            .get()
            .map_err(|err| err.to_string())
            .and_then(|conn| {
                conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    .map_err(|err| err.to_string())
            });
        if let Err(err) = result {
            log::warn!("WAL checkpoint failed (the writer's own checkpoints take over): {err}");
        }
    }
}
