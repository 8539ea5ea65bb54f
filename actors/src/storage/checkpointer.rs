//! DbCheckpointer: moves the WAL into the database file off the writer's path.
//!
//! Owns: a connection of its own. Handles: `Checkpoint`, sent by `Store` on a timer. SQLite
//! would otherwise checkpoint inside whichever commit crosses `wal_autocheckpoint`, stalling
//! every request queued behind that commit for the time of copying and fsyncing the pages. A
//! PASSIVE checkpoint never blocks the writer; the writer's own auto-checkpoint stays as a
//! high safety limit (see `db::configure`).
//! After each checkpoint it looks at how full the database is against `max_db_mb`, and warns
//! from `FILL_WARNING` on (at most every `WARN_EVERY`), before writes start to fail.
//! Mailbox: SyncArbiter of one; `Store` sends at most one `Checkpoint` per interval.

use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::storage::db::{self, DbPool};

/// Share of `max_db_mb` in use from which the operator is warned.
const FILL_WARNING: f64 = 0.8;
const WARN_EVERY: Duration = Duration::from_secs(600);

pub struct DbCheckpointer {
    pool: DbPool,
    warned: Option<Instant>,
}

impl DbCheckpointer {
    pub fn new(pool: DbPool) -> Self {
        Self { pool, warned: None }
    }

    fn warn_if_filling(&mut self, fill: db::Fill) {
        let due = !matches!(self.warned, Some(at) if at.elapsed() < WARN_EVERY);
        if fill.share() >= FILL_WARNING && due {
            self.warned = Some(Instant::now());
            log::warn!(
                "the database is {:.0} % full ({} of {} MiB, max_db_mb): export and prune the \
                 audit trail (`kme audit export`, `kme audit prune`) or raise max_db_mb; at the \
                 limit, requests that need new space get 503",
                fill.share() * 100.0,
                fill.used_bytes >> 20,
                fill.limit_bytes >> 20
            );
        }
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
        let conn = match self.pool.get() {
            Ok(conn) => conn,
            Err(err) => return log::warn!("WAL checkpoint: no connection: {err}"),
        };
        if let Err(err) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            log::warn!("WAL checkpoint failed (the writer's own checkpoints take over): {err}");
        }
        match db::fill(&conn) {
            Ok(fill) => self.warn_if_filling(fill),
            Err(err) => log::warn!("cannot tell how full the database is: {err}"),
        }
    }
}
