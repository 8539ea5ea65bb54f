//! BB84 frames over a faulty classical channel: kme-b's `peer_url` sends the KME-to-KME traffic
//! of kme-a (and kme-c) to a TLS man in the middle, which holds kme-b's certificate and key and
//! forwards every request to kme-b's real listener with the caller's own client certificate.
//! On command it drops or corrupts one BB84 post-processing message in the middle of a frame.
//! Each time, the frame is discarded at both ends, no SAE ever gets mismatched keys, and the link
//! recovers by itself.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use kme::tls::{self, PeerIdentity};
use kme_actors::peer::protocol::SOURCE_PATH;
use kme_actors::types::CertIdentity;
use serde_json::Value;

use super::db_probe;
use super::harness::{LinkOptions, Net};

/// One fault, fired once at the first message it fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// kme-a's second Cascade answer of a frame never reaches kme-b (kme-a gets a 502).
    DropCascadeAnswer,
    /// kme-b gets that message and answers; the answer never reaches kme-a (a 502 instead).
    DropReplyToCascadeAnswer,
    /// One parity bit of kme-a's second Cascade answer flips. Cascade messages carry no tag of
    /// their own: the next tag of each end covers them.
    FlipCascadeParity,
    /// One of the test (Z-basis) bits of kme-a's Disclosure (a tagged envelope) flips.
    FlipDisclosure,
    /// The privacy-amplification seed of kme-b's Verify (a tagged envelope, in kme-b's answer
    /// at the end of Cascade) flips one bit.
    FlipVerifySeed,
    /// kme-a's `Commit` of a frame's blocks never reaches kme-b (kme-a gets a 502).
    DropCommit,
    /// kme-b stores the committed blocks and answers; the answer never reaches kme-a.
    DropCommitReply,
    /// The blocks named by kme-a's `Commit` of a frame (two or more) are reversed on the way:
    /// the same key bytes under other owners and numbers at kme-b.
    ReverseCommit,
    /// kme-b's answer that carries its final `Confirm` never reaches kme-a: kme-b has the key,
    /// kme-a gives the frame up.
    DropConfirm,
}

/// A message of kme-a's BB84 source, as the proxy saw it go to kme-b.
#[derive(Debug, Clone)]
enum Seen {
    Start { frame: u64, window: u64 },
    Commit(CommitSeen),
    Other,
}

/// A `Commit` of kme-a: the frame (None: a commit retried after a restart of kme-a), the
/// blocks it names, and kme-b's answer (None: it never reached kme-b).
#[derive(Debug, Clone, PartialEq, Eq)]
struct CommitSeen {
    frame: Option<u64>,
    blocks: Vec<(String, u64)>,
    status: Option<u16>,
}

/// What the proxy does next; shared with the test.
#[derive(Default)]
struct Plan {
    armed: Option<Fault>,
    /// Faults done, with the frame each hit.
    fired: Vec<(Fault, u64)>,
    /// The frame kme-a runs now, and its Cascade answers seen so far.
    frame: Option<u64>,
    cascade_answers: u32,
    /// Starts kme-b took (answered without naming another window): (frame, window), in order.
    started: Vec<(u64, u64)>,
    /// Every commit of kme-a, in order.
    commits: Vec<CommitSeen>,
    /// While set, every commit is dropped (kme-a gets a 502).
    hold_commits: bool,
}

/// What to do with one request.
enum Action {
    Forward,
    /// Forward it; whatever kme-b answers is not passed on.
    DropReply,
    /// Do not forward it.
    Drop,
}

