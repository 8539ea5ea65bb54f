//! Bad input of every kind: a clear ETSI error (400/401), nothing consumed, the KME keeps
//! serving. "Nothing consumed" is checked on a full, idle pool: its available bytes and the
//! link's production counter must not move.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::harness::{dec, enc, keys, Client, LinkOptions, Net, NEW_SEQ};

fn full_pool_options() -> LinkOptions {
    LinkOptions {
        block_bytes: 1024,
        max_key_count: 256,
        max_sae_id_count: 1,
        ..LinkOptions::default()
    }
}

/// (available_bytes, bytes_produced) of kme-a's pool towards kme-b, once full and idle.
async fn settled(net: &Net) -> (u64, u64) {
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = net.wait_for_keys("sae-a", "kme-a", "sae-b", 256).await;
        let link = &status["status_extension"]["link"];
        let now = (
            link["available_bytes"].as_u64().unwrap(),
            link["bytes_produced"].as_u64().unwrap(),
        );
        if last == Some(now) {
            return now;
        }
        assert!(Instant::now() < deadline, "link did not settle");
        last = Some(now);
        actix_web::rt::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn expect(client: &Client, url: &str, body: Option<Value>, code: u16, message_part: &str) {
    let (got, answer) = match body {
        Some(body) => client.post(url, &body).await,
        None => client.get(url).await,
    };
    assert_eq!(got, code, "{url} {answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(
        message.contains(message_part),
        "expected '{message_part}' in '{message}'"
    );
}

#[actix::test]
async fn bad_enc_keys_requests_consume_nothing() {
    let net = Net::start(full_pool_options());
    let a = net.url("kme-a");
    let before = settled(&net).await;
    let master = net.client(Some("sae-a"));
    let enc_url = format!("{a}/api/v1/keys/sae-b/enc_keys");
    let cases: Vec<(Value, &str)> = vec![
        (json!({"number": "3"}), "invalid JSON"),
        (json!({"number": 1.5}), "invalid JSON"),
        (json!({"size": "256"}), "invalid JSON"),
        (
            json!({"additional_slave_SAE_IDs": "sae-b2"}),
            "invalid JSON",
        ),
        (json!({"extension_mandatory": {"x": 1}}), "invalid JSON"),
        (json!([1, 2]), "invalid JSON"),
        (json!({"number": 0}), "number"),
        (json!({"number": -1}), "number"),
        (json!({"number": 129}), "max_key_per_request"),
        (json!({"number": 1e30}), "invalid JSON"),
        (json!({"size": 12}), "size shall be a multiple of 8"),
        (json!({"size": 0}), "size"),
        (json!({"size": 32}), "min_key_size"),
        (json!({"size": 16384}), "max_key_size"),
        (
            json!({"additional_slave_SAE_IDs": ["sae-b"]}),
            "more than once",
        ),
        (json!({"additional_slave_SAE_IDs": ["sae-a"]}), "master SAE"),
        (json!({"additional_slave_SAE_IDs": ["ghost"]}), "unknown"),
        (
            json!({"additional_slave_SAE_IDs": ["sae-b2", "sae-b2"]}),
            "more than once",
        ),
        (
            json!({"extension_mandatory": [{"abc_route_type": "direct"}]}),
            "not all extension_mandatory parameters are supported",
        ),
        (
            json!({"extension_mandatory": [{"kme_route_type": "teleport"}]}),
            "not all extension_mandatory request options could be met",
        ),
        (
            json!({"extension_mandatory": [{"kme_max_hops": 0}]}),
            "not all extension_mandatory request options could be met",
        ),
        (
            json!({"extension_mandatory": [{"kme_max_hops": "two"}]}),
            "not all extension_mandatory request options could be met",
        ),
        // The two names of the additional slaves at once.
        (
            json!({"additional_slave_SAE_IDs": ["sae-b2"], "additional_target_sae_ids": ["sae-b2"]}),
            "send one",
        ),
        (
            json!({"additional_target_sae_ids": ["sae-b"]}),
            "more than once",
        ),
        // A known field of the wrong type is still refused, also next to unknown ones.
        (json!({"number": "1", "vendor_field": 1}), "invalid JSON"),
    ];
    for (body, message) in cases {
        expect(&master, &enc_url, Some(body), 400, message).await;
    }
    let (code, body) = enc(
        &master,
        &a,
        "sae-b",
        json!({"extension_mandatory": [{"abc_route_type": "x"}]}),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(
        body["details"][0]["extension_mandatory_unsupported"],
        "abc_route_type is not supported"
    );
    expect(
        &master,
        &format!("{a}/api/v1/keys/ghost/enc_keys"),
        Some(json!({})),
        400,
        "unknown slave",
    )
    .await;
    expect(
        &master,
        &format!("{a}/api/v1/keys/sae-a/enc_keys"),
        Some(json!({})),
        400,
        "own slave",
    )
    .await;
    expect(
        &master,
        &format!("{a}/api/v1/keys/sae-b/enc_keys?number=1&bogus=2"),
        None,
        400,
        "invalid query",
    )
    .await;
    expect(
        &master,
        &format!("{a}/api/v1/keys/sae-b/enc_keys?number=x"),
        None,
        400,
        "invalid query",
    )
    .await;
    expect(
        &master,
        &format!("{a}/api/v1/keys/sae-b/enc_keys?size=100"),
        None,
        400,
        "multiple of 8",
    )
    .await;
    // sae-c is two hops away: a mandatory direct route cannot be met; and one hop is not
    // enough for it either.
    for extension in [
        json!({"kme_route_type": "direct"}),
        json!({"kme_max_hops": 1}),
    ] {
        let (code, body) = enc(
            &master,
            &a,
            "sae-c",
            json!({"extension_mandatory": [extension]}),
        )
        .await;
        assert_eq!(code, 400, "{body}");
        assert_eq!(
            body["message"],
            "not all extension_mandatory request options could be met"
        );
        assert!(
            body["details"][0]["extension_mandatory_unmet"].is_string(),
            "{body}"
        );
    }
    // Too many additional slaves (max_SAE_ID_count = 1 here), all registered: refused for
    // the limit (400) before anything depends on the route to sae-c (503 if none).
    expect(
        &master,
        &enc_url,
        Some(json!({"additional_slave_SAE_IDs": ["sae-b2", "sae-c"]})),
        400,
        "at most 1 additional slave SAE IDs are allowed",
    )
    .await;
    // More key material than the pool can ever hold (256 keys of 256 bits here).
    expect(
        &master,
        &enc_url,
        Some(json!({"number": 128, "size": 1024})),
        400,
        "exceeds the 65536 bits of key material this link's pool holds",
    )
    .await;
    // Malformed JSON, arrays for objects, and a body of several MB.
    let (code, _) = master.post_raw(&enc_url, b"{\"number\":".to_vec()).await;
    assert_eq!(code, 400);
    let (code, body) = master
        .post_raw(&enc_url, b"[1, 64, null, null, null]".to_vec())
        .await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = master.post_raw(&enc_url, vec![b' '; 4 * 1024 * 1024]).await;
    assert_eq!(code, 400, "{body}");
    // Unknown paths and methods.
    let (code, _) = master.request("DELETE", &enc_url).await;
    assert_eq!(code, 400);
    let (code, _) = master.get(&format!("{a}/api/v2/whatever")).await;
    assert_eq!(code, 400);
    let (code, _) = master
        .post(
            &format!("{a}/api/v1/keys/sae-b/status"),
            &json!({"number": 1}),
        )
        .await;
    assert_eq!(code, 400, "status takes GET only");

    assert_eq!(
        settled(&net).await,
        before,
        "a refused request consumed key material"
    );
    let (code, body) = enc(&master, &a, "sae-b", json!({})).await;
    assert_eq!(code, 200, "the KME still serves: {body}");
    // Fields the standard does not name are ignored (deployed clients send them), and the
    // additional slaves may come under the name one of them uses.
    let (code, body) = enc(
        &master,
        &a,
        "sae-b",
        json!({"number": 1, "client_hint": {"x": 1}, "additional_target_sae_ids": ["sae-b2"]}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = net
        .dec_sent(("sae-b2", "kme-b"), "sae-a", &keys(&body))
        .await;
    assert_eq!(code, 200, "sae-b2 was named as an additional slave: {body}");
    // Mandatory route extensions that hold for a neighbour are met.
    let route = json!({"extension_mandatory": [{"kme_route_type": "direct"}, {"kme_max_hops": 1}]});
    let (code, body) = enc(&master, &a, "sae-b", route).await;
    assert_eq!(code, 200, "{body}");
}

#[actix::test]
async fn bad_certificates_get_401_and_consume_nothing() {
    let net = Net::start(full_pool_options());
    let a = net.url("kme-a");
    let before = settled(&net).await;
    let status_url = format!("{a}/api/v1/keys/sae-b/status");
    let enc_url = format!("{a}/api/v1/keys/sae-b/enc_keys");
    for (cert, why) in [
        (None, "certificate is required"),
        (Some("foreign"), "not accepted"),
        (Some("expired"), "not accepted"),
        (Some("no-cn"), "no usable CN"),
        (Some("two-cns"), "several CNs"),
        (Some("sae-x"), "not a registered SAE"),
        (Some("kme-b"), "KME certificates"),
        (Some("sae-b"), "registered at KME kme-b"),
    ] {
        let client = net.client(cert);
        expect(&client, &status_url, None, 401, why).await;
        expect(&client, &enc_url, Some(json!({})), 401, why).await;
        expect(&client, &format!("{a}/api/v1/sae/info/me"), None, 401, why).await;
        // 401 comes before any judgement of the request itself.
        let (code, _) = client.post_raw(&enc_url, b"{not json".to_vec()).await;
        assert_eq!(code, 401);
        expect(
            &client,
            &enc_url,
            Some(json!({"extension_mandatory": [{"x_y": 1}]})),
            401,
            "",
        )
        .await;
        let dec_url = format!("{a}/api/v1/keys/sae-b/dec_keys");
        expect(
            &client,
            &dec_url,
            Some(json!({"key_IDs": [{"key_ID": "nope"}]})),
            401,
            "",
        )
        .await;
        expect(
            &client,
            &format!("{dec_url}?key_ID=nope&x=1"),
            None,
            401,
            "",
        )
        .await;
    }
    // Without a valid certificate, unknown paths and methods get 401 too.
    for cert in [None, Some("foreign"), Some("expired")] {
        let client = net.client(cert);
        expect(&client, &format!("{a}/api/v2/whatever"), None, 401, "").await;
        let (code, _) = client.request("DELETE", &enc_url).await;
        assert_eq!(code, 401);
    }
    assert_eq!(settled(&net).await, before);
}

#[actix::test]
async fn bad_dec_keys_requests_leave_keys_for_the_rightful_slave() {
    let net = Net::start(LinkOptions::default());
    let (a, b) = (net.url("kme-a"), net.url("kme-b"));
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 4).await;
    let master = net.client(Some("sae-a"));
    let slave = net.client(Some("sae-b"));
    let other = net.client(Some("sae-b2"));
    let (code, body) = enc(&master, &a, "sae-b", json!({"number": 2})).await;
    assert_eq!(code, 200);
    let issued = keys(&body);
    let (id, id2) = (issued[0].0.as_str(), issued[1].0.as_str());
    let dec_url = format!("{b}/api/v1/keys/sae-a/dec_keys");
    let unknown = uuid::Uuid::new_v4().to_string();

    // Someone else's key: 401, and nothing consumed, not even the caller's part of a batch.
    let (code, _) = dec(&other, &b, "sae-a", &[id]).await;
    assert_eq!(code, 401);
    let (code, body) = enc(&master, &a, "sae-b2", json!({"number": 1})).await;
    assert_eq!(code, 200, "{body}");
    let for_other = keys(&body);
    let (code, answer) = dec(&slave, &b, "sae-a", &[id, &for_other[0].0]).await;
    assert_eq!(code, 401, "a batch with a key of another slave: {answer}");
    let (code, body) = dec(&other, &b, "sae-a", &[&for_other[0].0]).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        keys(&body),
        for_other,
        "the other slave's key was not consumed"
    );
    let (code, _) = dec(&master, &b, "sae-a", &[id]).await;
    assert_eq!(code, 401, "sae-a is not an SAE of kme-b");
    // Unknown key among good ones: 400, nothing consumed.
    let (code, body) = dec(&slave, &b, "sae-a", &[id, &unknown]).await;
    assert_eq!(
        (code, body["message"].as_str()),
        (400, Some("one or more keys specified are not found on KME"))
    );
    // Wrong master in the path: not found.
    let (code, _) = dec(&slave, &b, "sae-b2", &[id]).await;
    assert_eq!(code, 400);
    for body in [
        json!({"key_IDs": [{"key_ID": "not-a-uuid"}]}),
        json!({"key_IDs": []}),
        json!({"key_IDs": [{"key_ID": id}, {"key_ID": id}]}),
        json!({"key_IDs": "x"}),
        json!({"key_IDs": [{"key_ID": 5}]}),
        json!({"key_ID": id}),
        json!({}),
    ] {
        let (code, answer) = slave.post(&dec_url, &body).await;
        assert_eq!(code, 400, "{body} -> {answer}");
    }
    let (code, _) = slave
        .get(&format!("{dec_url}?key_ID={id}&key_ID={id2}"))
        .await;
    assert_eq!(code, 400, "two key_IDs need POST");
    let (code, _) = slave.get(&format!("{dec_url}?key_ID=zzz")).await;
    assert_eq!(code, 400);
    let (code, _) = slave.post_raw(&dec_url, b"[{".to_vec()).await;
    assert_eq!(code, 400);

    // The rightful slave still gets both keys, once.
    let (code, body) = dec(&slave, &b, "sae-a", &[id, id2]).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(keys(&body), issued);
    let (code, _) = dec(&slave, &b, "sae-a", &[id2]).await;
    assert_eq!(code, 400, "already retrieved");
}

#[actix::test]
async fn a_slow_client_does_not_block_others() {
    use std::io::{Read, Write};
    let net = Net::start(LinkOptions::default());
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 2).await;
    let port = net.setup.ports["kme-a"].0;
    let dir = net.setup.path().to_path_buf();
    let (stalled_tx, stalled_rx) = std::sync::mpsc::channel();
    let (go_on_tx, go_on_rx) = std::sync::mpsc::channel::<()>();
    // A client that sends the headers and the first byte of a 100-byte body, stalls until the
    // other SAE was served, then sends the rest and reads its answer: on its own thread.
    let slow = std::thread::spawn(move || {
        let mut tls = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).unwrap();
        tls.set_ca_file(dir.join("ca.crt")).unwrap();
        tls.set_certificate_chain_file(dir.join("sae-a.crt"))
            .unwrap();
        tls.set_private_key_file(dir.join("sae-a.key"), openssl::ssl::SslFiletype::PEM)
            .unwrap();
        let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut stream = tls.build().connect("localhost", tcp).unwrap();
        stream.write_all(b"POST /api/v1/keys/sae-b/enc_keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{").unwrap();
        stream.flush().unwrap();
        stalled_tx.send(()).unwrap();
        go_on_rx.recv().unwrap();
        let rest = format!("{:>99}", "\"number\":1}");
        stream.write_all(rest.as_bytes()).unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    });
    stalled_rx.recv().unwrap();
    let master = net.client(Some("sae-a"));
    let (code, body) = enc(&master, &net.url("kme-a"), "sae-b", json!({})).await;
    assert_eq!(code, 200, "served while another connection stalls: {body}");
    go_on_tx.send(()).unwrap();
    let answer = slow.join().unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the stalled request is served once its body is complete: {answer}"
    );
    assert!(answer.contains("\"key_ID\""), "{answer}");
}

