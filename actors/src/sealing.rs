//! Encryption at rest of key material: AES-256-GCM under data keys derived with HKDF-SHA256
//! from a master key that lives outside the database (a file of the KME, mode 600).
//!
//! Every sealed value is `nonce (12) || ciphertext || tag (16)`, with a fresh random nonce and
//! the row's identity as associated data, so a value copied into another row fails to open.
//! A stolen database file alone reveals no key material.

use std::io::Write;
use std::path::Path;

use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;
use openssl::md::Md;
use openssl::pkey::Id;
use openssl::pkey_ctx::PkeyCtx;

use crate::error::{Error, Result};

const NONCE: usize = 12;
const TAG: usize = 16;

/// What a sealed value is: each purpose has its own data key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `link_blocks.data`
    LinkBlock,
    /// `keys.material`
    Key,
}

/// Seals and opens values with the data keys of this KME.
pub struct Sealer {
    /// Fetched once: OpenSSL 3 looks an algorithm up by name on every implicit use, which
    /// costs more than sealing a 32-byte key.
    cipher: Cipher,
    block_key: [u8; 32],
    key_key: [u8; 32],
}

impl Sealer {
    /// Loads the master key from `path`, creating it (32 random bytes, mode 600) if missing.
    pub fn from_key_file(path: &Path) -> Result<Self> {
        let fail = |what: &str, err: &dyn std::fmt::Display| {
            Error::Storage(format!("master key {}: {what}: {err}", path.display()))
        };
        if !path.exists() {
            let mut key = [0u8; 32];
            openssl::rand::rand_bytes(&mut key).map_err(|err| fail("generate", &err))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|err| fail("create directory", &err))?;
            }
            let mut file = open_new_private(path).map_err(|err| fail("create", &err))?;
            file.write_all(&key).map_err(|err| fail("write", &err))?;
            file.sync_all().map_err(|err| fail("sync", &err))?;
            log::info!("created master key {}", path.display());
        }
        let master = std::fs::read(path).map_err(|err| fail("read", &err))?;
        if master.len() != 32 {
            return Err(fail(
                "length",
                &format!("{} bytes, expected 32", master.len()),
            ));
        }
        Self::from_master(&master)
    }

    /// Derives the data keys from a 32-byte master key.
    pub fn from_master(master: &[u8]) -> Result<Self> {
        Ok(Self {
            cipher: Cipher::fetch(None, "AES-256-GCM", None).map_err(crypto)?,
            block_key: hkdf(master, b"kme at rest v1: link blocks")?,
            key_key: hkdf(master, b"kme at rest v1: keys")?,
        })
    }

    fn key(&self, purpose: Purpose) -> &[u8; 32] {
        match purpose {
            Purpose::LinkBlock => &self.block_key,
            Purpose::Key => &self.key_key,
        }
    }

    pub fn seal(&self, purpose: Purpose, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut sealed = Vec::with_capacity(NONCE + plaintext.len() + TAG);
        sealed.resize(NONCE, 0);
        openssl::rand::rand_bytes(&mut sealed).map_err(crypto)?;
        let mut ctx = CipherCtx::new().map_err(crypto)?;
        ctx.encrypt_init(Some(&self.cipher), Some(self.key(purpose)), Some(&sealed))
            .map_err(crypto)?;
        ctx.cipher_update(aad, None).map_err(crypto)?;
        ctx.cipher_update_vec(plaintext, &mut sealed)
            .map_err(crypto)?;
        ctx.cipher_final_vec(&mut sealed).map_err(crypto)?;
        let mut tag = [0u8; TAG];
        ctx.tag(&mut tag).map_err(crypto)?;
        sealed.extend_from_slice(&tag);
        Ok(sealed)
    }

    pub fn open(&self, purpose: Purpose, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        if sealed.len() < NONCE + TAG {
            return Err(Error::Storage("sealed value too short".into()));
        }
        let (nonce, rest) = sealed.split_at(NONCE);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG);
        let mut plaintext = Vec::with_capacity(ciphertext.len());
        let opened = (|| {
            let mut ctx = CipherCtx::new()?;
            ctx.decrypt_init(Some(&self.cipher), Some(self.key(purpose)), Some(nonce))?;
            ctx.set_tag(tag)?;
            ctx.cipher_update(aad, None)?;
            ctx.cipher_update_vec(ciphertext, &mut plaintext)?;
            ctx.cipher_final_vec(&mut plaintext)
        })();
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

fn hkdf(master: &[u8], info: &[u8]) -> Result<[u8; 32]> {
    let mut ctx = PkeyCtx::new_id(Id::HKDF).map_err(crypto)?;
    ctx.derive_init().map_err(crypto)?;
    ctx.set_hkdf_md(Md::sha256()).map_err(crypto)?;
    ctx.set_hkdf_key(master).map_err(crypto)?;
    ctx.set_hkdf_salt(b"kme").map_err(crypto)?;
    ctx.add_hkdf_info(info).map_err(crypto)?;
    let mut out = [0u8; 32];
    ctx.derive(Some(&mut out)).map_err(crypto)?;
    Ok(out)
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
        tampered[14] ^= 1;
        assert!(sealer.open(Purpose::Key, b"row-1", &tampered).is_err());
    }

    #[test]
    fn the_master_key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let first = Sealer::from_key_file(&path).unwrap();
        let sealed = first.seal(Purpose::LinkBlock, b"", b"x").unwrap();
        let again = Sealer::from_key_file(&path).unwrap();
        assert_eq!(again.open(Purpose::LinkBlock, b"", &sealed).unwrap(), b"x");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
