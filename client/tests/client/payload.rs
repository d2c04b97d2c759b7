//! Payloads of any size: up from a file or a reader, down chunk by chunk,
//! resumed and verified.

use std::path::PathBuf;

use mts_client::{Client, Error, Message, Progress};
use mts_proto::service_names::EGRESS;
use mts_testkit::{self as testing, LossyProxy, Running};
use sha2::{Digest, Sha256};

use super::{client_of, services};

/// Bytes that do not repeat in any short period.
fn payload(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(testing::unique_subject(name));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_goes_up_and_comes_back_whole_and_a_download_resumes() {
    let services = services(testing::config()).await;
    let client = client_of(&services).await;
    let subject = testing::unique_subject("client-file");
    let dir = scratch("client-file");
    let content = payload(3 * 1024 * 1024 + 17);
    let source = dir.join("source.bin");
    std::fs::write(&source, &content).unwrap();

    let mut heard = Vec::new();
    let published = client
        .publish_file(Message::new(&subject, "").header("k", "v"), &source, |p| {
            heard.push(p)
        })
        .await
        .unwrap();
    let sha256 = hex::encode(Sha256::digest(&content));
    assert_eq!(published.size, content.len() as u64);
    assert_eq!(published.sha256, sha256);
    let total = Some(content.len() as u64);
    assert_eq!(heard.first(), Some(&Progress { done: 0, total }));
    assert_eq!(
        heard.last(),
        Some(&Progress {
            done: content.len() as u64,
            total
        })
    );

    let mut reader = client.payload(&subject, published.sequence);
    let mut read = Vec::new();
    while let Some(chunk) = reader.chunk().await.unwrap() {
        read.extend_from_slice(&chunk);
    }
    assert!(read == content, "the payload read back is the one sent");
    assert_eq!(reader.sha256(), Some(sha256.as_str()));

    // An earlier download stopped part way: only the rest comes down.
    let target = dir.join("target.bin");
    std::fs::write(&target, &content[..1_500_000]).unwrap();
    let downloaded = client
        .download(&subject, published.sequence, &target, |_| {})
        .await
        .unwrap();
    assert_eq!(downloaded.resumed_from, 1_500_000);
    assert_eq!(downloaded.sha256, sha256);
    assert!(std::fs::read(&target).unwrap() == content);

    // What an earlier try left is not the payload's start: the digest
    // catches it and the file goes.
    let mut wrong = content[..1000].to_vec();
    wrong[10] ^= 1;
    std::fs::write(&target, &wrong).unwrap();
    let err = client
        .download(&subject, published.sequence, &target, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Digest { .. }), "{err}");
    assert!(!target.exists(), "a file with the wrong bytes is removed");

    let streamed = client
        .publish_stream(
            Message::new(&subject, ""),
            &content[..100_000],
            None,
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(streamed.size, 100_000);
    let err = client
        .publish_file(Message::new(&subject, "data"), &source, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    let err = client
        .publish_file(Message::new(&subject, ""), dir.join("missing"), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_resumes_where_the_connection_broke() {
    let services = services(testing::config()).await;
    let egress = Running::start(EGRESS, testing::config(), mts_egress::run).await;
    let proxy = LossyProxy::start(egress.addr.to_string()).await;
    let publisher = client_of(&services).await;
    let client = Client::connect(
        services.ingress.endpoint(),
        format!("http://{}", proxy.address()),
    )
    .await
    .unwrap();
    let subject = testing::unique_subject("client-resume");
    let dir = scratch("client-resume");
    let content = payload(24 * 1024 * 1024);
    let source = dir.join("source.bin");
    std::fs::write(&source, &content).unwrap();
    let published = publisher
        .publish_file(Message::new(&subject, ""), &source, |_| {})
        .await
        .unwrap();

    let mut reader = client.payload(&subject, published.sequence);
    let mut read = reader.chunk().await.unwrap().unwrap().to_vec();
    proxy.sever();
    while let Some(chunk) = reader.chunk().await.unwrap() {
        read.extend_from_slice(&chunk);
    }
    assert!(read == content, "whole and in order");
    assert!(reader.reopened() >= 1, "the connection was cut mid-way");
    std::fs::remove_dir_all(&dir).unwrap();
}
