//! The hot and cold tiers with both services: a Tarantool far too small to
//! hold what is published takes all of it, and every message reads back by
//! sequence and by time; crashes of Tarantool and of the egress doing the
//! tiering, at any step, lose and double nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mts_config::Config;
use mts_proto::pb::{
    AckSequencesRequest, ConsumerConfig, CreateOrUpdateConsumerRequest, DeliverPolicy, Message,
    PublishRequest,
};
use mts_proto::service_names::EGRESS;
use mts_testkit::{self as testing, Running, TarantoolProcess};
use tokio_stream::wrappers::ReceiverStream;

use crate::system::System;

/// Every this many messages one is large: its payload goes to the object
/// store, and a segment names it.
const LARGE_EVERY: u64 = 25_000;

/// Message `id`'s payload: 1 KiB, or 300 KiB for every LARGE_EVERY-th.
fn payload(id: u64) -> Vec<u8> {
    let words = if id.is_multiple_of(LARGE_EVERY) {
        300 * 128
    } else {
        128
    };
    let mut data = id.to_le_bytes().repeat(words);
    data[0] ^= 0x5a;
    data
}

/// Message `id`, without a message id: a publish refused for room stored
/// nothing, so sending it again cannot store it twice.
fn request(subject: &str, id: u64) -> PublishRequest {
    PublishRequest {
        subject: subject.into(),
        data: payload(id).into(),
        headers: HashMap::from([("id".to_owned(), id.to_string())]),
        message_id: String::new(),
        ordering_key: String::new(),
    }
}

/// Publishes `ids` on one PublishMany stream, 64 in flight; publishes
/// refused for room (the hot tier full) are sent again later. Returns how
/// many were refused along the way.
async fn publish_all(system: &System, subject: String, ids: Vec<u64>) -> u64 {
    let mut refused = 0;
    let mut todo = ids;
    while !todo.is_empty() {
        let mut publisher = system.publisher().await;
        let (send, receive) = tokio::sync::mpsc::channel(64);
        let mut answers = publisher
            .publish_many(ReceiverStream::new(receive))
            .await
            .unwrap()
            .into_inner();
        let sending = {
            let subject = subject.clone();
            let todo = todo.clone();
            tokio::spawn(async move {
                for id in todo {
                    if send.send(request(&subject, id)).await.is_err() {
                        return;
                    }
                }
            })
        };
        let mut again = Vec::new();
        for id in &todo {
            let answer = answers.next().await.unwrap().unwrap();
            match answer.status_code {
                0 => {}
                8 => again.push(*id),
                code => panic!("message {id}: {code} {}", answer.error_message),
            }
        }
        sending.await.unwrap();
        refused += again.len() as u64;
        if !again.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        todo = again;
    }
    refused
}

async fn eval_u64(tarantool: &TarantoolProcess, lua: &str) -> u64 {
    let (value,): (u64,) = tarantool.admin_client().await.eval(lua, ()).await.unwrap();
    value
}

