-- 0002: the expiry sweep finds old keys by creation time without scanning the table.
CREATE INDEX keys_by_created ON keys(created_ms);
