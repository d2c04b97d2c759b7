//! Administering consumers and subjects.

use std::time::{Duration, SystemTime};

use mts_client::wire::{ConsumerConfig, SubjectLimits};
use mts_client::{Message, Seek};
use mts_testkit as testing;

use super::{client_of, services};

#[tokio::test(flavor = "multi_thread")]
async fn consumers_and_subjects_are_administered() {
    let services = services(testing::config()).await;
    let client = client_of(&services).await;
    let subject = testing::unique_subject("client-admin");
    for i in 0..5 {
        client
            .publish(Message::new(&subject, format!("m{i}")))
            .await
            .unwrap();
    }

    let config = ConsumerConfig {
        ack_wait_ms: Some(5000),
        ..ConsumerConfig::default()
    };
    let created = client
        .create_consumer(&subject, "a", config.clone())
        .await
        .unwrap();
    assert!(created.created_now);
    assert_eq!(created.num_pending, 5);
    let updated = client.create_consumer(&subject, "a", config).await.unwrap();
    assert!(!updated.created_now);
    let info = client.consumer_info(&subject, "a").await.unwrap();
    assert_eq!(info.config.unwrap().ack_wait_ms, Some(5000));
    client
        .create_consumer(&subject, "b", ConsumerConfig::default())
        .await
        .unwrap();
    let names: Vec<_> = client
        .consumers(Some(&subject))
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.durable_name)
        .collect();
    assert_eq!(names, ["a", "b"]);

    let moved = client
        .seek_consumer(&subject, "a", Seek::Sequence(4))
        .await
        .unwrap();
    assert_eq!((moved.ack_floor, moved.num_pending), (3, 2));
    let back = client
        .seek_consumer(
            &subject,
            "a",
            Seek::Time(SystemTime::now() - Duration::from_secs(3600)),
        )
        .await
        .unwrap();
    assert_eq!(back.num_pending, 5, "an hour ago is before the first");
    client.delete_consumer(&subject, "b").await.unwrap();
    let err = client.delete_consumer(&subject, "b").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");

    let info = client.subject_info(&subject).await.unwrap();
    assert_eq!(
        (info.messages, info.last_sequence, info.num_consumers),
        (5, 5, 1)
    );
    let listed = client.subjects(&subject).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].subject, subject);
    let limited = client
        .set_subject_limits(
            &subject,
            SubjectLimits {
                max_age_ms: Some(86_400_000),
                ..SubjectLimits::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(limited.limits.unwrap().max_age_ms, Some(86_400_000));
    let purged = client.purge_subject(&subject, Some(2)).await.unwrap();
    assert_eq!(purged.purged, 2);
    assert_eq!(purged.subject.unwrap().first_sequence, 3);
    assert_eq!(client.delete_subject(&subject).await.unwrap(), (3, 1));

    let err = client.consumer_info(&subject, "a").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    assert!(!err.is_retryable());
}
