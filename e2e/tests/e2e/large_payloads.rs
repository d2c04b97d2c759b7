//! A 200 MiB payload streamed in, stored as a multipart object with its size
//! and digest, left out of Fetch for a client that asks, refused (never sent
//! empty) to one that does not, streamed back out and resumed from an offset.
//! Payloads of a few MiB reach old clients whole. (The 1 GiB run, with memory
//! figures, is the benchmark's.)

use std::collections::HashMap;

use bytes::Bytes;
use futures::StreamExt;
use mts_proto::pb::publish_frame::Frame;
use mts_proto::pb::{FetchPayloadRequest, PublishEnd, PublishFrame, PublishHeader};
use mts_storage::object_store::ObjectStore;
use mts_storage::store::Store;
use mts_testkit as testing;
use sha2::{Digest, Sha256};

use crate::system::System;

const MIB: usize = 1024 * 1024;
const BLOCKS: usize = 200;

/// Block `k` of the payload: 1 MiB that differs from every other block.
fn block(base: &[u8], k: usize) -> Bytes {
    let mut data = base.to_vec();
    data[..8].copy_from_slice(&(k as u64).to_be_bytes());
    Bytes::from(data)
}

fn base_block() -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..MIB)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// SHA-256 of the payload from byte `from` on.
fn digest_from(base: &[u8], from: usize) -> String {
    let mut hasher = Sha256::new();
    for k in from / MIB..BLOCKS {
        let data = block(base, k);
        let skip = if k == from / MIB { from % MIB } else { 0 };
        hasher.update(&data[skip..]);
    }
    hex::encode(hasher.finalize())
}

