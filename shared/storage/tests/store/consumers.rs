//! Leases, acks, nacks, redelivery, dead letters and consumer state: the
//! consumer procedures on their own, against a real Tarantool.

use std::collections::HashMap;
use std::time::Duration;

use mts_storage::store::{AckOutcome, ConsumerSettings, DeliverPolicy, Store};
use mts_testkit as testing;

/// A store on the shared test Tarantool and a subject with `n` messages.
async fn subject_with(name: &str, n: u8) -> (Store, String) {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject(name);
    for i in 0..n {
        store
            .publish(&subject, &HashMap::new(), Some(&[i]), None, 1)
            .await
            .unwrap();
    }
    (store, subject)
}

fn seqs(batch: &mts_storage::store::Batch) -> Vec<u64> {
    batch.messages.iter().map(|l| l.message.seq).collect()
}

#[tokio::test]
async fn competing_consumers_lease_disjoint_messages_and_acks_move_the_floor() {
    let (store, subject) = subject_with("lease", 5).await;
    let first = store.fetch(&subject, "d", 2).await.unwrap();
    let second = store.fetch(&subject, "d", 2).await.unwrap();
    assert_eq!((seqs(&first), seqs(&second)), (vec![1, 2], vec![3, 4]));
    assert!(first.next_deadline_ns > 0);
    assert_eq!(first.messages[0].deliveries, 1);

    // Acks of sequences not held change nothing, and name what was not held.
    let refused = store.ack_sequences(&subject, "d", &[2, 5]).await.unwrap();
    assert_eq!(refused.unwrap_err().0, vec![5]);
    assert_eq!(
        store.ack_sequences(&subject, "d", &[2]).await.unwrap(),
        Ok(0)
    );
    assert_eq!(
        store.ack_sequences(&subject, "d", &[1]).await.unwrap(),
        Ok(2)
    );
    let info = store.consumer_info(&subject, "d").await.unwrap().unwrap();
    assert_eq!(
        (
            info.ack_floor,
            info.last_delivered,
            info.num_ack_pending,
            info.num_pending
        ),
        (2, 4, 2, 1)
    );
}

#[tokio::test]
async fn a_nack_or_a_lapsed_lease_redelivers_and_max_deliver_dead_letters() {
    let (store, subject) = subject_with("redeliver", 2).await;
    store
        .create_or_update_consumer(
            &subject,
            "d",
            &ConsumerSettings {
                ack_wait_ms: Some(100),
                max_deliver: Some(2),
                ..ConsumerSettings::default()
            },
        )
        .await
        .unwrap();
    let batch = store.fetch(&subject, "d", 10).await.unwrap();
    assert_eq!(seqs(&batch), vec![1, 2]);
    store.nack(&subject, "d", &[1], 0).await.unwrap().unwrap();
    let again = store.fetch(&subject, "d", 10).await.unwrap();
    assert_eq!(seqs(&again), vec![1]);
    assert_eq!(again.messages[0].deliveries, 2);

    // Both leases lapse; both reached max_deliver 2 only for #1.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let third = store.fetch(&subject, "d", 10).await.unwrap();
    assert_eq!(seqs(&third), vec![2], "#1 went to the dead-letter subject");
    assert_eq!(third.messages[0].deliveries, 2);
    let dlq = format!("{subject}.dlq");
    let letter = store.message(&dlq, 1).await.unwrap().unwrap();
    assert_eq!(letter.data.as_deref().map(|d| d.to_vec()), Some(vec![0]));
    assert_eq!(letter.headers["mts-origin-subject"], subject);
    assert_eq!(letter.headers["mts-origin-sequence"], "1");
    assert_eq!(letter.headers["mts-origin-durable"], "d");
    assert_eq!(letter.headers["mts-origin-delivery-count"], "2");
    let info = store.consumer_info(&subject, "d").await.unwrap().unwrap();
    assert_eq!(info.ack_floor, 1, "a dead-lettered message counts as acked");
}