/// Reads the whole subject from sequence 1 with one consumer, acking each
/// batch; checks every message against the id it carries.
async fn read_all(system: &System, subject: &str, durable: &str) -> Vec<Message> {
    let mut egress = system.subscriber().await;
    let mut all = Vec::new();
    loop {
        let batch = system.fetch(subject, durable, 1000).await;
        if batch.is_empty() {
            return all;
        }
        let sequences: Vec<u64> = batch.iter().map(|m| m.sequence).collect();
        egress
            .ack(AckSequencesRequest {
                subject: subject.into(),
                durable_name: durable.into(),
                sequences,
            })
            .await
            .unwrap();
        for message in batch {
            let id: u64 = message.headers["id"].parse().unwrap();
            assert_eq!(message.data, payload(id), "payload of message {id}");
            all.push(Message {
                data: Default::default(),
                ..message
            });
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_tarantool_takes_far_more_messages_than_fit_in_its_memory() {
    let tarantool = TarantoolProcess::start_with_memtx(64 << 20);
    let config = tarantool.config();
    let system = System::start(config.clone()).await;
    let subject = testing::unique_subject("capacity");
    // Eight times Tarantool's memory in 1 KiB messages, and some large ones.
    let n: u64 = 500_000;
    let started = Instant::now();
    let streams: Vec<_> = (0..4u64)
        .map(|p| {
            let ids = (1..=n).filter(|id| id % 4 == p).collect();
            publish_all(&system, subject.clone(), ids)
        })
        .collect();
    let refused: u64 = futures::future::join_all(streams).await.into_iter().sum();
    eprintln!(
        "published {n} x 1 KiB in {:?}; {refused} refused for room and sent again",
        started.elapsed()
    );
    let offloaded = eval_u64(
        &tarantool,
        &format!("return box.space.mts_object_refs.index.message:count({{'{subject}'}})"),
    )
    .await;
    assert_eq!(
        offloaded,
        n / LARGE_EVERY,
        "each large payload offloaded and named"
    );
    let hot_bytes = eval_u64(&tarantool, "return box.space.mts_messages:bsize()").await;
    let arena = eval_u64(&tarantool, "return box.slab.info().arena_used").await;
    eprintln!("hot tier {hot_bytes} bytes; memtx arena in use {arena} bytes");
    // The default budget: a quarter of memtx_memory, give or take a batch.
    assert!(
        hot_bytes <= (16 << 20) + (1 << 20),
        "hot tier within budget: {hot_bytes}"
    );
    assert!(arena < 64 << 20, "{arena}");

    let started = Instant::now();
    let all = read_all(&system, &subject, "replay").await;
    eprintln!("read {} back in {:?}", all.len(), started.elapsed());
    assert_eq!(all.len() as u64, n, "every message, once");
    for (i, message) in all.iter().enumerate() {
        assert_eq!(message.sequence, i as u64 + 1);
    }
    let mut ids: Vec<u64> = all
        .iter()
        .map(|m| m.headers["id"].parse().unwrap())
        .collect();
    ids.sort_unstable();
    assert!(ids.iter().copied().eq(1..=n), "each id stored exactly once");

    // By time: from the commit time of a message deep in the cold tier.
    let target = &all[(n / 3) as usize];
    system
        .subscriber()
        .await
        .create_or_update_consumer(CreateOrUpdateConsumerRequest {
            subject: subject.clone(),
            durable_name: "by-time".into(),
            config: Some(ConsumerConfig {
                deliver_policy: DeliverPolicy::DeliverByStartTime.into(),
                start_time: target.timestamp,
                ..ConsumerConfig::default()
            }),
        })
        .await
        .unwrap();
    let first = system.fetch(&subject, "by-time", 1).await;
    let previous = &all[(n / 3) as usize - 1];
    if previous.timestamp != target.timestamp {
        assert_eq!(first[0].sequence, target.sequence);
    }
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crashes_of_tarantool_and_of_the_tiering_egress_lose_and_double_nothing() {
    let mut tarantool = TarantoolProcess::start();
    let mut config: Config = tarantool.config();
    config.tarantool.timeout_ms = 3000;
    config.tiering.segment_seal_age_ms = 100;
    config.tiering.segment_max_bytes = 64 * 1024;
    config.egress.maintenance_interval_ms = 50;
    let system = System::start(config.clone()).await;
    let subject = testing::unique_subject("tier-crash");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let publisher = {
        let system_publisher = system.publisher().await;
        let subject = subject.clone();
        tokio::spawn(async move {
            let mut publisher = system_publisher;
            let mut stored = Vec::new();
            let mut id = 0u64;
            while !*stopped.borrow() {
                id += 1;
                // Unary, so each answer is known: stored, or not.
                if let Ok(answer) = publisher.publish(request(&subject, id)).await {
                    stored.push((id, answer.into_inner().sequence));
                }
            }
            stored
        })
    };
    // A second egress tiers too, and is crashed (its task dropped at any
    // await, as a kill would) and replaced while it works.
    let mut tierer = Some(Running::start(EGRESS, config.clone(), mts_egress::run).await);
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        if round % 2 == 0 {
            tarantool.kill();
            tokio::time::sleep(Duration::from_millis(200)).await;
            tarantool.restart();
        } else {
            drop(tierer.take());
            tierer = Some(Running::start(EGRESS, config.clone(), mts_egress::run).await);
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.send_replace(true);
    let stored = publisher.await.unwrap();
    assert!(
        stored.len() > 100,
        "published under the crashes: {}",
        stored.len()
    );
    testing::eventually("everything published is in segments", || async {
        let answer: Result<(u64, u64), _> = tarantool
            .admin_client()
            .await
            .eval(
                "local r = box.space.mts_subjects:get(...) return r.count, r.cold_count or 0",
                (&subject,),
            )
            .await;
        matches!(answer, Ok((count, cold)) if count == cold && count >= stored.len() as u64)
    })
    .await;

    let all = read_all(&system, &subject, "after-crashes").await;
    let by_seq: HashMap<u64, u64> = all
        .iter()
        .map(|m| (m.sequence, m.headers["id"].parse().unwrap()))
        .collect();
    assert_eq!(by_seq.len(), all.len(), "no sequence twice");
    for (i, message) in all.iter().enumerate() {
        assert_eq!(message.sequence, i as u64 + 1, "gap-free from 1");
    }
    for (id, seq) in &stored {
        assert_eq!(
            by_seq.get(seq),
            Some(id),
            "acknowledged message {id} at {seq}"
        );
    }
    // No segment row names a missing object.
    let (keys,): (Vec<String>,) = tarantool
        .admin_client()
        .await
        .eval(
            "local k = {} for _, s in box.space.mts_segments:pairs() do k[#k + 1] = s.object_key end return k",
            (),
        )
        .await
        .unwrap();
    assert!(!keys.is_empty());
    let object_store = mts_storage::object_store::ObjectStore::new(&config);
    for key in &keys {
        assert!(object_store.exists(key).await.unwrap(), "segment {key}");
    }
    drop(tierer);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_hot_tier_refuses_publishes_and_says_so_in_health_until_tiering_makes_room() {
    use mts_runtime::health::HOT_TIER;
    let tarantool = TarantoolProcess::start();
    let mut config = tarantool.config();
    config.tiering.hot_tier_max_messages = 20;
    let mut stalled = config.clone();
    stalled.tiering.tiering_enabled = false;
    let system = System::start_with(config.clone(), stalled).await;
    let within = Duration::from_secs(10);
    testing::wait_serving(system.ingress.addr, HOT_TIER, within).await;

    let subject = testing::unique_subject("full");
    let mut publisher = system.publisher().await;
    let (mut stored, mut refused) = (0, 0);
    for id in 1..=40 {
        match publisher.publish(request(&subject, id)).await {
            Ok(_) => stored += 1,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
                assert!(status.message().contains("hot tier is full"), "{status}");
                refused += 1;
            }
        }
    }
    assert_eq!((stored, refused), (20, 20));
    // Degraded, not down: the service serves, its hot tier says it is full,
    // and reads go on.
    testing::wait_status(system.ingress.addr, HOT_TIER, false, within).await;
    testing::wait_serving(system.ingress.addr, "", within).await;
    assert_eq!(system.fetch(&subject, "reader", 100).await.len(), 20);

    // An egress that tiers moves the messages out, and publishing resumes.
    let tiering = Running::start(EGRESS, config, mts_egress::run).await;
    testing::wait_serving(system.ingress.addr, HOT_TIER, Duration::from_secs(60)).await;
    publisher.publish(request(&subject, 41)).await.unwrap();
    tiering.stop().await.unwrap();
    system.stop().await;
}
