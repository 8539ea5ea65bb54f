//! `kill -9` of real `kme` processes at arbitrary moments: no key is delivered twice, every
//! key a master received stays retrievable by its slave, pools resume.

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::harness::{dec, enc, keys, Client, LinkOptions, Setup, KMES};

struct Process {
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(setup: &Setup, kme: &str) -> Process {
    let log = std::fs::File::create(setup.path().join(format!("{kme}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_kme"))
        .args(["run", "--config"])
        .arg(setup.config_file())
        .args(["--kme", kme])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Process { child }
}

async fn wait_up(client: &Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some((200, _)) = client.try_get(&format!("{url}/api/v1/sae/info/me")).await {
            return;
        }
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not come up");
}

/// Waits until sae-a's pool towards sae-b holds `count` keys (30 s at most).
async fn wait_for_keys(master: &Client, a: &str, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = format!("{a}/api/v1/keys/sae-b/status");
    while Instant::now() < deadline {
        if let Some((200, body)) = master.try_get(&url).await {
            if body["stored_key_count"].as_u64() >= Some(count) {
                return;
            }
        }
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the pool of {a} did not refill");
}

#[actix::test]
async fn kill_9_at_any_moment_loses_and_repeats_nothing() {
    kill_9_rounds(LinkOptions::default(), 6).await;
}

/// On BB84 links the kills land in the middle of frames (the pools drain under the load, so
/// frames run all the time): no frame may leave the two ends with different blocks.
#[actix::test]
async fn kill_9_in_the_middle_of_bb84_frames_never_mismatches() {
    kill_9_rounds(LinkOptions::bb84(""), 4).await;
}

async fn kill_9_rounds(options: LinkOptions, rounds: u64) {
    let ports: HashMap<&'static str, (TcpListener, TcpListener)> = KMES
        .iter()
        .map(|k| {
            (
                *k,
                (
                    TcpListener::bind("127.0.0.1:0").unwrap(),
                    TcpListener::bind("127.0.0.1:0").unwrap(),
                ),
            )
        })
        .collect();
    let setup = Setup::new(&options, &ports);
    drop(ports); // free the ports for the processes
    let master = Client::new(setup.path(), Some("sae-a"));
    let slave = Client::new(setup.path(), Some("sae-b"));
    let (a, b) = (setup.sae_url("kme-a"), setup.sae_url("kme-b"));
    let mut kme_a = spawn(&setup, "kme-a");
    let mut kme_b = spawn(&setup, "kme-b");
    wait_up(&master, &a).await;
    wait_up(&slave, &b).await;

    let mut delivered: Vec<(String, String)> = Vec::new();
    for round in 0..rounds {
        wait_for_keys(&master, &a, 16).await;
        // Load from 8 concurrent masters, and a kill -9 in the middle of it.
        let load = (0..8).map(|_| {
            let (master, a) = (master.clone(), a.clone());
            async move {
                let mut got = Vec::new();
                for _ in 0..40 {
                    match master
                        .inner_post(
                            &format!("{a}/api/v1/keys/sae-b/enc_keys"),
                            &json!({"number": 2}),
                        )
                        .await
                    {
                        Some((200, body)) => got.extend(keys(&body)),
                        // Empty pool (503): give production a moment.
                        Some(_) => actix_web::rt::time::sleep(Duration::from_millis(10)).await,
                        None => break,
                    }
                }
                got
            }
        });
        let killer = async {
            actix_web::rt::time::sleep(Duration::from_millis(50 + 37 * round)).await;
            let victim = if round % 2 == 0 {
                &mut kme_a
            } else {
                &mut kme_b
            };
            victim.child.kill().unwrap(); // SIGKILL
            victim.child.wait().unwrap();
        };
        let (results, ()) = futures_util::join!(futures_util::future::join_all(load), killer);
        delivered.extend(results.into_iter().flatten());
        if round % 2 == 0 {
            kme_a = spawn(&setup, "kme-a");
        } else {
            kme_b = spawn(&setup, "kme-b");
        }
        wait_up(&master, &a).await;
        wait_up(&slave, &b).await;
    }
    // And some keys after the last restart.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut after = 0;
    while after < 10 {
        let (code, body) = enc(&master, &a, "sae-b", json!({"number": 1})).await;
        if code == 200 {
            delivered.extend(keys(&body));
            after += 1;
        }
        assert!(Instant::now() < deadline, "pools did not resume");
    }
    let ids: HashSet<_> = delivered.iter().map(|(id, _)| id.clone()).collect();
    let material: HashSet<_> = delivered.iter().map(|(_, key)| key.clone()).collect();
    assert_eq!(ids.len(), delivered.len(), "a key_ID was delivered twice");
    assert_eq!(
        material.len(),
        delivered.len(),
        "key material was delivered twice"
    );
    assert!(
        delivered.len() > 20,
        "too few keys delivered to mean anything: {}",
        delivered.len()
    );
    for chunk in delivered.chunks(64) {
        let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
        let (code, body) = dec(&slave, &b, "sae-a", &ids).await;
        assert_eq!(code, 200, "a delivered key is not retrievable: {body}");
        assert_eq!(keys(&body), chunk.to_vec());
    }
    drop(kme_a);
    drop(kme_b);
}

#[actix::test]
async fn a_wrong_or_missing_master_key_refuses_to_start() {
    let mut net = super::harness::Net::start(LinkOptions::default());
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 1).await;
    net.stop("kme-a");
    let config = kme::config::Config::load(&net.setup.config_file()).unwrap();
    let key = net.setup.path().join("data/kme-a/master.key");
    let start = || {
        let listeners = kme::node::Listeners {
            sae: TcpListener::bind("127.0.0.1:0").unwrap(),
            peer: TcpListener::bind("127.0.0.1:0").unwrap(),
        };
        kme::node::spawn(config.node("kme-a").unwrap(), Some(listeners))
    };
    let original = std::fs::read(&key).unwrap();
    std::fs::write(&key, [42u8; 32]).unwrap();
    let err = start()
        .err()
        .expect("a foreign master key must not open the database");
    assert!(
        err.to_string().contains("not the key of this database"),
        "{err}"
    );
    std::fs::remove_file(&key).unwrap();
    let err = start()
        .err()
        .expect("a missing master key must not be replaced");
    assert!(err.to_string().contains("missing"), "{err}");
    std::fs::write(&key, original).unwrap();
    start().expect("the right key starts again").stop();
}
