//! Administration procedures against a real Tarantool: subjects and
//! consumers listed a page at a time, purges and deletions in bounded
//! steps, and consumers removed once unused past their threshold.

use std::collections::HashMap;

use mts_storage::store::{ConsumerSettings, PurgeStep, Store};
use mts_testkit as testing;

async fn publish(store: &Store, subject: &str, n: u64) {
    for i in 0..n {
        store
            .publish(subject, &HashMap::new(), Some(&[i as u8; 10]), None, 10)
            .await
            .unwrap();
    }
}

/// Purges `subject` through `through` in steps of `budget`, as the egress
/// does for hot messages; how many went.
async fn purge(store: &Store, subject: &str, mut through: u64, budget: u32) -> u64 {
    let mut purged = 0;
    loop {
        let (step, resolved) = store
            .purge_step(subject, through, budget, None)
            .await
            .unwrap();
        through = resolved;
        match step {
            PurgeStep::Done(n) => return purged + n,
            PurgeStep::More(n) => purged += n,
            PurgeStep::Cut { .. } => panic!("no segments here"),
        }
    }
}

#[tokio::test]
async fn subjects_are_listed_a_page_at_a_time_by_prefix() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let prefix = format!("{}.", testing::unique_subject("list"));
    let names: Vec<String> = (0..5).map(|i| format!("{prefix}s{i}")).collect();
    for name in &names {
        publish(&store, name, 2).await;
    }
    store
        .create_or_update_consumer(&names[1], "a", &ConsumerSettings::default())
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut after = String::new();
    let mut pages = 0;
    loop {
        let page = store.list_subjects(&prefix, &after, 2).await.unwrap();
        pages += 1;
        assert!(page.entries.len() <= 2);
        seen.extend(
            page.entries
                .iter()
                .map(|s| (s.subject.clone(), s.count, s.consumers)),
        );
        if !page.more {
            break;
        }
        after = page.entries.last().unwrap().subject.clone();
    }
    assert_eq!(pages, 3);
    let expected: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), 2, u64::from(i == 1)))
        .collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn consumers_are_listed_a_page_at_a_time_of_one_subject_or_all() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject("list-consumers");
    publish(&store, &subject, 3).await;
    for durable in ["c", "a", "d", "b"] {
        store
            .create_or_update_consumer(&subject, durable, &ConsumerSettings::default())
            .await
            .unwrap();
    }
    assert_eq!(
        store.fetch(&subject, "b", 2).await.unwrap().messages.len(),
        2
    );

    let first = store.list_consumers(&subject, None, 3).await.unwrap();
    assert!(first.more);
    let names: Vec<&str> = first.entries.iter().map(|c| c.durable.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    let b = &first.entries[1];
    assert_eq!((b.num_pending, b.num_ack_pending), (1, 2), "lag of b");
    let second = store
        .list_consumers(&subject, Some((&subject, "c")), 3)
        .await
        .unwrap();
    assert!(!second.more);
    assert_eq!(second.entries.len(), 1);
    assert_eq!(second.entries[0].durable, "d");

    // Of every subject: from a position on, in (subject, name) order.
    let all = store
        .list_consumers("", Some((&subject, "b")), 2)
        .await
        .unwrap();
    let names: Vec<(&str, &str)> = all
        .entries
        .iter()
        .map(|c| (c.subject.as_str(), c.durable.as_str()))
        .collect();
    assert_eq!(names[0], (subject.as_str(), "c"));
    assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
}

#[tokio::test]
async fn a_purge_removes_the_oldest_messages_in_steps_and_moves_consumers_past_them() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject("purge");
    publish(&store, &subject, 10).await;
    // "held" holds 1..=4; "behind" never fetched.
    assert_eq!(
        store
            .fetch(&subject, "held", 4)
            .await
            .unwrap()
            .messages
            .len(),
        4
    );
    store
        .create_or_update_consumer(&subject, "behind", &ConsumerSettings::default())
        .await
        .unwrap();

    assert_eq!(purge(&store, &subject, 6, 2).await, 6);
    let info = store.subject_info(&subject).await.unwrap();
    assert_eq!(
        (info.first_seq, info.last_seq, info.count, info.bytes),
        (7, 10, 4, 40)
    );
    for durable in ["held", "behind"] {
        let c = store
            .consumer_info(&subject, durable)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.ack_floor, c.num_ack_pending, c.num_pending),
            (6, 0, 4),
            "{durable}"
        );
    }
    let next = store.fetch(&subject, "held", 10).await.unwrap();
    let seqs: Vec<u64> = next.messages.iter().map(|l| l.message.seq).collect();
    assert_eq!(seqs, [7, 8, 9, 10]);

    // All: nothing left, and the next publish goes on after the last.
    assert_eq!(purge(&store, &subject, 0, 500).await, 4);
    let info = store.subject_info(&subject).await.unwrap();
    assert_eq!(
        (info.first_seq, info.last_seq, info.count, info.bytes),
        (0, 10, 0, 0)
    );
    let seq = store
        .publish(&subject, &HashMap::new(), Some(b"after"), None, 5)
        .await
        .unwrap();
    assert_eq!(seq, 11);
    assert_eq!(
        store.fetch(&subject, "behind", 10).await.unwrap().messages[0]
            .message
            .seq,
        11
    );
}

