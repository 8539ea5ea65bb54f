//! The operator's listener: `/metrics` (parsed as Prometheus text, checked against known
//! activity), `/health`, `/ready` (which flips when a link's peer dies), and operator-only
//! access when it has TLS.

use std::time::{Duration, Instant};

use serde_json::json;

use super::harness::{
    audit_verify, dec, enc, keys, kme_audit, kme_restored, Client, LinkOptions, Net, TcpRelay,
};

/// Fetches `url` over plain HTTP; returns its status and body text.
async fn plain_get(url: &str) -> (u16, String) {
    let mut response = awc::Client::default().get(url).send().await.unwrap();
    let body = response.body().await.unwrap();
    (
        response.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// The samples of kme's `/metrics`, parsed by a Prometheus text parser.
async fn scrape(net: &Net, kme: &str) -> Vec<prometheus_parse::Sample> {
    let (code, text) = plain_get(&format!("{}/metrics", net.admin_url(kme))).await;
    assert_eq!(code, 200, "{text}");
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).unwrap().samples
}

/// The value of the sample `name` whose labels include `labels`.
fn value(samples: &[prometheus_parse::Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no {name} {labels:?}"));
    match sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name}: {other:?}"),
    }
}

#[actix::test]
async fn metrics_count_what_happened_and_ready_flips_when_a_peer_dies() {
    let mut net = Net::start(LinkOptions {
        admin: Some(false),
        ..LinkOptions::default()
    });
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 64).await;
    let (code, body) = plain_get(&format!("{}/health", net.admin_url("kme-a"))).await;
    assert_eq!(code, 200, "{body}");
    let ready = format!("{}/ready", net.admin_url("kme-a"));
    let (code, body) = plain_get(&ready).await;
    assert_eq!(code, 200, "{body}");

    let (a, b) = (net.url("kme-a"), net.url("kme-b"));
    let master = net.client(Some("sae-a"));
    let mut sent = Vec::new();
    for _ in 0..3 {
        let (code, body) = enc(&master, &a, "sae-b", json!({"number": 2})).await;
        assert_eq!(code, 200, "{body}");
        sent.extend(keys(&body));
    }
    let (code, _) = enc(&master, &a, "sae-b", json!({"number": 0})).await;
    assert_eq!(code, 400);
    let (code, _) = net.dec_sent(("sae-b", "kme-b"), "sae-a", &sent[..2]).await;
    assert_eq!(code, 200);
    let (code, _) = dec(&net.client(Some("sae-x")), &b, "sae-a", &["x"]).await;
    assert_eq!(code, 401);

    let at_a = scrape(&net, "kme-a").await;
    let enc_ok = [("endpoint", "enc_keys"), ("code", "200")];
    assert_eq!(value(&at_a, "kme_sae_requests_total", &enc_ok), 3.0);
    assert_eq!(
        value(&at_a, "kme_sae_keys_total", &[("direction", "delivered")]),
        6.0
    );
    assert_eq!(
        value(&at_a, "kme_refusals_total", &[("reason", "bad_request")]),
        1.0
    );
    assert_eq!(
        value(
            &at_a,
            "kme_audit_records_total",
            &[("event", "keys_delivered")]
        ),
        3.0
    );
    assert_eq!(
        value(&at_a, "kme_pool_max_keys", &[("peer", "kme-b")]),
        4096.0
    );
    assert_eq!(value(&at_a, "kme_link_state", &[("peer", "kme-b")]), 2.0);
    assert!(value(&at_a, "kme_store_commit_seconds_count", &[]) >= 3.0);
    assert!(
        value(
            &at_a,
            "kme_peer_request_seconds_count",
            &[("peer", "kme-b")]
        ) >= 3.0
    );
    assert!(value(&at_a, "kme_database_bytes", &[]) > 0.0);
    let at_b = scrape(&net, "kme-b").await;
    assert_eq!(
        value(&at_b, "kme_sae_keys_total", &[("direction", "retrieved")]),
        2.0
    );
    assert_eq!(
        value(&at_b, "kme_refusals_total", &[("reason", "unauthorized")]),
        1.0
    );

    // kme-b dies: kme-a is not ready any more, and says why.
    net.stop("kme-b");
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (code, body) = plain_get(&ready).await;
        if code == 503 {
            break body;
        }
        assert_eq!(code, 200, "{body}");
        assert!(Instant::now() < deadline, "still ready: {body}");
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(body.contains("the link to kme-b is down"), "{body}");
}