/// Every listener speaks HTTP/1.1 only: a client that offers HTTP/2 first gets HTTP/1.1, so a
/// connection carries one request at a time and the connection cap bounds the requests in
/// flight (HTTP/2 would multiplex streams past it).
#[actix::test]
async fn no_listener_negotiates_http2_so_the_connection_cap_bounds_the_requests() {
    let net = Net::start(LinkOptions::default());
    let dir = net.setup.path();
    for (port, cert) in [
        (net.setup.ports["kme-a"].0, "sae-a"),
        (net.setup.ports["kme-a"].1, "kme-b"),
    ] {
        let tls = super::harness::raw_tls(dir, "ca.crt", cert, b"\x02h2\x08http/1.1");
        let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let stream = tls.connect("localhost", tcp).unwrap();
        assert_eq!(
            stream.ssl().selected_alpn_protocol(),
            Some(&b"http/1.1"[..]),
            "port {port}"
        );
    }
}

/// Each KME-to-KME endpoint takes bodies only as large as its messages get: a neighbour's
/// 64 KiB level report (a few bytes when genuine) is refused with 413, announced or not, and
/// the genuine one still goes through.
#[actix::test]
async fn a_neighbour_message_larger_than_its_endpoint_takes_is_refused() {
    let net = Net::start(LinkOptions::default());
    let level = format!("{}/peer/v1/level", net.setup.peer_url("kme-b"));
    let kme_a = net.client(Some("kme-a"));
    let padded = json!({"level": 1, "padding": "x".repeat(64 * 1024)});
    let (code, answer) = kme_a.try_post(&level, &padded).await.unwrap();
    assert_eq!(code, 413, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("4096 bytes"),
        "{answer}"
    );
    let (code, answer) = kme_a.try_post(&level, &json!({"level": 1})).await.unwrap();
    assert_eq!(code, 200, "{answer}");
}

