//! Test networks: KMEs in-process (each on its own thread and actix System, listening on
//! 127.0.0.1:0) or as real `kme` processes, and an mTLS client.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kme::config::Config;
use kme::node::{self, Listeners, SpawnedNode};
use openssl::ssl::{SslConnector, SslFiletype, SslMethod};
use serde_json::Value;

use super::pki::{Pki, Validity};

pub const KMES: [&str; 3] = ["kme-a", "kme-b", "kme-c"];
const SAES: [(&str, &str); 4] = [
    ("sae-a", "kme-a"),
    ("sae-b", "kme-b"),
    ("sae-b2", "kme-b"),
    ("sae-c", "kme-c"),
];

/// The KMEs, SAEs and links of a test network.
#[derive(Clone)]
pub struct Topology {
    pub kmes: Vec<&'static str>,
    pub saes: Vec<(&'static str, &'static str)>,
    pub links: Vec<[&'static str; 2]>,
}

impl Topology {
    /// kme-a — kme-b — kme-c; sae-a on a, sae-b and sae-b2 on b, sae-c on c.
    pub fn line() -> Self {
        Self {
            kmes: KMES.to_vec(),
            saes: SAES.to_vec(),
            links: vec![["kme-a", "kme-b"], ["kme-b", "kme-c"]],
        }
    }

