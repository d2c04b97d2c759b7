//! Subscribe, Fetch, AckMessage and GetLastSequence: what the original
//! clients use.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use mts_proto::pb::{FetchRequest, SubscribeRequest};
use mts_storage::object_store::ObjectStore;
use mts_testkit as testing;
use tonic::Code;

use crate::support::{fixture, next, sequences};

#[tokio::test]
async fn an_old_style_client_fetches_and_acks_cumulatively() {
    let mut f = fixture("fetch-ack").await;
    assert_eq!(f.last().await, 0);
    for i in 0..25u8 {
        f.publish(&[i; 3]).await;
    }
    assert_eq!(f.last().await, 25);

    let first = f.fetch("worker", 0).await;
    assert_eq!(
        sequences(&first),
        (1..=10).collect::<Vec<_>>(),
        "batch_size 0 means 10"
    );
    assert_eq!(first[4].data.as_ref(), &[4u8; 3]);
    assert_eq!(first[4].headers["n"], "3");
    assert_eq!(first[4].delivery_count, 1);
    assert_eq!(
        first[4].headers["mts-delivery-count"], "1",
        "old clients see the count as a header"
    );
    let ts = first[0].timestamp.unwrap();
    assert!(ts.seconds > 1_700_000_000, "commit timestamp: {ts:?}");

    // Leased messages are not handed out twice: the next fetch continues.
    assert_eq!(sequences(&f.fetch("worker", 3).await), vec![11, 12, 13]);
    assert!(
        f.ack("worker", 13).await.unwrap(),
        "acks everything handed out up to 13"
    );
    assert!(
        f.ack("worker", 3).await.unwrap(),
        "an older ack is accepted"
    );
    assert_eq!(
        sequences(&f.fetch("worker", 2).await),
        vec![14, 15],
        "and moves nothing back"
    );
    assert!(
        f.ack("worker", 20).await.unwrap(),
        "acking ahead skips, as it always did"
    );
    assert_eq!(
        sequences(&f.fetch("worker", 1000).await),
        (21..=25).collect::<Vec<_>>()
    );
    assert_eq!(
        sequences(&f.fetch("someone-else", 2).await),
        vec![1, 2],
        "durables are independent"
    );

    let beyond = f.ack("worker", 26).await.unwrap_err();
    assert_eq!(beyond.code(), Code::FailedPrecondition);
    assert!(beyond.message().contains("is 25"), "{}", beyond.message());
    assert!(f.ack("worker", 25).await.unwrap());
    assert!(f.fetch("worker", 10).await.is_empty());
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn fetch_reads_offloaded_payloads_from_s3() {
    let mut f = fixture("fetch-s3").await;
    let object_store = ObjectStore::new(&f.config);
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let key = f.publish_offloaded(&payload, &HashMap::new()).await;
    let fetched = f.fetch("d", 1).await;
    assert_eq!(fetched[0].data.as_ref(), payload.as_slice());

    // Metadata pointing at an object that is gone is reported, not hidden.
    object_store.delete(&key).await.unwrap();
    let mut stream = f
        .client
        .fetch(FetchRequest {
            subject: f.subject.clone(),
            durable_name: "another".into(),
            batch_size: 1,
            omit_large_payloads: false,
        })
        .await
        .unwrap()
        .into_inner();
    let status = stream.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::DataLoss);
    assert!(status.message().contains(&key));
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn subscribe_notifies_at_once_and_then_on_every_commit() {
    let mut f = fixture("subscribe").await;
    f.publish(b"a").await;
    f.publish(b"b").await;
    let mut stream = f
        .client
        .subscribe(SubscribeRequest {
            subject: f.subject.clone(),
            start_sequence: None,
            durable_name: "watcher".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await;
    assert_eq!(
        (first.subject.as_str(), first.sequence),
        (f.subject.as_str(), 2)
    );

    f.publish(b"c").await;
    assert_eq!(next(&mut stream).await.sequence, 3);

    // Acked up to the end: a new stream for the same durable has nothing to announce.
    f.ack("watcher", 3).await.unwrap();
    let mut quiet = f
        .client
        .subscribe(SubscribeRequest {
            subject: f.subject.clone(),
            start_sequence: None,
            durable_name: "watcher".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), quiet.next())
            .await
            .is_err(),
        "nothing new, so no notification"
    );
    f.publish(b"d").await;
    assert_eq!(next(&mut quiet).await.sequence, 4);
    assert_eq!(next(&mut stream).await.sequence, 4);

    // A release wakes the subject's watcher, but brings no new commit to announce.
    assert_eq!(sequences(&f.fetch("worker", 1).await), vec![1]);
    f.client
        .nack(mts_proto::pb::NackRequest {
            subject: f.subject.clone(),
            durable_name: "worker".into(),
            sequences: vec![1],
            delay_ms: 0,
        })
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.next())
            .await
            .is_err(),
        "a release is not a commit: no notification"
    );
    f.publish(b"e").await;
    assert_eq!(next(&mut stream).await.sequence, 5);
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn start_sequence_seeds_a_new_durable() {
    let mut f = fixture("start-seq").await;
    for _ in 0..5 {
        f.publish(b"x").await;
    }
    let mut stream = f
        .client
        .subscribe(SubscribeRequest {
            subject: f.subject.clone(),
            start_sequence: Some(4),
            durable_name: "late".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut stream).await.sequence, 5);
    assert_eq!(sequences(&f.fetch("late", 10).await), vec![4, 5]);

    // Beyond the end: nothing to announce until the subject gets there.
    let mut ahead = f
        .client
        .subscribe(SubscribeRequest {
            subject: f.subject.clone(),
            start_sequence: Some(7),
            durable_name: "ahead".into(),
        })
        .await
        .unwrap()
        .into_inner();
    f.publish(b"6").await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), ahead.next())
            .await
            .is_err()
    );
    f.publish(b"7").await;
    assert_eq!(next(&mut ahead).await.sequence, 7);
    assert_eq!(sequences(&f.fetch("ahead", 10).await), vec![7]);
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn streams_on_one_subject_share_one_waiter_in_tarantool() {
    let mut f = fixture("one-waiter").await;
    let mut streams = Vec::new();
    for i in 0..5 {
        streams.push(
            f.client
                .subscribe(SubscribeRequest {
                    subject: f.subject.clone(),
                    start_sequence: None,
                    durable_name: format!("d{i}"),
                })
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let admin = testing::admin_client().await;
    let waiters = |subject: String| {
        let admin = admin.clone();
        async move {
            let (n,): (u64,) = admin
                .eval(
                    "local w = mts_conds[...]; return w and w.waiters or 0",
                    (subject,),
                )
                .await
                .unwrap();
            n
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while waiters(f.subject.clone()).await != 1 {
        assert!(tokio::time::Instant::now() < deadline, "no waiter appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        waiters(f.subject.clone()).await,
        1,
        "five streams, one waiter"
    );

    f.publish(b"x").await;
    for stream in &mut streams {
        assert_eq!(next(stream).await.sequence, 1);
    }
    assert_eq!(f.last().await, 1);
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn draining_ends_open_streams_with_unavailable() {
    let f = fixture("drain").await;
    let mut client = f.client.clone();
    let mut stream = client
        .subscribe(SubscribeRequest {
            subject: f.subject.clone(),
            start_sequence: None,
            durable_name: "d".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let stopping = tokio::spawn(f.service.stop());
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("stream ended on drain");
    let status = ended.expect("a status, not a silent end").unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("reconnect"),
        "{}",
        status.message()
    );
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("egress stopped within the grace period")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn aged_connections_are_closed_so_clients_rebalance() {
    let mut config = mts_testkit::config();
    config.server.max_connection_age_seconds = 1;
    config.server.max_connection_age_grace_seconds = 1;
    let service =
        mts_testkit::Running::start(mts_proto::service_names::EGRESS, config, mts_egress::run)
            .await;
    let mut client =
        mts_proto::pb::egress_service_client::EgressServiceClient::connect(service.endpoint())
            .await
            .unwrap();
    let subject = testing::unique_subject("aged");
    let mut stream = client
        .subscribe(SubscribeRequest {
            subject: subject.clone(),
            start_sequence: None,
            durable_name: "d".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // Age (≤ 1.1 s) plus grace (1 s): the server must have closed it well before 10 s.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the aged connection was not closed");
    // A new connection works at once.
    let mut again =
        mts_proto::pb::egress_service_client::EgressServiceClient::connect(service.endpoint())
            .await
            .unwrap();
    let last = again
        .get_last_sequence(mts_proto::pb::GetLastSequenceRequest { subject })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(last.last_sequence, 0);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_stored_object_shorter_than_its_payload_is_reported_as_data_loss() {
    let mut f = fixture("short-object").await;
    let key = format!("{}/{}", f.subject, testing::unique_subject("object"));
    ObjectStore::new(&f.config)
        .put(&key, vec![7u8; 1000].into())
        .await
        .unwrap();
    let sequence = f
        .store
        .publish(&f.subject, &HashMap::new(), None, Some(&key), 5000)
        .await
        .unwrap();
    let mut chunks = f
        .client
        .fetch_payload(mts_proto::pb::FetchPayloadRequest {
            subject: f.subject.clone(),
            sequence,
            offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let (mut received, mut ended) = (0, None);
    while let Some(item) = chunks.next().await {
        match item {
            Ok(chunk) => received += chunk.data.len(),
            Err(status) => {
                ended = Some(status);
                break;
            }
        }
    }
    assert_eq!(received, 1000);
    let status = ended.expect("a stream that ended as if whole");
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
}
