//! `kme sae`, the SAE client of scripts and the README's quick start, against a running
//! network: the same keys at both ends, and an exit code per kind of answer.

use std::path::Path;

use serde_json::Value;

use super::harness::{keys, LinkOptions, Net};

/// Runs `kme sae <identity> <args>`; returns its exit code and the JSON it printed.
fn kme_sae(identity: &[&str], args: &[&str]) -> (i32, Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kme"))
        .arg("sae")
        .args(identity)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let answer = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap(), answer)
}

#[actix::test]
async fn kme_sae_gets_and_retrieves_keys_and_its_exit_code_tells_the_answer() {
    let net = Net::start(LinkOptions {
        sae_limits: vec![("sae-b2", "requests_per_s = 1")],
        ..LinkOptions::default()
    });
    net.wait_for_keys("sae-a", "kme-a", "sae-b", 16).await;
    let file = net.setup.config_file();
    let config = file.to_str().unwrap();
    let as_sae = |sae: &'static str| ["--config", config, "--sae", sae];

    let (code, sent) = kme_sae(&as_sae("sae-a"), &["enc", "sae-b", "--number", "2"]);
    assert_eq!(code, 0, "{sent}");
    let sent = keys(&sent);
    assert_eq!(sent.len(), 2);
    let ids: Vec<&str> = sent.iter().map(|(id, _)| id.as_str()).collect();
    let dec = [["dec", "sae-a"].as_slice(), &ids].concat();
    let (code, got) = kme_sae(&as_sae("sae-b"), &dec);
    assert_eq!(
        (code, keys(&got)),
        (0, sent.clone()),
        "the same keys at kme-b"
    );
    // Retrieved already: 400.
    let (code, answer) = kme_sae(&as_sae("sae-b"), &dec);
    assert_eq!(code, 2, "{answer}");
    assert!(answer["message"].is_string());
    let (code, me) = kme_sae(&as_sae("sae-b"), &["whoami"]);
    assert_eq!((code, &me["SAE_ID"]), (0, &Value::from("sae-b")));
    // sae-c's certificate at kme-a, where sae-c is not registered: 401.
    let dir: &Path = net.setup.path();
    let pem = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let (cert, key, ca) = (pem("sae-c.crt"), pem("sae-c.key"), pem("ca.crt"));
    let url = net.url("kme-a");
    let explicit = [
        "--cert",
        &cert,
        "--key",
        &key,
        "--ca",
        &ca,
        "--kme-url",
        &url,
    ];
    let (code, answer) = kme_sae(&explicit, &["status", "sae-b"]);
    assert_eq!(code, 3, "{answer}");
    // Over a rate limit: 503; with --retry it waits as Retry-After says, then gets through.
    let (code, answer) = kme_sae(&as_sae("sae-b2"), &["status", "sae-a"]);
    assert_eq!(code, 0, "{answer}");
    let (code, answer) = kme_sae(&as_sae("sae-b2"), &["status", "sae-a"]);
    assert_eq!(code, 4, "{answer}");
    let (code, answer) = kme_sae(&as_sae("sae-b2"), &["--retry", "3", "status", "sae-a"]);
    assert_eq!(code, 0, "{answer}");
    // Not a request at all: 1.
    let (code, _) = kme_sae(&["--sae", "nobody", "--config", config], &["whoami"]);
    assert_eq!(code, 1);
}
