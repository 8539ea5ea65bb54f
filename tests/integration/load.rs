//! Concurrency and exhaustion: many pairs at once never share a key; an empty pool answers
//! 503 at once and refills by itself.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::json;

use super::harness::{dec, enc, keys, LinkOptions, Net};

#[actix::test]
async fn concurrent_pairs_never_share_a_key() {
    let net = Net::start(LinkOptions::default());
    let (a, b) = (net.url("kme-a"), net.url("kme-b"));
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 1024).await;
    let master = net.client(Some("sae-a"));
    let slave = net.client(Some("sae-b"));
    let pairs = (0..64).map(|i| {
        let (master, slave, a, b) = (master.clone(), slave.clone(), a.clone(), b.clone());
        async move {
            let (code, body) = enc(&master, &a, "sae-b", json!({"number": 1 + i % 4})).await;
            assert_eq!(code, 200, "{body}");
            let issued = keys(&body);
            let ids: Vec<&str> = issued.iter().map(|(id, _)| id.as_str()).collect();
            let (code, body) = dec(&slave, &b, "sae-a", &ids).await;
            assert_eq!(code, 200, "{body}");
            assert_eq!(keys(&body), issued, "slave got other bytes than the master");
            issued
        }
    });
    let all: Vec<(String, String)> = futures_util::future::join_all(pairs)
        .await
        .into_iter()
        .flatten()
        .collect();
    let ids: HashSet<_> = all.iter().map(|(id, _)| id).collect();
    let material: HashSet<_> = all.iter().map(|(_, key)| key).collect();
    assert_eq!(ids.len(), all.len(), "duplicate key_ID");
    assert_eq!(material.len(), all.len(), "duplicate key material");
    assert_eq!(all.len(), (0..64).map(|i| 1 + i % 4).sum::<usize>());
}

#[actix::test]
async fn exhaustion_answers_503_then_the_pool_refills() {
    // 16 keys of 256 bits per end; 8 kbit/s refills one 256-byte block in a quarter second.
    let net = Net::start(LinkOptions {
        rate_bits_per_s: 8_000,
        block_bytes: 256,
        max_key_count: 16,
        tick_ms: 20,
        ..LinkOptions::default()
    });
    let a = net.url("kme-a");
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 16).await;
    let master = net.client(Some("sae-a"));
    let mut got = 0;
    let mut exhausted = None;
    for _ in 0..64 {
        let (code, body) = enc(&master, &a, "sae-b", json!({"number": 8})).await;
        match code {
            200 => got += 8,
            503 => {
                exhausted = Some(body);
                break;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let exhausted = exhausted.expect("the pool never ran dry");
    assert!(got >= 16, "a full pool serves its keys first");
    // The pool's own refusal, given at once: not the timeout of an actor that waited ("the
    // KME is busy; retry later").
    assert_eq!(
        exhausted["message"], "not enough key material for this request right now; retry later",
        "{exhausted}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, _) = enc(&master, &a, "sae-b", json!({"number": 8})).await;
        if code == 200 {
            break;
        }
        assert_eq!(code, 503);
        assert!(Instant::now() < deadline, "the pool never refilled");
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `stored_key_count` is exactly what the master can get: it falls by each request, and at 0
/// the next key is a 503 from the pool. The link makes two blocks at once at start (one per
/// end), then one per 1024 s at 8 bit/s: no refill lands during the test, so the count can be
/// checked exactly.
#[actix::test]
async fn stored_key_count_is_exactly_what_the_master_can_get() {
    let net = Net::start(LinkOptions {
        rate_bits_per_s: 8,
        block_bytes: 1024,
        max_key_count: 1000,
        ..LinkOptions::default()
    });
    let a = net.url("kme-a");
    let master = net.client(Some("sae-a"));
    let status_url = format!("{a}/api/v1/keys/sae-b/status");
    let status = net
        .wait_for_status("sae-a", "kme-a", "sae-b", "the first blocks", |s| {
            s["status_extension"]["link"]["bytes_produced"] == 2048
                && s["stored_key_count"].as_u64() > Some(0)
        })
        .await;
    let stored = status["stored_key_count"].as_u64().unwrap();
    assert_eq!(stored, 1024 / 32, "one block of 256-bit keys: {status}");
    let mut left = stored;
    for number in [10, 7, 15] {
        let (code, body) = enc(&master, &a, "sae-b", json!({ "number": number })).await;
        assert_eq!(code, 200, "{body}");
        left -= number;
        let (code, status) = master.get(&status_url).await;
        assert_eq!(code, 200);
        assert_eq!(status["stored_key_count"], left, "{status}");
    }
    assert_eq!(left, 0);
    let (code, body) = enc(&master, &a, "sae-b", json!({"number": 1})).await;
    assert_eq!(
        (code, &body["message"]),
        (
            503,
            &json!("not enough key material for this request right now; retry later")
        )
    );
    let (_, status) = master.get(&status_url).await;
    assert_eq!(status["status_extension"]["link"]["bytes_produced"], 2048);
}

#[actix::test]
async fn a_dead_peer_gives_503_and_the_kme_keeps_serving() {
    let mut net = Net::start(LinkOptions::default());
    let a = net.url("kme-a");
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 64).await;
    let master = net.client(Some("sae-a"));
    let (code, body) = enc(&master, &a, "sae-b", json!({"number": 2})).await;
    assert_eq!(code, 200, "{body}");
    net.stop("kme-b");
    let (code, body) = enc(&master, &a, "sae-b", json!({"number": 2})).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(
        body["message"], "the slave's KME could not take the keys; retry later",
        "{body}"
    );
    // kme-a keeps serving everything that does not need kme-b.
    let (code, status) = master.get(&format!("{a}/api/v1/keys/sae-b/status")).await;
    assert_eq!(code, 200);
    assert_eq!(status["status_extension"]["link"]["peer_KME_ID"], "kme-b");
    let (code, _) = master.get(&format!("{a}/api/v1/sae/info/me")).await;
    assert_eq!(code, 200);
    // The trail says the keys of the failed request never reached the SAE.
    let db = net.setup.path().join("data/kme-a/kme.sqlite");
    let (_, reader) = kme_actors::storage::db::open(&db, 1).unwrap();
    let conn = reader.get().unwrap();
    let withdrawn: i64 = conn
        .query_row(
            "SELECT count(*) FROM audit WHERE event = 'keys_withdrawn'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(withdrawn, 1);
}