/// With `[tls] peer_ca` the KME-to-KME channel has a CA of its own: keys flow between KMEs
/// whose channel certificates it issued, and a KME certificate of the SAE API's CA no longer
/// opens that channel.
#[actix::test]
async fn the_kme_to_kme_channel_may_have_a_ca_of_its_own() {
    let net = Net::start(LinkOptions {
        peer_ca: true,
        ..LinkOptions::default()
    });
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 16).await;
    net.key_pair(("sae-a", "kme-a"), ("sae-b", "kme-b"), 4)
        .await;
    let dir = net.setup.path();
    let handshake = |cert: &str| {
        let tls = super::harness::raw_tls(dir, "peer-pki/ca.crt", cert, b"\x08http/1.1");
        let tcp = std::net::TcpStream::connect(("127.0.0.1", net.setup.ports["kme-b"].1)).unwrap();
        tls.connect("localhost", tcp).map(|mut stream| {
            // TLS 1.3 reports a refused client certificate at the first read.
            use std::io::{Read, Write};
            let _ = stream.write_all(b"GET /peer/v1/none HTTP/1.1\r\nHost: x\r\n\r\n");
            let mut byte = [0u8; 1];
            stream.read(&mut byte).is_ok_and(|n| n == 1)
        })
    };
    assert!(
        matches!(handshake("kme-a.peer"), Ok(true)),
        "its channel certificate"
    );
    assert!(
        !matches!(handshake("kme-a"), Ok(true)),
        "its SAE API certificate"
    );
}

