//! Encryption at rest of key material: AES-256-GCM under data keys derived with HKDF-SHA256
//! from a master key that lives outside the database (a file of the KME, mode 600).
//!
//! A sealed value is `key id (8) || nonce (12) || ciphertext || tag (16)`, with the row's
//! identity as associated data, so a value copied into another row fails to open. Each data
//! key is derived from a random 64-bit key id, drawn afresh at every start and every
//! `SEALS_PER_KEY` seals. Nonces are deterministic under a key (NIST SP 800-38D, 8.2.1): the
//! seal counter of this run, which never repeats while the key is in use; and since key ids
//! are random, not counted, a database restored from a backup, a copied data directory or a
//! second database under the same master key never brings a (key, nonce) pair back (short of a
//! 64-bit collision). No random nonce to draw per seal (OpenSSL's RNG checks the PID on every
//! call). Opening derives the key of the value's key id.
//! A stolen database file alone reveals no key material.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;
use openssl::md::Md;
use openssl::pkey::Id;
use openssl::pkey_ctx::PkeyCtx;

use crate::error::{Error, Result};

const EPOCH: usize = 8;
const NONCE: usize = 12;
const TAG: usize = 16;
/// Seals under one data key (bounds what one key protects; the nonces would allow 2^64).
const SEALS_PER_KEY: u64 = 1 << 30;

/// What a sealed value is: each purpose has its own data keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// `link_blocks.data`
    LinkBlock,
    /// `keys.material`
    Key,
    /// `sealed_secrets.value`
    Secret,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::LinkBlock => b"kme at rest v1: link blocks",
            Purpose::Key => b"kme at rest v1: keys",
            Purpose::Secret => b"kme at rest v1: secrets",
        }
    }
}

/// Seals and opens values with the data keys of this KME. Its keys are overwritten when it
/// is dropped; it has no `Debug`.
pub struct Sealer {
    master: [u8; 32],
    /// The audit chain's key as stored in the database after a rotation (`master_key.rs`);
    /// None: derived from `master`.
    audit_key: Option<[u8; 32]>,
    seals: AtomicU64,
    /// Seals under one data key before the next key id is drawn (`SEALS_PER_KEY`).
    seals_per_key: u64,
    /// Random key id of each generation (`seals / SEALS_PER_KEY`) of this run.
    key_ids: Mutex<HashMap<u64, u64>>,
    /// Fetched once: OpenSSL 3 looks an algorithm up by name on every implicit use, which
    /// costs more than sealing a 32-byte key.
    cipher: Cipher,
    /// Derived data keys by (purpose, key id); a handful per run.
    keys: Mutex<HashMap<(Purpose, u64), [u8; 32]>>,
    /// The last keyed contexts for sealing and for opening, kept between calls: keying one
    /// (AES key schedule, OpenSSL's parameter lookups) costs more than sealing a 32-byte key.
    sealing: Mutex<Option<KeyedCtx>>,
    opening: Mutex<Option<KeyedCtx>>,
}

/// A cipher context keyed with the data key of (purpose, key epoch).
struct KeyedCtx {
    purpose: Purpose,
    epoch: u64,
    ctx: CipherCtx,
}

impl Drop for Sealer {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.master.zeroize();
        self.audit_key.zeroize();
        if let Ok(mut keys) = self.keys.lock() {
            keys.values_mut().for_each(Zeroize::zeroize);
        }
    }
}

impl Sealer {
    /// Loads the master key from `path`. Creates it (32 random bytes, mode 600, written
    /// atomically) only if `create` is set, i.e. for a database that holds no sealed value yet:
    /// a missing key for an existing database is an error, never silently replaced.
    pub fn from_key_file(path: &Path, create: bool) -> Result<Self> {
        let fail = |what: &str, err: &dyn std::fmt::Display| {
            Error::Storage(format!("master key {}: {what}: {err}", path.display()))
        };
        if !path.exists() {
            if !create {
                return Err(fail(
                    "missing",
                    &"the database holds material sealed under it",
                ));
            }
            create_key_file(path).map_err(|err| fail("create", &err))?;
            log::info!("created master key {}", path.display());
        }
        match Self::check_mode(path) {
            Ok(None) => {}
            Ok(Some(mode)) => {
                return Err(fail(
                    &format!("mode {mode:o}"),
                    &"group or others may read it: chmod 600 it",
                ))
            }
            Err(err) => return Err(fail("stat", &err)),
        }
        let master =
            zeroize::Zeroizing::new(std::fs::read(path).map_err(|err| fail("read", &err))?);
        Self::from_master(&master).map_err(|err| fail("load", &err))
    }

