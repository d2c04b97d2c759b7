//! Both services on a three-member Tarantool replica set with synchronous
//! replication, under a publish load with a consumer running: the leader is
//! killed and a follower promoted, as scripts/failover.sh does. No publish
//! answered with a sequence is lost, sequences go on without a gap or reuse,
//! a message is delivered again only as a reported redelivery, and the
//! services carry on without a restart.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mts_proto::pb::consume_request::Request as Frame;
use mts_proto::pb::{
    AckSequences, ConsumeRequest, ConsumeStart, ConsumerConfig, CreateOrUpdateConsumerRequest,
    PublishRequest,
};
use mts_testkit::{self as testing, ReplicaSet};

use crate::restart::{audit, publish_many_until, publish_until};
use crate::system::System;

/// Consumes `subject` as durable "worker" until `stop` and nothing more
/// comes, reopening the stream whenever it ends; returns each delivery as
/// (sequence, delivery count).
async fn consume_until(
    system_egress: String,
    subject: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<(u64, u32)> {
    let mut deliveries = Vec::new();
    loop {
        let Ok(mut client) = mts_proto::pb::egress_service_client::EgressServiceClient::connect(
            system_egress.clone(),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (frames, outbound) = tokio::sync::mpsc::channel(64);
        frames
            .send(ConsumeRequest {
                request: Some(Frame::Start(ConsumeStart {
                    subject: subject.clone(),
                    durable_name: "worker".into(),
                    max_in_flight: 100,
                    omit_large_payloads: false,
                    report_not_held: false,
                })),
            })
            .await
            .unwrap();
        let opened = client
            .consume(tokio_stream::wrappers::ReceiverStream::new(outbound))
            .await;
        let Ok(messages) = opened else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut messages = messages.into_inner();
        loop {
            match tokio::time::timeout(Duration::from_secs(4), messages.next()).await {
                Ok(Some(Ok(message))) => {
                    deliveries.push((message.sequence, message.delivery_count));
                    let ack = ConsumeRequest {
                        request: Some(Frame::Ack(AckSequences {
                            sequences: vec![message.sequence],
                        })),
                    };
                    if frames.send(ack).await.is_err() {
                        break;
                    }
                }
                // Quiet for 4 s after the load stopped: all drained, and
                // leases cut off by the kill came back.
                Err(_) if *stop.borrow() => return deliveries,
                Err(_) => {}
                // The stream ended (the leader went away under it): reopen.
                Ok(_) => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_under_load_loses_no_acknowledged_publish_and_the_services_carry_on() {
    let mut set = ReplicaSet::start();
    let mut config = set.config();
    config.tarantool.timeout_ms = 3000;
    let metrics_port = testing::free_port();
    let mut ingress = config.clone();
    ingress.server.metrics_port = metrics_port;
    let system = System::start_with(ingress, config).await;
    let subject = testing::unique_subject("failover");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut publishers = Vec::new();
    for p in 0..2 {
        publishers.push(tokio::spawn(publish_many_until(
            system.publisher().await,
            subject.clone(),
            format!("many{p}"),
            stopped.clone(),
        )));
    }
    publishers.push(tokio::spawn(publish_until(
        system.publisher().await,
        subject.clone(),
        "unary".into(),
        stopped.clone(),
    )));
    // Leases cut off by the kill come back after 2 s, within the test.
    system
        .subscriber()
        .await
        .create_or_update_consumer(CreateOrUpdateConsumerRequest {
            subject: subject.clone(),
            durable_name: "worker".into(),
            config: Some(ConsumerConfig {
                ack_wait_ms: Some(2000),
                ..ConsumerConfig::default()
            }),
        })
        .await
        .unwrap();
    let consumer = tokio::spawn(consume_until(
        system.egress.endpoint(),
        subject.clone(),
        stopped.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The leader dies; the member furthest along is promoted.
    set.members[0].kill();
    let killed = Instant::now();
    let furthest = set.furthest_along(&[1, 2]).await;
    set.promote(furthest).await;
    println!("promoted {:?} after the kill", killed.elapsed());
    let mut probe = system.publisher().await;
    let first_stored = loop {
        let reply = probe
            .publish(PublishRequest {
                subject: format!("{subject}.probe"),
                data: b"probe".to_vec().into(),
                headers: HashMap::new(),
                message_id: String::new(),
                ordering_key: String::new(),
            })
            .await;
        if reply.is_ok() {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no publish stored 30 s after the kill"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("from the kill of the leader to the first stored publish: {first_stored:?}");
    // The ingress tells which member leads, which is down, and that the
    // leader changed.
    let (old, new) = (set.members[0].address(), set.members[furthest].address());
    testing::eventually("the members' gauges after the failover", || async {
        let text = testing::scrape_metrics(metrics_port).await;
        text.contains(&format!(
            r#"minitoolstream_tarantool_member_leader{{member="{new}"}} 1"#
        )) && text.contains(&format!(
            r#"minitoolstream_tarantool_member_up{{member="{old}"}} 0"#
        )) && text.contains("minitoolstream_tarantool_leader_changes_total 1")
    })
    .await;
    // So does its admin port's /members, with each member's lag.
    let (status, body) = testing::http_get(metrics_port, "/members").await;
    assert_eq!(status, 200, "{body}");
    let members: serde_json::Value = serde_json::from_str(&body).expect("/members is JSON");
    assert_eq!(members["leader"], new.as_str(), "{members}");
    let listed = members["members"].as_array().expect("a list of members");
    assert_eq!(listed.len(), 3, "{members}");
    for member in listed {
        let address = member["address"].as_str().unwrap();
        assert_eq!(member["up"], address != old, "{members}");
        assert_eq!(member["leader"], address == new, "{members}");
        assert!(member["replication_lag_seconds"].is_f64(), "{members}");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.send(true).unwrap();
    let mut told_all = Vec::new();
    for publisher in publishers {
        told_all.extend(publisher.await.unwrap());
    }
    let deliveries = consumer.await.unwrap();

    // What is stored: each id once, under gap-free sequences, and what each
    // publisher was told is the truth.
    let (stored, ok, _) = audit(&system, &subject, &told_all).await;
    let mut seqs: Vec<u64> = stored.values().copied().collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "no gap, no reuse"
    );
    assert!(ok > 500, "the load ran: {ok} stored");

    // Every stored message reached the worker; again only as a redelivery.
    let mut seen: HashMap<u64, u32> = HashMap::new();
    for (seq, count) in &deliveries {
        let times = seen.entry(*seq).or_default();
        *times += 1;
        assert!(
            *times == 1 || *count > 1,
            "{seq} delivered again with delivery count {count}: a duplicate, not a redelivery"
        );
    }
    let missing: Vec<u64> = seqs
        .iter()
        .copied()
        .filter(|s| !seen.contains_key(s))
        .collect();
    assert!(
        missing.is_empty(),
        "never delivered to the worker: {missing:?}"
    );
    let redelivered = seen.values().filter(|n| **n > 1).count();
    eprintln!(
        "{} deliveries, {redelivered} messages redelivered",
        deliveries.len()
    );
    system.stop().await;
}
