-- 0003_relay: keys that arrived by trusted-node relay or multicast across KMEs (see
-- actors/src/relay/mod.rs). They wait in `held_keys`, not retrievable, until the master's KME
-- releases the relay (then they move to `keys`) or aborts it (then they are deleted); a relay
-- never settled within its hold time is burned by the expiry sweep.
CREATE TABLE held_keys (
    key_id     BLOB    PRIMARY KEY,
    relay_id   BLOB    NOT NULL,
    master     TEXT    NOT NULL,
    slaves     TEXT    NOT NULL,
    pending    TEXT    NOT NULL,
    material   BLOB    NOT NULL,
    created_ms INTEGER NOT NULL,
    CHECK (length(key_id) = 16)
) WITHOUT ROWID;
CREATE INDEX held_keys_relay ON held_keys(relay_id);

-- The outcome of each relay that reached this KME: 'held', 'released' or 'burned'. A release
-- retried after it succeeded is answered from here; a release after a burn is refused.
-- `key_ids`: the relay's key_IDs held here (16 bytes each), so that an abort that comes after
-- the release still finds the keys it must burn.
CREATE TABLE relays (
    relay_id   BLOB    PRIMARY KEY,
    state      TEXT    NOT NULL,
    created_ms INTEGER NOT NULL,
    key_ids    BLOB    NOT NULL
) WITHOUT ROWID;
