-- 0002_key_files: key files of file-drop links that have given blocks, so that none is ever
-- used twice, whatever crashes in between (see actors/src/key_drop.rs).
-- Written in the transaction that stores the file's blocks; `pending` = 1 while those blocks
-- are unconfirmed at the driving end (deleted with them if the other end lost the file).
CREATE TABLE key_files (
    peer    TEXT    NOT NULL,
    name    TEXT    NOT NULL,
    sha256  BLOB    NOT NULL,
    pending INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (peer, name)
) WITHOUT ROWID;
