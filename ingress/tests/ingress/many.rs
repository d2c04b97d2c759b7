//! PublishMany against the ingress on an ephemeral port, with the real
//! Tarantool and S3 server.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mts_config::Config;
use mts_proto::pb::ingress_service_client::IngressServiceClient;
use mts_proto::pb::{PublishRequest, PublishResponse};
use mts_proto::service_names::INGRESS;
use mts_storage::store::Store;
use mts_testkit::{self as testing, Running};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn request(subject: &str, data: Vec<u8>) -> PublishRequest {
    PublishRequest {
        subject: subject.into(),
        data: data.into(),
        headers: HashMap::from([("kind".to_string(), "many".to_string())]),
        message_id: String::new(),
        ordering_key: String::new(),
    }
}

async fn start(
    tweak: impl FnOnce(&mut Config),
) -> (
    Running,
    IngressServiceClient<tonic::transport::Channel>,
    Store,
) {
    let mut config = testing::config();
    tweak(&mut config);
    let service = Running::start(INGRESS, config.clone(), mts_ingress::run).await;
    let client = IngressServiceClient::connect(service.endpoint())
        .await
        .unwrap();
    (service, client, Store::connect(&config).await.unwrap())
}

/// Sends every request at once (the server reads ahead) and collects the answers.
async fn publish_all(
    client: &mut IngressServiceClient<tonic::transport::Channel>,
    requests: Vec<PublishRequest>,
) -> Vec<PublishResponse> {
    let mut answers = client
        .publish_many(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut all = Vec::new();
    while let Some(answer) = answers.message().await.unwrap() {
        all.push(answer);
    }
    all
}

#[tokio::test]
async fn messages_are_answered_and_stored_in_the_order_sent() {
    let (_service, mut client, store) = start(|_| {}).await;
    let config = testing::config();
    let subject = testing::unique_subject("many.order");
    let large = usize::try_from(config.ingress.inline_threshold_bytes).unwrap() + 1;
    let requests: Vec<PublishRequest> = (0..300u32)
        .map(|i| match i {
            // One offloaded to S3 in the middle, one refused.
            150 => request(&subject, vec![7u8; large]),
            200 => request("bad subject", vec![0]),
            _ => request(&subject, i.to_be_bytes().to_vec()),
        })
        .collect();
    let answers = publish_all(&mut client, requests).await;
    assert_eq!(answers.len(), 300, "one answer per message");

    let mut expected_seq = 1;
    for (i, answer) in answers.iter().enumerate() {
        if i == 200 {
            assert_eq!(answer.status_code, Code::InvalidArgument as i64);
            assert!(answer.error_message.contains("subject"), "{answer:?}");
            assert_eq!(answer.sequence, 0);
            continue;
        }
        assert_eq!(answer.status_code, 0, "message {i}: {answer:?}");
        assert_eq!(answer.sequence, expected_seq, "message {i}");
        let stored = store
            .message(&subject, answer.sequence)
            .await
            .unwrap()
            .unwrap();
        if i == 150 {
            assert!(!answer.object_name.is_empty());
            assert_eq!(
                stored.object_key.as_deref(),
                Some(answer.object_name.as_str())
            );
            assert_eq!(stored.size, large as u64);
        } else {
            assert!(answer.object_name.is_empty());
            assert_eq!(stored.data.unwrap()[..], (i as u32).to_be_bytes());
            assert_eq!(stored.headers["kind"], "many");
            assert_eq!(answer.size, 4);
            assert_eq!(answer.sha256.len(), 64);
        }
        expected_seq += 1;
    }
    assert_eq!(store.last_seq(&subject).await.unwrap(), 299);
}

#[tokio::test]
async fn a_stream_of_one_message_at_a_time_works_like_publish() {
    let (_service, mut client, store) = start(|_| {}).await;
    let subject = testing::unique_subject("many.sync");
    let (requests, outgoing) = mpsc::channel(1);
    let mut answers = client
        .publish_many(ReceiverStream::new(outgoing))
        .await
        .unwrap()
        .into_inner();
    for i in 1..=5u64 {
        let mut message = request(&subject, vec![i as u8]);
        message.message_id = format!("id-{}", i.min(4));
        requests.send(message).await.unwrap();
        let answer = answers.message().await.unwrap().unwrap();
        assert_eq!(answer.status_code, 0);
        assert_eq!(answer.sequence, i.min(4), "message {i}");
        assert_eq!(
            answer.duplicate,
            i == 5,
            "the fifth repeats the fourth's id"
        );
    }
    drop(requests);
    assert!(
        answers.message().await.unwrap().is_none(),
        "the server ends the stream with the client's"
    );
    assert_eq!(store.last_seq(&subject).await.unwrap(), 4);
}

#[tokio::test]
async fn the_rate_limit_slows_a_stream_down_instead_of_failing_it() {
    let (_service, mut client, store) = start(|config| {
        config.ingress.publish_rate_per_second = 10;
        config.ingress.publish_burst = 5;
    })
    .await;
    let subject = testing::unique_subject("many.rate");
    let started = Instant::now();
    let answers = publish_all(
        &mut client,
        (0..15u8).map(|i| request(&subject, vec![i])).collect(),
    )
    .await;
    let elapsed = started.elapsed();
    assert!(answers.iter().all(|a| a.status_code == 0), "{answers:?}");
    assert_eq!(store.last_seq(&subject).await.unwrap(), 15);
    // 5 at once, then 10 at 10 per second: a second at least.
    assert!(elapsed >= Duration::from_millis(950), "{elapsed:?}");
    // Unary publishes beyond the budget are still refused outright.
    let refused = client
        .publish(request(&subject, vec![0]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
}
