//! Every endpoint and method of the SAE API on a healthy network.

use std::collections::HashSet;

use base64::Engine;
use serde_json::json;

use super::db_probe;
use super::harness::{audit_verify, dec, enc, keys, LinkOptions, Net};

#[actix::test]
async fn status_enc_and_dec_with_get_and_post() {
    let net = Net::start(LinkOptions::default());
    let (a, b) = (net.url("kme-a"), net.url("kme-b"));
    let status = net.wait_for_keys("sae-a", "kme-a", "sae-b", 16).await;
    assert_eq!(status["source_KME_ID"], "kme-a");
    assert_eq!(status["target_KME_ID"], "kme-b");
    assert_eq!(status["master_SAE_ID"], "sae-a");
    assert_eq!(status["slave_SAE_ID"], "sae-b");
    assert_eq!(status["key_size"], 256);
    assert_eq!(status["max_key_count"], 4096);
    assert_eq!(status["max_key_per_request"], 128);
    assert_eq!(status["min_key_size"], 64);
    assert_eq!(status["max_key_size"], 8192);
    assert_eq!(status["max_SAE_ID_count"], 1);
    assert_eq!(status["status_extension"]["link"]["state"], "up");

    let master = net.client(Some("sae-a"));
    let slave = net.client(Some("sae-b"));
    // POST enc_keys with number and size; POST dec_keys with all three IDs.
    let (code, body) = enc(&master, &a, "sae-b", json!({"number": 3, "size": 512})).await;
    assert_eq!(code, 200, "{body}");
    let issued = keys(&body);
    assert_eq!(issued.len(), 3);
    for (id, key) in &issued {
        uuid::Uuid::parse_str(id).unwrap();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(key)
                .unwrap()
                .len(),
            64
        );
    }
    let ids: Vec<&str> = issued.iter().map(|(id, _)| id.as_str()).collect();
    let (code, body) = dec(&slave, &b, "sae-a", &ids).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(keys(&body), issued);
    // Key material is encrypted at rest: no 16 bytes of any key appear in the database files
    // of any KME (the master's link blocks, the slave's bound keys), nor of its link.
    let (code, body) = enc(&master, &a, "sae-b", json!({"number": 64, "size": 256})).await;
    assert_eq!(code, 200, "{body}");
    let windows: HashSet<Vec<u8>> = keys(&body)
        .iter()
        .flat_map(|(_, key)| {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(key)
                .unwrap();
            [raw[..16].to_vec(), raw[16..].to_vec()]
        })
        .collect();
    assert_eq!(windows.len(), 128);
    for kme in ["kme-a", "kme-b"] {
        let data = net.setup.path().join("data").join(kme);
        let mut files = Vec::new();
        for name in ["kme.sqlite", "kme.sqlite-wal"] {
            files.extend(std::fs::read(data.join(name)).unwrap_or_default());
        }
        assert!(files.len() > 4096, "{kme}");
        assert!(
            !files.windows(16).any(|w| windows.contains(w)),
            "plaintext key material in {kme}'s database"
        );
    }
    // Consumed once.
    let (code, body) = dec(&slave, &b, "sae-a", &ids[..1]).await;
    assert_eq!(code, 400);
    assert_eq!(
        body["message"],
        "one or more keys specified are not found on KME"
    );

    // GET enc_keys with query, GET dec_keys with key_ID; empty POST body means defaults.
    let (code, body) = master
        .get(&format!("{a}/api/v1/keys/sae-b/enc_keys?number=2&size=128"))
        .await;
    assert_eq!(code, 200, "{body}");
    let issued = keys(&body);
    assert_eq!(issued.len(), 2);
    let (code, body) = master
        .post_raw(&format!("{a}/api/v1/keys/sae-b/enc_keys"), Vec::new())
        .await;
    assert_eq!(code, 200, "{body}");
    let default_key = keys(&body);
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(&default_key[0].1)
            .unwrap()
            .len(),
        32
    );
    for (id, key) in issued.iter().chain(&default_key) {
        let (code, body) = slave
            .get(&format!("{b}/api/v1/keys/sae-a/dec_keys?key_ID={id}"))
            .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(keys(&body), vec![(id.clone(), key.clone())]);
    }

    // The other direction: sae-b at kme-b (the receiving end of the courier) is master.
    net.wait_for_keys("sae-b", "kme-b", "sae-a", 16).await;
    for _ in 0..20 {
        let (code, body) = enc(&slave, &b, "sae-a", json!({"number": 4})).await;
        assert_eq!(code, 200, "{body}");
        let issued = keys(&body);
        let ids: Vec<&str> = issued.iter().map(|(id, _)| id.as_str()).collect();
        let (code, body) = dec(&master, &a, "sae-b", &ids).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(keys(&body), issued);
    }

    // whoami
    let (code, body) = master.get(&format!("{a}/api/v1/sae/info/me")).await;
    assert_eq!((code, body["SAE_ID"].as_str()), (200, Some("sae-a")));
    let (code, body) = slave.get(&format!("{b}/api/v1/sae/info/me")).await;
    assert_eq!((code, body["SAE_ID"].as_str()), (200, Some("sae-b")));
}

