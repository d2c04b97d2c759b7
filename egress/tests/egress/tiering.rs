//! The cold tier end to end: the egress moves hot messages into segment
//! objects in the real S3 server, and every read — Fetch, FetchPayload,
//! replay by sequence and by time, dead-lettering — answers as it did while
//! they were hot. Each test runs its own Tarantool and bucket.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use mts_config::Config;
use mts_proto::pb::{
    ConsumerConfig, ConsumerRequest, CreateOrUpdateConsumerRequest, DeliverPolicy,
    FetchPayloadRequest, FetchRequest, Message, RejectRequest, SeekConsumerRequest, SubjectLimits,
    seek_consumer_request::To,
};
use mts_proto::service_names::EGRESS;
use mts_storage::store::{Refusal, Store};
use mts_testkit::{self as testing, LossyProxy, Running};

use crate::maintenance::{Isolated, isolated};

/// Segments sealed within a fraction of a second, and small, so that a test
/// makes many.
fn eager(config: &mut Config) {
    config.tiering.segment_seal_age_ms = 200;
    config.tiering.segment_max_bytes = 32 * 1024;
}

/// What message `n` of a test holds.
fn payload(n: u64) -> Vec<u8> {
    let len = (n as usize * 37) % 700;
    (0..len).map(|i| (i as u64 * 31 + n) as u8).collect()
}

/// Publishes messages 1..=n, every 50th offloaded; returns the objects.
async fn publish_numbered(t: &Isolated, subject: &str, n: u64) -> Vec<String> {
    let mut objects = Vec::new();
    for i in 1..=n {
        let data = payload(i);
        let headers = HashMap::from([("n".to_owned(), i.to_string())]);
        let seq = if i % 50 == 0 {
            let key = t.new_key(subject);
            t.object_store.put(&key, data.clone().into()).await.unwrap();
            objects.push(key.clone());
            t.store
                .publish(subject, &headers, None, Some(&key), data.len() as u64)
                .await
                .unwrap()
        } else {
            t.store
                .publish(subject, &headers, Some(&data), None, data.len() as u64)
                .await
                .unwrap()
        };
        assert_eq!(seq, i);
    }
    objects
}

async fn wait_all_cold(t: &Isolated, subject: &str, n: u64) {
    testing::eventually("every message in a segment", || async {
        t.info(subject).await.cold_messages == n
    })
    .await;
}

async fn fetch(t: &Isolated, subject: &str, durable: &str, batch: i32) -> Vec<Message> {
    let stream = t
        .client
        .clone()
        .fetch(FetchRequest {
            subject: subject.into(),
            durable_name: durable.into(),
            batch_size: batch,
            omit_large_payloads: false,
        })
        .await
        .unwrap()
        .into_inner();
    stream.map(|m| m.unwrap()).collect().await
}

fn check(message: &Message) {
    let n = message.sequence;
    assert_eq!(message.data, payload(n), "payload of {n}");
    assert_eq!(message.headers["n"], n.to_string(), "headers of {n}");
    assert_eq!(message.size, payload(n).len() as u64);
    assert!(message.timestamp.is_some());
}

async fn start_consumer(t: &Isolated, subject: &str, durable: &str, config: ConsumerConfig) {
    t.client
        .clone()
        .create_or_update_consumer(CreateOrUpdateConsumerRequest {
            subject: subject.into(),
            durable_name: durable.into(),
            config: Some(config),
        })
        .await
        .unwrap();
}

/// How many segment objects `subject` has.
async fn segment_count(t: &Isolated, subject: &str) -> usize {
    t.keys_of(subject)
        .await
        .into_iter()
        .filter(|k| k.contains("/segments/"))
        .count()
}

/// Replays `subject` from its first sequence with Fetch batches of `batch`
/// on a consumer without a limit on pending messages, checking each message
/// and its order; returns how many there were.
async fn replay_all(t: &Isolated, subject: &str, batch: i32) -> u64 {
    start_consumer(
        t,
        subject,
        "replay",
        ConsumerConfig {
            max_ack_pending: Some(0),
            ..ConsumerConfig::default()
        },
    )
    .await;
    let mut seen = 0;
    loop {
        let messages = fetch(t, subject, "replay", batch).await;
        if messages.is_empty() {
            return seen;
        }
        for message in &messages {
            seen += 1;
            assert_eq!(message.sequence, seen);
            check(message);
        }
    }
}