fn bodies(step: &Value) -> Vec<String> {
    step["envelopes"]
        .as_array()
        .map(|envelopes| {
            envelopes
                .iter()
                .filter_map(|e| match &e["body"] {
                    Value::Object(body) => body.keys().next().cloned(),
                    Value::String(unit) => Some(unit.clone()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The body of the first of `envelopes` that is a `kind` message.
fn envelope_body<'a>(envelopes: &'a mut Value, kind: &str) -> Option<&'a mut Value> {
    envelopes
        .as_array_mut()?
        .iter_mut()
        .find_map(|e| e["body"].get_mut(kind))
}

/// Flips the lowest bit of a u64 field.
fn flip(value: &mut Value) {
    let n = value.as_u64().expect("a u64 field");
    *value = Value::from(n ^ 1);
}

/// Flips the first bit of a non-empty bit vector (`{"words": [...], "len": n}`, n > 0).
fn flip_bitvec(bits: &mut Value) -> bool {
    if bits["len"].as_u64().unwrap_or(0) == 0 {
        return false;
    }
    flip(&mut bits["words"][0]);
    true
}

impl Plan {
    /// A BB84 message from kme-a on its way to kme-b: note where the frame stands, apply the
    /// armed fault if this is its message (the body is rewritten, still valid JSON).
    fn on_request(&mut self, body: &mut Vec<u8>) -> (Action, Seen) {
        let Ok(mut message) = serde_json::from_slice::<Value>(body) else {
            return (Action::Forward, Seen::Other);
        };
        if let Some(frame) = message["start"]["frame_id"].as_u64() {
            self.frame = Some(frame);
            self.cascade_answers = 0;
            let window = message["start"]["window"].as_u64().unwrap();
            return (Action::Forward, Seen::Start { frame, window });
        }
        if let Some(commit) = message.get_mut("commit") {
            let blocks = commit["blocks"].as_array_mut().unwrap();
            let reverse = self.armed == Some(Fault::ReverseCommit)
                && !self.hold_commits
                && blocks.len() >= 2
                && commit["frame_id"].is_u64();
            if reverse {
                commit["blocks"].as_array_mut().unwrap().reverse();
                *body = serde_json::to_vec(&message).unwrap();
            }
            let commit = &message["commit"];
            let seen = CommitSeen {
                frame: commit["frame_id"].as_u64(),
                blocks: commit["blocks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| {
                        let owner = b["owner"].as_str().unwrap().to_string();
                        (owner, b["seq"].as_u64().unwrap())
                    })
                    .collect(),
                status: None,
            };
            if reverse {
                self.fire(seen.frame.unwrap_or_default());
            }
            let action = match self.armed {
                _ if self.hold_commits => Action::Drop,
                Some(Fault::DropCommit) => Action::Drop,
                Some(Fault::DropCommitReply) => Action::DropReply,
                _ => return (Action::Forward, Seen::Commit(seen)),
            };
            if !self.hold_commits {
                self.fire(seen.frame.unwrap_or_default());
            }
            if let Action::Drop = action {
                self.commits.push(seen.clone());
            }
            return (action, Seen::Commit(seen));
        }
        let action = self.on_step(&mut message, body);
        (action, Seen::Other)
    }

    /// A post-processing message of kme-a (see `on_request`).
    fn on_step(&mut self, message: &mut Value, body: &mut Vec<u8>) -> Action {
        let Some(frame) = message["step"]["frame_id"].as_u64() else {
            return Action::Forward;
        };
        if self.frame != Some(frame) {
            return Action::Forward;
        }
        let kinds = bodies(&message["step"]);
        if kinds.iter().any(|k| k == "CascadeReply") {
            self.cascade_answers += 1;
        }
        let second_cascade_answer =
            self.cascade_answers == 2 && kinds.iter().any(|k| k == "CascadeReply");
        let action = match self.armed {
            Some(Fault::DropCascadeAnswer) if second_cascade_answer => Action::Drop,
            Some(Fault::DropReplyToCascadeAnswer) if second_cascade_answer => Action::DropReply,
            Some(Fault::FlipCascadeParity) if second_cascade_answer => {
                let answer = envelope_body(&mut message["step"]["envelopes"], "CascadeReply")
                    .expect("a Cascade answer");
                let flipped = flip_bitvec(&mut answer["parities"])
                    || answer["block_parities"]
                        .as_array_mut()
                        .is_some_and(|all| all.iter_mut().any(flip_bitvec));
                if !flipped {
                    // Nothing to flip in this one (no parities): wait for the next frame.
                    return Action::Forward;
                }
                *body = serde_json::to_vec(&*message).unwrap();
                Action::Forward
            }
            Some(Fault::FlipDisclosure) if kinds.iter().any(|k| k == "Disclosure") => {
                let disclosure = envelope_body(&mut message["step"]["envelopes"], "Disclosure")
                    .expect("a Disclosure");
                flip_bitvec(&mut disclosure["z_bits"]);
                *body = serde_json::to_vec(&*message).unwrap();
                Action::Forward
            }
            _ => return Action::Forward,
        };
        self.fire(frame);
        action
    }

    /// kme-b's answer (`status`, `body`) to the BB84 message `seen` of kme-a, on its way back:
    /// noted, and rewritten if the armed fault says so. Returns whether to drop it.
    fn on_reply(&mut self, seen: Seen, status: u16, body: &mut Vec<u8>) -> bool {
        let Ok(mut answer) = serde_json::from_slice::<Value>(body) else {
            return false;
        };
        match seen {
            Seen::Start { frame, window } => {
                if status == 200 && answer["next_window"].is_null() {
                    self.started.push((frame, window));
                }
            }
            Seen::Commit(commit) => self.commits.push(CommitSeen {
                status: Some(status),
                ..commit
            }),
            Seen::Other => {}
        }
        let frame = self.frame.unwrap_or_default();
        match self.armed {
            Some(Fault::DropConfirm) if bodies(&answer).iter().any(|b| b == "Confirm") => {
                self.fire(frame);
                true
            }
            Some(Fault::FlipVerifySeed) => {
                let Some(verify) = envelope_body(&mut answer["envelopes"], "Verify") else {
                    return false;
                };
                flip_bitvec(&mut verify["pa_seed"]);
                *body = serde_json::to_vec(&answer).unwrap();
                self.fire(frame);
                false
            }
            _ => false,
        }
    }

    fn fire(&mut self, frame: u64) {
        if let Some(fault) = self.armed.take() {
            self.fired.push((fault, frame));
        }
    }
}

struct ProxyState {
    /// Clients to kme-b's real listener, one per neighbour of kme-b, with its certificate.
    clients: HashMap<String, awc::Client>,
    /// kme-b's real peer listener (it moves when kme-b restarts).
    target: Arc<Mutex<String>>,
    plan: Arc<Mutex<Plan>>,
}

fn bad_gateway() -> HttpResponse {
    HttpResponse::BadGateway().finish()
}

async fn forward(req: HttpRequest, body: web::Bytes, state: web::Data<ProxyState>) -> HttpResponse {
    let Some(PeerIdentity::Verified(CertIdentity { cn: Some(cn), .. })) =
        req.conn_data::<PeerIdentity>().cloned()
    else {
        return HttpResponse::Forbidden().finish();
    };
    let Some(client) = state.clients.get(&cn) else {
        return HttpResponse::Forbidden().finish();
    };
    let path = req.uri().path().to_string();
    let bb84 = path == SOURCE_PATH && cn == "kme-a";
    let mut body = body.to_vec();
    let (action, seen) = if bb84 {
        state.plan.lock().unwrap().on_request(&mut body)
    } else {
        (Action::Forward, Seen::Other)
    };
    if let Action::Drop = action {
        return bad_gateway();
    }
    let target = state.target.lock().unwrap().clone();
    let mut request = client.request(req.method().clone(), format!("{target}{path}"));
    if let Some(content_type) = req.headers().get("content-type") {
        request = request.insert_header(("content-type", content_type.clone()));
    }
    let Ok(mut response) = request.send_body(body).await else {
        return bad_gateway();
    };
    let Ok(answer) = response.body().limit(256 * 1024 * 1024).await else {
        return bad_gateway();
    };
    let mut answer = answer.to_vec();
    let status = response.status().as_u16();
    let drop = bb84
        && state
            .plan
            .lock()
            .unwrap()
            .on_reply(seen, status, &mut answer);
    if drop || matches!(action, Action::DropReply) {
        return bad_gateway();
    }
    let mut reply = HttpResponse::build(response.status());
    if let Some(content_type) = response.headers().get("content-type") {
        reply.insert_header(("content-type", content_type.clone()));
    }
    reply.body(answer)
}

/// The man in the middle in front of kme-b's peer listener.
struct Proxy {
    plan: Arc<Mutex<Plan>>,
    target: Arc<Mutex<String>>,
    server: ServerHandle,
}

impl Proxy {
    /// Serves on `listener` as kme-b (certificates in `dir`), forwarding to `target`.
    fn start(listener: TcpListener, dir: &Path, target: String) -> Proxy {
        let plan = Arc::new(Mutex::new(Plan::default()));
        let target = Arc::new(Mutex::new(target));
        let to = target.clone();
        let acceptor = tls::peer_acceptor(
            &dir.join("ca.crt"),
            &dir.join("kme-b.crt"),
            &dir.join("kme-b.key"),
        )
        .unwrap();
        let dir: PathBuf = dir.to_path_buf();
        let shared = plan.clone();
        let server = HttpServer::new(move || {
            let clients = ["kme-a", "kme-c"]
                .into_iter()
                .map(|kme| {
                    let connector = tls::peer_connector(
                        &dir.join("ca.crt"),
                        &dir.join(format!("{kme}.crt")),
                        &dir.join(format!("{kme}.key")),
                        "kme-b",
                        Default::default(),
                    )
                    .unwrap();
                    let client = tls::https_client(connector, 8, Duration::from_secs(10));
                    (kme.to_string(), client)
                })
                .collect();
            App::new()
                .app_data(web::Data::new(ProxyState {
                    clients,
                    target: to.clone(),
                    plan: shared.clone(),
                }))
                .app_data(web::PayloadConfig::new(256 * 1024 * 1024))
                .default_service(web::to(forward))
        })
        .on_connect(|conn, ext| {
            ext.insert(tls::identify(conn));
        })
        .workers(1)
        .listen_openssl(listener, acceptor)
        .unwrap()
        .run();
        let handle = server.handle();
        actix_web::rt::spawn(server);
        Proxy {
            plan,
            target,
            server: handle,
        }
    }

    fn arm(&self, fault: Fault) {
        self.plan.lock().unwrap().armed = Some(fault);
    }

    fn retarget(&self, target: String) {
        *self.target.lock().unwrap() = target;
    }

    fn hold_commits(&self, hold: bool) {
        self.plan.lock().unwrap().hold_commits = hold;
    }

    fn commits(&self) -> Vec<CommitSeen> {
        self.plan.lock().unwrap().commits.clone()
    }

    fn started(&self) -> Vec<(u64, u64)> {
        self.plan.lock().unwrap().started.clone()
    }

    fn fired(&self, fault: Fault) -> Option<u64> {
        let plan = self.plan.lock().unwrap();
        plan.fired
            .iter()
            .find(|(f, _)| *f == fault)
            .map(|(_, id)| *id)
    }
}

fn qkd(status: &Value) -> &Value {
    &status["status_extension"]["link"]["qkd"]
}

fn count(status: &Value, key: &str) -> u64 {
    qkd(status)[key].as_u64().unwrap()
}

/// Takes every key that the pools of the link a — b held when `a` and `b` (kme-a's and kme-b's
/// status) were read — pools hand keys out oldest first, so these include every key of the
/// frames before — in both directions, each checked identical at the other end.
async fn every_key_matches(net: &Net, a: &Value, b: &Value) {
    let stored = |s: &Value| s["stored_key_count"].as_u64().unwrap();
    // Pools emptied by the keys taken meanwhile: the next frames' keys (all made after the
    // recovery too) are the ones to compare.
    let (a, b) = if stored(a) + stored(b) > 0 {
        (a.clone(), b.clone())
    } else {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (a, b) = net.link_ends().await;
            if stored(&a) + stored(&b) > 0 {
                break (a, b);
            }
            assert!(Instant::now() < deadline, "no key to compare:\n{a}\n{b}");
            actix_web::rt::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (a, b) = (&a, &b);
    for ((master, slave), status) in [
        ((("sae-a", "kme-a"), ("sae-b", "kme-b")), a),
        ((("sae-b", "kme-b"), ("sae-a", "kme-a")), b),
    ] {
        let mut left = stored(status);
        while left > 0 {
            let number = left.min(128);
            net.key_pair(master, slave, number as u32).await;
            left -= number;
        }
    }
}

/// Waits for good frames at both ends after `a0`, `b0` (kme-a's and kme-b's status after a
/// fault), the link up at both ends, then compares every key the pools hold then.
async fn recovers(net: &Net, what: &str, a0: &Value, b0: &Value) {
    let (a, b) = net
        .until_link(&format!("good frames after {what}"), |a, b| {
            count(a, "frames_ok") > count(a0, "frames_ok")
                && count(b, "frames_ok") > count(b0, "frames_ok")
                && a["status_extension"]["link"]["state"] == "up"
                && b["status_extension"]["link"]["state"] == "up"
        })
        .await;
    every_key_matches(net, &a, &b).await;
}

/// Fires `fault` in the next frame and checks what users rely on: the frame is discarded at
/// both ends (for one of the reasons given for kme-a and for kme-b), and the link goes on
/// producing identical keys at both ends, in both directions.
async fn survive(net: &Net, proxy: &Proxy, fault: Fault, at_a: &[&str], at_b: &[&str]) {
    let (a0, b0) = net.link_ends().await;
    proxy.arm(fault);
    net.until_link(&format!("{fault:?}"), |_, _| proxy.fired(fault).is_some())
        .await;
    let frame = proxy.fired(fault).unwrap();
    let matches = |status: &Value, reasons: &[&str]| {
        let last = qkd(status)["last_abort"].as_str().unwrap_or("");
        reasons.iter().any(|r| last.contains(r))
    };
    let (a1, b1) = net
        .until_link(
            &format!("{fault:?} (frame {frame}) discarded at both ends"),
            |a, b| {
                count(a, "frames_aborted") > count(&a0, "frames_aborted")
                    && count(b, "frames_aborted") > count(&b0, "frames_aborted")
            },
        )
        .await;
    assert!(matches(&a1, at_a), "{fault:?}: kme-a {}", qkd(&a1));
    assert!(matches(&b1, at_b), "{fault:?}: kme-b {}", qkd(&b1));
    // The link recovers by itself: new frames at both ends, and every key made up to then
    // matches, those of the new frames included.
    recovers(net, &format!("{fault:?}"), &a1, &b1).await;
    // Its window was used up: no frame after it had it again.
    windows_never_serve_twice(proxy, &[frame]);
    // No key from the discarded frame.
    assert!(
        proxy.commits().iter().all(|c| c.frame != Some(frame)),
        "{fault:?}: the discarded frame {frame} was committed"
    );
}

/// Every window kme-b took for a frame (its Start answered), in order, is new: an aborted
/// frame's window is used up too, no pad ever serves twice.
fn windows_never_serve_twice(proxy: &Proxy, aborted: &[u64]) {
    let started = proxy.started();
    for pair in started.windows(2) {
        assert!(
            pair[1].1 > pair[0].1,
            "authentication window used again: {started:?}"
        );
    }
    for frame in aborted {
        let at = started.iter().position(|(f, _)| f == frame);
        let at = at.unwrap_or_else(|| panic!("aborted frame {frame} not started: {started:?}"));
        assert!(
            at + 1 < started.len(),
            "no frame after the aborted frame {frame}: {started:?}"
        );
    }
}

/// The network with kme-b's peer listener behind the man in the middle, with good frames
/// and matching keys through it.
async fn network_behind_proxy() -> (Net, Proxy) {
    let proxy_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_url = format!(
        "https://127.0.0.1:{}",
        proxy_listener.local_addr().unwrap().port()
    );
    let net = Net::start(LinkOptions {
        peer_urls: vec![("kme-b", proxy_url)],
        ..LinkOptions::bb84("")
    });
    let target = format!("https://127.0.0.1:{}", net.setup.ports["kme-b"].1);
    let proxy = Proxy::start(proxy_listener, net.setup.path(), target);
    net.until_link("good frames through the proxy", |a, b| {
        count(a, "frames_ok") >= 2 && count(b, "frames_ok") >= 2
    })
    .await;
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 8).await;
    net.key_pair(("sae-a", "kme-a"), ("sae-b", "kme-b"), 8)
        .await;
    (net, proxy)
}

#[actix::test]
async fn a_dropped_or_corrupted_bb84_message_discards_the_frame_at_both_ends() {
    let (net, proxy) = network_behind_proxy().await;

    // A lost message: the Alice end (kme-a) gives the frame up and sends a tagged abort
    // notice; kme-b finds the gap in the sequence, or takes the notice.
    let lost = ["message exchange failed"];
    survive(
        &net,
        &proxy,
        Fault::DropCascadeAnswer,
        &lost,
        &["out of sequence"],
    )
    .await;
    survive(
        &net,
        &proxy,
        Fault::DropReplyToCascadeAnswer,
        &lost,
        &["timeout"],
    )
    .await;
    // Corrupted messages: the Wegman–Carter tags (or the verification hash, which the tags
    // protect) catch them before any key is released.
    let caught = [
        "authentication failed",
        "verification hash mismatch",
        "cascade failed",
    ];
    survive(&net, &proxy, Fault::FlipCascadeParity, &caught, &caught).await;
    let auth = ["authentication failed"];
    survive(&net, &proxy, Fault::FlipDisclosure, &auth, &auth).await;
    survive(&net, &proxy, Fault::FlipVerifySeed, &auth, &auth).await;
    proxy.server.stop(true).await;
}

/// Every commit of `frame`, in order.
fn commits_of(proxy: &Proxy, frame: u64) -> Vec<CommitSeen> {
    proxy
        .commits()
        .into_iter()
        .filter(|c| c.frame == Some(frame))
        .collect()
}

/// Fires `fault` at the next commit and waits until kme-a's commit of that frame, sent again,
/// is stored at kme-b; returns the frame, its commits, and both ends' status then.
async fn until_commit_retried(
    net: &Net,
    proxy: &Proxy,
    fault: Fault,
) -> (u64, Vec<CommitSeen>, (Value, Value)) {
    proxy.arm(fault);
    net.until_link(&format!("{fault:?}"), |_, _| proxy.fired(fault).is_some())
        .await;
    let frame = proxy.fired(fault).unwrap();
    let ends = net
        .until_link(&format!("{fault:?}: the commit retried"), |_, _| {
            commits_of(proxy, frame)
                .iter()
                .skip(1)
                .any(|c| c.status == Some(200))
        })
        .await;
    (frame, commits_of(proxy, frame), ends)
}

/// A commit lost on its way or on its way back is sent again, with the same numbers, and
/// kme-b stores (or has stored) the frame's key: no frame is lost, nothing is discarded.
async fn a_lost_commit_is_retried(net: &Net, proxy: &Proxy, fault: Fault) {
    let (frame, commits, (a, b)) = until_commit_retried(net, proxy, fault).await;
    assert!(
        commits.iter().all(|c| c.blocks == commits[0].blocks),
        "{fault:?}: a retried commit names other blocks: {commits:?}"
    );
    let discarded = db_probe::audit_events(net.setup.path(), "kme-a", "key_frame_discarded");
    assert!(
        discarded.is_empty(),
        "{fault:?}: frame {frame} discarded: {discarded:?}"
    );
    every_key_matches(net, &a, &b).await;
}

/// A commit whose blocks were renumbered on the channel (here: their order reversed) is
/// refused by kme-b, whose copy of the frame's authentication window says the tag does not
/// verify; kme-a's genuine commit, sent again, is stored, and every key matches.
async fn a_renumbered_commit_is_refused(net: &Net, proxy: &Proxy) {
    let (_, commits, (a, b)) = until_commit_retried(net, proxy, Fault::ReverseCommit).await;
    let (reversed, stored) = (&commits[0], commits.last().unwrap());
    assert!(
        reversed.status.is_some_and(|s| (400..500).contains(&s)),
        "the reversed commit was taken: {commits:?}"
    );
    let mut original = reversed.blocks.clone();
    original.reverse();
    assert_eq!(stored.blocks, original, "{commits:?}");
    every_key_matches(net, &a, &b).await;
}

#[actix::test]
async fn a_lost_or_renumbered_commit_or_a_lost_final_confirm_never_mismatches_and_a_lost_frame_frees_its_numbers(
) {
    let (mut net, proxy) = network_behind_proxy().await;
    a_lost_commit_is_retried(&net, &proxy, Fault::DropCommit).await;
    a_lost_commit_is_retried(&net, &proxy, Fault::DropCommitReply).await;
    a_renumbered_commit_is_refused(&net, &proxy).await;

    // The final Confirm lost: kme-b counted the frame as good and holds its key, kme-a gave it
    // up. Only a Commit delivers key, and it never comes for that frame.
    let (a0, _) = net.link_ends().await;
    proxy.arm(Fault::DropConfirm);
    let (a1, b1) = net
        .until_link("the final Confirm lost", |a, _| {
            proxy.fired(Fault::DropConfirm).is_some()
                && count(a, "frames_aborted") > count(&a0, "frames_aborted")
        })
        .await;
    let frame = proxy.fired(Fault::DropConfirm).unwrap();
    let last = qkd(&a1)["last_abort"].as_str().unwrap_or("");
    assert!(last.contains("message exchange failed"), "{a1}");
    recovers(&net, "the lost Confirm", &a1, &b1).await;
    assert!(
        proxy.commits().iter().all(|c| c.frame != Some(frame)),
        "the frame {frame} of the lost Confirm was committed"
    );

    // kme-b restarts between the end of a frame and its commit, so it lost its copy: kme-a's
    // commit, held up meanwhile, is answered `frame_lost`; kme-a discards the blocks (audited)
    // and numbers the next frames' blocks from the same numbers.
    proxy.hold_commits(true);
    net.until_link("a commit held up", |_, _| {
        !proxy.commits().is_empty() && proxy.commits().last().unwrap().status.is_none()
    })
    .await;
    let lost = proxy.commits().last().unwrap().clone();
    let frame = lost.frame.unwrap();
    net.restart_on_new_ports("kme-b");
    proxy.retarget(format!("https://127.0.0.1:{}", net.setup.ports["kme-b"].1));
    let b0 = net.link_ends().await.1;
    proxy.hold_commits(false);
    let dir = net.setup.path().to_path_buf();
    let discarded = || {
        db_probe::audit_events(&dir, "kme-a", "key_frame_discarded")
            .into_iter()
            .find(|d| d["frame_id"] == frame)
    };
    net.until_link("the lost frame discarded", |_, _| discarded().is_some())
        .await;
    assert_eq!(
        discarded().unwrap()["blocks"],
        lost.blocks.len(),
        "{lost:?}"
    );
    assert!(
        proxy
            .commits()
            .iter()
            .any(|c| c.frame == Some(frame) && c.status == Some(410)),
        "no frame_lost answer: {:?}",
        proxy.commits()
    );
    // The first number of each stream the lost frame took is taken again by a later frame.
    let mut firsts: Vec<(String, u64)> = Vec::new();
    for (owner, seq) in &lost.blocks {
        match firsts.iter_mut().find(|(o, _)| o == owner) {
            Some((_, first)) => *first = (*first).min(*seq),
            None => firsts.push((owner.clone(), *seq)),
        }
    }
    let reused = |first: &(String, u64)| {
        proxy
            .commits()
            .iter()
            .any(|c| c.frame != Some(frame) && c.status == Some(200) && c.blocks.contains(first))
    };
    let (a2, b2) = net
        .until_link("the lost frame's numbers used again", |_, b| {
            firsts.iter().all(reused) && count(b, "frames_ok") > count(&b0, "frames_ok")
        })
        .await;
    every_key_matches(&net, &a2, &b2).await;

    proxy.server.stop(true).await;
}
