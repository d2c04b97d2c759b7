//! PublishStream, idempotent publish and the upload cap.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use mts_config::Config;
use mts_proto::pb::ingress_service_client::IngressServiceClient;
use mts_proto::pb::publish_frame::Frame;
use mts_proto::pb::{PublishEnd, PublishFrame, PublishHeader, PublishRequest, PublishResponse};
use mts_proto::service_names::INGRESS;
use mts_storage::object_store::ObjectStore;
use mts_storage::store::Store;
use mts_testkit::{self as testing, Running};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const MIB: usize = 1024 * 1024;

struct Fixture {
    service: Running,
    client: IngressServiceClient<Channel>,
    store: Store,
    object_store: ObjectStore,
    subject: String,
}

async fn fixture(name: &str, tweak: impl FnOnce(&mut Config)) -> Fixture {
    let mut config = testing::config();
    config.ingress.multipart_part_bytes = 5 * MIB as u64;
    tweak(&mut config);
    let service = Running::start(INGRESS, config.clone(), mts_ingress::run).await;
    Fixture {
        client: IngressServiceClient::connect(service.endpoint())
            .await
            .unwrap(),
        store: Store::connect(&config).await.unwrap(),
        object_store: ObjectStore::new(&config),
        subject: testing::unique_subject(name),
        service,
    }
}

fn header(subject: &str, total_size: Option<u64>, message_id: &str) -> PublishFrame {
    PublishFrame {
        frame: Some(Frame::Header(PublishHeader {
            subject: subject.into(),
            headers: HashMap::from([("kind".to_string(), "stream".to_string())]),
            total_size,
            message_id: message_id.into(),
            ordering_key: String::new(),
        })),
    }
}

fn chunk(data: Vec<u8>) -> PublishFrame {
    PublishFrame {
        frame: Some(Frame::Chunk(Bytes::from(data))),
    }
}

fn end(sha256: &str) -> PublishFrame {
    PublishFrame {
        frame: Some(Frame::End(PublishEnd {
            sha256: sha256.into(),
        })),
    }
}

impl Fixture {
    /// A stream whose frames the test sends one by one.
    async fn open(
        &self,
    ) -> (
        mpsc::Sender<PublishFrame>,
        tokio::task::JoinHandle<Result<PublishResponse, tonic::Status>>,
    ) {
        let (frames, outbound) = mpsc::channel(4);
        let mut client = self.client.clone();
        let call = tokio::spawn(async move {
            client
                .publish_stream(ReceiverStream::new(outbound))
                .await
                .map(|r| r.into_inner())
        });
        (frames, call)
    }

    /// A stream whose header, already sent, announces `total` bytes.
    async fn open_announced(
        &self,
        total: u64,
    ) -> (
        mpsc::Sender<PublishFrame>,
        tokio::task::JoinHandle<Result<PublishResponse, tonic::Status>>,
    ) {
        let (frames, call) = self.open().await;
        frames
            .send(header(&self.subject, Some(total), ""))
            .await
            .unwrap();
        (frames, call)
    }

    /// Where this fixture's subject's payloads go.
    fn prefix_of(&self, subject: &str) -> String {
        self.object_store
            .subject_prefix(&self.store.identity().store_id, subject)
    }

    async fn unfinished(&self) -> usize {
        self.object_store
            .unfinished_uploads(&self.prefix_of(&self.subject))
            .await
            .unwrap()
            .len()
    }

    async fn publish(&mut self, subject: &str, data: &[u8], message_id: &str) -> PublishResponse {
        self.client
            .publish(PublishRequest {
                subject: subject.into(),
                data: data.to_vec().into(),
                headers: HashMap::new(),
                message_id: message_id.into(),
                ordering_key: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
    }
}

#[tokio::test]
async fn a_stream_cut_off_midway_leaves_nothing_behind() {
    let f = fixture("cut-off", |_| {}).await;
    let (frames, call) = f.open().await;
    frames.send(header(&f.subject, None, "")).await.unwrap();
    for _ in 0..12 {
        frames.send(chunk(vec![3u8; MIB])).await.unwrap();
    }
    testing::eventually("a multipart upload is under way", || async {
        f.unfinished().await > 0
    })
    .await;
    // The client goes away: its call is dropped mid-stream.
    call.abort();
    drop(frames);
    testing::eventually("the multipart upload is aborted", || async {
        f.unfinished().await == 0
    })
    .await;
    nothing_stored(&f).await;
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn bad_frames_and_size_mismatches_store_nothing() {
    let f = fixture("bad-frames", |_| {}).await;
    let (frames, call) = f.open().await;
    frames.send(header(&f.subject, None, "")).await.unwrap();
    frames.send(chunk(vec![1u8; 6 * MIB])).await.unwrap();
    frames.send(header(&f.subject, None, "")).await.unwrap();
    let refused = call.await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("only the first frame"),
        "{}",
        refused.message()
    );

    let (frames, call) = f.open().await;
    frames.send(chunk(vec![1u8; 10])).await.unwrap();
    drop(frames);
    let refused = call.await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("must be a header"),
        "{}",
        refused.message()
    );

    let (frames, call) = f.open().await;
    frames
        .send(header(&f.subject, Some(100), ""))
        .await
        .unwrap();
    frames.send(chunk(vec![1u8; 50])).await.unwrap();
    drop(frames);
    let refused = call.await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused
            .message()
            .contains("announced 100 bytes but the stream carried 50"),
        "{}",
        refused.message()
    );

