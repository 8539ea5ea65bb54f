//! BB84 links end to end: keys SAEs get come from frames post-processed between two KMEs, an
//! eavesdropper makes the link abort (503 for its SAEs) and the link recovers without it.

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use super::db_probe;
use super::harness::{assert_shipment_refused, enc, LinkOptions, Net};

fn qkd(status: &Value) -> &Value {
    &status["status_extension"]["link"]["qkd"]
}

#[actix::test]
async fn sae_keys_come_from_bb84_frames_and_status_shows_the_link() {
    let net = Net::start(LinkOptions::bb84(""));
    let status = net
        .wait_for_status("sae-a", "kme-a", "sae-b", "two good frames", |s| {
            qkd(s)["frames_ok"].as_u64() >= Some(2) && s["stored_key_count"].as_u64() >= Some(8)
        })
        .await;
    let link = &status["status_extension"]["link"];
    assert_eq!(link["source"], "bb84");
    assert_eq!(link["state"], "up", "{status}");
    let q = qkd(&status);
    // Misalignment 1 % plus dark counts at 20 km.
    let qber = q["qber"].as_f64().unwrap();
    assert!((0.002..0.03).contains(&qber), "{q}");
    let f = q["efficiency"].as_f64().unwrap();
    assert!((1.0..1.3).contains(&f), "{q}");
    assert!(q["secret_bits_per_s"].as_f64().unwrap() > 0.0, "{q}");
    assert!(q["auth_windows_left"].as_u64().unwrap() > 0, "{q}");

    // Both directions over the link; every key identical at both ends.
    net.key_pair(("sae-a", "kme-a"), ("sae-b", "kme-b"), 4)
        .await;
    net.wait_for_keys("sae-b", "kme-b", "sae-a", 4).await;
    net.key_pair(("sae-b", "kme-b"), ("sae-a", "kme-a"), 4)
        .await;

    // The Bob end sees the same link.
    let status = net
        .wait_for_status("sae-b", "kme-b", "sae-a", "frames at the Bob end", |s| {
            qkd(s)["frames_ok"].as_u64() >= Some(2)
        })
        .await;
    assert!(qkd(&status)["qber"].as_f64().unwrap() < 0.03, "{status}");
}

#[actix::test]
async fn an_eavesdropper_aborts_the_link_its_saes_get_503_and_it_recovers_without_her() {
    let mut net = Net::start(LinkOptions::bb84("eavesdropper = 1.0"));
    let status = net
        .wait_for_status("sae-a", "kme-a", "sae-b", "three aborted frames", |s| {
            qkd(s)["frames_aborted"].as_u64() >= Some(3)
        })
        .await;
    let q = qkd(&status);
    assert_eq!(
        status["status_extension"]["link"]["state"], "down",
        "{status}"
    );
    assert_eq!(q["frames_ok"], 0, "{q}");
    // Intercept-resend on every photon: about 25 % errors on the sifted key.
    let qber = q["qber"].as_f64().unwrap();
    assert!((0.2..0.3).contains(&qber), "{q}");
    // The bound on the key's phase-error rate is above what the test bits show.
    let upper = q["qber_upper"].as_f64().unwrap();
    assert!((qber..=0.5).contains(&upper), "{q}");
    assert!(q["last_abort"].as_str().unwrap().contains("QBER"), "{q}");
    assert_eq!(
        status["stored_key_count"], 0,
        "no key from an attacked link"
    );
    let (a, sae_a) = (net.url("kme-a"), net.client(Some("sae-a")));
    let (code, body) = enc(&sae_a, &a, "sae-b", json!({"number": 1})).await;
    assert_eq!(code, 503, "{body}");
    assert!(body["message"].is_string(), "{body}");

    // The eavesdropper leaves: the same KMEs (same data, same authentication stream) recover.
    net.restart_all(&LinkOptions::bb84(""));
    let a = net.url("kme-a");
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 1).await;
    let (code, body) = enc(&sae_a, &a, "sae-b", json!({"number": 1})).await;
    assert_eq!(code, 200, "{body}");
    let status = net
        .wait_for_status("sae-a", "kme-a", "sae-b", "the link is up", |s| {
            s["status_extension"]["link"]["state"] == "up"
        })
        .await;
    assert!(qkd(&status)["qber"].as_f64().unwrap() < 0.03, "{status}");
}