#[actix::test]
async fn an_admin_listener_with_tls_takes_only_operator_certificates() {
    let net = Net::start(LinkOptions {
        admin: Some(true),
        ..LinkOptions::default()
    });
    let health = format!("{}/health", net.admin_url("kme-a"));
    let operator = net.client(Some("operator")).try_get(&health).await.unwrap();
    assert_eq!(operator.0, 200, "{:?}", operator.1);
    for cert in ["sae-a", "kme-b"] {
        let refused = net.client(Some(cert)).try_get(&health).await.unwrap();
        assert_eq!(refused.0, 401, "{cert}: {:?}", refused.1);
    }
    // No certificate: no TLS session at all.
    let anonymous: Client = net.client(None);
    assert!(anonymous.try_get(&health).await.is_none());
}

/// `kme admin --kme <kme> <args>` on the test network; returns its exit code and what it
/// printed.
fn kme_admin(net: &Net, kme: &str, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kme"))
        .arg("admin")
        .arg("--config")
        .arg(net.setup.config_file())
        .args(["--kme", kme, "--url", &net.admin_url(kme)])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Reload without restart: an SAE added to the network file gets keys, one removed gets 401,
/// and a file that changes what needs a restart (or does not parse) changes nothing.
#[actix::test]
async fn a_reload_adds_and_removes_saes_and_a_bad_file_changes_nothing() {
    let net = Net::start(LinkOptions {
        admin: Some(false),
        ..LinkOptions::default()
    });
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 16).await;
    let (a, b) = (net.url("kme-a"), net.url("kme-b"));
    let newcomer = net.client(Some("sae-x"));
    let (code, _) = enc(&newcomer, &a, "sae-b", json!({})).await;
    assert_eq!(code, 401, "sae-x is not in the network file yet");
    // What the operator sees from the terminal.
    let (code, out) = kme_admin(&net, "kme-a", &["network"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("kme-a — kme-b  up") && out.contains("sae-b2"),
        "{out}"
    );
    let (code, out) = kme_admin(&net, "kme-a", &["events"]);
    assert!(code == 0 && out.contains("kme_started"), "{out}");
    let (code, out) = kme_admin(&net, "kme-a", &["audit-verify"]);
    assert!(code == 0 && out.starts_with("audit trail intact"), "{out}");
    let file = net.setup.config_file();
    let original = std::fs::read_to_string(&file).unwrap();
    let removed = "[[sae]]\nid = \"sae-b2\"\nkme = \"kme-b\"\n";
    assert!(original.contains(removed));
    let edited = original.replace(removed, "") + "[[sae]]\nid = \"sae-x\"\nkme = \"kme-a\"\n";
    std::fs::write(&file, &edited).unwrap();
    let (code, out) = kme_admin(&net, "kme-a", &["reload"]);
    assert_eq!(
        (code, out.trim()),
        (
            0,
            "reloaded: SAEs added: sae-x; removed: none; certificates revoked: 0"
        )
    );
    // The oldest closed records (all but the audited reload) as JSON lines, their MACed head
    // last (as `kme audit export`).
    let (code, out) = kme_admin(&net, "kme-a", &["audit-export"]);
    assert_eq!(code, 0, "{out}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}: {out}")))
        .collect();
    assert_eq!(lines[0]["event"], "kme_started", "{out}");
    let segment = &lines.last().unwrap()["segment"];
    assert_eq!(
        (segment["kme"].as_str(), segment["first"].as_i64()),
        (Some("kme-a"), Some(1))
    );

    let (code, out) = kme_admin(&net, "kme-b", &["--json", "reload"]);
    assert_eq!(code, 0, "{out}");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["removed"], json!(["sae-b2"]));

    let (code, body) = enc(&newcomer, &a, "sae-b", json!({})).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = net
        .dec_sent(("sae-b", "kme-b"), "sae-x", &keys(&body))
        .await;
    assert_eq!(code, 200, "{body}");
    let (code, _) = enc(&net.client(Some("sae-b2")), &b, "sae-a", json!({})).await;
    assert_eq!(code, 401, "sae-b2 is gone");

    // A link setting changed: refused whole, naming it; nothing changes.
    let relinked = edited.replace("max_key_count = 4096", "max_key_count = 100");
    std::fs::write(&file, relinked.replace("id = \"sae-x\"", "id = \"sae-y\"")).unwrap();
    let refusal = || async {
        let reload = format!("{}/reload", net.admin_url("kme-a"));
        let mut response = awc::Client::default().post(&reload).send().await.unwrap();
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(response.status().as_u16(), 400, "{answer}");
        answer["message"].as_str().unwrap().to_string()
    };
    let why = refusal().await;
    assert!(
        why.contains("`link` changed") && why.contains("nothing changed"),
        "{why}"
    );
    // Not even a network file: the same.
    std::fs::write(&file, "this is [not toml").unwrap();
    let why = refusal().await;
    assert!(why.contains("nothing changed"), "{why}");
    let (code, body) = enc(&newcomer, &a, "sae-b", json!({})).await;
    assert_eq!(code, 200, "sae-x still works: {body}");
}

