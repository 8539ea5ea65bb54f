//! Plain domain values shared by the actors: identifiers, link parameters, keys.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use kme_bb84::channel::ChannelParams;
use kme_bb84::pipeline::PpConfig;

/// ID of a KME (a trusted node). Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KmeId(pub Arc<str>);

/// ID of an SAE (an application). Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SaeId(pub Arc<str>);

macro_rules! string_id {
    ($name:ident) => {
        impl $name {
            pub fn new(id: &str) -> Self {
                Self(Arc::from(id))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
string_id!(KmeId);
string_id!(SaeId);

/// Whose stream a link block belongs to: one end's pool, named by its KME ID, or the link's
/// authentication stream. Stored and sent as text: the KME ID, or `#auth` (never a KME ID:
/// the configuration allows only letters, digits, `-`, `_` and `.` in them).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner {
    Kme(KmeId),
    Auth,
}

impl Owner {
    const AUTH: &'static str = "#auth";

    pub fn as_str(&self) -> &str {
        match self {
            Owner::Kme(kme) => kme.as_str(),
            Owner::Auth => Self::AUTH,
        }
    }

    /// The owner written as `text` (see the type's doc).
    pub fn parse(text: &str) -> Self {
        if text == Self::AUTH {
            Owner::Auth
        } else {
            Owner::Kme(KmeId::new(text))
        }
    }
}

impl From<KmeId> for Owner {
    fn from(kme: KmeId) -> Self {
        Owner::Kme(kme)
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Owner {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Owner {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Ok(Owner::parse(&text))
    }
}

/// Lowercase hex of a digest (certificate fingerprints, key file hashes).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct CertIdentity {
    /// Subject CN, if the certificate has a usable one.
    pub cn: Option<String>,
    /// SHA-256 of the certificate (DER), lowercase hex.
    pub sha256: String,
    /// The URIs among its subject alternative names (e.g. SPIFFE IDs).
    pub uris: Vec<String>,
    /// Its issuer (SHA-256 of the issuer's name, DER, hex) and serial number (hex), as a CRL
    /// names it.
    pub issuer: String,
    pub serial: String,
    /// The end of its validity, in Unix seconds (a connection outlives the handshake).
    pub not_after: i64,
}

/// What ties a certificate to an SAE other than its CN (`cert_sha256` or `uri` of a
/// `[[sae]]`): an SAE bound so is that certificate's only, whatever its CN.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CertBinding {
    /// The certificate's SHA-256 fingerprint (lowercase hex).
    Sha256(String),
    /// A URI subject alternative name (e.g. a SPIFFE ID).
    Uri(String),
}

impl CertBinding {
    /// Everything `identity` may be bound by.
    pub fn of(identity: &CertIdentity) -> impl Iterator<Item = CertBinding> + '_ {
        std::iter::once(CertBinding::Sha256(identity.sha256.clone()))
            .chain(identity.uris.iter().cloned().map(CertBinding::Uri))
    }
}

/// ETSI limits of one link (or of local keys), as announced in `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLimits {
    pub key_size: u32,
    pub min_key_size: u32,
    pub max_key_size: u32,
    pub max_key_per_request: u32,
    pub max_key_count: u64,
    pub max_sae_id_count: u32,
}

/// Which key source feeds a link, as configured (`startup.rs` builds the `KeySource` from it).
#[derive(Debug, Clone, PartialEq)]
pub enum SourceKind {
    /// Stand-in, not QKD: the lower-ID end draws blocks from the OS CSPRNG and ships them.
    Courier,
    /// BB84: simulated quantum channel, real post-processing between the two ends.
    Bb84(Box<Bb84Settings>),
    /// A real QKD device writes key files with identical names at both ends.
    FileDrop,
}

/// How a BB84 link runs: its simulated channel and its post-processing parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Bb84Settings {
    pub channel: ChannelParams,
    /// Pulse slots per frame (chosen from the wanted sifted bits per frame).
    pub pulses_per_frame: u64,
    /// Real time: a frame takes at least pulses / pulse rate of wall time. Otherwise frames
    /// run as fast as the CPU allows (tests, benchmarks).
    pub paced: bool,
    pub pp: PpConfig,
    /// Where the link's authentication key comes from, first and after exhaustion.
    pub auth_bootstrap: AuthBootstrap,
}

