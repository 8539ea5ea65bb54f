//! `kme admin`: the operator's listener (`admin_api.rs`) from the terminal: health, ready,
//! metrics, reload, network (links and SAEs), events (latest audit records), audit-verify, audit-export.
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
    /// Every KME and link as this KME sees them, and the SAEs.
    Network,
    /// The latest audit records.
    Events,
    /// Check the audit trail's hash chain now.
    AuditVerify,
    /// The oldest closed segment of the audit trail as JSON lines (at most 10,000 records;
    /// `kme audit prune` on the KME's host may then delete it).
    AuditExport {
        /// Last record of the segment (default: all closed ones, within the limit).
        #[arg(long)]
        upto: Option<i64>,
    },
}

pub fn run(args: AdminArgs) -> ExitCode {
    match ask(&args) {
        Ok((ok, body)) => {
            let text = if args.json {
                body
            } else {
                human(&args.request, &body)
            };
            // JSON lines (an audit export) end with their own newline.
            if text.ends_with('\n') {
                print!("{text}");
            } else {
                println!("{text}");
            }
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
            "reloaded: SAEs added: {}; removed: {}; certificates revoked: {}",
            list(&json["added"]),
            list(&json["removed"]),
            json["revoked"]
        ),
        AdminRequest::Health if json["status"] == "ok" => format!("{}: ok", json["kme"]),
        AdminRequest::AuditVerify if json["intact"] == true => {
            format!("audit trail intact: {} records", json["records"])
        }
        AdminRequest::Network if json.get("links").is_some() => network_table(&json),
        AdminRequest::Events if json.get("events").is_some() => events_table(&json),
        _ => json["message"]
            .as_str()
            .map_or_else(|| body.to_string(), str::to_string),
    }
}

/// `value` as a table cell: strings bare, numbers with at most 3 decimals, null as "–".
fn cell(value: &Value) -> String {
    match value {
        Value::Null => "–".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => n
            .as_f64()
            .filter(|f| f.fract() != 0.0)
            .map_or_else(|| n.to_string(), |f| format!("{f:.3}")),
        other => other.to_string(),
    }
}

/// Rows of cells, columns padded to their widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

fn network_table(json: &Value) -> String {
    let empty = Vec::new();
    let links = json["links"].as_array().unwrap_or(&empty);
    let link_rows = links
        .iter()
        .map(|l| {
            let fill: Vec<String> = l["fill"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|f| {
                    f.as_f64()
                        .map_or("–".into(), |f| format!("{:.0} %", 100.0 * f))
                })
                .collect();
            vec![
                format!("{} — {}", cell(&l["ends"][0]), cell(&l["ends"][1])),
                cell(&l["state"]),
                cell(&l["qber"]),
                cell(&l["secret_bits_per_s"]),
                fill.join(" / "),
            ]
        })
        .collect();
    let saes = json["saes"].as_array().unwrap_or(&empty);
    let sae_rows = saes
        .iter()
        .map(|s| vec![cell(&s["sae"]), cell(&s["kme"]), cell(&s["keys"])])
        .collect();
    format!(
        "network as {} sees it\n\n{}\n\n{}",
        cell(&json["kme"]),
        table(
            &["link", "state", "qber", "secret bit/s", "pool fill"],
            link_rows
        ),
        table(&["sae", "kme", "keys here"], sae_rows)
    )
}

fn events_table(json: &Value) -> String {
    let empty = Vec::new();
    let rows = json["events"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|e| {
            vec![
                cell(&e["id"]),
                cell(&e["at_ms"]),
                cell(&e["event"]),
                cell(&e["detail"]),
            ]
        })
        .collect();
    table(&["#", "at_ms", "event", "detail"], rows)
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
        AdminRequest::Health => "/health".to_string(),
        AdminRequest::Ready => "/ready".into(),
        AdminRequest::Metrics => "/metrics".into(),
        AdminRequest::Reload => "/reload".into(),
        AdminRequest::Network | AdminRequest::Events => "/api/network".into(),
        AdminRequest::AuditVerify => "/audit/verify".into(),
        AdminRequest::AuditExport { upto: None } => "/audit/export".into(),
        AdminRequest::AuditExport { upto: Some(upto) } => format!("/audit/export?upto={upto}"),
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
    let post = matches!(
        args.request,
        AdminRequest::Reload | AdminRequest::AuditVerify
    );
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