#[actix::test]
async fn multicast_and_local_keys_on_one_kme() {
    let net = Net::start(LinkOptions::default());
    let (a, b) = (net.url("kme-a"), net.url("kme-b"));
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 8).await;
    let master = net.client(Some("sae-a"));
    let b1 = net.client(Some("sae-b"));
    let b2 = net.client(Some("sae-b2"));
    let (code, body) = enc(
        &master,
        &a,
        "sae-b",
        json!({"number": 2, "additional_slave_SAE_IDs": ["sae-b2"]}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let issued = keys(&body);
    let ids: Vec<&str> = issued.iter().map(|(id, _)| id.as_str()).collect();
    for slave in [&b1, &b2] {
        let (code, body) = dec(slave, &b, "sae-a", &ids).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(keys(&body), issued);
        let (code, _) = dec(slave, &b, "sae-a", &ids).await;
        assert_eq!(code, 400, "each slave retrieves once");
    }

    // sae-b → sae-b2, both on kme-b: the key never leaves kme-b (no neighbour binds it).
    let (code, status) = b1.get(&format!("{b}/api/v1/keys/sae-b2/status")).await;
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["target_KME_ID"], "kme-b");
    let (code, body) = enc(&b1, &b, "sae-b2", json!({"number": 4, "size": 1024})).await;
    assert_eq!(code, 200, "{body}");
    let issued = keys(&body);
    let ids: Vec<&str> = issued.iter().map(|(id, _)| id.as_str()).collect();
    let (code, body) = dec(&b2, &b, "sae-b", &ids).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(keys(&body), issued);
    let unique: HashSet<_> = issued.iter().map(|(_, k)| k).collect();
    assert_eq!(unique.len(), 4);
    for kme in ["kme-a", "kme-c"] {
        let bound = db_probe::audit_events(net.setup.path(), kme, "keys_bound");
        let text = serde_json::to_string(&bound).unwrap();
        assert!(
            ids.iter().all(|id| !text.contains(id)),
            "a key between SAEs of kme-b was bound at {kme}"
        );
    }
    let local = db_probe::audit_events(net.setup.path(), "kme-b", "keys_delivered");
    let text = serde_json::to_string(&local).unwrap();
    assert!(ids.iter().all(|id| text.contains(id)), "{text}");
}

#[actix::test]
async fn optional_extensions_are_ignored() {
    let net = Net::start(LinkOptions::default());
    let a = net.url("kme-a");
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 1).await;
    let master = net.client(Some("sae-a"));
    let body =
        json!({"number": 1, "extension_optional": [{"vendor_thing": {"x": 1}}, {"other": true}]});
    let (code, answer) = enc(&master, &a, "sae-b", body).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(keys(&answer).len(), 1);
}

