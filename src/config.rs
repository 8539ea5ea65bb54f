//! `kme.toml`: the raw file (serde, unknown keys refused) and the validated, typed `Config`.
//!
//! One file describes the whole network (KMEs, SAEs, links); each `kme` process takes its own
//! view with `Config::node`. Errors name the file and the offending key. Relative paths are
//! resolved against the directory of the file, so `make run` works from anywhere.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kme_actors::alerts::AlertSettings;
use kme_actors::sae_quota::SaeLimits;
use kme_actors::types::{
    AuthBootstrap, Bb84Settings, CertBinding, KeyLimits, KmeId, LinkParams, SaeId, SourceKind,
};
use kme_bb84::cascade::CascadeLeakage;
use kme_bb84::channel::ChannelParams;
use kme_bb84::pipeline::PpConfig;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {source}")]
    Parse {
        file: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{file}: `{key}`: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    tls: RawTls,
    #[serde(default)]
    defaults: RawLinkSettings,
    #[serde(default)]
    kme: Vec<RawKme>,
    #[serde(default)]
    sae_defaults: RawSaeLimits,
    #[serde(default)]
    sae: Vec<RawSae>,
    #[serde(default)]
    link: Vec<RawLink>,
    #[serde(default)]
    operator: Vec<RawOperator>,
    alerts: Option<RawAlerts>,
}

/// `[alerts]`: where each KME sends events that need an operator.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    webhook_url: String,
    pool_low_percent: Option<u64>,
    auth_windows_low: Option<u64>,
    audit_check_s: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert_dir: PathBuf,
    #[serde(default)]
    crl_files: Vec<PathBuf>,
    peer_ca: Option<PathBuf>,
}

/// Settings a link may set and `[defaults]` may give for all links.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLinkSettings {
    request_timeout_ms: Option<u64>,
    key_ttl_s: Option<u64>,
    route_advert_ms: Option<u64>,
    shutdown_grace_s: Option<u64>,
    max_connections: Option<usize>,
    source: Option<String>,
    rate_bits_per_s: Option<u64>,
    block_bytes: Option<usize>,
    tick_ms: Option<u64>,
    key_size: Option<u32>,
    min_key_size: Option<u32>,
    max_key_size: Option<u32>,
    max_key_count: Option<u64>,
    max_key_per_request: Option<u32>,
    max_sae_id_count: Option<u32>,
    bb84: Option<RawBb84>,
}

/// `[link.bb84]` / `[defaults.bb84]`: the simulated quantum channel of a BB84 link.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBb84 {
    pulse_rate_hz: Option<f64>,
    mean_photon_number: Option<f64>,
    decoy_photon_number: Option<f64>,
    vacuum_photon_number: Option<f64>,
    intensity_probabilities: Option<[f64; 3]>,
    x_basis_probability: Option<f64>,
    fibre_km: Option<f64>,
    attenuation_db_per_km: Option<f64>,
    detector_efficiency: Option<f64>,
    dark_count_probability: Option<f64>,
    misalignment: Option<f64>,
    eavesdropper: Option<f64>,
    frame_sifted_bits: Option<u64>,
    paced: Option<bool>,
    qber_threshold: Option<f64>,
    cascade_leakage: Option<String>,
    auth_bootstrap: Option<String>,
}

impl RawBb84 {
    fn or(&self, d: &RawBb84) -> RawBb84 {
        RawBb84 {
            pulse_rate_hz: self.pulse_rate_hz.or(d.pulse_rate_hz),
            mean_photon_number: self.mean_photon_number.or(d.mean_photon_number),
            decoy_photon_number: self.decoy_photon_number.or(d.decoy_photon_number),
            vacuum_photon_number: self.vacuum_photon_number.or(d.vacuum_photon_number),
            intensity_probabilities: self.intensity_probabilities.or(d.intensity_probabilities),
            x_basis_probability: self.x_basis_probability.or(d.x_basis_probability),
            fibre_km: self.fibre_km.or(d.fibre_km),
            attenuation_db_per_km: self.attenuation_db_per_km.or(d.attenuation_db_per_km),
            detector_efficiency: self.detector_efficiency.or(d.detector_efficiency),
            dark_count_probability: self.dark_count_probability.or(d.dark_count_probability),
            misalignment: self.misalignment.or(d.misalignment),
            eavesdropper: self.eavesdropper.or(d.eavesdropper),
            frame_sifted_bits: self.frame_sifted_bits.or(d.frame_sifted_bits),
            paced: self.paced.or(d.paced),
            qber_threshold: self.qber_threshold.or(d.qber_threshold),
            cascade_leakage: self.cascade_leakage.clone().or(d.cascade_leakage.clone()),
            auth_bootstrap: self.auth_bootstrap.clone().or(d.auth_bootstrap.clone()),
        }
    }
}

impl RawLinkSettings {
    fn or(&self, d: &RawLinkSettings) -> RawLinkSettings {
        RawLinkSettings {
            request_timeout_ms: self.request_timeout_ms.or(d.request_timeout_ms),
            key_ttl_s: self.key_ttl_s.or(d.key_ttl_s),
            route_advert_ms: self.route_advert_ms.or(d.route_advert_ms),
            shutdown_grace_s: self.shutdown_grace_s.or(d.shutdown_grace_s),
            max_connections: self.max_connections.or(d.max_connections),
            source: self.source.clone().or_else(|| d.source.clone()),
            rate_bits_per_s: self.rate_bits_per_s.or(d.rate_bits_per_s),
            block_bytes: self.block_bytes.or(d.block_bytes),
            tick_ms: self.tick_ms.or(d.tick_ms),
            key_size: self.key_size.or(d.key_size),
            min_key_size: self.min_key_size.or(d.min_key_size),
            max_key_size: self.max_key_size.or(d.max_key_size),
            max_key_count: self.max_key_count.or(d.max_key_count),
            max_key_per_request: self.max_key_per_request.or(d.max_key_per_request),
            max_sae_id_count: self.max_sae_id_count.or(d.max_sae_id_count),
            bb84: match (&self.bb84, &d.bb84) {
                (Some(own), Some(d)) => Some(own.or(d)),
                (own, d) => own.clone().or_else(|| d.clone()),
            },
        }
    }
}