/// Both pools of the link a — b hold `max_key_count` keys (512 with `LinkOptions::bb84`): the
/// driving end starts no frame until SAEs take keys, so the link's state holds still. That is
/// some 40 frames: on a loaded 2-core machine, more than the usual 30 s.
async fn until_pools_full(net: &Net) {
    let deadline = Instant::now() + Duration::from_secs(180);
    for (master, kme, slave) in [("sae-a", "kme-a", "sae-b"), ("sae-b", "kme-b", "sae-a")] {
        loop {
            let status = net
                .wait_for_status(master, kme, slave, "status", |_| true)
                .await;
            if status["stored_key_count"].as_u64() >= Some(512) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a full pool did not happen: {status}"
            );
            actix_web::rt::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `bytes_produced` of the link a — b at `kme`.
async fn bytes_produced(net: &Net, kme: &str) -> u64 {
    let (master, slave) = if kme == "kme-a" {
        ("sae-a", "sae-b")
    } else {
        ("sae-b", "sae-a")
    };
    let status = net
        .wait_for_status(master, kme, slave, "status", |_| true)
        .await;
    status["status_extension"]["link"]["bytes_produced"]
        .as_u64()
        .unwrap()
}

#[actix::test]
async fn the_bob_end_refuses_stale_or_forged_bb84_messages_and_keeps_working() {
    let net = Net::start(LinkOptions::bb84(""));
    until_pools_full(&net).await;
    let kme_a = net.client(Some("kme-a"));
    let url = format!("{}/peer/v1/source", net.setup.peer_url("kme-b"));
    let empty = json!({"words": [], "len": 0});
    let protocol = kme_bb84::pipeline::PROTOCOL_VERSION;
    let start = |window: u64| json!({"start": {"frame_id": 1, "window": window, "record": {"bits": empty, "bases": empty}, "protocol": protocol}});
    // Window 0 keyed the first frame: it never serves again, and a Start for it is answered
    // with the Bob end's next window, burning nothing: the probe of his position.
    let position = || async {
        let (code, answer) = kme_a.try_post(&url, &start(0)).await.unwrap();
        assert_eq!(code, 200, "{answer}");
        assert!(answer.get("envelopes").is_none(), "{answer}");
        answer["next_window"].as_u64().unwrap()
    };
    let next = position().await;
    assert!(next >= 1, "{next}");
    // A KME of another post-processing protocol (here one from before versions were sent) is
    // refused before anything is used, with a message saying why.
    let old = json!({"start": {"frame_id": 1, "window": next, "record": {"bits": empty, "bases": empty}}});
    let (code, answer) = kme_a.try_post(&url, &old).await.unwrap();
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("protocol"),
        "{answer}"
    );
    // One message must not burn the rest of the stream: a window far ahead is answered with
    // the Bob end's position (the two ends are out of step), and nothing is used.
    for window in [next + 200, u64::MAX / 264] {
        let (code, answer) = kme_a.try_post(&url, &start(window)).await.unwrap();
        assert_eq!(code, 200, "{answer}");
        assert_eq!(answer["reply"], "auth_out_of_step", "{answer}");
        assert_eq!(answer["next_window"], next, "{answer}");
    }
    // A malformed bit vector never reaches the pipeline, even for the window due next.
    let bad = json!({"start": {"frame_id": 1, "window": next, "protocol": protocol, "record": {
        "bits": {"words": [255], "len": 3}, "bases": empty}}});
    let (code, answer) = kme_a.try_post(&url, &bad).await.unwrap();
    assert_eq!(code, 400, "{answer}");
    // None of the refused Starts burned a window: the Bob end's position is where it was (the
    // pools are full, so the Alice end runs no frame meanwhile; one at most if a level report
    // was late).
    let after = position().await;
    assert!(
        (next..=next + 1).contains(&after),
        "refused Starts moved the authentication position from {next} to {after}"
    );
    // Messages for a frame that is not running.
    let step = json!({"step": {"frame_id": 12345, "envelopes": []}});
    let (code, answer) = kme_a.try_post(&url, &step).await.unwrap();
    assert_eq!(code, 400, "{answer}");
    // A commit of blocks this end never got a key for: the frame is lost, nothing is stored.
    let lost =
        json!({"commit": {"frame_id": null, "blocks": [{"owner": "kme-a", "seq": 1000000}]}});
    let (code, answer) = kme_a.try_post(&url, &lost).await.unwrap();
    assert_eq!(code, 410, "{answer}");
    assert_eq!(answer["frame_lost"], true, "{answer}");
    // A retried commit of blocks already stored is acknowledged.
    let held = json!({"commit": {"frame_id": null, "blocks": [{"owner": "#auth", "seq": 0}]}});
    let (code, answer) = kme_a.try_post(&url, &held).await.unwrap();
    assert_eq!(code, 200, "{answer}");
    let foreign = json!({"commit": {"frame_id": null, "blocks": [{"owner": "kme-c", "seq": 0}]}});
    let (code, answer) = kme_a.try_post(&url, &foreign).await.unwrap();
    assert_eq!(code, 400, "{answer}");
    // Key bytes never travel on a BB84 link: a shipment of a key block is refused, although
    // it is a whole block (1 KiB) of an owner of this link. Nothing is stored.
    // It is numbered as the next block of its owner, so that nothing but the link's source
    // refuses it.
    let dir = net.setup.path();
    let produced = bytes_produced(&net, "kme-b").await;
    let seq = db_probe::next_seq(dir, "kme-b", "kme-a", "kme-b");
    let block = base64::engine::general_purpose::STANDARD.encode([7u8; 1024]);
    let shipment = json!({"blocks": [{"owner": "kme-b", "seq": seq, "data": block}]});
    let blocks_url = format!("{}/peer/v1/blocks", net.setup.peer_url("kme-b"));
    assert_shipment_refused(&kme_a, &blocks_url, &shipment).await;
    assert_eq!(bytes_produced(&net, "kme-b").await, produced);
    let dir = net.setup.path();
    assert_eq!(
        db_probe::link_blocks(dir, "kme-b", "kme-a", "kme-b", 999),
        0
    );

    // The link goes on producing matching keys: new frames at both ends after the forged
    // messages (the SAEs take keys, so that the pools want more).
    let frames = |s: &Value| qkd(s)["frames_ok"].as_u64().unwrap();
    let (a0, b0) = net.link_ends().await;
    let (a0, b0) = (frames(&a0), frames(&b0));
    net.until_link(
        "new frames at both ends after the forged messages",
        |a, b| frames(a) >= a0 + 2 && frames(b) >= b0 + 2,
    )
    .await;
    net.key_pair(("sae-a", "kme-a"), ("sae-b", "kme-b"), 2)
        .await;
    net.key_pair(("sae-b", "kme-b"), ("sae-a", "kme-a"), 2)
        .await;
}

/// Runs `kme link rekey` at `kme` for its link to `peer` with `key_file`; asserts it worked.
fn install_auth_key(net: &Net, kme: &str, peer: &str, key_file: &std::path::Path) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kme"))
        .args(["link", "rekey", "--config"])
        .arg(net.setup.config_file())
        .args(["--kme", kme, "--peer", peer, "--key-file"])
        .arg(key_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `auth_bootstrap = "key-file"` (the default): a BB84 link never ships its authentication
/// key over TLS. Without one it is down and says why; once the operator installs the same key
/// file at both ends (`kme link rekey`) it runs frames, its keys match at both ends, and the
/// file is destroyed at both.
#[actix::test]
async fn a_bb84_link_runs_only_on_an_authentication_key_the_operator_installed() {
    let net = Net::start(LinkOptions::bb84("auth_bootstrap = \"key-file\""));
    let waiting = |s: &Value| {
        s["status_extension"]["link"]["state"] == "down"
            && s["status_extension"]["link"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("no authentication key yet"))
    };
    net.until_link("down for want of a key", |a, b| waiting(a) && waiting(b))
        .await;
    actix_rt::time::sleep(Duration::from_millis(500)).await;
    let (a, b) = net.link_ends().await;
    for end in [&a, &b] {
        assert!(waiting(end), "{end}");
        assert_eq!(qkd(end)["frames_ok"], 0, "{end}");
        assert_eq!(
            qkd(end)["auth_windows_left"],
            0,
            "nothing came over TLS: {end}"
        );
    }

    let key_file = net.setup.path().join("a-b.auth-key");
    std::fs::write(&key_file, openssl_random(16 * 1024)).unwrap();
    install_auth_key(&net, "kme-a", "kme-b", &key_file);
    install_auth_key(&net, "kme-b", "kme-a", &key_file);
    net.until_link("frames on the operator's key", |a, b| {
        qkd(a)["frames_ok"].as_u64().unwrap() >= 2
            && qkd(b)["frames_ok"].as_u64().unwrap() >= 2
            && a["status_extension"]["link"]["state"] == "up"
    })
    .await;
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 8).await;
    net.key_pair(("sae-a", "kme-a"), ("sae-b", "kme-b"), 8)
        .await;
    for (kme, peer) in [("kme-a", "kme-b"), ("kme-b", "kme-a")] {
        let installed = net
            .setup
            .path()
            .join(format!("data/{kme}/auth-keys/{peer}/a-b.auth-key"));
        assert!(!installed.exists(), "{} left", installed.display());
    }
}

/// An end whose authentication stream is behind the other's (its stream restored from a
/// backup taken before the link's first key) goes down at both ends saying the stream is out
/// of step, instead of failing frame after frame; a new key file the operator installs at both
/// ends (`kme link rekey`) restarts the stream above what either end used, frames run again
/// and the keys match.
#[actix::test]
async fn a_bb84_end_restored_behind_its_authentication_stream_waits_for_an_operator_rekey() {
    let options = LinkOptions::bb84("auth_bootstrap = \"key-file\"");
    let mut net = Net::start(options.clone());
    let dir = net.setup.path().to_path_buf();
    let backup = dir.join("kme-b-backup.sqlite");
    db_probe::tamper(
        &dir,
        "kme-b",
        &format!("VACUUM INTO '{}'", backup.display()),
    );
    let first_key = dir.join("first.auth-key");
    std::fs::write(&first_key, openssl_random(16 * 1024)).unwrap();
    install_auth_key(&net, "kme-a", "kme-b", &first_key);
    install_auth_key(&net, "kme-b", "kme-a", &first_key);
    let frames = |end: &Value| qkd(end)["frames_ok"].as_u64().unwrap();
    net.until_link("frames on the first key", |a, b| {
        frames(a) >= 2 && frames(b) >= 2
    })
    .await;
    net.restart_all_after(&options, || {
        db_probe::tamper(
            &dir,
            "kme-b",
            &format!(
                "ATTACH '{}' AS backup;
                 DELETE FROM link_blocks WHERE owner = '#auth';
                 INSERT INTO link_blocks SELECT * FROM backup.link_blocks WHERE owner = '#auth';
                 DELETE FROM link_streams WHERE owner = '#auth';
                 INSERT INTO link_streams SELECT * FROM backup.link_streams WHERE owner = '#auth';",
                backup.display()
            ),
        );
    });
    let out_of_step = |s: &Value| {
        s["status_extension"]["link"]["state"] == "down"
            && s["status_extension"]["link"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("out of step") && r.contains("kme link rekey"))
    };
    net.until_link("both ends down, out of step", |a, b| {
        out_of_step(a) && out_of_step(b)
    })
    .await;
    actix_rt::time::sleep(Duration::from_millis(500)).await;
    let (a, b) = net.link_ends().await;
    assert!(out_of_step(&a) && out_of_step(&b), "{a}\n{b}");
    assert_eq!(frames(&a), 0, "no frame runs out of step: {a}");

    let second_key = dir.join("second.auth-key");
    std::fs::write(&second_key, openssl_random(16 * 1024)).unwrap();
    install_auth_key(&net, "kme-a", "kme-b", &second_key);
    install_auth_key(&net, "kme-b", "kme-a", &second_key);
    net.until_link("frames on the new key", |a, b| {
        frames(a) >= 2 && frames(b) >= 2 && a["status_extension"]["link"]["state"] == "up"
    })
    .await;
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 8).await;
    net.key_pair(("sae-a", "kme-a"), ("sae-b", "kme-b"), 8)
        .await;
}

fn openssl_random(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    openssl::rand::rand_bytes(&mut bytes).unwrap();
    bytes
}