/// Headless Chromium (`KME_CHROMIUM`, else `chromium`), as `make deps` installs it.
fn chromium() -> String {
    std::env::var("KME_CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

/// The DOM of `url` after its scripts ran for a few (virtual) seconds, and a screenshot of it
/// to `screenshot` if given.
fn render(url: &str, screenshot: Option<&std::path::Path>) -> String {
    let mut command = std::process::Command::new(chromium());
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1280,900",
        "--virtual-time-budget=3000",
    ]);
    match screenshot {
        Some(file) => command.arg(format!("--screenshot={}", file.display())),
        None => command.arg("--dump-dom"),
    };
    let out = command
        .arg(url)
        .output()
        .expect("chromium (make deps installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The dashboard in a real browser: it shows every KME and every link with its state, and a
/// KME that stops shows as its links going down within seconds. A screenshot of it goes to
/// `var/dashboard.png`.
#[actix::test]
async fn the_dashboard_shows_the_network_live_in_a_browser() {
    let mut net = Net::start(LinkOptions {
        admin: Some(false),
        ..LinkOptions::default()
    });
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 16).await;
    net.wait_for_keys("sae-b", "kme-b", "sae-c", 16).await;
    let url = format!("{}/", net.admin_url("kme-a"));
    let dom = render(&url, None);
    for kme in ["kme-a", "kme-b", "kme-c"] {
        assert!(
            dom.contains(&format!("data-kme=\"{kme}\"")),
            "{kme} missing: {dom}"
        );
    }
    for link in ["kme-a—kme-b", "kme-b—kme-c"] {
        let up = format!("data-link=\"{link}\" data-state=\"up\"");
        assert!(dom.contains(&up), "{link} not shown up: {dom}");
    }
    assert!(dom.contains("sae-b2"), "the SAEs are listed");

    net.stop("kme-c");
    let down = "data-link=\"kme-b—kme-c\" data-state=\"down\"";
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let dom = render(&url, None);
        if dom.contains(down) {
            assert!(dom.contains("data-link=\"kme-a—kme-b\" data-state=\"up\""));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kme-b — kme-c never shown down: {dom}"
        );
        actix_rt::time::sleep(Duration::from_millis(500)).await;
    }
    let var = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("var");
    std::fs::create_dir_all(&var).unwrap();
    let shot = var.join("dashboard.png");
    render(&url, Some(&shot));
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a real screenshot"
    );
}