/// Downloads from `offset`, checking that chunks are contiguous; returns the
/// digest of what arrived, its length, and the payload digest the server gave.
async fn download(
    system: &System,
    subject: &str,
    sequence: u64,
    offset: u64,
) -> (String, u64, String) {
    let mut chunks = system
        .subscriber()
        .await
        .fetch_payload(FetchPayloadRequest {
            subject: subject.into(),
            sequence,
            offset,
        })
        .await
        .unwrap()
        .into_inner();
    let (mut hasher, mut at, mut announced) = (Sha256::new(), offset, String::new());
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.unwrap();
        assert_eq!(chunk.offset, at, "contiguous chunks");
        assert!(chunk.data.len() <= MIB, "bounded chunks");
        assert_eq!(chunk.total_size, (BLOCKS * MIB) as u64);
        announced = chunk.sha256;
        hasher.update(&chunk.data);
        at += chunk.data.len() as u64;
    }
    (hex::encode(hasher.finalize()), at - offset, announced)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_mib_round_trip_with_equal_digests() {
    let config = testing::config();
    let system = System::start(config.clone()).await;
    let subject = testing::unique_subject("large");
    let base = base_block();
    let whole = digest_from(&base, 0);

    let frames = futures::stream::iter(
        std::iter::once(Frame::Header(PublishHeader {
            subject: subject.clone(),
            headers: HashMap::from([("file".to_string(), "big.bin".to_string())]),
            total_size: Some((BLOCKS * MIB) as u64),
            message_id: String::new(),
            ordering_key: String::new(),
        }))
        .chain((0..BLOCKS).map({
            let base = base.clone();
            move |k| Frame::Chunk(block(&base, k))
        }))
        .chain(std::iter::once(Frame::End(PublishEnd {
            sha256: whole.clone(),
        })))
        .map(|frame| PublishFrame { frame: Some(frame) }),
    );
    let stored = system
        .publisher()
        .await
        .publish_stream(frames)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (stored.size, stored.sha256.as_str()),
        ((BLOCKS * MIB) as u64, whole.as_str())
    );

    let object_store = ObjectStore::new(&config);
    let (size, etag) = object_store
        .describe(&stored.object_name)
        .await
        .unwrap()
        .expect("the object exists");
    assert_eq!(size, (BLOCKS * MIB) as u64);
    assert!(
        etag.ends_with("-25"),
        "a multipart object of 25 parts of 8 MiB: etag {etag}"
    );
    let metadata = Store::connect(&config)
        .await
        .unwrap()
        .message(&subject, stored.sequence)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (metadata.size, metadata.sha256.as_deref()),
        ((BLOCKS * MIB) as u64, Some(whole.as_str()))
    );

    // A client written before omit_large_payloads: never an empty payload.
    let refused = system
        .try_fetch(&subject, "old-reader", 1, false)
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused
            .message()
            .contains(&format!("{} bytes", BLOCKS * MIB))
            && refused.message().contains("FetchPayload"),
        "{}",
        refused.message()
    );

    let fetched = system.try_fetch(&subject, "reader", 1, true).await.unwrap();
    let message = &fetched[0];
    assert!(
        message.payload_omitted && message.data.is_empty(),
        "too large to deliver inline"
    );
    assert_eq!(
        (message.size, message.sha256.as_str()),
        ((BLOCKS * MIB) as u64, whole.as_str())
    );
    assert_eq!(message.headers["mts-payload-omitted"], "true");
    assert_eq!(message.headers["mts-payload-sha256"], whole);
    assert_eq!(message.headers["file"], "big.bin");

    let (got, length, announced) = download(&system, &subject, stored.sequence, 0).await;
    assert_eq!(
        (got.as_str(), length, announced.as_str()),
        (whole.as_str(), (BLOCKS * MIB) as u64, whole.as_str())
    );

    // Resume an interrupted download in the middle of a block.
    let offset = 150 * MIB + 12_345;
    let (tail, length, _) = download(&system, &subject, stored.sequence, offset as u64).await;
    assert_eq!(length, (BLOCKS * MIB - offset) as u64);
    assert_eq!(tail, digest_from(&base, offset));

    let beyond = system
        .subscriber()
        .await
        .fetch_payload(FetchPayloadRequest {
            subject: subject.clone(),
            sequence: stored.sequence,
            offset: (BLOCKS * MIB + 1) as u64,
        })
        .await
        .unwrap_err();
    assert_eq!(beyond.code(), tonic::Code::OutOfRange, "{beyond:?}");
    let missing = system
        .subscriber()
        .await
        .fetch_payload(FetchPayloadRequest {
            subject: subject.clone(),
            sequence: 99,
            offset: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    system.stop().await;
}

/// What the original clients do: Publish payloads of a few MiB, then Fetch
/// and Consume without `omit_large_payloads`. They get every byte, as the
/// original service gave them; a stream of several such messages holds one
/// at a time.
#[tokio::test(flavor = "multi_thread")]
async fn clients_that_do_not_ask_for_omission_get_payloads_whole() {
    use mts_proto::pb::consume_request::Request as ConsumeFrame;
    use mts_proto::pb::{ConsumeRequest, ConsumeStart, PublishRequest};
    let system = System::start(testing::config()).await;
    let subject = testing::unique_subject("old-client");
    let mut publisher = system.publisher().await;
    let payloads: Vec<Vec<u8>> = [3 * MIB, 10 * MIB, 3 * MIB]
        .iter()
        .enumerate()
        .map(|(i, size)| (0..*size).map(|b| (b * 7 + i) as u8).collect())
        .collect();
    for data in &payloads {
        publisher
            .publish(PublishRequest {
                subject: subject.clone(),
                data: data.clone().into(),
                headers: HashMap::new(),
                message_id: String::new(),
                ordering_key: String::new(),
            })
            .await
            .unwrap();
    }

    let fetched = system.fetch(&subject, "old-fetch", 10).await;
    assert_eq!(fetched.len(), payloads.len());
    for (message, data) in fetched.iter().zip(&payloads) {
        assert!(!message.payload_omitted);
        assert!(!message.headers.contains_key("mts-payload-omitted"));
        assert_eq!(message.data.len(), data.len());
        assert!(message.data == data[..], "payload of #{}", message.sequence);
    }

    let (frames, outbound) = tokio::sync::mpsc::channel(4);
    frames
        .send(ConsumeRequest {
            request: Some(ConsumeFrame::Start(ConsumeStart {
                subject: subject.clone(),
                durable_name: "old-consume".into(),
                max_in_flight: 10,
                omit_large_payloads: false,
                report_not_held: false,
            })),
        })
        .await
        .unwrap();
    let mut consumed = system
        .subscriber()
        .await
        .consume(tokio_stream::wrappers::ReceiverStream::new(outbound))
        .await
        .unwrap()
        .into_inner();
    for data in &payloads {
        let message = tokio::time::timeout(std::time::Duration::from_secs(30), consumed.next())
            .await
            .expect("a message within 30 s")
            .unwrap()
            .unwrap();
        assert!(message.data == data[..], "payload of #{}", message.sequence);
    }
    drop(frames);
    system.stop().await;
}
