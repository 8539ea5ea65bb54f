//! `kme sae`: an ETSI GS QKD 014 SAE client for scripts and the quick start.
//!
//! Who and where: `--config kme.toml --sae sae-a` takes the SAE's certificate, key, the CA and
//! its home KME's SAE API from the network file (the dev PKI of `make certs`); or
//! `--cert/--key/--ca/--kme-url` name them. It prints the KME's JSON answer on stdout, and
//! its exit code tells the answers apart, so scripts need not parse an error to branch:
//!
//! | exit | answer |
//! |---|---|
//! | 0 | 200 |
//! | 2 | 400 (the request is wrong) |
//! | 3 | 401 (this certificate may not do that) |
//! | 4 | 503 (retry later; `--retry N` does, waiting as `Retry-After` says) |
//! | 1 | anything else: usage, files, TLS, network, an unexpected status |

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use awc::http::header::RETRY_AFTER;
use serde_json::{json, Value};

use crate::config::Config;
use crate::tls;

#[derive(clap::Args)]
pub struct SaeArgs {
    /// Network file to take the SAE's certificate, key, CA and KME from (with --sae).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The SAE of the network file to act as.
    #[arg(long, conflicts_with_all = ["cert", "key", "ca", "kme_url"])]
    sae: Option<String>,
    /// The SAE's certificate (PEM).
    #[arg(long, requires_all = ["key", "ca", "kme_url"])]
    cert: Option<PathBuf>,
    /// The SAE's private key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// The CA that signed the KME's certificate (PEM).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The KME's SAE API, e.g. https://localhost:8441.
    #[arg(long)]
    kme_url: Option<String>,
    /// On 503, retry up to this many times, waiting as Retry-After says (1 s without it).
    #[arg(long, default_value_t = 0)]
    retry: u32,
    /// Time limit of each request, in seconds.
    #[arg(long, default_value_t = 10)]
    timeout_s: u64,
    #[command(subcommand)]
    request: SaeRequest,
}

#[derive(clap::Subcommand)]
enum SaeRequest {
    /// Status of the keys for SLAVE (GET .../{slave}/status).
    Status { slave: String },
    /// Get keys for SLAVE (POST .../{slave}/enc_keys).
    Enc {
        slave: String,
        #[arg(long)]
        number: Option<u32>,
        /// Key size in bits.
        #[arg(long)]
        size: Option<u32>,
        /// More slaves of the same keys (multicast), comma-separated.
        #[arg(long, value_delimiter = ',')]
        additional: Vec<String>,
        /// `extension_mandatory` as JSON, e.g. '[{"kme_route_type":"direct"}]'.
        #[arg(long)]
        extension_mandatory: Option<String>,
    },
    /// Retrieve MASTER's keys by their key_IDs (POST .../{master}/dec_keys).
    Dec {
        master: String,
        #[arg(required = true)]
        key_ids: Vec<String>,
    },
    /// Which SAE this certificate is, at which KME (GET /api/v1/sae/info/me).
    Whoami,
}

/// What one request needs: where, with which identity.
struct Endpoint {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    url: String,
}

/// Runs `kme sae ...`: prints the answer, returns the exit code of the table above.
pub fn run(args: SaeArgs) -> ExitCode {
    match answer(args) {
        Ok((status, body)) => {
            println!("{body}");
            ExitCode::from(match status {
                200 => 0,
                400 => 2,
                401 => 3,
                503 => 4,
                _ => 1,
            })
        }
        Err(message) => {
            eprintln!("kme sae: {message}");
            ExitCode::FAILURE
        }
    }
}

