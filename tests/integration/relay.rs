//! The network beyond neighbours: trusted-node relay, multicast across KMEs, routing around
//! failed links, and what a relay does with bad input and dead hops.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::db_probe;
use super::harness::{enc, keys, LinkOptions, Net, TcpRelay, Topology, NEW_SEQ};

/// enc_keys of `master` at `master_kme` for `slave` with `body`; asserts 200, returns the keys.
async fn enc_ok(
    net: &Net,
    (master, master_kme): (&str, &str),
    slave: &str,
    body: Value,
) -> Vec<(String, String)> {
    let (code, answer) = enc(&net.client(Some(master)), &net.url(master_kme), slave, body).await;
    assert_eq!(code, 200, "{answer}");
    keys(&answer)
}

/// dec_keys of `slave` at `slave_kme` for `master`'s `sent` keys: asserts the identical keys.
async fn dec_same(
    net: &Net,
    (slave, slave_kme): (&str, &str),
    master: &str,
    sent: &[(String, String)],
) {
    let (code, answer) = net.dec_sent((slave, slave_kme), master, sent).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(keys(&answer), sent);
}

/// `dec_same` for each of `slaves` (SAE, its KME).
async fn dec_same_at_each(
    net: &Net,
    slaves: &[(&str, &str)],
    master: &str,
    sent: &[(String, String)],
) {
    for slave in slaves {
        dec_same(net, *slave, master, sent).await;
    }
}