#[tokio::test]
async fn acks_ride_with_the_next_lease_and_release_gives_leases_back() {
    let (store, subject) = subject_with("ack-consume", 4).await;
    let batch = store
        .consume(&subject, "d", &[], 2, Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seqs(&batch), vec![1, 2]);
    let next = store
        .consume(&subject, "d", &[1, 2], 2, Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seqs(&next), vec![3, 4]);
    let not_held = store
        .consume(&subject, "d", &[1], 2, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(not_held.unwrap_err().0, vec![1], "acked already");

    store.release(&subject, "d", &[3, 4]).await.unwrap();
    let back = store.fetch(&subject, "d", 10).await.unwrap();
    assert_eq!(seqs(&back), vec![3, 4]);
    assert!(back.messages.iter().all(|l| l.deliveries == 2));

    // With nothing to hand out, the call waits for the next commit.
    let waiting = {
        let (store, subject) = (store.clone(), subject.clone());
        tokio::spawn(async move {
            store
                .consume(&subject, "d", &[3, 4], 10, Duration::from_secs(5))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    store
        .publish(&subject, &HashMap::new(), Some(b"late"), None, 4)
        .await
        .unwrap();
    let woken = waiting.await.unwrap().unwrap().unwrap();
    assert_eq!(seqs(&woken), vec![5]);
}

#[tokio::test]
async fn the_cumulative_ack_skips_ahead_but_never_beyond_the_last_sequence() {
    let (store, subject) = subject_with("cumulative", 3).await;
    assert_eq!(
        store.ack_message(&subject, "d", 2).await.unwrap(),
        AckOutcome::Acked { position: 2 }
    );
    assert_eq!(
        store.ack_message(&subject, "d", 1).await.unwrap(),
        AckOutcome::Acked { position: 2 },
        "never back"
    );
    assert_eq!(
        store.ack_message(&subject, "d", 4).await.unwrap(),
        AckOutcome::BeyondLast { last: 3 }
    );
    assert_eq!(
        seqs(&store.fetch(&subject, "d", 10).await.unwrap()),
        vec![3]
    );
}

#[tokio::test]
async fn consumers_start_where_their_policy_says_and_can_be_deleted() {
    let (store, subject) = subject_with("policy", 3).await;
    let put = |durable: &'static str, settings: ConsumerSettings| {
        let (store, subject) = (store.clone(), subject.clone());
        async move {
            store
                .create_or_update_consumer(&subject, durable, &settings)
                .await
                .unwrap()
        }
    };
    assert!(
        put(
            "new",
            ConsumerSettings {
                deliver_policy: Some(DeliverPolicy::New),
                ..ConsumerSettings::default()
            }
        )
        .await
    );
    assert!(
        put(
            "from-2",
            ConsumerSettings {
                deliver_policy: Some(DeliverPolicy::ByStartSequence),
                start_seq: Some(2),
                ..ConsumerSettings::default()
            }
        )
        .await
    );
    assert!(
        !put("from-2", ConsumerSettings::default()).await,
        "updated, not created"
    );
    assert!(
        store
            .fetch(&subject, "new", 10)
            .await
            .unwrap()
            .messages
            .is_empty()
    );
    assert_eq!(
        seqs(&store.fetch(&subject, "from-2", 10).await.unwrap()),
        vec![2, 3]
    );
    let (notified, last) = store.subscribe(&subject, "sub", 0).await.unwrap();
    assert_eq!((notified, last), (0, 3));
    assert_eq!(
        store
            .wait_beyond(&subject, 2, Duration::from_secs(1))
            .await
            .unwrap(),
        3
    );
    let lag = store.consumers_lag(100_000).await.unwrap();
    assert!(
        lag.iter()
            .any(|l| l.subject == subject && l.durable == "from-2" && l.ack_pending == 2)
    );
    assert!(store.delete_consumer(&subject, "from-2").await.unwrap());
    assert!(!store.delete_consumer(&subject, "from-2").await.unwrap());
    assert!(
        store
            .consumer_info(&subject, "from-2")
            .await
            .unwrap()
            .is_none()
    );
}
