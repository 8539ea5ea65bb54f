//! file-drop links: keys come from files a QKD device writes under the same name at both
//! ends, used only when both copies hash alike, and destroyed once stored.

use std::path::PathBuf;

use base64::Engine;
use serde_json::{json, Value};

use super::db_probe;
use super::harness::{assert_shipment_refused, LinkOptions, Net};

fn drop_dir(net: &Net, kme: &str, peer: &str) -> PathBuf {
    let dir = net.setup.path().join(format!("data/{kme}/key-drop/{peer}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn random(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    openssl::rand::rand_bytes(&mut bytes).unwrap();
    bytes
}

#[actix::test]
async fn keys_come_from_matching_key_files_which_are_destroyed_after_use() {
    let options = LinkOptions {
        block_bytes: 1024,
        file_drop: true,
        ..LinkOptions::default()
    };
    let mut net = Net::start(options.clone());
    let (at_a, at_b) = (
        drop_dir(&net, "kme-a", "kme-b"),
        drop_dir(&net, "kme-b", "kme-a"),
    );
    // A file the peer's device has not written yet waits; a differing twin is left aside.
    let early = random(4096);
    std::fs::write(at_a.join("0001"), &early).unwrap();
    let status = net
        .wait_for_status("sae-a", "kme-a", "sae-b", "a missing twin", |s| {
            s["status_extension"]["link"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("no key file 0001"))
        })
        .await;
    assert_eq!(status["stored_key_count"], 0, "{status}");
    std::fs::write(at_b.join("0001"), random(4096)).unwrap();
    net.wait_for_status("sae-a", "kme-a", "sae-b", "a rejected twin", |s| {
        s["status_extension"]["link"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("differs"))
    })
    .await;
    // Left aside at both ends (for the operator), never destroyed or renamed on the other
    // end's word.
    assert_eq!(std::fs::read(at_a.join("0001")).unwrap(), early);
    assert!(at_b.join("0001").exists());
    std::fs::rename(at_a.join("0001"), at_a.join("0001.rejected")).unwrap();
    std::fs::remove_file(at_b.join("0001")).unwrap();

    // Identical files: their bytes become the keys, and the files are gone at both ends.
    let files: Vec<Vec<u8>> = (0..2).map(|_| random(8 * 1024)).collect();
    for (i, bytes) in files.iter().enumerate() {
        let name = format!("{:04}", i + 2);
        std::fs::write(at_b.join(&name), bytes).unwrap();
        std::fs::write(at_a.join(&name), bytes).unwrap();
    }
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 64).await;
    let sent = net
        .key_pair(("sae-a", "kme-a"), ("sae-b", "kme-b"), 8)
        .await;
    for (_, key) in &sent {
        let key = base64::engine::general_purpose::STANDARD
            .decode(key)
            .unwrap();
        assert!(
            files
                .iter()
                .any(|f| f.windows(key.len()).any(|w| w == key.as_slice())),
            "a key that is not from the device's files"
        );
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for dir in [&at_a, &at_b] {
        loop {
            let left: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| !n.ends_with(".rejected"))
                .collect();
            if left.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "used key files left in {}: {left:?}",
                dir.display()
            );
            actix_web::rt::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    // Key bytes never travel on a file-drop link: a shipment of a key block is refused,
    // although it is a whole block (1 KiB) of an owner of this link, numbered as its owner's
    // next. Nothing is stored.
    let dir = net.setup.path();
    let produced = |s: &Value| s["status_extension"]["link"]["bytes_produced"].as_u64();
    let before = link_status(&net, "kme-b").await;
    let seq = db_probe::next_seq(dir, "kme-b", "kme-a", "kme-b");
    let block = base64::engine::general_purpose::STANDARD.encode([7u8; 1024]);
    let shipment = json!({"blocks": [{"owner": "kme-b", "seq": seq, "data": block}]});
    let blocks_url = format!("{}/peer/v1/blocks", net.setup.peer_url("kme-b"));
    assert_shipment_refused(&net.client(Some("kme-a")), &blocks_url, &shipment).await;
    assert_eq!(
        produced(&link_status(&net, "kme-b").await),
        produced(&before)
    );
    assert_eq!(
        db_probe::link_blocks(dir, "kme-b", "kme-a", "kme-b", seq),
        0
    );
    let rejected = std::fs::read(at_a.join("0001.rejected")).unwrap();
    assert_eq!(
        rejected, early,
        "a rejected file is kept for the operator, untouched"
    );

    // Used files that turn up again (as a crash between storing and destroying leaves them),
    // under their name or another, are destroyed and never give key again: at an offer, and
    // at the next start. Each time a fresh pair of files follows them (files are taken in
    // name order): once its key is in, the used files had their turn.
    let before = link_status(&net, "kme-a").await;
    assert!(produced(&before) > Some(0), "{before}");
    std::fs::write(at_a.join("0007"), &files[0]).unwrap();
    std::fs::write(at_b.join("0007"), &files[0]).unwrap();
    std::fs::write(at_b.join("0003"), &files[1]).unwrap();
    let fresh = random(4096);
    std::fs::write(at_a.join("0008"), &fresh).unwrap();
    std::fs::write(at_b.join("0008"), &fresh).unwrap();
    let expected = produced(&before).unwrap() + 4096;
    let after = net
        .wait_for_status("sae-a", "kme-a", "sae-b", "the fresh file's key", |s| {
            produced(s) >= Some(expected)
        })
        .await;
    assert_eq!(
        produced(&after),
        Some(expected),
        "a used file gave blocks: {after}"
    );
    assert!(!at_a.join("0007").exists() && !at_b.join("0007").exists());

    // At start: the used contents at both ends under a new name (and the one left at the
    // other end under its old name), written while the KMEs are down.
    let fresh = random(4096);
    net.restart_all_after(&options, || {
        std::fs::write(at_a.join("0009"), &files[1]).unwrap();
        std::fs::write(at_b.join("0009"), &files[1]).unwrap();
        std::fs::write(at_a.join("0010"), &fresh).unwrap();
        std::fs::write(at_b.join("0010"), &fresh).unwrap();
    });
    // Counters start at 0 with the process.
    let after = net
        .wait_for_status("sae-a", "kme-a", "sae-b", "the fresh file's key", |s| {
            produced(s) >= Some(4096)
        })
        .await;
    assert_eq!(
        produced(&after),
        Some(4096),
        "a used file gave blocks: {after}"
    );
    assert_eq!(produced(&link_status(&net, "kme-b").await), Some(4096));
    for dir in [&at_a, &at_b] {
        for name in ["0003", "0009", "0010"] {
            wait_until_gone(&dir.join(name)).await;
        }
    }
}

/// The status of the link a — b at `kme`.
async fn link_status(net: &Net, kme: &str) -> Value {
    let (master, slave) = if kme == "kme-a" {
        ("sae-a", "sae-b")
    } else {
        ("sae-b", "sae-a")
    };
    net.wait_for_status(master, kme, slave, "status", |_| true)
        .await
}

async fn wait_until_gone(path: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} was not destroyed",
            path.display()
        );
        actix_web::rt::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
