//! Reload without restart: SIGHUP, or `POST /reload` on the admin listener (`kme admin
//! reload`), re-reads the network file and applies what can change while the KME runs — its
//! SAEs (added, removed, re-homed), pinned certificates and the SAEs' rate limits — keeping
//! every connection and every key; it also reads the CRLs (`[tls] crl_files`) again, and a
//! connection whose certificate they revoke serves nothing more. Anything else (`[tls]`, `[defaults]`, `[[kme]]`,
//! `[[link]]`: listeners, links, pools) needs a restart: a file that changes it is refused
//! whole, naming the table, and so is a file that does not validate. An applied reload is
//! audited (`config_reloaded`).

use std::path::PathBuf;
use std::sync::Arc;

use actix::Addr;
use kme_actors::sae_registry::{ReloadSaes, SaeRegistry};
use kme_actors::storage::audit::AuditRecord;
use kme_actors::storage::ops::AppendAudit;
use kme_actors::storage::store::{Exec, Store};
use kme_actors::types::SaeId;
use serde::Serialize;

use crate::cert_status::CertStatus;
use crate::config::Config;

/// Tables of the network file that a reload may change.
const RELOADABLE: [&str; 3] = ["sae", "sae_defaults", "operator"];

pub struct Reloader {
    file: PathBuf,
    /// The tables that need a restart, as the KME started with them.
    fixed: toml::Table,
    registry: Addr<SaeRegistry>,
    store: Addr<Store>,
    cert_status: Arc<CertStatus>,
}

/// What a reload changed.
#[derive(Debug, Serialize)]
pub struct Reloaded {
    pub added: Vec<SaeId>,
    pub removed: Vec<SaeId>,
    /// Certificates the CRLs revoke now.
    pub revoked: usize,
}

fn fixed_tables(text: &str) -> Result<toml::Table, String> {
    let mut table: toml::Table = text.parse().map_err(|err| format!("{err}"))?;
    table.retain(|key, _| !RELOADABLE.contains(&key));
    // The CRLs are read again at every reload, and which files they are may change too.
    if let Some(toml::Value::Table(tls)) = table.get_mut("tls") {
        tls.remove("crl_files");
    }
    Ok(table)
}

impl Reloader {
    /// Remembers the tables of `file` that a reload may not change.
    pub fn new(
        file: PathBuf,
        registry: Addr<SaeRegistry>,
        store: Addr<Store>,
        cert_status: Arc<CertStatus>,
    ) -> Result<Self, String> {
        let text = std::fs::read_to_string(&file)
            .map_err(|err| format!("cannot read {}: {err}", file.display()))?;
        Ok(Self {
            fixed: fixed_tables(&text)?,
            file,
            registry,
            store,
            cert_status,
        })
    }

    /// Re-reads the file and applies it, or changes nothing and says why.
    pub async fn reload(&self) -> Result<Reloaded, String> {
        let refused = |why: String| format!("{}: {why}; nothing changed", self.file.display());
        let text = std::fs::read_to_string(&self.file).map_err(|err| refused(err.to_string()))?;
        let config = Config::parse(&text, &self.file).map_err(|err| refused(err.to_string()))?;
        let fixed = fixed_tables(&text).map_err(refused)?;
        let mut keys: Vec<&String> = self.fixed.keys().chain(fixed.keys()).collect();
        keys.sort();
        keys.dedup();
        if let Some(changed) = keys.iter().find(|k| self.fixed.get(**k) != fixed.get(**k)) {
            return Err(refused(format!(
                "`{changed}` changed, which needs a restart (a reload applies [[sae]], [sae_defaults] and [[operator]] only)"
            )));
        }
        // The CRLs first: one that cannot be read or verified refuses the reload whole.
        let revoked = self
            .cert_status
            .reload(
                &config.crl_files,
                &[&config.ca, config.peer_ca.as_ref().unwrap_or(&config.ca)],
            )
            .map_err(|err| refused(err.to_string()))?;
        let message = ReloadSaes {
            homes: config.sae_homes,
            pinned: config.pinned,
            limits: config.sae_limits,
        };
        let (added, removed) = self
            .registry
            .send(message)
            .await
            .map_err(|err| refused(err.to_string()))?;
        let reloaded = Reloaded {
            added,
            removed,
            revoked,
        };
        let record = AuditRecord::new("config_reloaded", &reloaded);
        if let Ok(Err(err)) | Err(err) = self
            .store
            .send(Exec(AppendAudit(record)))
            .await
            .map_err(kme_actors::Error::from)
        {
            log::error!("the reload is applied but not audited: {err}");
        }
        log::info!(
            "{} reloaded: SAEs added {:?}, removed {:?}; {} certificates revoked",
            self.file.display(),
            reloaded.added,
            reloaded.removed,
            reloaded.revoked
        );
        Ok(reloaded)
    }

    /// Reloads at every SIGHUP, for as long as the KME runs.
    pub fn on_sighup(self: std::sync::Arc<Self>) {
        actix_rt::spawn(async move {
            let mut hangups = match actix_rt::signal::unix::signal(
                actix_rt::signal::unix::SignalKind::hangup(),
            ) {
                Ok(hangups) => hangups,
                Err(err) => return log::warn!("no reload on SIGHUP: {err}"),
            };
            while hangups.recv().await.is_some() {
                if let Err(why) = self.reload().await {
                    log::error!("reload refused: {why}");
                }
            }
        });
    }
}
