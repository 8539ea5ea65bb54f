//! Starting one KME: storage, actors, and the two mTLS listeners.
//!
//! `start` runs inside an actix `System` (actors need one): it opens the SQLite file, has the
//! domain read what each link resumes from (`kme_actors::startup`), starts the actors once
//! (never per HTTP worker), and binds the SAE API and the KME-to-KME channel. `spawn` does the same on a thread of its own,
//! for tests and tools that run several KMEs in one process.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix::prelude::*;
use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpServer};
use kme_actors::alerts::{Alerts, AuditCheck};
use kme_actors::metrics::Metrics;
use kme_actors::peer::peer_link::PeerLink;
use kme_actors::relay::router::{OwnLink, Router};
use kme_actors::relay::transport::{NextHop, Relay};
use kme_actors::sae_quota::{SaeLimits, SaeQuotas};
use kme_actors::sae_registry::{Network, SaeRegistry};
use kme_actors::startup;
use kme_actors::storage::audit::AuditRecord;
use kme_actors::storage::audit_trail;
use kme_actors::storage::checkpointer::DbCheckpointer;
use kme_actors::storage::db;
use kme_actors::storage::master_key::{self, Access};
use kme_actors::storage::ops::AppendAudit;
use kme_actors::storage::store::{Exec, Store};
use kme_actors::storage::writer::DbWriter;
use kme_actors::types::KmeId;

use crate::admin_api::{self, AdminState};
use crate::cert_status::{CertStatus, CrlError};
use crate::config::NodeConfig;
use crate::peer_api::{self, PeerState};
use crate::reload::Reloader;
use crate::sae_api::{self, SaeState};
use crate::sae_metrics;
use crate::tls;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("storage: {0}")]
    Storage(#[from] kme_actors::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Crl(#[from] CrlError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("KME thread: {0}")]
    Thread(String),
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("network file: {0}")]
    Reload(String),
    #[error("the database does not reach its audit head outside it ({0}): if it was restored from a backup, run `kme restored --kme {1}` first (keys waiting there may have been retrieved since); if not, its trail was cut")]
    BehindItsAuditHead(kme_actors::Error, String),
}

/// Listeners to use instead of binding the configured addresses (tests bind 127.0.0.1:0).
pub struct Listeners {
    pub sae: TcpListener,
    pub peer: TcpListener,
}

/// A started KME: its addresses and the handles that stop its servers.
pub struct Node {
    pub sae_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    /// The operator's listener (`admin_listen`), if configured.
    pub admin_addr: Option<SocketAddr>,
    servers: Vec<actix_web::dev::Server>,
    me: KmeId,
    store: Addr<Store>,
}

impl Node {
    pub fn handles(&self) -> Vec<ServerHandle> {
        self.servers
            .iter()
            .map(actix_web::dev::Server::handle)
            .collect()
    }

    /// Runs until the servers stop (SIGINT/SIGTERM: they stop taking connections and finish
    /// the requests in flight, for at most `shutdown_grace_s`; or a handle's `stop`), then
    /// closes this run's audit trail with `kme_stopped`: the store commits it after
    /// everything queued before it, so the store is flushed when this returns.
    pub async fn wait(self) -> std::io::Result<()> {
        for result in futures_util::future::join_all(self.servers).await {
            result?;
        }
        let record = AuditRecord::new("kme_stopped", serde_json::json!({"kme": self.me}));
        match self.store.send(Exec(AppendAudit(record))).await {
            Ok(Ok(_)) => log::info!("{} stopped cleanly", self.me),
            Ok(Err(err)) => log::warn!("{}: the last audit record failed: {err}", self.me),
            Err(err) => log::warn!("{}: the store was gone at the stop: {err}", self.me),
        }
        Ok(())
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).map_err(|source| StartError::Listen {
        addr: addr.to_string(),
        source,
    })
}

/// Locks `data_dir` for this process (`<data_dir>/kme.lock`, released when the returned file
/// closes, at the latest when the process ends): a second `kme run` of the same KME, or a
/// master key rotation while it runs, is refused instead of writing beside it.
pub fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, String> {
    let fail = |err: &dyn std::fmt::Display| format!("{}: {err}", data_dir.display());
    std::fs::create_dir_all(data_dir).map_err(|err| fail(&err))?;
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data_dir.join("kme.lock"))
        .map_err(|err| fail(&err))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(fail(
            &"in use by a running kme (its kme.lock is held): stop it first",
        )),
        Err(std::fs::TryLockError::Error(err)) => Err(fail(&err)),
    }
}

