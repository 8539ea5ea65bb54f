//! file-drop links: keys come from files a QKD device writes under the same name at both
//! ends, used only when both copies hash alike, and destroyed once stored.

use std::path::PathBuf;

use base64::Engine;
use serde_json::{json, Value};

use super::harness::{LinkOptions, Net};

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
    // Key bytes never travel on a file-drop link.
    let shipment = json!({"blocks": [{"owner": "kme-b", "seq": 999, "data": "AAAA"}]});
    let blocks_url = format!("{}/peer/v1/blocks", net.setup.peer_url("kme-b"));
    let (code, answer) = net
        .client(Some("kme-a"))
        .try_post(&blocks_url, &shipment)
        .await
        .unwrap();
    assert_eq!(code, 400, "{answer}");
    let rejected = std::fs::read(at_a.join("0001.rejected")).unwrap();
    assert_eq!(
        rejected, early,
        "a rejected file is kept for the operator, untouched"
    );

    // Used files that turn up again (as a crash between storing and destroying leaves them),
    // under their name or another, are destroyed and never give key again: at an offer, and
    // at the next start.
    let produced = |s: &Value| s["status_extension"]["link"]["bytes_produced"].as_u64();
    let before = net
        .wait_for_status("sae-a", "kme-a", "sae-b", "status", |_| true)
        .await;
    std::fs::write(at_a.join("0007"), &files[0]).unwrap();
    std::fs::write(at_b.join("0007"), &files[0]).unwrap();
    std::fs::write(at_b.join("0003"), &files[1]).unwrap();
    wait_until_gone(&at_a.join("0007")).await;
    wait_until_gone(&at_b.join("0007")).await;
    let gone = net
        .wait_for_status("sae-a", "kme-a", "sae-b", "status", |_| true)
        .await;
    assert!(produced(&before) > Some(0), "{before}");
    assert_eq!(
        produced(&gone),
        produced(&before),
        "a used file gave blocks: {gone}"
    );
    net.restart_all(&options);
    wait_until_gone(&at_b.join("0003")).await;
    let after = net
        .wait_for_status("sae-a", "kme-a", "sae-b", "status", |_| true)
        .await;
    let stored = |s: &Value| s["stored_key_count"].as_u64();
    assert_eq!(stored(&after), stored(&before), "no key from a used file");
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
