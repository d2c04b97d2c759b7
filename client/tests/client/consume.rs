//! Consuming: settling each message, and keeping the consumer's place
//! across an egress restart and a connection closed for its age.

use std::time::Duration;

use mts_client::wire::ConsumerConfig;
use mts_client::{Client, Consumer, Message};
use mts_proto::service_names::{EGRESS, INGRESS};
use mts_testkit::{self as testing, Running};

use super::{client_of, services};

async fn durable(client: &Client, subject: &str, name: &str) {
    let created = client
        .create_consumer(subject, name, ConsumerConfig::default())
        .await
        .unwrap();
    assert!(created.created_now, "{created:?}");
}

async fn publish(client: &Client, subject: &str, data: &str) -> u64 {
    client
        .publish(Message::new(subject, data.to_owned()))
        .await
        .unwrap()
        .sequence
}

/// The next delivery, within 10 s.
async fn next(consumer: &mut Consumer) -> mts_client::Delivery {
    tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a message within 10 s")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_message_is_acked_nacked_extended_or_rejected() {
    let services = services(testing::config()).await;
    let client = client_of(&services).await;
    let subject = testing::unique_subject("client-consume");
    durable(&client, &subject, "d").await;
    for data in ["a", "b", "c"] {
        publish(&client, &subject, data).await;
    }
    let mut consumer = client.consumer(&subject, "d").start().await.unwrap();

    let first = next(&mut consumer).await;
    assert_eq!((first.sequence, &first.data[..]), (1, &b"a"[..]));
    assert_eq!(first.delivery_count, 1);
    assert!(first.timestamp.is_some() && !first.payload_omitted);
    first.ack().await.unwrap();
    let second = next(&mut consumer).await;
    assert_eq!(second.sequence, 2);
    second.nack(Duration::ZERO).await.unwrap();
    let third = next(&mut consumer).await;
    assert_eq!(third.sequence, 3);
    third.extend(Duration::from_secs(60)).await.unwrap();
    third.reject("cannot be parsed").await.unwrap();
    let again = next(&mut consumer).await;
    assert_eq!(
        (again.sequence, again.delivery_count),
        (2, 2),
        "nacked: delivered again"
    );
    again.ack().await.unwrap();

    testing::eventually("every message settled", || async {
        let info = client.consumer_info(&subject, "d").await.unwrap();
        info.ack_floor == 3 && info.num_ack_pending == 0 && info.num_rejected == 1
    })
    .await;
    let dead = client
        .last_sequence(&format!("{subject}.dlq"))
        .await
        .unwrap();
    assert_eq!(
        dead, 1,
        "the rejected message went to the dead-letter subject"
    );
    consumer.close().await;

    let err = client
        .consumer(&subject, "")
        .start()
        .await
        .expect_err("a consumer without a name");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert!(!err.is_retryable(), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_keeps_its_place_across_an_egress_restart() {
    let config = testing::config();
    let ingress = Running::start(INGRESS, config.clone(), mts_ingress::run).await;
    let egress = Running::start(EGRESS, config.clone(), mts_egress::run).await;
    let client = Client::connect(ingress.endpoint(), egress.endpoint())
        .await
        .unwrap();
    let subject = testing::unique_subject("client-restart");
    durable(&client, &subject, "d").await;
    publish(&client, &subject, "one").await;
    publish(&client, &subject, "two").await;
    let mut consumer = client.consumer(&subject, "d").start().await.unwrap();
    next(&mut consumer).await.ack().await.unwrap();
    let held = next(&mut consumer).await;
    assert_eq!(held.sequence, 2);
    // An ack on the stream is applied unless the stream ends first.
    testing::eventually("the first acked", || async {
        client.consumer_info(&subject, "d").await.unwrap().ack_floor == 1
    })
    .await;

    let addr = egress.addr;
    egress.stop().await.unwrap();
    publish(&client, &subject, "three").await;
    let _egress = Running::start_at(addr, EGRESS, config, mts_egress::run).await;

    // Its stream is gone: the ack is a call of its own.
    held.ack().await.unwrap();
    let third = next(&mut consumer).await;
    assert_eq!(
        (third.sequence, &third.data[..], third.delivery_count),
        (3, &b"three"[..], 1),
        "the first was acked before the restart and the second after it"
    );
    third.ack().await.unwrap();
    assert_eq!(consumer.reconnects(), 1);
    testing::eventually("all acked", || async {
        let info = client.consumer_info(&subject, "d").await.unwrap();
        info.ack_floor == 3 && info.num_ack_pending == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_goes_on_across_connections_closed_for_their_age() {
    let mut config = testing::config();
    config.server.max_connection_age_seconds = 1;
    config.server.max_connection_age_grace_seconds = 1;
    let services = services(config).await;
    let client = client_of(&services).await;
    let subject = testing::unique_subject("client-aged");
    durable(&client, &subject, "d").await;
    let mut consumer = client.consumer(&subject, "d").start().await.unwrap();
    let publishing = tokio::spawn({
        let (client, subject) = (client.clone(), subject.clone());
        async move {
            for i in 0..15 {
                publish(&client, &subject, &i.to_string()).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    });
    let mut received = std::collections::BTreeSet::new();
    while received.len() < 15 {
        let delivery = next(&mut consumer).await;
        received.insert(delivery.sequence);
        delivery.ack().await.unwrap();
    }
    publishing.await.unwrap();
    assert_eq!(received, (1..=15).collect());
    assert!(
        consumer.reconnects() >= 1,
        "connections live at most about 2 s; 4.5 s went by"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kept_lease_outlives_ack_wait_and_bad_settlements_are_refused_before_sending() {
    let services = services(testing::config()).await;
    let client = client_of(&services).await;
    let subject = testing::unique_subject("client-keep");
    let config = ConsumerConfig {
        ack_wait_ms: Some(1000),
        ..ConsumerConfig::default()
    };
    client.create_consumer(&subject, "d", config).await.unwrap();
    publish(&client, &subject, "slow work").await;
    let mut consumer = client.consumer(&subject, "d").start().await.unwrap();
    let delivery = next(&mut consumer).await;

    let kept = delivery.keep_leased();
    let again = tokio::time::timeout(Duration::from_millis(2500), consumer.next()).await;
    assert!(
        again.is_err(),
        "delivered again while its lease was kept: {again:?}"
    );
    let err = delivery
        .extend(Duration::from_secs(13 * 3600))
        .await
        .unwrap_err();
    assert!(matches!(err, mts_client::Error::Config(_)), "{err}");
    let err = delivery.reject("x".repeat(2000)).await.unwrap_err();
    assert!(matches!(err, mts_client::Error::Config(_)), "{err}");
    drop(kept);
    delivery.ack().await.unwrap();

    // The stream took nothing it would end on: it goes on.
    publish(&client, &subject, "next").await;
    assert_eq!(next(&mut consumer).await.sequence, 2);
    assert_eq!((consumer.reconnects(), consumer.not_applied()), (0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payload_too_large_to_send_whole_fails_the_consumer_instead_of_looping() {
    let mut config = testing::config();
    config.egress.max_delivered_payload_bytes = 2 * 1024 * 1024;
    let services = services(config).await;
    let client = client_of(&services).await;
    let subject = testing::unique_subject("client-too-large");
    durable(&client, &subject, "d").await;
    let large = vec![1u8; 3 * 1024 * 1024];
    client
        .publish_stream(Message::new(&subject, ""), &large[..], None, |_| {})
        .await
        .unwrap();
    let mut consumer = client
        .consumer(&subject, "d")
        .omit_large_payloads(false)
        .start()
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("an answer, not a loop")
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::ResourceExhausted), "{err}");
    assert_eq!(
        client
            .last_sequence(&format!("{subject}.dlq"))
            .await
            .unwrap(),
        0,
        "not dead-lettered by a loop of deliveries"
    );
}
