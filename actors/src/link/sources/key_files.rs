//! Key files of a `file-drop` link (not an actor; the link's `file-drop` key source calls it
//! off the actors' thread).
//!
//! A real QKD device writes each key it distils as a file into one directory per link and end
//! (`<key_drop_dir>/<peer KME>/`), under the same name at both ends. A device must write a file
//! completely before it appears under its final name (write `.name` or `name.tmp`, then
//! rename): names starting with `.` or ending in `.tmp` are not read. The driving end offers
//! the first file by name, length and SHA-256; the other end uses its file of that name only if
//! both match. Each end records a file's contents as used in the transaction that stores its
//! blocks (table `key_files`), so the same bytes never give blocks twice, under any name; a
//! used file is overwritten and deleted (again at start and at any later offer, should a crash
//! have left it). A file whose twin differs, is missing for long, or is disowned, is left aside
//! until the next start, never destroyed on the other end's word; only an oversized file is
//! renamed `<name>.rejected`.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use openssl::sha::sha256;
use zeroize::Zeroizing;

/// Largest key file read (a larger one is rejected).
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// A key file read into memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFile {
    pub path: PathBuf,
    pub name: String,
    pub bytes: Zeroizing<Vec<u8>>,
    pub sha256: [u8; 32],
}

impl KeyFile {
    /// The frame number of this file's key (from its hash; both ends compute the same).
    pub fn frame_id(&self) -> u64 {
        let mut id = [0u8; 8];
        id.copy_from_slice(&self.sha256[..8]);
        u64::from_le_bytes(id)
    }
}

/// A name a device may use: 1-128 of A-Z a-z 0-9 . _ -, not hidden, not temporary or rejected.
pub fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.starts_with('.')
        && !name.ends_with(".tmp")
        && !name.ends_with(".rejected")
}

/// The names of the key files in `dir`, in order (a missing directory holds none).
pub fn names(dir: &Path) -> io::Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        if let Some(name) = entry.file_name().to_str().filter(|n| valid_name(n)) {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// The first key file of `dir` in name order that is not in `skip`, if any (a missing
/// directory holds none). A file above `MAX_FILE_BYTES` is set aside as rejected on the way.
pub fn next_file(dir: &Path, skip: &HashSet<String>) -> io::Result<Option<KeyFile>> {
    for name in names(dir)?.into_iter().filter(|n| !skip.contains(n)) {
        match read_named(dir, &name) {
            Err(err) if err.kind() == io::ErrorKind::FileTooLarge => {
                log::error!("{err}: set aside as .rejected");
                reject(&dir.join(&name))?;
            }
            other => return other,
        }
    }
    Ok(None)
}

/// The key file `name` of `dir`, if it exists.
pub fn read_named(dir: &Path, name: &str) -> io::Result<Option<KeyFile>> {
    if !valid_name(name) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("\"{name}\" is not a key file name"),
        ));
    }
    let path = dir.join(name);
    let meta = match fs::metadata(&path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("{} is larger than {MAX_FILE_BYTES} bytes", path.display()),
        ));
    }
    let bytes = Zeroizing::new(fs::read(&path)?);
    Ok(Some(KeyFile {
        sha256: sha256(&bytes),
        name: name.to_string(),
        path,
        bytes,
    }))
}

/// Takes a used key file out of sight (renamed to a hidden name, which is never read), then
/// overwrites it with zeros, syncs it and deletes it. A file that is gone already counts as
/// destroyed. Renamed first: a file being zeroed under its own name could be read as a key
/// of zeros, whose hash no one has used.
pub fn destroy(path: &Path) -> io::Result<()> {
    let Some(name) = path.file_name() else {
        return Err(io::Error::other("a key file path without a name"));
    };
    let mut hidden = std::ffi::OsString::from(".destroying-");
    hidden.push(name);
    let hidden = path.with_file_name(hidden);
    match fs::rename(path, &hidden) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    }
    let path = hidden.as_path();
    let mut file = fs::OpenOptions::new().write(true).open(path)?;
    let zeros = [0u8; 64 * 1024];
    let mut left = file.metadata()?.len();
    while left > 0 {
        let n = left.min(zeros.len() as u64);
        file.write_all(&zeros[..n as usize])?;
        left -= n;
    }
    file.sync_all()?;
    fs::remove_file(path)
}

/// Sets a file aside as `<name>.rejected` (its twin at the other end differs).
pub fn reject(path: &Path) -> io::Result<()> {
    let mut rejected = path.as_os_str().to_owned();
    rejected.push(".rejected");
    fs::rename(path, rejected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destroyed_file_is_out_of_sight_before_it_is_zeroed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0001");
        fs::write(&path, [7u8; 100]).unwrap();
        destroy(&path).unwrap();
        assert!(!path.exists());
        assert!(names(dir.path()).unwrap().is_empty());
        // One cut before its deletion stays hidden, never read as a key.
        fs::write(dir.path().join(".destroying-0002"), [0u8; 100]).unwrap();
        assert!(next_file(dir.path(), &HashSet::new()).unwrap().is_none());
        assert!(destroy(&dir.path().join("0003")).is_ok(), "gone already");
    }

    #[test]
    fn files_are_taken_in_name_order_and_half_written_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            next_file(&dir.path().join("absent"), &HashSet::new()).unwrap(),
            None
        );
        fs::write(dir.path().join(".0000.partial"), b"x").unwrap();
        fs::write(dir.path().join("0001.tmp"), b"x").unwrap();
        fs::write(dir.path().join("0003"), b"third").unwrap();
        fs::write(dir.path().join("0002"), b"second").unwrap();
        let first = next_file(dir.path(), &HashSet::new()).unwrap().unwrap();
        assert_eq!(first.name, "0002");
        assert_eq!(first.bytes.as_slice(), b"second");
        assert_eq!(first.sha256, sha256(b"second"));
        reject(&first.path).unwrap();
        assert_eq!(
            next_file(dir.path(), &HashSet::new())
                .unwrap()
                .unwrap()
                .name,
            "0003"
        );
        destroy(&dir.path().join("0003")).unwrap();
        assert_eq!(next_file(dir.path(), &HashSet::new()).unwrap(), None);
        destroy(&dir.path().join("0003")).unwrap();
        assert!(read_named(dir.path(), "../etc").is_err());
        assert_eq!(read_named(dir.path(), "0004").unwrap(), None);
    }
}

/// Property test of key-drop file names (`make fuzz` runs it long): any name is judged, never
/// a panic, and no accepted name leaves its directory.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_file_name(name in "(?s).{0,64}") {
            if valid_name(&name) {
                prop_assert!(!name.contains('/') && name != "." && name != "..");
            }
        }
    }
}
