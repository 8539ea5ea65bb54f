//! Load generator for ETSI GS QKD 014 KMEs (`kme-bench load`, `make bench`).
//!
//! Drives one or two KMEs over mutual TLS with a fixed number of concurrent keep-alive
//! connections and reports throughput, latency percentiles and errors:
//!
//! - [`Mode::Status`]: `GET {master_url}/api/v1/keys/{slave_sae_id}/status` as the master SAE;
//! - [`Mode::Enc`]: `POST {master_url}/api/v1/keys/{slave_sae_id}/enc_keys` with
//!   `{"number":N,"size":S}` (and `additional_slave_SAE_IDs` when `--additional-slaves` names
//!   some: a multicast, retrieved by the first slave only), checking N keys of S/8 bytes with
//!   UUID key IDs;
//! - [`Mode::EncDec`]: the enc request above, then `POST {slave_url}/api/v1/keys/{master_sae_id}/dec_keys`
//!   as the slave SAE with the returned key IDs, verifying byte for byte that the slave gets the
//!   same keys. One operation ("request" in the report) is one enc+dec pair, its latency runs from
//!   the start of enc to the end of dec.
//!
//! [`run`] blocks: it spawns `threads` OS threads, each with its own `actix_rt::System` and its own
//! `awc::Client` (one per SAE identity), and spreads the connections over them. Every connection
//! is a loop (request, await, record, repeat) that stops at the deadline (`warmup + duration`) or
//! once `max_requests` measured operations have been issued in total. Operations started during
//! the warm-up are not counted in any figure (throughput, latency, errors) except `mismatches`,
//! which counts every wrong key of the whole run. Latencies are recorded per thread in an
//! `hdrhistogram` (microseconds, successful operations only) and merged at the end.
//!
//! Non-200 answers are counted by status and the loop goes on; after a 503 (exhausted pool) a
//! connection backs off 1–5 ms, after a transport error or timeout 10 ms, so it never spins.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use awc::error::{PayloadError, SendRequestError};
use awc::http::header::{HeaderValue, CONTENT_TYPE};
use awc::http::{StatusCode, Uri};
use awc::{Client, Connector};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hdrhistogram::Histogram;
use kme::etsi::KeyContainer;
use kme::tls::{sae_connector, TlsError};
use openssl::ssl::SslConnector;
use serde::{Deserialize, Serialize};

/// Time limit of one HTTP request (send + response head + body).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time limit of TCP connect and of the TLS handshake, each.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response body accepted (128 keys of 8192 bits are ≈ 190 kB).
const BODY_LIMIT: usize = 16 * 1024 * 1024;
/// Highest latency the histograms track (larger values are clamped).
const HIST_MAX_US: u64 = 120_000_000;
/// Pause after a transport error or a timeout, so that a refused connection does not spin.
const TRANSPORT_BACKOFF: Duration = Duration::from_millis(10);
/// Longest error sample kept per error label.
const SAMPLE_CHARS: usize = 200;

/// What the load generator asks the KMEs for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// GET status at the master's KME.
    #[value(name = "status")]
    Status,
    /// POST enc_keys at the master's KME.
    #[value(name = "enc")]
    Enc,
    /// enc_keys at the master's KME, then dec_keys at the slave's KME, verified byte for byte.
    #[value(name = "encdec")]
    EncDec,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Status => "status",
            Mode::Enc => "enc",
            Mode::EncDec => "encdec",
        })
    }
}

/// Options of one load run (also the `clap` arguments of `kme-bench load`).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct LoadOptions {
    /// What to request: status, enc or encdec (enc at the master's KME + dec at the slave's KME).
    #[arg(long, value_enum, default_value_t = Mode::Status)]
    pub mode: Mode,
    /// Base URL of the master SAE's KME.
    #[arg(long, default_value = "https://localhost:8441")]
    pub master_url: String,
    /// Base URL of the slave SAE's KME (used by encdec).
    #[arg(long, default_value = "https://localhost:8442")]
    pub slave_url: String,
    /// CA certificate (PEM) that the KME server certificates must chain to.
    #[arg(long, default_value = "certs/ca.crt")]
    pub ca: PathBuf,
    /// Client certificate (PEM) of the master SAE.
    #[arg(long, default_value = "certs/sae-a.crt")]
    pub master_cert: PathBuf,
    /// Private key (PEM) of the master SAE.
    #[arg(long, default_value = "certs/sae-a.key")]
    pub master_key: PathBuf,
    /// Client certificate (PEM) of the slave SAE.
    #[arg(long, default_value = "certs/sae-b.crt")]
    pub slave_cert: PathBuf,
    /// Private key (PEM) of the slave SAE.
    #[arg(long, default_value = "certs/sae-b.key")]
    pub slave_key: PathBuf,
    /// SAE ID of the master (the CN of its certificate).
    #[arg(long, default_value = "sae-a")]
    pub master_sae_id: String,
    /// SAE ID of the slave (the CN of its certificate).
    #[arg(long, default_value = "sae-b")]
    pub slave_sae_id: String,
    /// More slaves named in every enc_keys (multicast, comma-separated); encdec retrieves
    /// the keys as the slave only.
    #[arg(long, value_delimiter = ',')]
    pub additional_slaves: Vec<String>,
    /// Concurrent keep-alive connections per target KME.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Client threads; the connections are spread across them.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Keys per enc_keys request.
    #[arg(long, default_value_t = 1)]
    pub number: u32,
    /// Key size in bits (multiple of 8).
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    /// Measured duration, after the warm-up (e.g. 10s, 500ms, 2m).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Stop once this many measured operations have been issued in total (enc+dec pairs count once).
    #[arg(long, default_value_t = 1_000_000_000)]
    pub max_requests: u64,
    /// Warm-up before the measurement (connections are opened then); excluded from the figures.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub warmup: Duration,
    /// Write the report as JSON to this file (parent directories are created).
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            mode: Mode::Status,
            master_url: "https://localhost:8441".into(),
            slave_url: "https://localhost:8442".into(),
            ca: "certs/ca.crt".into(),
            master_cert: "certs/sae-a.crt".into(),
            master_key: "certs/sae-a.key".into(),
            slave_cert: "certs/sae-b.crt".into(),
            slave_key: "certs/sae-b.key".into(),
            master_sae_id: "sae-a".into(),
            slave_sae_id: "sae-b".into(),
            additional_slaves: Vec::new(),
            connections: 64,
            threads: 2,
            number: 1,
            size: 256,
            duration: Duration::from_secs(10),
            max_requests: 1_000_000_000,
            warmup: Duration::from_secs(1),
            json_out: None,
        }
    }
}