/// The database's size limit when `max_db_mb` is not set: a KME whose audit trail is never
/// pruned fills this in years at demo rates, and the disk is not filled by surprise.
pub const DEFAULT_MAX_DB_MB: u64 = 4096;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKme {
    id: String,
    sae_listen: SocketAddr,
    peer_listen: SocketAddr,
    peer_url: Option<String>,
    data_dir: PathBuf,
    master_key: Option<PathBuf>,
    key_drop_dir: Option<PathBuf>,
    max_db_mb: Option<u64>,
    workers: Option<usize>,
    admin_listen: Option<SocketAddr>,
    admin_tls: Option<bool>,
}

/// `[[operator]]`: a certificate CN allowed on the admin listeners over mTLS.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperator {
    id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSae {
    id: String,
    kme: String,
    cert_sha256: Option<String>,
    uri: Option<String>,
    #[serde(flatten)]
    limits: RawSaeLimits,
}

/// `[sae_defaults]`, and the same keys on an `[[sae]]`: per-SAE rate limits.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSaeLimits {
    requests_per_s: Option<u32>,
    keys_per_s: Option<u32>,
    max_waiting_keys: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    ends: [String; 2],
    #[serde(flatten)]
    settings: RawLinkSettings,
}

/// Settings of one link after defaults and validation.
#[derive(Debug, Clone)]
pub struct LinkSpec {
    pub ends: [KmeId; 2],
    pub source: SourceKind,
    pub rate_bits_per_s: u64,
    pub block_bytes: usize,
    pub tick_ms: u64,
    pub limits: KeyLimits,
}

#[derive(Debug, Clone)]
pub struct KmeSpec {
    pub id: KmeId,
    pub sae_listen: SocketAddr,
    pub peer_listen: SocketAddr,
    /// How the other KMEs reach `peer_listen` (`https://host[:port]`, no trailing slash):
    /// `peer_url` of the file, else `https://<peer_listen>`.
    pub peer_url: String,
    pub data_dir: PathBuf,
    /// 32-byte master key of encryption at rest (created on first start if missing).
    pub master_key: PathBuf,
    /// Where QKD devices of `file-drop` links write key files: `<key_drop_dir>/<peer KME>/`.
    pub key_drop_dir: PathBuf,
    /// Size limit of the database file in MiB (`DEFAULT_MAX_DB_MB` unless the file says).
    pub max_db_mb: u64,
    pub workers: usize,
    /// The operator's listener (metrics, health, admin API), if any.
    pub admin: Option<AdminListen>,
}

impl KmeSpec {
    /// This KME's SQLite database, in its data directory.
    pub fn db_file(&self) -> PathBuf {
        self.data_dir.join("kme.sqlite")
    }
}

/// Where the admin listener is, and whether it takes operators' mTLS or plain HTTP (loopback
/// addresses only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminListen {
    pub addr: SocketAddr,
    pub tls: bool,
}

/// The validated network description.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub ca: PathBuf,
    pub cert_dir: PathBuf,
    /// CRLs of the CA (`[tls] crl_files`), read at start and at every reload.
    pub crl_files: Vec<PathBuf>,
    /// A CA of the KME-to-KME channel of its own (`[tls] peer_ca`), if any.
    pub peer_ca: Option<PathBuf>,
    pub request_timeout: Duration,
    /// Keys not retrieved by all their slaves within this time are deleted (audited).
    pub key_ttl: Duration,
    /// How often each KME sends its link states to its neighbours (relay routing).
    pub route_advert: Duration,
    /// How long SIGTERM waits for requests in flight before the KME stops anyway.
    pub shutdown_grace: Duration,
    /// Most connections open at once on each listener (SAE API, KME-to-KME).
    pub max_connections: usize,
    pub kmes: Vec<KmeSpec>,
    pub sae_homes: HashMap<SaeId, KmeId>,
    /// SAEs identified by certificate fingerprint (SHA-256, lowercase hex) instead of CN.
    pub pinned: HashMap<CertBinding, SaeId>,
    pub links: Vec<LinkSpec>,
    /// Limits for keys between SAEs of one KME (from `[defaults]`).
    pub local_limits: KeyLimits,
    /// Rate limits of every SAE (`[sae_defaults]` and each `[[sae]]`'s own).
    pub sae_limits: HashMap<SaeId, SaeLimits>,
    /// Certificate CNs allowed on admin listeners with TLS (`[[operator]]`).
    pub operators: HashSet<String>,
    /// `[alerts]`: the operator's webhook, if any.
    pub alerts: Option<AlertSettings>,
}

/// The CA and this KME's certificate and key on the KME-to-KME channel.
#[derive(Debug, Clone)]
pub struct PeerTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One neighbour as seen from a KME.
#[derive(Debug, Clone)]
pub struct Neighbour {
    pub params: LinkParams,
    /// KME-to-KME URL of the neighbour, e.g. `https://127.0.0.1:9442` (its `peer_url`).
    pub url: String,
}