/// enc_keys of `master` for `slave` until one is answered 200 (30 s at most; every other
/// answer must be a 503). Returns its keys and how many requests failed before.
async fn enc_until_ok(
    net: &Net,
    (master, master_kme): (&str, &str),
    slave: &str,
) -> (Vec<(String, String)>, u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut failures = 0;
    loop {
        let (code, answer) = enc(
            &net.client(Some(master)),
            &net.url(master_kme),
            slave,
            json!({}),
        )
        .await;
        if code == 200 {
            return (keys(&answer), failures);
        }
        assert_eq!(code, 503, "{answer}");
        assert!(Instant::now() < deadline, "no key for {slave}: {answer}");
        failures += 1;
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `master` at `master_kme` can get a key for `slave` (routes known), 30 s at most.
async fn until_routed(net: &Net, master: (&str, &str), slave: &str) -> Value {
    net.wait_for_status(master.0, master.1, slave, "a usable route", |s| {
        s["status_extension"]["route"] == "relay" && s["stored_key_count"].as_u64().unwrap() >= 64
    })
    .await
}

#[actix_web::test]
async fn keys_relay_both_ways_along_the_line_and_status_shows_the_route() {
    let net = Net::start(LinkOptions::default());
    let status = until_routed(&net, ("sae-a", "kme-a"), "sae-c").await;
    assert_eq!(status["target_KME_ID"], "kme-c");
    let hops = status["status_extension"]["hops"].as_array().unwrap();
    let path: Vec<(&str, &str)> = hops
        .iter()
        .map(|h| (h["from"].as_str().unwrap(), h["to"].as_str().unwrap()))
        .collect();
    assert_eq!(path, [("kme-a", "kme-b"), ("kme-b", "kme-c")]);
    assert!(hops.iter().all(|h| h["state"] == "up"), "{status}");
    // Counts of the bottleneck hop, in keys of the default size (256 bits).
    let least = |field: &str| {
        hops.iter()
            .map(|h| h[field].as_u64().unwrap())
            .min()
            .unwrap()
            / 32
    };
    assert_eq!(
        status["stored_key_count"].as_u64().unwrap(),
        least("available_bytes").min(1000)
    );
    assert_eq!(
        status["max_key_count"].as_u64().unwrap(),
        least("capacity_bytes").min(1000)
    );

    let sent = enc_ok(
        &net,
        ("sae-a", "kme-a"),
        "sae-c",
        json!({"number": 3, "size": 512}),
    )
    .await;
    assert_eq!(sent.len(), 3);
    dec_same(&net, ("sae-c", "kme-c"), "sae-a", &sent).await;
    // Retrieved once only; and the trusted node in between holds nothing retrievable.
    let (code, _) = net.dec_sent(("sae-c", "kme-c"), "sae-a", &sent).await;
    assert_eq!(code, 400);
    until_routed(&net, ("sae-c", "kme-c"), "sae-a").await;
    let back = enc_ok(&net, ("sae-c", "kme-c"), "sae-a", json!({"number": 2})).await;
    dec_same(&net, ("sae-a", "kme-a"), "sae-c", &back).await;
    for kme in ["kme-a", "kme-b", "kme-c"] {
        assert_eq!(
            db_probe::count(net.setup.path(), kme, "held_keys"),
            0,
            "{kme}"
        );
    }
    let released = db_probe::audit_events(net.setup.path(), "kme-c", "relay_released");
    assert_eq!(released.len(), 1, "{released:?}");
}

/// A relayed key is checked once, by the master's KME, against the relay limits (`[defaults]`):
/// a hop whose own link allows smaller keys carries it all the same, and does not refuse the
/// activation batch it rides in (with every other key of that batch).
#[actix_web::test]
async fn relayed_keys_follow_the_relay_limits_not_each_hops_link_limits() {
    let net = Net::start(LinkOptions {
        link_extra: vec![(["kme-b", "kme-c"], "max_key_size = 256")],
        ..LinkOptions::default()
    });
    until_routed(&net, ("sae-a", "kme-a"), "sae-c").await;
    let body = json!({"number": 2, "size": 1024});
    let sent = enc_ok(&net, ("sae-a", "kme-a"), "sae-c", body.clone()).await;
    dec_same(&net, ("sae-c", "kme-c"), "sae-a", &sent).await;
    // The link's own limit still holds for its own keys.
    let (code, answer) = enc(&net.client(Some("sae-b")), &net.url("kme-b"), "sae-c", body).await;
    assert_eq!(code, 400, "{answer}");
}

#[actix_web::test]
async fn a_multicast_reaches_slaves_on_three_kmes_all_or_nothing() {
    let net = Net::start(LinkOptions {
        topology: Topology::star(),
        max_sae_id_count: 4,
        ..LinkOptions::default()
    });
    until_routed(&net, ("sae-a", "kme-a"), "sae-c").await;
    until_routed(&net, ("sae-a", "kme-a"), "sae-d").await;
    // sae-a (leaf a) to sae-b and sae-b2 (the hub), sae-c and sae-d (two other leaves).
    let body = json!({"number": 2, "additional_slave_SAE_IDs": ["sae-b2", "sae-c", "sae-d"]});
    let sent = enc_ok(&net, ("sae-a", "kme-a"), "sae-b", body).await;
    let slaves = [
        ("sae-b", "kme-b"),
        ("sae-b2", "kme-b"),
        ("sae-c", "kme-c"),
        ("sae-d", "kme-d"),
    ];
    dec_same_at_each(&net, &slaves, "sae-a", &sent).await;
    // Each slave once; an SAE that was not named gets 401 where the key is held.
    let (code, _) = net.dec_sent(("sae-c", "kme-c"), "sae-a", &sent).await;
    assert_eq!(code, 400, "retrieved twice");
    let named = enc_ok(
        &net,
        ("sae-a", "kme-a"),
        "sae-c",
        json!({"additional_slave_SAE_IDs": ["sae-b"]}),
    )
    .await;
    let (code, body) = net.dec_sent(("sae-b2", "kme-b"), "sae-a", &named).await;
    assert_eq!(code, 401, "{body}");
    dec_same(&net, ("sae-b", "kme-b"), "sae-a", &named).await;
    dec_same(&net, ("sae-c", "kme-c"), "sae-a", &named).await;

    // From the hub: one slave here, the others on every leaf.
    for leaf in ["sae-a", "sae-c", "sae-d"] {
        net.wait_for_keys("sae-b", "kme-b", leaf, 64).await;
    }
    let body = json!({"additional_slave_SAE_IDs": ["sae-b2", "sae-c", "sae-d"]});
    let sent = enc_ok(&net, ("sae-b", "kme-b"), "sae-a", body).await;
    let slaves = [
        ("sae-a", "kme-a"),
        ("sae-b2", "kme-b"),
        ("sae-c", "kme-c"),
        ("sae-d", "kme-d"),
    ];
    dec_same_at_each(&net, &slaves, "sae-b", &sent).await;
    // Naming a slave twice, or the master as its own slave: 400, nothing sent anywhere.
    for extra in [json!(["sae-c", "sae-c"]), json!(["sae-b", "sae-c"])] {
        let (code, _) = enc(
            &net.client(Some("sae-b")),
            &net.url("kme-b"),
            "sae-a",
            json!({"additional_slave_SAE_IDs": extra}),
        )
        .await;
        assert_eq!(code, 400);
    }

    // A leaf that is down: the multicast fails whole, and no KME keeps a retrievable key.
    let mut net = net;
    net.stop("kme-d");
    let body = json!({"additional_slave_SAE_IDs": ["sae-c", "sae-d"]});
    let (code, answer) = enc(&net.client(Some("sae-a")), &net.url("kme-a"), "sae-b", body).await;
    assert_eq!(code, 503, "{answer}");
    until_drained(&net, &["kme-a", "kme-b", "kme-c"]).await;
    let burned = db_probe::audit_events(net.setup.path(), "kme-b", "relay_burned");
    assert!(!burned.is_empty(), "the hub burned its held keys");
}

/// Waits until no KME of `kmes` holds keys of an unsettled relay (aborted or past its hold
/// time), 30 s at most.
async fn until_drained(net: &Net, kmes: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held: Vec<i64> = kmes
            .iter()
            .map(|kme| db_probe::count(net.setup.path(), kme, "held_keys"))
            .collect();
        if held.iter().all(|n| *n == 0) {
            return;
        }
        assert!(Instant::now() < deadline, "held keys left: {held:?}");
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_web::test]
async fn a_ring_reroutes_around_a_dead_kme_and_no_route_names_the_missing_hop() {
    let mut net = Net::start(LinkOptions {
        topology: Topology::ring(),
        ..LinkOptions::default()
    });
    let status = until_routed(&net, ("sae-a", "kme-a"), "sae-c").await;
    assert_eq!(
        status["status_extension"]["hops"][0]["to"], "kme-b",
        "{status}"
    );
    let sent = enc_ok(&net, ("sae-a", "kme-a"), "sae-c", json!({})).await;
    dec_same(&net, ("sae-c", "kme-c"), "sae-a", &sent).await;

    // kme-b dies: requests fail only until its neighbours notice, then go through kme-d.
    net.stop("kme-b");
    let cut = Instant::now();
    let (sent, failures) = enc_until_ok(&net, ("sae-a", "kme-a"), "sae-c").await;
    println!(
        "converged {:?} after the cut ({failures} requests failed)",
        cut.elapsed()
    );
    dec_same(&net, ("sae-c", "kme-c"), "sae-a", &sent).await;
    let status = until_routed(&net, ("sae-a", "kme-a"), "sae-c").await;
    let via: Vec<&str> = status["status_extension"]["hops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["to"].as_str().unwrap())
        .collect();
    assert_eq!(via, ["kme-d", "kme-c"]);

    // kme-d dies too: kme-c is out of reach, and the 503 names the hop that is missing.
    net.stop("kme-d");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, answer) = enc(
            &net.client(Some("sae-a")),
            &net.url("kme-a"),
            "sae-c",
            json!({}),
        )
        .await;
        assert_ne!(code, 200, "no route is left: {answer}");
        let message = answer["message"].as_str().unwrap();
        if message.contains("no route to kme-c") {
            assert!(message.contains("kme-a -> kme-b is down"), "{message}");
            break;
        }
        assert!(Instant::now() < deadline, "{answer}");
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, body) = net
        .client(Some("sae-a"))
        .get(&format!("{}/api/v1/keys/sae-c/status", net.url("kme-a")))
        .await;
    assert_eq!(code, 503, "{body}");
}

#[actix_web::test]
async fn concurrent_relayed_pairs_never_share_a_key_or_a_position() {
    let net = Net::start(LinkOptions::default());
    until_routed(&net, ("sae-a", "kme-a"), "sae-c").await;
    until_routed(&net, ("sae-c", "kme-c"), "sae-a").await;
    let requests = (0..64).map(|i| {
        let (master, kme, slave) = if i % 2 == 0 {
            ("sae-a", "kme-a", "sae-c")
        } else {
            ("sae-c", "kme-c", "sae-a")
        };
        let client = net.client(Some(master));
        let url = net.url(kme);
        async move {
            let (code, answer) = enc(&client, &url, slave, json!({"number": 2})).await;
            assert_eq!(code, 200, "{answer}");
            (i, keys(&answer))
        }
    });
    let all = futures_util::future::join_all(requests).await;
    let ids: HashSet<&String> = all
        .iter()
        .flat_map(|(_, k)| k.iter().map(|(id, _)| id))
        .collect();
    let bytes: HashSet<&String> = all
        .iter()
        .flat_map(|(_, k)| k.iter().map(|(_, key)| key))
        .collect();
    assert_eq!(
        (ids.len(), bytes.len()),
        (128, 128),
        "a key_ID or key repeats"
    );
    for (i, sent) in &all {
        if i % 2 == 0 {
            dec_same(&net, ("sae-c", "kme-c"), "sae-a", sent).await;
        } else {
            dec_same(&net, ("sae-a", "kme-a"), "sae-c", sent).await;
        }
    }
    assert_no_position_used_twice(&net, &["kme-a", "kme-b", "kme-c"]);
}

/// Over the audit trails of `kmes`: no byte of any link stream was handed out twice by its
/// owner (`keys_delivered`), nor bound twice at the other end (`keys_bound`), relay legs
/// (pads and MAC keys) included.
pub fn assert_no_position_used_twice(net: &Net, kmes: &[&str]) {
    for kme in kmes {
        let mut spans: Vec<(String, String, u64, u64)> = Vec::new();
        for d in db_probe::audit_events(net.setup.path(), kme, "keys_delivered") {
            if let (Some(start), Some(end)) = (d["start"].as_u64(), d["end"].as_u64()) {
                spans.push((d["link"].as_str().unwrap().into(), "own".into(), start, end));
            }
        }
        for batch in db_probe::audit_events(net.setup.path(), kme, "keys_bound") {
            let from = batch["from_kme"].as_str().unwrap().to_string();
            for b in batch["bindings"].as_array().unwrap() {
                let start = b["start"].as_u64().unwrap();
                let keys = b["key_ids"].as_array().unwrap().len() as u64;
                let mac = if b["relay"]["sealed"].is_object() {
                    16
                } else {
                    0
                };
                let end = start + keys * b["len"].as_u64().unwrap() + mac;
                spans.push((from.clone(), "peer".into(), start, end));
            }
        }
        spans.sort();
        for pair in spans.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if (&a.0, &a.1) == (&b.0, &b.1) {
                assert!(a.3 <= b.2, "{kme}: {a:?} overlaps {b:?}");
            }
        }
    }
}

