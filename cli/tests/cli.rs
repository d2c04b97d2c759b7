//! The `mts` binary end to end: real ingress and egress services, real
//! Tarantool and a real S3 server.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use mts_client::Client;
use mts_proto::service_names::{EGRESS, INGRESS};
use mts_testkit::{self as testing, LossyProxy, Running};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

struct Services {
    ingress: Running,
    egress: Running,
}

async fn services_with(config: mts_config::Config) -> Services {
    Services {
        ingress: Running::start(INGRESS, config.clone(), mts_ingress::run).await,
        egress: Running::start(EGRESS, config, mts_egress::run).await,
    }
}

async fn services() -> Services {
    services_with(testing::config()).await
}

impl Services {
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("MTS_INGRESS", self.ingress.endpoint()),
            ("MTS_EGRESS", self.egress.endpoint()),
        ]
    }

    async fn client(&self) -> Client {
        Client::connect(self.ingress.endpoint(), self.egress.endpoint())
            .await
            .unwrap()
    }
}

fn command(env: &[(&'static str, String)], args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_mts"));
    command
        .args(args)
        .env_remove("MTS_TOKEN")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn run_with(env: &[(&'static str, String)], args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = command(env, args).spawn().expect("run mts");
    let mut input = child.stdin.take().unwrap();
    if let Some(data) = stdin {
        input.write_all(data).await.unwrap();
    }
    drop(input);
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("mts finished within 60 s")
        .unwrap()
}

async fn mts(services: &Services, args: &[&str]) -> Output {
    run_with(&services.env(), args, None).await
}

/// `mts` that must succeed; its standard output.
async fn ok(services: &Services, args: &[&str]) -> String {
    let output = mts(services, args).await;
    assert!(output.status.success(), "mts {args:?}: {}", text(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `mts --json` that must succeed; its output as JSON.
async fn ok_json(services: &Services, args: &[&str]) -> Value {
    let args: Vec<&str> = std::iter::once("--json")
        .chain(args.iter().copied())
        .collect();
    let out = ok(services, &args).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out:?} is not JSON: {e}"))
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mts-cli-{}", testing::unique_subject("t")));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn content(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn sha256_of(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

async fn ack_floor(client: &Client, subject: &str, durable: &str) -> u64 {
    client
        .consumer_info(subject, durable)
        .await
        .unwrap()
        .ack_floor
}

#[tokio::test(flavor = "multi_thread")]
async fn files_go_in_and_come_out_verified_under_their_names() {
    let services = services().await;
    let client = services.client().await;
    let subject = testing::unique_subject("cli");
    let dir = scratch();
    let big = dir.join("report.bin");
    std::fs::write(&big, content(20 * 1024 * 1024)).unwrap();

    let published = ok(
        &services,
        &["pub", &subject, big.to_str().unwrap(), "-H", "kind=file"],
    )
    .await;
    assert!(published.contains("sequence=1 "), "{published}");
    assert!(
        published.contains(&format!("sha256={}", sha256_of(&big))),
        "{published}"
    );
    let piped = run_with(
        &services.env(),
        &["pub", &subject, "-", "--name", "../../escape.txt"],
        Some(b"hello from stdin\n"),
    )
    .await;
    assert!(piped.status.success(), "{}", text(&piped));
    let data = ok_json(&services, &["pub", &subject, "--data", "small"]).await;
    assert_eq!(data["sequence"], 3);

    // The folder does not exist yet: it is made.
    let out = dir.join("received").join("deeper");
    let received = ok(
        &services,
        &[
            "sub",
            &subject,
            "files",
            "--out",
            out.to_str().unwrap(),
            "--count",
            "3",
        ],
    )
    .await;
    assert_eq!(
        names(&out),
        ["3", "escape.txt", "report.bin"],
        "names as published, kept inside the folder; no partial files left: {received}"
    );
    assert_eq!(sha256_of(&out.join("report.bin")), sha256_of(&big));
    assert_eq!(
        std::fs::read(out.join("escape.txt")).unwrap(),
        b"hello from stdin\n"
    );
    assert_eq!(
        ack_floor(&client, &subject, "files").await,
        3,
        "acked once saved"
    );

    // Another message under a name already taken keeps both.
    let second = dir.join("second").join("report.bin");
    std::fs::create_dir_all(second.parent().unwrap()).unwrap();
    std::fs::write(&second, b"second report").unwrap();
    ok(&services, &["pub", &subject, second.to_str().unwrap()]).await;
    ok(
        &services,
        &["fetch", &subject, "files", "--out", out.to_str().unwrap()],
    )
    .await;
    assert_eq!(
        std::fs::read(out.join("report-4.bin")).unwrap(),
        b"second report"
    );
    assert_eq!(sha256_of(&out.join("report.bin")), sha256_of(&big));

    // Without --out: what is printed whole is acked, a large payload is not.
    let listing = ok(&services, &["fetch", &subject, "readers"]).await;
    assert!(
        listing.contains("kind=file") && listing.contains("not acknowledged"),
        "{listing}"
    );
    assert!(listing.contains("hello from stdin"), "{listing}");
    assert_eq!(
        ack_floor(&client, &subject, "readers").await,
        0,
        "the 20 MiB payload was neither printed nor acked"
    );
    let again = ok(&services, &["fetch", &subject, "readers", "--batch", "1"]).await;
    assert!(
        again.contains("sequence=1 ") && again.contains("delivery_count=2"),
        "given back at once, not after its lease: {again}"
    );

    let lines = ok(
        &services,
        &[
            "--json",
            "fetch",
            &subject,
            "json-readers",
            "--batch",
            "3",
            "--no-ack",
        ],
    )
    .await;
    let first: Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert_eq!(first["outcome"], "not printed");
    assert_eq!(first["headers"]["file-name"], "report.bin");

    assert_eq!(ok(&services, &["last", &subject]).await.trim(), "4");
    assert_eq!(
        ok_json(&services, &["last", &subject]).await["last_sequence"],
        4
    );

    let once = ok(
        &services,
        &["pub", &subject, "--data", "x", "--message-id", "m-1"],
    )
    .await;
    let twice = ok(
        &services,
        &["pub", &subject, "--data", "x", "--message-id", "m-1"],
    )
    .await;
    assert!(once.contains("duplicate=false"), "{once}");
    assert!(
        twice.contains("sequence=5 ") && twice.contains("duplicate=true"),
        "{twice}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn consumers_and_subjects_are_administered() {
    let services = services().await;
    let subject = testing::unique_subject("cli-admin");
    for i in 0..4 {
        ok(&services, &["pub", &subject, "--data", &format!("m{i}")]).await;
    }
    let added = ok_json(
        &services,
        &[
            "consumer",
            "add",
            &subject,
            "work",
            "--ack-wait",
            "5m",
            "--max-deliver",
            "3",
            "--no-dead-letter",
        ],
    )
    .await;
    assert_eq!(added["config"]["ack_wait_ms"], 300_000);
    assert_eq!(added["config"]["dead_letter_subject"], "");
    assert_eq!(added["num_pending"], 4);
    let human = ok(
        &services,
        &["consumer", "add", &subject, "later", "--deliver", "new"],
    )
    .await;
    assert!(human.starts_with("created later"), "{human}");

    let listed = ok_json(&services, &["consumer", "ls", &subject]).await;
    let durables: Vec<_> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["durable_name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(durables, ["later", "work"]);
    let table = ok(&services, &["consumer", "ls", &subject]).await;
    assert!(
        table.starts_with("SUBJECT") && table.contains("work"),
        "{table}"
    );

    let moved = ok_json(&services, &["consumer", "seek", &subject, "work", "3"]).await;
    assert_eq!(
        (moved["ack_floor"].as_u64(), moved["num_pending"].as_u64()),
        (Some(2), Some(2))
    );
    let info = ok(&services, &["consumer", "info", &subject, "work"]).await;
    assert!(info.contains("ack_floor: 2"), "{info}");
    ok(&services, &["consumer", "rm", &subject, "later"]).await;
    let gone = mts(&services, &["consumer", "info", &subject, "later"]).await;
    assert_eq!(gone.status.code(), Some(3), "{}", text(&gone));

    let subjects = ok_json(&services, &["subject", "ls", &subject]).await;
    assert_eq!(subjects[0]["subject"], subject.as_str());
    assert_eq!(subjects[0]["messages"], 4);
    let limited = ok_json(
        &services,
        &[
            "subject",
            "limits",
            &subject,
            "--max-age",
            "7d",
            "--discard",
            "old",
        ],
    )
    .await;
    assert_eq!(limited["limits"]["max_age_ms"], 7 * 86_400_000u64);
    assert_eq!(limited["limits"]["discard"], "old");
    let purged = ok_json(&services, &["subject", "purge", &subject, "--through", "1"]).await;
    assert_eq!(purged["purged"], 1);
    let info = ok_json(&services, &["subject", "info", &subject]).await;
    assert_eq!(
        (info["first_sequence"].as_u64(), info["messages"].as_u64()),
        (Some(2), Some(3))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_have_documented_exit_codes() {
    let services = services().await;
    let client = services.client().await;
    let refused = mts(&services, &["last", "not a subject"]).await;
    assert_eq!(refused.status.code(), Some(4), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("whitespace"),
        "{}",
        text(&refused)
    );
    let missing = mts(&services, &["pub", "s", "/nonexistent/file"]).await;
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing));
    let usage = mts(&services, &["pub"]).await;
    assert_eq!(usage.status.code(), Some(2), "{}", text(&usage));
    let no_scheme = mts(&services, &["--egress", "127.0.0.1:50052", "last", "s"]).await;
    assert_eq!(no_scheme.status.code(), Some(2), "{}", text(&no_scheme));
    let no_ca = mts(
        &services,
        &["--ca-file", "/nonexistent/ca.pem", "last", "s"],
    )
    .await;
    assert_eq!(no_ca.status.code(), Some(2), "{}", text(&no_ca));

    let port = testing::free_port();
    let nowhere = format!("http://127.0.0.1:{port}");
    let unreachable = mts(
        &services,
        &["--egress", &nowhere, "--tries", "2", "last", "s"],
    )
    .await;
    assert_eq!(unreachable.status.code(), Some(5), "{}", text(&unreachable));
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert!(stderr.contains("refused"), "{}", text(&unreachable));
    assert_eq!(
        stderr.matches("refused").count(),
        1,
        "each cause once: {stderr}"
    );

    // A save that fails acks nothing: the message is there for the next try.
    let subject = testing::unique_subject("cli-unsaved");
    ok(&services, &["pub", &subject, "--data", "keep me"]).await;
    let dir = scratch();
    let blocked = dir.join("a-file");
    std::fs::write(&blocked, b"not a folder").unwrap();
    let failed = mts(
        &services,
        &[
            "sub",
            &subject,
            "d",
            "--out",
            blocked.to_str().unwrap(),
            "--count",
            "1",
        ],
    )
    .await;
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed));
    assert_eq!(ack_floor(&client, &subject, "d").await, 0, "not acked");
    let saved = ok(
        &services,
        &[
            "fetch",
            &subject,
            "d",
            "--out",
            dir.join("ok").to_str().unwrap(),
        ],
    )
    .await;
    // Delivered again at once, not after the 30 s lease: it was given back.
    assert!(saved.contains("delivery_count=2"), "{saved}");
    assert_eq!(ack_floor(&client, &subject, "d").await, 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_and_tls() {
    let testing::Pki { ca, server, client } = testing::pki("cli");
    let dir = scratch();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let ca_file = write("ca.pem", &ca);
    let mut config = testing::config();
    config.tls.cert_file = write("server.pem", &server.0);
    config.tls.key_file = write("server.key", &server.1);
    config.tls.client_ca_file = ca_file.clone();
    config.auth.enabled = true;
    config.auth.require_auth = true;
    config.auth.jwt_issuer = "tests".into();
    config.auth.jwt_secret = "a secret long enough for HS256 signing!".into();
    let trusting = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca))
        .identity(tonic::transport::Identity::from_pem(&client.0, &client.1))
        .domain_name("localhost");
    let ingress = Running::start_over(
        INGRESS,
        config.clone(),
        mts_ingress::run,
        Some(trusting.clone()),
    )
    .await;
    let egress = Running::start_over(EGRESS, config, mts_egress::run, Some(trusting)).await;
    let subject = testing::unique_subject("cli-tls");
    let minted = run_with(
        &[],
        &[
            "token",
            "--issuer",
            "tests",
            "--client-id",
            "cli",
            "--subject",
            "test.>",
            "--permission",
            "*",
            "--secret",
            "a secret long enough for HS256 signing!",
        ],
        None,
    )
    .await;
    assert!(minted.status.success(), "{}", text(&minted));
    let token = String::from_utf8_lossy(&minted.stdout).trim().to_owned();
    let token_file = write("token", &token);
    let env = vec![
        (
            "MTS_INGRESS",
            format!("https://localhost:{}", ingress.addr.port()),
        ),
        (
            "MTS_EGRESS",
            format!("https://localhost:{}", egress.addr.port()),
        ),
        ("MTS_CA_FILE", ca_file),
        ("MTS_CERT_FILE", write("me.pem", &client.0)),
        ("MTS_KEY_FILE", write("me.key", &client.1)),
    ];
    let with_token: Vec<_> = env
        .iter()
        .cloned()
        .chain([("MTS_TOKEN_FILE", token_file)])
        .collect();
    let published = run_with(&with_token, &["pub", &subject, "--data", "over tls"], None).await;
    assert!(published.status.success(), "{}", text(&published));
    let last = run_with(&with_token, &["last", &subject], None).await;
    assert_eq!(
        String::from_utf8_lossy(&last.stdout).trim(),
        "1",
        "{}",
        text(&last)
    );

    let anonymous = run_with(&env, &["--tries", "1", "last", &subject], None).await;
    assert_eq!(anonymous.status.code(), Some(7), "{}", text(&anonymous));
    let plaintext: Vec<_> = with_token
        .iter()
        .filter(|(k, _)| *k != "MTS_CA_FILE")
        .cloned()
        .collect();
    let untrusted = run_with(&plaintext, &["--tries", "1", "last", &subject], None).await;
    assert_eq!(
        untrusted.status.code(),
        Some(5),
        "a server the system does not trust: {}",
        text(&untrusted)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_goes_on_across_an_egress_restart() {
    let config = testing::config();
    let services = services_with(config.clone()).await;
    let client = services.client().await;
    let subject = testing::unique_subject("cli-restart");
    let dir = scratch();
    let env = services.env();
    let follower = command(
        &env,
        &[
            "sub",
            &subject,
            "d",
            "--out",
            dir.to_str().unwrap(),
            "--count",
            "2",
        ],
    )
    .spawn()
    .unwrap();
    ok(&services, &["pub", &subject, "--data", "one"]).await;
    testing::eventually("the first saved and acked", || async {
        dir.join("1").exists() && ack_floor(&client, &subject, "d").await == 1
    })
    .await;

    let Services { ingress, egress } = services;
    let addr = egress.addr;
    egress.stop().await.unwrap();
    let _egress = Running::start_at(addr, EGRESS, config, mts_egress::run).await;
    client
        .publish(mts_client::Message::new(&subject, "two"))
        .await
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(60), follower.wait_with_output())
        .await
        .expect("the subscriber finished")
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(std::fs::read(dir.join("2")).unwrap(), b"two");
    assert_eq!(ack_floor(&client, &subject, "d").await, 2);
    drop(ingress);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_download_resumes() {
    let services = services().await;
    let proxy = LossyProxy::start(services.egress.addr.to_string()).await;
    let subject = testing::unique_subject("cli-resume");
    let dir = scratch();
    let source = dir.join("source.bin");
    let bytes = content(32 * 1024 * 1024);
    std::fs::write(&source, &bytes).unwrap();
    ok(&services, &["pub", &subject, source.to_str().unwrap()]).await;

    let env = vec![
        ("MTS_INGRESS", services.ingress.endpoint()),
        ("MTS_EGRESS", format!("http://{}", proxy.address())),
    ];
    let target = dir.join("copy.bin");
    let args = [
        "--tries",
        "1",
        "payload",
        "get",
        &subject,
        "1",
        "--out",
        target.to_str().unwrap(),
    ];
    proxy.cut_replies_after(8 * 1024 * 1024);
    let cut = run_with(&env, &args, None).await;
    assert_eq!(cut.status.code(), Some(5), "the link broke: {}", text(&cut));
    assert!(!target.exists());
    let partial: Vec<_> = names(&dir)
        .into_iter()
        .filter(|n| n.ends_with(".part"))
        .collect();
    assert_eq!(partial.len(), 1, "{partial:?}");

    let again = run_with(
        &env,
        &args[2..]
            .iter()
            .copied()
            .chain(["--json"])
            .collect::<Vec<_>>(),
        None,
    )
    .await;
    assert!(again.status.success(), "{}", text(&again));
    let said: Value = serde_json::from_slice(&again.stdout).unwrap();
    let resumed = said["resumed_from"].as_u64().unwrap();
    assert!(
        resumed > 1024 * 1024 && resumed <= 8 * 1024 * 1024,
        "{said}"
    );
    assert_eq!(sha256_of(&target), sha256_of(&source));
    assert_eq!(
        names(&dir),
        ["copy.bin", "source.bin"],
        "no partial file left"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_payloads_are_not_printed_and_nothing_is_purged_by_mistake() {
    let services = services().await;
    let client = services.client().await;
    let subject = testing::unique_subject("cli-binary");
    let binary = [0xffu8, 0xfe, 0x1b, b'[', b'2', b'J', 0];
    let published = run_with(&services.env(), &["pub", &subject, "-"], Some(&binary)).await;
    assert!(published.status.success(), "{}", text(&published));

    let listing = ok(&services, &["fetch", &subject, "d"]).await;
    assert!(listing.contains("not printed"), "{listing}");
    assert!(!listing.contains('\u{1b}'), "no raw bytes reach a terminal");
    assert_eq!(ack_floor(&client, &subject, "d").await, 0);
    // In JSON any bytes go, in base64: printed whole, so acked.
    let json = ok(&services, &["--json", "fetch", &subject, "d"]).await;
    let line: Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(line["data"]["base64"], "//4bWzJKAA==");
    assert_eq!(line["outcome"], "printed");
    assert_eq!(ack_floor(&client, &subject, "d").await, 1);

    let zero = mts(&services, &["subject", "purge", &subject, "--through", "0"]).await;
    assert_eq!(zero.status.code(), Some(2), "{}", text(&zero));
    assert_eq!(client.subject_info(&subject).await.unwrap().messages, 1);
}