#[actix::test]
async fn a_key_not_retrieved_within_key_ttl_expires_with_an_audit_record() {
    let net = Net::start(LinkOptions {
        key_ttl_s: Some(1),
        ..LinkOptions::default()
    });
    let (a, b) = (net.url("kme-a"), net.url("kme-b"));
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 1).await;
    let master = net.client(Some("sae-a"));
    let (code, body) = enc(&master, &a, "sae-b", json!({"number": 1})).await;
    assert_eq!(code, 200, "{body}");
    let id = keys(&body)[0].0.clone();
    // Wait for the sweep's audit record (polling dec_keys would retrieve the key).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let expired = db_probe::audit_events(net.setup.path(), "kme-b", "keys_expired");
        if serde_json::to_string(&expired).unwrap().contains(&id) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the key never expired"
        );
        actix_web::rt::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (code, answer) = dec(&net.client(Some("sae-b")), &b, "sae-a", &[&id]).await;
    assert_eq!(
        (code, answer["message"].as_str()),
        (400, Some("one or more keys specified are not found on KME"))
    );
}

#[actix::test]
async fn deliveries_bindings_and_retrievals_are_audited_and_the_live_chain_verifies() {
    let net = Net::start(LinkOptions::default());
    let (a, b) = (net.url("kme-a"), net.url("kme-b"));
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 2).await;
    let (code, body) = enc(
        &net.client(Some("sae-a")),
        &a,
        "sae-b",
        json!({"number": 2}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let issued = keys(&body);
    let ids: Vec<&str> = issued.iter().map(|(id, _)| id.as_str()).collect();
    let (code, body) = dec(&net.client(Some("sae-b")), &b, "sae-a", &ids).await;
    assert_eq!(code, 200, "{body}");
    for (kme, event) in [
        ("kme-a", "keys_delivered"),
        ("kme-b", "keys_bound"),
        ("kme-b", "keys_retrieved"),
    ] {
        let records = db_probe::audit_events(net.setup.path(), kme, event);
        let text = serde_json::to_string(&records).unwrap();
        assert!(
            ids.iter().all(|id| text.contains(id)),
            "{event} at {kme}: {text}"
        );
    }
    // `kme audit verify` on the live databases, next to the running KMEs.
    for kme in ["kme-a", "kme-b", "kme-c"] {
        audit_verify(&net.setup, kme);
    }
}

#[actix::test]
async fn stored_key_count_is_capped_at_max_key_count_while_the_pool_holds_more() {
    // Blocks of 128 keys, pools full at 16: the pool holds far more than it may announce.
    let net = Net::start(LinkOptions {
        block_bytes: 4096,
        max_key_count: 16,
        ..LinkOptions::default()
    });
    let a = net.url("kme-a");
    let master = net.client(Some("sae-a"));
    let status = net.wait_for_keys("sae-a", "kme-a", "sae-b", 16).await;
    let available = |s: &serde_json::Value| {
        s["status_extension"]["link"]["available_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(available(&status) / 32 > 16, "{status}");
    assert_eq!(status["stored_key_count"], 16, "{status}");
    assert_eq!(status["max_key_count"], 16, "{status}");
    // Above its high mark the link does not produce: taking 5 keys leaves 5 keys' bytes less,
    // and the announced count stays at the cap.
    let (code, body) = enc(&master, &a, "sae-b", json!({"number": 5})).await;
    assert_eq!(code, 200, "{body}");
    let after = net.wait_for_keys("sae-a", "kme-a", "sae-b", 0).await;
    assert_eq!(available(&after), available(&status) - 5 * 32, "{after}");
    assert_eq!(after["stored_key_count"], 16, "{after}");
    // Still above the high mark: the pool holds exactly 16 keys fewer, and announces the cap.
    let keys_held = available(&after) / 32;
    let (code, body) = enc(&master, &a, "sae-b", json!({"number": 16})).await;
    assert_eq!(code, 200, "{body}");
    let rest = net.wait_for_keys("sae-a", "kme-a", "sae-b", 0).await;
    assert_eq!(available(&rest) / 32, keys_held - 16, "{rest}");
    assert_eq!(rest["stored_key_count"], 16, "{rest}");
}
