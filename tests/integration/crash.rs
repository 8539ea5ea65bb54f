//! `kill -9` of real `kme` processes at arbitrary moments: no key is delivered twice, every
//! key a master received stays retrievable by its slave, pools resume.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;

use super::db_probe;
use super::harness::{
    audit_verify, dec, enc, keys, kme_restored, Client, LinkOptions, Net, Setup, KMES,
};

pub(super) struct Process {
    pub(super) child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(setup: &Setup, kme: &str) -> Process {
    spawn_with(setup, kme, &[])
}

/// `kme <args> run` for `kme` of `setup`, its log (stderr) in `<kme>.log` of the setup.
pub(super) fn spawn_with(setup: &Setup, kme: &str, args: &[&str]) -> Process {
    let log = std::fs::File::create(setup.path().join(format!("{kme}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_kme"))
        .args(args)
        .args(["run", "--config"])
        .arg(setup.config_file())
        .args(["--kme", kme])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Process { child }
}

pub(super) async fn wait_up(client: &Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some((200, _)) = client.try_get(&format!("{url}/api/v1/sae/info/me")).await {
            return;
        }
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not come up");
}

/// Waits until sae-a can get `count` keys for `slave` (30 s at most).
async fn wait_for_keys(master: &Client, a: &str, slave: &str, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = format!("{a}/api/v1/keys/{slave}/status");
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

/// Who the load asks keys for, and which KME each round kills.
struct Scenario {
    slave: &'static str,
    slave_kme: &'static str,
    /// The victim of round `n`.
    victim: fn(u64) -> &'static str,
}

/// sae-a at kme-a for sae-b at its neighbour kme-b; the kills alternate between them.
const NEIGHBOURS: Scenario = Scenario {
    slave: "sae-b",
    slave_kme: "kme-b",
    victim: |round| if round % 2 == 1 { "kme-b" } else { "kme-a" },
};

#[actix::test]
async fn kill_9_at_any_moment_loses_and_repeats_nothing() {
    kill_9_rounds(LinkOptions::default(), 6, NEIGHBOURS).await;
}

/// On BB84 links the kills land in the middle of frames (the pools drain under the load, so
/// frames run all the time): no frame may leave the two ends with different blocks.
#[actix::test]
async fn kill_9_in_the_middle_of_bb84_frames_never_mismatches() {
    kill_9_rounds(LinkOptions::bb84(""), 6, NEIGHBOURS).await;
}

/// Relayed keys (sae-a at kme-a for sae-c at kme-c, through kme-b), and every round kills the
/// relaying node kme-b mid-relay.
#[actix::test]
async fn kill_9_of_the_relaying_node_loses_and_repeats_nothing() {
    let relayed = Scenario {
        slave: "sae-c",
        slave_kme: "kme-c",
        victim: |_| "kme-b",
    };
    kill_9_rounds(LinkOptions::default(), 3, relayed).await;
}

/// Keys delivered before the kill of each round, at least.
const BEFORE_KILL: u32 = 20;

/// What the load of one round saw.
#[derive(Default)]
struct Round {
    killed: Cell<bool>,
    /// Requests answered 200 before the kill.
    before: Cell<u32>,
    /// Requests sent before the kill that failed (503 or no answer): the kill cut them.
    cut: Cell<u32>,
    /// Requests in flight when the kill came.
    in_flight: Cell<u32>,
    in_flight_at_kill: Cell<u32>,
}

/// One worker of the load: enc_keys until the kill cut one of its requests (or 4000 requests,
/// or 120 s: BB84 keys come slowly on a busy machine). 503 is what a KME answers when its pool is empty or its peer is down; any other
/// non-200 is a failure of the test.
async fn load(master: Client, a: String, slave: &str, round: Rc<Round>) -> Vec<(String, String)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    for _ in 0..4000 {
        if Instant::now() > deadline {
            break;
        }
        let sent_before_kill = !round.killed.get();
        round.in_flight.set(round.in_flight.get() + 1);
        let answer = master
            .inner_post(
                &format!("{a}/api/v1/keys/{slave}/enc_keys"),
                &json!({"number": 2}),
            )
            .await;
        round.in_flight.set(round.in_flight.get() - 1);
        match answer {
            Some((200, body)) => {
                got.extend(keys(&body));
                if !round.killed.get() {
                    round.before.set(round.before.get() + 1);
                }
            }
            Some((503, _)) | None => {
                if round.killed.get() {
                    if sent_before_kill {
                        round.cut.set(round.cut.get() + 1);
                    }
                    break;
                }
                assert!(answer.is_some(), "no answer from {a} before the kill");
                // Empty pool: give production a moment.
                actix_web::rt::time::sleep(Duration::from_millis(10)).await;
            }
            Some((code, body)) => panic!("enc_keys answered {code}: {body}"),
        }
    }
    got
}

/// kme-a's view of the BB84 link: (frames_ok, frames_aborted), and how many frames it
/// discarded because kme-b had lost them (`key_frame_discarded`).
async fn frames_at_a(setup: &Setup, master: &Client) -> (u64, u64, usize) {
    let url = format!("{}/api/v1/keys/sae-b/status", setup.sae_url("kme-a"));
    let (code, status) = master.get(&url).await;
    assert_eq!(code, 200, "{status}");
    let qkd = &status["status_extension"]["link"]["qkd"];
    let discarded = db_probe::audit_events(setup.path(), "kme-a", "key_frame_discarded");
    (
        qkd["frames_ok"].as_u64().unwrap(),
        qkd["frames_aborted"].as_u64().unwrap(),
        discarded.len(),
    )
}

async fn kill_9_rounds(options: LinkOptions, rounds: u64, scenario: Scenario) {
    let bb84 = options.bb84.is_some();
    let setup = Setup::for_processes(&options);
    let master = Client::new(setup.path(), Some("sae-a"));
    let slave = Client::new(setup.path(), Some(scenario.slave));
    let (a, b) = (setup.sae_url("kme-a"), setup.sae_url(scenario.slave_kme));
    // The KMEs the keys cross: kme-a and kme-b, and kme-c for relayed keys.
    let kmes: Vec<&'static str> = KMES
        .into_iter()
        .filter(|k| *k != "kme-c" || scenario.slave_kme == "kme-c")
        .collect();
    let mut processes: HashMap<&'static str, Process> =
        kmes.iter().map(|k| (*k, spawn(&setup, k))).collect();
    for kme in &kmes {
        let own_sae = kme.replace("kme-", "sae-");
        wait_up(
            &Client::new(setup.path(), Some(&own_sae)),
            &setup.sae_url(kme),
        )
        .await;
    }

    let mut delivered: Vec<(String, String)> = Vec::new();
    // A round counts when its kill cut a request; one whose in-flight requests all had their
    // answers on the way (a rare timing) is run again, at most `rounds` extra times.
    let (mut round_no, mut attempts) = (0, 0);
    while round_no < rounds {
        attempts += 1;
        assert!(
            attempts <= 2 * rounds,
            "{attempts} rounds, {round_no} with a request cut"
        );
        wait_for_keys(&master, &a, scenario.slave, 16).await;
        let victim = (scenario.victim)(round_no);
        // Load from 8 concurrent masters, and a kill -9 in the middle of it: once the load
        // has had its successes, while its requests are in flight.
        let round = Rc::new(Round::default());
        let workers =
            (0..8).map(|_| load(master.clone(), a.clone(), scenario.slave, round.clone()));
        let killer = async {
            // A bound on the wait, not a speed check: BB84 keys come slowly on a busy machine.
            let deadline = Instant::now() + Duration::from_secs(120);
            while round.before.get() < BEFORE_KILL {
                assert!(
                    Instant::now() < deadline,
                    "round {round_no}: only {} keys before the kill",
                    round.before.get()
                );
                actix_web::rt::time::sleep(Duration::from_millis(2)).await;
            }
            // And while requests are in flight (an empty pool answers 503 at once, and the
            // load then pauses for a moment).
            while round.in_flight.get() == 0 {
                assert!(
                    Instant::now() < deadline,
                    "round {round_no}: no request in flight"
                );
                actix_web::rt::time::sleep(Duration::from_micros(200)).await;
            }
            let process = processes.get_mut(victim).unwrap();
            round.in_flight_at_kill.set(round.in_flight.get());
            process.child.kill().unwrap(); // SIGKILL
            round.killed.set(true);
            process.child.wait().unwrap();
        };
        let (results, ()) = futures_util::join!(futures_util::future::join_all(workers), killer);
        delivered.extend(results.into_iter().flatten());
        assert!(
            round.in_flight_at_kill.get() > 0,
            "round {round_no}: no request in flight at the kill"
        );
        processes.insert(victim, spawn(&setup, victim));
        wait_up(&master, &a).await;
        wait_up(&slave, &b).await;
        if round.cut.get() > 0 {
            round_no += 1;
        } else {
            println!("round {round_no}: the kill cut no request; running it again");
        }
    }
    let mut kme_b = processes.remove("kme-b").unwrap();
    if bb84 {
        // And one kill of kme-b that surely lands in a frame: just after kme-a started one
        // (its window is burned once kme-b accepted the Start), while its post-processing,
        // hundreds of round trips, runs.
        let started = || db_probe::audit_events(setup.path(), "kme-a", "bb84_frame_started").len();
        let count = started();
        let deadline = Instant::now() + Duration::from_secs(30);
        while started() == count {
            assert!(Instant::now() < deadline, "no BB84 frame started");
            // Take keys, so that the pools want more.
            let (code, body) = enc(&master, &a, "sae-b", json!({"number": 16})).await;
            match code {
                200 => delivered.extend(keys(&body)),
                503 => actix_web::rt::time::sleep(Duration::from_millis(2)).await,
                _ => panic!("enc_keys answered {code}: {body}"),
            }
        }
        let before = frames_at_a(&setup, &master).await;
        kme_b.child.kill().unwrap(); // SIGKILL
        kme_b.child.wait().unwrap();
        kme_b = spawn(&setup, "kme-b");
        wait_up(&slave, &b).await;
        // Once kme-a has a good frame after the restart, the frame the kill cut has been
        // aborted there, or discarded when kme-b, restarted, had lost it.
        let (ok, aborted, discarded) = before;
        let deadline = Instant::now() + Duration::from_secs(60);
        let after = loop {
            let now = frames_at_a(&setup, &master).await;
            if now.0 > ok {
                break now;
            }
            assert!(Instant::now() < deadline, "no BB84 frame after the restart");
            let (code, body) = enc(&master, &a, "sae-b", json!({"number": 16})).await;
            match code {
                200 => delivered.extend(keys(&body)),
                503 => actix_web::rt::time::sleep(Duration::from_millis(20)).await,
                _ => panic!("enc_keys answered {code}: {body}"),
            }
        };
        assert!(
            after.1 > aborted || after.2 > discarded,
            "the kill of kme-b in a frame cut no frame: before {before:?}, after {after:?}"
        );
    }
    // And some keys after the last restart.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut after = 0;
    while after < 10 {
        let (code, body) = enc(&master, &a, scenario.slave, json!({"number": 1})).await;
        match code {
            200 => {
                delivered.extend(keys(&body));
                after += 1;
            }
            // The pool refilling, or the peer link reconnecting.
            503 => actix_web::rt::time::sleep(Duration::from_millis(10)).await,
            _ => panic!("enc_keys after the restarts answered {code}: {body}"),
        }
        assert!(Instant::now() < deadline, "pools did not resume");
    }
    let min = rounds as usize * 2 * BEFORE_KILL as usize + 10;
    assert!(
        delivered.len() >= min,
        "{} keys delivered, fewer than {min}",
        delivered.len()
    );
    let ids: HashSet<_> = delivered.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids.len(), delivered.len(), "a key_ID was delivered twice");
    // No 16 bytes of key material twice, at any offset: keys cut from overlapping positions
    // share a window.
    let mut windows = HashSet::new();
    for (id, key) in &delivered {
        let key = base64::engine::general_purpose::STANDARD
            .decode(key)
            .unwrap();
        for window in key.windows(16) {
            assert!(
                windows.insert(window.to_vec()),
                "key {id} repeats 16 bytes of key material"
            );
        }
    }
    for chunk in delivered.chunks(64) {
        let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
        let (code, body) = dec(&slave, &b, "sae-a", &ids).await;
        assert_eq!(code, 200, "a delivered key is not retrievable: {body}");
        assert_eq!(keys(&body), chunk.to_vec());
    }
    if scenario.slave_kme == "kme-c" {
        assert_relays_settled(&setup).await;
    }
    // The audit trails of all, killed again, verify (what `kme audit verify` does).
    drop(kme_b);
    drop(processes);
    for kme in kmes {
        audit_verify(&setup, kme);
    }
}

/// After kills of the relaying node: every relay cut mid-way is burned at kme-c once its hold
/// time passes (nothing stays held), and the only keys left at kme-c once the delivered ones
/// are retrieved are those of relays whose release reached kme-c while kme-a, its answer
/// lost, aborted them (the window the relay module describes): never more.
async fn assert_relays_settled(setup: &Setup) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while db_probe::count(setup.path(), "kme-c", "held_keys") > 0 {
        assert!(Instant::now() < deadline, "held keys were never burned");
        actix_web::rt::time::sleep(Duration::from_millis(200)).await;
    }
    let left = db_probe::count(setup.path(), "kme-c", "keys");
    let unreached = db_probe::audit_events(setup.path(), "kme-a", "relay_aborted")
        .iter()
        .filter(|a| a["reached_all"] == false)
        .count() as i64;
    assert!(
        left <= 2 * unreached,
        "{left} keys at kme-c that no master received, {unreached} aborts that did not reach it"
    );
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
    // Restored with the usual mode of a new file: refused until only the KME's user may
    // read it.
    std::fs::write(&key, original).unwrap();
    let readable = std::fs::Permissions::from_mode(0o644);
    std::fs::set_permissions(&key, readable).unwrap();
    let err = start()
        .err()
        .expect("a master key others may read must not be used");
    assert!(err.to_string().contains("chmod 600"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    start().expect("the right key starts again").stop();
    // What a KME creates is its user's only.
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let data = net.setup.path().join("data/kme-a");
    assert_eq!(mode(&data), 0o700, "data directory");
    assert_eq!(mode(&data.join("kme.sqlite")), 0o600, "database");
}

/// SIGTERM (what `make stop` sends) under load: kme-a stops taking requests, answers those in
/// flight, closes its audit trail and exits 0 within its grace time; every key it answered
/// 200 for is retrievable at kme-b.
#[actix::test]
async fn sigterm_under_load_keeps_every_acknowledged_key_and_exits_0_in_time() {
    let setup = Setup::for_processes(&LinkOptions::default());
    let mut kme_a = spawn(&setup, "kme-a");
    let _kme_b = spawn(&setup, "kme-b");
    let master = Client::new(setup.path(), Some("sae-a"));
    let slave = Client::new(setup.path(), Some("sae-b"));
    let (a, b) = (setup.sae_url("kme-a"), setup.sae_url("kme-b"));
    wait_up(&master, &a).await;
    wait_up(&slave, &b).await;
    wait_for_keys(&master, &a, "sae-b", 64).await;

    let answered = Rc::new(Cell::new(0u32));
    let worker = |answered: Rc<Cell<u32>>| {
        let (master, url) = (master.clone(), format!("{a}/api/v1/keys/sae-b/enc_keys"));
        async move {
            let mut got = Vec::new();
            // Until kme-a stops answering (bounded: 2000 requests).
            for _ in 0..2000 {
                match master.inner_post(&url, &json!({"number": 2})).await {
                    Some((200, body)) => {
                        got.extend(keys(&body));
                        answered.set(answered.get() + 1);
                    }
                    Some((503, _)) => actix_web::rt::time::sleep(Duration::from_millis(5)).await,
                    Some((code, body)) => panic!("enc_keys answered {code}: {body}"),
                    None => break,
                }
            }
            got
        }
    };
    let workers = (0..8).map(|_| worker(answered.clone()));
    let terminate = async {
        let deadline = Instant::now() + Duration::from_secs(60);
        while answered.get() < 40 {
            assert!(Instant::now() < deadline, "no load before the SIGTERM");
            actix_web::rt::time::sleep(Duration::from_millis(2)).await;
        }
        let pid = kme_a.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        let signalled = Instant::now();
        // The grace time is 10 s by default; the requests in flight take milliseconds.
        loop {
            if let Some(status) = kme_a.child.try_wait().unwrap() {
                break (status, signalled.elapsed());
            }
            assert!(
                signalled.elapsed() < Duration::from_secs(15),
                "kme-a did not exit"
            );
            actix_web::rt::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (results, (status, took)) =
        futures_util::join!(futures_util::future::join_all(workers), terminate);
    assert!(
        status.success(),
        "kme-a exited with {status:?} after {took:?}"
    );
    let delivered: Vec<(String, String)> = results.into_iter().flatten().collect();
    assert!(delivered.len() >= 80);
    for chunk in delivered.chunks(128) {
        let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
        let (code, body) = dec(&slave, &b, "sae-a", &ids).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(keys(&body), chunk, "an acknowledged key was lost");
    }
    let stopped = db_probe::audit_events(setup.path(), "kme-a", "kme_stopped");
    assert_eq!(stopped.len(), 1, "the audit trail is closed");
    audit_verify(&setup, "kme-a");
}

/// `kme master-key rotate`: refused while the KME runs (its data directory is locked); with
/// the KME stopped, every key waiting at it is re-sealed under a new key file, which opens
/// them after the restart (the old one no longer does), and the audit trail still verifies.
#[actix::test]
async fn a_master_key_rotation_keeps_every_key_and_waits_for_the_kme_to_stop() {
    let mut net = super::harness::Net::start(LinkOptions::default());
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 4).await;
    let (code, body) = enc(
        &net.client(Some("sae-a")),
        &net.url("kme-a"),
        "sae-b",
        serde_json::json!({"number": 2}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let sent = keys(&body);
    let rotate = |net: &super::harness::Net| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kme"))
            .args(["master-key", "rotate", "--config"])
            .arg(net.setup.config_file())
            .args(["--kme", "kme-b"])
            .output()
            .unwrap()
    };
    let data = net.setup.path().join("data/kme-b");
    let running = kme::node::lock_data_dir(&data).unwrap();
    let refused = rotate(&net);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("running"),
        "{said}"
    );
    drop(running);

    net.stop("kme-b");
    let old_key = std::fs::read(data.join("master.key")).unwrap();
    let rotated = rotate(&net);
    let said = String::from_utf8_lossy(&rotated.stdout);
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    assert!(said.contains("2 keys"), "{said}");
    assert_ne!(std::fs::read(data.join("master.key")).unwrap(), old_key);
    net.restart_on_new_ports("kme-b");
    let ids: Vec<&str> = sent.iter().map(|(id, _)| id.as_str()).collect();
    let (code, body) = dec(&net.client(Some("sae-b")), &net.url("kme-b"), "sae-a", &ids).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        keys(&body),
        sent,
        "the same keys, opened with the new master key"
    );
    audit_verify(&net.setup, "kme-b");
}

/// An SAE and its KME.
type Homed = (&'static str, &'static str);

/// The four directions of keys over kme-a — kme-b — kme-c: (master, slave).
const BOTH_WAYS_ON_BOTH_LINKS: [(Homed, Homed); 4] = [
    (("sae-a", "kme-a"), ("sae-b", "kme-b")),
    (("sae-b", "kme-b"), ("sae-a", "kme-a")),
    (("sae-b", "kme-b"), ("sae-c", "kme-c")),
    (("sae-c", "kme-c"), ("sae-b", "kme-b")),
];

/// A KME restored from a backup numbers its link key blocks behind its neighbours (kme-b
/// answers the link a — b and drives b — c): the first shipment either way is refused as out
/// of step, both ends of each link realign above both (audited at both), and keys flow again
/// on both links — the same at master and slave, from new blocks that both ends store, with
/// no position bound twice. A key that waited at kme-b when the backup was taken and was
/// retrieved after it is not served again: `kme restored` forgets the waiting keys first.
#[actix::test]
async fn a_kme_restored_from_a_backup_realigns_its_links_and_reuses_nothing() {
    let options = LinkOptions::default();
    let mut net = Net::start(options.clone());
    let dir = net.setup.path().to_path_buf();
    let config = net.setup.config_file();
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 256).await;
    net.wait_for_keys("sae-b", "kme-b", "sae-c", 256).await;
    let (code, body) = enc(
        &net.client(Some("sae-a")),
        &net.url("kme-a"),
        "sae-b",
        json!({}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let waiting = keys(&body);
    let backup = dir.join("kme-b-backup.sqlite");
    db_probe::tamper(
        &dir,
        "kme-b",
        &format!("VACUUM INTO '{}'", backup.display()),
    );
    let (code, _) = net.dec_sent(("sae-b", "kme-b"), "sae-a", &waiting).await;
    assert_eq!(code, 200);
    keys_until_past(&net, stream_numbers(&dir)).await;
    let before_restore = stream_numbers(&dir);

    net.restart_all_after(&options, || {
        let db = dir.join("data/kme-b/kme.sqlite");
        for stale in ["kme.sqlite-wal", "kme.sqlite-shm"] {
            let _ = std::fs::remove_file(dir.join("data/kme-b").join(stale));
        }
        std::fs::copy(&backup, &db).unwrap();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).unwrap();
        let restored = kme_restored(&config, "kme-b");
        let said = String::from_utf8_lossy(&restored.stdout);
        assert!(
            restored.status.success() && said.contains("1 waiting keys"),
            "{said}{}",
            String::from_utf8_lossy(&restored.stderr)
        );
    });
    let (code, body) = net.dec_sent(("sae-b", "kme-b"), "sae-a", &waiting).await;
    assert_eq!(
        code, 400,
        "a key retrieved after the backup, served again: {body}"
    );
    let restored = db_probe::audit_events(&dir, "kme-b", "database_restored");
    assert_eq!(restored.len(), 1, "{restored:?}");
    assert_eq!(restored[0]["keys_forgotten"], 1);
    assert!(restored[0]["previous_head"]["id"].is_i64(), "{restored:?}");
    for (master, slave) in BOTH_WAYS_ON_BOTH_LINKS {
        // Positions bound after the backup are refused once (the slave's high mark), which
        // moves the master past them: a 503, then keys.
        let deadline = Instant::now() + Duration::from_secs(60);
        let sent = loop {
            let (code, body) = enc(
                &net.client(Some(master.0)),
                &net.url(master.1),
                slave.0,
                json!({"number": 8}),
            )
            .await;
            if code == 200 {
                break keys(&body);
            }
            assert_eq!(code, 503, "{body}");
            assert!(Instant::now() < deadline, "{master:?} -> {slave:?}: {body}");
            actix_rt::time::sleep(Duration::from_millis(50)).await;
        };
        let (code, body) = net.dec_sent(slave, master.0, &sent).await;
        assert_eq!((code, keys(&body)), (200, sent), "{master:?} -> {slave:?}");
    }
    // New blocks at both ends of both links, numbered above what either end had.
    let highest = before_restore.map(|_| *before_restore.iter().max().unwrap());
    keys_until_past(&net, highest).await;
    for (kme, peer) in [
        ("kme-a", "kme-b"),
        ("kme-b", "kme-a"),
        ("kme-b", "kme-c"),
        ("kme-c", "kme-b"),
    ] {
        let realigned = db_probe::audit_events(&dir, kme, "link_realigned");
        assert!(
            realigned.iter().any(|r| r["peer"] == peer),
            "{kme} did not realign its link to {peer}: {realigned:?}"
        );
    }
    super::relay::assert_no_position_used_twice(&net, &["kme-a", "kme-c"]);
    audit_verify(&net.setup, "kme-b");
}

/// Each key stream of both links, as (KME, peer, owner), at both ends.
const KEY_STREAMS: [(&str, &str, &str); 8] = [
    ("kme-a", "kme-b", "kme-a"),
    ("kme-a", "kme-b", "kme-b"),
    ("kme-c", "kme-b", "kme-b"),
    ("kme-c", "kme-b", "kme-c"),
    ("kme-b", "kme-a", "kme-a"),
    ("kme-b", "kme-a", "kme-b"),
    ("kme-b", "kme-c", "kme-b"),
    ("kme-b", "kme-c", "kme-c"),
];

/// The next block number of each of `KEY_STREAMS`.
fn stream_numbers(dir: &std::path::Path) -> [u64; 8] {
    KEY_STREAMS.map(|(kme, peer, owner)| db_probe::next_seq(dir, kme, peer, owner))
}

/// Key pairs every way until every key stream has at least two blocks numbered from `past`
/// on (60 s at most).
async fn keys_until_past(net: &Net, past: [u64; 8]) {
    let dir = net.setup.path();
    let deadline = Instant::now() + Duration::from_secs(60);
    while stream_numbers(dir)
        .iter()
        .zip(&past)
        .any(|(now, then)| *now < then + 2)
    {
        assert!(
            Instant::now() < deadline,
            "{:?}, not past {past:?}",
            stream_numbers(dir)
        );
        for (master, slave) in BOTH_WAYS_ON_BOTH_LINKS {
            net.wait_for_keys(master.0, master.1, slave.0, 128).await;
            net.key_pair(master, slave, 128).await;
        }
    }
}
