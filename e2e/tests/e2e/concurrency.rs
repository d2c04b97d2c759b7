//! Concurrent publishers get gap-free sequences, and one durable reading with
//! Fetch + AckMessage sees every message exactly once, in order.

use std::collections::HashMap;

use futures::StreamExt;
use mts_proto::pb::{AckRequest, FetchRequest, PublishRequest};
use mts_testkit as testing;

use crate::system::System;

const PUBLISHERS: usize = 16;
const MESSAGES: usize = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_publishers_two_thousand_messages() {
    let system = System::start(testing::config()).await;
    let subject = testing::unique_subject("concurrency");

    let mut tasks = Vec::new();
    for publisher in 0..PUBLISHERS {
        let mut client = system.publisher().await;
        let subject = subject.clone();
        tasks.push(tokio::spawn(async move {
            let mut sequences = Vec::new();
            for i in (publisher..MESSAGES).step_by(PUBLISHERS) {
                let reply = client
                    .publish(PublishRequest {
                        message_id: String::new(),
                        subject: subject.clone(),
                        data: format!("{publisher}:{i}").into_bytes().into(),
                        headers: HashMap::from([("publisher".into(), publisher.to_string())]),
                        ordering_key: String::new(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                sequences.push(reply.sequence);
            }
            sequences
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        let sequences = task.await.unwrap();
        assert!(
            sequences.windows(2).all(|w| w[0] < w[1]),
            "one publisher's sequences increase"
        );
        all.extend(sequences);
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=MESSAGES as u64).collect::<Vec<_>>(),
        "exactly 1..=2000, no gaps, no repeats"
    );

    let mut subscriber = system.subscriber().await;
    let mut seen = Vec::new();
    let mut last_index_of: HashMap<usize, usize> = HashMap::new();
    while seen.len() < MESSAGES {
        let batch: Vec<_> = system.fetch(&subject, "reader", 128).await;
        assert!(!batch.is_empty(), "stalled after {} messages", seen.len());
        for message in &batch {
            assert_eq!(
                message.sequence,
                seen.len() as u64 + 1,
                "in order, each exactly once"
            );
            let text = String::from_utf8(message.data.to_vec()).unwrap();
            let (publisher, index) = text.split_once(':').unwrap();
            let (publisher, index): (usize, usize) =
                (publisher.parse().unwrap(), index.parse().unwrap());
            assert_eq!(message.headers["publisher"], publisher.to_string());
            if let Some(previous) = last_index_of.insert(publisher, index) {
                assert!(previous < index, "a publisher's messages keep their order");
            }
            seen.push(message.sequence);
        }
        subscriber
            .ack_message(AckRequest {
                durable_name: "reader".into(),
                subject: subject.clone(),
                sequence: batch.last().unwrap().sequence,
            })
            .await
            .unwrap();
    }
    let rest: Vec<_> = subscriber
        .fetch(FetchRequest {
            subject: subject.clone(),
            durable_name: "reader".into(),
            batch_size: 10,
            omit_large_payloads: false,
        })
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert!(rest.is_empty(), "nothing left after acking everything");
    system.stop().await;
}