    /// Refuses a master key file that group or others may read or write.
    fn check_mode(path: &Path) -> std::io::Result<Option<u32>> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        Ok((mode & 0o077 != 0).then_some(mode))
    }

    /// A sealer over a 32-byte master key.
    pub fn from_master(master: &[u8]) -> Result<Self> {
        let master: [u8; 32] = master
            .try_into()
            .map_err(|_| Error::Storage(format!("{} bytes, expected 32", master.len())))?;
        Ok(Self {
            master,
            audit_key: None,
            seals: AtomicU64::new(0),
            seals_per_key: SEALS_PER_KEY,
            key_ids: Mutex::new(HashMap::new()),
            cipher: Cipher::fetch(None, "AES-256-GCM", None).map_err(crypto)?,
            keys: Mutex::new(HashMap::new()),
            sealing: Mutex::new(None),
            opening: Mutex::new(None),
        })
    }

    /// The key of the audit chain's MACs (used for nothing else): derived from the first
    /// master key of the database, and kept sealed in it across rotations.
    pub fn audit_key(&self) -> Result<zeroize::Zeroizing<[u8; 32]>> {
        match self.audit_key {
            Some(key) => Ok(zeroize::Zeroizing::new(key)),
            None => Ok(zeroize::Zeroizing::new(hkdf(
                &self.master,
                b"kme audit chain",
                &[],
            )?)),
        }
    }

    /// Uses `key` as the audit chain's key (the one stored in the database).
    pub fn set_audit_key(&mut self, key: [u8; 32]) {
        self.audit_key = Some(key);
    }

    /// A value that identifies the master key without revealing it (stored in the database,
    /// so that a KME started with another key refuses to run).
    pub fn check_value(&self) -> Result<i64> {
        let check = hkdf(&self.master, b"kme master key check", &[])?;
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(check.get(..8).unwrap_or(&[0; 8]));
        Ok(i64::from_be_bytes(bytes))
    }

    fn key(&self, purpose: Purpose, epoch: u64) -> Result<[u8; 32]> {
        let mut keys = self
            .keys
            .lock()
            .map_err(|_| Error::Storage("data key cache poisoned".into()))?;
        if let Some(key) = keys.get(&(purpose, epoch)) {
            return Ok(*key);
        }
        let key = hkdf(&self.master, purpose.label(), &epoch.to_be_bytes())?;
        keys.insert((purpose, epoch), key);
        Ok(key)
    }

    /// The random key id of generation `generation` of this run (drawn on first use).
    fn key_id(&self, generation: u64) -> Result<u64> {
        let mut ids = self
            .key_ids
            .lock()
            .map_err(|_| Error::Storage("key id table poisoned".into()))?;
        if let Some(id) = ids.get(&generation) {
            return Ok(*id);
        }
        let mut id = [0u8; 8];
        openssl::rand::rand_bytes(&mut id).map_err(crypto)?;
        let id = u64::from_be_bytes(id);
        ids.insert(generation, id);
        Ok(id)
    }

    pub fn seal(&self, purpose: Purpose, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let count = self.seals.fetch_add(1, Ordering::Relaxed);
        let epoch = self.key_id(count / self.seals_per_key)?;
        let mut sealed = Vec::with_capacity(EPOCH + NONCE + plaintext.len() + TAG);
        sealed.extend_from_slice(&epoch.to_be_bytes());
        // Unique under this key: `count` is unique in this run, and the key id is of this run.
        let mut nonce = [0u8; NONCE];
        nonce[NONCE - 8..].copy_from_slice(&count.to_be_bytes());
        sealed.extend_from_slice(&nonce);
        self.with_ctx(&self.sealing, purpose, epoch, true, |ctx| {
            ctx.encrypt_init(None, None, Some(&nonce))?;
            ctx.cipher_update(aad, None)?;
            ctx.cipher_update_vec(plaintext, &mut sealed)?;
            ctx.cipher_final_vec(&mut sealed)?;
            let mut tag = [0u8; TAG];
            ctx.tag(&mut tag)?;
            sealed.extend_from_slice(&tag);
            Ok(())
        })?
        .map_err(crypto)?;
        Ok(sealed)
    }

    /// Runs `f` on the context of `slot`, keyed anew only when (purpose, epoch) changed.
    fn with_ctx(
        &self,
        slot: &Mutex<Option<KeyedCtx>>,
        purpose: Purpose,
        epoch: u64,
        encrypt: bool,
        f: impl FnOnce(&mut CipherCtx) -> std::result::Result<(), openssl::error::ErrorStack>,
    ) -> Result<std::result::Result<(), openssl::error::ErrorStack>> {
        let mut slot = slot
            .lock()
            .map_err(|_| Error::Storage("cipher context poisoned".into()))?;
        let keyed = match slot.take() {
            Some(keyed) if keyed.purpose == purpose && keyed.epoch == epoch => keyed,
            _ => {
                let key = self.key(purpose, epoch)?;
                let mut ctx = CipherCtx::new().map_err(crypto)?;
                if encrypt {
                    ctx.encrypt_init(Some(&self.cipher), Some(&key), None)
                } else {
                    ctx.decrypt_init(Some(&self.cipher), Some(&key), None)
                }
                .map_err(crypto)?;
                KeyedCtx {
                    purpose,
                    epoch,
                    ctx,
                }
            }
        };
        let mut keyed = keyed;
        let outcome = f(&mut keyed.ctx);
        *slot = Some(keyed);
        Ok(outcome)
    }

    pub fn open(&self, purpose: Purpose, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        if sealed.len() < EPOCH + NONCE + TAG {
            return Err(Error::Storage("sealed value too short".into()));
        }
        let (epoch, rest) = sealed.split_at(EPOCH);
        let (nonce, rest) = rest.split_at(NONCE);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG);
        let mut epoch_bytes = [0u8; EPOCH];
        epoch_bytes.copy_from_slice(epoch);
        let epoch = u64::from_be_bytes(epoch_bytes);
        let mut plaintext = Vec::with_capacity(ciphertext.len());
        let opened = self.with_ctx(&self.opening, purpose, epoch, false, |ctx| {
            ctx.decrypt_init(None, None, Some(nonce))?;
            ctx.set_tag(tag)?;
            ctx.cipher_update(aad, None)?;
            ctx.cipher_update_vec(ciphertext, &mut plaintext)?;
            ctx.cipher_final_vec(&mut plaintext).map(|_| ())
        })?;
        match opened {
            Ok(_) => Ok(plaintext),
            Err(_) => Err(Error::Storage(
                "key material failed authentication (wrong master key or tampering)".into(),
            )),
        }
    }
}