#[actix::test]
async fn the_kme_to_kme_channel_accepts_only_neighbour_kmes() {
    let net = Net::start(LinkOptions::default());
    let peer_b = net.setup.peer_url("kme-b");
    let body = json!({"seq": 1, "bindings": []});
    let url = format!("{peer_b}/peer/v1/activate");
    // An SAE certificate of our CA (clientAuth only) or no certificate: no usable TLS session.
    let sae = net.client(Some("sae-a")).try_post(&url, &body).await;
    assert!(sae.is_err(), "{sae:?}");
    // No certificate: the handshake itself fails (the peer listener requires one).
    let anonymous = net.client(None).try_post(&url, &body).await;
    assert!(anonymous.is_err(), "{anonymous:?}");
    assert!(net
        .client(Some("foreign"))
        .try_post(&url, &body)
        .await
        .is_err());
    // kme-c is a KME but not a neighbour of kme-a.
    let (code, _) = net
        .client(Some("kme-c"))
        .try_post(
            &format!("{}/peer/v1/activate", net.setup.peer_url("kme-a")),
            &body,
        )
        .await
        .unwrap();
    assert_eq!(code, 403);
    // A neighbour may bind keys only of its own SAEs, and only for SAEs of this KME.
    let kme_a = net.client(Some("kme-a"));
    for (master, slave, reason) in [
        ("sae-c", "sae-b", "master sae-c is not an SAE of kme-a"),
        ("sae-b2", "sae-b", "master sae-b2 is not an SAE of kme-a"),
        ("sae-a", "sae-a", "slave sae-a is not an SAE of this KME"),
        ("sae-a", "sae-c", "slave sae-c is not an SAE of this KME"),
    ] {
        let forged = json!({"seq": NEW_SEQ, "bindings": [{
            "key_ids": [uuid::Uuid::now_v7()], "master": master, "slaves": [slave], "start": 0, "len": 32}]});
        let (code, answer) = kme_a.try_post(&url, &forged).await.unwrap();
        assert_eq!(code, 400, "{master}->{slave}: {answer}");
        assert_eq!(answer["error"], format!("peer message rejected: {reason}"));
    }
    // A replayed (old) sequence number from a real neighbour is rejected, with the last one
    // taken (so that a neighbour restored from a backup can move past it).
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 1).await;
    let master = net.client(Some("sae-a"));
    let (code, _) = enc(&master, &net.url("kme-a"), "sae-b", json!({})).await;
    assert_eq!(code, 200);
    let (code, answer) = net
        .client(Some("kme-a"))
        .try_post(&url, &body)
        .await
        .unwrap();
    assert_eq!(code, 409, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("replay") && answer["last_seq"].is_u64(),
        "{answer}"
    );
}