#[actix_web::test]
async fn tampered_replayed_truncated_or_looping_relay_legs_are_refused_and_consume_nothing() {
    let net = Net::start(LinkOptions::default());
    until_routed(&net, ("sae-a", "kme-a"), "sae-c").await;
    let sent = enc_ok(&net, ("sae-a", "kme-a"), "sae-c", json!({})).await;
    dec_same(&net, ("sae-c", "kme-c"), "sae-a", &sent).await;

    // As kme-b, to kme-c: legs at the first position of kme-b's stream that kme-c has not
    // bound yet (the material is there; only the message is wrong).
    let dir = net.setup.path();
    let start = db_probe::position(dir, "kme-c", "kme-b", "kme-b");
    let url = format!("{}/peer/v1/activate", net.setup.peer_url("kme-c"));
    let as_b = net.client(Some("kme-b"));
    let b64 = |bytes: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    let leg = |keys: Vec<String>, ids: usize, onward: Value, tag: u64| {
        let key_ids: Vec<String> = (0..ids).map(|_| uuid::Uuid::now_v7().to_string()).collect();
        json!({"seq": NEW_SEQ, "bindings": [{
            "master": "sae-a", "slaves": ["sae-c"], "start": start, "len": 32, "key_ids": key_ids,
            "relay": {"relay_id": uuid::Uuid::new_v4(), "onward": onward,
                      "sealed": {"keys": keys, "tag": tag}}}]})
    };
    let cases = [
        // A guessed MAC (or any bit flipped in a real leg): the tag does not verify.
        (
            leg(vec![b64(&[7; 32])], 1, json!([]), 0x1234_5678),
            400,
            "MAC does not verify",
        ),
        // Truncated: fewer sealed keys than key_IDs.
        (
            leg(vec![b64(&[7; 32])], 2, json!([]), 1),
            400,
            "do not match",
        ),
        // A tree that comes back through the sender, or goes to a KME that is not a
        // neighbour of kme-c.
        (
            leg(
                vec![b64(&[7; 32])],
                1,
                json!([{"kme": "kme-b", "onward": []}]),
                1,
            ),
            400,
            "loops",
        ),
        (
            leg(
                vec![b64(&[7; 32])],
                1,
                json!([{"kme": "kme-z", "onward": []}]),
                1,
            ),
            400,
            "not a neighbour",
        ),
    ];
    for (forged, code, reason) in cases {
        let (got, answer) = as_b.try_post(&url, &forged).await.unwrap();
        assert_eq!(got, code, "{answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(reason),
            "{answer}"
        );
    }
    // A leg of link material (unsealed) is the master's KME's alone to send.
    let mut unsealed = leg(Vec::new(), 1, json!([]), 0);
    unsealed["bindings"][0]["relay"]["sealed"] = Value::Null;
    let (got, answer) = as_b.try_post(&url, &unsealed).await.unwrap();
    assert_eq!(got, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("only kme-a sends"),
        "{answer}"
    );
    // A replay of the leg kme-c already took, under a new sequence number: its positions are
    // bound (409, and nothing changes).
    let bound = db_probe::audit_events(dir, "kme-c", "keys_bound");
    let relayed = bound
        .iter()
        .find(|b| b["bindings"][0]["relay"].is_object())
        .expect("a relay leg was bound");
    let replay = json!({"seq": NEW_SEQ, "bindings": relayed["bindings"]});
    let (got, answer) = as_b.try_post(&url, &replay).await.unwrap();
    assert_eq!(got, 409, "{answer}");

    // An abort from a neighbour is taken at its word (it burns only what it names), but its
    // reason goes into the audit trail bounded.
    let settle = json!({"settles": [{"relay_id": uuid::Uuid::new_v4(), "release": false,
                                     "reason": "x".repeat(10_000)}]});
    let settle_url = format!("{}/peer/v1/relay/settle", net.setup.peer_url("kme-c"));
    let (got, answer) = as_b.try_post(&settle_url, &settle).await.unwrap();
    assert_eq!(got, 200, "{answer}");
    let aborted = db_probe::audit_events(dir, "kme-c", "relay_aborted");
    let reason = aborted.last().unwrap()["reason"].as_str().unwrap();
    assert!(reason.chars().count() <= 201, "{} chars", reason.len());

    // Nothing was taken: the stream position, held keys and relays are as before, and the
    // relay goes on working.
    assert_eq!(db_probe::position(dir, "kme-c", "kme-b", "kme-b"), start);
    assert_eq!(db_probe::count(dir, "kme-c", "held_keys"), 0);
    assert_eq!(db_probe::count(dir, "kme-c", "relays"), 1);
    let sent = enc_ok(&net, ("sae-a", "kme-a"), "sae-c", json!({})).await;
    dec_same(&net, ("sae-c", "kme-c"), "sae-a", &sent).await;
    assert_no_position_used_twice(&net, &["kme-a", "kme-b", "kme-c"]);
}