/// Starts one KME. Everything that can fail (storage, keys, certificates, listeners) is done
/// before the first actor starts, so a failed start leaves nothing running.
pub async fn start(config: NodeConfig, listeners: Option<Listeners>) -> Result<Node, StartError> {
    let me = config.me.id.clone();
    let cert_status = Arc::new(CertStatus::load(
        &config.crl_files,
        &[&config.ca, &config.peer_tls.ca],
    )?);
    let (writer_pool, reader_pool) =
        db::open_with_quota(&config.me.db_file(), 2, Some(config.me.max_db_mb))?;
    let sealer = {
        let conn = writer_pool.get().map_err(kme_actors::Error::from)?;
        let epoch = db::next_epoch(&conn)?;
        let sealer = master_key::open_sealer(&conn, &config.me.master_key, Access::Start)?;
        audit_trail::seal_keyed(&conn, &*sealer.audit_key()?)?;
        // A database older than the head its last run left outside it (restored, or cut)
        // would serve keys again that were retrieved since: not before the operator says so.
        let head = config.me.data_dir.join(audit_trail::HEAD_FILE);
        if head.exists() {
            audit_trail::check_head(&conn, &*sealer.audit_key()?, &head)
                .map_err(|err| StartError::BehindItsAuditHead(err, me.to_string()))?;
        }
        (Arc::new(sealer), epoch)
    };
    let (sealer, epoch) = sealer;
    // What each link resumes from, and its TLS client, before any actor starts.
    let mut links = Vec::new();
    {
        let conn = reader_pool.get().map_err(kme_actors::Error::from)?;
        for neighbour in &config.neighbours {
            let peer = neighbour.params.peer.as_str();
            let connector = tls::peer_connector(
                &config.peer_tls.ca,
                &config.peer_tls.cert,
                &config.peer_tls.key,
                peer,
                cert_status.clone(),
            )?;
            let resume = startup::resume(&conn, &sealer, neighbour.params.clone())?;
            links.push((neighbour, connector, resume));
        }
    }
    let sae_tls = tls::sae_acceptor(&config.ca, &config.cert, &config.key)?;
    let peer = &config.peer_tls;
    let peer_tls = tls::peer_acceptor(&peer.ca, &peer.cert, &peer.key)?;
    let (sae_listener, peer_listener) = match listeners {
        Some(l) => (l.sae, l.peer),
        None => (bind(config.me.sae_listen)?, bind(config.me.peer_listen)?),
    };
    let sae_addr = local_addr(&sae_listener)?;
    let peer_addr = local_addr(&peer_listener)?;

    let metrics = Arc::new(Metrics::new().map_err(|err| StartError::Metrics(err.to_string()))?);
    let writer_sealer = sealer.clone();
    let writer_metrics = metrics.clone();
    let head_file = config.me.data_dir.join(audit_trail::HEAD_FILE);
    let writer = SyncArbiter::start(1, move || {
        DbWriter::new(writer_pool.clone(), writer_sealer.clone())
            .with_metrics(writer_metrics.clone())
            .with_head_file(head_file.clone())
    });
    let checkpoint_pool = reader_pool.clone();
    let checkpointer = SyncArbiter::start(1, move || DbCheckpointer::new(checkpoint_pool.clone()));
    let store = Store::new(writer, config.key_ttl)
        .with_checkpointer(checkpointer)
        .start();
    // Half the SAE request timeout: a slow neighbour yields a 503 before the SAE gives up.
    let peer_timeout = config.request_timeout / 2;
    let mut routes = Vec::new();
    let mut ends = HashMap::new();
    let mut own_links = Vec::new();
    let mut hops = HashMap::new();
    for (neighbour, connector, resume) in links {
        let peer = neighbour.params.peer.clone();
        let client = tls::https_client(connector, 64, peer_timeout);
        let url = neighbour.url.clone();
        let peer_link = PeerLink::new(peer.clone(), url, client, peer_timeout, epoch)
            .with_metrics(&metrics)
            .start();
        let started = startup::start_link(resume, store.clone(), peer_link.clone())?;
        own_links.push(OwnLink {
            peer: peer.clone(),
            pool: started.route.pool.clone(),
            link: started.link.clone(),
            peer_link: peer_link.clone(),
        });
        hops.insert(
            peer.clone(),
            NextHop {
                pool: started.route.pool.clone(),
                peer_link,
            },
        );
        ends.insert(peer, started.link);
        routes.push(started.route);
    }
    let admin_links = own_links.clone();
    let alert_links = own_links.clone();
    let router = Router::new(
        me.clone(),
        &config.links,
        own_links,
        config.route_advert,
        epoch,
    )
    .start();
    if let Some(settings) = config.alerts.clone() {
        let audit = AuditCheck {
            reader: reader_pool.clone(),
            key: Arc::new(sealer.audit_key()?),
            head_file: config.me.data_dir.join(audit_trail::HEAD_FILE),
        };
        Alerts::new(me.clone(), settings, alert_links, router.clone())
            .with_audit_check(audit)
            .start();
    }
    // Held keys of a relay wait for its release at most twice the request timeout.
    let relay = Relay::new(store.clone(), hops, config.request_timeout * 2).start();
    let registry = SaeRegistry::new(
        me.clone(),
        store.clone(),
        config.sae_homes.clone(),
        config.kmes.clone(),
        routes,
        config.local_limits,
    )
    .with_pinned(config.pinned.clone())
    .with_quotas(SaeQuotas::new(
        SaeLimits::default(),
        config.sae_limits.clone(),
    ))
    .with_network(Network {
        router: router.clone(),
        relay: relay.clone(),
        interval: config.route_advert,
    })
    .start();

    let reloader = Arc::new(
        Reloader::new(
            config.file.clone(),
            registry.clone(),
            store.clone(),
            cert_status.clone(),
        )
        .map_err(StartError::Reload)?,
    );
    reloader.clone().on_sighup();
    let sae_state = web::Data::new(SaeState {
        me: me.clone(),
        registry: registry.clone(),
        timeout: config.request_timeout,
        metrics: metrics.clone(),
        cert_status: cert_status.clone(),
    });
    let peer_state = web::Data::new(PeerState {
        neighbours: ends,
        registry: registry.clone(),
        router: router.clone(),
        relay,
        timeout: config.request_timeout,
        cert_status: cert_status.clone(),
    });
    let sae_server = HttpServer::new(move || {
        App::new()
            .app_data(sae_state.clone())
            .wrap(actix_web::middleware::from_fn(sae_api::authenticate_first))
            .wrap(actix_web::middleware::from_fn(sae_metrics::track))
            .configure(sae_api::configure)
    })
    .max_connections(per_worker(config.max_connections, config.me.workers))
    .max_connection_rate(256)
    .client_request_timeout(HEAD_READ_TIMEOUT)
    .client_disconnect_timeout(std::time::Duration::from_secs(1))
    .on_connect(tls::on_connect)
    .workers(config.me.workers)
    .keep_alive(std::time::Duration::from_secs(30))
    .shutdown_timeout(config.shutdown_grace.as_secs())
    .listen_openssl(sae_listener, sae_tls)
    .map_err(|source| StartError::Listen {
        addr: sae_addr.to_string(),
        source,
    })?
    .run();
    let peer_server = HttpServer::new(move || {
        App::new()
            .app_data(peer_state.clone())
            .configure(peer_api::configure)
    })
    .max_connections(per_worker(config.max_connections, 1))
    .client_request_timeout(HEAD_READ_TIMEOUT)
    .client_disconnect_timeout(std::time::Duration::from_secs(1))
    .on_connect(tls::on_connect)
    .workers(1)
    .keep_alive(std::time::Duration::from_secs(60))
    .shutdown_timeout(config.shutdown_grace.as_secs())
    .listen_openssl(peer_listener, peer_tls)
    .map_err(|source| StartError::Listen {
        addr: peer_addr.to_string(),
        source,
    })?
    .run();

    let admin = match config.me.admin {
        None => None,
        Some(listen) => {
            let state = web::Data::new(AdminState {
                me: me.clone(),
                metrics: metrics.clone(),
                links: admin_links,
                store: store.clone(),
                router: router.clone(),
                db_file: config.me.db_file(),
                db_limit_bytes: config.me.max_db_mb.saturating_mul(1 << 20),
                operators: listen.tls.then(|| config.operators.clone()),
                cert_status: cert_status.clone(),
                reloader: reloader.clone(),
                registry: registry.clone(),
                reader: reader_pool.clone(),
                audit_key: Arc::new(sealer.audit_key()?),
                timeout: config.request_timeout,
            });
            let listener = bind(listen.addr)?;
            let addr = local_addr(&listener)?;
            let server = HttpServer::new(move || {
                App::new()
                    .app_data(state.clone())
                    .configure(admin_api::configure)
            })
            .workers(1)
            .max_connections(64)
            .shutdown_timeout(config.shutdown_grace.as_secs())
            .on_connect(tls::on_connect);
            let server = if listen.tls {
                let acceptor = tls::admin_acceptor(&config.ca, &config.cert, &config.key)?;
                server.listen_openssl(listener, acceptor)
            } else {
                server.listen(listener)
            }
            .map_err(|source| StartError::Listen {
                addr: addr.to_string(),
                source,
            })?
            .run();
            Some((addr, server))
        }
    };
    let record = AuditRecord::new(
        "kme_started",
        serde_json::json!({"kme": me.as_str(), "epoch": epoch, "sae_api": sae_addr, "peer_api": peer_addr}),
    );
    if let Ok(Err(err)) | Err(err) = store
        .send(Exec(AppendAudit(record)))
        .await
        .map_err(kme_actors::Error::from)
    {
        return Err(StartError::Storage(err));
    }
    log::info!("{me} ready: SAE API https://{sae_addr}, KME-to-KME https://{peer_addr}");
    let mut servers = vec![sae_server, peer_server];
    let admin_addr = admin.map(|(addr, server)| {
        log::info!("{me} admin listener on {addr}");
        servers.push(server);
        addr
    });
    Ok(Node {
        sae_addr,
        peer_addr,
        admin_addr,
        servers,
        me,
        store,
    })
}

