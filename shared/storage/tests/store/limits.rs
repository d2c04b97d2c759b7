//! Numbers at their limits: every time computation saturates instead of
//! wrapping, and integers large enough to arrive in Lua as cdata (from about
//! 2^47 on) work wherever a client may send them.

use std::collections::HashMap;
use std::time::Duration;

use mts_storage::store::{ConsumerSettings, DeliverPolicy, Limits, NewMessage, Payload, Store};
use mts_testkit::{self as testing, TarantoolProcess};

/// Runs retention over every subject of `store` with default `limits`.
async fn retention(store: &Store, limits: Limits) -> u64 {
    let (mut cursor, mut removed) = (String::new(), 0);
    loop {
        let (next, deleted) = store
            .retention_step(&cursor, limits, 1000, 1000)
            .await
            .unwrap();
        removed += deleted;
        if next.is_empty() {
            return removed;
        }
        cursor = next;
    }
}

async fn publish_three(store: &Store, subject: &str) {
    for data in [b"a", b"b", b"c"] {
        store
            .publish(subject, &HashMap::new(), Some(data), None, 1)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn very_long_retention_ages_keep_every_message() {
    // A Tarantool of its own: retention runs over every subject.
    let tarantool = TarantoolProcess::start();
    let store = Store::connect(&tarantool.config()).await.unwrap();
    let thousand_years = 1000 * 365 * 24 * 3600 * 1000u64;
    for (name, age) in [
        ("thousand-years", thousand_years),
        ("u64-max", u64::MAX),
        ("2^63", 1 << 63),
    ] {
        let subject = testing::unique_subject(name);
        publish_three(&store, &subject).await;
        store
            .set_subject_limits(
                &subject,
                Limits {
                    max_age_ms: Some(age),
                    ..Limits::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(retention(&store, Limits::default()).await, 0, "{name}");
        assert_eq!(
            store.subject_info(&subject).await.unwrap().count,
            3,
            "{name}"
        );
    }
    // The same as the service default, for a subject without limits of its own.
    let subject = testing::unique_subject("default");
    publish_three(&store, &subject).await;
    let defaults = Limits {
        max_age_ms: Some(thousand_years),
        ..Limits::default()
    };
    assert_eq!(retention(&store, defaults).await, 0);
    assert_eq!(store.subject_info(&subject).await.unwrap().count, 3);

    // A short age still removes them.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let short = Limits {
        max_age_ms: Some(1),
        ..Limits::default()
    };
    assert_eq!(retention(&store, short).await, 3);
    assert_eq!(store.subject_info(&subject).await.unwrap().count, 0);
}

#[tokio::test]
async fn every_procedure_takes_integers_at_their_limits() {
    let tarantool = TarantoolProcess::start();
    let store = Store::connect(&tarantool.config()).await.unwrap();
    let edges: [u64; 6] = [
        100_000_000_000_000, // 1e14, where the INTERNAL errors began
        (1 << 47) - 1,
        1 << 47,
        (1 << 53) + 1,
        u64::MAX - 1,
        u64::MAX,
    ];
    for (i, edge) in edges.into_iter().enumerate() {
        let subject = testing::unique_subject(&format!("edge{i}"));
        publish_three(&store, &subject).await;
        let what = format!("edge {edge}");

        let (notified, last) = store.subscribe(&subject, "sub", edge).await.unwrap();
        assert_eq!((notified, last), (edge - 1, 3), "{what}");
        let created = store
            .create_or_update_consumer(
                &subject,
                "by-seq",
                &ConsumerSettings {
                    deliver_policy: Some(DeliverPolicy::ByStartSequence),
                    start_seq: Some(edge),
                    ..ConsumerSettings::default()
                },
            )
            .await
            .unwrap();
        assert!(created, "{what}");
        let state = store
            .consumer_info(&subject, "by-seq")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (state.ack_floor, state.start_seq),
            (edge - 1, edge),
            "{what}"
        );
        let later = store
            .create_or_update_consumer(
                &subject,
                "by-time",
                &ConsumerSettings {
                    deliver_policy: Some(DeliverPolicy::ByStartTime),
                    start_time_ns: Some(edge),
                    ..ConsumerSettings::default()
                },
            )
            .await
            .unwrap();
        assert!(later, "{what}");
        // A consumer that starts beyond the subject hands out nothing.
        assert!(
            store
                .fetch(&subject, "by-seq", 10)
                .await
                .unwrap()
                .messages
                .is_empty()
        );

        let batch = store.fetch(&subject, "all", 10).await.unwrap();
        assert_eq!(batch.messages.len(), 3, "{what}");
        let not_held = store.ack_sequences(&subject, "all", &[edge]).await.unwrap();
        assert_eq!(not_held.unwrap_err().0, vec![edge], "{what}");
        let not_held = store
            .nack(&subject, "all", &[edge], u32::MAX)
            .await
            .unwrap();
        assert_eq!(not_held.unwrap_err().0, vec![edge], "{what}");
        // A nack delay at its largest: redelivery later than anyone waits.
        store
            .nack(&subject, "all", &[1], u32::MAX)
            .await
            .unwrap()
            .unwrap();
        store.release(&subject, "all", &[edge]).await.unwrap();
        let beyond = store.ack_message(&subject, "all", edge).await.unwrap();
        assert_eq!(
            beyond,
            mts_storage::store::AckOutcome::BeyondLast { last: 3 },
            "{what}"
        );
        assert!(
            store.message(&subject, edge).await.unwrap().is_none(),
            "{what}"
        );
        assert_eq!(
            store
                .wait_beyond(&subject, edge, Duration::from_millis(10))
                .await
                .unwrap(),
            3,
            "{what}"
        );
        let limits = Limits {
            max_age_ms: Some(edge),
            max_messages: Some(edge),
            max_bytes: Some(edge),
            discard: None,
        };
        store.set_subject_limits(&subject, limits).await.unwrap();
        assert_eq!(
            store.subject_info(&subject).await.unwrap().limits,
            limits,
            "{what}"
        );
        let dedup = store
            .publish_message(NewMessage {
                subject: &subject,
                headers: &HashMap::new(),
                payload: Payload::Inline(b"d"),
                size: 1,
                sha256: None,
                message_id: Some("id"),
                dedup_window: Duration::from_millis(edge),
            })
            .await
            .unwrap();
        assert_eq!(dedup.seq, 4, "{what}");
        assert!(
            store
                .lease(&format!("lease-{i}"), "me", Duration::from_millis(edge))
                .await
                .unwrap(),
            "{what}"
        );
        assert!(
            !store
                .lease(&format!("lease-{i}"), "other", Duration::from_secs(1))
                .await
                .unwrap(),
            "{what}: a lease of the longest term is still held"
        );
    }
    assert_eq!(
        store.consumers_lag(None, 100).await.unwrap().len(),
        4 * edges.len()
    );
    // The message ids' and leases' expiries saturated: retention keeps them.
    retention(&store, Limits::default()).await;
}
