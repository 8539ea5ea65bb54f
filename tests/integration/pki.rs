//! A PKI minted by the test itself: a CA, a certificate per KME and SAE, and bad ones
//! (another CA, expired, no CN, an unregistered SAE).

use std::path::{Path, PathBuf};

use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509Name, X509};

pub struct Pki {
    pub dir: PathBuf,
    ca_cert: X509,
    ca_key: PKey<Private>,
}

fn key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

fn serial() -> Asn1Integer {
    let mut bn = BigNum::new().unwrap();
    bn.rand(64, openssl::bn::MsbOption::MAYBE_ZERO, false)
        .unwrap();
    bn.to_asn1_integer().unwrap()
}

/// A subject with CN `cn`; `a+b` gives two CN entries, a and b (None: no CN at all).
fn name(cn: Option<&str>) -> X509Name {
    let mut name = X509Name::builder().unwrap();
    match cn {
        Some(cn) => {
            for part in cn.split('+') {
                name.append_entry_by_nid(Nid::COMMONNAME, part).unwrap();
            }
        }
        None => name
            .append_entry_by_nid(Nid::ORGANIZATIONNAME, "no common name")
            .unwrap(),
    }
    name.build()
}

fn self_signed_ca(cn: &str) -> (X509, PKey<Private>) {
    let key = key();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_serial_number(&serial()).unwrap();
    b.set_subject_name(&name(Some(cn))).unwrap();
    b.set_issuer_name(&name(Some(cn))).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(30).unwrap())
        .unwrap();
    b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
        .unwrap();
    b.append_extension(KeyUsage::new().key_cert_sign().crl_sign().build().unwrap())
        .unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    (b.build(), key)
}

pub enum Validity {
    Valid,
    Expired,
    /// Valid for this many more seconds.
    ExpiresIn(i64),
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let (ca_cert, ca_key) = self_signed_ca("kme test CA");
        std::fs::write(dir.join("ca.crt"), ca_cert.to_pem().unwrap()).unwrap();
        std::fs::write(
            dir.join("ca.key"),
            ca_key.private_key_to_pem_pkcs8().unwrap(),
        )
        .unwrap();
        Pki {
            dir: dir.to_path_buf(),
            ca_cert,
            ca_key,
        }
    }

    /// The PKI that `Pki::new` made in `dir`, to issue more certificates from its CA.
    pub fn open(dir: &Path) -> Pki {
        let read = |file: &str| std::fs::read(dir.join(file)).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            ca_cert: X509::from_pem(&read("ca.crt")).unwrap(),
            ca_key: PKey::private_key_from_pem(&read("ca.key")).unwrap(),
        }
    }

    /// Issues `<file>.crt` / `<file>.key` with subject CN `cn` (None: no CN; `a+b`: two CNs).
    pub fn issue(&self, file: &str, cn: Option<&str>, kme: bool, validity: Validity) {
        self.issue_by(file, cn, kme, validity, (&self.ca_cert, &self.ca_key), None);
    }

    /// An SAE certificate with subject CN `cn` and the SAN URI `uri` (a SPIFFE ID, say).
    pub fn issue_with_uri(&self, file: &str, cn: &str, uri: &str) {
        let ca = (&self.ca_cert, &self.ca_key);
        self.issue_by(file, Some(cn), false, Validity::Valid, ca, Some(uri));
    }

    /// A certificate for `cn` from a CA the KMEs do not trust.
    pub fn issue_foreign(&self, file: &str, cn: &str) {
        let (ca, key) = self_signed_ca("rogue CA");
        self.issue_by(file, Some(cn), false, Validity::Valid, (&ca, &key), None);
    }

    fn issue_by(
        &self,
        file: &str,
        cn: Option<&str>,
        kme: bool,
        validity: Validity,
        (ca, ca_key): (&X509, &PKey<Private>),
        uri: Option<&str>,
    ) {
        let key = key();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&serial()).unwrap();
        b.set_subject_name(&name(cn)).unwrap();
        b.set_issuer_name(ca.subject_name()).unwrap();
        b.set_pubkey(&key).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let (from, to) = match validity {
            Validity::Valid => (now - 3600, now + 30 * 86400),
            Validity::Expired => (now - 10 * 86400, now - 86400),
            Validity::ExpiresIn(secs) => (now - 3600, now + secs),
        };
        b.set_not_before(&Asn1Time::from_unix(from).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::from_unix(to).unwrap()).unwrap();
        let mut eku = ExtendedKeyUsage::new();
        eku.client_auth();
        if kme {
            eku.server_auth();
            let ctx = b.x509v3_context(Some(ca), None);
            let san = SubjectAlternativeName::new()
                .dns("localhost")
                .ip("127.0.0.1")
                .build(&ctx)
                .unwrap();
            b.append_extension(san).unwrap();
        }
        if let Some(uri) = uri {
            let ctx = b.x509v3_context(Some(ca), None);
            let san = SubjectAlternativeName::new().uri(uri).build(&ctx).unwrap();
            b.append_extension(san).unwrap();
        }
        b.append_extension(eku.build().unwrap()).unwrap();
        b.sign(ca_key, MessageDigest::sha256()).unwrap();
        let cert = b.build();
        std::fs::write(self.dir.join(format!("{file}.crt")), cert.to_pem().unwrap()).unwrap();
        std::fs::write(
            self.dir.join(format!("{file}.key")),
            key.private_key_to_pem_pkcs8().unwrap(),
        )
        .unwrap();
    }
}

/// Our clients (KME-to-KME, SAE) trust our CA only: `SslConnector::builder` also loads the
/// system's trust store, which would let a publicly issued certificate naming a neighbour's
/// KME ID pass.
#[test]
fn our_ca_is_the_only_trust_anchor_of_our_clients() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    pki.issue("kme-a", Some("kme-a"), true, Validity::Valid);
    let file = |name: &str| dir.path().join(name);
    let (ca, cert, key) = (file("ca.crt"), file("kme-a.crt"), file("kme-a.key"));
    for connector in [
        kme::tls::sae_connector(&ca, &cert, &key).unwrap(),
        kme::tls::peer_connector(&ca, &cert, &key, "kme-b", Default::default()).unwrap(),
    ] {
        let anchors = connector.context().cert_store().all_certificates();
        assert_eq!(anchors.len(), 1, "the system's CAs are trusted too");
    }
}
