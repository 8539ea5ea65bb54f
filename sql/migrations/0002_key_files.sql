-- 0002_key_files: key files of file-drop links that have given blocks, by content, so that no
-- key file's bytes are ever used twice — under its own name or another — whatever crashes in
-- between (see actors/src/key_drop.rs).
-- Written in the transaction that stores the file's blocks; `pending` = 1 while those blocks
-- are unconfirmed at the driving end (deleted with them if the other end lost the file).
CREATE TABLE key_files (
    peer    TEXT    NOT NULL,
    sha256  BLOB    NOT NULL,
    name    TEXT    NOT NULL,
    pending INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (peer, sha256)
) WITHOUT ROWID;