/// What one `kme` process needs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The network file it was read from (reloads read it again).
    pub file: PathBuf,
    pub me: KmeSpec,
    pub ca: PathBuf,
    pub crl_files: Vec<PathBuf>,
    pub cert: PathBuf,
    /// The KME-to-KME channel's trust anchor and this KME's certificate on it: `[tls]
    /// peer_ca` and `<cert_dir>/<id>.peer.crt`/`.key` if the file names a peer CA, else the
    /// SAE API's.
    pub peer_tls: PeerTls,
    pub key: PathBuf,
    pub request_timeout: Duration,
    pub key_ttl: Duration,
    pub route_advert: Duration,
    /// How long SIGTERM waits for requests in flight before the KME stops anyway.
    pub shutdown_grace: Duration,
    /// Most connections open at once on each listener (SAE API, KME-to-KME).
    pub max_connections: usize,
    pub neighbours: Vec<Neighbour>,
    /// Every link of the network (the static topology relay routes are found in).
    pub links: Vec<(KmeId, KmeId)>,
    pub sae_homes: HashMap<SaeId, KmeId>,
    pub pinned: HashMap<CertBinding, SaeId>,
    pub kmes: HashSet<KmeId>,
    pub local_limits: KeyLimits,
    /// Rate limits of every SAE (those of other KMEs' SAEs for `max_waiting_keys`).
    pub sae_limits: HashMap<SaeId, SaeLimits>,
    pub operators: HashSet<String>,
    pub alerts: Option<AlertSettings>,
}

impl Config {
    /// `--config PATH`, else `$KME_CONFIG`, else `./kme.toml`.
    pub fn locate(explicit: Option<&Path>) -> PathBuf {
        explicit
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("KME_CONFIG").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("kme.toml"))
    }

    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        Self::parse(&text, file)
    }

    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            file: file.to_path_buf(),
            source: Box::new(source),
        })?;
        Validator { file }.validate(raw)
    }

    pub fn kme(&self, id: &str) -> Option<&KmeSpec> {
        self.kmes.iter().find(|k| k.id.as_str() == id)
    }

    pub fn node(&self, id: &str) -> Result<NodeConfig, ConfigError> {
        let me = self.kme(id).cloned().ok_or_else(|| ConfigError::Invalid {
            file: self.file.clone(),
            key: "kme".into(),
            message: format!("no [[kme]] with id = \"{id}\""),
        })?;
        let mut neighbours = Vec::new();
        for link in &self.links {
            let peer = match &link.ends {
                [a, b] if *a == me.id => b,
                [a, b] if *b == me.id => a,
                _ => continue,
            };
            let Some(peer_spec) = self.kme(peer.as_str()) else {
                continue;
            };
            neighbours.push(Neighbour {
                params: LinkParams {
                    me: me.id.clone(),
                    peer: peer.clone(),
                    source: link.source.clone(),
                    rate_bits_per_s: link.rate_bits_per_s,
                    block_bytes: link.block_bytes,
                    tick_ms: link.tick_ms,
                    limits: link.limits,
                    key_drop_dir: me.key_drop_dir.join(peer.as_str()),
                    auth_key_dir: me.data_dir.join("auth-keys").join(peer.as_str()),
                },
                url: peer_spec.peer_url.clone(),
            });
        }
        let peer_tls = match &self.peer_ca {
            Some(ca) => PeerTls {
                ca: ca.clone(),
                cert: self.cert_dir.join(format!("{id}.peer.crt")),
                key: self.cert_dir.join(format!("{id}.peer.key")),
            },
            None => PeerTls {
                ca: self.ca.clone(),
                cert: self.cert_dir.join(format!("{id}.crt")),
                key: self.cert_dir.join(format!("{id}.key")),
            },
        };
        Ok(NodeConfig {
            file: self.file.clone(),
            cert: self.cert_dir.join(format!("{id}.crt")),
            key: self.cert_dir.join(format!("{id}.key")),
            peer_tls,
            me,
            ca: self.ca.clone(),
            crl_files: self.crl_files.clone(),
            request_timeout: self.request_timeout,
            key_ttl: self.key_ttl,
            route_advert: self.route_advert,
            shutdown_grace: self.shutdown_grace,
            max_connections: self.max_connections,
            neighbours,
            links: self
                .links
                .iter()
                .map(|l| (l.ends[0].clone(), l.ends[1].clone()))
                .collect(),
            sae_homes: self.sae_homes.clone(),
            pinned: self.pinned.clone(),
            kmes: self.kmes.iter().map(|k| k.id.clone()).collect(),
            local_limits: self.local_limits,
            sae_limits: self.sae_limits.clone(),
            operators: self.operators.clone(),
            alerts: self.alerts.clone(),
        })
    }
}