#[tokio::test]
async fn a_deleted_subject_keeps_its_sequences_and_leaves_the_listing_until_used() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject("delete");
    publish(&store, &subject, 3).await;
    store
        .create_or_update_consumer(&subject, "gone", &ConsumerSettings::default())
        .await
        .unwrap();
    assert_eq!(
        store
            .fetch(&subject, "gone", 2)
            .await
            .unwrap()
            .messages
            .len(),
        2
    );
    assert_eq!(purge(&store, &subject, 0, 500).await, 3);
    assert_eq!(
        store.delete_subject_step(&subject, 1000).await.unwrap(),
        (true, 1)
    );
    assert!(
        store
            .consumer_info(&subject, "gone")
            .await
            .unwrap()
            .is_none()
    );
    let listed = |page: mts_storage::store::Page<mts_storage::store::SubjectState>| {
        page.entries.iter().any(|s| s.subject == subject)
    };
    assert!(!listed(
        store.list_subjects(&subject, "", 10).await.unwrap()
    ));

    let seq = store
        .publish(&subject, &HashMap::new(), Some(b"again"), None, 5)
        .await
        .unwrap();
    assert_eq!(seq, 4, "sequences are never reused");
    assert!(listed(store.list_subjects(&subject, "", 10).await.unwrap()));
}

#[tokio::test]
async fn consumers_unused_past_their_threshold_are_removed_and_use_is_recorded() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject("inactive");
    publish(&store, &subject, 1).await;
    let with = |ms: u64| ConsumerSettings {
        inactive_threshold_ms: Some(ms),
        ..ConsumerSettings::default()
    };
    store
        .create_or_update_consumer(&subject, "brief", &with(1))
        .await
        .unwrap();
    store
        .create_or_update_consumer(&subject, "forever", &with(0))
        .await
        .unwrap();
    store
        .create_or_update_consumer(&subject, "hour", &with(3_600_000))
        .await
        .unwrap();
    assert_eq!(
        store
            .fetch(&subject, "brief", 1)
            .await
            .unwrap()
            .messages
            .len(),
        1
    );
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;

    let mut gone = Vec::new();
    loop {
        let batch = store.expire_consumers(100).await.unwrap();
        if batch.is_empty() {
            break;
        }
        gone.extend(batch);
    }
    assert!(
        gone.contains(&(subject.clone(), "brief".to_owned())),
        "{gone:?}"
    );
    let left: Vec<String> = store
        .list_consumers(&subject, None, 10)
        .await
        .unwrap()
        .entries
        .into_iter()
        .map(|c| c.durable)
        .collect();
    assert_eq!(left, ["forever", "hour"]);
    let gone_leases = store.consumer_info(&subject, "brief").await.unwrap();
    assert!(gone_leases.is_none());

    // Use is recorded, to the nearest ten seconds: a last use an hour ago
    // is brought up to now.
    let admin = testing::admin_client().await;
    let (hour_ago,): (u64,) = admin
        .eval(
            "local s, d = ... local t = require('clock').realtime64() - 3600000000000ULL
             box.space.mts_consumers:update({s, d}, {{'=', 'active_ns', t}})
             return t",
            (subject.as_str(), "hour"),
        )
        .await
        .unwrap();
    let before = store
        .consumer_info(&subject, "hour")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(before.active_ns, hour_ago);
    store
        .touch_consumers(&[(subject.clone(), "hour".to_owned())])
        .await
        .unwrap();
    let after = store
        .consumer_info(&subject, "hour")
        .await
        .unwrap()
        .unwrap();
    assert!(
        after.active_ns > hour_ago + 3_500_000_000_000,
        "{}",
        after.active_ns
    );
}
