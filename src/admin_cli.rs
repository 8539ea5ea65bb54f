//! `kme admin`: the operator's listener (`admin_api.rs`) from the terminal.
//!
//! `kme admin --kme kme-a reload` finds kme-a's `admin_listen` in the network file; with
//! `admin_tls` it presents `<cert_dir>/<operator>.crt` (`--operator`, default `operator`).
//! Human-readable by default, `--json` for the answer as it came. Exit code 0 when the
//! listener said yes (200), 1 otherwise.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use crate::config::Config;
use crate::tls;

#[derive(clap::Args)]
pub struct AdminArgs {
    #[arg(long)]
    config: Option<PathBuf>,
    /// The KME whose admin listener to ask.
    #[arg(long)]
    kme: String,
    /// The operator whose certificate (`<cert_dir>/<id>.crt`) to present when the listener
    /// has TLS.
    #[arg(long, default_value = "operator")]
    operator: String,
    /// The listener's URL (`http://host:port` or `https://...`), instead of the file's
    /// `admin_listen` (a port chosen at start, a proxy).
    #[arg(long)]
    url: Option<String>,
    /// Print the answer's JSON (or the metrics text) as it came.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    request: AdminRequest,
}

#[derive(clap::Subcommand)]
enum AdminRequest {
    /// Does the process answer?
    Health,
    /// Is it ready to serve keys (store, links)? Lists the reasons when not.
    Ready,
    /// The Prometheus metrics.
    Metrics,
    /// Re-read the network file: SAEs, pinned certificates, rate limits.
    Reload,
}

pub fn run(args: AdminArgs) -> ExitCode {
    match ask(&args) {
        Ok((ok, body)) => {
            println!(
                "{}",
                if args.json {
                    body
                } else {
                    human(&args.request, &body)
                }
            );
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(message) => {
            eprintln!("kme admin: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The answer for a person: one line per fact.
fn human(request: &AdminRequest, body: &str) -> String {
    let Ok(json) = serde_json::from_str::<Value>(body) else {
        return body.to_string();
    };
    let list = |v: &Value| -> String {
        let items: Vec<&str> = v
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if items.is_empty() {
            "none".into()
        } else {
            items.join(", ")
        }
    };
    match request {
        AdminRequest::Ready if json["ready"] == true => format!("{}: ready", json["kme"]),
        AdminRequest::Ready => format!("{}: not ready: {}", json["kme"], list(&json["reasons"])),
        AdminRequest::Reload if json.get("added").is_some() => format!(
            "reloaded: SAEs added: {}; removed: {}",
            list(&json["added"]),
            list(&json["removed"])
        ),
        AdminRequest::Health if json["status"] == "ok" => format!("{}: ok", json["kme"]),
        _ => json["message"]
            .as_str()
            .map_or_else(|| body.to_string(), str::to_string),
    }
}

/// Whether the listener answered 200, and the body it answered.
fn ask(args: &AdminArgs) -> Result<(bool, String), String> {
    let config =
        Config::load(&Config::locate(args.config.as_deref())).map_err(|err| err.to_string())?;
    let kme = config
        .kme(&args.kme)
        .ok_or_else(|| format!("no [[kme]] {} in {}", args.kme, config.file.display()))?;
    let admin = kme
        .admin
        .ok_or_else(|| format!("{} has no admin_listen", args.kme))?;
    let path = match args.request {
        AdminRequest::Health => "/health",
        AdminRequest::Ready => "/ready",
        AdminRequest::Metrics => "/metrics",
        AdminRequest::Reload => "/reload",
    };
    let client = if admin.tls {
        let cert = |ext: &str| config.cert_dir.join(format!("{}.{ext}", args.operator));
        let connector = tls::sae_connector(&config.ca, &cert("crt"), &cert("key"))
            .map_err(|err| err.to_string())?;
        Some(connector)
    } else {
        None
    };
    let url = match &args.url {
        Some(url) => format!("{}{path}", url.trim_end_matches('/')),
        None => {
            let host = if admin.addr.ip().is_loopback() {
                "localhost".to_string()
            } else {
                admin.addr.ip().to_string()
            };
            let scheme = if admin.tls { "https" } else { "http" };
            format!("{scheme}://{host}:{}{path}", admin.addr.port())
        }
    };
    let post = matches!(args.request, AdminRequest::Reload);
    actix_rt::System::new().block_on(async move {
        let timeout = Duration::from_secs(30);
        let client = match client {
            Some(connector) => tls::https_client(connector, 1, timeout),
            None => awc::Client::builder().timeout(timeout).finish(),
        };
        let request = if post {
            client.post(&url)
        } else {
            client.get(&url)
        };
        let mut response = request
            .send()
            .await
            .map_err(|err| format!("{url}: {err}"))?;
        let body = response
            .body()
            .limit(16 * 1024 * 1024)
            .await
            .map_err(|err| format!("{url}: {err}"))?;
        Ok((
            response.status().is_success(),
            String::from_utf8_lossy(&body).into_owned(),
        ))
    })
}