/// Every SAE request gets an ID (`X-Request-Id`); a refusal the KME is to blame for is logged
/// with it, and `--log-format json` makes each log line one JSON object.
#[actix::test]
async fn logs_can_be_json_lines_naming_the_request_id_of_a_refusal() {
    let setup = super::harness::Setup::for_processes(&LinkOptions::default());
    // kme-a alone: its link to kme-b never comes up, so keys for sae-b are refused (503).
    let _kme_a = super::crash::spawn_with(&setup, "kme-a", &["--log-format", "json"]);
    let master = Client::new(setup.path(), Some("sae-a"));
    let a = setup.sae_url("kme-a");
    super::crash::wait_up(&master, &a).await;
    let (code, body, headers) = master
        .post_with_headers(&format!("{a}/api/v1/keys/sae-b/enc_keys"), &json!({}))
        .await;
    assert_eq!(code, 503, "{body}");
    let id = headers
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 4);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(setup.path().join("kme-a.log")).unwrap();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
            .collect();
        assert!(lines
            .iter()
            .all(|l| l["level"].is_string() && l["ts"].is_string()));
        let named = lines.iter().any(|l| {
            l["message"]
                .as_str()
                .unwrap()
                .contains(&format!("request {id}"))
        });
        if named {
            break;
        }
        assert!(Instant::now() < deadline, "no log line names {id}: {log}");
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The operator's webhook hears of a link that goes down and comes back (each KME watches its
/// link ends; events are JSON POSTs, sent one at a time and retried), and of an audit trail
/// that no longer verifies (checked every `audit_check_s`). A link whose neighbour never
/// answered is news too: the view at start is the baseline.
#[actix::test]
async fn the_webhook_hears_a_link_go_down_and_come_back_and_a_broken_audit_chain() {
    use actix_web::{web, App, HttpServer};
    let heard = web::Data::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let sink = heard.clone();
    let receiver = HttpServer::new(move || {
        App::new().app_data(sink.clone()).route(
            "/hook",
            web::post().to(
                |event: web::Json<serde_json::Value>,
                 heard: web::Data<std::sync::Mutex<Vec<serde_json::Value>>>| async move {
                    heard.lock().unwrap().push(event.into_inner());
                    actix_web::HttpResponse::Ok().finish()
                },
            ),
        )
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .run();
    let stop_receiver = receiver.handle();
    actix_rt::spawn(receiver);

    // kme-a and kme-c reach kme-b through a relay that follows it to its new ports; kme-b
    // reaches kme-c through one that closes every connection at once.
    let mut relay = TcpRelay::bind();
    let mut closed = TcpRelay::bind();
    let mut net = Net::start(LinkOptions {
        alerts: Some(format!(
            "webhook_url = \"http://127.0.0.1:{port}/hook\"\naudit_check_s = 1"
        )),
        peer_urls: vec![("kme-b", relay.url()), ("kme-c", closed.url())],
        ..LinkOptions::default()
    });
    relay.run(net.setup.ports["kme-b"].1);
    closed.run(0);
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 16).await;
    let until = |kme: &'static str,
                 event: &'static str,
                 peer: Option<&'static str>,
                 heard: web::Data<std::sync::Mutex<Vec<serde_json::Value>>>| async move {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let found = heard
                .lock()
                .unwrap()
                .iter()
                .find(|e| e["event"] == event && e["kme"] == kme && e["peer"] == json!(peer))
                .cloned();
            if let Some(found) = found {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no {event}: {:?}",
                heard.lock().unwrap()
            );
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        }
    };
    until("kme-b", "link_down", Some("kme-c"), heard.clone()).await;
    net.stop("kme-b");
    let down = until("kme-a", "link_down", Some("kme-b"), heard.clone()).await;
    assert!(down["at_ms"].is_i64(), "{down}");
    net.restart_on_new_ports("kme-b");
    relay.retarget(net.setup.ports["kme-b"].1);
    until("kme-a", "link_up", Some("kme-b"), heard.clone()).await;
    // Someone with the file rewrites a record of kme-a's trail while it runs.
    actix_rt::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !heard
            .lock()
            .unwrap()
            .iter()
            .any(|e| e["event"] == "audit_chain_broken"),
        "an intact trail is not news"
    );
    super::db_probe::tamper(
        net.setup.path(),
        "kme-a",
        "DROP TRIGGER audit_no_update; UPDATE audit SET detail = '{}' WHERE id = 1;",
    );
    let broken = until("kme-a", "audit_chain_broken", None, heard.clone()).await;
    assert!(
        broken["detail"]["message"]
            .as_str()
            .unwrap()
            .contains("record 1"),
        "{broken}"
    );
    stop_receiver.stop(true).await;
}

