//! Subject and consumer administration over gRPC: listings a page at a
//! time, purges and deletions that take payload objects with them, consumers
//! removed when unused, and lag gauges for every consumer. Each test runs
//! its own Tarantool and bucket.

use mts_proto::pb::{
    ConsumerConfig, CreateOrUpdateConsumerRequest, ListConsumersRequest, ListSubjectsRequest,
    PurgeSubjectRequest, SubjectRequest,
};
use mts_storage::store::ConsumerSettings;
use mts_testkit as testing;
use tonic::Code;

use crate::maintenance::{Isolated, isolated};

async fn consumer(t: &Isolated, subject: &str, durable: &str) {
    t.client
        .clone()
        .create_or_update_consumer(CreateOrUpdateConsumerRequest {
            subject: subject.into(),
            durable_name: durable.into(),
            config: None,
        })
        .await
        .unwrap();
}

async fn purge(t: &Isolated, subject: &str, through: u64) -> Result<u64, tonic::Status> {
    t.client
        .clone()
        .purge_subject(PurgeSubjectRequest {
            subject: subject.into(),
            through_sequence: through,
        })
        .await
        .map(|r| r.into_inner().purged)
}

#[tokio::test]
async fn subjects_and_consumers_are_listed_a_page_at_a_time() {
    let t = isolated(|_| {}).await;
    let prefix = testing::unique_subject("ls");
    for i in 0..5 {
        let subject = format!("{prefix}.s{i}");
        t.publish(&subject, 10, false).await;
        consumer(&t, &subject, "a").await;
    }
    consumer(&t, &format!("{prefix}.s0"), "b").await;
    t.store
        .fetch(&format!("{prefix}.s0"), "b", 1)
        .await
        .unwrap();

    let mut client = t.client.clone();
    let (mut subjects, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let page = client
            .list_subjects(ListSubjectsRequest {
                prefix: format!("{prefix}."),
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        subjects.extend(
            page.subjects
                .into_iter()
                .map(|s| (s.subject, s.num_consumers)),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let expected: Vec<(String, u64)> = (0..5)
        .map(|i| (format!("{prefix}.s{i}"), if i == 0 { 2 } else { 1 }))
        .collect();
    assert_eq!(subjects, expected);

    // Every subject's consumers, from the first, two at a time.
    let (mut consumers, mut token) = (Vec::new(), String::new());
    loop {
        let page = client
            .list_consumers(ListConsumersRequest {
                subject: String::new(),
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        consumers.extend(page.consumers);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(consumers.len(), 6);
    let b = consumers
        .iter()
        .find(|c| c.durable_name == "b")
        .expect("b is listed");
    assert_eq!((b.num_pending, b.num_ack_pending), (0, 1), "b's lag");
    let one = client
        .list_consumers(ListConsumersRequest {
            subject: format!("{prefix}.s0"),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = one
        .consumers
        .iter()
        .map(|c| c.durable_name.as_str())
        .collect();
    assert_eq!((names, one.next_page_token.as_str()), (vec!["a", "b"], ""));

    // Requests a person got wrong say what to change.
    let status = client
        .list_subjects(ListSubjectsRequest {
            prefix: String::new(),
            page_size: 5000,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("page_size"),
        "{}",
        status.message()
    );
    let status = client
        .list_consumers(ListConsumersRequest {
            subject: String::new(),
            page_size: 0,
            page_token: "made-up".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("page_token"),
        "{}",
        status.message()
    );
    t.service.stop().await.unwrap();
}

#[tokio::test]
async fn a_purge_takes_the_objects_of_purged_messages_and_consumers_go_on_after_it() {
    let t = isolated(|_| {}).await;
    let subject = testing::unique_subject("purge");
    let mut keys = Vec::new();
    for _ in 0..3 {
        keys.push(t.publish(&subject, 1000, true).await.1.unwrap());
    }
    t.publish(&subject, 10, false).await;
    consumer(&t, &subject, "reader").await;
    assert_eq!(
        t.store
            .fetch(&subject, "reader", 1)
            .await
            .unwrap()
            .messages
            .len(),
        1
    );

    let status = purge(&t, &subject, 5).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(
        status.message().contains("last sequence"),
        "{}",
        status.message()
    );

    assert_eq!(purge(&t, &subject, 2).await.unwrap(), 2);
    let info = t.info(&subject).await;
    assert_eq!(
        (info.first_sequence, info.messages, info.bytes),
        (3, 2, 1010)
    );
    testing::eventually("the purged messages' objects deleted", || async {
        !t.object_store.exists(&keys[0]).await.unwrap()
            && !t.object_store.exists(&keys[1]).await.unwrap()
    })
    .await;
    assert!(t.object_store.exists(&keys[2]).await.unwrap());
    let next = t.store.fetch(&subject, "reader", 10).await.unwrap();
    let seqs: Vec<u64> = next.messages.iter().map(|l| l.message.seq).collect();
    assert_eq!(seqs, [3, 4]);

    // All of it; the next publish goes on after the last sequence.
    assert_eq!(purge(&t, &subject, 0).await.unwrap(), 2);
    assert_eq!(t.info(&subject).await.messages, 0);
    assert_eq!(t.publish(&subject, 10, false).await.0, 5);
    testing::eventually("every purged object deleted", || async {
        !t.object_store.exists(&keys[2]).await.unwrap()
    })
    .await;
    t.service.stop().await.unwrap();
}

#[tokio::test]
async fn deleting_a_subject_removes_its_consumers_and_its_sequences_are_never_reused() {
    let t = isolated(|_| {}).await;
    let subject = testing::unique_subject("delete");
    let key = t.publish(&subject, 1000, true).await.1.unwrap();
    t.publish(&subject, 10, false).await;
    consumer(&t, &subject, "one").await;
    consumer(&t, &subject, "two").await;
    let deleted = t
        .client
        .clone()
        .delete_subject(SubjectRequest {
            subject: subject.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((deleted.purged, deleted.consumers_deleted), (2, 2));
    let listed = t
        .client
        .clone()
        .list_consumers(ListConsumersRequest {
            subject: subject.clone(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.consumers.is_empty());
    testing::eventually("its object deleted", || async {
        !t.object_store.exists(&key).await.unwrap()
    })
    .await;
    assert_eq!(t.publish(&subject, 10, false).await.0, 3);
    t.service.stop().await.unwrap();
}

#[tokio::test]
async fn a_consumer_unused_past_its_threshold_is_removed_and_counted() {
    let port = testing::free_port();
    let t = isolated(|c| c.server.metrics_port = port).await;
    let subject = testing::unique_subject("inactive");
    t.publish(&subject, 10, false).await;

    // Over the API the threshold is at least a minute: an idle stream
    // records its use every 20 s.
    let status = t
        .client
        .clone()
        .create_or_update_consumer(CreateOrUpdateConsumerRequest {
            subject: subject.clone(),
            durable_name: "brief".into(),
            config: Some(ConsumerConfig {
                inactive_threshold_ms: Some(1000),
                ..ConsumerConfig::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("inactive_threshold_ms"),
        "{}",
        status.message()
    );
    let kept = t
        .client
        .clone()
        .create_or_update_consumer(CreateOrUpdateConsumerRequest {
            subject: subject.clone(),
            durable_name: "kept".into(),
            config: Some(ConsumerConfig {
                inactive_threshold_ms: Some(3_600_000),
                ..ConsumerConfig::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.config.unwrap().inactive_threshold_ms, Some(3_600_000));
    assert!(kept.last_active.is_some());

    // Straight through the store, a threshold of a millisecond.
    let brief = ConsumerSettings {
        inactive_threshold_ms: Some(1),
        ..ConsumerSettings::default()
    };
    t.store
        .create_or_update_consumer(&subject, "brief", &brief)
        .await
        .unwrap();
    testing::eventually("the unused consumer removed", || async {
        t.store
            .consumer_info(&subject, "brief")
            .await
            .unwrap()
            .is_none()
    })
    .await;
    assert!(
        t.store
            .consumer_info(&subject, "kept")
            .await
            .unwrap()
            .is_some()
    );
    testing::eventually("the removal counted", || async {
        testing::scrape_metrics(port)
            .await
            .contains("minitoolstream_consumers_expired_total 1")
    })
    .await;
    t.service.stop().await.unwrap();
}

#[tokio::test]
async fn lag_gauges_cover_the_top_consumers_and_totals_count_every_one() {
    let port = testing::free_port();
    let t = isolated(|c| {
        c.server.metrics_port = port;
        c.egress.consumer_lag_top = 2;
    })
    .await;
    let subject = testing::unique_subject("lag-top");
    for _ in 0..6 {
        t.publish(&subject, 10, false).await;
    }
    // Lag 6, 4 and 1 (pending + unacknowledged).
    consumer(&t, &subject, "far").await;
    consumer(&t, &subject, "mid").await;
    t.store.ack_message(&subject, "mid", 2).await.unwrap();
    consumer(&t, &subject, "near").await;
    t.store.ack_message(&subject, "near", 5).await.unwrap();
    let series = |durable: &str| {
        format!(
            r#"minitoolstream_consumer_pending_messages{{subject="{subject}",durable="{durable}"}}"#
        )
    };
    testing::eventually(
        "gauges for the two furthest behind, totals for all",
        || async {
            let text = testing::scrape_metrics(port).await;
            text.contains(&format!("{} 6", series("far")))
                && text.contains(&format!("{} 4", series("mid")))
                && !text.contains(&series("near"))
                && text.contains("minitoolstream_consumers 3")
                && text.contains("minitoolstream_consumers_pending_messages 11")
                && text.contains("minitoolstream_consumers_unlabelled 1")
        },
    )
    .await;
    t.service.stop().await.unwrap();
}
