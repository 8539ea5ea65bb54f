-- Keys expire by the local time they were bound here (`created_ms`), not by the time inside
-- their UUIDv7 key_ID, which the master's KME wrote by its own clock.
CREATE INDEX keys_created ON keys(created_ms);