/// Where a BB84 link's authentication key comes from when it has none left (at its first
/// start, and when aborted frames used it up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthBootstrap {
    /// A key file the operator installs at both ends (`kme link rekey`); until then the link
    /// is down.
    KeyFile,
    /// Random bytes shipped over the KME-to-KME TLS channel: the link's security then rests on
    /// TLS (demos and tests; logged as a warning every time).
    Tls,
}

/// Everything one end needs to know about its link to a neighbour.
#[derive(Debug, Clone)]
pub struct LinkParams {
    pub me: KmeId,
    pub peer: KmeId,
    pub source: SourceKind,
    /// Secret key rate of the link (both directions together), bits per second.
    pub rate_bits_per_s: u64,
    /// Unit of production, storage and deletion.
    pub block_bytes: usize,
    /// How often the link produces (ms); time is injected through ticks, never slept on.
    pub tick_ms: u64,
    pub limits: KeyLimits,
    /// `file-drop` links: the directory this end's device writes key files to.
    pub key_drop_dir: PathBuf,
    /// BB84 links: where the operator installs authentication key files (`kme link rekey`).
    pub auth_key_dir: PathBuf,
}

impl LinkParams {
    /// The lower-ID end generates the material (courier) or runs the frames as Alice (BB84).
    pub fn is_generator(&self) -> bool {
        self.me < self.peer
    }
    /// Bytes of material at which one end's pool counts as full.
    pub fn high_water_bytes(&self) -> u64 {
        self.limits.max_key_count * u64::from(self.limits.key_size / 8)
    }
}

#[cfg(test)]
impl LinkParams {
    /// A courier link kme-a — kme-b for tests: blocks of `block_bytes`, pools full at
    /// `max_key_count` keys of 256 bits.
    pub(crate) fn for_tests(block_bytes: usize, max_key_count: u64) -> Self {
        Self {
            me: KmeId::new("kme-a"),
            peer: KmeId::new("kme-b"),
            source: SourceKind::Courier,
            rate_bits_per_s: 1000,
            block_bytes,
            tick_ms: 100,
            key_drop_dir: PathBuf::new(),
            auth_key_dir: PathBuf::new(),
            limits: KeyLimits {
                key_size: 256,
                min_key_size: 64,
                max_key_size: 8192,
                max_key_per_request: 128,
                max_key_count,
                max_sae_id_count: 2,
            },
        }
    }
}

/// A key handed to a master SAE. Its bytes are overwritten when it is dropped and never
/// printed (`Debug` shows the ID and the length only).
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    pub id: Uuid,
    pub material: Vec<u8>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("material", &format_args!("<{} bytes>", self.material.len()))
            .finish()
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.material);
    }
}

/// Binding of consecutive ranges of the master's link stream to key_IDs, as sent to the
/// slave's KME: key `i` is the `len` bytes at `start + i * len`. Only positions travel, never
/// key bytes. One binding per enc_keys request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    pub master: SaeId,
    pub slaves: Vec<SaeId>,
    /// First byte in the owner's stream.
    pub start: u64,
    /// Length of each key in bytes.
    pub len: u32,
    pub key_ids: Vec<Uuid>,
    /// Set when the keys travel by trusted-node relay or to slaves on several KMEs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayLeg>,
}

impl Binding {
    /// First position after the last key (and the MAC key of a sealed leg), or None if it
    /// does not fit in a u64.
    pub fn end(&self) -> Option<u64> {
        let mac = match &self.relay {
            Some(RelayLeg {
                sealed: Some(_), ..
            }) => MAC_KEY_BYTES as u64,
            _ => 0,
        };
        u64::try_from(self.key_ids.len())
            .ok()?
            .checked_mul(u64::from(self.len))?
            .checked_add(self.start)?
            .checked_add(mac)
    }
}