#[tokio::test]
async fn messages_in_segments_read_back_exactly_as_published() {
    let t = isolated(eager).await;
    let subject = testing::unique_subject("cold");
    let n = 1200;
    let objects = publish_numbered(&t, &subject, n).await;
    wait_all_cold(&t, &subject, n).await;
    let info = t.info(&subject).await;
    assert_eq!(
        (info.first_sequence, info.last_sequence, info.messages),
        (1, n, n)
    );
    let segments = segment_count(&t, &subject).await;
    assert!(segments > 3, "small segments: {segments}");
    let (hot,): (u64,) = t
        .tarantool
        .admin_client()
        .await
        .eval("return box.space.mts_messages:len()", ())
        .await
        .unwrap();
    assert_eq!(hot, 0, "no hot rows left");

    // A consumer replays everything from the first sequence, in order.
    assert_eq!(replay_all(&t, &subject, 500).await, n);

    // FetchPayload of an inline and an offloaded message in segments.
    for seq in [7, 100] {
        let chunks: Vec<_> = t
            .client
            .clone()
            .fetch_payload(FetchPayloadRequest {
                subject: subject.clone(),
                sequence: seq,
                offset: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .map(|c| c.unwrap())
            .collect()
            .await;
        let data: Vec<u8> = chunks.iter().flat_map(|c| c.data.to_vec()).collect();
        assert_eq!(data, payload(seq), "FetchPayload of {seq}");
    }
    // The offloaded payloads are still there: segments name them.
    for key in &objects {
        assert!(t.object_store.exists(key).await.unwrap(), "{key}");
    }

    // Replay by sequence and by time start at the exact message.
    start_consumer(
        &t,
        &subject,
        "from-700",
        ConsumerConfig {
            deliver_policy: DeliverPolicy::DeliverByStartSequence.into(),
            start_sequence: 700,
            ..ConsumerConfig::default()
        },
    )
    .await;
    assert_eq!(fetch(&t, &subject, "from-700", 1).await[0].sequence, 700);
    let at_555 = t.store.message(&subject, 555).await.unwrap().unwrap();
    assert!(at_555.segment.is_some(), "555 is in a segment");
    let stamped = fetch(&t, &subject, "stamp", 1000).await;
    for target in [555u64, 1, 1000] {
        let time = stamped[target as usize - 1].timestamp.unwrap();
        let previous = (target > 1).then(|| stamped[target as usize - 2].timestamp.unwrap());
        let durable = format!("from-time-{target}");
        start_consumer(
            &t,
            &subject,
            &durable,
            ConsumerConfig {
                deliver_policy: DeliverPolicy::DeliverByStartTime.into(),
                start_time: Some(time),
                ..ConsumerConfig::default()
            },
        )
        .await;
        let first = fetch(&t, &subject, &durable, 1).await[0].sequence;
        // Messages committed in the same nanosecond tie; the first of them starts.
        if previous != Some(time) {
            assert_eq!(first, target, "start time of message {target}");
        } else {
            assert!(first < target);
        }
    }
}

#[tokio::test]
async fn retention_removes_whole_segments_with_their_objects() {
    let mut t = isolated(eager).await;
    let subject = testing::unique_subject("cold-retention");
    let n = 600;
    let objects = publish_numbered(&t, &subject, n).await;
    wait_all_cold(&t, &subject, n).await;
    let before = t.keys_of(&subject).await.len();
    t.limit(
        &subject,
        SubjectLimits {
            max_messages: Some(100),
            ..SubjectLimits::default()
        },
    )
    .await;
    testing::eventually("old segments dropped", || async {
        let info = t.info(&subject).await;
        info.messages < n && info.messages >= 100
    })
    .await;
    let info = t.info(&subject).await;
    // Whole segments only: what is left starts at a segment's first message
    // and keeps at least the newest 100.
    assert_eq!(info.last_sequence, n);
    assert_eq!(info.messages, n - info.first_sequence + 1);
    assert!(info.messages < 100 + 200, "{info:?}");
    let oldest = fetch(&t, &subject, "after-retention", 1).await;
    assert_eq!(oldest[0].sequence, info.first_sequence);
    check(&oldest[0]);
    testing::eventually("objects of dropped segments deleted", || async {
        t.keys_of(&subject).await.len() < before
    })
    .await;
    // Offloaded payloads named only by dropped segments went with them;
    // those of kept messages stayed.
    testing::eventually("payloads of dropped messages deleted", || async {
        let mut fine = true;
        for (i, key) in objects.iter().enumerate() {
            let seq = (i as u64 + 1) * 50;
            let kept = seq >= info.first_sequence;
            fine &= t.object_store.exists(key).await.unwrap() == kept;
        }
        fine
    })
    .await;
}

#[tokio::test]
async fn a_message_in_a_segment_is_dead_lettered_with_its_payload() {
    let t = isolated(eager).await;
    let subject = testing::unique_subject("cold-dlq");
    publish_numbered(&t, &subject, 3).await;
    wait_all_cold(&t, &subject, 3).await;
    start_consumer(
        &t,
        &subject,
        "fragile",
        ConsumerConfig {
            ack_wait_ms: Some(100),
            max_deliver: Some(1),
            ..ConsumerConfig::default()
        },
    )
    .await;
    assert_eq!(fetch(&t, &subject, "fragile", 10).await.len(), 3);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Every lease ran out at its last delivery: dead-lettered, not delivered.
    assert!(fetch(&t, &subject, "fragile", 10).await.is_empty());
    let dlq = format!("{subject}.dlq");
    let copies = fetch(&t, &dlq, "dlq-reader", 10).await;
    assert_eq!(copies.len(), 3);
    for copy in &copies {
        let origin: u64 = copy.headers["mts-origin-sequence"].parse().unwrap();
        assert_eq!(copy.data, payload(origin));
        assert_eq!(copy.headers["n"], origin.to_string());
        assert_eq!(copy.headers["mts-origin-durable"], "fragile");
    }
}

#[tokio::test]
async fn a_rejected_message_in_a_segment_is_dead_lettered_with_its_payload_and_reason() {
    let t = isolated(eager).await;
    let subject = testing::unique_subject("cold-reject");
    publish_numbered(&t, &subject, 3).await;
    wait_all_cold(&t, &subject, 3).await;
    start_consumer(&t, &subject, "picky", ConsumerConfig::default()).await;
    assert_eq!(fetch(&t, &subject, "picky", 10).await.len(), 3);
    let reject = |sequences: Vec<u64>| {
        let mut client = t.client.clone();
        let subject = subject.clone();
        async move {
            client
                .reject(RejectRequest {
                    subject,
                    durable_name: "picky".into(),
                    sequences,
                    reason: "schema v1 is gone".into(),
                })
                .await
        }
    };
    let floor = reject(vec![1, 3]).await.unwrap().into_inner().ack_floor;
    assert_eq!(floor, 1);
    let dlq = format!("{subject}.dlq");
    let copies = fetch(&t, &dlq, "dlq-reader", 10).await;
    let origins: Vec<u64> = copies
        .iter()
        .map(|c| c.headers["mts-origin-sequence"].parse().unwrap())
        .collect();
    assert_eq!(origins, [1, 3]);
    for copy in &copies {
        let origin: u64 = copy.headers["mts-origin-sequence"].parse().unwrap();
        assert_eq!(copy.data, payload(origin));
        assert_eq!(copy.headers["n"], origin.to_string());
        assert_eq!(copy.headers["mts-reject-reason"], "schema v1 is gone");
    }
    let info = t
        .client
        .clone()
        .get_consumer_info(ConsumerRequest {
            subject: subject.clone(),
            durable_name: "picky".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.num_rejected, info.num_ack_pending), (2, 1));
    let again = reject(vec![3]).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    reject(vec![2]).await.unwrap();
    let long = t
        .client
        .clone()
        .reject(RejectRequest {
            subject: subject.clone(),
            durable_name: "picky".into(),
            sequences: vec![2],
            reason: "x".repeat(1025),
        })
        .await
        .unwrap_err();
    assert_eq!(long.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn a_consumer_seeks_by_time_to_the_exact_message_in_a_segment() {
    let t = isolated(eager).await;
    let subject = testing::unique_subject("cold-seek");
    publish_numbered(&t, &subject, 20).await;
    wait_all_cold(&t, &subject, 20).await;
    start_consumer(&t, &subject, "replay", ConsumerConfig::default()).await;
    let all = fetch(&t, &subject, "replay", 100).await;
    assert_eq!(all.len(), 20);
    let target = &all[12];
    let info = t
        .client
        .clone()
        .seek_consumer(SeekConsumerRequest {
            subject: subject.clone(),
            durable_name: "replay".into(),
            to: Some(To::Time(target.timestamp.unwrap())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.num_ack_pending, 0, "its leases dropped");
    let from = fetch(&t, &subject, "replay", 100).await;
    // The first message committed at or after the target's time (messages
    // committed in the same instant come with it).
    let first = from.first().unwrap().sequence;
    assert!(first <= target.sequence, "{first}");
    let ns = |m: &Message| {
        let at = m.timestamp.unwrap();
        i128::from(at.seconds) * 1_000_000_000 + i128::from(at.nanos)
    };
    assert!(all[..first as usize - 1].iter().all(|m| ns(m) < ns(target)));
    assert_eq!(from.last().unwrap().sequence, 20);
    for message in &from {
        check(message);
    }
}

#[tokio::test]
async fn the_hot_tier_fills_while_the_object_store_is_down_and_drains_when_it_is_back() {
    let garage = testing::config();
    let endpoint = garage.object_store.endpoint.clone();
    let target = endpoint
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .to_owned();
    let proxy = LossyProxy::start(target).await;
    let tarantool = mts_testkit::TarantoolProcess::start();
    let mut config = tarantool.config();
    config.object_store.endpoint = format!("http://{}", proxy.address());
    config.object_store.timeout_ms = 1000;
    config.object_store.bucket_name = format!("mts-{}", uuid::Uuid::now_v7().simple());
    config.egress.maintenance_interval_ms = 100;
    config.tiering.hot_tier_max_messages = 200;
    eager(&mut config);
    let service = Running::start(EGRESS, config.clone(), mts_egress::run).await;
    let store = Store::connect(&config).await.unwrap();
    proxy.refuse_connections(true);
    proxy.sever();

    let subject = testing::unique_subject("full");
    let mut stored = 0u64;
    let refused = loop {
        match store
            .publish(&subject, &HashMap::new(), Some(b"x"), None, 1)
            .await
        {
            Ok(_) => stored += 1,
            Err(err) => break err,
        }
        assert!(stored <= 200, "the hot tier holds no more than its budget");
    };
    assert_eq!(refused.refusal(), Some(Refusal::HotFull), "{refused}");
    assert!(
        stored >= 100,
        "tiering under pressure cannot drain: {stored}"
    );
    // Reads keep working while full.
    let reader = Store::connect(&config).await.unwrap();
    let batch = reader.fetch(&subject, "reader", 1000).await.unwrap();
    assert_eq!(batch.messages.len() as u64, stored);

    proxy.refuse_connections(false);
    testing::eventually("publishing again once segments drain", || async {
        store
            .publish(&subject, &HashMap::new(), Some(b"y"), None, 1)
            .await
            .is_ok()
    })
    .await;
    let info = store.subject_info(&subject).await.unwrap();
    assert!(info.cold_count > 0, "{info:?}");
    assert_eq!(info.count, info.last_seq, "nothing was lost");
    service.stop().await.unwrap();
}

#[tokio::test]
async fn the_maintenance_replica_exports_the_tiers() {
    let port = testing::free_port();
    let t = isolated(|c| {
        eager(c);
        c.server.metrics_port = port;
    })
    .await;
    let subject = testing::unique_subject("tier-gauges");
    publish_numbered(&t, &subject, 60).await;
    wait_all_cold(&t, &subject, 60).await;
    testing::eventually("tier gauges", || async {
        let text = testing::scrape_metrics(port).await;
        let value = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        };
        value("minitoolstream_cold_tier_segments").is_some_and(|v| v >= 1.0)
            && value("minitoolstream_segments_written_total").is_some_and(|v| v >= 1.0)
            && value("minitoolstream_hot_tier_messages") == Some(0.0)
            && value("minitoolstream_hot_tier_budget_messages").is_some_and(|v| v > 0.0)
            && value("minitoolstream_tarantool_quota_bytes").is_some_and(|v| v > 0.0)
    })
    .await;
}

#[tokio::test]
async fn over_half_its_budget_the_hot_tier_moves_whatever_is_there() {
    // Default segment sizes and seal age: only the pressure moves these.
    let t = isolated(|c| c.tiering.hot_tier_max_messages = 200).await;
    let subject = testing::unique_subject("pressure");
    publish_numbered(&t, &subject, 150).await;
    // Drained to below half the budget; what came after may stay hot until
    // its segment is due by size or age.
    testing::eventually("the hot tier below half its budget", || async {
        let info = t.info(&subject).await;
        info.messages - info.cold_messages < 100 && info.cold_messages > 0
    })
    .await;
    let info = t.info(&subject).await;
    assert_eq!(info.messages, 150);
}

#[tokio::test]
async fn a_replay_reads_each_segment_from_the_object_store_once() {
    let port = testing::free_port();
    let t = isolated(|c| {
        eager(c);
        c.server.metrics_port = port;
    })
    .await;
    let subject = testing::unique_subject("read-once");
    let n = 1200;
    publish_numbered(&t, &subject, n).await;
    wait_all_cold(&t, &subject, n).await;
    let segments = segment_count(&t, &subject).await;
    assert!(segments > 3, "small segments: {segments}");
    // Batches that end inside segments and span them, so that readers and
    // reads ahead of them meet in the middle of segments.
    assert_eq!(replay_all(&t, &subject, 70).await, n);
    let text = testing::scrape_metrics(port).await;
    let ranged_gets: u64 = text
        .lines()
        .filter(|l| {
            l.starts_with("minitoolstream_dependency_call_duration_seconds_count")
                && l.contains("GetObjectRange")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    // A segment is far smaller than one GET's range: one GET each, none
    // past its end and none again for a block being read already.
    assert_eq!(ranged_gets, segments as u64, "{text}");
}

#[tokio::test]
async fn a_purge_ending_inside_a_segment_counts_exactly_and_keeps_the_rest_readable() {
    let t = isolated(eager).await;
    let subject = testing::unique_subject("purge-cold");
    let objects = publish_numbered(&t, &subject, 120).await;
    wait_all_cold(&t, &subject, 120).await;
    let purged = t
        .client
        .clone()
        .purge_subject(mts_proto::pb::PurgeSubjectRequest {
            subject: subject.clone(),
            through_sequence: 75,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(purged.purged, 75);
    let info = purged.subject.unwrap();
    let kept_bytes: u64 = (76..=120).map(|n| payload(n).len() as u64).sum();
    assert_eq!(
        (
            info.first_sequence,
            info.messages,
            info.bytes,
            info.cold_bytes
        ),
        (76, 45, kept_bytes, kept_bytes)
    );
    // Message 50's payload went with it; 100's stays.
    testing::eventually("the purged message's payload object deleted", || async {
        !t.object_store.exists(&objects[0]).await.unwrap()
    })
    .await;
    assert!(t.object_store.exists(&objects[1]).await.unwrap());
    start_consumer(&t, &subject, "after", ConsumerConfig::default()).await;
    let mut seen = Vec::new();
    loop {
        let messages = fetch(&t, &subject, "after", 50).await;
        if messages.is_empty() {
            break;
        }
        for message in &messages {
            check(message);
            seen.push(message.sequence);
        }
    }
    assert_eq!(seen, (76..=120).collect::<Vec<_>>());
    t.service.stop().await.unwrap();
}

#[tokio::test]
async fn ordering_keys_hold_for_messages_in_segments() {
    let t = isolated(eager).await;
    let subject = testing::unique_subject("keys-cold");
    // 1..=90: keys k0, k1, k2 in turn, every tenth without a key.
    for i in 1..=90u64 {
        let mut headers = HashMap::from([("n".to_owned(), i.to_string())]);
        if i % 10 != 0 {
            headers.insert(
                mts_storage::store::ORDERING_KEY_HEADER.to_owned(),
                format!("k{}", i % 3),
            );
        }
        let data = payload(i);
        t.store
            .publish(&subject, &headers, Some(&data), None, data.len() as u64)
            .await
            .unwrap();
    }
    wait_all_cold(&t, &subject, 90).await;
    start_consumer(
        &t,
        &subject,
        "keyed",
        ConsumerConfig {
            max_ack_pending: Some(0),
            ..ConsumerConfig::default()
        },
    )
    .await;
    let mut seen = Vec::new();
    loop {
        let batch = fetch(&t, &subject, "keyed", 100).await;
        if batch.is_empty() {
            break;
        }
        let seqs: Vec<u64> = batch.iter().map(|m| m.sequence).collect();
        if seen.is_empty() {
            // The first of each key, and every message without one.
            let mut first: Vec<u64> = vec![1, 2, 3];
            first.extend((10..=90).step_by(10));
            assert_eq!(seqs, first);
        }
        for message in &batch {
            check(message);
            seen.push(message.sequence);
        }
        t.client
            .clone()
            .ack(mts_proto::pb::AckSequencesRequest {
                subject: subject.clone(),
                durable_name: "keyed".into(),
                sequences: seqs,
            })
            .await
            .unwrap();
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=90).collect::<Vec<_>>(), "each message once");
    for key in 0..3 {
        let of_key: Vec<u64> = seen
            .iter()
            .copied()
            .filter(|s| s % 10 != 0 && s % 3 == key)
            .collect();
        assert!(
            of_key.windows(2).all(|w| w[0] < w[1]),
            "k{key} in order: {of_key:?}"
        );
    }
    t.service.stop().await.unwrap();
}