fn crypto(err: openssl::error::ErrorStack) -> Error {
    Error::Storage(format!("encryption at rest: {err}"))
}

fn hkdf(master: &[u8], label: &[u8], context: &[u8]) -> Result<[u8; 32]> {
    let mut ctx = PkeyCtx::new_id(Id::HKDF).map_err(crypto)?;
    ctx.derive_init().map_err(crypto)?;
    ctx.set_hkdf_md(Md::sha256()).map_err(crypto)?;
    ctx.set_hkdf_key(master).map_err(crypto)?;
    ctx.set_hkdf_salt(b"kme").map_err(crypto)?;
    ctx.add_hkdf_info(label).map_err(crypto)?;
    ctx.add_hkdf_info(context).map_err(crypto)?;
    let mut out = [0u8; 32];
    ctx.derive(Some(&mut out)).map_err(crypto)?;
    Ok(out)
}

/// Writes a new random key to a temporary file, syncs it, and renames it into place, so a
/// crash never leaves an empty or partial key file behind.
pub(crate) fn create_key_file(path: &Path) -> std::io::Result<()> {
    let mut key = [0u8; 32];
    openssl::rand::rand_bytes(&mut key).map_err(std::io::Error::other)?;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = open_new_private(&tmp)?;
    file.write_all(&key)?;
    file.sync_all()?;
    replace_file(&tmp, path)
}

