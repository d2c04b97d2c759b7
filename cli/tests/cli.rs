//! The `mts` binary end to end: files published and received through real
//! ingress and egress services, real Tarantool and a real S3 server.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use mts_proto::pb::ConsumerRequest;
use mts_proto::pb::egress_service_client::EgressServiceClient;
use mts_proto::service_names::{EGRESS, INGRESS};
use mts_testkit::{self as testing, Running};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

struct Services {
    ingress: Running,
    egress: Running,
}

async fn services() -> Services {
    let config = testing::config();
    Services {
        ingress: Running::start(INGRESS, config.clone(), mts_ingress::run).await,
        egress: Running::start(EGRESS, config, mts_egress::run).await,
    }
}

async fn mts(services: &Services, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_mts"));
    command
        .args(args)
        .env("MTS_INGRESS", services.ingress.endpoint())
        .env("MTS_EGRESS", services.egress.endpoint())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().expect("run mts");
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

fn sha256_of(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

#[tokio::test(flavor = "multi_thread")]
async fn files_go_in_and_come_out_verified() {
    let services = services().await;
    let subject = testing::unique_subject("cli");
    let dir = scratch();
    let big = dir.join("big.bin");
    let content: Vec<u8> = (0..20 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&big, &content).unwrap();

    let published = mts(
        &services,
        &[
            "publish",
            "--subject",
            &subject,
            "--header",
            "kind=file",
            big.to_str().unwrap(),
        ],
        None,
    )
    .await;
    assert!(published.status.success(), "{}", text(&published));
    let stdout = String::from_utf8_lossy(&published.stdout);
    assert!(stdout.contains("sequence=1 "), "{stdout}");
    assert!(
        stdout.contains(&format!("sha256={}", sha256_of(&big))),
        "{stdout}"
    );

    let piped = mts(
        &services,
        &["publish", "--subject", &subject, "-"],
        Some(b"hello from stdin\n"),
    )
    .await;
    assert!(piped.status.success(), "{}", text(&piped));
    assert!(String::from_utf8_lossy(&piped.stdout).contains("sequence=2 "));

    let out = dir.join("received");
    std::fs::create_dir_all(&out).unwrap();
    let received = mts(
        &services,
        &[
            "subscribe",
            "--subject",
            &subject,
            "--durable",
            "files",
            "--out",
            out.to_str().unwrap(),
            "--count",
            "2",
        ],
        None,
    )
    .await;
    assert!(received.status.success(), "{}", text(&received));
    assert_eq!(
        sha256_of(&out.join("1")),
        sha256_of(&big),
        "the 20 MiB file arrived intact"
    );
    assert_eq!(std::fs::read(out.join("2")).unwrap(), b"hello from stdin\n");
    assert!(!out.join("1.part").exists());

    // Both were acknowledged after they were written.
    let mut egress = EgressServiceClient::connect(services.egress.endpoint())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info = egress
            .get_consumer_info(ConsumerRequest {
                subject: subject.clone(),
                durable_name: "files".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if info.ack_floor == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not acknowledged: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let fetched = mts(
        &services,
        &["fetch", "--subject", &subject, "--durable", "readers"],
        None,
    )
    .await;
    assert!(fetched.status.success(), "{}", text(&fetched));
    let listing = String::from_utf8_lossy(&fetched.stdout);
    assert!(
        listing.contains("kind=file") && listing.contains("payload not printed"),
        "{listing}"
    );
    assert!(listing.contains("hello from stdin"), "{listing}");

    let last = mts(&services, &["last", "--subject", &subject], None).await;
    assert_eq!(String::from_utf8_lossy(&last.stdout).trim(), "2");

    let once = mts(
        &services,
        &["publish", "--subject", &subject, "--message-id", "m-1", "-"],
        Some(b"x"),
    )
    .await;
    let twice = mts(
        &services,
        &["publish", "--subject", &subject, "--message-id", "m-1", "-"],
        Some(b"x"),
    )
    .await;
    assert!(
        String::from_utf8_lossy(&once.stdout).contains("duplicate=false"),
        "{}",
        text(&once)
    );
    assert!(
        String::from_utf8_lossy(&twice.stdout).contains("sequence=3 size=0"),
        "{}",
        text(&twice)
    );
    assert!(
        String::from_utf8_lossy(&twice.stdout).contains("duplicate=true"),
        "{}",
        text(&twice)
    );
    std::fs::remove_dir_all(&dir).unwrap();
    services.ingress.stop().await.unwrap();
    services.egress.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_have_documented_exit_codes() {
    let services = services().await;
    let refused = mts(&services, &["last", "--subject", "not a subject"], None).await;
    assert_eq!(refused.status.code(), Some(4), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("whitespace"),
        "{}",
        text(&refused)
    );

    let missing = mts(
        &services,
        &["publish", "--subject", "s", "/nonexistent/file"],
        None,
    )
    .await;
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing));

    let usage = mts(&services, &["publish", "file-without-subject"], None).await;
    assert_eq!(usage.status.code(), Some(2), "{}", text(&usage));

    let port = testing::free_port();
    let unreachable = mts(
        &services,
        &[
            "--egress",
            &format!("http://127.0.0.1:{port}"),
            "last",
            "--subject",
            "s",
        ],
        None,
    )
    .await;
    assert_eq!(unreachable.status.code(), Some(5), "{}", text(&unreachable));
    assert!(
        String::from_utf8_lossy(&unreachable.stderr).contains("refused"),
        "{}",
        text(&unreachable)
    );
    services.ingress.stop().await.unwrap();
    services.egress.stop().await.unwrap();
}
