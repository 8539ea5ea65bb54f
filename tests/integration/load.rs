//! Concurrency and exhaustion: many pairs at once never share a key; an empty pool answers
//! 503 at once and refills by itself.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::json;

use super::db_probe;
use super::harness::{dec, enc, keys, Client, LinkOptions, Net};

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

/// One SAE in a loop cannot take its link's output from the others: over its `requests_per_s`
/// or `keys_per_s` it gets 503 with `Retry-After` and a message naming the limit, and nothing
/// is taken for the refused request; another SAE of the same link is served meanwhile.
#[actix::test]
async fn an_sae_over_its_rate_limits_gets_503_with_retry_after_and_takes_nothing() {
    let net = Net::start(LinkOptions {
        sae_limits: vec![("sae-a", "requests_per_s = 5\nkeys_per_s = 40")],
        ..LinkOptions::default()
    });
    let (a, b) = (net.url("kme-a"), net.url("kme-b"));
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 100).await;
    let master = net.client(Some("sae-a"));
    let is_refusal = |(code, body, headers): &(u16, serde_json::Value, _), limit: &str| {
        let headers: &awc::http::header::HeaderMap = headers;
        *code == 503
            && body["message"].as_str().unwrap().contains(limit)
            && headers.get("retry-after").map(|v| v.to_str().unwrap()) == Some("1")
    };
    // 12 status requests at once, once the polls above are a second old: a second's worth
    // (5) pass, the others are refused.
    let refill = Duration::from_millis(1200);
    actix_rt::time::sleep(refill).await;
    let status_url = format!("{a}/api/v1/keys/sae-b/status");
    let answers =
        futures_util::future::join_all((0..12).map(|_| master.get_with_headers(&status_url))).await;
    let passed = answers.iter().filter(|(code, ..)| *code == 200).count();
    let refused = answers
        .iter()
        .filter(|answer| is_refusal(answer, "requests_per_s (5 requests/s)"))
        .count();
    assert!((5..=6).contains(&passed), "{passed} passed");
    assert_eq!(passed + refused, 12, "every other answer is the refusal");

    actix_rt::time::sleep(refill).await;
    let enc_url = format!("{a}/api/v1/keys/sae-b/enc_keys");
    let (code, body, _) = master
        .post_with_headers(&enc_url, &json!({"number": 40}))
        .await;
    assert_eq!(code, 200, "{body}");
    let second = master
        .post_with_headers(&enc_url, &json!({"number": 40}))
        .await;
    assert!(
        is_refusal(&second, "keys_per_s (40 keys/s)"),
        "{:?}",
        (second.0, &second.1)
    );
    assert_eq!(
        db_probe::count(net.setup.path(), "kme-b", "keys"),
        40,
        "only the admitted request bound keys at the slave's KME"
    );
    // More keys in one request than a second's worth can never pass: a bad request.
    let (code, body) = enc(&master, &a, "sae-b", json!({"number": 41})).await;
    assert_eq!(code, 400, "{body}");
    // The link's other SAEs are not limited by sae-a's limits.
    let (code, body) = enc(
        &net.client(Some("sae-b")),
        &b,
        "sae-a",
        json!({"number": 40}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
}

/// enc_keys of one key by `master` at `url` until it is refused (10 s at most); the keys it
/// got meanwhile are added to `sent`. Returns the refusal.
async fn enc_until_refused(
    master: &Client,
    url: &str,
    sent: &mut Vec<(String, String)>,
) -> (u16, serde_json::Value, awc::http::header::HeaderMap) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = master.post_with_headers(url, &json!({"number": 1})).await;
        if answer.0 == 503 {
            return answer;
        }
        assert_eq!(answer.0, 200, "{}", answer.1);
        sent.extend(keys(&answer.1));
        assert!(Instant::now() < deadline, "never refused");
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A master cannot park keys at its slave's KME without end: once `max_waiting_keys` of its
/// keys wait there for one slave, that KME says so with its link state news and the master's
/// KME refuses more for the pair (503 with Retry-After, nothing taken) until the slave
/// retrieves some. Relayed pairs the same way: the news floods through the trusted node.
#[actix::test]
async fn keys_waiting_for_a_slave_are_capped_per_pair_until_it_retrieves_them() {
    let net = Net::start(LinkOptions {
        sae_limits: vec![("sae-a", "max_waiting_keys = 10")],
        ..LinkOptions::default()
    });
    let dir = net.setup.path();
    let a = net.url("kme-a");
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 64).await;
    let master = net.client(Some("sae-a"));
    let mut sent = Vec::new();
    for _ in 0..2 {
        let (code, body) = enc(&master, &a, "sae-b", json!({"number": 8})).await;
        assert_eq!(code, 200, "{body}");
        sent.extend(keys(&body));
    }
    // 16 keys wait at kme-b, over the cap of 10: refused as soon as the news is in (within
    // a few link state rounds), and a refusal takes nothing.
    let to_b = format!("{a}/api/v1/keys/sae-b/enc_keys");
    let (_, body, headers) = enc_until_refused(&master, &to_b, &mut sent).await;
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("sae-b has max_waiting_keys (10)"),
        "{message}"
    );
    assert!(headers.get("retry-after").is_some());
    assert_eq!(db_probe::count(dir, "kme-b", "keys") as usize, sent.len());
    // Other pairs are not held back: sae-a to sae-b2 on the same KME.
    let (code, body) = enc(&master, &a, "sae-b2", json!({"number": 1})).await;
    assert_eq!(code, 200, "{body}");
    // The slave retrieves its keys: the pair gets keys again.
    let (code, body) = net.dec_sent(("sae-b", "kme-b"), "sae-a", &sent).await;
    assert_eq!(code, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = enc(&master, &a, "sae-b", json!({"number": 1})).await;
        if code == 200 {
            break;
        }
        assert_eq!(code, 503, "{body}");
        assert!(Instant::now() < deadline, "the pair stayed refused: {body}");
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    // Relayed to sae-c at kme-c, two hops away: refused once the news has come through
    // kme-b (never before the cap; past it by what was asked while the news travelled).
    net.wait_for_status("sae-a", "kme-a", "sae-c", "a relay route", |s| {
        s["status_extension"]["route"] == "relay" && s["stored_key_count"].as_u64().unwrap() >= 32
    })
    .await;
    let to_c = format!("{a}/api/v1/keys/sae-c/enc_keys");
    let mut relayed = Vec::new();
    let (_, body, _) = enc_until_refused(&master, &to_c, &mut relayed).await;
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("sae-c has max_waiting_keys (10)"),
        "{message}"
    );
    assert!(relayed.len() >= 10, "{}", relayed.len());
}