struct Validator<'a> {
    file: &'a Path,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn path(&self, p: &Path) -> PathBuf {
        match self.file.parent() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_path_buf(),
        }
    }

    fn id(&self, key: &str, id: &str) -> Result<(), ConfigError> {
        let ok = !id.is_empty()
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok {
            Ok(())
        } else {
            Err(self.err(
                key,
                format!("\"{id}\" must be 1-64 characters of A-Z a-z 0-9 - _ ."),
            ))
        }
    }

    /// `peer_url` of KME `id`: `https://host[:port]` and nothing else (a trailing `/` is
    /// dropped); the KME-to-KME paths are appended to it as they are.
    fn peer_url(&self, id: &str, url: &str) -> Result<String, ConfigError> {
        let bad = |why: &str| {
            self.err(
                "kme.peer_url",
                format!("KME \"{id}\": \"{url}\" {why} (expected https://host[:port])"),
            )
        };
        let uri: awc::http::Uri = url.parse().map_err(|_| bad("is not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("is not an https URL"));
        }
        let authority = match uri.authority() {
            Some(a) if !a.host().is_empty() && !a.as_str().contains('@') => a,
            _ => return Err(bad("needs a host and no user information")),
        };
        // The text after the host: nothing, or `:` and a port 1..=65535.
        let port = authority
            .as_str()
            .get(authority.host().len()..)
            .unwrap_or("");
        if !port.is_empty()
            && port
                .strip_prefix(':')
                .and_then(|p| p.parse::<u16>().ok())
                .is_none_or(|p| p == 0)
        {
            return Err(bad("has an invalid port"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("has a path or a query"));
        }
        Ok(format!("https://{authority}"))
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let mut ids = HashSet::new();
        let mut kmes = Vec::new();
        for k in &raw.kme {
            self.id("kme.id", &k.id)?;
            if !ids.insert(k.id.clone()) {
                return Err(self.err("kme.id", format!("\"{}\" is defined twice", k.id)));
            }
            let peer_url = match &k.peer_url {
                Some(url) => self.peer_url(&k.id, url)?,
                None => format!("https://{}", k.peer_listen),
            };
            kmes.push(KmeSpec {
                id: KmeId::new(&k.id),
                sae_listen: k.sae_listen,
                peer_listen: k.peer_listen,
                peer_url,
                data_dir: self.path(&k.data_dir),
                master_key: k
                    .master_key
                    .as_deref()
                    .map(|p| self.path(p))
                    .unwrap_or_else(|| self.path(&k.data_dir).join("master.key")),
                key_drop_dir: k
                    .key_drop_dir
                    .as_deref()
                    .map(|p| self.path(p))
                    .unwrap_or_else(|| self.path(&k.data_dir).join("key-drop")),
                max_db_mb: k.max_db_mb.unwrap_or(DEFAULT_MAX_DB_MB),
                workers: k.workers.unwrap_or(2).clamp(1, 64),
                admin: self.admin_listen(k)?,
            });
        }
        let kme_ids: HashSet<&str> = raw.kme.iter().map(|k| k.id.as_str()).collect();
        let mut sae_homes = HashMap::new();
        let mut pinned = HashMap::new();
        let mut sae_limits = HashMap::new();
        let sae_defaults =
            self.sae_limits("sae_defaults", &raw.sae_defaults, SaeLimits::default())?;
        for s in &raw.sae {
            self.id("sae.id", &s.id)?;
            if !ids.insert(s.id.clone()) {
                return Err(self.err(
                    "sae.id",
                    format!(
                        "\"{}\" is defined twice (SAE and KME IDs share one namespace)",
                        s.id
                    ),
                ));
            }
            if !kme_ids.contains(s.kme.as_str()) {
                return Err(self.err(
                    "sae.kme",
                    format!("SAE \"{}\" names unknown KME \"{}\"", s.id, s.kme),
                ));
            }
            sae_homes.insert(SaeId::new(&s.id), KmeId::new(&s.kme));
            sae_limits.insert(
                SaeId::new(&s.id),
                self.sae_limits("sae", &s.limits, sae_defaults)?,
            );
            if let Some(fingerprint) = &s.cert_sha256 {
                let hex: String = fingerprint
                    .chars()
                    .filter(|c| *c != ':')
                    .collect::<String>()
                    .to_ascii_lowercase();
                if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(self.err(
                        "sae.cert_sha256",
                        format!("SAE \"{}\": a SHA-256 fingerprint is 64 hex digits", s.id),
                    ));
                }
                if pinned
                    .insert(CertBinding::Sha256(hex), SaeId::new(&s.id))
                    .is_some()
                {
                    return Err(self.err("sae.cert_sha256", "one certificate pinned to two SAEs"));
                }
            }
            if let Some(uri) = &s.uri {
                let scheme_ok = uri
                    .split_once(':')
                    .is_some_and(|(scheme, rest)| !scheme.is_empty() && !rest.is_empty());
                if !scheme_ok || uri.chars().any(char::is_whitespace) {
                    return Err(self.err(
                        "sae.uri",
                        format!(
                            "SAE \"{}\": \"{uri}\" is not a URI (e.g. spiffe://example.org/sae-a)",
                            s.id
                        ),
                    ));
                }
                if pinned
                    .insert(CertBinding::Uri(uri.clone()), SaeId::new(&s.id))
                    .is_some()
                {
                    return Err(self.err("sae.uri", "one URI bound to two SAEs"));
                }
            }
        }
        let mut operators = HashSet::new();
        for o in &raw.operator {
            self.id("operator.id", &o.id)?;
            if !ids.insert(o.id.clone()) {
                return Err(self.err(
                    "operator.id",
                    format!(
                        "\"{}\" is defined twice (operator, SAE and KME IDs share one namespace)",
                        o.id
                    ),
                ));
            }
            operators.insert(o.id.clone());
        }
        let defaults = raw.defaults.clone();
        let mut links = Vec::new();
        let mut pairs = HashSet::new();
        for l in &raw.link {
            let [a, b] = &l.ends;
            for end in [a, b] {
                if !kme_ids.contains(end.as_str()) {
                    return Err(self.err("link.ends", format!("unknown KME \"{end}\"")));
                }
            }
            if a == b {
                return Err(self.err("link.ends", "a link needs two different KMEs"));
            }
            let pair = if a < b {
                (a.clone(), b.clone())
            } else {
                (b.clone(), a.clone())
            };
            if !pairs.insert(pair) {
                return Err(self.err("link.ends", format!("link {a} — {b} is defined twice")));
            }
            if l.settings.request_timeout_ms.is_some()
                || l.settings.key_ttl_s.is_some()
                || l.settings.route_advert_ms.is_some()
                || l.settings.shutdown_grace_s.is_some()
                || l.settings.max_connections.is_some()
            {
                return Err(self.err(
                    "link",
                    "request_timeout_ms, key_ttl_s, route_advert_ms, shutdown_grace_s and max_connections belong in [defaults]",
                ));
            }
            let s = l.settings.or(&defaults);
            links.push(self.link_spec([KmeId::new(a), KmeId::new(b)], &s)?);
        }
        let local_limits = self.limits("defaults", &defaults)?;
        Ok(Config {
            file: self.file.to_path_buf(),
            ca: self.path(&raw.tls.ca),
            cert_dir: self.path(&raw.tls.cert_dir),
            crl_files: raw.tls.crl_files.iter().map(|f| self.path(f)).collect(),
            peer_ca: raw.tls.peer_ca.as_ref().map(|f| self.path(f)),
            request_timeout: Duration::from_millis(
                defaults
                    .request_timeout_ms
                    .unwrap_or(5000)
                    .clamp(10, 600_000),
            ),
            key_ttl: Duration::from_secs(
                defaults
                    .key_ttl_s
                    .unwrap_or(86_400)
                    .clamp(1, 10 * 365 * 86_400),
            ),
            route_advert: Duration::from_millis(
                defaults.route_advert_ms.unwrap_or(500).clamp(50, 60_000),
            ),
            shutdown_grace: Duration::from_secs(
                defaults.shutdown_grace_s.unwrap_or(10).clamp(1, 600),
            ),
            max_connections: defaults.max_connections.unwrap_or(1024).clamp(4, 1 << 20),
            kmes,
            sae_homes,
            pinned,
            links,
            local_limits,
            sae_limits,
            operators,
            alerts: raw.alerts.as_ref().map(|a| self.alerts(a)).transpose()?,
        })
    }

    fn alerts(&self, raw: &RawAlerts) -> Result<AlertSettings, ConfigError> {
        let url = raw.webhook_url.trim_end_matches('/');
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(self.err("alerts.webhook_url", "must be an http:// or https:// URL"));
        }
        let pool_low_percent = raw.pool_low_percent.unwrap_or(10);
        if pool_low_percent > 50 {
            return Err(self.err("alerts.pool_low_percent", "must be at most 50"));
        }
        Ok(AlertSettings {
            webhook_url: url.to_string(),
            pool_low_percent,
            auth_windows_low: raw.auth_windows_low.unwrap_or(4),
            audit_check: std::time::Duration::from_secs(
                raw.audit_check_s.unwrap_or(3600).clamp(1, 7 * 86_400),
            ),
        })
    }

    /// `admin_listen` and `admin_tls` of one `[[kme]]`: plain HTTP only on a loopback address.
    fn admin_listen(&self, k: &RawKme) -> Result<Option<AdminListen>, ConfigError> {
        let Some(addr) = k.admin_listen else {
            if k.admin_tls.is_some() {
                return Err(self.err("kme.admin_tls", "needs admin_listen"));
            }
            return Ok(None);
        };
        let tls = k.admin_tls.unwrap_or(true);
        if !tls && !addr.ip().is_loopback() {
            return Err(self.err(
                "kme.admin_tls",
                format!(
                    "KME \"{}\": admin_listen {addr} is not a loopback address, so it needs TLS (admin_tls = true)",
                    k.id
                ),
            ));
        }
        Ok(Some(AdminListen { addr, tls }))
    }

    /// Rate limits from `raw` (`at`: where it was written), each one not set there taken
    /// from `fallback`.
    fn sae_limits(
        &self,
        at: &str,
        raw: &RawSaeLimits,
        fallback: SaeLimits,
    ) -> Result<SaeLimits, ConfigError> {
        let rate = |key: &str, value: Option<u32>, fallback| match value {
            None => Ok(fallback),
            Some(rate) => NonZeroU32::new(rate)
                .ok_or_else(|| self.err(format!("{at}.{key}"), "must be at least 1 per second")),
        };
        Ok(SaeLimits {
            requests_per_s: rate(
                "requests_per_s",
                raw.requests_per_s,
                fallback.requests_per_s,
            )?,
            keys_per_s: rate("keys_per_s", raw.keys_per_s, fallback.keys_per_s)?,
            max_waiting_keys: match raw.max_waiting_keys {
                None => fallback.max_waiting_keys,
                Some(0) => {
                    return Err(self.err(format!("{at}.max_waiting_keys"), "must be at least 1"))
                }
                Some(keys) => keys,
            },
        })
    }

    fn limits(&self, at: &str, s: &RawLinkSettings) -> Result<KeyLimits, ConfigError> {
        let limits = KeyLimits {
            key_size: s.key_size.unwrap_or(256),
            min_key_size: s.min_key_size.unwrap_or(64),
            max_key_size: s.max_key_size.unwrap_or(8192),
            max_key_per_request: s.max_key_per_request.unwrap_or(128),
            max_key_count: s.max_key_count.unwrap_or(1000),
            max_sae_id_count: s.max_sae_id_count.unwrap_or(4),
        };
        for (key, v) in [
            ("key_size", limits.key_size),
            ("min_key_size", limits.min_key_size),
            ("max_key_size", limits.max_key_size),
        ] {
            if v == 0 || !v.is_multiple_of(8) {
                return Err(self.err(
                    format!("{at}.{key}"),
                    "must be a positive multiple of 8 (bits)",
                ));
            }
        }
        if !(limits.min_key_size <= limits.key_size && limits.key_size <= limits.max_key_size) {
            return Err(self.err(
                format!("{at}.key_size"),
                "must lie within min_key_size..=max_key_size",
            ));
        }
        if limits.max_key_size > 1 << 20 {
            return Err(self.err(format!("{at}.max_key_size"), "at most 1048576 bits"));
        }
        if limits.max_key_per_request == 0 || limits.max_key_per_request > 100_000 {
            return Err(self.err(format!("{at}.max_key_per_request"), "must be 1..=100000"));
        }
        if limits.max_key_count == 0
            || limits
                .max_key_count
                .saturating_mul(u64::from(limits.key_size))
                > 1 << 43
        {
            return Err(self.err(
                format!("{at}.max_key_count"),
                "must be at least 1, and max_key_count x key_size at most 2^43 bits (1 TiB)",
            ));
        }
        if limits.max_sae_id_count > 64 {
            return Err(self.err(format!("{at}.max_sae_id_count"), "at most 64"));
        }
        Ok(limits)
    }

    fn link_spec(&self, ends: [KmeId; 2], s: &RawLinkSettings) -> Result<LinkSpec, ConfigError> {
        let at = format!("link[{} — {}]", ends[0], ends[1]);
        // No default: a link whose key source is not said would silently be something else
        // than QKD.
        let Some(source) = s.source.as_deref() else {
            return Err(self.err(
                format!("{at}.source"),
                "missing: say which key source the link has: \"bb84\", \"file-drop\" (QKD devices) or \"courier\" (CSPRNG bytes over TLS, not QKD: tests and benchmarks only)",
            ));
        };
        let source = match source {
            "courier" => SourceKind::Courier,
            "bb84" => SourceKind::Bb84(Box::new(
                self.bb84_settings(&at, s.bb84.clone().unwrap_or_default())?,
            )),
            "file-drop" => SourceKind::FileDrop,
            other => {
                return Err(self.err(
                    format!("{at}.source"),
                    format!("unknown source \"{other}\" (known: bb84, courier, file-drop)"),
                ))
            }
        };
        let rate_bits_per_s = s.rate_bits_per_s.unwrap_or(40_000);
        if rate_bits_per_s == 0 {
            return Err(self.err(format!("{at}.rate_bits_per_s"), "must be positive"));
        }
        let block_bytes = s.block_bytes.unwrap_or(1024);
        if !(16..=16 * 1024 * 1024).contains(&block_bytes) {
            return Err(self.err(format!("{at}.block_bytes"), "must be 16..=16777216"));
        }
        Ok(LinkSpec {
            ends,
            source,
            rate_bits_per_s,
            block_bytes,
            tick_ms: s.tick_ms.unwrap_or(100).clamp(1, 60_000),
            limits: self.limits(&at, s)?,
        })
    }
}