/// Why a load run could not be carried out (errors of individual requests are in the [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// An option is out of range.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// A base URL cannot be used.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS client could not be set up (bad certificate, key or CA file).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A latency histogram could not be created.
    #[error("histogram: {0}")]
    HistogramCreate(#[from] hdrhistogram::CreationError),
    /// Latency histograms could not be merged.
    #[error("histogram merge: {0}")]
    HistogramMerge(#[from] hdrhistogram::AdditionError),
    /// A client thread could not be started.
    #[error("cannot start client thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// A client thread or a connection task died.
    #[error("client thread failed: {0}")]
    Thread(String),
    /// The report could not be serialised.
    #[error("JSON report: {0}")]
    Json(#[from] serde_json::Error),
}

/// Latency percentiles of successful operations, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LatencyMs {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

/// Result of a load run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// What was requested.
    pub mode: Mode,
    /// Concurrent connections per target KME.
    pub connections: usize,
    /// Client threads actually used.
    pub threads: usize,
    /// Keys per enc_keys request (0 in status mode).
    pub number: u32,
    /// Key size in bits (0 in status mode).
    pub size: u32,
    /// Measured time: from the end of the warm-up to the last completion of a measured operation.
    pub seconds: f64,
    /// Successful operations in the measured time (an enc+dec pair counts once).
    pub requests: u64,
    /// `requests / seconds`.
    pub requests_per_s: f64,
    /// HTTP requests issued in the measured time, including failed ones.
    pub http_requests: u64,
    /// Keys obtained by successful operations (encdec: keys of fully verified pairs).
    pub keys: u64,
    /// `keys / seconds`.
    pub keys_per_s: f64,
    /// encdec: keys whose dec_keys copy equalled the enc_keys copy byte for byte.
    pub verified_pairs: u64,
    /// Latency percentiles of successful operations.
    pub latency_ms: LatencyMs,
    /// Failed measured operations by label: an HTTP status (`"503"`), `"transport"`,
    /// `"timeout"`, `"body"` (body read error) or `"invalid"` (200 with a malformed answer);
    /// prefixed with `"enc "` or `"dec "` in encdec mode.
    pub errors_by_status: BTreeMap<String, u64>,
    /// The first message seen for each error label, warm-up included (truncated).
    pub error_samples: BTreeMap<String, String>,
    /// Keys whose dec_keys answer differed from the enc_keys answer (other ID, other bytes, or
    /// missing), over the whole run. Must be 0.
    pub mismatches: u64,
}

impl Report {
    /// Total number of failed operations.
    pub fn errors_total(&self) -> u64 {
        self.errors_by_status.values().sum()
    }

    /// Prints the report for people on stdout (mismatches also on stderr).
    pub fn print_human(&self) {
        let unit = if self.mode == Mode::EncDec {
            "pairs"
        } else {
            "requests"
        };
        println!(
            "loadgen: mode={} connections={} threads={} number={} size={}",
            self.mode, self.connections, self.threads, self.number, self.size
        );
        println!("  measured    {:>12.2} s", self.seconds);
        println!(
            "  {:<11} {:>12}  {:>12.1} /s   ({} HTTP requests)",
            unit, self.requests, self.requests_per_s, self.http_requests
        );
        if self.mode != Mode::Status {
            println!(
                "  keys        {:>12}  {:>12.1} /s",
                self.keys, self.keys_per_s
            );
        }
        if self.mode == Mode::EncDec {
            println!(
                "  verified    {:>12}  keys equal byte for byte at both KMEs",
                self.verified_pairs
            );
        }
        let l = &self.latency_ms;
        println!(
            "  latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
        if self.errors_by_status.is_empty() {
            println!("  errors      none");
        } else {
            let list: Vec<String> = self
                .errors_by_status
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            println!("  errors      {}", list.join(", "));
            for (label, sample) in &self.error_samples {
                println!("    {label}: {sample}");
            }
        }
        if self.mismatches > 0 {
            let banner = format!(
                "!!! KEY MISMATCH: {} key(s) returned by dec_keys differ from enc_keys !!!",
                self.mismatches
            );
            println!("  {banner}");
            eprintln!("{banner}");
        } else if self.mode == Mode::EncDec {
            println!("  mismatches  0");
        }
    }

    /// Writes the report as pretty JSON, creating the parent directories.
    pub fn write_json(&self, path: &Path) -> Result<(), LoadError> {
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|source| LoadError::Io {
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
        }
        let mut text = serde_json::to_vec_pretty(self)?;
        text.push(b'\n');
        std::fs::write(path, text).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Parses a duration: `10s`, `500ms`, `1.5s`, `2m`, `100us`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {text:?} (examples: 10s, 500ms, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" => value / 1e6,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} in {text:?}")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

/// Runs the load and returns the report; writes it as JSON when `opts.json_out` is set.
/// Blocks for about `warmup + duration` (plus the completion of in-flight requests).
pub fn run(opts: &LoadOptions) -> Result<Report, LoadError> {
    let plan = Arc::new(Plan::new(opts)?);
    let threads = opts.threads.min(opts.connections);
    let mut handles = Vec::with_capacity(threads);
    for t in 0..threads {
        // Spread the connections: the first `connections % threads` threads get one more.
        let conns = opts.connections / threads + usize::from(t < opts.connections % threads);
        let plan_t = Arc::clone(&plan);
        let spawned = std::thread::Builder::new()
            .name(format!("loadgen-{t}"))
            .spawn(move || thread_main(&plan_t, conns));
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                plan.stop.store(true, Ordering::Relaxed);
                for h in handles {
                    let _ = h.join();
                }
                return Err(LoadError::Spawn(e));
            }
        }
    }

    let mut total = ThreadStats::new()?;
    let mut failure = None;
    for h in handles {
        match h.join() {
            Ok(Ok(stats)) => total.merge(stats)?,
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(_) => {
                failure = failure.or(Some(LoadError::Thread("a client thread panicked".into())))
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }

    let report = total.into_report(opts, threads, plan.warm_end);
    if let Some(path) = &opts.json_out {
        report.write_json(path)?;
    }
    Ok(report)
}

// ------------------------------------------------------------------------------------------------
// Internals

/// Everything the client threads share, computed once.
struct Plan {
    mode: Mode,
    number: usize,
    key_bytes: usize,
    status_uri: Uri,
    enc_uri: Uri,
    dec_uri: Uri,
    enc_body: Vec<u8>,
    master_tls: SslConnector,
    slave_tls: Option<SslConnector>,
    warm_end: Instant,
    end: Instant,
    max_requests: u64,
    /// Measured operations issued so far, over all threads.
    issued: AtomicU64,
    /// Set to stop all loops early.
    stop: AtomicBool,
}

impl Plan {
    fn new(opts: &LoadOptions) -> Result<Self, LoadError> {
        let bad = |m: &str| Err(LoadError::InvalidOption(m.to_string()));
        if opts.connections == 0 {
            return bad("connections must be at least 1");
        }
        if opts.threads == 0 {
            return bad("threads must be at least 1");
        }
        if opts.max_requests == 0 {
            return bad("max_requests must be at least 1");
        }
        if opts.duration.is_zero() {
            return bad("duration must be positive");
        }
        if opts.mode != Mode::Status {
            if opts.number == 0 {
                return bad("number must be at least 1");
            }
            if opts.size == 0 || !opts.size.is_multiple_of(8) {
                return bad("size must be a positive multiple of 8 (bits)");
            }
        }
        if opts.master_sae_id.is_empty() || opts.slave_sae_id.is_empty() {
            return bad("SAE IDs must not be empty");
        }

        let master = base_url(&opts.master_url)?;
        let slave = base_url(&opts.slave_url)?;
        let slave_seg = pct_encode_segment(&opts.slave_sae_id);
        let master_seg = pct_encode_segment(&opts.master_sae_id);
        let status_uri = make_uri(&format!("{master}/api/v1/keys/{slave_seg}/status"))?;
        let enc_uri = make_uri(&format!("{master}/api/v1/keys/{slave_seg}/enc_keys"))?;
        let dec_uri = make_uri(&format!("{slave}/api/v1/keys/{master_seg}/dec_keys"))?;
        let mut request = serde_json::json!({"number": opts.number, "size": opts.size});
        if !opts.additional_slaves.is_empty() {
            request["additional_slave_SAE_IDs"] = serde_json::json!(opts.additional_slaves);
        }
        let enc_body = serde_json::to_vec(&request)?;

        let master_tls = sae_connector(&opts.ca, &opts.master_cert, &opts.master_key)?;
        let slave_tls = if opts.mode == Mode::EncDec {
            Some(sae_connector(&opts.ca, &opts.slave_cert, &opts.slave_key)?)
        } else {
            None
        };

        let start = Instant::now();
        let warm_end = start + opts.warmup;
        Ok(Self {
            mode: opts.mode,
            number: opts.number as usize,
            key_bytes: (opts.size / 8) as usize,
            status_uri,
            enc_uri,
            dec_uri,
            enc_body,
            master_tls,
            slave_tls,
            warm_end,
            end: warm_end + opts.duration,
            max_requests: opts.max_requests,
            issued: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        })
    }
}

/// Checks an `https://host[:port]` base URL and returns it without a trailing slash.
fn base_url(url: &str) -> Result<&str, LoadError> {
    let trimmed = url.trim_end_matches('/');
    let uri: Uri =
        trimmed
            .parse()
            .map_err(|e: awc::http::uri::InvalidUri| LoadError::InvalidUrl {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
    if uri.scheme_str() != Some("https") || uri.host().is_none() {
        return Err(LoadError::InvalidUrl {
            url: url.to_string(),
            reason: "expected https://host[:port]".into(),
        });
    }
    Ok(trimmed)
}

fn make_uri(text: &str) -> Result<Uri, LoadError> {
    text.parse()
        .map_err(|e: awc::http::uri::InvalidUri| LoadError::InvalidUrl {
            url: text.to_string(),
            reason: e.to_string(),
        })
}

/// Percent-encodes one URL path segment (RFC 3986 unreserved characters stay as they are).
fn pct_encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn make_client(tls: &SslConnector, conns: usize) -> Client {
    let connector = Connector::new()
        .connector(kme::tls::NoDelayTcp::default())
        .openssl(tls.clone())
        .limit(conns)
        .timeout(CONNECT_TIMEOUT)
        .handshake_timeout(CONNECT_TIMEOUT)
        .conn_keep_alive(Duration::from_secs(60))
        .conn_lifetime(Duration::from_secs(24 * 3600));
    Client::builder()
        .connector(connector)
        .timeout(REQUEST_TIMEOUT)
        .no_default_headers()
        .disable_redirects()
        .finish()
}

/// Which leg of an operation failed (encdec labels errors with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Leg {
    Single,
    Enc,
    Dec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Status(u16),
    Transport,
    Timeout,
    Body,
    Invalid,
}

/// A failed operation.
#[derive(Debug)]
enum Failure {
    Error {
        leg: Leg,
        kind: Kind,
        detail: String,
    },
    /// Keys that dec_keys returned differently from enc_keys.
    Mismatch { count: u64, detail: String },
}

impl Failure {
    fn send(leg: Leg, e: &SendRequestError) -> Self {
        let kind = match e {
            SendRequestError::Timeout => Kind::Timeout,
            _ => Kind::Transport,
        };
        Failure::Error {
            leg,
            kind,
            detail: e.to_string(),
        }
    }

    fn body(leg: Leg, e: &PayloadError) -> Self {
        let kind = match e {
            PayloadError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => Kind::Timeout,
            _ => Kind::Body,
        };
        Failure::Error {
            leg,
            kind,
            detail: e.to_string(),
        }
    }

    fn status(leg: Leg, status: StatusCode, body: &[u8]) -> Self {
        Failure::Error {
            leg,
            kind: Kind::Status(status.as_u16()),
            detail: String::from_utf8_lossy(body).into_owned(),
        }
    }

    fn invalid(leg: Leg, detail: String) -> Self {
        Failure::Error {
            leg,
            kind: Kind::Invalid,
            detail,
        }
    }
}

/// A successful operation.
#[derive(Debug, Clone, Copy, Default)]
struct Success {
    keys: u64,
    verified: u64,
}

/// Counters and latencies of one thread (or, merged, of the run).
struct ThreadStats {
    hist: Histogram<u64>,
    requests: u64,
    http_requests: u64,
    keys: u64,
    verified: u64,
    mismatches: u64,
    errors: BTreeMap<(Leg, Kind), u64>,
    samples: BTreeMap<(Leg, Kind), String>,
    mismatch_sample: Option<String>,
    last_done: Option<Instant>,
}

impl ThreadStats {
    fn new() -> Result<Self, LoadError> {
        Ok(Self {
            hist: Histogram::new_with_bounds(1, HIST_MAX_US, 3)?,
            requests: 0,
            http_requests: 0,
            keys: 0,
            verified: 0,
            mismatches: 0,
            errors: BTreeMap::new(),
            samples: BTreeMap::new(),
            mismatch_sample: None,
            last_done: None,
        })
    }

    fn record(
        &mut self,
        measured: bool,
        outcome: Result<Success, Failure>,
        start: Instant,
        done: Instant,
    ) {
        if measured {
            self.last_done = Some(done);
        }
        match outcome {
            Ok(s) => {
                if measured {
                    let us = done.saturating_duration_since(start).as_micros();
                    self.hist
                        .saturating_record(u64::try_from(us).unwrap_or(u64::MAX).max(1));
                    self.requests += 1;
                    self.keys += s.keys;
                    self.verified += s.verified;
                }
            }
            Err(Failure::Error { leg, kind, detail }) => {
                if measured {
                    *self.errors.entry((leg, kind)).or_insert(0) += 1;
                }
                self.samples
                    .entry((leg, kind))
                    .or_insert_with(|| truncate(&detail, SAMPLE_CHARS));
            }
            Err(Failure::Mismatch { count, detail }) => {
                // Counted whether measured or not: a wrong key is never excusable.
                if self.mismatch_sample.is_none() {
                    log::error!("KEY MISMATCH between enc_keys and dec_keys: {detail}");
                    eprintln!("loadgen: KEY MISMATCH between enc_keys and dec_keys: {detail}");
                    self.mismatch_sample = Some(detail);
                }
                self.mismatches += count;
            }
        }
    }

    fn merge(&mut self, other: ThreadStats) -> Result<(), LoadError> {
        self.hist.add(&other.hist)?;
        self.requests += other.requests;
        self.http_requests += other.http_requests;
        self.keys += other.keys;
        self.verified += other.verified;
        self.mismatches += other.mismatches;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_insert(0) += v;
        }
        for (k, v) in other.samples {
            self.samples.entry(k).or_insert(v);
        }
        if self.mismatch_sample.is_none() {
            self.mismatch_sample = other.mismatch_sample;
        }
        self.last_done = match (self.last_done, other.last_done) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Ok(())
    }

    fn into_report(self, opts: &LoadOptions, threads: usize, warm_end: Instant) -> Report {
        let end = self.last_done.unwrap_or_else(Instant::now);
        let seconds = end.saturating_duration_since(warm_end).as_secs_f64();
        let rate = |n: u64| {
            if seconds > 0.0 {
                n as f64 / seconds
            } else {
                0.0
            }
        };
        let ms = |us: u64| us as f64 / 1000.0;
        let latency_ms = if self.hist.is_empty() {
            LatencyMs::default()
        } else {
            LatencyMs {
                p50: ms(self.hist.value_at_quantile(0.50)),
                p90: ms(self.hist.value_at_quantile(0.90)),
                p99: ms(self.hist.value_at_quantile(0.99)),
                p999: ms(self.hist.value_at_quantile(0.999)),
                max: ms(self.hist.max()),
            }
        };
        let mut errors_by_status = BTreeMap::new();
        for (k, v) in &self.errors {
            errors_by_status.insert(error_label(*k), *v);
        }
        let mut error_samples: BTreeMap<String, String> = self
            .samples
            .iter()
            .map(|(k, v)| (error_label(*k), v.clone()))
            .collect();
        if let Some(m) = self.mismatch_sample {
            error_samples.insert("mismatch".into(), m);
        }
        let keyed = opts.mode != Mode::Status;
        Report {
            mode: opts.mode,
            connections: opts.connections,
            threads,
            number: if keyed { opts.number } else { 0 },
            size: if keyed { opts.size } else { 0 },
            seconds,
            requests: self.requests,
            requests_per_s: rate(self.requests),
            http_requests: self.http_requests,
            keys: self.keys,
            keys_per_s: rate(self.keys),
            verified_pairs: self.verified,
            latency_ms,
            errors_by_status,
            error_samples,
            mismatches: self.mismatches,
        }
    }
}

fn error_label((leg, kind): (Leg, Kind)) -> String {
    let kind = match kind {
        Kind::Status(code) => code.to_string(),
        Kind::Transport => "transport".into(),
        Kind::Timeout => "timeout".into(),
        Kind::Body => "body".into(),
        Kind::Invalid => "invalid".into(),
    };
    match leg {
        Leg::Single => kind,
        Leg::Enc => format!("enc {kind}"),
        Leg::Dec => format!("dec {kind}"),
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    let mut out: String = s.chars().take(max_chars).collect();
    if s.chars().nth(max_chars).is_some() {
        out.push('…');
    }
    out
}

/// One client thread: its own actix System, its own awc Clients, `conns` connection loops.
fn thread_main(plan: &Arc<Plan>, conns: usize) -> Result<ThreadStats, LoadError> {
    let stats = Rc::new(RefCell::new(ThreadStats::new()?));
    let system = actix_rt::System::new();
    let failed_tasks = system.block_on(async {
        let master = make_client(&plan.master_tls, conns);
        let slave = plan.slave_tls.as_ref().map(|tls| make_client(tls, conns));
        let ctx = Rc::new(ThreadCtx {
            plan: Arc::clone(plan),
            master,
            slave,
            stats: Rc::clone(&stats),
        });
        let tasks: Vec<_> = (0..conns)
            .map(|i| actix_rt::spawn(connection_loop(Rc::clone(&ctx), i)))
            .collect();
        let mut failed = 0usize;
        for t in tasks {
            if t.await.is_err() {
                failed += 1;
            }
        }
        failed
    });
    if failed_tasks > 0 {
        return Err(LoadError::Thread(format!(
            "{failed_tasks} connection task(s) died"
        )));
    }
    Rc::try_unwrap(stats)
        .map(RefCell::into_inner)
        .map_err(|_| LoadError::Thread("statistics still in use".into()))
}

struct ThreadCtx {
    plan: Arc<Plan>,
    master: Client,
    slave: Option<Client>,
    stats: Rc<RefCell<ThreadStats>>,
}

/// Per-connection scratch buffers, reused across requests.
#[derive(Default)]
struct Scratch {
    enc_keys: Vec<u8>,
    ids: Vec<u128>,
    key: Vec<u8>,
    matched: Vec<bool>,
}

/// One keep-alive connection: request, await, record, repeat until the deadline or the cap.
async fn connection_loop(ctx: Rc<ThreadCtx>, index: usize) {
    let plan = &*ctx.plan;
    let mut scratch = Scratch::default();
    let mut rng = XorShift::new(index);
    loop {
        let start = Instant::now();
        if start >= plan.end || plan.stop.load(Ordering::Relaxed) {
            break;
        }
        let measured = start >= plan.warm_end;
        if measured && plan.issued.fetch_add(1, Ordering::Relaxed) >= plan.max_requests {
            break;
        }
        let (outcome, http) = match plan.mode {
            Mode::Status => (status_once(&ctx).await, 1),
            Mode::Enc => (enc_once(&ctx, &mut scratch).await, 1),
            Mode::EncDec => encdec_once(&ctx, &mut scratch).await,
        };
        let done = Instant::now();
        let backoff = match &outcome {
            Err(Failure::Error {
                kind: Kind::Status(503),
                ..
            }) => Some(Duration::from_micros(1000 + rng.below(4000))),
            Err(Failure::Error {
                kind: Kind::Transport | Kind::Timeout,
                ..
            }) => Some(TRANSPORT_BACKOFF),
            _ => None,
        };
        {
            let mut st = ctx.stats.borrow_mut();
            if measured {
                st.http_requests += http;
            }
            st.record(measured, outcome, start, done);
        }
        if let Some(pause) = backoff {
            actix_rt::time::sleep(pause).await;
        }
    }
}

/// Sends one request and reads the whole answer; anything but 200 is a failure.
async fn exchange(
    req: awc::ClientRequest,
    body: Option<Vec<u8>>,
    leg: Leg,
) -> Result<impl AsRef<[u8]>, Failure> {
    let req = req.no_decompress();
    let sent = match body {
        Some(b) => req
            .insert_header((CONTENT_TYPE, HeaderValue::from_static("application/json")))
            .send_body(b),
        None => req.send(),
    };
    let mut resp = sent.await.map_err(|e| Failure::send(leg, &e))?;
    // Always read the body, so that the connection goes back to the pool.
    let answer = resp
        .body()
        .limit(BODY_LIMIT)
        .await
        .map_err(|e| Failure::body(leg, &e))?;
    if resp.status() != StatusCode::OK {
        return Err(Failure::status(leg, resp.status(), &answer));
    }
    Ok(answer)
}

async fn status_once(ctx: &ThreadCtx) -> Result<Success, Failure> {
    let leg = Leg::Single;
    let req = ctx.master.get(ctx.plan.status_uri.clone());
    let answer = exchange(req, None, leg).await?;
    let status: StatusProbe = serde_json::from_slice(answer.as_ref())
        .map_err(|e| Failure::invalid(leg, format!("status answer: {e}")))?;
    let _ = (status.key_size, status.stored_key_count);
    Ok(Success::default())
}

/// POST enc_keys at the master's KME and validate the answer.
async fn enc_once(ctx: &ThreadCtx, scratch: &mut Scratch) -> Result<Success, Failure> {
    let leg = Leg::Single;
    let plan = &*ctx.plan;
    let req = ctx.master.post(plan.enc_uri.clone());
    let answer = exchange(req, Some(plan.enc_body.clone()), leg).await?;
    let enc: KeyContainer<'_> = serde_json::from_slice(answer.as_ref())
        .map_err(|e| Failure::invalid(leg, format!("enc_keys answer: {e}")))?;
    check_enc_keys(
        &enc,
        plan.number,
        plan.key_bytes,
        &mut scratch.enc_keys,
        &mut scratch.ids,
    )
    .map_err(|e| Failure::invalid(leg, e))?;
    Ok(Success {
        keys: enc.keys.len() as u64,
        verified: 0,
    })
}

/// enc_keys at the master's KME, dec_keys at the slave's KME, byte-for-byte comparison.
/// Returns the outcome and the number of HTTP requests made.
async fn encdec_once(ctx: &ThreadCtx, scratch: &mut Scratch) -> (Result<Success, Failure>, u64) {
    let plan = &*ctx.plan;
    let req = ctx.master.post(plan.enc_uri.clone());
    let enc_answer = match exchange(req, Some(plan.enc_body.clone()), Leg::Enc).await {
        Ok(a) => a,
        Err(f) => return (Err(f), 1),
    };
    let enc: KeyContainer<'_> = match serde_json::from_slice(enc_answer.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            let f = Failure::invalid(Leg::Enc, format!("enc_keys answer: {e}"));
            return (Err(f), 1);
        }
    };
    if let Err(e) = check_enc_keys(
        &enc,
        plan.number,
        plan.key_bytes,
        &mut scratch.enc_keys,
        &mut scratch.ids,
    ) {
        return (Err(Failure::invalid(Leg::Enc, e)), 1);
    }
    (dec_and_compare(ctx, scratch, &enc).await, 2)
}

async fn dec_and_compare(
    ctx: &ThreadCtx,
    scratch: &mut Scratch,
    enc: &KeyContainer<'_>,
) -> Result<Success, Failure> {
    let leg = Leg::Dec;
    let plan = &*ctx.plan;
    let Some(slave) = &ctx.slave else {
        return Err(Failure::invalid(leg, "no slave client (internal)".into()));
    };
    let req = slave.post(plan.dec_uri.clone());
    let answer = exchange(req, Some(dec_body(enc)), leg).await?;
    let dec: KeyContainer<'_> = serde_json::from_slice(answer.as_ref())
        .map_err(|e| Failure::invalid(leg, format!("dec_keys answer: {e}")))?;
    let cmp = compare_dec_keys(
        enc,
        &scratch.enc_keys,
        plan.key_bytes,
        &dec,
        &mut scratch.key,
        &mut scratch.matched,
    );
    if cmp.mismatched > 0 {
        return Err(Failure::Mismatch {
            count: cmp.mismatched,
            detail: cmp.detail,
        });
    }
    Ok(Success {
        keys: cmp.verified,
        verified: cmp.verified,
    })
}

/// `{"key_IDs":[{"key_ID":"…"},…]}` — UUIDs need no escaping.
fn dec_body(enc: &KeyContainer<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + enc.keys.len() * 50);
    out.extend_from_slice(br#"{"key_IDs":["#);
    for (i, k) in enc.keys.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(br#"{"key_ID":""#);
        let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
        out.extend_from_slice(k.key_ID.hyphenated().encode_lower(&mut id).as_bytes());
        out.extend_from_slice(br#""}"#);
    }
    out.extend_from_slice(b"]}");
    out
}

#[derive(Deserialize)]
struct StatusProbe {
    key_size: u64,
    stored_key_count: u64,
}

/// Checks an enc_keys answer: `number` keys, each `key_bytes` long, with UUID key IDs, no ID twice;
/// leaves the decoded keys in `out`, in answer order (`ids` is scratch space).
fn check_enc_keys(
    c: &KeyContainer<'_>,
    number: usize,
    key_bytes: usize,
    out: &mut Vec<u8>,
    ids: &mut Vec<u128>,
) -> Result<(), String> {
    if c.keys.len() != number {
        return Err(format!("asked for {number} keys, got {}", c.keys.len()));
    }
    out.clear();
    out.resize(number * key_bytes + 3, 0);
    ids.clear();
    for (i, k) in c.keys.iter().enumerate() {
        ids.push(k.key_ID.as_u128());
        let slot = &mut out[i * key_bytes..];
        let n = B64
            .decode_slice(k.key.as_bytes(), slot)
            .map_err(|e| format!("key {}: bad base64 or too long: {e}", k.key_ID))?;
        if n != key_bytes {
            return Err(format!("key {}: {n} bytes, expected {key_bytes}", k.key_ID));
        }
    }
    out.truncate(number * key_bytes);
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("key_ID {:032x} appears twice in one answer", w[0]));
    }
    Ok(())
}

/// Result of comparing a dec_keys answer with its enc_keys answer.
struct Comparison {
    verified: u64,
    mismatched: u64,
    /// The first mismatch, described.
    detail: String,
}

/// Compares a dec_keys answer with the enc_keys answer `enc` (whose decoded keys are `enc_keys`,
/// in order): every enc key must come back exactly once, with the same bytes.
fn compare_dec_keys(
    enc: &KeyContainer<'_>,
    enc_keys: &[u8],
    key_bytes: usize,
    dec: &KeyContainer<'_>,
    buf: &mut Vec<u8>,
    matched: &mut Vec<bool>,
) -> Comparison {
    let ids = &enc.keys;
    let mut verified = 0u64;
    let mut mismatched = 0u64;
    let mut detail = String::new();
    let note = |detail: &mut String, text: String| {
        if detail.is_empty() {
            *detail = text;
        }
    };
    matched.clear();
    matched.resize(ids.len(), false);
    buf.clear();
    buf.resize(key_bytes + 3, 0);
    for (i, k) in dec.keys.iter().enumerate() {
        // Same order as requested is the fast path; otherwise search.
        let pos = if ids.get(i).is_some_and(|e| e.key_ID == k.key_ID) {
            Some(i)
        } else {
            ids.iter().position(|e| e.key_ID == k.key_ID)
        };
        let Some(j) = pos else {
            mismatched += 1;
            note(
                &mut detail,
                format!(
                    "dec_keys returned key_ID {} that enc_keys did not",
                    k.key_ID
                ),
            );
            continue;
        };
        if matched[j] {
            mismatched += 1;
            note(
                &mut detail,
                format!("dec_keys returned key_ID {} twice", k.key_ID),
            );
            continue;
        }
        matched[j] = true;
        let expected = enc_keys.get(j * key_bytes..(j + 1) * key_bytes);
        match (
            B64.decode_slice(k.key.as_bytes(), buf.as_mut_slice()),
            expected,
        ) {
            (Ok(n), Some(exp)) if n == key_bytes && buf[..n] == *exp => verified += 1,
            _ => {
                mismatched += 1;
                note(
                    &mut detail,
                    format!("key {}: bytes from dec_keys differ from enc_keys", k.key_ID),
                );
            }
        }
    }
    let missing = matched.iter().filter(|m| !**m).count() as u64;
    if missing > 0 {
        mismatched += missing;
        note(
            &mut detail,
            format!(
                "dec_keys did not return {missing} of the {} requested keys",
                ids.len()
            ),
        );
    }
    Comparison {
        verified,
        mismatched,
        detail,
    }
}

/// Tiny PRNG for back-off jitter.
struct XorShift(u64);

impl XorShift {
    fn new(seed: usize) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        Self((seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(nanos) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        if n == 0 {
            0
        } else {
            x % n
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: LoadOptions,
    }

    #[test]
    fn clap_defaults_equal_default() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.opts, LoadOptions::default());
        let cli = Cli::try_parse_from(["x", "--mode", "encdec", "--duration", "250ms"]).unwrap();
        assert_eq!(cli.opts.mode, Mode::EncDec);
        assert_eq!(cli.opts.duration, Duration::from_millis(250));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn url_segments() {
        assert_eq!(pct_encode_segment("sae-a"), "sae-a");
        assert_eq!(pct_encode_segment("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn bad_options_are_rejected() {
        let mut o = LoadOptions {
            connections: 0,
            ..LoadOptions::default()
        };
        assert!(matches!(Plan::new(&o), Err(LoadError::InvalidOption(_))));
        o.connections = 1;
        o.mode = Mode::Enc;
        o.size = 12;
        assert!(matches!(Plan::new(&o), Err(LoadError::InvalidOption(_))));
        o.size = 256;
        o.master_url = "http://localhost:1".into();
        assert!(matches!(Plan::new(&o), Err(LoadError::InvalidUrl { .. })));
        o.master_url = "https://localhost:1".into();
        o.ca = "/nonexistent/ca.crt".into();
        let err = Plan::new(&o).err().unwrap();
        assert!(matches!(err, LoadError::Tls(_)), "{err}");
        assert!(err.to_string().contains("/nonexistent/ca.crt"), "{err}");
    }

    fn container(json: &str) -> KeyContainer<'_> {
        serde_json::from_str(json).unwrap()
    }

    const ID1: &str = "11111111-1111-4111-8111-111111111111";
    const ID2: &str = "22222222-2222-4222-8222-222222222222";

    fn enc_json(k1: &[u8], k2: &[u8]) -> String {
        format!(
            r#"{{"keys":[{{"key_ID":"{ID1}","key":"{}","key_extension":{{}}}},{{"key_ID":"{ID2}","key":"{}"}}],"key_container_extension":{{}}}}"#,
            B64.encode(k1),
            B64.encode(k2)
        )
    }

    #[test]
    fn enc_answers_are_checked() {
        let (mut out, mut ids) = (Vec::new(), Vec::new());
        let json = enc_json(&[1; 4], &[2; 4]);
        check_enc_keys(&container(&json), 2, 4, &mut out, &mut ids).unwrap();
        assert_eq!(out, [1, 1, 1, 1, 2, 2, 2, 2]);
        assert!(check_enc_keys(&container(&json), 3, 4, &mut out, &mut ids).is_err());
        assert!(check_enc_keys(&container(&json), 2, 5, &mut out, &mut ids).is_err());
        assert!(check_enc_keys(&container(&json), 2, 3, &mut out, &mut ids).is_err());
        let bad_id = json.replace(ID1, "not-a-uuid");
        assert!(serde_json::from_str::<KeyContainer<'_>>(&bad_id).is_err());
        let dup = json.replace(ID2, ID1);
        assert!(check_enc_keys(&container(&dup), 2, 4, &mut out, &mut ids).is_err());
    }

    #[test]
    fn dec_answers_are_compared() {
        let enc_text = enc_json(&[1; 4], &[2; 4]);
        let enc_c = container(&enc_text);
        let enc = [1u8, 1, 1, 1, 2, 2, 2, 2];
        let (mut buf, mut matched) = (Vec::new(), Vec::new());
        let mut cmp = |json: &str| {
            let c = compare_dec_keys(&enc_c, &enc, 4, &container(json), &mut buf, &mut matched);
            (c.verified, c.mismatched, c.detail)
        };

        assert_eq!(cmp(&enc_json(&[1; 4], &[2; 4])).0, 2);
        // Reordered answer is fine.
        let swapped = format!(
            r#"{{"keys":[{{"key_ID":"{ID2}","key":"{}"}},{{"key_ID":"{ID1}","key":"{}"}}]}}"#,
            B64.encode([2u8; 4]),
            B64.encode([1u8; 4])
        );
        assert_eq!(cmp(&swapped).0, 2);
        // One byte differs.
        let (v, m, d) = cmp(&enc_json(&[1; 4], &[2, 2, 2, 3]));
        assert_eq!((v, m), (1, 1));
        assert!(d.contains(ID2));
        // A key missing, and one ID twice.
        let one = format!(
            r#"{{"keys":[{{"key_ID":"{ID1}","key":"{}"}}]}}"#,
            B64.encode([1u8; 4])
        );
        assert_eq!(cmp(&one).1, 1);
        let twice = enc_json(&[1; 4], &[1; 4]).replace(ID2, ID1);
        assert_eq!(cmp(&twice).1, 2);
    }

    #[test]
    fn dec_body_shape() {
        let enc_text = enc_json(&[1; 4], &[2; 4]);
        let body = dec_body(&container(&enc_text));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["key_IDs"][1]["key_ID"], ID2);
    }

    #[test]
    fn report_json_and_labels() {
        let mut st = ThreadStats::new().unwrap();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(3);
        st.record(
            true,
            Ok(Success {
                keys: 2,
                verified: 2,
            }),
            t0,
            t1,
        );
        st.record(
            true,
            Err(Failure::status(Leg::Dec, StatusCode::BAD_REQUEST, b"nope")),
            t0,
            t1,
        );
        st.record(
            false,
            Err(Failure::Mismatch {
                count: 3,
                detail: "x".into(),
            }),
            t0,
            t1,
        );
        let opts = LoadOptions {
            mode: Mode::EncDec,
            ..LoadOptions::default()
        };
        let r = st.into_report(&opts, 2, t0);
        assert_eq!(r.requests, 1);
        assert_eq!(r.mismatches, 3);
        assert_eq!(r.errors_by_status.get("dec 400"), Some(&1));
        assert!((r.latency_ms.p50 - 3.0).abs() < 0.01);
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["mode"], "encdec");
        assert_eq!(v["verified_pairs"], 2);
        let dir = std::env::temp_dir().join(format!("loadgen-test-{}", std::process::id()));
        let path = dir.join("sub/report.json");
        r.write_json(&path).unwrap();
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("\"keys_per_s\""));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
