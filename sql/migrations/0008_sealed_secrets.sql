-- Secrets of the KME sealed under its master key, by name. `audit_key`: the key of the audit
-- chain's MACs once the master key it was derived from has been rotated (`kme master-key
-- rotate`), so that the chain stays verifiable under the same key.
CREATE TABLE sealed_secrets (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
