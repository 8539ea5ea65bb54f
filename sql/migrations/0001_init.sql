-- 0001_init: link material, key bindings, replay protection and the audit trail.
-- Applied once under PRAGMA user_version = 1 (see actors/src/db.rs).

-- Small counters that must survive restarts (e.g. the boot epoch used in peer sequence numbers).
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;

-- Post-processed link material, identical and identically numbered at both ends of a link.
-- `owner` is the end that allocates from the block (the two ends use disjoint blocks);
-- `seq` numbers the owner's blocks 0, 1, 2, ... so a position in the owner's stream is
-- seq * block_bytes + offset. `confirmed` = the other end has it durably too.
-- A rowid table (not WITHOUT ROWID): lookups walk the small (peer, owner, seq) index and touch
-- the large `data` only when it is read.
CREATE TABLE link_blocks (
    id        INTEGER PRIMARY KEY,
    peer      TEXT    NOT NULL,
    owner     TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    data      BLOB    NOT NULL,
    digest    BLOB    NOT NULL,
    confirmed INTEGER NOT NULL DEFAULT 0,
    UNIQUE (peer, owner, seq)
);

-- Per link and owner stream:
--   next_seq  = the next block number that may be produced (replays below it are rejected);
--   position  = for our own stream, everything below it was handed out or burned;
--               for the peer's stream, everything below it was bound to key_IDs (the high mark
--               that makes a position bindable at most once, even across restarts).
CREATE TABLE link_streams (
    peer     TEXT    NOT NULL,
    owner    TEXT    NOT NULL,
    next_seq INTEGER NOT NULL DEFAULT 0,
    position INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (peer, owner)
) WITHOUT ROWID;

-- Last activation batch accepted from each peer KME: sequence number and digest of the batch,
-- so that a retried batch is answered idempotently and a replayed older one is rejected.
CREATE TABLE peer_sequence (
    peer        TEXT    PRIMARY KEY,
    last_seq    INTEGER NOT NULL,
    last_digest BLOB    NOT NULL
) WITHOUT ROWID;

-- Keys bound to key_IDs, waiting at the slave's KME for dec_keys. `pending` lists the named
-- slaves that have not retrieved the key yet; the row is deleted when it is empty.
CREATE TABLE keys (
    key_id     BLOB    PRIMARY KEY,
    master     TEXT    NOT NULL,
    slaves     TEXT    NOT NULL,
    pending    TEXT    NOT NULL,
    material   BLOB    NOT NULL,
    created_ms INTEGER NOT NULL,
    CHECK (length(key_id) = 16)
) WITHOUT ROWID;

-- Append-only, hash-chained audit trail: hash = SHA-256(prev_hash || id || at_ms || event || detail).
CREATE TABLE audit (
    id        INTEGER PRIMARY KEY,
    at_ms     INTEGER NOT NULL,
    event     TEXT    NOT NULL,
    detail    TEXT    NOT NULL,
    prev_hash BLOB    NOT NULL,
    hash      BLOB    NOT NULL
);

CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