/// Sequence numbers recover: when kme-b has taken higher numbers from kme-a than kme-a now
/// sends (kme-a restored from a backup, its boot epoch behind), kme-a's next batch is refused
/// with kme-b's last number, kme-a's numbers move past it, and the batch after goes through
/// (before, every batch was a "replay" until enough restarts passed the old epoch). A number
/// far ahead of the last one (which would leave no room above it) is refused.
#[actix::test]
async fn sequence_numbers_resynchronise_after_a_restore_and_refuse_a_jump_far_ahead() {
    let net = Net::start(LinkOptions::default());
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 16).await;
    let (master, a) = (net.client(Some("sae-a")), net.url("kme-a"));
    let (code, _) = enc(&master, &a, "sae-b", json!({})).await;
    assert_eq!(code, 200);
    let dir = net.setup.path();
    let last: i64 = super::db_probe::open(dir, "kme-b")
        .get()
        .unwrap()
        .query_row(
            "SELECT last_seq FROM peer_sequence WHERE peer = 'kme-a'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    // As if kme-a had run 40 more boots before its data went back to this state.
    let ahead = ((last >> 40) + 40) << 40;
    super::db_probe::tamper(
        dir,
        "kme-b",
        &format!("UPDATE peer_sequence SET last_seq = {ahead} WHERE peer = 'kme-a'"),
    );
    let mut codes = Vec::new();
    let sent = loop {
        let (code, body) = enc(&master, &a, "sae-b", json!({})).await;
        codes.push(code);
        if code == 200 || codes.len() == 3 {
            break keys(&body);
        }
    };
    assert_eq!(codes.last(), Some(&200), "{codes:?}");
    assert!(codes.len() <= 2, "one refused batch at most: {codes:?}");
    let (code, body) = net.dec_sent(("sae-b", "kme-b"), "sae-a", &sent).await;
    assert_eq!((code, keys(&body)), (200, sent));

    let far = (((ahead >> 40) + (1 << 17)) << 40) as u64;
    let url = format!("{}/peer/v1/activate", net.setup.peer_url("kme-b"));
    let empty = json!({"seq": far, "bindings": []});
    let (code, answer) = net
        .client(Some("kme-a"))
        .try_post(&url, &empty)
        .await
        .unwrap();
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("too far ahead"),
        "{answer}"
    );
    let (code, _) = enc(&master, &a, "sae-b", json!({})).await;
    assert_eq!(code, 200, "the real numbers still go through");
}