/// Bytes of link material keying the one-time MAC of a sealed relay leg (hash key, tag pad).
pub const MAC_KEY_BYTES: usize = 16;

/// One hop of a relayed key (see `relay`): what the receiving KME does with the keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayLeg {
    /// One per enc_keys request; names the relay in release and abort.
    pub relay_id: Uuid,
    /// The KMEs the receiver forwards the keys to, each with the branches below it.
    pub onward: Vec<Branch>,
    /// None: the positions hold the keys themselves (the first hop, as for a neighbour).
    /// Some: they hold one-time pads, then the MAC key; the keys travel sealed with them.
    pub sealed: Option<Sealed>,
}

/// A KME of a relay tree and the subtree below it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Branch {
    pub kme: KmeId,
    pub onward: Vec<Branch>,
}

impl Branch {
    /// Every KME of the subtree, this one first.
    pub fn kmes(&self) -> Vec<&KmeId> {
        let mut all = vec![&self.kme];
        for below in &self.onward {
            all.extend(below.kmes());
        }
        all
    }

    /// Longest path from this KME down, in hops (1 for a leaf).
    pub fn depth(&self) -> usize {
        1 + self.onward.iter().map(Branch::depth).max().unwrap_or(0)
    }
}

/// Keys sealed with one-time pads of the link they cross, and the one-time MAC of the leg.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    /// Key `i` XOR pad `i`, standard base64.
    pub keys: Vec<String>,
    /// Wegman–Carter tag over the leg (see `relay::seal`).
    pub tag: u64,
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// ETSI GS QKD 014 clause 6.2, note on `size`.
pub const SIZE_MULTIPLE_OF_8: &str = "size shall be a multiple of 8";

/// Number of keys of one request, 1..=max_key_per_request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyCount(u32);

impl KeyCount {
    pub fn parse(number: Option<i64>, max: u32) -> std::result::Result<Self, String> {
        let n = number.unwrap_or(1);
        if n < 1 {
            return Err("number shall be a positive integer".into());
        }
        if n > i64::from(max) {
            return Err(format!("number exceeds max_key_per_request ({max})"));
        }
        Ok(Self(u32::try_from(n).unwrap_or(max)))
    }
    pub fn get(self) -> u32 {
        self.0
    }
}

/// Key size in bits: a multiple of 8 within min_key_size..=max_key_size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySizeBits(u32);

impl KeySizeBits {
    pub fn parse(
        size: Option<i64>,
        default: u32,
        min: u32,
        max: u32,
    ) -> std::result::Result<Self, String> {
        let s = size.unwrap_or(i64::from(default));
        if s % 8 != 0 {
            return Err(SIZE_MULTIPLE_OF_8.into());
        }
        if s < i64::from(min) || s > i64::from(max) {
            return Err(format!(
                "size shall be between min_key_size ({min}) and max_key_size ({max}) bits"
            ));
        }
        Ok(Self(u32::try_from(s).unwrap_or(max)))
    }
    pub fn get(self) -> u32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_never_prints_its_bytes() {
        let key = Key {
            id: Uuid::nil(),
            material: vec![0xab; 32],
        };
        let shown = format!("{key:?}");
        assert!(shown.contains("<32 bytes>"), "{shown}");
        assert!(!shown.contains("171") && !shown.contains("ab"), "{shown}");
    }

    #[test]
    fn count_and_size_bounds() {
        assert_eq!(KeyCount::parse(None, 128).unwrap().get(), 1);
        assert!(KeyCount::parse(Some(0), 128).is_err());
        assert!(KeyCount::parse(Some(-3), 128).is_err());
        assert!(KeyCount::parse(Some(129), 128).is_err());
        assert_eq!(KeySizeBits::parse(None, 256, 64, 8192).unwrap().get(), 256);
        assert_eq!(
            KeySizeBits::parse(Some(12), 256, 64, 8192).unwrap_err(),
            SIZE_MULTIPLE_OF_8
        );
        assert!(KeySizeBits::parse(Some(8), 256, 64, 8192).is_err());
        assert!(KeySizeBits::parse(Some(8200), 256, 64, 8192).is_err());
    }
}
