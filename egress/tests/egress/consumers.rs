//! Durable consumers with leases: competing fetchers, redelivery, nacks,
//! dead letters, consumer management and exact consumer info.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use mts_proto::pb::{
    AckSequencesRequest, ConsumerConfig, ConsumerInfo, ConsumerRequest,
    CreateOrUpdateConsumerRequest, DeliverPolicy, ExtendLeaseRequest, NackRequest,
    SeekConsumerRequest, seek_consumer_request::To,
};
use mts_proto::service_names::EGRESS;
use mts_storage::object_store::ObjectStore;
use mts_testkit::Running;
use tonic::Code;

use crate::support::{Fixture, fixture, sequences};

impl Fixture {
    async fn create(&mut self, durable: &str, config: ConsumerConfig) -> ConsumerInfo {
        self.client
            .create_or_update_consumer(CreateOrUpdateConsumerRequest {
                subject: self.subject.clone(),
                durable_name: durable.into(),
                config: Some(config),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn info(&mut self, durable: &str) -> Result<ConsumerInfo, tonic::Status> {
        self.client
            .get_consumer_info(ConsumerRequest {
                subject: self.subject.clone(),
                durable_name: durable.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    async fn ack_each(&mut self, durable: &str, sequences: Vec<u64>) -> Result<u64, tonic::Status> {
        self.client
            .ack(AckSequencesRequest {
                subject: self.subject.clone(),
                durable_name: durable.into(),
                sequences,
            })
            .await
            .map(|r| r.into_inner().ack_floor)
    }

    async fn nack(
        &mut self,
        durable: &str,
        sequences: Vec<u64>,
        delay_ms: u32,
    ) -> Result<(), tonic::Status> {
        self.client
            .nack(NackRequest {
                subject: self.subject.clone(),
                durable_name: durable.into(),
                sequences,
                delay_ms,
            })
            .await
            .map(drop)
    }

    /// Extends the leases of `sequences`; when they now run out.
    async fn extend(
        &mut self,
        durable: &str,
        sequences: Vec<u64>,
        extend_ms: u32,
    ) -> Result<std::time::SystemTime, tonic::Status> {
        let deadline = self
            .client
            .extend_lease(ExtendLeaseRequest {
                subject: self.subject.clone(),
                durable_name: durable.into(),
                sequences,
                extend_ms,
            })
            .await?
            .into_inner()
            .deadline
            .expect("a deadline");
        Ok(std::time::SystemTime::try_from(deadline).unwrap())
    }
}

fn config() -> ConsumerConfig {
    ConsumerConfig::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_competing_fetchers_get_every_message_exactly_once() {
    let mut f = fixture("competing").await;
    f.create(
        "workers",
        ConsumerConfig {
            ack_wait_ms: Some(120_000),
            ..config()
        },
    )
    .await;
    for i in 0..1000u32 {
        f.publish(&i.to_be_bytes()).await;
    }
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let mut client = f.client.clone();
        let subject = f.subject.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let batch: Vec<_> = futures::StreamExt::collect::<Vec<_>>(
                    client
                        .fetch(mts_proto::pb::FetchRequest {
                            subject: subject.clone(),
                            durable_name: "workers".into(),
                            batch_size: 37,
                            omit_large_payloads: false,
                        })
                        .await
                        .unwrap()
                        .into_inner(),
                )
                .await;
                if batch.is_empty() {
                    return mine;
                }
                let seqs: Vec<u64> = batch.into_iter().map(|m| m.unwrap().sequence).collect();
                client
                    .ack(AckSequencesRequest {
                        subject: subject.clone(),
                        durable_name: "workers".into(),
                        sequences: seqs.clone(),
                    })
                    .await
                    .unwrap();
                mine.extend(seqs);
            }
        }));
    }
    let mut seen = HashSet::new();
    let mut per_fetcher = Vec::new();
    for task in tasks {
        let mine = task.await.unwrap();
        per_fetcher.push(mine.len());
        for seq in mine {
            assert!(
                seen.insert(seq),
                "sequence {seq} was handed out twice while leased"
            );
        }
    }
    assert_eq!(
        seen,
        (1..=1000).collect::<HashSet<u64>>(),
        "every message, exactly once"
    );
    assert!(
        per_fetcher.iter().all(|n| *n > 0),
        "all three took part: {per_fetcher:?}"
    );
    let info = f.info("workers").await.unwrap();
    assert_eq!(
        (info.ack_floor, info.num_ack_pending, info.num_pending),
        (1000, 0, 0)
    );
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn an_expired_lease_redelivers_with_a_higher_count() {
    let mut f = fixture("redeliver").await;
    f.create(
        "slow",
        ConsumerConfig {
            ack_wait_ms: Some(500),
            ..config()
        },
    )
    .await;
    f.publish(b"once").await;
    let first = f.fetch("slow", 10).await;
    assert_eq!((sequences(&first), first[0].delivery_count), (vec![1], 1));
    assert!(f.fetch("slow", 10).await.is_empty(), "still leased");
    let again = f.fetch_within("slow", 10, Duration::from_secs(10)).await;
    assert_eq!(sequences(&again), vec![1], "back after ack_wait");
    assert_eq!(again[0].delivery_count, 2);
    assert_eq!(again[0].headers["mts-delivery-count"], "2");
    assert_eq!(again[0].data.as_ref(), b"once");
    f.ack_each("slow", vec![1]).await.unwrap();
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn nack_redelivers_at_once_or_after_its_delay() {
    let mut f = fixture("nack").await;
    f.create(
        "n",
        ConsumerConfig {
            ack_wait_ms: Some(60_000),
            ..config()
        },
    )
    .await;
    f.publish(b"a").await;
    f.publish(b"b").await;
    assert_eq!(sequences(&f.fetch("n", 10).await), vec![1, 2]);

    f.nack("n", vec![1], 0).await.unwrap();
    let now = f.fetch("n", 10).await;
    assert_eq!((sequences(&now), now[0].delivery_count), (vec![1], 2));

    f.nack("n", vec![2], 1500).await.unwrap();
    assert!(f.fetch("n", 10).await.is_empty(), "not before its delay");
    let later = f.fetch_within("n", 10, Duration::from_secs(10)).await;
    assert_eq!((sequences(&later), later[0].delivery_count), (vec![2], 2));

    let not_held = f.nack("n", vec![2, 3], 0).await.unwrap_err();
    assert_eq!(not_held.code(), Code::FailedPrecondition);
    assert!(not_held.message().contains("[3]"), "{}", not_held.message());
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn a_slow_worker_extending_its_lease_keeps_its_message_for_five_lease_times() {
    let mut f = fixture("extend").await;
    f.create(
        "slow",
        ConsumerConfig {
            ack_wait_ms: Some(300),
            ..config()
        },
    )
    .await;
    f.publish(b"large work").await;
    f.publish(b"next").await;
    assert_eq!(sequences(&f.fetch("slow", 1).await), vec![1]);
    // Five lease times, extended by ack_wait each time before it runs out:
    // nobody else gets the message meanwhile.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let before = std::time::SystemTime::now();
        let deadline = f.extend("slow", vec![1], 0).await.unwrap();
        let lease = deadline.duration_since(before).unwrap();
        assert!(
            lease > Duration::from_millis(200) && lease < Duration::from_millis(1300),
            "{lease:?}"
        );
        // Another worker of the same durable gets #2 (again and again, as
        // nobody acks it), never #1.
        let others = sequences(&f.fetch("slow", 10).await);
        assert!(!others.contains(&1), "#1 delivered again: {others:?}");
    }
    // Longer than ack_wait when asked, and back to ack_wait.
    let deadline = f.extend("slow", vec![1], 60_000).await.unwrap();
    let lease = deadline
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(lease > Duration::from_secs(55), "{lease:?}");
    assert_eq!(f.ack_each("slow", vec![1]).await.unwrap(), 1);

    // What cannot be extended.
    let too_long = f.extend("slow", vec![2], 43_200_001).await.unwrap_err();
    assert_eq!(too_long.code(), Code::InvalidArgument);
    assert!(
        too_long.message().contains("extend_ms"),
        "{}",
        too_long.message()
    );
    let none = f.extend("slow", vec![], 0).await.unwrap_err();
    assert_eq!(none.code(), Code::InvalidArgument);
    let acked = f.extend("slow", vec![1], 0).await.unwrap_err();
    assert_eq!(acked.code(), Code::FailedPrecondition);
    assert!(acked.message().contains("[1]"), "{}", acked.message());
    let unknown = f.extend("nobody", vec![1], 0).await.unwrap_err();
    assert_eq!(unknown.code(), Code::FailedPrecondition);
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn seeking_a_consumer_back_redelivers_and_forward_skips() {
    let mut f = fixture("seek").await;
    f.create("d", config()).await;
    for data in [b"a", b"b", b"c"] {
        f.publish(data).await;
    }
    assert_eq!(sequences(&f.fetch("d", 10).await), vec![1, 2, 3]);
    f.ack_each("d", vec![1, 2, 3]).await.unwrap();
    let (client, subject) = (f.client.clone(), f.subject.clone());
    let seek = |to: Option<To>, durable: &str| {
        let (mut client, subject, durable) = (client.clone(), subject.clone(), durable.to_owned());
        async move {
            client
                .seek_consumer(SeekConsumerRequest {
                    subject,
                    durable_name: durable,
                    to,
                })
                .await
                .map(|r| r.into_inner())
        }
    };
    let info = seek(Some(To::Sequence(2)), "d").await.unwrap();
    assert_eq!(
        (info.ack_floor, info.num_pending, info.num_ack_pending),
        (1, 2, 0)
    );
    let again = f.fetch("d", 10).await;
    assert_eq!(sequences(&again), vec![2, 3]);
    assert_eq!(again[0].delivery_count, 1, "delivered anew");
    // To the end: the next message published is the next delivered.
    let info = seek(Some(To::Sequence(4)), "d").await.unwrap();
    assert_eq!((info.ack_floor, info.num_ack_pending), (3, 0));
    assert!(f.fetch("d", 10).await.is_empty());

    let beyond = seek(Some(To::Sequence(5)), "d").await.unwrap_err();
    assert_eq!(beyond.code(), Code::OutOfRange);
    assert!(
        beyond.message().contains("seek to 4 at most"),
        "{}",
        beyond.message()
    );
    for to in [None, Some(To::Sequence(0))] {
        assert_eq!(
            seek(to, "d").await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }
    let unknown = seek(Some(To::Sequence(1)), "nobody").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn max_deliver_sends_a_message_to_the_dead_letter_subject() {
    let mut f = fixture("dlq").await;
    let object_store = ObjectStore::new(&f.config);
    let dlq = format!("{}.dlq", f.subject);
    let info = f
        .create(
            "d",
            ConsumerConfig {
                ack_wait_ms: Some(60_000),
                max_deliver: Some(2),
                ..config()
            },
        )
        .await;
    assert_eq!(
        info.config.unwrap().dead_letter_subject.as_deref(),
        Some(dlq.as_str())
    );

    // A large message: its payload lives in S3, and the dead letter must share it.
    let payload: Vec<u8> = (0..400_000u32).map(|i| (i % 253) as u8).collect();
    let headers = HashMap::from([("kind".to_string(), "big".to_string())]);
    let key = f.publish_offloaded(&payload, &headers).await;

    for delivery in 1..=2 {
        let got = f.fetch("d", 1).await;
        assert_eq!(
            (sequences(&got), got[0].delivery_count),
            (vec![1], delivery)
        );
        f.nack("d", vec![1], 0).await.unwrap();
    }
    assert!(
        f.fetch("d", 1).await.is_empty(),
        "the third attempt goes to the dead-letter subject"
    );
    let info = f.info("d").await.unwrap();
    assert_eq!(
        (info.ack_floor, info.num_ack_pending),
        (1, 0),
        "acked on the original consumer"
    );

    let mut dead = crate::support::fixture("dlq-reader").await;
    dead.subject = dlq.clone();
    let letters = dead.fetch("inspector", 10).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.headers["mts-origin-subject"], f.subject);
    assert_eq!(letter.headers["mts-origin-sequence"], "1");
    assert_eq!(letter.headers["mts-origin-durable"], "d");
    assert_eq!(letter.headers["mts-origin-delivery-count"], "2");
    assert_eq!(letter.headers["kind"], "big");
    assert_eq!(
        letter.data.as_ref(),
        payload.as_slice(),
        "the payload is still readable"
    );
    assert_eq!(
        object_store
            .list_keys(&format!("{}/", f.subject))
            .await
            .unwrap(),
        vec![key],
        "no second copy"
    );
    dead.service.stop().await.unwrap();
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn consumer_info_is_exact_after_a_scripted_sequence() {
    let mut f = fixture("info").await;
    let created = f
        .create(
            "c",
            ConsumerConfig {
                ack_wait_ms: Some(60_000),
                max_ack_pending: Some(50),
                ..config()
            },
        )
        .await;
    assert!(created.created_now);
    assert_eq!(
        (
            created.ack_floor,
            created.last_delivered,
            created.num_pending
        ),
        (0, 0, 0)
    );
    for i in 0..10u8 {
        f.publish(&[i]).await;
    }
    assert_eq!(sequences(&f.fetch("c", 4).await), vec![1, 2, 3, 4]);
    f.ack_each("c", vec![2]).await.unwrap();
    f.nack("c", vec![3], 60_000).await.unwrap();
    let info = f.info("c").await.unwrap();
    assert_eq!(
        (
            info.ack_floor,
            info.last_delivered,
            info.num_pending,
            info.num_ack_pending,
            info.num_redelivered,
            info.last_sequence
        ),
        (0, 4, 6, 3, 0, 10)
    );
    assert!(info.oldest_unacked_age_ms < 60_000, "{info:?}");

    f.nack("c", vec![1], 0).await.unwrap();
    let redelivered = f.fetch("c", 1).await;
    assert_eq!(
        (sequences(&redelivered), redelivered[0].delivery_count),
        (vec![1], 2)
    );
    let info = f.info("c").await.unwrap();
    assert_eq!((info.num_ack_pending, info.num_redelivered), (3, 1));

    assert_eq!(
        f.ack_each("c", vec![1, 4]).await.unwrap(),
        2,
        "floor stops below pending 3"
    );
    let info = f.info("c").await.unwrap();
    assert_eq!(
        (
            info.ack_floor,
            info.last_delivered,
            info.num_pending,
            info.num_ack_pending,
            info.num_redelivered
        ),
        (2, 4, 6, 1, 0)
    );

    let not_held = f.ack_each("c", vec![3, 4]).await.unwrap_err();
    assert_eq!(not_held.code(), Code::FailedPrecondition);
    assert!(not_held.message().contains("[4]"), "{}", not_held.message());
    assert_eq!(
        f.info("c").await.unwrap().num_ack_pending,
        1,
        "a refused ack acks nothing"
    );
    let empty = f.ack_each("c", vec![]).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn consumers_are_created_updated_and_deleted() {
    let mut f = fixture("manage").await;
    for i in 0..5u8 {
        f.publish(&[i]).await;
    }
    let missing = f.info("nobody").await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let info = f
        .create(
            "m",
            ConsumerConfig {
                ack_wait_ms: Some(1000),
                ..config()
            },
        )
        .await;
    assert!(info.created_now);
    let defaults = info.config.unwrap();
    assert_eq!(
        (
            defaults.ack_wait_ms,
            defaults.max_deliver,
            defaults.max_ack_pending
        ),
        (Some(1000), Some(5), Some(1000))
    );
    let updated = f
        .create(
            "m",
            ConsumerConfig {
                ack_wait_ms: Some(2000),
                max_deliver: Some(0),
                ..config()
            },
        )
        .await;
    assert!(!updated.created_now);
    let settings = updated.config.unwrap();
    assert_eq!(
        (settings.ack_wait_ms, settings.max_deliver),
        (Some(2000), Some(0))
    );

    let new_only = f
        .create(
            "later",
            ConsumerConfig {
                deliver_policy: DeliverPolicy::DeliverNew.into(),
                ..config()
            },
        )
        .await;
    assert_eq!(new_only.ack_floor, 5);
    assert!(f.fetch("later", 10).await.is_empty());
    let from_three = f
        .create(
            "from3",
            ConsumerConfig {
                deliver_policy: DeliverPolicy::DeliverByStartSequence.into(),
                start_sequence: 3,
                ..config()
            },
        )
        .await;
    assert_eq!(sequences(&f.fetch("from3", 10).await), vec![3, 4, 5]);
    assert_eq!(from_three.num_pending, 3);
    let stamp = f.fetch("m", 10).await[3].timestamp.unwrap();
    let by_time = f
        .create(
            "bytime",
            ConsumerConfig {
                deliver_policy: DeliverPolicy::DeliverByStartTime.into(),
                start_time: Some(stamp),
                ..config()
            },
        )
        .await;
    assert_eq!(by_time.ack_floor, 3);

    let deleted = f
        .client
        .delete_consumer(ConsumerRequest {
            subject: f.subject.clone(),
            durable_name: "m".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.deleted);
    assert_eq!(f.info("m").await.unwrap_err().code(), Code::NotFound);
    let again = f
        .client
        .delete_consumer(ConsumerRequest {
            subject: f.subject.clone(),
            durable_name: "m".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);

    let bad = f
        .client
        .create_or_update_consumer(CreateOrUpdateConsumerRequest {
            subject: f.subject.clone(),
            durable_name: "bad".into(),
            config: Some(ConsumerConfig {
                ack_wait_ms: Some(1),
                ..config()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().contains("config.ack_wait_ms"),
        "{}",
        bad.message()
    );
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn an_egress_restart_keeps_every_consumer_state() {
    let mut f = fixture("egress-restart").await;
    f.create(
        "keep",
        ConsumerConfig {
            ack_wait_ms: Some(60_000),
            ..config()
        },
    )
    .await;
    for i in 0..6u8 {
        f.publish(&[i]).await;
    }
    assert_eq!(sequences(&f.fetch("keep", 4).await), vec![1, 2, 3, 4]);
    f.ack_each("keep", vec![1, 3]).await.unwrap();
    let before = f.info("keep").await.unwrap();

    f.service.stop().await.unwrap();
    f.service = Running::start(EGRESS, f.config.clone(), mts_egress::run).await;
    f.client =
        mts_proto::pb::egress_service_client::EgressServiceClient::connect(f.service.endpoint())
            .await
            .unwrap();

    let after = f.info("keep").await.unwrap();
    assert_eq!(
        (
            after.ack_floor,
            after.last_delivered,
            after.num_pending,
            after.num_ack_pending,
            after.config
        ),
        (
            before.ack_floor,
            before.last_delivered,
            before.num_pending,
            before.num_ack_pending,
            before.config
        )
    );
    assert_eq!(
        sequences(&f.fetch("keep", 10).await),
        vec![5, 6],
        "leases held across the restart"
    );
    f.service.stop().await.unwrap();
}
