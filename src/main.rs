//! The `kme` command: run a KME, check a configuration, act as an SAE (`kme sae`), ask a
//! KME's operator listener (`kme admin`), verify, export and prune an audit trail (`kme
//! audit`). The benchmarks are the `kme-bench` command (`bench/`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kme::config::Config;
use kme_actors::types::SourceKind;

/// mimalloc instead of the system allocator: a KME allocates and frees small buffers per
/// request on several threads, where glibc malloc cost about 6 % of the CPU (perf, `make bench`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "kme", version, about = "ETSI GS QKD 014 Key Management Entity")]
struct Cli {
    /// Log lines as text (default) or as JSON objects, one per line (for log shippers).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// env_logger (level from `RUST_LOG`, default info), as text or one JSON object per line:
/// `{"ts": ..., "level": ..., "target": ..., "message": ...}`.
fn init_logs(format: LogFormat) {
    let mut logs = env_logger::Builder::from_env(env_logger::Env::new().default_filter_or("info"));
    if let LogFormat::Json = format {
        logs.format(|out, record| {
            use std::io::Write;
            let line = serde_json::json!({
                "ts": out.timestamp_millis().to_string(),
                "level": record.level().as_str(),
                "target": record.target(),
                "message": record.args().to_string(),
            });
            writeln!(out, "{line}")
        });
    }
    logs.init();
}

#[derive(Subcommand)]
enum Command {
    /// Run one KME of the network described by the configuration file.
    Run {
        /// Network file (default: $KME_CONFIG, else ./kme.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// ID of the [[kme]] to run.
        #[arg(long)]
        kme: String,
    },
    /// Validate a configuration file and print the network it describes.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print copy-paste curl commands for an SAE session on the network.
    CurlExample {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// An ETSI 014 SAE client: status, enc, dec, whoami (`kme sae --help`).
    Sae(kme::sae_cli::SaeArgs),
    /// The operator's listener of a KME: health, ready, metrics, reload (`kme admin --help`).
    Admin(kme::admin_cli::AdminArgs),
    /// A KME's audit trail, on its database (the KME may run): verify, export, prune.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// A KME's links: rekey (a BB84 link's pre-shared authentication key file).
    Link {
        #[command(subcommand)]
        action: LinkAction,
    },
    /// A KME's master key (encryption at rest), the KME stopped: rotate.
    MasterKey {
        #[command(subcommand)]
        action: MasterKeyAction,
    },
    /// After restoring a KME's database from a backup, the KME stopped: forget the keys
    /// waiting there for retrieval and held for relays (its SAEs may have retrieved them
    /// since the backup was taken), audited as `database_restored`. Its links realign with
    /// their neighbours by themselves.
    Restored {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        kme: String,
    },
}

#[derive(Subcommand)]
enum LinkAction {
    /// Install a pre-shared authentication key file for the BB84 link to --peer; run it at
    /// both ends with the same file. The link uses it when it has no authentication key left
    /// (auth_bootstrap = "key-file", the default), then destroys it. The KME may run.
    Rekey {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        kme: String,
        /// The neighbour at the link's other end.
        #[arg(long)]
        peer: String,
        /// The key file (random bytes, the same at both ends; its name is kept).
        #[arg(long)]
        key_file: PathBuf,
    },
}

#[derive(Subcommand)]
enum MasterKeyAction {
    /// Re-seal every value of the database under a new master key, which then replaces the
    /// key file; crash-safe: the old or the new key works at every moment. The KME must be
    /// stopped (its data directory is locked while it runs).
    Rotate {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        kme: String,
    },
}

#[derive(Subcommand)]
enum AuditAction {
    /// Verify the keyed hash chain (with the master key) and the head kept outside the
    /// database (a cut tail shows). Only reads; exits non-zero on any doubt.
    Verify {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        kme: String,
    },
    /// Write a closed segment of the trail (its oldest records up to --upto, default all but
    /// the newest) as JSON lines, its head MACed last. Only reads; checks the chain first.
    Export {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        kme: String,
        /// Last record of the segment (default: the one before the newest).
        #[arg(long)]
        upto: Option<i64>,
        /// File to write (never overwritten); default: standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Delete the records of an exported segment from the database, once the file is proven
    /// whole and the trail's oldest part; the chain goes on from its last record.
    Prune {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        kme: String,
        /// A file written by `kme audit export`.
        #[arg(long)]
        segment: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    // A core dump would hold every key in memory: none are written.
    if let Err(err) = rlimit::setrlimit(rlimit::Resource::CORE, 0, 0) {
        log::warn!("cannot turn core dumps off: {err}");
    }
    match run(cli.command) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("kme: {message}");
            ExitCode::FAILURE
        }
    }
}

fn load(config: Option<PathBuf>) -> Result<Config, String> {
    let file = Config::locate(config.as_deref());
    Config::load(&file).map_err(|err| err.to_string())
}

fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Run { config, kme } => {
            let node = load(config)?.node(&kme).map_err(|err| err.to_string())?;
            // Held until the process ends: one process per data directory.
            let _lock = kme::node::lock_data_dir(&node.me.data_dir)?;
            actix::System::new().block_on(async move {
                match kme::node::start(node, None).await {
                    Ok(node) => node
                        .wait()
                        .await
                        .map(|()| ExitCode::SUCCESS)
                        .map_err(|err| err.to_string()),
                    Err(err) => {
                        // Leave at once: tearing down a System whose actors hold timers is
                        // not clean in actix (actix/actix#531), and nothing needs flushing.
                        eprintln!("kme: cannot start: {err}");
                        std::process::exit(1)
                    }
                }
            })
        }
        Command::CheckConfig { config } => {
            let config = load(config)?;
            println!("{}: valid", config.file.display());
            for k in &config.kmes {
                let listen = format!("https://{}", k.peer_listen);
                let reached = if k.peer_url == listen {
                    String::new()
                } else {
                    format!(" (reached at {})", k.peer_url)
                };
                let admin = match k.admin {
                    Some(a) if a.tls => format!("  admin https://{} (operators)", a.addr),
                    Some(a) => format!("  admin http://{}", a.addr),
                    None => String::new(),
                };
                println!(
                    "  KME {:<10} SAE API https://{}  KME-to-KME {listen}{reached}{admin}",
                    k.id, k.sae_listen
                );
            }
            for l in &config.links {
                match &l.source {
                    SourceKind::Bb84(b) => println!(
                        "  link {} — {} (bb84, {} km, eavesdropper {}, {} pulses/frame, authentication key {})",
                        l.ends[0],
                        l.ends[1],
                        b.channel.fibre_km,
                        b.channel.eve_fraction,
                        b.pulses_per_frame,
                        match b.auth_bootstrap {
                            kme_actors::types::AuthBootstrap::KeyFile => "from key files (kme link rekey)",
                            kme_actors::types::AuthBootstrap::Tls => "over TLS (demo)",
                        }
                    ),
                    SourceKind::Courier => println!(
                        "  link {} — {} (courier, {} bit/s)",
                        l.ends[0], l.ends[1], l.rate_bits_per_s
                    ),
                    SourceKind::FileDrop => println!(
                        "  link {} — {} (file-drop: key files in <key_drop_dir>/<peer>/)",
                        l.ends[0], l.ends[1]
                    ),
                }
            }
            let mut saes: Vec<_> = config.sae_homes.iter().collect();
            saes.sort();
            for (sae, home) in saes {
                println!("  SAE {sae} at {home}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::CurlExample { config } => {
            print!("{}", curl_example(&load(config)?));
            Ok(ExitCode::SUCCESS)
        }
        Command::Sae(args) => Ok(kme::sae_cli::run(args)),
        Command::Admin(args) => Ok(kme::admin_cli::run(args)),
        Command::Audit { action } => audit(action),
        Command::Link {
            action:
                LinkAction::Rekey {
                    config,
                    kme,
                    peer,
                    key_file,
                },
        } => {
            let node = load(config)?.node(&kme).map_err(|err| err.to_string())?;
            println!("{}", kme::link_cli::rekey(&node, &peer, &key_file)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::MasterKey {
            action: MasterKeyAction::Rotate { config, kme },
        } => {
            let node = load(config)?.node(&kme).map_err(|err| err.to_string())?;
            let _lock = kme::node::lock_data_dir(&node.me.data_dir)?;
            let mut conn = kme_actors::storage::db::open_existing(&node.me.db_file(), true)
                .map_err(|err| err.to_string())?;
            let rotated = kme_actors::storage::master_key::rotate(&mut conn, &node.me.master_key)
                .map_err(|err| err.to_string())?;
            println!(
                "master key of {kme} rotated: {} keys, {} held keys, {} link blocks re-sealed under the new {}",
                rotated.keys,
                rotated.held_keys,
                rotated.link_blocks,
                node.me.master_key.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Restored { config, kme } => {
            let node = load(config)?.node(&kme).map_err(|err| err.to_string())?;
            let _lock = kme::node::lock_data_dir(&node.me.data_dir)?;
            let mut conn = kme_actors::storage::db::open_existing(&node.me.db_file(), true)
                .map_err(|err| err.to_string())?;
            let head = node
                .me
                .data_dir
                .join(kme_actors::storage::audit_trail::HEAD_FILE);
            let forgotten = kme_actors::storage::restored::forget_waiting_keys(
                &mut conn,
                &node.me.master_key,
                &head,
            )
            .map_err(|err| err.to_string())?;
            println!(
                "{kme}: {} waiting keys and {} relay keys forgotten (audited as database_restored); its links realign when it runs",
                forgotten.keys, forgotten.held_keys
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The `kme audit` commands: each opens the KME's existing database and needs its master
/// key (the chain's MACs are keyed by it: without it, no verdict).
fn audit(action: AuditAction) -> Result<ExitCode, String> {
    use kme_actors::storage::master_key::{open_sealer, Access};
    use kme_actors::storage::{audit_trail, db};
    let (AuditAction::Verify { config, kme }
    | AuditAction::Export { config, kme, .. }
    | AuditAction::Prune { config, kme, .. }) = &action;
    let node = load(config.clone())?
        .node(kme)
        .map_err(|err| err.to_string())?;
    let data_dir = &node.me.data_dir;
    let writable = matches!(action, AuditAction::Prune { .. });
    let mut conn =
        db::open_existing(&node.me.db_file(), writable).map_err(|err| err.to_string())?;
    let key = open_sealer(&conn, &node.me.master_key, Access::Inspect)
        .and_then(|sealer| sealer.audit_key())
        .map_err(|err| err.to_string())?;
    match action {
        AuditAction::Verify { kme, .. } => {
            let count = audit_trail::verify_chain(&conn, &key)
                .and_then(|count| {
                    let head = data_dir.join(audit_trail::HEAD_FILE);
                    audit_trail::check_head(&conn, &key, &head).map(|()| count)
                })
                .map_err(|err| err.to_string())?;
            println!("audit trail of {kme}: {count} records, hash chain intact");
        }
        AuditAction::Export { kme, upto, out, .. } => {
            let mut file: Box<dyn std::io::Write> = match &out {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::options()
                        .write(true)
                        .create_new(true)
                        .open(path)
                        .map_err(|err| format!("{}: {err}", path.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            let segment = audit_trail::export_segment(&conn, &key, &kme, (upto, None), &mut file)
                .map_err(|err| err.to_string())?;
            eprintln!(
                "audit records {}..={} of {kme} exported; `kme audit prune --segment FILE` may now delete them",
                segment.first, segment.last
            );
        }
        AuditAction::Prune { kme, segment, .. } => {
            let text = std::fs::read_to_string(&segment)
                .map_err(|err| format!("{}: {err}", segment.display()))?;
            let deleted = audit_trail::prune_segment(&mut conn, &key, &kme, &text)
                .map_err(|err| err.to_string())?;
            println!(
                "{deleted} audit records of {kme} pruned (exported in {})",
                segment.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// An enc_keys / dec_keys pair between two SAEs on neighbouring KMEs of `config`.
fn curl_example(config: &Config) -> String {
    let mut saes: Vec<_> = config.sae_homes.iter().collect();
    saes.sort();
    let neighbours = |a: &str, b: &str| {
        config.links.iter().any(|l| {
            (l.ends[0].as_str(), l.ends[1].as_str()) == (a, b)
                || (l.ends[1].as_str(), l.ends[0].as_str()) == (a, b)
        })
    };
    let pair = saes.iter().find_map(|(m, mk)| {
        saes.iter()
            .find(|(_, sk)| neighbours(mk.as_str(), sk.as_str()))
            .map(|(s, sk)| (m.to_string(), mk.to_string(), s.to_string(), sk.to_string()))
    });
    let Some((master, master_kme, slave, slave_kme)) = pair else {
        return "no two SAEs on neighbouring KMEs in this network: no curl example\n".into();
    };
    let url = |kme: &str| {
        config
            .kme(kme)
            .map(|k| format!("https://localhost:{}", k.sae_listen.port()))
            .unwrap_or_default()
    };
    let ca = config.ca.display();
    let cert = |sae: &str| {
        let dir = config.cert_dir.display();
        format!("--cert {dir}/{sae}.crt --key {dir}/{sae}.key")
    };
    format!(
        "Get a key at {master_kme} as {master} for {slave}:\n  \
         curl --cacert {ca} {mc} -H 'Content-Type: application/json' -d '{{\"number\":1,\"size\":256}}' {mu}/api/v1/keys/{slave}/enc_keys\n\
         Retrieve the same key at {slave_kme} as {slave} (paste the key_ID from the answer):\n  \
         curl --cacert {ca} {sc} '{su}/api/v1/keys/{master}/dec_keys?key_ID=KEY_ID'\n",
        mc = cert(&master),
        mu = url(&master_kme),
        sc = cert(&slave),
        su = url(&slave_kme),
    )
}