#[test]
fn the_example_networks_are_valid_rings_and_stars() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for (file, links, saes) in [("examples/ring.toml", 4, 4), ("examples/star.toml", 3, 5)] {
        let config = kme::config::Config::load(&root.join(file)).unwrap();
        assert_eq!(
            (config.kmes.len(), config.links.len()),
            (4, links),
            "{file}"
        );
        assert_eq!(config.sae_homes.len(), saes, "{file}");
        for kme in &config.kmes {
            let node = config.node(kme.id.as_str()).unwrap();
            assert!(node.me.sae_listen.ip().is_loopback(), "{file}");
            assert_eq!(node.links.len(), links);
        }
    }
}

#[actix_web::test]
async fn a_hop_that_stops_answering_mid_relay_gives_503_and_leaves_nothing_retrievable() {
    // kme-b reaches kme-c through a relay that the test can stall.
    let mut proxy = TcpRelay::bind();
    let net = Net::start(LinkOptions {
        peer_urls: vec![("kme-c", proxy.url())],
        ..LinkOptions::default()
    });
    proxy.run(net.setup.ports["kme-c"].1);
    until_routed(&net, ("sae-a", "kme-a"), "sae-c").await;
    let sent = enc_ok(&net, ("sae-a", "kme-a"), "sae-c", json!({})).await;
    dec_same(&net, ("sae-c", "kme-c"), "sae-a", &sent).await;

    proxy.stall(true);
    let started = Instant::now();
    let (code, answer) = enc(
        &net.client(Some("sae-a")),
        &net.url("kme-a"),
        "sae-c",
        json!({"number": 4}),
    )
    .await;
    assert_eq!(code, 503, "{answer}");
    // The relay's own answer, before the SAE's request timed out at the edge.
    assert_eq!(
        answer["message"],
        "the slave's KME could not take the keys; retry later"
    );
    println!("503 after {:?}: {answer}", started.elapsed());
    proxy.stall(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while db_probe::audit_events(net.setup.path(), "kme-a", "relay_aborted").is_empty() {
        assert!(Instant::now() < deadline, "kme-a never aborted the relay");
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    // Whatever reached kme-c is burned (by the abort, or when its hold time passes), never
    // released: no key of the failed request is retrievable there.
    until_drained(&net, &["kme-b", "kme-c"]).await;
    let released = db_probe::audit_events(net.setup.path(), "kme-c", "relay_released");
    assert_eq!(
        released.len(),
        1,
        "only the first relay was released: {released:?}"
    );
    assert_eq!(db_probe::count(net.setup.path(), "kme-c", "keys"), 0);
    // The hop answers again: relays go on, and no position was used twice.
    let (sent, _) = enc_until_ok(&net, ("sae-a", "kme-a"), "sae-c").await;
    dec_same(&net, ("sae-c", "kme-c"), "sae-a", &sent).await;
    assert_no_position_used_twice(&net, &["kme-a", "kme-b", "kme-c"]);
}

#[actix_web::test]
async fn routes_avoid_a_link_whose_eavesdropper_alarm_is_on_even_to_its_own_neighbour() {
    let net = Net::start(LinkOptions {
        topology: Topology::ring(),
        bb84_on: vec![(["kme-a", "kme-b"], "eavesdropper = 1.0")],
        ..LinkOptions::bb84("")
    });
    net.wait_for_status("sae-a", "kme-a", "sae-b", "the alarm on a-b", |s| {
        s["status_extension"]["link"]["state"] == "down"
    })
    .await;
    // sae-c, two hops away either way: around the attacked link, through kme-d.
    let status = until_routed(&net, ("sae-a", "kme-a"), "sae-c").await;
    let via: Vec<&str> = status["status_extension"]["hops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["to"].as_str().unwrap())
        .collect();
    assert_eq!(via, ["kme-d", "kme-c"], "{status}");
    let sent = enc_ok(&net, ("sae-a", "kme-a"), "sae-c", json!({"number": 2})).await;
    dec_same(&net, ("sae-c", "kme-c"), "sae-a", &sent).await;
    // sae-b, the neighbour behind the attacked link: its pool is empty, so the keys go the
    // long way round (a-d-c-b), never over the link with the alarm on (once its last hop holds
    // material too: BB84 frames on four KMEs share two cores).
    net.wait_for_keys("sae-c", "kme-c", "sae-b", 64).await;
    let sent = enc_ok(&net, ("sae-a", "kme-a"), "sae-b", json!({"number": 2})).await;
    dec_same(&net, ("sae-b", "kme-b"), "sae-a", &sent).await;
    let legs = db_probe::audit_events(net.setup.path(), "kme-b", "keys_bound");
    assert!(
        legs.iter().all(|batch| batch["from_kme"] == "kme-c"),
        "kme-b bound keys only from kme-c: {legs:?}"
    );
    // With the direct route made mandatory, the neighbour's empty pool is a 503.
    let direct = json!({"extension_mandatory": [{"kme_route_type": "direct"}]});
    let (code, answer) = enc(
        &net.client(Some("sae-a")),
        &net.url("kme-a"),
        "sae-b",
        direct,
    )
    .await;
    assert_eq!(code, 503, "{answer}");
}
