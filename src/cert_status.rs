//! Whether a certificate verified at a connection's handshake is still good now: not expired
//! since (a connection outlives its handshake), and not revoked by a CRL of `[tls]
//! crl_files`, which every reload (SIGHUP, `kme admin reload`) reads again.
//!
//! Every listener checks the caller per request, and closes the connection of one that fails;
//! the KME-to-KME client checks its neighbour's certificate in the handshake. Each CRL must be
//! signed by one of the network's CAs; one that is not, or cannot be read, fails the start or
//! the reload (which then changes nothing), never silently revokes nothing. A CRL past its
//! next update is still applied, with a warning: an old list of revocations is better than
//! none.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use kme_actors::types::{hex, now_ms, CertIdentity};
use openssl::asn1::Asn1Time;
use openssl::x509::{X509Crl, X509};

#[derive(Debug, thiserror::Error)]
#[error("CRL {file}: {why}")]
pub struct CrlError {
    file: String,
    why: String,
}

/// The revocations in force: serial numbers by issuer, as in [`CertIdentity`] (a lookup per
/// request allocates nothing).
type Revoked = HashMap<String, HashSet<String>>;

/// Shared by the listeners and the KME-to-KME clients of one KME.
#[derive(Debug, Default)]
pub struct CertStatus {
    revoked: RwLock<Revoked>,
}

impl CertStatus {
    /// The revocations of `crl_files`, each signed by one of `cas`.
    pub fn load(crl_files: &[PathBuf], cas: &[&Path]) -> Result<Self, CrlError> {
        Ok(Self {
            revoked: RwLock::new(read_crls(crl_files, cas)?),
        })
    }

    /// Reads the CRLs again and puts them in force; returns how many certificates they
    /// revoke. On an error the revocations in force stay.
    pub fn reload(&self, crl_files: &[PathBuf], cas: &[&Path]) -> Result<usize, CrlError> {
        let revoked = read_crls(crl_files, cas)?;
        let count = revoked.values().map(HashSet::len).sum();
        *self
            .revoked
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = revoked;
        Ok(count)
    }

    /// Why `identity` is no longer good, if it is not.
    pub fn check(&self, identity: &CertIdentity) -> Result<(), String> {
        if identity.not_after <= now_ms() / 1000 {
            return Err("the client certificate has expired".into());
        }
        let revoked = self
            .revoked
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let serials = revoked.get(&identity.issuer);
        if serials.is_some_and(|serials| serials.contains(&identity.serial)) {
            return Err("the client certificate is revoked".into());
        }
        Ok(())
    }
}

fn read_crls(files: &[PathBuf], cas: &[&Path]) -> Result<Revoked, CrlError> {
    let cas = cas
        .iter()
        .map(|ca| {
            let fail = |why: String| CrlError {
                file: ca.display().to_string(),
                why,
            };
            let pem = std::fs::read(ca).map_err(|err| fail(err.to_string()))?;
            X509::from_pem(&pem).map_err(|err| fail(err.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut revoked = Revoked::new();
    for file in files {
        let (issuer, serials) = read_crl(file, &cas).map_err(|why| CrlError {
            file: file.display().to_string(),
            why,
        })?;
        revoked.entry(issuer).or_default().extend(serials);
    }
    Ok(revoked)
}

/// The issuer and revoked serial numbers of one CRL, once its signature verifies under the CA
/// that issued it.
fn read_crl(file: &Path, cas: &[X509]) -> Result<(String, HashSet<String>), String> {
    let bytes = std::fs::read(file).map_err(|err| err.to_string())?;
    let crl = X509Crl::from_pem(&bytes)
        .or_else(|_| X509Crl::from_der(&bytes))
        .map_err(|err| format!("not a CRL (PEM or DER): {err}"))?;
    let issuer_der = crl.issuer_name().to_der().map_err(|err| err.to_string())?;
    let issuer = cas
        .iter()
        .find(|ca| ca.subject_name().to_der().ok().as_ref() == Some(&issuer_der))
        .ok_or("issued by none of the network's CAs")?;
    let key = issuer.public_key().map_err(|err| err.to_string())?;
    if !crl.verify(&key).map_err(|err| err.to_string())? {
        return Err("its signature does not verify under its CA".into());
    }
    let now = Asn1Time::days_from_now(0).map_err(|err| err.to_string())?;
    if crl.next_update().is_some_and(|next| *next < now) {
        log::warn!(
            "CRL {} is past its next update: applied anyway, renew it",
            file.display()
        );
    }
    let issuer = hex(&openssl::sha::sha256(&issuer_der));
    let mut serials = HashSet::new();
    for entry in crl.get_revoked().into_iter().flatten() {
        let serial = entry
            .serial_number()
            .to_bn()
            .and_then(|bn| bn.to_hex_str().map(|hex| hex.to_string()))
            .map_err(|err| err.to_string())?;
        serials.insert(serial);
    }
    Ok((issuer, serials))
}