/// Sifted key (X-basis) bits per BB84 frame by default: at 10^6 the finite-key bound leaves
/// about 30 % of them as secret key on a 20 km link (at 2 x 10^5, a third of that).
const DEFAULT_FRAME_KEY_BITS: u64 = 1_000_000;

impl Validator<'_> {
    /// Channel and post-processing settings of a BB84 link; unset values take the defaults of
    /// `ChannelParams` (a 20 km link at 1 GHz with intensities 0.4 / 0.2 / 0, key basis X
    /// chosen with probability 0.8).
    fn bb84_settings(&self, at: &str, b: RawBb84) -> Result<Bb84Settings, ConfigError> {
        let d = ChannelParams::default();
        let channel = ChannelParams {
            pulse_rate_hz: b.pulse_rate_hz.unwrap_or(d.pulse_rate_hz),
            intensities: [
                b.mean_photon_number.unwrap_or(d.intensities[0]),
                b.decoy_photon_number.unwrap_or(d.intensities[1]),
                b.vacuum_photon_number.unwrap_or(d.intensities[2]),
            ],
            class_probs: b.intensity_probabilities.unwrap_or(d.class_probs),
            x_basis_probability: b.x_basis_probability.unwrap_or(d.x_basis_probability),
            fibre_km: b.fibre_km.unwrap_or(d.fibre_km),
            atten_db_per_km: b.attenuation_db_per_km.unwrap_or(d.atten_db_per_km),
            detector_efficiency: b.detector_efficiency.unwrap_or(d.detector_efficiency),
            dark_count_prob: b.dark_count_probability.unwrap_or(d.dark_count_prob),
            misalignment: b.misalignment.unwrap_or(d.misalignment),
            eve_fraction: b.eavesdropper.unwrap_or(d.eve_fraction),
        };
        channel
            .validate()
            .map_err(|err| self.err(format!("{at}.bb84"), err.to_string()))?;
        if channel.fibre_km > 500.0 {
            return Err(self.err(format!("{at}.bb84.fibre_km"), "at most 500 km"));
        }
        if !(channel.pulse_rate_hz > 0.0 && channel.pulse_rate_hz <= 1e11) {
            return Err(self.err(format!("{at}.bb84.pulse_rate_hz"), "must be in (0, 1e11]"));
        }
        let sifted = b.frame_sifted_bits.unwrap_or(DEFAULT_FRAME_KEY_BITS);
        if !(20_000..=10_000_000).contains(&sifted) {
            return Err(self.err(
                format!("{at}.bb84.frame_sifted_bits"),
                "must be 20000..=10000000",
            ));
        }
        let pulses_per_frame = channel.pulses_for_sifted(sifted as f64);
        if pulses_per_frame == 0 || pulses_per_frame > 1 << 50 {
            return Err(self.err(
                format!("{at}.bb84"),
                "the channel detects (almost) nothing: shorten the fibre or raise the efficiency",
            ));
        }
        let mut pp = PpConfig::default();
        pp.estimation.source = channel.source();
        if let Some(threshold) = b.qber_threshold {
            if !(0.0..0.5).contains(&threshold) {
                return Err(self.err(format!("{at}.bb84.qber_threshold"), "must be in [0, 0.5)"));
            }
            pp.estimation.qber_threshold = threshold;
        }
        pp.cascade_leakage = match b.cascade_leakage.as_deref() {
            None | Some("alice-and-bob") => CascadeLeakage::AliceAndBob,
            Some("alice-only") => CascadeLeakage::AliceOnly,
            Some(other) => {
                return Err(self.err(
                    format!("{at}.bb84.cascade_leakage"),
                    format!("\"{other}\": \"alice-and-bob\" (the default) or \"alice-only\""),
                ))
            }
        };
        let auth_bootstrap = match b.auth_bootstrap.as_deref() {
            None | Some("key-file") => AuthBootstrap::KeyFile,
            Some("tls") => AuthBootstrap::Tls,
            Some(other) => {
                return Err(self.err(
                    format!("{at}.bb84.auth_bootstrap"),
                    format!("\"{other}\": \"key-file\" (the default) or \"tls\""),
                ))
            }
        };
        Ok(Bb84Settings {
            channel,
            pulses_per_frame,
            paced: b.paced.unwrap_or(true),
            pp,
            auth_bootstrap,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_network_file_is_valid() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("kme.toml");
        let config = Config::load(&file).unwrap();
        assert_eq!(config.kmes.len(), 3);
        let b = config.node("kme-b").unwrap();
        assert_eq!(b.neighbours.len(), 2);
        let a = config.node("kme-a").unwrap();
        assert_eq!(a.neighbours.len(), 1);
        assert_eq!(a.neighbours[0].url, "https://127.0.0.1:9442");
        assert_eq!(config.sae_homes.len(), 4);
    }

    #[test]
    fn a_bb84_link_takes_its_authentication_key_from_a_key_file_unless_tls_is_said() {
        let file = Path::new("x.toml");
        let base = "[tls]\nca = \"ca.crt\"\ncert_dir = \".\"\n[[kme]]\nid=\"a\"\nsae_listen=\"127.0.0.1:1\"\npeer_listen=\"127.0.0.1:2\"\ndata_dir=\"d\"\n[[kme]]\nid=\"b\"\nsae_listen=\"127.0.0.1:3\"\npeer_listen=\"127.0.0.1:4\"\ndata_dir=\"e\"\n[[link]]\nends=[\"a\",\"b\"]\nsource=\"bb84\"\n";
        let bootstrap = |extra: &str| {
            Config::parse(&format!("{base}{extra}"), file).map(|c| match &c.links[0].source {
                SourceKind::Bb84(b) => b.auth_bootstrap,
                _ => panic!("not bb84"),
            })
        };
        assert_eq!(bootstrap("").unwrap(), AuthBootstrap::KeyFile);
        let tls = bootstrap("[link.bb84]\nauth_bootstrap = \"tls\"\n").unwrap();
        assert_eq!(tls, AuthBootstrap::Tls);
        let err = bootstrap("[link.bb84]\nauth_bootstrap = \"courier\"\n").unwrap_err();
        assert!(err.to_string().contains("auth_bootstrap"), "{err}");
    }

    #[test]
    fn bb84_links_take_defaults_and_refuse_impossible_channels() {
        let file = Path::new("x.toml");
        let base = "[tls]\nca = \"ca.crt\"\ncert_dir = \".\"\n[[kme]]\nid=\"a\"\nsae_listen=\"127.0.0.1:1\"\npeer_listen=\"127.0.0.1:2\"\ndata_dir=\"d\"\n[[kme]]\nid=\"b\"\nsae_listen=\"127.0.0.1:3\"\npeer_listen=\"127.0.0.1:4\"\ndata_dir=\"e\"\n[[link]]\nends=[\"a\",\"b\"]\nsource=\"bb84\"\n";
        let config = Config::parse(base, file).unwrap();
        let SourceKind::Bb84(b) = &config.links[0].source else {
            panic!("not bb84");
        };
        assert_eq!(b.channel, ChannelParams::default());
        assert!(b.paced);
        // The finite-key bound's view of the source is the channel's, and Cascade's leakage is
        // counted at both ends unless the file says otherwise.
        assert_eq!(b.pp.estimation.source, b.channel.source());
        assert_eq!(b.pp.cascade_leakage, CascadeLeakage::AliceAndBob);
        assert_eq!(
            b.pulses_per_frame,
            b.channel.pulses_for_sifted(DEFAULT_FRAME_KEY_BITS as f64)
        );
        let with = |extra: &str| Config::parse(&format!("{base}[link.bb84]\n{extra}\n"), file);
        let bb84 = |extra: &str| match with(extra).unwrap().links.remove(0).source {
            SourceKind::Bb84(b) => b,
            _ => panic!("not bb84"),
        };
        assert_eq!(bb84("eavesdropper = 1.0").channel.eve_fraction, 1.0);
        let alice_only = bb84("cascade_leakage = \"alice-only\"");
        assert_eq!(alice_only.pp.cascade_leakage, CascadeLeakage::AliceOnly);
        // A weak third intensity is what the bound of Lim et al. handles.
        let weak = bb84("vacuum_photon_number = 0.001\nx_basis_probability = 0.9");
        assert_eq!(weak.pp.estimation.source.intensities[2], 0.001);
        assert_eq!(weak.channel.x_basis_probability, 0.9);
        for bad in [
            "eavesdropper = 2.0",
            "mean_photon_number = 0.05",
            "vacuum_photon_number = 0.3",
            "intensity_probabilities = [0.5, 0.5, 0.0]",
            "x_basis_probability = 1.0",
            "cascade_leakage = \"bob-only\"",
            "qber_threshold = 0.6",
            "frame_sifted_bits = 10",
            "fibre_km = 5000.0",
            "colour = 1",
        ] {
            let err = with(bad).unwrap_err();
            assert!(
                err.to_string().contains("bb84") || err.to_string().contains("colour"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let file = Path::new("x.toml");
        let base = "[tls]\nca = \"ca.crt\"\ncert_dir = \".\"\n";
        let err = Config::parse(&format!("{base}bogus = 1\n"), file).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = Config::parse(&format!("{base}[defaults]\nkey_size = 12\n"), file).unwrap_err();
        assert!(err.to_string().contains("defaults.key_size"), "{err}");
        let text = format!("{base}[[kme]]\nid=\"k\"\nsae_listen=\"127.0.0.1:1\"\npeer_listen=\"127.0.0.1:2\"\ndata_dir=\"d\"\n[[sae]]\nid=\"s\"\nkme=\"nope\"\n");
        let err = Config::parse(&text, file).unwrap_err();
        assert!(err.to_string().contains("sae.kme"), "{err}");
        let err =
            Config::parse(&format!("{base}[sae_defaults]\nkeys_per_s = 0\n"), file).unwrap_err();
        assert!(err.to_string().contains("sae_defaults.keys_per_s"), "{err}");
    }

    /// A link without `source` is an error naming it, not a silent courier (CSPRNG over TLS).
    #[test]
    fn a_link_must_say_its_key_source() {
        let file = Path::new("x.toml");
        let kmes = "[tls]\nca = \"ca.crt\"\ncert_dir = \".\"\n[[kme]]\nid=\"a\"\nsae_listen=\"127.0.0.1:1\"\npeer_listen=\"127.0.0.1:2\"\ndata_dir=\"d\"\n[[kme]]\nid=\"b\"\nsae_listen=\"127.0.0.1:3\"\npeer_listen=\"127.0.0.1:4\"\ndata_dir=\"e\"\n";
        let err = Config::parse(&format!("{kmes}[[link]]\nends=[\"a\",\"b\"]\n"), file)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("link[a — b].source") && err.contains("missing"),
            "{err}"
        );
        let courier =
            format!("{kmes}[defaults]\nsource = \"courier\"\n[[link]]\nends=[\"a\",\"b\"]\n");
        assert!(
            Config::parse(&courier, file).is_ok(),
            "[defaults] may say it"
        );
    }

    #[test]
    fn peer_url_defaults_to_peer_listen_and_must_be_a_bare_https_url() {
        let file = Path::new("x.toml");
        let network = |b_url: &str| {
            format!("[tls]\nca = \"ca.crt\"\ncert_dir = \".\"\n[[kme]]\nid=\"a\"\nsae_listen=\"127.0.0.1:1\"\npeer_listen=\"127.0.0.1:2\"\ndata_dir=\"d\"\n[[kme]]\nid=\"b\"\nsae_listen=\"127.0.0.1:3\"\npeer_listen=\"0.0.0.0:4\"\ndata_dir=\"e\"\n{b_url}\n[[link]]\nends=[\"a\",\"b\"]\nsource=\"courier\"\n")
        };
        let config = Config::parse(&network(""), file).unwrap();
        assert_eq!(
            config.node("a").unwrap().neighbours[0].url,
            "https://0.0.0.0:4"
        );
        assert_eq!(
            config.node("b").unwrap().neighbours[0].url,
            "https://127.0.0.1:2"
        );
        for (given, used) in [
            (
                "https://kme-b.example.net:9442",
                "https://kme-b.example.net:9442",
            ),
            ("https://192.0.2.7:443/", "https://192.0.2.7:443"),
            ("https://[::1]:9442", "https://[::1]:9442"),
            ("https://localhost", "https://localhost"),
        ] {
            let text = network(&format!("peer_url = \"{given}\""));
            let config = Config::parse(&text, file).unwrap();
            // Only the others use it: b's own view of a is unchanged.
            assert_eq!(config.node("a").unwrap().neighbours[0].url, used);
            assert_eq!(
                config.node("b").unwrap().neighbours[0].url,
                "https://127.0.0.1:2"
            );
            assert_eq!(config.kme("b").unwrap().peer_url, used);
        }
        for bad in [
            "http://127.0.0.1:4",
            "127.0.0.1:4",
            "https://",
            "https://user@host:4",
            "https://host:4/kme-b",
            "https://host:4?x=1",
            "https://host:0",
            "https://host:99999",
            "https://ho st:4",
            "",
        ] {
            let text = network(&format!("peer_url = \"{bad}\""));
            let err = Config::parse(&text, file).unwrap_err();
            assert!(err.to_string().contains("kme.peer_url"), "{bad}: {err}");
        }
    }
}

/// Property tests of the network file parser (`make fuzz` runs them long): any text and the
/// default network mutated anywhere give a configuration or an error, never a panic.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_text_as_a_network_file(text in "(?s).{0,400}") {
            let _ = Config::parse(&text, Path::new("x.toml"));
        }

        #[test]
        fn the_default_network_mutated(at in 0usize..8000, byte in 32u8..127) {
            let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("kme.toml");
            let mut text = std::fs::read(&file).unwrap();
            let at = at % text.len();
            text[at] = byte;
            if let Ok(text) = String::from_utf8(text) {
                if let Ok(config) = Config::parse(&text, &file) {
                    for kme in &config.kmes {
                        let _ = config.node(kme.id.as_str());
                    }
                }
            }
        }
    }
}