/// The longest a client may take to send a request's head; then 408 and the connection
/// closes.
const HEAD_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// actix-web counts connections per worker: `total` for the listener, over `workers`.
fn per_worker(total: usize, workers: usize) -> usize {
    total.div_ceil(workers.max(1)).max(1)
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(|source| StartError::Listen {
        addr: "listener".into(),
        source,
    })
}

/// A KME running on a thread of its own (its own actix System).
pub struct SpawnedNode {
    pub sae_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    handles: Vec<ServerHandle>,
    system: actix::System,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SpawnedNode {
    /// Stops the servers and the System, and joins the thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let handles = std::mem::take(&mut self.handles);
        let system = self.system.clone();
        system.arbiter().spawn(async move {
            for handle in handles {
                handle.stop(false).await;
            }
            actix::System::current().stop();
        });
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for SpawnedNode {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

/// Starts a KME on a new thread and returns once it serves (or failed to start).
pub fn spawn(config: NodeConfig, listeners: Option<Listeners>) -> Result<SpawnedNode, StartError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = Arc::new(tx);
    let thread = std::thread::Builder::new()
        .name(format!("kme-{}", config.me.id))
        .spawn(move || {
            let system = actix::System::new();
            system.block_on(async move {
                match start(config, listeners).await {
                    Ok(node) => {
                        let _ = tx.send(Ok((
                            node.sae_addr,
                            node.peer_addr,
                            node.admin_addr,
                            node.handles(),
                            actix::System::current(),
                        )));
                        let _ = node.wait().await;
                    }
                    Err(err) => {
                        let _ = tx.send(Err(err));
                    }
                }
            });
        })
        .map_err(|err| StartError::Thread(err.to_string()))?;
    match rx.recv() {
        Ok(Ok((sae_addr, peer_addr, admin_addr, handles, system))) => Ok(SpawnedNode {
            sae_addr,
            peer_addr,
            admin_addr,
            handles,
            system,
            thread: Some(thread),
        }),
        Ok(Err(err)) => {
            let _ = thread.join();
            Err(err)
        }
        Err(_) => Err(StartError::Thread(
            "the KME thread ended during start-up".into(),
        )),
    }
}
