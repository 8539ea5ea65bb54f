-- Keys waiting at this KME per (master, slave) pair: what the pair's cap on waiting keys
-- (`max_waiting_keys`) is checked against. Kept by triggers in the transactions that bind,
-- retrieve and expire keys, so it is exact and rolls back with them.
CREATE TABLE waiting_keys (
    master TEXT    NOT NULL,
    slave  TEXT    NOT NULL,
    keys   INTEGER NOT NULL,
    PRIMARY KEY (master, slave)
) WITHOUT ROWID;

INSERT INTO waiting_keys(master, slave, keys)
SELECT keys.master, pending.value, count(*) FROM keys, json_each(keys.pending) AS pending
GROUP BY keys.master, pending.value;

CREATE TRIGGER waiting_keys_bound AFTER INSERT ON keys
BEGIN
    INSERT INTO waiting_keys(master, slave, keys)
    SELECT NEW.master, value, 1 FROM json_each(NEW.pending) WHERE true
    ON CONFLICT (master, slave) DO UPDATE SET keys = keys + 1;
END;

CREATE TRIGGER waiting_keys_retrieved AFTER UPDATE OF pending ON keys
BEGIN
    UPDATE waiting_keys SET keys = keys - 1
    WHERE master = OLD.master
      AND slave IN (SELECT value FROM json_each(OLD.pending))
      AND slave NOT IN (SELECT value FROM json_each(NEW.pending));
END;

CREATE TRIGGER waiting_keys_gone AFTER DELETE ON keys
BEGIN
    UPDATE waiting_keys SET keys = keys - 1
    WHERE master = OLD.master AND slave IN (SELECT value FROM json_each(OLD.pending));
END;