    /// The line's KMEs and SAEs plus kme-d (sae-d), with `links` among them.
    pub fn of(links: &[[&'static str; 2]]) -> Self {
        let mut topology = Self::line();
        topology.kmes.push("kme-d");
        topology.saes.push(("sae-d", "kme-d"));
        topology.links = links.to_vec();
        topology
    }

    /// A ring of four: a — b — c — d — a.
    pub fn ring() -> Self {
        Self::of(&[
            ["kme-a", "kme-b"],
            ["kme-b", "kme-c"],
            ["kme-c", "kme-d"],
            ["kme-a", "kme-d"],
        ])
    }

    /// A star around kme-b: a, c and d are its leaves.
    pub fn star() -> Self {
        Self::of(&[["kme-a", "kme-b"], ["kme-b", "kme-c"], ["kme-b", "kme-d"]])
    }
}

/// Link settings of a test network.
#[derive(Clone)]
pub struct LinkOptions {
    pub rate_bits_per_s: u64,
    pub block_bytes: usize,
    pub max_key_count: u64,
    pub max_sae_id_count: u32,
    pub tick_ms: u64,
    /// Size limit of every KME's database (MiB), to play a full disk.
    pub max_db_mb: Option<u64>,
    /// (SAE, certificate file): identify the SAE by that certificate's fingerprint.
    pub pins: Vec<(&'static str, &'static str)>,
    /// Every link on BB84 with these `[link.bb84]` settings (TOML lines); None: courier.
    pub bb84: Option<String>,
    /// More `[link.bb84]` lines for one link (e.g. an eavesdropper on it).
    pub bb84_on: Vec<([&'static str; 2], &'static str)>,
    /// Both links on file-drop (key files in `data/<kme>/key-drop/<peer>/`).
    pub file_drop: bool,
    /// (KME, URL): where the other KMEs reach that KME's peer listener (`peer_url`).
    pub peer_urls: Vec<(&'static str, String)>,
    /// `key_ttl_s` of every KME (how long a bound key waits for its slaves); None: default.
    pub key_ttl_s: Option<u64>,
    pub topology: Topology,
    /// `route_advert_ms` of every KME (link state news); None: default.
    pub route_advert_ms: Option<u64>,
    /// An admin listener on every KME (127.0.0.1, a free port): Some(with TLS?).
    pub admin: Option<bool>,
    /// `[alerts]` lines of the network file (the operator's webhook).
    pub alerts: Option<String>,
    /// (link ends, TOML lines): more settings of one `[[link]]` (e.g. its own limits).
    pub link_extra: Vec<([&'static str; 2], &'static str)>,
    /// (SAE, TOML lines): more settings of that SAE (rate limits, a `uri` binding).
    pub sae_limits: Vec<(&'static str, &'static str)>,
    /// `[tls] crl_files = ["ca.crl"]`, with a first, empty CRL made by `certs/revoke.sh`.
    pub crl: bool,
    /// `[tls] peer_ca`: a CA of the KME-to-KME channel of its own (`peer-pki/`), which issues
    /// each KME's `<id>.peer.crt`.
    pub peer_ca: bool,
}

impl LinkOptions {
    /// BB84 links, unpaced, with frames of 500,000 key bits (the smallest that leave a fair share
    /// of key under the finite-key bound); `extra`: more `[link.bb84]` lines.
    pub fn bb84(extra: &str) -> Self {
        Self {
            block_bytes: 1024,
            max_key_count: 512,
            bb84: Some(format!(
                "paced = false\nframe_sifted_bits = 500000\n{extra}"
            )),
            ..Self::default()
        }
    }
}

impl Default for LinkOptions {
    fn default() -> Self {
        Self {
            rate_bits_per_s: 20_000_000,
            block_bytes: 4096,
            max_key_count: 4096,
            max_sae_id_count: 1,
            tick_ms: 5,
            max_db_mb: None,
            pins: Vec::new(),
            bb84: None,
            file_drop: false,
            bb84_on: Vec::new(),
            peer_urls: Vec::new(),
            key_ttl_s: None,
            topology: Topology::line(),
            route_advert_ms: Some(200),
            sae_limits: Vec::new(),
            link_extra: Vec::new(),
            admin: None,
            alerts: None,
            crl: false,
            peer_ca: false,
        }
    }
}

/// A directory with a PKI and a network file (`kme.toml`) for kme-a — kme-b — kme-c.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub ports: HashMap<&'static str, (u16, u16)>,
}

impl Setup {
    /// `listeners`: pre-bound listeners per KME (in-process) — or just free ports (processes).
    pub fn new(
        options: &LinkOptions,
        listeners: &HashMap<&'static str, (TcpListener, TcpListener)>,
    ) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        for kme in &options.topology.kmes {
            pki.issue(kme, Some(kme), true, Validity::Valid);
        }
        for (sae, _) in &options.topology.saes {
            pki.issue(sae, Some(sae), false, Validity::Valid);
        }
        pki.issue("sae-x", Some("sae-x"), false, Validity::Valid);
        pki.issue("operator", Some("operator"), false, Validity::Valid);
        pki.issue("expired", Some("sae-a"), false, Validity::Expired);
        pki.issue("no-cn", None, false, Validity::Valid);
        pki.issue("two-cns", Some("sae-x+sae-a"), false, Validity::Valid);
        pki.issue_foreign("foreign", "sae-a");
        pki.issue_with_uri("workload", "workload-7", "spiffe://kme.test/sae-b2");
        if options.crl {
            revoke(dir.path(), &[]);
        }
        if options.peer_ca {
            let peer_pki = dir.path().join("peer-pki");
            std::fs::create_dir(&peer_pki).unwrap();
            let pki = Pki::new(&peer_pki);
            for kme in &options.topology.kmes {
                pki.issue(kme, Some(kme), true, Validity::Valid);
                for ext in ["crt", "key"] {
                    let to = dir.path().join(format!("{kme}.peer.{ext}"));
                    std::fs::copy(peer_pki.join(format!("{kme}.{ext}")), to).unwrap();
                }
            }
        }
        let ports: HashMap<_, _> = listeners
            .iter()
            .map(|(k, (s, p))| {
                (
                    *k,
                    (
                        s.local_addr().unwrap().port(),
                        p.local_addr().unwrap().port(),
                    ),
                )
            })
            .collect();
        let text = network_file(options, &ports, dir.path());
        std::fs::write(dir.path().join("kme.toml"), text).unwrap();
        Setup { dir, ports }
    }

    /// A setup for KMEs run as processes: free ports, found by binding and releasing them.
    pub fn for_processes(options: &LinkOptions) -> Setup {
        Setup::new(options, &bind_all(&options.topology.kmes))
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_file(&self) -> PathBuf {
        self.dir.path().join("kme.toml")
    }

    pub fn sae_url(&self, kme: &str) -> String {
        format!("https://localhost:{}", self.ports[kme].0)
    }

    pub fn peer_url(&self, kme: &str) -> String {
        format!("https://localhost:{}", self.ports[kme].1)
    }
}

/// The network file of kme-a — kme-b — kme-c for these options and ports (`dir`: the PKI).
fn network_file(
    options: &LinkOptions,
    ports: &HashMap<&'static str, (u16, u16)>,
    dir: &Path,
) -> String {
    let mut text = format!(
        "[tls]\nca = \"ca.crt\"\ncert_dir = \".\"\n{}[defaults]\nrequest_timeout_ms = 5000\nmax_sae_id_count = {}\n",
        match (options.crl, options.peer_ca) {
            (false, false) => "",
            (true, false) => "crl_files = [\"ca.crl\"]\n",
            (false, true) => "peer_ca = \"peer-pki/ca.crt\"\n",
            (true, true) => "crl_files = [\"ca.crl\"]\npeer_ca = \"peer-pki/ca.crt\"\n",
        },
        options.max_sae_id_count
    );
    if let Some(ttl) = options.key_ttl_s {
        text += &format!("key_ttl_s = {ttl}\n");
    }
    if let Some(ms) = options.route_advert_ms {
        text += &format!("route_advert_ms = {ms}\n");
    }
    for kme in options.topology.kmes.iter().copied() {
        let (sae, peer) = ports[kme];
        text += &format!(
            "[[kme]]\nid = \"{kme}\"\nsae_listen = \"127.0.0.1:{sae}\"\npeer_listen = \"127.0.0.1:{peer}\"\ndata_dir = \"data/{kme}\"\n"
        );
        if let Some(mb) = options.max_db_mb {
            text += &format!("max_db_mb = {mb}\n");
        }
        if let Some(tls) = options.admin {
            text += &format!("admin_listen = \"127.0.0.1:0\"\nadmin_tls = {tls}\n");
        }
        if let Some((_, url)) = options.peer_urls.iter().find(|(id, _)| *id == kme) {
            text += &format!("peer_url = \"{url}\"\n");
        }
    }
    text += "[[operator]]\nid = \"operator\"\n";
    if let Some(alerts) = &options.alerts {
        text += &format!("[alerts]\n{alerts}\n");
    }
    for (sae, kme) in options.topology.saes.iter().copied() {
        text += &format!("[[sae]]\nid = \"{sae}\"\nkme = \"{kme}\"\n");
        if let Some((_, limits)) = options.sae_limits.iter().find(|(on, _)| *on == sae) {
            text += &format!("{limits}\n");
        }
        if let Some((_, file)) = options.pins.iter().find(|(pinned, _)| *pinned == sae) {
            let pem = std::fs::read(dir.join(format!("{file}.crt"))).unwrap();
            let cert = openssl::x509::X509::from_pem(&pem).unwrap();
            let digest = cert.digest(openssl::hash::MessageDigest::sha256()).unwrap();
            let hex: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
            text += &format!("cert_sha256 = \"{}\"\n", hex.join(":"));
        }
    }
    for ends in &options.topology.links {
        text += &format!(
            "[[link]]\nends = [\"{}\", \"{}\"]\nrate_bits_per_s = {}\nblock_bytes = {}\nmax_key_count = {}\nmax_sae_id_count = {}\ntick_ms = {}\n",
            ends[0], ends[1], options.rate_bits_per_s, options.block_bytes, options.max_key_count, options.max_sae_id_count, options.tick_ms
        );
        for (_, extra) in options.link_extra.iter().filter(|(on, _)| on == ends) {
            text += &format!("{extra}\n");
        }
        if let Some(bb84) = &options.bb84 {
            text += &format!("source = \"bb84\"\n[link.bb84]\n{bb84}\n");
            // The test networks ship their first authentication key over TLS unless a test
            // says otherwise.
            if !bb84.contains("auth_bootstrap") {
                text += "auth_bootstrap = \"tls\"\n";
            }
            for (_, extra) in options.bb84_on.iter().filter(|(on, _)| on == ends) {
                text += &format!("{extra}\n");
            }
        } else if options.file_drop {
            text += "source = \"file-drop\"\n";
        } else {
            text += "source = \"courier\"\n";
        }
    }
    text
}

fn bind_all(kmes: &[&'static str]) -> HashMap<&'static str, (TcpListener, TcpListener)> {
    kmes.iter()
        .map(|k| {
            (
                *k,
                (
                    TcpListener::bind("127.0.0.1:0").unwrap(),
                    TcpListener::bind("127.0.0.1:0").unwrap(),
                ),
            )
        })
        .collect()
}

/// Three KMEs running in this process.
pub struct Net {
    pub setup: Setup,
    nodes: Vec<(&'static str, SpawnedNode)>,
    /// The admin listeners have TLS (`LinkOptions::admin`).
    admin_tls: bool,
}

impl Net {
    pub fn start(options: LinkOptions) -> Net {
        let mut listeners = bind_all(&options.topology.kmes);
        let setup = Setup::new(&options, &listeners);
        let config = Config::load(&setup.config_file()).unwrap();
        let mut nodes = Vec::new();
        for kme in options.topology.kmes.iter().copied() {
            let (sae, peer) = listeners.remove(kme).unwrap();
            let node_config = config.node(kme).unwrap();
            nodes.push((
                kme,
                node::spawn(node_config, Some(Listeners { sae, peer })).unwrap(),
            ));
        }
        Net {
            setup,
            nodes,
            admin_tls: options.admin == Some(true),
        }
    }

    /// Restarts every KME with new link options on the same data and new ports (e.g. with the
    /// eavesdropper gone).
    pub fn restart_all(&mut self, options: &LinkOptions) {
        self.restart_all_after(options, || {});
    }

    /// `restart_all`, running `while_stopped` once every KME has stopped.
    pub fn restart_all_after(&mut self, options: &LinkOptions, while_stopped: impl FnOnce()) {
        for (_, node) in self.nodes.drain(..) {
            node.stop();
        }
        while_stopped();
        // New ports: a port just freed may already be another test's (bound to :0 meanwhile).
        let listeners = bind_all(&options.topology.kmes);
        for (kme, (sae, peer)) in &listeners {
            let port = |l: &TcpListener| l.local_addr().unwrap().port();
            self.setup.ports.insert(*kme, (port(sae), port(peer)));
        }
        let text = network_file(options, &self.setup.ports, self.setup.path());
        std::fs::write(self.setup.config_file(), text).unwrap();
        let config = Config::load(&self.setup.config_file()).unwrap();
        let mut listeners = listeners;
        for kme in options.topology.kmes.iter().copied() {
            let (sae, peer) = listeners.remove(kme).unwrap();
            let node = node::spawn(config.node(kme).unwrap(), Some(Listeners { sae, peer }));
            self.nodes.push((kme, node.unwrap()));
        }
    }

    /// The link a — b as each end sees it: (kme-a's status, kme-b's status).
    pub async fn link_ends(&self) -> (Value, Value) {
        let a = self
            .wait_for_status("sae-a", "kme-a", "sae-b", "status", |_| true)
            .await;
        let b = self
            .wait_for_status("sae-b", "kme-b", "sae-a", "status", |_| true)
            .await;
        (a, b)
    }

    /// Polls both ends of the link a — b until `done` holds (30 s at most). The link runs
    /// frames only while a pool is below its high mark: keys are taken from kme-a's pool (and
    /// checked against kme-b's) whenever it holds plenty, so that frames keep coming.
    pub async fn until_link(
        &self,
        what: &str,
        done: impl Fn(&Value, &Value) -> bool,
    ) -> (Value, Value) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (a, b) = self.link_ends().await;
            if done(&a, &b) {
                return (a, b);
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not happen:\nkme-a {a}\nkme-b {b}"
            );
            if a["stored_key_count"].as_u64().unwrap() >= 128 {
                self.key_pair(("sae-a", "kme-a"), ("sae-b", "kme-b"), 64)
                    .await;
            }
            actix_web::rt::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls `master`'s status towards `slave` until `done` holds for it (30 s at most).
    pub async fn wait_for_status(
        &self,
        master: &str,
        master_kme: &str,
        slave: &str,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let client = self.client(Some(master));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let url = format!("{}/api/v1/keys/{slave}/status", self.url(master_kme));
            let (status, body) = client.get(&url).await;
            assert_eq!(status, 200, "{body}");
            if done(&body) {
                return body;
            }
            assert!(Instant::now() < deadline, "{what} did not happen: {body}");
            actix_web::rt::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `number` keys from enc_keys of `master` at `master_kme`, retrieved by `slave` at
    /// `slave_kme`: asserts both answers are 200 and the keys identical; returns them.
    pub async fn key_pair(
        &self,
        (master, master_kme): (&str, &str),
        (slave, slave_kme): (&str, &str),
        number: u32,
    ) -> Vec<(String, String)> {
        let body = serde_json::json!({ "number": number });
        let (code, answer) = enc(
            &self.client(Some(master)),
            &self.url(master_kme),
            slave,
            body,
        )
        .await;
        assert_eq!(code, 200, "{answer}");
        let sent = keys(&answer);
        let ids: Vec<&str> = sent.iter().map(|(id, _)| id.as_str()).collect();
        let (code, answer) = dec(
            &self.client(Some(slave)),
            &self.url(slave_kme),
            master,
            &ids,
        )
        .await;
        assert_eq!(code, 200, "{answer}");
        assert_eq!(keys(&answer), sent);
        sent
    }

    /// dec_keys of `slave` at `slave_kme` for `master`'s keys `sent` (as `keys` returns them).
    pub async fn dec_sent(
        &self,
        (slave, slave_kme): (&str, &str),
        master: &str,
        sent: &[(String, String)],
    ) -> (u16, Value) {
        let ids: Vec<&str> = sent.iter().map(|(id, _)| id.as_str()).collect();
        dec(
            &self.client(Some(slave)),
            &self.url(slave_kme),
            master,
            &ids,
        )
        .await
    }

    /// Stops one KME (its listeners close; a peer of it sees connections refused).
    pub fn stop(&mut self, kme: &str) {
        if let Some(i) = self.nodes.iter().position(|(id, _)| *id == kme) {
            self.nodes.remove(i).1.stop();
        }
    }

    pub fn url(&self, kme: &str) -> String {
        self.setup.sae_url(kme)
    }

    /// The admin listener of `kme` (`LinkOptions::admin`), with its scheme.
    pub fn admin_url(&self, kme: &str) -> String {
        let addr = self
            .nodes
            .iter()
            .find(|(id, _)| *id == kme)
            .and_then(|(_, node)| node.admin_addr)
            .unwrap();
        let scheme = if self.admin_tls { "https" } else { "http" };
        format!("{scheme}://localhost:{}", addr.port())
    }

    pub fn client(&self, cert: Option<&str>) -> Client {
        Client::new(self.setup.path(), cert)
    }

    /// Waits until `master`'s pool towards `slave` reports at least `count` keys.
    pub async fn wait_for_keys(
        &self,
        master: &str,
        master_kme: &str,
        slave: &str,
        count: u64,
    ) -> Value {
        let client = self.client(Some(master));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = client
                .get(&format!(
                    "{}/api/v1/keys/{slave}/status",
                    self.url(master_kme)
                ))
                .await;
            assert_eq!(status, 200, "{body}");
            if body["stored_key_count"].as_u64().unwrap() >= count {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "pool did not reach {count} keys: {body}"
            );
            actix_web::rt::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for (_, node) in self.nodes.drain(..) {
            node.stop();
        }
    }
}

/// An HTTPS client with an optional client certificate `<dir>/<cert>.crt`.
#[derive(Clone)]
pub struct Client {
    inner: awc::Client,
}

impl Client {
    pub fn new(dir: &Path, cert: Option<&str>) -> Client {
        let mut tls = SslConnector::builder(SslMethod::tls()).unwrap();
        tls.set_ca_file(dir.join("ca.crt")).unwrap();
        if let Some(cert) = cert {
            tls.set_certificate_chain_file(dir.join(format!("{cert}.crt")))
                .unwrap();
            tls.set_private_key_file(dir.join(format!("{cert}.key")), SslFiletype::PEM)
                .unwrap();
        }
        tls.set_alpn_protos(b"\x08http/1.1").unwrap();
        let inner = awc::Client::builder()
            .connector(awc::Connector::new().openssl(tls.build()).limit(128))
            .timeout(Duration::from_secs(20))
            .finish();
        Client { inner }
    }

    async fn finish(
        response: Result<
            awc::ClientResponse<
                impl futures_util::Stream<
                        Item = Result<actix_web::web::Bytes, awc::error::PayloadError>,
                    > + Unpin,
            >,
            awc::error::SendRequestError,
        >,
    ) -> (u16, Value) {
        let (status, body, _) = Self::finish_with_headers(response).await;
        (status, body)
    }

    async fn finish_with_headers(
        response: Result<
            awc::ClientResponse<
                impl futures_util::Stream<
                        Item = Result<actix_web::web::Bytes, awc::error::PayloadError>,
                    > + Unpin,
            >,
            awc::error::SendRequestError,
        >,
    ) -> (u16, Value, awc::http::header::HeaderMap) {
        let mut response = response.unwrap();
        let status = response.status().as_u16();
        let bytes = response.body().limit(64 * 1024 * 1024).await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        if status != 200 {
            assert_eq!(
                response
                    .headers()
                    .get("content-type")
                    .map(|v| v.to_str().unwrap()),
                Some("application/json"),
                "error bodies are JSON: {body}"
            );
            assert!(
                body["message"].is_string(),
                "ETSI Error object expected, got {body}"
            );
            assert!(
                [400, 401, 503].contains(&status),
                "only 400/401/503 on the SAE API, got {status} {body}"
            );
        }
        (status, body, response.headers().clone())
    }

    pub async fn get(&self, url: &str) -> (u16, Value) {
        Self::finish(self.inner.get(url).send().await).await
    }

    /// GET, with the response headers too.
    pub async fn get_with_headers(&self, url: &str) -> (u16, Value, awc::http::header::HeaderMap) {
        Self::finish_with_headers(self.inner.get(url).send().await).await
    }

    /// POST, with the response headers too.
    pub async fn post_with_headers(
        &self,
        url: &str,
        body: &Value,
    ) -> (u16, Value, awc::http::header::HeaderMap) {
        Self::finish_with_headers(self.inner.post(url).send_json(body).await).await
    }

    pub async fn post(&self, url: &str, body: &Value) -> (u16, Value) {
        Self::finish(self.inner.post(url).send_json(body).await).await
    }

    pub async fn post_raw(&self, url: &str, body: Vec<u8>) -> (u16, Value) {
        Self::finish(
            self.inner
                .post(url)
                .insert_header(("content-type", "application/json"))
                .send_body(body)
                .await,
        )
        .await
    }

    pub async fn request(&self, method: &str, url: &str) -> (u16, Value) {
        let method = awc::http::Method::from_bytes(method.as_bytes()).unwrap();
        Self::finish(self.inner.request(method, url).send().await).await
    }

    /// POST that tolerates a KME that is going down: None on a transport error.
    pub async fn inner_post(&self, url: &str, body: &Value) -> Option<(u16, Value)> {
        let mut response = self.inner.post(url).send_json(body).await.ok()?;
        let status = response.status().as_u16();
        let body = response
            .json::<Value>()
            .limit(64 * 1024 * 1024)
            .await
            .ok()?;
        Some((status, body))
    }

    /// GET that tolerates a KME that is not up: None on a transport error.
    pub async fn try_get(&self, url: &str) -> Option<(u16, Value)> {
        let mut response = self.inner.get(url).send().await.ok()?;
        let status = response.status().as_u16();
        let body = response.json::<Value>().await.ok()?;
        Some((status, body))
    }

    /// A raw request whose outcome may be a TLS failure (for the KME-to-KME listener).
    pub async fn try_post(&self, url: &str, body: &Value) -> Result<(u16, Value), String> {
        match self.inner.post(url).send_json(body).await {
            Ok(mut response) => {
                let status = response.status().as_u16();
                let body = response.json::<Value>().await.unwrap_or(Value::Null);
                Ok((status, body))
            }
            Err(err) => Err(err.to_string()),
        }
    }
}

/// enc_keys at `kme` by `master` for `slave`; returns (status, keys as (id, key) pairs).
pub async fn enc(client: &Client, base: &str, slave: &str, body: Value) -> (u16, Value) {
    client
        .post(&format!("{base}/api/v1/keys/{slave}/enc_keys"), &body)
        .await
}

pub async fn dec(client: &Client, base: &str, master: &str, ids: &[&str]) -> (u16, Value) {
    let ids: Vec<Value> = ids
        .iter()
        .map(|id| serde_json::json!({"key_ID": id}))
        .collect();
    client
        .post(
            &format!("{base}/api/v1/keys/{master}/dec_keys"),
            &serde_json::json!({"key_IDs": ids}),
        )
        .await
}

pub fn keys(body: &Value) -> Vec<(String, String)> {
    body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["key_ID"].as_str().unwrap().to_string(),
                k["key"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

impl Net {
    /// Restarts one KME (same data) on new ports of 127.0.0.1:0, so that no test binding `:0`
    /// meanwhile can take its old ones. Its peers reach its new peer listener only through a
    /// `peer_url` that forwards to it (e.g. a `TcpRelay` the test retargets).
    pub fn restart_on_new_ports(&mut self, kme: &'static str) {
        self.stop(kme);
        let sae = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpListener::bind("127.0.0.1:0").unwrap();
        let ports = (
            sae.local_addr().unwrap().port(),
            peer.local_addr().unwrap().port(),
        );
        self.setup.ports.insert(kme, ports);
        let config = Config::load(&self.setup.config_file()).unwrap();
        let node = node::spawn(config.node(kme).unwrap(), Some(Listeners { sae, peer }));
        self.nodes.push((kme, node.unwrap()));
    }
}

/// A TCP relay on 127.0.0.1 (TLS passes through it untouched) to a KME's peer listener, for
/// a `peer_url` that the test controls: it follows the KME to new ports (`retarget`) and can
/// hold every byte (`stall`): a hop that is up but does not answer.
pub struct TcpRelay {
    listener: Option<TcpListener>,
    port: u16,
    target: Arc<AtomicU16>,
    stalled: Arc<AtomicBool>,
}

impl TcpRelay {
    pub fn bind() -> TcpRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        TcpRelay {
            listener: Some(listener),
            port,
            target: Arc::new(AtomicU16::new(0)),
            stalled: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The `peer_url` through this relay.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    /// Starts relaying each new connection to `target` (a port of 127.0.0.1).
    pub fn run(&mut self, target: u16) {
        use std::io::{Read, Write};
        self.retarget(target);
        let listener = self.listener.take().unwrap();
        let (target, stalled) = (self.target.clone(), self.stalled.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let to = ("127.0.0.1", target.load(Ordering::SeqCst));
                let Ok(server) = std::net::TcpStream::connect(to) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let stalled = stalled.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            while stalled.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
    }

    /// New connections go to `target` from now on.
    pub fn retarget(&self, target: u16) {
        self.target.store(target, Ordering::SeqCst);
    }

    pub fn stall(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::SeqCst);
    }
}

/// A TLS client of the PKI in `dir` presenting `<cert>.crt`/`.key` and trusting `ca` (a file
/// in `dir`), offering the ALPN protocols `alpn`, for tests that speak HTTP by hand.
pub fn raw_tls(dir: &Path, ca: &str, cert: &str, alpn: &[u8]) -> SslConnector {
    let mut tls = SslConnector::builder(SslMethod::tls()).unwrap();
    tls.set_ca_file(dir.join(ca)).unwrap();
    tls.set_certificate_chain_file(dir.join(format!("{cert}.crt")))
        .unwrap();
    tls.set_private_key_file(dir.join(format!("{cert}.key")), SslFiletype::PEM)
        .unwrap();
    tls.set_alpn_protos(alpn).unwrap();
    tls.build()
}

/// A sequence number ahead of any a test network's KME has sent (epoch 1024: within the
/// 2^16 epochs a neighbour may jump), for forged KME-to-KME messages.
pub const NEW_SEQ: u64 = 1 << 50;

/// Revokes the certificates `names` of the PKI in `dir` and writes its CRL, `ca.crl`, with
/// the dev PKI's own script (`certs/revoke.sh`).
pub fn revoke(dir: &Path, names: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/revoke.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg("--dir")
        .arg(dir)
        .args(names)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "revoke.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `kme restored --config <config> --kme <kme>` (the KME stopped); returns its output.
pub fn kme_restored(config: &Path, kme: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kme"))
        .args(["restored", "--config"])
        .arg(config)
        .args(["--kme", kme])
        .output()
        .unwrap()
}

/// Runs `kme audit <action> --config <setup's> --kme <kme> <args>`; returns its output.
pub fn kme_audit(setup: &Setup, action: &str, kme: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kme"))
        .args(["audit", action, "--config"])
        .arg(setup.config_file())
        .args(["--kme", kme])
        .args(args)
        .output()
        .unwrap()
}

/// Runs `kme audit verify` on `kme`'s database (the KME may be running, or killed) and asserts
/// that it reports the hash chain intact.
pub fn audit_verify(setup: &Setup, kme: &str) {
    let out = kme_audit(setup, "verify", kme, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("hash chain intact"),
        "audit verify {kme}: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Ships `shipment` (a blocks message) to `url` as a neighbour (`client`) and asserts that it
/// is refused because its block is not the receiver's to take.
pub async fn assert_shipment_refused(client: &Client, url: &str, shipment: &Value) {
    let (code, answer) = client.try_post(url, shipment).await.unwrap();
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("does not belong"),
        "{answer}"
    );
}