    // A digest the payload does not have, after enough bytes for a multipart upload.
    let (frames, call) = f.open().await;
    frames.send(header(&f.subject, None, "")).await.unwrap();
    frames.send(chunk(vec![2u8; 6 * MIB])).await.unwrap();
    frames.send(end("00ff")).await.unwrap();
    drop(frames);
    let refused = call.await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("end.sha256"),
        "{}",
        refused.message()
    );

    // Ending without an end frame or a total size is a cut-off, not a finish.
    let (frames, call) = f.open().await;
    frames.send(header(&f.subject, None, "")).await.unwrap();
    frames.send(chunk(vec![2u8; 10])).await.unwrap();
    drop(frames);
    let refused = call.await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("without an end frame"),
        "{}",
        refused.message()
    );

    testing::eventually("no upload left", || async { f.unfinished().await == 0 }).await;
    assert_eq!(f.store.last_seq(&f.subject).await.unwrap(), 0);
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn streamed_payloads_are_stored_with_size_and_digest() {
    let f = fixture("stream-sizes", |_| {}).await;
    // Inline; announced sizes, each streamed into one PutObject; a size not
    // announced, as a multipart object of 2 full parts plus a tail, and as
    // one small object.
    for (size, announced, inline) in [
        (1000usize, true, true),
        (300 * 1024, true, false),
        (11 * MIB, true, false),
        (11 * MIB, false, false),
        (300 * 1024, false, false),
    ] {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let (frames, call) = f.open().await;
        let total = announced.then_some(size as u64);
        frames.send(header(&f.subject, total, "")).await.unwrap();
        for piece in data.chunks(MIB + 17) {
            frames.send(chunk(piece.to_vec())).await.unwrap();
        }
        if !announced {
            frames.send(end("")).await.unwrap();
        }
        drop(frames);
        let reply = call.await.unwrap().unwrap();
        let digest = hex::encode(Sha256::digest(&data));
        assert_eq!(
            (reply.size, reply.sha256.as_str()),
            (size as u64, digest.as_str())
        );
        assert_eq!(reply.object_name.is_empty(), inline, "{size} bytes");
        let stored = f
            .store
            .message(&f.subject, reply.sequence)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (stored.size, stored.sha256.as_deref()),
            (size as u64, Some(digest.as_str()))
        );
        assert_eq!(stored.headers["kind"], "stream");
        if !inline {
            assert_eq!(f.object_store.get(&reply.object_name).await.unwrap(), data);
        }
    }
    assert_eq!(f.unfinished().await, 0);
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn the_upload_cap_answers_resource_exhausted_with_a_retry_hint() {
    let f = fixture("cap", |c| c.ingress.max_concurrent_uploads = 1).await;
    let (frames, first) = f.open().await;
    frames.send(header(&f.subject, None, "")).await.unwrap();
    frames.send(chunk(vec![9u8; 6 * MIB])).await.unwrap();
    testing::eventually("the first upload holds the only slot", || async {
        f.unfinished().await > 0
    })
    .await;

    let (second_frames, second) = f.open().await;
    second_frames
        .send(header(&f.subject, None, ""))
        .await
        .unwrap();
    let refused = second.await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let retry = refused
        .get_error_details()
        .retry_info()
        .cloned()
        .expect("a retry hint");
    assert!(retry.retry_delay.is_some());

    frames.send(end("")).await.unwrap();
    drop(frames);
    let stored = first.await.unwrap().unwrap();
    assert_eq!((stored.sequence, stored.size), (1, 6 * MIB as u64));
    // The slot is free again.
    let (frames, third) = f.open().await;
    frames.send(header(&f.subject, None, "")).await.unwrap();
    frames.send(chunk(b"again".to_vec())).await.unwrap();
    frames.send(end("")).await.unwrap();
    drop(frames);
    assert_eq!(third.await.unwrap().unwrap().sequence, 2);
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn a_message_id_is_stored_once_per_subject_within_the_window() {
    let mut f = fixture("dedup", |c| c.ingress.dedup_window_ms = 1500).await;
    let subject = f.subject.clone();
    let first = f.publish(&subject, b"payload", "order-17").await;
    assert!(!first.duplicate);
    assert_eq!(first.size, 7);
    assert_eq!(first.sha256, hex::encode(Sha256::digest(b"payload")));
    let again = f.publish(&subject, b"payload", "order-17").await;
    assert_eq!((again.sequence, again.duplicate), (first.sequence, true));
    assert_eq!(f.store.last_seq(&subject).await.unwrap(), 1, "stored once");

    let other = testing::unique_subject("dedup-other");
    let elsewhere = f.publish(&other, b"payload", "order-17").await;
    assert!(!elsewhere.duplicate, "subjects do not collide");

    // A large payload with a known id is not uploaded again.
    let big = vec![5u8; 300 * 1024];
    let large = f.publish(&subject, &big, "big-1").await;
    let repeat = f.publish(&subject, &big, "big-1").await;
    assert_eq!(
        (
            repeat.sequence,
            repeat.duplicate,
            repeat.object_name.as_str()
        ),
        (large.sequence, true, "")
    );
    assert_eq!(
        f.object_store
            .list_keys(&f.prefix_of(&subject))
            .await
            .unwrap()
            .len(),
        1
    );

    // Streamed publishes share the same ids.
    let (frames, call) = f.open().await;
    frames
        .send(header(&subject, None, "order-17"))
        .await
        .unwrap();
    frames.send(chunk(b"payload".to_vec())).await.unwrap();
    frames
        .send(end(&hex::encode(Sha256::digest(b"payload"))))
        .await
        .unwrap();
    drop(frames);
    let streamed = call.await.unwrap().unwrap();
    assert_eq!(
        (streamed.sequence, streamed.duplicate),
        (first.sequence, true)
    );

    tokio::time::sleep(Duration::from_millis(1600)).await;
    let later = f.publish(&subject, b"payload", "order-17").await;
    assert!(!later.duplicate, "after the window the id is new again");
    assert_eq!(later.sequence, 3);
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn a_streamed_put_stores_all_or_nothing() {
    use mts_storage::object_store::StreamedBody;
    let object_store = ObjectStore::new(&testing::config());
    let subject = testing::unique_subject("streamed-put");
    let data: Vec<u8> = (0..3 * MIB + 5).map(|i| (i * 13 % 251) as u8).collect();

    let key = format!("{subject}/whole");
    let (sender, body) = StreamedBody::channel(data.len() as u64);
    let chunks: Vec<Bytes> = data.chunks(MIB).map(Bytes::copy_from_slice).collect();
    let feed = async move {
        for chunk in chunks {
            sender.send(chunk).await.unwrap();
        }
    };
    let (stored, ()) = tokio::join!(
        object_store.put_streamed(&key, body, data.len() as u64),
        feed
    );
    stored.unwrap();
    assert_eq!(object_store.get(&key).await.unwrap(), data);

    // Given up before the last byte: the request fails and no object exists.
    let key = format!("{subject}/aborted");
    let (sender, body) = StreamedBody::channel(data.len() as u64);
    let first = Bytes::copy_from_slice(&data[..MIB]);
    let feed = async move {
        sender.send(first).await.unwrap();
        sender.abort().await;
    };
    let (stored, ()) = tokio::join!(
        object_store.put_streamed(&key, body, data.len() as u64),
        feed
    );
    assert!(stored.is_err(), "an aborted body stores nothing");
    assert!(
        object_store.get(&key).await.is_err(),
        "no object under {key}"
    );
}

/// Waits for the stream's answer: a refusal with `code` whose message says `says`.
async fn refused(
    call: tokio::task::JoinHandle<Result<PublishResponse, tonic::Status>>,
    code: Code,
    says: &str,
) {
    let status = call.await.unwrap().unwrap_err();
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(says), "{}", status.message());
}

/// What a refused stream of `subject` must leave: no metadata, no object, no upload.
async fn nothing_stored(f: &Fixture) {
    assert_eq!(
        f.store.last_seq(&f.subject).await.unwrap(),
        0,
        "no metadata"
    );
    assert!(
        f.object_store
            .list_keys(&f.prefix_of(&f.subject))
            .await
            .unwrap()
            .is_empty(),
        "no object"
    );
    assert_eq!(f.unfinished().await, 0, "no multipart upload");
}

#[tokio::test]
async fn an_announced_payload_with_a_bad_ending_stores_nothing() {
    let f = fixture("one-put-refused", |_| {}).await;
    let total = 3 * MIB as u64;

    // Every byte sent, then a digest the payload does not have: the last
    // chunk was held back, so the object never came to exist.
    let (frames, call) = f.open_announced(total).await;
    for _ in 0..3 {
        frames.send(chunk(vec![4u8; MIB])).await.unwrap();
    }
    // Time enough for the store to finish an object whose bytes all went out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    frames.send(end("00ff")).await.unwrap();
    drop(frames);
    refused(call, Code::InvalidArgument, "end.sha256").await;
    nothing_stored(&f).await;

    // More than announced.
    let (frames, call) = f.open_announced(total).await;
    for _ in 0..4 {
        if frames.send(chunk(vec![4u8; MIB])).await.is_err() {
            break;
        }
    }
    drop(frames);
    refused(call, Code::InvalidArgument, "more than the").await;
    nothing_stored(&f).await;

    // Cut off midway: the client goes away.
    let (frames, call) = f.open_announced(total).await;
    frames.send(chunk(vec![4u8; MIB])).await.unwrap();
    call.abort();
    drop(frames);
    // The ingress notices and gives the request up; give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    nothing_stored(&f).await;
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn an_announced_payload_the_store_cannot_take_is_unavailable() {
    let mut garage = testing::GarageProcess::start();
    let f = fixture("one-put-unreachable", |config| {
        config.object_store.endpoint = garage.endpoint();
        config.object_store.timeout_ms = 2000;
    })
    .await;
    garage.kill();
    let (frames, call) = f.open().await;
    frames
        .send(header(&f.subject, Some(2 * MIB as u64), ""))
        .await
        .unwrap();
    for _ in 0..2 {
        if frames.send(chunk(vec![5u8; MIB])).await.is_err() {
            break;
        }
    }
    drop(frames);
    refused(call, Code::Unavailable, "nothing was stored").await;
    assert_eq!(f.store.last_seq(&f.subject).await.unwrap(), 0);
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn a_publisher_pausing_mid_upload_is_not_an_object_store_outage() {
    // Longer than the S3 client's stalled-stream grace period (20 s), well
    // within the ingress's idle limit: the pause is the publisher's business.
    let f = fixture("pause", |_| {}).await;
    let half = vec![5u8; MIB];
    let (frames, call) = f.open_announced(2 * MIB as u64).await;
    frames.send(chunk(half.clone())).await.unwrap();
    tokio::time::sleep(Duration::from_secs(25)).await;
    frames.send(chunk(half)).await.unwrap();
    drop(frames);
    let stored = call.await.unwrap().expect("the paused upload is stored");
    assert_eq!((stored.sequence, stored.size), (1, 2 * MIB as u64));
    assert!(!stored.object_name.is_empty());
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn a_silent_publisher_is_cut_off_by_the_idle_limit() {
    let f = fixture("idle", |c| c.ingress.stream_idle_timeout_ms = 800).await;
    for total in [None, Some(2 * MIB as u64)] {
        let (frames, call) = f.open().await;
        frames.send(header(&f.subject, total, "")).await.unwrap();
        frames.send(chunk(vec![1u8; MIB])).await.unwrap();
        let status = call.await.unwrap().unwrap_err();
        assert_eq!(
            status.code(),
            Code::DeadlineExceeded,
            "{total:?}: {status:?}"
        );
        // Names the silent publisher: no token here, so its address.
        assert!(
            status
                .message()
                .contains("publisher (address 127.0.0.1) sent nothing"),
            "{}",
            status.message()
        );
        drop(frames);
    }
    nothing_stored(&f).await;
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn one_client_gets_only_its_share_of_the_upload_slots() {
    let f = fixture("share", |c| {
        c.ingress.max_concurrent_uploads = 4;
        c.ingress.max_uploads_per_client = 2;
    })
    .await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let (frames, call) = f.open().await;
        frames.send(header(&f.subject, None, "")).await.unwrap();
        frames.send(chunk(vec![9u8; 6 * MIB])).await.unwrap();
        open.push((frames, call));
    }
    testing::eventually("both uploads hold a slot", || async {
        f.unfinished().await >= 2
    })
    .await;
    let (third_frames, third) = f.open().await;
    third_frames
        .send(header(&f.subject, None, ""))
        .await
        .unwrap();
    let refused = third.await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("this client already runs 2"),
        "{}",
        refused.message()
    );
    for (frames, call) in open {
        frames.send(end("")).await.unwrap();
        drop(frames);
        call.await.unwrap().unwrap();
    }
    f.service.stop().await.unwrap();
}