/// The handshake on connect: a KME that starts with its numbers behind what its neighbour
/// took from it (restored from a backup) learns the neighbour's last number before it binds
/// any key, so its first batch is not refused (before: one 503 per neighbour and restart).
#[actix::test]
async fn a_kme_learns_its_neighbours_numbers_on_connect_before_binding_a_key() {
    let options = LinkOptions::default();
    let mut net = Net::start(options.clone());
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 16).await;
    net.key_pair(("sae-a", "kme-a"), ("sae-b", "kme-b"), 1)
        .await;
    let dir = net.setup.path().to_path_buf();
    net.restart_all_after(&options, || {
        // As if kme-a had run 40 more boots before its data went back to this state.
        super::db_probe::tamper(
            &dir,
            "kme-b",
            "UPDATE peer_sequence SET last_seq = (((last_seq >> 40) + 40) << 40) WHERE peer = 'kme-a'",
        );
    });
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 16).await;
    let (code, body) = enc(
        &net.client(Some("sae-a")),
        &net.url("kme-a"),
        "sae-b",
        json!({}),
    )
    .await;
    assert_eq!(code, 200, "the first batch after the restart: {body}");
    let sent = keys(&body);
    let (code, body) = net.dec_sent(("sae-b", "kme-b"), "sae-a", &sent).await;
    assert_eq!((code, keys(&body)), (200, sent));
    let greeted = super::db_probe::audit_events(&dir, "kme-b", "peer_handshake");
    assert!(
        greeted.iter().any(|g| g["from_kme"] == "kme-a"),
        "{greeted:?}"
    );
}

