//! Tarantool crashes and comes back: the same service processes recover on
//! their own, nothing acknowledged is lost and sequences are never reused.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use mts_proto::pb::{AckRequest, GetLastSequenceRequest, PublishRequest, SubscribeRequest};
use mts_proto::service_names::{EGRESS, INGRESS};
use mts_shared::config::Config;
use mts_shared::health::LIVENESS;
use mts_shared::testing::{self, TarantoolProcess};
use tonic::Code;

use crate::system::System;

#[tokio::test(flavor = "multi_thread")]
async fn services_recover_after_tarantool_is_killed_and_restarted() {
    let mut tarantool = TarantoolProcess::start();
    let mut config = tarantool.config();
    config.tarantool_timeout_ms = 2000;
    let system = System::start(config.clone()).await;
    let mut publisher = system.publisher().await;
    let mut subscriber = system.subscriber().await;
    let subject = testing::unique_subject("restart");
    let big = config.inline_threshold_bytes as usize + 1;

    let publish = |data: Vec<u8>| PublishRequest {
        message_id: String::new(),
        subject: subject.clone(),
        data: data.into(),
        headers: HashMap::new(),
    };
    for i in 0..20u8 {
        let size = if i == 5 { big } else { 10 };
        let reply = publisher
            .publish(publish(vec![i; size]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.sequence, u64::from(i) + 1);
    }
    subscriber
        .ack_message(AckRequest {
            durable_name: "keeper".into(),
            subject: subject.clone(),
            sequence: 10,
        })
        .await
        .unwrap();
    let mut notifications = subscriber
        .subscribe(SubscribeRequest {
            subject: subject.clone(),
            start_sequence: None,
            durable_name: "keeper".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(notifications.next().await.unwrap().unwrap().sequence, 20);

    tarantool.kill();
    let down = publisher.publish(publish(vec![0; 10])).await.unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    testing::wait_status(system.ingress.addr, INGRESS, false, Duration::from_secs(10)).await;
    testing::wait_status(system.egress.addr, EGRESS, false, Duration::from_secs(10)).await;
    // Liveness does not follow dependencies: no pod restarts during an outage.
    testing::wait_serving(system.ingress.addr, LIVENESS, Duration::from_secs(1)).await;
    testing::wait_serving(system.egress.addr, LIVENESS, Duration::from_secs(1)).await;

    tarantool.restart();
    testing::wait_serving(system.ingress.addr, INGRESS, Duration::from_secs(30)).await;
    testing::wait_serving(system.egress.addr, EGRESS, Duration::from_secs(30)).await;

    let last = subscriber
        .get_last_sequence(GetLastSequenceRequest {
            subject: subject.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .last_sequence;
    assert_eq!(last, 20, "every committed publish survived the crash");
    let reply = publisher
        .publish(publish(vec![21; 10]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.sequence, 21, "sequences continue, none reused");
    let pushed = tokio::time::timeout(Duration::from_secs(15), notifications.next())
        .await
        .expect("a notification after the restart")
        .unwrap()
        .unwrap();
    assert_eq!(
        pushed.sequence, 21,
        "the open stream kept working across the restart"
    );

    let fetched: Vec<_> = system.fetch(&subject, "keeper", 100).await;
    let sequences: Vec<u64> = fetched.iter().map(|m| m.sequence).collect();
    assert_eq!(
        sequences,
        (11..=21).collect::<Vec<_>>(),
        "the ack position survived"
    );
    let everything: Vec<_> = system.fetch(&subject, "fresh", 100).await;
    assert_eq!(everything.len(), 21);
    assert_eq!(
        everything[5].data.len(),
        big,
        "the offloaded payload is still readable"
    );
    assert!(everything[5].data.iter().all(|b| *b == 5));
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn services_ride_out_an_object_store_outage() {
    let mut garage = testing::GarageProcess::start();
    let mut config = testing::config();
    config.minio_endpoint = garage.endpoint();
    config.minio_timeout_ms = 2000;
    let admin = testing::free_port();
    let system = System::start_with(
        Config {
            metrics_port: admin,
            ..config.clone()
        },
        config.clone(),
    )
    .await;
    // HTTP probes on the admin port follow the gRPC health status.
    assert_eq!(testing::http_get(admin, "/readyz").await.0, 200);
    let mut publisher = system.publisher().await;
    let subject = testing::unique_subject("s3-outage");
    let offloaded = |n: u8| PublishRequest {
        message_id: String::new(),
        subject: subject.clone(),
        data: vec![n; config.inline_threshold_bytes as usize + 1].into(),
        headers: HashMap::new(),
    };
    assert_eq!(
        publisher
            .publish(offloaded(1))
            .await
            .unwrap()
            .into_inner()
            .sequence,
        1
    );

    garage.kill();
    let started = std::time::Instant::now();
    let down = publisher.publish(offloaded(2)).await.unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "failed fast: {:?}",
        started.elapsed()
    );
    testing::wait_status(system.ingress.addr, INGRESS, false, Duration::from_secs(10)).await;
    testing::wait_status(system.egress.addr, EGRESS, false, Duration::from_secs(10)).await;
    assert_eq!(
        testing::http_get(admin, "/readyz").await,
        (503, "NOT_SERVING\n".into())
    );
    assert_eq!(testing::http_get(admin, "/livez").await.0, 200);

    garage.restart();
    testing::wait_serving(system.ingress.addr, INGRESS, Duration::from_secs(30)).await;
    testing::wait_serving(system.egress.addr, EGRESS, Duration::from_secs(30)).await;
    assert_eq!(testing::http_get(admin, "/readyz").await.0, 200);
    assert_eq!(
        publisher
            .publish(offloaded(3))
            .await
            .unwrap()
            .into_inner()
            .sequence,
        2,
        "the failed publish stored nothing"
    );
    let fetched: Vec<_> = system.fetch(&subject, "after", 10).await;
    assert_eq!(fetched.len(), 2);
    assert!(
        fetched[0].data.iter().all(|b| *b == 1),
        "the payload stored before the outage is intact"
    );
    assert!(fetched[1].data.iter().all(|b| *b == 3));
    system.stop().await;
}