/// Renames `from` over `to` and syncs their directory: the rename is durable when this
/// returns.
pub(crate) fn replace_file(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    let dir = to.parent().unwrap_or_else(|| Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(unix)]
fn open_new_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn open_new_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

/// Associated data of a link block: which stream and number it belongs to.
pub fn block_aad(peer: &str, owner: &str, seq: u64) -> Vec<u8> {
    format!("block\0{peer}\0{owner}\0{seq}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A master key file that group or others could read is refused, whatever it holds.
    #[test]
    fn a_master_key_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        Sealer::from_key_file(&path, true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "created private");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Sealer::from_key_file(&path, false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("mode 644") && err.contains("chmod 600"),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Sealer::from_key_file(&path, false).unwrap();
    }

    #[test]
    fn a_new_data_key_every_seals_per_key_seals() {
        let mut sealer = Sealer::from_master(&[7u8; 32]).unwrap();
        sealer.seals_per_key = 4;
        let sealed: Vec<Vec<u8>> = (0..10u8)
            .map(|i| sealer.seal(Purpose::Key, &[i], &[i; 32]).unwrap())
            .collect();
        let key_id = |v: &Vec<u8>| v[..EPOCH].to_vec();
        let generations: Vec<Vec<u8>> = sealed.iter().map(key_id).collect();
        for (i, id) in generations.iter().enumerate() {
            assert_eq!(
                *id,
                generations[i - i % 4],
                "seal {i}: key id of its generation"
            );
        }
        assert_ne!(generations[0], generations[4]);
        assert_ne!(generations[4], generations[8]);
        assert_ne!(generations[0], generations[8]);
        for (i, value) in sealed.iter().enumerate() {
            let i = i as u8;
            assert_eq!(sealer.open(Purpose::Key, &[i], value).unwrap(), vec![i; 32]);
        }
    }

    #[test]
    fn sealed_values_open_only_with_their_key_purpose_and_row() {
        let sealer = Sealer::from_master(&[7u8; 32]).unwrap();
        let sealed = sealer.seal(Purpose::Key, b"row-1", b"secret").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            sealer.open(Purpose::Key, b"row-1", &sealed).unwrap(),
            b"secret"
        );
        assert!(sealer.open(Purpose::Key, b"row-2", &sealed).is_err());
        assert!(sealer.open(Purpose::LinkBlock, b"row-1", &sealed).is_err());
        let other = Sealer::from_master(&[8u8; 32]).unwrap();
        assert!(other.open(Purpose::Key, b"row-1", &sealed).is_err());
        let mut tampered = sealed.clone();
        tampered[20] ^= 1;
        assert!(sealer.open(Purpose::Key, b"row-1", &tampered).is_err());
        // The kept context serves on after a failure and across purposes.
        assert_eq!(
            sealer.open(Purpose::Key, b"row-1", &sealed).unwrap(),
            b"secret"
        );
        let block = sealer.seal(Purpose::LinkBlock, b"b", b"block").unwrap();
        assert_eq!(
            sealer.open(Purpose::LinkBlock, b"b", &block).unwrap(),
            b"block"
        );
        assert_eq!(
            sealer.open(Purpose::Key, b"row-1", &sealed).unwrap(),
            b"secret"
        );
        // After a restart (another boot epoch) the old values still open.
        let restarted = Sealer::from_master(&[7u8; 32]).unwrap();
        assert_eq!(
            restarted.open(Purpose::Key, b"row-1", &sealed).unwrap(),
            b"secret"
        );
        let fresh = restarted.seal(Purpose::Key, b"row-1", b"secret").unwrap();
        assert_ne!(
            fresh[..EPOCH],
            sealed[..EPOCH],
            "a new start seals under a new data key"
        );
        // Within a run, every seal has its own nonce: the same input never seals alike.
        let again = restarted.seal(Purpose::Key, b"row-1", b"secret").unwrap();
        assert_eq!(again[..EPOCH], fresh[..EPOCH]);
        assert_ne!(again[EPOCH..EPOCH + NONCE], fresh[EPOCH..EPOCH + NONCE]);
        assert_ne!(again, fresh);
    }

    #[test]
    fn the_master_key_file_is_created_private_only_when_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        assert!(
            Sealer::from_key_file(&path, false).is_err(),
            "never created silently"
        );
        let first = Sealer::from_key_file(&path, true).unwrap();
        let sealed = first.seal(Purpose::LinkBlock, b"", b"x").unwrap();
        let again = Sealer::from_key_file(&path, false).unwrap();
        assert_eq!(again.open(Purpose::LinkBlock, b"", &sealed).unwrap(), b"x");
        assert_eq!(first.check_value().unwrap(), again.check_value().unwrap());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