/// `kme audit verify` only reads: pointed at a KME whose database does not exist, it says so,
/// exits non-zero and creates nothing (it used to create an empty database and call it
/// intact).
#[test]
fn audit_verify_of_a_missing_database_fails_and_creates_nothing() {
    let setup = super::harness::Setup::for_processes(&LinkOptions::default());
    let out = kme_audit(&setup, "verify", "kme-a", &[]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("no database"), "{said}");
    assert!(
        !setup.path().join("data/kme-a").exists(),
        "nothing was created"
    );
}

/// The audit trail's head is kept outside the database too: cutting the newest records (even
/// with the triggers dropped, as someone with the file could) is seen by `kme audit verify`,
/// and the KME does not start on that database (nor on one restored from a backup) until
/// the operator runs `kme restored`.
#[actix::test]
async fn a_cut_audit_tail_is_seen_against_the_head_outside_the_database() {
    let mut net = Net::start(LinkOptions::default());
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 16).await;
    let (code, _) = enc(
        &net.client(Some("sae-a")),
        &net.url("kme-a"),
        "sae-b",
        json!({}),
    )
    .await;
    assert_eq!(code, 200);
    net.stop("kme-a");
    let verify = || kme_audit(&net.setup, "verify", "kme-a", &[]);
    let intact = verify();
    assert!(
        intact.status.success(),
        "{}",
        String::from_utf8_lossy(&intact.stderr)
    );
    super::db_probe::tamper(
        net.setup.path(),
        "kme-a",
        "DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE id > (SELECT max(id) - 2 FROM audit);",
    );
    let cut = verify();
    let said = String::from_utf8_lossy(&cut.stderr);
    assert!(
        !cut.status.success() && said.contains("tail was cut"),
        "{said}"
    );
    let config = kme::config::Config::load(&net.setup.config_file()).unwrap();
    let start = || {
        let any_port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listeners = kme::node::Listeners {
            sae: any_port(),
            peer: any_port(),
        };
        kme::node::spawn(config.node("kme-a").unwrap(), Some(listeners))
    };
    let refused = start().err().map(|err| err.to_string()).unwrap_or_default();
    assert!(
        refused.contains("tail was cut") && refused.contains("kme restored --kme kme-a"),
        "{refused}"
    );
    let restored = kme_restored(&net.setup.config_file(), "kme-a");
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    start().unwrap().stop();
}

/// Retention: a closed segment of the trail is exported and pruned while the KME serves; the
/// KME goes on appending, the rest verifies, and the same segment is not pruned twice.
#[actix::test]
async fn an_exported_audit_segment_is_pruned_while_the_kme_serves() {
    let net = Net::start(LinkOptions::default());
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 16).await;
    let master = net.client(Some("sae-a"));
    let url = net.url("kme-a");
    let get_key = || enc(&master, &url, "sae-b", json!({}));
    // Two deliveries: the newest record is never in a segment (the chain goes on from it).
    assert_eq!(get_key().await.0, 200);
    assert_eq!(get_key().await.0, 200);
    let export = net.setup.path().join("segment-1.jsonl");
    let out = kme_audit(
        &net.setup,
        "export",
        "kme-a",
        &["--out", export.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exported = std::fs::read_to_string(&export).unwrap();
    assert!(exported.contains("\"keys_delivered\""), "{exported}");
    let out = kme_audit(
        &net.setup,
        "prune",
        "kme-a",
        &["--segment", export.to_str().unwrap()],
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains("pruned"), "{said}");
    let deliveries = || super::db_probe::audit_events(net.setup.path(), "kme-a", "keys_delivered");
    assert_eq!(
        deliveries().len(),
        1,
        "the first delivery's record went with the segment"
    );
    // The KME goes on appending after the anchor, and the trail verifies from there.
    assert_eq!(get_key().await.0, 200);
    assert_eq!(deliveries().len(), 2);
    actix_rt::time::sleep(Duration::from_millis(200)).await;
    audit_verify(&net.setup, "kme-a");
    let again = kme_audit(
        &net.setup,
        "prune",
        "kme-a",
        &["--segment", export.to_str().unwrap()],
    );
    assert!(!again.status.success(), "pruned twice");
}
