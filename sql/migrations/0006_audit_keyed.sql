-- The audit chain is keyed from here on: each record's hash is an HMAC-SHA256 under a key
-- derived from the master key, so that someone who can write the database cannot rewrite the
-- trail with recomputed hashes. Records before `since` (written by an older kme) keep their
-- unkeyed SHA-256 hashes; `mac` (an HMAC of `since`, set by the KME at its next start) keeps
-- anyone without the key from moving that boundary.
CREATE TABLE audit_keyed (
    since INTEGER NOT NULL,
    mac   BLOB
);
INSERT INTO audit_keyed(since, mac) SELECT coalesce(max(id), 0) + 1, NULL FROM audit;