fn endpoint(args: &SaeArgs) -> Result<Endpoint, String> {
    if let Some(sae) = &args.sae {
        let config =
            Config::load(&Config::locate(args.config.as_deref())).map_err(|err| err.to_string())?;
        let home = config
            .sae_homes
            .get(&kme_actors::types::SaeId::new(sae))
            .ok_or_else(|| {
                format!(
                    "no [[sae]] with id = \"{sae}\" in {}",
                    config.file.display()
                )
            })?;
        let kme = config
            .kme(home.as_str())
            .ok_or_else(|| format!("no [[kme]] {home}"))?;
        let listen = kme.sae_listen;
        // The dev certificates name localhost; any other address is used as it is.
        let host = if listen.ip().is_loopback() {
            "localhost".to_string()
        } else {
            listen.ip().to_string()
        };
        return Ok(Endpoint {
            cert: config.cert_dir.join(format!("{sae}.crt")),
            key: config.cert_dir.join(format!("{sae}.key")),
            ca: config.ca.clone(),
            url: format!("https://{host}:{}", listen.port()),
        });
    }
    match (&args.cert, &args.key, &args.ca, &args.kme_url) {
        (Some(cert), Some(key), Some(ca), Some(url)) => Ok(Endpoint {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
            url: url.trim_end_matches('/').to_string(),
        }),
        _ => Err(
            "say who you are: --sae ID (with --config), or --cert, --key, --ca and --kme-url"
                .into(),
        ),
    }
}

/// The method, path and body of the request.
fn request(request: &SaeRequest) -> Result<(&'static str, String, Option<Value>), String> {
    Ok(match request {
        SaeRequest::Status { slave } => ("GET", format!("/api/v1/keys/{slave}/status"), None),
        SaeRequest::Enc {
            slave,
            number,
            size,
            additional,
            extension_mandatory,
        } => {
            let mut body = json!({});
            if let Some(number) = number {
                body["number"] = json!(number);
            }
            if let Some(size) = size {
                body["size"] = json!(size);
            }
            if !additional.is_empty() {
                body["additional_slave_SAE_IDs"] = json!(additional);
            }
            if let Some(extensions) = extension_mandatory {
                body["extension_mandatory"] = serde_json::from_str(extensions)
                    .map_err(|err| format!("--extension-mandatory is not JSON: {err}"))?;
            }
            ("POST", format!("/api/v1/keys/{slave}/enc_keys"), Some(body))
        }
        SaeRequest::Dec { master, key_ids } => {
            let ids: Vec<Value> = key_ids.iter().map(|id| json!({"key_ID": id})).collect();
            (
                "POST",
                format!("/api/v1/keys/{master}/dec_keys"),
                Some(json!({"key_IDs": ids})),
            )
        }
        SaeRequest::Whoami => ("GET", "/api/v1/sae/info/me".into(), None),
    })
}

fn answer(args: SaeArgs) -> Result<(u16, Value), String> {
    let endpoint = endpoint(&args)?;
    let (method, path, body) = request(&args.request)?;
    let connector = tls::sae_connector(&endpoint.ca, &endpoint.cert, &endpoint.key)
        .map_err(|err| err.to_string())?;
    let url = format!("{}{path}", endpoint.url);
    let timeout = Duration::from_secs(args.timeout_s.max(1));
    actix_rt::System::new().block_on(async move {
        let client = tls::https_client(connector, 1, timeout);
        let mut retries_left = args.retry;
        loop {
            let sent = match (method, &body) {
                ("POST", Some(body)) => client.post(&url).send_json(body).await,
                _ => client.get(&url).send().await,
            };
            let mut response = sent.map_err(|err| format!("{url}: {err}"))?;
            let status = response.status().as_u16();
            let wait = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1);
            let bytes = response
                .body()
                .limit(64 * 1024 * 1024)
                .await
                .map_err(|err| format!("{url}: {err}"))?;
            let body: Value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
            if status != 503 || retries_left == 0 {
                return Ok((status, body));
            }
            retries_left -= 1;
            eprintln!("kme sae: 503 ({}); retrying in {wait} s", body["message"]);
            actix_rt::time::sleep(Duration::from_secs(wait.min(60))).await;
        }
    })
}
