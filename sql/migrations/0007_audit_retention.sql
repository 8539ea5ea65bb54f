-- Retention of the audit trail: a segment exported by `kme audit export` may be pruned by
-- `kme audit prune`. `upto` is the last pruned record and `hash` its hash, from which the
-- chain goes on; `mac` (HMAC under the audit key) keeps anyone without the master key from
-- moving that anchor, so a cut of the trail's oldest records without the export shows.
CREATE TABLE audit_pruned (
    upto  INTEGER NOT NULL,
    hash  BLOB    NOT NULL,
    at_ms INTEGER NOT NULL,
    mac   BLOB    NOT NULL
);

-- Records stay append-only, except those up to the anchor (set in the same transaction).
DROP TRIGGER audit_no_delete;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
WHEN OLD.id > coalesce((SELECT max(upto) FROM audit_pruned), 0)
BEGIN SELECT RAISE(ABORT, 'audit is append-only (only exported segments are pruned)'); END;