#[actix::test]
async fn a_full_disk_answers_503_loses_nothing_and_recovers() {
    let net = Net::start(LinkOptions {
        max_key_count: 2048,
        max_db_mb: Some(1),
        ..LinkOptions::default()
    });
    let (a, b) = (net.url("kme-a"), net.url("kme-b"));
    let master = net.client(Some("sae-a"));
    let slave = net.client(Some("sae-b"));
    let mut issued: Vec<(String, String)> = Vec::new();
    let mut full = None;
    for _ in 0..400 {
        net.wait_for_keys("sae-a", "kme-a", "sae-b", 64).await;
        let (code, body) = enc(&master, &a, "sae-b", json!({"number": 64})).await;
        match code {
            200 => issued.extend(keys(&body)),
            503 => {
                full = Some(body);
                break;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let full = full.expect("kme-b's database never filled up");
    // The slave's KME refused the activation (its disk): not a timeout ("the KME is busy").
    assert_eq!(
        full["message"], "the slave's KME could not take the keys; retry later",
        "{full}"
    );
    assert!(!issued.is_empty());
    // kme-b keeps serving: status, and every key handed out before is still there, once.
    let (code, _) = slave.get(&format!("{b}/api/v1/keys/sae-a/status")).await;
    assert_eq!(code, 200);
    for chunk in issued.chunks(256) {
        let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
        let (code, body) = dec(&slave, &b, "sae-a", &ids).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(keys(&body), chunk.to_vec());
    }
    // With the keys retrieved there is room again.
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 64).await;
    let (code, body) = enc(&master, &a, "sae-b", json!({"number": 64})).await;
    assert_eq!(code, 200, "{body}");
}

/// At kme-b, `holder`'s certificate is sae-b2 (bound to it otherwise than by CN), the
/// certificate that merely says CN=sae-b2 is not, and an SAE without a binding keeps its CN.
async fn sae_b2_is_bound_to(net: &Net, holder: &str) {
    let me = format!("{}/api/v1/sae/info/me", net.url("kme-b"));
    let (code, body) = net.client(Some(holder)).get(&me).await;
    assert_eq!(
        (code, body["SAE_ID"].as_str()),
        (200, Some("sae-b2")),
        "{body}"
    );
    expect(
        &net.client(Some("sae-b2")),
        &me,
        None,
        401,
        "another certificate",
    )
    .await;
    let (code, _) = net.client(Some("sae-b")).get(&me).await;
    assert_eq!(code, 200, "SAEs without a binding keep their CN identity");
}

/// An SAE pinned to a certificate fingerprint is that certificate, although it has no CN.
#[actix::test]
async fn an_sae_pinned_to_a_certificate_fingerprint() {
    let net = Net::start(LinkOptions {
        pins: vec![("sae-b2", "no-cn")],
        ..LinkOptions::default()
    });
    sae_b2_is_bound_to(&net, "no-cn").await;
}

/// An SAE bound to a SAN URI (a SPIFFE ID) is any certificate of the CA with that URI,
/// whatever its CN.
#[actix::test]
async fn an_sae_bound_to_a_spiffe_uri() {
    let net = Net::start(LinkOptions {
        sae_limits: vec![("sae-b2", "uri = \"spiffe://kme.test/sae-b2\"")],
        ..LinkOptions::default()
    });
    sae_b2_is_bound_to(&net, "workload").await;
}

/// Resident memory of process `pid`, in KiB.
fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Callers without an identity cost nothing: 100 TLS connections without a client
/// certificate, each announcing a 1 MiB body to an API path or an unknown one, sending 64 KiB
/// of it and stalling, get their 401 at once (before the rest of the body, which never comes)
/// and are closed; the KME's resident memory (a real `kme` process) grows by less than half a
/// MiB per caller (their TLS sessions and read buffers, while they last), and an SAE is served
/// meanwhile.
#[actix::test]
async fn stalled_unauthenticated_callers_get_401_at_once_and_cost_nothing() {
    use std::io::{Read, Write};
    let setup = super::harness::Setup::for_processes(&LinkOptions::default());
    let kme_a = super::crash::spawn_with(&setup, "kme-a", &[]);
    let sae = Client::new(setup.path(), Some("sae-a"));
    let a = setup.sae_url("kme-a");
    super::crash::wait_up(&sae, &a).await;
    let port = setup.ports["kme-a"].0;
    let pid = kme_a.child.id();
    let before = resident_kib(pid);
    let mut tls = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).unwrap();
    tls.set_verify(openssl::ssl::SslVerifyMode::NONE);
    tls.set_alpn_protos(b"\x08http/1.1").unwrap();
    let tls = std::sync::Arc::new(tls.build());
    let callers: Vec<_> = (0..100)
        .map(|i| {
            let tls = tls.clone();
            let path = if i % 2 == 0 {
                "/api/v1/keys/sae-b/enc_keys"
            } else {
                "/no/such/path"
            };
            std::thread::spawn(move || {
                let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                // Shorter than the KME's body read timeout (10 s): an answer in time is one
                // that did not wait for the body.
                tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut stream = tls.connect("localhost", tcp).unwrap();
                let head = format!(
                    "POST {path} HTTP/1.1\r\nHost: localhost\r\n\
                     Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n"
                );
                stream.write_all(head.as_bytes()).unwrap();
                // Part of the body, then nothing more: the connection stays open.
                let _ = stream.write_all(&[b' '; 64 * 1024]);
                let mut answer = Vec::new();
                let closed = stream.read_to_end(&mut answer).is_ok();
                (String::from_utf8_lossy(&answer).into_owned(), closed)
            })
        })
        .collect();
    let (code, body) = sae.get(&format!("{a}/api/v1/sae/info/me")).await;
    assert_eq!(code, 200, "an SAE is served meanwhile: {body}");
    for caller in callers {
        let (answer, closed) = caller.join().unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 401"),
            "no 401 before the body: {answer:?}"
        );
        assert!(closed, "the KME closes the connection after its 401");
    }
    let grown_mib = resident_kib(pid).saturating_sub(before) / 1024;
    assert!(
        grown_mib < 48,
        "100 stalled callers cost the KME {grown_mib} MiB"
    );
}
