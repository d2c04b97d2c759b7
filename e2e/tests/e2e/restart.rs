//! Tarantool crashes and comes back: the same service processes recover on
//! their own, nothing acknowledged is lost and sequences are never reused.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use mts_proto::pb::{AckRequest, GetLastSequenceRequest, PublishRequest, SubscribeRequest};
use mts_proto::service_names::{EGRESS, INGRESS};
use mts_runtime::health::LIVENESS;
use mts_testkit::{self as testing, TarantoolProcess};
use tonic::Code;

use crate::system::System;

#[tokio::test(flavor = "multi_thread")]
async fn services_recover_after_tarantool_is_killed_and_restarted() {
    let mut tarantool = TarantoolProcess::start();
    let mut config = tarantool.config();
    config.tarantool.timeout_ms = 2000;
    let system = System::start(config.clone()).await;
    let mut publisher = system.publisher().await;
    let mut subscriber = system.subscriber().await;
    let subject = testing::unique_subject("restart");
    let big = config.ingress.inline_threshold_bytes as usize + 1;

    let publish = |data: Vec<u8>| PublishRequest {
        message_id: String::new(),
        subject: subject.clone(),
        data: data.into(),
        headers: HashMap::new(),
        ordering_key: String::new(),
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
    // The publish reaches no Tarantool that could say whether it committed:
    // its outcome is unknown (it cannot commit later: it carries a deadline).
    let down = publisher.publish(publish(vec![0; 10])).await.unwrap_err();
    assert_eq!(down.code(), Code::DeadlineExceeded, "{down:?}");
    assert!(down.message().contains("outcome unknown"), "{down:?}");
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
    config.object_store.endpoint = garage.endpoint();
    config.object_store.timeout_ms = 2000;
    let admin = testing::free_port();
    let mut ingress = config.clone();
    ingress.server.metrics_port = admin;
    let system = System::start_with(ingress, config.clone()).await;
    // HTTP probes on the admin port follow the gRPC health status.
    assert_eq!(testing::http_get(admin, "/readyz").await.0, 200);
    let mut publisher = system.publisher().await;
    let subject = testing::unique_subject("s3-outage");
    let offloaded = |n: u8| PublishRequest {
        message_id: String::new(),
        subject: subject.clone(),
        data: vec![n; config.ingress.inline_threshold_bytes as usize + 1].into(),
        headers: HashMap::new(),
        ordering_key: String::new(),
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

/// What a publisher was told about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Told {
    Stored(u64),
    NotStored,
    Unknown,
}

pub(crate) type Publisher =
    mts_proto::pb::ingress_service_client::IngressServiceClient<tonic::transport::Channel>;

/// A publish whose payload is its `id`.
fn carrying(subject: &str, id: &str) -> PublishRequest {
    PublishRequest {
        subject: subject.to_owned(),
        data: id.as_bytes().to_vec().into(),
        headers: HashMap::new(),
        message_id: String::new(),
        ordering_key: String::new(),
    }
}

fn told(status_code: i64, message: &str, sequence: u64) -> Told {
    match status_code {
        0 => Told::Stored(sequence),
        4 if message.contains("outcome unknown") => Told::Unknown,
        _ => Told::NotStored,
    }
}

/// Publishes `id`s over one PublishMany stream as fast as answers allow
/// (64 ahead) until `stop`; returns what each was told.
pub(crate) async fn publish_many_until(
    mut publisher: Publisher,
    subject: String,
    prefix: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<(String, Told)> {
    let mut results = Vec::new();
    let mut round = 0;
    while !*stop.borrow() {
        round += 1;
        let (send, receive) = tokio::sync::mpsc::channel::<PublishRequest>(64);
        let answers = publisher
            .publish_many(tokio_stream::wrappers::ReceiverStream::new(receive))
            .await;
        let Ok(answers) = answers else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let mut answers = answers.into_inner();
        let mut sent = std::collections::VecDeque::new();
        let mut n = 0;
        loop {
            if !*stop.borrow() && sent.len() < 64 {
                let id = format!("{prefix}-{round}-{n}");
                n += 1;
                if send.send(carrying(&subject, &id)).await.is_err() {
                    break;
                }
                sent.push_back(id);
                continue;
            }
            if sent.is_empty() {
                break;
            }
            match answers.next().await {
                Some(Ok(answer)) => {
                    let id = sent.pop_front().unwrap();
                    results.push((
                        id,
                        told(answer.status_code, &answer.error_message, answer.sequence),
                    ));
                }
                // The stream itself broke: those sent and unanswered are unknown.
                _ => {
                    results.extend(sent.drain(..).map(|id| (id, Told::Unknown)));
                    break;
                }
            }
        }
        if *stop.borrow() {
            break;
        }
    }
    results
}

/// Unary publishes one after another until `stop`.
pub(crate) async fn publish_until(
    mut publisher: Publisher,
    subject: String,
    prefix: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<(String, Told)> {
    let mut results = Vec::new();
    let mut n = 0;
    while !*stop.borrow() {
        let id = format!("{prefix}-{n}");
        n += 1;
        let reply = publisher.publish(carrying(&subject, &id)).await;
        let outcome = match reply {
            Ok(reply) => Told::Stored(reply.into_inner().sequence),
            Err(status) => {
                let outcome = told(status.code() as i64, status.message(), 0);
                if outcome == Told::NotStored {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                outcome
            }
        };
        results.push((id, outcome));
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_repeated_crashes_every_publish_answer_is_the_truth() {
    let mut tarantool = TarantoolProcess::start();
    let mut config = tarantool.config();
    config.tarantool.timeout_ms = 3000;
    let system = System::start(config).await;
    let subject = testing::unique_subject("crash-truth");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut publishers = Vec::new();
    for p in 0..3 {
        publishers.push(tokio::spawn(publish_many_until(
            system.publisher().await,
            subject.clone(),
            format!("many{p}"),
            stopped.clone(),
        )));
    }
    for p in 0..2 {
        publishers.push(tokio::spawn(publish_until(
            system.publisher().await,
            subject.clone(),
            format!("unary{p}"),
            stopped.clone(),
        )));
    }
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        tarantool.kill();
        tokio::time::sleep(Duration::from_millis(200)).await;
        tarantool.restart();
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.send(true).unwrap();
    let mut told_all = Vec::new();
    for publisher in publishers {
        told_all.extend(publisher.await.unwrap());
    }
    testing::wait_serving(system.egress.addr, EGRESS, Duration::from_secs(30)).await;

    let (_, ok, not_stored) = audit(&system, &subject, &told_all).await;
    assert!(ok > 1000, "the load ran: {ok} stored");
    assert!(not_stored > 0, "the crashes hit publishes");
    system.stop().await;
}

/// Reads every message of `subject` back (as durable "auditor") and checks
/// each answer a publisher was `told` against it: stored ones under the
/// sequence they were answered, not-stored ones absent, none stored twice.
/// Returns the stored ids with their sequences, and how many were answered
/// stored and not stored.
pub(crate) async fn audit(
    system: &System,
    subject: &str,
    told: &[(String, Told)],
) -> (HashMap<String, u64>, usize, usize) {
    let mut stored: HashMap<String, u64> = HashMap::new();
    let mut auditor = system.subscriber().await;
    loop {
        let batch = system.fetch(subject, "auditor", 1000).await;
        let Some(last) = batch.last().map(|m| m.sequence) else {
            break;
        };
        // Acked, so that the next fetch is not held back by max_ack_pending.
        auditor
            .ack_message(AckRequest {
                durable_name: "auditor".into(),
                subject: subject.to_owned(),
                sequence: last,
            })
            .await
            .unwrap();
        for message in batch {
            let id = String::from_utf8(message.data.to_vec()).unwrap();
            assert!(
                stored.insert(id.clone(), message.sequence).is_none(),
                "{id} stored twice"
            );
        }
    }
    let (mut ok, mut not_stored, mut unknown) = (0, 0, 0);
    for (id, outcome) in told {
        match outcome {
            Told::Stored(seq) => {
                ok += 1;
                assert_eq!(
                    stored.get(id),
                    Some(seq),
                    "{id} was answered stored as #{seq}"
                );
            }
            Told::NotStored => {
                not_stored += 1;
                assert_eq!(stored.get(id), None, "{id} was answered not stored");
            }
            Told::Unknown => unknown += 1,
        }
    }
    eprintln!(
        "{ok} answered stored, {not_stored} not stored, {unknown} unknown; {} stored",
        stored.len()
    );
    (stored, ok, not_stored)
}
