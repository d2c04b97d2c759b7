//! SIGTERM against the real binaries: in-flight publishes finish, subscriber
//! streams end with UNAVAILABLE, the process exits 0 within the grace period,
//! and a second signal ends it at once.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use mts_proto::pb::egress_service_client::EgressServiceClient;
use mts_proto::pb::ingress_service_client::IngressServiceClient;
use mts_proto::pb::publish_frame::Frame;
use mts_proto::pb::{PublishEnd, PublishFrame, PublishHeader, SubscribeRequest};
use mts_proto::service_names::{EGRESS, INGRESS};
use mts_testkit as testing;

use crate::binaries::Process;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn frame(frame: Frame) -> PublishFrame {
    PublishFrame { frame: Some(frame) }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_in_flight_at_sigterm_completes_and_the_process_exits_zero() {
    let ingress = Process::start("ingress", INGRESS, 10).await;
    let mut client = IngressServiceClient::connect(format!("http://{}", ingress.addr))
        .await
        .unwrap();
    let subject = testing::unique_subject("drain");
    let (frames, outbound) = mpsc::channel(4);
    frames
        .send(frame(Frame::Header(PublishHeader {
            subject: subject.clone(),
            headers: HashMap::new(),
            total_size: None,
            message_id: String::new(),
            ordering_key: String::new(),
        })))
        .await
        .unwrap();
    frames
        .send(frame(Frame::Chunk(vec![1u8; 1000].into())))
        .await
        .unwrap();
    let call =
        tokio::spawn(async move { client.publish_stream(ReceiverStream::new(outbound)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    ingress.signal();
    ingress.wait_refusing().await;
    // The publish began before the signal: it may finish.
    frames
        .send(frame(Frame::Chunk(vec![2u8; 1000].into())))
        .await
        .unwrap();
    frames
        .send(frame(Frame::End(PublishEnd {
            sha256: String::new(),
        })))
        .await
        .unwrap();
    drop(frames);
    let reply = call.await.unwrap().unwrap().into_inner();
    assert_eq!((reply.sequence, reply.size), (1, 2000));
    let (code, took) = ingress.exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "a drained process exits 0");
    assert!(
        took < Duration::from_secs(10),
        "within the grace period: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribers_are_told_to_reconnect_and_a_second_signal_exits_at_once() {
    let egress = Process::start("egress", EGRESS, 20).await;
    let mut client = EgressServiceClient::connect(format!("http://{}", egress.addr))
        .await
        .unwrap();
    let mut stream = client
        .subscribe(SubscribeRequest {
            subject: testing::unique_subject("drain-sub"),
            start_sequence: None,
            durable_name: "d".into(),
        })
        .await
        .unwrap()
        .into_inner();
    egress.signal();
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap();
    let status = ended.expect("a status, not a silent end").unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("reconnect"),
        "{}",
        status.message()
    );
    let (code, _) = egress.exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0));

    // A publish stream that never ends would hold the drain for the whole grace period.
    let ingress = Process::start("ingress", INGRESS, 60).await;
    let mut client = IngressServiceClient::connect(format!("http://{}", ingress.addr))
        .await
        .unwrap();
    let (frames, outbound) = mpsc::channel(4);
    frames
        .send(frame(Frame::Header(PublishHeader {
            subject: testing::unique_subject("held"),
            headers: HashMap::new(),
            total_size: None,
            message_id: String::new(),
            ordering_key: String::new(),
        })))
        .await
        .unwrap();
    let _call =
        tokio::spawn(async move { client.publish_stream(ReceiverStream::new(outbound)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    ingress.signal();
    ingress.wait_refusing().await;
    ingress.signal();
    let (code, took) = ingress.exit(Duration::from_secs(10)).await;
    assert_eq!(
        code,
        Some(130),
        "the second signal does not wait for the 60 s drain"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    drop(frames);
}
