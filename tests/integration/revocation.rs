//! Certificates checked again per request, on connections opened before: one revoked by a CRL
//! (`[tls] crl_files`, read again at a reload) or expired since the handshake serves nothing
//! more, and its connection is closed; a CRL the CA did not sign is refused.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use openssl::ssl::SslStream;
use serde_json::json;

use super::harness::{enc, raw_tls, revoke, LinkOptions, Net};
use super::pki::{Pki, Validity};

/// One TLS connection to a KME's SAE API as `cert`: requests go one after another on it.
struct Connection {
    stream: SslStream<TcpStream>,
}

/// One HTTP/1.1 answer: status, head (lowercase) and body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Connection {
    fn open(dir: &Path, port: u16, cert: &str) -> Connection {
        let tls = raw_tls(dir, "ca.crt", cert, b"\x08http/1.1");
        let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let stream = tls.connect("localhost", tcp).unwrap();
        Connection { stream }
    }

    /// GET `path` on this connection; None if the KME closed it.
    fn get(&mut self, path: &str) -> Option<Answer> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        self.stream.write_all(request.as_bytes()).ok()?;
        let mut bytes = Vec::new();
        let mut byte = [0u8; 1];
        while !bytes.ends_with(b"\r\n\r\n") {
            match self.stream.read(&mut byte) {
                Ok(1) => bytes.push(byte[0]),
                _ => return None,
            }
        }
        let head = String::from_utf8(bytes).unwrap().to_lowercase();
        let status = head[9..12].parse().unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |n| n.trim().parse().unwrap());
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body).ok()?;
        let body = String::from_utf8(body).unwrap();
        Some(Answer { status, head, body })
    }
}

const STATUS: &str = "/api/v1/keys/sae-b/status";

/// Reloads `kme` through its plain admin listener; returns the status and the answer.
async fn reload(net: &Net, kme: &str) -> (u16, serde_json::Value) {
    let url = format!("{}/reload", net.admin_url(kme));
    let mut response = awc::Client::default().post(&url).send().await.unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or_default(),
    )
}

/// Asserts that `answer` is the 401 of a closed connection, saying `why`.
fn refused_and_closed(connection: &mut Connection, answer: Answer, why: &str) {
    assert_eq!(answer.status, 401, "{}", answer.body);
    assert!(answer.body.contains(why), "{}", answer.body);
    assert!(answer.head.contains("connection: close"), "{}", answer.head);
    assert!(
        connection.get(STATUS).is_none(),
        "the connection stays open"
    );
}

#[actix::test]
async fn a_revoked_sae_is_refused_after_a_reload_on_its_open_connection_too() {
    let net = Net::start(LinkOptions {
        crl: true,
        admin: Some(false),
        ..LinkOptions::default()
    });
    let dir = net.setup.path().to_path_buf();
    let port = net.setup.ports["kme-a"].0;
    let mut open = Connection::open(&dir, port, "sae-a");
    assert_eq!(open.get(STATUS).unwrap().status, 200);

    revoke(&dir, &["sae-a"]);
    // Not before the reload: the CRL in force is the one read at start.
    assert_eq!(open.get(STATUS).unwrap().status, 200);
    let (code, reloaded) = reload(&net, "kme-a").await;
    assert_eq!((code, &reloaded["revoked"]), (200, &json!(1)), "{reloaded}");

    let answer = open.get(STATUS).unwrap();
    refused_and_closed(&mut open, answer, "revoked");
    // A new connection is refused too, and SAEs not revoked are served.
    let mut fresh = Connection::open(&dir, port, "sae-a");
    let answer = fresh.get(STATUS).unwrap();
    refused_and_closed(&mut fresh, answer, "revoked");
    assert_eq!(reload(&net, "kme-b").await.0, 200);
    let (code, body) = enc(
        &net.client(Some("sae-b")),
        &net.url("kme-b"),
        "sae-b2",
        json!({}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
}

#[actix::test]
async fn a_certificate_that_expires_on_an_open_connection_is_refused_from_then_on() {
    let net = Net::start(LinkOptions::default());
    let dir = net.setup.path().to_path_buf();
    Pki::open(&dir).issue("short-lived", Some("sae-a"), false, Validity::ExpiresIn(3));
    let mut open = Connection::open(&dir, net.setup.ports["kme-a"].0, "short-lived");
    assert_eq!(open.get(STATUS).unwrap().status, 200);
    actix_rt::time::sleep(Duration::from_millis(4500)).await;
    let answer = open.get(STATUS).unwrap();
    refused_and_closed(&mut open, answer, "expired");
}

#[actix::test]
async fn a_crl_the_ca_did_not_sign_is_refused_at_reload_and_at_start() {
    let net = Net::start(LinkOptions {
        crl: true,
        admin: Some(false),
        ..LinkOptions::default()
    });
    let dir = net.setup.path().to_path_buf();
    // A CRL of another CA of the same name: its signature does not verify.
    let rogue = tempfile::tempdir().unwrap();
    Pki::new(rogue.path());
    revoke(rogue.path(), &[]);
    std::fs::copy(rogue.path().join("ca.crl"), dir.join("ca.crl")).unwrap();
    let (code, answer) = reload(&net, "kme-a").await;
    assert_eq!(code, 400, "{answer}");
    let why = answer["message"].as_str().unwrap_or_default();
    assert!(
        why.contains("signature") && why.contains("nothing changed"),
        "{why}"
    );
    let mut still = Connection::open(&dir, net.setup.ports["kme-a"].0, "sae-a");
    assert_eq!(still.get(STATUS).unwrap().status, 200);

    // A KME does not start with it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kme"))
        .args(["run", "--config"])
        .arg(net.setup.config_file())
        .args(["--kme", "kme-c"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("CRL"), "{said}");
}

/// On the KME-to-KME channel too: once kme-b's CRL revokes kme-a's certificate, kme-b serves
/// kme-a nothing more, and their link goes down at both ends with the reason.
#[actix::test]
async fn a_revoked_kme_is_cut_off_by_its_neighbour() {
    let net = Net::start(LinkOptions {
        crl: true,
        admin: Some(false),
        ..LinkOptions::default()
    });
    net.until_link("the link up", |a, b| {
        a["status_extension"]["link"]["state"] == "up"
            && b["status_extension"]["link"]["state"] == "up"
    })
    .await;
    revoke(net.setup.path(), &["kme-a"]);
    assert_eq!(reload(&net, "kme-b").await.0, 200);
    // kme-a's keys for sae-b can no longer be delivered: 503, nothing handed out.
    let (code, body) = enc(
        &net.client(Some("sae-a")),
        &net.url("kme-a"),
        "sae-b",
        json!({}),
    )
    .await;
    assert_eq!(code, 503, "{body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (a, _) = net.link_ends().await;
        let link = &a["status_extension"]["link"];
        if link["state"] == "down" {
            assert!(link["reason"].to_string().contains("revoked"), "{a}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still up: {a}");
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
}
